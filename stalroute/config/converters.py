"""Value converters: a TOML value in, the value the rest of the code uses out.

Durations become float seconds, addresses ``(host, port)``, CIDRs :mod:`ipaddress` networks,
paths absolute :class:`~pathlib.Path` objects (relative ones anchored at the configuration
file's directory, so a config and its ``tls/`` folder can be moved together).  Each converter
is a :data:`~stalroute.config.reader.Converter`; the factories (``text()``, ``integer(1)``,
``list_of(...)``) build one for a field's constraints.  :func:`parse_duration` and
:func:`parse_address` are public: ``stalroute-ctl`` and the tests parse the same syntax.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from stalroute.config.reader import Context, Converter, Invalid, kind, show, suggest
from stalroute.net import IPAddress, IPNetwork, is_ip, parse_cidr

T = TypeVar("T")

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_RE = re.compile(r"^\s*(\d+)\s*(ms|s|m|h|d)\s*$")

# --- public value parsers ----------------------------------------------------------------


def parse_duration(text: str) -> float:
    """``"<integer><unit>"`` with unit ``ms s m h d`` → seconds; ``ValueError`` otherwise."""
    if not isinstance(text, str):
        raise ValueError(f'must be a duration string such as "30s", not {kind(text)}')
    match = _DURATION_RE.match(text)
    if not match:
        raise ValueError(
            f'{show(text)} is not a duration (an integer and a unit: ms s m h d, e.g. "30s")'
        )
    return int(match.group(1)) * _DURATION_UNITS[match.group(2)]


def parse_address(text: str) -> tuple[str, int]:
    """``ip:port`` / ``[v6]:port`` → ``(host, port)`` with a normalised IP string."""
    bad = ValueError(f"{show(text)} is not an address (ip:port or [v6]:port)")
    if not isinstance(text, str):
        raise bad
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        version_ok = 6
    else:
        host, sep, port = text.rpartition(":")
        version_ok = 4
    if not sep or not (port.isascii() and port.isdigit()):
        raise bad
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise bad from None
    if ip.version != version_ok:
        raise bad
    number = int(port)
    if number > 65535:
        raise ValueError(f"{show(text)}: port must be between 0 and 65535")
    return str(ip), number


# --- text --------------------------------------------------------------------------------


def text(*, nonempty: bool = True, single_line: bool = True) -> Converter:
    def convert(value: Any, ctx: Context, key: str) -> str:
        if not isinstance(value, str):
            raise Invalid(f"must be a string, not {kind(value)}")
        if nonempty and not value.strip():
            raise Invalid("must not be empty")
        if single_line and any(ch in value for ch in "\r\n\0"):
            raise Invalid("must be a single line (no CR, LF or NUL)")
        return value

    return convert


def word() -> Converter:
    """A non-empty string without whitespace or control characters (names, tokens)."""

    def convert(value: Any, ctx: Context, key: str) -> str:
        string = text()(value, ctx, key)
        if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in string):
            raise Invalid(f"{show(string)} must not contain spaces or control characters")
        return string

    return convert


def protocol_text(base: Converter, pattern: str, expected: str) -> Converter:
    """``base``, then ``pattern`` (printable ASCII) must match whole: for text stalroute puts
    on the wire as it is, where anything else would break the protocol or the greeting."""
    compiled = re.compile(pattern)

    def convert(value: Any, ctx: Context, key: str) -> str:
        string = base(value, ctx, key)
        if not compiled.fullmatch(string):
            raise Invalid(f"{show(string)} is not {expected}")
        return string

    return convert


def secret(value: Any, ctx: Context, key: str) -> str:
    """An inline secret: type-checked, never echoed."""
    if not isinstance(value, str):
        raise Invalid(f"must be a string, not {kind(value)}")
    return value


def url(*schemes: str) -> Converter:
    """A URL with one of ``schemes``; never echoed back, since URLs carry passwords."""

    def convert(value: Any, ctx: Context, key: str) -> str:
        string = text()(value, ctx, key)
        scheme = string.split("://", 1)[0].lower() if "://" in string else ""
        if scheme not in schemes:
            wanted = ", ".join(f"{s}://…" for s in schemes)
            found = f'scheme "{scheme}"' if scheme else "a value without a scheme"
            raise Invalid(f"must be a {wanted} URL, got {found}")
        return string

    return convert


def mailto_url(value: Any, ctx: Context, key: str) -> str:
    """A ``mailto:`` URL with one address (an ACME account contact, RFC 8555 §7.3)."""
    string = word()(value, ctx, key)
    scheme, colon, address = string.partition(":")
    if scheme.lower() != "mailto" or not colon:
        raise Invalid(f'{show(string)} is not a mailto: URL (e.g. "mailto:hostmaster@example.com")')
    local, at, domain = address.partition("@")
    if not (local and at and domain) or "," in address or "?" in address:
        raise Invalid(f"{show(string)} must name one e-mail address (mailto:user@domain)")
    return string


_DNS_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")


def dns_name(value: Any, ctx: Context, key: str) -> str:
    """A DNS name to put in a certificate (lowercased, no trailing dot); ``*.`` allowed
    as the first label."""
    string = word()(value, ctx, key)
    name = string.lower().rstrip(".")
    labels = name.split(".")
    if labels[0] == "*":
        labels = labels[1:]
    if (len(name) > 253 or len(labels) < 1 or not name.isascii()
            or not all(_DNS_LABEL.fullmatch(label) for label in labels)):
        raise Invalid(f"{show(string)} is not a DNS name (letters, digits and hyphens in dot-"
                      "separated labels; write an internationalised name in its xn-- form)")
    if is_ip(name.strip("[]")):
        raise Invalid(f"{show(string)} is an IP address; ACME certificates here name DNS names")
    return name


def regex(value: Any, ctx: Context, key: str) -> re.Pattern[str]:
    """A regular expression whose first capture group is the identifier."""
    string = text(single_line=False)(value, ctx, key)
    try:
        pattern = re.compile(string)
    except re.error as exc:
        raise Invalid(f"{show(string)} is not a valid regular expression: {exc}") from None
    if pattern.groups < 1:
        raise Invalid(f"{show(string)} needs a capture group: the first group is the identifier")
    return pattern


def header_name(value: Any, ctx: Context, key: str) -> str:
    string = text()(value, ctx, key)
    if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", string):
        raise Invalid(f"{show(string)} is not an HTTP header name")
    return string


def sasl_mechanism(known: tuple[str, ...]) -> Converter:
    """One of the ``known`` SASL mechanism names, in any case; stored upper-case."""

    def convert(value: Any, ctx: Context, key: str) -> str:
        string = text()(value, ctx, key)
        if string.upper() not in known:
            raise Invalid(f"{show(string)} is not supported ({', '.join(known)})")
        return string.upper()

    return convert


def sha256_pin(value: Any, ctx: Context, key: str) -> bytes:
    """A SHA-256 certificate fingerprint → its 32 raw digest bytes."""
    string = text()(value, ctx, key)
    digits = string.replace(":", "").strip()
    if len(digits) != 64 or any(ch not in "0123456789abcdefABCDEF" for ch in digits):
        raise Invalid("must be a SHA-256 fingerprint: 64 hex digits, colons allowed")
    return bytes.fromhex(digits)


# --- scalars -----------------------------------------------------------------------------


def boolean(value: Any, ctx: Context, key: str) -> bool:
    if not isinstance(value, bool):
        raise Invalid(f"must be true or false, not {kind(value)}")
    return value


def integer(minimum: int | None = None, maximum: int | None = None) -> Converter:
    def convert(value: Any, ctx: Context, key: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise Invalid(f"must be an integer, not {kind(value)}")
        if minimum is not None and value < minimum:
            raise Invalid(f"must be at least {minimum}, not {value}")
        if maximum is not None and value > maximum:
            raise Invalid(f"must be at most {maximum}, not {value}")
        return value

    return convert


def duration(*, positive: bool = False) -> Converter:
    def convert(value: Any, ctx: Context, key: str) -> float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            example = f"{value}s" if isinstance(value, int) else "30s"
            raise Invalid(
                f'must be a duration string with a unit (ms s m h d), e.g. "{example}"; '
                "a bare number is ambiguous"
            )
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            raise Invalid(str(exc)) from None
        if positive and seconds <= 0:
            raise Invalid("must be greater than zero")
        return seconds

    return convert


def choice(*choices: Any) -> Converter:
    """One of ``choices``, of the same TOML type (``2`` is not ``"2"``)."""

    def convert(value: Any, ctx: Context, key: str) -> Any:
        if value in choices and type(value) is type(choices[0]):
            return value
        listed = ", ".join(show(c) for c in choices)
        if not isinstance(value, (str, int)) or isinstance(value, bool):
            raise Invalid(f"must be one of {listed}, not {kind(value)}")
        hint = suggest(str(value), [str(c) for c in choices], list_all=False)
        raise Invalid(f"{show(value)} is not one of {listed}{hint}")

    return convert


def min_version(value: Any, ctx: Context, key: str) -> str:
    """A TLS version, ``"1.2"`` or ``"1.3"`` (as a string: TOML's 1.2 is a float)."""
    if isinstance(value, float) and value in (1.2, 1.3):
        raise Invalid(f'must be the string "{value}", not a number')
    version: str = choice("1.2", "1.3")(value, ctx, key)
    return version


# --- network -----------------------------------------------------------------------------


def _parsed(value: Any, parse: Callable[[str], T], expected: str = "a string") -> T:
    """``parse(value)`` for a string value; its ValueError (or the wrong type) as Invalid."""
    if not isinstance(value, str):
        raise Invalid(f"must be {expected}, not {kind(value)}")
    try:
        return parse(value)
    except ValueError as exc:
        raise Invalid(str(exc)) from None


def address(value: Any, ctx: Context, key: str) -> tuple[str, int]:
    return _parsed(value, parse_address, "a string ip:port")


def cidr(value: Any, ctx: Context, key: str) -> IPNetwork:
    return _parsed(value, parse_cidr)


def ip(value: Any, ctx: Context, key: str) -> IPAddress:
    def parse(text: str) -> IPAddress:
        try:
            return ipaddress.ip_address(text.strip("[]"))
        except ValueError:
            raise ValueError(f"{show(text)} is not an IP address") from None

    return _parsed(value, parse)


# --- containers and files ----------------------------------------------------------------


def list_of(item: Converter, *, nonempty: bool = False, unique: bool = False) -> Converter:
    """An array whose items are converted one by one; each bad item is reported at ``key[i]``."""

    def convert(value: Any, ctx: Context, key: str) -> tuple[Any, ...]:
        if not isinstance(value, list):
            raise Invalid(f"must be an array, not {kind(value)}")
        if nonempty and not value:
            raise Invalid("must not be empty")
        out: list[Any] = []
        for index, raw in enumerate(value):
            item_key = f"{key}[{index}]"
            try:
                converted = item(raw, ctx, item_key)
            except Invalid as exc:
                ctx.error(item_key, exc.message)
                continue
            if unique and converted in out:
                ctx.error(item_key, f"{show(raw)} is listed twice")
                continue
            out.append(converted)
        return tuple(out)

    return convert


def directory(value: Any, ctx: Context, key: str) -> Path:
    """A directory path, relative ones taken from the config's directory; not checked (it is
    created when first needed)."""
    string = text()(value, ctx, key)
    resolved = Path(string)
    return resolved if resolved.is_absolute() else ctx.base_dir / resolved


def path(value: Any, ctx: Context, key: str) -> Path:
    """A file path, relative ones taken from the config's directory; must exist when checked."""
    string = text()(value, ctx, key)
    resolved = Path(string)
    if not resolved.is_absolute():
        resolved = ctx.base_dir / resolved
    if ctx.check_files:
        shown = (show(string) if str(resolved) == string
                 else f"{show(string)} (resolved to {resolved})")
        try:
            exists, regular = resolved.exists(), resolved.is_file()
        except OSError as exc:  # a name over 255 bytes, a path too long for the system
            raise Invalid(f"{shown} cannot be used: {exc.strerror or exc}") from None
        if not exists:
            raise Invalid(f"{shown} does not exist")
        if not regular:
            raise Invalid(f"{shown} is not a regular file")
        if not os.access(resolved, os.R_OK):
            raise Invalid(f"{shown} is not readable")
    return resolved
