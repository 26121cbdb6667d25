"""HTTP/1.1 framing of both legs (:mod:`stalroute.http.wire`, :mod:`stalroute.http.framing`):
sans-IO, with hypothesis. h11, which framed both legs before, is the reference for how
responses are framed for clients."""

from __future__ import annotations

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stalroute.http.wire import (
    CLOSED, END, NEED_DATA, PAUSED, Body, RequestHead, RequestReader, ResponseHead,
    ResponseReader, WireError, frame_request, frame_response, informational_head,
)

LIMIT = 65536


def read_requests(data: bytes, sizes: list[int] | None = None, limit: int = LIMIT,
                  ) -> list[object]:
    """Every event of every request in ``data`` fed in pieces of ``sizes``, body data merged
    per message; ``("error", status)`` ends the list on a refusal."""
    reader = RequestReader(limit)
    events: list[object] = []
    pieces = _split(data, sizes)
    for piece in pieces:
        reader.receive(piece)
        while True:
            try:
                event = reader.next_event()
            except WireError as exc:
                events.append(("error", exc.status))
                return events
            if event is NEED_DATA:
                break
            if event is PAUSED:
                if reader.request is not None and reader.request.upgrade:
                    events.append(("leftover", reader.leftover()))
                    return events
                reader.start_next()
                continue
            events.append(_simple(event))
            if event is END and not (reader.request is not None and reader.request.upgrade):
                reader.start_next()
    return _merge(events)


def read_responses(data: bytes, methods: list[bytes], sizes: list[int] | None = None,
                   lost: bool = False) -> list[object]:
    reader = ResponseReader(LIMIT)
    methods = list(methods)
    reader.expect(methods.pop(0))
    events: list[object] = []
    for piece in _split(data, sizes):
        reader.receive(piece)
        while True:
            try:
                event = reader.next_event()
            except WireError as exc:
                events.append(("error", str(exc)))
                return _merge(events)
            if event is NEED_DATA or event is PAUSED:
                break
            events.append(_simple(event))
            if event is END:
                events.append(("keep_alive", reader.keep_alive))
                if methods:
                    reader.expect(methods.pop(0))
            elif isinstance(event, ResponseHead) and event.status == 101:
                events.append(("leftover", reader.leftover()))
                return _merge(events)
    if lost:
        events.extend(_simple(event) for event in reader.connection_lost())
    return _merge(events)


def _split(data: bytes, sizes: list[int] | None) -> list[bytes]:
    if not sizes:
        return [data]
    pieces, offset = [], 0
    for size in sizes:
        if offset >= len(data):
            break
        pieces.append(data[offset:offset + size])
        offset += size
    if offset < len(data):
        pieces.append(data[offset:])
    return pieces


def _simple(event: object) -> object:
    if isinstance(event, RequestHead):
        return ("request", event.method, event.target, tuple(event.headers), event.http_version)
    if isinstance(event, ResponseHead):
        return ("response", event.status, event.reason, tuple(event.headers))
    if isinstance(event, Body):
        return ("data", event.data)
    if event is END:
        return "end"
    if event is CLOSED:
        return "closed"
    raise AssertionError(event)


def _merge(events: list[object]) -> list[object]:
    merged: list[object] = []
    for event in events:
        if isinstance(event, tuple) and event[0] == "data" and merged \
                and isinstance(merged[-1], tuple) and merged[-1][0] == "data":
            merged[-1] = ("data", merged[-1][1] + event[1])
        else:
            merged.append(event)
    return merged


# -- requests -------------------------------------------------------------------------------


GET = b"GET /jmap/session?x=1 HTTP/1.1\r\nHost: mail.test\r\nX-Case: Kept \r\n\r\n"


def test_a_request_head_keeps_names_as_sent() -> None:
    assert read_requests(GET) == [
        ("request", b"GET", b"/jmap/session?x=1",
         ((b"Host", b"mail.test"), (b"X-Case", b"Kept")), b"1.1"),
        "end"]


def test_content_length_and_chunked_bodies() -> None:
    post = b"POST /a HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello"
    assert read_requests(post)[1:] == [("data", b"hello"), "end"]
    chunked = (b"POST /a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"5;name=value;x=\"q\"\r\nhello\r\n0A\r\n, world!!!\r\n"
               b"0;last\r\nX-Trailer: dropped\r\nX-Other:\r\n\r\n")
    assert read_requests(chunked)[1:] == [("data", b"hello, world!!!"), "end"]


