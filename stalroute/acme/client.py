"""One ACME order (RFC 8555) with the ``acme`` library: account, order, challenges, certificate.

The library's calls block (``requests``), so each step runs in a thread
(:func:`twisted.internet.threads.deferToThread`, injectable for tests) and the steps are
coordinated, and logged, on the reactor thread by :func:`order_certificate`:

1. the account key is read from the :class:`~stalroute.acme.store.SharedStore` (P-256, made
   and stored on first use, :func:`load_or_create_account_key`);
2. the account is registered (with External Account Binding when configured), or found again
   when the server already knows the key (``ConflictError``);
3. a new order for the entry's ``domains``, with a CSR for a fresh certificate key
   (``key_type``);
4. for each pending authorization the challenge of the configured type is *published* through
   the caller's callback (which must complete before we answer: the server may validate at
   once), then answered;
5. the authorizations are polled and the order finalized: the chain (leaf first) and the key
   come back as :class:`Issued`. The published material is withdrawn whatever happened.

acme 5.x dropped its tls-alpn-01 classes; the challenge is registered here (its response is an
empty object, so the type is all it takes).
"""

from __future__ import annotations

import datetime
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import josepy as jose
import requests
from acme import challenges, client, crypto_util, errors, messages
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from twisted.internet.threads import deferToThread

from stalroute.acme.store import SharedStore, account_key
from stalroute.config import AcmeConfig
from stalroute.logs import logger

log = logger("stalroute.acme")

T = TypeVar("T")

#: Longest wait for the authorizations to turn valid and the certificate to be issued.
ORDER_DEADLINE = 120.0
#: Per HTTP request to the ACME server.
NETWORK_TIMEOUT = 30
USER_AGENT = "stalroute-acme"


# --- tls-alpn-01 for acme 5.x (RFC 8737) ---------------------------------------------------------


@challenges.ChallengeResponse.register
class TLSALPN01Response(challenges.KeyAuthorizationChallengeResponse):
    """The (empty) answer to a tls-alpn-01 challenge."""

    typ = "tls-alpn-01"


@challenges.Challenge.register
class TLSALPN01(challenges.KeyAuthorizationChallenge):
    """The tls-alpn-01 challenge: the key authorization goes into the acmeIdentifier
    extension of the certificate presented for ALPN ``acme-tls/1``."""

    response_cls = TLSALPN01Response
    typ = response_cls.typ

    def validation(self, account_key: jose.JWK, **kwargs: Any) -> str:
        return str(self.key_authorization(account_key))


_CHALLENGE_TYPES: dict[str, type[challenges.KeyAuthorizationChallenge]] = {
    "tls-alpn-01": TLSALPN01, "http-01": challenges.HTTP01}


# --- what goes in and out ------------------------------------------------------------------------


@dataclass(frozen=True)
class Challenge:
    """One challenge to publish: ``kind`` ``tls-alpn-01`` (answered by ``domain``) or
    ``http-01`` (answered by ``token``), with the key authorization to answer."""

    kind: str
    domain: str
    token: str
    key_authorization: str


@dataclass(frozen=True)
class Issued:
    """An issued certificate: the PEM chain (leaf first) and its PEM private key."""

    chain_pem: bytes
    key_pem: bytes

    @property
    def leaf(self) -> x509.Certificate:
        return x509.load_pem_x509_certificates(self.chain_pem)[0]

    @property
    def not_after(self) -> datetime.datetime:
        return self.leaf.not_valid_after_utc

    @property
    def not_before(self) -> datetime.datetime:
        return self.leaf.not_valid_before_utc

    def describe(self) -> str:
        """``serial … issued by … valid until …`` for logs (no key material)."""
        leaf = self.leaf
        return (f"serial {leaf.serial_number:x} issued by {leaf.issuer.rfc4514_string()}, "
                f"valid {leaf.not_valid_before_utc:%Y-%m-%d %H:%M:%S} to "
                f"{leaf.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC")


