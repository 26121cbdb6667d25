"""An instance's figures from its processes' reports (:mod:`stalroute.reports`) and the
``/metrics`` families built from them (:mod:`stalroute.admin.metrics`).

The reference keys of ``/stats`` keep their meaning however many workers there are (the
instance's hit rate is over all its lookups, not a mean of rates); ``/metrics`` labels every
per-process series with its ``worker`` when there are workers, and only then.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from stalroute.admin.metrics import metrics_registry, render
from stalroute.reports import (
    Report, instance_connections, instance_destinations, instance_stats, measured_from,
    measured_report,
)
from stalroute.stats import Metrics
from tests.unit.test_admin_app import Harness


def listener(protocol: str, active: int = 0, rejected: int = 0,
             probes: int = 0) -> dict[str, Any]:
    return {"protocol": protocol, "active_connections": active,
            "rejected_connections": rejected, "probes": probes}


def destination(name: str, circuit: str = "closed", sessions: int = 0, trips: int = 0,
                failures: int = 0) -> dict[str, Any]:
    return {"name": name, "host": f"{name}.test", "protocols": ["imap"], "circuit": circuit,
            "consecutive_failures": failures, "trips": trips, "sessions": sessions,
            "default": name == "node1"}


def connection(id: str, destination: str) -> dict[str, Any]:
    return {"id": id, "protocol": "imap", "listener": "imaps", "client": "192.0.2.7:40000",
            "identifier": "a***e", "destination": destination, "bytes_in": 10,
            "bytes_out": 20, "age": 1.5}


def measured(*sessions: tuple[str, str, str, int], login: tuple[float, ...] = (),
             store: tuple[float, ...] = ()) -> Metrics:
    metrics = Metrics()
    for protocol, destination, outcome, count in sessions:
        metrics.sessions[(protocol, destination, outcome)] = count
    for seconds in login:
        metrics.login_latency.observe(seconds)
    for seconds in store:
        metrics.store_latency.observe(seconds)
    return metrics


def report(*, worker: int | None = None, hits: tuple[int, int] = (0, 0), misses: int = 0,
           entries: int = 0, listeners: dict[str, dict[str, Any]] | None = None,
           preauth: int = 0, connections: list[dict[str, Any]] | None = None,
           destinations: list[dict[str, Any]] | None = None, bans: int = 0,
           delays: int = 0, draining: bool = False, metrics: Metrics | None = None) -> Report:
    """One process's report as it travels (through JSON): ``hits`` is (positive, negative)."""
    connections = connections or []
    counters = {"hit:positive": hits[0], "hit:negative": hits[1], "miss": misses}
    listeners = listeners or {}
    stats = {
        "cache_hits": sum(hits), "cache_misses": misses,
        "hit_rate_pct": round(100 * sum(hits) / (sum(hits) + misses), 1)
        if sum(hits) + misses else 0.0,
        "cache_entries": entries,
        "active_connections": sum(row["active_connections"] for row in listeners.values()),
        "draining": draining, "listeners": listeners,
        "sessions": {"open": preauth + len(connections), "spliced": len(connections),
                     "preauth": preauth},
        "cache": {"entries": entries, "counters": counters},
        "bans": bans, "login_delays": delays,
    }
    made: Report = {"stats": stats, "connections": connections,
                    "destinations": destinations or [destination("node1")],
                    "measured": measured_report(metrics or Metrics())}
    if worker is not None:
        made.update(worker=worker, pid=1000 + worker)
    return json.loads(json.dumps(made))


@pytest.fixture
def two_workers() -> list[Report]:
    return [
        report(worker=1, hits=(8, 1), misses=1, entries=5, bans=1, delays=2, preauth=1,
               listeners={"imaps": listener("imap", 3, 1, 2)},
               connections=[connection("s1", "node1"), connection("s2", "node1")],
               destinations=[destination("node1", "closed", 2, 1, 0),
                             destination("node2", "half_open", 0, 1, 1)],
               metrics=measured(("imap", "node1", "ok", 4), login=(0.02, 0.3))),
        report(worker=2, hits=(1, 0), misses=29, entries=7, bans=2, delays=2, draining=True,
               listeners={"imaps": listener("imap", 1, 0, 1), "pop3s": listener("pop3", 2)},
               connections=[connection("s3", "node2")],
               destinations=[destination("node1", "open", 0, 3, 5),
                             destination("node2", "closed", 1, 0, 0)],
               metrics=measured(("imap", "node1", "ok", 1), ("pop3", "node2", "failed", 2),
                                login=(0.004,), store=(0.001,))),
    ]


# --- /stats -------------------------------------------------------------------------------------


def test_the_one_process_case_is_that_process_s_own_stats(tmp_path: Path) -> None:
    harness = Harness(tmp_path)
    harness.runtime.router.cache.counters.update({"hit:positive": 3, "miss": 1})
    travelled = json.loads(json.dumps(harness.control.report()))
    assert instance_stats([travelled], by_worker=False) == harness.control.stats()


