"""The configuration schema (SPEC §2): one TOML file → frozen dataclasses, validated up front.

The dataclasses below *are* the schema: every field that carries ``_key(...)`` metadata is a
TOML key of the same name (``from`` is the one exception, spelled ``from_``), its default is
the SPEC default, and its converter turns the TOML value into the Python value the rest of
the code uses (durations → float seconds, addresses → ``(host, port)``, CIDRs →
``ipaddress`` networks, paths → absolute :class:`~pathlib.Path`).

One validator, :func:`parse_config`, walks the document with a small table-driven reader
(:func:`_read`) and collects *every* problem with its TOML key path before refusing, so an
operator fixes a file in one pass.  Unknown keys are errors with a "did you mean" hint,
because the reference product's habit of ignoring typos silently is how a mistyped
``proxy_trusted`` turns into an open relay for forged client addresses.

Relative paths in the file are resolved against the directory of the configuration file (so a
config and its ``tls/`` folder can be moved together); see ``docs/configuration.md``.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import json
import os
import re
import socket
import ssl
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any

from stalroute import sqlparams

__all__ = [
    "AdminConfig",
    "CapabilitiesConfig",
    "CertificateConfig",
    "ClusterConfig",
    "Config",
    "ConfigError",
    "DestinationConfig",
    "DestinationProtocolConfig",
    "FileMappingConfig",
    "HTTPConfig",
    "HTTPExtractConfig",
    "HTTPRouteConfig",
    "ListenerConfig",
    "MappingConfig",
    "OAuthConfig",
    "Problem",
    "ProtocolCapabilities",
    "RedisMappingConfig",
    "RoutingConfig",
    "SQLMappingConfig",
    "SecurityConfig",
    "ServerConfig",
    "TLSConfig",
    "TLSProtocolsConfig",
    "config_path_from_env",
    "ip_in_networks",
    "load_config",
    "openssl_cipher_name",
    "parse_address",
    "parse_cidr",
    "parse_config",
    "parse_duration",
]

# --- vocabulary --------------------------------------------------------------------------

LISTENER_PROTOCOLS = ("imap", "pop3", "managesieve", "submission", "smtp", "lmtp", "http")
#: Protocols whose sessions carry a login (routed per account, SPEC §3).
INTERACTIVE_PROTOCOLS = ("imap", "pop3", "managesieve", "submission", "http")
#: Protocols relayed unparsed to ``routing.smtp_passthrough_destination``.
PASSTHROUGH_PROTOCOLS = ("smtp", "lmtp")
TLS_MODES = ("implicit", "starttls", "plain")
FORWARDING_MODES = ("proxy", "xclient", "none")
SASL_MECHANISMS = ("PLAIN", "LOGIN", "OAUTHBEARER", "XOAUTH2")
LOG_LEVELS = ("trace", "debug", "info", "warn", "warning", "error", "critical")

#: Environment variables, with the reference product's names accepted as aliases.
ENV_CONFIG = ("STALROUTE_CONFIG", "PROXY_CONFIG")
ENV_ADMIN_TOKEN = ("STALROUTE_ADMIN_TOKEN", "PROXY_ADMIN_TOKEN")
ENV_LOG_LEVEL = "STALROUTE_LOG_LEVEL"

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_RE = re.compile(r"^\s*(\d+)\s*(ms|s|m|h|d)\s*$")

#: IANA cipher-suite name → OpenSSL name, for TLS 1.2 and TLS 1.3 suites.  Generated from
#: ``openssl ciphers -stdname ALL`` (OpenSSL 3.0); TLS 1.3 suites keep their IANA names.
IANA_TO_OPENSSL_CIPHERS: dict[str, str] = {
    "TLS_AES_256_GCM_SHA384": "TLS_AES_256_GCM_SHA384",
    "TLS_CHACHA20_POLY1305_SHA256": "TLS_CHACHA20_POLY1305_SHA256",
    "TLS_AES_128_GCM_SHA256": "TLS_AES_128_GCM_SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_DHE_DSS_WITH_AES_256_GCM_SHA384": "DHE-DSS-AES256-GCM-SHA384",
    "TLS_DHE_RSA_WITH_AES_256_GCM_SHA384": "DHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_DHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "DHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CCM_8": "ECDHE-ECDSA-AES256-CCM8",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CCM": "ECDHE-ECDSA-AES256-CCM",
    "TLS_DHE_RSA_WITH_AES_256_CCM_8": "DHE-RSA-AES256-CCM8",
    "TLS_DHE_RSA_WITH_AES_256_CCM": "DHE-RSA-AES256-CCM",
    "TLS_ECDHE_ECDSA_WITH_ARIA_256_GCM_SHA384": "ECDHE-ECDSA-ARIA256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_ARIA_256_GCM_SHA384": "ECDHE-ARIA256-GCM-SHA384",
    "TLS_DHE_DSS_WITH_ARIA_256_GCM_SHA384": "DHE-DSS-ARIA256-GCM-SHA384",
    "TLS_DHE_RSA_WITH_ARIA_256_GCM_SHA384": "DHE-RSA-ARIA256-GCM-SHA384",
    "TLS_DH_anon_WITH_AES_256_GCM_SHA384": "ADH-AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_DHE_DSS_WITH_AES_128_GCM_SHA256": "DHE-DSS-AES128-GCM-SHA256",
    "TLS_DHE_RSA_WITH_AES_128_GCM_SHA256": "DHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8": "ECDHE-ECDSA-AES128-CCM8",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CCM": "ECDHE-ECDSA-AES128-CCM",
    "TLS_DHE_RSA_WITH_AES_128_CCM_8": "DHE-RSA-AES128-CCM8",
    "TLS_DHE_RSA_WITH_AES_128_CCM": "DHE-RSA-AES128-CCM",
    "TLS_ECDHE_ECDSA_WITH_ARIA_128_GCM_SHA256": "ECDHE-ECDSA-ARIA128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_ARIA_128_GCM_SHA256": "ECDHE-ARIA128-GCM-SHA256",
    "TLS_DHE_DSS_WITH_ARIA_128_GCM_SHA256": "DHE-DSS-ARIA128-GCM-SHA256",
    "TLS_DHE_RSA_WITH_ARIA_128_GCM_SHA256": "DHE-RSA-ARIA128-GCM-SHA256",
    "TLS_DH_anon_WITH_AES_128_GCM_SHA256": "ADH-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA384": "ECDHE-ECDSA-AES256-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA384": "ECDHE-RSA-AES256-SHA384",
    "TLS_DHE_RSA_WITH_AES_256_CBC_SHA256": "DHE-RSA-AES256-SHA256",
    "TLS_DHE_DSS_WITH_AES_256_CBC_SHA256": "DHE-DSS-AES256-SHA256",
    "TLS_ECDHE_ECDSA_WITH_CAMELLIA_256_CBC_SHA384": "ECDHE-ECDSA-CAMELLIA256-SHA384",
    "TLS_ECDHE_RSA_WITH_CAMELLIA_256_CBC_SHA384": "ECDHE-RSA-CAMELLIA256-SHA384",
    "TLS_DHE_RSA_WITH_CAMELLIA_256_CBC_SHA256": "DHE-RSA-CAMELLIA256-SHA256",
    "TLS_DHE_DSS_WITH_CAMELLIA_256_CBC_SHA256": "DHE-DSS-CAMELLIA256-SHA256",
    "TLS_DH_anon_WITH_AES_256_CBC_SHA256": "ADH-AES256-SHA256",
    "TLS_DH_anon_WITH_CAMELLIA_256_CBC_SHA256": "ADH-CAMELLIA256-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256": "ECDHE-ECDSA-AES128-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256": "ECDHE-RSA-AES128-SHA256",
    "TLS_DHE_RSA_WITH_AES_128_CBC_SHA256": "DHE-RSA-AES128-SHA256",
    "TLS_DHE_DSS_WITH_AES_128_CBC_SHA256": "DHE-DSS-AES128-SHA256",
    "TLS_ECDHE_ECDSA_WITH_CAMELLIA_128_CBC_SHA256": "ECDHE-ECDSA-CAMELLIA128-SHA256",
    "TLS_ECDHE_RSA_WITH_CAMELLIA_128_CBC_SHA256": "ECDHE-RSA-CAMELLIA128-SHA256",
    "TLS_DHE_RSA_WITH_CAMELLIA_128_CBC_SHA256": "DHE-RSA-CAMELLIA128-SHA256",
    "TLS_DHE_DSS_WITH_CAMELLIA_128_CBC_SHA256": "DHE-DSS-CAMELLIA128-SHA256",
    "TLS_DH_anon_WITH_AES_128_CBC_SHA256": "ADH-AES128-SHA256",
    "TLS_DH_anon_WITH_CAMELLIA_128_CBC_SHA256": "ADH-CAMELLIA128-SHA256",
    "TLS_RSA_PSK_WITH_AES_256_GCM_SHA384": "RSA-PSK-AES256-GCM-SHA384",
    "TLS_DHE_PSK_WITH_AES_256_GCM_SHA384": "DHE-PSK-AES256-GCM-SHA384",
    "TLS_RSA_PSK_WITH_CHACHA20_POLY1305_SHA256": "RSA-PSK-CHACHA20-POLY1305",
    "TLS_DHE_PSK_WITH_CHACHA20_POLY1305_SHA256": "DHE-PSK-CHACHA20-POLY1305",
    "TLS_ECDHE_PSK_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-PSK-CHACHA20-POLY1305",
    "TLS_PSK_DHE_WITH_AES_256_CCM_8": "DHE-PSK-AES256-CCM8",
    "TLS_DHE_PSK_WITH_AES_256_CCM": "DHE-PSK-AES256-CCM",
    "TLS_RSA_PSK_WITH_ARIA_256_GCM_SHA384": "RSA-PSK-ARIA256-GCM-SHA384",
    "TLS_DHE_PSK_WITH_ARIA_256_GCM_SHA384": "DHE-PSK-ARIA256-GCM-SHA384",
    "TLS_RSA_WITH_AES_256_GCM_SHA384": "AES256-GCM-SHA384",
    "TLS_RSA_WITH_AES_256_CCM_8": "AES256-CCM8",
    "TLS_RSA_WITH_AES_256_CCM": "AES256-CCM",
    "TLS_RSA_WITH_ARIA_256_GCM_SHA384": "ARIA256-GCM-SHA384",
    "TLS_PSK_WITH_AES_256_GCM_SHA384": "PSK-AES256-GCM-SHA384",
    "TLS_PSK_WITH_CHACHA20_POLY1305_SHA256": "PSK-CHACHA20-POLY1305",
    "TLS_PSK_WITH_AES_256_CCM_8": "PSK-AES256-CCM8",
    "TLS_PSK_WITH_AES_256_CCM": "PSK-AES256-CCM",
    "TLS_PSK_WITH_ARIA_256_GCM_SHA384": "PSK-ARIA256-GCM-SHA384",
    "TLS_RSA_PSK_WITH_AES_128_GCM_SHA256": "RSA-PSK-AES128-GCM-SHA256",
    "TLS_DHE_PSK_WITH_AES_128_GCM_SHA256": "DHE-PSK-AES128-GCM-SHA256",
    "TLS_PSK_DHE_WITH_AES_128_CCM_8": "DHE-PSK-AES128-CCM8",
    "TLS_DHE_PSK_WITH_AES_128_CCM": "DHE-PSK-AES128-CCM",
    "TLS_RSA_PSK_WITH_ARIA_128_GCM_SHA256": "RSA-PSK-ARIA128-GCM-SHA256",
    "TLS_DHE_PSK_WITH_ARIA_128_GCM_SHA256": "DHE-PSK-ARIA128-GCM-SHA256",
    "TLS_RSA_WITH_AES_128_GCM_SHA256": "AES128-GCM-SHA256",
    "TLS_RSA_WITH_AES_128_CCM_8": "AES128-CCM8",
    "TLS_RSA_WITH_AES_128_CCM": "AES128-CCM",
    "TLS_RSA_WITH_ARIA_128_GCM_SHA256": "ARIA128-GCM-SHA256",
    "TLS_PSK_WITH_AES_128_GCM_SHA256": "PSK-AES128-GCM-SHA256",
    "TLS_PSK_WITH_AES_128_CCM_8": "PSK-AES128-CCM8",
    "TLS_PSK_WITH_AES_128_CCM": "PSK-AES128-CCM",
    "TLS_PSK_WITH_ARIA_128_GCM_SHA256": "PSK-ARIA128-GCM-SHA256",
    "TLS_RSA_WITH_AES_256_CBC_SHA256": "AES256-SHA256",
    "TLS_RSA_WITH_CAMELLIA_256_CBC_SHA256": "CAMELLIA256-SHA256",
    "TLS_RSA_WITH_AES_128_CBC_SHA256": "AES128-SHA256",
    "TLS_RSA_WITH_CAMELLIA_128_CBC_SHA256": "CAMELLIA128-SHA256",
}

# --- problems ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One configuration problem, located by its TOML key path (``listener.imaps.bind[1]``)."""

    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.key}: {self.message}"


