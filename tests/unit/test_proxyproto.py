"""stalroute.proxyproto: PROXY v1/v2 encoder and incremental decoder (Twisted as an oracle)."""

from __future__ import annotations

import ipaddress
import socket
import struct

import pytest
from hypothesis import given, strategies as st
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser

from stalroute.proxyproto import (
    DEFAULT_V2_MAX_LENGTH,
    PP2_CLIENT_SSL,
    PP2_SUBTYPE_SSL_CIPHER,
    PP2_SUBTYPE_SSL_VERSION,
    PP2_TYPE_ALPN,
    PP2_TYPE_AUTHORITY,
    PP2_TYPE_SSL,
    PP2_TYPE_UNIQUE_ID,
    V1_MAX_LENGTH,
    V2_SIGNATURE,
    NotAProxyHeader,
    ProxyHeader,
    ProxyHeaderError,
    ProxyHeaderParser,
    encode_v1,
    encode_v2,
    parse_tlvs,
    ssl_tlv,
)

SIG = b"\r\n\r\n\x00\r\nQUIT\n"


def reference_v2(src_ip, src_port, dst_ip, dst_port, local=False):
    """The hand-built header of shared/TEST-ENVIRONMENT.md, verified against Dovecot."""
    if local:
        return SIG + bytes([0x20, 0x00]) + struct.pack("!H", 0)
    addr = socket.inet_aton(src_ip) + socket.inet_aton(dst_ip) + struct.pack("!HH", src_port,
                                                                              dst_port)
    return SIG + bytes([0x21, 0x11]) + struct.pack("!H", len(addr)) + addr


def parse_all(data: bytes, **kwargs) -> tuple[ProxyHeader, bytes]:
    parser = ProxyHeaderParser(**kwargs)
    header = parser.feed(data)
    assert header is not None
    return header, parser.rest


def parse_bytewise(data: bytes, **kwargs) -> tuple[ProxyHeader | None, bytes]:
    parser = ProxyHeaderParser(**kwargs)
    header = None
    for index in range(len(data)):
        header = parser.feed(data[index:index + 1])
    return header, parser.rest


# --- encoder --------------------------------------------------------------------------------


def test_encode_v2_tcp4_matches_the_reference_header():
    assert V2_SIGNATURE == SIG
    assert encode_v2(("192.0.2.1", 40000), ("198.51.100.7", 993)) == \
        reference_v2("192.0.2.1", 40000, "198.51.100.7", 993)


def test_encode_v2_local():
    assert encode_v2(None, None) == reference_v2("", 0, "", 0, local=True)
    with pytest.raises(ValueError):
        encode_v2(None, None, [(PP2_TYPE_UNIQUE_ID, b"x")])


def test_encode_v2_tcp6_and_twisted_agrees():
    header = encode_v2(("2001:db8::1", 1234), ("2001:db8::2", 143))
    assert header[13] == 0x21 and struct.unpack("!H", header[14:16])[0] == 36
    info = V2Parser.parse(header)
    assert (info.source.host, info.source.port) == ("2001:db8:0:0:0:0:0:1", 1234)
    assert (info.destination.host, info.destination.port) == ("2001:db8:0:0:0:0:0:2", 143)


def test_encode_v2_maps_v4_mapped_to_tcp4():
    header = encode_v2(("::ffff:192.0.2.1", 1), ("198.51.100.7", 2))
    assert header == reference_v2("192.0.2.1", 1, "198.51.100.7", 2)
    both = encode_v2(("::ffff:192.0.2.1", 1), ("::ffff:198.51.100.7", 2))
    assert both == header


def test_encode_v2_mapped_with_native_v6_stays_tcp6():
    header = encode_v2(("::ffff:192.0.2.1", 1), ("2001:db8::2", 2))
    assert header[13] == 0x21
    assert parse_all(header)[0].source == ("::ffff:c000:201", 1)


def test_encode_v2_mixed_families_is_unspec():
    header = encode_v2(("192.0.2.1", 1), ("2001:db8::2", 2), [(PP2_TYPE_UNIQUE_ID, b"abc")])
    assert header[12:14] == bytes([0x21, 0x00])
    assert parse_all(header)[0] == ProxyHeader(2, "PROXY", None, None,
                                               ((PP2_TYPE_UNIQUE_ID, b"abc"),))
    assert V2Parser.parse(header).source is None


