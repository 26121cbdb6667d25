"""PROXY protocol v1/v2 codec (haproxy's proxy-protocol.txt; SPEC §6, §9). Sans-IO.

The encoder builds the header stalroute sends on backend legs so a backend sees the real
client; the incremental decoder reads the header a trusted load balancer puts in front of an
inbound connection.  Twisted's own parsers cannot be used for the latter: they drop headers
split across segments, expose no TLVs and cannot say "this is not a header" early enough
for ``optional`` mode.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from dataclasses import dataclass
from typing import Sequence

Address = tuple[str, int]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

V1_PREFIX = b"PROXY "
#: A v1 header is at most 107 bytes, CRLF included.
V1_MAX_LENGTH = 107
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_HEADER_FIXED = 16  # signature, version/command, family/transport, length
#: Default cap on the v2 address + TLV block; real balancers send well under 1 KiB.
DEFAULT_V2_MAX_LENGTH = 4096

PP2_TYPE_ALPN = 0x01
PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_CRC32C = 0x03
PP2_TYPE_NOOP = 0x04
PP2_TYPE_UNIQUE_ID = 0x05
PP2_TYPE_SSL = 0x20
PP2_SUBTYPE_SSL_VERSION = 0x21
PP2_SUBTYPE_SSL_CN = 0x22
PP2_SUBTYPE_SSL_CIPHER = 0x23
PP2_SUBTYPE_SSL_SIG_ALG = 0x24
PP2_SUBTYPE_SSL_KEY_ALG = 0x25
PP2_TYPE_NETNS = 0x30

PP2_CLIENT_SSL = 0x01
PP2_CLIENT_CERT_CONN = 0x02
PP2_CLIENT_CERT_SESS = 0x04

_V2_LOCAL = 0x20
_V2_PROXY = 0x21
_AF_UNSPEC = 0x00
_TCP4 = 0x11
_TCP6 = 0x21
#: Address block size for each family/transport byte stalroute accepts (TCP only).
_ADDRESS_BLOCK = {_AF_UNSPEC: 0, _TCP4: 12, _TCP6: 36}
_ADDRESS_FORMAT = {_TCP4: "!4s4sHH", _TCP6: "!16s16sHH"}

_V1_PORT = re.compile(rb"[0-9]{1,5}")


class ProxyHeaderError(ValueError):
    """A malformed, unsupported or oversized PROXY header."""


class NotAProxyHeader(ProxyHeaderError):
    """The first bytes cannot start a PROXY header.

    ``data`` holds every byte fed so far, for ``optional`` mode to serve the connection as
    if no header had been expected.  It is never part of the message: it may be a login.
    """

    def __init__(self, data: bytes) -> None:
        super().__init__("not a PROXY protocol header")
        self.data = data


@dataclass(frozen=True)
class ProxyHeader:
    """A decoded header.  ``source``/``destination`` are None when the socket's own
    addresses apply (v2 LOCAL, v2 AF_UNSPEC, v1 UNKNOWN)."""

    version: int
    command: str  # "PROXY" | "LOCAL"
    source: Address | None
    destination: Address | None
    tlvs: tuple[tuple[int, bytes], ...] = ()


# --- encoder ------------------------------------------------------------------------------


def _endpoint(address: Address) -> tuple[IPAddress, int]:
    host, port = address
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port out of range: {port}")
    ip = ipaddress.ip_address(host)
    if isinstance(ip, ipaddress.IPv6Address):
        ip = ipaddress.IPv6Address(ip.packed)  # drop any scope id, which has no wire form
    return ip, port


def _unmapped(ip: IPAddress) -> IPAddress:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _same_family(
    source: Address, destination: Address
) -> tuple[tuple[IPAddress, int], tuple[IPAddress, int]] | None:
    """Both endpoints in one family (IPv4-mapped counted as IPv4 when both allow it), or None.

    None means the families differ, which both versions can only send as UNKNOWN/UNSPEC.
    """
    (src_ip, src_port), (dst_ip, dst_port) = _endpoint(source), _endpoint(destination)
    src_v4, dst_v4 = _unmapped(src_ip), _unmapped(dst_ip)
    if src_v4.version == 4 and dst_v4.version == 4:
        return (src_v4, src_port), (dst_v4, dst_port)
    if src_ip.version == dst_ip.version:
        return (src_ip, src_port), (dst_ip, dst_port)
    return None


def _tlv(kind: int, value: bytes) -> bytes:
    if not 0 <= kind <= 0xFF:
        raise ValueError(f"TLV type out of range: {kind}")
    if len(value) > 0xFFFF:
        raise ValueError("TLV value too long")
    return struct.pack("!BH", kind, len(value)) + value


def encode_v2(
    source: Address | None,
    destination: Address | None,
    tlvs: Sequence[tuple[int, bytes]] = (),
) -> bytes:
    """A v2 header: PROXY over TCP4/TCP6, LOCAL when ``source`` is None, UNSPEC when the
    two addresses are of different families."""
    if source is None:
        if tlvs:
            raise ValueError("a LOCAL header carries no TLVs")
        return V2_SIGNATURE + struct.pack("!BBH", _V2_LOCAL, _AF_UNSPEC, 0)
    if destination is None:
        raise ValueError("a PROXY header needs a destination address")
    endpoints = _same_family(source, destination)
    if endpoints is None:
        family, addresses = _AF_UNSPEC, b""
    else:
        (src_ip, src_port), (dst_ip, dst_port) = endpoints
        family = _TCP4 if src_ip.version == 4 else _TCP6
        addresses = struct.pack(_ADDRESS_FORMAT[family], src_ip.packed, dst_ip.packed,
                                src_port, dst_port)
    block = addresses + b"".join(_tlv(kind, value) for kind, value in tlvs)
    if len(block) > 0xFFFF:
        raise ValueError("PROXY v2 header too long")
    return V2_SIGNATURE + struct.pack("!BBH", _V2_PROXY, family, len(block)) + block


def ssl_tlv(version: str | None, cipher: str | None) -> bytes:
    """The value of a ``PP2_TYPE_SSL`` TLV for a client leg that used TLS.

    ``verify`` is 0: stalroute asks for no client certificate, so there is nothing that
    failed verification (haproxy sends the same).
    """
    sub_tlvs = b""
    if version is not None:
        sub_tlvs += _tlv(PP2_SUBTYPE_SSL_VERSION, version.encode("ascii"))
    if cipher is not None:
        sub_tlvs += _tlv(PP2_SUBTYPE_SSL_CIPHER, cipher.encode("ascii"))
    return struct.pack("!BI", PP2_CLIENT_SSL, 0) + sub_tlvs


def encode_v1(source: Address | None, destination: Address | None) -> bytes:
    """A v1 header: TCP4/TCP6, or UNKNOWN without addresses or for mixed families."""
    endpoints = None
    if source is not None:
        if destination is None:
            raise ValueError("a PROXY header needs a destination address")
        endpoints = _same_family(source, destination)
    if endpoints is None:
        return b"PROXY UNKNOWN\r\n"
    (src_ip, src_port), (dst_ip, dst_port) = endpoints
    return f"PROXY TCP{src_ip.version} {src_ip} {dst_ip} {src_port} {dst_port}\r\n".encode()


# --- decoder ------------------------------------------------------------------------------


class ProxyHeaderParser:
    """Incremental decoder of one inbound PROXY header, v1 or v2 (auto-detected).

    :meth:`feed` returns None while more bytes are needed and the header once complete;
    the bytes that followed it are in :attr:`rest`.  It raises :exc:`NotAProxyHeader` as
    soon as the first bytes cannot begin a header, and :exc:`ProxyHeaderError` for a broken
    one.  At most ``V1_MAX_LENGTH`` or ``16 + max_v2_length`` bytes are ever buffered.
    """

    def __init__(self, max_v2_length: int = DEFAULT_V2_MAX_LENGTH) -> None:
        self.max_v2_length = max_v2_length
        self.header: ProxyHeader | None = None
        self.rest = b""
        self._buffer = bytearray()

    def feed(self, data: bytes) -> ProxyHeader | None:
        """Feed received bytes (after the header they only accumulate in :attr:`rest`)."""
        if self.header is not None:
            self.rest += data
            return self.header
        self._buffer += data
        for signature, parse in ((V1_PREFIX, self._parse_v1), (V2_SIGNATURE, self._parse_v2)):
            seen = min(len(self._buffer), len(signature))
            if self._buffer[:seen] == signature[:seen]:
                break
        else:
            raise NotAProxyHeader(bytes(self._buffer))
        if len(self._buffer) < len(signature):
            return None
        parsed = parse()
        if parsed is None:
            return None
        self.header, consumed = parsed
        self.rest = bytes(self._buffer[consumed:])
        self._buffer.clear()
        return self.header

    def _parse_v1(self) -> tuple[ProxyHeader, int] | None:
        newline = self._buffer.find(b"\n", 0, V1_MAX_LENGTH)
        if newline < 0:
            if len(self._buffer) >= V1_MAX_LENGTH:
                raise ProxyHeaderError("PROXY v1 header too long")
            return None
        if self._buffer[newline - 1] != ord("\r"):
            raise ProxyHeaderError("PROXY v1 header must end with CRLF")
        return _decode_v1(bytes(self._buffer[: newline - 1])), newline + 1

    def _parse_v2(self) -> tuple[ProxyHeader, int] | None:
        if len(self._buffer) < V2_HEADER_FIXED:
            return None
        version_command, family, length = struct.unpack_from("!BBH", self._buffer, 12)
        if version_command >> 4 != 2:
            raise ProxyHeaderError("unsupported PROXY protocol version")
        if version_command not in (_V2_LOCAL, _V2_PROXY):
            raise ProxyHeaderError("unsupported PROXY v2 command")
        if length > self.max_v2_length:
            raise ProxyHeaderError("PROXY v2 header too long")
        end = V2_HEADER_FIXED + length
        if len(self._buffer) < end:
            return None
        if version_command == _V2_LOCAL:
            # The receiver must ignore the whole block of a LOCAL header (health checks).
            return ProxyHeader(2, "LOCAL", None, None), end
        return _decode_v2_proxy(family, bytes(self._buffer[V2_HEADER_FIXED:end])), end


def _decode_v1(line: bytes) -> ProxyHeader:
    fields = line.split(b" ")
    if len(fields) >= 2 and fields[1] == b"UNKNOWN":
        return ProxyHeader(1, "PROXY", None, None)  # the rest of the line is to be ignored
    if len(fields) != 6 or fields[1] not in (b"TCP4", b"TCP6"):
        raise ProxyHeaderError("malformed PROXY v1 header")
    ip_class = ipaddress.IPv4Address if fields[1] == b"TCP4" else ipaddress.IPv6Address
    source_ip, destination_ip = (_v1_ip(ip_class, field) for field in fields[2:4])
    source_port, destination_port = (_v1_port(field) for field in fields[4:6])
    return ProxyHeader(1, "PROXY", (source_ip, source_port), (destination_ip, destination_port))


def _v1_ip(ip_class: type[IPAddress], field: bytes) -> str:
    try:
        text = field.decode("ascii")
        if "%" in text:  # a scope id is not an address
            raise ValueError(text)
        return str(ip_class(text))
    except ValueError:
        raise ProxyHeaderError("malformed address in PROXY v1 header") from None


def _v1_port(field: bytes) -> int:
    if not _V1_PORT.fullmatch(field) or int(field) > 0xFFFF:
        raise ProxyHeaderError("malformed port in PROXY v1 header")
    return int(field)


def _decode_v2_proxy(family: int, block: bytes) -> ProxyHeader:
    address_size = _ADDRESS_BLOCK.get(family)
    if address_size is None:
        raise ProxyHeaderError("unsupported PROXY v2 address family or transport")
    if len(block) < address_size:
        raise ProxyHeaderError("truncated PROXY v2 address block")
    source = destination = None
    if family != _AF_UNSPEC:
        ip_class = ipaddress.IPv4Address if family == _TCP4 else ipaddress.IPv6Address
        src, dst, src_port, dst_port = struct.unpack(_ADDRESS_FORMAT[family],
                                                     block[:address_size])
        source = (str(ip_class(src)), src_port)
        destination = (str(ip_class(dst)), dst_port)
    return ProxyHeader(2, "PROXY", source, destination, parse_tlvs(block[address_size:]))


def parse_tlvs(data: bytes) -> tuple[tuple[int, bytes], ...]:
    """Split a TLV area (the v2 block after the addresses, or a PP2_TYPE_SSL's sub-TLVs)."""
    tlvs = []
    offset = 0
    while offset < len(data):
        if offset + 3 > len(data):
            raise ProxyHeaderError("truncated PROXY v2 TLV")
        kind, length = struct.unpack_from("!BH", data, offset)
        offset += 3
        if offset + length > len(data):
            raise ProxyHeaderError("truncated PROXY v2 TLV")
        tlvs.append((kind, data[offset : offset + length]))
        offset += length
    return tuple(tlvs)
