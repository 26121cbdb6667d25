"""The cluster bus in-process: message encoding and decoding, and two instances (real
:class:`~stalroute.control.Control` over runtimes built on a Clock) joined by an in-memory
coordinator, so every admin change made on one is applied on the other. The acknowledgements
of the writes are ``test_cluster_acks.py``, the coordinators ``test_coordinators.py``; both
coordinators against real servers and three processes are ``tests/integration/test_cluster.py``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

import pytest
from hypothesis import given, settings, strategies as st
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from stalroute.admin.metrics import metrics_registry, render
from stalroute.cluster import (
    Ack, Acknowledgement, BadMessage, Change, Cluster, build_cluster, decode_message, encode,
    encode_ack,
)
from stalroute.config import ConfigError, parse_config
from stalroute.control import Control
from stalroute.coordinators import PostgreSQLCoordinator
from stalroute.membership import BadAnnounce
from stalroute.runtime import build_runtime
from stalroute.service import settings_needing_restart
from tests.unit.test_admin_app import MemoryStore, document

T = TypeVar("T")


def fired(answer: Deferred[T]) -> T | None:
    """What ``answer`` fired with, None while it has not."""
    results: list[T] = []

    def seen(result: T) -> T:
        results.append(result)
        return result

    answer.addCallback(seen)
    return results[0] if results else None


CHANGES = [
    Change(1, "t1", 1, "mapping_put", {"identifier": "alice", "destination": "node2"}),
    Change(1, "t1", 2, "mapping_delete", {"identifier": "alice"}),
    Change(1, "t1", 3, "mappings_import", {}),
    Change(1, "t1", 4, "mappings_reload", {}),
    Change(1, "t1", 5, "invalidate", {"identifier": None}),
    Change(1, "t1", 6, "invalidate", {"identifier": "alice"}),
    Change(1, "t1", 7, "kick", {"identifier": "alice", "destination": None}),
    Change(1, "t1", 8, "kick", {"identifier": None, "destination": "node1"}),
    Change(1, "t1", 9, "delay", {"identifier": "alice", "seconds": 2.5}),
    Change(1, "t1", 10, "reset_destination", {"name": "node1"}),
]


@pytest.mark.parametrize("change", CHANGES, ids=lambda c: f"{c.op}-{c.seq}")
def test_every_change_survives_encoding(change: Change) -> None:
    message = encode(change)
    assert json.loads(message)["node"] == 1 and json.loads(message)["op"] == change.op
    assert decode_message(message) == change
    assert decode_message(message.encode()) == change


def test_an_ack_survives_encoding() -> None:
    ack = Ack(2, "t2", "t1", 7)
    assert json.loads(encode_ack(ack)) == {"op": "ack", "node": 2, "token": "t2", "to": "t1",
                                           "seq": 7}
    assert decode_message(encode_ack(ack)) == ack


@pytest.mark.parametrize("message, problem", [
    ("{", "not JSON"),
    ("[1]", "not a JSON object"),
    ('{"token": "t", "seq": 1, "op": "mappings_reload"}', "integers"),
    ('{"node": true, "token": "t", "seq": 1, "op": "mappings_reload"}', "integers"),
    ('{"node": 1, "token": "t", "seq": "1", "op": "mappings_reload"}', "integers"),
    ('{"node": 1, "seq": 1, "op": "mappings_reload"}', "token"),
    ('{"node": 1, "token": "", "seq": 1, "op": "mappings_reload"}', "token"),
    ('{"node": 1, "token": 5, "seq": 1, "op": "mappings_reload"}', "token"),
    ('{"node": 1, "token": "%s", "seq": 1, "op": "mappings_reload"}' % ("t" * 65), "token"),
    ('{"node": 1, "token": "t", "seq": 1, "op": "format_disk"}', "unknown op"),
    ('{"node": 1, "token": "t", "seq": 1, "op": []}', "unknown op"),
    ('{"node": 1, "token": "t", "seq": 1, "op": "mappings_reload", "x": 1}', "no arguments"),
    ('{"node": 1, "token": "t", "seq": 1, "op": "mapping_delete"}', "takes identifier"),
    ('{"node": 1, "token": "t", "seq": 1, "op": "mapping_delete", "identifier": 3}',
     "bad identifier"),
    ('{"node": 1, "token": "t", "seq": 1, "op": "delay", "identifier": "a", "seconds": true}',
     "bad seconds"),
    ('{"node": 1, "token": "t", "seq": 1, "op": "delay", "identifier": "a", "seconds": "1"}',
     "bad seconds"),
    ('{"node": 1, "token": "t", "seq": 1, "op": "delay", "identifier": "a", "seconds": NaN}',
     "not JSON"),
    ('{"node": 1, "token": "t", "seq": 1, "op": "delay", "identifier": "a", "seconds": 1e999}',
     "not JSON"),
    ('{"op": "ack", "node": 2, "token": "t2", "to": "t1"}', "an ack carries"),
    ('{"op": "ack", "node": 2, "token": "t2", "to": "t1", "seq": 1, "x": 0}', "an ack carries"),
    ('{"op": "ack", "node": "2", "token": "t2", "to": "t1", "seq": 1}', "integers"),
    ('{"op": "ack", "node": 2, "token": "t2", "to": "t1", "seq": false}', "integers"),
    ('{"op": "ack", "node": 2, "token": "t2", "to": null, "seq": 1}', "short strings"),
    ('{"op": "ack", "node": 2, "token": [], "to": "t1", "seq": 1}', "short strings"),
])
def test_a_message_that_is_no_change_nor_ack_is_refused(message: str, problem: str) -> None:
    with pytest.raises(BadMessage, match=problem):
        decode_message(message)


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.binary(max_size=512), st.text(max_size=512),
                 st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                              lambda inner: st.lists(inner) | st.dictionaries(st.text(max_size=8),
                                                                              inner),
                              max_leaves=20).map(json.dumps)))
def test_any_message_decodes_to_a_change_or_an_ack_or_is_refused(message: str | bytes) -> None:
    try:
        decoded = decode_message(message)
    except (BadMessage, BadAnnounce):
        return
    assert isinstance(decoded, (Change, Ack))  # no announce is made of such small leaves
    encoded = encode(decoded) if isinstance(decoded, Change) else encode_ack(decoded)
    assert decode_message(encoded) == decoded


@pytest.mark.parametrize("message", ["[" * 8_000 + "]" * 8_000, '"' + "x" * 20_000 + '"'])
def test_deep_or_huge_messages_are_refused(message: str) -> None:
    with pytest.raises(BadMessage):
        decode_message(message)


class MemoryCoordinator:
    """A coordinator on an in-memory bus: publishing delivers to every member, the sender
    included (as Redis does), while connected."""

    kind = "memory"

    def __init__(self, bus: list[MemoryCoordinator]) -> None:
        self._bus = bus
        bus.append(self)
        self.connected = False
        self._on_message: Callable[[str | bytes], None] = lambda message: None
        self._on_connection: Callable[[bool], None] = lambda connected: None

    def start(self, on_message: Callable[[str | bytes], None],
              on_connection: Callable[[bool], None]) -> None:
        self._on_message, self._on_connection = on_message, on_connection
        self.set_connected(True)

    def set_connected(self, connected: bool) -> None:
        self.connected = connected
        self._on_connection(connected)

    def publish(self, message: str) -> Deferred[bool]:
        if not self.connected:
            return succeed(False)
        for member in self._bus:
            if member.connected:
                member._on_message(message)
        return succeed(True)

    def stop(self) -> Deferred[None]:
        self.connected = False
        return succeed(None)


class Session:
    """A spliced session as the registry lists it."""

    def __init__(self, id: str, account: str, destination: str) -> None:
        self.id, self.account, self.destination = id, account, destination
        self.routed = True
        self.closed: str | None = None

    def close(self, outcome: str) -> None:
        self.closed = outcome


class Instance:
    """One stalroute's runtime and Control on the shared clock, store and bus."""

    def __init__(self, node_id: int, tmp_path: Path, clock: Clock, store: MemoryStore,
                 bus: list[MemoryCoordinator], **server: Any) -> None:
        source = document(tmp_path)
        source["mapping"]["positive_ttl"] = "1h"
        source["cluster"] = {"node_id": node_id, "fallback_ttl": "30s"}
        source["server"].update(server)
        self.config = parse_config(source, tmp_path, {}, check_files=False)
        self.clock = clock
        self.runtime = build_runtime(clock, self.config)
        self.runtime.router.store = store
        self.coordinator = MemoryCoordinator(bus)
        self.cluster = Cluster(node_id, self.coordinator, clock)
        proxy = SimpleNamespace(runtime=self.runtime, factories={}, reactor=clock,
                                reload_config=list)
        self.control = Control(proxy, self.cluster)  # type: ignore[arg-type]
        self.cluster.start()

    def route(self, key: str) -> str | None:
        answers: list[str | None] = []
        self.runtime.router.cache.resolve(key, self.runtime.router.store.lookup).addCallback(
            answers.append)
        return answers[0]

    def open(self, id: str, account: str, destination: str) -> Session:
        session = Session(id, account, destination)
        self.runtime.registry.sessions[id] = session  # type: ignore[assignment]
        return session


