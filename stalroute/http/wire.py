"""HTTP/1.1 reading for both legs, sans-IO: heads parsed by llhttp (httptools), one message
at a time; bodies framed by :mod:`stalroute.http.framing`, which also serialises what is
sent (its names are re-exported here).

Why this shape:

* **One message at a time.** llhttp would parse a pipelined request as soon as it is fed,
  before the strict head check (:class:`~stalroute.http.headers.HeadGuard`) has judged it.
  So the readers keep the unparsed bytes themselves, find where a head ends, and feed llhttp
  exactly that head (a fresh parser per head costs half a microsecond). The bytes after the
  current message wait, unparsed, until the caller asks for the next one (``PAUSED``).
* **Bodies are not framed by llhttp**: it cannot be told that a response answers a ``HEAD``
  (it would wait for the body its ``Content-Length`` announces), it skips the body of a
  request that asks for an upgrade, it does not say where a message ended within what it was
  fed, and httptools does not expose ``llhttp_finish`` (a body delimited by the connection's
  end).
* **Serialising** follows what h11 did (:func:`~stalroute.http.framing.frame_response`).

Pull API like h11's: :meth:`RequestReader.next_event` / :meth:`ResponseReader.next_event`
return one event, :data:`NEED_DATA` or :data:`PAUSED`, and raise :class:`WireError`.
"""

from __future__ import annotations

import enum
from httptools import (
    HttpParserError, HttpParserInvalidMethodError, HttpParserUpgrade, HttpRequestParser,
    HttpResponseParser,
)

from stalroute.http.framing import (
    CLOSED, END, NEED_DATA, PAUSED, Body, BodyReader, BodyWriter, ChunkedReader, Closed, End,
    Headers, LengthReader, RequestHead, ResponseHead, Signal, UntilClose, WireError,
    frame_request, frame_response, informational_head, tokens,
)
from stalroute.http.headers import HeadGuard, find_head_end

__all__ = [
    "CLOSED", "END", "NEED_DATA", "PAUSED", "Body", "BodyWriter", "Closed", "End",
    "RequestHead", "RequestReader", "ResponseHead", "ResponseReader", "WireError",
    "frame_request", "frame_response", "informational_head", "parse_request_head",
    "parse_response_head",
]


# --- heads, through llhttp -----------------------------------------------------------------------


class _Collector:
    """httptools callbacks: what one head holds."""

    __slots__ = ("target", "reason", "headers", "complete")

    def __init__(self) -> None:
        self.target = b""
        self.reason = b""
        self.headers: Headers = []
        self.complete = False

    def on_url(self, url: bytes) -> None:
        self.target += url

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        # llhttp strips the whitespace before a value, not after it.
        self.headers.append((name, value.rstrip(b" \t")))

    def on_headers_complete(self) -> None:
        self.complete = True


def parse_request_head(head: bytes) -> RequestHead:
    """A complete request head (the head check passed it) as llhttp reads it."""
    collector = _Collector()
    parser = HttpRequestParser(collector)
    try:
        parser.feed_data(head)
    except HttpParserUpgrade:
        pass  # an upgrade request: nothing but its head was fed
    except HttpParserInvalidMethodError:
        # A token the head check passed, but no method llhttp knows (h11 took any token).
        raise WireError("method not implemented", 501) from None
    except HttpParserError as exc:
        raise WireError(f"malformed request: {exc}") from None
    if not collector.complete:
        raise WireError("malformed request")
    # The method and version as sent: the head check read the request line
    # (``token SP target SP HTTP/1.x``), llhttp knows them.
    line_end = head.index(b"\r\n")
    return RequestHead(head[:head.index(b" ")], collector.target, collector.headers,
                       head[line_end - 3:line_end])


def parse_response_head(head: bytes) -> ResponseHead:
    """A complete response head as llhttp reads it."""
    collector = _Collector()
    parser = HttpResponseParser(collector)
    try:
        parser.feed_data(head)
    except HttpParserUpgrade:
        pass
    except HttpParserError as exc:
        # A 101 without ``Connection: upgrade`` stops llhttp after the head all the same.
        if not (collector.complete and parser.get_status_code() == 101):
            raise WireError(f"invalid response: {exc}") from None
    if not collector.complete:
        raise WireError("invalid response")
    # llhttp (strict) took ``HTTP/x.y`` and CRLF-terminated fields without obs-fold, so no
    # value holds a line break. Any version but 1.1 is read as 1.0 (no keep-alive).
    return ResponseHead(parser.get_status_code(), collector.reason, collector.headers,
                        b"1.1" if head[5:8] == b"1.1" else b"1.0")


# --- readers -------------------------------------------------------------------------------------

class _Reading(enum.Enum):
    """Where a reader is in its stream of messages."""

    HEAD = enum.auto()
    BODY = enum.auto()
    DONE = enum.auto()
    IDLE = enum.auto()
    SWITCHED = enum.auto()


