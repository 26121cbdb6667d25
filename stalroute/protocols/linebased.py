"""The shared life cycle of the IMAP, POP3, ManageSieve and submission machines (SPEC §3, §5).
Sans-IO.

The four protocols differ in syntax, not in what happens before a login:

* :class:`LinePreAuth` owns the states (commands → SASL exchange → login outstanding →
  spliced, with STARTTLS and closing on the side), the limits (``MAX_PREAUTH_LINE``,
  ``max_auth_attempts``, :data:`MAX_BAD_COMMANDS`, bounded buffering of pipelined bytes),
  the STARTTLS injection defence, the cleartext rule and the SASL plumbing.  A protocol
  supplies how it reads a command (lines, or lines with literals), how it answers one, and
  the wording of its replies.
* :class:`LineDialogue` owns the backend side's states (establishment → ready → login →
  outcome), its limits, the discarding of cleartext bytes around STARTTLS and the bytes
  left over after the outcome.  A protocol supplies its reader and its steps
  (:class:`LiteralDialogue` is the reader of IMAP and ManageSieve responses).

The policy every protocol shares, whatever its wording: a client's ``*`` ending a SASL
exchange is answered with the protocol's refusal and counts neither as a failed login nor
as a protocol error (RFC 4422 §3.5 makes it the client's right; the pre-auth timer bounds
a client that keeps starting and aborting); malformed SASL data or unusable credentials
count as a failed login.
"""

from __future__ import annotations

import abc
from enum import Enum
from typing import Generic, TypeVar

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
    C,
    Close,
    LoginFailed,
    LoginSucceeded,
    PreAuthEvent,
    PreAuthMachine,
    PreAuthSettings,
    Reply,
    StartTLS,
)
from stalroute.protocols.lines import (
    LineBuffer,
    LineTooLong,
    LiteralAssembler,
    ProtocolViolation,
    Unit,
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
)

#: Protocol errors tolerated on one connection before it is closed (Dovecot uses 20 too).
MAX_BAD_COMMANDS = 20


class CloseReason(Enum):
    """Why stalroute closes a client connection; each protocol words its goodbye from it."""

    _value_: str

    TIMEOUT = "Disconnected for inactivity"
    LINE_TOO_LONG = "Line too long"
    TOO_MUCH_INPUT = "Too much input before authentication completed"
    TOO_MANY_FAILURES = "Too many invalid authentication attempts"
    TOO_MANY_ERRORS = "Too many invalid commands"


class PreAuthState(Enum):
    """Where a pre-auth machine stands."""

    COMMAND = "command"  # reading commands
    SASL = "sasl"  # reading the client's responses to an authentication exchange
    PENDING = "pending"  # an Authenticate is out; buffering until its outcome
    STARTTLS = "starttls"  # discarding until the handshake completes
    CLOSED = "closed"
    DONE = "done"  # logged in; the session splices from here


#: What a pre-auth machine reads from: bare lines, or lines with the literals they announce.
ClientInput = LineBuffer | LiteralAssembler


