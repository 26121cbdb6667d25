"""Behind a load balancer (SPEC §9) and under misbehaving clients and backends (§2.3, §2.12, §7):
inbound PROXY headers in every mode, harmless probes, per-IP limits, bans, the circuit
breaker and the graceful drain, against real Dovecot nodes."""

from __future__ import annotations

import os
import re
import signal
import socket
import ssl
import threading
import time
from typing import Any

import pytest

from tests.conftest import DovecotPair, StalrouteFactory
from tests.harness.clients import RawIMAP, connect_from, proxy_v2_header, sasl_plain
from tests.harness.pki import CertificateAuthority, IssuedCertificate
from tests.harness.ports import LOOPBACK, free_port
from tests.harness.stalroute import StalrouteProcess, closed_destination, two_node_imap_config

pytestmark = pytest.mark.integration

BALANCER = "127.0.0.1"  # the trusted network is 127.0.0.1/32; 127.0.0.2+ are untrusted
REAL_CLIENT = ("203.0.113.7", 40123)
PROXY_V2_LOCAL = b"\r\n\r\n\x00\r\nQUIT\n" + b"\x20\x00\x00\x00"


@pytest.fixture
def start(
    stalroute: StalrouteFactory,
    pki: CertificateAuthority,
    proxy_certificate: IssuedCertificate,
    dovecot_pair: DovecotPair,
):
    """Start stalroute with settings merged into both IMAP listeners (and top-level tables)."""

    def starter(listener: dict[str, Any] | None = None, imap: dict[str, Any] | None = None,
                **sections: dict[str, Any]):
        """``listener`` goes into both IMAP listeners, ``imap`` into the STARTTLS one only."""
        config = two_node_imap_config(proxy_certificate, pki.cert_path, *dovecot_pair,
                                      log_level="debug")
        for table in config["listener"].values():
            table.update(listener or {})
        config["listener"]["imap"].update(imap or {})
        for name, values in sections.items():
            config.setdefault(name, {}).update(values)
        return stalroute(config)

    return starter


def behind_balancer(mode: str, **more: Any) -> dict[str, Any]:
    return {"proxy_protocol": mode, "proxy_trusted": [f"{BALANCER}/32"],
            "proxy_header_timeout": "1s", **more}


def tls_after(sock: socket.socket, pki: CertificateAuthority) -> RawIMAP:
    client = RawIMAP(pki.client_context().wrap_socket(sock, server_hostname="localhost"))
    client.greeting = client.readline()
    return client


def login(client: RawIMAP, user: str, password: str, tag: bytes = b"a1") -> list[bytes]:
    return client.command(tag, b"AUTHENTICATE PLAIN " + sasl_plain(user, password))


def refused_without_greeting(host: str, port: int, source: str, send: bytes = b"") -> bool:
    """True when the connection is closed or reset before any greeting, at whichever step
    the refusal lands (connect, send, or the first read)."""
    try:
        with connect_from(host, port, source=source, timeout=5) as sock:
            if send:
                sock.sendall(send)
            return sock.recv(1024) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True


def test_required_header_names_the_client_and_dovecot_sees_it(
        start, pki: CertificateAuthority, users: dict[str, str], dovecot_pair: DovecotPair) -> None:
    proxy = start(behind_balancer("required"))
    host, port = proxy.listener("imaps")
    since = dovecot_pair.node1.log.size()
    sock = connect_from(host, port, source=BALANCER)
    sock.sendall(proxy_v2_header(REAL_CLIENT, (host, port)))
    with tls_after(sock, pki) as client:
        assert login(client, "alice", users["alice"])[-1].startswith(b"a1 OK")
    dovecot_pair.node1.wait_for_log(r"Login: user=<alice>.*rip=203\.0\.113\.7,", since=since)


@pytest.mark.parametrize("header", [
    pytest.param(b"PROXY TCP4 198.51.100.9 127.0.0.1 50000 993\r\n", id="v1"),
    pytest.param(PROXY_V2_LOCAL, id="v2-local"),
    pytest.param(b"PROXY UNKNOWN\r\n", id="v1-unknown"),
])
def test_v1_and_local_headers_are_accepted(
        start, pki: CertificateAuthority, users: dict[str, str], dovecot_pair: DovecotPair,
        header: bytes) -> None:
    proxy = start(behind_balancer("required"))
    host, port = proxy.listener("imaps")
    since = dovecot_pair.node1.log.size()
    sock = connect_from(host, port, source=BALANCER)
    sock.sendall(header)
    with tls_after(sock, pki) as client:
        assert login(client, "alice", users["alice"])[-1].startswith(b"a1 OK")
    expected = "198.51.100.9" if b"TCP4" in header else BALANCER  # LOCAL: the socket's address
    dovecot_pair.node1.wait_for_log(rf"Login: user=<alice>.*rip={re.escape(expected)},",
                                    since=since)


