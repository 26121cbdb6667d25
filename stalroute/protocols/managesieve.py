"""ManageSieve: the pre-auth server dialogue and the backend login replay (SPEC §5). Sans-IO.

:class:`ManageSievePreAuth` answers the client before authentication (RFC 5804): the
capability block and ``OK`` as greeting, CAPABILITY, NOOP (with its tag echoed), LOGOUT,
STARTTLS (capabilities re-sent once TLS is up), and AUTHENTICATE with quoted or literal
strings for the initial response and the continuation responses.  Whenever ``enotify`` is
among the advertised extensions, ``NOTIFY`` lists the notification methods (RFC 5804 §1.7):
those every destination offers, else :data:`DEFAULT_NOTIFY_METHODS`.
:class:`ManageSieveBackendDialogue` plays the client toward the backend: capability block,
STARTTLS and the re-sent block, ``XCLIENT`` (Dovecot), then ``AUTHENTICATE "<mech>" "<ir>"``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import ClassVar

from stalroute.config import (
    DEFAULT_SIEVE_EXTENSIONS,
    DEFAULT_SIEVE_IMPLEMENTATION,
    ProtocolCapabilities,
)
from stalroute.protocols.base import (
    MAX_PREAUTH_LINE,
    BackendEvent,
    BackendSend,
    BackendSettings,
    CapabilityRules,
    Offer,
    PreAuthEvent,
    PreAuthSettings,
    ProtocolSpec,
    Reply,
)
from stalroute.protocols.linebased import CloseReason, LinePreAuth, LiteralDialogue, Stage
from stalroute.protocols.lines import (
    ArgumentError,
    Arguments,
    CapabilityLines,
    LiteralAssembler,
    Unit,
    quote,
    safe_text,
)
from stalroute.protocols.xclient import xclient_command
from stalroute.sasl import Credentials, SASLError, encode_base64

#: NOTIFY methods sent with ``enotify`` when the settings name none (Pigeonhole's only one).
DEFAULT_NOTIFY_METHODS = ("mailto",)
#: The generic refusal (``hide_auth_errors``), as Dovecot words it.
HIDDEN_FAILURE = b'NO "Authentication failed."\r\n'
#: Longest NOOP tag echoed back; longer ones are refused.
MAX_NOOP_TAG = 1024
#: Longer SASL responses go to the backend as a literal instead of a quoted string.
MAX_QUOTED_RESPONSE = 1024

_COMMAND_NAME = re.compile(rb"[A-Za-z]+")
_ATOM = re.compile(rb"[A-Za-z0-9-]+")
_WORD = re.compile(r"[!-~]+")


def _string(value: bytes) -> bytes:
    """A string for the client: quoted, or a literal when quoting cannot carry it."""
    if any(byte in value for byte in b"\0\r\n"):
        return b"{%d}\r\n" % len(value) + value
    return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def _words(words: Sequence[str]) -> bytes:
    """A capability value listing ``words`` (printable ASCII words only)."""
    return quote(" ".join(word for word in words if _WORD.fullmatch(word)))


def _text(text: bytes) -> bytes:
    """A human-readable text (already safe ASCII) as a quoted string."""
    return quote(text.decode("ascii"))


# --- what ManageSieve announces ------------------------------------------------------------


@dataclass(frozen=True)
class SieveCapabilities:
    """``[capabilities.managesieve]``'s own settings, as :class:`ManageSievePreAuth` reads
    them."""

    #: The ``SIEVE`` extensions; an empty list is a choice (nothing the destinations honour).
    sieve: tuple[str, ...] = DEFAULT_SIEVE_EXTENSIONS
    implementation: str = DEFAULT_SIEVE_IMPLEMENTATION
    #: The ``NOTIFY`` methods, sent whenever ``enotify`` is among ``sieve``.
    notify: tuple[str, ...] = DEFAULT_NOTIFY_METHODS

    @classmethod
    def from_config(cls, section: ProtocolCapabilities, offered: Offer) -> SieveCapabilities:
        methods = tuple(sorted(method.lower() for method in offered.get("notify", ())))
        return cls(sieve=section.sieve, implementation=section.implementation,
                   notify=methods or DEFAULT_NOTIFY_METHODS)


#: What a destination that never answered a probe is taken to offer: Pigeonhole 0.5's
#: default extensions (the default list without ``vacation-seconds`` and ``editheader``)
#: and its NOTIFY method.
FALLBACK: Offer = {
    "sieve": frozenset(extension.upper() for extension in DEFAULT_SIEVE_EXTENSIONS
                       if extension not in ("vacation-seconds", "editheader")),
    "sasl": frozenset({"PLAIN"}), "notify": frozenset({"MAILTO"})}


# --- the client side: pre-auth server -----------------------------------------------------


class ManageSievePreAuth(LinePreAuth[SieveCapabilities]):
    """The ManageSieve server dialogue up to a successful login."""

    def __init__(self, settings: PreAuthSettings[SieveCapabilities]) -> None:
        # ManageSieve has no literal continuation: "{n}" and "{n+}" are both read at once.
        super().__init__(settings, LiteralAssembler(MAX_PREAUTH_LINE, synchronising=False))

    def greeting(self) -> list[PreAuthEvent]:
        banner = safe_text(self.settings.banner, "Ready.")
        return [Reply(self.capability_block() + b"OK " + _text(banner) + b"\r\n")]

    def capability_block(self) -> bytes:
        """The capability lines as they stand now (RFC 5804 §1.7)."""
        own = self.settings.capabilities
        implementation = safe_text(own.implementation, DEFAULT_SIEVE_IMPLEMENTATION)
        lines = [
            b'"IMPLEMENTATION" ' + _text(implementation),
            b'"SASL" ' + _words(self._usable_mechanisms()),
            b'"SIEVE" ' + _words(own.sieve),
        ]
        if any(extension.lower() == "enotify" for extension in own.sieve):
            lines.append(b'"NOTIFY" ' + _words(own.notify))
        if self._starttls_offered:
            lines.append(b'"STARTTLS"')
        lines.append(b'"VERSION" "1.0"')
        return b"".join(line + b"\r\n" for line in lines)

    # -- reading

    def _sasl_response(self, unit: object) -> bytes:
        assert isinstance(unit, Unit)
        arguments = unit.arguments()
        try:
            if not arguments.at_string():
                raise ArgumentError
            response = arguments.string()
            arguments.end()
        except ArgumentError:
            raise SASLError("Invalid SASL response") from None
        return response

    # -- wording

    def _goodbye(self, reason: CloseReason) -> bytes | None:
        return b"BYE " + quote(reason.value + ".") + b"\r\n"

    def _challenge(self, text: bytes) -> bytes:
        return _string(text) + b"\r\n"

    def _sasl_aborted(self) -> bytes:
        return b'NO "Authentication aborted."\r\n'

    def _credentials_invalid(self, error: SASLError) -> bytes:
        return b"NO " + _text(safe_text(str(error), "Authentication failed.")) + b"\r\n"

    def _mechanism_unsupported(self) -> bytes:
        return b'NO "Unsupported authentication mechanism."\r\n'

    def _privacy_required(self) -> bytes:
        return (b'NO (ENCRYPT-NEEDED) "Cleartext authentication is not allowed without TLS."'
                b"\r\n")

    def _temporary_failure(self, text: bytes) -> list[PreAuthEvent]:
        return [Reply(b"NO (TRYLATER) " + _text(text) + b"\r\n")]

    def _after_tls(self) -> list[PreAuthEvent]:
        return [Reply(self.capability_block() + b'OK "TLS negotiation successful."\r\n')]

    # -- commands

    def _execute(self, unit: object) -> list[PreAuthEvent]:
        assert isinstance(unit, Unit)
        arguments = unit.arguments()
        try:
            name = arguments.word(_COMMAND_NAME).upper()
        except ArgumentError:
            return self._bad(b'NO "Invalid command."\r\n')
        handler = self._HANDLERS.get(name)
        if handler is None:
            return self._bad(b'NO "Command not allowed before authentication."\r\n')
        try:
            return handler(self, arguments)
        except ArgumentError:
            return self._bad(b'NO "Invalid arguments."\r\n')

    def _capability(self, arguments: Arguments) -> list[PreAuthEvent]:
        arguments.end()
        return [Reply(self.capability_block() + b'OK "Capability completed."\r\n')]

    def _noop(self, arguments: Arguments) -> list[PreAuthEvent]:
        if arguments.at_end():
            return [Reply(b'OK "Done"\r\n')]
        arguments.space()
        tag = arguments.string()
        arguments.end()
        if len(tag) > MAX_NOOP_TAG:
            raise ArgumentError
        return [Reply(b"OK (TAG " + _string(tag) + b') "Done"\r\n')]

    def _logout(self, arguments: Arguments) -> list[PreAuthEvent]:
        arguments.end()
        return self._hang_up(b'OK "Logout completed."\r\n')

    def _starttls(self, arguments: Arguments) -> list[PreAuthEvent]:
        arguments.end()
        if self._tls_active:
            return self._bad(b'NO "TLS is already active."\r\n')
        if not self._starttls_offered:
            return self._bad(b'NO "STARTTLS not available."\r\n')
        return self._start_tls(b'OK "Begin TLS negotiation now."\r\n')

    def _authenticate(self, arguments: Arguments) -> list[PreAuthEvent]:
        arguments.space()
        mechanism = arguments.string()
        initial_response = None
        if not arguments.at_end():
            arguments.space()
            initial_response = arguments.string()
        arguments.end()
        return self._start_sasl(mechanism.decode("ascii", "replace"), initial_response)

    #: The commands it answers (a class-level table: see :class:`LinePreAuth`).
    _HANDLERS: ClassVar[dict[bytes, Callable[[ManageSievePreAuth, Arguments],
                                             list[PreAuthEvent]]]] = {
        b"CAPABILITY": _capability,
        b"NOOP": _noop,
        b"LOGOUT": _logout,
        b"STARTTLS": _starttls,
        b"AUTHENTICATE": _authenticate,
    }


# --- the backend side ---------------------------------------------------------------------


class _Step(Enum):
    """What the dialogue waits for besides the greeting and the login."""

    STARTTLS = "STARTTLS"
    TLS_CAPABILITIES = "capabilities after TLS"  # reading the block the server re-sends
    XCLIENT = "XCLIENT"


def _classify(unit: Unit) -> tuple[bytes, bytes | None]:
    """``(b"", name)`` for a capability line or a challenge (a string first), else the
    upper-cased status word (``OK``, ``NO``, ``BYE``) and None."""
    arguments = unit.arguments()
    try:
        if arguments.at_string():
            return b"", arguments.string()
        return arguments.word(_ATOM).upper(), None
    except ArgumentError:
        return b"?", None


def _capability_value(unit: Unit) -> bytes:
    """The value of a capability line (``"SIEVE" "fileinto …"``); empty when it has none."""
    arguments = unit.arguments()
    try:
        arguments.string()
        if arguments.at_end():
            return b""
        arguments.space()
        return arguments.string()
    except ArgumentError:
        return b""


class ManageSieveBackendDialogue(LiteralDialogue[_Step]):
    """The ManageSieve client dialogue toward a backend, up to the replayed login's outcome."""

    def __init__(self, settings: BackendSettings) -> None:
        super().__init__(settings)
        self._block = CapabilityLines()
        # The values of the block being read, and of the last complete one, by name.
        self._block_values: dict[bytes, bytes] = {}
        self._values: dict[bytes, bytes] = {}

    # -- establishment

    @property
    def offered(self) -> Offer | None:
        if self._capabilities is None:
            return None
        return {key: frozenset(self._values.get(name, b"").decode("ascii", "replace")
                               .upper().split())
                for key, name in (("sasl", b"SASL"), ("sieve", b"SIEVE"), ("notify", b"NOTIFY"))}

    def _next_step(self) -> list[BackendEvent]:
        """capabilities → STARTTLS → capabilities again → XCLIENT → ready."""
        if self._starttls_needed:
            if not self._offers(b"STARTTLS"):
                return self._fail("backend does not offer STARTTLS")
            return self._send(b"STARTTLS", _Step.STARTTLS)
        if self.settings.forwarding is not None and self._offers(b"XCLIENT"):
            command = xclient_command(self.settings.forwarding, None, smtp=False)
            if command is not None:
                return self._send(command, _Step.XCLIENT)
        return self._ready()

    def _after_tls(self) -> list[BackendEvent]:
        # RFC 5804 §2.2: the server re-sends its capabilities, unasked, over TLS.
        self._state = _Step.TLS_CAPABILITIES
        return []

    def _handle(self, response: object) -> list[BackendEvent]:
        assert isinstance(response, Unit)
        status, name = _classify(response)
        step = self._state
        if step is Stage.LOGIN:
            return self._handle_login(response, status)
        if step in (Stage.GREETING, _Step.TLS_CAPABILITIES):
            return self._capability_line(response, status, name)
        if step not in (_Step.STARTTLS, _Step.XCLIENT):  # nothing is expected while ready
            return self._fail("unexpected response from backend")
        if status != b"OK":
            if status in (b"NO", b"BYE"):
                return self._fail(f"backend refused {step.value}")
            return self._fail("unexpected response from backend")
        if step is _Step.STARTTLS:
            return self._handshake()
        return self._ready()

    def _capability_line(self, unit: Unit, status: bytes,
                         name: bytes | None) -> list[BackendEvent]:
        if name is not None:
            if not self._block.add(name.upper(), len(unit.raw)):
                return self._fail("backend sent too many capabilities")
            self._block_values[name.upper()] = _capability_value(unit)
            return []
        if status == b"OK":
            self._capabilities = frozenset(self._block.lines)
            self._values, self._block_values = self._block_values, {}
            self._block = CapabilityLines()
            return self._next_step()
        if status in (b"NO", b"BYE"):
            return self._fail("backend refused the connection")
        return self._fail("unexpected backend greeting")

    # -- the login

    def _replay(self, credentials: Credentials, context: object) -> list[BackendEvent]:
        mechanism = quote(credentials.mechanism)
        # RFC 5804 §2.1: an empty initial response is an empty string.
        response = encode_base64(credentials.response) if credentials.response else b""
        if len(response) > MAX_QUOTED_RESPONSE:
            argument = b"{%d+}\r\n" % len(response) + response
        else:
            argument = b'"' + response + b'"'
        return self._send(b"AUTHENTICATE " + mechanism + b" " + argument, Stage.LOGIN)

    def _handle_login(self, unit: Unit, status: bytes) -> list[BackendEvent]:
        if status == b"":
            # A challenge, though the initial response was sent: cancel (RFC 5804 §2.1).
            self._challenged()
            return [BackendSend(b'"*"\r\n')]
        if status == b"OK":
            return self._outcome(True, bytes(unit.raw), HIDDEN_FAILURE)
        if status == b"NO":
            return self._outcome(False, bytes(unit.raw), HIDDEN_FAILURE)
        if status == b"BYE":
            return self._fail("backend closed the session")
        return self._fail("unexpected response from backend")


#: ManageSieve as the shared pipeline (``stalroute.session``, ``stalroute.backend``) runs it.
SPEC = ProtocolSpec("managesieve", ManageSievePreAuth, ManageSieveBackendDialogue,
                    CapabilityRules(SieveCapabilities.from_config, learnt=("sasl", "sieve"),
                                    fallback=FALLBACK))
