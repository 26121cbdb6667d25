"""Challenge answering (RFC 8555 §8.3, RFC 8737) and live certificate swaps in ServerTLS."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet.interfaces import IHandshakeListener, IOpenSSLClientConnectionCreator
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock
from zope.interface import implementer

from stalroute import tls as tls_module
from stalroute.acme.challenges import (
    ACME_IDENTIFIER_OID,
    CHALLENGES,
    ChallengeTable,
    http01_response,
)
from stalroute.config import CertificateConfig, TLSConfig, TLSProtocolsConfig, parse_config
from stalroute.protocols import PROTOCOLS
from stalroute.runtime import build_runtime
from stalroute.session import SessionFactory
from stalroute.tls import ServerTLS, tls_connection
from tests.harness.memory import connect
from tests.harness.pki import CertificateAuthority

pytestmark = pytest.mark.usefixtures("acme_state")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- the table -------------------------------------------------------------------------------


def test_http01_material_expires_and_is_withdrawn() -> None:
    clock = Clock()
    table = ChallengeTable(clock, ttl=60)
    table.add_http01("tok", "tok.thumb")
    table.add_http01("short", "short.thumb", ttl=5)
    assert table.http01("tok") == b"tok.thumb" and table.http01("short") == b"short.thumb"
    clock.now += 5
    assert table.http01("short") is None and len(table) == 1
    table.remove_http01("tok")
    assert table.http01("tok") is None and len(table) == 0
    table.add_http01("tok", "tok.thumb")
    clock.now += 60
    assert table.http01("tok") is None


def test_the_table_is_bounded_oldest_first() -> None:
    table = ChallengeTable(Clock(), max_entries=3)
    for index in range(5):
        table.add_http01(f"t{index}", f"t{index}.k")
    assert len(table) == 3
    assert table.http01("t0") is None and table.http01("t1") is None
    assert table.http01("t4") == b"t4.k"


def test_http01_response_answers_only_pending_tokens_under_the_well_known_path() -> None:
    CHALLENGES.add_http01("abc_DEF-123", "abc_DEF-123.thumbprint")
    assert http01_response("/.well-known/acme-challenge/abc_DEF-123") == \
        b"abc_DEF-123.thumbprint"
    assert http01_response("/.well-known/acme-challenge/other") is None
    assert http01_response("/.well-known/acme-challenge/") is None
    assert http01_response("/.well-known/acme-challenge/abc_DEF-123/x") is None
    assert http01_response("/abc_DEF-123") is None
    assert http01_response("/") is None
    own = ChallengeTable()
    own.add_http01("t", "t.k")
    assert http01_response("/.well-known/acme-challenge/t", own) == b"t.k"


def test_tls_alpn01_certificate() -> None:
    table = ChallengeTable()
    table.add_tls_alpn01("Mail.Test.", "token.thumbprint")
    material = table.tls_alpn01("mail.test")
    assert material is not None and table.tls_alpn01("other.test") is None
    cert = material.certificate
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["Mail.Test."]
    extension = cert.extensions.get_extension_for_oid(ACME_IDENTIFIER_OID)
    assert extension.critical
    assert extension.value.value == b"\x04\x20" + hashlib.sha256(b"token.thumbprint").digest()
    table.remove_tls_alpn01("MAIL.test")
    assert table.tls_alpn01("mail.test") is None


# --- handshakes ------------------------------------------------------------------------------


def handshake(server: ServerTLS, server_name: str | None,
              alpn: list[bytes] | None) -> tuple[x509.Certificate, bytes | None]:
    """An in-memory handshake: the certificate served and the ALPN protocol selected."""
    client_context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    client = SSL.Connection(client_context, None)
    if server_name:
        client.set_tlsext_host_name(server_name.encode())
    if alpn:
        client.set_alpn_protos(alpn)
    client.set_connect_state()
    peer = SSL.Connection(server.options.getContext(), None)
    peer.set_accept_state()
    for _ in range(10):
        done = True
        for connection in (client, peer):
            try:
                connection.do_handshake()
            except SSL.WantReadError:
                done = False
        for source, target in ((client, peer), (peer, client)):
            try:
                target.bio_write(source.bio_read(65536))
            except SSL.WantReadError:
                pass
        if done:
            break
    leaf = client.get_peer_certificate()
    assert leaf is not None
    negotiated = client.get_alpn_proto_negotiated() or None
    return leaf.to_cryptography(), negotiated


def common_name(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority(tmp_path_factory.mktemp("ca"))


def configured(ca: CertificateAuthority) -> ServerTLS:
    issued = ca.issue("files.test", dns_names=["files.test"], ip_addresses=())
    certificates = {
        "files": CertificateConfig(name="files", cert=issued.cert_path, key=issued.key_path),
        "mail": CertificateConfig(name="mail", acme="le", subjects=("mail.test",),
                                  default=True),
    }
    return ServerTLS(TLSConfig(certificates=certificates, protocols=TLSProtocolsConfig()),
                     "proxy.test")


def test_acme_tls_1_with_pending_material_gets_the_validation_certificate(
        ca: CertificateAuthority) -> None:
    server = configured(ca)
    CHALLENGES.add_tls_alpn01("mail.test", "tok.thumb")
    cert, negotiated = handshake(server, "mail.test", [b"acme-tls/1"])
    assert negotiated == b"acme-tls/1"
    assert cert.extensions.get_extension_for_oid(ACME_IDENTIFIER_OID).critical
    # Normal clients of the same name are unaffected.
    cert, negotiated = handshake(server, "mail.test", [b"imap"])
    assert negotiated == b"imap" and common_name(cert) == "mail.test"
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_oid(ACME_IDENTIFIER_OID)


def test_acme_tls_1_without_material_is_not_selected(ca: CertificateAuthority) -> None:
    server = configured(ca)
    CHALLENGES.add_tls_alpn01("mail.test", "tok.thumb")
    cert, negotiated = handshake(server, "files.test", [b"acme-tls/1"])
    assert negotiated is None and common_name(cert) == "files.test"
    cert, negotiated = handshake(server, None, [b"acme-tls/1", b"imap"])
    assert negotiated == b"imap"


def test_acme_entries_serve_a_placeholder_then_the_installed_chain(
        ca: CertificateAuthority) -> None:
    server = configured(ca)
    cert, _ = handshake(server, "mail.test", None)
    assert common_name(cert) == "mail.test" and cert.issuer == cert.subject  # self-signed
    assert common_name(handshake(server, "files.test", None)[0]) == "files.test"

    issued = ca.issue("mail.test", dns_names=["mail.test"], ip_addresses=())
    old_context = server.options.getContext()
    server.install("mail", issued.cert_path.read_bytes(), issued.key_path.read_bytes())
    for name in ("mail.test", None, "unknown.test"):  # the default entry: no SNI too
        cert, _ = handshake(server, name, None)
        assert common_name(cert) == "mail.test" and cert.issuer != cert.subject
    assert common_name(handshake(server, "files.test", None)[0]) == "files.test"
    assert server.options.getContext() is not old_context  # live connections keep theirs

    # A ServerTLS built later (a reload) serves what was issued.
    again = configured(ca)
    cert, _ = handshake(again, "mail.test", None)
    assert cert.issuer != cert.subject


def test_install_refuses_a_key_of_another_certificate(ca: CertificateAuthority) -> None:
    server = configured(ca)
    one = ca.issue("mail.test", dns_names=["mail.test"], ip_addresses=())
    two = ca.issue("other.test", dns_names=["other.test"], ip_addresses=())
    with pytest.raises(ValueError, match="does not belong"):
        server.install("mail", one.cert_path.read_bytes(), two.key_path.read_bytes())
    assert tls_module.ISSUED == {}
    key = serialization.load_pem_private_key(one.key_path.read_bytes(), None)
    assert key is not None


# --- the listener: a validation is closed after the handshake, without a word of IMAP --------


@implementer(IOpenSSLClientConnectionCreator)
class _ValidatorTLS:
    """A client TLS like the ACME server's: SNI mail.test, ALPN offering only acme-tls/1."""

    def __init__(self, alpn: list[bytes]) -> None:
        self._alpn = alpn

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        context.set_alpn_protos(self._alpn)
        connection = SSL.Connection(context, None)
        connection.set_app_data(tlsProtocol)
        connection.set_tlsext_host_name(b"mail.test")
        return connection


