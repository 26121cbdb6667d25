"""Submission through stalroute to real Dovecot nodes and a real Postfix (SPEC §5, §6).

The module starts its own servers (the shared Dovecot pair relays nowhere): an SMTP sink
(child process), two Dovecot nodes whose submission service relays to the sink (node1 also
lends Postfix its auth socket), a Postfix whose XCLIENT listener does SMTP AUTH through that
socket and relays to the sink, and one stalroute with ``submissions`` (implicit TLS) and
``submission`` (STARTTLS) listeners.

Routing table: alice → node1 (default: PROXY v2 + implicit TLS), bob → node2 (PROXY v2 +
STARTTLS), carol → node2 over STARTTLS with XCLIENT, frank → node1 over a cleartext leg with
XCLIENT, grace → Postfix (STARTTLS, XCLIENT, AUTH), erin → a destination that is down.
Every message must reach the sink through the mapped server, which must have seen the
client's address (127.0.0.2).
"""

from __future__ import annotations

import base64
import os
import smtplib
import uuid
from collections.abc import Iterator
from typing import NamedTuple

import pytest

from tests.conftest import require_binary, unavailable
from tests.harness.clients import connect_from, make_message
from tests.harness.dovecot import DovecotNode
from tests.harness.pki import CertificateAuthority, IssuedCertificate
from tests.harness.postfix import PostfixInstance, SASLDovecotNode
from tests.harness.protocol_configs import (
    CLIENT_IP,
    closed_port_destination,
    listeners,
    node_destination,
    postfix_submission_destination,
    proxy_config,
    run_tool,
    running_nodes,
    running_postfix,
    running_sink,
    running_stalroute,
    smtp,
    smtp_ssl,
    wait_for_login_log,
)
from tests.harness.smtp_sink import SMTPSink
from tests.harness.stalroute import StalrouteProcess

pytestmark = pytest.mark.integration

MAPPINGS = {
    "bob": "node2",
    "carol": "node2_xclient",
    "frank": "node1_plain",
    "grace": "postfix",
    "erin": "down",
}
#: user → (server, how the client's address travels)
ROUTES = {
    "alice": ("node1", "PROXY v2, implicit TLS"),
    "bob": ("node2", "PROXY v2, STARTTLS"),
    "carol": ("node2", "XCLIENT, STARTTLS"),
    "frank": ("node1", "XCLIENT, cleartext leg"),
    "grace": ("postfix", "Postfix XCLIENT, STARTTLS"),
}
RECIPIENT = "someone@example.net"


class Servers(NamedTuple):
    sink: SMTPSink
    node1: SASLDovecotNode
    node2: DovecotNode
    postfix: PostfixInstance
    proxy: StalrouteProcess


@pytest.fixture(scope="module")
def servers(
    tmp_path_factory: pytest.TempPathFactory,
    pki: CertificateAuthority,
    proxy_certificate: IssuedCertificate,
    users: dict[str, str],
) -> Iterator[Servers]:
    dovecot = require_binary("dovecot")
    postfix_binary = require_binary("postfix")
    if os.geteuid() != 0:
        unavailable("the Dovecot and Postfix fixtures must run as root")
    ca = pki.cert_path
    with (
        running_sink(tmp_path_factory.mktemp("sink")) as sink,
        running_nodes(pki, users, ("node1", "node2"), relay=sink.address,
                      sasl_for_postfix=("node1",), binary=dovecot) as (node1, node2),
        running_postfix(
            relay=sink.address,
            certificate=pki.issue(f"mx-{uuid.uuid4().hex[:8]}", ["mx.test", "localhost"]),
            sasl_path=node1.auth_socket,
            binary=postfix_binary,
        ) as postfix,
    ):
        destinations = {
            "node1": node_destination(node1, "submission", tls="implicit", ca_file=ca),
            "node2": node_destination(node2, "submission", tls="starttls", ca_file=ca),
            "node2_xclient": node_destination(
                node2, "submission", tls="starttls", forwarding="xclient", ca_file=ca
            ),
            "node1_plain": node_destination(
                node1, "submission", tls="plain", forwarding="xclient"
            ),
            "postfix": postfix_submission_destination(postfix, ca),
            "down": closed_port_destination("submission"),
        }
        config = proxy_config(
            proxy_certificate,
            destinations,
            default="node1",
            listener_tables=listeners("submissions", "submission"),
            backend_timeout="5s",
        )
        workdir = tmp_path_factory.mktemp("stalroute-submission")
        with running_stalroute(config, workdir, MAPPINGS) as proxy:
            yield Servers(sink, node1, node2, postfix, proxy)


