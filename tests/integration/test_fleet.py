"""A fleet under load (issue 13, SPEC §2.11 and §11): the fleet of ``test_cluster`` (one
Dovecot pair, one shared mapping file, long cache lifetimes, instances ``node_id`` 1 to
``fleet_size``), here with :data:`WORKERS` worker processes each, once over Redis and once over
PostgreSQL, with clients logging in all the while.

Cutover: while four clients keep logging in as alice through every instance, ``PUT /mappings``
alice → node2 on instance 1 is acknowledged by every member, and from the moment its answer
arrives no login lands on node1 any more; the kick that follows ends her sessions on every
instance, and is the only thing any client sees fail. Then a kick by destination on instance 2
empties node1 of every instance's sessions.

Coordinator outage of 10 s: logins through every instance keep working; a write made meanwhile
answers that only this instance applied it and names the members it could not reach; after the
restart every instance is connected again, lists the whole fleet, and a write is acknowledged by
all. (``test_cluster`` covers the fallback TTL and the cache drop on reconnect, with one process
per instance.)
"""

from __future__ import annotations

import contextlib
import imaplib
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from tests.harness.pki import CertificateAuthority
from tests.harness.stalroute import StalrouteProcess
from tests.integration.test_admin import Admin, imaps, logged_in, node_of, wait_until
from tests.integration.test_cluster import Bus, Fleet, all_closed, bus
from tests.integration.test_cluster import (  # noqa: F401 - fixtures, used by name
    coordinator, fleet, fleet_size, member_config, postgres_server, redis_server,
)

pytestmark = pytest.mark.integration

#: ``server.workers`` of every instance (``test_cluster`` keeps one).
WORKERS = 2
#: How long the coordinator stays down.
OUTAGE = 10.0
#: Logins each instance serves under load before the cutover, and again after it.
LOAD = 5


@pytest.fixture
def fleet_workers() -> int:
    return WORKERS


@dataclass(frozen=True)
class Attempt:
    """One login through instance ``node_id``: where it landed, or what went wrong."""

    started: float
    ended: float
    node_id: int
    landed: str | None
    error: Exception | None


class LoginLoop:
    """``clients`` threads that log in as ``user`` through the fleet's instances in turn (each
    starting at another one) until stopped, recording every attempt (``time.monotonic``)."""

    def __init__(self, fleet: Fleet, pki: CertificateAuthority, users: dict[str, str],
                 user: str, clients: int) -> None:
        self.proxies = [proxy for proxy, _ in fleet]
        self.pki, self.users, self.user = pki, users, user
        self.attempts: list[Attempt] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(first,), daemon=True)
                         for first in range(clients)]

    def __enter__(self) -> LoginLoop:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)

    def _run(self, turn: int) -> None:
        while not self._stop.is_set():
            proxy: StalrouteProcess = self.proxies[turn % len(self.proxies)]
            turn += 1
            started = time.monotonic()
            landed: str | None = None
            error: Exception | None = None
            try:
                landed = self._login(proxy)
            except Exception as exc:  # recorded: the test decides which are expected
                error = exc
            with self._lock:
                self.attempts.append(Attempt(started, time.monotonic(),
                                             proxy.config["cluster"]["node_id"], landed, error))

    def _login(self, proxy: StalrouteProcess) -> str:
        """Log in, see which node serves the INBOX, log out; the client is closed even when
        the proxy cut it off (a kicked session ends once the client's side is closed too)."""
        client = imaps(proxy, self.pki)
        try:
            client.login(self.user, self.users[self.user])
            landed = node_of(client, self.user)
            client.logout()
            return landed
        except BaseException:
            with contextlib.suppress(OSError):
                client.shutdown()
            raise

    def recorded(self) -> list[Attempt]:
        with self._lock:
            return list(self.attempts)

    def landed_since(self, moment: float, each: int = 1) -> Callable[[], bool]:
        """True once every instance served ``each`` logins that started after ``moment``."""
        def served() -> bool:
            done = Counter(a.node_id for a in self.recorded() if a.started > moment and a.landed)
            return len(done) == len(self.proxies) and min(done.values()) >= each
        return served


def acknowledged(answer: dict[str, Any], members: int) -> bool:
    return (answer.get("applied"), answer.get("members")) == (members, members) \
        and "laggards" not in answer and "unreachable" not in answer


def lists_all_heard_since(admin: Admin, moment: float, size: int) -> bool:
    """``GET /cluster`` lists ``size`` members, each heard from after ``moment``."""
    members = admin.ok("GET", "/cluster")["members"]
    since = time.monotonic() - moment
    return len(members) == size and all(member["last_seen"] <= since for member in members)