def test_required_refuses_untrusted_peers_and_missing_headers(start) -> None:
    proxy = start(behind_balancer("required"))
    host, port = proxy.listener("imap")
    assert refused_without_greeting(host, port, "127.0.0.2",
                                    proxy_v2_header(REAL_CLIENT, (host, port)))
    assert refused_without_greeting(host, port, BALANCER, b"a1 CAPABILITY\r\n")


def test_a_header_must_arrive_within_the_timeout(start) -> None:
    proxy = start(behind_balancer("required"))
    host, port = proxy.listener("imap")
    started = time.monotonic()
    assert refused_without_greeting(host, port, BALANCER)
    assert time.monotonic() - started < 4


def test_optional_serves_headerless_trusted_and_untrusted_peers(start) -> None:
    proxy = start(behind_balancer("optional"))
    host, port = proxy.listener("imap")
    for source in (BALANCER, "127.0.0.2"):
        with RawIMAP.connect(host, port, source=source) as client:
            assert client.greeting.startswith(b"* OK")


def test_deferred_greets_first_and_reads_the_header_with_the_first_bytes(
        start, pki: CertificateAuthority, users: dict[str, str], dovecot_pair: DovecotPair) -> None:
    proxy = start(behind_balancer("deferred"))
    host, port = proxy.listener("imap")
    since = dovecot_pair.node1.log.size()
    with RawIMAP.connect(host, port, source=BALANCER) as client:
        assert client.greeting.startswith(b"* OK")
        client.send(proxy_v2_header(REAL_CLIENT, (host, port)))
        client.starttls(pki.client_context())
        assert login(client, "alice", users["alice"])[-1].startswith(b"a1 OK")
    dovecot_pair.node1.wait_for_log(r"Login: user=<alice>.*rip=203\.0\.113\.7,", since=since)


def test_probes_release_every_slot_and_are_logged_at_debug(
        start, pki: CertificateAuthority, users: dict[str, str]) -> None:
    proxy = start(behind_balancer("optional", max_connections=4))
    host, port = proxy.listener("imaps")
    for round_ in range(60):
        sock = connect_from(host, port, source=BALANCER)
        if round_ % 3 == 1:
            sock.sendall(PROXY_V2_LOCAL)
        elif round_ % 3 == 2:
            pki.client_context().wrap_socket(sock, server_hostname="localhost").close()
            continue
        sock.close()
    clients = [RawIMAP.connect(host, port, ssl_context=pki.client_context())
               for _ in range(4)]  # every slot is free again
    for number, client in enumerate(clients):
        assert login(client, "alice", users["alice"], b"t%d" % number)[-1].startswith(b"t")
        client.close()
    deadline = time.monotonic() + 5
    while proxy.log_text().count("outcome=probe") < 60 and time.monotonic() < deadline:
        time.sleep(0.1)
    log = proxy.log_text()
    assert log.count("outcome=probe") >= 60
    assert re.search(r"#info\] session \S+ imap .*outcome=probe", log) is None


def test_max_connections_per_ip_counts_the_real_client(start) -> None:
    proxy = start({"max_connections_per_ip": 2})
    host, port = proxy.listener("imap")
    first, second = (RawIMAP.connect(host, port, source="127.0.0.3") for _ in range(2))
    assert refused_without_greeting(host, port, "127.0.0.3")
    with RawIMAP.connect(host, port, source="127.0.0.4") as other:
        assert other.greeting.startswith(b"* OK")
    first.close()
    time.sleep(0.3)
    with RawIMAP.connect(host, port, source="127.0.0.3") as again:
        assert again.greeting.startswith(b"* OK")
    second.close()


def test_repeated_wrong_passwords_ban_only_that_client(
        start, pki: CertificateAuthority, users: dict[str, str]) -> None:
    proxy = start(security={"auth_fail_ban_threshold": 3, "auth_fail_ban_window": "1m",
                            "ban_duration": "1m"})
    host, port = proxy.listener("imaps")
    for attempt in range(3):
        with RawIMAP.connect(host, port, ssl_context=pki.client_context(),
                             source="127.0.0.5") as client:
            assert b"NO" in login(client, "alice", "wrong")[-1]
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):  # reset at once
        tls_after(connect_from(host, port, source="127.0.0.5", timeout=5), pki)
    with RawIMAP.connect(host, port, ssl_context=pki.client_context(),
                         source="127.0.0.6") as other:
        assert login(other, "alice", users["alice"])[-1].startswith(b"a1 OK")