class AcmeError(Exception):
    """An order failed; the message names the step and the server's reason."""


#: ``publish(challenges)`` / ``withdraw(challenges)``: make the material answerable (or stop
#: answering it) wherever the ACME server may connect; the Deferred fires once done.
ChallengeCallback = Callable[[Sequence[Challenge]], Awaitable[None]]
#: Runs a blocking call off the reactor thread (``deferToThread``).
RunInThread = Callable[..., Awaitable[Any]]


# --- keys ----------------------------------------------------------------------------------------


def _pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def new_account_key() -> bytes:
    """A P-256 account key (ES256 signatures), PEM."""
    return _pem(ec.generate_private_key(ec.SECP256R1()))


def new_certificate_key(key_type: str) -> bytes:
    """A certificate key of ``[acme.<name>] key_type``, PEM."""
    if key_type == "rsa-2048":
        return _pem(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    return _pem(ec.generate_private_key(ec.SECP256R1()))


async def load_or_create_account_key(store: SharedStore, acme_name: str) -> bytes:
    """The account key of ``[acme.<acme_name>]`` from the store, made and stored if missing."""
    stored = await store.get(account_key(acme_name))
    if stored is not None:
        return stored
    pem = new_account_key()
    await store.put(account_key(acme_name), pem)
    log.info("acme {name}: created a new account key", name=acme_name)
    return pem


def _jwk(pem: bytes) -> tuple[jose.JWK, jose.JWASignature]:
    key = serialization.load_pem_private_key(pem, None)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return jose.JWKEC(key=key), jose.ES256
    if isinstance(key, rsa.RSAPrivateKey):
        return jose.JWKRSA(key=key), jose.RS256
    raise AcmeError(f"unsupported account key type {type(key).__name__}")


# --- the blocking steps (run in a thread) --------------------------------------------------------


def _describe(exc: BaseException) -> str:
    """The server's reason (an ACME problem document) or the network error, for a log line."""
    if isinstance(exc, messages.Error):
        return f"{exc.typ}: {exc.detail}" if exc.detail else str(exc.typ)
    if isinstance(exc, errors.ValidationError):
        reasons = []
        for authzr in exc.failed_authzrs:
            for challb in authzr.body.challenges:
                if challb.error is not None:
                    reasons.append(f"{authzr.body.identifier.value}: {_describe(challb.error)}")
        return "validation failed: " + ("; ".join(reasons) or "no reason given")
    if isinstance(exc, requests.exceptions.RequestException):
        return f"cannot reach the ACME server: {type(exc).__name__}: {exc}"
    return f"{type(exc).__name__}: {exc}"


class _Session:
    """One ACME conversation; every method blocks (call it in a thread)."""

    def __init__(self, config: AcmeConfig, account_key_pem: bytes) -> None:
        self.config = config
        self.key, alg = _jwk(account_key_pem)
        verify: Any = str(config.ca_file) if config.ca_file else True  # requests' verify=
        self.net = client.ClientNetwork(self.key, alg=alg, verify_ssl=verify,
                                        user_agent=USER_AGENT, timeout=NETWORK_TIMEOUT)
        self.acme: client.ClientV2 | None = None

    def account(self) -> str:
        """Register (or find) the account; its URL."""
        directory = client.ClientV2.get_directory(self.config.directory, self.net)
        self.acme = client.ClientV2(directory, self.net)
        eab = None
        if self.config.eab_kid and self.config.eab_hmac_key:
            eab = messages.ExternalAccountBinding.from_data(
                account_public_key=self.key.public_key(), kid=self.config.eab_kid,
                hmac_key=self.config.eab_hmac_key, directory=directory)
        registration = messages.NewRegistration.from_data(
            terms_of_service_agreed=True, external_account_binding=eab)
        if self.config.contact:
            registration = registration.update(contact=tuple(self.config.contact))
        try:
            account = self.acme.new_account(registration)
        except errors.ConflictError as exc:  # the key is registered already: that account
            account = self.acme.query_registration(
                messages.RegistrationResource(uri=exc.location, body=messages.Registration()))
            self.net.account = account
        return str(account.uri)

    def new_order(self, certificate_key_pem: bytes
                  ) -> tuple[messages.OrderResource, list[tuple[messages.ChallengeBody,
                                                                 Challenge]]]:
        """A new order; the challenges of its pending authorizations, of the configured type."""
        assert self.acme is not None
        csr = crypto_util.make_csr(certificate_key_pem, list(self.config.domains))
        order = self.acme.new_order(csr)
        wanted = _CHALLENGE_TYPES[self.config.challenge]
        pending = []
        for authzr in order.authorizations:
            if authzr.body.status == messages.STATUS_VALID:
                continue
            domain = str(authzr.body.identifier.value)
            challb = next((c for c in authzr.body.challenges if isinstance(c.chall, wanted)),
                          None)
            if challb is None:
                offered = ", ".join(str(c.chall.typ) for c in authzr.body.challenges
                                    if hasattr(c.chall, "typ"))
                raise AcmeError(f"the server offers no {self.config.challenge} challenge for "
                                f"{domain} (it offers: {offered or 'none'})")
            key_authorization = challb.chall.validation(self.key)
            pending.append((challb, Challenge(self.config.challenge, domain,
                                              challb.chall.encode("token"),
                                              str(key_authorization))))
        return order, pending

    def answer(self, pending: Sequence[tuple[messages.ChallengeBody, Challenge]]) -> None:
        assert self.acme is not None
        for challb, _ in pending:
            self.acme.answer_challenge(challb, challb.chall.response(self.key))

    def finalize(self, order: messages.OrderResource, seconds: float) -> str:
        """Poll until every authorization is valid, finalize; the full chain (PEM)."""
        assert self.acme is not None
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=seconds)
        order = self.acme.poll_and_finalize(order, deadline)
        if not order.fullchain_pem:
            raise AcmeError("the order was finalized without a certificate")
        return str(order.fullchain_pem)


