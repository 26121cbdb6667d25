"""Bulk mapping formats: incremental readers and writers for TSV and JSON (SPEC §8 bulk).

Pure Python with no Twisted import, so ``stalroute ctl`` shares them with the server.  The
readers consume a binary stream piece by piece and yield one :class:`Row` or :class:`BadRow`
per record, so a 100,000-row import is never held as one string.

* **TSV**: the mapping-file syntax: ``identifier<whitespace>destination`` per line, ``#``
  comments and blank lines skipped.  A line longer than :data:`MAX_LINE` is a bad row (and is
  skipped without being buffered whole).
* **JSON**: a top-level array whose elements are ``{"identifier": …, "destination": …}``
  objects (other keys ignored) or ``[identifier, destination]`` pairs; or the same elements
  one after the other (JSON Lines).  A syntax error is fatal (:class:`BulkFormatError`),
  since nothing after it can be trusted; an element of the wrong shape is a bad row.

Row numbers are the line on which the record starts, counted from 1.
"""

from __future__ import annotations

import codecs
import json
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

#: Longest TSV line accepted (an identifier is at most 512 characters).
MAX_LINE = 4096
#: Largest single JSON element accepted.
MAX_ELEMENT = 64 * 1024
#: Bytes read from the stream at a time.
CHUNK = 64 * 1024

FORMATS = ("tsv", "json")
CONTENT_TYPES = {"tsv": "text/tab-separated-values; charset=utf-8",
                 "json": "application/json"}


