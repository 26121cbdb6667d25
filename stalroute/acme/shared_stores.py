"""The fleet's :class:`~stalroute.acme.store.SharedStore`: the ``[cluster]`` coordinator's Redis
or PostgreSQL (SPEC §2.11, §2.13), built by :func:`shared_store_for`.

* :class:`RedisSharedStore`: values under ``stalroute:kv:`` + key (``SET … PX`` for a ttl,
  so Redis expires them by itself and :meth:`~RedisSharedStore.purge` has nothing to do: it
  answers 0 without scanning), leases under ``stalroute:lease:`` + task (two name spaces, so
  no key can collide with a lease). A lease is taken
  with ``SET key holder NX PX ttl`` and renewed or released only while it holds ``holder``,
  each in one Lua script (``EVAL``), so the check and the change are atomic.
* :class:`PostgresSharedStore`: the tables ``stalroute_acme(key, value bytea, expires_at)``
  and ``stalroute_leases(task, holder, expires_at)``, created if missing on first use. Every
  time is the database's (``now()``), so the nodes' clocks do not matter; a lease is one
  ``INSERT … ON CONFLICT … DO UPDATE … WHERE`` (the row lock makes exactly one holder win).

Failures: a store that is down, silent or refusing fails the Deferred with
:class:`StoreUnavailable` (the URL's password never shown), never later than a bound: Redis
fails at once while its pool is disconnected (after a short wait for a new pool's first
connection) and bounds every command by the timeout; PostgreSQL bounds the connection
(``connect_timeout``), each transaction (``statement_timeout``), a silent server (TCP
keepalives, ``tcp_user_timeout``) and, as a last resort, the Deferred itself.
"""

from __future__ import annotations

import math
import threading
from typing import Any

import psycopg2
import psycopg2.errors
import psycopg2.extensions
import txredisapi
from twisted.enterprise import adbapi
from twisted.internet import error
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure

from stalroute.acme.store import SharedStore
from stalroute.config import ClusterConfig, Config
from stalroute.coordinators import CLUSTER_URL_KEY, listener_dsn
from stalroute.mapping import redact_url, scrub, url_secrets
from stalroute.mapping.factory import InvalidStoreSetting
from stalroute.mapping.sql import in_transaction, set_statement_timeout
from stalroute.redispool import RedisPoolClient

__all__ = ["PostgresSharedStore", "RedisSharedStore", "StoreUnavailable", "shared_store_for"]

#: Bound of one command (Redis) or of connecting (PostgreSQL), in seconds.
COMMAND_TIMEOUT = 5.0
#: The Redis name space: values under ``PREFIX + "kv:" + key``, leases under
#: ``PREFIX + "lease:" + task``.
PREFIX = "stalroute:"
#: Connections of a store's pool (the ACME traffic is a few commands a minute).
POOL_SIZE = 2

#: Take the lease (``SET NX PX``) or renew it if ``ARGV[1]`` holds it: 1 when it is ours.
ACQUIRE_SCRIPT = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""
#: Delete the lease if ``ARGV[1]`` holds it.
RELEASE_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class StoreUnavailable(Exception):
    """The shared store could not answer: down, silent, refusing us, or closed."""


def _unavailable(failure: Failure, label: str, action: str, secrets: tuple[str, ...]) -> Failure:
    """Errback: a store failure as :class:`StoreUnavailable` naming the store and the action.
    Programming errors (TypeError…) pass through."""
    if failure.check(StoreUnavailable):
        return failure
    if failure.check(error.TimeoutError, TimeoutError, CancelledError):
        detail = "no answer in time"
    elif failure.check(txredisapi.RedisError, txredisapi.ConnectionError, psycopg2.Error,
                       error.ConnectError, error.ConnectionLost, OSError):
        detail = failure.getErrorMessage() or type(failure.value).__name__
    else:
        return failure
    return Failure(StoreUnavailable(f"{label}: {action} failed: {scrub(detail, secrets)}"))