class LinePreAuth(PreAuthMachine[C]):
    """A pre-auth server machine for a line-based protocol; subclasses add the syntax.

    ``literals`` is the assembler of a protocol whose commands carry ``{n}`` literals (IMAP,
    ManageSieve); the others read bare lines. A subclass's table of commands is a class-level
    table of functions: a table of bound methods in each machine would make every machine a
    reference cycle, freed only by the collector's full passes.
    """

    def __init__(self, settings: PreAuthSettings[C],
                 literals: LiteralAssembler | None = None) -> None:
        self.settings = settings
        self.proxy_ttl: int | None = None
        self.client_helo: str | None = None
        self._tls_active = settings.tls_mode == "implicit"
        self._state = PreAuthState.COMMAND
        #: Everything received and not yet parsed; never more than a command plus one read.
        self._input: ClientInput = literals if literals is not None else LineBuffer(
            MAX_PREAUTH_LINE)
        self._sasl: SASLExchange | None = None
        self._failures = 0
        self._bad_commands = 0

    # -- what a protocol supplies

    def _read(self) -> object | None:
        """The next command (or SASL response), None until complete; may raise
        :exc:`LineTooLong`.  A line without its terminator, or the assembler's unit (or its
        :data:`~stalroute.protocols.lines.SYNC_LITERAL`)."""
        if isinstance(self._input, LiteralAssembler):
            return self._input.poll()
        return self._input.readline()

    @abc.abstractmethod
    def _execute(self, unit: object) -> list[PreAuthEvent]:
        """Answer one command (what :meth:`_read` returned)."""

    def _sasl_response(self, unit: object) -> bytes:
        """The base64 text of one SASL response (raise :exc:`SASLError` if malformed)."""
        assert isinstance(unit, bytes)
        return unit

    def _after_tls(self) -> list[PreAuthEvent]:
        """Events once the STARTTLS handshake completed (ManageSieve re-sends capabilities)."""
        return []

    @abc.abstractmethod
    def _goodbye(self, reason: CloseReason) -> bytes | None:
        """The line sent before closing for ``reason``."""

    @abc.abstractmethod
    def _challenge(self, text: bytes) -> bytes:
        """A SASL challenge (base64 ``text``) as the protocol sends it."""

    @abc.abstractmethod
    def _sasl_aborted(self) -> bytes:
        """The answer to a client's ``*`` (counted neither as a failure nor as an error)."""

    @abc.abstractmethod
    def _credentials_invalid(self, error: SASLError) -> bytes:
        """The answer to unusable SASL input or credentials (counted as a failed attempt)."""

    @abc.abstractmethod
    def _mechanism_unsupported(self) -> bytes:
        """The answer to a mechanism that is not offered."""

    @abc.abstractmethod
    def _privacy_required(self) -> bytes:
        """The answer to cleartext authentication while it is not allowed."""

    @abc.abstractmethod
    def _temporary_failure(self, text: bytes) -> list[PreAuthEvent]:
        """The protocol-proper temporary failure (``text`` is safe, printable ASCII)."""

    # -- PreAuthMachine

    @property
    def tls_active(self) -> bool:
        return self._tls_active

    def receive(self, data: bytes) -> list[PreAuthEvent]:
        if self._state in (PreAuthState.CLOSED, PreAuthState.STARTTLS):
            return []  # after STARTTLS: injected cleartext, dropped by design
        if self._state is PreAuthState.DONE:
            raise RuntimeError("receive() after the login succeeded")
        self._buffer.feed(data)
        events = self._process()
        if self._state is PreAuthState.PENDING and len(self._buffer) > MAX_PREAUTH_LINE:
            events += self._close(CloseReason.TOO_MUCH_INPUT)
        return events

    def tls_started(self) -> list[PreAuthEvent]:
        if self._state is PreAuthState.CLOSED:  # e.g. the pre-auth timer fired meanwhile
            return []
        if self._state is not PreAuthState.STARTTLS:
            raise RuntimeError("no STARTTLS in progress")
        self._tls_active = True
        self._state = PreAuthState.COMMAND
        return self._after_tls()

    def auth_failed(self, reply: bytes) -> list[PreAuthEvent]:
        if not self._resume():
            return []
        return self._auth_failure(reply) + self._process()

    def auth_unavailable(self, reason: str) -> list[PreAuthEvent]:
        if not self._resume():
            return []
        events = self._temporary_failure(safe_text(reason, "Service temporarily unavailable"))
        return events + self._process()

    def auth_succeeded(self) -> bytes:
        if self._state is not PreAuthState.PENDING:
            raise RuntimeError("no login outstanding")
        self._state = PreAuthState.DONE
        return self._buffer.take_all()

    def timed_out(self) -> list[PreAuthEvent]:
        if self._state is PreAuthState.CLOSED:
            return []
        return self._close(CloseReason.TIMEOUT)

    # -- helpers for protocols

    @property
    def _buffer(self) -> LineBuffer:
        """The received bytes not yet read (an assembler's partial unit aside)."""
        return self._input.buffer if isinstance(self._input, LiteralAssembler) else self._input

    @property
    def _cleartext_allowed(self) -> bool:
        return self._tls_active or self.settings.allow_plain_auth_without_tls

    @property
    def _starttls_offered(self) -> bool:
        return self.settings.tls_mode == "starttls" and not self._tls_active

    def _usable_mechanisms(self) -> list[str]:
        """The configured mechanisms a client may use right now, in configured order."""
        return [mechanism for mechanism in self.settings.sasl if mechanism in MECHANISMS
                and (self._cleartext_allowed or mechanism not in CLEARTEXT_MECHANISMS)]

    def _hang_up(self, *replies: bytes) -> list[PreAuthEvent]:
        """Send ``replies`` and close (QUIT, LOGOUT, a closing temporary failure)."""
        self._state = PreAuthState.CLOSED
        self._reset_input()
        return [*(Reply(reply) for reply in replies), Close()]

    def _close(self, reason: CloseReason) -> list[PreAuthEvent]:
        goodbye = self._goodbye(reason)
        return self._hang_up(*([goodbye] if goodbye else []))

    def _bad(self, reply: bytes) -> list[PreAuthEvent]:
        """Answer a protocol error; too many of them close the connection."""
        self._bad_commands += 1
        events: list[PreAuthEvent] = [Reply(reply)]
        if self._bad_commands >= MAX_BAD_COMMANDS:
            events += self._close(CloseReason.TOO_MANY_ERRORS)
        return events

    def _auth_failure(self, reply: bytes) -> list[PreAuthEvent]:
        """Answer a failed login; ``max_auth_attempts`` of them close the connection."""
        self._failures += 1
        events: list[PreAuthEvent] = [Reply(reply)]
        if self._failures >= self.settings.max_auth_attempts:
            events += self._close(CloseReason.TOO_MANY_FAILURES)
        return events

    def _start_tls(self, reply: bytes) -> list[PreAuthEvent]:
        """Accept STARTTLS: every byte already received after the command is discarded."""
        self._state = PreAuthState.STARTTLS
        self._reset_input()
        return [Reply(reply), StartTLS()]

    def _authenticated(self, credentials: Credentials) -> list[PreAuthEvent]:
        self._state = PreAuthState.PENDING
        return [Authenticate(credentials, self._login_context())]

    def _refuse_credentials(self, error: SASLError) -> list[PreAuthEvent]:
        return self._auth_failure(self._credentials_invalid(error))

    def _start_sasl(self, mechanism: str, initial_response: bytes | None) -> list[PreAuthEvent]:
        """Begin an exchange (``initial_response`` is base64 text, None when absent)."""
        mechanism = mechanism.upper()
        if mechanism not in self.settings.sasl or mechanism not in MECHANISMS:
            return [Reply(self._mechanism_unsupported())]
        if mechanism in CLEARTEXT_MECHANISMS and not self._cleartext_allowed:
            return [Reply(self._privacy_required())]
        self._sasl = SASLExchange(mechanism, initial_response)
        return self._sasl_step(None)

    def _login_context(self) -> object:
        """The :class:`Authenticate` context of a login (the IMAP tag, POP3's UTF8)."""
        return None

    # -- internals

    def _reset_input(self) -> None:
        """Forget all buffered input (STARTTLS injection defence, closing)."""
        if isinstance(self._input, LiteralAssembler):
            self._input.reset()
        else:
            self._input.clear()

    def _resume(self) -> bool:
        """Leave the pending state after an outcome; False if the connection already closed."""
        if self._state is PreAuthState.CLOSED:
            return False
        if self._state is not PreAuthState.PENDING:
            raise RuntimeError("no login outstanding")
        self._state = PreAuthState.COMMAND
        return True

    def _process(self) -> list[PreAuthEvent]:
        events: list[PreAuthEvent] = []
        try:
            while self._state in (PreAuthState.COMMAND, PreAuthState.SASL):
                unit = self._read()
                if unit is None:
                    break
                if self._state is PreAuthState.SASL:
                    try:
                        response = self._sasl_response(unit)
                    except SASLError as error:
                        self._end_sasl()
                        events += self._refuse_credentials(error)
                        continue
                    events += self._sasl_step(response)
                else:
                    events += self._execute(unit)
        except LineTooLong:
            events += self._close(CloseReason.LINE_TOO_LONG)
        return events

    def _end_sasl(self) -> None:
        self._sasl = None
        self._state = PreAuthState.COMMAND

    def _sasl_step(self, response: bytes | None) -> list[PreAuthEvent]:
        assert self._sasl is not None
        try:
            outcome = self._sasl.step(response)
        except SASLAborted:
            self._end_sasl()
            return [Reply(self._sasl_aborted())]
        except SASLError as error:
            self._end_sasl()
            return self._refuse_credentials(error)
        if isinstance(outcome, Challenge):
            self._state = PreAuthState.SASL
            return [Reply(self._challenge(outcome.text))]
        self._sasl = None
        return self._authenticated(outcome)


