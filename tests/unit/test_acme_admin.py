"""Certificates on the admin side (SPEC §2.13, §8, §10): ``GET /certificates``,
``POST /certificates/renew``, the certificate metrics and ``stalroute ctl certificates``,
in-process: a runtime serving a file certificate and an ``acme =`` one, a real
:class:`~stalroute.acme.manager.CertificateManager` whose ACME orders the test answers, on a
:class:`~twisted.internet.task.Clock`. The same against pebble and a real proxy is in
``tests/integration/test_acme_admin.py``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from cryptography import x509
from OpenSSL import SSL
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.web.test.requesthelper import DummyChannel

from stalroute.acme.client import AcmeError
from stalroute.acme.directory_store import DirectoryStore
from stalroute.acme.manager import Backoff, CertificateManager
from stalroute.admin.app import AdminAPI
from stalroute.admin.auth import Lockout
from stalroute.admin.openapi import SPEC
from stalroute.admin.server import AdminRequest, AdminSite, AdminTLS
from stalroute.config import parse_config
from stalroute.control import Control
from stalroute.ctl import client, commands
from stalroute.cli import _build_parser
from stalroute.runtime import build_runtime
from tests.harness.pki import CertificateAuthority
from tests.unit.test_acme_manager import DAY, NOW, FakeOrder, make_issued
from tests.unit.test_admin_app import AUTH, MemoryStore, Response

pytestmark = pytest.mark.usefixtures("acme_state")


def config_document(tmp_path: Path, pki: CertificateAuthority, **cluster: Any) -> dict[str, Any]:
    (tmp_path / "mappings.tsv").write_text("")
    issued = pki.issue("admin-file", ["stalroute.test"], ["127.0.0.1"])
    document: dict[str, Any] = {
        "server": {"hostname": "stalroute.test", "state_directory": str(tmp_path / "state")},
        "routing": {"default_destination": "main"},
        "mapping": {"source": "file", "file": {"path": "mappings.tsv"}},
        "destination": {"main": {"host": "backend.test",
                                 "protocol": {"imap": {"port": 993, "tls": "implicit"}}}},
        "listener": {"imaps": {"protocol": "imap", "bind": ["127.0.0.1:0"], "tls": "implicit"}},
        "tls": {"certificate": {
            "main": {"cert": str(issued.cert_path), "key": str(issued.key_path),
                     "default": True},
            "mail": {"acme": "le"}}},
        "acme": {"le": {"directory": "https://acme.test/dir", "domains": ["mail.test"]}},
        "admin": {"bind": "127.0.0.1:0", "bearer_token": AUTH[b"Authorization"][7:].decode()},
    }
    if cluster:
        document["cluster"] = cluster
    return document


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority(tmp_path_factory.mktemp("pki"))


class Harness:
    """An AdminAPI over a runtime with a file and an acme certificate, and the manager."""

    def __init__(self, tmp_path: Path, pki: CertificateAuthority,
                 with_manager: bool = True) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.config = parse_config(config_document(tmp_path, pki), tmp_path, {})
        self.runtime = build_runtime(self.clock, self.config)
        self.runtime.router.store = MemoryStore()
        self.order = FakeOrder()
        self.manager = CertificateManager(
            self.clock, self.config, DirectoryStore(tmp_path / "state" / "acme",
                                                    clock=self.clock.seconds),
            lambda name, issued: self.service.runtime.server_tls.install(
                name, issued.chain_pem, issued.key_pem),
            order=self.order, backoff=Backoff(60, 3600))
        self.service = SimpleNamespace(runtime=self.runtime, factories={}, reactor=self.clock,
                                       reload_config=lambda: [])
        if with_manager:
            self.service.certificates = self.manager
        self.control = Control(self.service)
        self.api = AdminAPI(self.control, clock=self.clock, token=AUTH[b"Authorization"][7:]
                            .decode(), lockout=Lockout(self.clock, 3, 60.0))
        self.site = AdminSite(self.api)

    def send(self, method: str, uri: str) -> tuple[Any, DummyChannel]:
        channel = DummyChannel(peer=IPv4Address("TCP", "10.0.0.1", 40000))
        channel.site = self.site
        request = AdminRequest(channel)
        for name, value in AUTH.items():
            request.requestHeaders.addRawHeader(name, value)
        request.gotLength(0)
        request.requestReceived(method.encode(), uri.encode(), b"HTTP/1.0")
        return request, channel

    def answer(self, sent: tuple[Any, DummyChannel]) -> Response:
        request, channel = sent
        for _ in range(100):
            if request.finished:
                break
            self.clock.advance(0)
        assert request.finished, "the request did not finish"
        return Response(channel.transport.written.getvalue(), request)

    def request(self, method: str, uri: str) -> Response:
        return self.answer(self.send(method, uri))

    def issue(self, issuer: str = "Fake ACME CA") -> Any:
        """Answer the pending order with a 90-day certificate for mail.test."""
        issued = make_issued(["mail.test"], self.clock.seconds(), 90 * DAY, issuer)
        self.order.calls[-1][2].callback(issued)
        return x509.load_pem_x509_certificate(issued.chain_pem)

    def listed(self, name: str) -> dict[str, Any]:
        rows = self.request("GET", "/certificates").json()["certificates"]
        return next(row for row in rows if row["name"] == name)


@pytest.fixture
def h(tmp_path: Path, pki: CertificateAuthority) -> Iterator[Harness]:
    harness = Harness(tmp_path, pki)
    yield harness
    harness.manager.stopService()


# --- GET /certificates ---------------------------------------------------------------------


def test_lists_the_file_certificate_and_the_acme_placeholder(h: Harness,
                                                             pki: CertificateAuthority) -> None:
    answer = h.request("GET", "/certificates").json()
    assert answer["node_id"] == 1
    main, mail = answer["certificates"]
    served = h.runtime.server_tls.leaves["main"]
    assert main == {
        "name": "main", "source": "file", "default": True, "subjects": ["stalroute.test"],
        "issuer": served.issuer.rfc4514_string(), "issuer_cn": "stalroute test CA",
        "self_signed": False, "serial": f"{served.serial_number:x}",
        "not_before": served.not_valid_before_utc.isoformat(),
        "not_after": served.not_valid_after_utc.isoformat(),
        "expires_in": pytest.approx(served.not_valid_after_utc.timestamp() - NOW),
        "cert": main["cert"]}
    assert main["cert"].endswith("admin-file.pem")
    assert mail["source"] == "acme:le" and mail["self_signed"] is True
    assert mail["subjects"] == ["mail.test"] and mail["issuer_cn"] == "mail.test"
    assert mail["renews"] == {"here": True, "nodes": None}  # a single instance renews
    assert (mail["domains"], mail["failures"], mail["last_error"]) == (["mail.test"], 0, None)


def test_an_issued_certificate_is_listed_as_served(h: Harness) -> None:
    h.manager.startService()  # nothing stored: orders at once
    leaf = h.issue()
    mail = h.listed("mail")
    assert mail["serial"] == f"{leaf.serial_number:x}" == \
        f"{h.runtime.server_tls.leaves['mail'].serial_number:x}"
    assert (mail["issuer_cn"], mail["self_signed"]) == ("Fake ACME CA", False)
    assert mail["expires_in"] == pytest.approx(90 * DAY)
    assert mail["next_check"] is not None


def test_without_a_renewal_service_acme_entries_are_still_listed(
        tmp_path: Path, pki: CertificateAuthority) -> None:
    h = Harness(tmp_path, pki, with_manager=False)
    mail = h.listed("mail")
    assert mail["self_signed"] is True and mail["failures"] is None
    assert mail["domains"] == ["mail.test"]


@pytest.mark.parametrize(("cluster", "here", "renews"), [
    ({"coordinator": "redis", "url": "redis://127.0.0.1:1/0", "node_id": 2,
      "roles": {"acme_renew": [2]}}, True, {"here": True, "nodes": [2]}),
    ({"coordinator": "redis", "url": "redis://127.0.0.1:1/0", "node_id": 1,
      "roles": {"acme_renew": [2, 3]}}, None, {"here": False, "nodes": [2, 3]}),
    ({"coordinator": "redis", "url": "redis://127.0.0.1:1/0", "node_id": 1}, None,
     {"here": True, "nodes": []}),
    ({"coordinator": "redis", "url": "redis://127.0.0.1:1/0", "node_id": 2,
      "roles": {"acme_renew": [2]}}, False, {"here": False, "nodes": [2]}),  # the manager says
])
def test_who_renews_follows_the_roles(tmp_path: Path, pki: CertificateAuthority,
                                      cluster: dict[str, Any], here: bool | None,
                                      renews: dict[str, Any]) -> None:
    config = parse_config(config_document(tmp_path, pki, **cluster), tmp_path, {})
    service = SimpleNamespace(runtime=build_runtime(Clock(), config), reactor=Clock(),
                              factories={})
    if here is not None:
        service.certificates = SimpleNamespace(status=lambda: [
            {"name": "mail", "renews": here, "failures": 0, "last_error": None,
             "next_check": None, "domains": ["mail.test"]}])
    rows = Control(service).certificates()
    assert rows[1]["renews"] == renews and "renews" not in rows[0]


# --- POST /certificates/renew -----------------------------------------------------------


def test_renew_orders_at_once_and_the_listing_shows_the_new_certificate(h: Harness) -> None:
    h.manager.startService()
    first = h.issue()
    answer = h.request("POST", "/certificates/renew?name=mail")
    assert answer.status == 200, answer.body
    body = answer.json()
    # The answer does not wait for the order: it shows what is served meanwhile.
    assert (body["name"], body["requested"]) == ("mail", True)
    assert body["certificate"]["serial"] == f"{first.serial_number:x}"
    assert "applied" not in body  # no coordinator: no fleet acknowledgement
    assert len(h.order.calls) == 2  # ordered at once, though not due for 60 days
    second = h.issue()
    assert h.listed("mail")["serial"] == f"{second.serial_number:x}"
    assert h.runtime.server_tls.leaves["mail"].serial_number == second.serial_number


def test_a_failed_renewal_keeps_the_certificate_and_says_why(h: Harness) -> None:
    h.manager.startService()
    current = h.issue()
    assert h.request("POST", "/certificates/renew?name=mail").status == 200
    h.order.calls[-1][2].errback(AcmeError("directory and account: cannot reach the ACME "
                                           "server: ConnectionRefusedError"))
    mail = h.listed("mail")
    assert mail["serial"] == f"{current.serial_number:x}" and mail["failures"] == 1
    assert "cannot reach the ACME server" in mail["last_error"]
    assert h.runtime.server_tls.leaves["mail"].serial_number == current.serial_number


@pytest.mark.parametrize(("uri", "status", "error"), [
    ("/certificates/renew", 400, "missing parameter: name"),
    ("/certificates/renew?name=nope", 404, "no certificate named 'nope'"),
    ("/certificates/renew?name=main", 400, "certificate 'main' is read from files"),
])
def test_renew_refusals(h: Harness, uri: str, status: int, error: str) -> None:
    answer = h.request("POST", uri)
    assert answer.status == status
    assert answer.json()["error"].startswith(error)
    assert h.order.calls == []
    if status == 404:
        assert answer.json()["certificates"] == ["mail", "main"]


def test_renew_is_one_change_of_the_fleet(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """What goes out is the change ``certificate_renew`` {name}, answered like every write."""
    changes: list[tuple[str, dict[str, Any]]] = []

    def change(op: str, **args: Any) -> Deferred[Any]:
        changes.append((op, args))
        return succeed(SimpleNamespace(count=0, fields=lambda: {"applied": 3, "members": 3}))

    monkeypatch.setattr(h.control, "change", change)
    body = h.request("POST", "/certificates/renew?name=mail").json()
    assert changes == [("certificate_renew", {"name": "mail"})]
    assert (body["applied"], body["members"]) == (3, 3)


# --- metrics -----------------------------------------------------------------------------


def samples(h: Harness) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = h.request("GET", "/metrics").body.decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_expiry_and_failures_are_exported_per_certificate(h: Harness) -> None:
    main = h.runtime.server_tls.leaves["main"]
    h.manager.startService()
    h.issue()
    h.clock.advance(DAY)
    found = samples(h)
    assert found[("stalroute_certificate_expiry_seconds", (("name", "mail"),))] == \
        pytest.approx(89 * DAY)
    assert found[("stalroute_certificate_expiry_seconds", (("name", "main"),))] == \
        pytest.approx(main.not_valid_after_utc.timestamp() - NOW - DAY)
    assert found[("stalroute_certificate_renewal_failures", (("name", "mail"),))] == 0
    assert ("stalroute_certificate_renewal_failures", (("name", "main"),)) not in found

    h.manager.renew("mail")
    h.order.calls[-1][2].errback(AcmeError("unreachable"))
    found = samples(h)
    assert found[("stalroute_certificate_renewal_failures", (("name", "mail"),))] == 1
    assert found[("stalroute_certificate_expiry_seconds", (("name", "mail"),))] == \
        pytest.approx(89 * DAY)


# --- stalroute ctl certificates ------------------------------------------------------------


def parse(*argv: str) -> argparse.Namespace:
    return _build_parser().parse_args(["ctl", *argv])


@pytest.mark.parametrize("argv", [["certificates"], ["certificates", "list"]])
def test_ctl_certificates_parses(argv: list[str]) -> None:
    action = parse(*argv).ctl_action
    assert isinstance(action, commands.Request)
    assert (action.method, action.path, action.params) == ("GET", "/certificates", ())
    args = parse("certificates", "renew", "mail", "--wait", "30")
    assert (args.ctl_action, args.name, args.wait) == (commands.cmd_certificates_renew, "mail",
                                                       30.0)
    assert parse("certificates", "renew", "mail").wait is None


class Answering:
    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        self.calls: list[tuple[str, str, Any]] = []

    def call(self, method: str, path: str, params: Any = None,
             accept: tuple[int, ...] = ()) -> tuple[int, dict[str, Any]]:
        self.calls.append((method, path, params))
        return 200, self.document


def test_ctl_certificates_table(h: Harness, capsys: pytest.CaptureFixture[str]) -> None:
    h.manager.startService()
    leaf = h.issue(issuer="Pebble Intermediate CA 1a2b3c")
    document = h.request("GET", "/certificates").json()
    args = parse("certificates")
    assert args.ctl_action(Answering(document), args) == client.EXIT_OK
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "SOURCE", "ISSUER", "EXPIRES", "(UTC)", "DAYS", "LEFT",
                                "SERIAL", "RENEWS"]
    main, mail = lines[1], lines[2]
    assert main.split()[:4] == ["main", "file", "stalroute", "test"]
    # nobody renews it (columns are padded to the longest serial: compare the fields)
    assert main.split()[-2:] == [document["certificates"][0]["serial"], "-"]
    expires = leaf.not_valid_after_utc.strftime("%Y-%m-%d %H:%M")
    assert f"Pebble Intermediate CA 1a2b3c  {expires}" in mail
    assert mail.split()[-4:] == ["90", f"{leaf.serial_number:x}", "this", "instance"]
    assert lines[-1] == "(as served by node 1)"

    args = parse("certificates", "--json")
    args.ctl_action(Answering(document), args)
    assert json.loads(capsys.readouterr().out) == document


def test_ctl_shows_placeholders_and_failures(capsys: pytest.CaptureFixture[str]) -> None:
    document = {"certificates": [{
        "name": "mail", "source": "acme:le", "issuer_cn": "mail.test", "self_signed": True,
        "serial": "1f", "not_after": "2027-12-06T10:00:00+00:00", "expires_in": 3 * DAY + 5,
        "renews": {"here": False, "nodes": [2, 3]}, "failures": 2,
        "last_error": "directory and account: cannot reach the ACME server",
        "next_check": "2026-12-06T14:00:00+00:00"}]}
    args = parse("certificates", "list")
    args.ctl_action(Answering(document), args)
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["mail", "acme:le", "mail.test", "(placeholder)", "2027-12-06",
                                "10:00", "3", "1f", "nodes", "2,3"]
    assert lines[2] == ("mail: 2 failed renewal attempts, last: directory and account: cannot "
                        "reach the ACME server; next attempt 2026-12-06 14:00:00 UTC")


@pytest.mark.parametrize(("renews", "shown"), [
    ({"here": True, "nodes": None}, "this instance"),
    ({"here": True, "nodes": [2]}, "node 2 (here)"),
    ({"here": False, "nodes": [2]}, "node 2"),
    ({"here": True, "nodes": []}, "any node (here)"),
    (None, None),
])
def test_who_renews_in_words(renews: dict[str, Any] | None, shown: str | None) -> None:
    assert commands.describe_renewer({"renews": renews}) == shown


class Renewing:
    """The admin API of a proxy renewing ``mail``: the POST's answer, then the listings that
    follow it (the last one repeats)."""

    def __init__(self, answer: dict[str, Any], *listings: dict[str, Any]) -> None:
        self.answer, self.listings = answer, list(listings)
        self.calls: list[tuple[str, str, Any]] = []

    def call(self, method: str, path: str, params: Any = None,
             accept: tuple[int, ...] = ()) -> tuple[int, dict[str, Any]]:
        self.calls.append((method, path, params))
        if method == "POST":
            return 200, self.answer
        listing = self.listings.pop(0) if len(self.listings) > 1 else self.listings[0]
        return 200, {"certificates": [listing]}


def test_ctl_renew(h: Harness, capsys: pytest.CaptureFixture[str],
                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(commands, "RENEW_POLL", 0)
    h.manager.startService()
    first = h.issue()
    answer = {**h.request("POST", "/certificates/renew?name=mail").json(), "applied": 2,
              "members": 2}
    before = h.listed("mail")
    second = h.issue()
    after = h.listed("mail")
    expires = first.not_valid_after_utc.strftime("%Y-%m-%d %H:%M")

    args = parse("certificates", "renew", "mail")
    api = Renewing(answer)
    assert args.ctl_action(api, args) == client.EXIT_OK
    assert api.calls == [("POST", "/certificates/renew", {"name": "mail"})]
    assert capsys.readouterr().out.splitlines() == [
        f"renewal of certificate mail requested; serving serial {first.serial_number:x} "
        f"from Fake ACME CA, until {expires} UTC meanwhile",
        "(`stalroute ctl certificates` shows the new serial, or the failure)",
        "applied by 2 of 2 members"]

    args = parse("certificates", "renew", "mail", "--wait", "5")
    api = Renewing(answer, before, before, after)
    assert args.ctl_action(api, args) == client.EXIT_OK
    assert [call[1] for call in api.calls] == ["/certificates/renew"] + ["/certificates"] * 3
    assert capsys.readouterr().out.splitlines()[0] == (
        f"certificate mail renewed: now serving serial {second.serial_number:x} from Fake ACME "
        f"CA, until {second.not_valid_after_utc.strftime('%Y-%m-%d %H:%M')} UTC")

    failed = {**before, "failures": 1, "last_error": "timed out"}
    api = Renewing(answer, before, failed)
    args = parse("certificates", "renew", "mail", "--wait", "5", "--json")
    assert args.ctl_action(api, args) == client.EXIT_API
    printed = json.loads(capsys.readouterr().out)
    assert printed["renewed"] is False and printed["certificate"]["last_error"] == "timed out"

    args = parse("certificates", "renew", "mail", "--wait", "0.01")
    with pytest.raises(client.CtlError, match="no new certificate and no failure within"):
        args.ctl_action(Renewing(answer, before), args)
    with pytest.raises(client.CtlError, match="--wait must be a positive"):
        args.ctl_action(Renewing(answer, before), parse("certificates", "renew", "x",
                                                        "--wait", "0"))


def test_the_openapi_document_describes_the_certificate_endpoints() -> None:
    renew = SPEC["paths"]["/certificates/renew"]["post"]
    assert [p["name"] for p in renew["parameters"]] == ["name"]
    assert set(renew["responses"]) >= {"200", "400", "404", "401"}
    assert "get" in SPEC["paths"]["/certificates"]


def test_the_admin_listener_serves_a_newly_issued_acme_certificate(h: Harness) -> None:
    admin_tls = AdminTLS(h.control, "mail")
    placeholder = admin_tls.getContext()
    assert admin_tls.getContext() is placeholder  # built once per runtime and certificate
    h.manager.startService()
    leaf = h.issue()
    context = admin_tls.getContext()
    assert context is not placeholder
    served = SSL.Connection(context, None).get_certificate()
    assert served is not None and served.to_cryptography().serial_number == leaf.serial_number
