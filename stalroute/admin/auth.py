"""Admin API authentication: the bearer token and the per-IP lockout (SPEC §2.10, §8).

The token is compared with :func:`hmac.compare_digest` (constant time for equal lengths; the
length of the expected token is the only thing timing can reveal).  Every failed attempt is
counted against the client's IP address; ``lockout_threshold`` failures within
``lockout_duration`` lock the address for ``lockout_duration``, during which it is answered
429 even with the right token.  A success clears the address's failures.
"""

from __future__ import annotations

import hmac

from twisted.internet.interfaces import IReactorTime

from stalroute.limits import MAX_TRACKED, ExpiringTable


def bearer_token(header: bytes | str | None) -> bytes | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    if header is None:
        return None
    if isinstance(header, str):
        header = header.encode("utf-8", "surrogateescape")
    scheme, _, token = header.strip().partition(b" ")
    if scheme.lower() != b"bearer":
        return None
    token = token.strip()
    return token or None


class TokenCheck:
    """Does a request carry the configured token?"""

    def __init__(self, token: str | None) -> None:
        # No token configured (cannot happen with a validated [admin]): nothing matches.
        self._expected = token.encode("utf-8") if token else None

    def matches(self, header: bytes | str | None) -> bool:
        given = bearer_token(header)
        if self._expected is None or given is None:
            return False
        return hmac.compare_digest(given, self._expected)


class Lockout:
    """Failed attempts per source address, and the addresses locked out (each table bounded
    and expiring as :class:`~stalroute.limits.ExpiringTable` says, both swept on every check)."""

    def __init__(self, clock: IReactorTime, threshold: int, duration: float,
                 max_tracked: int = MAX_TRACKED) -> None:
        self._clock = clock
        self.threshold = threshold
        self.duration = duration
        #: IP → times of its failures within ``duration``.
        self._failures: ExpiringTable[tuple[float, ...]] = ExpiringTable(clock, max_tracked)
        #: IP → when its lockout ends.
        self._locked_until: ExpiringTable[float] = ExpiringTable(clock, max_tracked)
        #: Lockouts started so far (for stats).
        self.lockouts = 0

    def locked_for(self, ip: str) -> float:
        """Seconds ``ip`` stays locked out (0 when it is not)."""
        # Checked on every request: the failure histories are swept here as well, so they
        # leave after their window without waiting for the next failure.
        self._failures.sweep()
        until = self._locked_until.get(ip)
        return 0.0 if until is None else until - self._clock.seconds()

    def failed(self, ip: str) -> bool:
        """Count a failure; True when it locks ``ip`` out."""
        now = self._clock.seconds()
        recent = tuple(t for t in (*(self._failures.get(ip) or ()), now)
                       if t > now - self.duration)
        if len(recent) >= self.threshold:
            self._failures.discard(ip)
            self._locked_until.put(ip, now + self.duration, now + self.duration)
            self.lockouts += 1
            return True
        self._failures.put(ip, recent, now + self.duration)
        return False

    def succeeded(self, ip: str) -> None:
        self._failures.discard(ip)

    def locked(self) -> int:
        """Addresses locked out right now."""
        return len(self._locked_until)
