"""A fleet over each coordinator (SPEC §2.11): three stalroute instances (``node_id`` 1, 2, 3,
``WORKERS`` worker processes each, one shared mapping file, long cache lifetimes) in front of
the Dovecot pair and one real Redis (pub/sub) or PostgreSQL (``LISTEN/NOTIFY``); every test
runs once over each.

An admin change made on one instance reaches the others: ``PUT /mappings`` alice → node2 and a
kick on instance 1 end alice's sessions on all three, and her next login through instance 3
lands on node2 although instance 3 had her route cached; a kick by destination on instance 2
empties node1 on every instance. With the coordinator stopped, logins keep working, ``/stats``
says the bus is down and cached routes live at most ``fallback_ttl``; once it is back every
instance reconnects, drops its route cache, and changes propagate again.

Membership: ``GET /cluster`` on any instance lists the three; a fourth process given node_id 1
is named in the problems and is not ready, while the first node 1 stays ready.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest

from tests.conftest import DovecotPair, StalrouteFactory, require_binary, start_postgres
from tests.harness.pki import CertificateAuthority, IssuedCertificate
from tests.harness.postgres import PostgresServer
from tests.harness.redis import RedisServer
from tests.harness.stalroute import StalrouteProcess
from tests.integration.test_admin import (
    Admin, is_closed, lands_on, logged_in, node_of, proxy_config, wait_until,
)

pytestmark = pytest.mark.integration

#: Short, so the test can watch it apply; the cache tiers are long, so only it can.
FALLBACK_TTL = 2
#: ``server.workers`` of every instance of the fleet. One: the cache assertions below count
#: the misses of one route cache, and every worker has its own.
WORKERS = 1


class Bus(Protocol):
    """A coordinator server the test can stop and start again."""

    def start(self) -> object: ...

    def stop(self) -> None: ...


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer(require_binary("redis-server"))
    try:
        yield server.start()
    finally:
        server.close()


@pytest.fixture(scope="module")
def postgres_server() -> Iterator[PostgresServer]:
    server = start_postgres(log_statements=True)
    try:
        server.execute("CREATE ROLE fleet LOGIN")
        server.execute("CREATE DATABASE fleet OWNER fleet")
        yield server
    finally:
        server.close()


@pytest.fixture(params=["redis", "postgresql"])
def coordinator(request: pytest.FixtureRequest) -> tuple[str, str, Bus]:
    """The coordinator kind, its URL, and its server (running)."""
    if request.param == "redis":
        redis: RedisServer = request.getfixturevalue("redis_server")
        redis.start()  # a test before may have left it stopped
        return "redis", redis.url(), redis
    postgres: PostgresServer = request.getfixturevalue("postgres_server")
    postgres.start()
    return "postgresql", f"postgresql://fleet@{postgres.host}:{postgres.port}/fleet", postgres


Fleet = list[tuple[StalrouteProcess, Admin]]


def bus(admin: Admin) -> dict[str, Any]:
    return admin.ok("GET", "/stats")["cluster"]


@pytest.fixture
def member_config(pki: CertificateAuthority, proxy_certificate: IssuedCertificate,
                  dovecot_pair: DovecotPair, coordinator: tuple[str, str, Bus],
                  fleet_workers: int, tmp_path: Path) -> Callable[[int], dict[str, Any]]:
    """The configuration of the fleet's instance ``node_id``."""
    kind, url, _ = coordinator
    shared = tmp_path / "shared-mappings.tsv"
    shared.write_text("alice\tnode1\nbob\tnode1\n")
    mapping = {"source": "file", "positive_ttl": "1h", "negative_ttl": "1h",
               "file": {"path": str(shared)}}

    def build(node_id: int) -> dict[str, Any]:
        config = proxy_config(pki, proxy_certificate, dovecot_pair, mapping=mapping)
        config["cluster"] = {"node_id": node_id, "coordinator": kind, "url": url,
                             "fallback_ttl": f"{FALLBACK_TTL}s"}
        config["server"]["workers"] = fleet_workers
        return config

    return build


@pytest.fixture
def fleet_workers() -> int:
    """``server.workers`` of each instance; another module may override this fixture."""
    return WORKERS


@pytest.fixture
def fleet_size() -> int:
    """How many instances ``fleet`` starts (node ids 1 to N); a test may parametrize it."""
    return 3


@pytest.fixture
def fleet(stalroute: StalrouteFactory, pki: CertificateAuthority,
          member_config: Callable[[int], dict[str, Any]], fleet_size: int) -> Fleet:
    members: Fleet = []
    for node_id in range(1, fleet_size + 1):
        proxy = stalroute(member_config(node_id))
        members.append((proxy, Admin(proxy, pki)))
    for _, admin in members:
        wait_until(lambda: bus(admin)["connected"])
    return members


def all_closed(clients: list) -> Callable[[], bool]:
    return lambda: all(is_closed(client) for client in clients)


