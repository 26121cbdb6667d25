"""stalroute advertises only what its Dovecot 2.3 destinations honour (SPEC §2.4 [ext]).

The defaults name IMAP4rev2, UTF8=ACCEPT, SMTPUTF8, OAUTHBEARER, XOAUTH2 and Pigeonhole's
optional extensions, none of which Dovecot 2.3 offers before login; a client relying on them
would fail after login.  Left unset, those lists are narrowed to what every destination
answered to stalroute's probes; set explicitly, they are advertised as written and
``stalroute check`` warns.  A third Dovecot node with the OAuth mechanisms enabled shows that
the answers are learnt (they go beyond the static fallback) and re-learnt on reload.
"""

from __future__ import annotations

import poplib
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import DovecotPair, StalrouteFactory, require_binary
from tests.harness.clients import RawIMAP
from tests.harness.dovecot import DovecotNode
from tests.harness.pki import CertificateAuthority, IssuedCertificate
from tests.harness.protocol_configs import (
    ManageSieveClient,
    closed_port_destination,
    listeners,
    proxy_config,
    smtp_ssl,
)
from tests.harness.stalroute import REPO_ROOT, StalrouteProcess, dovecot_destination, dump_toml

pytestmark = pytest.mark.integration

PROTOCOLS = ("imap", "pop3", "submission", "managesieve")
#: What the defaults promise and Dovecot 2.3 does not offer before login.
NOT_IN_DOVECOT_IMAP = {"IMAP4rev2", "UTF8=ACCEPT", "AUTH=OAUTHBEARER", "AUTH=XOAUTH2"}


class OAuthNode(DovecotNode):
    """A Dovecot node that also offers OAUTHBEARER and XOAUTH2 (never used to log in)."""

    def render_config(self) -> str:
        config = super().render_config()
        assert "auth_mechanisms = plain login\n" in config
        return config.replace("auth_mechanisms = plain login\n",
                              "auth_mechanisms = plain login oauthbearer xoauth2\n")


@pytest.fixture(scope="module")
def oauth_node(pki: CertificateAuthority, users: dict[str, str]) -> Iterator[OAuthNode]:
    binary = require_binary("dovecot")
    certificate = pki.issue("oauthnode", ["oauthnode.test", "localhost"], ["127.0.0.1"])
    with OAuthNode("oauthnode", users=users, certificate=certificate, binary=binary) as node:
        yield node


def destination(node: DovecotNode, pki: CertificateAuthority,
                protocols: tuple[str, ...] = PROTOCOLS) -> dict[str, Any]:
    """PROXY v2 + STARTTLS to ``node`` for ``protocols``."""
    return dovecot_destination(node, tls="starttls", protocols=protocols, ca_file=pki.cert_path)


ALL_LISTENERS = ("imaps", "pop3s", "sieve", "submissions")


def config_for(proxy_certificate: IssuedCertificate, destinations: dict[str, dict[str, Any]],
               listener_names: tuple[str, ...] = ALL_LISTENERS,
               **capabilities: dict[str, Any]) -> dict[str, Any]:
    """Listeners ``listener_names``; the first destination is the default."""
    config = proxy_config(proxy_certificate, destinations, default=next(iter(destinations)),
                          listener_tables=listeners(*listener_names))
    if capabilities:
        config["capabilities"] = capabilities
    return config


def wait_for_answers(proxy: StalrouteProcess, pairs: list[tuple[str, str]],
                     since: int = 0) -> None:
    """Until every (destination, protocol) pair answered stalroute's probe."""
    for name, protocol in pairs:
        proxy.log.wait_for(rf"destination {name} offers before login \({protocol}\)",
                           since=since)


def imap_capabilities(proxy: StalrouteProcess, pki: CertificateAuthority) -> set[str]:
    """The greeting's capabilities, checked against those CAPABILITY lists."""
    with RawIMAP.connect(*proxy.listener("imaps"), ssl_context=pki.client_context()) as client:
        greeting = client.greeting.decode()
        listed = client.command(b"c", b"CAPABILITY")
    assert listed[-1].startswith(b"c OK")
    words = set(greeting.split("[CAPABILITY ", 1)[1].split("]", 1)[0].split())
    assert set(listed[0].decode().split()[2:]) == words
    return words


