"""IMAP: the pre-auth server dialogue and the backend login replay (SPEC §5). Sans-IO.

:class:`IMAPPreAuth` answers the client until it authenticates (RFC 9051 / 3501 pre-auth
state: CAPABILITY, NOOP, ID, LOGOUT, STARTTLS, LOGIN, AUTHENTICATE).  It only ever echoes a
validated tag back, so nothing a client sends can be reflected into a reply beyond that.
:class:`IMAPBackendDialogue` plays the client toward the chosen backend: greeting,
capabilities, STARTTLS, ``ID`` forwarding, then the replayed ``AUTHENTICATE``.  Both run on
the shared life cycle of :mod:`stalroute.protocols.linebased`.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from enum import Enum
from typing import Callable, ClassVar

from stalroute.config import DEFAULT_IMAP_ADVERTISE, ProtocolCapabilities
from stalroute.protocols.base import (
    MAX_PREAUTH_LINE,
    BackendEvent,
    BackendSend,
    BackendSettings,
    CapabilityRules,
    ForwardingInfo,
    Offer,
    PreAuthEvent,
    PreAuthSettings,
    ProtocolSpec,
    Reply,
)
from stalroute.protocols.linebased import (
    CloseReason,
    LinePreAuth,
    LiteralDialogue,
    PreAuthState,
    Stage,
)
from stalroute.protocols.lines import (
    SYNC_LITERAL,
    ArgumentError,
    Arguments,
    LiteralAssembler,
    Unit,
    quote,
    safe_text,
)
from stalroute.sasl import (
    Credentials,
    SASLError,
    encode_base64,
    plain_credentials,
)

MAX_TAG_LENGTH = 64
SERVER_ID = b'("name" "stalroute")'
HIDDEN_FAILURE_TEXT = b"NO [AUTHENTICATIONFAILED] Authentication failed."

_TAG = re.compile(rb'[^\x00-\x20\x7f-\xff%(){*+"\\]+')
_UNTIL_SPACE = re.compile(rb"[^ ]*")
_ATOM = re.compile(rb'[^\x00-\x20\x7f(){%*"\\\]]+')
_ASTRING_ATOM = re.compile(rb'[^\x00-\x20\x7f(){%*"\\]+')
_TTL = re.compile(rb"[0-9]{1,5}")
_CAPABILITY_CODE = re.compile(rb"\[CAPABILITY ([^\]]*)\]", re.IGNORECASE)
_SyntaxError = ArgumentError


# --- what IMAP announces -------------------------------------------------------------------


def managed(capability: str) -> bool:
    """Capability tokens stalroute computes itself, never taken from ``advertise``."""
    return capability.upper().startswith(("STARTTLS", "LOGINDISABLED", "AUTH="))


@dataclass(frozen=True)
class IMAPCapabilities:
    """``[capabilities.imap]``'s own setting, as :class:`IMAPPreAuth` reads it."""

    #: The capabilities announced besides those stalroute computes (:func:`managed`).
    advertise: tuple[str, ...] = DEFAULT_IMAP_ADVERTISE

    @classmethod
    def from_config(cls, section: ProtocolCapabilities, offered: Offer) -> IMAPCapabilities:
        return cls(advertise=section.advertise)


#: What a destination that never answered a probe is taken to offer (Dovecot 2.3, Stalwart
#: and Cyrus all do; not IMAP4rev2 or UTF8=ACCEPT).
FALLBACK: Offer = {"advertise": frozenset({"IMAP4REV1", "ENABLE", "SASL-IR", "LITERAL+", "ID"}),
                   "sasl": frozenset({"PLAIN"})}

# --- reading commands and responses -------------------------------------------------------


class _Arguments(Arguments):
    """The shared cursor plus IMAP's own tokens: tags, atoms, astrings, nstrings."""

    def tag(self) -> bytes:
        tag = self._match(_UNTIL_SPACE).group()
        if len(tag) > MAX_TAG_LENGTH or not _TAG.fullmatch(tag):
            raise _SyntaxError
        return tag

    def atom(self) -> bytes:
        return self._match(_ATOM).group()

    def head(self) -> tuple[bytes | None, bytes | None]:
        """The tag and the upper-cased command name; None for whichever is missing or bad."""
        try:
            tag = self.tag()
        except _SyntaxError:
            return None, None
        try:
            self.space()
            return tag, self.atom().upper()
        except _SyntaxError:
            return tag, None

    def astring(self) -> bytes:
        if self._text.startswith(b'"', self._pos) or self._pos == len(self._text):
            return self.string()
        return self._match(_ASTRING_ATOM).group()

    def nstring(self) -> bytes | None:
        if self._text.startswith(b'"', self._pos) or self._pos == len(self._text):
            return self.string()
        if self.atom().upper() != b"NIL":
            raise _SyntaxError
        return None


