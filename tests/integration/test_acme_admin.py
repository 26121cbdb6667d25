"""Certificates through the admin API and ``stalroute ctl`` (SPEC §2.13, §8, §10), single
instance: a real pebble issues ``mail.test`` for the IMAPS listener of a real stalroute in front
of Dovecot, which also serves a file certificate (the test CA's, for the admin API and
``localhost``).

* ``ctl certificates`` and ``GET /certificates`` list both, the pebble-issued one by serial;
* ``POST /certificates/renew`` changes the serial served on the IMAPS port while an IMAP IDLE
  session that negotiated the old certificate stays up and keeps working;
* with pebble unreachable a forced renewal fails, the old certificate stays served, and
  ``/metrics`` exports its expiry.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import DovecotPair, StalrouteFactory
from tests.harness.clients import RawIMAP
from tests.harness.pebble import PebbleServer
from tests.harness.pki import CertificateAuthority, IssuedCertificate
from tests.harness.ports import LOOPBACK, free_port
from tests.harness.stalroute import StalrouteProcess, admin_section, dovecot_destination
from tests.integration.test_acme import (
    NAME,
    acme_config,
    intermediate_subject,
    pebble,  # noqa: F401 - the fixture
    served_chain,
    wait_for_issuer,
)
from tests.integration.test_admin import TOKEN, Admin
from tests.integration.test_ctl import ctl

pytestmark = pytest.mark.integration

PebbleFactory = Callable[..., PebbleServer]


def proxy_config(server: PebbleServer, port: int, state: Path, pki: CertificateAuthority,
                 certificate: IssuedCertificate, dovecot_pair: DovecotPair) -> dict[str, Any]:
    """:func:`acme_config` in front of Dovecot node1, with a default file certificate (the
    admin API's) beside the acme one, and the admin API."""
    config = acme_config(server, port, state)
    config["tls"]["certificate"]["default"] = {
        "cert": str(certificate.cert_path), "key": str(certificate.key_path), "default": True}
    config["destination"] = {"node1": dovecot_destination(dovecot_pair.node1,
                                                          ca_file=pki.cert_path)}
    config["routing"] = {"default_destination": "node1"}
    config["admin"] = admin_section(TOKEN)
    return config


@pytest.fixture
def issued(pebble: PebbleFactory, stalroute: StalrouteFactory,  # noqa: F811
           pki: CertificateAuthority, proxy_certificate: IssuedCertificate,
           dovecot_pair: DovecotPair, tmp_path: Path
           ) -> tuple[PebbleServer, StalrouteProcess, Admin, x509.Certificate]:
    """pebble, the proxy once it serves a pebble certificate, its admin API, that leaf."""
    port = free_port()
    server = pebble(tls_port=port)
    proxy = stalroute(proxy_config(server, port, tmp_path / "state", pki, proxy_certificate,
                                   dovecot_pair))
    chain = wait_for_issuer(port, intermediate_subject(server), proxy=proxy)
    return server, proxy, Admin(proxy, pki), chain[0]


def imaps_port(proxy: StalrouteProcess) -> int:
    return proxy.listener("imaps")[1]


def listed(admin: Admin, name: str) -> dict[str, Any]:
    rows = admin.ok("GET", "/certificates")["certificates"]
    return next(row for row in rows if row["name"] == name)


def wait_for_listing(admin: Admin, name: str, condition: Callable[[dict[str, Any]], bool],
                     timeout: float = 30.0) -> dict[str, Any]:
    """``GET /certificates`` until the row of ``name`` meets ``condition``."""
    deadline = time.monotonic() + timeout
    while not condition(row := listed(admin, name)):
        assert time.monotonic() < deadline, f"not reached within {timeout}s: {row}"
        time.sleep(0.2)
    return row


def test_ctl_and_the_api_list_the_pebble_certificate(issued, pki: CertificateAuthority,
                                                     proxy_certificate: IssuedCertificate
                                                     ) -> None:
    server, proxy, admin, leaf = issued
    document = admin.ok("GET", "/certificates")
    rows = {row["name"]: row for row in document["certificates"]}
    assert set(rows) == {"mail", "default"}
    mail = rows["mail"]
    assert mail["source"] == "acme:pebble" and mail["self_signed"] is False
    assert mail["serial"] == f"{leaf.serial_number:x}"
    assert mail["issuer"] == leaf.issuer.rfc4514_string() and mail["subjects"] == [NAME]
    assert mail["renews"] == {"here": True, "nodes": None}
    assert (mail["failures"], mail["last_error"]) == (0, None) and mail["next_check"]
    assert 0 < mail["expires_in"] <= (leaf.not_valid_after_utc
                                      - leaf.not_valid_before_utc).total_seconds()
    file_leaf = x509.load_pem_x509_certificate(proxy_certificate.cert_path.read_bytes())
    assert rows["default"]["source"] == "file"
    assert rows["default"]["serial"] == f"{file_leaf.serial_number:x}"
    assert rows["default"]["issuer_cn"] == "stalroute test CA"

    out = ctl(proxy, pki, "certificates")
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[:3] == ["NAME", "SOURCE", "ISSUER"]
    row = next(line for line in lines if line.startswith("mail "))
    assert "acme:pebble" in row and mail["issuer_cn"] in row
    assert f"{leaf.serial_number:x}" in row and row.endswith("this instance")
    assert leaf.not_valid_after_utc.strftime("%Y-%m-%d %H:%M") in row
    assert any(line.startswith("default ") and "file" in line for line in lines)


def test_a_forced_renewal_changes_the_served_serial_under_a_live_idle_session(
        issued, users: dict[str, str]) -> None:
    server, proxy, admin, leaf = issued
    port = imaps_port(proxy)
    context = ssl.create_default_context(cadata=server.root_pem().decode())
    with RawIMAP.connect(LOOPBACK, port, ssl_context=context, server_hostname=NAME,
                         timeout=60) as client:
        assert isinstance(client.sock, ssl.SSLSocket)
        der = client.sock.getpeercert(binary_form=True)
        assert der is not None
        negotiated = x509.load_der_x509_certificate(der)
        assert negotiated.serial_number == leaf.serial_number
        assert client.command(b"a1", b"LOGIN frank " + users["frank"].encode())[-1] \
            .startswith(b"a1 OK")
        assert client.command(b"a2", b"SELECT INBOX")[-1].startswith(b"a2 OK")
        client.send(b"a3 IDLE\r\n")
        assert client.readline().startswith(b"+")

        old = f"{leaf.serial_number:x}"
        answer = admin.ok("POST", "/certificates/renew?name=mail")
        assert answer["requested"] is True and answer["certificate"]["serial"] == old
        renewed = wait_for_listing(admin, "mail", lambda row: row["serial"] != old)
        assert renewed["last_error"] is None and renewed["failures"] == 0
        chain, _, first = served_chain(port)
        assert f"{chain[0].serial_number:x}" == renewed["serial"]
        assert chain[0].issuer == leaf.issuer and first.startswith(b"* OK")

        # The session that negotiated the old certificate is still up and working.
        client.send(b"DONE\r\n")
        assert client.read_until_tagged(b"a3")[-1].startswith(b"a3 OK")
        assert client.command(b"a4", b"NOOP")[-1].startswith(b"a4 OK")


def test_with_pebble_unreachable_a_renewal_fails_and_the_old_certificate_stays(
        issued, pki: CertificateAuthority) -> None:
    server, proxy, admin, leaf = issued
    server.relay.cut()
    reply = admin.call("POST", "/certificates/renew?name=mail")
    assert reply.status == 200, reply
    kept = wait_for_listing(admin, "mail", lambda row: row["failures"] > 0)
    assert kept["serial"] == f"{leaf.serial_number:x}" and kept["next_check"]
    assert kept["failures"] == 1 and "cannot reach the ACME server" in kept["last_error"]
    chain, _, first = served_chain(imaps_port(proxy))
    assert chain[0].serial_number == leaf.serial_number and first.startswith(b"* OK")
    assert "order failed (attempt 1)" in proxy.log_text()

    metrics = admin.call("GET", "/metrics")
    assert metrics.status == 200
    found = {(s.name, tuple(sorted(s.labels.items()))): s.value
             for family in text_string_to_metric_families(metrics.body.decode())
             for s in family.samples}
    expiry = found[("stalroute_certificate_expiry_seconds", (("name", "mail"),))]
    lifetime = (leaf.not_valid_after_utc - leaf.not_valid_before_utc).total_seconds()
    assert 0 < expiry <= lifetime
    assert found[("stalroute_certificate_expiry_seconds", (("name", "default"),))] > 0
    assert found[("stalroute_certificate_renewal_failures", (("name", "mail"),))] == 1

    out = ctl(proxy, pki, "certificates")
    assert out.returncode == 0, out.stderr
    assert "mail: 1 failed renewal attempts, last: " in out.stdout
    # The same through ctl, waiting for the outcome: exit status 1, the reason, still served.
    out = ctl(proxy, pki, "certificates", "renew", "mail", "--wait", "30")
    assert out.returncode == 1, out.stdout + out.stderr
    assert out.stdout.startswith("renewal of certificate mail failed: ")
    assert f"still serving serial {leaf.serial_number:x}" in out.stdout
    assert listed(admin, "mail")["failures"] == 2
