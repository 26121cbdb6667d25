"""Per-destination circuit breaker (SPEC §2.1, §7).

Connect-stage failures (refused, unreachable, timed out before TCP was up) count directly.
Post-connect failures (TLS, greeting, early close) count only once the failing streak spans
``min_clients`` distinct client addresses: a backend that bans one client must not be marked
down for everyone.  After ``threshold`` failures the circuit opens; after ``cooldown`` one
probe is let through, and its outcome closes or re-opens the circuit.  Failed *logins* are
never reported here.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime


class CircuitBreaker:
    """The health of one destination as seen by its backend legs."""

    def __init__(self, clock: IReactorTime, threshold: int, min_clients: int,
                 cooldown: float) -> None:
        self._clock = clock
        self._threshold = threshold
        self._min_clients = min_clients
        self._cooldown = cooldown
        self._streak = 0
        self._streak_clients: set[str] = set()
        self._opened_at: float | None = None
        self._probing = False
        self.trips = 0

    @property
    def state(self) -> str:
        """``closed``, ``open`` or ``half_open`` (cooled down, a probe may go through)."""
        if self._opened_at is None:
            return "closed"
        if self._probing or self._clock.seconds() - self._opened_at >= self._cooldown:
            return "half_open"
        return "open"

    @property
    def failures(self) -> int:
        return self._streak

    def allow(self) -> bool:
        """May a new leg be attempted now? In ``half_open`` only one probe at a time."""
        state = self.state
        if state == "closed":
            return True
        if state == "half_open" and not self._probing:
            self._probing = True
            return True
        return False

    def succeeded(self) -> None:
        self._streak = 0
        self._streak_clients.clear()
        self._opened_at = None
        self._probing = False

    def failed(self, client_ip: str, *, connect_stage: bool) -> None:
        self._streak_clients.add(client_ip)
        if self._probing:
            self._open()  # the one probe failed: cool down again
            return
        if not connect_stage and len(self._streak_clients) < self._min_clients:
            return
        self._streak += 1
        if self._threshold and self._streak >= self._threshold:
            self._open()

    def abandoned(self) -> None:
        """A leg was given up before it could tell anything (its client left): no count,
        and the next client may probe."""
        self._probing = False

    def _open(self) -> None:
        if self._opened_at is None:
            self.trips += 1
        self._opened_at = self._clock.seconds()
        self._probing = False

    def reset(self) -> None:
        """Close the circuit by hand (admin API ``POST /destinations/reset``)."""
        self.succeeded()
