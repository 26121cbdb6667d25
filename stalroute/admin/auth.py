"""Admin API authentication: the bearer token and the per-IP lockout (SPEC §2.10, §8).

The token is compared with :func:`hmac.compare_digest` (constant time for equal lengths; the
length of the expected token is the only thing timing can reveal).  Every failed attempt is
counted against the client's IP address; ``lockout_threshold`` failures within
``lockout_duration`` lock the address for ``lockout_duration``, during which it is answered
429 even with the right token.  A success clears the address's failures.
"""

from __future__ import annotations

import hmac
from collections import OrderedDict, deque

from twisted.internet.interfaces import IReactorTime

#: Addresses tracked at most; beyond it the least recently seen are forgotten.
MAX_TRACKED = 100_000


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
    """Failed attempts per source address, and the addresses locked out."""

    def __init__(self, clock: IReactorTime, threshold: int, duration: float,
                 max_tracked: int = MAX_TRACKED) -> None:
        self._clock = clock
        self.threshold = threshold
        self.duration = duration
        self._max_tracked = max_tracked
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._locked_until: dict[str, float] = {}
        #: Lockouts started so far (for stats).
        self.lockouts = 0

    def locked_for(self, ip: str) -> float:
        """Seconds ``ip`` stays locked out (0 when it is not)."""
        until = self._locked_until.get(ip)
        if until is None:
            return 0.0
        left = until - self._clock.seconds()
        if left > 0:
            return left
        del self._locked_until[ip]
        return 0.0

    def failed(self, ip: str) -> bool:
        """Count a failure; True when it locks ``ip`` out."""
        now = self._clock.seconds()
        recent = self._failures.pop(ip, None) or deque()
        recent.append(now)
        while recent and recent[0] <= now - self.duration:
            recent.popleft()
        if len(recent) >= self.threshold:
            self._locked_until[ip] = now + self.duration
            self.lockouts += 1
            return True
        self._failures[ip] = recent  # re-inserted last: most recently seen
        while len(self._failures) > self._max_tracked:
            self._failures.popitem(last=False)
        if len(self._locked_until) > self._max_tracked:
            self._locked_until = {k: v for k, v in self._locked_until.items() if v > now}
        return False

    def succeeded(self, ip: str) -> None:
        self._failures.pop(ip, None)

    def locked(self) -> int:
        """Addresses locked out right now."""
        now = self._clock.seconds()
        return sum(1 for until in self._locked_until.values() if until > now)
