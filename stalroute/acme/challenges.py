"""The challenge material this process answers with (RFC 8555 §8.3, RFC 8737), in memory.

While an order is pending, the ACME server validates each name by connecting to us:

* **http-01**: ``GET /.well-known/acme-challenge/<token>`` on port 80 must answer the key
  authorization (:func:`http01_response`, for the HTTP listeners);
* **tls-alpn-01**: a TLS handshake with SNI ``<name>`` offering ALPN ``acme-tls/1`` must select
  ``acme-tls/1`` and present a self-signed certificate for ``<name>`` carrying the critical
  acmeIdentifier extension (SHA-256 of the key authorization). :mod:`stalroute.tls` asks
  :meth:`ChallengeTable.tls_alpn01` from its ALPN callback.

One :data:`CHALLENGES` table per process, bounded (:data:`MAX_ENTRIES`) and expiring
(:data:`DEFAULT_TTL`): whoever orders publishes material here before answering the challenge
and withdraws it afterwards. In a fleet, or with worker processes, the renewing process sends
it to every process as an ``acme_challenge`` change (:mod:`stalroute.acme.roles`), which each
one applies here with :func:`add_challenge` (``acme_challenge_withdraw``:
:func:`remove_challenge`).
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ObjectIdentifier

from stalroute.selfsigned import self_signed_certificate

#: The ALPN protocol of tls-alpn-01 validations (RFC 8737 §6.2).
ACME_TLS_ALPN = b"acme-tls/1"
#: id-pe-acmeIdentifier (RFC 8737 §6.1).
ACME_IDENTIFIER_OID = ObjectIdentifier("1.3.6.1.5.5.7.1.31")
#: Where http-01 validations ask (RFC 8555 §8.3).
HTTP01_PREFIX = "/.well-known/acme-challenge/"

#: Pending material kept at most (the oldest goes first beyond it).
MAX_ENTRIES = 1000
#: Seconds a piece of material is answered at most, unless withdrawn earlier.
DEFAULT_TTL = 600.0


def acme_identifier_value(key_authorization: str) -> bytes:
    """The DER value of the acmeIdentifier extension: an OCTET STRING of 32 bytes holding
    SHA-256(key authorization)."""
    return b"\x04\x20" + hashlib.sha256(key_authorization.encode("ascii")).digest()


def tls_alpn01_certificate(domain: str, key_authorization: str
                           ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The self-signed validation certificate for ``domain`` (RFC 8737 §3)."""
    return self_signed_certificate(
        domain, common_name="ACME challenge", days=7,
        critical_extensions=[x509.UnrecognizedExtension(
            ACME_IDENTIFIER_OID, acme_identifier_value(key_authorization))])


@dataclass(frozen=True)
class TLSALPNMaterial:
    """What a tls-alpn-01 handshake for one name presents (made once, when published)."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey


class ChallengeTable:
    """Pending http-01 (token → key authorization) and tls-alpn-01 (name → certificate)
    material, bounded and expiring."""

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 max_entries: int = MAX_ENTRIES, ttl: float = DEFAULT_TTL) -> None:
        self._clock = clock
        self._max = max_entries
        self._ttl = ttl
        # key ("http-01", token) or ("tls-alpn-01", name) → (expiry, value)
        self._entries: OrderedDict[tuple[str, str], tuple[float, object]] = OrderedDict()

    def __len__(self) -> int:
        self._expire()
        return len(self._entries)

    def _put(self, key: tuple[str, str], value: object, ttl: float | None) -> None:
        self._expire()
        self._entries.pop(key, None)
        self._entries[key] = (self._clock() + (self._ttl if ttl is None else ttl), value)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def _get(self, key: tuple[str, str]) -> object | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        expiry, value = entry
        if expiry <= self._clock():
            del self._entries[key]
            return None
        return value

    def _expire(self) -> None:
        now = self._clock()
        for key in [k for k, (expiry, _) in self._entries.items() if expiry <= now]:
            del self._entries[key]

    # http-01 -----------------------------------------------------------------------------

    def add_http01(self, token: str, key_authorization: str, ttl: float | None = None) -> None:
        self._put(("http-01", token), key_authorization.encode("ascii"), ttl)

    def remove_http01(self, token: str) -> None:
        self._entries.pop(("http-01", token), None)

    def http01(self, token: str) -> bytes | None:
        """The key authorization to answer for ``token``, if pending."""
        value = self._get(("http-01", token))
        return value if isinstance(value, bytes) else None

    # tls-alpn-01 -------------------------------------------------------------------------

    def add_tls_alpn01(self, domain: str, key_authorization: str,
                       ttl: float | None = None) -> None:
        cert, key = tls_alpn01_certificate(domain, key_authorization)
        self._put(("tls-alpn-01", _name(domain)), TLSALPNMaterial(cert, key), ttl)

    def remove_tls_alpn01(self, domain: str) -> None:
        self._entries.pop(("tls-alpn-01", _name(domain)), None)

    def tls_alpn01(self, domain: str) -> TLSALPNMaterial | None:
        """The validation certificate to present for SNI ``domain``, if pending."""
        value = self._get(("tls-alpn-01", _name(domain)))
        return value if isinstance(value, TLSALPNMaterial) else None

    def clear(self) -> None:
        self._entries.clear()


def _name(domain: str) -> str:
    return domain.lower().rstrip(".")


#: This process's table: the order flow publishes here, the listeners answer from it.
CHALLENGES = ChallengeTable()

#: The challenge types answered.
KINDS = ("tls-alpn-01", "http-01")


def add_challenge(kind: str, domain: str, token: str, key_authorization: str,
                  table: ChallengeTable | None = None) -> None:
    """Answer one challenge from now on: tls-alpn-01 by ``domain``, http-01 by ``token``.
    ValueError for another kind (or a key authorization that is not ASCII)."""
    table = CHALLENGES if table is None else table
    if kind == "tls-alpn-01":
        table.add_tls_alpn01(domain, key_authorization)
    elif kind == "http-01":
        table.add_http01(token, key_authorization)
    else:
        raise ValueError(f"unknown challenge type {kind!r}")


def remove_challenge(kind: str, domain: str, token: str,
                     table: ChallengeTable | None = None) -> None:
    """Stop answering one challenge (nothing if it is not pending)."""
    table = CHALLENGES if table is None else table
    if kind == "tls-alpn-01":
        table.remove_tls_alpn01(domain)
    elif kind == "http-01":
        table.remove_http01(token)


def http01_response(path: str, table: ChallengeTable | None = None) -> bytes | None:
    """The body to answer an HTTP request for ``path`` (the request target's path, without
    the query) with: the key authorization when ``path`` is
    ``/.well-known/acme-challenge/<token>`` and ``<token>`` is pending, else None (the request
    takes its usual way). Answer it ``200 OK``, ``Content-Type: application/octet-stream``,
    before any routing."""
    if not path.startswith(HTTP01_PREFIX):
        return None
    token = path[len(HTTP01_PREFIX):]
    if not token or "/" in token:
        return None
    return (CHALLENGES if table is None else table).http01(token)
