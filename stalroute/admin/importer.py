"""Bulk import and export of mappings against the running store (SPEC §8 bulk).

Import reads the request body (Twisted spools a large body to a temporary file) twice with
the incremental readers of :mod:`stalroute.admin.bulk`: the first pass validates every row,
so a body that is unreadable further on (a JSON syntax error) writes nothing; the second
writes the valid rows in batches of :data:`BATCH`.  Each batch looks its rows up first with
the store's ``lookup_many`` (rows already mapped that way are counted ``unchanged`` and not
written), writes the changed ones with its ``upsert_many`` (one atomic rewrite of the file,
one SQL transaction, ``MSET`` for Redis) and drops their cache entries (and, in a fleet, every
other instance's routes), so imported rows are routable batch by batch.  The reactor is given a turn between batches, so live sessions keep
flowing during an import.
"""

from __future__ import annotations

import time
from typing import Any, BinaryIO

from twisted.internet.task import deferLater

from stalroute.admin.bulk import BadRow, Row, read_records
from stalroute.control import Done
from stalroute.identity import InvalidIdentifier
from stalroute.logs import logger
from stalroute.mapping import ReadOnlyStore

log = logger("stalroute.admin")

#: Rows validated, looked up and written per step.
BATCH = 5000
#: Rejected rows listed in the summary (all are counted).
MAX_REPORTED = 1000


class Importer:
    """One import: validate, then write in batches (see the module docstring)."""

    def __init__(self, control, clock) -> None:
        self._control = control
        self._clock = clock
        self.rows = self.imported = self.unchanged = self.duplicates = 0
        self.rejected: list[dict[str, Any]] = []
        self.rejected_count = 0
        #: The batch the fewest members applied: the import answers with its ``applied``.
        self.least_applied: Done | None = None

    def _check(self, record: Row | BadRow) -> tuple[str, str] | BadRow:
        if isinstance(record, BadRow):
            return record
        if record.destination not in self._control.runtime.config.destinations:
            return BadRow(record.line, f"unknown destination {record.destination!r}")
        try:
            return self._control.normalize(record.identifier), record.destination
        except InvalidIdentifier as exc:
            return BadRow(record.line, f"invalid identifier ({exc})")

    def _reject(self, bad: BadRow) -> None:
        self.rejected_count += 1
        if len(self.rejected) < MAX_REPORTED:
            self.rejected.append({"line": bad.line, "reason": bad.reason})

    async def _breathe(self) -> None:
        await deferLater(self._clock, 0)

    async def run(self, stream: BinaryIO, fmt: str, dry_run: bool) -> dict[str, Any]:
        started = time.monotonic()
        if not dry_run and not self._control.runtime.router.store.writable:
            raise ReadOnlyStore("the mapping store is read-only")
        # Pass 1: validate everything (BulkFormatError propagates: nothing written).
        stream.seek(0)
        for count, record in enumerate(read_records(stream, fmt), start=1):
            self.rows += 1
            checked = self._check(record)
            if isinstance(checked, BadRow):
                self._reject(checked)
            if count % BATCH == 0:
                await self._breathe()
        if not dry_run:
            stream.seek(0)
            batch: dict[str, str] = {}
            for record in read_records(stream, fmt):
                checked = self._check(record)
                if isinstance(checked, BadRow):
                    continue
                key, destination = checked
                if key in batch:
                    self.duplicates += 1
                batch[key] = destination
                if len(batch) >= BATCH:
                    await self._write(batch)
                    batch = {}
            await self._write(batch)
        summary = {"rows": self.rows, "imported": self.imported, "unchanged": self.unchanged,
                   "rejected_count": self.rejected_count, "rejected": self.rejected,
                   "duplicates": self.duplicates, "dry_run": dry_run,
                   "seconds": round(time.monotonic() - started, 3),
                   **(self.least_applied.fields() if self.least_applied else {})}
        log.info("admin: mappings import{dry}: {rows} rows, {imported} written, {unchanged} "
                 "unchanged, {rejected} rejected in {seconds}s",
                 dry=" (dry run)" if dry_run else "", rows=self.rows, imported=self.imported,
                 unchanged=self.unchanged, rejected=self.rejected_count,
                 seconds=summary["seconds"])
        return summary

    async def _write(self, batch: dict[str, str]) -> None:
        if not batch:
            return
        # The current runtime each time: a reload during a long import swaps the store.
        runtime = self._control.runtime
        keys = list(batch)
        store = runtime.router.store
        current = await store.lookup_many(keys)
        changed = [(key, batch[key]) for key, now in zip(keys, current) if now != batch[key]]
        if changed:
            await store.upsert_many(changed)
            done = await self._control.imported([key for key, _ in changed])
            if self.least_applied is None or _applied(done) < _applied(self.least_applied):
                self.least_applied = done
        self.imported += len(changed)
        self.unchanged += len(batch) - len(changed)
        await self._breathe()


def _applied(done: Done) -> int:
    return done.fields().get("applied", 0)


async def export_entries(control) -> list[tuple[str, str]]:
    """Every mapping of the current store; NotListable (501) when it cannot list them."""
    return await control.runtime.router.store.entries()
