#!/usr/bin/env python3
"""Workers benchmark: IMAP logins/s and HTTP requests/s with ``server.workers`` = 1 and 2.

Starts, with the test harness, one private Dovecot node and one nginx node; then, for each
protocol, the real stalroute twice side by side with the same configuration but
``server.workers`` (1: one process; 2: the twistd supervisor and two worker processes sharing
the listening sockets). The same load generator loads the two in turn, ``--slices`` times, so
that what else runs on the machine weighs on both alike:

* IMAP: sessions of TLS connect (implicit TLS), ``LOGIN``, ``SELECT INBOX``, ``LOGOUT`` from
  ``--imap-clients`` processes × ``--imap-threads`` threads (raw ``ssl`` sockets, no imaplib).
  The backend leg is the production shape: PROXY v2, then implicit TLS.
* HTTP: keep-alive ``GET /jmap/session`` routed per request on ``Authorization`` (the
  request, client and route of ``bench/http_bench.py``) from ``--http-clients`` processes of
  one connection each.

CPU is read from ``/proc`` around each slice: stalroute summed over the twistd process and its
children (the workers), the backend's process tree, the generator processes (their own
``getrusage``), and the whole machine (``/proc/stat``), so the table says who used the cores.
Per worker: its CPU share, the sessions it finished (``/metrics``, ``worker`` label) and its
open connections halfway through the first slice (``/stats``).
See bench/README.md. Run (root: Dovecot): ``.venv/bin/python bench/workers_bench.py
[--seconds 20 --slices 4]``; about 100 s with the defaults.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import http.client
import json
import os
import re
import resource
import shutil
import socket
import ssl
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing import Process, Queue
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from bench.common import note, print_table, ratio  # noqa: E402
from bench.http_bench import USER as HTTP_USER  # noqa: E402
from bench.http_bench import client as http_client  # noqa: E402
from bench.http_bench import proxy_config as http_proxy_config  # noqa: E402
from tests.harness.dovecot import DovecotNode, start_seeded_nodes  # noqa: E402
from tests.harness.nginx import NginxNode  # noqa: E402
from tests.harness.pki import CertificateAuthority  # noqa: E402
from tests.harness.ports import LOOPBACK, free_port  # noqa: E402
from tests.harness.stalroute import (  # noqa: E402
    StalrouteProcess, admin_section, dovecot_destination, imap_proxy_config, parse_address,
)

USER, PASSWORD = "bench", "bench-Pw-31415"
TOKEN = "Bench-" + "w" * 34
TICKS = os.sysconf("SC_CLK_TCK")
WORKER_COUNTS = (1, 2)
#: Twisted's "SessionFactory starting on 993", written whatever the log level: the workers
#: write it when they adopt the sockets, which may be after the listeners accept.
TWISTED_PORT_NOTE = re.compile(r"Factory (starting|stopping) on \d+$")
#: Session outcomes (``stalroute_sessions_finished``) of a session that went as planned.
NORMAL_OUTCOMES = ("ok", "closed", "client_closed", "backend_closed")


# --- CPU from /proc --------------------------------------------------------------------------

@dataclass(frozen=True)
class ProcessCpu:
    """One process from /proc/<pid>/stat: its parent, name and CPU seconds."""

    ppid: int
    comm: str
    own: float  # utime + stime
    reaped: float  # cutime + cstime: its children that exited and were reaped

    @property
    def total(self) -> float:
        """What the process and its reaped children used: a tree's sum of this does not
        drop when a child exits and is reaped."""
        return self.own + self.reaped


def processes() -> dict[int, ProcessCpu]:
    """Every live process of the machine."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError):
                stat = (entry / "stat").read_text()
                fields = stat[stat.rindex(")") + 2:].split()  # state ppid ... utime at 11
                times = [int(value) / TICKS for value in fields[11:15]]
                found[int(entry.name)] = ProcessCpu(int(fields[1]),
                                                    stat[stat.index("(") + 1:stat.rindex(")")],
                                                    times[0] + times[1], times[2] + times[3])
    return found


