"""Issue 11 items 1, 2 and 7 against a real stalroute in front of the real Dovecot pair:
no ghost sessions after LOGOUT with pipelined commands over implicit TLS, kicks that always
work, bounded memory for a pre-auth client that never reads, and abandoned logins that never
reach the backend."""

from __future__ import annotations

import socket
import ssl
import time

import pytest

from tests.conftest import DovecotPair, StalrouteFactory
from tests.harness.pki import CertificateAuthority, IssuedCertificate
from tests.integration.test_admin import (  # noqa: F401 - start is a fixture
    Admin, imaps, is_closed, logged_in, proxy_config, start, wait_until,
)

pytestmark = pytest.mark.integration


def raw_imaps(proxy, pki: CertificateAuthority) -> ssl.SSLSocket:
    host, port = proxy.listener("imaps")
    raw = socket.create_connection((host, port), timeout=30)
    return pki.client_context().wrap_socket(raw, server_hostname="localhost")


def read_until(sock: ssl.SSLSocket, marker: bytes) -> bytes:
    data = b""
    while marker not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def sessions_open(admin: Admin) -> int:
    return admin.ok("GET", "/stats")["sessions"]["open"]


def test_logout_with_pipelined_commands_leaves_no_ghost_session(start, pki, users) -> None:
    proxy, admin = start()
    for _ in range(6):
        sock = raw_imaps(proxy, pki)
        read_until(sock, b"\r\n")
        sock.sendall(f"a1 LOGIN alice {users['alice']}\r\n".encode())
        read_until(sock, b"a1 OK")
        sock.sendall(b"a2 LOGOUT\r\n")
        read_until(sock, b"a2 OK")  # the backend closes now, and stalroute closes us...
        sock.sendall(b"".join(b"n%d NOOP\r\n" % i for i in range(20)))  # ...while these arrive
        sock.close()
    wait_until(lambda: sessions_open(admin) == 0)
    assert admin.ok("GET", "/connections") == {"connections": []}
    assert "AttributeError" not in proxy.log_text()
    # A live session of alice is still kicked (the admin action works after the above).
    idle = logged_in(proxy, pki, users, "alice")
    assert admin.ok("POST", "/connections/kick?identifier=alice")["kicked"] == 1
    wait_until(lambda: is_closed(idle))
    wait_until(lambda: sessions_open(admin) == 0)


def test_a_preauth_client_that_never_reads_keeps_memory_bounded(start, pki) -> None:
    proxy, admin = start()
    before = proxy.rss_kb()
    sock = raw_imaps(proxy, pki)
    sock.settimeout(0.5)
    command = b"a CAPABILITY\r\n" * 4096
    sent = 0
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:
        try:
            sent += sock.send(command)
        except (TimeoutError, ssl.SSLWantWriteError):
            continue  # both buffers full: stalroute stopped reading us
    grown = proxy.rss_kb() - before
    assert sent > 0
    assert grown < 32 * 1024, f"grew {grown} KiB for one non-reading client"
    # It is still served, nothing lost: once we read, the answers flow again.
    sock.settimeout(30)
    assert b"a OK" in read_until(sock, b"a OK")
    sock.close()
    with imaps(proxy, pki) as other:  # and the reactor is not stuck
        other.noop()
    wait_until(lambda: sessions_open(admin) == 0)


def test_a_login_held_past_the_preauth_timeout_never_reaches_the_backend(
        stalroute: StalrouteFactory, pki: CertificateAuthority,
        proxy_certificate: IssuedCertificate, users, dovecot_pair: DovecotPair) -> None:
    config = proxy_config(pki, proxy_certificate, dovecot_pair)
    config["listener"]["imaps"]["preauth_timeout"] = "2s"
    proxy = stalroute(config)
    admin = Admin(proxy, pki)
    admin.ok("POST", "/connections/delay?identifier=alice&seconds=4")
    node_log = len(dovecot_pair[0].log_text())
    with raw_imaps(proxy, pki) as sock:
        read_until(sock, b"\r\n")
        sock.sendall(f"a1 LOGIN alice {users['alice']}\r\n".encode())
        answer = read_until(sock, b"\r\n")  # the pre-auth timeout's goodbye
        # The client neither reads on nor closes (no TLS close_notify back) until the
        # delay is over: the abandoned login must not go on meanwhile.
        time.sleep(3)
    assert b"BYE" in answer
    wait_until(lambda: sessions_open(admin) == 0)
    text = proxy.log_text()
    assert "AlreadyCalled" not in text and "Unhandled" not in text
    assert "spliced to" not in text
    assert "user=<alice>" not in dovecot_pair[0].log_text()[node_log:]