# --- the order, on the reactor thread ------------------------------------------------------------


async def _step(run: RunInThread, what: str, function: Callable[..., T], *args: Any) -> T:
    try:
        result: T = await run(function, *args)
    except AcmeError:
        raise
    except Exception as exc:  # noqa: BLE001 - every failure of a step is reported by step
        raise AcmeError(f"{what}: {_describe(exc)}") from exc
    return result


async def order_certificate(config: AcmeConfig, account_key_pem: bytes,
                            publish: ChallengeCallback, withdraw: ChallengeCallback, *,
                            run: RunInThread = deferToThread,
                            deadline: float = ORDER_DEADLINE) -> Issued:
    """Order a certificate for ``config.domains``; raises :class:`AcmeError` naming the step
    that failed. ``publish`` must make the challenge material answerable before it fires."""
    name = config.name
    session = _Session(config, account_key_pem)
    log.info("acme {name}: contacting {directory}", name=name, directory=config.directory)
    account = await _step(run, "directory and account", session.account)
    log.info("acme {name}: account {account}", name=name, account=account)
    certificate_key = new_certificate_key(config.key_type)
    order, pending = await _step(run, "new order", session.new_order, certificate_key)
    log.info("acme {name}: order {order} for {domains}: {count} {kind} challenges to answer",
             name=name, order=order.uri, domains=", ".join(config.domains), count=len(pending),
             kind=config.challenge)
    published = [challenge for _, challenge in pending]
    try:
        if published:
            await publish(published)
            await _step(run, "answering the challenges", session.answer, pending)
            log.info("acme {name}: challenges answered; waiting for validation", name=name)
        chain = await _step(run, "validation and finalization", session.finalize, order,
                            deadline)
    finally:
        if published:
            await withdraw(published)
    issued = Issued(chain.encode("ascii"), certificate_key)
    log.info("acme {name}: certificate issued: {details}", name=name, details=issued.describe())
    return issued
