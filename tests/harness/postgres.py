"""A private PostgreSQL server on a random loopback port (``PostgresServer``).

The recipe of TEST-ENVIRONMENT.md §2: PostgreSQL refuses to run as root, so ``initdb`` and the
server run as the ``postgres`` user through ``runuser``, in a temp directory chowned to it,
with the Unix socket in that directory (``-k``), ``listen_addresses=127.0.0.1`` and
durability off. One deviation from the recipe, for reaping: the server is started as a
direct child (``runuser … postgres -D …``, the command ``pg_ctl start`` would run) so that it
is a :class:`~tests.harness.processes.ManagedProcess`, and stopped with ``pg_ctl -m fast
stop`` (a fast shutdown: open client connections do not hold it up), then reaped.

``stop()``/``start()`` keep the data directory and the port, so tests can restart the server
under a running stalroute. ``close()`` stops it for good and removes the directory.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.harness.ports import LOOPBACK, free_port
from tests.harness.processes import ManagedProcess, ProcessStartError

POSTGRES_USER = "postgres"
_SETTINGS = ("fsync=off", "synchronous_commit=off", "full_page_writes=off")


def postgres_bindir() -> Path | None:
    """The directory holding ``initdb``, ``pg_ctl`` and ``postgres``, or None."""
    for name in ("pg_ctl", "initdb", "postgres"):
        found = shutil.which(name)
        if found:
            return Path(found).resolve().parent
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), reverse=True)
    return candidates[0].parent if candidates else None


class PostgresServer:
    """One throwaway cluster: ``start()``, ``stop()`` (restartable), ``close()``, ``url()``."""

    def __init__(self, bindir: Path, base: Path | None = None, *, log_statements: bool = False):
        self.bindir = bindir
        self.port = free_port()
        self.host = LOOPBACK
        self.directory = Path(tempfile.mkdtemp(prefix="stalroute-pg-", dir=base))
        self.data = self.directory / "data"
        self.log_path = self.directory / "postgres.log"
        self.log_statements = log_statements
        self._process: ManagedProcess | None = None
        owner = pwd.getpwnam(POSTGRES_USER)
        # The server runs as postgres: its directory must be its own, its parents traversable.
        os.chmod(self.directory, 0o700)
        os.chown(self.directory, owner.pw_uid, owner.pw_gid)
        for parent in self.directory.parents:
            if parent != Path("/") and not os.stat(parent).st_mode & 0o001:
                os.chmod(parent, os.stat(parent).st_mode | 0o111)
        self._as_postgres(
            "initdb", "-D", self.data, "-U", POSTGRES_USER, "--auth=trust", "-E", "UTF8",
            "--no-locale", "--no-sync",
        )

    def _as_postgres(self, tool: str, *args: str | os.PathLike[str]) -> str:
        argv = ["runuser", "-u", POSTGRES_USER, "--", str(self.bindir / tool), *map(str, args)]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        if done.returncode != 0:
            raise ProcessStartError(f"{tool} failed ({done.returncode}): {done.stderr[-2000:]}")
        return done.stdout

    # --- lifecycle -------------------------------------------------------------------------

    def start(self, timeout: float = 20.0) -> PostgresServer:
        """Start the server on its port and wait until it accepts queries."""
        if self.running:
            return self
        settings = [f"listen_addresses={self.host}", *_SETTINGS]
        if self.log_statements:
            settings.append("log_statement=all")
        options = [arg for setting in settings for arg in ("-c", setting)]
        self._process = ManagedProcess(
            ["runuser", "-u", POSTGRES_USER, "--", self.bindir / "postgres", "-D", self.data,
             "-p", str(self.port), "-k", self.directory, *options],
            name="postgres",
            output_path=self.log_path,
        ).start()
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        import psycopg2

        deadline = time.monotonic() + timeout
        while True:
            try:
                psycopg2.connect(self.url(), connect_timeout=2).close()
                return
            except psycopg2.OperationalError as exc:
                problem = str(exc)
            assert self._process is not None
            if not self._process.running or time.monotonic() > deadline:
                self.stop()
                raise ProcessStartError(f"postgres not ready: {problem}\n{self.log_text()[-3000:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        """Fast shutdown (clients are disconnected), then reap; the data is kept."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.running:
            try:
                self._as_postgres("pg_ctl", "-D", self.data, "-m", "fast", "-w", "-t", "20",
                                  "stop")
            except (ProcessStartError, subprocess.TimeoutExpired):
                pass  # ManagedProcess.stop below escalates to SIGKILL
        process.stop(timeout=10.0)

    def close(self) -> None:
        """Stop for good and remove the cluster."""
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.running

    # --- use -------------------------------------------------------------------------------

    def url(self, database: str = "postgres", **params: Any) -> str:
        """A ``postgresql://`` URL of this server (``params`` become the query string)."""
        query = "&".join(f"{k}={v}" for k, v in params.items())
        return (f"postgresql://{POSTGRES_USER}@{self.host}:{self.port}/{database}"
                + (f"?{query}" if query else ""))

    def execute(self, sql: str, params: tuple[Any, ...] | dict[str, Any] = (),
                database: str = "postgres") -> list[tuple[Any, ...]]:
        """Run one statement (autocommit) from the test process; the rows, if any."""
        import psycopg2

        connection = psycopg2.connect(self.url(database), connect_timeout=5)
        try:
            connection.autocommit = True
            with connection.cursor() as cursor:
                cursor.execute(sql, params or None)
                return cursor.fetchall() if cursor.description else []
        finally:
            connection.close()

    def log_text(self) -> str:
        """The server's log (all of it: restarts append)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