def test_a_report_holds_only_the_parts_asked_for(tmp_path: Path) -> None:
    """A readiness probe reads the destinations only: it must not list every session."""
    control = Harness(tmp_path).control
    assert set(control.report()) == {"stats", "connections", "destinations", "measured"}
    assert control.report(("destinations",)) == {"destinations": control.destinations()}


def test_instance_stats_sum_the_workers_and_keep_the_reference_keys_meaning(
        two_workers: list[Report]) -> None:
    stats = instance_stats(two_workers, by_worker=True)
    assert {key: stats[key] for key in ("cache_hits", "cache_misses", "hit_rate_pct",
                                        "cache_entries", "active_connections")} == {
        "cache_hits": 10, "cache_misses": 30,
        "hit_rate_pct": 25.0,  # 10 of 40 lookups (not the mean of 90 % and 3.3 %)
        "cache_entries": 12, "active_connections": 6}
    assert stats["listeners"] == {"imaps": listener("imap", 4, 1, 3),
                                  "pop3s": listener("pop3", 2)}
    assert stats["sessions"] == {"open": 4, "spliced": 3, "preauth": 1}
    assert stats["cache"] == {"entries": 12, "counters": {"hit:positive": 9,
                                                          "hit:negative": 1, "miss": 30}}
    assert (stats["bans"], stats["draining"]) == (3, True)
    assert stats["login_delays"] == 2  # every worker holds every delay: not 4


def test_each_worker_is_listed_only_when_asked(two_workers: list[Report]) -> None:
    assert instance_stats(two_workers, by_worker=True)["workers"] == [
        {"worker": 1, "pid": 1001, "active_connections": 3, "sessions": 3, "cache_entries": 5},
        {"worker": 2, "pid": 1002, "active_connections": 3, "sessions": 1, "cache_entries": 7}]
    assert "workers" not in instance_stats(two_workers, by_worker=False)


def test_no_lookups_is_a_hit_rate_of_zero() -> None:
    stats = instance_stats([report(worker=1), report(worker=2)], by_worker=True)
    assert (stats["hit_rate_pct"], stats["login_delays"]) == (0.0, 0)


# --- /connections and /destinations -------------------------------------------------------------


def test_connections_name_their_worker(two_workers: list[Report]) -> None:
    rows = instance_connections(two_workers)
    assert [(row["id"], row["worker"]) for row in rows] == [("s1", 1), ("s2", 1), ("s3", 2)]
    assert {key: value for key, value in rows[2].items() if key != "worker"} == \
        connection("s3", "node2")


def test_a_single_process_s_connections_are_as_it_reported_them() -> None:
    plain = report(connections=[connection("s1", "node1")])
    assert instance_connections([plain]) == [connection("s1", "node1")]


def test_destinations_sum_sessions_and_trips_and_show_the_worst_circuit(
        two_workers: list[Report]) -> None:
    node1, node2 = instance_destinations(two_workers)
    assert node1 == {**destination("node1", "open", sessions=2, trips=4, failures=5),
                     "circuits": {"1": "closed", "2": "open"}}
    assert node2 == {**destination("node2", "half_open", sessions=1, trips=1, failures=1),
                     "circuits": {"1": "half_open", "2": "closed"}}


def test_a_single_process_s_destinations_have_no_circuits_per_worker() -> None:
    rows = [destination("node1", "half_open", 2, 1, 1), destination("node2")]
    assert instance_destinations([report(destinations=rows)]) == rows


# --- measurements -------------------------------------------------------------------------------


def test_measurements_survive_the_trip_as_plain_data() -> None:
    metrics = measured(("imap", "node1", "ok", 4), ("pop3", "", "refused", 1),
                       login=(0.0004, 0.02, 0.3, 12.0), store=(0.001, 0.001))
    travelled = json.loads(json.dumps({"measured": measured_report(metrics)}))
    again = measured_from(travelled)
    assert again == metrics
    assert again.sessions == Counter({("imap", "node1", "ok"): 4, ("pop3", "", "refused"): 1})
    assert again.login_latency.count == 4


# --- /metrics -----------------------------------------------------------------------------------

#: The families built from each process's report (the rest belong to the instance).
PER_PROCESS = {
    "stalroute_listener_active_connections", "stalroute_listener_rejected_connections",
    "stalroute_listener_probes", "stalroute_sessions_open", "stalroute_sessions_spliced",
    "stalroute_cache_hits", "stalroute_cache_misses", "stalroute_cache_entries",
    "stalroute_destination_circuit_state", "stalroute_destination_circuit_trips",
    "stalroute_destination_consecutive_failures", "stalroute_sessions_finished",
    "stalroute_login_latency_seconds", "stalroute_store_lookup_latency_seconds",
    "stalroute_bans", "stalroute_login_delays", "stalroute_draining",
}


def scrape(reports: list[Report], cluster: dict[str, Any] | None = None,
           lockouts: tuple[int, int] | None = None) -> dict[str, list[Sample]]:
    """stalroute's families of one scrape, parsed back: name → samples."""
    text = render(metrics_registry(reports, cluster, lockouts)).decode()
    return {family.name: family.samples for family in text_string_to_metric_families(text)
            if family.name.startswith("stalroute_")}


