"""Reading a server's log file while it is being written (and rotated)."""

from __future__ import annotations

import re
import time
from pathlib import Path


class LogFile:
    """A log at ``path``; with ``rotated`` the numbered files twistd rotates out
    (``path.N`` … ``path.1``) are read first, so offsets stay valid across rotations."""

    def __init__(self, path: Path, *, rotated: bool = False) -> None:
        self.path = path
        self.rotated = rotated

    def _parts(self) -> list[Path]:
        parts = []
        if self.rotated:
            numbered = [
                p for p in self.path.parent.glob(self.path.name + ".*") if p.suffix[1:].isdigit()
            ]
            parts = sorted(numbered, key=lambda p: int(p.suffix[1:]), reverse=True)
        return parts + [self.path]

    def size(self) -> int:
        """Bytes written so far: pass it as ``since`` to look only at newer lines."""
        return sum(p.stat().st_size for p in self._parts() if p.exists())

    def text(self, since: int = 0) -> str:
        """The log from byte offset ``since``."""
        data = b"".join(p.read_bytes() for p in self._parts() if p.exists())
        return data[since:].decode(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 10.0, since: int = 0) -> re.Match[str]:
        """Wait until the regex ``pattern`` appears after ``since``; TimeoutError otherwise."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            text = self.text(since)
            if match := regex.search(text):
                return match
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{pattern!r} not in {self.path} after {timeout}s; tail:\n{text[-3000:]}"
                )
            time.sleep(0.05)