@pytest.mark.parametrize("body", [
    b"zz\r\n",  # not hex
    b"5 \r\nhello\r\n0\r\n\r\n",  # whitespace after the size
    b" 5\r\nhello\r\n0\r\n\r\n",  # before it
    b"0x5\r\nhello\r\n0\r\n\r\n",
    b"-5\r\nhello\r\n0\r\n\r\n",
    b"5\nhello\r\n0\r\n\r\n",  # bare LF
    b"5\r\nhelloX\r\n0\r\n\r\n",  # more data than the size
    b"5;a\x00b\r\nhello\r\n0\r\n\r\n",  # control character in an extension
    b"5\r\nhello\r\n0\r\nBad Trailer: x\r\n\r\n",
    b"5\r\nhello\r\n0\r\nX: a\rb\r\n\r\n",
    b"12345678901234567\r\n",  # 17 hex digits
    b"5\r\nhello\r\n0\r\n\nGET",  # a bare LF ending the trailers (h11 took it): refused at once
    b"5\r\nhello\r\n0\r\nX: 1\rY",
])
def test_malformed_chunked_bodies_are_refused(body: bytes) -> None:
    head = b"POST /a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
    events = read_requests(head + body)
    assert events[-1] == ("error", 400), events


def test_a_chunk_line_without_end_is_bounded() -> None:
    head = b"POST /a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert read_requests(head + b"5;" + b"x" * 2000, limit=1024)[-1] == ("error", 400)