class ConfigError(Exception):
    """The configuration is unusable; ``problems`` lists every reason (section by section)."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems: list[Problem] = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class _Invalid(Exception):
    """Raised by a converter: the value at the key being read is wrong for this reason."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass
class _Context:
    """What the validator carries while it walks the document."""

    base_dir: Path
    env: Mapping[str, str]
    check_files: bool
    problems: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)

    def error(self, key: str, message: str) -> None:
        self.problems.append(Problem(key, message))

    def warn(self, key: str, message: str) -> None:
        self.warnings.append(Problem(key, message))


Converter = Callable[[Any, _Context, str], Any]

# --- small formatting helpers ------------------------------------------------------------

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _join(path: str, name: str) -> str:
    """Append a key to a dotted path, quoting it the way TOML would when it is not bare."""
    part = name if _BARE_KEY.match(name) else json.dumps(name)
    return f"{path}.{part}" if path else part


def _show(value: Any) -> str:
    """A value as the operator wrote it in TOML (strings in double quotes)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int, float)):
        return json.dumps(value, ensure_ascii=False)
    return repr(value)


def _kind(value: Any) -> str:
    """A TOML type name for error messages (never the value itself: it may be a secret)."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return "a date/time"


def _suggest(name: str, choices: Iterable[str], *, list_all: bool = True) -> str:
    """`` (did you mean "x"?)`` when a choice is close to ``name``, else the (short) full list."""
    choices = sorted(choices)
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    if close:
        return f' (did you mean "{close[0]}"?)'
    if list_all and choices and len(choices) <= 12:
        return " (expected one of: " + ", ".join(choices) + ")"
    return ""


# --- public value parsers (also used by the admin API and tests) -------------------------


def parse_duration(text: str) -> float:
    """``"<integer><unit>"`` with unit ``ms s m h d`` → seconds; ``ValueError`` otherwise."""
    if not isinstance(text, str):
        raise ValueError(f'must be a duration string such as "30s", not {_kind(text)}')
    match = _DURATION_RE.match(text)
    if not match:
        raise ValueError(
            f'{_show(text)} is not a duration (an integer and a unit: ms s m h d, e.g. "30s")'
        )
    return int(match.group(1)) * _DURATION_UNITS[match.group(2)]


def parse_address(text: str) -> tuple[str, int]:
    """``ip:port`` / ``[v6]:port`` → ``(host, port)`` with a normalised IP string."""
    bad = ValueError(f"{_show(text)} is not an address (ip:port or [v6]:port)")
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
        raise ValueError(f"{_show(text)}: port must be between 0 and 65535")
    return str(ip), number


def parse_cidr(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """``ip`` or ``ip/prefix`` → network; host bits are tolerated (``10.0.0.1/8`` is 10/8)."""
    if not isinstance(text, str):
        raise ValueError(f"must be a string, not {_kind(text)}")
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ValueError(f"{_show(text)} is not an IP address or CIDR (ip or ip/prefix)") from None


def ip_in_networks(ip: Any, networks: Iterable[Any]) -> bool:
    """Whether ``ip`` lies in any of ``networks``.

    An IPv4 network also matches the IPv4-mapped IPv6 form of its addresses
    (``::ffff:10.0.0.1``), which is how a dual-stack socket reports IPv4 peers; the reverse
    (an IPv4 peer against ``::ffff:0:0/96``) holds too.  Unparsable input matches nothing.
    """
    try:
        address = (
            ip
            if isinstance(ip, (ipaddress.IPv4Address, ipaddress.IPv6Address))
            else (ipaddress.ip_address(str(ip).strip("[]").split("%", 1)[0]))
        )
    except ValueError:
        return False
    candidates = [address]
    if address.version == 6 and address.ipv4_mapped is not None:
        candidates.append(address.ipv4_mapped)
    elif address.version == 4:
        candidates.append(ipaddress.IPv6Address(f"::ffff:{address}"))
    for network in networks:
        if isinstance(network, str):
            try:
                network = ipaddress.ip_network(network, strict=False)
            except ValueError:
                continue
        if any(c.version == network.version and c in network for c in candidates):
            return True
    return False


def openssl_cipher_name(name: str) -> str | None:
    """The OpenSSL name of a cipher suite given by IANA or OpenSSL name; ``None`` if unknown."""
    if name in IANA_TO_OPENSSL_CIPHERS:
        return IANA_TO_OPENSSL_CIPHERS[name]
    if name in _known_openssl_ciphers():
        return name
    return None


def _known_openssl_ciphers() -> frozenset[str]:
    """Every suite name the local OpenSSL knows, plus the table's (for OpenSSL-name input)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.set_ciphers("ALL:COMPLEMENTOFALL:@SECLEVEL=0")
    except ssl.SSLError:  # pragma: no cover - exotic OpenSSL builds
        pass
    return frozenset(c["name"] for c in context.get_ciphers()) | frozenset(
        IANA_TO_OPENSSL_CIPHERS.values()
    )


def _default_server_ciphers(min_version: str) -> frozenset[str]:
    """Suites OpenSSL enables by default for a server at ``min_version`` (the removal baseline)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    suites = context.get_ciphers()
    if min_version == "1.3":
        suites = [c for c in suites if c["protocol"] == "TLSv1.3"]
    return frozenset(c["name"] for c in suites)


# --- converters: (value, context, key) → converted value, or raise _Invalid --------------


def _key(conv: Converter, default: Any = MISSING, *, toml: str | None = None, **kw: Any) -> Any:
    """Declare a dataclass field as a TOML key with its converter (and optional TOML name)."""
    metadata = {"conv": conv, "toml": toml}
    if default is MISSING:
        return field(metadata=metadata, **kw)
    return field(default=default, metadata=metadata, **kw)


def _text(*, nonempty: bool = True, single_line: bool = True) -> Converter:
    def convert(value: Any, ctx: _Context, key: str) -> str:
        if not isinstance(value, str):
            raise _Invalid(f"must be a string, not {_kind(value)}")
        if nonempty and not value.strip():
            raise _Invalid("must not be empty")
        if single_line and any(ch in value for ch in "\r\n\0"):
            raise _Invalid("must be a single line (no CR, LF or NUL)")
        return value

    return convert


def _word() -> Converter:
    """A non-empty string without whitespace or control characters (names, tokens)."""

    def convert(value: Any, ctx: _Context, key: str) -> str:
        text = _text()(value, ctx, key)
        if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in text):
            raise _Invalid(f"{_show(text)} must not contain spaces or control characters")
        return text

    return convert


