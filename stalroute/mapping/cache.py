"""The routing cache in front of a mapping store.

Three tiers, each with its own lifetime:

* positive: the store named a destination (``positive_ttl``);
* negative: the store has no row, so the default destination applies (``negative_ttl``);
* transient: the store failed; the failure is remembered for a few seconds so an outage
  does not turn every login into another slow store query.

Concurrent misses for one key share one store lookup, and the cache holds at most
``max_entries`` keys, evicting the least recently used. While :attr:`RoutingCache.max_age` is
set (the cluster coordinator is unreachable, so invalidations may be missed), no entry older
than it is served.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from stalroute.mapping import StoreError

TRANSIENT_TTL = 3.0


@dataclass
class _Entry:
    destination: str | None
    error: StoreError | None
    expires: float
    tier: str
    stored: float


class RoutingCache:
    """LRU cache of store answers with coalesced misses."""

    def __init__(
        self,
        clock: IReactorTime,
        positive_ttl: float,
        negative_ttl: float,
        max_entries: int,
        lookup_timeout: float,
        transient_ttl: float = TRANSIENT_TTL,
    ) -> None:
        self._clock = clock
        self._ttl = {"positive": positive_ttl, "negative": negative_ttl,
                     "transient": transient_ttl}
        self._max_entries = max_entries
        self._lookup_timeout = lookup_timeout
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._inflight: dict[str, list[Deferred[str | None]]] = {}
        #: Bumped by every invalidation: an answer fetched before it is delivered, not cached.
        self._generation = 0
        #: When set, the most seconds an entry is served after it was stored, whatever its tier.
        self.max_age: float | None = None
        #: ``hit:<tier>`` / ``miss`` counters, for stats and metrics.
        self.counters: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._entries)

    def resolve(
        self, key: str, fetch: Callable[[str], Deferred[str | None]]
    ) -> Deferred[str | None]:
        """The cached answer for ``key``, or ``fetch(key)`` shared by every concurrent miss.

        Fails with :class:`StoreError` when the store failed (now or within the transient tier).
        """
        entry = self._hit(key)
        if entry is not None:
            return fail(entry.error) if entry.error else succeed(entry.destination)
        self.counters["miss"] += 1
        waiter: Deferred[str | None] = Deferred()
        waiters = self._inflight.get(key)
        if waiters is not None:
            waiters.append(waiter)
            return waiter
        self._inflight[key] = [waiter]
        self._fetch(key, fetch)
        return waiter

    def known(self, key: str) -> tuple[str | None] | None:
        """The answer for ``key`` when the cache holds a fresh one, counted as a hit: a
        1-tuple (the destination, None for the default), or None when :meth:`resolve` would
        ask the store or fail. Spares a caller that can go on at once the Deferred."""
        entry = self._entries.get(key)
        if entry is None or entry.error is not None:
            return None
        entry = self._hit(key)
        return None if entry is None else (entry.destination,)

    def _hit(self, key: str) -> _Entry | None:
        """The entry for ``key`` if it is fresh (moved to the end, its hit counted)."""
        entry = self._entries.get(key)
        now = self._clock.seconds()
        if (entry is not None and entry.expires > now
                and (self.max_age is None or now - entry.stored < self.max_age)):
            self._entries.move_to_end(key)
            self.counters[f"hit:{entry.tier}"] += 1
            return entry
        return None

    def _fetch(self, key: str, fetch: Callable[[str], Deferred[str | None]]) -> None:
        try:
            d = fetch(key)
        except Exception as exc:  # a store that raises instead of failing its Deferred
            d = fail(exc)
        d.addTimeout(self._lookup_timeout, self._clock)
        d.addBoth(self._settle, key, self._generation)

    def _settle(self, result: str | None | Failure, key: str, generation: int) -> None:
        if isinstance(result, Failure):
            error = result.value if isinstance(result.value, StoreError) else StoreError(
                f"store lookup failed: {result.getErrorMessage() or type(result.value).__name__}")
            entry = _Entry(None, error, 0.0, "transient", self._clock.seconds())
        else:
            entry = _Entry(result, None, 0.0, "positive" if result is not None else "negative",
                           self._clock.seconds())
        entry.expires = entry.stored + self._ttl[entry.tier]
        if generation == self._generation:
            self._store(key, entry)
        for waiter in self._inflight.pop(key):
            if entry.error:
                waiter.errback(entry.error)
            else:
                waiter.callback(entry.destination)

    def _store(self, key: str, entry: _Entry) -> None:
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    def invalidate(self, key: str | None = None) -> int:
        """Forget one key (or everything); the number of entries dropped."""
        self._generation += 1
        if key is None:
            dropped = len(self._entries)
            self._entries.clear()
            return dropped
        return 1 if self._entries.pop(key, None) is not None else 0
