"""ManageSieve through stalroute against two real Dovecot/Pigeonhole nodes (SPEC §5, §6).

One stalroute for the module with a STARTTLS ``sieve`` listener, driven by a raw RFC 5804
client. Routing table: alice → node1 (default: PROXY v2 + STARTTLS), bob → node2 (PROXY v2 +
STARTTLS), carol → node2 over STARTTLS with XCLIENT, frank → node1 over a cleartext leg with
XCLIENT (``allow_plaintext_auth``), erin → a destination that is down. A script uploaded
through the proxy must appear in the home directory of the user *on the mapped node*.
"""

from __future__ import annotations

import base64
import os
import re
import subprocess
import uuid
from collections.abc import Iterator

import pytest

from tests.conftest import DovecotPair, require_binary
from tests.harness.dovecot import DovecotNode
from tests.harness.pki import CertificateAuthority, IssuedCertificate
from tests.harness.ports import LOOPBACK
from tests.harness.protocol_configs import (
    CLIENT_IP,
    ManageSieveClient,
    closed_port_destination,
    listeners,
    node_destination,
    proxy_config,
    running_stalroute,
    wait_for_login_log,
)
from tests.harness.stalroute import StalrouteProcess

pytestmark = pytest.mark.integration

MAPPINGS = {"bob": "node2", "carol": "node2_xclient", "frank": "node1_plain", "erin": "down"}
ROUTES = {
    "alice": ("node1", "PROXY v2, STARTTLS"),
    "bob": ("node2", "PROXY v2, STARTTLS"),
    "carol": ("node2", "XCLIENT, STARTTLS"),
    "frank": ("node1", "XCLIENT, cleartext leg"),
}
SCRIPT = (
    b'require "fileinto";\r\n'
    b'if header :contains "subject" "sieve" {\r\n  fileinto "INBOX";\r\n}\r\n'
)


@pytest.fixture(scope="module")
def proxy(
    tmp_path_factory: pytest.TempPathFactory,
    pki: CertificateAuthority,
    proxy_certificate: IssuedCertificate,
    dovecot_pair: DovecotPair,
) -> Iterator[StalrouteProcess]:
    node1, node2 = dovecot_pair
    ca = pki.cert_path
    destinations = {
        "node1": node_destination(node1, "managesieve", tls="starttls", ca_file=ca),
        "node2": node_destination(node2, "managesieve", tls="starttls", ca_file=ca),
        "node2_xclient": node_destination(
            node2, "managesieve", tls="starttls", forwarding="xclient", ca_file=ca
        ),
        "node1_plain": node_destination(node1, "managesieve", tls="plain", forwarding="xclient"),
        "down": closed_port_destination("managesieve"),
    }
    config = proxy_config(
        proxy_certificate,
        destinations,
        default="node1",
        listener_tables=listeners("sieve"),
        backend_timeout="3s",
    )
    with running_stalroute(config, tmp_path_factory.mktemp("stalroute-sieve"), MAPPINGS) as p:
        yield p


def connect(
    proxy: StalrouteProcess, pki: CertificateAuthority, source: str = LOOPBACK
) -> ManageSieveClient:
    """Connected, STARTTLS done, capabilities re-read."""
    client = ManageSieveClient.connect(*proxy.listener("sieve"), source=source)
    client.starttls(pki.client_context())
    return client


def ok(status: bytes) -> bool:
    return status.upper().startswith(b"OK")


def script_path(node: DovecotNode, user: str, name: str):
    return node.dir / "home" / user / "sieve" / f"{name}.sieve"


def test_capabilities_before_and_after_starttls(proxy: StalrouteProcess,
                                                 pki: CertificateAuthority) -> None:
    with ManageSieveClient.connect(*proxy.listener("sieve")) as client:
        before = client.capabilities
        assert "STARTTLS" in before and "IMPLEMENTATION" in before
        assert "PLAIN" not in before["SASL"].split()
        client.starttls(pki.client_context())
        after = client.capabilities
        assert "STARTTLS" not in after
        assert {"PLAIN", "LOGIN"} <= set(after["SASL"].split())


def test_enotify_comes_with_its_notify_methods(proxy: StalrouteProcess) -> None:
    """RFC 5804 §1.7: a server with "enotify" MUST advertise NOTIFY with its methods."""
    with ManageSieveClient.connect(*proxy.listener("sieve")) as client:
        assert "enotify" in client.capabilities["SIEVE"].split()
        assert client.capabilities["NOTIFY"] == "mailto"