def _milliseconds(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


# --- Redis -----------------------------------------------------------------------------------


class RedisSharedStore(RedisPoolClient):
    """The shared store in the coordinator's Redis (see the module docstring), on a
    :class:`~stalroute.redispool.RedisPoolClient` pool of :data:`POOL_SIZE` connections."""

    def __init__(self, url: str, reactor: Any, timeout: float = COMMAND_TIMEOUT,
                 prefix: str = PREFIX) -> None:
        super().__init__(url, reactor=reactor, timeout=timeout, pool_size=POOL_SIZE,
                         key=CLUSTER_URL_KEY, charset=None)
        self._prefix = prefix + "kv:"
        self._lease_prefix = prefix + "lease:"

    def __repr__(self) -> str:
        return f"<RedisSharedStore {self.label}>"

    # --- SharedStore ----------------------------------------------------------------------

    def get(self, key: str) -> Deferred[bytes | None]:
        return self._command("get", "GET", self._prefix + key).addCallback(_bytes)

    def put(self, key: str, value: bytes, ttl: float | None = None) -> Deferred[None]:
        if ttl is not None and ttl <= 0:  # expired already
            return self.delete(key)
        expiry = () if ttl is None else ("PX", _milliseconds(ttl))
        d = self._command("put", "SET", self._prefix + key, bytes(value), *expiry)
        return d.addCallback(lambda _: None)

    def delete(self, key: str) -> Deferred[None]:
        return self._command("delete", "DEL", self._prefix + key).addCallback(lambda _: None)

    def acquire_lease(self, task: str, holder: str, ttl: float) -> Deferred[bool]:
        d = self._command("acquire_lease", "eval", ACQUIRE_SCRIPT,
                          [self._lease_prefix + task], [holder, _milliseconds(ttl)])
        return d.addCallback(lambda taken: int(taken) == 1)

    def release_lease(self, task: str, holder: str) -> Deferred[None]:
        d = self._command("release_lease", "eval", RELEASE_SCRIPT,
                          [self._lease_prefix + task], [holder])
        return d.addCallback(lambda _: None)

    def purge(self) -> Deferred[int]:
        """Nothing to do: Redis removes expired values and leases by itself."""
        if self._closed:
            return fail(self._failure("purge", "the store is closed"))
        return succeed(0)

    # --- commands -------------------------------------------------------------------------

    def _send(self, action: str, name: str, *args: Any) -> Deferred[Any]:
        """``eval``: the handler's method, which caches the script."""
        try:
            if name == "eval":
                d = self._handler.eval(*args)
            else:
                d = self._handler.execute_command(name, *args)
        except txredisapi.ConnectionError as exc:  # the connection dropped just now
            return fail(self._failure(action, str(exc)))
        d.addTimeout(self._timeout, self._reactor)
        return d.addErrback(_unavailable, self.label, action, self._secrets)

    def _failure(self, action: str, reason: str) -> StoreUnavailable:
        return StoreUnavailable(f"{self.label}: {action} failed: {scrub(reason, self._secrets)}")


def _bytes(value: Any) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return str(value).encode()  # a status line; never a value SET stored


# --- PostgreSQL ------------------------------------------------------------------------------

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS stalroute_acme (key text PRIMARY KEY, value bytea NOT NULL, "
    "expires_at timestamptz)",
    "CREATE TABLE IF NOT EXISTS stalroute_leases (task text PRIMARY KEY, holder text NOT NULL, "
    "expires_at timestamptz NOT NULL)",
)
_GET = ("SELECT value FROM stalroute_acme WHERE key = %s "
        "AND (expires_at IS NULL OR expires_at > now())")
_PUT = ("INSERT INTO stalroute_acme (key, value, expires_at) "
        "VALUES (%s, %s, now() + %s::float8 * interval '1 second') "
        "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, expires_at = EXCLUDED.expires_at")
_DELETE = "DELETE FROM stalroute_acme WHERE key = %s"
_ACQUIRE = ("INSERT INTO stalroute_leases (task, holder, expires_at) "
            "VALUES (%s, %s, now() + %s::float8 * interval '1 second') "
            "ON CONFLICT (task) DO UPDATE SET holder = EXCLUDED.holder, "
            "expires_at = EXCLUDED.expires_at "
            "WHERE stalroute_leases.expires_at < now() "
            "OR stalroute_leases.holder = EXCLUDED.holder RETURNING holder")
_RELEASE = "DELETE FROM stalroute_leases WHERE task = %s AND holder = %s"
_PURGE = ("DELETE FROM stalroute_acme WHERE expires_at <= now()",
          "DELETE FROM stalroute_leases WHERE expires_at <= now()")


class PostgresSharedStore:
    """The shared store in the coordinator's PostgreSQL (see the module docstring): psycopg2
    connections in an adbapi pool's threads, one transaction per operation."""

    def __init__(self, url: str, reactor: Any, timeout: float = COMMAND_TIMEOUT) -> None:
        self._secrets = url_secrets(url)
        self._dsn = listener_dsn(url, timeout)  # the bus's keepalives bound a silent server
        try:
            psycopg2.extensions.parse_dsn(self._dsn)
        except psycopg2.ProgrammingError as exc:
            raise InvalidStoreSetting(
                f"{CLUSTER_URL_KEY}: {scrub(str(exc), self._secrets)}") from None
        self._reactor = reactor
        self._timeout = timeout
        self.label = redact_url(url)
        self._closed = False
        self._schema_ready = False
        self._schema_lock = threading.Lock()
        self._pool = adbapi.ConnectionPool("psycopg2", self._dsn, cp_min=1, cp_max=POOL_SIZE,
                                           cp_reconnect=True, cp_noisy=False)

    def __repr__(self) -> str:
        return f"<PostgresSharedStore {self.label}>"

    # --- SharedStore ----------------------------------------------------------------------

    def get(self, key: str) -> Deferred[bytes | None]:
        def work(cursor: Any) -> bytes | None:
            cursor.execute(_GET, (key,))
            row = cursor.fetchone()
            return None if row is None else bytes(row[0])
        return self._run("get", work)

    def put(self, key: str, value: bytes, ttl: float | None = None) -> Deferred[None]:
        def work(cursor: Any) -> None:
            cursor.execute(_PUT, (key, psycopg2.Binary(bytes(value)), ttl))
        return self._run("put", work)

    def delete(self, key: str) -> Deferred[None]:
        def work(cursor: Any) -> None:
            cursor.execute(_DELETE, (key,))
        return self._run("delete", work)

    def acquire_lease(self, task: str, holder: str, ttl: float) -> Deferred[bool]:
        def work(cursor: Any) -> bool:
            cursor.execute(_ACQUIRE, (task, holder, ttl))
            return cursor.fetchone() is not None
        return self._run("acquire_lease", work)

    def release_lease(self, task: str, holder: str) -> Deferred[None]:
        def work(cursor: Any) -> None:
            cursor.execute(_RELEASE, (task, holder))
        return self._run("release_lease", work)

    def purge(self) -> Deferred[int]:
        """Delete the expired values and leases; how many rows went."""
        def work(cursor: Any) -> int:
            removed = 0
            for statement in _PURGE:
                cursor.execute(statement)
                removed += max(0, cursor.rowcount)
            return removed
        return self._run("purge", work)

    def close(self) -> Deferred[None]:
        """Stop the pool's threads and close its connections."""
        if not self._closed:
            self._closed = True
            self._pool.close()
        return succeed(None)

    # --- running statements ---------------------------------------------------------------

    def _run(self, action: str, work: Any) -> Deferred[Any]:
        """``work(cursor)`` in a pool thread, as one transaction; bounded in the reactor too
        (the thread itself is freed by the libpq and server timeouts)."""
        if self._closed:  # a stopped pool would queue the statement forever
            return fail(StoreUnavailable(f"{self.label}: {action} failed: the store is closed"))
        d: Deferred[Any] = deferToThreadPool(self._reactor, self._pool.threadpool,
                                             self._in_thread, work)
        d.addTimeout(2 * self._timeout + 1, self._reactor)
        return d.addErrback(_unavailable, self.label, action, self._secrets)

    def _in_thread(self, work: Any) -> Any:
        return in_transaction(self._pool, lambda connection: self._bounded(connection, work))

    def _bounded(self, connection: Any, work: Any) -> Any:
        """``work(cursor)`` with every statement bounded by the timeout (tables made first)."""
        self._ensure_schema(connection)
        with connection.cursor() as cursor:
            set_statement_timeout(cursor, self._timeout)
            return work(cursor)

    def _ensure_schema(self, connection: Any) -> None:
        """Create the tables once per store; another instance creating them at the same
        moment is no error."""
        if self._schema_ready:
            return
        with self._schema_lock:
            if self._schema_ready:
                return
            for statement in SCHEMA:
                try:
                    with connection.cursor() as cursor:
                        cursor.execute(statement)
                    connection.commit()
                except (psycopg2.errors.UniqueViolation, psycopg2.errors.DuplicateTable):
                    connection.rollback()  # raced with another instance: it exists now
            self._schema_ready = True


# --- the factory -----------------------------------------------------------------------------


def shared_store_for(config: Config | ClusterConfig, reactor: Any) -> SharedStore | None:
    """The shared store of the ``[cluster]`` coordinator (``config`` or its ``cluster``
    table); None without one (a single instance keeps its ACME state in a directory).
    InvalidStoreSetting (key ``cluster.url``) for an unusable URL; connects in the
    background (Redis) or on first use (PostgreSQL)."""
    cluster = config.cluster if isinstance(config, Config) else config
    if not cluster.url:
        return None
    if cluster.coordinator == "redis":
        return RedisSharedStore(cluster.url, reactor)
    if cluster.coordinator == "postgresql":
        return PostgresSharedStore(cluster.url, reactor)
    return None