def unique_subject(what: str) -> str:
    return f"{what} {uuid.uuid4().hex[:12]}"


def submissions(servers: Servers, pki: CertificateAuthority, source: str = CLIENT_IP):
    host, port = servers.proxy.listener("submissions")
    return smtp_ssl(host, port, context=pki.client_context(), source=source)


def assert_relayed(servers: Servers, subject: str, user: str) -> None:
    """The sink got ``subject`` from the server ``user`` is mapped to, which names the client
    address in its ``Received:`` header (and, for Postfix, in its log)."""
    server, how = ROUTES[user]
    message = servers.sink.wait_for_subject(subject)
    received = message.received()[0]
    assert f"[{CLIENT_IP}]" in received, received
    assert f"by {server if server != 'postfix' else 'mx'}.test" in received, received
    # Authenticated ("A"); over TLS ("S") as far as the server can tell: a PROXY v2 header
    # carries the client's TLS in its SSL TLV, a TLS leg is TLS itself, but XCLIENT over a
    # cleartext leg has no attribute for it that Dovecot 2.3 advertises.
    protocol = "ESMTPA" if "cleartext" in how else "ESMTPSA"
    assert f"with {protocol} " in received, received


def send(client: smtplib.SMTP, user: str, subject: str) -> None:
    message = make_message(subject, sender=f"{user}@example.org", to=RECIPIENT)
    assert client.sendmail(f"{user}@example.org", [RECIPIENT], message) == {}


@pytest.mark.parametrize("user", sorted(ROUTES), ids=lambda u: f"{u}-{ROUTES[u][1]}")
def test_smtplib_message_is_relayed_by_the_mapped_server_which_sees_the_client(
    servers: Servers, pki: CertificateAuthority, users: dict[str, str], user: str
) -> None:
    server, _ = ROUTES[user]
    since = {"node1": servers.node1, "node2": servers.node2, "postfix": servers.postfix}[
        server
    ].log.size()
    subject = unique_subject(f"smtplib {user}")
    if server == "postfix":
        host, port = servers.proxy.listener("submission")
        client = smtp(host, port, source=CLIENT_IP)
        client.starttls(context=pki.client_context())
    else:
        client = submissions(servers, pki)
    with client:
        client.login(user, users[user])
        send(client, user, subject)
    assert_relayed(servers, subject, user)
    if server == "postfix":
        servers.postfix.wait_for_log(
            rf"postfix/submission/smtpd\[\d+\]: \w+: client=\S*\[{CLIENT_IP}\], "
            rf"sasl_method=PLAIN, sasl_username={user}\b",
            since=since,
        )
    else:
        wait_for_login_log(getattr(servers, server), "submission", user, CLIENT_IP, since)


@pytest.mark.parametrize(
    ("mechanism", "user"),
    [("LOGIN", "bob"), ("PLAIN", "bob"), ("LOGIN", "grace"), ("PLAIN", "carol")],
)
def test_swaks_starttls_and_auth(
    servers: Servers, users: dict[str, str], mechanism: str, user: str
) -> None:
    swaks = require_binary("swaks")
    host, port = servers.proxy.listener("submission")
    subject = unique_subject(f"swaks {mechanism} {user}")
    result = run_tool([
        swaks, "--server", host, "--port", str(port), "--local-interface", CLIENT_IP,
        "--ehlo", "client.example", "--tls", "--auth", mechanism,
        "--auth-user", user, "--auth-password", users[user],
        "--from", f"{user}@example.org", "--to", RECIPIENT,
        "--header", f"Subject: {subject}", "--body", "sent by swaks through stalroute",
        "--timeout", "30",
    ])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "235 2.7.0 Authentication successful" in result.stdout
    assert_relayed(servers, subject, user)


