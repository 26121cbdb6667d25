"""Acceptance tests of the IMAP proxy (SPEC §3, §5 IMAP, §6) against two real Dovecot nodes.

Routing table of these tests (``mappings.tsv``): bob → node2, carol → node2 with a pinned
certificate, dave → node2 with a wrong pin, grace → node2 under a wrong TLS name, erin → a
destination that is down; everyone else (alice, frank, heidi) is unmapped → node1. Backend
legs carry a PROXY v2 header, then implicit TLS (node1) or STARTTLS (node2).
"""

from __future__ import annotations

import imaplib
import re
import subprocess
import time
import uuid
from typing import Any

import pytest

from tests.conftest import DovecotPair, StalrouteFactory, require_binary
from tests.harness.clients import (
    RawIMAP,
    SourceIMAP4,
    SourceIMAP4_SSL,
    fetch_subject,
    make_message,
    sasl_plain,
)
from tests.harness.dovecot import welcome_subject
from tests.harness.pki import CertificateAuthority, IssuedCertificate
from tests.harness.ports import LOOPBACK
from tests.harness.stalroute import (
    StalrouteProcess,
    closed_destination,
    dovecot_destination,
    two_node_imap_config,
)

pytestmark = pytest.mark.integration

MAPPINGS = {
    "bob": "node2",
    "carol": "pinned",
    "dave": "wrongpin",
    "grace": "wrongname",
    "erin": "down",
}
CLIENT_IP = "127.0.0.2"
SUBJECT_FETCH = b"FETCH 1 (BODY.PEEK[HEADER.FIELDS (SUBJECT)])"


def start_proxy(
    stalroute: StalrouteFactory,
    pki: CertificateAuthority,
    proxy_certificate: IssuedCertificate,
    dovecot_pair: DovecotPair,
    **options: Any,
) -> StalrouteProcess:
    """stalroute in front of both nodes, plus the TLS-policy and down destinations."""
    node1, node2 = dovecot_pair
    config = two_node_imap_config(proxy_certificate, pki.cert_path, node1, node2, **options)
    config["destination"].update(
        pinned=dovecot_destination(node2, pin_sha256=node2.certificate.sha256),
        wrongpin=dovecot_destination(node2, pin_sha256="ab" * 32),
        wrongname=dovecot_destination(node2, ca_file=pki.cert_path, server_name="wrong.test"),
        down=closed_destination(),
    )
    return stalroute(config, mappings=MAPPINGS)


@pytest.fixture
def proxy(
    stalroute: StalrouteFactory,
    pki: CertificateAuthority,
    proxy_certificate: IssuedCertificate,
    dovecot_pair: DovecotPair,
) -> StalrouteProcess:
    return start_proxy(stalroute, pki, proxy_certificate, dovecot_pair)


def imaps(
    proxy: StalrouteProcess, pki: CertificateAuthority, source: str = LOOPBACK
) -> SourceIMAP4_SSL:
    """imaplib on the implicit-TLS listener, connecting from ``source``."""
    host, port = proxy.listener("imaps")
    return SourceIMAP4_SSL(
        host, port, ssl_context=pki.client_context(), server_hostname="localhost", source=source
    )


def raw_imaps(proxy: StalrouteProcess, pki: CertificateAuthority, **options: Any) -> RawIMAP:
    """A raw client on the implicit-TLS listener, greeting already read."""
    host, port = proxy.listener("imaps")
    return RawIMAP.connect(host, port, ssl_context=pki.client_context(), **options)


def raw_inbox_subject(client: RawIMAP) -> bytes:
    """SELECT INBOX and FETCH message 1's subject over a logged-in raw client."""
    assert client.command(b"s1", b"SELECT INBOX")[-1].startswith(b"s1 OK")
    lines = client.command(b"s2", SUBJECT_FETCH)
    assert lines[-1].startswith(b"s2 OK"), lines
    return b"".join(lines)


def assert_ok(lines: list[bytes], tag: bytes) -> None:
    assert lines[-1].startswith(tag + b" OK"), lines


# --- routing and client address --------------------------------------------------------------


@pytest.mark.parametrize(("user", "node"), [("alice", "node1"), ("bob", "node2")])
def test_user_lands_on_mapped_node(
    proxy: StalrouteProcess,
    pki: CertificateAuthority,
    users: dict[str, str],
    user: str,
    node: str,
) -> None:
    with imaps(proxy, pki) as client:
        client.login(user, users[user])
        assert fetch_subject(client) == welcome_subject(node, user)


@pytest.mark.parametrize(("user", "node"), [("alice", "node1"), ("bob", "node2")])
def test_dovecot_sees_real_client_address(
    proxy: StalrouteProcess,
    pki: CertificateAuthority,
    users: dict[str, str],
    dovecot_pair: DovecotPair,
    user: str,
    node: str,
) -> None:
    backend = getattr(dovecot_pair, node)
    since = backend.log.size()
    with imaps(proxy, pki, source=CLIENT_IP) as client:
        client.login(user, users[user])
    backend.wait_for_log(rf"Login: user=<{user}>.*rip={re.escape(CLIENT_IP)},", since=since)


