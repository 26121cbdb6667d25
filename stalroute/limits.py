"""Per-client limits that span connections (SPEC §2.3 ``max_connections_per_ip``, §2.12).

Every table kept per client address or account is bounded or cleans itself: bans and
failure histories (here and the admin lockout) live in :class:`ExpiringTable`, swept a few
entries at a time on every check and every write (so they empty while only connections
arrive), the per-IP connection counts drop an address when its last connection ends, and
login delays drop the expired ones whenever a delay is set.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from typing import Generic, TypeVar

from twisted.internet.interfaces import IReactorTime

from stalroute.config import SecurityConfig
from stalroute.net import ip_in_networks

#: Addresses an :class:`ExpiringTable` holds at most; beyond it the least recently written go.
MAX_TRACKED = 100_000

#: Expired entries an :class:`ExpiringTable` drops at most per call: each call writes at most
#: one entry, so an expired backlog drains at this rate less one, and no call pays for a flood.
SWEEP_STEP = 16

Value = TypeVar("Value")


class ExpiringTable(Generic[Value]):
    """Entries per client address that expire, at most ``limit`` of them.

    Entries are kept in the order they were written, so a full table forgets the address
    written longest ago and a ban of a recent offender survives any flood of new addresses.
    With one lifetime per table they also expire in that order: every call first drops up to
    :data:`SWEEP_STEP` expired entries at the front (:meth:`sweep`), so memory follows the clock
    at O(1) amortized cost, bounded per call, as long as the table's owner is consulted at all.
    (After a reload shortens a lifetime, a newer entry can wait behind an older one; it still
    reads as expired.)
    """

    def __init__(self, clock: IReactorTime, limit: int = MAX_TRACKED) -> None:
        self._clock = clock
        self._limit = limit
        self._entries: OrderedDict[str, tuple[float, Value]] = OrderedDict()

    def __len__(self) -> int:
        """Entries held (every expired one at the front dropped first)."""
        self.sweep(len(self._entries))
        return len(self._entries)

    def get(self, key: str) -> Value | None:
        """The value of ``key`` until it expires, then None."""
        now = self.sweep()
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] <= now:
            del self._entries[key]
            return None
        return entry[1]

    def put(self, key: str, value: Value, expires: float) -> None:
        """Set ``key`` (now the most recently written) until the clock reaches ``expires``."""
        self.sweep()
        self._entries.pop(key, None)
        self._entries[key] = (expires, value)
        while len(self._entries) > self._limit:
            self._entries.popitem(last=False)

    def discard(self, key: str) -> None:
        self.sweep()
        self._entries.pop(key, None)

    def sweep(self, most: int = SWEEP_STEP) -> float:
        """Drop up to ``most`` expired entries at the front; the clock's time, for the caller."""
        now = self._clock.seconds()
        entries = self._entries
        for _ in range(most):
            if not entries:
                break
            key, (expires, _value) = next(iter(entries.items()))
            if expires > now:
                break
            del entries[key]
        return now


class BanList:
    """Bans a real client IP after too many refused logins within a window.

    Only logins the backend refused count: probes, temporary failures and protocol errors never
    do, and ``allowed_ips`` are never banned. Failure histories leave when their window has
    passed and bans when they end; each table holds at most ``max_tracked`` addresses.
    """

    def __init__(self, clock: IReactorTime, security: SecurityConfig,
                 max_tracked: int = MAX_TRACKED) -> None:
        self._clock = clock
        #: Replaced on a config reload; the failure history and bans are kept.
        self.security = security
        #: IP → times of its refused logins within the window.
        self._failures: ExpiringTable[tuple[float, ...]] = ExpiringTable(clock, max_tracked)
        #: IP → True while banned.
        self._banned: ExpiringTable[bool] = ExpiringTable(clock, max_tracked)
        self.bans = 0

    def is_banned(self, ip: str) -> bool:
        # Checked on every connection: the failure histories are swept here as well, so they
        # leave after their window without waiting for the next refused login.
        self._failures.sweep()
        return self._banned.get(ip) is not None

    def login_refused(self, ip: str) -> None:
        threshold = self.security.auth_fail_ban_threshold
        if not threshold or ip_in_networks(ip, self.security.allowed_ips):
            return
        now = self._clock.seconds()
        window = self.security.auth_fail_ban_window
        recent = tuple(t for t in (*(self._failures.get(ip) or ()), now) if t > now - window)
        if len(recent) >= threshold:
            self._failures.discard(ip)
            self._banned.put(ip, True, now + self.security.ban_duration)
            self.bans += 1
        else:
            self._failures.put(ip, recent, now + window)


class PerIPCounter:
    """Concurrent connections per real client IP on one listener."""

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()

    def take(self, ip: str, limit: int) -> bool:
        if self._counts[ip] >= limit:
            return False
        self._counts[ip] += 1
        return True

    def release(self, ip: str) -> None:
        self._counts[ip] -= 1
        if self._counts[ip] <= 0:
            del self._counts[ip]


class LoginDelays:
    """Logins held for a while per account (admin ``POST /connections/delay``), e.g. while the
    account's mailbox is copied to its new destination."""

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._until: dict[str, float] = {}

    def delay(self, identifier: str, seconds: float) -> None:
        """Hold new logins of ``identifier`` for ``seconds`` from now (0 lifts the delay)."""
        now = self._clock.seconds()
        self._until = {key: until for key, until in self._until.items() if until > now}
        if seconds <= 0:
            self._until.pop(identifier, None)
        else:
            self._until[identifier] = now + seconds

    def remaining(self, identifier: str) -> float:
        until = self._until.get(identifier)
        if until is None:
            return 0.0
        left = until - self._clock.seconds()
        if left <= 0:
            del self._until[identifier]
            return 0.0
        return left

    def active(self) -> dict[str, float]:
        """Every current delay: identifier → seconds left."""
        return {identifier: left for identifier in list(self._until)
                if (left := self.remaining(identifier)) > 0}
