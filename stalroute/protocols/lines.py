"""A bounded receive buffer for line-based protocols (IMAP, POP3, SMTP, ManageSieve). Sans-IO.

Every pre-auth parser reads lines and, for IMAP and ManageSieve, fixed-size literals from the
same byte stream.  Keeping the bookkeeping here means each protocol states its limit once and
none of them can be talked into unbounded buffering by a peer that never sends a newline.
"""

from __future__ import annotations


class LineTooLong(ValueError):
    """A line grew past the buffer's limit before (or without) its terminator."""


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