@implementer(IHandshakeListener)
class _Validator(Protocol):
    def __init__(self, alpn: list[bytes]) -> None:
        self.alpn = alpn
        self.received = b""
        self.lost = False
        self.peer: x509.Certificate | None = None
        self.selected: bytes | None = None

    def handshakeCompleted(self) -> None:
        self.peer = self.transport.getPeerCertificate().to_cryptography()  # type: ignore
        connection = tls_connection(self.transport)
        assert connection is not None
        self.selected = connection.get_alpn_proto_negotiated() or None

    def connectionMade(self) -> None:
        self.transport.startTLS(_ValidatorTLS(self.alpn))  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: object = None) -> None:
        self.lost = True


def _imaps_listener(tmp_path: Path) -> tuple[MemoryReactorClock, SessionFactory]:
    (tmp_path / "mappings.tsv").write_text("")
    document = {
        "server": {"hostname": "stalroute.test"},
        "listener": {"imaps": {"protocol": "imap", "bind": ["127.0.0.1:993"],
                               "tls": "implicit"}},
        "tls": {"certificate": {"mail": {"acme": "le", "default": True}}},
        "acme": {"le": {"directory": "https://acme.test/dir", "domains": ["mail.test"]}},
        "destination": {"node1": {"host": "127.0.0.1",
                                  "protocol": {"imap": {"port": 1993, "tls": "implicit"}},
                                  "tls_server_name": "node1.test"}},
        "routing": {"default_destination": "node1"},
        "mapping": {"source": "file", "file": {"path": str(tmp_path / "mappings.tsv")}},
    }
    reactor = MemoryReactorClock()
    runtime = build_runtime(reactor, parse_config(document, tmp_path, {}))
    return reactor, SessionFactory(reactor, runtime, "imaps", PROTOCOLS["imap"])