def _arguments(unit: Unit, complete: bool = True) -> _Arguments:
    return _Arguments(unit.texts, unit.literals, complete)


# --- the client side: pre-auth server -----------------------------------------------------


class IMAPPreAuth(LinePreAuth[IMAPCapabilities]):
    """The IMAP server dialogue up to a successful login."""

    def __init__(self, settings: PreAuthSettings[IMAPCapabilities]) -> None:
        super().__init__(settings, LiteralAssembler(MAX_PREAUTH_LINE, synchronising=True))
        #: The tag of the command being answered (the login's while one is outstanding).
        self._tag = b""

    def greeting(self) -> list[PreAuthEvent]:
        banner = safe_text(self.settings.banner, "Ready.")
        return [Reply(b"* OK [CAPABILITY " + self._capabilities() + b"] " + banner + b"\r\n")]

    def _capabilities(self) -> bytes:
        caps = [token for token in self.settings.capabilities.advertise if not managed(token)]
        if self._starttls_offered:
            caps.append("STARTTLS")
        if not self._cleartext_allowed:
            caps.append("LOGINDISABLED")
        caps += [f"AUTH={mechanism}" for mechanism in self._usable_mechanisms()]
        return " ".join(caps).encode("ascii")

    # -- reading

    def _read(self) -> object | None:
        if self._state is PreAuthState.SASL:
            return self._buffer.readline()  # a SASL response is a bare line, never a literal
        return super()._read()

    def _execute(self, unit: object) -> list[PreAuthEvent]:
        if unit is SYNC_LITERAL:
            return self._synchronising_literal()
        assert isinstance(unit, Unit)
        return self._command(_arguments(unit))

    def _synchronising_literal(self) -> list[PreAuthEvent]:
        """Send ``+`` only for a command that may carry a literal now; answer others at once,
        so a password literal is never invited over a leg where it is not accepted."""
        assert isinstance(self._input, LiteralAssembler)
        unit = self._input.partial
        _tag, name = _arguments(unit, complete=False).head()
        if name == b"ID" or (name == b"LOGIN" and self._cleartext_allowed):
            self._input.accept()
            return [Reply(b"+ Ready for literal data\r\n")]
        self._input.drop()
        return self._command(_arguments(unit, complete=False))

    def _command(self, arguments: _Arguments) -> list[PreAuthEvent]:
        tag, name = arguments.head()
        if tag is None:
            return self._bad(b"* BAD Invalid tag\r\n")
        self._tag = tag
        if name is None:
            return self._refuse(b"Missing command")
        handler = self._HANDLERS.get(name)
        if handler is None:
            return self._refuse(b"Command not permitted before authentication")
        try:
            return handler(self, arguments)
        except _SyntaxError:
            return self._refuse(b"Invalid arguments")

    def _refuse(self, text: bytes) -> list[PreAuthEvent]:
        """A tagged ``BAD``: a protocol error."""
        return self._bad(self._tag + b" BAD " + text + b"\r\n")

    # -- wording

    def _goodbye(self, reason: CloseReason) -> bytes | None:
        text = "Pre-authentication timeout" if reason is CloseReason.TIMEOUT else reason.value
        return b"* BYE " + text.encode("ascii") + b"\r\n"

    def _challenge(self, text: bytes) -> bytes:
        return b"+ " + text + b"\r\n"

    def _sasl_aborted(self) -> bytes:
        return self._tag + b" BAD Authentication aborted\r\n"  # RFC 9051 §6.2.2

    def _credentials_invalid(self, error: SASLError) -> bytes:
        text = safe_text(str(error), "Authentication failed.")
        return self._tag + b" NO [AUTHENTICATIONFAILED] " + text + b"\r\n"

    def _mechanism_unsupported(self) -> bytes:
        return self._tag + b" NO [CANNOT] Unsupported authentication mechanism\r\n"

    def _privacy_required(self) -> bytes:
        return (self._tag + b" NO [PRIVACYREQUIRED] Cleartext authentication is not allowed"
                b" without TLS\r\n")

    def _temporary_failure(self, text: bytes) -> list[PreAuthEvent]:
        return [Reply(self._tag + b" NO [UNAVAILABLE] " + text + b"\r\n")]

    def _login_context(self) -> object:
        return self._tag.decode("ascii")

    # -- commands

    def _capability(self, arguments: _Arguments) -> list[PreAuthEvent]:
        arguments.end()
        return [Reply(b"* CAPABILITY " + self._capabilities() + b"\r\n"
                      + self._tag + b" OK CAPABILITY completed\r\n")]

    def _noop(self, arguments: _Arguments) -> list[PreAuthEvent]:
        arguments.end()
        return [Reply(self._tag + b" OK NOOP completed\r\n")]

    def _id(self, arguments: _Arguments) -> list[PreAuthEvent]:
        arguments.space()
        parameters = _id_parameters(arguments)
        arguments.end()
        ttl = parameters.get("x-proxy-ttl")
        if ttl is not None and _TTL.fullmatch(ttl):
            self.proxy_ttl = int(ttl)
        return [Reply(b"* ID " + SERVER_ID + b"\r\n" + self._tag + b" OK ID completed\r\n")]

    def _logout(self, arguments: _Arguments) -> list[PreAuthEvent]:
        arguments.end()
        return self._hang_up(b"* BYE Logging out\r\n", self._tag + b" OK LOGOUT completed\r\n")

    def _starttls(self, arguments: _Arguments) -> list[PreAuthEvent]:
        arguments.end()
        if not self._starttls_offered:
            return self._refuse(b"STARTTLS not available")
        return self._start_tls(self._tag + b" OK Begin TLS negotiation now\r\n")

    def _login(self, arguments: _Arguments) -> list[PreAuthEvent]:
        if not self._cleartext_allowed:
            return [Reply(self._privacy_required())]
        arguments.space()
        user = arguments.astring()
        arguments.space()
        password = arguments.astring()
        arguments.end()
        try:
            credentials = plain_credentials(user.decode("utf-8"), password.decode("utf-8"))
        except UnicodeDecodeError:
            return self._refuse_credentials(SASLError("Credentials are not valid UTF-8"))
        except SASLError as error:
            return self._refuse_credentials(error)
        return self._authenticated(credentials)

    def _authenticate(self, arguments: _Arguments) -> list[PreAuthEvent]:
        arguments.space()
        mechanism = arguments.atom().decode("ascii", "replace")
        initial_response = None
        if not arguments.at_end():
            arguments.space()
            initial_response = arguments.atom()
        arguments.end()
        return self._start_sasl(mechanism, initial_response)

    #: The commands it answers (a class-level table: see :class:`LinePreAuth`).
    _HANDLERS: ClassVar[dict[bytes, Callable[[IMAPPreAuth, _Arguments],
                                             list[PreAuthEvent]]]] = {
        b"CAPABILITY": _capability,
        b"NOOP": _noop,
        b"ID": _id,
        b"LOGOUT": _logout,
        b"STARTTLS": _starttls,
        b"LOGIN": _login,
        b"AUTHENTICATE": _authenticate,
    }


