"""stalroute behind a real HAProxy (SPEC §9, with §2.1 circuits, §2.12 bans, §1 drain).

HAProxy 2.6 balances a ``mode tcp`` frontend onto a stalroute listener with ``send-proxy-v2``
and TCP health checks with ``check-send-proxy`` (which send the v2 ``LOCAL`` header), and
real Dovecot nodes sit behind stalroute. Test clients bind 127.0.0.2+ so HAProxy names them in
the PROXY header; the listeners trust only the balancer's own address, 127.0.0.1/32.

Shown here: 10,000 health probes leave nothing behind (no slot, no ban, no open circuit,
still ready); a login from 127.0.0.2 through HAProxy reaches Dovecot as ``rip=127.0.0.2``;
``deferred`` mode with a header that arrives with the client's first bytes; a header from an
untrusted address is refused; a backend killed mid-test opens its circuit (temporary failures)
and recovers when restarted; 100 wrong passwords from one client neither mark the backend
down nor get anybody else banned; SIGTERM with 50 live IMAP sessions drains them. A raw
socket in stalroute's place first checks what HAProxy's checks send (only the LOCAL header).
In deferred mode, bans apply to the client the late header names.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import USERS, DovecotPair, StalrouteFactory, require_binary
from tests.harness.clients import (
    RawIMAP, SourceIMAP4, SourceIMAP4_SSL, connect_from, proxy_v2_header, sasl_plain,
)
from tests.harness.dovecot import DovecotNode
from tests.harness.haproxy import HAProxyBalancer
from tests.harness.pki import CertificateAuthority, IssuedCertificate
from tests.harness.stalroute import (
    StalrouteProcess, admin_section, dovecot_destination, imap_proxy_config,
    two_node_imap_config,
)

pytestmark = pytest.mark.integration

TOKEN = "Balancer-" + "b" * 32
BALANCER = "127.0.0.1"  # HAProxy's own address: the only trusted one
CLIENT = "127.0.0.2"  # a real client, as HAProxy reports it
OTHER_CLIENT = "127.0.0.3"
PROXY_V2_LOCAL = b"\r\n\r\n\x00\r\nQUIT\n" + b"\x20\x00\x00\x00"
PROBES = 10_000


# --- fixtures and helpers ---------------------------------------------------------------------


BalancerFactory = Callable[..., HAProxyBalancer]


@pytest.fixture
def balancer(tmp_path: Path) -> Iterator[BalancerFactory]:
    """Factory: ``balancer((host, port), servers=..., inter=...)`` starts HAProxy in front of
    a stalroute listener; every one is stopped (SIGTERM), reaped and its log tail printed."""
    binary = require_binary("haproxy")
    started: list[HAProxyBalancer] = []

    def start(backend: tuple[str, int], **options: Any) -> HAProxyBalancer:
        haproxy = HAProxyBalancer(backend, binary=binary, parent_dir=tmp_path, **options)
        started.append(haproxy)
        return haproxy.start()

    yield start
    for haproxy in started:
        haproxy.stop()
        print(f"--- haproxy {haproxy.address} (tail) ---\n{haproxy.output_text()[-3000:]}")
        haproxy.remove_files()


def behind_balancer(mode: str = "required", **more: Any) -> dict[str, Any]:
    return {"proxy_protocol": mode, "proxy_trusted": [f"{BALANCER}/32"],
            "proxy_header_timeout": "1s", **more}


def configure(config: dict[str, Any], listener: dict[str, Any] | None = None,
              **sections: dict[str, Any]) -> dict[str, Any]:
    """Both IMAP listeners behind the balancer, the admin API on, ``sections`` merged in."""
    for table in config["listener"].values():
        table.update(behind_balancer() if listener is None else listener)
    config["admin"] = admin_section(TOKEN)
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    return config


@pytest.fixture
def start(stalroute: StalrouteFactory, pki: CertificateAuthority,
          proxy_certificate: IssuedCertificate, dovecot_pair: DovecotPair):
    """stalroute in front of the Dovecot pair (node1 is the default destination)."""

    def starter(listener: dict[str, Any] | None = None, **sections: dict[str, Any]):
        config = two_node_imap_config(proxy_certificate, pki.cert_path, *dovecot_pair)
        return stalroute(configure(config, listener, **sections))

    return starter


class Admin:
    """GET requests to the admin API over HTTPS (verified against the test CA)."""

    def __init__(self, proxy: StalrouteProcess, pki: CertificateAuthority) -> None:
        self.proxy = proxy
        self.context = pki.client_context()

    def get(self, path: str, *, auth: bool = True) -> tuple[int, Any]:
        host, port = self.proxy.admin_url.removeprefix("https://").rsplit(":", 1)
        connection = http.client.HTTPSConnection(host, int(port), context=self.context,
                                                 timeout=15)
        try:
            headers = {"Authorization": f"Bearer {TOKEN}"} if auth else {}
            connection.request("GET", path, headers=headers)
            response = connection.getresponse()
            body = response.read()
        finally:
            connection.close()
        if response.getheader("Content-Type", "").startswith("application/json"):
            return response.status, json.loads(body)
        return response.status, body.decode()

    def stats(self) -> dict[str, Any]:
        status, body = self.get("/stats")
        assert status == 200, body
        return body

    def destination(self, name: str) -> dict[str, Any]:
        status, body = self.get("/destinations")
        assert status == 200, body
        return next(d for d in body["destinations"] if d["name"] == name)

    def ready(self) -> tuple[int, Any]:
        return self.get("/healthz/ready", auth=False)


def login(client: RawIMAP, user: str, password: str, tag: bytes = b"a1") -> bytes:
    """AUTHENTICATE PLAIN with SASL-IR; the tagged reply."""
    return client.command(tag, b"AUTHENTICATE PLAIN " + sasl_plain(user, password))[-1]


def through(haproxy: HAProxyBalancer, pki: CertificateAuthority, source: str = CLIENT,
            timeout: float = 15) -> RawIMAP:
    """An implicit-TLS IMAP client connected through HAProxy from ``source``."""
    return RawIMAP.connect(*haproxy.address, ssl_context=pki.client_context(), source=source,
                           timeout=timeout)


def refused_without_greeting(host: str, port: int, source: str, send: bytes = b"",
                             tls: ssl.SSLContext | None = None) -> bool:
    """True when the connection is closed or reset before any greeting (or TLS handshake),
    at whichever step the refusal lands."""
    try:
        with connect_from(host, port, source=source, timeout=10) as sock:
            if send:
                sock.sendall(send)
            if tls is not None:
                try:
                    tls.wrap_socket(sock, server_hostname="localhost").close()
                except (ssl.SSLError, OSError):
                    return True
                return False
            return sock.recv(1024) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True


def switch_to_tls(client: RawIMAP, context: ssl.SSLContext) -> None:
    """Start TLS on ``client`` after a STARTTLS it sent (and whose OK it read) by hand."""
    client._reader.close()
    client.sock = context.wrap_socket(client.sock, server_hostname="localhost")
    client._reader = client.sock.makefile("rb")


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.1) -> Any:
    """Poll ``predicate`` until it returns something true; that value, or the last one."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


