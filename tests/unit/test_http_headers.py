"""HTTP head checks and header rewriting (SPEC §5 HTTP smuggling defences, §2.3/§2.6
``forwarded``): sans-IO, with hypothesis. h11 is the oracle for "a head we accept parses"."""

from __future__ import annotations

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stalroute.http.headers import (
    HOP_BY_HOP,
    Forwarding,
    backend_request_headers,
    check_partial_head,
    check_request_head,
    client_response_headers,
    connection_options,
    find_head_end,
    forwarded_element,
    is_websocket_upgrade,
)
from stalroute.http.headers import _check_lines as check_line_by_line

TOKEN_CHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
NAME = st.text(alphabet=TOKEN_CHARS, min_size=1, max_size=16).filter(
    lambda n: n.lower() not in ("content-length", "transfer-encoding", "host"))
VALUE = st.binary(max_size=40).map(
    lambda b: bytes(c for c in b if c == 9 or 0x20 <= c <= 0x7E or c >= 0x80).strip(b" \t"))
HEADER = st.tuples(NAME.map(str.encode), VALUE)


def head(request_line: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    return request_line + b"\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in headers) + b"\r\n"


def h11_parses(data: bytes) -> h11.Request:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    event = conn.next_event()
    assert isinstance(event, h11.Request), event
    return event


VALID = head(b"POST /jmap HTTP/1.1", [(b"Host", b"mail.example.org"),
                                      (b"Content-Length", b"5")])


# --- the raw head checks ------------------------------------------------------------------------


def test_a_plain_head_passes() -> None:
    assert check_request_head(VALID) is None
    assert check_request_head(head(b"GET / HTTP/1.0", [])) is None  # HTTP/1.0 needs no Host


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (head(b"POST / HTTP/1.1", [(b"Host", b"h"), (b"Content-Length", b"5"),
                                   (b"Transfer-Encoding", b"chunked")]), 400),
        (head(b"POST / HTTP/1.1", [(b"Host", b"h"), (b"Content-Length", b"5"),
                                   (b"Content-Length", b"6")]), 400),
        (head(b"POST / HTTP/1.1", [(b"Host", b"h"), (b"Content-Length", b"5, 6")]), 400),
        (head(b"POST / HTTP/1.1", [(b"Host", b"h"), (b"Content-Length", b"+5")]), 400),
        (head(b"POST / HTTP/1.1", [(b"Host", b"h"), (b"Content-Length", b"0x5")]), 400),
        (head(b"POST / HTTP/1.1", [(b"Host", b"h"), (b"Transfer-Encoding", b"chunked"),
                                   (b"Transfer-Encoding", b"chunked")]), 400),
        (head(b"POST / HTTP/1.1", [(b"Host", b"h"), (b"Transfer-Encoding", b"chunked, x")]), 400),
        (head(b"POST / HTTP/1.1", [(b"Host", b"h"), (b"Transfer-Encoding", b"xchunked")]), 400),
        (head(b"POST / HTTP/1.1", [(b"Host", b"h"), (b"Transfer-Encoding", b"gzip, chunked")]),
         501),
        (head(b"POST / HTTP/1.1", [(b"Host", b"h"), (b"Transfer-Encoding", b"chunked\x0b")]),
         400),
        (head(b"POST / HTTP/1.0", [(b"Transfer-Encoding", b"chunked")]), 400),
        (b"GET / HTTP/1.1\r\nHost: h\r\nX-A: 1\r\n  folded\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: h\r\n\tX-A: 1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\nHost: h\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: h\n\n", 400),
        (b"GET / HTTP/1.1\r\nHost: h\rX-Smuggle: 1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost : h\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: h\r\nBad Name: 1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: h\r\nNoColon\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: h\r\nX: a\x00b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n\r\n", 400),
        (b"GET  / HTTP/1.1\r\nHost: h\r\n\r\n", 400),
        (b"GET / HTTP/2.0\r\nHost: h\r\n\r\n", 505),
        (b"\r\nGET / HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    ],
)
def test_ambiguous_heads_are_refused(raw: bytes, status: int) -> None:
    end = find_head_end(raw)
    assert end is not None
    problem = check_request_head(raw[:end])
    assert problem is not None and problem.status == status, problem


def test_partial_heads() -> None:
    assert check_partial_head(b"GET / HTTP/1.1\r\nHost: h\r", 1024) is None
    assert check_partial_head(b"GET / HTTP/1.1\nHo", 1024).status == 400
    assert check_partial_head(b"GET / HTTP/1.1\rX", 1024).status == 400
    assert check_partial_head(b"\x16\x03\x01\x02\x00", 1024).status == 400  # a TLS hello
    assert check_partial_head(b"GET /" + b"a" * 2000, 1024).status == 431


@st.composite
def heads(draw) -> bytes:
    """Heads that are valid, nearly valid, or framed in every way SPEC §5 names."""
    method = draw(st.sampled_from([b"GET", b"POST", b"PUT", b"PROPFIND", b"G\x01T"]))
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0"]))
    lines = [method + b" /x?y=1 " + version]
    headers = draw(st.lists(HEADER, max_size=5))
    if draw(st.booleans()):
        headers.append((b"Host", b"mail.example.org"))
    for _ in range(draw(st.integers(0, 2))):
        headers.append((draw(st.sampled_from([b"Content-Length", b"content-length",
                                              b"Transfer-Encoding"])),
                        draw(st.sampled_from([b"5", b"0", b"5, 5", b"7", b"chunked",
                                              b"Chunked", b"gzip", b" 5"]))))
    headers = draw(st.permutations(headers))
    lines += [n + b": " + v for n, v in headers]
    data = b"\r\n".join(lines) + b"\r\n\r\n"
    if draw(st.booleans()):  # one stray byte somewhere
        position = draw(st.integers(0, len(data) - 4))
        data = data[:position] + draw(st.sampled_from([b"\r", b"\n", b" ", b"\t", b"\x00"])) \
            + data[position:]
    return data


@settings(max_examples=500)
@given(st.one_of(heads(), st.binary(max_size=200).map(lambda b: b"GET / HTTP/1.1\r\n" + b),
                 st.lists(st.sampled_from([b"GET /a HTTP/1.1", b"GET /a HTTP/1.0", b"\r\n",
                                           b"\r", b"\n", b"Host: h", b"HOST:h ",
                                           b"Content-Length: 5", b"transfer-encoding:chunked",
                                           b"X: \t", b" ", b"\x00", b"\x80", b":", b"X-Host: a",
                                           b"Hostx: b"]), max_size=12).map(b"".join)))
def test_the_clean_head_shortcut_agrees_with_the_line_by_line_reading(data: bytes) -> None:
    end = find_head_end(data)
    head_bytes = data if end is None else data[:end]
    assert check_request_head(head_bytes) == check_line_by_line(head_bytes)


@settings(max_examples=400)
@given(heads())
def test_what_we_accept_h11_parses_with_the_same_framing(data: bytes) -> None:
    end = find_head_end(data)
    if end is None:
        return
    if check_request_head(data[:end]) is not None:
        return
    request = h11_parses(data[:end])
    names = [name for name, _ in request.headers]
    assert not (b"content-length" in names and b"transfer-encoding" in names)
    assert names.count(b"transfer-encoding") <= 1
    assert names.count(b"host") <= 1


@given(st.integers(0, len(VALID) - 3), st.sampled_from([b"\r", b"\n"]))
def test_any_bare_cr_or_lf_is_refused(position: int, byte: bytes) -> None:
    data = VALID[:position] + byte + VALID[position:]
    end = find_head_end(data)
    problem = check_request_head(data[:end]) if end is not None else \
        check_partial_head(data, 65536)
    assert problem is not None and problem.status == 400


# --- hop-by-hop and forwarding --------------------------------------------------------------------

CLIENT = Forwarding(client_ip="192.0.2.7", proto="https")


@given(st.lists(st.tuples(st.sampled_from([*HOP_BY_HOP, b"x-a", b"Accept", b"Connection",
                                            b"X-Secret", b"Authorization"]), VALUE),
                max_size=10),
       st.lists(st.sampled_from([b"x-secret", b"close", b"keep-alive", b"host",
                                 b"content-length", b"authorization"]), max_size=3))
def test_hop_by_hop_and_listed_headers_never_reach_the_backend(headers, listed) -> None:
    headers = [(b"Host", b"h"), *headers, (b"Connection", b", ".join(listed))]
    out = backend_request_headers(headers, CLIENT)
    names = [name.lower() for name, _ in out]
    assert not HOP_BY_HOP & set(names)
    for name in listed:
        if name in (b"host", b"content-length"):
            continue  # framing and routing headers cannot be removed that way
        assert name not in names
    assert b"host" in names


def test_request_rewrite_keeps_end_to_end_headers_in_order() -> None:
    headers = [(b"Host", b"h"), (b"Accept", b"*/*"), (b"TE", b"trailers"),
               (b"Keep-Alive", b"timeout=5"), (b"Cookie", b"a=1"), (b"Cookie", b"b=2")]
    assert backend_request_headers(headers, CLIENT) == [
        (b"Host", b"h"), (b"Accept", b"*/*"), (b"Cookie", b"a=1"), (b"Cookie", b"b=2")]


def test_chunked_websocket_expect_and_host_options() -> None:
    headers = [(b"Host", b"h"), (b"Expect", b"100-continue"), (b"Connection", b"Upgrade"),
               (b"Upgrade", b"websocket"), (b"Transfer-Encoding", b"chunked")]
    out = backend_request_headers(headers, CLIENT, websocket=True, drop_expect=True,
                                  chunked=True, host=b"node:8080")
    assert out == [(b"Host", b"node:8080"), (b"Transfer-Encoding", b"chunked"),
                   (b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")]


SPOOFED = [(b"Host", b"mail.example.org"), (b"X-Forwarded-For", b"6.6.6.6"),
           (b"Forwarded", b"for=6.6.6.6"), (b"X-Real-IP", b"6.6.6.6"),
           (b"X-Forwarded-Proto", b"http")]


def test_forwarded_off_strips_what_the_client_claims() -> None:
    assert backend_request_headers(SPOOFED, CLIENT) == [(b"Host", b"mail.example.org")]
    appended = dict(backend_request_headers(SPOOFED, Forwarding("192.0.2.7", "https",
                                                                append=True)))
    assert appended[b"X-Forwarded-For"] == b"192.0.2.7"
    assert appended[b"Forwarded"] == b'for=192.0.2.7;host=mail.example.org;proto=https'
    assert appended[b"X-Forwarded-Proto"] == b"https"
    assert appended[b"X-Forwarded-Host"] == b"mail.example.org"
    assert b"X-Real-IP" not in appended


def test_forwarded_trust_keeps_and_extends() -> None:
    kept = backend_request_headers(SPOOFED, Forwarding("192.0.2.7", "https", trust=True))
    assert (b"X-Forwarded-For", b"6.6.6.6") in kept and (b"X-Real-IP", b"6.6.6.6") in kept
    extended = dict(backend_request_headers(
        SPOOFED, Forwarding("192.0.2.7", "https", trust=True, append=True)))
    assert extended[b"X-Forwarded-For"] == b"6.6.6.6, 192.0.2.7"
    assert extended[b"Forwarded"] == b"for=6.6.6.6, for=192.0.2.7;host=mail.example.org;" \
                                     b"proto=https"
    assert extended[b"X-Forwarded-Proto"] == b"http"  # the client's own hop said so


@given(st.lists(st.sampled_from([b"1.2.3.4", b"10.0.0.1, 10.0.0.2", b"unknown"]), max_size=3),
       st.booleans())
def test_our_client_is_always_the_last_hop(previous, trust) -> None:
    headers = [(b"Host", b"h"), *((b"X-Forwarded-For", v) for v in previous)]
    out = dict(backend_request_headers(headers, Forwarding("2001:db8::1", "http", trust=trust,
                                                           append=True)))
    hops = [hop.strip() for hop in out[b"X-Forwarded-For"].split(b",")]
    assert hops[-1] == b"2001:db8::1"
    assert len(hops) == 1 + (sum(len(v.split(b",")) for v in previous) if trust else 0)


@pytest.mark.parametrize(
    ("ip", "expected"),
    [("192.0.2.1", b"for=192.0.2.1;proto=http"),
     ("2001:db8::1", b'for="[2001:db8::1]";proto=http'),
     ("::ffff:192.0.2.1", b"for=192.0.2.1;proto=http")],
)
def test_forwarded_element(ip: str, expected: bytes) -> None:
    assert forwarded_element(ip, "http", None) == expected
    assert forwarded_element(ip, "http", b"h:443").endswith(b';host="h:443";proto=http')


def test_response_rewrite() -> None:
    headers = [(b"Content-Type", b"text/plain"), (b"Transfer-Encoding", b"chunked"),
               (b"Content-Length", b"9"), (b"Connection", b"keep-alive, X-Internal"),
               (b"X-Internal", b"1"), (b"Keep-Alive", b"timeout=5"), (b"Set-Cookie", b"a=1")]
    assert client_response_headers(headers) == [(b"Content-Type", b"text/plain"),
                                                (b"Set-Cookie", b"a=1")]
    assert client_response_headers([(b"Content-Length", b"3")], close=True) == [
        (b"Content-Length", b"3"), (b"Connection", b"close")]
    switching = client_response_headers(
        [(b"Upgrade", b"websocket"), (b"Connection", b"upgrade"),
         (b"Sec-WebSocket-Accept", b"x")], switching=True)
    assert switching == [(b"Sec-WebSocket-Accept", b"x"), (b"Connection", b"Upgrade"),
                         (b"Upgrade", b"websocket")]


def test_websocket_detection() -> None:
    assert is_websocket_upgrade([(b"Connection", b"keep-alive, Upgrade"),
                                 (b"Upgrade", b"WebSocket")])
    assert not is_websocket_upgrade([(b"Upgrade", b"websocket")])
    assert not is_websocket_upgrade([(b"Connection", b"upgrade"), (b"Upgrade", b"h2c")])
    assert connection_options([(b"Connection", b"Close, X-A"),
                               (b"Proxy-Connection", b"keep-alive")]) == {
        b"close", b"x-a", b"keep-alive"}


@settings(max_examples=300)
@given(heads(), st.lists(st.integers(1, 12), min_size=1, max_size=40))
def test_incremental_scanning_agrees_with_a_full_scan(data: bytes, sizes: list[int]) -> None:
    """The proxy rescans only new bytes of a head that arrives in pieces."""
    buffer, scanned, offset = bytearray(), 0, 0
    incremental = None
    for size in sizes + [len(data)]:
        buffer += data[offset:offset + size]
        offset += size
        start, scanned = scanned, len(buffer)
        end = find_head_end(buffer, start)
        if end is not None:
            incremental = ("end", end)
            break
        problem = check_partial_head(buffer, 65536, start)
        if problem is not None:
            incremental = ("refused", problem.status)
            break
        if offset >= len(data):
            break
    whole = data[:offset]
    expected_end = find_head_end(whole)
    if incremental is not None and incremental[0] == "end":
        assert incremental[1] == expected_end
    elif incremental is not None:
        # Refused early: the bytes seen so far hold no head end and are already malformed.
        prefix = bytes(buffer)
        assert find_head_end(prefix) is None and check_partial_head(prefix, 65536) is not None
    else:
        assert expected_end is None and check_partial_head(bytes(buffer), 65536) is None
