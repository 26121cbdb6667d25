"""What every fuzz target shares: reading the fuzzer's bytes as choices and payload, and
the invariants checked on every parser's output."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from stalroute.protocols.base import MAX_PREAUTH_LINE
from stalroute.protocols.lines import LineBuffer, Unit
from stalroute.protocols.smtpreply import ReplyReader
from stalroute.sasl import Credentials

# --- reading the fuzzer's bytes ---------------------------------------------------------------


class Input:
    """The fuzzer's bytes, read front to back as choices, then as payload. Reading past the
    end gives zeros, so every input is usable and the same bytes always give the same run."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def byte(self) -> int:
        value = self._data[self._pos] if self._pos < len(self._data) else 0
        self._pos += 1
        return value

    def number(self, limit: int) -> int:
        """0 … limit - 1, from two bytes."""
        return (self.byte() << 8 | self.byte()) % limit

    def flag(self) -> bool:
        return self.byte() & 1 == 1

    def choice(self, options: Sequence[Any]) -> Any:
        return options[self.byte() % len(options)]

    def subset(self, options: Sequence[Any]) -> tuple[Any, ...]:
        mask = self.byte()
        return tuple(option for index, option in enumerate(options) if mask >> index & 1)

    def take(self, size: int) -> bytes:
        block = self._data[self._pos:self._pos + size]
        self._pos += size
        return block

    def sized(self, limit: int = 64) -> bytes:
        """A short field: one length byte, then that many bytes."""
        return self.take(self.byte() % limit)

    def rest(self) -> bytes:
        block = self._data[self._pos:]
        self._pos = len(self._data)
        return block


def chunks(inp: Input, payload: bytes, limit: int = MAX_PREAUTH_LINE) -> list[bytes]:
    """``payload`` cut at up to seven places the input chooses; now and then followed by a
    line longer than ``limit`` (the parsers' line limit), which must not be held whole."""
    cuts = sorted({inp.number(1 << 16) for _ in range(inp.byte() % 8)})
    if inp.byte() == 255:
        payload += b"x" * (limit + 2)
    cuts = sorted({cut % (len(payload) + 1) for cut in cuts})
    return [payload[a:b] for a, b in zip([0, *cuts], [*cuts, len(payload)])]


# --- invariants -------------------------------------------------------------------------------


def assert_clean_lines(data: bytes, *, ending: bytes = b"\r\n") -> None:
    """``data`` is whole lines ending with ``ending``, none holding a stray CR or LF (no reply
    or command can be split in two by what a peer sent)."""
    assert data.endswith(ending), data[-80:]
    for line in data[: -len(ending)].split(ending):
        assert b"\r" not in line and b"\n" not in line, line[:80]


def retained(obj: object, depth: int = 0) -> int:
    """Bytes a machine keeps in its line buffers and partial units (three attributes deep)."""
    if isinstance(obj, LineBuffer):
        return len(obj)
    if isinstance(obj, Unit):
        return len(obj.raw)
    if isinstance(obj, (bytearray, bytes)) or depth > 2 or not hasattr(obj, "__dict__"):
        return 0
    total = 0
    for value in vars(obj).values():
        if isinstance(value, ReplyReader):
            total += len(value.buffer) + len(value._raw)
        elif not isinstance(value, (str, int, float, bool, tuple, list, dict, frozenset)):
            total += retained(value, depth + 1)
    return total


#: What any pre-auth machine or backend dialogue may hold between two calls: a line or
#: command at its limit, and the literal it announced.
RETAINED_LIMIT = 2 * MAX_PREAUTH_LINE + 2


def check_credentials(credentials: Credentials) -> None:
    assert credentials.mechanism in ("PLAIN", "OAUTHBEARER", "XOAUTH2")
    assert isinstance(credentials.response, bytes)
    for text in (credentials.login, credentials.token):
        assert text is None or isinstance(text, str)
