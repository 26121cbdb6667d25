"""The Redis mapping store: ``GET``/``SET``/``DEL`` of ``key_prefix + identifier``.

Built on a txredisapi lazy connection pool (``pool_size`` connections that reconnect by
themselves). Two txredisapi behaviours are guarded against here:

* while no connection is up, a command waits for one forever; the store fails it at once
  instead ("not connected"), so an outage costs no lookup time, and it bounds every command
  by ``lookup_timeout`` (a server that accepts but does not answer). Only a new pool (at
  startup, after a reload) is waited for, up to :data:`STARTUP_WAIT`, so the first logins
  are not refused while it connects;
* a failed ``AUTH`` or ``SELECT`` makes the pool stop reconnecting for good; the store builds
  a new pool (at most every :data:`REBUILD_INTERVAL` seconds) so it recovers once the server
  is fixed.

``entries()`` (the admin export) walks ``key_prefix*`` with ``SCAN`` (:data:`SCAN_COUNT` keys
per step, so Redis never blocks on a large keyspace) and reads the values with one ``MGET``
per step; the whole walk is bounded by :data:`~stalroute.mapping.LIST_TIMEOUT`, each command
by ``lookup_timeout``. The bulk import reads and writes with one ``MGET`` / ``MSET`` per
:data:`BATCH_KEYS` rows (``lookup_many()``, ``upsert_many()``).

URL: ``redis[s]://[[user]:password@]host[:port][/db]``; query parameters ``db``,
``ssl_ca_certs`` (a PEM file of CAs to trust instead of the system store) and
``ssl_cert_reqs`` (``required``, the default, or ``none`` to skip verification), named as
in redis-py. ``rediss://`` verifies the server's certificate against the host name or IP.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import txredisapi
from OpenSSL import SSL
from twisted.internet import reactor, ssl, task
from twisted.internet.defer import Deferred, fail, succeed

from stalroute.config import MappingConfig, RedisMappingConfig
from stalroute.mapping import (
    LIST_TIMEOUT,
    MappingStore,
    StoreError,
    redact_url,
    scrub,
    store_error,
    url_secrets,
)
from stalroute.mapping.factory import InvalidStoreSetting

DEFAULT_PORT = 6379
#: Cap of txredisapi's reconnection backoff (its default, 10 s, is long for routing).
RECONNECT_MAX_DELAY = 3.0
#: How often a pool that gave up (bad password, bad db) is rebuilt.
REBUILD_INTERVAL = 5.0
#: How long after a pool is built commands wait for its first connection (at most the
#: lookup timeout) instead of failing at once.
STARTUP_WAIT = 2.0
CONNECT_POLL = 0.02
#: ``SCAN … COUNT`` of one ``entries()`` step, and the most keys one ``MGET`` asks for.
SCAN_COUNT = 1000
#: Keys of one ``MGET`` or ``MSET`` of ``lookup_many()``/``upsert_many()`` (the bulk import).
BATCH_KEYS = 1000
_QUERY_PARAMETERS = ("db", "ssl_ca_certs", "ssl_cert_reqs")
#: Characters with a meaning in a ``SCAN MATCH`` pattern (escaped in the key prefix).
_GLOB_SPECIAL = re.compile(r"[*?\[\]\\]")
_PEM_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


@dataclass(frozen=True)
class RedisTarget:
    """Where and how to connect, parsed from the URL."""

    host: str
    port: int
    db: int | None
    username: str | None
    password: str | None
    tls: bool
    ca_file: Path | None = None
    verify: bool = True


def parse_redis_url(url: str) -> RedisTarget:
    """Parse ``url``; InvalidStoreSetting (key ``mapping.redis.url``) when it cannot work."""

    def invalid(problem: str) -> InvalidStoreSetting:
        return InvalidStoreSetting(f"mapping.redis.url: {problem} (in {redact_url(url)})")

    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    if unknown := sorted(set(query) - set(_QUERY_PARAMETERS)):
        raise invalid(f"unknown parameter {unknown[0]!r}; known: {', '.join(_QUERY_PARAMETERS)}")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise invalid("the port is not a number") from None
    if not parts.hostname:
        raise invalid("no host")
    db_text = parts.path.strip("/") or query.get("db", "")
    if db_text and not db_text.isdigit():
        raise invalid(f"the database must be a number, not {db_text!r}")
    reqs = query.get("ssl_cert_reqs", "required").lower()
    if reqs not in ("required", "none"):
        raise invalid("ssl_cert_reqs must be 'required' or 'none'")
    ca_file = Path(query["ssl_ca_certs"]) if query.get("ssl_ca_certs") else None
    return RedisTarget(
        host=parts.hostname,
        port=port,
        db=int(db_text) if db_text else None,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
        tls=parts.scheme.lower() == "rediss",
        ca_file=ca_file,
        verify=reqs == "required",
    )


def tls_options(target: RedisTarget) -> Any:
    """Client TLS settings for ``rediss://`` (InvalidStoreSetting for an unusable CA file)."""
    if not target.verify:
        return ssl.CertificateOptions(verify=False)
    trust = None
    if target.ca_file is not None:
        try:
            blocks = _PEM_CERTIFICATE.findall(target.ca_file.read_bytes())
            if not blocks:
                raise ValueError("no PEM certificate in the file")
            trust = ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(b) for b in blocks])
        except (OSError, ValueError, SSL.Error) as exc:
            raise InvalidStoreSetting(
                f"mapping.redis.url: ssl_ca_certs {target.ca_file}: {exc}") from exc
    return ssl.optionsForClientTLS(target.host, trustRoot=trust)