def total(samples: list[Sample], name: str, **labels: str) -> float:
    """The sum of ``name``'s samples over the workers, where the other labels match."""
    return sum(sample.value for sample in samples if sample.name == name
               and all(sample.labels.get(key) == value for key, value in labels.items()))


def test_every_process_family_has_a_series_per_worker(two_workers: list[Report]) -> None:
    families = scrape(two_workers)
    assert set(families) == PER_PROCESS
    for name, samples in families.items():
        assert {sample.labels.get("worker") for sample in samples} == {"1", "2"}, name


def test_the_workers_series_sum_to_the_instance(two_workers: list[Report]) -> None:
    families = scrape(two_workers)
    stats = instance_stats(two_workers, by_worker=True)
    for name, listener_stats in stats["listeners"].items():
        assert total(families["stalroute_listener_active_connections"],
                     "stalroute_listener_active_connections",
                     listener=name) == listener_stats["active_connections"]
        assert total(families["stalroute_listener_rejected_connections"],
                     "stalroute_listener_rejected_connections_total",
                     listener=name) == listener_stats["rejected_connections"]
    hits = families["stalroute_cache_hits"]
    assert total(hits, "stalroute_cache_hits_total", tier="positive") == 9
    assert total(hits, "stalroute_cache_hits_total") == stats["cache_hits"]
    assert total(families["stalroute_cache_misses"], "stalroute_cache_misses_total") == 30
    assert total(families["stalroute_cache_entries"], "stalroute_cache_entries") == 12
    assert total(families["stalroute_sessions_open"], "stalroute_sessions_open",
                 state="spliced") == 3
    assert total(families["stalroute_sessions_spliced"], "stalroute_sessions_spliced",
                 destination="node1") == 2
    finished = families["stalroute_sessions_finished"]
    assert total(finished, "stalroute_sessions_finished_total", protocol="imap",
                 destination="node1", outcome="ok") == 5
    assert total(finished, "stalroute_sessions_finished_total") == 7
    latency = families["stalroute_login_latency_seconds"]
    assert total(latency, "stalroute_login_latency_seconds_count") == 3
    assert total(latency, "stalroute_login_latency_seconds_bucket", le="0.025") == 2
    assert total(latency, "stalroute_login_latency_seconds_sum") == pytest.approx(0.324)
    circuit = families["stalroute_destination_circuit_state"]
    assert total(circuit, "stalroute_destination_circuit_state", destination="node1",
                 state="open", worker="2") == 1
    assert total(circuit, "stalroute_destination_circuit_state", destination="node1",
                 state="open", worker="1") == 0
    assert total(families["stalroute_destination_circuit_trips"],
                 "stalroute_destination_circuit_trips_total") == 5
    assert total(families["stalroute_bans"], "stalroute_bans_total") == 3
    assert total(families["stalroute_draining"], "stalroute_draining", worker="2") == 1


def test_a_single_process_has_no_worker_label() -> None:
    plain = report(hits=(1, 0), misses=1, listeners={"imaps": listener("imap", 2)},
                   connections=[connection("s1", "node1")],
                   metrics=measured(("imap", "node1", "ok", 1), login=(0.01,)))
    families = scrape([plain])
    assert set(families) == PER_PROCESS
    for samples in families.values():
        assert all("worker" not in sample.labels for sample in samples)
    assert total(families["stalroute_listener_active_connections"],
                 "stalroute_listener_active_connections") == 2


CLUSTER = {"coordinator": "redis", "node_id": "a1", "connected": True, "published": 4,
           "applied": 6, "announces_heard": 9, "acks_heard": 3, "members": 3,
           "pending_acks": 0, "ack_seconds": None}


@pytest.mark.parametrize("cluster", [None, {"coordinator": "none", "node_id": "a1"}],
                         ids=["none", "no-coordinator"])
def test_without_a_coordinator_there_are_no_cluster_families(
        cluster: dict[str, Any] | None) -> None:
    assert not any(name.startswith("stalroute_cluster_")
                   for name in scrape([report()], cluster))


def test_the_bus_families_come_with_a_coordinator(two_workers: list[Report]) -> None:
    families = scrape(two_workers, CLUSTER)
    assert families["stalroute_cluster_members"][0].value == 3
    assert families["stalroute_cluster_connected"][0].value == 1
    assert families["stalroute_cluster_applied"][0].value == 6
    assert "stalroute_cluster_message_lag_seconds" not in families  # nothing acknowledged yet
    for name in ("stalroute_cluster_members", "stalroute_cluster_connected"):
        assert all("worker" not in sample.labels for sample in families[name])
    lagging = scrape(two_workers, {**CLUSTER, "connected": False, "ack_seconds": 0.25})
    assert lagging["stalroute_cluster_message_lag_seconds"][0].value == 0.25
    assert lagging["stalroute_cluster_connected"][0].value == 0


def test_the_admin_lockouts_belong_to_the_instance(two_workers: list[Report]) -> None:
    families = scrape(two_workers, lockouts=(4, 1))
    assert families["stalroute_admin_lockouts"][0].value == 4
    assert families["stalroute_admin_locked_addresses"][0].value == 1
    assert set(scrape(two_workers)) == PER_PROCESS
