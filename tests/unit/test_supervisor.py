"""The supervisor of ``server.workers`` (:mod:`stalroute.supervisor`) and a worker's share of
the limits (:mod:`stalroute.worker`), in memory: a ``MemoryReactorClock`` that spawns no
process, channels wired by ``iosim``.

A worker that exits is started again, sooner when it had run a while; stopping drains every
worker, kills the ones that outstay the grace, and leaves no timer behind; what a worker
writes or logs reaches the instance's log, marked with the worker.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import ILogObserver, LogEvent, LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.test import iosim
from zope.interface import implementer

from stalroute.channel import Channel, ChannelFactory, Handler
from stalroute.closing import CLOSE_GRACE
from stalroute.config import Config, parse_config
from stalroute.supervisor import (
    CALL_TIMEOUT, CHANNEL_FD, MAX_OUTPUT_LINE, RESTART_DELAY, RESTART_MAX_DELAY, STABLE_AFTER,
    WorkerPool, WorkerProcess, worker_count,
)
from stalroute.worker import worker_share
from tests.unit.test_admin_app import document

CONFIG_PATH = "/etc/stalroute/stalroute.toml"


def config(tmp_path: Path, *, workers: int = 1, **listener: Any) -> Config:
    source = document(tmp_path)
    source["server"]["workers"] = workers
    source["listener"]["imaps"].update(listener)
    source["listener"]["imap"] = {"protocol": "imap", "bind": ["127.0.0.1:0"],
                                  "tls": "starttls", "max_connections": 7}
    return parse_config(source, tmp_path, {}, check_files=False)


class FakeProcess:
    """A spawned worker's process, as its ProcessProtocol sees it: a pid and signals."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: list[str] = []
        self.exited = False

    def signalProcess(self, name: str) -> None:
        if self.exited:
            raise ProcessExitedAlready()
        self.signals.append(name)


@dataclasses.dataclass
class Spawned:
    protocol: ProcessProtocol
    args: list[str]
    child_fds: dict[int, int | str]