def test_heads_are_judged_by_the_head_check_first() -> None:
    smuggled = (b"POST /a HTTP/1.1\r\nHost: h\r\nContent-Length: 6\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    assert read_requests(smuggled) == [("error", 400)]
    assert read_requests(b"GET / HTTP/1.1\r\nHost: h\r\nX: " + b"a" * 2000 + b"\r\n\r\n",
                         limit=1024) == [("error", 431)]
    assert read_requests(b"GET / HTTP/2.0\r\nHost: h\r\n\r\n") == [("error", 505)]
    assert read_requests(b"GET / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n"
                         b"\r\n") == [("error", 501)]
    # What the check passes but llhttp refuses is refused too: a method it does not know is
    # not implemented; a target in no form it knows (authority form outside CONNECT) is
    # malformed.
    assert read_requests(b"FOO / HTTP/1.1\r\nHost: h\r\n\r\n") == [("error", 501)]
    assert read_requests(b"GET h:443 HTTP/1.1\r\nHost: h\r\n\r\n") == [("error", 400)]
    for method in (b"PROPFIND", b"REPORT", b"MKCALENDAR", b"PATCH", b"OPTIONS", b"DELETE"):
        assert read_requests(method + b" / HTTP/1.1\r\nHost: h\r\n\r\n")[0][1] == method


def test_pipelined_requests_wait_until_the_next_is_asked_for() -> None:
    reader = RequestReader(LIMIT)
    reader.receive(GET + b"POST /b HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nok" + b"GE")
    assert isinstance(reader.next_event(), RequestHead)
    assert reader.next_event() is END and reader.done
    assert reader.next_event() is PAUSED  # the next request waits, unparsed
    reader.start_next()
    head = reader.next_event()
    assert isinstance(head, RequestHead) and head.method == b"POST"
    assert isinstance(reader.next_event(), Body) and reader.next_event() is END
    reader.start_next()
    assert reader.next_event() is NEED_DATA and reader.partial_head


def test_a_complete_request_without_more_bytes_needs_data() -> None:
    reader = RequestReader(LIMIT)
    reader.receive(GET)
    reader.next_event()
    assert reader.next_event() is END
    assert reader.next_event() is NEED_DATA  # reading the client goes on
    assert not reader.partial_head


def test_an_upgrade_request_pauses_and_leaves_its_tunnel_bytes() -> None:
    upgrade = (b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
               b"\r\n\x81\x02hi")
    events = read_requests(upgrade)
    assert events[-2:] == ["end", ("leftover", b"\x81\x02hi")]
    reader = RequestReader(LIMIT)
    reader.receive(upgrade[:-4])
    reader.next_event()
    assert reader.next_event() is END and reader.next_event() is PAUSED


def test_framing_facts_of_a_request_head() -> None:
    reader = RequestReader(LIMIT)
    reader.receive(b"PUT /x HTTP/1.1\r\nHost: h\r\nExpect: 100-Continue\r\nContent-Length: 3\r\n"
                   b"Connection: keep-alive, Close\r\n\r\n")
    head = reader.next_event()
    assert isinstance(head, RequestHead)
    assert (head.content_length, head.chunked, head.keep_alive, head.has_body, head.host) == (
        3, False, False, True, b"h")
    assert reader.waiting_for_continue
    reader.receive(b"a")
    assert isinstance(reader.next_event(), Body) and not reader.waiting_for_continue
    # The head check reads a list of equal lengths as one; llhttp refuses it, and so do we.
    assert read_requests(b"PUT /x HTTP/1.1\r\nHost: h\r\nContent-Length: 3, 3\r\n\r\nabc") == [
        ("error", 400)]
    http10 = RequestReader(LIMIT)
    http10.receive(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\nExpect: 100-continue\r\n\r\n")
    head = http10.next_event()
    assert isinstance(head, RequestHead)
    assert head.http_version == b"1.0" and not head.keep_alive and not http10.waiting_for_continue


_TOKEN = st.text("abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=8).map(str.encode)
_VALUE = st.binary(max_size=12).map(
    lambda v: bytes(b if 0x21 <= b <= 0x7e else 0x61 for b in v))


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    """A few pipelined requests the head check passes: bodies by length or chunked."""
    out = b""
    for _ in range(draw(st.integers(1, 3))):
        headers = [b"Host: h"] + [b"X-" + n + b": " + v for n, v in
                                  draw(st.lists(st.tuples(_TOKEN, _VALUE), max_size=4))]
        kind = draw(st.sampled_from(["none", "length", "chunked"]))
        body = draw(st.binary(max_size=40))
        if kind == "length":
            headers.append(b"Content-Length: %d" % len(body))
            framed = body
        elif kind == "chunked":
            headers.append(b"Transfer-Encoding: chunked")
            cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=3)))
            framed, start = b"", 0
            for cut in cuts + [len(body)]:
                if cut > start:
                    ext = draw(st.sampled_from([b"", b";a=b", b';x="y z"']))
                    framed += b"%x%s\r\n%s\r\n" % (cut - start, ext, body[start:cut])
                start = cut
            trailer = draw(st.sampled_from([b"", b"X-T: 1\r\n"]))
            framed += b"0\r\n" + trailer + b"\r\n"
        else:
            framed = b""
        method = b"POST" if kind != "none" else b"GET"
        out += method + b" /p HTTP/1.1\r\n" + b"\r\n".join(headers) + b"\r\n\r\n" + framed
    return out


@settings(max_examples=200)
@given(requests(), st.lists(st.integers(1, 30), max_size=30))
def test_request_events_do_not_depend_on_how_the_bytes_are_split(data: bytes,
                                                                  sizes: list[int]) -> None:
    whole = read_requests(data)
    assert read_requests(data, sizes) == whole
    assert not any(isinstance(event, tuple) and event[0] == "error" for event in whole)


@settings(max_examples=200)
@given(requests())
def test_requests_read_as_h11_reads_them(data: bytes) -> None:
    ours = [e for e in read_requests(data)]
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    theirs: list[object] = []
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            break
        if event is h11.PAUSED:
            conn.start_next_cycle()
            continue
        if isinstance(event, h11.Request):
            theirs.append(("request", event.method, event.target, tuple(event.headers.raw_items()),
                           event.http_version))
        elif isinstance(event, h11.Data):
            theirs.append(("data", event.data))
        elif isinstance(event, h11.EndOfMessage):
            theirs.append("end")
            conn.send(h11.Response(status_code=200, headers=[(b"Content-Length", b"0")]))
            conn.send(h11.EndOfMessage())
            if conn.their_state is h11.DONE and not conn.trailing_data[0]:
                conn.start_next_cycle()
    assert ours == _merge(theirs)


# -- responses -------------------------------------------------------------------------------


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Case: Kept\r\n\r\nhello"