class RedisMappingStore(MappingStore):
    """The ``[mapping.redis]`` store (see the module docstring)."""

    writable = True
    listable = True

    def __init__(self, settings: RedisMappingConfig, timeout: float) -> None:
        self._target = parse_redis_url(settings.url)
        self._tls = tls_options(self._target) if self._target.tls else False
        self._prefix = settings.key_prefix
        self._pool_size = settings.pool_size
        self._timeout = timeout
        self.label = redact_url(settings.url)
        self._secrets = url_secrets(settings.url)
        self._closed = False
        #: Bound of one entries() call, in seconds.
        self.list_timeout = LIST_TIMEOUT
        self._gave_up: str | None = None
        self._built_at = 0.0
        self._handler = self._connect()

    def __repr__(self) -> str:
        return f"<RedisMappingStore {self.label}>"

    def _connect(self) -> Any:
        """A new pool; it connects in the background and never raises here."""
        target = self._target
        handler = txredisapi.lazyConnectionPool(
            host=target.host, port=target.port, dbid=target.db, poolsize=self._pool_size,
            reconnect=True, password=target.password, username=target.username,
            ssl_context_factory=self._tls, connectTimeout=self._timeout,
            replyTimeout=self._timeout, convertNumbers=False,
        )
        factory = handler._factory  # txredisapi exposes the pool's tunables only there
        factory.maxDelay = RECONNECT_MAX_DELAY
        # Fires (once) when the whole pool is up, or fails when it gave up (AUTH, SELECT).
        factory.deferred.addErrback(self._note_gave_up, factory)
        self._gave_up = None
        self._built_at = reactor.seconds()
        return handler

    def _note_gave_up(self, failure: Any, factory: Any) -> None:
        if factory is self._handler._factory:
            self._gave_up = failure.getErrorMessage()

    @property
    def connected(self) -> bool:
        """True while at least one pooled connection is up."""
        return self._handler._factory.size > 0

    # --- MappingStore ---------------------------------------------------------------------

    def lookup(self, identifier: str) -> Deferred[str | None]:
        return self._command("lookup", "get", self._prefix + identifier).addCallback(_text)

    def entries(self) -> Deferred[list[tuple[str, str]]]:
        """Every ``key_prefix*`` string key, prefix stripped, with its value; sorted.

        Keys that are not UTF-8 (no identifier can look them up) and keys of other types
        (``MGET`` reads them as nil) are left out.
        """
        d = Deferred.fromCoroutine(self._entries())
        d.addTimeout(self.list_timeout, reactor)
        return d.addErrback(store_error, self.label, "list", self._secrets)

    async def _entries(self) -> list[tuple[str, str]]:
        prefix = self._prefix
        pattern = _GLOB_SPECIAL.sub(r"\\\g<0>", prefix) + "*"
        table: dict[str, str] = {}
        cursor = "0"
        while True:
            cursor, found = await self._command("list", "scan", cursor, pattern, SCAN_COUNT)
            keys = [key for key in found if isinstance(key, str) and key.startswith(prefix)]
            for start in range(0, len(keys), SCAN_COUNT):  # COUNT is a hint: split if need be
                batch = keys[start:start + SCAN_COUNT]
                values = await self._command("list", "mget", batch)
                for key, value in zip(batch, values):
                    destination = _text(value)
                    if destination is not None and len(key) > len(prefix):
                        table[key[len(prefix):]] = destination
            if str(cursor) == "0":
                return sorted(table.items())

    def lookup_many(self, identifiers: Sequence[str]) -> Deferred[list[str | None]]:
        """One ``MGET`` per :data:`BATCH_KEYS` identifiers."""
        return Deferred.fromCoroutine(self._lookup_many(identifiers))

    async def _lookup_many(self, identifiers: Sequence[str]) -> list[str | None]:
        answers: list[str | None] = []
        for start in range(0, len(identifiers), BATCH_KEYS):
            keys = [self._prefix + identifier
                    for identifier in identifiers[start:start + BATCH_KEYS]]
            answers += [_text(value) for value in await self._command("lookup", "mget", keys)]
        return answers

    def upsert(self, identifier: str, destination: str) -> Deferred[None]:
        d = self._command("upsert", "set", self._prefix + identifier, destination)
        return d.addCallback(lambda _: None)

    def upsert_many(self, pairs: Sequence[tuple[str, str]]) -> Deferred[None]:
        """One ``MSET`` per :data:`BATCH_KEYS` pairs."""
        return Deferred.fromCoroutine(self._upsert_many(pairs))

    async def _upsert_many(self, pairs: Sequence[tuple[str, str]]) -> None:
        for start in range(0, len(pairs), BATCH_KEYS):
            await self._command("upsert", "mset", {self._prefix + identifier: destination
                                                   for identifier, destination
                                                   in pairs[start:start + BATCH_KEYS]})

    def delete(self, identifier: str) -> Deferred[bool]:
        d = self._command("delete", "delete", self._prefix + identifier)
        return d.addCallback(lambda removed: int(removed) > 0)

    def reload(self) -> Deferred[int | None]:
        """Nothing to re-read: every lookup asks Redis."""
        return succeed(None)

    def close(self) -> Deferred[None]:
        """Stop reconnecting and close every connection."""
        if self._closed:
            return succeed(None)
        self._closed = True
        return self._handler.disconnect().addBoth(lambda _: None)

    # --- commands -------------------------------------------------------------------------

    def _command(self, action: str, name: str, *args: Any) -> Deferred[Any]:
        """Send one command; fail at once while the pool is down (after its first moments)."""
        if self._closed:
            return fail(StoreError(f"{self.label}: {action} failed: the store is closed"))
        if self.connected:
            return self._send(action, name, *args)
        self._maybe_rebuild()
        # A new pool (startup, reload, rebuild) is still connecting: wait for it briefly
        # rather than failing the first logins; later, an outage fails at once.
        grace = self._built_at + min(self._timeout, STARTUP_WAIT) - reactor.seconds()
        if grace <= 0 or self._gave_up:
            return fail(self._not_connected(action))
        d = Deferred.fromCoroutine(self._wait_for_connection(grace))
        return d.addCallback(lambda _: self._send(action, name, *args) if self.connected
                             else fail(self._not_connected(action)))

    def _send(self, action: str, name: str, *args: Any) -> Deferred[Any]:
        d = getattr(self._handler, name)(*args)
        d.addTimeout(self._timeout, reactor)
        return d.addErrback(store_error, self.label, action, self._secrets)

    def _not_connected(self, action: str) -> StoreError:
        reason = f"not connected ({self._gave_up})" if self._gave_up else "not connected"
        return StoreError(f"{self.label}: {action} failed: {scrub(reason, self._secrets)}")

    async def _wait_for_connection(self, seconds: float) -> None:
        """Returns once a connection is up, the pool gave up, or ``seconds`` have passed."""
        deadline = reactor.seconds() + seconds
        while not (self.connected or self._gave_up or reactor.seconds() >= deadline):
            await task.deferLater(reactor, CONNECT_POLL, lambda: None)

    def _maybe_rebuild(self) -> None:
        """Replace a pool that stopped reconnecting (it gave up after AUTH or SELECT failed)."""
        if (self._handler._factory.stopped
                and reactor.seconds() - self._built_at >= REBUILD_INTERVAL):
            old, self._handler = self._handler, self._connect()
            old.disconnect().addErrback(lambda _: None)


def build_redis_store(settings: RedisMappingConfig, mapping: MappingConfig,
                      destinations: Collection[str]) -> RedisMappingStore:
    """The ``[mapping.redis]`` store (its registry builder); connects in the background."""
    return RedisMappingStore(settings, mapping.lookup_timeout)


def _text(value: Any) -> str | None:
    """GET's answer as a destination name (None: no key)."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return None if value is None else str(value).strip() or None