def _protocol_text(base: Converter, pattern: str, expected: str) -> Converter:
    """``base``, then ``pattern`` (printable ASCII) must match whole: for text stalroute puts
    on the wire as it is, where anything else would break the protocol or the greeting."""
    compiled = re.compile(pattern)

    def convert(value: Any, ctx: _Context, key: str) -> str:
        text = base(value, ctx, key)
        if not compiled.fullmatch(text):
            raise _Invalid(f"{_show(text)} is not {expected}")
        return text

    return convert


#: A banner or implementation name: text of printable ASCII, spaces included.
_BANNER = (r"[ -~]*", "printable ASCII text (characters 32 to 126; no accents or tabs)")
#: ``server.hostname``: the name in SMTP greetings and EHLO (RFC 5321 §4.1.2, ASCII only).
_HOSTNAME = (r"[!-~]+", "a printable ASCII host name (write an internationalised name in "
                        "its xn-- form)")
#: ``[capabilities.imap] advertise``: a capability is an IMAP atom (RFC 9051 §9).
_IMAP_CAPABILITY = (r'[^\x00-\x20\x7f-\U0010ffff(){%*"\\\]]+',
                    'an IMAP capability: an atom of printable ASCII without spaces or '
                    '( ) { % * " \\ ]')
#: ``[capabilities.submission] ehlo``: an EHLO keyword (RFC 5321 §4.1.1.1).
_EHLO_KEYWORD = (r"[A-Za-z0-9][A-Za-z0-9-]*",
                 "an EHLO keyword: ASCII letters, digits and hyphens, not starting with a hyphen")
#: ``[capabilities.managesieve] sieve``: a Sieve extension name, sent in a quoted string.
_SIEVE_EXTENSION = (r'[!#-\[\]-~]+', "a Sieve extension name: printable ASCII without spaces, "
                                    "quotes or backslashes")


def _bool(value: Any, ctx: _Context, key: str) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(f"must be true or false, not {_kind(value)}")
    return value


