"""The fleet version of the renewal service (SPEC §2.11 roles, §2.13) in-process: instances
(real :class:`~stalroute.control.Control`, :class:`~stalroute.cluster.Cluster` and
:class:`~stalroute.acme.manager.CertificateManager` built by ``build_certificate_manager``)
on one Clock, joined by the in-memory bus of ``test_cluster``, sharing one store (a
:class:`~stalroute.acme.directory_store.DirectoryStore` on the Clock stands for the
coordinator's Redis or PostgreSQL), with a fake ACME order per instance.

Leases (one renewer at a time, takeover on expiry and on release), only the role holder
orders, challenge material applied by every member before the order goes on (and after the
acknowledgement timeout when one lags), an issued certificate loaded by every member, workers
getting chain and key from their supervisor, forced renewals, purge. The same against real
pebble, Redis and PostgreSQL: ``tests/integration/test_acme_fleet.py``.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from stalroute import tls as tls_module
from stalroute.acme import manager as manager_module
from stalroute.acme.challenges import CHALLENGES
from stalroute.acme.client import Challenge, Issued
from stalroute.acme.directory_store import DirectoryStore
from stalroute.acme.manager import CertificateManager, build_certificate_manager
from stalroute.acme.roles import (
    CHALLENGE_INDEX, LEASE_TTL, FleetLink, Lease, eligible, holder_name,
)
from stalroute.acme.store import certificate_key, challenge_key
from stalroute.cluster import ACK_TIMEOUT, Change, Cluster, decode_message, encode
from stalroute.config import parse_config
from stalroute.control import Control
from stalroute.runtime import build_runtime
from tests.unit.test_acme_manager import DAY, NOW, FakeOrder, make_issued, stored_certificate
from tests.unit.test_cluster import MemoryCoordinator

pytestmark = pytest.mark.usefixtures("acme_state")


def fleet_document(tmp_path: Path, node_id: int, **roles: Any) -> dict[str, Any]:
    (tmp_path / "mappings.tsv").write_text("")
    return {
        "server": {"hostname": "stalroute.test", "state_directory": str(tmp_path / "state")},
        "routing": {"default_destination": "main"},
        "mapping": {"source": "file", "file": {"path": str(tmp_path / "mappings.tsv")}},
        "destination": {"main": {"host": "backend.test",
                                 "protocol": {"imap": {"port": 993, "tls": "implicit"}}}},
        "listener": {"imaps": {"protocol": "imap", "bind": ["127.0.0.1:0"], "tls": "implicit"}},
        "tls": {"certificate": {"mail": {"acme": "le"}}},
        "acme": {"le": {"directory": "https://acme.test/dir", "domains": ["mail.test"]}},
        "cluster": {"node_id": node_id, "coordinator": "redis", "url": "redis://127.0.0.1:1",
                    "roles": roles},
    }


class Workers:
    """A stand-in for the supervisor's WorkerPool: records what it is asked to apply."""

    def __init__(self) -> None:
        self.applied: list[tuple[str, dict[str, Any]]] = []

    def apply(self, op: str, args: dict[str, Any]) -> Deferred[int]:
        self.applied.append((op, dict(args)))
        return succeed(0)

    def bus_state(self, connected: bool) -> None:
        pass

    def superseded(self, superseded: bool) -> None:
        pass