def test_sieve_connect_lists_scripts_without_complaint(
    proxy: StalrouteProcess, pki: CertificateAuthority, users: dict[str, str]
) -> None:
    """The real sieve-connect client checks the capability block on every session."""
    binary = require_binary("sieve-connect")
    _, port = proxy.listener("sieve")
    read_end, write_end = os.pipe()
    os.write(write_end, users["bob"].encode() + b"\n")
    os.close(write_end)
    try:
        result = subprocess.run(
            [binary, "--server", "localhost", "--port", str(port), "--user", "bob",
             "--passwordfd", str(read_end), "--tlscafile", str(pki.cert_path), "--list"],
            pass_fds=(read_end,), capture_output=True, text=True, timeout=60, check=False)
    finally:
        os.close(read_end)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "violates" not in output.lower(), output


@pytest.mark.parametrize("user", sorted(ROUTES), ids=lambda u: f"{u}-{ROUTES[u][1]}")
def test_script_lands_on_the_mapped_node_which_sees_the_client(
    proxy: StalrouteProcess,
    pki: CertificateAuthority,
    users: dict[str, str],
    dovecot_pair: DovecotPair,
    user: str,
) -> None:
    node_name, _ = ROUTES[user]
    node = getattr(dovecot_pair, node_name)
    other = dovecot_pair.node2 if node is dovecot_pair.node1 else dovecot_pair.node1
    name = f"s{uuid.uuid4().hex[:10]}"
    since = node.log.size()
    with connect(proxy, pki, source=CLIENT_IP) as client:
        assert ok(client.authenticate_plain(user, users[user]))
        assert ok(client.putscript(name, SCRIPT))
        assert ok(client.command(f'SETACTIVE "{name}"'.encode())[-1])
        listing = b"".join(client.command(b"LISTSCRIPTS"))
        assert re.search(rb'"%s" ACTIVE' % name.encode(), listing), listing
        assert ok(client.command(b"LOGOUT")[-1])
    assert script_path(node, user, name).read_bytes() == SCRIPT
    assert not script_path(other, user, name).exists()
    line = wait_for_login_log(node, "managesieve", user, CLIENT_IP, since).group(0)
    if "XCLIENT" in ROUTES[user][1]:
        assert re.search(r"session=<\d+-[0-9a-f]{12}>", line), line


def test_wrong_then_right_password_on_one_connection(
    proxy: StalrouteProcess, pki: CertificateAuthority, users: dict[str, str]
) -> None:
    with connect(proxy, pki) as client:
        status = client.authenticate_plain("bob", "not-" + users["bob"])
        assert status.upper().startswith(b"NO") and b"TRYLATER" not in status
        assert ok(client.authenticate_plain("bob", users["bob"]))
        assert ok(client.command(b"LISTSCRIPTS")[-1])


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_authenticate_with_continuations(
    proxy: StalrouteProcess, pki: CertificateAuthority, users: dict[str, str], mechanism: str
) -> None:
    def quoted(text: bytes) -> bytes:
        return b'"' + base64.b64encode(text) + b'"\r\n'

    with connect(proxy, pki) as client:
        client.send(f'AUTHENTICATE "{mechanism}"\r\n'.encode())
        if mechanism == "PLAIN":
            assert client.readline() == b'""\r\n'  # an empty challenge
            client.send(quoted(f"\0bob\0{users['bob']}".encode()))
        else:
            assert base64.b64decode(client.readline().strip(b'"\r\n')) == b"Username:"
            client.send(quoted(b"bob"))
            assert base64.b64decode(client.readline().strip(b'"\r\n')) == b"Password:"
            client.send(quoted(users["bob"].encode()))
        assert ok(client.read_response()[-1])
        assert ok(client.command(b"LISTSCRIPTS")[-1])


def test_backend_down_is_trylater_and_the_client_may_retry(
    proxy: StalrouteProcess, pki: CertificateAuthority, users: dict[str, str]
) -> None:
    with connect(proxy, pki) as client:
        status = client.authenticate_plain("erin", users["erin"])
        assert status.startswith(b"NO (TRYLATER)"), status
        assert ok(client.authenticate_plain("alice", users["alice"]))


def test_commands_pipelined_after_authenticate_reach_the_backend(
    proxy: StalrouteProcess, pki: CertificateAuthority, users: dict[str, str],
    dovecot_pair: DovecotPair,
) -> None:
    name = f"p{uuid.uuid4().hex[:10]}"
    response = base64.b64encode(f"\0bob\0{users['bob']}".encode())
    with connect(proxy, pki) as client:
        client.send(b'AUTHENTICATE "PLAIN" "' + response + b'"\r\n'
                    + b'PUTSCRIPT "%s" {%d+}\r\n%s\r\n' % (name.encode(), len(SCRIPT), SCRIPT)
                    + b"LISTSCRIPTS\r\nLOGOUT\r\n")
        assert ok(client.read_response()[-1])  # AUTHENTICATE
        assert ok(client.read_response()[-1])  # PUTSCRIPT
        listing = client.read_response()
        assert ok(listing[-1]) and any(name.encode() in line for line in listing), listing
        assert ok(client.read_response()[-1])  # LOGOUT
    assert script_path(dovecot_pair.node2, "bob", name).read_bytes() == SCRIPT
