"""SMTP pass-through (SPEC §5): stalroute relays port-25 sessions unparsed to Postfix.

The module starts an SMTP sink (child process), a Postfix whose port-25-style listener has
``smtpd_upstream_proxy_protocol = haproxy`` (a PROXY header first, then SMTP; STARTTLS offered
with a certificate for ``mx.test``) and relays to the sink, and stalroute with one ``smtp``
listener whose ``routing.smtp_passthrough_destination`` is that Postfix port. Clients connect
from 127.0.0.2; Postfix must log that address (it learns it only from stalroute's PROXY v2
header) and the message must reach the sink.
"""

from __future__ import annotations

import os
import re
import smtplib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from tests.conftest import require_binary, unavailable
from tests.harness.clients import connect_from, make_message
from tests.harness.pki import CertificateAuthority, IssuedCertificate
from tests.harness.postfix import PostfixInstance
from tests.harness.protocol_configs import (
    CLIENT_IP,
    closed_port_destination,
    listeners,
    postfix_passthrough_destination,
    proxy_config,
    run_tool,
    running_postfix,
    running_sink,
    running_stalroute,
    smtp,
)
from tests.harness.smtp_sink import SMTPSink
from tests.harness.stalroute import StalrouteProcess

pytestmark = pytest.mark.integration

RECIPIENT = "someone@example.net"


class Servers(NamedTuple):
    sink: SMTPSink
    postfix: PostfixInstance
    proxy: StalrouteProcess


def passthrough_config(
    certificate: IssuedCertificate, destination: dict[str, Any]
) -> dict[str, Any]:
    return proxy_config(
        certificate,
        {"mx": destination},
        default="mx",
        passthrough="mx",
        listener_tables=listeners("smtp"),
        backend_timeout="3s",
    )


@pytest.fixture(scope="module")
def servers(
    tmp_path_factory: pytest.TempPathFactory,
    pki: CertificateAuthority,
    proxy_certificate: IssuedCertificate,
) -> Iterator[Servers]:
    postfix_binary = require_binary("postfix")
    if os.geteuid() != 0:
        unavailable("the Postfix fixture must run as root")
    with (
        running_sink(tmp_path_factory.mktemp("sink")) as sink,
        running_postfix(
            relay=sink.address,
            certificate=pki.issue(f"mx-{uuid.uuid4().hex[:8]}", ["mx.test", "localhost"]),
            binary=postfix_binary,
        ) as postfix,
    ):
        config = passthrough_config(proxy_certificate, postfix_passthrough_destination(postfix))
        workdir = tmp_path_factory.mktemp("stalroute-smtp")
        with running_stalroute(config, workdir) as proxy:
            yield Servers(sink, postfix, proxy)


def unique_subject(what: str) -> str:
    return f"{what} {uuid.uuid4().hex[:12]}"


def assert_postfix_saw_the_client(servers: Servers, since: int, subject: str) -> str:
    """Postfix's log names 127.0.0.2 (from the PROXY header); the sink got the message with
    Postfix's ``Received:`` header naming it too. Returns that header."""
    servers.postfix.wait_for_log(
        rf"postfix/pp/smtpd\[\d+\]: connect from \S*\[{re.escape(CLIENT_IP)}\]", since=since
    )
    servers.postfix.wait_for_log(
        rf"postfix/pp/smtpd\[\d+\]: \w+: client=\S*\[{re.escape(CLIENT_IP)}\]", since=since
    )
    received = servers.sink.wait_for_subject(subject).received()[0]
    assert f"[{CLIENT_IP}]" in received and "by mx.test (Postfix)" in received, received
    return received


def test_curl_smtp_through_the_passthrough(servers: Servers, tmp_path: Path) -> None:
    curl = require_binary("curl")
    host, port = servers.proxy.listener("smtp")
    subject = unique_subject("curl smtp")
    message = tmp_path / "message.eml"
    message.write_bytes(make_message(subject, sender="curl@example.org", to=RECIPIENT))
    since = servers.postfix.log.size()
    result = run_tool([
        curl, "--silent", "--show-error", "--max-time", "30", "--interface", CLIENT_IP,
        f"smtp://{host}:{port}/client.example",
        "--mail-from", "curl@example.org", "--mail-rcpt", RECIPIENT,
        "--upload-file", str(message),
    ])
    assert result.returncode == 0, result.stderr
    received = assert_postfix_saw_the_client(servers, since, subject)
    assert "from client.example" in received