# --- client TLS modes and authentication forms -----------------------------------------------


def test_starttls_listener(
    proxy: StalrouteProcess, pki: CertificateAuthority, users: dict[str, str]
) -> None:
    host, port = proxy.listener("imap")
    with SourceIMAP4(host, port) as client:
        assert {"STARTTLS", "LOGINDISABLED"} <= set(client.capabilities)
        with pytest.raises(imaplib.IMAP4.error, match="PRIVACYREQUIRED"):
            client.login("bob", users["bob"])
        client.starttls(pki.client_context())
        assert "LOGINDISABLED" not in client.capabilities
        client.login("bob", users["bob"])
        assert fetch_subject(client) == welcome_subject("node2", "bob")


def test_authenticate_plain_with_continuation(
    proxy: StalrouteProcess, pki: CertificateAuthority, users: dict[str, str]
) -> None:
    with imaps(proxy, pki) as client:
        client.authenticate("PLAIN", lambda _challenge: f"\0bob\0{users['bob']}".encode())
        assert fetch_subject(client) == welcome_subject("node2", "bob")


def test_authenticate_plain_with_sasl_ir(
    proxy: StalrouteProcess, pki: CertificateAuthority, users: dict[str, str]
) -> None:
    with raw_imaps(proxy, pki) as client:
        assert b"SASL-IR" in client.greeting
        assert_ok(
            client.command(b"a1", b"AUTHENTICATE PLAIN " + sasl_plain("bob", users["bob"])), b"a1"
        )
        assert welcome_subject("node2", "bob").encode() in raw_inbox_subject(client)


@pytest.mark.parametrize("synchronising", [True, False], ids=["sync", "nonsync"])
def test_login_with_literals(
    proxy: StalrouteProcess,
    pki: CertificateAuthority,
    users: dict[str, str],
    synchronising: bool,
) -> None:
    user, password = b"bob", users["bob"].encode()
    with raw_imaps(proxy, pki) as client:
        if synchronising:
            client.send(b"a1 LOGIN {%d}\r\n" % len(user))
            assert client.readline().startswith(b"+")
            client.send(user + b" {%d}\r\n" % len(password))
            assert client.readline().startswith(b"+")
            client.send(password + b"\r\n")
        else:
            client.send(
                b"a1 LOGIN {%d+}\r\n%s {%d+}\r\n%s\r\n" % (len(user), user, len(password), password)
            )
        assert_ok(client.read_until_tagged(b"a1"), b"a1")
        assert welcome_subject("node2", "bob").encode() in raw_inbox_subject(client)


def test_wrong_then_right_password_on_one_connection(
    proxy: StalrouteProcess, pki: CertificateAuthority, users: dict[str, str]
) -> None:
    with imaps(proxy, pki) as client:
        with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
            client.login("bob", "not-" + users["bob"])
        client.login("bob", users["bob"])
        assert fetch_subject(client) == welcome_subject("node2", "bob")


# --- the spliced session -----------------------------------------------------------------------


def test_idle_receives_exists(
    proxy: StalrouteProcess,
    pki: CertificateAuthority,
    users: dict[str, str],
    dovecot_pair: DovecotPair,
) -> None:
    with raw_imaps(proxy, pki) as client:
        assert_ok(client.command(b"a1", b"LOGIN frank " + users["frank"].encode()), b"a1")
        selected = client.command(b"a2", b"SELECT INBOX")
        exists = int(re.search(rb"\* (\d+) EXISTS", b"".join(selected)).group(1))
        client.send(b"a3 IDLE\r\n")
        assert client.readline().startswith(b"+")
        time.sleep(1)  # idle for a moment before the mailbox changes
        dovecot_pair.node1.seed("frank", [make_message("arrives during IDLE")])
        while not (match := re.match(rb"\* (\d+) EXISTS", client.readline())):
            pass
        assert int(match.group(1)) == exists + 1
        client.send(b"DONE\r\n")
        assert_ok(client.read_until_tagged(b"a3"), b"a3")


def test_large_append_and_fetch_are_byte_identical(
    proxy: StalrouteProcess, pki: CertificateAuthority, users: dict[str, str]
) -> None:
    message = make_message("large message", size=24 * 2**20)
    mailbox = f"Large-{uuid.uuid4().hex[:8]}"
    with imaps(proxy, pki) as client:
        client.login("heidi", users["heidi"])
        assert client.create(mailbox)[0] == "OK"
        assert client.append(mailbox, None, None, message)[0] == "OK"
        client.select(mailbox, readonly=True)
        status, data = client.fetch("1", "(BODY.PEEK[])")
        assert status == "OK"
        assert data[0][1] == message


