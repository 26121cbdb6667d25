"""An instance of several worker processes (``server.workers``, SPEC §11).

The twistd process becomes the instance's supervisor (:class:`SupervisorService`): it validates
the configuration, binds every listener socket once, serves the admin API, is the instance's
one member on the coordinator bus, and runs N workers (:mod:`stalroute.worker`) that inherit
the sockets and serve the connections. Each worker has a channel to it
(:mod:`stalroute.channel`): changes, reports and reloads go down it, log events come up.

A worker that exits is started again (after 1 s, doubling up to 30 s while it keeps dying
young); SIGTERM drains every worker (each within ``shutdown_grace``), SIGHUP reloads the
supervisor, then every worker.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Callable, Collection
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.error import ProcessDone, ProcessExitedAlready
from twisted.internet.interfaces import IDelayedCall, IReactorProcess
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import LogLevel, Logger, globalLogPublisher
from twisted.python.failure import Failure

from stalroute.acme.roles import install_args
from stalroute.channel import Channel, ChannelFactory
from stalroute.closing import CLOSE_GRACE
from stalroute.cluster import Argument
from stalroute.config import Config
from stalroute.logs import logger
from stalroute.reports import REPORT_PARTS, Report
from stalroute.service import ProxyService
from stalroute.transport import IServingReactor

log = logger("stalroute.workers")

#: The channel's descriptor in a worker; the listening sockets follow it.
CHANNEL_FD = 3
#: First and longest wait before starting a worker again.
RESTART_DELAY, RESTART_MAX_DELAY = 1.0, 30.0
#: A worker that ran this long is restarted after the first delay again.
STABLE_AFTER = 60.0
#: How long a worker may take to report or apply a change before it is left out.
CALL_TIMEOUT = 5.0
#: Longest line kept of what a worker writes to stdout/stderr outside its log.
MAX_OUTPUT_LINE = 8192


def worker_count(config: Config) -> int:
    """``server.workers``, with 0 meaning one per CPU core."""
    return config.server.workers or os.cpu_count() or 1


class WorkerProcess(ProcessProtocol):
    """One worker: its process, its channel, and what it wrote outside its log."""

    def __init__(self, pool: WorkerPool, index: int) -> None:
        self.pool = pool
        self.index = index
        self.started = pool.reactor.seconds()
        self.channel = Channel({}, self._log_event, self._channel_lost)
        self._output: dict[int, bytes] = {}  # a partial line per descriptor (stdout, stderr)

    @property
    def serving(self) -> bool:
        return bool(self.channel.connected)

    def call(self, name: str, **args: Any) -> Deferred[Any]:
        answer = self.channel.call(name, **args)
        return answer.addTimeout(CALL_TIMEOUT, self.pool.reactor)

    def _log_event(self, message: dict[str, Any]) -> None:
        """Write a worker's log event into the instance's log, as if it were our own; the
        text log shows ``[namespace#level worker N]`` where a single process shows
        ``[namespace#level]``."""
        fields = {str(key): value for key, value in (message.get("fields") or {}).items()}
        namespace = str(message.get("namespace"))
        level = LogLevel.levelWithName(message.get("level", "info"))
        Logger(namespace=namespace, observer=globalLogPublisher).emit(
            level, "{text}", **{**fields, "text": message.get("text", ""),
                                "log_system": f"{namespace}#{level.name} worker {self.index}",
                                "worker": self.index})

    def tell(self, name: str, **args: Any) -> None:
        """Call ``name`` without waiting for the answer (a failure is logged)."""
        self.call(name, **args).addErrback(lambda failure: log.warn(
            "workers: worker {index} did not take {name}: {reason}", index=self.index,
            name=name, reason=failure.getErrorMessage()))

    def signal(self, name: str) -> None:
        if self.transport is not None:
            try:
                self.transport.signalProcess(name)
            except ProcessExitedAlready:
                pass

    def _channel_lost(self) -> None:
        if self.pool.running:
            log.error("workers: the channel of worker {index} closed; stopping it",
                      index=self.index)
            self.signal("TERM")

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        """Lines a worker wrote outside its log (a crash before its log was set up)."""
        *lines, partial = (self._output.get(childFD, b"") + data).split(b"\n")
        if len(partial) > MAX_OUTPUT_LINE:
            lines.append(partial)
            partial = b""
        self._output[childFD] = partial
        for line in lines:
            if line.strip():
                log.error("workers: worker {index}: {line}", index=self.index,
                          line=line[:MAX_OUTPUT_LINE].decode(errors="replace"))

    def processEnded(self, reason: Failure) -> None:
        self.pool.ended(self, reason)


class ISupervisorReactor(IServingReactor, IReactorProcess):
    """The supervisor's reactor: the proxy service's, which also spawns the workers."""


class WorkerPool:
    """The workers of this instance (implements :class:`stalroute.control.LocalWorkers`)."""

    def __init__(self, reactor: ISupervisorReactor, config_path: str, count: int,
                 on_ready: Callable[[WorkerProcess], None]) -> None:
        self.reactor = reactor
        self.count = count
        self.running = False
        self._config_path = config_path
        self._on_ready = on_ready
        #: The listening sockets, (descriptor, family) by listener: every worker inherits them.
        self._sockets: dict[str, list[tuple[int, int]]] = {}
        self._workers: dict[int, WorkerProcess] = {}
        self._restarts: dict[int, IDelayedCall] = {}
        self._restart_delays: dict[int, float] = {}
        self._all_ended: Deferred[None] | None = None

    def start(self, sockets: dict[str, list[tuple[int, int]]]) -> None:
        self.running = True
        self._sockets = sockets
        for index in range(1, self.count + 1):
            self._spawn(index)

    def _spawn(self, index: int) -> None:
        self._restarts.pop(index, None)
        worker = WorkerProcess(self, index)
        child_end, parent_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        child_fds: dict[int, int | str] = {0: "w", 1: "r", 2: "r", CHANNEL_FD: child_end.fileno()}
        listeners: dict[str, list[tuple[int, int]]] = {}
        next_fd = CHANNEL_FD + 1
        for name, sockets in self._sockets.items():
            for fd, family in sockets:
                child_fds[next_fd] = fd
                listeners.setdefault(name, []).append((next_fd, family))
                next_fd += 1
        inherited = {"workers": self.count, "channel": CHANNEL_FD, "listeners": listeners}
        try:
            self.reactor.spawnProcess(
                worker, sys.executable,
                [sys.executable, "-m", "stalroute.worker", self._config_path, str(index),
                 json.dumps(inherited)], env=os.environ, childFDs=child_fds)
            self.reactor.adoptStreamConnection(parent_end.fileno(), socket.AF_UNIX,
                                               ChannelFactory(worker.channel))
        finally:
            child_end.close()
            parent_end.close()
        self._workers[index] = worker
        log.info("workers: worker {index} started (pid {pid})", index=index,
                 pid=worker.transport.pid if worker.transport else "?")
        self._on_ready(worker)

    def ended(self, worker: WorkerProcess, reason: Failure) -> None:
        if self._workers.get(worker.index) is worker:
            del self._workers[worker.index]
        if not self.running:
            if not self._workers and self._all_ended is not None:
                self._all_ended.callback(None)
            return
        lived = self.reactor.seconds() - worker.started
        previous = self._restart_delays.get(worker.index, 0.0)
        delay = (RESTART_DELAY if lived >= STABLE_AFTER or not previous
                 else min(previous * 2, RESTART_MAX_DELAY))
        self._restart_delays[worker.index] = delay
        how = ("exited" if reason.check(ProcessDone)
               else f"ended ({reason.getErrorMessage()})")
        log.error("workers: worker {index} {how} after {lived:.1f}s; starting it again in "
                  "{delay:g}s", index=worker.index, how=how, lived=lived, delay=delay)
        self._restarts[worker.index] = self.reactor.callLater(delay, self._spawn, worker.index)

    # --- what the supervisor asks of its workers (LocalWorkers) ---------------------------

    def serving(self) -> int:
        return sum(1 for worker in self._workers.values() if worker.serving)

    def _each(self, name: str, **args: Any) -> Deferred[list[Any]]:
        """Call ``name`` on every serving worker; the answers of those that gave one."""
        calls = [worker.call(name, **args) for worker in self._workers.values()
                 if worker.serving]

        def answered(results: list[tuple[bool, Any]]) -> list[Any]:
            for ok, result in results:
                if not ok:
                    log.warn("workers: a worker did not answer {name}: {reason}", name=name,
                             reason=result.getErrorMessage())
            return [result for ok, result in results if ok]

        return DeferredList(calls, consumeErrors=True).addCallback(answered)

    def apply(self, op: str, args: dict[str, Argument]) -> Deferred[int]:
        return self._each("apply", op=op, args=args).addCallback(sum)

    def reports(self, parts: Collection[str] = REPORT_PARTS) -> Deferred[list[Report]]:
        return self._each("report", parts=list(parts)).addCallback(
            lambda reports: sorted(reports, key=lambda report: report["worker"]))

    def reload(self) -> Deferred[None]:
        return self._each("reload").addCallback(lambda _: None)

    def bus_state(self, connected: bool) -> None:
        self._each("bus_state", connected=connected)

    def superseded(self, superseded: bool) -> None:
        self._each("superseded", superseded=superseded)

    # --- stopping ------------------------------------------------------------------------

    def stop(self, grace: float) -> Deferred[None]:
        """Stop listening, then drain every worker (SIGTERM); a worker still running after
        ``grace`` plus the close grace is killed. Fires once all have exited."""
        self.running = False
        for sockets in self._sockets.values():
            for fd, _ in sockets:
                os.close(fd)
        self._sockets = {}
        for restart in self._restarts.values():
            restart.cancel()
        self._restarts.clear()
        if not self._workers:
            return succeed(None)
        self._all_ended = Deferred()
        for worker in self._workers.values():
            worker.signal("TERM")
        kill = self.reactor.callLater(grace + CLOSE_GRACE + 2, self._kill)

        def ended(result: None) -> None:
            if kill.active():
                kill.cancel()

        return self._all_ended.addCallback(ended)

    def _kill(self) -> None:
        for worker in self._workers.values():
            log.error("workers: worker {index} did not stop in time; killing it",
                      index=worker.index)
            worker.signal("KILL")


class SupervisorService(ProxyService):
    """The proxy service of an instance whose listeners are served by worker processes."""

    def __init__(self, reactor: ISupervisorReactor, config: Config) -> None:
        if config.source_path is None:
            raise ValueError("workers read the configuration file: it must come from one")
        self.workers = self.pool = WorkerPool(reactor, str(config.source_path),
                                              worker_count(config), self._worker_started)
        super().__init__(reactor, config)

    def _listen(self) -> None:
        self.pool.start(self._listening_sockets())

    def _log_started(self) -> None:
        config = self.runtime.config
        log.info("stalroute started: {listeners} listeners, {destinations} destinations, "
                 "{workers} workers", listeners=len(config.listeners),
                 destinations=len(config.destinations), workers=self.pool.count)

    def _worker_started(self, worker: WorkerProcess) -> None:
        """Give a (re)started worker the instance's state it would otherwise miss: the login
        delays in force and a coordinator outage."""
        for identifier, left in self.runtime.delays.active().items():
            worker.tell("apply", op="delay", args={"identifier": identifier, "seconds": left})
        if self.cluster.coordinator is not None and not self.cluster.connected:
            worker.tell("bus_state", connected=False)
        if self.runtime.registry.superseded:
            worker.tell("superseded", superseded=True)
        if self.certificates is not None:  # the ACME certificates served so far
            for name, managed in self.certificates.certificates.items():
                if managed.current is not None:
                    worker.tell("apply", op="certificate_install",
                                args=install_args(name, managed.current))

    def stopService(self) -> Deferred[None]:
        """Drain: the workers stop accepting and finish their sessions (``shutdown_grace``);
        the admin API stops accepting at the same moment."""
        self.running = False
        self.runtime.registry.draining = True
        self.runtime.capabilities.stop()
        renewal = (self.certificates.stopService() if self.certificates is not None
                   else succeed(None))  # releases its leases meanwhile
        stopped = self.pool.stop(self.runtime.config.server.shutdown_grace)
        stopped.addCallback(lambda _: renewal)
        stopped.addCallback(lambda _: self.cluster.stop())
        return stopped.addCallback(lambda _: self.runtime.router.store.close())
