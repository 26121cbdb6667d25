"""SMTP and LMTP pass-through (SPEC §5): nothing is parsed.

Every session goes to ``routing.smtp_passthrough_destination`` with that destination's
forwarding (a PROXY header, or XCLIENT, so the backend can run SPF and DMARC on the real
client address); the backend's own greeting is the first thing the client sees.  The two machines
below only fit pass-through into the shared pipeline: the client side holds any early bytes
until the splice, the backend side is ready as soon as the backend speaks.
"""

from __future__ import annotations

from enum import Enum

from stalroute.protocols.base import (
    MAX_PREAUTH_LINE, BackendDialogue, BackendError, BackendEvent, BackendReady, BackendSend,
    BackendSettings, Close, LoginSucceeded, PreAuthEvent, PreAuthMachine, PreAuthSettings,
    ProtocolSpec, Reply,
)
from stalroute.protocols.lines import ProtocolViolation
from stalroute.protocols.smtpreply import ReplyReader, ehlo_keywords
from stalroute.protocols.xclient import advertised_attributes, xclient_command
from stalroute.sasl import Credentials

_UNAVAILABLE = b"421 4.3.0 Service temporarily unavailable, try again later\r\n"


class PassthroughClient(PreAuthMachine[None]):
    """The client side before the splice: no greeting of our own, early bytes kept."""

    def __init__(self, settings: PreAuthSettings[None]) -> None:
        self._tls_active = settings.tls_mode == "implicit"
        self._early = bytearray()

    @property
    def tls_active(self) -> bool:
        return self._tls_active

    def greeting(self) -> list[PreAuthEvent]:
        return []

    def receive(self, data: bytes) -> list[PreAuthEvent]:
        self._early += data
        if len(self._early) > MAX_PREAUTH_LINE:
            return [Reply(b"421 4.7.0 Too much data before the greeting\r\n"), Close()]
        return []

    def tls_started(self) -> list[PreAuthEvent]:
        return []

    def auth_failed(self, reply: bytes) -> list[PreAuthEvent]:
        return [Reply(reply), Close()]

    def auth_unavailable(self, reason: str) -> list[PreAuthEvent]:
        return [Reply(_UNAVAILABLE), Close()]

    def auth_succeeded(self) -> bytes:
        early, self._early = bytes(self._early), bytearray()
        return early

    def timed_out(self) -> list[PreAuthEvent]:
        return [Reply(_UNAVAILABLE), Close()]


class _Stage(Enum):
    """Where the backend side stands before the relay starts."""

    GREETING = "greeting"  # waiting for the backend's greeting
    HELLO = "hello"  # EHLO/LHLO sent, to learn whether XCLIENT is offered
    XCLIENT = "xclient"  # XCLIENT sent; its 220 is the client's greeting
    READY = "ready"  # relaying


class PassthroughBackend(BackendDialogue):
    """The backend side: ready when it first speaks; its greeting is relayed as is.

    With ``forwarding = "xclient"`` the dialogue first announces the client: greeting →
    ``EHLO`` → ``XCLIENT`` (only the attributes the backend lists), and the fresh ``220`` the
    backend answers XCLIENT with becomes the client's greeting. A backend that does not offer
    XCLIENT is relayed its original greeting (the client's own EHLO resets the session).
    """

    #: The hello command of the protocol (LMTP uses LHLO).
    hello = b"EHLO"

    def __init__(self, settings: BackendSettings) -> None:
        self._settings = settings
        self._replies = ReplyReader()
        self._stage = _Stage.GREETING
        self._greeting = b""
        self._relay = bytearray()

    def receive(self, data: bytes) -> list[BackendEvent]:
        if self._stage is _Stage.READY:
            self._relay += data
            return []
        if self._settings.forwarding is None:
            self._stage = _Stage.READY
            self._relay += data
            return [BackendReady()]
        self._replies.feed(data)
        try:
            return self._advance()
        except ProtocolViolation as exc:  # a malformed or over-long reply
            return [BackendError(f"backend broke SMTP while announcing the client: {exc}")]

    def _advance(self) -> list[BackendEvent]:
        events: list[BackendEvent] = []
        while (self._stage is not _Stage.READY
               and (reply := self._replies.next_reply()) is not None):
            if self._stage is _Stage.GREETING:
                self._greeting = reply.raw
                if reply.code != 220:  # a refusal: the client should see it as it is
                    return self._ready(reply.raw)
                self._stage = _Stage.HELLO
                events.append(BackendSend(self.hello + b" "
                                          + self._settings.ehlo_name.encode() + b"\r\n"))
            elif self._stage is _Stage.HELLO:
                keywords = ehlo_keywords(reply) if reply.code == 250 else {}
                command = None
                forwarding = self._settings.forwarding
                if forwarding is not None and "XCLIENT" in keywords:
                    command = xclient_command(forwarding,
                                              advertised_attributes(keywords["XCLIENT"]),
                                              smtp=True)
                if command is None:
                    return events + self._ready(self._greeting)
                self._stage = _Stage.XCLIENT
                events.append(BackendSend(command + b"\r\n"))
            elif reply.code == 220:  # the greeting of the session as the client's
                return events + self._ready(reply.raw)
            else:
                return [BackendError(f"backend refused XCLIENT: {reply.code}")]
        return events

    def _ready(self, greeting: bytes) -> list[BackendEvent]:
        self._stage = _Stage.READY
        self._relay += greeting + self._replies.take_all()
        return [BackendReady()]

    def tls_started(self) -> list[BackendEvent]:
        return []

    def login(self, credentials: Credentials | None, context: object) -> list[BackendEvent]:
        return [LoginSucceeded(b"")]

    @property
    def leftover(self) -> bytes:
        return bytes(self._relay)


class LMTPPassthroughBackend(PassthroughBackend):
    hello = b"LHLO"


SMTP = ProtocolSpec("smtp", PassthroughClient, PassthroughBackend, passthrough=True)
LMTP = ProtocolSpec("lmtp", PassthroughClient, LMTPPassthroughBackend, passthrough=True)