def test_slow_reader_does_not_grow_proxy_memory(
    proxy: StalrouteProcess,
    pki: CertificateAuthority,
    users: dict[str, str],
    dovecot_pair: DovecotPair,
) -> None:
    mailbox = f"Huge-{uuid.uuid4().hex[:8]}"
    dovecot_pair.node1.seed("heidi", [make_message("huge", size=50 * 2**20)], mailbox=mailbox)
    with raw_imaps(proxy, pki, rcvbuf=16 * 1024) as client:
        assert_ok(client.command(b"a1", b"LOGIN heidi " + users["heidi"].encode()), b"a1")
        assert_ok(client.command(b"a2", b"SELECT " + mailbox.encode()), b"a2")
        time.sleep(0.5)
        before = peak = proxy.rss_kb()
        client.send(b"a3 FETCH 1 BODY.PEEK[]\r\n")  # ... and read nothing for a while
        for _ in range(16):
            time.sleep(0.25)
            peak = max(peak, proxy.rss_kb())
        assert client.sock.recv(4096), "the session must still be alive"
    assert peak - before < 16 * 1024, f"RSS grew by {peak - before} KiB"


# --- backend failures and backend TLS policy ------------------------------------------------


def test_backend_down_is_a_temporary_failure(
    proxy: StalrouteProcess, pki: CertificateAuthority, users: dict[str, str]
) -> None:
    with imaps(proxy, pki) as client:
        with pytest.raises(imaplib.IMAP4.error, match=r"\[UNAVAILABLE\]") as failure:
            client.login("erin", users["erin"])
        assert "AUTHENTICATIONFAILED" not in str(failure.value)


def test_backend_certificate_pin_is_accepted(
    proxy: StalrouteProcess, pki: CertificateAuthority, users: dict[str, str]
) -> None:
    with imaps(proxy, pki) as client:
        client.login("carol", users["carol"])  # destination "pinned": no CA, only the pin
        assert fetch_subject(client) == welcome_subject("node2", "carol")


@pytest.mark.parametrize("user", ["dave", "grace"], ids=["wrong-pin", "wrong-name"])
def test_backend_tls_mismatch_is_a_temporary_failure(
    proxy: StalrouteProcess, pki: CertificateAuthority, users: dict[str, str], user: str
) -> None:
    with imaps(proxy, pki) as client:
        with pytest.raises(imaplib.IMAP4.error, match=r"\[UNAVAILABLE\]"):
            client.login(user, users[user])


# --- third-party client, secrets --------------------------------------------------------------


def test_curl_lists_and_fetches(
    proxy: StalrouteProcess, pki: CertificateAuthority, users: dict[str, str]
) -> None:
    curl = require_binary("curl")
    host, port = proxy.listener("imaps")

    def run(path: str) -> str:
        result = subprocess.run(
            [
                curl,
                "--silent",
                "--show-error",
                "--max-time",
                "30",
                "--cacert",
                str(pki.cert_path),
                "--user",
                f"bob:{users['bob']}",
                f"imaps://{host}:{port}/{path}",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    assert re.search(r"^\* LIST .*INBOX", run(""), re.MULTILINE)
    assert f"Subject: {welcome_subject('node2', 'bob')}" in run("INBOX;MAILINDEX=1")


def test_passwords_never_reach_the_log(
    stalroute: StalrouteFactory,
    pki: CertificateAuthority,
    proxy_certificate: IssuedCertificate,
    dovecot_pair: DovecotPair,
    users: dict[str, str],
) -> None:
    proxy = start_proxy(stalroute, pki, proxy_certificate, dovecot_pair, log_level="debug")
    wrong = "Wrong-Pw-5v8k"
    with imaps(proxy, pki) as client:
        with pytest.raises(imaplib.IMAP4.error):
            client.login("alice", wrong)
        client.login("alice", users["alice"])
    with imaps(proxy, pki) as client:
        client.authenticate("PLAIN", lambda _challenge: f"\0bob\0{users['bob']}".encode())
    with raw_imaps(proxy, pki) as client:
        assert_ok(
            client.command(b"a1", b"AUTHENTICATE PLAIN " + sasl_plain("frank", users["frank"])),
            b"a1",
        )
    with imaps(proxy, pki) as client:
        with pytest.raises(imaplib.IMAP4.error):
            client.login("erin", users["erin"])  # backend down: the password stays put
    proxy.stop()
    log = proxy.log_text() + proxy.output_text()
    assert log.strip(), "stalroute wrote no log at all"
    secrets = {wrong, users["alice"], users["bob"], users["frank"], users["erin"]}
    secrets |= {
        sasl_plain("bob", users["bob"]).decode(),
        sasl_plain("frank", users["frank"]).decode(),
    }
    assert not [s for s in secrets if s in log]