class RequestReader:
    """The client leg: requests read one at a time.

    Each head is judged by the :class:`~stalroute.http.headers.HeadGuard` first, then parsed
    by llhttp; its body follows as :class:`Body` events and :class:`End`. After that the
    reader is :data:`PAUSED` (pipelined bytes wait unparsed) until :meth:`start_next`.
    """

    def __init__(self, max_head_size: int) -> None:
        self._buffer = bytearray()
        self._guard = HeadGuard(max_head_size)
        self._limit = max_head_size
        self._state = _Reading.HEAD
        self._body: BodyReader = LengthReader(0)
        #: The request being read (or answered).
        self.request: RequestHead | None = None
        #: The client sent ``Expect: 100-continue`` and waits: nothing of its body was read
        #: and nothing was answered yet (the caller clears it when it answers).
        self.waiting_for_continue = False

    def receive(self, data: bytes) -> None:
        self._buffer += data

    @property
    def partial_head(self) -> bool:
        """Part of a head arrived (and no request is being read)."""
        return self._state is _Reading.HEAD and bool(self._buffer)

    @property
    def done(self) -> bool:
        """The current request was read whole."""
        return self._state is _Reading.DONE

    def next_event(self) -> RequestHead | Body | End | Signal:
        state = self._state
        if state is _Reading.BODY:
            event = self._body.next(self._buffer)
            if event is not NEED_DATA:
                self.waiting_for_continue = False
                if event is END:
                    self._state = _Reading.DONE
            return event
        buffer = self._buffer
        if state is not _Reading.HEAD:
            # Read whole: what follows waits; so does all else while a switch is possible.
            request = self.request
            if buffer or (request is not None and request.upgrade):
                return PAUSED
            return NEED_DATA
        end, problem = self._guard.check(buffer)
        if problem is not None:
            raise WireError(problem.reason, problem.status)
        if end is None:
            return NEED_DATA
        head = bytes(buffer[:end])
        del buffer[:end]
        self._guard.next_request()
        request = self.request = parse_request_head(head)
        self.waiting_for_continue = request.expect_continue
        self._body = (ChunkedReader(self._limit) if request.chunked
                      else LengthReader(request.content_length))
        self._state = _Reading.BODY
        return request

    def start_next(self) -> None:
        """The response to the request read is complete: read the next one."""
        self._state = _Reading.HEAD
        self.request = None
        self.waiting_for_continue = False

    def leftover(self) -> bytes:
        """The bytes not read (after a protocol switch: the tunnel's first bytes)."""
        leftover = bytes(self._buffer)
        self._buffer.clear()
        return leftover


class ResponseReader:
    """The backend leg: the response to each request sent (:meth:`expect`), informational
    ones (``1xx``) first. After ``101`` the reader stops (:meth:`leftover` is the tunnel's).
    A response to ``HEAD``, and a ``204`` or ``304``, has no body whatever its headers say; one
    with neither length nor chunked coding ends when the connection does
    (:meth:`connection_lost`). Bytes while no response is expected are an error."""

    def __init__(self, max_head_size: int) -> None:
        self._buffer = bytearray()
        self._limit = max_head_size
        self._state = _Reading.IDLE
        self._scanned = 0
        self._method = b""
        self._body: BodyReader = LengthReader(0)
        #: The connection may carry another request after this response.
        self.keep_alive = True

    def receive(self, data: bytes) -> None:
        self._buffer += data

    @property
    def idle(self) -> bool:
        """No response expected, none under way."""
        return self._state is _Reading.IDLE and not self._buffer

    def expect(self, method: bytes) -> None:
        """A request with ``method`` was sent: its response comes next."""
        if self._state is not _Reading.IDLE:
            raise WireError("a request sent before the previous response ended")
        self._method = method
        self._state = _Reading.HEAD
        self._scanned = 0

    def next_event(self) -> ResponseHead | Body | End | Signal:
        state = self._state
        buffer = self._buffer
        if state is _Reading.BODY:
            event = self._body.next(buffer)
            if event is END:
                self._state = _Reading.IDLE
            return event
        if state is _Reading.HEAD:
            start, self._scanned = self._scanned, len(buffer)
            end = find_head_end(buffer, start)
            if end is None:
                if len(buffer) > self._limit:
                    raise WireError("response head too large")
                return NEED_DATA
            head = bytes(buffer[:end])
            del buffer[:end]
            self._scanned = 0
            response = parse_response_head(head)
            if response.status < 200:
                if response.status == 101:
                    self._state = _Reading.SWITCHED
                return response
            self._frame(response)
            self._state = _Reading.BODY
            return response
        if state is _Reading.IDLE:
            if buffer:
                raise WireError("bytes from the backend while no response is due")
            return NEED_DATA
        return PAUSED  # switched protocols

    def _frame(self, response: ResponseHead) -> None:
        close = response.http_version != b"1.1"
        chunked = False
        length: int | None = None
        for name, value in response.headers:
            lowered = name.lower()
            if lowered == b"transfer-encoding":
                if chunked or tokens(value) != [b"chunked"]:
                    raise WireError("invalid response: only Transfer-Encoding: chunked")
                chunked = True
            elif lowered == b"content-length":
                length = int(value)  # llhttp refused anything but one number
            elif lowered == b"connection":
                close = close or b"close" in tokens(value)
        if self._method == b"HEAD" or response.status in (204, 304):
            self._body = LengthReader(0)
        elif chunked:
            self._body = ChunkedReader(self._limit)
        elif length is not None:
            self._body = LengthReader(length)
        else:
            self._body = UntilClose()
            close = True
        self.keep_alive = not close

    def connection_lost(self) -> list[End | Closed]:
        """The backend closed: the end of a body delimited by it, then :class:`Closed`."""
        if self._state is _Reading.BODY and isinstance(self._body, UntilClose):
            self._state = _Reading.IDLE
            return [END, CLOSED]
        return [CLOSED]

    def leftover(self) -> bytes:
        leftover = bytes(self._buffer)
        self._buffer.clear()
        return leftover
