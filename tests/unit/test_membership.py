"""Fleet membership in-process: instances (real :class:`~stalroute.control.Control` and
:class:`~stalroute.cluster.Cluster` on one Clock) announce themselves over the in-memory bus of
``test_cluster``; members expire after three silent heartbeats; ``GET /cluster`` names each
kind of mismatch; the later of two processes sharing a node_id is not ready. Three processes
over a real Redis are ``tests/integration/test_cluster.py``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from stalroute.config import parse_config
from stalroute.ctl.commands import render_cluster
from stalroute.health import Readiness
from stalroute.membership import (
    EXPIRY_BEATS, HEARTBEAT, BadAnnounce, config_digest, decode_announce, encode_announce,
)
from tests.unit.test_admin_app import Harness, MemoryStore, document
from tests.unit.test_cluster import Instance, MemoryCoordinator


class Member(Instance):
    """One instance on the shared clock and bus, started at once, with no mappings."""

    def __init__(self, node_id: int, tmp_path: Path, clock: Clock,
                 bus: list[MemoryCoordinator], **server: Any) -> None:
        super().__init__(node_id, tmp_path, clock, MemoryStore({}), bus, **server)

    def view(self) -> dict[str, Any]:
        return self.control.cluster()

    def readiness(self) -> Readiness:
        answers: list[Readiness] = []
        Deferred.fromCoroutine(self.control.readiness()).addCallback(answers.append)
        return answers[0]


@pytest.fixture
def clock() -> Clock:
    clock = Clock()
    clock.advance(1_000_000)  # start times are wall-clock seconds
    return clock


@pytest.fixture
def bus() -> list[MemoryCoordinator]:
    return []


def test_an_announce_survives_encoding(tmp_path: Path, clock: Clock, bus) -> None:
    one = Member(1, tmp_path, clock, bus)
    me = one.cluster.me()
    message = json.loads(encode_announce(me))
    assert message["op"] == "announce" and message["node"] == 1
    assert decode_announce(message) == me
    assert me.hostname == "stalroute.test" and me.workers == 1
    assert me.listeners == ({"name": "imaps", "protocol": "imap", "bind": ["127.0.0.1:0"]},)
    assert me.destinations == ("node1", "node2")
    assert me.config_digest == config_digest(one.config) and len(me.config_digest) == 64


@pytest.mark.parametrize("change", [{"node": "1"}, {"workers": None}, {"destinations": [1]},
                                    {"started": True}, {"destinations": "node1"},
                                    {"listeners": {}}, {"token": ""}, {"token": "t" * 65}])
def test_a_malformed_announce_is_refused_and_skipped(tmp_path: Path, clock: Clock, bus,
                                                     change: dict[str, Any]) -> None:
    one = Member(1, tmp_path, clock, bus)
    message = {**json.loads(encode_announce(one.cluster.me())), "token": "other", **change}
    with pytest.raises(BadAnnounce):
        decode_announce(message)
    with pytest.raises(BadAnnounce, match="without"):
        decode_announce({"op": "announce", "node": 1})
    heard = one.cluster.announces_heard
    one.coordinator._on_message(json.dumps(message))
    assert one.cluster.announces_heard == heard and len(one.view()["members"]) == 1


def test_members_are_listed_everywhere_and_announces_are_no_changes(
        tmp_path: Path, clock: Clock, bus) -> None:
    """At once: a member that hears a newcomer announces itself without waiting for its
    heartbeat, so a write made just after a start already waits for every member."""
    fleet = [Member(node, tmp_path, clock, bus) for node in (1, 2, 3)]
    for member in fleet:
        view = member.view()
        assert [m["node_id"] for m in view["members"]] == [1, 2, 3]
        assert [m["self"] for m in view["members"]] == [m["node_id"] == member.cluster.node_id
                                                        for m in view["members"]]
        assert view["problems"] == []
        assert member.cluster.applied == 0 and member.cluster.published == 0
        assert member.readiness().ready


def test_a_member_silent_for_three_heartbeats_is_dropped(tmp_path: Path, clock: Clock,
                                                         bus) -> None:
    one, two = Member(1, tmp_path, clock, bus), Member(2, tmp_path, clock, bus)
    two.cluster.stop()  # gone without a word
    clock.advance(EXPIRY_BEATS * HEARTBEAT)
    assert [m["node_id"] for m in one.view()["members"]] == [1, 2]
    assert one.view()["members"][1]["last_seen"] == EXPIRY_BEATS * HEARTBEAT
    clock.advance(1)
    assert [m["node_id"] for m in one.view()["members"]] == [1]


def test_while_the_bus_is_down_the_members_last_heard_are_kept(tmp_path: Path, clock: Clock,
                                                                bus) -> None:
    """A write made while cut off must name the others unreachable, however long the outage;
    once the bus is back, a member that does not announce itself again is forgotten."""
    one, two = Member(1, tmp_path, clock, bus), Member(2, tmp_path, clock, bus)
    one.coordinator.set_connected(False)
    two.cluster.stop()
    clock.advance(10 * EXPIRY_BEATS * HEARTBEAT)
    assert [m["node_id"] for m in one.view()["members"]] == [1, 2]
    answers: list = []
    one.cluster.publish("invalidate", identifier=None).addCallback(answers.append)
    assert answers[0].as_dict() == {"applied": 1, "members": 2, "unreachable": [2]}
    one.coordinator.set_connected(True)
    clock.advance(EXPIRY_BEATS * HEARTBEAT + 1)
    assert [m["node_id"] for m in one.view()["members"]] == [1]


def test_without_coordinator_only_this_instance_is_listed(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    response = h.request("GET", "/cluster")
    assert response.status == 200
    body = response.json()
    assert body["problems"] == []
    assert [(m["node_id"], m["self"], m["hostname"]) for m in body["members"]] == [
        (1, True, "stalroute.test")]


def test_a_node_id_used_twice_makes_the_later_process_not_ready(
        tmp_path: Path, clock: Clock, bus) -> None:
    first = Member(1, tmp_path, clock, bus)
    clock.advance(1)
    later = Member(1, tmp_path, clock, bus)
    clock.advance(HEARTBEAT)
    for member in (first, later):
        view = member.view()
        assert [m["node_id"] for m in view["members"]] == [1, 1]
        assert len(view["problems"]) == 1
        assert "node_id 1 is used by 2 processes" in view["problems"][0]
    assert first.readiness().ready
    readiness = later.readiness()
    assert not readiness.ready
    assert readiness.reasons == ("node_id 1 is used by a process that started earlier",)


@pytest.mark.parametrize("server, destinations, problem", [
    ({"hostname": "elsewhere.test"}, None, "server.hostname differs"),
    ({}, {"node1": None}, "destinations differs"),
    ({"workers": 4}, None, None),  # workers are the instance's own business
], ids=["hostname", "destinations", "workers"])
def test_mismatches_between_members_are_problems(tmp_path: Path, clock: Clock, bus,
                                                 server: dict[str, Any],
                                                 destinations: dict[str, None] | None,
                                                 problem: str | None) -> None:
    one = Member(1, tmp_path, clock, bus)
    two = Member(2, tmp_path, clock, bus, **server)
    if destinations is not None:
        two.config = two.runtime.config = parse_config(
            {**document(tmp_path), "destination": {
                "node1": document(tmp_path)["destination"]["node1"]}},
            tmp_path, {}, check_files=False)
    clock.advance(HEARTBEAT)
    problems = one.view()["problems"]
    if problem is None:
        assert problems == []
        return
    assert any(p.startswith(problem) for p in problems), problems
    assert any(p.startswith("config digest differs") for p in problems) == (
        destinations is not None)
    assert two.view()["problems"] == problems


def test_a_routing_setting_changes_the_digest_a_secret_does_not(tmp_path: Path) -> None:
    source = document(tmp_path)
    base = config_digest(parse_config(source, tmp_path, {}, check_files=False))
    other = {**source, "routing": {"default_destination": "node2"}}
    assert config_digest(parse_config(other, tmp_path, {}, check_files=False)) != base
    secret = {**source, "admin": {**source["admin"], "bearer_token": "y" * 40}}
    assert config_digest(parse_config(secret, tmp_path, {}, check_files=False)) == base

    def redis(url: str) -> str:
        mapping = {"source": "redis", "redis": {"url": url}}
        return config_digest(parse_config({**source, "mapping": mapping}, tmp_path, {},
                                          check_files=False))

    assert redis("redis://:one@127.0.0.1:6379/0") == redis("redis://:two@127.0.0.1:6379/0")
    assert redis("redis://:one@127.0.0.1:6379/0") != redis("redis://:one@127.0.0.1:6379/1")


def test_ctl_cluster_prints_the_members_and_the_problems(tmp_path: Path, clock: Clock,
                                                         bus) -> None:
    first = Member(1, tmp_path, clock, bus)
    clock.advance(1)
    Member(1, tmp_path, clock, bus, hostname="elsewhere.test")
    clock.advance(HEARTBEAT)
    text = render_cluster(first.view(), argparse.Namespace())
    lines = text.splitlines()
    assert lines[0].split() == ["NODE", "HOSTNAME", "VERSION", "WORKERS", "LISTENERS", "CONFIG",
                                "LAST", "SEEN"]
    assert lines[1].split()[:3] == ["*", "1", "stalroute.test"]
    assert "imaps/imap" in lines[1] and "0.0s ago" in lines[1]
    assert lines[2].split()[:2] == ["1", "elsewhere.test"] and "s ago" in lines[2]
    assert "problems:" in lines and any("node_id 1 is used by 2" in line for line in lines)
    assert any("server.hostname differs" in line for line in lines)
    assert render_cluster({"members": [], "problems": []}, argparse.Namespace()).endswith(
        "problems: none")