# --- the backend side ---------------------------------------------------------------------


class Stage(Enum):
    """Where every line dialogue stands; while one of its own commands is out, a dialogue
    is in a step of its protocol's own enum instead (named after the command)."""

    GREETING = "greeting"
    HANDSHAKE = "handshake"  # STARTTLS accepted; nothing is read until TLS is up
    READY = "ready"
    LOGIN = "login"
    DONE = "done"  # the outcome is known; later bytes are left over for the client


#: A protocol's steps: the commands of its own that a dialogue may have out.
S = TypeVar("S", bound=Enum)


class LineDialogue(BackendDialogue, Generic[S]):
    """A backend dialogue for a line-based protocol; subclasses add the steps."""

    def __init__(self, settings: BackendSettings) -> None:
        self.settings = settings
        self._state: Stage | S = Stage.GREETING
        self._tls_done = False
        #: The words of the backend's capability list, once read (over the final leg).
        self._capabilities: frozenset[bytes] | None = None
        self._leftover = b""
        # The login in flight: the response still owed (no initial response), abort sent.
        self._owed_response: bytes | None = None
        self._aborted = False

    # -- what a protocol supplies

    @abc.abstractmethod
    def _feed(self, data: bytes) -> None:
        """Buffer received bytes."""

    @abc.abstractmethod
    def _next(self) -> object | None:
        """The next complete response; may raise :exc:`LineTooLong`, :exc:`ProtocolViolation`."""

    @abc.abstractmethod
    def _take_rest(self) -> bytes:
        """Remove and return everything buffered and unparsed."""

    @abc.abstractmethod
    def _handle(self, response: object) -> list[BackendEvent]:
        """Act on one response."""

    @abc.abstractmethod
    def _after_tls(self) -> list[BackendEvent]:
        """The first step over the encrypted leg."""

    @abc.abstractmethod
    def _replay(self, credentials: Credentials, context: object) -> list[BackendEvent]:
        """Send the login."""

    # -- BackendDialogue

    def receive(self, data: bytes) -> list[BackendEvent]:
        if self._state is Stage.DONE:
            self._leftover += data
            return []
        if self._state is Stage.HANDSHAKE:
            return []  # nothing may arrive in cleartext between STARTTLS's answer and TLS
        self._feed(data)
        events: list[BackendEvent] = []
        try:
            while self._state not in (Stage.DONE, Stage.HANDSHAKE):
                response = self._next()
                if response is None:
                    break
                events += self._handle(response)
        except LineTooLong:
            events += self._fail("backend line too long")
        except ProtocolViolation:
            events += self._fail("malformed response from backend")
        return events

    def tls_started(self) -> list[BackendEvent]:
        if self._state is not Stage.HANDSHAKE:
            raise RuntimeError("no STARTTLS in progress")
        self._tls_done = True
        self._capabilities = None  # anything learnt before TLS is not to be trusted
        return self._after_tls()

    def login(self, credentials: Credentials | None, context: object) -> list[BackendEvent]:
        if self._state is not Stage.READY or credentials is None:
            raise RuntimeError("backend not ready for the login, or no credentials")
        self._state = Stage.LOGIN
        return self._replay(credentials, context)

    @property
    def leftover(self) -> bytes:
        return self._leftover

    # -- helpers for protocols

    @property
    def _starttls_needed(self) -> bool:
        return self.settings.tls_mode == "starttls" and not self._tls_done

    def _offers(self, capability: bytes) -> bool:
        return self._capabilities is not None and capability in self._capabilities

    def _send(self, command: bytes, state: Stage | S) -> list[BackendEvent]:
        """Send one command line and wait in ``state`` for its answer."""
        self._state = state
        return [BackendSend(command + b"\r\n")]

    def _fail(self, reason: str) -> list[BackendEvent]:
        self._state = Stage.DONE
        self._take_rest()
        return [BackendError(reason)]

    def _handshake(self) -> list[BackendEvent]:
        """The backend accepted STARTTLS: no cleartext byte survives into the TLS session."""
        self._state = Stage.HANDSHAKE
        self._take_rest()
        return [BackendStartTLS()]

    def _ready(self) -> list[BackendEvent]:
        self._state = Stage.READY
        return [BackendReady()]

    def _challenged(self) -> bytes | None:
        """A challenge during the login: the owed response, or None after deciding to abort
        (an unexpected challenge, such as an OAuth error; the outcome is then a failure)."""
        if self._owed_response is not None:
            owed, self._owed_response = self._owed_response, None
            return owed
        self._aborted = True
        return None

    def _outcome(self, success: bool, reply: bytes, hidden: bytes) -> list[BackendEvent]:
        """The login's outcome; ``hidden`` replaces a refusal with ``hide_auth_errors``."""
        self._state = Stage.DONE
        self._leftover = self._take_rest()
        if success and not self._aborted:
            return [LoginSucceeded(reply)]
        if self._aborted or self.settings.hide_auth_errors:
            return [LoginFailed(hidden)]
        return [LoginFailed(reply)]


class LiteralDialogue(LineDialogue[S]):
    """A dialogue whose backend answers with strings that may be literals (IMAP,
    ManageSieve): it reads whole units, every literal at once."""

    def __init__(self, settings: BackendSettings) -> None:
        super().__init__(settings)
        self._input = LiteralAssembler(MAX_PREAUTH_LINE, synchronising=False)

    def _feed(self, data: bytes) -> None:
        self._input.buffer.feed(data)

    def _next(self) -> Unit | None:
        unit = self._input.poll()  # never SYNC_LITERAL: not synchronising
        assert unit is None or isinstance(unit, Unit)
        return unit

    def _take_rest(self) -> bytes:
        rest = bytes(self._input.partial.raw) + self._input.buffer.take_all()
        self._input.reset()
        return rest
