"""Submission: the pre-auth SMTP dialogue and the backend login replay (SPEC §5). Sans-IO.

:class:`SubmissionPreAuth` answers the client until it authenticates (RFC 5321, 3207,
4954, 6409): EHLO, HELO, NOOP, RSET, QUIT, STARTTLS, AUTH with ``334`` continuations, and
``538 5.7.11`` for cleartext mechanisms before TLS; mail transaction commands get
``530 5.7.0`` until then.  :class:`SubmissionBackendDialogue` plays the client toward the
backend: greeting, EHLO (with the client's EHLO name), STARTTLS and EHLO again, XCLIENT
restricted to the attributes the backend lists and EHLO again, then ``AUTH <mech> <ir>``.
After a ``235`` the session splices raw bytes, so MAIL/RCPT/DATA/BDAT flow untouched: the
client greeted stalroute and the backend was greeted by the dialogue, so both ends stand
in the same state (greeted, authenticated, no transaction).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import ClassVar

from stalroute.config import DEFAULT_SUBMISSION_EHLO, ProtocolCapabilities
from stalroute.protocols.base import (
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
from stalroute.protocols.lines import safe_text
from stalroute.protocols.smtpreply import ReplyReader, SMTPReply, ehlo_keywords, format_reply
from stalroute.protocols.xclient import xclient_command
from stalroute.sasl import Credentials, SASLError, encode_base64

#: The generic refusal (``hide_auth_errors``).
HIDDEN_FAILURE = b"535 5.7.8 Authentication credentials invalid\r\n"
#: What the client sees after the backend's ``235``.
AUTH_SUCCEEDED = b"235 2.7.0 Authentication successful\r\n"
#: RFC 4954 §4: an AUTH command line (with its initial response) may be 12288 octets long.
MAX_AUTH_COMMAND = 12288
#: The EHLO/HELO argument: one token of printable ASCII (a domain or an address literal).
_HELO_NAME = re.compile(rb"[!-~]{1,255}")
_BDAT = re.compile(rb"([0-9]{1,18})(?: +LAST)? *\Z", re.IGNORECASE)
_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_TRANSACTION = frozenset({b"MAIL", b"RCPT", b"DATA", b"BDAT"})


# --- what submission announces -------------------------------------------------------------


def managed(keyword: str) -> bool:
    """EHLO keywords stalroute computes itself, never taken from ``ehlo``."""
    return keyword.upper() in ("STARTTLS", "AUTH")


@dataclass(frozen=True)
class SubmissionCapabilities:
    """``[capabilities.submission]``'s own setting, as :class:`SubmissionPreAuth` reads it."""

    #: The EHLO keywords announced besides those stalroute computes (:func:`managed`); an
    #: empty list is a choice (nothing the destinations honour).
    ehlo: tuple[str, ...] = DEFAULT_SUBMISSION_EHLO

    @classmethod
    def from_config(cls, section: ProtocolCapabilities,
                    offered: Offer) -> SubmissionCapabilities:
        return cls(ehlo=section.ehlo)


#: What a destination that never answered a probe is taken to offer (Dovecot 2.3, Stalwart
#: and Postfix all do; not SMTPUTF8).
FALLBACK: Offer = {"ehlo": frozenset({"ENHANCEDSTATUSCODES", "8BITMIME", "PIPELINING",
                                      "CHUNKING", "SIZE"}),
                   "sasl": frozenset({"PLAIN"})}


# --- the client side: pre-auth server -----------------------------------------------------


