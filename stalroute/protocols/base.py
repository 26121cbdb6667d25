"""The contract between a protocol's sans-IO state machines and the shared pipeline.

Each protocol module provides two pure state machines:

* a :class:`PreAuthMachine` that plays the server side of the protocol until the client
  authenticates (greeting, capabilities, STARTTLS, the authentication command), and
* a :class:`BackendDialogue` that plays the client side toward the chosen backend
  (greeting, STARTTLS, forwarding of the client's address, replay of the login).

Neither touches a socket: they take bytes and return lists of events, which
:mod:`stalroute.session` carries out.  This keeps every protocol testable without a reactor
and keeps the pipeline (resolve → backend leg → replay → splice) in one place.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar, Union

from stalroute.config import ProtocolCapabilities
from stalroute.sasl import Credentials

#: Longest pre-auth line (and literal) any protocol accepts; longer input is a protocol error.
MAX_PREAUTH_LINE = 64 * 1024


# --- events emitted by a PreAuthMachine -------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """Bytes to write to the client."""

    data: bytes


@dataclass(frozen=True)
class StartTLS:
    """Start the server-side TLS handshake now (after the replies emitted before it)."""


@dataclass(frozen=True)
class Authenticate:
    """The client finished an authentication command: route it and replay it at a backend.

    ``context`` is protocol-specific (the IMAP tag, for instance) and is handed unchanged to
    the protocol's :class:`BackendDialogue`.
    """

    credentials: Credentials
    context: object = None


@dataclass(frozen=True)
class Close:
    """Close the client connection once the replies emitted before it are written."""


PreAuthEvent = Union[Reply, StartTLS, Authenticate, Close]

#: A protocol's own capability settings (``IMAPCapabilities``, ``SieveCapabilities`` …).
C = TypeVar("C")


@dataclass(frozen=True)
class PreAuthSettings(Generic[C]):
    """What a pre-auth machine needs to know about its listener."""

    hostname: str
    tls_mode: str  # "implicit" | "starttls" | "plain"
    sasl: tuple[str, ...]
    allow_plain_auth_without_tls: bool
    banner: str
    #: What only this protocol announces (IMAP ``advertise``, submission ``ehlo`` …).
    capabilities: C
    max_auth_attempts: int = 3


class PreAuthMachine(abc.ABC, Generic[C]):
    """Server side of one protocol's dialogue up to a successful login. Sans-IO.

    While an :class:`Authenticate` is outstanding the machine parses nothing: bytes given to
    :meth:`receive` are buffered until the pipeline reports the outcome.
    """

    #: Hop TTL announced by an upstream proxy (IMAP ``ID x-proxy-ttl``), if the client sent one.
    proxy_ttl: int | None = None
    #: SMTP: the name the client gave in EHLO/HELO, replayed to the backend.
    client_helo: str | None = None

    @abc.abstractmethod
    def __init__(self, settings: PreAuthSettings[C]) -> None: ...

    @property
    @abc.abstractmethod
    def tls_active(self) -> bool:
        """True once the client leg is encrypted (implicit TLS, or after STARTTLS)."""

    @abc.abstractmethod
    def greeting(self) -> list[PreAuthEvent]:
        """What to send when the connection (and implicit TLS) is ready."""

    @abc.abstractmethod
    def receive(self, data: bytes) -> list[PreAuthEvent]:
        """Feed client bytes."""

    @abc.abstractmethod
    def tls_started(self) -> list[PreAuthEvent]:
        """The STARTTLS handshake completed (ManageSieve re-sends its capabilities)."""

    @abc.abstractmethod
    def auth_failed(self, reply: bytes) -> list[PreAuthEvent]:
        """The backend refused the login: send ``reply``, count the attempt, keep parsing."""

    @abc.abstractmethod
    def auth_unavailable(self, reason: str) -> list[PreAuthEvent]:
        """No backend could take the login: a protocol-proper temporary failure."""

    @abc.abstractmethod
    def auth_succeeded(self) -> bytes:
        """The login succeeded; return the client bytes pipelined after it, for the backend."""

    @abc.abstractmethod
    def timed_out(self) -> list[PreAuthEvent]:
        """The pre-auth timer expired: a goodbye and :class:`Close`."""


# --- events emitted by a BackendDialogue -------------------------------------------------


@dataclass(frozen=True)
class BackendSend:
    """Bytes to write to the backend."""

    data: bytes


@dataclass(frozen=True)
class BackendStartTLS:
    """Start the client-side TLS handshake toward the backend now."""


@dataclass(frozen=True)
class BackendReady:
    """Greeting, STARTTLS and forwarding are done; the login may be replayed."""


@dataclass(frozen=True)
class LoginSucceeded:
    """The backend accepted the login; ``reply`` goes to the client, then the splice starts."""

    reply: bytes


@dataclass(frozen=True)
class LoginFailed:
    """The backend refused the login; ``reply`` goes to the client, who stays pre-auth."""

    reply: bytes


@dataclass(frozen=True)
class BackendError:
    """The backend broke the protocol or refused a step: a temporary failure for the client."""

    reason: str


BackendEvent = Union[BackendSend, BackendStartTLS, BackendReady, LoginSucceeded, LoginFailed,
                     BackendError]


@dataclass(frozen=True)
class ForwardingInfo:
    """The client's real connection, announced to a backend through XCLIENT or IMAP ID."""

    client_ip: str
    client_port: int
    local_ip: str
    local_port: int
    session_id: str
    ttl: int
    client_tls: bool = False


