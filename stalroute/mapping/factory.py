"""Builds the configured mapping store, plus what the network stores share.

The drivers (psycopg2, txredisapi) are imported only when their store is configured, so a
file-store deployment never loads them.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from twisted.internet import defer, error
from twisted.python.failure import Failure

from stalroute.config import MappingConfig
from stalroute.mapping import MappingStore, StoreError
from stalroute.mapping.file import FileMappingStore

#: Query parameters that carry secrets in store URLs (libpq's names).
_SECRET_PARAMETERS = frozenset({"password", "sslpassword"})
_HIDDEN = "***"


class UnsupportedStore(Exception):
    """``[mapping]`` settings this version cannot run (startup refuses them, naming the key)."""


class InvalidStoreSetting(UnsupportedStore):
    """A store setting that parses as TOML but cannot work (a statement without ``$1``, an
    unknown URL parameter, a missing CA file). The message starts with the key path."""


def build_store(mapping: MappingConfig, destinations: Collection[str]) -> MappingStore:
    """The store ``[mapping]`` names.

    Raises MappingFileError for a bad TSV file and InvalidStoreSetting for unusable SQL or
    Redis settings. Network stores never contact their server here: one that is down at boot
    must not stop stalroute from starting (its lookups fail until it is back).
    """
    if mapping.source == "file" and mapping.file is not None:
        return FileMappingStore(mapping.file.path, destinations, mapping.normalize)
    if mapping.source == "sql" and mapping.sql is not None:
        from stalroute.mapping.sql import build_sql_store

        return build_sql_store(mapping.sql, mapping.lookup_timeout)
    if mapping.source == "redis" and mapping.redis is not None:
        from stalroute.mapping.redis import RedisMappingStore

        return RedisMappingStore(mapping.redis, mapping.lookup_timeout)
    raise UnsupportedStore(f"mapping.source: the {mapping.source!r} store is not available "
                           "in this version yet")


# --- shared by the network stores -----------------------------------------------------------


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

    ``StoreError``s (``ReadOnlyStore`` among them) pass through unchanged.
    """
    if failure.check(StoreError):
        return failure
    detail = failure.getErrorMessage() or failure.type.__name__
    if failure.check(error.TimeoutError, defer.TimeoutError, defer.CancelledError):
        detail = "no answer in time"
    return Failure(StoreError(f"{label}: {action} failed: {scrub(detail, secrets)}"))