def _int(minimum: int | None = None, maximum: int | None = None) -> Converter:
    def convert(value: Any, ctx: _Context, key: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Invalid(f"must be an integer, not {_kind(value)}")
        if minimum is not None and value < minimum:
            raise _Invalid(f"must be at least {minimum}, not {value}")
        if maximum is not None and value > maximum:
            raise _Invalid(f"must be at most {maximum}, not {value}")
        return value

    return convert


def _duration(*, positive: bool = False) -> Converter:
    def convert(value: Any, ctx: _Context, key: str) -> float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            example = f"{value}s" if isinstance(value, int) else "30s"
            raise _Invalid(
                f'must be a duration string with a unit (ms s m h d), e.g. "{example}"; '
                "a bare number is ambiguous"
            )
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            raise _Invalid(str(exc)) from None
        if positive and seconds <= 0:
            raise _Invalid("must be greater than zero")
        return seconds

    return convert


def _choice(*choices: Any) -> Converter:
    def convert(value: Any, ctx: _Context, key: str) -> Any:
        if value in choices and type(value) is type(choices[0]):
            return value
        listed = ", ".join(_show(c) for c in choices)
        if not isinstance(value, (str, int)) or isinstance(value, bool):
            raise _Invalid(f"must be one of {listed}, not {_kind(value)}")
        hint = _suggest(str(value), [str(c) for c in choices], list_all=False)
        raise _Invalid(f"{_show(value)} is not one of {listed}{hint}")

    return convert


def _address(value: Any, ctx: _Context, key: str) -> tuple[str, int]:
    if not isinstance(value, str):
        raise _Invalid(f"must be a string ip:port, not {_kind(value)}")
    try:
        return parse_address(value)
    except ValueError as exc:
        raise _Invalid(str(exc)) from None


def _cidr(value: Any, ctx: _Context, key: str) -> Any:
    try:
        return parse_cidr(value)
    except ValueError as exc:
        raise _Invalid(str(exc)) from None


def _ip(value: Any, ctx: _Context, key: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if not isinstance(value, str):
        raise _Invalid(f"must be a string, not {_kind(value)}")
    try:
        return ipaddress.ip_address(value.strip("[]"))
    except ValueError:
        raise _Invalid(f"{_show(value)} is not an IP address") from None


def _list(item: Converter, *, nonempty: bool = False, unique: bool = False) -> Converter:
    """An array whose items are converted one by one; each bad item is reported at ``key[i]``."""

    def convert(value: Any, ctx: _Context, key: str) -> tuple[Any, ...]:
        if not isinstance(value, list):
            raise _Invalid(f"must be an array, not {_kind(value)}")
        if nonempty and not value:
            raise _Invalid("must not be empty")
        out: list[Any] = []
        for index, raw in enumerate(value):
            item_key = f"{key}[{index}]"
            try:
                converted = item(raw, ctx, item_key)
            except _Invalid as exc:
                ctx.error(item_key, exc.message)
                continue
            if unique and converted in out:
                ctx.error(item_key, f"{_show(raw)} is listed twice")
                continue
            out.append(converted)
        return tuple(out)

    return convert


def _path(value: Any, ctx: _Context, key: str) -> Path:
    """A file path, relative ones taken from the config's directory; must exist when checked."""
    text = _text()(value, ctx, key)
    path = Path(text)
    if not path.is_absolute():
        path = ctx.base_dir / path
    if ctx.check_files:
        shown = _show(text) if str(path) == text else f"{_show(text)} (resolved to {path})"
        try:
            exists, regular = path.exists(), path.is_file()
        except OSError as exc:  # a name over 255 bytes, a path too long for the system
            raise _Invalid(f"{shown} cannot be used: {exc.strerror or exc}") from None
        if not exists:
            raise _Invalid(f"{shown} does not exist")
        if not regular:
            raise _Invalid(f"{shown} is not a regular file")
        if not os.access(path, os.R_OK):
            raise _Invalid(f"{shown} is not readable")
    return path


def _url(*schemes: str) -> Converter:
    """A URL with one of ``schemes``; never echoed back, since URLs carry passwords."""

    def convert(value: Any, ctx: _Context, key: str) -> str:
        text = _text()(value, ctx, key)
        scheme = text.split("://", 1)[0].lower() if "://" in text else ""
        if scheme not in schemes:
            wanted = ", ".join(f"{s}://…" for s in schemes)
            found = f'scheme "{scheme}"' if scheme else "a value without a scheme"
            raise _Invalid(f"must be a {wanted} URL, got {found}")
        return text

    return convert


def _sql_url(value: Any, ctx: _Context, key: str) -> str:
    text = _text()(value, ctx, key)
    if text.startswith("sqlite://"):
        if not text.startswith("sqlite:///") or len(text) == len("sqlite:///"):
            raise _Invalid("a SQLite URL must be sqlite:///path/to/file.db")
        return text
    return _url("postgresql", "postgres")(text, ctx, key)


def _sha256_pin(value: Any, ctx: _Context, key: str) -> bytes:
    text = _text()(value, ctx, key)
    digits = text.replace(":", "").strip()
    if len(digits) != 64 or any(ch not in "0123456789abcdefABCDEF" for ch in digits):
        raise _Invalid("must be a SHA-256 fingerprint: 64 hex digits, colons allowed")
    return bytes.fromhex(digits)


def _sasl(value: Any, ctx: _Context, key: str) -> str:
    text = _text()(value, ctx, key)
    if text.upper() not in SASL_MECHANISMS:
        raise _Invalid(f"{_show(text)} is not supported ({', '.join(SASL_MECHANISMS)})")
    return text.upper()


def _regex(value: Any, ctx: _Context, key: str) -> re.Pattern[str]:
    text = _text(single_line=False)(value, ctx, key)
    try:
        pattern = re.compile(text)
    except re.error as exc:
        raise _Invalid(f"{_show(text)} is not a valid regular expression: {exc}") from None
    if pattern.groups < 1:
        raise _Invalid(f"{_show(text)} needs a capture group: the first group is the identifier")
    return pattern


def _header_name(value: Any, ctx: _Context, key: str) -> str:
    text = _text()(value, ctx, key)
    if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", text):
        raise _Invalid(f"{_show(text)} is not an HTTP header name")
    return text


def _secret(value: Any, ctx: _Context, key: str) -> str:
    """An inline secret: type-checked, never echoed."""
    if not isinstance(value, str):
        raise _Invalid(f"must be a string, not {_kind(value)}")
    return value


def _min_version(value: Any, ctx: _Context, key: str) -> str:
    if isinstance(value, float) and value in (1.2, 1.3):
        raise _Invalid(f'must be the string "{value}", not a number')
    return _choice("1.2", "1.3")(value, ctx, key)


# --- the schema --------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerConfig:
    """``[server]``: process-wide behaviour (SPEC §2.1)."""

    #: ``None`` in the file means ``socket.getfqdn()``, filled in by the validator.
    hostname: str = _key(_protocol_text(_word(), *_HOSTNAME), None)
    shutdown_grace: float = _key(_duration(), 30.0)
    bridge_idle: float = _key(_duration(positive=True), 1800.0)
    backend_timeout: float = _key(_duration(positive=True), 10.0)
    backend_connect_retries: int = _key(_int(0, 100), 1)
    host_down_threshold: int = _key(_int(0), 5)
    host_down_min_clients: int = _key(_int(1), 2)
    host_down_cooldown: float = _key(_duration(positive=True), 30.0)
    proxy_ttl: int = _key(_int(1, 255), 7)
    log_level: str = _key(_choice(*LOG_LEVELS), "info")
    #: ``json``: one flat JSON object per line (:func:`stalroute.logs.event_as_json`).
    log_format: str = _key(_choice("text", "json"), "text")
    workers: int = _key(_int(1, 1024), 1)
    #: Accepted for the reference format; stalroute's parallelism is ``workers``.
    threads: int = _key(_int(0), 0)


@dataclass(frozen=True)
class CertificateConfig:
    """``[tls.certificate.<name>]``: one inbound certificate, chosen by SNI (SPEC §2.2).

    ``subjects`` is stored lowercased with ``*.`` removed (``*.example.com`` → ``example.com``);
    empty means "the leaf's DNS SANs, else its CN", which the TLS module reads from the file.
    """

    name: str
    cert: Path = _key(_path)
    key: Path = _key(_path)
    subjects: tuple[str, ...] = _key(_list(_word()), ())
    default: bool = _key(_bool, False)


@dataclass(frozen=True)
class TLSProtocolsConfig:
    """``[tls.protocols]``.  ``disable_cipher_suites`` holds OpenSSL names (translated)."""

    min_version: str = _key(_min_version, "1.2")
    ignore_client_order: bool = _key(_bool, False)
    disable_cipher_suites: tuple[str, ...] = _key(_list(_word(), unique=True), ())


@dataclass(frozen=True)
class TLSConfig:
    """``[tls]``: inbound TLS certificates (by name) and protocol settings."""

    certificates: dict[str, CertificateConfig] = field(default_factory=dict)
    protocols: TLSProtocolsConfig = field(default_factory=TLSProtocolsConfig)


@dataclass(frozen=True)
class ListenerConfig:
    """``[listener.<name>]``: one public port set (SPEC §2.3)."""

    name: str
    protocol: str = _key(_choice(*LISTENER_PROTOCOLS))
    bind: tuple[tuple[str, int], ...] = _key(_list(_address, nonempty=True, unique=True))
    tls: str = _key(_choice(*TLS_MODES))
    proxy_protocol: str = _key(_choice("off", "optional", "required", "deferred"), "off")
    proxy_trusted: tuple[Any, ...] = _key(_list(_cidr), ())
    proxy_header_timeout: float = _key(_duration(positive=True), 5.0)
    max_connections: int = _key(_int(1), 8192)
    max_connections_per_ip: int = _key(_int(0), 0)
    preauth_timeout: float = _key(_duration(positive=True), 30.0)
    max_auth_attempts: int = _key(_int(1), 3)
    forwarded: str = _key(_choice("off", "trust"), "off")


DEFAULT_BANNER = "stalroute ready"
DEFAULT_IMAP_ADVERTISE = (
    "IMAP4rev2",
    "IMAP4rev1",
    "ENABLE",
    "SASL-IR",
    "LITERAL+",
    "ID",
    "UTF8=ACCEPT",
)
DEFAULT_SUBMISSION_EHLO = (
    "ENHANCEDSTATUSCODES",
    "8BITMIME",
    "SMTPUTF8",
    "PIPELINING",
    "CHUNKING",
    "SIZE",
)
DEFAULT_SIEVE_EXTENSIONS = (
    "fileinto",
    "reject",
    "envelope",
    "encoded-character",
    "vacation",
    "vacation-seconds",
    "subaddress",
    "comparator-i;ascii-numeric",
    "relational",
    "regex",
    "imap4flags",
    "copy",
    "include",
    "variables",
    "body",
    "enotify",
    "environment",
    "mailbox",
    "date",
    "index",
    "ihave",
    "duplicate",
    "mime",
    "foreverypart",
    "extracttext",
    "editheader",
)


@dataclass(frozen=True)
class ProtocolCapabilities:
    """``[capabilities.<proto>]``: what stalroute itself announces before login (SPEC §2.4).

    Every protocol has ``sasl``, ``allow_plain_auth_without_tls`` and ``banner``; only IMAP
    accepts ``advertise``, only submission ``ehlo``, only ManageSieve ``sieve`` and
    ``implementation`` (the others keep the empty defaults).
    """

    sasl: tuple[str, ...] = _key(_list(_sasl, unique=True), SASL_MECHANISMS)
    allow_plain_auth_without_tls: bool = _key(_bool, False)
    banner: str = _key(_protocol_text(_text(nonempty=False), *_BANNER), DEFAULT_BANNER)
    advertise: tuple[str, ...] = _key(
        _list(_protocol_text(_word(), *_IMAP_CAPABILITY), unique=True), ())
    ehlo: tuple[str, ...] = _key(_list(_protocol_text(_word(), *_EHLO_KEYWORD), unique=True), ())
    sieve: tuple[str, ...] = _key(
        _list(_protocol_text(_word(), *_SIEVE_EXTENSION), unique=True), ())
    implementation: str = _key(_protocol_text(_text(), *_BANNER), "")
    #: The keys set in the TOML file: a list given there is advertised as written, the
    #: others only as far as the destinations honour them (:mod:`stalroute.capabilities`).
    explicit: frozenset[str] = frozenset()


_CAPABILITY_KEYS = {
    "imap": ("advertise",),
    "pop3": (),
    "submission": ("ehlo",),
    "managesieve": ("sieve", "implementation"),
}
_CAPABILITY_DEFAULTS: dict[str, dict[str, Any]] = {
    "imap": {"advertise": DEFAULT_IMAP_ADVERTISE},
    "pop3": {},
    "submission": {"ehlo": DEFAULT_SUBMISSION_EHLO},
    "managesieve": {"sieve": DEFAULT_SIEVE_EXTENSIONS, "implementation": "stalroute"},
}


def _default_capabilities(protocol: str) -> ProtocolCapabilities:
    return ProtocolCapabilities(**_CAPABILITY_DEFAULTS[protocol])


@dataclass(frozen=True)
class CapabilitiesConfig:
    """``[capabilities.*]`` for the four protocols stalroute answers before login."""

    imap: ProtocolCapabilities = field(default_factory=lambda: _default_capabilities("imap"))
    pop3: ProtocolCapabilities = field(default_factory=lambda: _default_capabilities("pop3"))
    submission: ProtocolCapabilities = field(
        default_factory=lambda: _default_capabilities("submission")
    )
    managesieve: ProtocolCapabilities = field(
        default_factory=lambda: _default_capabilities("managesieve")
    )

    def for_protocol(self, protocol: str) -> ProtocolCapabilities:
        """The section of ``protocol``: ``imap``, ``pop3``, ``submission`` or ``managesieve``."""
        return getattr(self, protocol)


@dataclass(frozen=True)
class OAuthConfig:
    """``[oauth]``: how bearer tokens name their account (SPEC §2.5, §4)."""

    jwt_username_claim: str = _key(_word(), "email")


@dataclass(frozen=True)
class DestinationProtocolConfig:
    """``[destination.<name>.protocol.<proto>]``: one backend leg."""

    port: int = _key(_int(1, 65535))
    tls: str = _key(_choice(*TLS_MODES))
    forwarding: str | None = _key(_choice(*FORWARDING_MODES), None)


@dataclass(frozen=True)
class DestinationConfig:
    """``[destination.<name>]``: one backend (SPEC §2.6).

    ``tls_server_name`` is resolved (defaults to ``host``), ``forwarding`` is resolved
    (explicit, else ``proxy`` when ``proxy_protocol`` is true, else ``none``), and
    ``tls_pinned_cert_sha256`` holds the 32 raw digest bytes.
    """

    name: str
    host: str = _key(_word())
    tls_server_name: str | None = _key(_word(), None)
    tls_allow_invalid_certs: bool = _key(_bool, False)
    tls_pinned_cert_sha256: bytes | None = _key(_sha256_pin, None)
    tls_ca_file: Path | None = _key(_path, None)
    tls_client_cert: Path | None = _key(_path, None)
    tls_client_key: Path | None = _key(_path, None)
    proxy_protocol: bool = _key(_bool, True)
    forwarding: str = _key(_choice(*FORWARDING_MODES), None)
    proxy_protocol_version: int = _key(_choice(2, 1), 2)
    forwarded: bool = _key(_bool, False)
    allow_plaintext_auth: bool = _key(_bool, False)
    source_ips: tuple[Any, ...] = _key(_list(_ip, unique=True), ())  # ipaddress objects
    hide_auth_errors: bool = _key(_bool, False)
    protocols: dict[str, DestinationProtocolConfig] = field(default_factory=dict)

    @property
    def host_is_ip(self) -> bool:
        return _is_ip(self.host)

    def forwarding_for(self, protocol: str) -> str:
        """How the client's address is announced on this destination's ``protocol`` leg."""
        leg = self.protocols.get(protocol)
        if leg is not None and leg.forwarding is not None:
            return leg.forwarding
        return self.forwarding


@dataclass(frozen=True)
class RoutingConfig:
    """``[routing]`` (SPEC §2.7)."""

    default_destination: str = _key(_word())
    smtp_passthrough_destination: str | None = _key(_word(), None)
    master_user_separators: tuple[str, ...] = _key(_list(_word()), ("%",))
    on_store_error: str = _key(_choice("tempfail", "default"), "tempfail")


@dataclass(frozen=True)
class FileMappingConfig:
    """``[mapping.file]``: a TSV of ``identifier destination`` lines."""

    path: Path = _key(_path)


@dataclass(frozen=True)
class SQLMappingConfig:
    """``[mapping.sql]``: PostgreSQL (psycopg2) or SQLite (stdlib) lookups and writes."""

    url: str = _key(_sql_url, repr=False)
    query: str = _key(_text(single_line=False))
    upsert_query: str | None = _key(_text(single_line=False), None)
    delete_query: str | None = _key(_text(single_line=False), None)
    pool_size: int = _key(_int(1, 1024), 16)
    #: [ext] No parameters; rows of ``identifier, destination`` (the admin API's export).
    list_query: str | None = _key(_text(single_line=False), None)

    @property
    def writable(self) -> bool:
        """Writes through the admin API need both statements (otherwise they answer 501)."""
        return bool(self.upsert_query) and bool(self.delete_query)

    @property
    def backend(self) -> str:
        """``"sqlite"`` or ``"postgresql"``, from the URL scheme."""
        return "sqlite" if self.url.startswith("sqlite:") else "postgresql"

    @property
    def sqlite_path(self) -> str | None:
        """The database file of a ``sqlite:///path`` URL (``:memory:`` kept as is)."""
        if self.backend != "sqlite":
            return None
        rest = self.url[len("sqlite://") :]
        return ":memory:" if rest == "/:memory:" else rest


@dataclass(frozen=True)
class RedisMappingConfig:
    """``[mapping.redis]``: ``GET``/``SET``/``DEL`` of ``key_prefix + identifier``."""

    url: str = _key(_url("redis", "rediss"), repr=False)
    key_prefix: str = _key(_text(nonempty=False), "route:")
    pool_size: int = _key(_int(1, 1024), 16)


@dataclass(frozen=True)
class MappingConfig:
    """``[mapping]`` (SPEC §2.8).  ``source`` is ``file``, ``sql`` or ``redis``.

    ``source = "sqlite"`` in the file is stored as ``sql`` (its ``[mapping.sql] url`` must be a
    ``sqlite:///`` URL): the SQL store serves both engines.
    """

    source: str = _key(_choice("file", "sql", "redis", "sqlite"))
    normalize: str = _key(_choice("none", "lowercase"), "none")
    positive_ttl: float = _key(_duration(), 600.0)
    negative_ttl: float = _key(_duration(), 30.0)
    cache_max_entries: int = _key(_int(1), 1_000_000)
    lookup_timeout: float = _key(_duration(positive=True), 5.0)
    file: FileMappingConfig | None = None
    sql: SQLMappingConfig | None = None
    redis: RedisMappingConfig | None = None

    @property
    def writable(self) -> bool:
        """Whether the admin API may write mappings to this store."""
        if self.source == "sql":
            return self.sql is not None and self.sql.writable
        return True


@dataclass(frozen=True)
class HTTPExtractConfig:
    """``extract = { from = ..., param | header | regex = ... }`` of an HTTP route."""

    from_: str = _key(_choice("authorization", "query", "header", "body"), toml="from")
    param: str | None = _key(_text(), None)
    header: str | None = _key(_header_name, None)
    regex: re.Pattern[str] | None = _key(_regex, None)


_EXTRACT_COMPANION = {"query": "param", "header": "header", "body": "regex", "authorization": None}


@dataclass(frozen=True)
class HTTPRouteConfig:
    """One ``[[http.route]]``.  ``fallback = "default"`` is resolved to the default destination."""

    match: str = _key(_text())
    destination: str | None = _key(_word(), None)
    extract: HTTPExtractConfig | None = None
    fallback: str | None = _key(_word(), None)


@dataclass(frozen=True)
class HTTPConfig:
    """``[http]`` (SPEC §2.9).  Sizes are bytes."""

    max_head_size: int = _key(_int(1024), 64 * 1024)
    keepalive_timeout: float = _key(_duration(positive=True), 75.0)
    max_keepalive_requests: int = _key(_int(1), 1000)
    body_extract_cap: int = _key(_int(0), 64 * 1024)
    health: bool = _key(_bool, True)
    #: Reference-format key: idle limit of a relayed HTTP exchange (its default, 60 s).
    relay_idle: float = _key(_duration(positive=True), 60.0)
    routes: tuple[HTTPRouteConfig, ...] = ()


@dataclass(frozen=True)
class AdminConfig:
    """``[admin]`` (SPEC §2.10).  ``token`` is the resolved bearer token (env > file > inline)."""

    bind: tuple[str, int] = _key(_address)
    tls: str = _key(_choice(*TLS_MODES), "implicit")
    bearer_token_file: Path | None = _key(_path, None)
    bearer_token: str | None = _key(_secret, None, repr=False)
    min_token_len: int = _key(_int(1), 32)
    lockout_threshold: int = _key(_int(1), 5)
    lockout_duration: float = _key(_duration(positive=True), 300.0)
    certificate: str | None = _key(_text(), None)
    token: str | None = field(default=None, repr=False)
    #: Where ``token`` came from: ``"$STALROUTE_ADMIN_TOKEN"``, ``"bearer_token_file"``, ...
    token_source: str | None = None


@dataclass(frozen=True)
class ClusterConfig:
    """[ext] ``[cluster]`` (SPEC §2.11)."""

    node_id: int = _key(_int(1, 2**31 - 1), 1)
    coordinator: str = _key(_choice("none", "redis", "postgresql"), "none")
    url: str | None = _key(_url("redis", "rediss", "postgresql", "postgres"), None, repr=False)


@dataclass(frozen=True)
class SecurityConfig:
    """[ext] ``[security]`` (SPEC §2.12).  A threshold of 0 turns banning off (the default)."""

    allowed_ips: tuple[Any, ...] = _key(_list(_cidr), ())
    auth_fail_ban_threshold: int = _key(_int(0), 0)
    auth_fail_ban_window: float = _key(_duration(), 600.0)
    ban_duration: float = _key(_duration(), 900.0)


@dataclass(frozen=True)
class Config:
    """The whole validated configuration."""

    server: ServerConfig
    tls: TLSConfig
    listeners: dict[str, ListenerConfig]
    capabilities: CapabilitiesConfig
    oauth: OAuthConfig
    destinations: dict[str, DestinationConfig]
    routing: RoutingConfig
    mapping: MappingConfig
    http: HTTPConfig
    admin: AdminConfig | None
    cluster: ClusterConfig
    security: SecurityConfig
    source_path: Path | None = None
    #: Non-fatal findings (``tls_allow_invalid_certs``, self-signed fallback, ...), to log.
    warnings: tuple[Problem, ...] = ()

    @property
    def default_destination(self) -> DestinationConfig:
        return self.destinations[self.routing.default_destination]


# --- the reader --------------------------------------------------------------------------


def _toml_keys(cls: type, only: Iterable[str] | None = None) -> dict[str, dataclasses.Field]:
    """TOML name → dataclass field, for the fields that are TOML keys."""
    keys = {}
    for f in dataclasses.fields(cls):
        if "conv" in f.metadata and (only is None or f.name in only):
            keys[f.metadata["toml"] or f.name] = f
    return keys


def _as_table(ctx: _Context, value: Any, path: str) -> dict[str, Any]:
    if isinstance(value, dict):
        return value
    ctx.error(path, f"must be a table, not {_kind(value)}")
    return {}


def _check_unknown(ctx: _Context, table: dict[str, Any], path: str, known: Iterable[str]) -> None:
    known = list(known)
    for name in table:
        if name not in known:
            ctx.error(_join(path, name), "unknown key" + _suggest(name, known))


def _read(
    ctx: _Context,
    table: Any,
    path: str,
    cls: type,
    *,
    subtables: Iterable[str] = (),
    only: Iterable[str] | None = None,
) -> dict[str, Any]:
    """Read the TOML keys of ``cls`` (or the ``only`` subset) from ``table``; never raise.

    Returns ``{field name: value}`` for every key that is present or required; absent optional
    keys are left out so the dataclass default applies.  A key that fails conversion (or a
    missing required one) is reported and maps to ``None``, so the caller can still build its
    dataclass and keep validating the rest; the collected problems are raised at the end.
    """
    table = _as_table(ctx, table, path)
    keys = _toml_keys(cls, only)
    _check_unknown(ctx, table, path, [*keys, *subtables])
    values: dict[str, Any] = {}
    for toml_name, f in keys.items():
        key = _join(path, toml_name)
        if toml_name in table:
            try:
                values[f.name] = f.metadata["conv"](table[toml_name], ctx, key)
            except _Invalid as exc:
                ctx.error(key, exc.message)
                values[f.name] = None
        elif f.default is MISSING and f.default_factory is MISSING:
            ctx.error(key, "required key is missing")
            values[f.name] = None
    return values


_NAME_CHARS = re.compile(r"^[^\s\x00-\x1f\x7f]+$")


def _named_tables(ctx: _Context, value: Any, path: str) -> dict[str, dict[str, Any]]:
    """``[section.<name>]`` tables: name → table, reporting names and non-table members."""
    out = {}
    for name, table in _as_table(ctx, value, path).items():
        key = _join(path, name)
        if not _NAME_CHARS.match(name):
            ctx.error(key, "names must not contain spaces or control characters")
        if isinstance(table, dict):
            out[name] = table
        else:
            ctx.error(key, f"must be a table, not {_kind(table)}")
    return out


# --- sections ----------------------------------------------------------------------------


def _build_server(ctx: _Context, table: Any) -> ServerConfig:
    values = _read(ctx, table, "server", ServerConfig)
    if values.get("hostname") is None:
        values["hostname"] = socket.getfqdn()
    level = ctx.env.get(ENV_LOG_LEVEL)
    if level:
        try:
            values["log_level"] = _choice(*LOG_LEVELS)(level.strip().lower(), ctx, "")
        except _Invalid as exc:
            ctx.error(f"${ENV_LOG_LEVEL}", exc.message)
    return ServerConfig(**values)


def _build_tls(ctx: _Context, table: Any) -> TLSConfig:
    table = _as_table(ctx, table, "tls")
    _check_unknown(ctx, table, "tls", ["certificate", "protocols"])
    certificates = {}
    named = _named_tables(ctx, table.get("certificate", {}), "tls.certificate")
    for name, cert_table in named.items():
        key = _join("tls.certificate", name)
        values = _read(ctx, cert_table, key, CertificateConfig)
        values["subjects"] = tuple(
            s.lower().rstrip(".").removeprefix("*.") for s in values.get("subjects") or ()
        )
        certificate = CertificateConfig(name=name, **values)
        if ctx.check_files and certificate.cert and certificate.key:
            _check_certificate_pair(
                ctx, _join(key, "cert"), _join(key, "key"), certificate.cert, certificate.key
            )
        certificates[name] = certificate
    defaults = [name for name, c in certificates.items() if c.default]
    if len(defaults) > 1:
        for name in defaults[1:]:
            ctx.error(
                _join(_join("tls.certificate", name), "default"),
                f'only one certificate may be the default (already "{defaults[0]}")',
            )

    protocols_values = _read(ctx, table.get("protocols", {}), "tls.protocols", TLSProtocolsConfig)
    requested = protocols_values.get("disable_cipher_suites")
    if requested:
        protocols_values["disable_cipher_suites"] = _translate_ciphers(
            ctx, requested, protocols_values.get("min_version") or "1.2"
        )
    return TLSConfig(certificates=certificates, protocols=TLSProtocolsConfig(**protocols_values))


def _translate_ciphers(ctx: _Context, names: tuple[str, ...], min_version: str) -> tuple[str, ...]:
    """IANA or OpenSSL names → OpenSSL names; unknown names and removing everything are errors."""
    key = "tls.protocols.disable_cipher_suites"
    translated = []
    for index, name in enumerate(names):
        openssl = openssl_cipher_name(name)
        if openssl is None:
            ctx.error(
                f"{key}[{index}]",
                f"{_show(name)} is not a TLS 1.2/1.3 cipher suite known "
                "to OpenSSL (IANA or OpenSSL name)" + _suggest(name, IANA_TO_OPENSSL_CIPHERS),
            )
        elif openssl not in translated:
            translated.append(openssl)
    baseline = _default_server_ciphers(min_version)
    if baseline and baseline <= set(translated):
        ctx.error(key, f"removes every cipher suite available with TLS {min_version}")
    return tuple(translated)


def _check_certificate_pair(
    ctx: _Context, cert_key: str, key_key: str, cert_path: Path, key_path: Path
) -> None:
    """The PEM chain parses, the key parses, and the key belongs to the leaf."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        chain = x509.load_pem_x509_certificates(cert_path.read_bytes())
    except (ValueError, OSError) as exc:
        ctx.error(cert_key, f"{cert_path} is not a PEM certificate chain ({exc})")
        return
    try:
        private = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except TypeError:
        ctx.error(key_key, f"{key_path} is encrypted; stalroute needs an unencrypted key")
        return
    except Exception as exc:  # noqa: BLE001 - any parse failure is the operator's to fix
        ctx.error(key_key, f"{key_path} is not a PEM private key ({type(exc).__name__})")
        return
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if chain[0].public_key().public_bytes(*spki) != private.public_key().public_bytes(*spki):
        ctx.error(key_key, f"{key_path} does not match the first certificate of {cert_path}")


def _check_ca_file(ctx: _Context, key: str, path: Path) -> None:
    from cryptography import x509

    try:
        x509.load_pem_x509_certificates(path.read_bytes())
    except (ValueError, OSError) as exc:
        ctx.error(key, f"{path} is not a PEM bundle of certificates ({exc})")


def _build_listener(ctx: _Context, name: str, table: dict[str, Any]) -> ListenerConfig:
    key = _join("listener", name)
    values = _read(ctx, table, key, ListenerConfig)
    listener = ListenerConfig(name=name, **values)
    if listener.tls == "starttls" and listener.protocol in (*PASSTHROUGH_PROTOCOLS, "http"):
        reason = (
            "a pass-through listener relays bytes unparsed"
            if listener.protocol != "http"
            else "HTTP has no STARTTLS"
        )
        ctx.error(
            _join(key, "tls"),
            f'{_a(listener.protocol)} listener cannot use "starttls" '
            f'({reason}); use "plain" or "implicit"',
        )
    if (listener.proxy_protocol == "deferred" and listener.protocol in PASSTHROUGH_PROTOCOLS
            and listener.tls != "implicit"):
        ctx.error(
            _join(key, "proxy_protocol"),
            f'"deferred" cannot work for {_a(listener.protocol)} pass-through listener: the '
            "client waits for the backend's greeting, which needs the header first; use "
            '"required" or "optional"',
        )
    if listener.proxy_protocol not in (None, "off") and not listener.proxy_trusted:
        ctx.error(
            _join(key, "proxy_trusted"),
            f'required when proxy_protocol = "{listener.proxy_protocol}": '
            "list the balancer networks allowed to send a PROXY header",
        )
    if listener.forwarded == "trust" and listener.protocol not in (None, "http"):
        ctx.warn(_join(key, "forwarded"), "only HTTP listeners use this setting; ignored")
    return listener


def _build_capabilities(ctx: _Context, table: Any) -> CapabilitiesConfig:
    table = _as_table(ctx, table, "capabilities")
    _check_unknown(ctx, table, "capabilities", _CAPABILITY_KEYS)
    sections = {}
    for protocol, own_keys in _CAPABILITY_KEYS.items():
        only = ("sasl", "allow_plain_auth_without_tls", "banner", *own_keys)
        values = _read(
            ctx,
            table.get(protocol, {}),
            _join("capabilities", protocol),
            ProtocolCapabilities,
            only=only,
        )
        given = {k: v for k, v in values.items() if v is not None}
        sections[protocol] = ProtocolCapabilities(**{**_CAPABILITY_DEFAULTS[protocol], **given},
                                                  explicit=frozenset(given))
    return CapabilitiesConfig(**sections)


def _build_destination(ctx: _Context, name: str, table: dict[str, Any]) -> DestinationConfig:
    key = _join("destination", name)
    values = _read(ctx, table, key, DestinationConfig, subtables=("protocol",))
    protocols = {}
    legs_key = _join(key, "protocol")
    legs = _as_table(ctx, table.get("protocol", {}), legs_key)
    _check_unknown(ctx, legs, legs_key, LISTENER_PROTOCOLS)
    for protocol in LISTENER_PROTOCOLS:
        if protocol in legs:
            leg_key = _join(legs_key, protocol)
            leg = DestinationProtocolConfig(
                **_read(ctx, legs[protocol], leg_key, DestinationProtocolConfig)
            )
            protocols[protocol] = leg
            cleartext = leg.tls == "plain" and protocol in INTERACTIVE_PROTOCOLS
            if cleartext and not values.get("allow_plaintext_auth"):
                ctx.error(
                    _join(leg_key, "tls"),
                    f'"plain" would send {protocol} credentials in cleartext; set '
                    "allow_plaintext_auth = true on the destination to allow it",
                )
            if leg.tls == "starttls" and protocol in PASSTHROUGH_PROTOCOLS:
                ctx.error(
                    _join(leg_key, "tls"),
                    f'{_a(protocol)} pass-through leg cannot use "starttls" (the session is '
                    'relayed unparsed); use "plain" or "implicit"',
                )
    if not protocols:
        ctx.warn(legs_key, "the destination declares no protocol and can receive no traffic")

    host = values.get("host")
    if host and host.startswith("[") and host.endswith("]"):
        values["host"] = host = host[1:-1]
    if host and values.get("tls_server_name") is None:
        uses_tls = any(leg.tls in ("implicit", "starttls") for leg in protocols.values())
        if _is_ip(host) and uses_tls:
            ctx.error(
                _join(key, "tls_server_name"),
                f"required: host {_show(host)} is an IP address and a leg uses TLS, so "
                "there is no name to verify the backend against",
            )
        values["tls_server_name"] = host
    if values.get("forwarding") is None:
        values["forwarding"] = "proxy" if values.get("proxy_protocol", True) else "none"
    if ("tls_client_cert" in table) != ("tls_client_key" in table):
        missing = "tls_client_key" if "tls_client_cert" in table else "tls_client_cert"
        ctx.error(
            _join(key, missing),
            "tls_client_cert and tls_client_key go together: set both or neither",
        )
    elif ctx.check_files and values.get("tls_client_cert") and values.get("tls_client_key"):
        _check_certificate_pair(
            ctx,
            _join(key, "tls_client_cert"),
            _join(key, "tls_client_key"),
            values["tls_client_cert"],
            values["tls_client_key"],
        )
    if ctx.check_files and values.get("tls_ca_file"):
        _check_ca_file(ctx, _join(key, "tls_ca_file"), values["tls_ca_file"])
    if values.get("tls_allow_invalid_certs") and not values.get("tls_pinned_cert_sha256"):
        ctx.warn(
            _join(key, "tls_allow_invalid_certs"),
            "the backend's certificate is not verified; prefer tls_pinned_cert_sha256",
        )
    return DestinationConfig(name=name, protocols=protocols, **values)


def _a(protocol: str) -> str:
    """``"an imap"`` / ``"a pop3"``: the article as the protocol name is spoken."""
    return f"an {protocol}" if protocol in ("imap", "smtp", "lmtp", "http") else f"a {protocol}"


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _build_mapping(ctx: _Context, table: Any) -> MappingConfig:
    table = _as_table(ctx, table, "mapping")
    values = _read(ctx, table, "mapping", MappingConfig, subtables=("file", "sql", "redis"))
    subs: dict[str, Any] = {}
    for sub, cls in (
        ("file", FileMappingConfig),
        ("sql", SQLMappingConfig),
        ("redis", RedisMappingConfig),
    ):
        if sub in table:
            subs[sub] = cls(**_read(ctx, table[sub], f"mapping.{sub}", cls))
    source = values.get("source")
    section = "sql" if source == "sqlite" else source
    if section and section not in subs:
        needs = {"file": "path", "sql": "url and query", "redis": "url"}[section]
        ctx.error(
            f"mapping.{section}",
            f'required when mapping.source = "{source}" (a [mapping.{section}] table with {needs})',
        )
    sql = subs.get("sql")
    if source == "sqlite" and sql is not None and sql.url and sql.backend != "sqlite":
        ctx.error("mapping.sql.url", 'mapping.source = "sqlite" needs a sqlite:///path URL')
    if source == "sqlite":
        values["source"] = "sql"
    if sql is not None and sql.url:
        _check_sql_parameters(ctx, sql)
    if sql is not None and bool(sql.upsert_query) != bool(sql.delete_query):
        ctx.warn(
            "mapping.sql",
            "writes need both upsert_query and delete_query; "
            "the admin API will answer 501 to mapping writes",
        )
    return MappingConfig(**values, **subs)


#: The parameters each ``[mapping.sql]`` statement gets: ``$1`` the first name, …
_SQL_STATEMENT_PARAMETERS = {
    "query": ("identifier",),
    "upsert_query": ("identifier", "destination"),
    "delete_query": ("identifier",),
    "list_query": (),
}


def _check_sql_parameters(ctx: _Context, sql: SQLMappingConfig) -> None:
    """Each statement uses exactly its parameters, written as its engine accepts them."""
    for name, parameters in _SQL_STATEMENT_PARAMETERS.items():
        statement = getattr(sql, name)
        if statement:
            problem = sqlparams.parameter_problem(statement, sql.backend, parameters)
            if problem:
                ctx.error(f"mapping.sql.{name}", problem)


def _build_http(ctx: _Context, table: Any) -> HTTPConfig:
    table = _as_table(ctx, table, "http")
    values = _read(ctx, table, "http", HTTPConfig, subtables=("route",))
    raw_routes = table.get("route", [])
    routes = []
    if not isinstance(raw_routes, list):
        ctx.error("http.route", "must be an array of tables ([[http.route]])")
        raw_routes = []
    for index, raw in enumerate(raw_routes):
        key = f"http.route[{index}]"
        if not isinstance(raw, dict):
            ctx.error(key, f"must be a table, not {_kind(raw)}")
            continue
        route_values = _read(ctx, raw, key, HTTPRouteConfig, subtables=("extract",))
        extract = None
        if "extract" in raw:
            extract = _build_extract(ctx, raw["extract"], f"{key}.extract")
        if route_values.get("destination") and "extract" in raw:
            ctx.error(key, "a route takes either destination or extract, not both")
        elif (
            not route_values.get("destination")
            and "extract" not in raw
            and "destination" not in raw
        ):
            ctx.error(key, 'a route needs destination = "<name>" or extract = { from = ... }')
        if route_values.get("fallback") and "extract" not in raw:
            ctx.warn(_join(key, "fallback"), "only used with extract; ignored")
        routes.append(HTTPRouteConfig(extract=extract, **route_values))
    return HTTPConfig(routes=tuple(routes), **values)


def _build_extract(ctx: _Context, raw: Any, key: str) -> HTTPExtractConfig:
    values = _read(ctx, raw, key, HTTPExtractConfig)
    extract = HTTPExtractConfig(**values)
    source = extract.from_
    if source in _EXTRACT_COMPANION:
        needed = _EXTRACT_COMPANION[source]
        for companion in ("param", "header", "regex"):
            present = isinstance(raw, dict) and companion in raw
            if companion == needed and not present:
                ctx.error(_join(key, companion), f'required with from = "{source}"')
            elif companion != needed and present:
                ctx.error(
                    _join(key, companion),
                    f'not used with from = "{source}"'
                    + (f" (it takes {needed})" if needed else ""),
                )
    return extract


def _build_admin(ctx: _Context, table: Any) -> AdminConfig:
    values = _read(ctx, table, "admin", AdminConfig)
    table = table if isinstance(table, dict) else {}
    if values.get("tls") not in (None, "implicit"):
        ctx.error("admin.tls", 'must be "implicit": the admin API is served over HTTPS only')
    token, source = None, None
    env_name = next((n for n in ENV_ADMIN_TOKEN if ctx.env.get(n)), None)
    if env_name:
        token, source = ctx.env[env_name].strip(), f"${env_name}"
    elif values.get("bearer_token_file") is not None:
        source = "admin.bearer_token_file"
        if ctx.check_files:
            token = _read_token_file(ctx, values["bearer_token_file"])
    elif values.get("bearer_token") is not None:
        token, source = values["bearer_token"].strip(), "admin.bearer_token"
    elif "bearer_token_file" not in table and "bearer_token" not in table:
        ctx.error(
            "admin",
            "no bearer token: set bearer_token_file, bearer_token or $STALROUTE_ADMIN_TOKEN",
        )
    minimum = values.get("min_token_len") or 32
    if token is not None:
        if any(ch.isspace() or ord(ch) < 32 for ch in token):
            ctx.error(source, "the token must not contain spaces or control characters")
        elif len(token) < minimum:
            ctx.error(
                source,
                f"the token has {len(token)} characters; admin.min_token_len "
                f"requires at least {minimum}",
            )
    return AdminConfig(token=token, token_source=source, **values)


def _read_token_file(ctx: _Context, path: Path) -> str | None:
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        ctx.error("admin.bearer_token_file", f"cannot read {path}: {type(exc).__name__}")
        return None
    try:
        if path.stat().st_mode & 0o004:
            ctx.warn("admin.bearer_token_file", f"{path} is readable by every local user")
    except OSError:  # pragma: no cover - raced with a delete
        pass
    return token


def _build_cluster(ctx: _Context, table: Any) -> ClusterConfig:
    cluster = ClusterConfig(**_read(ctx, table, "cluster", ClusterConfig))
    if cluster.coordinator in ("redis", "postgresql"):
        if not cluster.url:
            if not isinstance(table, dict) or "url" not in table:
                ctx.error("cluster.url", f'required when coordinator = "{cluster.coordinator}"')
        else:
            scheme = cluster.url.split("://", 1)[0].lower()
            expected = (
                ("redis", "rediss")
                if cluster.coordinator == "redis"
                else ("postgresql", "postgres")
            )
            if scheme not in expected:
                ctx.error(
                    "cluster.url",
                    f'coordinator = "{cluster.coordinator}" needs a '
                    f'{expected[0]}:// URL, got scheme "{scheme}"',
                )
    return cluster


# --- cross-section checks ----------------------------------------------------------------


def _check_references(ctx: _Context, config: Config) -> None:
    """Checks that need several sections: destinations named, protocols declared, binds unique."""
    destinations = config.destinations
    declared = ", ".join(sorted(destinations)) or "none"

    def exists(key: str, name: str | None) -> bool:
        if name is None or name in destinations:
            return name is not None
        hint = _suggest(name, destinations, list_all=False) or f" (declared: {declared})"
        ctx.error(key, f'"{name}" is not a declared destination{hint}')
        return False

    listeners = config.listeners.values()
    listener_protocols = {listener.protocol for listener in listeners if listener.protocol}
    default_name = config.routing.default_destination
    if exists("routing.default_destination", default_name):
        default = destinations[default_name]
        for protocol in INTERACTIVE_PROTOCOLS:
            if protocol in listener_protocols and protocol not in default.protocols:
                ctx.error(
                    _join(_join("destination", default_name), "protocol"),
                    f"the default destination must declare {protocol}: "
                    f"{_a(protocol)} listener exists",
                )

    passthrough = config.routing.smtp_passthrough_destination
    needed = [p for p in PASSTHROUGH_PROTOCOLS if p in listener_protocols]
    if passthrough is None:
        if needed:
            ctx.error(
                "routing.smtp_passthrough_destination", f"required: {_a(needed[0])} listener exists"
            )
    elif exists("routing.smtp_passthrough_destination", passthrough):
        for protocol in needed:
            if protocol not in destinations[passthrough].protocols:
                ctx.error(
                    _join(_join("destination", passthrough), "protocol"),
                    f"the smtp_passthrough_destination must declare {protocol}: "
                    f"{_a(protocol)} listener exists",
                )

    for index, route in enumerate(config.http.routes):
        for attr in ("destination", "fallback"):
            name = getattr(route, attr)
            key = f"http.route[{index}].{attr}"
            if name is None or not exists(key, name):
                continue
            if "http" not in destinations[name].protocols:
                ctx.error(key, f'destination "{name}" does not declare the http protocol')

    if (
        config.admin is not None
        and config.admin.certificate is not None
        and config.admin.certificate not in config.tls.certificates
    ):
        ctx.error(
            "admin.certificate",
            f'"{config.admin.certificate}" is not a '
            "[tls.certificate.<name>] entry"
            + _suggest(config.admin.certificate, config.tls.certificates, list_all=False),
        )

    seen: dict[tuple[str, int], str] = {}
    binds = [
        (_join(_join("listener", name), "bind"), listener.bind or ())
        for name, listener in config.listeners.items()
    ]
    if config.admin is not None and config.admin.bind:
        binds.append(("admin.bind", (config.admin.bind,)))
    for key, addresses in binds:
        for address in addresses:
            if address[1] == 0:
                continue  # an ephemeral port never collides
            if address in seen:
                ctx.error(key, f"{address[0]}:{address[1]} is already bound by {seen[address]}")
            else:
                seen[address] = key

    tls_listeners = [listener for listener in listeners if listener.tls in ("implicit", "starttls")]
    if (tls_listeners or config.admin is not None) and not config.tls.certificates:
        ctx.warn(
            "tls.certificate",
            "no certificate configured: a self-signed one will be generated at startup",
        )
    if (
        "imap" in listener_protocols
        and config.server.bridge_idle is not None
        and config.server.bridge_idle < 29 * 60
    ):
        ctx.warn(
            "server.bridge_idle",
            "shorter than the 29-minute IMAP IDLE refresh; idle IMAP clients will be disconnected",
        )


# --- entry points ------------------------------------------------------------------------

_TOP_LEVEL = (
    "server",
    "tls",
    "listener",
    "capabilities",
    "oauth",
    "destination",
    "routing",
    "mapping",
    "http",
    "admin",
    "cluster",
    "security",
)


def parse_config(
    document: dict[str, Any],
    base_dir: Path,
    env: Mapping[str, str] | None = None,
    *,
    check_files: bool = True,
    source_path: Path | None = None,
) -> Config:
    """Validate a parsed TOML document; raise :class:`ConfigError` listing every problem.

    ``base_dir`` anchors relative paths.  ``check_files=False`` skips everything that reads
    the file system (existence, certificate parsing, the admin token file), for validating
    a configuration written for another machine.
    """
    ctx = _Context(Path(base_dir), os.environ if env is None else env, check_files)
    _check_unknown(ctx, document, "", _TOP_LEVEL)

    server = _build_server(ctx, document.get("server", {}))
    tls = _build_tls(ctx, document.get("tls", {}))
    listener_tables = _named_tables(ctx, document.get("listener", {}), "listener")
    listeners = {name: _build_listener(ctx, name, t) for name, t in listener_tables.items()}
    capabilities = _build_capabilities(ctx, document.get("capabilities", {}))
    oauth = OAuthConfig(**_read(ctx, document.get("oauth", {}), "oauth", OAuthConfig))
    destination_tables = _named_tables(ctx, document.get("destination", {}), "destination")
    destinations = {
        name: _build_destination(ctx, name, t) for name, t in destination_tables.items()
    }
    routing = RoutingConfig(**_read(ctx, document.get("routing", {}), "routing", RoutingConfig))
    mapping = _build_mapping(ctx, document.get("mapping", {}))
    http = _build_http(ctx, document.get("http", {}))
    admin = _build_admin(ctx, document["admin"]) if "admin" in document else None
    cluster = _build_cluster(ctx, document.get("cluster", {}))
    security = SecurityConfig(
        **_read(ctx, document.get("security", {}), "security", SecurityConfig)
    )

    # ``fallback = "default"`` names the routing default unless a destination is called so.
    if routing.default_destination and "default" not in destinations:
        http = dataclasses.replace(
            http,
            routes=tuple(
                dataclasses.replace(r, fallback=routing.default_destination)
                if r.fallback == "default"
                else r
                for r in http.routes
            ),
        )

    config = Config(
        server=server,
        tls=tls,
        listeners=listeners,
        capabilities=capabilities,
        oauth=oauth,
        destinations=destinations,
        routing=routing,
        mapping=mapping,
        http=http,
        admin=admin,
        cluster=cluster,
        security=security,
        source_path=source_path,
    )
    _check_references(ctx, config)
    if ctx.problems:
        raise ConfigError(ctx.problems)
    return dataclasses.replace(config, warnings=tuple(ctx.warnings))


def load_config(
    path: str | os.PathLike[str],
    env: Mapping[str, str] | None = None,
    *,
    check_files: bool = True,
) -> Config:
    """Read and validate the TOML file at ``path`` exactly as startup does."""
    path = Path(path)
    try:
        document = tomllib.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        message = f"cannot read the file: {exc.strerror or exc}"
    except UnicodeDecodeError as exc:
        message = f"not UTF-8 text ({exc.reason} at byte {exc.start})"
    except tomllib.TOMLDecodeError as exc:
        message = f"invalid TOML: {exc}"
    else:
        return parse_config(
            document,
            path.absolute().parent,
            env,
            check_files=check_files,
            source_path=path.absolute(),
        )
    raise ConfigError([Problem(str(path), message)])


def config_path_from_env(env: Mapping[str, str] | None = None) -> str | None:
    """``$STALROUTE_CONFIG``, else the reference name ``$PROXY_CONFIG``, else ``None``."""
    env = os.environ if env is None else env
    return next((env[name] for name in ENV_CONFIG if env.get(name)), None)
