"""The shared life cycle of the POP3, ManageSieve and submission machines (SPEC §3, §5). Sans-IO.

The three protocols differ in syntax, not in what happens before a login:

* :class:`LinePreAuth` owns the states (commands → SASL exchange → login outstanding →
  spliced, with STARTTLS and closing on the side), the limits (``MAX_PREAUTH_LINE``,
  ``max_auth_attempts``, :data:`MAX_BAD_COMMANDS`, bounded buffering of pipelined bytes),
  the STARTTLS injection defence, the cleartext rule and the SASL plumbing.  A protocol
  supplies how it reads a command, how it answers one, and the wording of its replies.
* :class:`LineDialogue` owns the backend side's states (establishment → ready → login →
  outcome), its limits, the discarding of cleartext bytes around STARTTLS and the bytes
  left over after the outcome.  A protocol supplies its reader and its steps.

IMAP predates this module and keeps its own, equivalent, implementation.
"""

from __future__ import annotations

import abc

from stalroute.protocols.base import (
    MAX_PREAUTH_LINE,
    Authenticate,
    BackendDialogue,
    BackendError,
    BackendEvent,
    BackendReady,
    BackendSettings,
    BackendStartTLS,
    Close,
    LoginFailed,
    LoginSucceeded,
    PreAuthEvent,
    PreAuthMachine,
    PreAuthSettings,
    Reply,
    StartTLS,
)
from stalroute.protocols.lines import LineBuffer, LineTooLong, ProtocolViolation, safe_text
from stalroute.sasl import (
    CLEARTEXT_MECHANISMS,
    MECHANISMS,
    Challenge,
    Credentials,
    SASLAborted,
    SASLError,
    SASLExchange,
)

#: Protocol errors tolerated on one connection before it is closed (as in IMAP).
MAX_BAD_COMMANDS = 20

# Reasons for closing the client connection; each protocol words its goodbye from them.
TIMEOUT = "Disconnected for inactivity"
LINE_TOO_LONG = "Line too long"
TOO_MUCH_INPUT = "Too much input before authentication completed"
TOO_MANY_FAILURES = "Too many invalid authentication attempts"
TOO_MANY_ERRORS = "Too many invalid commands"

# Pre-auth states.
COMMAND = "command"  # reading commands
SASL = "sasl"  # reading the client's responses to an authentication exchange
PENDING = "pending"  # an Authenticate is out; buffering until its outcome
STARTTLS = "starttls"  # discarding until the handshake completes
CLOSED = "closed"
DONE = "done"  # logged in; the session splices from here


