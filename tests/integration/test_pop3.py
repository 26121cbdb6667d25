"""POP3 through stalroute against two real Dovecot nodes (SPEC §3, §5 POP3, §6).

One stalroute for the module, listeners ``pop3s`` (implicit TLS) and ``pop3`` (STLS).
Routing table: alice → node1 (default: PROXY v2 + implicit TLS), bob → node2 (PROXY v2 +
STLS), carol → node2 over STLS with XCLIENT, dave → node1 over implicit TLS with XCLIENT,
frank → node1 over a cleartext leg with XCLIENT (``allow_plaintext_auth``), erin → a
destination that is down. Each INBOX holds "<node> welcome for <user>", so the subject of
message 1 says where a login landed; Dovecot's log says which client address it saw.
"""

from __future__ import annotations

import poplib
import re
from collections.abc import Iterator

import pytest

from tests.conftest import DovecotPair, require_binary
from tests.harness.clients import connect_from
from tests.harness.dovecot import welcome_subject
from tests.harness.pki import CertificateAuthority, IssuedCertificate
from tests.harness.ports import LOOPBACK
from tests.harness.protocol_configs import (
    CLIENT_IP,
    SourcePOP3,
    SourcePOP3_SSL,
    closed_port_destination,
    listeners,
    node_destination,
    pop3_subject,
    proxy_config,
    run_tool,
    running_stalroute,
    wait_for_login_log,
)
from tests.harness.stalroute import StalrouteProcess

pytestmark = pytest.mark.integration

MAPPINGS = {
    "bob": "node2",
    "carol": "node2_xclient",
    "dave": "node1_xclient",
    "frank": "node1_plain",
    "erin": "down",
}
#: user → (node, how the client's address travels)
ROUTES = {
    "alice": ("node1", "PROXY v2, implicit TLS"),
    "bob": ("node2", "PROXY v2, STLS"),
    "carol": ("node2", "XCLIENT, STLS"),
    "dave": ("node1", "XCLIENT, implicit TLS"),
    "frank": ("node1", "XCLIENT, cleartext leg"),
}


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
        "node1": node_destination(node1, "pop3", tls="implicit", ca_file=ca),
        "node2": node_destination(node2, "pop3", tls="starttls", ca_file=ca),
        "node2_xclient": node_destination(
            node2, "pop3", tls="starttls", forwarding="xclient", ca_file=ca
        ),
        "node1_xclient": node_destination(
            node1, "pop3", tls="implicit", forwarding="xclient", ca_file=ca
        ),
        "node1_plain": node_destination(node1, "pop3", tls="plain", forwarding="xclient"),
        "down": closed_port_destination("pop3"),
    }
    config = proxy_config(
        proxy_certificate,
        destinations,
        default="node1",
        listener_tables=listeners("pop3s", "pop3"),
        backend_timeout="3s",
    )
    with running_stalroute(config, tmp_path_factory.mktemp("stalroute-pop3"), MAPPINGS) as p:
        yield p


def pop3s(proxy: StalrouteProcess, pki: CertificateAuthority, source: str = LOOPBACK):
    host, port = proxy.listener("pop3s")
    return SourcePOP3_SSL(host, port, context=pki.client_context(), source=source)


@pytest.mark.parametrize("user", sorted(ROUTES), ids=lambda u: f"{u}-{ROUTES[u][1]}")
def test_login_lands_on_the_mapped_node_which_sees_the_client(
    proxy: StalrouteProcess,
    pki: CertificateAuthority,
    users: dict[str, str],
    dovecot_pair: DovecotPair,
    user: str,
) -> None:
    node_name, _ = ROUTES[user]
    node = getattr(dovecot_pair, node_name)
    since = node.log.size()
    client = pop3s(proxy, pki, source=CLIENT_IP)
    try:
        client.user(user)
        assert client.pass_(users[user]).startswith(b"+OK")
        assert pop3_subject(client) == welcome_subject(node_name, user)
    finally:
        client.quit()
    line = wait_for_login_log(node, "pop3", user, CLIENT_IP, since).group(0)
    if "XCLIENT" in ROUTES[user][1]:
        # SESSION= from XCLIENT: Dovecot logs stalroute's session id as its own.
        assert re.search(r"session=<\d+-[0-9a-f]{12}>", line), line


