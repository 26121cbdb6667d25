"""POP3: the pre-auth server dialogue and the backend login replay (SPEC §5). Sans-IO.

:class:`POP3PreAuth` answers the client in the AUTHORIZATION state (RFC 1939, 2449, 2595,
5034, 6856): CAPA, NOOP, UTF8, QUIT, STLS, USER + PASS, AUTH (bare AUTH lists the
mechanisms), APOP refused.  :class:`POP3BackendDialogue` plays the client toward the
backend: greeting (Dovecot's ``[XCLIENT]`` hint), CAPA, STLS, CAPA again over TLS,
``XCLIENT``, the client's ``UTF8`` if it sent one, then ``AUTH <mech> <initial response>``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import ClassVar

from stalroute.config import ProtocolCapabilities
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
from stalroute.protocols.linebased import CloseReason, LineDialogue, LinePreAuth, Stage
from stalroute.protocols.lines import CapabilityLines, LineBuffer, safe_text
from stalroute.protocols.xclient import xclient_command
from stalroute.sasl import Credentials, SASLError, encode_base64, plain_credentials

#: The generic refusal (``hide_auth_errors``), as Dovecot words it.
HIDDEN_FAILURE = b"-ERR [AUTH] Authentication failed.\r\n"
#: RFC 5034 §4: an AUTH command with its initial response must fit in 255 octets.
MAX_AUTH_COMMAND = 255

_GREETING_CODES = re.compile(rb"\+OK \[([^\]]*)\]")


@dataclass(frozen=True)
class POP3Login:
    """The :class:`~stalroute.protocols.base.Authenticate` context of a POP3 login."""

    utf8: bool = False  # the client enabled UTF8 (RFC 6856); replayed at the backend


# --- what POP3 announces -------------------------------------------------------------------


@dataclass(frozen=True)
class POP3Capabilities:
    """What only POP3 announces, as :class:`POP3PreAuth` reads it."""

    #: Offer ``UTF8`` (RFC 6856): only when every destination lists it, as it is replayed
    #: there after the login.
    utf8: bool = True

    @classmethod
    def from_config(cls, section: ProtocolCapabilities, offered: Offer) -> POP3Capabilities:
        return cls(utf8="UTF8" in offered.get("capa", frozenset()))


#: What a destination that never answered a probe is taken to offer (no CAPA words known).
FALLBACK: Offer = {"sasl": frozenset({"PLAIN"}), "capa": frozenset()}


# --- the client side: pre-auth server -----------------------------------------------------


class POP3PreAuth(LinePreAuth[POP3Capabilities]):
    """The POP3 server dialogue up to a successful login."""

    def __init__(self, settings: PreAuthSettings[POP3Capabilities]) -> None:
        super().__init__(settings)
        self._user: bytes | None = None
        self._utf8 = False

    def greeting(self) -> list[PreAuthEvent]:
        return [Reply(b"+OK " + safe_text(self.settings.banner, "Ready.") + b"\r\n")]

    # -- wording

    def _goodbye(self, reason: CloseReason) -> bytes | None:
        if reason is CloseReason.TOO_MANY_FAILURES:
            return None  # the failed attempt was just answered; POP3 has no unsolicited BYE
        return b"-ERR " + reason.value.encode("ascii") + b"\r\n"

    def _challenge(self, text: bytes) -> bytes:
        return b"+ " + text + b"\r\n"

    def _sasl_aborted(self) -> bytes:
        return b"-ERR Authentication aborted\r\n"

    def _credentials_invalid(self, error: SASLError) -> bytes:
        return b"-ERR [AUTH] " + safe_text(str(error), "Authentication failed.") + b"\r\n"

    def _mechanism_unsupported(self) -> bytes:
        return b"-ERR Unsupported authentication mechanism\r\n"

    def _privacy_required(self) -> bytes:
        return b"-ERR [AUTH] Cleartext authentication is not allowed without TLS\r\n"

    def _temporary_failure(self, text: bytes) -> list[PreAuthEvent]:
        return [Reply(b"-ERR [SYS/TEMP] " + text + b"\r\n")]

    def _login_context(self) -> object:
        return POP3Login(utf8=self._utf8)

    # -- commands

    def _execute(self, unit: object) -> list[PreAuthEvent]:
        assert isinstance(unit, bytes)
        name, space, argument = unit.partition(b" ")
        handler = self._HANDLERS.get(name.upper())
        if handler is None:
            return self._bad(b"-ERR Unknown command or not allowed before authentication\r\n")
        return handler(self, argument if space else None)

    def _invalid(self) -> list[PreAuthEvent]:
        return self._bad(b"-ERR Invalid arguments\r\n")

    def capabilities(self) -> list[bytes]:
        """The CAPA lines as they stand now."""
        caps = [b"TOP", b"UIDL", b"RESP-CODES", b"AUTH-RESP-CODE", b"PIPELINING"]
        if self._cleartext_allowed:
            caps.append(b"USER")
        mechanisms = self._usable_mechanisms()
        if mechanisms:
            caps.append(b"SASL " + " ".join(mechanisms).encode("ascii"))
        if self._starttls_offered:
            caps.append(b"STLS")
        if self.settings.capabilities.utf8:
            caps.append(b"UTF8")
        return caps

    def _capa(self, argument: bytes | None) -> list[PreAuthEvent]:
        if argument is not None:
            return self._invalid()
        body = b"".join(line + b"\r\n" for line in self.capabilities())
        return [Reply(b"+OK Capability list follows\r\n" + body + b".\r\n")]

    def _noop(self, argument: bytes | None) -> list[PreAuthEvent]:
        if argument is not None:
            return self._invalid()
        return [Reply(b"+OK\r\n")]

    def _utf8_command(self, argument: bytes | None) -> list[PreAuthEvent]:
        if not self.settings.capabilities.utf8:
            return self._bad(b"-ERR Unknown command or not allowed before authentication\r\n")
        if argument is not None:
            return self._invalid()
        self._utf8 = True
        return [Reply(b"+OK UTF8 enabled\r\n")]

    def _quit(self, argument: bytes | None) -> list[PreAuthEvent]:
        return self._hang_up(b"+OK Logging out\r\n")

    def _stls(self, argument: bytes | None) -> list[PreAuthEvent]:
        if argument is not None:
            return self._invalid()
        if self._tls_active:
            return self._bad(b"-ERR Command not permitted when TLS active\r\n")
        if not self._starttls_offered:
            return self._bad(b"-ERR STLS not available\r\n")
        return self._start_tls(b"+OK Begin TLS negotiation now\r\n")

    def _user_command(self, argument: bytes | None) -> list[PreAuthEvent]:
        if not argument:
            return self._invalid()
        if not self._cleartext_allowed:
            return [Reply(self._privacy_required())]
        self._user = argument
        return [Reply(b"+OK\r\n")]

    def _pass(self, argument: bytes | None) -> list[PreAuthEvent]:
        if argument is None:
            return self._invalid()
        if not self._cleartext_allowed:
            return [Reply(self._privacy_required())]
        if self._user is None:
            return self._bad(b"-ERR No user name given\r\n")
        user, self._user = self._user, None
        try:
            credentials = plain_credentials(user.decode("utf-8"), argument.decode("utf-8"))
        except UnicodeDecodeError:
            return self._refuse_credentials(SASLError("Credentials are not valid UTF-8"))
        except SASLError as error:
            return self._refuse_credentials(error)
        return self._authenticated(credentials)

    def _auth(self, argument: bytes | None) -> list[PreAuthEvent]:
        if argument is None:
            body = b"".join(mechanism.encode("ascii") + b"\r\n"
                            for mechanism in self._usable_mechanisms())
            return [Reply(b"+OK\r\n" + body + b".\r\n")]
        words = argument.split(b" ")
        if len(words) > 2 or not all(words):
            return self._invalid()
        initial_response = words[1] if len(words) == 2 else None
        return self._start_sasl(words[0].decode("ascii", "replace"), initial_response)

    def _apop(self, argument: bytes | None) -> list[PreAuthEvent]:
        return [Reply(b"-ERR APOP is not supported\r\n")]

    #: The commands it answers (a class-level table: see :class:`LinePreAuth`).
    _HANDLERS: ClassVar[dict[bytes, Callable[[POP3PreAuth, bytes | None],
                                             list[PreAuthEvent]]]] = {
        b"CAPA": _capa,
        b"NOOP": _noop,
        b"UTF8": _utf8_command,
        b"QUIT": _quit,
        b"STLS": _stls,
        b"USER": _user_command,
        b"PASS": _pass,
        b"AUTH": _auth,
        b"APOP": _apop,
    }


# --- the backend side ---------------------------------------------------------------------


class _Step(Enum):
    """The command of stalroute's own that the dialogue has out."""

    CAPA = "CAPA"  # waiting for CAPA's status line
    CAPA_LIST = "CAPA list"  # reading its lines until "."
    STLS = "STLS"
    XCLIENT = "XCLIENT"
    UTF8 = "UTF8"


