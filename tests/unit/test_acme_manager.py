"""The renewal service (SPEC §2.13) with a fake ACME order, a fake clock and a real store."""

from __future__ import annotations

import dataclasses
import datetime
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from stalroute.acme.challenges import CHALLENGES
from stalroute.acme.client import AcmeError, Challenge, Issued
from stalroute.acme.directory_store import DirectoryStore
from stalroute.acme.manager import (
    Backoff,
    CertificateManager,
    build_certificate_manager,
    decode_issued,
    encode_issued,
    local_publisher,
)
from stalroute.acme.store import SharedStore, account_key, certificate_key
from stalroute.config import parse_config

pytestmark = pytest.mark.usefixtures("acme_state")

NOW = 1_800_000_000.0
DAY = 86400.0


def make_issued(domains: Sequence[str], not_before: float, lifetime: float,
                issuer: str = "Fake ACME CA") -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    start = datetime.datetime.fromtimestamp(not_before, datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, domains[0])]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(start + datetime.timedelta(seconds=lifetime))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(d) for d in domains]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    return Issued(cert.public_bytes(serialization.Encoding.PEM),
                  key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))


def config_for(tmp_path: Path, **acme: Any):
    (tmp_path / "mappings.tsv").write_text("")
    document = {
        "server": {"state_directory": str(tmp_path / "state")},
        "routing": {"default_destination": "main"},
        "mapping": {"source": "file", "file": {"path": "mappings.tsv"}},
        "destination": {"main": {"host": "backend.test",
                                 "protocol": {"imap": {"port": 993, "tls": "implicit"}}}},
        "listener": {"imaps": {"protocol": "imap", "bind": ["127.0.0.1:0"], "tls": "implicit"}},
        "tls": {"certificate": {"mail": {"acme": "le"}}},
        "acme": {"le": {"directory": "https://acme.test/dir", "domains": ["mail.test"],
                        **acme}},
    }
    return parse_config(document, tmp_path, {})


def stored_certificate(store: SharedStore, name: str = "mail") -> Issued | None:
    """What ``store`` (answering at once) holds as the certificate ``name``."""
    found: list[bytes | None] = []
    store.get(certificate_key(name)).addCallback(found.append)
    return decode_issued(found[0]) if found[0] else None


