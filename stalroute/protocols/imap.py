"""IMAP: the pre-auth server dialogue and the backend login replay (SPEC §5). Sans-IO.

:class:`IMAPPreAuth` answers the client until it authenticates (RFC 9051 / 3501 pre-auth
state: CAPABILITY, NOOP, ID, LOGOUT, STARTTLS, LOGIN, AUTHENTICATE).  It only ever echoes a
validated tag back, so nothing a client sends can be reflected into a reply beyond that.
:class:`IMAPBackendDialogue` plays the client toward the chosen backend: greeting,
capabilities, STARTTLS, ``ID`` forwarding, then the replayed ``AUTHENTICATE``.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Callable, Sequence, cast

from stalroute.protocols.base import (
    MAX_PREAUTH_LINE,
    Authenticate,
    BackendDialogue,
    BackendError,
    BackendEvent,
    BackendReady,
    BackendSend,
    BackendSettings,
    BackendStartTLS,
    Close,
    ForwardingInfo,
    LoginFailed,
    LoginSucceeded,
    PreAuthEvent,
    PreAuthMachine,
    PreAuthSettings,
    ProtocolSpec,
    Reply,
    StartTLS,
)
from stalroute.protocols.lines import (
    SYNC_LITERAL,
    ArgumentError,
    Arguments,
    LineTooLong,
    LiteralAssembler,
    Unit,
    quote,
    safe_text,
)
from stalroute.sasl import (
    CLEARTEXT_MECHANISMS,
    MECHANISMS,
    Challenge,
    Credentials,
    SASLAborted,
    SASLError,
    SASLExchange,
    encode_base64,
    plain_credentials,
)

#: ``[capabilities.imap] advertise`` when the settings carry none.
DEFAULT_ADVERTISE = ("IMAP4rev2", "IMAP4rev1", "ENABLE", "SASL-IR", "LITERAL+", "ID",
                     "UTF8=ACCEPT")
MAX_TAG_LENGTH = 64
#: Protocol errors tolerated on one connection before it is closed (Dovecot uses 20 too).
MAX_BAD_COMMANDS = 20
SERVER_ID = b'("name" "stalroute")'
HIDDEN_FAILURE_TEXT = b"NO [AUTHENTICATIONFAILED] Authentication failed."

#: Capability tokens stalroute computes itself; never taken from ``advertise``.
MANAGED_CAPABILITIES = ("STARTTLS", "LOGINDISABLED", "AUTH=")

_TAG = re.compile(rb'[^\x00-\x20\x7f-\xff%(){*+"\\]+')
_UNTIL_SPACE = re.compile(rb"[^ ]*")
_ATOM = re.compile(rb'[^\x00-\x20\x7f(){%*"\\\]]+')
_ASTRING_ATOM = re.compile(rb'[^\x00-\x20\x7f(){%*"\\]+')
_TTL = re.compile(rb"[0-9]{1,5}")
_CAPABILITY_CODE = re.compile(rb"\[CAPABILITY ([^\]]*)\]", re.IGNORECASE)
_SyntaxError = ArgumentError


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

_COMMAND = "command"  # reading commands
_SASL = "sasl"  # reading the client's responses to an AUTHENTICATE exchange
_PENDING = "pending"  # an Authenticate is out; buffering until its outcome
_STARTTLS = "starttls"  # discarding until the handshake completes
_CLOSED = "closed"
_DONE = "done"  # logged in; the session splices from here


class IMAPPreAuth(PreAuthMachine):
    """The IMAP server dialogue up to a successful login."""

    def __init__(self, settings: PreAuthSettings) -> None:
        self.settings = settings
        #: ``x-proxy-ttl`` from the client's ID command (a proxy in front of us), if any.
        self.proxy_ttl: int | None = None
        self._tls_active = settings.tls_mode == "implicit"
        self._input = LiteralAssembler(MAX_PREAUTH_LINE, synchronising=True)
        self._state = _COMMAND
        self._tag = b""  # tag of the AUTHENTICATE/LOGIN in progress or outstanding
        self._sasl: SASLExchange | None = None
        self._failures = 0
        self._bad_commands = 0
        self._handlers: dict[bytes, Callable[[bytes, _Arguments], list[PreAuthEvent]]] = {
            b"CAPABILITY": self._capability,
            b"NOOP": self._noop,
            b"ID": self._id,
            b"LOGOUT": self._logout,
            b"STARTTLS": self._starttls,
            b"LOGIN": self._login,
            b"AUTHENTICATE": self._authenticate,
        }

    # -- PreAuthMachine

    @property
    def tls_active(self) -> bool:
        return self._tls_active

    def greeting(self) -> list[PreAuthEvent]:
        banner = safe_text(self.settings.banner, "Ready.")
        return [Reply(b"* OK [CAPABILITY " + self._capabilities() + b"] " + banner + b"\r\n")]

    def receive(self, data: bytes) -> list[PreAuthEvent]:
        if self._state in (_CLOSED, _STARTTLS):
            return []  # after STARTTLS: injected cleartext, dropped by design
        if self._state == _DONE:
            raise RuntimeError("receive() after the login succeeded")
        self._input.buffer.feed(data)
        events = self._process()
        if self._state == _PENDING and len(self._input.buffer) > MAX_PREAUTH_LINE:
            events += self._bye(b"Too much input before authentication completed")
        return events

    def tls_started(self) -> list[PreAuthEvent]:
        if self._state == _CLOSED:  # e.g. the pre-auth timer fired during the handshake
            return []
        if self._state != _STARTTLS:
            raise RuntimeError("no STARTTLS in progress")
        self._tls_active = True
        self._state = _COMMAND
        return []

    def auth_failed(self, reply: bytes) -> list[PreAuthEvent]:
        if not self._resume():
            return []
        return self._auth_failure(reply) + self._process()

    def auth_unavailable(self, reason: str) -> list[PreAuthEvent]:
        if not self._resume():
            return []
        text = safe_text(reason, "Service temporarily unavailable")
        return [Reply(self._tag + b" NO [UNAVAILABLE] " + text + b"\r\n")] + self._process()

    def auth_succeeded(self) -> bytes:
        if self._state != _PENDING:
            raise RuntimeError("no login outstanding")
        self._state = _DONE
        return self._input.buffer.take_all()

    def timed_out(self) -> list[PreAuthEvent]:
        if self._state == _CLOSED:
            return []
        return self._bye(b"Pre-authentication timeout")

    # -- state helpers

    @property
    def _cleartext_allowed(self) -> bool:
        return self._tls_active or self.settings.allow_plain_auth_without_tls

    def _capabilities(self) -> bytes:
        advertise = cast(Sequence[str], self.settings.extra.get("advertise", DEFAULT_ADVERTISE))
        caps = [token for token in advertise if not token.upper().startswith(MANAGED_CAPABILITIES)]
        if self.settings.tls_mode == "starttls" and not self._tls_active:
            caps.append("STARTTLS")
        if not self._cleartext_allowed:
            caps.append("LOGINDISABLED")
        caps += [f"AUTH={mechanism}" for mechanism in self.settings.sasl
                 if self._cleartext_allowed or mechanism not in CLEARTEXT_MECHANISMS]
        return " ".join(caps).encode("ascii")

    def _resume(self) -> bool:
        """Leave the pending state after an outcome; False if the connection already closed."""
        if self._state == _CLOSED:
            return False
        if self._state != _PENDING:
            raise RuntimeError("no login outstanding")
        self._state = _COMMAND
        return True

    def _process(self) -> list[PreAuthEvent]:
        events: list[PreAuthEvent] = []
        try:
            while self._state in (_COMMAND, _SASL):
                if self._state == _SASL:
                    line = self._input.buffer.readline()
                    if line is None:
                        break
                    events += self._sasl_step(line)
                    continue
                unit = self._input.poll()
                if unit is None:
                    break
                if unit is SYNC_LITERAL:
                    events += self._synchronising_literal()
                else:
                    assert isinstance(unit, Unit)
                    events += self._execute(_arguments(unit))
        except LineTooLong:
            events += self._bye(b"Line too long")
        return events

    def _synchronising_literal(self) -> list[PreAuthEvent]:
        """Send ``+`` only for a command that may carry a literal now; answer others at once,
        so a password literal is never invited over a leg where it is not accepted."""
        _tag, name = _arguments(self._input.partial, complete=False).head()
        if name == b"ID" or (name == b"LOGIN" and self._cleartext_allowed):
            self._input.accept()
            return [Reply(b"+ Ready for literal data\r\n")]
        unit = self._input.partial
        self._input.drop()
        return self._execute(_arguments(unit, complete=False))

    def _execute(self, arguments: _Arguments) -> list[PreAuthEvent]:
        tag, name = arguments.head()
        if tag is None:
            return self._bad(b"*", b"Invalid tag")
        if name is None:
            return self._bad(tag, b"Missing command")
        handler = self._handlers.get(name)
        if handler is None:
            return self._bad(tag, b"Command not permitted before authentication")
        try:
            return handler(tag, arguments)
        except _SyntaxError:
            return self._bad(tag, b"Invalid arguments")

    def _bad(self, tag: bytes, text: bytes) -> list[PreAuthEvent]:
        self._bad_commands += 1
        events: list[PreAuthEvent] = [Reply(tag + b" BAD " + text + b"\r\n")]
        if self._bad_commands >= MAX_BAD_COMMANDS:
            events += self._bye(b"Too many invalid commands")
        return events

    def _bye(self, text: bytes) -> list[PreAuthEvent]:
        self._state = _CLOSED
        self._input.buffer.clear()
        return [Reply(b"* BYE " + text + b"\r\n"), Close()]

    def _auth_failure(self, reply: bytes) -> list[PreAuthEvent]:
        self._failures += 1
        events: list[PreAuthEvent] = [Reply(reply)]
        if self._failures >= self.settings.max_auth_attempts:
            events += self._bye(b"Too many invalid authentication attempts")
        return events

    def _authenticated(self, tag: bytes, credentials: Credentials) -> list[PreAuthEvent]:
        self._state = _PENDING
        self._tag = tag
        return [Authenticate(credentials, context=tag.decode("ascii"))]

    # -- commands

    def _capability(self, tag: bytes, arguments: _Arguments) -> list[PreAuthEvent]:
        arguments.end()
        return [Reply(b"* CAPABILITY " + self._capabilities() + b"\r\n"
                      + tag + b" OK CAPABILITY completed\r\n")]

    def _noop(self, tag: bytes, arguments: _Arguments) -> list[PreAuthEvent]:
        arguments.end()
        return [Reply(tag + b" OK NOOP completed\r\n")]

    def _id(self, tag: bytes, arguments: _Arguments) -> list[PreAuthEvent]:
        arguments.space()
        parameters = _id_parameters(arguments)
        arguments.end()
        ttl = parameters.get("x-proxy-ttl")
        if ttl is not None and _TTL.fullmatch(ttl):
            self.proxy_ttl = int(ttl)
        return [Reply(b"* ID " + SERVER_ID + b"\r\n" + tag + b" OK ID completed\r\n")]

    def _logout(self, tag: bytes, arguments: _Arguments) -> list[PreAuthEvent]:
        arguments.end()
        events = self._bye(b"Logging out")
        events.insert(1, Reply(tag + b" OK LOGOUT completed\r\n"))
        return events

    def _starttls(self, tag: bytes, arguments: _Arguments) -> list[PreAuthEvent]:
        arguments.end()
        if self.settings.tls_mode != "starttls" or self._tls_active:
            return self._bad(tag, b"STARTTLS not available")
        self._state = _STARTTLS
        self._input.buffer.clear()
        return [Reply(tag + b" OK Begin TLS negotiation now\r\n"), StartTLS()]

    def _privacy_required(self, tag: bytes) -> list[PreAuthEvent]:
        return [Reply(tag + b" NO [PRIVACYREQUIRED] Cleartext authentication is not allowed"
                      b" without TLS\r\n")]

    def _login(self, tag: bytes, arguments: _Arguments) -> list[PreAuthEvent]:
        if not self._cleartext_allowed:
            return self._privacy_required(tag)
        arguments.space()
        user = arguments.astring()
        arguments.space()
        password = arguments.astring()
        arguments.end()
        try:
            credentials = plain_credentials(user.decode("utf-8"), password.decode("utf-8"))
        except UnicodeDecodeError:
            return self._credentials_refused(tag, SASLError("Credentials are not valid UTF-8"))
        except SASLError as error:
            return self._credentials_refused(tag, error)
        return self._authenticated(tag, credentials)

    def _credentials_refused(self, tag: bytes, error: SASLError) -> list[PreAuthEvent]:
        """Unusable credentials count as a failed attempt, like a refusal by the backend."""
        text = safe_text(str(error), "Authentication failed.")
        return self._auth_failure(tag + b" NO [AUTHENTICATIONFAILED] " + text + b"\r\n")

    def _authenticate(self, tag: bytes, arguments: _Arguments) -> list[PreAuthEvent]:
        arguments.space()
        mechanism = arguments.atom().decode("ascii", "replace").upper()
        initial_response = None
        if not arguments.at_end():
            arguments.space()
            initial_response = arguments.atom()
        arguments.end()
        if mechanism not in self.settings.sasl or mechanism not in MECHANISMS:
            return [Reply(tag + b" NO [CANNOT] Unsupported authentication mechanism\r\n")]
        if mechanism in CLEARTEXT_MECHANISMS and not self._cleartext_allowed:
            return self._privacy_required(tag)
        self._tag = tag
        self._sasl = SASLExchange(mechanism, initial_response)
        return self._sasl_step(None)

    def _sasl_step(self, line: bytes | None) -> list[PreAuthEvent]:
        assert self._sasl is not None
        try:
            outcome = self._sasl.step(line)
        except SASLAborted:
            self._state = _COMMAND
            return self._bad(self._tag, b"Authentication aborted")
        except SASLError as error:
            self._state = _COMMAND
            return self._credentials_refused(self._tag, error)
        if isinstance(outcome, Challenge):
            self._state = _SASL
            return [Reply(b"+ " + outcome.text + b"\r\n")]
        self._sasl = None
        return self._authenticated(self._tag, outcome)


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

_GREETING = "greeting"
# While one of stalroute's own commands is out, the state is that command's name.
_CAPABILITY = "CAPABILITY"
_STARTTLS_SENT = "STARTTLS"
_ID_SENT = "ID"
_HANDSHAKE = "handshake"
_READY = "ready"
_LOGIN = "login"


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


class IMAPBackendDialogue(BackendDialogue):
    """The IMAP client dialogue toward a backend, up to the replayed login's outcome."""

    def __init__(self, settings: BackendSettings) -> None:
        self.settings = settings
        self._input = LiteralAssembler(MAX_PREAUTH_LINE, synchronising=False)
        self._state = _GREETING
        self._capabilities: frozenset[bytes] | None = None
        self._tls_done = False
        self._tags = (b"SRx%d" % number for number in itertools.count(1))
        self._command_tag = b""
        # The login in flight: the client's tag, the IR still owed (no SASL-IR), the relay.
        self._login_tag = b""
        self._owed_response: bytes | None = None
        self._aborted = False
        self._relay = bytearray()
        self._leftover = b""

    # -- BackendDialogue

    def receive(self, data: bytes) -> list[BackendEvent]:
        if self._state == _DONE:
            self._leftover += data
            return []
        if self._state == _HANDSHAKE:
            return []  # nothing may arrive in cleartext between STARTTLS's OK and TLS
        self._input.buffer.feed(data)
        events: list[BackendEvent] = []
        try:
            while self._state not in (_DONE, _HANDSHAKE):
                unit = self._input.poll()
                if unit is None:
                    break
                assert isinstance(unit, Unit)
                events += self._handle(unit)
        except LineTooLong:
            events += self._fail("backend line too long")
        return events

    def tls_started(self) -> list[BackendEvent]:
        if self._state != _HANDSHAKE:
            raise RuntimeError("no STARTTLS in progress")
        self._tls_done = True
        self._capabilities = None  # anything learnt before TLS is not to be trusted
        return self._next_step()

    def login(self, credentials: Credentials, context: object) -> list[BackendEvent]:
        if self._state != _READY:
            raise RuntimeError("backend not ready for the login")
        assert isinstance(context, str)
        self._state = _LOGIN
        self._login_tag = context.encode("ascii")
        command = self._login_tag + b" AUTHENTICATE " + credentials.mechanism.encode("ascii")
        response = encode_base64(credentials.response)
        if self._offers(b"SASL-IR"):
            return [BackendSend(command + b" " + response + b"\r\n")]
        # Without SASL-IR the response follows the first "+"; an empty one is an empty line.
        self._owed_response = response if credentials.response else b""
        return [BackendSend(command + b"\r\n")]

    @property
    def leftover(self) -> bytes:
        return self._leftover

    @property
    def offered(self) -> dict[str, frozenset[str]] | None:
        if self._capabilities is None:
            return None
        words = [token.decode("ascii", "replace") for token in self._capabilities]
        return {"advertise": frozenset(w for w in words if not w.startswith("AUTH=")),
                "sasl": frozenset(w[len("AUTH="):] for w in words if w.startswith("AUTH="))}

    # -- steps

    def _offers(self, capability: bytes) -> bool:
        return self._capabilities is not None and capability in self._capabilities

    def _fail(self, reason: str) -> list[BackendEvent]:
        self._state = _DONE
        self._input.buffer.clear()
        return [BackendError(reason)]

    def _send_command(self, command: bytes, state: str) -> list[BackendEvent]:
        self._state = state
        self._command_tag = next(self._tags)
        return [BackendSend(self._command_tag + b" " + command + b"\r\n")]

    def _next_step(self) -> list[BackendEvent]:
        """Establishment: capabilities → STARTTLS → (capabilities again) → ID → ready."""
        if self._capabilities is None:
            return self._send_command(b"CAPABILITY", _CAPABILITY)
        if self.settings.tls_mode == "starttls" and not self._tls_done:
            if not self._offers(b"STARTTLS"):
                return self._fail("backend does not offer STARTTLS")
            return self._send_command(b"STARTTLS", _STARTTLS_SENT)
        if self.settings.forwarding is not None and self._offers(b"ID"):
            return self._send_command(_forwarding_command(self.settings.forwarding), _ID_SENT)
        self._state = _READY
        return [BackendReady()]

    def _learn_capabilities(self, text: bytes) -> None:
        self._capabilities = frozenset(token.upper() for token in text.split())

    def _handle(self, unit: Unit) -> list[BackendEvent]:
        response = _parse_response(unit)
        if self._state == _LOGIN:
            return self._handle_login(unit, response)
        if self._state == _GREETING:
            return self._handle_greeting(response)
        if response.kind == b"*":
            if response.status == b"BYE":
                return self._fail("backend closed the session")
            if response.status == b"CAPABILITY" and self._state == _CAPABILITY:
                self._learn_capabilities(response.text)
            return []
        if self._state == _READY or response.kind != self._command_tag:
            return self._fail("unexpected response from backend")
        if response.status != b"OK":
            return self._fail(f"backend refused {self._state}")
        if self._state == _STARTTLS_SENT:
            self._state = _HANDSHAKE
            self._input.buffer.clear()  # no cleartext bytes survive into the TLS session
            return [BackendStartTLS()]
        if self._state == _ID_SENT:
            self._state = _READY
            return [BackendReady()]
        if self._capabilities is None:
            return self._fail("backend sent no capabilities")
        return self._next_step()

    def _handle_greeting(self, response: _Response) -> list[BackendEvent]:
        if response.kind != b"*" or response.status != b"OK":
            if response.status == b"PREAUTH":
                return self._fail("backend greeted with PREAUTH")
            if response.status == b"BYE":
                return self._fail("backend refused the connection")
            return self._fail("unexpected backend greeting")
        code = _CAPABILITY_CODE.match(response.text)
        if code is not None:
            self._learn_capabilities(code.group(1))
        return self._next_step()

    def _handle_login(self, unit: Unit, response: _Response) -> list[BackendEvent]:
        if response.kind == b"+":
            if self._owed_response is not None:
                owed, self._owed_response = self._owed_response, None
                return [BackendSend(owed + b"\r\n")]
            # A further challenge (e.g. an OAuth error): cancel; the outcome is a failure.
            self._aborted = True
            return [BackendSend(b"*\r\n")]
        self._relay += unit.raw
        if response.kind == b"*":
            if len(self._relay) > MAX_PREAUTH_LINE:
                return self._fail("backend sent too much before the login result")
            return []
        if response.kind != self._login_tag or response.status not in (b"OK", b"NO", b"BAD"):
            return self._fail("unexpected response from backend")
        self._state = _DONE
        self._leftover = self._input.buffer.take_all()
        if response.status == b"OK" and not self._aborted:
            return [LoginSucceeded(bytes(self._relay))]
        if self._aborted or self.settings.hide_auth_errors:
            return [LoginFailed(self._login_tag + b" " + HIDDEN_FAILURE_TEXT + b"\r\n")]
        return [LoginFailed(bytes(self._relay))]


#: IMAP as the shared pipeline (``stalroute.session``, ``stalroute.backend``) runs it.
SPEC = ProtocolSpec("imap", IMAPPreAuth, IMAPBackendDialogue)
