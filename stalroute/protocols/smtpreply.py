"""SMTP replies (RFC 5321 §4.2): reading multi-line replies from a peer, writing our own.

Used by the submission backend dialogue (greeting, EHLO, STARTTLS, XCLIENT, AUTH replies)
and by the submission pre-auth machine for its own multi-line EHLO answer.  Reading is
bounded: a reply longer than ``limit`` bytes (all its lines together) is a protocol error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from stalroute.protocols.base import MAX_PREAUTH_LINE
from stalroute.protocols.lines import LineBuffer, LineTooLong, ProtocolViolation

_LINE = re.compile(rb"([2-5][0-9][0-9])(?:([ -])(.*))?\Z", re.DOTALL)


class MalformedReply(ProtocolViolation):
    """The peer sent something that is not an SMTP reply line."""


@dataclass(frozen=True)
class SMTPReply:
    """One complete reply: its code, the text of each line, and the bytes as received."""

    code: int
    lines: tuple[bytes, ...]
    raw: bytes

    @property
    def text(self) -> bytes:
        """The first line's text (after the code)."""
        return self.lines[0]


class ReplyReader:
    """Assembles SMTP replies from received bytes (``NNN-text`` lines until ``NNN text``)."""

    def __init__(self, limit: int = MAX_PREAUTH_LINE) -> None:
        self.buffer = LineBuffer(limit)
        self._limit = limit
        self._code: bytes | None = None
        self._lines: list[bytes] = []
        self._raw = bytearray()

    def feed(self, data: bytes) -> None:
        self.buffer.feed(data)

    def next_reply(self) -> SMTPReply | None:
        """The next whole reply, or None until it has arrived.

        Raises :exc:`MalformedReply` for a line that is not a reply line (or changes code
        mid-reply) and :exc:`LineTooLong` when a line or the whole reply exceeds the limit.
        """
        while True:
            line = self.buffer.readline(keepends=True)
            if line is None:
                return None
            self._raw += line
            if len(self._raw) > self._limit:
                raise LineTooLong("reply too long")
            content = line[:-2] if line.endswith(b"\r\n") else line[:-1]
            match = _LINE.match(content)
            if match is None:
                raise MalformedReply("not an SMTP reply line")
            code, separator, text = match.groups()
            if self._code is not None and code != self._code:
                raise MalformedReply("reply code changed within a multi-line reply")
            self._code = code
            self._lines.append(text or b"")
            if separator != b"-":
                reply = SMTPReply(int(code), tuple(self._lines), bytes(self._raw))
                self._code, self._lines, self._raw = None, [], bytearray()
                return reply

    def take_all(self) -> bytes:
        """Everything received after the last complete reply (including a partial one)."""
        data = bytes(self._raw) + self.buffer.take_all()
        self._code, self._lines, self._raw = None, [], bytearray()
        return data

    def clear(self) -> None:
        self.buffer.clear()
        self._code, self._lines, self._raw = None, [], bytearray()


def ehlo_keywords(reply: SMTPReply) -> dict[str, tuple[bytes, ...]]:
    """The EHLO extensions of a 250 reply: upper-cased keyword → its parameters."""
    keywords: dict[str, tuple[bytes, ...]] = {}
    for line in reply.lines[1:]:
        words = line.split()
        if words:
            keywords[words[0].decode("ascii", "replace").upper()] = tuple(words[1:])
    return keywords


def format_reply(code: int, lines: list[bytes]) -> bytes:
    """A (multi-line) reply of ours: ``NNN-line`` for all but the last, ``NNN line``."""
    prefix = b"%d" % code
    return b"".join(prefix + (b" " if index == len(lines) - 1 else b"-") + line + b"\r\n"
                    for index, line in enumerate(lines))
