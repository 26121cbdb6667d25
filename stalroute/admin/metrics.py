"""``GET /metrics``: Prometheus metrics built at scrape time (SPEC §10) from the reports of the
processes serving the instance (:mod:`stalroute.reports`): this process, or each worker of
``server.workers``, whose series then carry a ``worker`` label.

Every value already exists on the listeners, the cache, the circuit breakers, the ban list,
the session registry and the runtime's measurements (:mod:`stalroute.stats`: finished
sessions, login and store latency). Counters survive a config reload: the rebuilt routing
cache takes over its predecessor's counters (:func:`stalroute.runtime.build_runtime`); a
restarted worker starts its counters from zero. The certificate families come from the
answering process's own listeners (:meth:`stalroute.control.Control.certificates`): every
process serves the same certificates, so they carry no ``worker`` label.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.process_collector import ProcessCollector

from stalroute.reports import Report, measured_from
from stalroute.stats import Histogram

CIRCUIT_STATES = ("closed", "half_open", "open")
CACHE_TIERS = ("positive", "negative", "transient")

__all__ = ["CONTENT_TYPE_LATEST", "StalrouteCollector", "metrics_registry", "render"]


class StalrouteCollector:
    """The families of one scrape, from the processes' reports."""

    def __init__(self, reports: list[Report], cluster: dict[str, Any] | None,
                 lockouts: tuple[int, int] | None = None,
                 certificates: list[dict[str, Any]] | None = None) -> None:
        self._reports = reports
        self._cluster = cluster or {}
        self._lockouts = lockouts
        self._certificates = certificates or []

    def describe(self) -> list[Metric]:
        return []  # collected on demand only

    def collect(self) -> Iterator[Metric]:
        by_worker = any("worker" in report for report in self._reports)
        extra = ["worker"] if by_worker else []
        families: dict[str, Any] = {}

        def family(kind: type, name: str, documentation: str,
                   labels: tuple[str, ...] = ()) -> Any:
            if name not in families:
                families[name] = kind(name, documentation, labels=[*labels, *extra])
            return families[name]

        for report in self._reports:  # each family gets a series per worker, then is yielded
            self._add(report, [str(report["worker"])] if by_worker else [], family)
        yield from families.values()
        yield from self._instance_families()

    def _add(self, report: Report, worker: list[str], family: Any) -> None:
        stats = report["stats"]
        listener_labels = ("listener", "protocol")
        active = family(GaugeMetricFamily, "stalroute_listener_active_connections",
                        "Open client connections per listener.", listener_labels)
        rejected = family(CounterMetricFamily, "stalroute_listener_rejected_connections",
                          "Connections closed at once by max_connections, per-IP limits or "
                          "bans.", listener_labels)
        probes = family(CounterMetricFamily, "stalroute_listener_probes",
                        "Connect-and-close probes (load balancer health checks).",
                        listener_labels)
        for name, listener in sorted(stats["listeners"].items()):
            labels = [name, listener["protocol"], *worker]
            active.add_metric(labels, listener["active_connections"])
            rejected.add_metric(labels, listener["rejected_connections"])
            probes.add_metric(labels, listener["probes"])

        open_sessions = family(GaugeMetricFamily, "stalroute_sessions_open",
                               "Open sessions by state.", ("state",))
        open_sessions.add_metric(["preauth", *worker], stats["sessions"]["preauth"])
        open_sessions.add_metric(["spliced", *worker], stats["sessions"]["spliced"])

        spliced: Counter = Counter(
            (c["protocol"], c["destination"] or "") for c in report["connections"])
        by_destination = family(GaugeMetricFamily, "stalroute_sessions_spliced",
                                "Spliced (logged-in) sessions by protocol and destination.",
                                ("protocol", "destination"))
        for (protocol, destination), count in sorted(spliced.items()):
            by_destination.add_metric([protocol, destination, *worker], count)

        totals = stats["cache"]["counters"]
        hits = family(CounterMetricFamily, "stalroute_cache_hits",
                      "Routing cache hits by tier.", ("tier",))
        for tier in CACHE_TIERS:
            hits.add_metric([tier, *worker], totals.get(f"hit:{tier}", 0))
        family(CounterMetricFamily, "stalroute_cache_misses", "Routing cache misses (store "
               "lookups, shared by concurrent misses).").add_metric(worker,
                                                                     totals.get("miss", 0))
        family(GaugeMetricFamily, "stalroute_cache_entries",
               "Entries in the routing cache.").add_metric(worker, stats["cache"]["entries"])

        circuit = family(GaugeMetricFamily, "stalroute_destination_circuit_state",
                         "Circuit breaker state per destination (1 for the current state).",
                         ("destination", "state"))
        trips = family(CounterMetricFamily, "stalroute_destination_circuit_trips",
                       "Times the destination's circuit opened.", ("destination",))
        failures = family(GaugeMetricFamily, "stalroute_destination_consecutive_failures",
                          "Current streak of failed backend legs.", ("destination",))
        for destination in report["destinations"]:
            name = destination["name"]
            for state in CIRCUIT_STATES:
                circuit.add_metric([name, state, *worker],
                                   1 if destination["circuit"] == state else 0)
            trips.add_metric([name, *worker], destination["trips"])
            failures.add_metric([name, *worker], destination["consecutive_failures"])

        measured = measured_from(report)
        finished = family(CounterMetricFamily, "stalroute_sessions_finished",
                          "Finished sessions by protocol, destination and outcome.",
                          ("protocol", "destination", "outcome"))
        for (protocol, destination, outcome), count in sorted(measured.sessions.items()):
            finished.add_metric([protocol, destination, outcome, *worker], count)
        add_histogram(family(HistogramMetricFamily, "stalroute_login_latency_seconds",
                             "From the authentication command to the backend's acceptance."),
                      worker, measured.login_latency)
        add_histogram(family(HistogramMetricFamily, "stalroute_store_lookup_latency_seconds",
                             "One mapping store lookup (cache misses)."),
                      worker, measured.store_latency)

        family(CounterMetricFamily, "stalroute_bans", "Client addresses banned for failed "
               "logins.").add_metric(worker, stats["bans"])
        family(GaugeMetricFamily, "stalroute_login_delays", "Accounts whose logins are held "
               "(POST /connections/delay).").add_metric(worker, stats["login_delays"])
        family(GaugeMetricFamily, "stalroute_draining", "1 while draining (SIGTERM).",
               ).add_metric(worker, 1 if stats["draining"] else 0)

    def _instance_families(self) -> Iterator[Metric]:
        """What belongs to the instance, not to a worker: the bus, the admin API and the
        served certificates (the same in every process: the answering process's view)."""
        yield from self._certificate_families()
        cluster = self._cluster
        if "connected" in cluster:  # a coordinator is configured
            yield GaugeMetricFamily("stalroute_cluster_connected", "1 while the cluster "
                                    "coordinator is connected.", value=int(cluster["connected"]))
            yield CounterMetricFamily("stalroute_cluster_published", "State changes published "
                                      "to the other instances.", value=cluster["published"])
            yield CounterMetricFamily("stalroute_cluster_applied", "State changes of other "
                                      "instances applied here.", value=cluster["applied"])
            yield GaugeMetricFamily("stalroute_cluster_members", "Live members of the fleet "
                                    "(this instance included).", value=cluster["members"])
            if cluster.get("ack_seconds") is not None:
                yield GaugeMetricFamily("stalroute_cluster_message_lag_seconds",
                                        "Slowest acknowledgement of the last acknowledged "
                                        "change: publish to applied on every member.",
                                        value=cluster["ack_seconds"])
        if self._lockouts is not None:
            lockouts, locked = self._lockouts
            yield CounterMetricFamily("stalroute_admin_lockouts", "Admin API lockouts of a "
                                      "source address after failed tokens.", value=lockouts)
            yield GaugeMetricFamily("stalroute_admin_locked_addresses",
                                    "Addresses locked out of the admin API now.", value=locked)


    def _certificate_families(self) -> Iterator[Metric]:
        """Per ``[tls.certificate.<name>]`` (:meth:`stalroute.control.Control.certificates`):
        seconds to the served leaf's expiry; for ``acme =`` entries, failed orders since the
        last success."""
        if not self._certificates:
            return
        expiry = GaugeMetricFamily(
            "stalroute_certificate_expiry_seconds", "Seconds until the served certificate's "
            "notAfter (negative once expired), per [tls.certificate.<name>] entry.",
            labels=["name"])
        failures = GaugeMetricFamily(
            "stalroute_certificate_renewal_failures", "Consecutive failed ACME orders of the "
            "certificate since its last success (0 once one succeeds).", labels=["name"])
        for certificate in self._certificates:
            if certificate.get("expires_in") is not None:
                expiry.add_metric([certificate["name"]], certificate["expires_in"])
            if certificate["source"] != "file" and certificate.get("failures") is not None:
                failures.add_metric([certificate["name"]], certificate["failures"])
        yield expiry
        if failures.samples:
            yield failures


def add_histogram(family: HistogramMetricFamily, labels: list[str],
                  measured: Histogram) -> None:
    """One Prometheus histogram series (cumulative buckets) from a
    :class:`stalroute.stats.Histogram`."""
    cumulative = list(itertools.accumulate(measured.counts))
    buckets = [(f"{bound:g}", count) for bound, count in zip(measured.buckets, cumulative)]
    family.add_metric(labels, buckets + [("+Inf", cumulative[-1])], measured.total)


def metrics_registry(reports: list[Report], cluster: dict[str, Any] | None,
                     lockouts: tuple[int, int] | None = None,
                     certificates: list[dict[str, Any]] | None = None) -> CollectorRegistry:
    """A registry for one scrape: stalroute's families and the process metrics (CPU, memory,
    fds) of the process answering."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StalrouteCollector(reports, cluster, lockouts, certificates))
    ProcessCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