def test_encode_v2_drops_scope_ids():
    header = encode_v2(("fe80::1%eth0", 1), ("fe80::2", 2))
    assert parse_all(header)[0].source == ("fe80::1", 1)


@pytest.mark.parametrize("source, destination, tlvs", [
    (("192.0.2.1", 70000), ("192.0.2.2", 1), ()),
    (("192.0.2.1", -1), ("192.0.2.2", 1), ()),
    (("not-an-ip", 1), ("192.0.2.2", 1), ()),
    (("192.0.2.1", 1), None, ()),
    (("192.0.2.1", 1), ("192.0.2.2", 1), [(256, b"")]),
    (("192.0.2.1", 1), ("192.0.2.2", 1), [(1, b"x" * 65536)]),
    (("192.0.2.1", 1), ("192.0.2.2", 1), [(1, b"x" * 40000), (2, b"y" * 40000)]),
])
def test_encode_v2_rejects(source, destination, tlvs):
    with pytest.raises(ValueError):
        encode_v2(source, destination, tlvs)


def test_encode_v2_tlvs_and_ssl_tlv():
    value = ssl_tlv("TLSv1.3", "TLS_AES_256_GCM_SHA384")
    assert value == (bytes([PP2_CLIENT_SSL]) + struct.pack("!I", 0)
                     + bytes([PP2_SUBTYPE_SSL_VERSION]) + struct.pack("!H", 7) + b"TLSv1.3"
                     + bytes([PP2_SUBTYPE_SSL_CIPHER]) + struct.pack("!H", 22)
                     + b"TLS_AES_256_GCM_SHA384")
    tlvs = [(PP2_TYPE_SSL, value), (PP2_TYPE_AUTHORITY, b"imap.example.com"),
            (PP2_TYPE_UNIQUE_ID, b"1-abcdef")]
    header = encode_v2(("192.0.2.1", 5), ("192.0.2.2", 6), tlvs)
    decoded = parse_all(header)[0]
    assert decoded.tlvs == tuple(tlvs)
    assert parse_tlvs(decoded.tlvs[0][1][5:]) == (
        (PP2_SUBTYPE_SSL_VERSION, b"TLSv1.3"), (PP2_SUBTYPE_SSL_CIPHER, b"TLS_AES_256_GCM_SHA384"))
    assert ssl_tlv(None, None) == b"\x01\x00\x00\x00\x00"
    assert ssl_tlv("TLSv1.2", None) == b"\x01\x00\x00\x00\x00\x21\x00\x07TLSv1.2"


def test_matches_the_dovecot_verified_ssl_tlv():
    sub = b"\x21" + struct.pack("!H", 7) + b"TLSv1.3"
    assert ssl_tlv("TLSv1.3", None) == b"\x01" + struct.pack("!I", 0) + sub


