"""A store's txredisapi connection pool: fails fast while Redis is down, recovers by itself.

:class:`RedisPoolClient` is the part the Redis mapping store (:mod:`stalroute.mapping.redis`)
and the fleet's Redis shared store (:mod:`stalroute.acme.shared_stores`) have in common: one
lazy connection pool (``pool_size`` connections that reconnect by themselves) to the server a
``redis[s]://`` URL names, and commands sent on it. Two txredisapi behaviours are guarded
against here:

* while no connection is up, a command waits for one forever; :meth:`~RedisPoolClient._command`
  fails it at once instead ("not connected"), so an outage costs no time. Only a new pool (at
  startup, after a reload or a rebuild) is waited for, up to :data:`STARTUP_WAIT` (at most the
  command timeout), so the first commands are not refused while it connects;
* a failed ``AUTH`` or ``SELECT`` makes the pool stop reconnecting for good; a new pool is
  built (at most every :data:`REBUILD_INTERVAL` seconds) so the store recovers once the server
  is fixed.

A subclass says how a command is sent (:meth:`~RedisPoolClient._send`, bounded by the timeout)
and what its failures are (:meth:`~RedisPoolClient._failure`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import txredisapi
from twisted.internet import task
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from stalroute.mapping import redact_url, url_secrets
from stalroute.mapping.redis_url import MAPPING_KEY, connection_settings

#: Cap of txredisapi's reconnection backoff (its default, 10 s, is long for routing).
RECONNECT_MAX_DELAY = 3.0
#: How often a pool that gave up (bad password, bad db) is rebuilt, in seconds.
REBUILD_INTERVAL = 5.0
#: How long after a pool is built commands wait for its first connection (at most the
#: command timeout) instead of failing at once.
STARTUP_WAIT = 2.0
CONNECT_POLL = 0.02


class RedisPoolClient(ABC):
    """A connection pool to the Redis ``url`` names, and the commands sent on it (see the
    module docstring). Connects in the background; never raises but InvalidStoreSetting
    (named by ``key``) for an unusable URL."""

    def __init__(self, url: str, *, reactor: IReactorTime, timeout: float, pool_size: int,
                 key: str = MAPPING_KEY, charset: str | None = "utf-8") -> None:
        self._target, self._tls = connection_settings(url, key)
        self._reactor = reactor
        self._timeout = timeout
        self._pool_size = pool_size
        self._charset = charset
        self.label = redact_url(url)
        self._secrets = url_secrets(url)
        self._closed = False
        self._gave_up: str | None = None
        self._built_at = 0.0
        self._handler = self._connect()

    @property
    def connected(self) -> bool:
        """True while at least one pooled connection is up."""
        return bool(self._handler._factory.size > 0)

    def close(self) -> Deferred[None]:
        """Stop reconnecting and close every connection."""
        if self._closed:
            return succeed(None)
        self._closed = True
        return self._handler.disconnect().addBoth(lambda _: None)

    @abstractmethod
    def _send(self, action: str, name: str, *args: Any) -> Deferred[Any]:
        """Send the command ``name`` on the pool, bounded by the timeout; failures are the
        store's for ``action``."""

    @abstractmethod
    def _failure(self, action: str, reason: str) -> Exception:
        """The store's error for ``action`` failing with ``reason`` (secrets scrubbed)."""

    def _connect(self) -> Any:
        """A new pool; it connects in the background and never raises here."""
        target = self._target
        handler = txredisapi.lazyConnectionPool(
            host=target.host, port=target.port, dbid=target.db, poolsize=self._pool_size,
            reconnect=True, charset=self._charset, password=target.password,
            username=target.username, ssl_context_factory=self._tls,
            connectTimeout=self._timeout, replyTimeout=self._timeout, convertNumbers=False,
        )
        factory = handler._factory  # txredisapi exposes the pool's tunables only there
        factory.maxDelay = RECONNECT_MAX_DELAY
        # Fires (once) when the whole pool is up, or fails when it gave up (AUTH, SELECT).
        factory.deferred.addErrback(self._note_gave_up, factory)
        self._gave_up = None
        self._built_at = self._reactor.seconds()
        return handler

    def _note_gave_up(self, failure: Failure, factory: Any) -> None:
        if factory is self._handler._factory:
            self._gave_up = failure.getErrorMessage()

    def _command(self, action: str, name: str, *args: Any) -> Deferred[Any]:
        """Send one command; fail at once while the pool is down (after its first moments)."""
        if self._closed:
            return fail(self._failure(action, "the store is closed"))
        if self.connected:
            return self._send(action, name, *args)
        self._maybe_rebuild()
        # A new pool (startup, reload, rebuild) is still connecting: wait for it briefly
        # rather than failing the first commands; later, an outage fails at once.
        grace = self._built_at + min(self._timeout, STARTUP_WAIT) - self._reactor.seconds()
        if grace <= 0 or self._gave_up:
            return fail(self._not_connected(action))
        d = Deferred.fromCoroutine(self._wait_for_connection(grace))
        return d.addCallback(lambda _: self._send(action, name, *args) if self.connected
                             else fail(self._not_connected(action)))

    def _not_connected(self, action: str) -> Exception:
        reason = f"not connected ({self._gave_up})" if self._gave_up else "not connected"
        return self._failure(action, reason)

    async def _wait_for_connection(self, seconds: float) -> None:
        """Returns once a connection is up, the pool gave up, or ``seconds`` have passed."""
        deadline = self._reactor.seconds() + seconds
        while not (self.connected or self._gave_up or self._reactor.seconds() >= deadline):
            await task.deferLater(self._reactor, CONNECT_POLL, lambda: None)

    def _maybe_rebuild(self) -> None:
        """Replace a pool that stopped reconnecting (it gave up after AUTH or SELECT failed)."""
        if (self._handler._factory.stopped
                and self._reactor.seconds() - self._built_at >= REBUILD_INTERVAL):
            old, self._handler = self._handler, self._connect()
            old.disconnect().addErrback(lambda _: None)