def test_smtplib_starttls_is_end_to_end_with_postfix(
    servers: Servers, pki: CertificateAuthority
) -> None:
    host, port = servers.proxy.listener("smtp")
    subject = unique_subject("smtplib starttls")
    since = servers.postfix.log.size()
    with smtp(host, port, source=CLIENT_IP) as client:
        code, banner = client.ehlo()
        assert code == 250 and banner.startswith(b"mx.test")  # Postfix itself answers
        client.starttls(context=pki.client_context())
        # The TLS session is Postfix's: its certificate, not stalroute's.
        subject_cn = dict(item[0] for item in client.sock.getpeercert()["subject"])
        assert subject_cn["commonName"] == "mx.test"
        client.ehlo()
        message = make_message(subject, sender="smtplib@example.org", to=RECIPIENT)
        assert client.sendmail("smtplib@example.org", [RECIPIENT], message) == {}
    received = assert_postfix_saw_the_client(servers, since, subject)
    assert "with ESMTPS" in received


def test_pipelined_commands_before_the_greeting_are_kept(servers: Servers) -> None:
    """Bytes a client sends before Postfix's greeting are held and relayed after it."""
    host, port = servers.proxy.listener("smtp")
    with connect_from(host, port, source=CLIENT_IP) as sock:
        sock.sendall(b"EHLO early.example\r\n")
        data = b""
        while b"\r\n250 " not in data:
            chunk = sock.recv(4096)
            assert chunk, data
            data += chunk
        assert data.startswith(b"220 mx.test ESMTP"), data
        sock.sendall(b"QUIT\r\n")


def test_backend_down_is_a_421_greeting(
    tmp_path: Path, proxy_certificate: IssuedCertificate
) -> None:
    config = passthrough_config(proxy_certificate, closed_port_destination("smtp", tls="plain"))
    with running_stalroute(config, tmp_path / "stalroute-down") as proxy:
        host, port = proxy.listener("smtp")
        with pytest.raises(smtplib.SMTPConnectError) as failure:
            smtp(host, port, source=CLIENT_IP)
        assert failure.value.smtp_code == 421
        assert failure.value.smtp_error.startswith(b"4.3.0 ")


def test_plain_passthrough_leg_needs_no_allow_plaintext_auth(
    servers: Servers, tmp_path: Path, proxy_certificate: IssuedCertificate
) -> None:
    destination = postfix_passthrough_destination(servers.postfix)
    config = passthrough_config(proxy_certificate, destination)
    with running_stalroute(config, tmp_path / "stalroute-plain") as proxy:
        host, port = proxy.listener("smtp")
        with smtp(host, port, source=CLIENT_IP, timeout=10) as client:
            code, banner = client.ehlo()
            assert code == 250 and banner.startswith(b"mx.test")


def test_xclient_forwarding_announces_the_client_before_the_greeting(
    servers: Servers, tmp_path: Path, proxy_certificate: IssuedCertificate
) -> None:
    """With ``forwarding = "xclient"`` the pass-through leg runs EHLO + XCLIENT first; the
    client then sees Postfix's fresh greeting and Postfix logs the real client."""
    destination = {
        "host": servers.postfix.host,
        "forwarding": "xclient",
        "protocol": {"smtp": {"port": servers.postfix.ports.submission, "tls": "plain"}},
    }
    config = passthrough_config(proxy_certificate, destination)
    since = servers.postfix.log.size()
    with running_stalroute(config, tmp_path / "stalroute-xclient") as proxy:
        host, port = proxy.listener("smtp")
        with smtp(host, port, source=CLIENT_IP, timeout=10) as client:
            assert client.ehlo()[0] == 250
            assert client.mail("xclient@example.org")[0] == 250
            client.rcpt(RECIPIENT)  # that port relays for SASL clients only: a logged refusal
    servers.postfix.wait_for_log(
        rf"postfix/submission/smtpd\[\d+\]: NOQUEUE: reject: RCPT from "
        rf"\S*\[{re.escape(CLIENT_IP)}\]", since=since)