@pytest.mark.parametrize("source, destination, expected", [
    (("192.0.2.1", 1), ("192.0.2.2", 2), b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r\n"),
    (("2001:db8::1", 1), ("2001:db8::2", 2), b"PROXY TCP6 2001:db8::1 2001:db8::2 1 2\r\n"),
    (("::ffff:192.0.2.1", 1), ("192.0.2.2", 2), b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r\n"),
    (("192.0.2.1", 1), ("2001:db8::2", 2), b"PROXY UNKNOWN\r\n"),
    (None, None, b"PROXY UNKNOWN\r\n"),
])
def test_encode_v1(source, destination, expected):
    assert encode_v1(source, destination) == expected
    assert len(expected) <= V1_MAX_LENGTH


def test_encode_v1_longest_header_fits_and_twisted_agrees():
    longest = ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe", 65535)
    header = encode_v1(longest, longest)
    assert len(header) <= V1_MAX_LENGTH
    info = V1Parser.parse(header[:-2])
    assert info.source.port == 65535
    with pytest.raises(ValueError):
        encode_v1(("192.0.2.1", 1), None)


# --- decoder --------------------------------------------------------------------------------


@pytest.mark.parametrize("header, source, destination", [
    (b"PROXY TCP4 192.0.2.1 192.0.2.2 1234 993\r\n", ("192.0.2.1", 1234), ("192.0.2.2", 993)),
    (b"PROXY TCP6 2001:DB8::1 ::1 1 2\r\n", ("2001:db8::1", 1), ("::1", 2)),
    (b"PROXY UNKNOWN\r\n", None, None),
    (b"PROXY UNKNOWN whatever follows 1 2 3\r\n", None, None),
])
def test_decode_v1(header, source, destination):
    decoded, rest = parse_all(header + b"a1 CAPABILITY\r\n")
    assert decoded == ProxyHeader(1, "PROXY", source, destination)
    assert rest == b"a1 CAPABILITY\r\n"


@pytest.mark.parametrize("header", [
    b"PROXY TCP4 192.0.2.1 192.0.2.2 1234 993\n",
    b"PROXY \r\n",
    b"PROXY TCP5 1.2.3.4 1.2.3.4 1 2\r\n",
    b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2 3\r\n",
    b"PROXY TCP4 1.2.3.4  1.2.3.4 1 2\r\n",
    b"PROXY TCP4 1.2.3.4 1.2.3.4 1\r\n",
    b"PROXY TCP4 ::1 1.2.3.4 1 2\r\n",
    b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n",
    b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n",
    b"PROXY TCP4 1.2.3.04 1.2.3.4 1 2\r\n",
    b"PROXY TCP4 1.2.3.4 1.2.3.4 65536 2\r\n",
    b"PROXY TCP4 1.2.3.4 1.2.3.4 +1 2\r\n",
    b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2 \r\n",
    b"PROXY TCP4 1.2.3.4 1.2.3.\xff 1 2\r\n",
    b"PROXY tcp4 1.2.3.4 1.2.3.4 1 2\r\n",
])
def test_decode_v1_rejects(header):
    with pytest.raises(ProxyHeaderError) as info:
        ProxyHeaderParser().feed(header)
    assert not isinstance(info.value, NotAProxyHeader)


def test_v1_length_limit():
    parser = ProxyHeaderParser()
    assert parser.feed(b"PROXY UNKNOWN " + b"x" * (V1_MAX_LENGTH - 15)) is None
    with pytest.raises(ProxyHeaderError, match="too long"):
        parser.feed(b"xx")
    exact = b"PROXY UNKNOWN " + b"x" * (V1_MAX_LENGTH - 16) + b"\r\n"
    assert len(exact) == V1_MAX_LENGTH
    assert parse_all(exact)[0].source is None
    with pytest.raises(ProxyHeaderError):
        ProxyHeaderParser().feed(exact[:-2] + b"x\r\n")


def test_decode_v2_proxy_and_local():
    header = reference_v2("192.0.2.1", 40000, "198.51.100.7", 993)
    assert parse_all(header + b"rest")[0] == ProxyHeader(
        2, "PROXY", ("192.0.2.1", 40000), ("198.51.100.7", 993))
    local, rest = parse_all(reference_v2("", 0, "", 0, local=True) + b"\x16\x03\x01")
    assert local == ProxyHeader(2, "LOCAL", None, None)
    assert rest == b"\x16\x03\x01"


def test_v2_local_ignores_its_block():
    block = b"\xff" * 7  # not even valid TLVs
    header = SIG + bytes([0x20, 0x11]) + struct.pack("!H", len(block)) + block
    assert parse_all(header)[0] == ProxyHeader(2, "LOCAL", None, None)


def v2(version_command: int, family: int, block: bytes) -> bytes:
    return SIG + bytes([version_command, family]) + struct.pack("!H", len(block)) + block


TCP4_BLOCK = socket.inet_aton("192.0.2.1") * 2 + struct.pack("!HH", 1, 2)


@pytest.mark.parametrize("header", [
    v2(0x11, 0x11, TCP4_BLOCK),  # version 1 in a v2 signature
    v2(0x31, 0x11, TCP4_BLOCK),
    v2(0x22, 0x11, TCP4_BLOCK),  # unknown command
    v2(0x21, 0x12, TCP4_BLOCK),  # UDP
    v2(0x21, 0x31, b"\0" * 216),  # AF_UNIX
    v2(0x21, 0x10, TCP4_BLOCK),
    v2(0x21, 0x41, TCP4_BLOCK),
    v2(0x21, 0x11, TCP4_BLOCK[:11]),
    v2(0x21, 0x21, TCP4_BLOCK),
    v2(0x21, 0x11, TCP4_BLOCK + b"\x01\x00"),  # truncated TLV header
    v2(0x21, 0x11, TCP4_BLOCK + b"\x01\x00\x05abc"),  # TLV longer than the block
    v2(0x21, 0x00, b"\x01"),
])
def test_decode_v2_rejects(header):
    with pytest.raises(ProxyHeaderError) as info:
        ProxyHeaderParser().feed(header)
    assert not isinstance(info.value, NotAProxyHeader)


def test_v2_length_cap_is_checked_before_the_body_arrives():
    parser = ProxyHeaderParser()
    with pytest.raises(ProxyHeaderError, match="too long"):
        parser.feed(SIG + bytes([0x21, 0x11]) + struct.pack("!H", DEFAULT_V2_MAX_LENGTH + 1))
    small = ProxyHeaderParser(max_v2_length=64)
    with pytest.raises(ProxyHeaderError):
        small.feed(v2(0x21, 0x11, TCP4_BLOCK + bytes([PP2_TYPE_ALPN]) + b"\x00\x40" + b"x" * 64))
    assert ProxyHeaderParser(max_v2_length=12).feed(v2(0x21, 0x11, TCP4_BLOCK)) is not None


@pytest.mark.parametrize("data", [b"a", b"a1 LOGIN", b"\x16\x03\x01\x02", b"GET / HTTP/1.1",
                                  b"PROXY\t", b"PROXz", b"\r\n\r\n\x00\r\nQUIx", b"\r\r"])
def test_not_a_header_is_decided_early_and_keeps_the_bytes(data):
    parser = ProxyHeaderParser()
    with pytest.raises(NotAProxyHeader) as info:
        parser.feed(data)
    assert info.value.data == data
    assert info.value.args == ("not a PROXY protocol header",)


@pytest.mark.parametrize("prefix", [b"", b"P", b"PROXY", b"PROXY ", b"\r", b"\r\n\r\n\x00\r\nQU",
                                    SIG, SIG + b"\x21\x11\x00"])
def test_header_prefixes_wait_for_more(prefix):
    assert ProxyHeaderParser().feed(prefix) is None


def test_not_a_header_after_a_split():
    parser = ProxyHeaderParser()
    assert parser.feed(b"PRO") is None
    with pytest.raises(NotAProxyHeader) as info:
        parser.feed(b"TOCOL")
    assert info.value.data == b"PROTOCOL"


def test_feeding_after_the_header_accumulates_rest():
    parser = ProxyHeaderParser()
    header = parser.feed(b"PROXY UNKNOWN\r\nab")
    assert parser.feed(b"cd") is header
    assert parser.rest == b"abcd"
    assert parser.header is header


# --- properties -----------------------------------------------------------------------------

ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
ports = st.integers(0, 65535)
tlv_lists = st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=40)), max_size=5)