class Member:
    """One instance: runtime, Control, Cluster on the memory bus, and its renewal service
    (as ``ProxyService`` wires it), with a fake order."""

    def __init__(self, node_id: int, tmp_path: Path, clock: Clock, store: DirectoryStore,
                 bus: list[MemoryCoordinator], monkeypatch: pytest.MonkeyPatch,
                 workers: Workers | None = None, **roles: Any) -> None:
        self.node_id = node_id
        self.config = parse_config(fleet_document(tmp_path, node_id, **roles), tmp_path, {},
                                   check_files=False)
        self.clock = clock
        self.runtime = build_runtime(clock, self.config)
        self.coordinator = MemoryCoordinator(bus)
        self.cluster = Cluster(node_id, self.coordinator, clock)
        self.workers = workers
        self.proxy = SimpleNamespace(runtime=self.runtime, factories={}, reactor=clock,
                                     reload_config=list, certificates=None)
        self.control = Control(self.proxy, self.cluster, workers)  # type: ignore[arg-type]
        #: What this process applied (op, args), in order.
        self.applied: list[tuple[str, dict[str, Any]]] = []
        apply_here = self.control.apply_here

        def recording(op: str, args: Any, remote: bool = True) -> Deferred[int]:
            self.applied.append((op, dict(args)))
            return apply_here(op, args, remote)

        self.control.apply_here = recording  # type: ignore[method-assign]
        self.served: list[Issued] = []
        monkeypatch.setattr(manager_module, "shared_store_for", lambda config, reactor: store)
        link = FleetLink(change=self.control.change, token=self.cluster.token,
                         bus_ready=lambda: self.cluster.connected,
                         apply_locally=self.control.apply_in_instance)
        manager = build_certificate_manager(clock, self.config, self._serve, link)
        assert isinstance(manager, CertificateManager)
        self.manager = manager
        self.order = FakeOrder()
        manager._order = self.order
        self.proxy.certificates = manager

    def _serve(self, name: str, issued: Issued) -> Deferred[int] | None:
        self.served.append(issued)
        self.runtime.server_tls.install(name, issued.chain_pem, issued.key_pem)
        if self.workers is None:
            return None
        return self.workers.apply("certificate_install", {
            "name": name, "chain": issued.chain_pem.decode(), "key": issued.key_pem.decode()})

    def start(self) -> Member:
        self.cluster.start()
        self.manager.startService()
        return self

    def crash(self) -> None:
        """Gone without a word: its lease is not released, it leaves the bus."""
        for lease in (self.manager.lease, self.manager.purger and self.manager.purger.lease):
            if lease is not None and lease._loop.running:
                lease._loop.stop()
        self.manager.running = False
        self.coordinator.set_connected(False)
        self.coordinator._bus.remove(self.coordinator)

    def ops(self, op: str) -> list[dict[str, Any]]:
        return [args for name, args in self.applied if name == op]


class Fleet:
    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.tmp_path = tmp_path
        self.monkeypatch = monkeypatch
        self.clock = Clock()
        self.clock.advance(NOW)
        self.store = DirectoryStore(tmp_path / "shared", clock=self.clock.seconds)
        self.bus: list[MemoryCoordinator] = []

    def member(self, node_id: int, workers: Workers | None = None, **roles: Any) -> Member:
        directory = self.tmp_path / f"node{node_id}-{len(self.bus)}"
        directory.mkdir()
        return Member(node_id, directory, self.clock, self.store, self.bus, self.monkeypatch,
                      workers, **roles)

    def stored(self) -> Issued | None:
        return stored_certificate(self.store)


@pytest.fixture
def fleet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Fleet:
    return Fleet(tmp_path, monkeypatch)


def fired(deferred: Deferred[Any]) -> bool:
    done: list[Any] = []
    deferred.addBoth(done.append)
    return bool(done)


def tls_alpn(domain: str = "mail.test", token: str = "tok") -> Challenge:
    return Challenge("tls-alpn-01", domain, token, f"{token}.thumbprint")


# --- roles ---------------------------------------------------------------------------------------


def test_who_may_perform_a_task(tmp_path: Path) -> None:
    def config(**roles: Any) -> Any:
        return parse_config(fleet_document(tmp_path, 2, **roles), tmp_path, {},
                            check_files=False)

    assert eligible(config(), "acme_renew") and eligible(config(), "purge")  # empty: any node
    assert eligible(config(acme_renew=[2, 3]), "acme_renew")
    assert not eligible(config(acme_renew=[1]), "acme_renew")
    assert eligible(config(acme_renew=[1]), "purge")
    assert not eligible(config(purge=[3]), "purge")
    alone = parse_config({**fleet_document(tmp_path, 2, acme_renew=[1]), "cluster": {}},
                         tmp_path, {}, check_files=False)
    assert eligible(alone, "acme_renew")  # no coordinator: the single instance does all


