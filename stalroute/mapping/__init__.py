"""Mapping stores: where an account's destination is written down.

Every store implements :class:`MappingStore`, each operation returning a Deferred, so the
router, the admin API and the cluster code never need to know which store is behind them. A
store that cannot do something still has the method and fails it with a dedicated
:class:`StoreError`: :class:`ReadOnlyStore` for writes, :class:`NotListable` for
:meth:`MappingStore.entries` (the admin API answers 501 to both). Which stores exist, and how
each is configured and built, is the registry :data:`stalroute.config.stores.STORE_KINDS`;
:func:`stalroute.mapping.factory.build_store` builds the configured one, and a store module
refuses settings it cannot run with :class:`InvalidStoreSetting` (defined here, not in the
factory, so that the store modules the factory imports never import it back).

Also here: what the network stores share to keep passwords out of messages and logs
(:func:`redact_url`, :func:`url_secrets`, :func:`scrub`) and to report any failure of an
operation as a :class:`StoreError` naming the store (:func:`store_error`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from twisted.internet import defer, error
from twisted.internet.defer import Deferred, DeferredSemaphore, FirstError, gatherResults
from twisted.python.failure import Failure

#: Upper bound of one :meth:`MappingStore.entries` call of a network store (a whole-table
#: read: generous, but an export never hangs for good).
LIST_TIMEOUT = 300.0
#: Operations in flight at once when :meth:`MappingStore.lookup_many` or
#: :meth:`~MappingStore.upsert_many` fall back to one call per row.
BATCH_CONCURRENCY = 16


class UnsupportedStore(Exception):
    """``[mapping]`` settings this version cannot run (startup refuses them, naming the key)."""


class InvalidStoreSetting(UnsupportedStore):
    """A store setting that parses as TOML but cannot work (an unknown Redis URL parameter, a
    missing CA file). The message starts with the key path."""


class StoreError(Exception):
    """The store could not answer (unreachable, timed out, failed)."""


class ReadOnlyStore(StoreError):
    """The store has no write statements configured (the admin API answers 501)."""


class NotListable(StoreError):
    """The store cannot list its mappings (SQL without ``list_query``; the admin API's
    ``GET /mappings/export`` answers 501)."""


class MappingStore(ABC):
    """An ``identifier → destination name`` table."""

    #: False when the store cannot write (SQL without upsert/delete statements).
    writable: bool
    #: False when :meth:`entries` fails with NotListable (SQL without ``list_query``).
    listable: bool

    @abstractmethod
    def lookup(self, identifier: str) -> Deferred[str | None]:
        """The destination name for ``identifier``, or None when it is not mapped."""

    @abstractmethod
    def entries(self) -> Deferred[list[tuple[str, str]]]:
        """Every ``(identifier, destination)`` pair, sorted by identifier (bulk export).

        Fails with :class:`NotListable` when the store cannot list (see ``listable``).
        """

    @abstractmethod
    def upsert(self, identifier: str, destination: str) -> Deferred[None]:
        """Map ``identifier`` to ``destination``, replacing any existing row."""

    @abstractmethod
    def delete(self, identifier: str) -> Deferred[bool]:
        """Remove the mapping; True when there was one."""

    @abstractmethod
    def reload(self) -> Deferred[int | None]:
        """Re-read the backing data (file stores); the number of entries, when known."""

    @abstractmethod
    def close(self) -> Deferred[None]:
        """Release connections."""

    def lookup_many(self, identifiers: Sequence[str]) -> Deferred[list[str | None]]:
        """The destination of each identifier, in order (bulk import compares before writing).

        This default calls :meth:`lookup` per identifier, :data:`BATCH_CONCURRENCY` at once;
        stores that can answer many in one round trip override it.
        """
        return Deferred.fromCoroutine(_each_limited(self.lookup, identifiers))

    def upsert_many(self, pairs: Sequence[tuple[str, str]]) -> Deferred[None]:
        """Write every ``(identifier, destination)`` pair, each identifier named once (bulk
        import).

        This default calls :meth:`upsert` per pair, :data:`BATCH_CONCURRENCY` at once; stores
        that can write many in one go override it.
        """
        d = Deferred.fromCoroutine(_each_limited(lambda pair: self.upsert(*pair), pairs))
        return d.addCallback(lambda _: None)


T = TypeVar("T")
R = TypeVar("R")


async def _each_limited(operation: Callable[[T], Deferred[R]], items: Iterable[T],
                       limit: int = BATCH_CONCURRENCY) -> list[R]:
    """``operation`` on every item, at most ``limit`` at once; the results in item order.
    The first failure is raised as itself (the other operations still run to their end)."""
    semaphore = DeferredSemaphore(limit)
    try:
        return await gatherResults([semaphore.run(operation, item) for item in items],
                                   consumeErrors=True)
    except FirstError as exc:
        exc.subFailure.raiseException()
        raise  # pragma: no cover - raiseException always raises


# --- shared by the network stores -----------------------------------------------------------

#: Query parameters that carry secrets in store URLs (libpq's names).
_SECRET_PARAMETERS = frozenset({"password", "sslpassword"})
_HIDDEN = "***"


def url_secrets(url: str) -> tuple[str, ...]:
    """Every form in which ``url`` carries a password, longest first, for :func:`scrub`."""
    parts = urlsplit(url)
    raw = [parts.password or ""]  # still percent-encoded, as written
    raw += [value for key, _, value in (item.partition("=") for item in parts.query.split("&"))
            if key in _SECRET_PARAMETERS]
    forms = {form for secret in raw if secret for form in (secret, unquote(secret))}
    return tuple(sorted(forms, key=len, reverse=True))


def redact_url(url: str) -> str:
    """``url`` fit for logs and error messages: password and secret parameters hidden."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    if parts.password is None and not any(k in _SECRET_PARAMETERS for k, _ in query):
        return url
    netloc = parts.netloc
    if parts.password is not None:
        userinfo, _, hostport = netloc.rpartition("@")
        netloc = f"{userinfo.split(':', 1)[0]}:{_HIDDEN}@{hostport}"
    shown = [(k, _HIDDEN if k in _SECRET_PARAMETERS else v) for k, v in query]
    return urlunsplit(parts._replace(netloc=netloc, query=urlencode(shown, safe="*/:")))


def scrub(message: str, secrets: Iterable[str]) -> str:
    """One line of ``message`` with every secret replaced (driver errors may quote a DSN)."""
    line = " ".join(message.split())
    for secret in secrets:
        line = line.replace(secret, _HIDDEN)
    return line


def store_error(failure: Failure, label: str, action: str, secrets: Iterable[str]) -> Failure:
    """Errback: any failure of a store operation as a :class:`StoreError` naming the store.

    ``StoreError``s (``ReadOnlyStore`` and ``NotListable`` among them) pass through unchanged.
    """
    if failure.check(StoreError):
        return failure
    detail = failure.getErrorMessage() or type(failure.value).__name__
    if failure.check(error.TimeoutError, defer.TimeoutError, defer.CancelledError):
        detail = "no answer in time"
    return Failure(StoreError(f"{label}: {action} failed: {scrub(detail, secrets)}"))