def test_a_response_with_length_then_another() -> None:
    assert read_responses(OK + OK, [b"GET", b"GET"]) == [
        ("response", 200, b"OK", ((b"Content-Length", b"5"), (b"X-Case", b"Kept"))),
        ("data", b"hello"), "end", ("keep_alive", True)] * 2


def test_a_response_to_head_has_no_body_whatever_its_length() -> None:
    events = read_responses(OK[:-5] + OK, [b"HEAD", b"GET"])
    assert events[1:3] == ["end", ("keep_alive", True)]
    assert events[4:] == [("data", b"hello"), "end", ("keep_alive", True)]


@pytest.mark.parametrize("status", [204, 304])
def test_no_body_statuses(status: int) -> None:
    head = b"HTTP/1.1 %d X\r\nContent-Length: 5\r\n\r\n" % status
    events = read_responses(head + OK, [b"GET", b"GET"])
    assert events[1:3] == ["end", ("keep_alive", True)] and events[4] == ("data", b"hello")


def test_informational_responses_come_first() -> None:
    events = read_responses(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\n"
                            b"Link: </s>\r\n\r\n" + OK, [b"POST"])
    assert [e[1] for e in events if isinstance(e, tuple) and e[0] == "response"] == [
        100, 103, 200]


def test_switching_protocols_leaves_the_tunnel_bytes() -> None:
    for head in (b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                 b"Upgrade: websocket\r\n\r\n",
                 b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n"):
        events = read_responses(head + b"\x81\x02hi", [b"GET"])
        assert events[0][1] == 101 and events[-1] == ("leftover", b"\x81\x02hi")


def test_a_close_delimited_body_ends_with_the_connection() -> None:
    data = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nall of it"
    assert read_responses(data, [b"GET"], sizes=[20, 7], lost=True)[1:] == [
        ("data", b"all of it"), "end", "closed"]
    # One cut short by the close only closes.
    assert read_responses(OK[:-2], [b"GET"], lost=True)[-2:] == [("data", b"hel"), "closed"]


def test_chunked_response_and_keep_alive() -> None:
    data = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            b"3;x=y\r\nabc\r\n0\r\nX-T: 1\r\n\r\n")
    assert read_responses(data, [b"GET"])[1:] == [("data", b"abc"), "end", ("keep_alive", False)]
    http10 = b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n"
    assert read_responses(http10, [b"GET"])[-1] == ("keep_alive", False)


@pytest.mark.parametrize("data", [
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX-A: a\r\n b\r\n\r\n",
    b"HTTP/1.1 200 OK\nX-A: a\n\n",
    b"HTTP/1.1 2000 OK\r\n\r\n",
    b"NOTHTTP\r\n\r\n",
])
def test_invalid_responses(data: bytes) -> None:
    assert read_responses(data, [b"GET"])[-1][0] == "error"


def test_bytes_when_no_response_is_due_are_an_error() -> None:
    events = read_responses(OK + b"HTTP/1.1 408 Timeout\r\n\r\n", [b"GET"])
    assert events[-1][0] == "error"
    reader = ResponseReader(LIMIT)
    assert reader.idle and reader.next_event() is NEED_DATA
    reader.receive(b"x")
    with pytest.raises(WireError):
        reader.next_event()


def test_a_response_head_is_bounded() -> None:
    reader = ResponseReader(1024)
    reader.expect(b"GET")
    reader.receive(b"HTTP/1.1 200 OK\r\nX: " + b"a" * 2000)
    with pytest.raises(WireError):
        reader.next_event()


@settings(max_examples=200)
@given(st.sampled_from(["length", "chunked", "none"]), st.binary(max_size=60),
       st.lists(st.integers(1, 20), max_size=20))
def test_response_events_do_not_depend_on_how_the_bytes_are_split(kind: str, body: bytes,
                                                                   sizes: list[int]) -> None:
    head = ResponseHead(200, b"OK", [(b"Content-Length", b"%d" % len(body))] if kind == "length"
                        else [])
    data, writer, _ = frame_response(head, method=b"GET", http10=False, keep_alive=True)
    data += writer.data(body[:7]) + writer.data(body[7:]) + writer.end()
    whole = read_responses(data, [b"GET"])
    assert read_responses(data, [b"GET"], sizes) == whole
    assert ("data", body) in whole or not body


