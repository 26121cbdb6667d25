"""Measurements the metrics endpoint exports (SPEC §10), kept without any metrics library so
the core does not depend on how they are exposed; they survive config reloads."""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field

#: Upper bounds (seconds) of the latency buckets: from a cached lookup to a slow backend.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0)


@dataclass
class Histogram:
    """Observations counted per bucket (not cumulative), with their sum."""

    buckets: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    total: float = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value

    @property
    def count(self) -> int:
        return sum(self.counts)


@dataclass
class Metrics:
    #: Finished sessions by ``(protocol, destination, outcome)``.
    sessions: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    #: From the authentication command to the backend's answer, successful logins only.
    login_latency: Histogram = field(default_factory=Histogram)
    #: One mapping store lookup (cache misses only).
    store_latency: Histogram = field(default_factory=Histogram)
