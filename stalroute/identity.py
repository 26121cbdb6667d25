"""Which account a login belongs to (SPEC §3 step 5, §4).

Credentials give a login or a bearer token; this module turns either into the identifier the
router looks up.  Tokens are decoded without any signature check: stalroute only routes, the
backend remains the authority on whether the token is valid.  None of these functions raise
on hostile input except :func:`routing_identifier` / :func:`normalize_identifier`, whose
:exc:`InvalidIdentifier` the pipeline turns into a temporary failure.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import unicodedata
from typing import Sequence

from stalroute.sasl import Credentials

#: Longest bearer token inspected; anything larger is not decoded at all.
MAX_TOKEN_LENGTH = 64 * 1024
#: Longest routing identifier; mapping stores and XCLIENT/ID never see anything longer.
MAX_IDENTIFIER_LENGTH = 512

STALWART_TOKEN_PREFIX = "sw1."
#: JWT claims tried after the configured one, in order.
JWT_FALLBACK_CLAIMS = ("email", "preferred_username", "upn", "unique_name", "sub")

_BASE64URL = re.compile(r"[A-Za-z0-9_-]*")
_FORBIDDEN_PUNCTUATION = frozenset("\"'\\")


class InvalidIdentifier(ValueError):
    """An identifier that must not be routed on (nor injected into XCLIENT/ID)."""


def account_from_credentials(creds: Credentials, jwt_username_claim: str = "email") -> str | None:
    """The account a login names, before master-user stripping and normalization."""
    if creds.mechanism == "PLAIN":
        return creds.login
    if creds.mechanism == "OAUTHBEARER" and creds.login and "@" in creds.login:
        return creds.login
    if creds.mechanism == "XOAUTH2" and creds.login:
        return creds.login
    if creds.token:
        return account_from_token(creds.token, jwt_username_claim)
    return None


def account_from_token(token: str, jwt_username_claim: str) -> str | None:
    """The account a bearer token was issued to, or None when it does not say."""
    if len(token) > MAX_TOKEN_LENGTH:
        return None
    if token.startswith(STALWART_TOKEN_PREFIX):
        # sw1.<body>.<footer>: the body holds no dot, the footer is the address.
        _body, dot, footer = token[len(STALWART_TOKEN_PREFIX):].partition(".")
        decoded = _base64url(footer) if dot else None
        if not decoded:
            return None
        try:
            return decoded.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return _account_from_jwt(token, jwt_username_claim)


def _account_from_jwt(token: str, jwt_username_claim: str) -> str | None:
    segments = token.split(".")
    if len(segments) < 2:
        return None
    payload_bytes = _base64url(segments[1])
    if payload_bytes is None:
        return None
    try:
        payload = json.loads(payload_bytes)
    except (ValueError, RecursionError):
        return None
    if not isinstance(payload, dict):
        return None
    for claim in dict.fromkeys((jwt_username_claim, *JWT_FALLBACK_CLAIMS)):
        value = payload.get(claim)
        if isinstance(value, str) and "@" in value:
            return value
    return None


def _base64url(text: str) -> bytes | None:
    """Decode unpadded (or padded) base64url; None for anything else."""
    unpadded = text.rstrip("=")
    if len(text) - len(unpadded) > 2 or not _BASE64URL.fullmatch(unpadded):
        return None
    if len(unpadded) % 4 == 1:
        return None
    return base64.urlsafe_b64decode(unpadded + "=" * (-len(unpadded) % 4))


def normalize_identifier(identifier: str, normalize: str) -> str:
    """Apply ``[mapping] normalize`` and validate; used for lookups and mapping writes alike."""
    if normalize == "lowercase":
        identifier = identifier.lower()
    elif normalize != "none":
        raise ValueError(f"unknown normalization {normalize!r}")
    if not identifier:
        raise InvalidIdentifier("empty identifier")
    if len(identifier) > MAX_IDENTIFIER_LENGTH:
        raise InvalidIdentifier("identifier too long")
    for char in identifier:
        if char in _FORBIDDEN_PUNCTUATION:
            raise InvalidIdentifier("identifier contains a quote or backslash")
        if char.isspace():
            raise InvalidIdentifier("identifier contains whitespace")
        # Cc control, Cf format, Cs surrogate, Co private use, Cn unassigned.
        if unicodedata.category(char).startswith("C"):
            raise InvalidIdentifier("identifier contains a control character")
    return identifier


def strip_master_user(login: str, separators: Sequence[str]) -> str:
    """``alice%admin`` → ``alice``: cut at the earliest occurrence of any separator."""
    cut = min((login.find(sep) for sep in separators if sep and sep in login), default=-1)
    return login if cut < 0 else login[:cut]


def routing_identifier(login: str, separators: Sequence[str], normalize: str) -> str:
    """The identifier to route ``login`` on (SPEC §3 step 5)."""
    return normalize_identifier(strip_master_user(login, separators), normalize)


def redact(identifier: str) -> str:
    """A log-safe stand-in: a short prefix and a stable hash, e.g. ``ali…#3f2a9c1b``.

    The hash is stable across processes and instances so log lines about one account can be
    correlated; the prefix never shows more than half of the identifier.
    """
    digest = hashlib.sha256(identifier.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    prefix = identifier[: min(3, len(identifier) // 2)]
    printable = "".join(char if char.isprintable() else "?" for char in prefix)
    return f"{printable}…#{digest}"