def test_stls_listener_with_user_pass(
    proxy: StalrouteProcess, pki: CertificateAuthority, users: dict[str, str]
) -> None:
    host, port = proxy.listener("pop3")
    client = SourcePOP3(host, port)
    try:
        capabilities = client.capa()
        assert "STLS" in capabilities and "USER" not in capabilities
        with pytest.raises(poplib.error_proto, match="Cleartext authentication"):
            client.user("bob")
        client.stls(pki.client_context())
        assert "USER" in client.capa()
        client.user("bob")
        client.pass_(users["bob"])
        assert pop3_subject(client) == welcome_subject("node2", "bob")
    finally:
        client.quit()


def test_wrong_then_right_password_on_one_connection(
    proxy: StalrouteProcess, pki: CertificateAuthority, users: dict[str, str]
) -> None:
    client = pop3s(proxy, pki)
    try:
        client.user("bob")
        with pytest.raises(poplib.error_proto, match=r"-ERR \[AUTH\]"):
            client.pass_("not-" + users["bob"])
        client.user("bob")
        assert client.pass_(users["bob"]).startswith(b"+OK")
        assert pop3_subject(client) == welcome_subject("node2", "bob")
    finally:
        client.quit()


def test_backend_down_is_a_temporary_failure_and_the_client_may_retry(
    proxy: StalrouteProcess, pki: CertificateAuthority, users: dict[str, str]
) -> None:
    client = pop3s(proxy, pki)
    try:
        client.user("erin")
        with pytest.raises(poplib.error_proto, match=r"^b'-ERR \[SYS/TEMP\]") as failure:
            client.pass_(users["erin"])
        assert b"[AUTH]" not in failure.value.args[0]
        # Still pre-auth on the same connection: another account gets in.
        client.user("alice")
        client.pass_(users["alice"])
        assert pop3_subject(client) == welcome_subject("node1", "alice")
    finally:
        client.quit()


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_curl_pop3s_lists_and_retrieves(
    proxy: StalrouteProcess,
    pki: CertificateAuthority,
    users: dict[str, str],
    dovecot_pair: DovecotPair,
    mechanism: str,
) -> None:
    curl = require_binary("curl")
    host, port = proxy.listener("pop3s")
    since = dovecot_pair.node2.log.size()

    def run(path: str) -> str:
        result = run_tool([
            curl, "--silent", "--show-error", "--max-time", "30",
            "--interface", CLIENT_IP,
            "--cacert", str(pki.cert_path),
            "--login-options", f"AUTH={mechanism}",
            "--user", f"bob:{users['bob']}",
            f"pop3s://{host}:{port}/{path}",
        ])
        assert result.returncode == 0, result.stderr
        return result.stdout

    assert re.match(r"1 \d+\r?\n", run(""))
    assert f"Subject: {welcome_subject('node2', 'bob')}" in run("1")
    wait_for_login_log(dovecot_pair.node2, "pop3", "bob", CLIENT_IP, since)


def test_pipelined_login_and_commands_reach_the_backend_in_order(
    proxy: StalrouteProcess, pki: CertificateAuthority, users: dict[str, str]
) -> None:
    """RFC 2449 PIPELINING: everything after PASS is relayed once the login succeeded."""
    host, port = proxy.listener("pop3s")
    sock = pki.client_context().wrap_socket(connect_from(host, port), server_hostname="localhost")
    with sock, sock.makefile("rb") as reader:
        assert reader.readline().startswith(b"+OK")
        sock.sendall(b"USER alice\r\nPASS %s\r\nSTAT\r\nTOP 1 0\r\nQUIT\r\n"
                     % users["alice"].encode())
        assert reader.readline() == b"+OK\r\n"  # USER, answered by stalroute
        assert reader.readline().startswith(b"+OK")  # PASS, Dovecot's answer
        assert re.match(rb"\+OK [1-9]\d* \d+\r\n", reader.readline())  # STAT
        top = b""
        while not top.endswith(b"\r\n.\r\n"):
            line = reader.readline()
            assert line, top
            top += line
        assert welcome_subject("node1", "alice").encode() in top
        assert reader.readline().startswith(b"+OK")  # QUIT


def test_utf8_before_login_with_a_backend_that_lacks_it(
    proxy: StalrouteProcess, pki: CertificateAuthority, users: dict[str, str]
) -> None:
    """Dovecot 2.3 has no POP3 UTF8: once the destinations are probed, stalroute neither
    advertises nor accepts it (the client would believe in a mode its backend does not run),
    and the login goes on."""
    client = pop3s(proxy, pki)
    try:
        assert "UTF8" not in client.capa()
        with pytest.raises(poplib.error_proto, match="Unknown command"):
            client._shortcmd("UTF8")
        client.user("alice")
        client.pass_(users["alice"])
        assert pop3_subject(client) == welcome_subject("node1", "alice")
    finally:
        client.quit()