class LinePreAuth(PreAuthMachine):
    """A pre-auth server machine for a line-based protocol; subclasses add the syntax."""

    def __init__(self, settings: PreAuthSettings) -> None:
        self.settings = settings
        self.proxy_ttl: int | None = None
        self.client_helo: str | None = None
        self._tls_active = settings.tls_mode == "implicit"
        self._state = COMMAND
        #: Everything received and not yet parsed; never more than a line plus one read.
        self._buffer = LineBuffer(MAX_PREAUTH_LINE)
        self._sasl: SASLExchange | None = None
        self._failures = 0
        self._bad_commands = 0

    # -- what a protocol supplies

    def _read(self) -> object | None:
        """The next command (or SASL response) from :attr:`_buffer`, None until complete.

        May raise :exc:`LineTooLong`.  The default reads one line without its terminator.
        """
        return self._buffer.readline()

    def _reset_input(self) -> None:
        """Forget all buffered input (STARTTLS injection defence, closing)."""
        self._buffer.clear()

    @abc.abstractmethod
    def _execute(self, unit: object) -> list[PreAuthEvent]:
        """Answer one command."""

    def _sasl_response(self, unit: object) -> bytes:
        """The base64 text of one SASL response (raise :exc:`SASLError` if malformed)."""
        assert isinstance(unit, bytes)
        return unit

    def _after_tls(self) -> list[PreAuthEvent]:
        """Events once the STARTTLS handshake completed (ManageSieve re-sends capabilities)."""
        return []

    @abc.abstractmethod
    def _goodbye(self, reason: str) -> bytes | None:
        """The line sent before closing for ``reason`` (one of this module's reasons)."""

    @abc.abstractmethod
    def _challenge(self, text: bytes) -> bytes:
        """A SASL challenge (base64 ``text``) as the protocol sends it."""

    @abc.abstractmethod
    def _sasl_aborted(self) -> bytes:
        """The answer to a client's ``*`` (not counted as a failed attempt)."""

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
        if self._state in (CLOSED, STARTTLS):
            return []  # after STARTTLS: injected cleartext, dropped by design
        if self._state == DONE:
            raise RuntimeError("receive() after the login succeeded")
        self._buffer.feed(data)
        events = self._process()
        if self._state == PENDING and len(self._buffer) > MAX_PREAUTH_LINE:
            events += self._close(TOO_MUCH_INPUT)
        return events

    def tls_started(self) -> list[PreAuthEvent]:
        if self._state == CLOSED:  # e.g. the pre-auth timer fired during the handshake
            return []
        if self._state != STARTTLS:
            raise RuntimeError("no STARTTLS in progress")
        self._tls_active = True
        self._state = COMMAND
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
        if self._state != PENDING:
            raise RuntimeError("no login outstanding")
        self._state = DONE
        return self._buffer.take_all()

    def timed_out(self) -> list[PreAuthEvent]:
        if self._state == CLOSED:
            return []
        return self._close(TIMEOUT)

    # -- helpers for protocols

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

    def _hang_up(self, reply: bytes) -> list[PreAuthEvent]:
        """Send ``reply`` and close (QUIT, LOGOUT, a closing temporary failure)."""
        self._state = CLOSED
        self._reset_input()
        return [Reply(reply), Close()]

    def _close(self, reason: str) -> list[PreAuthEvent]:
        self._state = CLOSED
        self._reset_input()
        goodbye = self._goodbye(reason)
        return ([Reply(goodbye)] if goodbye else []) + [Close()]

    def _bad(self, reply: bytes) -> list[PreAuthEvent]:
        """Answer a protocol error; too many of them close the connection."""
        self._bad_commands += 1
        events: list[PreAuthEvent] = [Reply(reply)]
        if self._bad_commands >= MAX_BAD_COMMANDS:
            events += self._close(TOO_MANY_ERRORS)
        return events

    def _auth_failure(self, reply: bytes) -> list[PreAuthEvent]:
        """Answer a failed login; ``max_auth_attempts`` of them close the connection."""
        self._failures += 1
        events: list[PreAuthEvent] = [Reply(reply)]
        if self._failures >= self.settings.max_auth_attempts:
            events += self._close(TOO_MANY_FAILURES)
        return events

    def _start_tls(self, reply: bytes) -> list[PreAuthEvent]:
        """Accept STARTTLS: every byte already received after the command is discarded."""
        self._state = STARTTLS
        self._reset_input()
        return [Reply(reply), StartTLS()]

    def _authenticated(self, credentials: Credentials,
                       context: object = None) -> list[PreAuthEvent]:
        self._state = PENDING
        return [Authenticate(credentials, context)]

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
        """The :class:`Authenticate` context for a completed exchange."""
        return None

    # -- internals

    def _resume(self) -> bool:
        """Leave the pending state after an outcome; False if the connection already closed."""
        if self._state == CLOSED:
            return False
        if self._state != PENDING:
            raise RuntimeError("no login outstanding")
        self._state = COMMAND
        return True

    def _process(self) -> list[PreAuthEvent]:
        events: list[PreAuthEvent] = []
        try:
            while self._state in (COMMAND, SASL):
                unit = self._read()
                if unit is None:
                    break
                if self._state == SASL:
                    try:
                        response = self._sasl_response(unit)
                    except SASLError as error:
                        self._sasl = None
                        self._state = COMMAND
                        events += self._refuse_credentials(error)
                        continue
                    events += self._sasl_step(response)
                else:
                    events += self._execute(unit)
        except LineTooLong:
            events += self._close(LINE_TOO_LONG)
        return events

    def _sasl_step(self, response: bytes | None) -> list[PreAuthEvent]:
        assert self._sasl is not None
        try:
            outcome = self._sasl.step(response)
        except SASLAborted:
            self._sasl = None
            self._state = COMMAND
            return [Reply(self._sasl_aborted())]
        except SASLError as error:
            self._sasl = None
            self._state = COMMAND
            return self._refuse_credentials(error)
        if isinstance(outcome, Challenge):
            self._state = SASL
            return [Reply(self._challenge(outcome.text))]
        self._sasl = None
        return self._authenticated(outcome, self._login_context())


# --- the backend side ---------------------------------------------------------------------

# Backend states every dialogue shares; protocols add their own while a command is out.
GREETING = "greeting"
HANDSHAKE = "handshake"
READY = "ready"
LOGIN = "login"


class LineDialogue(BackendDialogue):
    """A backend dialogue for a line-based protocol; subclasses add the steps."""

    def __init__(self, settings: BackendSettings) -> None:
        self.settings = settings
        self._state = GREETING
        self._tls_done = False
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
        if self._state == DONE:
            self._leftover += data
            return []
        if self._state == HANDSHAKE:
            return []  # nothing may arrive in cleartext between STARTTLS's answer and TLS
        self._feed(data)
        events: list[BackendEvent] = []
        try:
            while self._state not in (DONE, HANDSHAKE):
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
        if self._state != HANDSHAKE:
            raise RuntimeError("no STARTTLS in progress")
        self._tls_done = True
        return self._after_tls()

    def login(self, credentials: Credentials, context: object) -> list[BackendEvent]:
        if self._state != READY:
            raise RuntimeError("backend not ready for the login")
        self._state = LOGIN
        return self._replay(credentials, context)

    @property
    def leftover(self) -> bytes:
        return self._leftover

    # -- helpers for protocols

    @property
    def _starttls_needed(self) -> bool:
        return self.settings.tls_mode == "starttls" and not self._tls_done

    def _fail(self, reason: str) -> list[BackendEvent]:
        self._state = DONE
        self._take_rest()
        return [BackendError(reason)]

    def _handshake(self) -> list[BackendEvent]:
        """The backend accepted STARTTLS: no cleartext byte survives into the TLS session."""
        self._state = HANDSHAKE
        self._take_rest()
        return [BackendStartTLS()]

    def _ready(self) -> list[BackendEvent]:
        self._state = READY
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
        self._state = DONE
        self._leftover = self._take_rest()
        if success and not self._aborted:
            return [LoginSucceeded(reply)]
        if self._aborted or self.settings.hide_auth_errors:
            return [LoginFailed(hidden)]
        return [LoginFailed(reply)]