@pytest.fixture
def fleet(tmp_path: Path) -> tuple[Instance, Instance]:
    clock, store, bus = Clock(), MemoryStore({"alice": "node1"}), []
    return (Instance(1, tmp_path, clock, store, bus), Instance(2, tmp_path, clock, store, bus))


def hits(instance: Instance) -> int:
    return instance.runtime.router.cache.counters["hit:positive"]


def test_a_mapping_write_drops_the_route_other_instances_cached(fleet) -> None:
    one, two = fleet
    assert two.route("alice") == "node1" and two.route("alice") == "node1"
    assert hits(two) == 1

    Deferred.fromCoroutine(one.control.put_mapping("Alice", "node2"))
    assert two.route("alice") == "node2"  # not the cached node1
    assert one.cluster.published == 1 and two.cluster.applied == 1
    assert one.cluster.applied == 0  # its own message, heard back, is ignored

    Deferred.fromCoroutine(one.control.delete_mapping("alice"))
    assert two.route("alice") is None


def test_import_reload_and_invalidate_all_drop_every_route_elsewhere(fleet) -> None:
    one, two = fleet
    for action in (lambda: one.control.imported(["bob"]),
                   lambda: Deferred.fromCoroutine(one.control.reload_mappings()),
                   lambda: one.control.invalidate()):
        two.route("alice")
        assert len(two.runtime.router.cache) == 1
        action()
        assert len(two.runtime.router.cache) == 0
    two.route("alice")
    two.route("bob")
    one.control.invalidate("ALICE")
    assert len(two.runtime.router.cache) == 1 and two.route("bob") is None