def run_check(proxy: StalrouteProcess) -> subprocess.CompletedProcess[str]:
    """``stalroute check`` on the proxy's own configuration file, in a child process."""
    return subprocess.run([sys.executable, "-m", "stalroute", "check", str(proxy.config_path)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
                          check=False)


def test_defaults_are_narrowed_to_what_dovecot_offers(
        stalroute: StalrouteFactory, pki: CertificateAuthority,
        proxy_certificate: IssuedCertificate, dovecot_pair: DovecotPair) -> None:
    node1, node2 = dovecot_pair
    proxy = stalroute(config_for(proxy_certificate, {"node1": destination(node1, pki),
                                                     "node2": destination(node2, pki)}))
    wait_for_answers(proxy, [(name, protocol) for name in ("node1", "node2")
                             for protocol in PROTOCOLS])

    imap = imap_capabilities(proxy, pki)
    assert not imap & NOT_IN_DOVECOT_IMAP, imap
    assert {"IMAP4rev1", "SASL-IR", "LITERAL+", "ID", "ENABLE", "AUTH=PLAIN",
            "AUTH=LOGIN"} <= imap

    with smtp_ssl(*proxy.listener("submissions"), context=pki.client_context()) as client:
        client.ehlo()
        assert not client.has_extn("smtputf8")
        assert client.has_extn("8bitmime") and client.has_extn("chunking")
        assert client.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]

    pop3 = poplib.POP3_SSL(*proxy.listener("pop3s"), context=pki.client_context(), timeout=10)
    try:
        assert pop3.capa()["SASL"] == ["PLAIN", "LOGIN"]
        assert "UTF8" not in pop3.capa()  # Dovecot 2.3 lists no UTF8
    finally:
        pop3.quit()

    with ManageSieveClient.connect(*proxy.listener("sieve")) as client:
        client.starttls(pki.client_context())
        sieve = client.capabilities
    assert sieve["SASL"].split() == ["PLAIN", "LOGIN"]
    extensions = sieve["SIEVE"].split()
    assert "enotify" in extensions and sieve["NOTIFY"] == "mailto"
    assert not {"vacation-seconds", "editheader"} & set(extensions)

    check = run_check(proxy)  # nothing explicit: nothing to verify, nothing to warn
    assert check.returncode == 0 and check.stderr == "", check


def test_learnt_answers_go_beyond_the_fallback_and_are_relearnt_on_reload(
        stalroute: StalrouteFactory, pki: CertificateAuthority,
        proxy_certificate: IssuedCertificate, dovecot_pair: DovecotPair,
        oauth_node: OAuthNode) -> None:
    proxy = stalroute(config_for(proxy_certificate,
                                 {"oauth": destination(oauth_node, pki, ("imap",))}, ("imaps",)))
    wait_for_answers(proxy, [("oauth", "imap")])
    assert {"AUTH=OAUTHBEARER", "AUTH=XOAUTH2"} <= imap_capabilities(proxy, pki)

    # node1 joins: an account may now land where the OAuth mechanisms are not offered.
    proxy.config["destination"]["node1"] = destination(dovecot_pair.node1, pki, ("imap",))
    proxy.config_path.write_text(dump_toml(proxy.config))
    since = proxy.log.size()
    proxy.reload()
    wait_for_answers(proxy, [("node1", "imap")], since=since)
    imap = imap_capabilities(proxy, pki)
    assert "AUTH=PLAIN" in imap and not {"AUTH=OAUTHBEARER", "AUTH=XOAUTH2"} & imap


def test_explicit_lists_are_advertised_and_check_warns(
        stalroute: StalrouteFactory, pki: CertificateAuthority,
        proxy_certificate: IssuedCertificate, dovecot_pair: DovecotPair) -> None:
    destinations = {"node1": destination(dovecot_pair.node1, pki),
                    "down": closed_port_destination("imap")}
    proxy = stalroute(config_for(
        proxy_certificate, destinations,
        imap={"advertise": ["IMAP4rev2", "IMAP4rev1", "ID"]},
        submission={"ehlo": ["SMTPUTF8", "8BITMIME"], "sasl": ["PLAIN", "XOAUTH2"]}))
    wait_for_answers(proxy, [("node1", "imap"), ("node1", "submission")])

    imap = imap_capabilities(proxy, pki)
    assert {"IMAP4rev2", "IMAP4rev1", "ID"} <= imap and "SASL-IR" not in imap
    with smtp_ssl(*proxy.listener("submissions"), context=pki.client_context()) as client:
        client.ehlo()
        assert client.has_extn("smtputf8")
        assert client.esmtp_features["auth"].split() == ["PLAIN", "XOAUTH2"]

    check = run_check(proxy)
    assert check.returncode == 0, check
    warnings = sorted(line for line in check.stderr.splitlines() if line.startswith("warning:"))
    assert [w.split(";")[0] for w in warnings] == [
        "warning: capabilities.imap.advertise: destination node1 does not offer IMAP4rev2",
        "warning: capabilities.submission.ehlo: destination node1 does not offer SMTPUTF8",
        "warning: capabilities.submission.sasl: destination node1 does not offer XOAUTH2",
        "warning: destination.down.protocol.imap: capabilities not verified "
        "(destination down: ConnectionRefusedError)",
    ], check.stderr
    assert check.stdout.startswith("OK: ")
