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
from dataclasses import dataclass, field
from typing import Union

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


@dataclass(frozen=True)
class PreAuthSettings:
    """What a pre-auth machine needs to know about its listener."""

    hostname: str
    tls_mode: str  # "implicit" | "starttls" | "plain"
    sasl: tuple[str, ...]
    allow_plain_auth_without_tls: bool
    banner: str
    max_auth_attempts: int = 3
    #: Protocol-specific capability settings (IMAP ``advertise``, submission ``ehlo``,
    #: ManageSieve ``sieve``/``implementation``), keyed as in ``[capabilities.<proto>]``.
    extra: dict[str, object] = field(default_factory=dict)


class PreAuthMachine(abc.ABC):
    """Server side of one protocol's dialogue up to a successful login. Sans-IO.

    While an :class:`Authenticate` is outstanding the machine parses nothing: bytes given to
    :meth:`receive` are buffered until the pipeline reports the outcome.
    """

    #: Hop TTL announced by an upstream proxy (IMAP ``ID x-proxy-ttl``), if the client sent one.
    proxy_ttl: int | None = None
    #: SMTP: the name the client gave in EHLO/HELO, replayed to the backend.
    client_helo: str | None = None

    @abc.abstractmethod
    def __init__(self, settings: PreAuthSettings) -> None: ...

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
    def login(self, credentials: Credentials, context: object) -> list[BackendEvent]:
        """Replay the client's login (``context`` as given in :class:`Authenticate`)."""

    @property
    @abc.abstractmethod
    def leftover(self) -> bytes:
        """Backend bytes received after the login outcome, to relay to the client."""

    @property
    def offered(self) -> dict[str, frozenset[str]] | None:
        """What the backend offers before login over the leg as established (after TLS),
        once :class:`BackendReady` was emitted: upper-cased words by ``[capabilities.<proto>]``
        key (``sasl``, IMAP ``advertise``, submission ``ehlo``, ManageSieve ``sieve``, and
        ManageSieve ``notify`` for its NOTIFY methods).  None when nothing was learnt."""
        return None


@dataclass(frozen=True)
class ProtocolSpec:
    """What the shared pipeline needs to run one interactive protocol."""

    name: str
    preauth: type[PreAuthMachine]
    dialogue: type[BackendDialogue]
    #: No login: every session goes to ``routing.smtp_passthrough_destination`` (SMTP, LMTP).
    passthrough: bool = False