def describe(attempts: list[Attempt], origin: float) -> str:
    return "\n".join(f"  +{a.started - origin:.3f}s..+{a.ended - origin:.3f}s via "
                     f"{a.node_id}: {a.landed or repr(a.error)}" for a in attempts)


def test_cutover_under_load_lands_every_later_login_on_the_new_node(
        fleet: Fleet, fleet_size: int, pki: CertificateAuthority,
        users: dict[str, str]) -> None:
    admin1 = fleet[0][1]
    alices = [logged_in(proxy, pki, users, "alice") for proxy, _ in fleet]
    assert [node_of(client, "alice") for client in alices] == ["node1"] * fleet_size  # cached

    with LoginLoop(fleet, pki, users, "alice", clients=4) as loop:
        origin = time.monotonic()
        wait_until(loop.landed_since(origin, each=LOAD))
        put = admin1.ok("PUT", "/mappings?identifier=alice&destination=node2")
        put_answered = time.monotonic()
        kick_sent = time.monotonic()
        kick = admin1.ok("POST", "/connections/kick?identifier=alice")
        kick_answered = time.monotonic()
        wait_until(all_closed(alices))
        for client in alices:
            client.shutdown()  # the proxy's side is gone: close ours too
        wait_until(loop.landed_since(kick_answered, each=LOAD), timeout=20)
    attempts = loop.recorded()

    assert acknowledged(put, fleet_size), put
    assert acknowledged(kick, fleet_size), kick
    assert any(a.landed == "node1" for a in attempts if a.ended < put_answered)
    stale = [a for a in attempts if a.started > put_answered and a.landed == "node1"]
    assert not stale, "after the acknowledged PUT:\n" + describe(stale, put_answered)
    # A kicked login is one that was under way while the kick ran, cut off by the proxy.
    unexpected = [a for a in attempts if a.error is not None and not (
        isinstance(a.error, (imaplib.IMAP4.abort, OSError))
        and a.started < kick_answered and a.ended > kick_sent)]
    assert not unexpected, "failed logins besides the kicked ones:\n" + describe(
        unexpected, kick_sent)
    assert any(a.landed == "node2" for a in attempts if a.started > kick_answered)

    # Draining node1 from instance 2 ends bob's sessions there in every worker of every
    # instance.
    bobs = [logged_in(proxy, pki, users, "bob") for proxy, _ in fleet for _ in range(2)]
    drain = fleet[1][1].ok("POST", "/connections/kick?destination=node1")
    assert acknowledged(drain, fleet_size), repr(drain)
    wait_until(all_closed(bobs))
    for _, admin in fleet:
        assert admin.ok("GET", "/connections?destination=node1")["connections"] == []


def test_a_ten_second_coordinator_outage(fleet: Fleet, fleet_size: int,
                                         coordinator: tuple[str, str, Bus],
                                         pki: CertificateAuthority,
                                         users: dict[str, str]) -> None:
    admin1 = fleet[0][1]
    server = coordinator[2]
    others = list(range(2, fleet_size + 1))
    for _, admin in fleet:  # instance 1 must know the others to name them
        wait_until(lambda: len(admin.ok("GET", "/cluster")["members"]) == fleet_size)

    with LoginLoop(fleet, pki, users, "alice", clients=1) as loop:
        stopped = time.monotonic()
        server.stop()
        for _, admin in fleet:
            wait_until(lambda: not bus(admin)["connected"])
        alone = admin1.ok("POST", "/cache/invalidate?identifier=bob")
        time.sleep(max(0.0, stopped + OUTAGE - time.monotonic()))
        wait_until(loop.landed_since(stopped))
        server.start()
        restarted = time.monotonic()
        for _, admin in fleet:
            wait_until(lambda: bus(admin)["connected"], timeout=20)
        for _, admin in fleet:  # each re-announces on connecting
            wait_until(lambda: lists_all_heard_since(admin, restarted, fleet_size))
        together = admin1.ok("POST", "/cache/invalidate?identifier=bob")
        wait_until(loop.landed_since(restarted))
    attempts = loop.recorded()

    assert (alone.get("applied"), alone.get("unreachable")) == (1, others), alone
    assert "laggards" not in alone
    assert acknowledged(together, fleet_size), together
    failed = [a for a in attempts if a.error is not None]
    assert not failed, "logins failed:\n" + describe(failed, stopped)
    during = {a.node_id for a in attempts if stopped < a.started and a.ended < restarted}
    assert during == set(range(1, fleet_size + 1))
