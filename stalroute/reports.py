"""One instance's figures from the reports of the processes that serve it (``server.workers``,
SPEC §11): each worker reports what :meth:`stalroute.control.Control.report` sees in its
process, as plain data; the supervisor sums them for ``/stats``, lists them for
``/connections`` and labels them by worker for ``/metrics``. A single process is the one-report
case."""

from __future__ import annotations

from collections import Counter
from typing import Any

from stalroute.stats import Histogram, Metrics

#: ``{"stats": ..., "connections": [...], "destinations": [...], "measured": ...}``, plus
#: ``worker`` and ``pid`` when a worker sent it.
Report = dict[str, Any]
#: What a report may hold; a caller asks for the parts it reads.
REPORT_PARTS = ("stats", "connections", "destinations", "measured")

CIRCUIT_SEVERITY = ("closed", "half_open", "open")


def measured_report(metrics: Metrics) -> dict[str, Any]:
    """The session, login and store measurements as plain data."""
    return {"sessions": [[*labels, count] for labels, count in metrics.sessions.items()],
            "login_latency": _histogram_report(metrics.login_latency),
            "store_latency": _histogram_report(metrics.store_latency)}


def _histogram_report(histogram: Histogram) -> dict[str, Any]:
    return {"counts": list(histogram.counts), "total": histogram.total}


def measured_from(report: Report) -> Metrics:
    """The measurements of one report, as :class:`Metrics` again."""
    measured = report["measured"]
    metrics = Metrics()
    for protocol, destination, outcome, count in measured["sessions"]:
        metrics.sessions[(protocol, destination, outcome)] = count
    for name in ("login_latency", "store_latency"):
        histogram: Histogram = getattr(metrics, name)
        histogram.counts = list(measured[name]["counts"])
        histogram.total = measured[name]["total"]
    return metrics


def instance_stats(reports: list[Report], by_worker: bool) -> dict[str, Any]:
    """``GET /stats`` of the instance: the sum of its processes' figures (the reference keys
    keep their meaning), and with workers one line per worker under ``workers``."""
    parts = [report["stats"] for report in reports]
    hits = sum(part["cache_hits"] for part in parts)
    misses = sum(part["cache_misses"] for part in parts)
    listeners: dict[str, dict[str, Any]] = {}
    for part in parts:
        for name, listener in part["listeners"].items():
            total = listeners.setdefault(name, {"protocol": listener["protocol"],
                                                "active_connections": 0,
                                                "rejected_connections": 0, "probes": 0})
            for key in ("active_connections", "rejected_connections", "probes"):
                total[key] += listener[key]
    counters: Counter[str] = Counter()
    for part in parts:
        counters.update(part["cache"]["counters"])
    entries = sum(part["cache_entries"] for part in parts)
    stats: dict[str, Any] = {
        "cache_hits": hits,
        "cache_misses": misses,
        "hit_rate_pct": round(100 * hits / (hits + misses), 1) if hits + misses else 0.0,
        "cache_entries": entries,
        "active_connections": sum(part["active_connections"] for part in parts),
        "draining": any(part["draining"] for part in parts),
        "listeners": listeners,
        "sessions": {key: sum(part["sessions"][key] for part in parts)
                     for key in ("open", "spliced", "preauth")},
        "cache": {"entries": entries, "counters": dict(counters)},
        "bans": sum(part["bans"] for part in parts),
        # Every worker holds every delay: the count is the same in each.
        "login_delays": max((part["login_delays"] for part in parts), default=0),
    }
    if by_worker:
        stats["workers"] = [{"worker": report["worker"], "pid": report["pid"],
                             "active_connections": report["stats"]["active_connections"],
                             "sessions": report["stats"]["sessions"]["open"],
                             "cache_entries": report["stats"]["cache_entries"]}
                            for report in reports]
    return stats


def instance_connections(reports: list[Report]) -> list[dict[str, Any]]:
    """Every worker's spliced sessions (each row names its ``worker`` when there are some)."""
    return [{**row, "worker": report["worker"]} if "worker" in report else row
            for report in reports for row in report["connections"]]


def instance_destinations(reports: list[Report]) -> list[dict[str, Any]]:
    """The destinations, their sessions summed over the workers; a circuit shows its worst
    state in any worker (``circuits`` lists each worker's when there are workers)."""
    merged: dict[str, dict[str, Any]] = {}
    for report in reports:
        for row in report["destinations"]:
            total = merged.get(row["name"])
            if total is None:
                merged[row["name"]] = total = {**row, "sessions": 0, "trips": 0,
                                               "consecutive_failures": 0}
                if "worker" in report:
                    total["circuits"] = {}
            total["sessions"] += row["sessions"]
            total["trips"] += row["trips"]
            total["consecutive_failures"] = max(total["consecutive_failures"],
                                                row["consecutive_failures"])
            if CIRCUIT_SEVERITY.index(row["circuit"]) > CIRCUIT_SEVERITY.index(total["circuit"]):
                total["circuit"] = row["circuit"]
            if "worker" in report:
                total["circuits"][str(report["worker"])] = row["circuit"]
    return list(merged.values())
