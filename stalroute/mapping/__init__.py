"""Mapping stores: where an account's destination is written down.

Every store offers the same five operations, each returning a Deferred, so the router, the
admin API and the cluster code never need to know which store is behind them.
"""

from __future__ import annotations

from typing import Protocol

from twisted.internet.defer import Deferred


class StoreError(Exception):
    """The store could not answer (unreachable, timed out, failed)."""


class ReadOnlyStore(StoreError):
    """The store has no write statements configured (the admin API answers 501)."""


class MappingStore(Protocol):
    """An ``identifier → destination name`` table."""

    #: False when the store cannot write (SQL without upsert/delete statements).
    writable: bool

    def lookup(self, identifier: str) -> Deferred[str | None]:
        """The destination name for ``identifier``, or None when it is not mapped."""

    def upsert(self, identifier: str, destination: str) -> Deferred[None]:
        """Map ``identifier`` to ``destination``, replacing any existing row."""

    def delete(self, identifier: str) -> Deferred[bool]:
        """Remove the mapping; True when there was one."""

    def reload(self) -> Deferred[int | None]:
        """Re-read the backing data (file stores); the number of entries, when known."""

    def close(self) -> Deferred[None]:
        """Release connections."""


class ListableStore(MappingStore, Protocol):
    """A store that can also list every mapping (bulk export); not every store can."""

    def entries(self) -> Deferred[list[tuple[str, str]]]:
        """Every ``(identifier, destination)`` pair."""
