"""HTTP header rules (SPEC §5 HTTP, §2.3/§2.6 ``forwarded``). Sans-IO.

* :func:`check_request_head` — the strict reading of a raw request head that closes the
  request-smuggling gaps a lenient parser leaves: bare CR or LF, obs-fold, invalid header
  names (including whitespace before the colon), both ``Content-Length`` and
  ``Transfer-Encoding``, conflicting or malformed lengths, transfer codings other than
  ``chunked``, duplicate ``Host``. llhttp (:mod:`stalroute.http.wire`) parses the same bytes
  afterwards; a head reaches it only when both agree on its meaning. :class:`HeadGuard`
  applies it to each head of a connection as the head arrives.
* :func:`backend_request_headers` / :func:`client_response_headers` — hop-by-hop removal
  (the fixed list plus every name the ``Connection`` header lists), WebSocket upgrade
  headers, and the ``Forwarded`` / ``X-Forwarded-*`` rules of the listener and destination.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "FORWARDING_HEADERS",
    "HOP_BY_HOP",
    "Forwarding",
    "HeadGuard",
    "HeadProblem",
    "backend_request_headers",
    "check_partial_head",
    "check_request_head",
    "client_response_headers",
    "connection_options",
    "find_head_end",
    "forwarded_element",
    "forwarded_node",
    "is_websocket_upgrade",
]

Headers = Sequence[tuple[bytes, bytes]]

#: Never forwarded: they describe one connection, not the message (RFC 9110 §7.6.1 and the
#: classic RFC 2616 list, plus the non-standard Proxy-Connection).
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate",
    b"proxy-authorization", b"te", b"trailer", b"transfer-encoding", b"upgrade",
})
#: Names a client may not remove by listing them in ``Connection`` (framing and routing).
_PROTECTED = frozenset({b"host", b"content-length"})
#: Client-address headers: stripped on ``forwarded = "off"`` listeners, kept on ``"trust"``.
FORWARDING_HEADERS = frozenset({
    b"forwarded", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host",
    b"x-forwarded-port", b"x-real-ip",
})

_TOKEN = re.compile(rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+")
_REQUEST_LINE = re.compile(rb"([-!#$%&'*+.^_`|~0-9A-Za-z]+) ([\x21-\x7e]+) HTTP/([0-9])\.([0-9])")
#: Control characters other than HTAB (CR and LF are caught earlier), and DEL.
_BAD_VALUE_BYTE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_HEAD_END = re.compile(rb"\n\r?\n")
_DIGITS = re.compile(rb"[0-9]{1,18}")
#: A LF without its CR, or a CR without its LF.
_BARE = re.compile(rb"(?<!\r)\n|\r(?!\n)")
_BARE_PARTIAL = re.compile(rb"(?<!\r)\n|\r(?=[^\n])")
#: A head whose every line is well-formed: request line, ``token:value`` fields whose values
#: hold no control character but HTAB, CRLF everywhere (no obs-fold: a line starting with
#: whitespace is no field). Group 1: the minor version.
_CLEAN_HEAD = re.compile(
    rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+ [\x21-\x7e]+ HTTP/1\.([0-9])\r\n"
    rb"(?:[-!#$%&'*+.^_`|~0-9A-Za-z]+:[^\x00-\x08\x0a-\x1f\x7f]*\r\n)*\r\n")
#: In a clean head: the fields the framing rules read, values without surrounding whitespace.
_FRAMING_FIELD = re.compile(
    rb"(?<=\r\n)(content-length|transfer-encoding|host):[ \t]*([^\r\n]*?)[ \t]*(?=\r\n)",
    re.IGNORECASE)


@dataclass(frozen=True)
class HeadProblem:
    """Why a request head is refused: the status to answer (then close) and a reason."""

    status: int
    reason: str


# --- raw head checks --------------------------------------------------------------------------


def find_head_end(buffer: bytes | bytearray, start: int = 0) -> int | None:
    """Offset just past the blank line ending the head: ``\\n\\r?\\n``, so that a head
    ending with bare LFs is found, then refused.

    ``start``: where new bytes begin (searching resumes a few bytes before it).
    """
    match = _HEAD_END.search(buffer, max(0, start - 2))
    return match.end() if match else None


def check_partial_head(buffer: bytes | bytearray, max_head_size: int,
                       start: int = 0) -> HeadProblem | None:
    """Early refusal of an incomplete head: too long, or already malformed. Only the bytes
    from ``start`` on (plus the one before) are scanned, so a head arriving byte by byte
    costs linear time."""
    if len(buffer) > max_head_size:
        return HeadProblem(431, "request head too large")
    if buffer[:1] and buffer[0] < 0x21:
        # Not a request line (a TLS ClientHello on a plain port, leading blank lines, ...).
        return HeadProblem(400, "malformed request line")
    # A CR at the very end is judged once the next byte is known.
    if _BARE_PARTIAL.search(buffer, max(0, start - 1)):
        return HeadProblem(400, "bare CR or LF in the request head")
    return None


def _comma_values(values: Iterable[bytes]) -> list[bytes]:
    return [part.strip(b" \t") for value in values for part in value.split(b",")]


def check_request_head(head: bytes) -> HeadProblem | None:
    """Refuse a complete request head (ending with its blank line) that is ambiguous.

    None means the head is acceptable; llhttp then parses it. The checks follow RFC 9112 and
    SPEC §5: a proxy must not forward a message two parsers could read differently.

    Most heads are clean: one regular expression proves every line well-formed, and only the
    framing headers are looked at. Any other head takes the line-by-line reading, which
    finds what is wrong with it (both readings agree: ``tests/unit/test_http_headers.py``).
    """
    clean = _CLEAN_HEAD.fullmatch(head)
    if clean is None:
        return _check_lines(head)
    lengths: list[bytes] = []
    codings: list[bytes] = []
    hosts = 0
    for name, value in _FRAMING_FIELD.findall(head):
        lowered = name.lower()
        if lowered == b"content-length":
            lengths.append(value)
        elif lowered == b"transfer-encoding":
            codings.append(value)
        else:
            hosts += 1
    return _check_framing(clean.group(1) == b"0", lengths, codings, hosts)


def _check_lines(head: bytes) -> HeadProblem | None:
    """:func:`check_request_head`, line by line."""
    if not head.endswith(b"\r\n\r\n"):
        return HeadProblem(400, "bare LF in the request head")
    if _BARE.search(head):
        return HeadProblem(400, "bare CR or LF in the request head")
    body = head[:-4]
    lines = body.split(b"\r\n")
    request_line = _REQUEST_LINE.fullmatch(lines[0])
    if request_line is None:
        return HeadProblem(400, "malformed request line")
    if request_line.group(3) != b"1":
        return HeadProblem(505, "HTTP version not supported")
    http10 = request_line.group(4) == b"0"
    lengths: list[bytes] = []
    codings: list[bytes] = []
    hosts = 0
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t"):
            return HeadProblem(400, "obsolete line folding in the request head")
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):
            return HeadProblem(400, "invalid header name")
        value = value.strip(b" \t")
        if _BAD_VALUE_BYTE.search(value):
            return HeadProblem(400, "control character in a header value")
        lowered = name.lower()
        if lowered == b"content-length":
            lengths.append(value)
        elif lowered == b"transfer-encoding":
            codings.append(value)
        elif lowered == b"host":
            hosts += 1
    return _check_framing(http10, lengths, codings, hosts)


def _check_framing(http10: bool, lengths: list[bytes], codings: list[bytes],
                   hosts: int) -> HeadProblem | None:
    """The framing and ``Host`` rules, on the (stripped) values of those headers."""
    if lengths and codings:
        return HeadProblem(400, "both Content-Length and Transfer-Encoding")
    if lengths:
        values = _comma_values(lengths)
        if not all(_DIGITS.fullmatch(v) for v in values):
            return HeadProblem(400, "invalid Content-Length")
        if len({int(v) for v in values}) != 1:
            return HeadProblem(400, "conflicting Content-Length values")
    if codings:
        if http10:
            return HeadProblem(400, "Transfer-Encoding in an HTTP/1.0 request")
        if len(codings) > 1:
            return HeadProblem(400, "more than one Transfer-Encoding header")
        tokens = _comma_values(codings)
        if not all(_TOKEN.fullmatch(token) for token in tokens):
            return HeadProblem(400, "invalid Transfer-Encoding")
        if [token.lower() for token in tokens] != [b"chunked"]:
            if tokens[-1].lower() != b"chunked" or b"chunked" in (t.lower() for t in tokens[:-1]):
                return HeadProblem(400, "invalid Transfer-Encoding")
            return HeadProblem(501, "only the chunked transfer coding is supported")
    if hosts > 1:
        return HeadProblem(400, "more than one Host header")
    if hosts == 0 and not http10:
        return HeadProblem(400, "missing Host header")
    return None


class HeadGuard:
    """The checks above on each request head of one connection, before its parser reads it.

    The head is judged where it accumulates, in the reader's buffer of unparsed bytes, as
    its bytes arrive: only new bytes are scanned, so a head that trickles in costs linear
    time. A head reaches the parser only once :meth:`check` passed it whole.
    """

    def __init__(self, max_head_size: int) -> None:
        self._max_head_size = max_head_size
        self._scanned = 0

    def next_request(self) -> None:
        """The head was read: the next bytes start another one."""
        self._scanned = 0

    def check(self, buffer: bytes | bytearray) -> tuple[int | None, HeadProblem | None]:
        """Judge the head at the start of ``buffer``: where it ends (None: not yet), and the
        problem that refuses it, if any."""
        if not buffer:
            return None, None
        start, self._scanned = self._scanned, len(buffer)
        end = find_head_end(buffer, start)
        if end is None:
            return None, check_partial_head(buffer, self._max_head_size, start)
        if end > self._max_head_size:
            return end, HeadProblem(431, "request head too large")
        return end, check_request_head(bytes(buffer[:end]))


# --- connection-level headers ------------------------------------------------------------------


def connection_options(headers: Headers) -> set[bytes]:
    """The lowercased names listed in ``Connection`` (and the legacy ``Proxy-Connection``)."""
    names: set[bytes] = set()
    for name, value in headers:
        if name.lower() in (b"connection", b"proxy-connection"):
            names.update(v.lower() for v in _comma_values([value]) if v)
    return names


def _values(headers: Headers, name: bytes) -> list[bytes]:
    return [value for key, value in headers if key.lower() == name]


def is_websocket_upgrade(headers: Headers) -> bool:
    """``Connection: upgrade`` with ``Upgrade: websocket`` (SPEC §5: the only upgrade relayed)."""
    upgrades = [v.lower() for v in _comma_values(_values(headers, b"upgrade"))]
    return b"upgrade" in connection_options(headers) and any(
        v == b"websocket" or v.startswith(b"websocket/") for v in upgrades
    )


# --- Forwarded / X-Forwarded-For ------------------------------------------------------------------


@dataclass(frozen=True)
class Forwarding:
    """How one request announces its client to one destination.

    ``trust`` is the listener's ``forwarded = "trust"`` (inbound headers kept and extended;
    ``"off"`` strips them); ``append`` is the destination's ``forwarded = true``.
    """

    client_ip: str
    proto: str  # "http" or "https": the client leg
    trust: bool = False
    append: bool = False


def _unmapped(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(ip.strip("[]").split("%", 1)[0])
    except ValueError:
        return None
    if address.version == 6 and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@functools.lru_cache(maxsize=4096)
def forwarded_node(ip: str) -> bytes:
    """``for=`` node of RFC 7239: IPv4 bare, IPv6 bracketed and quoted (remembered per
    address: every request of a keep-alive connection names the same client)."""
    address = _unmapped(ip)
    if address is None:
        return b'"_unknown"'
    if address.version == 6:
        return b'"[' + str(address).encode() + b']"'
    return str(address).encode()


_TOKEN_VALUE = re.compile(rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+")


def _quote(value: bytes) -> bytes:
    if _TOKEN_VALUE.fullmatch(value):
        return value
    return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def forwarded_element(client_ip: str, proto: str, host: bytes | None) -> bytes:
    """One ``Forwarded`` element for this hop: ``for=…;host=…;proto=…``."""
    parts = [b"for=" + forwarded_node(client_ip)]
    if host:
        parts.append(b"host=" + _quote(host))
    parts.append(b"proto=" + proto.encode())
    return b";".join(parts)


@functools.lru_cache(maxsize=4096)
def _xff_value(ip: str) -> bytes:
    address = _unmapped(ip)
    return str(address).encode() if address is not None else b"unknown"


# --- rewriting ----------------------------------------------------------------------------------


def backend_request_headers(
    headers: Headers,
    forwarding: Forwarding,
    *,
    websocket: bool = False,
    drop_expect: bool = False,
    chunked: bool = False,
    host: bytes | None = None,
) -> list[tuple[bytes, bytes]]:
    """The request headers a backend receives.

    Hop-by-hop headers go (``Transfer-Encoding: chunked`` is re-added when the body is
    chunked; ``Upgrade`` and ``Connection: Upgrade`` stay for a WebSocket handshake);
    ``Expect`` goes when stalroute has already answered ``100 Continue`` itself; ``host``
    replaces ``Host`` (absolute-form targets) or supplies a missing one (HTTP/1.0).
    """
    listed = connection_options(headers) - _PROTECTED
    drop = HOP_BY_HOP | listed
    out: list[tuple[bytes, bytes]] = []
    forwarded: list[bytes] = []
    xff: list[bytes] = []
    upgrade: list[bytes] = []
    have_proto = have_xhost = False
    request_host: bytes | None = None
    for name, value in headers:
        lowered = name.lower()
        if lowered == b"upgrade":
            upgrade.append(value)
        if lowered in drop:
            continue
        if lowered in FORWARDING_HEADERS:
            if not forwarding.trust:
                continue
            if lowered == b"forwarded":
                forwarded.append(value)
                continue
            if lowered == b"x-forwarded-for":
                xff.append(value)
                continue
            have_proto = have_proto or lowered == b"x-forwarded-proto"
            have_xhost = have_xhost or lowered == b"x-forwarded-host"
        elif lowered == b"expect" and drop_expect:
            continue
        elif lowered == b"host":
            if host is not None:
                continue
            request_host = value
        out.append((name, value))
    if host is not None:
        out.insert(0, (b"Host", host))
        request_host = host
    if chunked:
        out.append((b"Transfer-Encoding", b"chunked"))
    if websocket:
        out.append((b"Connection", b"Upgrade"))
        out.append((b"Upgrade", b", ".join(upgrade) or b"websocket"))
    if forwarding.append:
        forwarded.append(forwarded_element(forwarding.client_ip, forwarding.proto, request_host))
        xff.append(_xff_value(forwarding.client_ip))
        if not have_proto:
            out.append((b"X-Forwarded-Proto", forwarding.proto.encode()))
        if not have_xhost and request_host:
            out.append((b"X-Forwarded-Host", request_host))
    if forwarded:
        out.append((b"Forwarded", b", ".join(forwarded)))
    if xff:
        out.append((b"X-Forwarded-For", b", ".join(xff)))
    return out


def client_response_headers(
    headers: Headers, *, switching: bool = False, close: bool = False
) -> list[tuple[bytes, bytes]]:
    """The response headers the client receives.

    Hop-by-hop headers go; :mod:`stalroute.http.framing` re-frames the body
    (``Content-Length`` is kept unless the backend also sent ``Transfer-Encoding``, which
    wins). A ``101`` keeps ``Upgrade`` and gets
    ``Connection: Upgrade``; ``close`` adds ``Connection: close``.
    """
    listed = connection_options(headers) - _PROTECTED
    drop = HOP_BY_HOP | listed
    chunked = any(name.lower() == b"transfer-encoding" for name, _ in headers)
    out: list[tuple[bytes, bytes]] = []
    upgrade: list[bytes] = []
    for name, value in headers:
        lowered = name.lower()
        if lowered == b"upgrade":
            upgrade.append(value)
        if lowered in drop or (chunked and lowered == b"content-length"):
            continue
        out.append((name, value))
    if switching:
        out.append((b"Connection", b"Upgrade"))
        out.append((b"Upgrade", b", ".join(upgrade) or b"websocket"))
    elif close:
        out.append((b"Connection", b"close"))
    return out