# --- health probes ----------------------------------------------------------------------------


def test_ten_thousand_health_probes_leave_nothing_behind(
        start, balancer: BalancerFactory, pki: CertificateAuthority,
        users: dict[str, str]) -> None:
    proxy = start()
    admin = Admin(proxy, pki)
    target = proxy.listener("imaps")
    # 20 server lines, all to the same listener, each checked every 10 ms: ~2,000 probes/s,
    # each a TCP connect + PROXY v2 LOCAL + close, exactly what check-send-proxy sends.
    haproxy = balancer(target, servers=20, inter="10ms", fall=1_000_000)
    started = time.monotonic()

    def probes() -> int:
        return admin.stats()["listeners"]["imaps"]["probes"]

    wait_until(lambda: probes() >= PROBES, timeout=40, interval=0.5)
    from_haproxy = probes()
    # Here HAProxy alone gets there in well under 10 s. Only on a machine too slow for that
    # does the test make up the count with its own connect-and-close probes carrying the same
    # LOCAL header, from the balancer's address (HAProxy must still have sent most of them).
    assert from_haproxy >= PROBES // 2, (
        f"only {from_haproxy} probes counted after 40s; HAProxy log:\n"
        f"{haproxy.output_text()[-2000:]}")
    topped_up = 0
    while probes() < PROBES:
        for _ in range(200):
            with connect_from(*target, source=BALANCER, timeout=5) as sock:
                sock.sendall(PROXY_V2_LOCAL)
            topped_up += 1
    elapsed = time.monotonic() - started
    assert haproxy.soft_stop() is not None  # SIGUSR1: no more checks; reaped
    print(f"{PROBES} probes counted in {elapsed:.1f}s, {topped_up} of them sent by the test")
    # Every one of them gave its slot back, and none was taken for anything else.
    stats = wait_until(lambda: (s := admin.stats())["listeners"]["imaps"]
                       ["active_connections"] == 0 and s, timeout=5)
    assert stats, admin.stats()
    assert stats["listeners"]["imaps"]["probes"] >= PROBES
    assert all(listener["active_connections"] == 0 for listener in stats["listeners"].values())
    assert stats["listeners"]["imaps"]["rejected_connections"] == 0
    assert stats["sessions"]["open"] == 0
    assert stats["bans"] == 0
    node1 = admin.destination("node1")
    assert (node1["circuit"], node1["consecutive_failures"], node1["trips"]) == ("closed", 0, 0)
    assert admin.ready()[0] == 200
    status, metrics = admin.get("/metrics")
    assert status == 200
    exported = re.search(r'^stalroute_listener_probes_total\{listener="imaps"[^}]*\} (\S+)$',
                         metrics, re.M)
    assert exported and float(exported.group(1)) >= PROBES, metrics[:2000]
    # Probes are logged at debug level only: nothing at info for 10,000 connections.
    assert "outcome=probe" not in proxy.log_text()
    # The balancer's own address is not banned: a real session from it still works.
    sock = connect_from(*target, source=BALANCER)
    sock.sendall(PROXY_V2_LOCAL)
    with RawIMAP(pki.client_context().wrap_socket(sock, server_hostname="localhost")) as client:
        client.greeting = client.readline()
        assert login(client, "alice", users["alice"]).startswith(b"a1 OK")


