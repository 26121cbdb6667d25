"""HTTP/1.1 messages as :mod:`stalroute.http.wire` reads and writes them, sans-IO: the
events, body framing (``Content-Length``, chunked, close-delimited; read and written) and
the serialising of heads.

Bodies are framed here rather than by llhttp (see :mod:`stalroute.http.wire` for why).
A chunked body is read strictly (:class:`ChunkedReader`): hex sizes of at most 16 digits with
nothing between size and ``;``, extensions and trailers without control characters
(trailers are checked, then dropped), CRLF everywhere, lines bounded. Writing follows what
h11 did (:func:`frame_response`), so that clients see the same framing as before.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence

__all__ = [
    "CLOSED", "END", "NEED_DATA", "PAUSED", "Body", "BodyReader", "BodyWriter",
    "ChunkedReader", "Closed", "End", "Event", "Framing", "Headers", "LengthReader",
    "RequestHead", "ResponseHead",
    "Signal", "UntilClose", "WireError", "frame_request", "frame_response",
    "informational_head", "tokens",
]

Headers = list[tuple[bytes, bytes]]


class WireError(Exception):
    """A message that cannot be read (or written) as HTTP/1.1; ``status``: the answer to a
    client's malformed request."""

    def __init__(self, reason: str, status: int = 400) -> None:
        super().__init__(reason)
        self.status = status


class Signal:
    """What a reader returns instead of an event."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


#: More bytes are needed for the next event.
NEED_DATA = Signal("NEED_DATA")
#: The message is complete; the next one waits until the reader is told to go on.
PAUSED = Signal("PAUSED")


# --- events -------------------------------------------------------------------------------------


class RequestHead:
    """A request line and its headers (names as sent), with what the framing needs."""

    __slots__ = ("method", "target", "headers", "http_version", "content_length", "chunked",
                 "keep_alive", "expect_continue", "upgrade", "host")

    def __init__(self, method: bytes, target: bytes, headers: Headers,
                 http_version: bytes = b"1.1") -> None:
        self.method = method
        self.target = target
        self.headers = headers
        self.http_version = http_version
        self.content_length = 0
        self.chunked = False
        self.keep_alive = http_version == b"1.1"
        self.expect_continue = False
        self.upgrade = False
        #: The first ``Host`` (the head check allows one).
        self.host: bytes | None = None
        for name, value in headers:
            lowered = name.lower()
            if lowered == b"content-length":
                # The head check made sure every value is the same number.
                self.content_length = int(value.split(b",", 1)[0])
            elif lowered == b"transfer-encoding":
                self.chunked = True  # the head check allows nothing else
            elif lowered == b"connection":
                if b"close" in tokens(value):
                    self.keep_alive = False
            elif lowered == b"expect":
                if http_version == b"1.1" and b"100-continue" in tokens(value):
                    self.expect_continue = True
            elif lowered == b"host":
                if self.host is None:
                    self.host = value
            elif lowered == b"upgrade" and any(tokens(value)):
                self.upgrade = True  # proposes a protocol switch (as h11 read it)

    @property
    def has_body(self) -> bool:
        return self.chunked or self.content_length > 0


class ResponseHead:
    """A status line and its headers; ``status`` < 200 is informational (``101`` switches
    protocols)."""

    __slots__ = ("status", "reason", "headers", "http_version")

    def __init__(self, status: int, reason: bytes, headers: Headers,
                 http_version: bytes = b"1.1") -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.http_version = http_version

    @property
    def informational(self) -> bool:
        return self.status < 200


class Body:
    """Body bytes, unframed."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


class End:
    """The message is complete."""

    __slots__ = ()


class Closed:
    """The peer closed the connection (after :class:`End`, if the message was complete)."""

    __slots__ = ()


END = End()
CLOSED = Closed()

#: What the readers return, besides :data:`NEED_DATA` and :data:`PAUSED`.
Event = RequestHead | ResponseHead | Body | End | Closed


def tokens(value: bytes) -> list[bytes]:
    """The lowercased items of a comma-separated header value."""
    return [part.strip(b" \t").lower() for part in value.split(b",")]


# --- bodies -------------------------------------------------------------------------------------