def test_a_dead_backend_opens_its_circuit(
        stalroute: StalrouteFactory, pki: CertificateAuthority,
        proxy_certificate: IssuedCertificate, dovecot_pair: DovecotPair) -> None:
    config = two_node_imap_config(proxy_certificate, pki.cert_path, *dovecot_pair)
    config["server"].update(host_down_threshold=2, host_down_cooldown="30s",
                            backend_connect_retries=0)
    config["destination"]["down"] = closed_destination()
    proxy = stalroute(config, mappings={"erin": "down"})
    host, port = proxy.listener("imaps")
    with RawIMAP.connect(host, port, ssl_context=pki.client_context()) as client:
        for number in range(3):
            reply = login(client, "erin", "whatever", b"e%d" % number)[-1]
            assert reply.startswith(b"e%d NO [UNAVAILABLE]" % number), reply
    log = proxy.log_text()
    refused = [line for line in log.splitlines()  # not the capability probe's own warning
               if "temporary failure" in line and "ConnectionRefusedError" in line]
    assert len(refused) == 2
    assert "destination down is marked down (circuit open)" in log


def test_sigterm_drains_live_sessions(
        start, pki: CertificateAuthority, users: dict[str, str]) -> None:
    proxy: StalrouteProcess = start(server={"shutdown_grace": "3s"})
    host, port = proxy.listener("imaps")
    sessions = [RawIMAP.connect(host, port, ssl_context=pki.client_context()) for _ in range(5)]
    for number, client in enumerate(sessions):
        assert login(client, "alice", users["alice"], b"d%d" % number)[-1].startswith(b"d")
    os.kill(proxy.pid, signal.SIGTERM)
    time.sleep(0.5)
    with pytest.raises(ConnectionRefusedError):
        connect_from(host, port)  # no longer accepting
    for number, client in enumerate(sessions):  # live sessions keep working during the grace
        assert client.command(b"n%d" % number, b"NOOP")[-1].startswith(b"n%d OK" % number)
    for client in sessions:  # then they are closed
        with pytest.raises(ConnectionError):
            while True:
                client.readline()
    deadline = time.monotonic() + 15
    while proxy.running and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not proxy.running
    assert "draining 5 sessions" in proxy.log_text()


class StalledIMAPBackend:
    """A backend that accepts and then stalls: silent, or greeting and never answering."""

    def __init__(self, greeting: bytes) -> None:
        self.server = socket.create_server((LOOPBACK, 0))
        self.port = self.server.getsockname()[1]
        self.greeting = greeting
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            conn.sendall(self.greeting)
            self.held.append(conn)

    def close(self) -> None:
        self.server.close()
        for conn in self.held:
            conn.close()


@pytest.mark.parametrize("greeting", [
    pytest.param(b"", id="never-greets"),
    pytest.param(b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN] stalled\r\n",
                 id="never-answers-the-login"),
])
def test_a_stalled_backend_is_a_temporary_failure_after_backend_timeout(
        stalroute: StalrouteFactory, pki: CertificateAuthority,
        proxy_certificate: IssuedCertificate, dovecot_pair: DovecotPair, greeting: bytes) -> None:
    backend = StalledIMAPBackend(greeting)
    try:
        config = two_node_imap_config(proxy_certificate, pki.cert_path, *dovecot_pair)
        config["server"]["backend_timeout"] = "1s"
        config["destination"]["stalled"] = {
            "host": LOOPBACK, "allow_plaintext_auth": True, "proxy_protocol": False,
            "protocol": {"imap": {"port": backend.port, "tls": "plain"}}}
        proxy = stalroute(config, mappings={"erin": "stalled"})
        host, port = proxy.listener("imaps")
        with RawIMAP.connect(host, port, ssl_context=pki.client_context()) as client:
            started = time.monotonic()
            reply = login(client, "erin", "whatever")[-1]
            assert reply.startswith(b"a1 NO [UNAVAILABLE]"), reply
            assert time.monotonic() - started < 4
        assert "unexpected error" not in proxy.log_text()
    finally:
        backend.close()


def test_ipv4_and_ipv6_wildcards_bind_the_same_port(start) -> None:
    """SPEC §2.3's own example: ``["0.0.0.0:993", "[::]:993"]`` must both bind."""
    port = free_port()
    proxy = start(imap={"bind": [f"0.0.0.0:{port}", f"[::]:{port}"]})
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        with socket.create_connection((host, port), timeout=5) as sock:
            assert sock.family == family
            assert sock.recv(4) == b"* OK"
    assert proxy.running
