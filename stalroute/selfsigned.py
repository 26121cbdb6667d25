"""Self-signed certificates made in memory: the throwaway certificate TLS listeners serve
before one is configured (:mod:`stalroute.tls`) and tls-alpn-01 validation certificates
(:mod:`stalroute.acme.challenges`)."""

from __future__ import annotations

import datetime
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def self_signed_certificate(
    hostname: str, *, common_name: str | None = None, days: int = 365,
    critical_extensions: Sequence[x509.ExtensionType] = (),
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A fresh P-256 key and a certificate it signs for ``hostname`` (its only DNS name),
    valid from five minutes ago for ``days``; the subject's common name is ``common_name``
    (default: ``hostname``), and ``critical_extensions`` are added marked critical."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name or hostname)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=days))
               .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]),
                              critical=False))
    for extension in critical_extensions:
        builder = builder.add_extension(extension, critical=True)
    return builder.sign(key, hashes.SHA256()), key