def canonical(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    ip = ipaddress.ip_address(host)
    mapped = getattr(ip, "ipv4_mapped", None)
    return mapped or ip


@given(st.one_of(st.tuples(ipv4, ipv4), st.tuples(ipv6, ipv6), st.tuples(ipv4, ipv6)),
       ports, ports, tlv_lists, st.binary(max_size=20))
def test_v2_round_trip_on_every_split(addresses, src_port, dst_port, tlvs, rest):
    (src, dst) = addresses
    data = encode_v2((src, src_port), (dst, dst_port), tlvs) + rest
    whole, whole_rest = parse_all(data)
    bytewise, bytewise_rest = parse_bytewise(data)
    assert whole == bytewise and whole_rest == bytewise_rest == rest
    assert whole.command == "PROXY" and whole.tlvs == tuple(tlvs)
    families = {canonical(src).version, canonical(dst).version}
    if len(families) == 1 or ipaddress.ip_address(src).version == ipaddress.ip_address(dst).version:
        assert canonical(whole.source[0]) == canonical(src) and whole.source[1] == src_port
        assert canonical(whole.destination[0]) == canonical(dst)
        oracle = V2Parser.parse(data[: len(data) - len(rest)])
        assert ipaddress.ip_address(oracle.source.host) == ipaddress.ip_address(whole.source[0])
        assert oracle.destination.port == dst_port
    else:
        assert whole.source is None and whole.destination is None


@given(st.one_of(st.tuples(ipv4, ipv4), st.tuples(ipv6, ipv6)), ports, ports,
       st.binary(max_size=20))
def test_v1_round_trip_on_every_split(addresses, src_port, dst_port, rest):
    src, dst = addresses
    header = encode_v1((src, src_port), (dst, dst_port))
    whole, whole_rest = parse_all(header + rest)
    assert parse_bytewise(header + rest) == (whole, whole_rest)
    assert whole_rest == rest
    assert canonical(whole.source[0]) == canonical(src)
    assert (whole.source[1], whole.destination[1]) == (src_port, dst_port)
    oracle = V1Parser.parse(header[:-2])
    assert ipaddress.ip_address(oracle.source.host) == ipaddress.ip_address(whole.source[0])


def outcome(chunks: list[bytes]):
    """What a parser makes of ``chunks``: the header and rest, or the error class."""
    parser = ProxyHeaderParser(max_v2_length=256)
    try:
        for chunk in chunks:
            header = parser.feed(chunk)
            assert len(parser._buffer) <= max(V1_MAX_LENGTH, 16 + 256) + len(chunk)
    except NotAProxyHeader as error:
        assert error.data == b"".join(chunks)[: len(error.data)]
        return "not-a-header"
    except ProxyHeaderError:
        return "error"
    return (header, parser.rest) if header is not None else None


prefixes = st.sampled_from([b"", b"PROXY ", b"PROXY TCP4 ", b"PROXY UNKNOWN", SIG,
                            SIG + b"\x21\x11\x00\x0c", SIG + b"\x20", SIG + b"\x21\x00\x00"])


@given(prefixes, st.binary(max_size=300), st.data())
def test_arbitrary_bytes_give_only_declared_errors_on_any_split(prefix, noise, data):
    stream = prefix + noise
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)])]
    assert outcome(chunks) == outcome([stream])


