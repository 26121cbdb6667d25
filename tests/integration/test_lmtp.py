"""LMTP pass-through (SPEC §5) in front of a real LMTP server, Dovecot's ``dovecot-lmtpd``.

stalroute has one ``lmtp`` listener whose ``routing.smtp_passthrough_destination`` is a Dovecot
node's LMTP service, announcing the client with a PROXY v2 header (to the ``haproxy = yes``
listener) or with XCLIENT (to the plain listener, which offers XCLIENT to 127.0.0.0/8). A
client at 127.0.0.2 delivers with ``smtplib.LMTP`` (LHLO, MAIL, RCPT, DATA); the message must
land in the recipient's INBOX (read back over Dovecot's own IMAP) with a ``Received:`` header
naming 127.0.0.2, which Dovecot only learns from stalroute.
"""

from __future__ import annotations

import email
import os
import re
import smtplib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_binary, unavailable
from tests.harness.dovecot import DovecotNode
from tests.harness.pki import CertificateAuthority, IssuedCertificate
from tests.harness.protocol_configs import CLIENT_IP, listener, proxy_config, running_stalroute
from tests.harness.stalroute import StalrouteProcess

pytestmark = pytest.mark.integration

LMTP_BINARY = Path("/usr/lib/dovecot/lmtp")
RECIPIENT, BYSTANDER = "alice", "bob"


@pytest.fixture(scope="module")
def node(pki: CertificateAuthority, users: dict[str, str]) -> Iterator[DovecotNode]:
    """A Dovecot node with its LMTP listeners (the shared nodes have none)."""
    binary = require_binary("dovecot")
    if os.geteuid() != 0:
        unavailable("the Dovecot fixtures must run as root")
    if not LMTP_BINARY.exists():
        unavailable("dovecot-lmtpd is not installed (scripts/bootstrap installs it)")
    certificate = pki.issue(f"lmtp-{uuid.uuid4().hex[:8]}", ["lmtp.test", "localhost"],
                            ["127.0.0.1"])
    with DovecotNode("lmtp", users=users, certificate=certificate, binary=binary,
                     lmtp=True) as started:
        yield started


def lmtp_destination(node: DovecotNode, forwarding: str) -> dict[str, Any]:
    """The node's LMTP service: its ``haproxy = yes`` listener for ``proxy``, the plain
    (XCLIENT-offering) one for ``xclient``."""
    port = node.ports.lmtp_haproxy if forwarding == "proxy" else node.ports.lmtp
    return {"host": node.host, "forwarding": forwarding,
            "protocol": {"lmtp": {"port": port, "tls": "plain"}}}


@pytest.fixture(params=["proxy", "xclient"])
def proxy(request: pytest.FixtureRequest, node: DovecotNode, tmp_path: Path,
          proxy_certificate: IssuedCertificate) -> Iterator[StalrouteProcess]:
    config = proxy_config(proxy_certificate, {"mailstore": lmtp_destination(node, request.param)},
                          default="mailstore", passthrough="mailstore",
                          listener_tables={"lmtp": listener("lmtp", "plain")},
                          backend_timeout="3s")
    with running_stalroute(config, tmp_path / "stalroute") as started:
        yield started


def inbox_messages_with(node: DovecotNode, user: str, subject: str) -> list[email.message.Message]:
    """Messages of ``user``'s INBOX on ``node`` (over Dovecot's own IMAP) with ``subject``."""
    client = node.imap(user)
    try:
        client.select("INBOX", readonly=True)
        _, found = client.search(None, "SUBJECT", f'"{subject}"')
        messages = []
        for number in found[0].split():
            _, data = client.fetch(number, "(BODY.PEEK[HEADER])")
            messages.append(email.message_from_bytes(data[0][1]))
        return messages
    finally:
        client.logout()


def test_delivery_reaches_the_recipients_mailbox_with_the_real_client(
    proxy: StalrouteProcess, node: DovecotNode
) -> None:
    subject = f"lmtp delivery {uuid.uuid4().hex[:12]}"
    message = (f"From: sender@example.org\r\nTo: {RECIPIENT}@example.com\r\n"
               f"Subject: {subject}\r\n\r\nDelivered through stalroute.\r\n").encode()
    since = node.log.size()
    host, port = proxy.listener("lmtp")

    client = smtplib.LMTP(host, port, local_hostname="client.example", timeout=10,
                          source_address=(CLIENT_IP, 0))
    try:
        code, capabilities = client.ehlo()  # LHLO
        assert code == 250 and capabilities.startswith(b"lmtp.test")  # Dovecot answers
        assert client.sendmail("sender@example.org", [f"{RECIPIENT}@example.com"], message) == {}
    finally:
        # Hang up without QUIT, as a connection-caching MTA does: the session's end is the
        # client's (after QUIT, Dovecot and the client race to close first).
        client.close()

    node.wait_for_log(rf"lmtp\({RECIPIENT}\)<\d+><[^>]+>: Info: msgid=unspecified: "
                      r"saved mail to INBOX", since=since)
    (delivered,) = inbox_messages_with(node, RECIPIENT, subject)
    received = " ".join(delivered["Received"].split())
    assert re.match(rf"from client\.example \(\[{re.escape(CLIENT_IP)}\]\) by lmtp\.test "
                    r"with LMTP", received), received
    assert delivered["Delivered-To"] == f"{RECIPIENT}@example.com"
    assert inbox_messages_with(node, BYSTANDER, subject) == []
    # A delivery is a session, not a health-check probe (those are logged at debug level).
    proxy.log.wait_for(rf"\[stalroute\.session#info\] session \S+ lmtp "
                       rf"client={re.escape(CLIENT_IP)}:\d+ account=- destination=mailstore "
                       r"outcome=client_closed in=[1-9]")