def _is_ok(line: bytes) -> bool:
    return line == b"+OK" or line.startswith(b"+OK ")


def _is_err(line: bytes) -> bool:
    return line == b"-ERR" or line.startswith(b"-ERR ")


class POP3BackendDialogue(LineDialogue[_Step]):
    """The POP3 client dialogue toward a backend, up to the replayed login's outcome."""

    def __init__(self, settings: BackendSettings) -> None:
        super().__init__(settings)
        self._reader = LineBuffer(MAX_PREAUTH_LINE)
        self._capa_list = CapabilityLines()
        self._xclient_hint = False  # "+OK [XCLIENT] ..." in the greeting
        self._auth_command = b""

    # -- plumbing

    def _feed(self, data: bytes) -> None:
        self._reader.feed(data)

    def _next(self) -> bytes | None:
        return self._reader.readline()

    def _take_rest(self) -> bytes:
        return self._reader.take_all()

    # -- establishment

    @property
    def offered(self) -> Offer | None:
        if self._capabilities is None:
            return None
        mechanisms = [word.decode("ascii", "replace").upper()
                      for words in (line.split() for line in self._capa_list.lines)
                      if words and words[0].upper() == b"SASL" for word in words[1:]]
        return {"sasl": frozenset(mechanisms),
                "capa": frozenset(line.split()[0].decode("ascii", "replace").upper()
                                  for line in self._capa_list.lines if line.split())}

    def _next_step(self) -> list[BackendEvent]:
        """greeting → CAPA → STLS → CAPA over TLS → XCLIENT → ready."""
        if self._starttls_needed:
            if self._capabilities is None:
                return self._send(b"CAPA", _Step.CAPA)
            if not self._offers(b"STLS"):
                return self._fail("backend does not offer STLS")
            return self._send(b"STLS", _Step.STLS)
        if self._capabilities is None and (self._tls_done or self.settings.learn_capabilities):
            return self._send(b"CAPA", _Step.CAPA)
        forwarding = self.settings.forwarding
        if forwarding is not None:
            if not self._xclient_hint and self._capabilities is None:
                return self._send(b"CAPA", _Step.CAPA)
            if self._xclient_hint or self._offers(b"XCLIENT"):
                command = xclient_command(forwarding, None, smtp=False)
                if command is not None:
                    return self._send(command, _Step.XCLIENT)
        return self._ready()

    def _after_tls(self) -> list[BackendEvent]:
        return self._next_step()

    def _handle(self, response: object) -> list[BackendEvent]:
        assert isinstance(response, bytes)
        line = response
        step = self._state
        if step is Stage.LOGIN:
            return self._handle_login(line)
        if step is _Step.CAPA_LIST:
            return self._capability_line(line)
        if step is Stage.GREETING:
            if _is_ok(line):
                codes = _GREETING_CODES.match(line)
                hints = codes.group(1).upper().split() if codes is not None else []
                self._xclient_hint = b"XCLIENT" in hints
                return self._next_step()
            if _is_err(line):
                return self._fail("backend refused the connection")
            return self._fail("unexpected backend greeting")
        if step is _Step.CAPA:
            if _is_ok(line):
                self._state = _Step.CAPA_LIST
                self._capa_list = CapabilityLines()
                return []
            if _is_err(line):  # CAPA is optional (RFC 2449): no capabilities known
                self._capabilities = frozenset()
                self._capa_list = CapabilityLines()
                return self._next_step()
            return self._fail("unexpected response from backend")
        if step is _Step.UTF8:
            if _is_ok(line) or _is_err(line):  # a refusal leaves the session as it was
                return self._send(self._auth_command, Stage.LOGIN)
            return self._fail("unexpected response from backend")
        if step not in (_Step.STLS, _Step.XCLIENT):  # nothing is expected while ready
            return self._fail("unexpected response from backend")
        if not _is_ok(line):
            if _is_err(line):
                return self._fail(f"backend refused {step.value}")
            return self._fail("unexpected response from backend")
        if step is _Step.STLS:
            return self._handshake()
        return self._ready()

    def _capability_line(self, line: bytes) -> list[BackendEvent]:
        if line == b".":
            self._capabilities = frozenset(
                words[0].upper() for words in (item.split() for item in self._capa_list.lines)
                if words)
            return self._next_step()
        if not self._capa_list.add(line[1:] if line.startswith(b".") else line):
            return self._fail("backend sent too many capabilities")
        return []

    # -- the login

    def _replay(self, credentials: Credentials, context: object) -> list[BackendEvent]:
        mechanism = credentials.mechanism.encode("ascii")
        response = encode_base64(credentials.response)
        command = b"AUTH " + mechanism + b" " + response
        if len(command) + 2 > MAX_AUTH_COMMAND:
            # Too long for an initial response: send it after the server's "+".
            command = b"AUTH " + mechanism
            self._owed_response = response
        self._auth_command = command
        wants_utf8 = isinstance(context, POP3Login) and context.utf8
        # Known capabilities without UTF8: skip it (the session then stays as it was).
        if wants_utf8 and (self._capabilities is None or self._offers(b"UTF8")):
            return self._send(b"UTF8", _Step.UTF8)
        return self._send(command, Stage.LOGIN)

    def _handle_login(self, line: bytes) -> list[BackendEvent]:
        if _is_ok(line):
            return self._outcome(True, line + b"\r\n", HIDDEN_FAILURE)
        if _is_err(line):
            return self._outcome(False, line + b"\r\n", HIDDEN_FAILURE)
        if line == b"+" or line.startswith(b"+ "):
            owed = self._challenged()
            return [BackendSend((owed if owed is not None else b"*") + b"\r\n")]
        return self._fail("unexpected response from backend")


#: POP3 as the shared pipeline (``stalroute.session``, ``stalroute.backend``) runs it.
SPEC = ProtocolSpec("pop3", POP3PreAuth, POP3BackendDialogue, CapabilityRules(
    POP3Capabilities.from_config, learnt=("sasl",), fallback=FALLBACK))
