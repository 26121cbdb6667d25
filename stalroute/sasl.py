"""Server-side SASL decoding for the mechanisms stalroute routes on (SPEC §3, §4). Sans-IO.

stalroute never checks a password or a token: the backend is the authority.  It only needs
the account to route on and a well-formed initial response to replay at the backend, so the
decoders here are strict about structure and encoding and lenient about nothing else.
Nothing in this module ever puts a secret into an exception message or a repr.
"""

from __future__ import annotations

import binascii
import re
from dataclasses import dataclass
from typing import Callable

MECHANISMS = ("PLAIN", "LOGIN", "OAUTHBEARER", "XOAUTH2")
#: Mechanisms that carry a reusable password, allowed only over TLS (or by override).
CLEARTEXT_MECHANISMS = frozenset({"PLAIN", "LOGIN"})

#: Longest base64 text accepted for one SASL response; large enough for any real JWT.
MAX_ENCODED_RESPONSE = 64 * 1024

#: base64 of "Username:" and "Password:", the de-facto LOGIN prompts.
LOGIN_USERNAME_PROMPT = b"VXNlcm5hbWU6"
LOGIN_PASSWORD_PROMPT = b"UGFzc3dvcmQ6"


class SASLError(ValueError):
    """Malformed or unusable SASL input.  The message is safe to show to the client."""


class SASLAborted(SASLError):
    """The client cancelled the exchange with ``*``."""

    def __init__(self) -> None:
        super().__init__("Authentication aborted")


@dataclass(frozen=True, repr=False)
class Credentials:
    """A login as stalroute replays it at the backend.

    ``response`` is the decoded initial response (for PLAIN ``authzid\\0authcid\\0password``)
    and is the only place a password lives; ``__repr__`` therefore leaves it out.
    """

    mechanism: str  # PLAIN, OAUTHBEARER or XOAUTH2 (LOGIN is rebuilt as PLAIN)
    response: bytes
    login: str | None = None  # PLAIN authcid / OAUTHBEARER a= / XOAUTH2 user=
    token: str | None = None  # the bearer token of the OAuth mechanisms

    def __repr__(self) -> str:
        return f"Credentials(mechanism={self.mechanism!r}, login={self.login!r})"


# --- helpers shared by the decoders -----------------------------------------------------


def decode_base64(text: bytes) -> bytes:
    """Decode a SASL response strictly: canonical base64 only, ``=`` alone meaning empty.

    Strictness matters because the decoded bytes are replayed: a lenient decoder could turn
    junk into a different login than the one the client meant.
    """
    if len(text) > MAX_ENCODED_RESPONSE:
        raise SASLError("SASL response too long")
    if text == b"=":
        return b""
    try:
        decoded = binascii.a2b_base64(text, strict_mode=True)
    except binascii.Error:
        raise SASLError("Invalid base64 data") from None
    if binascii.b2a_base64(decoded, newline=False) != text:
        raise SASLError("Invalid base64 data")
    return decoded


def encode_base64(data: bytes) -> bytes:
    """Encode a SASL response for the wire (``=`` for an empty initial response)."""
    return binascii.b2a_base64(data, newline=False) if data else b"="


