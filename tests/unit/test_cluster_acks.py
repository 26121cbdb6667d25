"""Acknowledged writes (SPEC §2.11): Cluster objects alone (no Control) on the loop-back bus
of ``test_cluster``, on one Clock; each applier does what the test tells it. A write answers
once every live member applied it, names the laggards after the timeout and the unreachable
members while the bus is down; no timer outlives a test.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from stalroute.cluster import (
    ACK_TIMEOUT, MAX_PENDING, Ack, Acknowledgement, Change, Cluster, encode_ack,
)
from stalroute.config import parse_config
from stalroute.membership import HEARTBEAT
from tests.unit.test_admin_app import document
from tests.unit.test_cluster import MemoryCoordinator, fired


class Peer:
    """A Cluster alone on the loop-back bus; its applier records each change and answers
    what :attr:`answer` returns for it (None: applied at once)."""

    def __init__(self, node_id: int, tmp_path: Path, clock: Clock,
                 bus: list[MemoryCoordinator]) -> None:
        source = document(tmp_path)
        source["cluster"] = {"node_id": node_id}
        config = parse_config(source, tmp_path, {}, check_files=False)
        self.coordinator = MemoryCoordinator(bus)
        self.cluster = Cluster(node_id, self.coordinator, clock)
        self.changes: list[Change] = []
        self.answer: Callable[[Change], Deferred[None] | None] = lambda change: None
        self.cluster.attach(self.apply, lambda connected: None, lambda: config)
        self.cluster.start()

    def apply(self, change: Change) -> Deferred[None] | None:
        self.changes.append(change)
        return self.answer(change)

    def stats(self) -> dict[str, Any]:
        return self.cluster.stats()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def peers(tmp_path: Path, clock: Clock):
    """Nodes 1, 2 and 3, each having heard the others; once the test is done, every one
    stops and no timer may be left."""
    bus: list[MemoryCoordinator] = []
    trio = [Peer(node, tmp_path, clock, bus) for node in (1, 2, 3)]
    clock.advance(HEARTBEAT)
    assert all(peer.stats()["members"] == 3 for peer in trio)
    yield trio
    for peer in trio:
        peer.cluster.stop()
    assert clock.getDelayedCalls() == []


def never(change: Change) -> Deferred[None]:
    """An applier that never finishes."""
    return Deferred()


def test_a_write_answers_once_every_live_member_applied_it(peers) -> None:
    one, two, three = peers
    answer = fired(one.cluster.publish("invalidate", identifier="alice"))
    assert answer == Acknowledgement(3, 3)
    assert answer.as_dict() == {"applied": 3, "members": 3}
    assert one.changes == []  # its own change, heard back, is not applied again
    assert two.changes == three.changes == [Change(1, one.cluster.token, 1, "invalidate",
                                                   {"identifier": "alice"})]
    assert (one.stats()["acks_heard"], one.stats()["pending_acks"],
            one.stats()["ack_seconds"]) == (2, 0, 0.0)
    assert two.stats()["acks_heard"] == 0  # the acks were addressed to one


def test_an_apply_returning_a_deferred_delays_the_ack(peers, clock: Clock) -> None:
    one, two, three = peers
    applying: Deferred[None] = Deferred()
    two.answer = lambda change: applying
    assert one.stats()["ack_seconds"] is None
    answer = one.cluster.publish("kick", identifier=None, destination="node1")
    assert fired(answer) is None and one.stats()["pending_acks"] == 1
    clock.advance(0.5)
    applying.callback(None)
    assert fired(answer) == Acknowledgement(3, 3)
    assert one.stats()["ack_seconds"] == 0.5 and two.stats()["applied"] == 1


def test_a_silent_member_is_named_a_laggard_after_the_timeout(peers, clock: Clock,
                                                               logged: list[str]) -> None:
    one, two, three = peers
    applying: Deferred[None] = Deferred()
    three.answer = lambda change: applying
    answer = one.cluster.publish("delay", identifier="alice", seconds=5)
    clock.advance(ACK_TIMEOUT - 0.1)
    assert fired(answer) is None
    clock.advance(0.1)
    assert fired(answer) == Acknowledgement(2, 3, laggards=(3,))
    assert answer.result.as_dict() == {"applied": 2, "members": 3, "laggards": [3]}
    assert any("delay #1 was not acknowledged by node 3" in line for line in logged)
    assert one.stats()["ack_seconds"] is None  # not every member acked: no round trip

    applying.callback(None)  # a late ack is heard, and changes nothing
    assert one.stats()["acks_heard"] == 2 and one.stats()["pending_acks"] == 0


def test_a_failed_apply_is_logged_and_not_acknowledged(peers, clock: Clock,
                                                       logged: list[str]) -> None:
    one, two, three = peers

    def fail(change: Change) -> None:
        raise RuntimeError("the store is gone")

    two.answer = fail
    three.answer = lambda change: Deferred.fromCoroutine(failing())

    async def failing() -> None:
        raise RuntimeError("a worker is gone")

    answer = one.cluster.publish("mappings_reload")
    clock.advance(ACK_TIMEOUT)
    assert fired(answer) == Acknowledgement(1, 3, laggards=(2, 3))
    assert two.stats()["applied"] == three.stats()["applied"] == 0
    assert sum("applying mappings_reload #1 of node 1 failed" in line for line in logged) == 2


def test_while_the_bus_is_down_a_write_names_the_members_unreachable(peers) -> None:
    one, two, three = peers
    one.coordinator.set_connected(False)
    answer = fired(one.cluster.publish("reset_destination", name="node1"))
    assert answer == Acknowledgement(1, 3, unreachable=(2, 3))
    assert answer.as_dict() == {"applied": 1, "members": 3, "unreachable": [2, 3]}
    assert two.changes == [] and one.stats()["published"] == 0


def test_a_write_the_coordinator_could_not_send_names_the_members_unreachable(peers) -> None:
    one, two, three = peers
    one.coordinator.publish = lambda message: succeed(False)  # type: ignore[method-assign]
    answer = fired(one.cluster.publish("mappings_import"))
    assert answer == Acknowledgement(1, 3, unreachable=(2, 3))
    assert one.stats()["pending_acks"] == 0  # and its timer is cancelled (the fixture checks)


def test_stopping_answers_the_pending_writes(peers) -> None:
    one, two, three = peers
    three.answer = never
    answers = [one.cluster.publish("invalidate", identifier=None) for _ in range(2)]
    assert [fired(answer) for answer in answers] == [None, None]
    one.cluster.stop()
    assert [fired(answer) for answer in answers] == [Acknowledgement(2, 3, laggards=(3,))] * 2
    assert one.stats()["pending_acks"] == 0


def test_beyond_max_pending_a_write_is_sent_but_answered_at_once(
        peers, monkeypatch: pytest.MonkeyPatch, logged: list[str]) -> None:
    monkeypatch.setattr("stalroute.cluster.MAX_PENDING", 2)
    one, two, three = peers
    three.answer = never
    first, second, third = (one.cluster.publish("invalidate", identifier=None)
                            for _ in range(3))
    assert fired(first) is fired(second) is None
    assert fired(third) == Acknowledgement(1, 3, laggards=(2, 3))
    assert len(two.changes) == 3 and one.stats()["published"] == 3
    assert one.stats()["pending_acks"] == 2
    assert any("2 writes await acknowledgements already" in line for line in logged)
    assert MAX_PENDING == 10_000


def test_malformed_acks_and_acks_to_another_process_are_ignored(peers,
                                                                  logged: list[str]) -> None:
    one, two, three = peers
    three.answer = never
    answer = one.cluster.publish("invalidate", identifier=None)
    token = one.cluster.token
    for bad in ({"op": "ack", "node": 3, "token": three.cluster.token, "to": token},
                {"op": "ack", "node": 3, "token": three.cluster.token, "to": token, "seq": "1"}):
        one.coordinator._on_message(json.dumps(bad))
    assert sum("ignoring a message" in line for line in logged) == 2
    one.coordinator._on_message(encode_ack(Ack(3, three.cluster.token, "another", 1)))
    one.coordinator._on_message(encode_ack(Ack(1, token, token, 1)))  # not from itself
    assert fired(answer) is None and one.stats()["acks_heard"] == 1  # two's

    one.coordinator._on_message(encode_ack(Ack(3, three.cluster.token, token, 1)))
    assert fired(answer) == Acknowledgement(3, 3)
    assert one.stats()["acks_heard"] == 2


def test_a_member_not_heard_of_yet_counts_when_it_acks(peers) -> None:
    one, two, three = peers
    three.answer = never
    answer = one.cluster.publish("invalidate", identifier=None)
    one.coordinator._on_message(encode_ack(Ack(4, "newcomer", one.cluster.token, 1)))
    one.coordinator._on_message(encode_ack(Ack(4, "newcomer", one.cluster.token, 1)))  # again
    one.coordinator._on_message(encode_ack(Ack(3, three.cluster.token, one.cluster.token, 1)))
    assert fired(answer) == Acknowledgement(4, 4)


def test_a_process_sharing_a_node_id_applies_and_acknowledges(tmp_path: Path,
                                                               clock: Clock) -> None:
    bus: list[MemoryCoordinator] = []
    first, second = Peer(1, tmp_path, clock, bus), Peer(1, tmp_path, clock, bus)
    clock.advance(HEARTBEAT)
    assert fired(first.cluster.publish("mappings_reload")) == Acknowledgement(2, 2)
    assert len(second.changes) == 1 and first.changes == []
    for peer in (first, second):
        peer.cluster.stop()
    assert clock.getDelayedCalls() == []