@given(st.binary(max_size=2000))
def test_buffering_is_bounded(noise):
    parser = ProxyHeaderParser(max_v2_length=64)
    stream = SIG + b"\x21\x11" + noise
    for index in range(0, len(stream), 7):
        try:
            parser.feed(stream[index:index + 7])
        except ProxyHeaderError:
            return
        assert len(parser._buffer) <= 16 + 64 or parser.header is not None


# --- truncated and oversized headers, every split point ---------------------------------------

#: Valid headers of every kind the decoder accepts: v1 TCP4/TCP6/UNKNOWN, v2 PROXY with TLVs,
#: v2 LOCAL (whose block, if any, is ignored) and v2 AF_UNSPEC.
addresses_of_one_family = st.one_of(st.tuples(ipv4, ipv4), st.tuples(ipv6, ipv6))
v1_headers = st.one_of(
    st.builds(lambda a, p, q: encode_v1((a[0], p), (a[1], q)), addresses_of_one_family,
              ports, ports),
    st.just(b"PROXY UNKNOWN\r\n"),
    st.binary(max_size=80).filter(lambda b: b"\n" not in b and b"\r" not in b)
    .map(lambda junk: b"PROXY UNKNOWN " + junk + b"\r\n"),
)
v2_headers = st.one_of(
    st.builds(lambda a, p, q, t: encode_v2((a[0], p), (a[1], q), t),
              st.one_of(addresses_of_one_family, st.tuples(ipv4, ipv6)), ports, ports,
              tlv_lists),
    st.just(encode_v2(None, None)),
    st.binary(max_size=60).map(lambda block: v2(0x20, 0x11, block)),  # LOCAL, block ignored
    st.builds(lambda t: v2(0x21, 0x00, b"".join(struct.pack("!BH", k, len(v)) + v
                                                for k, v in t)), tlv_lists),
)
valid_headers = st.one_of(v1_headers, v2_headers)


def feed_chunks(chunks: list[bytes], **kwargs):
    """The decoder's verdict on ``chunks``: ``(header, rest)``, None (incomplete), or the
    error class and message; asserts the buffer bound after every chunk."""
    parser = ProxyHeaderParser(**kwargs)
    limit = max(V1_MAX_LENGTH, V2_HEADER_FIXED_LENGTH + parser.max_v2_length)
    header = None
    try:
        for chunk in chunks:
            header = parser.feed(chunk)
            assert len(parser._buffer) <= limit
    except ProxyHeaderError as error:
        return type(error), str(error)
    return (header, parser.rest) if header is not None else None


V2_HEADER_FIXED_LENGTH = 16


@given(valid_headers)
def test_every_truncation_of_a_valid_header_waits_for_more(header):
    """A header cut anywhere (including a v2 body shorter than its declared length) is
    neither an error nor a result: the decoder waits for the rest, whatever the split."""
    for cut in range(len(header)):
        assert feed_chunks([header[:cut]]) is None
        assert feed_chunks([header[i:i + 1] for i in range(cut)]) is None
    assert feed_chunks([header]) is not None