def test_only_the_listed_node_orders_and_the_others_install_what_it_issued(
        fleet: Fleet, logged: list[str]) -> None:
    one, two, three = (fleet.member(n, acme_renew=[2]).start() for n in (1, 2, 3))
    assert [m.manager.renews for m in (one, two, three)] == [False, True, False]
    assert one.manager.lease is None and three.manager.lease is None  # not eligible
    assert two.manager.lease is not None and two.manager.lease.held
    assert (len(one.order.calls), len(two.order.calls), len(three.order.calls)) == (0, 1, 0)
    assert [row["renews"] for m in (one, two, three) for row in m.manager.status()] == [
        False, True, False]
    assert two.manager.status()[0]["renewers"] == [2]

    issued = make_issued(["mail.test"], NOW, 90 * DAY)
    two.order.calls[0][2].callback(issued)
    assert fleet.stored() == issued
    for member in (one, two, three):
        assert member.served == [issued]
        assert member.manager.certificates["mail"].current == issued
    # Told once through the bus: the others applied certificate_issued, two did not load again.
    assert one.ops("certificate_issued") == [{"name": "mail"}] == three.ops("certificate_issued")
    assert two.cluster.stats()["acks_heard"] >= 2
    # The others never order, however long they run, and keep polling the store.
    fleet.clock.advance(120 * DAY)
    assert (len(one.order.calls), len(three.order.calls)) == (0, 0)
    assert len(two.order.calls) == 2  # its renewal, at two thirds of the lifetime
    assert "PRIVATE KEY" not in "\n".join(logged)


def test_a_non_renewing_member_loads_what_it_missed_from_the_store(fleet: Fleet) -> None:
    one = fleet.member(1, acme_renew=[2]).start()
    issued = make_issued(["mail.test"], NOW, 90 * DAY)
    fleet.store.put(certificate_key("mail"), manager_module.encode_issued(issued))
    assert one.served == []  # no change came: the bus missed it
    fleet.clock.advance(manager_module.STORE_POLL)
    assert one.served == [issued]
    # A member started later serves the stored one at once.
    three = fleet.member(3, acme_renew=[2]).start()
    assert three.served == [issued] and three.order.calls == []


def test_one_renewer_at_a_time_and_another_takes_over_when_its_lease_expires(
        fleet: Fleet, logged: list[str]) -> None:
    two = fleet.member(2, acme_renew=[2, 3]).start()
    three = fleet.member(3, acme_renew=[2, 3]).start()
    assert two.manager.renews and not three.manager.renews
    assert len(two.order.calls) == 1 and three.order.calls == []
    fleet.clock.advance(LEASE_TTL * 2)  # renewed every ttl/3: two keeps it
    assert two.manager.renews and not three.manager.renews and three.order.calls == []

    two.crash()  # its lease is not released: three waits for it to expire
    fleet.clock.advance(LEASE_TTL / 3)
    assert not three.manager.renews
    fleet.clock.advance(LEASE_TTL)
    assert three.manager.renews and three.manager.status()[0]["renews"] is True
    assert len(three.order.calls) == 1  # nothing was stored: it orders
    text = "\n".join(logged)
    assert f"took the acme_renew lease ({holder_name(3, three.cluster.token)})" in text


