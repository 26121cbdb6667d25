"""Bounded reading for the line-based protocols (IMAP, POP3, SMTP, ManageSieve). Sans-IO.

Every pre-auth parser reads lines and, for IMAP and ManageSieve, fixed-size literals from the
same byte stream.  Keeping the bookkeeping here means each protocol states its limit once and
none of them can be talked into unbounded buffering by a peer that never sends a newline.
The literal assembler, the argument cursor and the quoting helpers are shared by IMAP and
ManageSieve, whose strings (quoted or ``{n}`` literals) are the same.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field


class ProtocolViolation(ValueError):
    """A peer sent something its protocol does not allow here (a malformed reply line)."""


class LineTooLong(ProtocolViolation):
    """A line grew past the buffer's limit before (or without) its terminator.

    A violation like any other where the caller has no better answer (an SMTP backend
    announcing the client); the pre-auth machines catch it first to answer it themselves.
    """


class LineBuffer:
    """Accumulates bytes and hands them out as lines (CRLF or bare LF) or exact-size blocks.

    The buffer itself accepts whatever it is fed; :meth:`readline` raises :exc:`LineTooLong`
    as soon as the pending line exceeds ``max_line`` bytes (terminator excluded), so a caller
    that drains it after every feed never holds more than ``max_line + 1`` bytes of a line.
    """

    def __init__(self, max_line: int) -> None:
        self.max_line = max_line
        self._data = bytearray()
        # Bytes already known not to contain "\n", so a trickling peer costs O(n), not O(n²).
        self._scanned = 0

    def __len__(self) -> int:
        return len(self._data)

    def feed(self, data: bytes) -> None:
        """Append received bytes."""
        self._data += data

    def readline(self, keepends: bool = False) -> bytes | None:
        """Return the next complete line, or None if it has not fully arrived yet.

        The terminator (CRLF, or a bare LF from lenient clients) is stripped unless
        ``keepends``; callers that relay bytes verbatim keep it.
        """
        newline = self._data.find(b"\n", self._scanned)
        if newline < 0:
            self._scanned = len(self._data)
            # The line is too long once it exceeds the limit, unless the one extra byte is
            # the CR of a CRLF whose LF has not arrived yet.
            excess = len(self._data) - self.max_line
            if excess > 1 or (excess == 1 and self._data[-1] != ord("\r")):
                raise LineTooLong("line too long")
            return None
        raw = bytes(self._data[: newline + 1])
        content_end = newline - 1 if raw.endswith(b"\r\n") else newline
        if content_end > self.max_line:
            raise LineTooLong("line too long")
        del self._data[: newline + 1]
        self._scanned = 0
        return raw if keepends else raw[:content_end]

    def read_exact(self, size: int) -> bytes | None:
        """Return exactly ``size`` bytes (an IMAP literal), or None until that many arrived."""
        if len(self._data) < size:
            return None
        block = bytes(self._data[:size])
        del self._data[:size]
        self._scanned = 0
        return block

    def take_all(self) -> bytes:
        """Remove and return everything buffered (pipelined bytes handed on after a login)."""
        data = bytes(self._data)
        self.clear()
        return data

    def clear(self) -> None:
        """Discard everything buffered (STARTTLS injection defence)."""
        self._data.clear()
        self._scanned = 0

    def discard(self, limit: int) -> int:
        """Drop up to ``limit`` buffered bytes (a refused BDAT chunk); return how many."""
        count = min(limit, len(self._data))
        del self._data[:count]
        self._scanned = 0
        return count


# --- capability lists read from backends -----------------------------------------------------

#: Most lines of a backend's capability list (POP3 CAPA, a ManageSieve capability block);
#: real servers send a dozen or two.
MAX_CAPABILITY_LINES = 64
#: Most bytes of such a list, its lines together.
MAX_CAPABILITY_BYTES = 16 * 1024


class CapabilityLines:
    """The lines of a backend's capability list, collected up to the bounds above.

    Without them a backend could make every login hold ``lines × line limit`` bytes before
    the list ends; beyond them the dialogue fails as a backend protocol error.
    """

    def __init__(self) -> None:
        self.lines: list[bytes] = []
        self._size = 0

    def add(self, line: bytes, size: int | None = None) -> bool:
        """Keep ``line`` (``size``: the bytes it took on the wire, default its length);
        False, keeping nothing, when the list would exceed a bound."""
        size = len(line) if size is None else size
        if len(self.lines) >= MAX_CAPABILITY_LINES or self._size + size > MAX_CAPABILITY_BYTES:
            return False
        self.lines.append(line)
        self._size += size
        return True


# --- texts stalroute itself puts into replies ------------------------------------------------

#: Longest operator or pipeline text (banner, temporary-failure reason) put into a reply.
MAX_REASON_LENGTH = 200


def safe_text(text: str, fallback: str) -> bytes:
    """Printable ASCII only, one line, bounded: for operator and pipeline texts in replies."""
    cleaned = "".join(char if " " <= char <= "~" else "?" for char in text[:MAX_REASON_LENGTH])
    return (cleaned.strip() or fallback).encode("ascii")


def quote(text: str) -> bytes:
    """An IMAP / ManageSieve quoted string (for values stalroute itself sends)."""
    if any(char in text for char in "\0\r\n"):
        raise ValueError("cannot quote CR, LF or NUL")
    return b'"' + text.replace("\\", "\\\\").replace('"', '\\"').encode("utf-8") + b'"'


# --- commands and responses with literals (IMAP, ManageSieve) ---------------------------------

_LITERAL = re.compile(rb"\{([0-9]+)(\+?)\}\Z")
_QUOTED = re.compile(rb'"((?:[^"\\\x00\r\n]|\\["\\])*)"')
_QUOTED_ESCAPE = re.compile(rb'\\(["\\])')


class ArgumentError(Exception):
    """Malformed arguments; answered with the protocol's syntax error, never in detail."""