class BulkFormatError(ValueError):
    """The body cannot be read any further (JSON syntax); ``line`` says where."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(f"line {line}: {message}")
        self.line = line


@dataclass(frozen=True)
class Row:
    line: int
    identifier: str
    destination: str


@dataclass(frozen=True)
class BadRow:
    line: int
    reason: str


Record = Row | BadRow


def detect_format(explicit: str | None, content_type: str | None, head: bytes) -> str:
    """``explicit`` (``?format=``) wins, then the Content-Type, then the first non-blank byte
    (``[`` or ``{`` means JSON)."""
    if explicit:
        if explicit not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}")
        return explicit
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media in ("application/json", "application/x-ndjson", "application/jsonl",
                 "application/json-seq") or media.endswith("+json"):
        return "json"
    if media in ("text/tab-separated-values", "text/tsv", "text/plain"):
        return "tsv"
    return "json" if head.lstrip()[:1] in (b"[", b"{") else "tsv"


# --- TSV --------------------------------------------------------------------------------


def read_tsv(stream: BinaryIO) -> Iterator[Record]:
    """Records of a TSV body, one line at a time (lines capped at :data:`MAX_LINE`)."""
    number = 0
    while True:
        raw = stream.readline(MAX_LINE + 1)
        if not raw:
            return
        number += 1
        if len(raw) > MAX_LINE and not raw.endswith(b"\n"):
            while (rest := stream.readline(CHUNK)) and not rest.endswith(b"\n"):
                pass
            yield BadRow(number, f"line longer than {MAX_LINE} bytes")
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            yield BadRow(number, "not UTF-8")
            continue
        record = parse_tsv_line(text, number)
        if record is not None:
            yield record


def parse_tsv_line(text: str, number: int) -> Record | None:
    """One TSV line: a Row, a BadRow, or None for a comment or blank line."""
    if text.lstrip().startswith("#"):
        return None
    fields = text.split("#", 1)[0].split()
    if not fields:
        return None
    if len(fields) != 2:
        return BadRow(number, "expected 'identifier<TAB>destination'")
    return Row(number, fields[0], fields[1])


def tsv_line(identifier: str, destination: str) -> str:
    return f"{identifier}\t{destination}\n"


# --- JSON -------------------------------------------------------------------------------


class _JSONReader:
    """Pulls JSON values out of a byte stream without reading it whole."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._decode = codecs.getincrementaldecoder("utf-8")("strict").decode
        self._decoder = json.JSONDecoder()
        self._buffer = ""
        self._pos = 0
        self._eof = False
        self._line = 1  # line number at ``_counted``
        self._counted = 0

    def _fill(self) -> bool:
        """Read more; False at the end of the stream."""
        if self._eof:
            return False
        data = self._stream.read(CHUNK)
        try:
            text = self._decode(data, final=not data)
        except UnicodeDecodeError as exc:
            line = self.line_at(len(self._buffer)) + data[:exc.start].count(b"\n")
            raise BulkFormatError(line, "not UTF-8") from None
        if not data:
            self._eof = True
        if self._pos > CHUNK:  # compact, keeping the line count right
            self.line_at(self._pos)
            self._buffer = self._buffer[self._pos:]
            self._counted -= self._pos
            self._pos = 0
        self._buffer += text
        return bool(data) or bool(text)

    def line_at(self, pos: int) -> int:
        if pos > self._counted:
            self._line += self._buffer.count("\n", self._counted, pos)
            self._counted = pos
        return self._line

    def peek(self) -> str:
        """The next non-blank character ('' at the end), not consumed."""
        while True:
            while self._pos < len(self._buffer) and self._buffer[self._pos] in " \t\r\n":
                self._pos += 1
            if self._pos < len(self._buffer):
                return self._buffer[self._pos]
            if not self._fill():
                return ""

    def take(self) -> None:
        self._pos += 1

    def value(self) -> tuple[int, object]:
        """The next JSON value and the line it starts on."""
        self.peek()
        line = self.line_at(self._pos)
        while True:
            start = self._pos  # a refill may compact the buffer and move it
            try:
                value, end = self._decoder.raw_decode(self._buffer, start)
            except json.JSONDecodeError as exc:
                if len(self._buffer) - start > MAX_ELEMENT:
                    raise BulkFormatError(line, f"invalid JSON or an element larger than "
                                                f"{MAX_ELEMENT} bytes ({exc.msg})") from None
                if not self._fill():
                    raise BulkFormatError(self.line_at(min(exc.pos, len(self._buffer))),
                                          f"invalid JSON: {exc.msg}") from None
                continue
            except RecursionError:
                raise BulkFormatError(line, "JSON nested too deeply") from None
            except ValueError:  # not a JSONDecodeError: int() refused a number that long
                raise BulkFormatError(line, f"a JSON number longer than "
                                            f"{sys.get_int_max_str_digits()} digits") from None
            # A number (or literal) ending exactly at the buffer's end may go on in the
            # next chunk: read on before accepting it.
            if end == len(self._buffer) and not self._eof and self._fill():
                continue
            self._pos = end
            return line, value


def read_json(stream: BinaryIO) -> Iterator[Record]:
    """Records of a JSON array (or JSON Lines) body."""
    reader = _JSONReader(stream)
    first = reader.peek()
    if first == "":
        return
    if first != "[":  # JSON Lines: values one after the other
        while reader.peek():
            yield _record(*reader.value())
        return
    reader.take()
    if reader.peek() == "]":
        reader.take()
    else:
        while True:
            if reader.peek() == "":
                raise BulkFormatError(reader.line_at(len(reader._buffer)),
                                      "unexpected end of the array")
            yield _record(*reader.value())
            separator = reader.peek()
            if separator == ",":
                reader.take()
                continue
            if separator == "]":
                reader.take()
                break
            raise BulkFormatError(reader.line_at(reader._pos), "expected ',' or ']'")
    if reader.peek() != "":
        raise BulkFormatError(reader.line_at(reader._pos), "data after the array")


def _record(line: int, value: object) -> Record:
    if isinstance(value, dict):
        identifier, destination = value.get("identifier"), value.get("destination")
    elif isinstance(value, list) and len(value) == 2:
        identifier, destination = value
    else:
        return BadRow(line, 'expected {"identifier": ..., "destination": ...}')
    if not isinstance(identifier, str) or not isinstance(destination, str):
        return BadRow(line, "identifier and destination must be strings")
    return Row(line, identifier, destination)


def read_records(stream: BinaryIO, fmt: str) -> Iterator[Record]:
    return read_json(stream) if fmt == "json" else read_tsv(stream)


def json_lines(pairs: Iterable[tuple[str, str]]) -> Iterator[str]:
    """A JSON array with one element per line (so line numbers stay meaningful)."""
    yield "["
    separator = "\n"
    for identifier, destination in pairs:
        yield separator + json.dumps({"identifier": identifier, "destination": destination},
                                     ensure_ascii=False)
        separator = ",\n"
    yield "\n]\n"
