"""SMTP and LMTP pass-through (SPEC §5): nothing is parsed.

Every session goes to ``routing.smtp_passthrough_destination`` with that destination's
forwarding (typically a PROXY header, so the backend can run SPF and DMARC on the real client
address); the backend's own greeting is the first thing the client sees.  The two machines
below only fit pass-through into the shared pipeline: the client side holds any early bytes
until the splice, the backend side is ready as soon as the backend speaks.
"""

from __future__ import annotations

from stalroute.protocols.base import (
    MAX_PREAUTH_LINE, BackendDialogue, BackendEvent, BackendReady, BackendSettings, Close,
    LoginSucceeded, PreAuthEvent, PreAuthMachine, PreAuthSettings, ProtocolSpec, Reply,
)
from stalroute.sasl import Credentials

_UNAVAILABLE = b"421 4.3.0 Service temporarily unavailable, try again later\r\n"


class PassthroughClient(PreAuthMachine):
    """The client side before the splice: no greeting of our own, early bytes kept."""

    def __init__(self, settings: PreAuthSettings) -> None:
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


class PassthroughBackend(BackendDialogue):
    """The backend side: ready when it first speaks; its greeting is relayed as is."""

    def __init__(self, settings: BackendSettings) -> None:
        self._received = bytearray()

    def receive(self, data: bytes) -> list[BackendEvent]:
        first = not self._received
        self._received += data
        return [BackendReady()] if first else []

    def tls_started(self) -> list[BackendEvent]:
        return []

    def login(self, credentials: Credentials | None, context: object) -> list[BackendEvent]:
        return [LoginSucceeded(b"")]

    @property
    def leftover(self) -> bytes:
        return bytes(self._received)


SMTP = ProtocolSpec("smtp", PassthroughClient, PassthroughBackend, passthrough=True)
LMTP = ProtocolSpec("lmtp", PassthroughClient, PassthroughBackend, passthrough=True)