def process_tree(root: int, comm: str | None = None,
                 snapshot: dict[int, ProcessCpu] | None = None) -> list[int]:
    """``root`` and its live descendants (with ``comm``: the children of ``root`` so named,
    and theirs; ``root`` itself is then left out)."""
    snapshot = processes() if snapshot is None else snapshot
    children: dict[int, list[int]] = {}
    for pid, process in snapshot.items():
        children.setdefault(process.ppid, []).append(pid)
    found = [root] if comm is None else [pid for pid in children.get(root, [])
                                         if snapshot[pid].comm == comm]
    for pid in found:  # grows while iterating: a breadth-first walk
        found.extend(children.get(pid, []))
    return found


def machine_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all cores since boot, from the first line of /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


@dataclass
class CpuMeter:
    """CPU used between each ``start()`` and ``stop()``, summed over the slices measured: by
    stalroute (per process), the backend's process tree, the machine, and the processes that
    are not this benchmark's."""

    proxy_pid: int
    backend: Callable[[dict[int, ProcessCpu]], list[int]]
    proxy: Counter[int] = field(default_factory=Counter)
    backend_seconds: float = 0.0
    strangers: Counter[str] = field(default_factory=Counter)  # "name[pid]" → own CPU seconds
    _machine_busy: int = 0  # jiffies, all cores
    _machine_total: int = 0

    def start(self) -> None:
        self._before = processes()
        self._machine = machine_jiffies()

    def stop(self) -> None:
        busy, total = machine_jiffies()
        after = processes()
        self._machine_busy += busy - self._machine[0]
        self._machine_total += total - self._machine[1]

        def used(pids: list[int]) -> dict[int, float]:
            return {pid: after[pid].total - (self._before[pid].total if pid in self._before
                                             else 0.0) for pid in pids if pid in after}

        self.proxy.update(used(process_tree(self.proxy_pid, snapshot=after)))
        self.backend_seconds += sum(used(self.backend(after)).values())
        ours = set(process_tree(os.getpid(), snapshot=after))
        self.strangers.update({f"{after[pid].comm}[{pid}]": after[pid].own - (
            self._before[pid].own if pid in self._before else 0.0)
            for pid in after if pid not in ours})

    @property
    def proxy_seconds(self) -> float:
        return sum(self.proxy.values())

    @property
    def machine_cores(self) -> float:
        """Cores the whole machine kept busy, on average."""
        if not self._machine_total:
            return 0.0
        return self._machine_busy / self._machine_total * (os.cpu_count() or 1)

    def busiest_strangers(self) -> list[tuple[str, float]]:
        return [(name, seconds) for name, seconds in self.strangers.most_common(3) if seconds > 0]


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# --- load generators (child processes) ---------------------------------------------------------

def imap_session(address: tuple[str, int], context: ssl.SSLContext, server_hostname: str) -> None:
    """TLS connect, LOGIN, SELECT INBOX, LOGOUT; each tagged answer must be OK."""
    with socket.create_connection(address, timeout=30) as raw:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with context.wrap_socket(raw, server_hostname=server_hostname) as tls, \
                tls.makefile("rb") as reader:
            greeting = reader.readline()
            if not greeting.startswith(b"* OK"):
                raise RuntimeError(f"greeting {greeting[:80]!r}")
            for tag, command in ((b"a", f'LOGIN {USER} "{PASSWORD}"'.encode()),
                                 (b"b", b"SELECT INBOX"), (b"c", b"LOGOUT")):
                tls.sendall(tag + b" " + command + b"\r\n")
                line = b""
                while not line.startswith(tag + b" "):
                    line = reader.readline()
                    if not line:
                        raise ConnectionError(f"closed before the answer to {tag.decode()}")
                if not line.startswith(tag + b" OK"):
                    raise RuntimeError(f"answer {line[:80]!r}")
            reader.read()  # to the server's close: a clean end, not a reset, on both sides