def test_kicks_end_sessions_on_every_instance(fleet) -> None:
    one, two = fleet
    alice_one = one.open("1-a", "alice", "node1")
    alice_two = two.open("2-a", "alice", "node1")
    bob_two = two.open("2-b", "bob", "node1")
    carol_two = two.open("2-c", "carol", "node2")

    kicked = fired(one.control.kick(identifier="alice"))
    assert kicked is not None and kicked.count == 1  # the local count
    assert kicked.fields() == {"applied": 2, "members": 2}
    assert alice_one.closed == alice_two.closed == "kicked" and bob_two.closed is None

    two.control.kick(destination="node1")
    assert bob_two.closed == "kicked" and carol_two.closed is None


def test_delays_and_circuit_resets_reach_the_other_instances(fleet) -> None:
    one, two = fleet
    one.control.delay("Alice", 5)
    assert two.runtime.delays.remaining("alice") == pytest.approx(5)

    breaker = one.runtime.connector.breakers["node1"]
    remote = two.runtime.connector.breakers["node1"]
    for _ in range(20):
        breaker.failed("10.0.0.1", connect_stage=True)
        remote.failed("10.0.0.1", connect_stage=True)
    assert remote.state == "open"
    assert two.control.reset_destination("node1") is not None
    assert breaker.state == "closed"
    assert two.control.reset_destination("nowhere") is None


def test_a_bad_message_is_logged_and_skipped(fleet) -> None:
    one, two = fleet
    two.coordinator._on_message("not json")
    # A destination this instance does not declare is no error.
    two.coordinator._on_message(encode(Change(9, "t9", 1, "reset_destination",
                                              {"name": "nowhere"})))
    assert two.cluster.applied == 1
    one.control.invalidate()
    assert two.cluster.applied == 2


def test_while_the_bus_is_down_cached_routes_live_at_most_fallback_ttl(fleet) -> None:
    one, two = fleet
    cache = two.runtime.router.cache
    two.route("alice")
    two.coordinator.set_connected(False)
    assert two.cluster.stats()["connected"] is False
    assert cache.max_age == 30.0
    two.clock.advance(20)
    two.route("alice")
    assert hits(two) == 1
    two.clock.advance(11)  # 31 s old: positive_ttl (1 h) has not run out, fallback_ttl has
    two.route("alice")
    assert hits(two) == 1 and cache.counters["miss"] == 2

    one.control.invalidate("alice")  # missed by two: it is not subscribed
    assert two.cluster.applied == 0 and len(cache) == 1

    # A reload meanwhile keeps the cap.
    rebuilt = build_runtime(two.clock, two.config, previous=two.runtime)
    assert rebuilt.router.cache.max_age == 30.0

    two.coordinator.set_connected(True)
    assert cache.max_age is None and len(cache) == 0