@pytest.mark.parametrize("pending", [True, False])
def test_a_validation_connection_is_closed_after_the_handshake(tmp_path: Path, errors,
                                                               pending: bool) -> None:
    reactor, factory = _imaps_listener(tmp_path)
    if pending:
        CHALLENGES.add_tls_alpn01("mail.test", "tok.thumb")
    server = factory.buildProtocol(None)
    client = _Validator([b"acme-tls/1"])
    pump = connect(client, server, reactor, ("192.0.2.1", 40000), ("127.0.0.1", 993))
    pump.flush()
    assert client.peer is not None
    extensions = client.peer.extensions
    assert client.selected == (b"acme-tls/1" if pending else None)
    if pending:  # the validation certificate, and not one byte of IMAP
        assert extensions.get_extension_for_oid(ACME_IDENTIFIER_OID).critical
        assert client.received == b""
        assert server.outcome == "acme_validation"
        assert client.lost and factory.runtime.registry.sessions == {}
        assert factory.active == 0
    else:  # no challenge for this name: an ordinary IMAPS connection
        with pytest.raises(x509.ExtensionNotFound):
            extensions.get_extension_for_oid(ACME_IDENTIFIER_OID)
        assert client.received.startswith(b"* OK")
        client.transport.loseConnection()  # type: ignore[union-attr]
        pump.flush()
    # Either way the connection leaves nothing behind: registry, slots, per-IP counts, timers.
    assert factory.runtime.registry.sessions == {} and factory.active == 0
    assert not factory.per_ip._counts and reactor.getDelayedCalls() == []
    assert errors == []
