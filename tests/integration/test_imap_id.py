"""IMAP ``ID`` forwarding (SPEC §5 IMAP, §6): ``forwarding = "xclient"`` on an IMAP leg.

Instead of a PROXY header, stalroute sends ``ID ("x-originating-ip" … "x-session-id" …)``
to the backend before replaying the login; Dovecot accepts it from
``login_trusted_networks`` and logs the forwarded ``rip=`` and stalroute's session id.
The legs go to the nodes' trusted listeners (no ``haproxy = yes``), so without the ID
Dovecot would only see 127.0.0.1, which the ``forwarding = "none"`` control shows.

Routing table: alice → node1 (default: ID over implicit TLS), bob → node2 (ID over
STARTTLS), carol → node1 (ID over a cleartext leg, ``allow_plaintext_auth``), frank → node2
(destination forwarding ``proxy``, overridden to ``xclient`` for its IMAP leg), dave → node2
with ``forwarding = "none"``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from tests.conftest import DovecotPair
from tests.harness.clients import RawIMAP, SourceIMAP4_SSL, fetch_subject, sasl_plain
from tests.harness.dovecot import welcome_subject
from tests.harness.pki import CertificateAuthority, IssuedCertificate
from tests.harness.protocol_configs import (
    CLIENT_IP,
    listeners,
    node_destination,
    proxy_config,
    running_stalroute,
    wait_for_login_log,
)
from tests.harness.stalroute import StalrouteProcess, dovecot_destination

pytestmark = pytest.mark.integration

MAPPINGS = {
    "bob": "node2_id",
    "carol": "node1_plain_id",
    "frank": "node2_leg_override",
    "dave": "node2_none",
}
#: user → (node, destination, how)
ROUTES = {
    "alice": ("node1", "node1_id", "ID, implicit TLS"),
    "bob": ("node2", "node2_id", "ID, STARTTLS"),
    "carol": ("node1", "node1_plain_id", "ID, cleartext leg"),
    "frank": ("node2", "node2_leg_override", "ID by per-protocol forwarding"),
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
    override = dovecot_destination(node2, tls="implicit", ca_file=ca, proxy_protocol=False)
    override["forwarding"] = "proxy"  # the destination's default ...
    override["protocol"]["imap"]["forwarding"] = "xclient"  # ... overridden for IMAP
    destinations = {
        "node1_id": node_destination(node1, "imap", tls="implicit", forwarding="xclient",
                                     ca_file=ca),
        "node2_id": node_destination(node2, "imap", tls="starttls", forwarding="xclient",
                                     ca_file=ca),
        "node1_plain_id": node_destination(node1, "imap", tls="plain", forwarding="xclient"),
        "node2_leg_override": override,
        "node2_none": node_destination(node2, "imap", tls="implicit", forwarding="none",
                                       ca_file=ca),
    }
    config = proxy_config(
        proxy_certificate,
        destinations,
        default="node1_id",
        listener_tables=listeners("imaps"),
        backend_timeout="3s",
    )
    with running_stalroute(config, tmp_path_factory.mktemp("stalroute-imap-id"), MAPPINGS) as p:
        yield p


def imaps(proxy: StalrouteProcess, pki: CertificateAuthority) -> SourceIMAP4_SSL:
    host, port = proxy.listener("imaps")
    return SourceIMAP4_SSL(host, port, ssl_context=pki.client_context(),
                           server_hostname="localhost", source=CLIENT_IP)


@pytest.mark.parametrize("user", sorted(ROUTES), ids=lambda u: f"{u}-{ROUTES[u][2]}")
def test_dovecot_logs_the_forwarded_address_and_session(
    proxy: StalrouteProcess,
    pki: CertificateAuthority,
    users: dict[str, str],
    dovecot_pair: DovecotPair,
    user: str,
) -> None:
    node_name, destination, _ = ROUTES[user]
    node = getattr(dovecot_pair, node_name)
    since = node.log.size()
    with imaps(proxy, pki) as client:
        client.login(user, users[user])
        assert fetch_subject(client) == welcome_subject(node_name, user)
    line = wait_for_login_log(node, "imap", user, CLIENT_IP, since).group(0)
    # x-session-id: Dovecot adopts stalroute's session id, so both logs can be joined.
    session = re.search(r"session=<(\d+-[0-9a-f]{12})>", line)
    assert session, line
    proxy.log.wait_for(rf"session {session.group(1)}: \S+ spliced to {destination}\b")


def test_without_forwarding_dovecot_sees_only_the_proxy(
    proxy: StalrouteProcess,
    pki: CertificateAuthority,
    users: dict[str, str],
    dovecot_pair: DovecotPair,
) -> None:
    node = dovecot_pair.node2
    since = node.log.size()
    with imaps(proxy, pki) as client:
        client.login("dave", users["dave"])
    line = wait_for_login_log(node, "imap", "dave", "127.0.0.1", since).group(0)
    assert CLIENT_IP not in line


def test_a_client_cannot_forge_its_address_with_its_own_id(
    proxy: StalrouteProcess,
    pki: CertificateAuthority,
    users: dict[str, str],
    dovecot_pair: DovecotPair,
) -> None:
    node = dovecot_pair.node2
    since = node.log.size()
    host, port = proxy.listener("imaps")
    with RawIMAP.connect(host, port, ssl_context=pki.client_context(), source=CLIENT_IP) as c:
        lines = c.command(b"i1", b'ID ("x-originating-ip" "198.51.100.66" "name" "forger")')
        assert lines[-1].startswith(b"i1 OK"), lines
        lines = c.command(b"a1", b"AUTHENTICATE PLAIN " + sasl_plain("bob", users["bob"]))
        assert lines[-1].startswith(b"a1 OK"), lines
    line = wait_for_login_log(node, "imap", "bob", CLIENT_IP, since).group(0)
    assert "198.51.100.66" not in line