@pytest.mark.parametrize("scheme", ["smtp", "smtps"], ids=["smtp-starttls", "smtps"])
def test_curl_submits_through_stalroute(
    servers: Servers, pki: CertificateAuthority, users: dict[str, str], tmp_path, scheme: str
) -> None:
    curl = require_binary("curl")
    host, port = servers.proxy.listener("submission" if scheme == "smtp" else "submissions")
    subject = unique_subject(f"curl {scheme}")
    message = tmp_path / "message.eml"
    message.write_bytes(make_message(subject, sender="bob@example.org", to=RECIPIENT))
    result = run_tool([
        curl, "--silent", "--show-error", "--max-time", "30", "--interface", CLIENT_IP,
        "--cacert", str(pki.cert_path), "--ssl-reqd",
        "--user", f"bob:{users['bob']}",
        f"{scheme}://{host}:{port}/client.example",
        "--mail-from", "bob@example.org", "--mail-rcpt", RECIPIENT,
        "--upload-file", str(message),
    ])
    assert result.returncode == 0, result.stderr
    assert_relayed(servers, subject, "bob")


def test_wrong_then_right_password_on_one_connection(
    servers: Servers, pki: CertificateAuthority, users: dict[str, str]
) -> None:
    subject = unique_subject("retry")
    with submissions(servers, pki) as client:
        client.ehlo()
        client.user, client.password = "bob", "not-" + users["bob"]
        with pytest.raises(smtplib.SMTPAuthenticationError) as failure:
            client.auth("PLAIN", client.auth_plain)
        assert failure.value.smtp_code == 535
        client.user, client.password = "bob", users["bob"]
        assert client.auth("PLAIN", client.auth_plain)[0] == 235
        send(client, "bob", subject)
    assert_relayed(servers, subject, "bob")


def test_cleartext_auth_before_starttls_is_refused(
    servers: Servers, pki: CertificateAuthority, users: dict[str, str]
) -> None:
    host, port = servers.proxy.listener("submission")
    with smtp(host, port) as client:
        client.ehlo()
        assert client.has_extn("starttls")
        code, text = client.docmd("AUTH", "PLAIN AGJvYgB4")
        assert (code, text[:6]) == (538, b"5.7.11")
        client.starttls(context=pki.client_context())
        client.login("bob", users["bob"])


def test_backend_down_is_421_and_the_connection_closes(
    servers: Servers, pki: CertificateAuthority, users: dict[str, str]
) -> None:
    with submissions(servers, pki) as client:
        client.ehlo()
        client.user, client.password = "erin", users["erin"]
        with pytest.raises(smtplib.SMTPAuthenticationError) as failure:
            client.auth("PLAIN", client.auth_plain)
        assert failure.value.smtp_code == 421
        assert failure.value.smtp_error.startswith(b"4.3.0 ")
        with pytest.raises(smtplib.SMTPServerDisconnected):
            client.noop()


def read_reply(reader) -> bytes:
    """One whole (multi-line) SMTP reply."""
    reply = b""
    while True:
        line = reader.readline()
        assert line, reply
        reply += line
        if line[3:4] == b" ":
            return reply


@pytest.mark.parametrize("user", ["bob", "grace"])
def test_pipelined_transaction_and_bdat_after_auth(
    servers: Servers, pki: CertificateAuthority, users: dict[str, str], user: str
) -> None:
    """RFC 2920: AUTH and the whole transaction in one write; the commands after AUTH go to
    the backend untouched, including a BDAT chunk (RFC 3030, CHUNKING)."""
    subject = unique_subject(f"pipelined bdat {user}")
    message = make_message(subject, sender=f"{user}@example.org", to=RECIPIENT)
    host, port = servers.proxy.listener("submissions")
    plain = base64.b64encode(f"\0{user}\0{users[user]}".encode())
    sock = pki.client_context().wrap_socket(
        connect_from(host, port, source=CLIENT_IP), server_hostname="localhost"
    )
    with sock, sock.makefile("rb") as reader:
        assert read_reply(reader).startswith(b"220 ")
        sock.sendall(b"EHLO client.example\r\n")
        assert b"PIPELINING" in read_reply(reader)
        sock.sendall(
            b"AUTH PLAIN " + plain + b"\r\n"
            + f"MAIL FROM:<{user}@example.org>\r\nRCPT TO:<{RECIPIENT}>\r\n".encode()
            + b"BDAT %d LAST\r\n" % len(message) + message
            + b"QUIT\r\n"
        )
        replies = [read_reply(reader) for _ in range(5)]
    assert [r[:3] for r in replies] == [b"235", b"250", b"250", b"250", b"221"], replies
    assert_relayed(servers, subject, user)