def test_a_stopped_renewer_releases_its_lease_and_the_next_loads_before_ordering(
        fleet: Fleet) -> None:
    two = fleet.member(2).start()  # no acme_renew list: every node is eligible
    three = fleet.member(3).start()
    assert two.manager.renews and not three.manager.renews
    issued = make_issued(["mail.test"], NOW, 90 * DAY)
    two.order.calls[0][2].callback(issued)
    assert three.served == [issued]

    stopped = two.manager.stopService()
    assert fired(stopped) and not two.manager.renews
    fleet.clock.advance(LEASE_TTL / 3)  # three's next try
    assert three.manager.renews
    assert three.order.calls == []  # the stored certificate is current
    fleet.clock.advance(60 * DAY)
    assert len(three.order.calls) == 1 and len(two.order.calls) == 1


def test_losing_the_lease_stops_the_renewal_timers(fleet: Fleet) -> None:
    two = fleet.member(2).start()
    two.order.calls[0][2].callback(make_issued(["mail.test"], NOW, 90 * DAY))
    assert two.manager.certificates["mail"].timer is not None
    lease = two.manager.lease
    assert lease is not None
    # Someone else holds it (two's expired while the store could not be reached).
    fleet.store.release_lease("acme_renew", lease.holder)
    fleet.store.acquire_lease("acme_renew", "node 9 process x", LEASE_TTL)
    fleet.clock.advance(LEASE_TTL / 3)
    assert not two.manager.renews
    assert two.manager.certificates["mail"].timer is None
    fleet.clock.advance(LEASE_TTL)  # node 9 never renewed its lease: two takes it back
    assert two.manager.renews and two.manager.certificates["mail"].timer is not None
    assert len(two.order.calls) == 1  # the stored certificate is current


# --- challenges ----------------------------------------------------------------------------------


def test_challenge_material_reaches_every_member_before_the_order_answers(
        fleet: Fleet) -> None:
    one, two, three = (fleet.member(n, acme_renew=[2]).start() for n in (1, 2, 3))
    assert len(two.order.calls) == 1  # its order awaits the challenge below
    challenge = tls_alpn()
    published = Deferred.fromCoroutine(two.manager._publish([challenge]))
    assert fired(published)  # every member acknowledged at once
    args = {"kind": "tls-alpn-01", "domain": "mail.test", "challenge_token": "tok",
            "key_authorization": "tok.thumbprint"}
    for member in (one, two, three):
        assert member.ops("acme_challenge") == [args]
    assert CHALLENGES.tls_alpn01("mail.test") is not None
    # Stored with a ttl, and listed, for an instance that starts meanwhile.
    found: list[bytes | None] = []
    fleet.store.get(challenge_key("tok")).addCallback(found.append)
    fleet.store.get(CHALLENGE_INDEX).addCallback(found.append)
    assert found[0] is not None and found[1] == b'["tok"]'
    late = fleet.member(4, acme_renew=[2]).start()
    assert late.ops("acme_challenge") == [args]

    withdrawn = Deferred.fromCoroutine(two.manager._withdraw([challenge]))
    assert fired(withdrawn)
    for member in (one, two, three, late):
        assert member.ops("acme_challenge_withdraw") == [
            {"kind": "tls-alpn-01", "domain": "mail.test", "challenge_token": "tok"}]
    assert CHALLENGES.tls_alpn01("mail.test") is None
    found.clear()
    fleet.store.get(challenge_key("tok")).addCallback(found.append)
    fleet.store.get(CHALLENGE_INDEX).addCallback(found.append)
    assert found == [None, None]
    # The stored material expires by itself too, and purge removes it.
    Deferred.fromCoroutine(two.manager._publish([tls_alpn(token="t2")]))
    fleet.clock.advance(3600)
    purged: list[int] = []
    fleet.store.purge().addCallback(purged.append)
    assert purged == [0]  # the purge holder already did: it runs every 10 minutes


