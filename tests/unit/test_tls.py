"""Inbound certificate selection by SNI (SPEC §2.2), checked with in-memory handshakes."""

from __future__ import annotations

import ssl

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from OpenSSL import SSL

from stalroute.config import CertificateConfig, TLSConfig, TLSProtocolsConfig
from stalroute.tls import ServerTLS
from tests.harness.pki import CertificateAuthority


def served_common_name(server: ServerTLS, server_name: str | None) -> str:
    """The CN of the certificate a client offering ``server_name`` receives."""
    client_context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_context.check_hostname = False
    client_context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    peer = SSL.Connection(server.options.getContext(), None)
    peer.set_accept_state()
    for _ in range(10):
        try:
            client.do_handshake()
            break
        except ssl.SSLWantReadError:
            pass
        peer.bio_write(outgoing.read())
        try:
            peer.do_handshake()
        except SSL.WantReadError:
            pass
        incoming.write(peer.bio_read(65536))
    leaf = x509.load_der_x509_certificate(client.getpeercert(binary_form=True))
    return leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority(tmp_path_factory.mktemp("ca"))


def entry(ca: CertificateAuthority, name: str, dns: list[str], **settings) -> CertificateConfig:
    issued = ca.issue(name, dns_names=dns, ip_addresses=())
    return CertificateConfig(name=name, cert=issued.cert_path, key=issued.key_path, **settings)


def server_for(*entries: CertificateConfig) -> ServerTLS:
    tls = TLSConfig(certificates={e.name: e for e in entries}, protocols=TLSProtocolsConfig())
    return ServerTLS(tls, "proxy.test")


def test_exact_name_then_parent_domain_then_default(ca: CertificateAuthority) -> None:
    server = server_for(
        entry(ca, "fallback", ["fallback.test"], default=True),
        entry(ca, "wild", ["*.example.com"]),
        entry(ca, "exact", ["imap.example.com"]),
    )
    assert served_common_name(server, "imap.example.com") == "imap.example.com"
    assert served_common_name(server, "pop.example.com") == "*.example.com"
    assert served_common_name(server, "a.b.example.com") == "*.example.com"
    assert served_common_name(server, "other.org") == "fallback.test"
    assert served_common_name(server, None) == "fallback.test"


def test_configured_subjects_replace_the_certificate_names(ca: CertificateAuthority) -> None:
    server = server_for(entry(ca, "a", ["a.test"], default=True),
                        entry(ca, "b", ["b.test"], subjects=("mail.example.net",)))
    assert served_common_name(server, "mail.example.net") == "b.test"
    assert served_common_name(server, "b.test") == "a.test"


def test_the_only_certificate_is_the_default(ca: CertificateAuthority) -> None:
    server = server_for(entry(ca, "only", ["only.test"]))
    assert served_common_name(server, "unknown.test") == "only.test"


def test_without_a_default_an_unknown_name_gets_a_self_signed_certificate(
        ca: CertificateAuthority) -> None:
    server = server_for(entry(ca, "a", ["a.test"]), entry(ca, "b", ["b.test"]))
    assert served_common_name(server, "b.test") == "b.test"
    assert served_common_name(server, "c.test") == "proxy.test"


def test_no_certificate_at_all_still_serves_tls() -> None:
    assert served_common_name(server_for(), "anything.test") == "proxy.test"