def _id_parameters(arguments: _Arguments) -> dict[str, bytes | None]:
    """``"(" [string SP nstring *(SP string SP nstring)] ")" / NIL`` (RFC 2971)."""
    parameters: dict[str, bytes | None] = {}
    if not arguments.take(b"("):
        if arguments.atom().upper() != b"NIL":
            raise _SyntaxError
        return parameters
    if arguments.take(b")"):
        return parameters
    while True:
        key = arguments.string().decode("utf-8", "replace").lower()
        arguments.space()
        parameters[key] = arguments.nstring()
        if arguments.take(b")"):
            return parameters
        arguments.space()


# --- the backend side ---------------------------------------------------------------------


class _Step(Enum):
    """The command of stalroute's own that the dialogue has out."""

    CAPABILITY = "CAPABILITY"
    STARTTLS = "STARTTLS"
    ID = "ID"


@dataclass(frozen=True)
class _Response:
    """The first line of a backend response, split: ``kind`` is ``*``, ``+`` or the tag."""

    kind: bytes
    status: bytes
    text: bytes


def _parse_response(unit: Unit) -> _Response:
    first = unit.texts[0]
    kind, _, rest = first.partition(b" ")
    if kind == b"+":
        return _Response(kind, b"", rest)
    status, _, text = rest.partition(b" ")
    return _Response(kind, status.upper(), text)


def _forwarding_command(info: ForwardingInfo) -> bytes:
    fields = (
        ("x-originating-ip", info.client_ip),
        ("x-originating-port", str(info.client_port)),
        ("x-connected-ip", info.local_ip),
        ("x-connected-port", str(info.local_port)),
        ("x-proxy-ttl", str(info.ttl)),
        ("x-session-id", info.session_id),
    )
    return b"ID (" + b" ".join(quote(key) + b" " + quote(value) for key, value in fields) + b")"