def test_haproxy_health_checks_send_only_a_v2_local_header(
        balancer: BalancerFactory) -> None:
    """What the probes above are: a plain socket in stalroute's place records each check
    connection (HAProxy's own readiness connect is a proxied one, with a PROXY header)."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(10)
    try:
        haproxy = balancer(server.getsockname(), inter="50ms")
        checks = 0
        while checks < 3:
            conn, peer = server.accept()
            with conn:
                assert peer[0] == BALANCER
                conn.settimeout(5)
                received = b""
                try:
                    while chunk := conn.recv(1024):
                        received += chunk
                except ConnectionResetError:
                    pass  # HAProxy ends a check with a reset
            if received[12:13] == b"\x21":
                continue  # a proxied connection (PROXY command), not a check
            assert received == PROXY_V2_LOCAL
            checks += 1
        haproxy.stop()
    finally:
        server.close()


# --- the real client's address ----------------------------------------------------------------


@pytest.mark.parametrize("listener", ["imaps", "imap"])
def test_login_through_haproxy_names_the_real_client_at_dovecot(
        start, balancer: BalancerFactory, pki: CertificateAuthority, users: dict[str, str],
        dovecot_pair: DovecotPair, listener: str) -> None:
    proxy = start()
    haproxy = balancer(proxy.listener(listener))
    since = dovecot_pair.node1.log.size()
    if listener == "imaps":
        client = SourceIMAP4_SSL(*haproxy.address, ssl_context=pki.client_context(),
                                 source=CLIENT, server_hostname="localhost")
    else:
        client = SourceIMAP4(*haproxy.address, source=CLIENT)
        client.starttls(pki.client_context())
    try:
        assert client.login("bob", users["bob"])[0] == "OK"
        assert client.noop()[0] == "OK"
    finally:
        client.logout()
    dovecot_pair.node1.wait_for_log(r"Login: user=<bob>.*rip=127\.0\.0\.2,", since=since)
    # stalroute's own session line names the real client too, not the balancer.
    proxy.log.wait_for(r"session \S+ imap client=127\.0\.0\.2:\d+ account=\S+ "
                       r"destination=node1 outcome=", 5)


# --- deferred mode ----------------------------------------------------------------------------


@pytest.mark.parametrize("header, first_command, rip", [
    pytest.param(proxy_v2_header(("203.0.113.21", 40001), ("127.0.0.1", 143)),
                 b"tls STARTTLS\r\n", "203.0.113.21", id="v2-with-STARTTLS"),
    pytest.param(b"PROXY TCP4 203.0.113.22 127.0.0.1 40002 143\r\n",
                 b"c1 CAPABILITY\r\n", "203.0.113.22", id="v1-with-CAPABILITY"),
])
def test_deferred_reads_a_header_that_comes_with_the_first_bytes(
        start, pki: CertificateAuthority, users: dict[str, str], dovecot_pair: DovecotPair,
        header: bytes, first_command: bytes, rip: str) -> None:
    """Like an AWS NLB: the trusted peer (127.0.0.1, no HAProxy here) reads the greeting
    first and sends the header in the same segment as its first command."""
    proxy = start(behind_balancer("deferred"))
    host, port = proxy.listener("imap")
    since = dovecot_pair.node1.log.size()
    with RawIMAP.connect(host, port, source=BALANCER) as client:
        assert client.greeting.startswith(b"* OK")
        client.send(header + first_command)  # one write, one segment
        tag = first_command.split(b" ")[0]
        reply = client.read_until_tagged(tag)
        assert reply[-1].startswith(tag + b" OK"), reply
        if tag == b"tls":  # STARTTLS went with the header: switch to TLS now
            switch_to_tls(client, pki.client_context())
        else:
            client.starttls(pki.client_context())
        assert login(client, "carol", users["carol"]).startswith(b"a1 OK")
    dovecot_pair.node1.wait_for_log(rf"Login: user=<carol>.*rip={re.escape(rip)},",
                                    since=since)


def test_deferred_refuses_a_banned_client_named_by_the_header(
        start, pki: CertificateAuthority) -> None:
    proxy = start(behind_balancer("deferred"), security={
        "auth_fail_ban_threshold": 2, "auth_fail_ban_window": "1m", "ban_duration": "1m"})
    host, port = proxy.listener("imap")
    header = proxy_v2_header(("203.0.113.50", 40050), (host, port))

    def attempt() -> bytes:
        with RawIMAP.connect(host, port, source=BALANCER) as client:
            client.send(header + b"tls STARTTLS\r\n")
            assert client.read_until_tagged(b"tls")[-1].startswith(b"tls OK")
            switch_to_tls(client, pki.client_context())
            return login(client, "alice", "not-her-password")

    for _ in range(2):
        assert b"NO [AUTHENTICATIONFAILED]" in attempt()
    assert Admin(proxy, pki).stats()["bans"] == 1  # 203.0.113.50 is banned now...
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        attempt()  # ...so it must not reach the backend again


# --- untrusted headers ------------------------------------------------------------------------


def test_a_header_from_an_untrusted_address_is_refused(
        start, balancer: BalancerFactory, pki: CertificateAuthority, users: dict[str, str],
        dovecot_pair: DovecotPair) -> None:
    proxy = start()
    haproxy = balancer(proxy.listener("imaps"))
    since = dovecot_pair.node1.log.size()
    forged = proxy_v2_header(("203.0.113.66", 40066), ("127.0.0.1", 993))
    for name in ("imaps", "imap"):
        host, port = proxy.listener(name)
        # A client that bypasses the balancer and claims to be one: reset, no greeting.
        assert refused_without_greeting(host, port, CLIENT, forged)
        assert refused_without_greeting(host, port, CLIENT, b"PROXY TCP4 203.0.113.66 "
                                                            b"127.0.0.1 40066 993\r\n")
    # The same client through the balancer is served, under its own address.
    with through(haproxy, pki) as client:
        assert login(client, "dave", users["dave"]).startswith(b"a1 OK")
    dovecot_pair.node1.wait_for_log(r"Login: user=<dave>.*rip=127\.0\.0\.2,", since=since)
    assert "203.0.113.66" not in dovecot_pair.node1.log_text(since)
    assert len(re.findall(r"client=127\.0\.0\.2:\d+ .*outcome=untrusted_proxy",
                          proxy.log_text())) == 4


# --- a backend killed and restarted -----------------------------------------------------------


def restarted(node: DovecotNode) -> DovecotNode:
    """A fresh node with the same name, users, certificate and ports as ``node`` (stopped)."""
    fresh = DovecotNode(node.name, users=node.users, certificate=node.certificate)
    fresh.ports = node.ports
    return fresh.start()


def test_a_backend_killed_mid_test_opens_its_circuit_and_recovers(
        stalroute: StalrouteFactory, balancer: BalancerFactory, pki: CertificateAuthority,
        proxy_certificate: IssuedCertificate) -> None:
    require_binary("dovecot")
    certificate = pki.issue("solo", ["solo.test", "localhost"], ["127.0.0.1"])
    node = DovecotNode("solo", users=USERS, certificate=certificate).start()
    try:
        config = imap_proxy_config(
            proxy_certificate,
            {"solo": dovecot_destination(node, tls="implicit", ca_file=pki.cert_path)},
            default="solo")
        cooldown = 2.0  # host_down_cooldown
        proxy = stalroute(configure(config, server={
            "host_down_threshold": 3, "host_down_cooldown": "2s",
            "backend_connect_retries": 0}))
        admin = Admin(proxy, pki)
        haproxy = balancer(proxy.listener("imaps"))

        live = through(haproxy, pki)
        assert login(live, "erin", USERS["erin"]).startswith(b"a1 OK")
        assert live.command(b"n1", b"NOOP")[-1].startswith(b"n1 OK")

        os.kill(node.pid, signal.SIGKILL)  # mid-test, without a goodbye
        node.stop()  # reap the master and whatever it left behind
        with pytest.raises((ConnectionError, OSError)):  # the live session ends with it
            while True:
                live.readline()
        live.close()

        with through(haproxy, pki) as client:
            for number in range(3):
                tag = b"f%d" % number
                reply = login(client, "erin", USERS["erin"], tag)
                assert reply.startswith(tag + b" NO [UNAVAILABLE]"), reply
        solo = admin.destination("solo")
        assert solo["circuit"] == "open", solo
        assert solo["trips"] == 1
        status, body = admin.ready()
        assert status == 503 and any("solo" in reason for reason in body["reasons"]), body
        # While open, logins fail at once without a connect attempt.
        with through(haproxy, pki) as client:
            reply = login(client, "erin", USERS["erin"])
            assert reply.startswith(b"a1 NO [UNAVAILABLE]"), reply
        assert proxy.log_text().count("ConnectionRefusedError") == 3
        assert "destination solo is marked down (circuit open)" in proxy.log_text()
        opened = time.monotonic()

        node = restarted(node)  # same ports
        time.sleep(max(0.0, cooldown + 0.3 - (time.monotonic() - opened)))
        assert admin.destination("solo")["circuit"] == "half_open"
        with through(haproxy, pki) as client:  # the one probe login goes through
            assert login(client, "erin", USERS["erin"]).startswith(b"a1 OK")
            assert client.command(b"n2", b"NOOP")[-1].startswith(b"n2 OK")
        solo = admin.destination("solo")
        assert (solo["circuit"], solo["consecutive_failures"]) == ("closed", 0), solo
        assert admin.ready()[0] == 200
        with through(haproxy, pki, source=OTHER_CLIENT) as client:
            assert login(client, "frank", USERS["frank"]).startswith(b"a1 OK")
    finally:
        node.stop()


# --- wrong passwords --------------------------------------------------------------------------


def wrong_passwords_on_one_connection(haproxy: HAProxyBalancer, pki: CertificateAuthority,
                                      attempts: int, source: str = CLIENT) -> list[bytes]:
    """``attempts`` wrong passwords for alice on one connection; the tagged replies. After
    ``max_auth_attempts`` (3) the server must have closed the connection."""
    replies = []
    with through(haproxy, pki, source=source) as client:
        for number in range(attempts):
            replies.append(login(client, "alice", "not-her-password", b"w%d" % number))
        if attempts == 3:
            with pytest.raises((ConnectionError, OSError)):
                while True:
                    client.readline()
    return replies


def test_a_hundred_wrong_passwords_neither_mark_the_backend_down_nor_ban_others(
        start, balancer: BalancerFactory, pki: CertificateAuthority, users: dict[str, str],
        dovecot_pair: DovecotPair) -> None:
    proxy = start()
    admin = Admin(proxy, pki)
    haproxy = balancer(proxy.listener("imaps"))
    # 33 connections × 3 attempts + 1 = 100 wrong passwords from 127.0.0.2, 6 at a time.
    batches = [3] * 33 + [1]
    with ThreadPoolExecutor(6) as pool:
        replies = [reply for batch in pool.map(
            lambda n: wrong_passwords_on_one_connection(haproxy, pki, n), batches)
            for reply in batch]
    assert len(replies) == 100
    assert all(b"NO [AUTHENTICATIONFAILED]" in reply for reply in replies), set(replies)
    node1 = admin.destination("node1")
    assert (node1["circuit"], node1["consecutive_failures"], node1["trips"]) == ("closed", 0, 0)
    stats = admin.stats()
    assert stats["bans"] == 0
    assert admin.ready()[0] == 200
    since = dovecot_pair.node1.log.size()
    with through(haproxy, pki, source=OTHER_CLIENT) as client:
        assert login(client, "grace", users["grace"]).startswith(b"a1 OK")
    with through(haproxy, pki) as client:  # no ban configured: even the offender may log in
        assert login(client, "alice", users["alice"]).startswith(b"a1 OK")
    dovecot_pair.node1.wait_for_log(r"Login: user=<grace>.*rip=127\.0\.0\.3,", since=since)
    log = proxy.log_text()
    assert log.count("login refused by node1") == 100
    assert "marked down" not in log


def test_a_ban_threshold_bans_only_the_offending_client(
        start, balancer: BalancerFactory, pki: CertificateAuthority,
        users: dict[str, str]) -> None:
    threshold = 10
    proxy = start(security={"auth_fail_ban_threshold": threshold,
                            "auth_fail_ban_window": "1m", "ban_duration": "1m"})
    admin = Admin(proxy, pki)
    haproxy = balancer(proxy.listener("imaps"))
    # One wrong password per connection, 100 times: the first ``threshold`` reach Dovecot,
    # then 127.0.0.2 is banned and every later connection is reset before the greeting
    # (HAProxy passes the reset on).
    refused = answered = 0
    for _ in range(100):
        try:
            reply = wrong_passwords_on_one_connection(haproxy, pki, 1)[0]
        except (ssl.SSLError, ConnectionError, OSError):
            refused += 1
        else:
            assert b"NO [AUTHENTICATIONFAILED]" in reply, reply
            assert refused == 0, "answered again after the ban"
            answered += 1
    assert (answered, refused) == (threshold, 100 - threshold)
    stats = admin.stats()
    assert stats["bans"] == 1
    node1 = admin.destination("node1")
    assert (node1["circuit"], node1["consecutive_failures"]) == ("closed", 0)
    # Neither another client nor the balancer itself (its health checks keep passing).
    with through(haproxy, pki, source=OTHER_CLIENT) as client:
        assert login(client, "heidi", users["heidi"]).startswith(b"a1 OK")
    assert admin.ready()[0] == 200
    assert "is DOWN" not in haproxy.output_text()
    log = proxy.log_text()
    assert len(re.findall(r"client=127\.0\.0\.2:\d+ .*outcome=banned", log)) == 100 - threshold
    assert re.search(r"client=127\.0\.0\.(1|3):\d+ .*outcome=banned", log) is None


# --- drain ------------------------------------------------------------------------------------


def test_sigterm_drains_fifty_live_sessions_behind_haproxy(
        start, balancer: BalancerFactory, pki: CertificateAuthority) -> None:
    proxy = start(server={"shutdown_grace": "4s"})
    host, port = proxy.listener("imaps")
    # No health checks on this balancer: a check connection open at the moment of SIGTERM
    # would be one more session in the drain count.
    haproxy = balancer((host, port), check=False)
    accounts = list(USERS.items())

    def open_session(number: int) -> RawIMAP:
        user, password = accounts[number % len(accounts)]
        client = through(haproxy, pki, source=f"127.0.0.{10 + number % 5}")
        reply = login(client, user, password, b"d%d" % number)
        assert reply.startswith(b"d%d OK" % number), reply
        return client

    with ThreadPoolExecutor(10) as pool:
        sessions = list(pool.map(open_session, range(50)))
    try:
        assert Admin(proxy, pki).stats()["sessions"]["spliced"] == 50
        os.kill(proxy.pid, signal.SIGTERM)
        signalled = time.monotonic()
        time.sleep(0.3)
        with pytest.raises(ConnectionRefusedError):  # no longer accepting, at once
            connect_from(host, port, timeout=5)
        # Through the balancer, a new client gets no greeting either.
        assert refused_without_greeting(*haproxy.address, CLIENT, tls=pki.client_context())
        for number, client in enumerate(sessions):  # the 50 keep working during the grace
            reply = client.command(b"n%d" % number, b"NOOP")[-1]
            assert reply.startswith(b"n%d OK" % number), reply
        assert time.monotonic() - signalled < 4, "NOOPs did not finish within the grace"
        for client in sessions:  # then they are closed, once the grace is over
            with pytest.raises((ConnectionError, OSError)):
                while True:
                    client.readline()
        closed_after = time.monotonic() - signalled
        assert 4 - 0.5 <= closed_after < 4 + 5, closed_after
        assert wait_until(lambda: not proxy.running, timeout=15)
    finally:
        for client in sessions:
            client.close()
    log = proxy.log_text()
    assert "draining 50 sessions" in log
    assert len(re.findall(r"outcome=shutdown", log)) == 50
