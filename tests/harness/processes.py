"""Managed child processes: started, watched and always reaped.

Every server a test, the demo or a benchmark needs runs as a direct child of the Python
process (``subprocess.Popen``) in its own session and process group, so that stopping it can
signal the whole tree without touching the test runner. Three safety nets make sure nothing
outlives its owner, even on failures:

* :meth:`ManagedProcess.stop` sends SIGTERM to the leader, waits, then SIGKILLs the group, and
  reaps the leader and any orphaned grandchildren (this process is made a *child subreaper*,
  so a server's workers that outlive their master are re-parented here instead of to PID 1,
  which does not reap on these machines);
* every live process is in a registry that :func:`reap_all` (run by ``atexit`` and by the
  pytest session finalizer) stops;
* each child gets ``PR_SET_PDEATHSIG`` = SIGTERM, so it is told to stop if its parent thread
  dies without cleaning up (start children from the main thread for this to hold).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType

from tests.harness.ports import port_accepts

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_libc = ctypes.CDLL(None, use_errno=True)

_REGISTRY: set[ManagedProcess] = set()


class ProcessStartError(RuntimeError):
    """A child exited or never became ready; the message carries its output."""


def _become_subreaper() -> None:
    """Adopt orphaned descendants (Linux only; harmless to call twice)."""
    _libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _child_setup(parent_pid: int) -> None:
    """Run in the child before exec: die with the parent."""
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def session_processes(session_id: int) -> dict[int, int]:
    """Live (or zombie) processes of the session ``session_id``: pid → parent pid."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the "(comm)" part: state ppid pgrp session ...
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[3]) == session_id:
            found[int(entry.name)] = int(fields[1])
    return found


class ManagedProcess:
    """One server child: ``start()``, ``wait_for_port()``, ``stop()``; a context manager."""

    def __init__(
        self,
        argv: Sequence[str | os.PathLike[str]],
        *,
        name: str,
        output_path: Path,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.argv = [os.fspath(a) for a in argv]
        self.name = name
        self.output_path = output_path
        self.cwd = cwd
        self.env = dict(env) if env is not None else None
        self._popen: subprocess.Popen[bytes] | None = None

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> ManagedProcess:
        """Start the child (stdout and stderr go to ``output_path``)."""
        if self._popen is not None:
            raise RuntimeError(f"{self.name} already started")
        _become_subreaper()
        self.output_path.parent.mkdir(parents=True, exist_ok=True)
        parent = os.getpid()
        with open(self.output_path, "ab") as out:
            self._popen = subprocess.Popen(
                self.argv,
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=lambda: _child_setup(parent),
            )
        _REGISTRY.add(self)
        return self

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the leader, wait up to ``timeout``, then SIGKILL the group; reap all."""
        popen = self._popen
        if popen is None:
            return None
        try:
            if popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    popen.send_signal(signal.SIGTERM)
                try:
                    popen.wait(timeout)
                except subprocess.TimeoutExpired:
                    self._kill_group()
                    popen.wait()
            self._kill_group()  # leftovers whose leader is gone
            self._reap_orphans()
        finally:
            _REGISTRY.discard(self)
        return popen.returncode

    def _kill_group(self) -> None:
        assert self._popen is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._popen.pid, signal.SIGKILL)

    def _reap_orphans(self, timeout: float = 5.0) -> None:
        """Wait for adopted grandchildren of this child's session (killed just before)."""
        assert self._popen is not None
        deadline = time.monotonic() + timeout
        me = os.getpid()
        orphans = [pid for pid, ppid in session_processes(self._popen.pid).items() if ppid == me]
        for pid in orphans:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            while time.monotonic() < deadline:
                try:
                    done, _ = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    break
                if done:
                    break
                time.sleep(0.01)

    def __enter__(self) -> ManagedProcess:
        if self._popen is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- state -------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        if self._popen is None:
            raise RuntimeError(f"{self.name} not started")
        return self._popen.pid

    @property
    def running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self._popen is None else self._popen.poll()

    def output_text(self) -> str:
        """Everything the child wrote to stdout/stderr so far."""
        try:
            return self.output_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # --- readiness ---------------------------------------------------------------------

    def wait_for_ports(
        self,
        addresses: Iterable[tuple[str, int]],
        timeout: float = 15.0,
        diagnostics: Callable[[], str] | None = None,
    ) -> None:
        """Block until every ``(host, port)`` accepts; fail early if the child exits.

        ``diagnostics`` returns extra text (such as the server's own log) for the error.
        """
        pending = list(addresses)
        deadline = time.monotonic() + timeout
        while pending:
            problem = None
            if not self.running:
                problem = f"exited with {self.returncode} before listening on {pending}"
            elif time.monotonic() > deadline:
                problem = f"did not listen on {pending} within {timeout}s"
            if problem:
                extra = diagnostics() if diagnostics else ""
                raise ProcessStartError(
                    f"{self.name} {problem}\n{self.output_text()[-4000:]}\n{extra[-4000:]}"
                )
            if port_accepts(*pending[0], timeout=0.2):
                pending.pop(0)
            else:
                time.sleep(0.02)

    def wait_for_port(self, host: str, port: int, timeout: float = 15.0) -> None:
        """Block until ``host:port`` accepts (see :meth:`wait_for_ports`)."""
        self.wait_for_ports([(host, port)], timeout)

    def __repr__(self) -> str:
        state = "running" if self.running else f"rc={self.returncode}"
        return f"<ManagedProcess {self.name} {state}>"


def reap_all() -> None:
    """Stop every managed child that is still registered (session end, interpreter exit)."""
    for process in list(_REGISTRY):
        process.stop(timeout=5.0)


atexit.register(reap_all)
