"""``GET /metrics``: Prometheus metrics read from :class:`~stalroute.control.Control` at scrape
time (SPEC §10).

A custom collector: every value already exists on the listeners, the cache, the circuit
breakers, the ban list, the session registry and the runtime's measurements
(:mod:`stalroute.stats`: finished sessions, login and store latency).  Counters survive a
config reload: the rebuilt routing cache takes over its predecessor's counters
(:func:`stalroute.runtime.build_runtime`).
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.process_collector import ProcessCollector

from stalroute.stats import Histogram

CIRCUIT_STATES = ("closed", "half_open", "open")
CACHE_TIERS = ("positive", "negative", "transient")

__all__ = ["CONTENT_TYPE_LATEST", "StalrouteCollector", "metrics_registry", "render"]


class StalrouteCollector:
    """Reads the running proxy's counters on every scrape."""

    def __init__(self, control, lockout_count: Callable[[], tuple[int, int]] | None = None
                 ) -> None:
        self._control = control
        self._lockout_count = lockout_count

    def describe(self) -> list[Metric]:
        return []  # collected on demand only

    def collect(self) -> Iterator[Metric]:
        stats = self._control.stats()

        active = GaugeMetricFamily("stalroute_listener_active_connections",
                                   "Open client connections per listener.",
                                   labels=["listener", "protocol"])
        rejected = CounterMetricFamily("stalroute_listener_rejected_connections",
                                       "Connections closed at once by max_connections, per-IP "
                                       "limits or bans.", labels=["listener", "protocol"])
        probes = CounterMetricFamily("stalroute_listener_probes",
                                     "Connect-and-close probes (load balancer health checks).",
                                     labels=["listener", "protocol"])
        for name, listener in sorted(stats["listeners"].items()):
            labels = [name, listener["protocol"]]
            active.add_metric(labels, listener["active_connections"])
            rejected.add_metric(labels, listener["rejected_connections"])
            probes.add_metric(labels, listener["probes"])
        yield from (active, rejected, probes)

        open_sessions = GaugeMetricFamily("stalroute_sessions_open",
                                          "Open sessions by state.", labels=["state"])
        open_sessions.add_metric(["preauth"], stats["sessions"]["preauth"])
        open_sessions.add_metric(["spliced"], stats["sessions"]["spliced"])
        yield open_sessions

        spliced: Counter = Counter(
            (c["protocol"], c["destination"] or "") for c in self._control.connections())
        by_destination = GaugeMetricFamily(
            "stalroute_sessions_spliced", "Spliced (logged-in) sessions by protocol and "
            "destination.", labels=["protocol", "destination"])
        for (protocol, destination), count in sorted(spliced.items()):
            by_destination.add_metric([protocol, destination], count)
        yield by_destination

        totals = stats["cache"]["counters"]
        hits = CounterMetricFamily("stalroute_cache_hits", "Routing cache hits by tier.",
                                   labels=["tier"])
        for tier in CACHE_TIERS:
            hits.add_metric([tier], totals.get(f"hit:{tier}", 0))
        yield hits
        yield CounterMetricFamily("stalroute_cache_misses",
                                  "Routing cache misses (store lookups, shared by concurrent "
                                  "misses).", value=totals.get("miss", 0))
        yield GaugeMetricFamily("stalroute_cache_entries", "Entries in the routing cache.",
                                value=stats["cache"]["entries"])

        circuit = GaugeMetricFamily("stalroute_destination_circuit_state",
                                    "Circuit breaker state per destination (1 for the current "
                                    "state).", labels=["destination", "state"])
        trips = CounterMetricFamily("stalroute_destination_circuit_trips",
                                    "Times the destination's circuit opened.",
                                    labels=["destination"])
        failures = GaugeMetricFamily("stalroute_destination_consecutive_failures",
                                     "Current streak of failed backend legs.",
                                     labels=["destination"])
        for destination in self._control.destinations():
            name = destination["name"]
            for state in CIRCUIT_STATES:
                circuit.add_metric([name, state], 1 if destination["circuit"] == state else 0)
            trips.add_metric([name], destination["trips"])
            failures.add_metric([name], destination["consecutive_failures"])
        yield from (circuit, trips, failures)

        measured = self._control.runtime.metrics
        finished = CounterMetricFamily("stalroute_sessions_finished", "Finished sessions by "
                                       "protocol, destination and outcome.",
                                       labels=["protocol", "destination", "outcome"])
        for labels, count in sorted(measured.sessions.items()):
            finished.add_metric(list(labels), count)
        yield finished
        yield histogram("stalroute_login_latency_seconds", "From the authentication command to "
                        "the backend's acceptance.", measured.login_latency)
        yield histogram("stalroute_store_lookup_latency_seconds", "One mapping store lookup "
                        "(cache misses).", measured.store_latency)

        yield CounterMetricFamily("stalroute_bans", "Client addresses banned for failed "
                                  "logins.", value=stats["bans"])
        yield GaugeMetricFamily("stalroute_login_delays", "Accounts whose logins are held "
                                "(POST /connections/delay).", value=stats["login_delays"])
        yield GaugeMetricFamily("stalroute_draining", "1 while draining (SIGTERM).",
                                value=1 if stats["draining"] else 0)
        cluster = stats.get("cluster", {})
        if "connected" in cluster:  # a coordinator is configured
            yield GaugeMetricFamily("stalroute_cluster_connected", "1 while the cluster "
                                    "coordinator is connected.", value=int(cluster["connected"]))
            yield CounterMetricFamily("stalroute_cluster_published", "State changes published "
                                      "to the other instances.", value=cluster["published"])
            yield CounterMetricFamily("stalroute_cluster_applied", "State changes of other "
                                      "instances applied here.", value=cluster["applied"])
        if self._lockout_count is not None:
            lockouts, locked = self._lockout_count()
            yield CounterMetricFamily("stalroute_admin_lockouts", "Admin API lockouts of a "
                                      "source address after failed tokens.", value=lockouts)
            yield GaugeMetricFamily("stalroute_admin_locked_addresses",
                                    "Addresses locked out of the admin API now.", value=locked)


def histogram(name: str, documentation: str, measured: Histogram) -> HistogramMetricFamily:
    """A Prometheus histogram (cumulative buckets) from a :class:`stalroute.stats.Histogram`."""
    family = HistogramMetricFamily(name, documentation)
    cumulative = list(itertools.accumulate(measured.counts))
    buckets = [(f"{bound:g}", count) for bound, count in zip(measured.buckets, cumulative)]
    family.add_metric([], buckets + [("+Inf", cumulative[-1])], measured.total)
    return family


def metrics_registry(control, lockout_count=None) -> CollectorRegistry:
    """A registry with stalroute's collector and the process metrics (CPU, memory, fds)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StalrouteCollector(control, lockout_count))
    ProcessCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