class SubmissionPreAuth(LinePreAuth[SubmissionCapabilities]):
    """The submission server dialogue up to a successful login."""

    def __init__(self, settings: PreAuthSettings[SubmissionCapabilities]) -> None:
        super().__init__(settings)
        self._hostname = safe_text(settings.hostname, "localhost").replace(b" ", b"")
        self._skip = 0  # bytes of a refused BDAT chunk still to discard

    def greeting(self) -> list[PreAuthEvent]:
        banner = safe_text(self.settings.banner, "Ready.")
        return [Reply(b"220 " + self._hostname + b" ESMTP " + banner + b"\r\n")]

    def ehlo_keywords(self) -> list[bytes]:
        """The EHLO extensions as they stand now."""
        keywords = [word.encode("ascii") for word in self.settings.capabilities.ehlo
                    if _KEYWORD.fullmatch(word) and not managed(word)]
        if self._starttls_offered:
            keywords.append(b"STARTTLS")
        mechanisms = self._usable_mechanisms()
        if mechanisms:
            keywords.append(b"AUTH " + " ".join(mechanisms).encode("ascii"))
        return keywords

    # -- reading

    def _read(self) -> object | None:
        while self._skip:
            self._skip -= self._buffer.discard(self._skip)
            if self._skip:
                return None
        return self._buffer.readline()

    # -- wording

    def _goodbye(self, reason: CloseReason) -> bytes | None:
        code = b"421 4.4.2 " if reason is CloseReason.TIMEOUT else b"421 4.7.0 "
        return code + self._hostname + b" " + reason.value.encode("ascii") + b"\r\n"

    def _challenge(self, text: bytes) -> bytes:
        return b"334 " + text + b"\r\n"

    def _sasl_aborted(self) -> bytes:
        return b"501 5.7.0 Authentication aborted\r\n"

    def _credentials_invalid(self, error: SASLError) -> bytes:
        return b"501 5.5.2 " + safe_text(str(error), "Invalid authentication data") + b"\r\n"

    def _mechanism_unsupported(self) -> bytes:
        return b"504 5.5.4 Unrecognized authentication type\r\n"

    def _privacy_required(self) -> bytes:
        return b"538 5.7.11 Encryption required for requested authentication mechanism\r\n"

    def _temporary_failure(self, text: bytes) -> list[PreAuthEvent]:
        # 421 closes the transmission channel (RFC 5321 §4.2.2), so stalroute does too.
        return self._hang_up(b"421 4.3.0 " + self._hostname + b" " + text + b"\r\n")

    def _after_tls(self) -> list[PreAuthEvent]:
        # RFC 3207 §4.2: all knowledge from before TLS is discarded; the client must EHLO.
        self.client_helo = None
        return []

    # -- commands

    def _execute(self, unit: object) -> list[PreAuthEvent]:
        assert isinstance(unit, bytes)
        name, space, argument = unit.partition(b" ")
        verb = name.upper()
        handler = self._HANDLERS.get(verb)
        if handler is not None:
            return handler(self, argument if space else None)
        if verb in _TRANSACTION:
            if verb == b"BDAT":
                size = _BDAT.match(argument) if space else None
                if size is None:
                    return self._bad(b"501 5.5.4 Syntax: BDAT size [LAST]\r\n")
                self._skip = int(size.group(1))  # RFC 3030: the refused chunk still comes
            return self._bad(b"530 5.7.0 Authentication required\r\n")
        return self._bad(b"502 5.5.1 Command not implemented\r\n")

    def _greeted(self, argument: bytes | None) -> bytes | None:
        """Record the client's name from EHLO/HELO; None if it is not a valid name."""
        name = argument.strip(b" ") if argument is not None else b""
        if not _HELO_NAME.fullmatch(name):
            return None
        self.client_helo = name.decode("ascii")
        return name

    def _ehlo(self, argument: bytes | None) -> list[PreAuthEvent]:
        if self._greeted(argument) is None:
            return self._bad(b"501 5.5.4 Syntax: EHLO hostname\r\n")
        return [Reply(format_reply(250, [self._hostname, *self.ehlo_keywords()]))]

    def _helo(self, argument: bytes | None) -> list[PreAuthEvent]:
        if self._greeted(argument) is None:
            return self._bad(b"501 5.5.4 Syntax: HELO hostname\r\n")
        return [Reply(b"250 " + self._hostname + b"\r\n")]

    def _noop(self, argument: bytes | None) -> list[PreAuthEvent]:
        return [Reply(b"250 2.0.0 OK\r\n")]

    def _rset(self, argument: bytes | None) -> list[PreAuthEvent]:
        if argument is not None and argument.strip(b" "):
            return self._bad(b"501 5.5.4 Syntax: RSET\r\n")
        return [Reply(b"250 2.0.0 OK\r\n")]

    def _quit(self, argument: bytes | None) -> list[PreAuthEvent]:
        return self._hang_up(b"221 2.0.0 Bye\r\n")

    def _starttls(self, argument: bytes | None) -> list[PreAuthEvent]:
        if argument is not None and argument.strip(b" "):
            return self._bad(b"501 5.5.4 Syntax: STARTTLS\r\n")
        if self._tls_active:
            return self._bad(b"503 5.5.1 TLS already active\r\n")
        if not self._starttls_offered:
            return self._bad(b"502 5.5.1 STARTTLS not available\r\n")
        return self._start_tls(b"220 2.0.0 Ready to start TLS\r\n")

    def _auth(self, argument: bytes | None) -> list[PreAuthEvent]:
        words = argument.split(b" ") if argument is not None else []
        if not 1 <= len(words) <= 2 or not all(words):
            return self._bad(b"501 5.5.4 Syntax: AUTH mechanism [initial-response]\r\n")
        if self.client_helo is None:
            return self._bad(b"503 5.5.1 Send EHLO first\r\n")
        initial_response = words[1] if len(words) == 2 else None
        return self._start_sasl(words[0].decode("ascii", "replace"), initial_response)

    #: The commands it answers (a class-level table: see :class:`LinePreAuth`).
    _HANDLERS: ClassVar[dict[bytes, Callable[[SubmissionPreAuth, bytes | None],
                                             list[PreAuthEvent]]]] = {
        b"EHLO": _ehlo,
        b"HELO": _helo,
        b"NOOP": _noop,
        b"RSET": _rset,
        b"QUIT": _quit,
        b"STARTTLS": _starttls,
        b"AUTH": _auth,
    }