_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})(?:;[^\x00-\x08\x0a-\x1f\x7f]*)?")
_TRAILER = re.compile(rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+:[^\x00-\x08\x0a-\x1f\x7f]*")
class _ChunkPart(enum.Enum):
    """What a chunked body reader expects next."""

    SIZE = enum.auto()
    DATA = enum.auto()
    DATA_END = enum.auto()
    TRAILERS = enum.auto()


class ChunkedReader:
    """A chunked body, strictly: ``size[;extension]CRLF data CRLF`` … ``0`` CRLF, trailers
    (checked, dropped), CRLF. Lines are bounded by ``limit``."""

    __slots__ = ("_state", "_remaining", "_limit", "_trailer_bytes")

    def __init__(self, limit: int) -> None:
        self._state = _ChunkPart.SIZE
        self._remaining = 0
        self._limit = limit
        self._trailer_bytes = 0

    def _line(self, buffer: bytearray) -> bytes | None:
        end = buffer.find(b"\r\n")
        if end < 0:
            if len(buffer) > self._limit:
                raise WireError("chunk line too long")
            if b"\n" in buffer or b"\r" in buffer[:-1]:
                # Refused now, not once the line ends: h11 ends trailers at a bare LF.
                raise WireError("bare CR or LF in the chunked body")
            return None
        line = bytes(buffer[:end])
        del buffer[:end + 2]
        if b"\r" in line or b"\n" in line:
            raise WireError("bare CR or LF in the chunked body")
        return line

    def next(self, buffer: bytearray) -> Body | End | Signal:
        while True:
            state = self._state
            if state is _ChunkPart.DATA:
                if not buffer:
                    return NEED_DATA
                size = min(self._remaining, len(buffer))
                data = bytes(buffer[:size])
                del buffer[:size]
                self._remaining -= size
                if not self._remaining:
                    self._state = _ChunkPart.DATA_END
                return Body(data)
            if state is _ChunkPart.SIZE:
                line = self._line(buffer)
                if line is None:
                    return NEED_DATA
                match = _CHUNK_SIZE.fullmatch(line)
                if match is None:
                    raise WireError("invalid chunk size")
                self._remaining = int(match.group(1), 16)
                self._state = _ChunkPart.DATA if self._remaining else _ChunkPart.TRAILERS
            elif state is _ChunkPart.DATA_END:
                if len(buffer) < 2:
                    if buffer[:1] not in (b"", b"\r"):
                        raise WireError("chunk data longer than its size")
                    return NEED_DATA
                if buffer[:2] != b"\r\n":
                    raise WireError("chunk data longer than its size")
                del buffer[:2]
                self._state = _ChunkPart.SIZE
            else:  # trailers, dropped
                line = self._line(buffer)
                if line is None:
                    return NEED_DATA
                if not line:
                    return END
                self._trailer_bytes += len(line) + 2
                if self._trailer_bytes > self._limit:
                    raise WireError("trailers too long")
                if _TRAILER.fullmatch(line) is None:
                    raise WireError("invalid trailer")


class LengthReader:
    """A body of ``Content-Length`` bytes (none: ``0``)."""

    __slots__ = ("_remaining",)

    def __init__(self, length: int) -> None:
        self._remaining = length

    def next(self, buffer: bytearray) -> Body | End | Signal:
        remaining = self._remaining
        if not remaining:
            return END
        if not buffer:
            return NEED_DATA
        if len(buffer) <= remaining:
            data = bytes(buffer)
            buffer.clear()
        else:
            data = bytes(buffer[:remaining])
            del buffer[:remaining]
        self._remaining = remaining - len(data)
        return Body(data)


class UntilClose:
    """A response body delimited by the connection's end."""

    __slots__ = ()

    def next(self, buffer: bytearray) -> Body | End | Signal:
        if not buffer:
            return NEED_DATA
        data = bytes(buffer)
        buffer.clear()
        return Body(data)


BodyReader = ChunkedReader | LengthReader | UntilClose


# --- serialising --------------------------------------------------------------------------------

class Framing(enum.Enum):
    """How a message body is delimited on the wire."""

    NONE = enum.auto()
    LENGTH = enum.auto()
    CHUNKED = enum.auto()
    CLOSE = enum.auto()


class BodyWriter:
    """Frames one message's body as its head announced it."""

    __slots__ = ("_kind", "_remaining", "finished")

    def __init__(self, kind: Framing, length: int = 0) -> None:
        self._kind = kind
        self._remaining = length
        self.finished = False

    def data(self, data: bytes) -> bytes:
        kind = self._kind
        if self.finished:
            raise WireError("body after the end of the message")
        if kind is Framing.LENGTH:
            if len(data) > self._remaining:
                raise WireError("more body than its Content-Length")
            self._remaining -= len(data)
            return data
        if kind is Framing.CHUNKED:
            return b"%x\r\n%s\r\n" % (len(data), data) if data else b""
        if kind is Framing.CLOSE or not data:
            return data
        raise WireError("a body where the message has none")

    def end(self) -> bytes:
        if self.finished:
            raise WireError("the message already ended")
        self.finished = True
        if self._kind is Framing.LENGTH and self._remaining:
            raise WireError("less body than its Content-Length")
        return b"0\r\n\r\n" if self._kind is Framing.CHUNKED else b""


def _head(start: bytes, headers: Sequence[tuple[bytes, bytes]]) -> bytes:
    return b"".join([start, *[b"%s: %s\r\n" % header for header in headers], b"\r\n"])


def frame_request(method: bytes, target: bytes, headers: Sequence[tuple[bytes, bytes]], *,
                  chunked: bool, length: int) -> tuple[bytes, BodyWriter]:
    """An HTTP/1.1 request head, and the writer of its body (chunked, else ``length``)."""
    writer = BodyWriter(Framing.CHUNKED) if chunked else BodyWriter(Framing.LENGTH, length)
    return _head(b"%s %s HTTP/1.1\r\n" % (method, target), headers), writer


def informational_head(status: int, reason: bytes,
                       headers: Sequence[tuple[bytes, bytes]]) -> bytes:
    return _head(b"HTTP/1.1 %d %s\r\n" % (status, reason), headers)


def frame_response(response: ResponseHead, *, method: bytes, http10: bool,
                   keep_alive: bool) -> tuple[bytes, BodyWriter, bool]:
    """A final response head for a client, its body writer, and whether the connection must
    close after it — as h11 frames it: a body of unknown length (or chunked) goes chunked to
    an HTTP/1.1 client and close-delimited (without ``Content-Length``) to an HTTP/1.0 one;
    ``Connection: close`` is added whenever the connection is not kept; a response to
    ``HEAD`` keeps the headers a ``GET`` would get and has no body."""
    headers = response.headers
    status = response.status
    kind: Framing | None = None  # unknown length
    length = 0
    connection: list[bytes] = []
    for name, value in headers:
        lowered = name.lower()
        if lowered == b"transfer-encoding":
            kind = Framing.CHUNKED
        elif lowered == b"content-length":
            if kind is not Framing.CHUNKED:
                kind = Framing.LENGTH
                length = int(value.split(b",", 1)[0])
        elif lowered == b"connection":
            connection.extend(tokens(value))
    if status in (204, 304):
        kind = Framing.NONE
    need_close = False
    if kind is Framing.CHUNKED or kind is None:
        headers = [h for h in headers
                   if h[0].lower() not in (b"content-length", b"transfer-encoding")]
        if http10:
            kind = Framing.CLOSE
            need_close = method != b"HEAD"
        else:
            kind = Framing.CHUNKED
            headers.append((b"Transfer-Encoding", b"chunked"))
    if not keep_alive or need_close:
        wanted = sorted(({token for token in connection if token} - {b"keep-alive"})
                        | {b"close"})
        if sorted(set(connection)) != wanted:
            headers = [h for h in headers if h[0].lower() != b"connection"]
            headers.extend((b"Connection", token) for token in wanted)
        connection = wanted
    must_close = b"close" in connection
    if method == b"HEAD":
        kind = Framing.NONE
    data = _head(b"HTTP/1.1 %d %s\r\n" % (status, response.reason), headers)
    return data, BodyWriter(kind, length), must_close
