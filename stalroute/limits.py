"""Per-client-IP limits that span connections (SPEC §2.3 ``max_connections_per_ip``, §2.12)."""

from __future__ import annotations

from collections import Counter, deque

from twisted.internet.interfaces import IReactorTime

from stalroute.config import SecurityConfig, ip_in_networks


class BanList:
    """Bans a real client IP after too many refused logins within a window.

    Only logins the backend refused count: probes, temporary failures and protocol errors never
    do, and ``allowed_ips`` are never banned.
    """

    def __init__(self, clock: IReactorTime, security: SecurityConfig) -> None:
        self._clock = clock
        #: Replaced on a config reload; the failure history and bans are kept.
        self.security = security
        self._failures: dict[str, deque[float]] = {}
        self._banned_until: dict[str, float] = {}
        self.bans = 0

    def is_banned(self, ip: str) -> bool:
        until = self._banned_until.get(ip)
        if until is None:
            return False
        if until > self._clock.seconds():
            return True
        del self._banned_until[ip]
        return False

    def login_refused(self, ip: str) -> None:
        threshold = self.security.auth_fail_ban_threshold
        if not threshold or ip_in_networks(ip, self.security.allowed_ips):
            return
        now = self._clock.seconds()
        recent = self._failures.setdefault(ip, deque())
        recent.append(now)
        while recent and recent[0] <= now - self.security.auth_fail_ban_window:
            recent.popleft()
        if len(recent) >= threshold:
            del self._failures[ip]
            self._banned_until[ip] = now + self.security.ban_duration
            self.bans += 1


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
        if seconds <= 0:
            self._until.pop(identifier, None)
        else:
            self._until[identifier] = self._clock.seconds() + seconds

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