# --- the backend side ---------------------------------------------------------------------


class _Step(Enum):
    """The command of stalroute's own that the dialogue has out."""

    EHLO = "EHLO"
    STARTTLS = "STARTTLS"
    XCLIENT = "XCLIENT"


class SubmissionBackendDialogue(LineDialogue[_Step]):
    """The submission client dialogue toward a backend, up to the replayed login's outcome."""

    def __init__(self, settings: BackendSettings) -> None:
        super().__init__(settings)
        self._reader = ReplyReader()
        self._keywords: dict[str, tuple[bytes, ...]] | None = None
        self._forwarded = False
        name = settings.ehlo_name.encode("utf-8", "replace")
        self._ehlo_name = name if _HELO_NAME.fullmatch(name) else b"localhost"

    @property
    def offered(self) -> Offer | None:
        if self._keywords is None:
            return None
        mechanisms = self._keywords.get("AUTH", ())
        return {"ehlo": frozenset(keyword for keyword in self._keywords if keyword != "AUTH"),
                "sasl": frozenset(m.decode("ascii", "replace").upper() for m in mechanisms)}

    # -- plumbing

    def _feed(self, data: bytes) -> None:
        self._reader.feed(data)

    def _next(self) -> SMTPReply | None:
        return self._reader.next_reply()

    def _take_rest(self) -> bytes:
        return self._reader.take_all()

    def _ehlo(self) -> list[BackendEvent]:
        self._keywords = None
        return self._send(b"EHLO " + self._ehlo_name, _Step.EHLO)

    # -- establishment

    def _next_step(self) -> list[BackendEvent]:
        """(after each EHLO) STARTTLS → XCLIENT → ready."""
        keywords = self._keywords
        assert keywords is not None
        if self._starttls_needed:
            if "STARTTLS" not in keywords:
                return self._fail("backend does not offer STARTTLS")
            return self._send(b"STARTTLS", _Step.STARTTLS)
        forwarding = self.settings.forwarding
        if forwarding is not None and not self._forwarded and "XCLIENT" in keywords:
            advertised = [name.decode("ascii", "replace") for name in keywords["XCLIENT"]]
            command = xclient_command(forwarding, advertised, smtp=True,
                                      helo=self._ehlo_name.decode("ascii"), proto="ESMTP")
            if command is not None:
                self._forwarded = True
                return self._send(command, _Step.XCLIENT)
        if "AUTH" not in keywords:
            return self._fail("backend does not offer AUTH")
        return self._ready()

    def _after_tls(self) -> list[BackendEvent]:
        return self._ehlo()  # RFC 3207 §4.2: knowledge from before TLS is discarded

    def _handle(self, response: object) -> list[BackendEvent]:
        assert isinstance(response, SMTPReply)
        reply = response
        if self._state is Stage.LOGIN:
            return self._handle_login(reply)
        if self._state is Stage.GREETING:
            if reply.code != 220:
                return self._fail("backend refused the connection")
            return self._ehlo()
        if self._state is _Step.EHLO:
            if reply.code != 250:
                return self._fail("backend refused EHLO")
            self._keywords = ehlo_keywords(reply)
            return self._next_step()
        if self._state is _Step.STARTTLS:
            if reply.code != 220:
                return self._fail("backend refused STARTTLS")
            return self._handshake()
        if self._state is _Step.XCLIENT:
            # Postfix answers with a fresh 220 greeting (older versions 250): EHLO again.
            if reply.code not in (220, 250):
                return self._fail("backend refused XCLIENT")
            return self._ehlo()
        return self._fail("unexpected response from backend")

    # -- the login

    def _replay(self, credentials: Credentials, context: object) -> list[BackendEvent]:
        mechanism = credentials.mechanism.encode("ascii")
        response = encode_base64(credentials.response)
        command = b"AUTH " + mechanism + b" " + response
        if len(command) + 2 > MAX_AUTH_COMMAND:
            command = b"AUTH " + mechanism
            self._owed_response = response
        return self._send(command, Stage.LOGIN)

    def _handle_login(self, reply: SMTPReply) -> list[BackendEvent]:
        if reply.code == 334:
            owed = self._challenged()
            return [BackendSend((owed if owed is not None else b"*") + b"\r\n")]
        if reply.code == 235:
            return self._outcome(True, AUTH_SUCCEEDED, HIDDEN_FAILURE)
        if reply.code == 421:  # the backend is closing: a temporary failure, not a refusal
            return self._fail("backend closed the session")
        if reply.code >= 400:
            return self._outcome(False, reply.raw, HIDDEN_FAILURE)
        return self._fail("unexpected response from backend")


#: Submission as the shared pipeline (``stalroute.session``, ``stalroute.backend``) runs it.
SPEC = ProtocolSpec("submission", SubmissionPreAuth, SubmissionBackendDialogue,
                    CapabilityRules(SubmissionCapabilities.from_config, learnt=("sasl", "ehlo"),
                                    fallback=FALLBACK, managed=managed))
