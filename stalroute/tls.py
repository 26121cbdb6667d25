"""TLS on both legs.

Inbound (SPEC §2.2): one OpenSSL context per configured certificate, chosen by SNI — exact
name, then parent domains, then the ``default`` entry (or one named ``*``), then the only
certificate, then a self-signed certificate generated at startup.

Backend (SPEC §6): verification against the system store or ``tls_ca_file`` with the name
checked by service_identity; or a SHA-256 pin of the leaf; or no verification; optional client
certificate; TLS 1.2 at least.

Both legs resume TLS sessions, so most handshakes skip the certificate and the key exchange's
signature: clients get session tickets (the keys live as long as the runtime: a reload or a
restart makes returning clients do one full handshake), and each backend leg offers the session
of the last leg to the same destination and port (:class:`ResumingClientTLS`).
"""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from stalroute.logs import logger
from zope.interface import implementer

from stalroute.config import DestinationConfig, TLSConfig

log = logger("stalroute.tls")

_MIN_VERSION = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
_TLS13_DEFAULT_SUITES = ("TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256",
                         "TLS_AES_128_GCM_SHA256")


@dataclass(frozen=True)
class TLSDetails:
    """What the client leg negotiated: logged, and sent to backends in PROXY v2 TLVs."""

    version: str | None
    cipher: str | None
    server_name: str | None


def tls_connection(transport: object) -> SSL.Connection | None:
    """The OpenSSL connection of a transport that started TLS (None for a plain one)."""
    if not getattr(transport, "TLS", False):
        return None
    return transport.getHandle()  # type: ignore[attr-defined]


def tls_details(transport) -> TLSDetails | None:
    """The negotiated TLS parameters of a transport after its handshake, if it uses TLS."""
    connection = tls_connection(transport)
    if connection is None:
        return None
    server_name = connection.get_servername()
    return TLSDetails(connection.get_protocol_version_name(), connection.get_cipher_name(),
                      server_name.decode("idna") if server_name else None)


# --- inbound ----------------------------------------------------------------------------