@given(valid_headers, st.binary(max_size=24))
def test_every_two_chunk_split_gives_the_same_header_and_rest(header, rest):
    data = header + rest
    whole = feed_chunks([data])
    assert isinstance(whole, tuple) and isinstance(whole[0], ProxyHeader)
    assert whole[1] == rest
    for cut in range(len(data) + 1):
        assert feed_chunks([data[:cut], data[cut:]]) == whole
    assert feed_chunks([data[i:i + 1] for i in range(len(data))]) == whole


@given(st.sampled_from([0x20, 0x21]), st.sampled_from([0x00, 0x11, 0x21]),
       st.integers(0, 600), st.data())
def test_oversized_v2_is_refused_as_soon_as_its_length_is_known(command, family, max_length,
                                                                data):
    """The declared length is checked on the 16th byte, before any of the body is buffered,
    on every split of the fixed part; exactly ``max_v2_length`` is still accepted."""
    declared = data.draw(st.integers(max_length + 1, 0xFFFF))
    fixed = SIG + bytes([command, family]) + struct.pack("!H", declared)
    for cut in range(V2_HEADER_FIXED_LENGTH):  # the 16th byte always comes in the 2nd chunk
        parser = ProxyHeaderParser(max_v2_length=max_length)
        assert parser.feed(fixed[:cut]) is None
        with pytest.raises(ProxyHeaderError, match="too long"):
            parser.feed(fixed[cut:] + b"\0" * data.draw(st.integers(0, 40)))
    at_limit = v2(0x20, family, b"\xaa" * max_length)  # LOCAL: the block is ignored
    assert feed_chunks([at_limit], max_v2_length=max_length) == (
        ProxyHeader(2, "LOCAL", None, None), b"")


@given(st.binary(max_size=200).filter(lambda b: b"\n" not in b), st.data())
def test_oversized_v1_is_refused_at_the_limit_on_every_split(junk, data):
    """A v1 line without LF: incomplete while shorter than ``V1_MAX_LENGTH``, refused as too
    long once that many bytes are buffered, wherever the segments are cut."""
    line = b"PROXY " + junk
    cut = data.draw(st.integers(0, len(line)))
    verdict = feed_chunks([line[:cut], line[cut:]])
    if len(line) < V1_MAX_LENGTH:
        assert verdict is None
    else:
        assert verdict == (ProxyHeaderError, "PROXY v1 header too long")
        assert feed_chunks([line[:V1_MAX_LENGTH - 1]]) is None


@given(st.integers(0, V1_MAX_LENGTH - 8).flatmap(
    lambda n: st.tuples(st.just(n), st.binary(min_size=n, max_size=n)
                        .filter(lambda b: b"\n" not in b and b"\r" not in b))))
def test_v1_lines_up_to_the_limit_are_never_too_long(sized):
    """``PROXY UNKNOWN`` lines of every length up to 107 bytes (CRLF included) parse."""
    length, junk = sized
    line = b"PROXY UNKNOWN" + (b" " + junk if junk else b"") + b"\r\n"
    if len(line) > V1_MAX_LENGTH:
        return
    assert feed_chunks([line]) == (ProxyHeader(1, "PROXY", None, None), b"")


@given(addresses_of_one_family, ports, ports, tlv_lists, st.data())
def test_a_v2_block_cut_short_is_an_error_unless_cut_between_tlvs(addresses, src_port,
                                                                  dst_port, tlvs, data):
    """A v2 PROXY header whose length field agrees with a block cut short (a sender that
    truncated it): inside the addresses or inside a TLV it is an error on every split;
    exactly between TLVs it is a valid header with the TLVs before the cut."""
    header = encode_v2((addresses[0], src_port), (addresses[1], dst_port), tlvs)
    block = header[V2_HEADER_FIXED_LENGTH:]
    keep = data.draw(st.integers(0, len(block) - 1)) if block else 0
    truncated = header[:14] + struct.pack("!H", keep) + block[:keep]
    address_size = 12 if header[13] == 0x11 else 36
    boundaries, offset = {address_size: 0}, address_size
    for number, (_, value) in enumerate(tlvs, start=1):
        offset += 3 + len(value)
        boundaries[offset] = number
    verdicts = {repr(feed_chunks([truncated[:cut], truncated[cut:]]))
                for cut in range(len(truncated) + 1)}
    assert len(verdicts) == 1
    verdict = feed_chunks([truncated])
    if keep in boundaries:
        assert verdict[0].tlvs == tuple(tlvs[:boundaries[keep]])
    else:
        assert verdict[0] is ProxyHeaderError
        assert not issubclass(verdict[0], NotAProxyHeader)