def test_a_lagging_member_delays_the_answer_by_the_ack_timeout_at_most(
        fleet: Fleet, logged: list[str]) -> None:
    one, two = fleet.member(1, acme_renew=[2]).start(), fleet.member(2, acme_renew=[2]).start()
    # One no longer hears the bus, but two still counts it as a live member.
    one.coordinator.connected = False
    published = Deferred.fromCoroutine(two.manager._publish([tls_alpn()]))
    assert not fired(published)
    fleet.clock.advance(ACK_TIMEOUT)
    assert fired(published)
    assert one.ops("acme_challenge") == []
    assert "acme: acme_challenge for mail.test: node 1 did not acknowledge it; going on" in (
        "\n".join(logged))


def test_publishing_waits_for_the_bus_first(fleet: Fleet) -> None:
    two = fleet.member(2).start()
    two.coordinator.set_connected(False)
    published = Deferred.fromCoroutine(two.manager._publish([tls_alpn()]))
    fleet.clock.advance(1)
    assert not fired(published) and two.ops("acme_challenge") == []
    two.coordinator.set_connected(True)
    fleet.clock.advance(0.1)
    assert fired(published) and two.ops("acme_challenge") != []


def test_acme_changes_survive_the_bus_encoding() -> None:
    for op, args in [("acme_challenge", {"kind": "http-01", "domain": "mail.test",
                                         "challenge_token": "t", "key_authorization": "t.k"}),
                     ("acme_challenge_withdraw", {"kind": "http-01", "domain": "mail.test",
                                                  "challenge_token": "t"}),
                     ("certificate_issued", {"name": "mail"}),
                     ("certificate_renew", {"name": "mail"})]:
        change = Change(1, "t1", 1, op, args)
        assert decode_message(encode(change)) == change
    # Keys never travel on the bus: certificate_install is for a supervisor's workers only.
    with pytest.raises(ValueError, match="unknown op"):
        decode_message(encode(Change(1, "t1", 1, "certificate_install",
                                     {"name": "mail", "chain": "x", "key": "y"})))


# --- workers and forced renewals ------------------------------------------------------------------


def test_a_supervisor_hands_the_certificate_and_the_challenges_to_its_workers(
        fleet: Fleet) -> None:
    workers = Workers()
    one = fleet.member(1, workers=workers, acme_renew=[2]).start()
    two = fleet.member(2, acme_renew=[2]).start()
    Deferred.fromCoroutine(two.manager._publish([tls_alpn()]))
    assert [op for op, _ in workers.applied] == ["acme_challenge"]
    issued = make_issued(["mail.test"], NOW, 90 * DAY)
    two.order.calls[0][2].callback(issued)
    ops = [op for op, _ in workers.applied]
    assert ops == ["acme_challenge", "certificate_install", "certificate_issued"]
    install = workers.applied[1][1]
    assert install == {"name": "mail", "chain": issued.chain_pem.decode(),
                       "key": issued.key_pem.decode()}
    assert one.served == [issued]

    # What a worker does with it: its own Control, without a renewal service.
    config = one.config
    runtime = build_runtime(fleet.clock, config)
    worker = Control(SimpleNamespace(runtime=runtime, factories={},  # type: ignore[arg-type]
                                     reactor=fleet.clock, reload_config=list),
                     Cluster(1, None, fleet.clock))
    tls_module.ISSUED.clear()
    assert fired(worker.apply_here("certificate_install", install))
    assert tls_module.ISSUED["mail"] == (issued.chain_pem, issued.key_pem)
    assert runtime.server_tls.context_for(b"mail.test") is not None
    # certificate_issued and certificate_renew are nothing to a worker.
    assert fired(worker.apply_here("certificate_issued", {"name": "mail"}))
    assert fired(worker.apply_here("certificate_renew", {"name": "mail"}))


def test_a_forced_renewal_is_performed_by_the_renewing_member_only(fleet: Fleet) -> None:
    one, two = fleet.member(1, acme_renew=[2]).start(), fleet.member(2, acme_renew=[2]).start()
    two.order.calls[0][2].callback(make_issued(["mail.test"], NOW, 90 * DAY))
    # The admin API of instance 1 publishes certificate_renew (Control.renew_certificate).
    done = one.control.change("certificate_renew", name="mail")
    assert fired(done)
    assert one.order.calls == [] and len(two.order.calls) == 2
    # An unknown name is ignored everywhere.
    assert fired(one.control.change("certificate_renew", name="nope"))
    assert len(two.order.calls) == 2


