"""The Redis mapping store: ``GET``/``SET``/``DEL`` of ``key_prefix + identifier``.

Built on a txredisapi lazy connection pool of ``pool_size`` connections
(:class:`~stalroute.redispool.RedisPoolClient`): while no connection is up a command fails at
once ("not connected"), so an outage costs no lookup time, except in a new pool's first
moments (startup, reload); a pool that gave up after a refused ``AUTH`` or ``SELECT`` is
rebuilt. Every command is bounded by ``lookup_timeout`` (a server that accepts but does not
answer).

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
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed

from stalroute.config import MappingConfig, RedisMappingConfig
from stalroute.mapping import LIST_TIMEOUT, MappingStore, StoreError, scrub, store_error
from stalroute.mapping.redis_url import (  # re-exported: the URL is part of the store
    DEFAULT_PORT,
    RedisTarget,
    parse_redis_url,
    tls_options,
)
from stalroute.redispool import RedisPoolClient

#: ``SCAN … COUNT`` of one ``entries()`` step, and the most keys one ``MGET`` asks for.
SCAN_COUNT = 1000
#: Keys of one ``MGET`` or ``MSET`` of ``lookup_many()``/``upsert_many()`` (the bulk import).
BATCH_KEYS = 1000
#: Characters with a meaning in a ``SCAN MATCH`` pattern (escaped in the key prefix).
_GLOB_SPECIAL = re.compile(r"[*?\[\]\\]")


class RedisMappingStore(RedisPoolClient, MappingStore):
    """The ``[mapping.redis]`` store (see the module docstring)."""

    writable = True
    listable = True

    def __init__(self, settings: RedisMappingConfig, timeout: float) -> None:
        super().__init__(settings.url, reactor=reactor, timeout=timeout,
                         pool_size=settings.pool_size)
        self._prefix = settings.key_prefix
        #: Bound of one entries() call, in seconds.
        self.list_timeout = LIST_TIMEOUT

    def __repr__(self) -> str:
        return f"<RedisMappingStore {self.label}>"

    # --- MappingStore ---------------------------------------------------------------------

    def lookup(self, identifier: str) -> Deferred[str | None]:
        return self._command("lookup", "get", self._prefix + identifier).addCallback(_text)

    def entries(self) -> Deferred[list[tuple[str, str]]]:
        """Every ``key_prefix*`` string key, prefix stripped, with its value; sorted.

        Keys that are not UTF-8 (no identifier can look them up) and keys of other types
        (``MGET`` reads them as nil) are left out.
        """
        d = Deferred.fromCoroutine(self._entries())
        d.addTimeout(self.list_timeout, self._reactor)
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

    # --- commands -------------------------------------------------------------------------

    def _send(self, action: str, name: str, *args: Any) -> Deferred[Any]:
        d = getattr(self._handler, name)(*args)
        d.addTimeout(self._timeout, self._reactor)
        return d.addErrback(store_error, self.label, action, self._secrets)

    def _failure(self, action: str, reason: str) -> StoreError:
        return StoreError(f"{self.label}: {action} failed: {scrub(reason, self._secrets)}")


def build_redis_store(settings: RedisMappingConfig, mapping: MappingConfig,
                      destinations: Collection[str]) -> RedisMappingStore:
    """The ``[mapping.redis]`` store (its registry builder); connects in the background."""
    return RedisMappingStore(settings, mapping.lookup_timeout)


def _text(value: Any) -> str | None:
    """GET's answer as a destination name (None: no key)."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return None if value is None else str(value).strip() or None