@dataclass(frozen=True)
class BackendSettings:
    """What a backend dialogue needs to know about its leg."""

    tls_mode: str  # "implicit" | "starttls" | "plain": the dialogue runs STARTTLS for "starttls"
    forwarding: ForwardingInfo | None  # set when the destination's forwarding is "xclient"
    hide_auth_errors: bool = False
    ehlo_name: str = "localhost"  # SMTP: the name to greet the backend with
    #: A capability probe (:mod:`stalroute.capabilities`): ask for the capabilities even
    #: where the login itself would not need them (POP3 CAPA over implicit TLS).
    learn_capabilities: bool = False


class BackendDialogue(abc.ABC):
    """Client side of one protocol toward a backend, up to the login outcome. Sans-IO.

    Phase one (establishment) starts with the backend's greeting and ends with
    :class:`BackendReady`; the pipeline then calls :meth:`login`, and the dialogue ends with
    :class:`LoginSucceeded`, :class:`LoginFailed` or :class:`BackendError`.
    """

    @abc.abstractmethod
    def __init__(self, settings: BackendSettings) -> None: ...

    def connected(self) -> list[BackendEvent]:
        """The leg is up (after implicit TLS). Client-first protocols (HTTP) are ready now;
        server-first ones wait for the greeting."""
        return []

    @abc.abstractmethod
    def receive(self, data: bytes) -> list[BackendEvent]:
        """Feed backend bytes."""

    @abc.abstractmethod
    def tls_started(self) -> list[BackendEvent]:
        """The STARTTLS handshake toward the backend completed."""

    @abc.abstractmethod
    def login(self, credentials: Credentials | None, context: object) -> list[BackendEvent]:
        """Replay the client's login (``context`` as given in :class:`Authenticate`);
        ``credentials`` is None for pass-through legs, which have no login."""

    @property
    @abc.abstractmethod
    def leftover(self) -> bytes:
        """Backend bytes received after the login outcome, to relay to the client."""

    @property
    def offered(self) -> Offer | None:
        """What the backend offers before login over the leg as established (after TLS),
        once :class:`BackendReady` was emitted; None when nothing was learnt."""
        return None


# --- the registry entry of a protocol ----------------------------------------------------

#: What a backend offers before login: upper-cased words by ``[capabilities.<proto>]`` key
#: (``sasl``, IMAP ``advertise``, submission ``ehlo``, ManageSieve ``sieve``), plus what a
#: protocol learns besides its lists (ManageSieve ``notify`` methods, POP3 ``capa`` words).
Offer = Mapping[str, frozenset[str]]


def _nothing_managed(word: str) -> bool:
    return False


@dataclass(frozen=True)
class CapabilityRules(Generic[C]):
    """How one protocol's pre-auth capabilities follow ``[capabilities.<proto>]`` and what
    the destinations offer (:mod:`stalroute.capabilities` applies them)."""

    #: The machine's settings from the section (its unset lists already narrowed) and the
    #: words every destination offers, by key.
    settings: Callable[[ProtocolCapabilities, Offer], C]
    #: The section's lists a destination can fail to honour: narrowed to what every
    #: destination offers unless set explicitly, checked by ``stalroute check`` when set.
    learnt: tuple[str, ...]
    #: What a destination that never answered a probe is taken to offer.
    fallback: Offer
    #: Words stalroute answers itself whatever a list says (never a broken promise).
    managed: Callable[[str], bool] = _nothing_managed


@dataclass(frozen=True)
class ProtocolSpec(Generic[C]):
    """What the shared pipeline needs to run one protocol: its entry in
    :data:`stalroute.protocols.PROTOCOLS`."""

    name: str
    preauth: type[PreAuthMachine[C]]
    dialogue: type[BackendDialogue]
    #: None for protocols that announce nothing of their own (SMTP, LMTP pass-through).
    capabilities: CapabilityRules[C] | None = None
    #: No login: every session goes to ``routing.smtp_passthrough_destination`` (SMTP, LMTP).
    passthrough: bool = False