class FakeOrder:
    """Stands for order_certificate: each call waits for the test to answer it."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, bytes, Deferred[Issued]]] = []

    def __call__(self, acme, account_pem, publish, withdraw) -> Deferred[Issued]:
        answer: Deferred[Issued] = Deferred()
        self.calls.append((acme, account_pem, answer))
        return answer


class Harness:
    def __init__(self, tmp_path: Path, **acme: Any) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.config = config_for(tmp_path, **acme)
        self.store = DirectoryStore(tmp_path / "state" / "acme", clock=self.clock.seconds)
        self.order = FakeOrder()
        self.served: list[tuple[str, Issued]] = []
        self.manager = CertificateManager(
            self.clock, self.config, self.store, lambda n, i: self.served.append((n, i)),
            order=self.order, backoff=Backoff(60, 3600))

    def stored(self) -> Issued | None:
        return stored_certificate(self.store)


def test_orders_at_start_when_nothing_is_stored_then_serves_and_stores(tmp_path, logged) -> None:
    h = Harness(tmp_path)
    h.manager.startService()
    assert len(h.order.calls) == 1
    acme, account_pem, answer = h.order.calls[0]
    assert acme.name == "le"
    stored_key: list[bytes | None] = []
    h.store.get(account_key("le")).addCallback(stored_key.append)
    assert stored_key == [account_pem] and b"PRIVATE KEY" in account_pem
    issued = make_issued(["mail.test"], NOW, 90 * DAY)
    answer.callback(issued)
    assert h.served == [("mail", issued)]
    assert h.stored() == issued
    # Next look: at two thirds of the lifetime (renew_before defaults to a third).
    assert h.manager.certificates["mail"].next_check == pytest.approx(NOW + 12 * 3600)
    h.clock.advance(60 * DAY - 1)
    assert len(h.order.calls) == 1
    h.clock.advance(1)
    assert len(h.order.calls) == 2  # renewal, with the same account key
    assert h.order.calls[1][1] == account_pem
    text = "\n".join(logged)
    assert "ordering from [acme.le] (no certificate yet)" in text
    assert "ordering from [acme.le] (due for renewal)" in text
    assert "PRIVATE KEY" not in text


def test_a_stored_current_certificate_is_served_without_ordering(tmp_path) -> None:
    h = Harness(tmp_path, renew_before="10d")
    issued = make_issued(["mail.test"], NOW - 10 * DAY, 90 * DAY)
    h.store.put(certificate_key("mail"), encode_issued(issued))
    h.manager.startService()
    assert h.served == [("mail", issued)] and h.order.calls == []
    h.clock.advance(70 * DAY - 1)  # expires at NOW + 80 d; renew 10 d before
    assert h.order.calls == []
    h.clock.advance(1)
    assert len(h.order.calls) == 1


def test_a_stored_certificate_for_other_domains_is_replaced(tmp_path) -> None:
    h = Harness(tmp_path)
    h.store.put(certificate_key("mail"), encode_issued(
        make_issued(["old.test"], NOW, 90 * DAY)))
    h.manager.startService()
    assert len(h.served) == 1  # served meanwhile
    assert len(h.order.calls) == 1


def test_failures_keep_the_current_certificate_and_back_off(tmp_path, logged) -> None:
    h = Harness(tmp_path)
    current = make_issued(["mail.test"], NOW - 80 * DAY, 90 * DAY)  # due
    h.store.put(certificate_key("mail"), encode_issued(current))
    h.manager.startService()
    assert h.served == [("mail", current)]
    delays = []
    for attempt in range(1, 9):
        assert len(h.order.calls) == attempt
        h.order.calls[-1][2].errback(AcmeError("directory and account: cannot reach the ACME "
                                               "server: ConnectionError"))
        managed = h.manager.certificates["mail"]
        assert managed.failures == attempt
        delays.append(managed.next_check - h.clock.seconds())
        h.clock.advance(delays[-1])
    assert delays == [60, 120, 240, 480, 960, 1920, 3600, 3600]
    assert h.served == [("mail", current)] and h.stored() == current
    assert "order failed (attempt 1): directory and account: cannot reach" in "\n".join(logged)
    # It works again: served, stored, the failure count reset.
    fresh = make_issued(["mail.test"], h.clock.seconds(), 90 * DAY)
    h.order.calls[-1][2].callback(fresh)
    assert h.served[-1] == ("mail", fresh) and h.stored() == fresh
    assert h.manager.certificates["mail"].failures == 0


def test_stop_cancels_the_timers_and_a_late_answer_is_still_stored(tmp_path) -> None:
    h = Harness(tmp_path)
    h.manager.startService()
    h.manager.stopService()
    issued = make_issued(["mail.test"], NOW, 90 * DAY)
    h.order.calls[0][2].callback(issued)
    assert h.stored() == issued
    assert h.clock.getDelayedCalls() == []


def test_renew_forces_an_order_and_fires_when_done(tmp_path) -> None:
    h = Harness(tmp_path)
    h.store.put(certificate_key("mail"), encode_issued(make_issued(["mail.test"], NOW,
                                                                   90 * DAY)))
    h.manager.startService()
    assert h.order.calls == []
    done = h.manager.renew("mail")
    again = h.manager.renew("mail")  # joins the running attempt
    assert len(h.order.calls) == 1 and not done.called
    h.order.calls[0][2].callback(make_issued(["mail.test"], NOW, 90 * DAY))
    assert done.called and again.called
    status = h.manager.status()[0]
    assert status["name"] == "mail" and status["issuer"] == "CN=Fake ACME CA"
    assert status["failures"] == 0 and status["renews"] is True


def test_an_unusable_stored_certificate_is_reordered(tmp_path, logged) -> None:
    h = Harness(tmp_path)
    h.store.put(certificate_key("mail"), json.dumps({"chain": "junk", "key": "junk"}).encode())
    h.manager.startService()
    assert h.served == [] and len(h.order.calls) == 1
    assert "the stored certificate is unusable" in "\n".join(logged)


def test_local_publisher_fills_and_empties_the_challenge_table() -> None:
    publish, withdraw = local_publisher()
    challenges = [Challenge("tls-alpn-01", "mail.test", "t1", "t1.k"),
                  Challenge("http-01", "mail.test", "t2", "t2.k")]
    Deferred.fromCoroutine(publish(challenges))
    assert CHALLENGES.tls_alpn01("mail.test") is not None and CHALLENGES.http01("t2") == b"t2.k"
    Deferred.fromCoroutine(withdraw(challenges))
    assert CHALLENGES.tls_alpn01("mail.test") is None and CHALLENGES.http01("t2") is None


def test_build_for_a_single_instance_with_one_or_several_workers(tmp_path) -> None:
    config = config_for(tmp_path)
    manager = build_certificate_manager(Clock(), config, print)
    assert isinstance(manager, CertificateManager) and manager.renews
    assert isinstance(manager.store, DirectoryStore) and manager.lease is None
    workers = dataclasses.replace(config, server=dataclasses.replace(config.server, workers=2))
    manager = build_certificate_manager(Clock(), workers, print)
    assert isinstance(manager, CertificateManager) and manager.renews
    none = dataclasses.replace(config, tls=dataclasses.replace(config.tls, certificates={}))
    assert build_certificate_manager(Clock(), none, print) is None
    # With a [cluster] coordinator: tests/unit/test_acme_fleet.py.


def test_acme_changes_need_a_restart(tmp_path) -> None:
    from stalroute.service import settings_needing_restart

    old = config_for(tmp_path)
    assert settings_needing_restart(old, config_for(tmp_path)) == []
    other_domains = config_for(tmp_path, domains=["imap.test"])
    assert settings_needing_restart(old, other_domains) == ["acme"]
    no_acme = dataclasses.replace(old, acme={}, tls=dataclasses.replace(old.tls, certificates={
        "mail": dataclasses.replace(old.tls.certificates["mail"], acme=None)}))
    assert settings_needing_restart(old, no_acme) == ["acme", "tls.certificate.mail.acme"]


def test_a_certificate_due_at_once_is_not_reordered_in_a_loop(tmp_path, logged) -> None:
    h = Harness(tmp_path, renew_before="100d")
    h.manager.startService()
    h.order.calls[0][2].callback(make_issued(["mail.test"], NOW, 90 * DAY))
    assert len(h.order.calls) == 1
    assert "renew_before is not shorter than its lifetime" in "\n".join(logged)
    h.clock.advance(3600)
    assert len(h.order.calls) == 2