class Arguments:
    """A cursor over one command or response: line texts with the literals between them.

    ``texts[i]`` is followed by ``literals[i]``; a command whose last announced literal has
    not arrived (a synchronising literal still waiting for ``+``) is ``complete=False``, and
    reading at that point fails, so its handler answers without the missing data.
    Protocols subclass it for their own tokens (IMAP tags and atoms, for instance).
    """

    def __init__(self, texts: list[bytes], literals: list[bytes], complete: bool) -> None:
        self._texts = texts
        self._literals = literals
        self._complete = complete
        self._index = 0
        self._pos = 0

    @property
    def _text(self) -> bytes:
        return self._texts[self._index]

    def _match(self, pattern: re.Pattern[bytes]) -> re.Match[bytes]:
        match = pattern.match(self._text, self._pos)
        if match is None:
            raise ArgumentError
        self._pos = match.end()
        return match

    def take(self, token: bytes) -> bool:
        """Consume ``token`` if it comes next."""
        if self._text.startswith(token, self._pos):
            self._pos += len(token)
            return True
        return False

    def space(self) -> None:
        if not self.take(b" "):
            raise ArgumentError

    def at_end(self) -> bool:
        return (self._complete and self._index == len(self._texts) - 1
                and self._pos == len(self._text))

    def end(self) -> None:
        if not self.at_end():
            raise ArgumentError

    def word(self, pattern: re.Pattern[bytes]) -> bytes:
        """The token ``pattern`` matches here (an atom, a command name)."""
        return self._match(pattern).group()

    def at_string(self) -> bool:
        """True if a quoted string or a literal comes next."""
        return (self._text.startswith(b'"', self._pos)
                or (self._pos == len(self._text) and self._index < len(self._literals)))

    def _literal(self) -> bytes | None:
        if self._pos == len(self._text) and self._index < len(self._literals):
            literal = self._literals[self._index]
            self._index += 1
            self._pos = 0
            return literal
        return None

    def string(self) -> bytes:
        """A quoted string or a literal."""
        literal = self._literal()
        if literal is not None:
            return literal
        return _QUOTED_ESCAPE.sub(rb"\1", self._match(_QUOTED).group(1))


@dataclass
class Unit:
    """One command (or response): its line texts, literals, and the raw bytes received."""

    texts: list[bytes] = field(default_factory=list)
    literals: list[bytes] = field(default_factory=list)
    raw: bytearray = field(default_factory=bytearray)
    size: int = 0

    def arguments(self, complete: bool = True) -> Arguments:
        return Arguments(self.texts, self.literals, complete)


#: :meth:`LiteralAssembler.poll` result: a synchronising literal was announced.
SYNC_LITERAL = object()


class LiteralAssembler:
    """Joins lines with the literals they announce (``{n}``, ``{n+}``) into whole units.

    ``synchronising`` is True on an IMAP server, where a ``{n}`` literal needs a ``+``
    before the client sends it: :meth:`poll` then stops so the caller can :meth:`accept` it
    or :meth:`drop` the command.  With False (IMAP and ManageSieve backends, ManageSieve
    servers, which have no literal continuation) every literal is read at once.  A unit
    longer than ``limit`` (lines and literals together) raises :exc:`LineTooLong`.
    """

    def __init__(self, limit: int, synchronising: bool) -> None:
        self.buffer = LineBuffer(limit)
        self._limit = limit
        self._synchronising = synchronising
        self._unit = Unit()
        self._literal_size: int | None = None
        self._needs_decision = False

    @property
    def partial(self) -> Unit:
        return self._unit

    def poll(self) -> Unit | object | None:
        """The next whole unit, :data:`SYNC_LITERAL`, or None when more bytes are needed."""
        while not self._needs_decision:
            if self._literal_size is not None:
                literal = self.buffer.read_exact(self._literal_size)
                if literal is None:
                    return None
                self._unit.literals.append(literal)
                self._unit.raw += literal
                self._literal_size = None
                continue
            line = self.buffer.readline(keepends=True)
            if line is None:
                return None
            text = line[:-2] if line.endswith(b"\r\n") else line[:-1]
            self._unit.raw += line
            announced = _LITERAL.search(text)
            if announced is None:
                self._add_size(len(text))
                self._unit.texts.append(text)
                unit, self._unit = self._unit, Unit()
                return unit
            self._unit.texts.append(text[: announced.start()])
            digits = announced.group(1)
            # Never int() an unbounded digit string; anything this long is over the limit.
            size = int(digits) if len(digits) <= 10 else self._limit + 1
            self._add_size(len(text) + size)
            self._literal_size = size
            self._needs_decision = self._synchronising and not announced.group(2)
        return SYNC_LITERAL

    def _add_size(self, size: int) -> None:
        self._unit.size += size
        if self._unit.size > self._limit:
            raise LineTooLong("command too long")

    def accept(self) -> None:
        """The ``+`` went out: read the literal."""
        self._needs_decision = False

    def drop(self) -> None:
        """The command was answered without its literal, which the client will not send."""
        self._unit = Unit()
        self._literal_size = None
        self._needs_decision = False

    def reset(self) -> None:
        """Forget everything, buffered bytes and any partial unit (STARTTLS)."""
        self.buffer.clear()
        self.drop()
