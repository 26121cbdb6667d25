"""The :class:`~stalroute.acme.store.SharedStore` of a single instance: a private directory.

Every key is one file in the directory (mode 0700, files 0600; the key percent-encoded into
the file name), written atomically (a temporary file in the same directory, then a rename), so
a crash leaves the old value or the new one, never half of one. A file holds one JSON header
line (``{"expires": <unix time or null>}``) and then the value's bytes; wall-clock time, so
expiry survives restarts. Leases are files too: with one instance there is one holder, but
their ``ttl`` is honoured like any other holder's would be.

The files are a few kilobytes (keys and PEM chains), read and written on the reactor thread.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote, unquote

from twisted.internet.defer import Deferred, fail, succeed

from stalroute.logs import logger

log = logger("stalroute.acme")

_LEASE_PREFIX = "lease/"


class DirectoryStore:
    """Key/value storage with expiry and leases in a 0700 directory (created if missing)."""

    def __init__(self, directory: Path, clock: Callable[[], float] = time.time) -> None:
        self.directory = Path(directory)
        self._clock = clock
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)

    # --- files -------------------------------------------------------------------------------

    def _path(self, key: str) -> Path:
        return self.directory / quote(key, safe="")

    def _read(self, key: str) -> tuple[float | None, bytes] | None:
        """(expiry, value) of ``key``, or None when missing, unreadable or expired."""
        try:
            raw = self._path(key).read_bytes()
        except FileNotFoundError:
            return None
        header, newline, value = raw.partition(b"\n")
        try:
            expires = json.loads(header)["expires"] if newline else None
        except (ValueError, KeyError, TypeError):
            log.warn("acme store: ignoring the unreadable file {path}", path=self._path(key))
            return None
        if expires is not None and expires <= self._clock():
            return None
        return expires, value

    def _write(self, key: str, value: bytes, ttl: float | None) -> None:
        expires = None if ttl is None else self._clock() + ttl
        header = json.dumps({"expires": expires}).encode() + b"\n"
        fd, temporary = tempfile.mkstemp(dir=self.directory, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as file:  # mkstemp makes it 0600
                file.write(header + value)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, self._path(key))
        except BaseException:
            try:
                os.unlink(temporary)
            except FileNotFoundError:
                pass
            raise

    def _remove(self, key: str) -> None:
        try:
            self._path(key).unlink()
        except FileNotFoundError:
            pass

    # --- SharedStore ---------------------------------------------------------------------------

    def get(self, key: str) -> Deferred[bytes | None]:
        try:
            entry = self._read(key)
        except OSError as exc:
            return fail(exc)
        return succeed(None if entry is None else entry[1])

    def put(self, key: str, value: bytes, ttl: float | None = None) -> Deferred[None]:
        try:
            self._write(key, value, ttl)
        except OSError as exc:
            return fail(exc)
        return succeed(None)

    def delete(self, key: str) -> Deferred[None]:
        try:
            self._remove(key)
        except OSError as exc:
            return fail(exc)
        return succeed(None)

    def acquire_lease(self, task: str, holder: str, ttl: float) -> Deferred[bool]:
        key = _LEASE_PREFIX + task
        try:
            entry = self._read(key)
            if entry is not None and entry[1].decode("utf-8", "replace") != holder:
                return succeed(False)
            self._write(key, holder.encode("utf-8"), ttl)
        except OSError as exc:
            return fail(exc)
        return succeed(True)

    def release_lease(self, task: str, holder: str) -> Deferred[None]:
        key = _LEASE_PREFIX + task
        try:
            entry = self._read(key)
            if entry is not None and entry[1].decode("utf-8", "replace") == holder:
                self._remove(key)
        except OSError as exc:
            return fail(exc)
        return succeed(None)

    def purge(self) -> Deferred[int]:
        removed = 0
        try:
            for path in self.directory.iterdir():
                if path.name.startswith(".tmp-"):
                    continue
                key = unquote(path.name)
                if self._read(key) is None and path.exists():
                    path.unlink(missing_ok=True)
                    removed += 1
        except OSError as exc:
            return fail(exc)
        return succeed(removed)

    def close(self) -> Deferred[None]:
        return succeed(None)

    def keys(self) -> list[str]:
        """Every unexpired key (for tests and listings)."""
        return sorted(unquote(p.name) for p in self.directory.iterdir()
                      if not p.name.startswith(".tmp-") and self._read(unquote(p.name)))