def imap_generator(address: tuple[str, int], cafile: str, server_hostname: str, threads: int,
                   seconds: float, queue: Queue) -> None:
    """Sessions one after the other on each of ``threads`` threads until ``seconds`` pass;
    puts (sessions, errors, first error, CPU seconds of this process)."""
    context = ssl.create_default_context(cafile=cafile)
    lock = threading.Lock()
    done = errors = 0
    first_error = ""
    deadline = time.monotonic() + seconds

    def loop() -> None:
        nonlocal done, errors, first_error
        while time.monotonic() < deadline:
            try:
                imap_session(address, context, server_hostname)
            except Exception as exc:  # noqa: BLE001 - counted and shown by the parent
                with lock:
                    errors += 1
                    first_error = first_error or f"{type(exc).__name__}: {exc}"
                continue
            with lock:
                done += 1

    begin = own_cpu()
    workers = [threading.Thread(target=loop) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    queue.put((done, errors, first_error, own_cpu() - begin))


class _Kept:
    """Stands in for the queue of :func:`bench.http_bench.client`: keeps what it puts."""

    item: tuple[int, list[float], str | None, int]

    def put(self, item: tuple[int, list[float], str | None, int]) -> None:
        self.item = item


def http_generator(address: tuple[str, int], seconds: float, queue: Queue) -> None:
    """One keep-alive connection of :func:`bench.http_bench.client`; puts (requests,
    failures, error, CPU seconds of this process)."""
    kept = _Kept()
    begin = own_cpu()
    http_client(address, True, seconds, kept)
    count, _, error, failures = kept.item
    queue.put((count, failures, error or "", own_cpu() - begin))


@dataclass(frozen=True)
class Load:
    done: int
    errors: int
    first_error: str
    generator_seconds: float
    seconds: float

    @property
    def per_second(self) -> float:
        return self.done / self.seconds if self.seconds else 0.0

    def __add__(self, other: Load) -> Load:
        return Load(self.done + other.done, self.errors + other.errors,
                    self.first_error or other.first_error,
                    self.generator_seconds + other.generator_seconds,
                    self.seconds + other.seconds)


def run_generators(target: Callable[..., None], args: tuple[Any, ...], processes: int,
                   seconds: float) -> Load:
    queue: Queue = Queue()
    children = [Process(target=target, args=(*args, queue)) for _ in range(processes)]
    begin = time.monotonic()
    for child in children:
        child.start()
    results = [queue.get(timeout=seconds + 120) for _ in children]
    elapsed = time.monotonic() - begin
    for child in children:
        child.join()
    return Load(sum(r[0] for r in results), sum(r[1] for r in results),
                next((r[2] for r in results if r[2]), ""), sum(r[3] for r in results), elapsed)


# --- the instance ------------------------------------------------------------------------------

class AdminAPI:
    """GET requests to the instance's admin API (HTTPS, bearer token)."""

    def __init__(self, proxy: StalrouteProcess, ca: CertificateAuthority) -> None:
        self.address = parse_address(proxy.config["admin"]["bind"])
        self.context = ca.client_context()

    def get(self, path: str) -> bytes:
        connection = http.client.HTTPSConnection(*self.address, context=self.context, timeout=30)
        try:
            connection.request("GET", path, headers={"Authorization": f"Bearer {TOKEN}"})
            response = connection.getresponse()
            body = response.read()
        finally:
            connection.close()
        if response.status != 200:
            raise RuntimeError(f"GET {path} answered {response.status}")
        return body

    def connections_by_worker(self) -> str:
        """Open client connections of each worker, e.g. ``"3/1"`` (``-`` without workers)."""
        workers = json.loads(self.get("/stats")).get("workers")
        return "/".join(str(worker["active_connections"]) for worker in
                        sorted(workers, key=lambda w: w["worker"])) if workers else "-"

    def finished_by_worker(self, protocol: str) -> Counter[str]:
        """Sessions of ``protocol`` finished so far, by worker (``"-"`` without workers) and
        outcome: ``stalroute_sessions_finished`` of ``/metrics``."""
        finished: Counter[str] = Counter()
        for family in text_string_to_metric_families(self.get("/metrics").decode()):
            if family.name == "stalroute_sessions_finished":
                for sample in family.samples:
                    if sample.labels.get("protocol") == protocol:
                        key = f"{sample.labels.get('worker', '-')}:{sample.labels['outcome']}"
                        finished[key] += int(sample.value)
        return finished


@dataclass(frozen=True)
class Phase:
    """One protocol measured on one instance."""

    load: Load
    cpu: CpuMeter
    worker_pids: list[int]
    finished: Counter[str]  # "worker:outcome" → sessions finished during the phase
    problems: list[str]  # log lines written during the phase (at warn: only problems)
    connections_midway: str  # open client connections of each worker halfway through

    @property
    def ms_per_unit(self) -> float:
        return 1000 * self.cpu.proxy_seconds / self.load.done if self.load.done else float("nan")

    def worker_shares(self) -> str:
        """Each worker's share of the proxy CPU, e.g. ``"51/49 %"``; ``-`` with one process."""
        if not self.worker_pids:
            return "-"
        used = [self.cpu.proxy.get(pid, 0.0) for pid in self.worker_pids]
        total = self.cpu.proxy_seconds or 1.0
        return ("/".join(f"{100 * u / total:.0f}" for u in used)
                + f" % (supervisor {100 * (1 - sum(used) / total):.0f} %)")

    def worker_sessions(self) -> str:
        by_worker: Counter[str] = Counter()
        for key, count in self.finished.items():
            by_worker[key.split(":")[0]] += count
        if list(by_worker) == ["-"]:
            return "-"
        return "/".join(str(by_worker[worker]) for worker in sorted(by_worker))

    def failed_outcomes(self) -> dict[str, int]:
        return {key: count for key, count in self.finished.items()
                if key.split(":")[1] not in NORMAL_OUTCOMES and count}


@dataclass(frozen=True)
class Workload:
    """One protocol's phase: the instance's configuration and mappings, the listener the
    generator loads, the backend's processes, and the generator."""

    protocol: str
    config: dict[str, Any]
    mappings: dict[str, str]
    listener: str
    backend: Callable[[dict[int, ProcessCpu]], list[int]]  # its processes in a snapshot
    generator: Callable[..., None]
    generator_args: Callable[[tuple[str, int]], tuple[Any, ...]]  # before seconds, queue
    processes: int


def workloads(args: argparse.Namespace, ca: CertificateAuthority, node: DovecotNode,
              nginx: NginxNode) -> list[Workload]:
    """IMAP to Dovecot (the shape of imap_bench.py) and HTTP to nginx (http_bench.py), each
    with the admin API for ``/metrics``."""
    certificate = ca.issue("stalroute", ["localhost"], ["127.0.0.1"])
    imap = imap_proxy_config(
        certificate, {"node1": dovecot_destination(node, tls="implicit", ca_file=ca.cert_path)},
        default="node1", log_level="warn")
    imap["listener"]["imaps"]["max_connections"] = 65536
    http = http_proxy_config(nginx, free_port())
    http["tls"] = imap["tls"]  # the admin API's certificate
    for config in (imap, http):
        config["admin"] = admin_section(TOKEN)
    return [
        Workload("imap", imap, {USER: "node1"}, "imaps",
                 lambda snapshot: process_tree(node.pid, snapshot=snapshot), imap_generator,
                 lambda address: (address, str(ca.cert_path), "localhost", args.imap_threads),
                 args.imap_clients),
        Workload("http", http, {HTTP_USER: "nginx"}, "web",
                 lambda snapshot: process_tree(os.getpid(), "nginx", snapshot),
                 http_generator,
                 lambda address: (address,), args.http_clients),
    ]


@dataclass
class Instance:
    """A running stalroute of one worker count, and what was measured on it so far."""

    workers: int
    proxy: StalrouteProcess
    admin: AdminAPI
    meter: CpuMeter
    worker_pids: list[int]
    started_log: int
    finished_before: Counter[str]
    load: Load = Load(0, 0, "", 0.0, 0.0)
    connections_midway: str = "?"

    def current_workers(self) -> list[int]:
        return [pid for pid in process_tree(self.proxy.pid) if pid != self.proxy.pid]


def start_instance(workload: Workload, workers: int, ca: CertificateAuthority, workdir: Path,
                   cleanup: contextlib.ExitStack) -> Instance:
    """Start stalroute with ``workers`` and warm it up (one second of load)."""
    config = copy.deepcopy(workload.config)
    config["server"]["workers"] = workers
    for listener in config["listener"].values():  # the instances run side by side
        listener["bind"] = [f"{LOOPBACK}:{free_port()}"]
    config["admin"]["bind"] = f"{LOOPBACK}:{free_port()}"
    proxy = StalrouteProcess(config, workdir / f"{workload.protocol}-{workers}",
                             mappings=workload.mappings)
    cleanup.enter_context(proxy)
    deadline = time.monotonic() + 30
    while len(process_tree(proxy.pid)) < workers + (workers > 1):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the {workers} workers did not start")
        time.sleep(0.1)
    started_log = proxy.log.size()
    generator_args = workload.generator_args(proxy.listener(workload.listener))
    run_generators(workload.generator, (*generator_args, 1.0), workload.processes, 1.0)
    admin = AdminAPI(proxy, ca)
    instance = Instance(workers, proxy, admin, CpuMeter(proxy.pid, workload.backend), [],
                        started_log, admin.finished_by_worker(workload.protocol))
    instance.worker_pids = instance.current_workers()
    return instance


def measure_slice(workload: Workload, instance: Instance, seconds: float, poll: bool) -> None:
    """Load ``instance`` for ``seconds``; with ``poll``, ask its workers' open connections
    halfway."""
    generator_args = workload.generator_args(instance.proxy.listener(workload.listener))
    midway: list[str] = []
    poller = threading.Timer(seconds / 2, lambda: midway.append(
        instance.admin.connections_by_worker())) if poll else None
    instance.meter.start()
    if poller is not None:
        poller.start()
    instance.load += run_generators(workload.generator, (*generator_args, seconds),
                                    workload.processes, seconds)
    instance.meter.stop()
    if poller is not None:
        poller.join()
        instance.connections_midway = "".join(midway) or "?"


def measure(workload: Workload, args: argparse.Namespace, ca: CertificateAuthority,
            workdir: Path) -> list[Phase]:
    """Both worker counts of ``workload``, running side by side and loaded in turn, one
    ``--slices``-th of ``--seconds`` at a time: a neighbour's burst on the machine is shared."""
    with contextlib.ExitStack() as cleanup:
        instances = [start_instance(workload, workers, ca, workdir, cleanup)
                     for workers in WORKER_COUNTS]
        note(f"{workload.protocol}: workers {'/'.join(map(str, WORKER_COUNTS))} in turn, "
             f"{args.slices} × {args.seconds / args.slices:.1f} s each, "
             f"{workload.processes} generator processes")
        for number in range(args.slices):
            for instance in instances:
                measure_slice(workload, instance, args.seconds / args.slices, number == 0)
        phases = []
        for instance in instances:
            if instance.worker_pids != instance.current_workers():
                note(f"workers={instance.workers}: the worker processes changed (a restart?)")
            finished = (instance.admin.finished_by_worker(workload.protocol)
                        - instance.finished_before)
            problems = [line for line in instance.proxy.log_text(instance.started_log)
                        .splitlines() if line.strip() and not TWISTED_PORT_NOTE.search(line)]
            phases.append(Phase(instance.load, instance.meter, instance.worker_pids, finished,
                                problems, instance.connections_midway))
    return phases


# --- the table ---------------------------------------------------------------------------------

def rows_for(name: str, unit: str, phases: list[Phase], cores: int) -> list[tuple[str, ...]]:
    one, two = phases

    def row(label: str, value: Callable[[Phase], float], fmt: str = "{:.2f}",
            with_ratio: bool = True) -> tuple[str, ...]:
        a, b = value(one), value(two)
        return (label, fmt.format(a), fmt.format(b), ratio(b, a) if with_ratio else "")

    return [
        row(f"{name} {unit}/s", lambda p: p.load.per_second, "{:.0f}"),
        row(f"{name} proxy CPU ms per {unit}", lambda p: p.ms_per_unit, "{:.3f}"),
        row(f"{name} cores used: stalroute (all processes)",
            lambda p: p.cpu.proxy_seconds / p.load.seconds),
        row(f"{name} cores used: load generator", lambda p: p.load.generator_seconds
            / p.load.seconds),
        row(f"{name} cores used: backend", lambda p: p.cpu.backend_seconds / p.load.seconds),
        row(f"{name} cores used: other processes (not this benchmark's)",
            lambda p: sum(p.cpu.strangers.values()) / p.load.seconds, with_ratio=False),
        row(f"{name} cores used: the rest (kernel, processes that ended)",
            lambda p: p.cpu.machine_cores - (p.cpu.proxy_seconds + p.load.generator_seconds
                                             + p.cpu.backend_seconds
                                             + sum(p.cpu.strangers.values())) / p.load.seconds,
            with_ratio=False),
        row(f"{name} cores used: whole machine (of {cores})", lambda p: p.cpu.machine_cores,
            with_ratio=False),
        (f"{name} worker CPU shares / {unit}s finished per worker",
         f"{one.worker_shares()} / {one.worker_sessions()}",
         f"{two.worker_shares()} / {two.worker_sessions()}", ""),
        (f"{name} open connections per worker, halfway", one.connections_midway,
         two.connections_midway, ""),
        (f"{name} errors (generator / failed outcomes)",
         f"{one.load.errors} / {sum(one.failed_outcomes().values())}",
         f"{two.load.errors} / {sum(two.failed_outcomes().values())}", ""),
    ]


def run(args: argparse.Namespace) -> None:
    idle_check = machine_jiffies()
    time.sleep(1.0)
    busy, total = machine_jiffies()
    busy_before = (busy - idle_check[0]) / (total - idle_check[1]) * (os.cpu_count() or 1)
    workdir = Path(tempfile.mkdtemp(prefix="stalroute-workers-bench-"))
    phases: dict[str, list[Phase]] = {}
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, workdir, True)
        ca = CertificateAuthority(workdir / "pki")
        (node,) = start_seeded_nodes(ca, {USER: PASSWORD}, ("node1",))
        cleanup.callback(node.stop)
        nginx = cleanup.enter_context(NginxNode("bench", parent_dir=workdir))
        for workload in workloads(args, ca, node, nginx):
            if workload.protocol in args.protocols:
                phases[workload.protocol] = measure(workload, args, ca, workdir)

    cores = os.cpu_count() or 1
    print(f"\n{cores} cores shared by stalroute, Dovecot, nginx and the load generators; "
          f"{args.seconds:.0f} s of load per worker count and protocol, in {args.slices} "
          f"slices; {busy_before:.2f} cores were busy in the second before the run.")
    print(f"IMAP: {args.imap_clients} processes × {args.imap_threads} threads, each session "
          f"TLS + LOGIN + SELECT + LOGOUT. HTTP: {args.http_clients} keep-alive connections, "
          f"routed per request.\n")
    units = {"imap": ("IMAP", "login"), "http": ("HTTP", "request")}
    print_table(("metric", "workers=1", "workers=2", "ratio 2/1"),
                [row for protocol, measured in phases.items()
                 for row in rows_for(*units[protocol], measured, cores)])
    for protocol, measured in phases.items():
        for workers, phase in zip(WORKER_COUNTS, measured, strict=True):
            where = f"{protocol}, workers={workers}"
            if phase.load.first_error:
                print(f"{where}: first generator error: {phase.load.first_error}")
            if phase.failed_outcomes():
                print(f"{where}: failed outcomes {phase.failed_outcomes()}")
            if phase.cpu.busiest_strangers():
                print(f"{where}: busiest other processes (CPU s): " + ", ".join(
                    f"{name} {seconds:.1f}" for name, seconds in phase.cpu.busiest_strangers()))
            if phase.problems:
                print(f"{where}: {len(phase.problems)} log lines at warn or above, first: "
                      f"{phase.problems[0][:200]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0,
                        help="load time of each worker count, per protocol")
    parser.add_argument("--slices", type=int, default=4,
                        help="the load alternates between the worker counts this many times")
    parser.add_argument("--protocols", nargs="+", choices=("imap", "http"),
                        default=["imap", "http"], help="what to measure")
    parser.add_argument("--imap-clients", type=int, default=2, help="IMAP generator processes")
    parser.add_argument("--imap-threads", type=int, default=8,
                        help="concurrent sessions per IMAP generator process")
    parser.add_argument("--http-clients", type=int, default=4,
                        help="HTTP keep-alive connections (one process each)")
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
