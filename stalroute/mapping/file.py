"""The TSV file store: ``identifier<whitespace>destination`` per line, held in memory.

Writes rewrite the whole file atomically (temp file, fsync, rename, fsync of the folder),
sorted and tab-separated, so the file stays diffable and a crash never leaves half a table.
A file that cannot be used (unreadable, not UTF-8, an identifier a login could never produce,
an undeclared destination) is refused as a whole with :class:`MappingFileError`, naming the
file and each bad line; startup, ``stalroute check`` and reloads report it as such.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable, Collection, Iterable, Sequence
from pathlib import Path

from twisted.internet.defer import Deferred, DeferredLock, succeed
from twisted.internet.threads import deferToThread

from stalroute.config import FileMappingConfig, MappingConfig
from stalroute.identity import InvalidIdentifier, normalize_identifier
from stalroute.mapping import MappingStore, StoreError

#: Bad lines named in one :class:`MappingFileError` (a file of garbage gives a short answer).
MAX_REPORTED_PROBLEMS = 20
#: What ``surrogateescape`` decoding makes of bytes that are not UTF-8.
_UNDECODABLE = re.compile("[\udc80-\udcff]")


class MappingFileError(StoreError):
    """The file cannot be used as a mapping table; ``problems`` name each bad line."""

    def __init__(self, path: Path, problems: list[str]) -> None:
        super().__init__(f"{path}: " + "; ".join(problems))
        self.problems = problems


def parse_mapping_lines(
    lines: Iterable[str], destinations: Collection[str], normalize: str, path: Path
) -> dict[str, str]:
    """Parse the table, collecting every problem (malformed or non-UTF-8 line, invalid
    identifier, unknown destination); ``lines`` decoded with ``surrogateescape``."""
    table: dict[str, str] = {}
    problems: list[str] = []
    for number, raw in enumerate(lines, start=1):
        if _UNDECODABLE.search(raw):
            problems.append(f"line {number}: not UTF-8 text")
            continue
        fields = raw.split("#", 1)[0].split() if not raw.lstrip().startswith("#") else []
        if not fields:
            continue
        if len(fields) != 2:
            problems.append(f"line {number}: expected 'identifier destination'")
            continue
        identifier, destination = fields
        if destination not in destinations:
            problems.append(f"line {number}: unknown destination {destination!r}")
            continue
        try:
            table[normalize_identifier(identifier, normalize)] = destination
        except InvalidIdentifier as exc:
            problems.append(f"line {number}: invalid identifier ({exc})")
    if len(problems) > MAX_REPORTED_PROBLEMS:
        more = len(problems) - MAX_REPORTED_PROBLEMS
        problems = [*problems[:MAX_REPORTED_PROBLEMS], f"and {more} more bad lines"]
    if problems:
        raise MappingFileError(path, problems)
    return table


def write_atomically(path: Path, table: dict[str, str]) -> None:
    """Replace ``path`` with the sorted table; readers see the old or the new file, whole."""
    body = "".join(f"{identifier}\t{table[identifier]}\n" for identifier in sorted(table))
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(body)
            handle.flush()
            os.fsync(handle.fileno())
        if path.exists():
            os.chmod(temp, path.stat().st_mode & 0o777)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


class FileMappingStore(MappingStore):
    """A mapping table kept in memory and persisted to a TSV file."""

    writable = True
    listable = True  # entries() always answers: the table is in memory

    def __init__(self, path: Path, destinations: Collection[str], normalize: str) -> None:
        self.path = Path(path)
        self._destinations = destinations
        self._normalize = normalize
        self._table = self._read()
        self._write_lock = DeferredLock()

    def __len__(self) -> int:
        return len(self._table)

    def _read(self) -> dict[str, str]:
        try:
            with open(self.path, encoding="utf-8", errors="surrogateescape") as handle:
                return parse_mapping_lines(handle, self._destinations, self._normalize, self.path)
        except OSError as exc:
            raise MappingFileError(self.path, [exc.strerror or str(exc)]) from exc

    def lookup(self, identifier: str) -> Deferred[str | None]:
        return succeed(self._table.get(identifier))

    def entries(self) -> Deferred[list[tuple[str, str]]]:
        """Every mapping, sorted (for ``GET /mappings/export``)."""
        return succeed(sorted(self._table.items()))

    def lookup_many(self, identifiers: Sequence[str]) -> Deferred[list[str | None]]:
        """Every answer from the table in memory at once."""
        return succeed([self._table.get(identifier) for identifier in identifiers])

    def upsert(self, identifier: str, destination: str) -> Deferred[None]:
        return self._rewrite(lambda table: table.__setitem__(identifier, destination))

    def upsert_many(self, pairs: Sequence[tuple[str, str]]) -> Deferred[None]:
        """Every write in one atomic rewrite of the file."""
        return self._rewrite(lambda table: table.update(pairs))

    def delete(self, identifier: str) -> Deferred[bool]:
        existed = identifier in self._table
        d = self._rewrite(lambda table: table.pop(identifier, None))
        return d.addCallback(lambda _: existed)

    def _rewrite(self, change: Callable[[dict[str, str]], object]) -> Deferred[None]:
        """Apply ``change`` to a copy, persist it off the reactor thread, then swap it in."""

        def locked() -> Deferred[None]:
            table = dict(self._table)
            change(table)
            d = deferToThread(write_atomically, self.path, table)
            return d.addCallback(lambda _: setattr(self, "_table", table))

        return self._write_lock.run(locked)

    def reload(self) -> Deferred[int | None]:
        """Re-read the file; a file with any bad line is refused and the old table kept."""

        def swap(table: dict[str, str]) -> int:
            self._table = table
            return len(table)

        return self._write_lock.run(lambda: deferToThread(self._read).addCallback(swap))

    def close(self) -> Deferred[None]:
        return succeed(None)


def build_file_store(settings: FileMappingConfig, mapping: MappingConfig,
                     destinations: Collection[str]) -> FileMappingStore:
    """The ``[mapping.file]`` store (its registry builder): the file is read here."""
    return FileMappingStore(settings.path, destinations, mapping.normalize)