def test_a_publish_while_disconnected_is_not_counted(fleet) -> None:
    one, two = fleet
    one.coordinator.set_connected(False)
    one.control.invalidate()
    assert one.cluster.published == 0 and two.cluster.applied == 0


def test_bus_state_in_stats_and_metrics(fleet) -> None:
    one, two = fleet
    one.control.invalidate()
    assert one.control.cluster_state() == {
        "coordinator": "memory", "node_id": 1, "connected": True, "published": 1,
        # Its own two (the second answers newcomer two) and two's two: no changes.
        "applied": 0, "announces_heard": 4,
        "acks_heard": 1, "members": 2, "pending_acks": 0, "ack_seconds": 0.0}
    # Acks go to their sender only.
    remote = two.cluster.stats()
    assert (remote["applied"], remote["announces_heard"], remote["acks_heard"],
            remote["members"]) == (1, 3, 0, 2)

    def samples(instance: Instance) -> dict[str, float]:
        registry = metrics_registry([instance.control.report()],
                                    instance.control.cluster_state())
        text = render(registry).decode()
        return {sample.name: sample.value for family in text_string_to_metric_families(text)
                for sample in family.samples if sample.name.startswith("stalroute_cluster")}

    assert samples(two).items() >= {"stalroute_cluster_connected": 1.0,
                                    "stalroute_cluster_published_total": 0.0,
                                    "stalroute_cluster_applied_total": 1.0}.items()
    two.coordinator.set_connected(False)
    assert samples(two)["stalroute_cluster_connected"] == 0.0


def test_an_instance_without_coordinator_has_no_bus_metrics(tmp_path: Path) -> None:
    config = parse_config(document(tmp_path), tmp_path, {}, check_files=False)
    cluster = build_cluster(config.cluster)
    assert cluster.coordinator is None
    proxy = SimpleNamespace(runtime=build_runtime(Clock(), config), factories={},
                            reactor=Clock(), reload_config=list)
    control = Control(proxy, cluster)  # type: ignore[arg-type]
    done = fired(control.invalidate())
    assert done is not None and done.fields() == {}  # this instance alone: nothing to say
    assert control.cluster_state() == {"coordinator": "none", "node_id": 1}
    assert fired(cluster.publish("invalidate", identifier=None)) == Acknowledgement(1, 1)
    registry = metrics_registry([control.report()], control.cluster_state())
    assert b"stalroute_cluster" not in render(registry)


def cluster_config(tmp_path: Path, **cluster: Any):
    source = document(tmp_path)
    source["cluster"] = cluster
    return parse_config(source, tmp_path, {}, check_files=False)


def test_fallback_ttl_is_a_positive_duration(tmp_path: Path) -> None:
    assert cluster_config(tmp_path).cluster.fallback_ttl == 30.0
    assert cluster_config(tmp_path, fallback_ttl="2m").cluster.fallback_ttl == 120.0
    for bad in (30, "0s", "soon"):
        with pytest.raises(ConfigError) as caught:
            cluster_config(tmp_path, fallback_ttl=bad)
        assert "cluster.fallback_ttl" in str(caught.value.problems[0])


def test_a_new_bus_or_node_id_needs_a_restart_a_new_fallback_ttl_does_not(
        tmp_path: Path) -> None:
    old = cluster_config(tmp_path, coordinator="redis", url="redis://127.0.0.1:1")
    assert settings_needing_restart(old, cluster_config(
        tmp_path, coordinator="redis", url="redis://127.0.0.1:1", fallback_ttl="5s")) == []
    assert settings_needing_restart(old, cluster_config(
        tmp_path, node_id=2, coordinator="redis", url="redis://127.0.0.1:2")) == [
        "cluster.node_id", "cluster.url"]


def test_a_postgresql_coordinator_is_built_for_coordinator_postgresql(tmp_path: Path) -> None:
    config = cluster_config(tmp_path, coordinator="postgresql",
                            url="postgresql://bus@127.0.0.1:1/fleet")
    cluster = build_cluster(config.cluster)
    assert isinstance(cluster.coordinator, PostgreSQLCoordinator)
    assert cluster.stats() == {"coordinator": "postgresql", "node_id": 1, "connected": False,
                               "published": 0, "applied": 0, "announces_heard": 0,
                               "acks_heard": 0, "members": 1, "pending_acks": 0,
                               "ack_seconds": None}