class _TunedOptions(ssl.CertificateOptions):
    """CertificateOptions whose context gets our cipher and ordering settings applied."""

    def __init__(self, tune: Callable[[SSL.Context], None], server_order: bool,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self._tune = tune
        if not server_order:
            # Twisted always prefers the server's cipher order; honour the client's instead.
            self._options &= ~SSL.OP_CIPHER_SERVER_PREFERENCE

    def _makeContext(self, *args, **kwargs) -> SSL.Context:
        context = super()._makeContext(*args, **kwargs)
        self._tune(context)
        return context


def certificate_subjects(leaf: x509.Certificate) -> list[str]:
    """Names a certificate serves: its DNS SANs, else its CN (wildcards as parent domain)."""
    try:
        names = leaf.extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = [str(attr.value)
                 for attr in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return [_stored_name(name) for name in names]


def _stored_name(name: str) -> str:
    name = name.lower().rstrip(".")
    return name[2:] if name.startswith("*.") else name


def self_signed_certificate(hostname: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A throwaway certificate so that TLS listeners work before one is configured."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=365))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
            .sign(key, hashes.SHA256()))
    return cert, key


#: A certificate chain's leaf, its private key, and the rest of the chain.
Material = tuple[x509.Certificate, object, list[x509.Certificate]]


class ServerTLS:
    """Inbound TLS contexts for every listener, selected by the client's SNI."""

    def __init__(self, tls: TLSConfig, hostname: str) -> None:
        self._settings = tls.protocols
        self._by_name: dict[str, SSL.Context] = {}
        fallback: Material | None = None
        loaded: list[Material] = []
        for name, entry in tls.certificates.items():
            chain = x509.load_pem_x509_certificates(Path(entry.cert).read_bytes())
            key = serialization.load_pem_private_key(Path(entry.key).read_bytes(), None)
            material = (chain[0], key, chain[1:])
            loaded.append(material)
            context = self._options(material).getContext()
            for subject in entry.subjects or certificate_subjects(chain[0]):
                self._by_name.setdefault(_stored_name(subject), context)
            if entry.default or name == "*":
                fallback = material
        if fallback is None and len(loaded) == 1:
            fallback = loaded[0]
        if fallback is None:
            log.warn("no default TLS certificate configured: using a self-signed one for "
                     "{hostname}", hostname=hostname)
            fallback = (*self_signed_certificate(hostname), [])
        #: What every inbound handshake starts with; SNI may switch the certificate.
        self.options = self._options(fallback, contextForServerName=self.context_for)
        self._fallback = self.options.getContext()

    def _options(self, material: Material, **kwargs) -> ssl.CertificateOptions:
        cert, key, chain = material
        return _TunedOptions(self._tune, self._settings.ignore_client_order,
                             privateKey=key, certificate=cert, extraCertChain=chain,
                             raiseMinimumTo=_MIN_VERSION[self._settings.min_version],
                             enableSessionTickets=True, **kwargs)

    def _tune(self, context: SSL.Context) -> None:
        # Twisted's ALPN callback aborts the handshake of any client that offers ALPN when
        # the protocol under startTLS names none; ours picks one we speak or declines ALPN.
        context.set_alpn_select_callback(select_alpn)
        disabled = set(self._settings.disable_cipher_suites)
        if disabled:
            tls12 = [name for name in disabled if not name.startswith("TLS_")]
            if tls12:
                context.set_cipher_list(
                    ("DEFAULT:" + ":".join(f"!{name}" for name in tls12)).encode())
            tls13 = [name for name in _TLS13_DEFAULT_SUITES if name not in disabled]
            context.set_tls13_ciphersuites(":".join(tls13).encode())

    def context_for(self, server_name: bytes | None) -> SSL.Context:
        """SNI selection: exact name, then parent domains, then the fallback."""
        if server_name:
            labels = server_name.decode("ascii", "replace").lower().rstrip(".").split(".")
            for start in range(len(labels) - 1):
                context = self._by_name.get(".".join(labels[start:]))
                if context is not None:
                    return context
        return self._fallback


#: Application protocols stalroute speaks after TLS (RFC 7301 registry names).
ALPN_PROTOCOLS = (b"http/1.1", b"imap", b"pop3", b"managesieve", b"smtp")


def select_alpn(_connection: SSL.Connection,
                offered: list[bytes]) -> bytes | SSL._NoOverlappingProtocols:
    """The first protocol the client offers that we speak; otherwise no ALPN at all (the
    handshake goes on, as for a client that offered nothing)."""
    for protocol in offered:
        if protocol in ALPN_PROTOCOLS:
            return protocol
    return SSL.NO_OVERLAPPING_PROTOCOLS


# --- backend ----------------------------------------------------------------------------


def pin_digest(cert: crypto.X509) -> bytes:
    return hashlib.sha256(cert.to_cryptography().public_bytes(serialization.Encoding.DER)).digest()


@implementer(IOpenSSLClientConnectionCreator)
class _UnverifiedClientTLS:
    """Client TLS without name verification: either pinned to a leaf digest, or insecure."""

    def __init__(self, server_name: str, pin: bytes | None,
                 client_certificate: ssl.PrivateCertificate | None) -> None:
        self._server_name = server_name.encode("idna")
        kwargs = {}
        if client_certificate is not None:
            kwargs = {"privateKey": client_certificate.privateKey.original,
                      "certificate": client_certificate.original}
        self._context = ssl.CertificateOptions(
            raiseMinimumTo=ssl.TLSVersion.TLSv1_2, enableSessionTickets=True,
            **kwargs).getContext()
        if pin is not None:
            def leaf_is_pinned(_conn, cert, _errno, depth, _ok) -> bool:
                return depth > 0 or pin_digest(cert) == pin
            self._context.set_verify(SSL.VERIFY_PEER, leaf_is_pinned)

    def clientConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tlsProtocol)
        connection.set_tlsext_host_name(self._server_name)
        return connection


def backend_tls(destination: DestinationConfig) -> IOpenSSLClientConnectionCreator:
    """The client TLS settings for every leg toward ``destination``."""
    server_name = destination.tls_server_name or destination.host
    client_certificate = None
    if destination.tls_client_cert:
        assert destination.tls_client_key is not None  # config: both or neither
        client_certificate = ssl.PrivateCertificate.loadPEM(
            Path(destination.tls_client_cert).read_text()
            + Path(destination.tls_client_key).read_text())
    if destination.tls_pinned_cert_sha256 or destination.tls_allow_invalid_certs:
        return _UnverifiedClientTLS(server_name, destination.tls_pinned_cert_sha256,
                                    client_certificate)
    if destination.tls_ca_file:
        trust_root = ssl.trustRootFromCertificates([
            ssl.Certificate(crypto.X509.from_cryptography(cert)) for cert in
            x509.load_pem_x509_certificates(Path(destination.tls_ca_file).read_bytes())])
    else:
        trust_root = ssl.platformTrust()
    return ssl.optionsForClientTLS(
        server_name, trustRoot=trust_root, clientCertificate=client_certificate,
        extraCertificateOptions={"raiseMinimumTo": ssl.TLSVersion.TLSv1_2,
                                 "enableSessionTickets": True})


@implementer(IOpenSSLClientConnectionCreator)
class ResumingClientTLS:
    """The client TLS of the legs to one backend port, offering the session of the last leg
    that reached it. The backend resumes it (no certificate, no signature) or makes a new
    one; a resumed session carries the certificate verified when it was made."""

    def __init__(self, tls: IOpenSSLClientConnectionCreator) -> None:
        self._tls = tls
        self._session: SSL.Session | None = None

    def clientConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        connection = self._tls.clientConnectionForTLS(tlsProtocol)
        if self._session is not None:
            connection.set_session(self._session)
        return connection

    def remember(self, connection: SSL.Connection) -> None:
        """Keep the session of a leg whose backend answered (TLS 1.3 tickets come after the
        handshake, before the backend's first words)."""
        session = connection.get_session()
        if session is not None:
            self._session = session