class ProcessReactor(MemoryReactorClock):
    """Spawns no process: records each command line and the descriptors it would inherit."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[Spawned] = []

    def spawnProcess(self, protocol: ProcessProtocol, executable: str, args: list[str],
                     env: Any = None, path: Any = None, uid: Any = None, gid: Any = None,
                     usePTY: bool = False,
                     childFDs: dict[int, int | str] | None = None) -> FakeProcess:
        process = FakeProcess(4000 + len(self.spawned))
        self.spawned.append(Spawned(protocol, args, childFDs or {}))
        protocol.makeConnection(process)
        return process


class Pool:
    """A WorkerPool of two workers on a ProcessReactor, and the workers it started."""

    def __init__(self, count: int = 2) -> None:
        self.reactor = ProcessReactor()
        self.started: list[WorkerProcess] = []
        self.pool = WorkerPool(self.reactor, CONFIG_PATH, count, self.started.append)

    def worker(self, index: int) -> WorkerProcess:
        """The latest worker started as ``index``."""
        return [worker for worker in self.started if worker.index == index][-1]

    def process(self, index: int) -> FakeProcess:
        transport = self.worker(index).transport
        assert isinstance(transport, FakeProcess)
        return transport

    def end(self, index: int, reason: Failure | None = None) -> None:
        self.process(index).exited = True
        self.worker(index).processEnded(reason or Failure(ProcessTerminated(exitCode=1)))

    def pending(self) -> list[float]:
        """How long until each pending timer runs."""
        return sorted(call.getTime() - self.reactor.seconds()
                      for call in self.reactor.getDelayedCalls())


def settled(d: Deferred[Any]) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    return results[0]


@implementer(ILogObserver)
class Recorder:
    def __init__(self) -> None:
        self.events: list[LogEvent] = []

    def __call__(self, event: LogEvent) -> None:
        self.events.append(event)


@contextmanager
def captured() -> Iterator[list[LogEvent]]:
    """Every log event of a block."""
    recorder = Recorder()
    globalLogPublisher.addObserver(recorder)
    try:
        yield recorder.events
    finally:
        globalLogPublisher.removeObserver(recorder)


@pytest.fixture
def listening() -> Iterator[dict[str, list[tuple[int, int]]]]:
    """Two listening sockets, (descriptor, family) by listener (never bound: the pool only
    hands their descriptors on, and closes them when it stops)."""
    sockets = {name: [(socket.socket(socket.AF_INET).detach(), int(socket.AF_INET))]
               for name in ("imaps", "pop3s")}
    yield sockets
    for bound in sockets.values():
        for fd, _ in bound:
            if is_open(fd):  # not closed by a stop of the pool
                os.close(fd)


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


# --- how many workers, and their share of the limits ----------------------------------------------


def test_zero_workers_means_one_per_core(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    assert worker_count(config(tmp_path, workers=3)) == 3
    monkeypatch.setattr("os.cpu_count", lambda: 6)
    assert worker_count(config(tmp_path, workers=0)) == 6
    monkeypatch.setattr("os.cpu_count", lambda: None)
    assert worker_count(config(tmp_path, workers=0)) == 1


@pytest.mark.parametrize(("workers", "max_connections", "per_ip", "other"),
                         [(1, 10, 3, 7), (4, 3, 1, 2), (3, 4, 1, 3), (10, 1, 1, 1)])
def test_each_worker_gets_its_share_of_the_limits_rounded_up(
        tmp_path: Path, workers: int, max_connections: int, per_ip: int, other: int) -> None:
    whole = config(tmp_path, max_connections=10, max_connections_per_ip=3)
    share = worker_share(whole, workers)
    assert (share.listeners["imaps"].max_connections,
            share.listeners["imaps"].max_connections_per_ip) == (max_connections, per_ip)
    assert share.listeners["imap"].max_connections == other
    assert share.listeners["imaps"].bind == whole.listeners["imaps"].bind
    assert share.destinations == whole.destinations
    assert whole.listeners["imaps"].max_connections == 10  # the whole is left as it was


def test_no_per_ip_limit_stays_no_limit_in_every_worker(tmp_path: Path) -> None:
    share = worker_share(config(tmp_path, max_connections_per_ip=0), 4)
    assert share.listeners["imaps"].max_connections_per_ip == 0


# --- starting workers -------------------------------------------------------------------------


def test_each_worker_inherits_its_channel_and_every_listening_socket(listening) -> None:
    pool = Pool()
    pool.pool.start(listening)
    assert [worker.index for worker in pool.started] == [1, 2]
    for index, spawned in enumerate(pool.reactor.spawned, 1):
        assert spawned.args[:5] == [sys.executable, "-m", "stalroute.worker", CONFIG_PATH,
                                    str(index)]
        assert json.loads(spawned.args[5]) == {
            "workers": 2, "channel": CHANNEL_FD,
            "listeners": {"imaps": [[4, socket.AF_INET]], "pop3s": [[5, socket.AF_INET]]}}
        fds = spawned.child_fds
        assert (fds[0], fds[1], fds[2]) == ("w", "r", "r")
        assert (fds[4], fds[5]) == (listening["imaps"][0][0], listening["pop3s"][0][0])
    channels = [factory.buildProtocol(None) for _, family, factory in
                pool.reactor.adoptedStreamConnections if family == socket.AF_UNIX]
    assert channels == [worker.channel for worker in pool.started]


# --- restarting -------------------------------------------------------------------------------


def test_a_worker_that_keeps_dying_young_waits_longer_each_time(errors) -> None:
    pool = Pool()
    pool.pool.start({})
    waits = []
    for _ in range(7):
        pool.reactor.advance(5)  # each one lives 5 s
        pool.end(1)
        waits.extend(pool.pending())
        pool.reactor.advance(waits[-1] - 0.1)
        assert len(pool.started) == 2 + len(waits) - 1  # not yet
        pool.reactor.advance(0.1)
        assert pool.worker(1).started == pool.reactor.seconds()
    assert waits == [1, 2, 4, 8, 16, 30, 30]
    assert (RESTART_DELAY, RESTART_MAX_DELAY) == (1, 30)
    assert formatEvent(errors[-1]) == ("workers: worker 1 ended (A process has ended with a "
                                       "probable error condition: process ended with exit "
                                       "code 1.) after 5.0s; starting it again in 30s")


def test_a_worker_that_ran_a_while_is_started_again_after_the_first_delay() -> None:
    pool = Pool()
    pool.pool.start({})
    for lived in (1, 1, 1, STABLE_AFTER):
        pool.reactor.advance(lived)
        pool.end(1, Failure(ProcessDone(0)))
        [wait] = pool.pending()
        pool.reactor.advance(wait)
    assert wait == RESTART_DELAY


def test_each_worker_has_its_own_backoff() -> None:
    pool = Pool()
    pool.pool.start({})
    for _ in range(3):
        pool.end(1)
        pool.reactor.advance(pool.pending()[0])
    pool.end(1)
    pool.end(2)
    assert pool.pending() == [1, 8]


# --- stopping ---------------------------------------------------------------------------------


def test_stopping_drains_every_worker_and_cancels_the_restarts(listening) -> None:
    pool = Pool(count=3)
    pool.pool.start(listening)
    pool.end(3)  # its restart is pending
    stopped = pool.pool.stop(grace=30)
    assert not any(is_open(fd) for bound in listening.values() for fd, _ in bound)
    assert [pool.process(index).signals for index in (1, 2)] == [["TERM"], ["TERM"]]
    assert pool.process(3).signals == []
    assert pool.pending() == [30 + CLOSE_GRACE + 2]  # the kill; no restart
    pool.end(1, Failure(ProcessDone(0)))
    assert not stopped.called
    pool.end(2, Failure(ProcessDone(0)))
    assert settled(stopped) is None
    assert pool.reactor.getDelayedCalls() == []
    assert len(pool.started) == 3


def test_a_worker_still_running_after_the_grace_is_killed(errors) -> None:
    pool = Pool()
    pool.pool.start({})
    stopped = pool.pool.stop(grace=10)
    pool.end(1, Failure(ProcessDone(0)))
    pool.reactor.advance(10 + CLOSE_GRACE + 2)
    assert pool.process(1).signals == ["TERM"]
    assert pool.process(2).signals == ["TERM", "KILL"]
    assert [formatEvent(event) for event in errors] == [
        "workers: worker 2 did not stop in time; killing it"]
    assert not stopped.called
    pool.end(2, Failure(ProcessTerminated(signal=9)))
    assert settled(stopped) is None
    assert pool.reactor.getDelayedCalls() == []


def test_stopping_with_every_worker_gone_is_at_once() -> None:
    pool = Pool()
    pool.pool.start({})
    pool.end(1)
    pool.end(2)
    assert settled(pool.pool.stop(grace=30)) is None
    assert pool.reactor.getDelayedCalls() == []
    pool.reactor.advance(RESTART_MAX_DELAY)
    assert len(pool.started) == 2


def test_a_worker_whose_channel_closes_is_stopped() -> None:
    pool = Pool()
    pool.pool.start({})
    worker_end = Channel({}, lambda message: None, lambda: None)
    pump = connect(pool.worker(1), worker_end)
    assert worker_end.transport is not None
    worker_end.transport.loseConnection()
    pump.flush()
    assert pool.process(1).signals == ["TERM"]
    assert not pool.worker(1).serving


# --- asking the workers -----------------------------------------------------------------------


def connect(worker: WorkerProcess, worker_end: Channel) -> iosim.IOPump:
    """Join a worker's channel, as the pool adopted it, to the worker's own end."""
    [factory] = [factory for _, _, factory in worker.pool.reactor.adoptedStreamConnections
                 if isinstance(factory, ChannelFactory) and factory.channel is worker.channel]
    supervisor_end = factory.buildProtocol(None)
    return iosim.connect(worker_end, iosim.makeFakeServer(worker_end),
                         supervisor_end, iosim.makeFakeClient(supervisor_end))


def test_reports_are_those_of_the_workers_that_answered_in_time() -> None:
    pool = Pool(count=3)
    pool.pool.start({})
    silent: Deferred[Any] = Deferred()
    handlers: dict[int, dict[str, Handler]] = {
        1: {"report": lambda parts: {"worker": 1, "parts": parts}, "apply": lambda op, args: 2},
        2: {"report": lambda parts: silent, "apply": lambda op, args: 5},
        3: {"report": lambda parts: {"worker": 3, "parts": parts}, "apply": lambda op, args: 1}}
    pumps = [connect(pool.worker(index), Channel(handlers[index], lambda message: None,
                                                 lambda: None)) for index in (3, 1, 2)]
    assert pool.pool.serving() == 3
    with captured() as events:
        reports = pool.pool.reports(("destinations",))
        for pump in pumps:
            pump.flush()
        assert not reports.called
        pool.reactor.advance(CALL_TIMEOUT)
    assert settled(reports) == [{"worker": 1, "parts": ["destinations"]},
                                {"worker": 3, "parts": ["destinations"]}]
    assert any("a worker did not answer report" in formatEvent(event) for event in events)
    silent.callback({"worker": 2})  # too late: dropped
    for pump in pumps:
        pump.flush()
    applied = pool.pool.apply("kick", {"identifier": "alice"})
    for pump in pumps:
        pump.flush()
    assert settled(applied) == 8
    assert pool.reactor.getDelayedCalls() == []


# --- what workers write and log ---------------------------------------------------------------


def output_lines(events: list[LogEvent]) -> list[str]:
    return [event["line"] for event in events if "line" in event]


def test_what_a_worker_writes_outside_its_log_is_logged_line_by_line() -> None:
    worker = WorkerProcess(Pool().pool, 1)
    with captured() as events:
        worker.childDataReceived(2, b"Traceback (most recent call last):\n  File")
        worker.childDataReceived(1, b"printed \xff\n")
        worker.childDataReceived(2, b' "x.py", line 1\n\n')
    assert output_lines(events) == ["Traceback (most recent call last):", "printed \ufffd",
                                    '  File "x.py", line 1']
    assert formatEvent(events[0]) == "workers: worker 1: Traceback (most recent call last):"
    assert events[0]["log_level"] == LogLevel.error


def test_an_over_long_line_is_cut() -> None:
    worker = WorkerProcess(Pool().pool, 2)
    with captured() as events:
        worker.childDataReceived(2, b"x" * (MAX_OUTPUT_LINE + 10) + b"\nnext\n")
        worker.childDataReceived(2, b"y" * (MAX_OUTPUT_LINE + 1))  # no end: not kept whole
        worker.childDataReceived(2, b"tail\n")
    assert output_lines(events) == ["x" * MAX_OUTPUT_LINE, "next", "y" * MAX_OUTPUT_LINE,
                                    "tail"]


def test_a_workers_log_event_is_written_as_the_instances_own() -> None:
    worker = WorkerProcess(Pool().pool, 3)
    with captured() as events:
        worker.channel.stringReceived(json.dumps({
            "event": "log", "namespace": "stalroute.session", "level": "warn",
            "text": "imap session s1 ended ({braces} stay as they are)",
            "fields": {"session": "s1", "account": "a***e", "bytes_in": 10,
                       "worker": 9}}).encode())
    [event] = events
    assert event["log_namespace"] == "stalroute.session"
    assert event["log_level"] == LogLevel.warn
    assert formatEvent(event) == "imap session s1 ended ({braces} stay as they are)"
    assert (event["session"], event["account"], event["bytes_in"]) == ("s1", "a***e", 10)
    assert (event["worker"], event["log_system"]) == (3, "stalroute.session#warn worker 3")