# -- serialising -----------------------------------------------------------------------------


def h11_response(request: bytes, status: int, headers: list[tuple[bytes, bytes]],
                 body: bytes) -> bytes:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(request)
    while not isinstance(conn.next_event(), h11.EndOfMessage):
        pass
    out = conn.send(h11.Response(status_code=status, headers=headers, reason=b"R")) or b""
    if body:
        out += conn.send(h11.Data(data=body)) or b""
    return out + (conn.send(h11.EndOfMessage()) or b"")


@pytest.mark.parametrize("request_bytes", [
    b"GET / HTTP/1.1\r\nHost: h\r\n\r\n",
    b"HEAD / HTTP/1.1\r\nHost: h\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
    b"GET / HTTP/1.0\r\n\r\n",
    b"HEAD / HTTP/1.0\r\n\r\n",
])
@pytest.mark.parametrize("status, headers", [
    (200, [(b"Content-Length", b"5")]),
    (200, []),
    (200, [(b"Content-Type", b"text/event-stream")]),
    (204, []),
    (304, [(b"ETag", b'"x"')]),
    (404, [(b"Content-Length", b"5"), (b"Connection", b"close")]),
    (200, [(b"Connection", b"keep-alive"), (b"X-A", b"1")]),
])
def test_responses_are_framed_as_h11_framed_them(request_bytes: bytes, status: int,
                                                 headers: list[tuple[bytes, bytes]]) -> None:
    reader = RequestReader(LIMIT)
    reader.receive(request_bytes)
    request = reader.next_event()
    assert isinstance(request, RequestHead)
    body = b"hello" if status not in (204, 304) and request.method != b"HEAD" else b""
    data, writer, must_close = frame_response(
        ResponseHead(status, b"R", list(headers)), method=request.method,
        http10=request.http_version == b"1.0", keep_alive=request.keep_alive)
    if body:
        data += writer.data(body)
    data += writer.end()
    assert data == h11_response(request_bytes, status, list(headers), body)
    assert must_close == (b"connection: close" in data.lower())


def test_body_writers_refuse_what_the_head_does_not_announce() -> None:
    _, writer, _ = frame_response(ResponseHead(200, b"OK", [(b"Content-Length", b"3")]),
                                  method=b"GET", http10=False, keep_alive=True)
    assert writer.data(b"ab") == b"ab"
    with pytest.raises(WireError):
        writer.data(b"cd")
    _, short, _ = frame_response(ResponseHead(200, b"OK", [(b"Content-Length", b"3")]),
                                 method=b"GET", http10=False, keep_alive=True)
    short.data(b"a")
    with pytest.raises(WireError):
        short.end()
    _, none, _ = frame_response(ResponseHead(204, b"No Content", []), method=b"GET",
                                http10=False, keep_alive=True)
    with pytest.raises(WireError):
        none.data(b"x")
    assert none.end() == b""
    with pytest.raises(WireError):
        none.end()


@settings(max_examples=100)
@given(st.lists(st.tuples(_TOKEN, _VALUE), max_size=5), st.binary(max_size=50),
       st.booleans(), st.lists(st.integers(0, 50), max_size=4))
def test_a_request_written_reads_back_the_same(headers, body, chunked, cuts) -> None:
    fields = [(b"Host", b"h")] + [(b"X-" + n, v) for n, v in headers]
    if chunked:
        fields.append((b"Transfer-Encoding", b"chunked"))
    else:
        fields.append((b"Content-Length", b"%d" % len(body)))
    data, writer = frame_request(b"PUT", b"/x?y", fields, chunked=chunked, length=len(body))
    start = 0
    for cut in sorted(c for c in cuts if c <= len(body)) + [len(body)]:
        data += writer.data(body[start:cut])
        start = cut
    data += writer.end()
    events = read_requests(data)
    assert events[0] == ("request", b"PUT", b"/x?y", tuple(fields), b"1.1")
    assert events[1:] == ([("data", body)] if body else []) + ["end"]


def test_informational_head() -> None:
    assert informational_head(100, b"Continue", []) == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert informational_head(101, b"Switching Protocols", [(b"Upgrade", b"websocket")]) == (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n")
