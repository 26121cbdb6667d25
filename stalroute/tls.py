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

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from stalroute.logs import logger
from zope.interface import implementer

from stalroute.acme.challenges import ACME_TLS_ALPN, CHALLENGES
from stalroute.config import CertificateConfig, DestinationConfig, TLSConfig
from stalroute.selfsigned import self_signed_certificate

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


#: A certificate chain's leaf, its private key, and the rest of the chain.
Material = tuple[x509.Certificate, object, list[x509.Certificate]]


#: Certificates issued by ACME to this process (:mod:`stalroute.acme.manager`): the name of a
#: ``[tls.certificate.<name>]`` entry with ``acme =`` → (PEM chain, PEM key). Every
#: :class:`ServerTLS` built later (a reload, the admin listener) serves them too.
ISSUED: dict[str, tuple[bytes, bytes]] = {}


def load_material(chain_pem: bytes, key_pem: bytes) -> Material:
    """A PEM chain (leaf first) and its PEM key as :data:`Material`; ValueError if unusable."""
    chain = x509.load_pem_x509_certificates(chain_pem)
    key = serialization.load_pem_private_key(key_pem, None)
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if chain[0].public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        raise ValueError("the key does not belong to the first certificate of the chain")
    return chain[0], key, chain[1:]


class ServerTLS:
    """Inbound TLS contexts for every listener, selected by the client's SNI."""

    def __init__(self, tls: TLSConfig, hostname: str) -> None:
        self._settings = tls.protocols
        self._by_name: dict[str, SSL.Context] = {}
        #: The SNI names each certificate entry serves (those no earlier entry took).
        self._claimed: dict[str, list[str]] = {}
        #: The leaf each certificate entry serves now (an ACME placeholder until issued).
        self.leaves: dict[str, x509.Certificate] = {}
        fallback: Material | None = None
        self._fallback_name: str | None = None
        loaded: list[tuple[str, Material]] = []
        for name, entry in tls.certificates.items():
            material = self._entry_material(name, entry, hostname)
            loaded.append((name, material))
            self.leaves[name] = material[0]
            context = self._options(material).getContext()
            claimed = self._claimed.setdefault(name, [])
            for subject in entry.subjects or certificate_subjects(material[0]):
                subject = _stored_name(subject)
                if subject not in self._by_name:
                    self._by_name[subject] = context
                    claimed.append(subject)
            if entry.default or name == "*":
                fallback, self._fallback_name = material, name
        if fallback is None and len(loaded) == 1:
            self._fallback_name, fallback = loaded[0]
        if fallback is None:
            log.warn("no default TLS certificate configured: using a self-signed one for "
                     "{hostname}", hostname=hostname)
            fallback = (*self_signed_certificate(hostname), [])
        self._use_fallback(fallback)

    @staticmethod
    def _entry_material(name: str, entry: CertificateConfig, hostname: str) -> Material:
        if entry.acme is None:
            assert entry.cert is not None and entry.key is not None  # config: one form
            return load_material(Path(entry.cert).read_bytes(), Path(entry.key).read_bytes())
        issued = ISSUED.get(name)
        if issued is not None:
            return load_material(*issued)
        subject = entry.subjects[0] if entry.subjects else hostname
        log.info("tls.certificate.{name}: no certificate issued by ACME yet; serving a "
                 "self-signed one for {subject} until then", name=name, subject=subject)
        return (*self_signed_certificate(subject), [])

    def _use_fallback(self, material: Material) -> None:
        #: What every inbound handshake starts with; SNI may switch the certificate.
        self.options = self._options(material, contextForServerName=self.context_for)
        self._fallback = self.options.getContext()

    def install(self, name: str, chain_pem: bytes, key_pem: bytes) -> None:
        """Serve a newly issued chain for the ``[tls.certificate.<name>]`` entry: new
        handshakes get it, live connections keep what they negotiated. Remembered in
        :data:`ISSUED` for the ServerTLS of later reloads. ValueError if unusable."""
        material = load_material(chain_pem, key_pem)
        context = self._options(material).getContext()
        ISSUED[name] = (chain_pem, key_pem)
        self.leaves[name] = material[0]
        for subject in self._claimed.get(name, ()):
            self._by_name[subject] = context
        if name == self._fallback_name:
            self._use_fallback(material)

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


def select_alpn(connection: SSL.Connection,
                offered: list[bytes]) -> bytes | SSL._NoOverlappingProtocols:
    """The first protocol the client offers that we speak; otherwise no ALPN at all (the
    handshake goes on, as for a client that offered nothing).

    An ACME tls-alpn-01 validation (ALPN ``acme-tls/1``, RFC 8737) for a name whose challenge
    is pending gets ``acme-tls/1`` and the validation certificate instead; the listener then
    closes the connection after the handshake (:func:`is_acme_validation`)."""
    if ACME_TLS_ALPN in offered:
        server_name = (connection.get_servername() or b"").decode("ascii", "replace")
        material = CHALLENGES.tls_alpn01(server_name) if server_name else None
        if material is not None:
            connection.use_certificate(material.certificate)
            connection.use_privatekey(material.key)
            log.info("answering an ACME tls-alpn-01 validation for {name}", name=server_name)
            return ACME_TLS_ALPN
    for protocol in offered:
        if protocol in ALPN_PROTOCOLS:
            return protocol
    return SSL.NO_OVERLAPPING_PROTOCOLS


def is_acme_validation(transport: object) -> bool:
    """After the handshake: the connection is an ACME tls-alpn-01 validation (ALPN
    ``acme-tls/1`` was selected), which must be closed without a word of the listener's
    protocol (RFC 8737 §3)."""
    connection = tls_connection(transport)
    return connection is not None and connection.get_alpn_proto_negotiated() == ACME_TLS_ALPN


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
