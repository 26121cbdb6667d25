"""The Redis mapping store: ``GET``/``SET``/``DEL`` of ``key_prefix + identifier``.

Built on a txredisapi lazy connection pool (``pool_size`` connections that reconnect by
themselves). Two txredisapi behaviours are guarded against here:

* while no connection is up, a command waits for one forever; the store fails it at once
  instead ("not connected"), so an outage costs no lookup time, and it bounds every command
  by ``lookup_timeout`` (a server that accepts but does not answer);
* a failed ``AUTH`` or ``SELECT`` makes the pool stop reconnecting for good; the store builds
  a new pool (at most every :data:`REBUILD_INTERVAL` seconds) so it recovers once the server
  is fixed.

URL: ``redis[s]://[[user]:password@]host[:port][/db]``; query parameters ``db``,
``ssl_ca_certs`` (a PEM file of CAs to trust instead of the system store) and
``ssl_cert_reqs`` (``required``, the default, or ``none`` to skip verification), named as
in redis-py. ``rediss://`` verifies the server's certificate against the host name or IP.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import txredisapi
from OpenSSL import SSL
from twisted.internet import reactor, ssl
from twisted.internet.defer import Deferred, fail, succeed

from stalroute.config import RedisMappingConfig
from stalroute.mapping import StoreError
from stalroute.mapping.factory import (
    InvalidStoreSetting,
    redact_url,
    scrub,
    store_error,
    url_secrets,
)

DEFAULT_PORT = 6379
#: Cap of txredisapi's reconnection backoff (its default, 10 s, is long for routing).
RECONNECT_MAX_DELAY = 3.0
#: How often a pool that gave up (bad password, bad db) is rebuilt.
REBUILD_INTERVAL = 5.0
_QUERY_PARAMETERS = ("db", "ssl_ca_certs", "ssl_cert_reqs")
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


class RedisMappingStore:
    """The ``[mapping.redis]`` store (see the module docstring)."""

    writable = True

    def __init__(self, settings: RedisMappingConfig, timeout: float) -> None:
        self._target = parse_redis_url(settings.url)
        self._tls = tls_options(self._target) if self._target.tls else False
        self._prefix = settings.key_prefix
        self._pool_size = settings.pool_size
        self._timeout = timeout
        self.label = redact_url(settings.url)
        self._secrets = url_secrets(settings.url)
        self._closed = False
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
        factory.deferred.addErrback(self._note_gave_up)
        self._gave_up = None
        self._built_at = time.monotonic()
        return handler

    def _note_gave_up(self, failure: Any) -> None:
        self._gave_up = failure.getErrorMessage()

    @property
    def connected(self) -> bool:
        """True while at least one pooled connection is up."""
        return self._handler._factory.size > 0

    # --- MappingStore ---------------------------------------------------------------------

    def lookup(self, identifier: str) -> Deferred[str | None]:
        return self._command("lookup", "get", self._prefix + identifier).addCallback(_text)

    def upsert(self, identifier: str, destination: str) -> Deferred[None]:
        d = self._command("upsert", "set", self._prefix + identifier, destination)
        return d.addCallback(lambda _: None)

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

    def _command(self, action: str, name: str, *args: str) -> Deferred[Any]:
        if self._closed:
            return fail(StoreError(f"{self.label}: {action} failed: the store is closed"))
        if not self.connected:
            self._maybe_rebuild()
            reason = f"not connected ({self._gave_up})" if self._gave_up else "not connected"
            return fail(StoreError(f"{self.label}: {action} failed: "
                                   f"{scrub(reason, self._secrets)}"))
        d = getattr(self._handler, name)(*args)
        d.addTimeout(self._timeout, reactor)
        return d.addErrback(store_error, self.label, action, self._secrets)

    def _maybe_rebuild(self) -> None:
        """Replace a pool that stopped reconnecting (it gave up after AUTH or SELECT failed)."""
        factory = self._handler._factory
        if factory.stopped and time.monotonic() - self._built_at >= REBUILD_INTERVAL:
            old, self._handler = self._handler, self._connect()
            old.disconnect().addErrback(lambda _: None)


def _text(value: Any) -> str | None:
    """GET's answer as a destination name (None: no key)."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return None if value is None else str(value).strip() or None