def _utf8(raw: bytes, field: str) -> str:
    """Decode one credential field; the error names the field, never its value."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SASLError(f"{field} is not valid UTF-8") from None


# --- PLAIN (RFC 4616) ---------------------------------------------------------------------


def plain_credentials(authcid: str, password: str, authzid: str = "") -> Credentials:
    """Build PLAIN credentials; IMAP LOGIN, POP3 USER/PASS and SASL LOGIN are replayed so."""
    if not authcid or not password:
        raise SASLError("Empty user name or password")
    if "\0" in authcid or "\0" in password or "\0" in authzid:
        raise SASLError("NUL character in credentials")
    try:
        response = b"\0".join(part.encode("utf-8") for part in (authzid, authcid, password))
    except UnicodeEncodeError:
        raise SASLError("Credentials are not valid UTF-8") from None
    return Credentials("PLAIN", response, login=authcid)


def decode_plain(data: bytes) -> Credentials:
    """Decode a PLAIN response: exactly ``authzid NUL authcid NUL password``."""
    fields = data.split(b"\0")
    if len(fields) != 3:
        raise SASLError("PLAIN response must have three NUL-separated fields")
    authzid, authcid, password = fields
    _utf8(authzid, "authorization identity")
    login = _utf8(authcid, "user name")
    _utf8(password, "password")
    if not authcid or not password:
        raise SASLError("Empty user name or password")
    return Credentials("PLAIN", data, login=login)


# --- OAUTHBEARER (RFC 7628) and XOAUTH2 ---------------------------------------------------

_KEY = re.compile(rb"[A-Za-z]+")
_SASLNAME = re.compile(rb"(?:[^=,]|=2C|=3D)+")
_TOKEN_FORBIDDEN = re.compile(r"[\x00-\x20\x7f]")


def _kvpairs(block: bytes) -> dict[str, str]:
    """Parse ``*(key=value ^A) ^A``, the key/value list both OAuth mechanisms end with."""
    if not block.endswith(b"\x01"):
        raise SASLError("Malformed OAuth response")
    body = block[:-1]
    if not body:
        return {}
    if not body.endswith(b"\x01"):
        raise SASLError("Malformed OAuth response")
    pairs: dict[str, str] = {}
    for item in body[:-1].split(b"\x01"):
        key, equals, value = item.partition(b"=")
        if not equals or not _KEY.fullmatch(key):
            raise SASLError("Malformed OAuth key/value pair")
        name = key.decode("ascii").lower()
        if name in pairs:
            raise SASLError("Duplicate OAuth key")
        pairs[name] = _utf8(value, "OAuth value")
    return pairs


def _bearer_token(pairs: dict[str, str]) -> str:
    """The token of ``auth=Bearer <token>`` (scheme case-insensitive, as in HTTP)."""
    scheme, _, token = pairs.get("auth", "").partition(" ")
    if scheme.lower() != "bearer" or not token or _TOKEN_FORBIDDEN.search(token):
        raise SASLError("Missing or malformed bearer token")
    return token


def _saslname(raw: bytes) -> str:
    """Undo the ``=2C`` / ``=3D`` escaping of a GS2 authzid (RFC 5801)."""
    if not _SASLNAME.fullmatch(raw):
        raise SASLError("Malformed authorization identity")
    unescaped = raw.replace(b"=2C", b",").replace(b"=3D", b"=")
    return _utf8(unescaped, "authorization identity")


def decode_oauthbearer(data: bytes) -> Credentials:
    """Decode ``n,a=user,^Akey=value^A...auth=Bearer <token>^A^A`` (RFC 7628 §3.1)."""
    parts = data.split(b",", 2)
    if len(parts) != 3:
        raise SASLError("Malformed GS2 header")
    cbind_flag, authzid, rest = parts
    if cbind_flag.startswith(b"p="):
        raise SASLError("Channel binding is not supported")
    if cbind_flag not in (b"n", b"y"):
        raise SASLError("Malformed GS2 header")
    login = None
    if authzid:
        if not authzid.startswith(b"a="):
            raise SASLError("Malformed GS2 header")
        login = _saslname(authzid[2:])
    if not rest.startswith(b"\x01"):
        raise SASLError("Malformed OAuth response")
    token = _bearer_token(_kvpairs(rest[1:]))
    return Credentials("OAUTHBEARER", data, login=login, token=token)


def decode_xoauth2(data: bytes) -> Credentials:
    """Decode Google's ``user=<user>^Aauth=Bearer <token>^A^A`` (``user`` may be absent)."""
    pairs = _kvpairs(data)
    token = _bearer_token(pairs)
    return Credentials("XOAUTH2", data, login=pairs.get("user") or None, token=token)


_DECODERS: dict[str, Callable[[bytes], Credentials]] = {
    "PLAIN": decode_plain,
    "OAUTHBEARER": decode_oauthbearer,
    "XOAUTH2": decode_xoauth2,
}


# --- the exchange -------------------------------------------------------------------------


@dataclass(frozen=True)
class Challenge:
    """A server challenge: base64 text to send after ``+ `` (or the protocol's equivalent)."""

    text: bytes


class SASLExchange:
    """One server-side SASL exchange, independent of the protocol carrying it.

    The first :meth:`step` call takes no argument and processes the initial response given
    to the constructor (base64 text; ``b"="`` is an empty one, None an absent one).  Each
    later call takes the client's next line (base64 text without its line terminator).
    Every mechanism finishes within three steps; calling again afterwards is an error.
    """

    def __init__(self, mechanism: str, initial_response: bytes | None) -> None:
        self.mechanism = mechanism.upper()
        if self.mechanism not in MECHANISMS:
            raise SASLError("Unsupported authentication mechanism")
        self._initial_response = initial_response
        self._started = False
        self._finished = False
        self._username: str | None = None  # LOGIN, between the two prompts

    def step(self, line: bytes | None = None) -> Challenge | Credentials:
        """Advance the exchange: a :class:`Challenge` to send, or the final credentials."""
        if self._finished:
            raise SASLError("Authentication exchange already finished")
        try:
            return self._advance(line)
        except SASLError:
            self._finished = True
            raise

    def _advance(self, line: bytes | None) -> Challenge | Credentials:
        if not self._started:
            if line is not None:
                raise SASLError("Unexpected response before the exchange started")
            self._started = True
            if self._initial_response is None:
                return self._prompt()
            return self._respond(decode_base64(self._initial_response), initial=True)
        if line is None:
            raise SASLError("Missing response")
        if line == b"*":
            raise SASLAborted()
        return self._respond(decode_base64(line), initial=False)

    def _prompt(self) -> Challenge:
        return Challenge(LOGIN_USERNAME_PROMPT if self.mechanism == "LOGIN" else b"")

    def _respond(self, data: bytes, initial: bool) -> Challenge | Credentials:
        if self.mechanism != "LOGIN":
            self._finished = True
            return _DECODERS[self.mechanism](data)
        if self._username is None:
            # An empty LOGIN initial response counts as absent, as in Dovecot.
            if initial and not data:
                return self._prompt()
            if not data:
                raise SASLError("Empty user name or password")
            self._username = _utf8(data, "user name")
            return Challenge(LOGIN_PASSWORD_PROMPT)
        self._finished = True
        return plain_credentials(self._username, _utf8(data, "password"))