# --- purge ---------------------------------------------------------------------------------------


def test_the_purge_holder_purges_every_ten_minutes(fleet: Fleet, logged: list[str]) -> None:
    one = fleet.member(1, acme_renew=[2], purge=[1, 3]).start()
    two = fleet.member(2, acme_renew=[2], purge=[1, 3]).start()
    three = fleet.member(3, acme_renew=[2], purge=[1, 3]).start()
    assert two.manager.purger is None  # not listed
    assert one.manager.purger is not None and one.manager.purger.active
    assert three.manager.purger is not None and not three.manager.purger.active
    assert one.manager.purger.purges == 1  # at once on taking the lease
    fleet.store.put("acme/challenge/old", b"x", ttl=5)
    fleet.clock.advance(600)
    assert one.manager.purger.purges == 2 and three.manager.purger.purges == 0
    assert "acme: purge removed 1 expired entries from the shared store" in "\n".join(logged)
    one.crash()
    fleet.clock.advance(LEASE_TTL + LEASE_TTL / 3)
    assert three.manager.purger.active and three.manager.purger.purges == 1


def test_a_lease_that_cannot_be_renewed_is_given_up_once_expired(
        fleet: Fleet, logged: list[str]) -> None:
    lease = Lease(fleet.clock, fleet.store, "acme_renew", "me")
    changes: list[bool] = []
    lease.on_change = changes.append
    lease.start()
    assert changes == [True]

    def down(*args: Any) -> Deferred[bool]:
        return Deferred.fromCoroutine(_raise())

    async def _raise() -> bool:
        raise ConnectionError("store down")

    fleet.monkeypatch.setattr(fleet.store, "acquire_lease", down)
    fleet.clock.advance(LEASE_TTL / 3)
    assert changes == [True] and lease.held  # still valid for 20 s
    fleet.clock.advance(LEASE_TTL / 3)
    assert lease.held
    fleet.clock.advance(LEASE_TTL / 3)
    assert changes == [True, False] and not lease.held
    text = "\n".join(logged)
    assert "still held for" in text and "given up" in text


def test_the_order_answers_only_after_every_member_applied_the_material(
        fleet: Fleet) -> None:
    """The order flow (``order_certificate``) awaits ``publish`` before it answers the
    challenge: stand-in for it, an order that records who had the material at that moment."""
    one = fleet.member(1, acme_renew=[2]).start()
    three = fleet.member(3, acme_renew=[2]).start()
    two = fleet.member(2, acme_renew=[2])
    two.cluster.start()  # it hears one and three
    three.coordinator.connected = False  # then three lags: two waits for the ack timeout
    seen: list[tuple[float, list[int]]] = []
    issued = make_issued(["mail.test"], NOW, 90 * DAY)

    async def order(acme: Any, account: bytes, publish: Any, withdraw: Any) -> Issued:
        challenge = tls_alpn()
        await publish([challenge])
        seen.append((fleet.clock.seconds(),
                     [m.node_id for m in (one, two, three) if m.ops("acme_challenge")]))
        await withdraw([challenge])
        return issued

    two.manager._order = lambda *args: Deferred.fromCoroutine(order(*args))
    two.manager.startService()
    assert seen == []  # three has not acknowledged yet
    fleet.clock.advance(ACK_TIMEOUT)
    assert seen == [(NOW + ACK_TIMEOUT, [1, 2])]
    fleet.clock.advance(ACK_TIMEOUT)  # the withdrawal waits for three too
    assert one.served == [issued] and two.served == [issued]
    three.coordinator.connected = True
    fleet.clock.advance(manager_module.STORE_POLL)
    assert three.served == [issued]  # from the store, the change was missed