def test_admin_changes_reach_every_instance(fleet: Fleet, coordinator: tuple[str, str, Bus],
                                            pki: CertificateAuthority,
                                            users: dict[str, str]) -> None:
    (one, admin1), (two, admin2), (three, admin3) = fleet
    alices = [logged_in(proxy, pki, users, "alice") for proxy, _ in fleet]
    bob = logged_in(three, pki, users, "bob")
    assert [node_of(client, "alice") for client in alices] == ["node1"] * 3  # now cached

    # The runbook, on instance 1 only.
    admin1.ok("PUT", "/mappings?identifier=alice&destination=node2")
    assert admin1.ok("POST", "/connections/kick?identifier=alice")["kicked"] == 1
    wait_until(all_closed(alices))
    assert not is_closed(bob)
    assert lands_on(three, pki, users, "alice") == "node2"  # not instance 3's cached node1
    assert lands_on(two, pki, users, "alice") == "node2"
    assert bus(admin1)["published"] == 2
    for admin in (admin2, admin3):
        assert bus(admin).items() >= {"coordinator": coordinator[0], "connected": True,
                                      "published": 0, "applied": 2, "pending_acks": 0}.items()
    assert "cluster: applied kick" in three.log_text()

    # Draining node1, on instance 2: every instance's node1 sessions end.
    bobs = [bob] + [logged_in(proxy, pki, users, "bob") for proxy in (one, two)]
    alice = logged_in(one, pki, users, "alice")
    admin2.ok("POST", "/connections/kick?destination=node1")
    wait_until(all_closed(bobs))
    for _, admin in fleet:
        assert admin.ok("GET", "/connections?destination=node1")["connections"] == []
    assert not is_closed(alice) and node_of(alice, "alice") == "node2"
    alice.logout()

    metrics = admin3.call("GET", "/metrics").body.decode()
    assert "stalroute_cluster_connected 1.0" in metrics


def test_logins_go_on_while_the_coordinator_is_down_and_caches_drop_on_reconnect(
        fleet: Fleet, coordinator: tuple[str, str, Bus], pki: CertificateAuthority,
        users: dict[str, str]) -> None:
    (one, admin1), (two, admin2), (three, admin3) = fleet
    kind, _, server = coordinator
    assert lands_on(three, pki, users, "alice") == "node1"

    server.stop()
    for proxy, admin in fleet:
        wait_until(lambda: not bus(admin)["connected"])
        assert f"cluster: lost the {kind} coordinator" in proxy.log_text()
        assert lands_on(proxy, pki, users, "alice") == "node1"
    assert "stalroute_cluster_connected 0.0" in admin3.call("GET", "/metrics").body.decode()

    # The cached route is served for fallback_ttl at most, then asked of the store again.
    misses = admin3.ok("GET", "/stats")["cache_misses"]
    assert lands_on(three, pki, users, "alice") == "node1"
    assert admin3.ok("GET", "/stats")["cache_misses"] == misses
    time.sleep(FALLBACK_TTL + 0.5)
    assert lands_on(three, pki, users, "alice") == "node1"
    assert admin3.ok("GET", "/stats")["cache_misses"] == misses + 1

    server.start()
    for proxy, admin in fleet:
        wait_until(lambda: bus(admin)["connected"], timeout=20)
        assert admin.ok("GET", "/stats")["cache_entries"] == 0
        assert "route cache dropped on connecting" in proxy.log_text()

    # And changes propagate again.
    assert lands_on(three, pki, users, "alice") == "node1"
    admin2.ok("PUT", "/mappings?identifier=alice&destination=node2")
    wait_until(lambda: bus(admin3)["applied"] >= 1)
    assert lands_on(three, pki, users, "alice") == "node2"
    for _, admin in fleet:
        wait_until(lambda: len(admin.ok("GET", "/cluster")["members"]) == 3)


def node_ids(admin: Admin) -> list[int]:
    return [member["node_id"] for member in admin.ok("GET", "/cluster")["members"]]


def test_every_instance_lists_the_fleet_and_a_duplicate_node_id_is_not_ready(
        fleet: Fleet, stalroute: StalrouteFactory, pki: CertificateAuthority,
        member_config: Callable[[int], dict[str, Any]]) -> None:
    (one, admin1), _, _ = fleet
    for _, admin in fleet:  # a heartbeat (5 s) at most before all have heard all
        wait_until(lambda: node_ids(admin) == [1, 2, 3])
        view = admin.ok("GET", "/cluster")
        assert view["problems"] == []
        assert sum(member["self"] for member in view["members"]) == 1
        member = view["members"][0]
        assert member["hostname"] == "stalroute.test"
        assert member["workers"] == WORKERS and member["version"]
        assert {m["config_digest"] for m in view["members"]} == {member["config_digest"]}
        assert [listener["name"] for listener in member["listeners"]]

    duplicate = stalroute(member_config(1))
    admin4 = Admin(duplicate, pki)
    wait_until(lambda: bus(admin4)["connected"])
    for admin in (admin1, admin4):
        wait_until(lambda: node_ids(admin) == [1, 1, 2, 3])
        problems = admin.ok("GET", "/cluster")["problems"]
        assert len(problems) == 1 and "node_id 1 is used by 2 processes" in problems[0]
    ready = admin4.call("GET", "/healthz/ready")
    assert ready.status == 503
    assert "node_id 1 is used by a process that started earlier" in ready.json["error"]
    assert admin1.call("GET", "/healthz/ready").status == 200
    for proxy in (one, duplicate):
        wait_until(lambda: "also runs as node_id 1" in proxy.log_text())
