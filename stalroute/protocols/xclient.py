"""XCLIENT command building for the POP3, ManageSieve and submission backends (SPEC §6).

One builder for the three protocols, so the attribute policy lives in one place:

* only attributes the backend advertises are sent (``advertised``); SMTP servers list them
  after the EHLO keyword (``XCLIENT ADDR PORT ...``), while Dovecot's POP3 greeting hint
  ``[XCLIENT]`` and its ManageSieve ``"XCLIENT"`` capability carry no list, for which
  :data:`IMPLIED_ATTRIBUTES` (what Dovecot documents for those protocols) applies;
* ``LOGIN`` and ``NAME`` are never sent: stalroute has not authenticated anyone and does
  not resolve reverse names;
* SMTP values are xtext-encoded (RFC 3461, as Postfix's XCLIENT_README requires) and IPv6
  addresses carry the ``IPV6:`` prefix; POP3 and ManageSieve servers take values verbatim,
  so a value that is not a plain token is left out rather than sent.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

from stalroute.protocols.base import ForwardingInfo

#: Every attribute stalroute may announce, in the order it sends them.
ATTRIBUTES = ("ADDR", "PORT", "DESTADDR", "DESTPORT", "SESSION", "TTL", "CLIENT-TRANSPORT",
              "HELO", "PROTO")
#: A bare ``XCLIENT`` advertisement (POP3, ManageSieve): Dovecot's documented attributes.
IMPLIED_ATTRIBUTES = ("ADDR", "PORT", "SESSION", "TTL")
#: Attributes that only mean something in SMTP.
_SMTP_ONLY = frozenset({"HELO", "PROTO"})

# POP3 / ManageSieve: a value must be one printable token without "=" (Dovecot splits on
# spaces and reads everything after the first "=" verbatim).
_PLAIN_VALUE = re.compile(r"[!-<>-~]{1,255}")
_XTEXT_SAFE = frozenset(range(0x21, 0x7F)) - {ord("+"), ord("=")}


def xtext(value: str) -> str:
    """RFC 3461 xtext: ``+``, ``=``, controls, space and non-ASCII bytes become ``+XX``."""
    return "".join(chr(byte) if byte in _XTEXT_SAFE else f"+{byte:02X}"
                   for byte in value.encode("utf-8"))


def advertised_attributes(keyword_parameters: Iterable[bytes | str]) -> frozenset[str]:
    """The attribute names of an SMTP ``XCLIENT`` EHLO line's parameters, upper-cased."""
    names = set()
    for parameter in keyword_parameters:
        if isinstance(parameter, bytes):
            parameter = parameter.decode("ascii", "replace")
        names.add(parameter.upper())
    return frozenset(names)


def _address(address: str, smtp: bool) -> str:
    """An IPv4-mapped IPv6 address as IPv4; SMTP's ``IPV6:`` prefix for real IPv6."""
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return address
    if parsed.version == 6 and parsed.ipv4_mapped is not None:
        parsed = parsed.ipv4_mapped
    if parsed.version == 6 and smtp:
        return f"IPV6:{parsed.compressed}"
    return parsed.compressed


def xclient_command(info: ForwardingInfo, advertised: Iterable[str] | None, *, smtp: bool,
                    helo: str | None = None, proto: str | None = None) -> bytes | None:
    """``XCLIENT name=value ...`` (no line terminator), or None when nothing can be sent.

    ``advertised`` is the backend's attribute list; None means a bare advertisement
    (:data:`IMPLIED_ATTRIBUTES`).  ``helo`` and ``proto`` are SMTP's ``HELO`` and ``PROTO``.
    """
    allowed = (frozenset(IMPLIED_ATTRIBUTES) if advertised is None
               else frozenset(name.upper() for name in advertised))
    values: dict[str, str | None] = {
        "ADDR": _address(info.client_ip, smtp),
        "PORT": str(info.client_port),
        "DESTADDR": _address(info.local_ip, smtp),
        "DESTPORT": str(info.local_port),
        "SESSION": info.session_id,
        "TTL": str(info.ttl),
        "CLIENT-TRANSPORT": "TLS" if info.client_tls else "insecure",
        "HELO": helo,
        "PROTO": proto,
    }
    pairs = []
    for name in ATTRIBUTES:
        value = values[name]
        if name not in allowed or not value or (name in _SMTP_ONLY and not smtp):
            continue
        if smtp:
            value = xtext(value)
        elif not _PLAIN_VALUE.fullmatch(value):
            continue
        pairs.append(f"{name}={value}")
    if not pairs:
        return None
    return ("XCLIENT " + " ".join(pairs)).encode("ascii")