class IMAPBackendDialogue(LiteralDialogue[_Step]):
    """The IMAP client dialogue toward a backend, up to the replayed login's outcome."""

    def __init__(self, settings: BackendSettings) -> None:
        super().__init__(settings)
        self._tags = (b"SRx%d" % number for number in itertools.count(1))
        self._command_tag = b""
        # The login in flight: the client's tag, and the responses relayed with its outcome.
        self._login_tag = b""
        self._relay = bytearray()

    @property
    def offered(self) -> Offer | None:
        if self._capabilities is None:
            return None
        words = [token.decode("ascii", "replace") for token in self._capabilities]
        return {"advertise": frozenset(w for w in words if not w.startswith("AUTH=")),
                "sasl": frozenset(w[len("AUTH="):] for w in words if w.startswith("AUTH="))}

    # -- establishment

    def _command(self, command: bytes, step: _Step) -> list[BackendEvent]:
        self._command_tag = next(self._tags)
        return self._send(self._command_tag + b" " + command, step)

    def _next_step(self) -> list[BackendEvent]:
        """capabilities → STARTTLS → (capabilities again) → ID → ready."""
        if self._capabilities is None:
            return self._command(b"CAPABILITY", _Step.CAPABILITY)
        if self._starttls_needed:
            if not self._offers(b"STARTTLS"):
                return self._fail("backend does not offer STARTTLS")
            return self._command(b"STARTTLS", _Step.STARTTLS)
        if self.settings.forwarding is not None and self._offers(b"ID"):
            return self._command(_forwarding_command(self.settings.forwarding), _Step.ID)
        return self._ready()

    def _after_tls(self) -> list[BackendEvent]:
        return self._next_step()

    def _learn_capabilities(self, text: bytes) -> None:
        self._capabilities = frozenset(token.upper() for token in text.split())

    def _handle(self, response: object) -> list[BackendEvent]:
        assert isinstance(response, Unit)
        line = _parse_response(response)
        if self._state is Stage.LOGIN:
            return self._handle_login(response, line)
        if self._state is Stage.GREETING:
            return self._handle_greeting(line)
        if line.kind == b"*":
            if line.status == b"BYE":
                return self._fail("backend closed the session")
            if line.status == b"CAPABILITY" and self._state is _Step.CAPABILITY:
                self._learn_capabilities(line.text)
            return []
        step = self._state
        if not isinstance(step, _Step) or line.kind != self._command_tag:
            return self._fail("unexpected response from backend")  # nothing is out while ready
        if line.status != b"OK":
            return self._fail(f"backend refused {step.value}")
        if step is _Step.STARTTLS:
            return self._handshake()
        if step is _Step.ID:
            return self._ready()
        if self._capabilities is None:
            return self._fail("backend sent no capabilities")
        return self._next_step()

    def _handle_greeting(self, line: _Response) -> list[BackendEvent]:
        if line.kind != b"*" or line.status != b"OK":
            if line.status == b"PREAUTH":
                return self._fail("backend greeted with PREAUTH")
            if line.status == b"BYE":
                return self._fail("backend refused the connection")
            return self._fail("unexpected backend greeting")
        code = _CAPABILITY_CODE.match(line.text)
        if code is not None:
            self._learn_capabilities(code.group(1))
        return self._next_step()

    # -- the login

    def _replay(self, credentials: Credentials, context: object) -> list[BackendEvent]:
        assert isinstance(context, str)
        self._login_tag = context.encode("ascii")
        command = self._login_tag + b" AUTHENTICATE " + credentials.mechanism.encode("ascii")
        response = encode_base64(credentials.response)
        if self._offers(b"SASL-IR"):
            return self._send(command + b" " + response, Stage.LOGIN)
        # Without SASL-IR the response follows the first "+"; an empty one is an empty line.
        self._owed_response = response if credentials.response else b""
        return self._send(command, Stage.LOGIN)

    def _handle_login(self, unit: Unit, line: _Response) -> list[BackendEvent]:
        if line.kind == b"+":
            # A further challenge (e.g. an OAuth error) is cancelled; the outcome is a failure.
            owed = self._challenged()
            return [BackendSend((owed if owed is not None else b"*") + b"\r\n")]
        self._relay += unit.raw
        if line.kind == b"*":
            if len(self._relay) > MAX_PREAUTH_LINE:
                return self._fail("backend sent too much before the login result")
            return []
        if line.kind != self._login_tag or line.status not in (b"OK", b"NO", b"BAD"):
            return self._fail("unexpected response from backend")
        return self._outcome(line.status == b"OK", bytes(self._relay),
                             self._login_tag + b" " + HIDDEN_FAILURE_TEXT + b"\r\n")


#: IMAP as the shared pipeline (``stalroute.session``, ``stalroute.backend``) runs it.
SPEC = ProtocolSpec("imap", IMAPPreAuth, IMAPBackendDialogue, CapabilityRules(
    IMAPCapabilities.from_config, learnt=("sasl", "advertise"), fallback=FALLBACK,
    managed=managed))
