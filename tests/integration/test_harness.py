"""The test harness itself: Dovecot nodes, PROXY v2 listeners, certificates, reaping.

These run without stalroute, so they show that a failing proxy test is the proxy's fault.
"""

from __future__ import annotations

import hashlib
import signal
import ssl
import time
import tomllib
from pathlib import Path

import pytest

from tests.conftest import DovecotPair
from tests.harness.clients import (
    RawIMAP,
    SourceIMAP4_SSL,
    connect_from,
    fetch_subject,
    proxy_v2_header,
)
from tests.harness.dovecot import welcome_subject
from tests.harness import ports
from tests.harness.pki import CertificateAuthority, sha256_fingerprint
from tests.harness.processes import ManagedProcess, session_processes
from tests.harness.stalroute import dump_toml


@pytest.mark.integration
@pytest.mark.parametrize("user", ["alice", "bob"])
def test_each_node_holds_its_own_mailbox(
    dovecot_pair: DovecotPair, pki: CertificateAuthority, user: str
) -> None:
    for node in dovecot_pair:
        client = SourceIMAP4_SSL(
            node.host,
            node.ports.imaps,
            ssl_context=pki.client_context(),
            server_hostname=node.hostname,
        )
        try:
            client.login(user, node.users[user])
            assert fetch_subject(client) == welcome_subject(node.name, user)
        finally:
            client.logout()


@pytest.mark.integration
@pytest.mark.parametrize("tls", ["implicit", "starttls"])
def test_haproxy_listener_takes_client_address_from_proxy_v2(
    dovecot_pair: DovecotPair, pki: CertificateAuthority, tls: str
) -> None:
    node = dovecot_pair.node2
    port = node.ports.imaps_haproxy if tls == "implicit" else node.ports.imap_haproxy
    fake_client = "203.0.113.77" if tls == "implicit" else "203.0.113.78"
    since = node.log.size()
    sock = connect_from(node.host, port)
    sock.sendall(proxy_v2_header((fake_client, 40123), (node.host, port)))
    if tls == "implicit":
        sock = pki.client_context().wrap_socket(sock, server_hostname=node.hostname)
    with RawIMAP(sock) as client:
        assert client.readline().startswith(b"* OK")
        if tls == "starttls":
            client.starttls(pki.client_context(), node.hostname)
        reply = client.command(b"a1", b"LOGIN carol " + node.users["carol"].encode())
        assert reply[-1].startswith(b"a1 OK"), reply
    node.wait_for_log(rf"Login: user=<carol>.*rip={fake_client}\b.*TLS", since=since)


@pytest.mark.integration
def test_presented_certificate_has_the_issued_fingerprint(
    dovecot_pair: DovecotPair, pki: CertificateAuthority
) -> None:
    node = dovecot_pair.node1
    with pki.client_context().wrap_socket(
        connect_from(node.host, node.ports.imaps), server_hostname=node.hostname
    ) as tls:
        der = tls.getpeercert(binary_form=True)
    assert hashlib.sha256(der).hexdigest() == node.certificate.sha256
    assert sha256_fingerprint(node.certificate.cert_path) == node.certificate.sha256


@pytest.mark.integration
def test_wrong_server_name_is_rejected(
    dovecot_pair: DovecotPair, pki: CertificateAuthority
) -> None:
    node = dovecot_pair.node1
    with pytest.raises(ssl.SSLCertVerificationError):
        SourceIMAP4_SSL(
            node.host,
            node.ports.imaps,
            ssl_context=pki.client_context(),
            server_hostname="node2.test",
        )


def test_managed_process_reaps_leader_and_orphans(tmp_path: Path) -> None:
    # The leader leaves a background child behind when SIGTERM kills it; stop() must kill
    # and reap that orphan too (this process is its subreaper), leaving nothing at all.
    process = ManagedProcess(
        ["sh", "-c", "sleep 300 & exec sleep 301"], name="sleepers", output_path=tmp_path / "out"
    ).start()
    session = process.pid
    deadline = time.monotonic() + 5
    while len(session_processes(session)) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(session_processes(session)) == 2
    assert process.stop(timeout=5) == -signal.SIGTERM
    assert session_processes(session) == {}


def test_dump_toml_round_trips() -> None:
    document = {
        "server": {"hostname": "stalroute.test", "workers": 1, "debug": False},
        "listener": {"imaps": {"bind": ["127.0.0.1:1993"], "tls": "implicit"}},
        "destination": {"n1": {"host": "127.0.0.1", "protocol": {"imap": {"port": 1}}}},
        "http": {"route": [{"match": "/jmap/**", "extract": {"from": "authorization"}}]},
        "odd key": {"path": 'C:\\dir "x"'},
    }
    assert tomllib.loads(dump_toml(document)) == document


def test_free_ports_never_hands_out_a_port_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two servers given ports by separate calls, neither listening yet, must not get the same
    one: the random draw that once gave two Dovecot nodes of one test the same port is made
    to repeat itself here."""
    first = ports.free_port()
    draws = iter([first, first, first + 1 if first + 1 < 32_000 else first - 1])
    monkeypatch.setattr(ports.random, "randint", lambda low, high: next(draws))
    assert ports.free_port() != first
