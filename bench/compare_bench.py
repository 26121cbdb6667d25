#!/usr/bin/env python3
"""Peer comparison: stalroute, HAProxy and nginx mail in front of the same backends, one run.

Two private Dovecot 2.3 nodes (the accounts spread over both) and one nginx HTTP backend; in
front of them, each with one worker and the same RSA-2048 certificate on the client side (the
Dovecot nodes present it too): stalroute (per-account routing; PROXY v2 + TLS to Dovecot),
HAProxy (``mode tcp`` with TLS terminated, round robin, ``send-proxy-v2-ssl`` + verified TLS
to Dovecot; ``mode http`` with a map on the ``Authorization`` user), nginx mail (``auth_http``
answered by a ``map`` in its own ``http`` block; PROXY v1 + plaintext to Dovecot, it has no
TLS toward backends), and "direct" (TLS at the account's Dovecot node).

Measured with one raw-``ssl`` client for every target: IMAP logins/s and proxy CPU per session
(``/proc``, the proxy's process tree), the same for returning clients that resume their last
TLS session, one-client latency, proxy memory per idle session, relay of a large FETCH; HTTP
keep-alive requests/s and CPU per request. ``--floor`` adds ``bench/floor_proxy.py`` (HAProxy's
job on stalroute's TLS stack, no stalroute logic) as a column. ``--profile FILE`` adds a fresh
stalroute under cProfile on the CPU clock (``bench/cpu_profile.py``) with the same IMAP load (the
table stays unprofiled).

Run as root (Dovecot): ``.venv/bin/python bench/compare_bench.py`` (under 3 minutes).
See bench/README.md for the rows and how to read them.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import Queue, Value
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

from bench.common import (  # noqa: E402
    ImapConnection, imap_session, issue_rsa_certificate, note, print_table,
)
from bench.http_bench import USER as HTTP_USER  # noqa: E402
from bench.http_bench import print_profile, profile_arguments, write_profile  # noqa: E402
from bench.http_bench import proxy_config as http_proxy_config  # noqa: E402
from bench.workers_bench import (  # noqa: E402
    CpuMeter, Load, ProcessCpu, http_generator, own_cpu, process_tree,
    run_generators,
)
from bench.peers import (  # noqa: E402
    RoomyDovecotNode, dovecot_sessions, start_floor_proxy, start_haproxy, start_nginx_mail,
)
from tests.harness.clients import make_message  # noqa: E402
from tests.harness.dovecot import DovecotNode  # noqa: E402
from tests.harness.nginx import NginxNode  # noqa: E402
from tests.harness.pki import CertificateAuthority, IssuedCertificate  # noqa: E402
from tests.harness.ports import LOOPBACK, free_port  # noqa: E402
from tests.harness.stalroute import (  # noqa: E402
    StalrouteProcess, dovecot_destination, imap_proxy_config,
)

PASSWORD = "bench-Pw-31415"
BIG_USER, BIG_MAILBOX = "bigbench", "Bench"
NAMES = ("localhost", "node1.test", "node2.test")
#: The direct target's meter counts no proxy: no process has this pid.
NO_PROXY = -1
#: The column of ``--baseline-tree``'s stalroute.
BASELINE = "stalroute baseline"
FLOOR = "Python floor"
Address = tuple[str, int]


# --- the targets -----------------------------------------------------------------------------

@dataclass
class ResumptionTally:
    """Sessions that offered a TLS session, and those the server resumed: shared by the
    generator processes."""

    offered: Synchronized[int] = field(default_factory=lambda: Value("q", 0))
    resumed: Synchronized[int] = field(default_factory=lambda: Value("q", 0))

    def add(self, offered: int, resumed: int) -> None:
        with self.offered.get_lock():
            self.offered.value += offered
        with self.resumed.get_lock():
            self.resumed.value += resumed


@dataclass
class Target:
    """One way to reach the accounts (IMAP, or HTTP), and what was measured through it."""

    name: str
    addresses: dict[str, Address]  # account → where its client connects
    pid: int  # the proxy's process (its tree is measured), NO_PROXY for direct
    backend: Callable[[dict[int, ProcessCpu]], list[int]]  # the backends' processes
    load: Load = Load(0, 0, "", 0.0, 0.0)  # logins, or HTTP requests
    meter: CpuMeter = field(init=False)  # CPU during ``load``
    latencies: list[float] = field(default_factory=list)
    relay_rates: list[float] = field(default_factory=list)
    relay_cpu: float = 0.0  # proxy CPU seconds over all the relayed bytes
    relay_bytes: int = 0
    idle: tuple[int, float] | None = None  # (sessions held, KiB per session)
    idle_fetched: tuple[int, float] | None = None  # KiB per session a FETCH each added
    tls: str = ""
    resumption: ResumptionTally | None = None  # clients offer their last TLS session

    def __post_init__(self) -> None:
        self.meter = CpuMeter(self.pid, self.backend)

    @property
    def is_proxy(self) -> bool:
        return self.pid != NO_PROXY

    def sessions(self) -> list[tuple[str, Address]]:
        return [(user, address) for user, address in self.addresses.items() if user != BIG_USER]


def stalroute_imap_config(certificate: IssuedCertificate, ca: CertificateAuthority,
                          nodes: list[DovecotNode]) -> dict[str, Any]:
    """imap_bench.py's shape over both nodes (fresh ports at every call)."""
    config = imap_proxy_config(
        certificate, {node.name: dovecot_destination(node, tls="implicit", ca_file=ca.cert_path)
                      for node in nodes}, default=nodes[0].name, log_level="warn")
    config["listener"]["imaps"]["max_connections"] = 65536
    return config


# --- the phases ------------------------------------------------------------------------------

def imap_generator(sessions: list[tuple[str, Address]], cafile: str, threads: int,
                   seconds: float, resumption: ResumptionTally | None, queue: Queue) -> None:
    """Sessions one after the other on ``threads`` threads (clients), each cycling through the
    accounts, until ``seconds`` pass; puts (sessions, errors, first error, CPU seconds of this
    process) as :func:`bench.workers_bench.run_generators` expects. With ``resumption``, each
    client offers the TLS session of its previous connection to the same address (a returning
    client; its first connection is a full handshake) and counts the resumed ones there."""
    context = ssl.create_default_context(cafile=cafile)
    lock = threading.Lock()
    done = errors = offered = resumed = 0
    first_error = ""
    deadline = time.monotonic() + seconds

    def loop(offset: int) -> None:
        nonlocal done, errors, first_error, offered, resumed
        last_session: dict[Address, ssl.SSLSession] = {}
        while time.monotonic() < deadline:
            user, address = sessions[(offset := offset + 1) % len(sessions)]
            offer = last_session.get(address) if resumption is not None else None
            try:
                connection = imap_session(address, context, user, PASSWORD, offer)
            except Exception as exc:  # noqa: BLE001 - counted and shown by the parent
                with lock:
                    errors += 1
                    first_error = first_error or f"{type(exc).__name__}: {exc}"
                continue
            if connection.session is not None:
                last_session[address] = connection.session
            with lock:
                done += 1
                offered += offer is not None
                resumed += connection.resumed

    begin = own_cpu()
    workers = [threading.Thread(target=loop, args=(os.getpid() * 7 + n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    if resumption is not None:
        resumption.add(offered, resumed)
    queue.put((done, errors, first_error, own_cpu() - begin))


def tree_rss_kib(pid: int) -> int:
    """VmRSS summed over ``pid`` and its descendants."""
    total = 0
    for member in process_tree(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


def measure_logins(targets: list[Target], args: argparse.Namespace, cafile: str,
                   seconds: float) -> None:
    """The targets loaded in turn, ``--slices`` times: a neighbour's burst weighs on all."""
    share = seconds / args.slices
    for _ in range(args.slices):
        for target in targets:
            target.meter.start()
            target.load += run_generators(
                imap_generator,
                (target.sessions(), cafile, args.threads, share, target.resumption),
                args.clients, share)
            target.meter.stop()


def measure_latency(targets: list[Target], context: ssl.SSLContext, sessions: int) -> None:
    """One client, sessions one after the other, one per target in turn."""
    for number in range(sessions):
        for target in targets:
            user, address = target.sessions()[number % len(target.sessions())]
            begin = time.perf_counter()
            imap_session(address, context, user, PASSWORD)
            target.latencies.append(time.perf_counter() - begin)


def measure_relay(target: Target, context: ssl.SSLContext, size: int, fetches: int) -> None:
    """FETCH of the large message ``fetches`` times on one logged-in connection."""
    connection = ImapConnection(target.addresses[BIG_USER], context)
    connection.login(BIG_USER, PASSWORD, BIG_MAILBOX)
    meter = CpuMeter(target.pid, lambda snapshot: [])
    for _ in range(fetches):
        meter.start()
        begin = time.perf_counter()
        answer = connection.command(b"FETCH 1 (BODY.PEEK[])")
        elapsed = time.perf_counter() - begin
        meter.stop()
        if max(len(part) for part in answer) != size:
            raise RuntimeError(f"{target.name}: FETCH returned the wrong size")
        target.relay_rates.append(size / 1e6 / elapsed)
    connection.logout()
    target.relay_cpu, target.relay_bytes = meter.proxy_seconds, size * fetches


def hold_idle_sessions(target: Target, context: ssl.SSLContext, count: int, limit: float,
                       nodes: list[DovecotNode], fetch: bool) -> None:
    """Open up to ``count`` sessions (LOGIN + SELECT) in two halves and leave them idle; the
    proxy's RSS growth over the second half is the memory per session (what the first ones
    allocate once, pools and caches, does not count). Run on a fresh proxy: memory a process
    freed but kept, of sessions that ended, is taken up first and would pass for sessions
    costing less. If ``fetch``, FETCH the account's second message (``--idle-fetch-kib``) on
    each and read it again; close them and wait for Dovecot to end its ``imap`` processes."""
    sessions = target.sessions()
    deadline = time.monotonic() + limit

    def open_one(number: int) -> ImapConnection | None:
        if time.monotonic() > deadline:
            return None
        user, address = sessions[number % len(sessions)]
        connection = ImapConnection(address, context)
        try:
            connection.login(user, PASSWORD)
        except BaseException:
            connection.close()
            raise
        return connection

    def open_many(numbers: range) -> list[ImapConnection]:
        futures = [pool.submit(open_one, number) for number in numbers]
        opened = []
        for future in futures:
            with contextlib.suppress(Exception):
                if (connection := future.result()) is not None:
                    opened.append(connection)
        time.sleep(1.0)
        return opened

    with ThreadPoolExecutor(8) as pool:
        opened = open_many(range(count // 2))
        before = tree_rss_kib(target.pid)
        second_half = open_many(range(count // 2, count))
        after = tree_rss_kib(target.pid)
        opened += second_half
        target.idle = (len(opened), (after - before) / max(len(second_half), 1))
        if fetch:
            list(pool.map(lambda connection: connection.command(b"FETCH 2 (BODY.PEEK[])"),
                          opened))
            time.sleep(1.0)
            target.idle_fetched = (len(opened),
                                   (tree_rss_kib(target.pid) - after) / max(len(opened), 1))
    for connection in opened:
        connection.close()
    settle = time.monotonic() + 30
    while dovecot_sessions(nodes) > 10 and time.monotonic() < settle:
        time.sleep(0.2)


def measure_http(targets: list[Target], args: argparse.Namespace) -> None:
    share = args.http_seconds / args.slices
    for target in targets:
        run_generators(http_generator, (target.addresses[HTTP_USER], 0.5), 1, 0.5)  # warm-up
    for _ in range(args.slices):
        for target in targets:
            target.meter.start()
            target.load += run_generators(http_generator, (target.addresses[HTTP_USER], share),
                                          args.http_clients, share)
            target.meter.stop()


# --- the table -------------------------------------------------------------------------------

def per_second(target: Target) -> float:
    return target.load.per_second


def p50_ms(target: Target) -> float:
    return 1000 * statistics.median(target.latencies)


def p90_ms(target: Target) -> float:
    return 1000 * statistics.quantiles(target.latencies, n=10)[-1]


def relay_rate(target: Target) -> float:
    return statistics.median(target.relay_rates)


def resumed_percent(target: Target) -> str:
    """Of the sessions that offered a TLS session, the share the server resumed."""
    tally = target.resumption
    if tally is None or not tally.offered.value:
        return "-"
    return f"{100 * tally.resumed.value / tally.offered.value:.1f}"


def per_unit(seconds: float, units: int, scale: float, digits: int = 2) -> str:
    return f"{scale * seconds / units:.{digits}f}" if units else "-"


def cores(target: Target) -> str:
    """Cores used during the load: proxy / generator / backends / whole machine."""
    wall = target.load.seconds
    return (f"{target.meter.proxy_seconds / wall:.2f} / "
            f"{target.load.generator_seconds / wall:.2f} / "
            f"{target.meter.backend_seconds / wall:.2f} / {target.meter.machine_cores:.2f}")


def others(target: Target) -> str:
    """Cores that processes not of this benchmark used during the load (a disturbed run)."""
    return f"{sum(target.meter.strangers.values()) / target.load.seconds:.2f}"


def rows(imap: list[Target], resumed: list[Target], http: list[Target],
         args: argparse.Namespace) -> list[tuple[str, ...]]:
    """The table: one column per IMAP target; the resumed-session and HTTP rows under the same
    names."""

    def cells(value: Callable[[Target], str], of: list[Target] = imap,
              proxies_only: bool = False) -> tuple[str, ...]:
        by_name = {t.name: value(t) for t in of if t.is_proxy or not proxies_only}
        return tuple(by_name.get(target.name, "-") for target in imap)

    def times(value: Callable[[Target], float], of: list[Target]) -> tuple[str, ...]:
        base = value(of[0])
        return cells(lambda t: f"{value(t) / base:.2f}×" if base else "-", of)

    table = [
        (f"IMAP logins/s, TLS+LOGIN+SELECT+FETCH+LOGOUT, {args.clients * args.threads} "
         "concurrent", *cells(lambda t: f"{per_second(t):.0f}")),
        ("  × direct", *times(per_second, imap)),
        ("  proxy CPU ms per session (process tree)", *cells(
            lambda t: per_unit(t.meter.proxy_seconds, t.load.done, 1000), proxies_only=True)),
        ("  Dovecot CPU ms per session (both nodes)", *cells(
            lambda t: per_unit(t.meter.backend_seconds, t.load.done, 1000))),
        ("  cores: proxy / generator / Dovecot / machine", *cells(cores)),
        ("  cores: other processes (not this benchmark's)", *cells(others)),
        ("  sessions / errors", *cells(lambda t: f"{t.load.done} / {t.load.errors}")),
    ]
    if resumed:
        table += [
            ("IMAP resumed-session logins/s (each client offers its last TLS session)",
             *cells(lambda t: f"{per_second(t):.0f}", resumed)),
            ("  × direct", *times(per_second, resumed)),
            ("  proxy CPU ms per resumed session (process tree)", *cells(
                lambda t: per_unit(t.meter.proxy_seconds, t.load.done, 1000), resumed, True)),
            ("  client sessions resumed % (of those offering one)",
             *cells(resumed_percent, resumed)),
            ("  sessions / errors", *cells(lambda t: f"{t.load.done} / {t.load.errors}",
                                           resumed)),
        ]
    table += [
        (f"one-client session p50 / p90 ms ({args.latency_sessions} sessions)",
         *cells(lambda t: f"{p50_ms(t):.1f} / {p90_ms(t):.1f}")),
        ("  p50 × direct", *times(p50_ms, imap)),
    ]
    if args.idle:
        table.append(("memory per idle session, KiB (proxy RSS; sessions held)", *cells(
            lambda t: f"{t.idle[1]:.1f} ({t.idle[0]})" if t.idle else "-", proxies_only=True)))
    if args.idle and args.idle_fetch_kib:
        table.append((f"  added by a FETCH of {args.idle_fetch_kib} KiB on each", *cells(
            lambda t: f"{t.idle_fetched[1]:.1f} ({t.idle_fetched[0]})" if t.idle_fetched
            else "-", proxies_only=True)))
    table += [
        (f"relay MB/s, FETCH {args.size_mb} MiB (median of {args.fetches})",
         *cells(lambda t: f"{relay_rate(t):.0f}")),
        ("  × direct", *times(relay_rate, imap)),
        ("  proxy CPU s/GB", *cells(lambda t: per_unit(t.relay_cpu, t.relay_bytes, 1e9),
                                    proxies_only=True)),
    ]
    if http:
        table += [
            (f"HTTP keep-alive req/s ({args.http_clients} connections), routed on Authorization",
             *cells(lambda t: f"{per_second(t):.0f}", http)),
            ("  × direct (nginx)", *times(per_second, http)),
            ("  proxy CPU ms per request", *cells(
                lambda t: per_unit(t.meter.proxy_seconds, t.load.done, 1000, 3), http, True)),
            ("  cores: proxy / generator / nginx / machine", *cells(cores, http)),
            ("  cores: other processes (not this benchmark's)", *cells(others, http)),
            ("  requests / errors", *cells(lambda t: f"{t.load.done} / {t.load.errors}", http)),
        ]
    return table


def versions() -> str:
    def first_line(argv: list[str]) -> str:
        done = subprocess.run(argv, capture_output=True, text=True)
        return (done.stdout or done.stderr).splitlines()[0].strip()
    return ", ".join([first_line(["haproxy", "-v"]), first_line(["nginx", "-v"]),
                      "Dovecot " + first_line(["dovecot", "--version"])])


# --- the run ---------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> None:
    users = [f"bench{number:02d}" for number in range(args.accounts)]
    workdir = Path(tempfile.mkdtemp(prefix="stalroute-compare-bench-"))
    workdir.chmod(0o755)  # Dovecot's auth and mail users read their node's files under it
    payload = make_message("relay payload", size=args.size_mb * 2**20)
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, workdir, True)
        ca = CertificateAuthority(workdir / "pki")
        certificate = issue_rsa_certificate(ca, "shared-rsa", NAMES, [LOOPBACK])
        cafile = str(ca.cert_path)
        context = ssl.create_default_context(cafile=cafile)
        nodes = []
        for name in ("node1", "node2"):
            node = RoomyDovecotNode(name, users={u: PASSWORD for u in [*users, BIG_USER]},
                                    certificate=certificate, parent_dir=workdir,
                                    process_limit=args.idle + 200)
            cleanup.callback(node.stop)
            nodes.append(node.start())
            for user in users:
                node.seed(user, [make_message(f"{name} welcome for {user}", to=user),
                                 make_message(f"{name} attachment for {user}", to=user,
                                              size=args.idle_fetch_kib * 1024)])
            node.seed(BIG_USER, [payload], mailbox=BIG_MAILBOX)
        routes = {user: nodes[number % 2] for number, user in enumerate(users)}
        routes[BIG_USER] = nodes[0]
        nginx = cleanup.enter_context(NginxNode("bench", parent_dir=workdir))

        note("starting stalroute (IMAP and HTTP), HAProxy, nginx mail")
        mappings = {user: node.name for user, node in routes.items()}
        imap_config = stalroute_imap_config(certificate, ca, nodes)
        stalroute = cleanup.enter_context(
            StalrouteProcess(imap_config, workdir / "stalroute", mappings=mappings))
        stalroute_http = cleanup.enter_context(StalrouteProcess(
            http_proxy_config(nginx, free_port()), workdir / "stalroute-http",
            mappings={HTTP_USER: "nginx"}))
        baseline = baseline_http = None
        if args.baseline_tree:
            baseline = cleanup.enter_context(StalrouteProcess(
                stalroute_imap_config(certificate, ca, nodes), workdir / "stalroute-baseline",
                mappings=mappings, source=args.baseline_tree))
            baseline_http = cleanup.enter_context(StalrouteProcess(
                http_proxy_config(nginx, free_port()), workdir / "stalroute-baseline-http",
                mappings={HTTP_USER: "nginx"}, source=args.baseline_tree))
        haproxy, haproxy_imap, haproxy_http = start_haproxy(
            workdir / "haproxy", certificate, ca.cert_path, nodes, nginx)
        cleanup.callback(haproxy.stop)

        def everyone(address: Address) -> dict[str, Address]:
            return {user: address for user in routes}

        def dovecot(snapshot: dict[int, ProcessCpu]) -> list[int]:
            return [pid for node in nodes for pid in process_tree(node.pid, snapshot=snapshot)]

        def nginx_backend(snapshot: dict[int, ProcessCpu]) -> list[int]:
            return process_tree(nginx.pid, snapshot=snapshot)

        imap = [
            Target("direct", {u: (LOOPBACK, n.ports.imaps) for u, n in routes.items()},
                   NO_PROXY, dovecot),
            Target("stalroute", everyone(stalroute.listener("imaps")), stalroute.pid, dovecot),
            Target("HAProxy", everyone((LOOPBACK, haproxy_imap)), haproxy.pid, dovecot),
        ]
        if baseline is not None:
            imap.insert(2, Target(BASELINE, everyone(baseline.listener("imaps")), baseline.pid,
                                  dovecot))
        if args.floor:
            floor, floor_imap = start_floor_proxy(workdir / "floor", certificate, ca.cert_path,
                                                  nodes)
            cleanup.callback(floor.stop)
            imap.insert(-1, Target(FLOOR, everyone((LOOPBACK, floor_imap)), floor.pid,
                                   dovecot))  # before HAProxy, the last one so far
        try:
            nginx_mail, nginx_imap = start_nginx_mail(workdir / "nginx-mail", certificate, routes)
            cleanup.callback(nginx_mail.stop)
            imap.append(Target("nginx mail", everyone((LOOPBACK, nginx_imap)),
                               nginx_mail.pid, dovecot))
        except Exception as exc:  # noqa: BLE001 - the other columns still count
            note(f"nginx mail skipped: {exc}")
        http = [Target("direct", {HTTP_USER: (LOOPBACK, nginx.port)}, NO_PROXY, nginx_backend),
                Target("stalroute", {HTTP_USER: stalroute_http.listener("web")},
                       stalroute_http.pid, nginx_backend),
                Target("HAProxy", {HTTP_USER: (LOOPBACK, haproxy_http)}, haproxy.pid,
                       nginx_backend)]
        if baseline_http is not None:
            http.insert(2, Target(BASELINE, {HTTP_USER: baseline_http.listener("web")},
                                  baseline_http.pid, nginx_backend))

        for target in imap:  # warm-up, and what TLS each one negotiates
            connection = ImapConnection(target.addresses[users[0]], context)
            target.tls = f"{connection.tls.version()} {(connection.tls.cipher() or ('?',))[0]}"
            connection.logout()
        for target in imap[1:] if args.idle else []:  # first: what earlier sessions freed
            note(f"{target.name}: {args.idle} idle sessions")  # would be taken up first
            hold_idle_sessions(target, context, args.idle, args.max_seconds, nodes,
                               fetch=args.idle_fetch_kib > 0)
        note(f"IMAP logins: {args.seconds:.0f} s per target in {args.slices} slices, "
             f"{args.clients} processes × {args.threads} threads")
        measure_logins(imap, args, cafile, args.seconds)
        resumed = [Target(t.name, t.addresses, t.pid, t.backend, resumption=ResumptionTally())
                   for t in imap] if args.resumed_seconds else []
        if resumed:
            note(f"IMAP resumed-session logins: {args.resumed_seconds:.0f} s per target")
            measure_logins(resumed, args, cafile, args.resumed_seconds)
        note(f"one-client latency: {args.latency_sessions} sessions per target")
        measure_latency(imap, context, args.latency_sessions)
        for target in imap:
            note(f"{target.name}: relay, FETCH {args.size_mb} MiB × {args.fetches}")
            measure_relay(target, context, len(payload), args.fetches)
        if args.http_seconds:
            note(f"HTTP keep-alive: {args.http_seconds:.0f} s per target")
            measure_http(http, args)
        profiled = profile_stalroute(args, stalroute_imap_config(certificate, ca, nodes),
                                     mappings, cafile, workdir) if args.profile else None

    print(f"\n{datetime.date.today()}, {os.cpu_count()} cores shared by the load generator, "
          f"the Dovecot nodes, nginx and the proxy measured; one worker per proxy.")
    if args.baseline_tree:
        print(f"{BASELINE}: {describe_tree(args.baseline_tree)}; stalroute: "
              f"{describe_tree(Path(__file__).resolve().parents[1])}")
    print(versions() + "; client TLS: " + "; ".join(f"{t.name} {t.tls}" for t in imap) + "\n")
    print_table(("metric", *(target.name for target in imap)),
                rows(imap, resumed, http if args.http_seconds else [], args))
    for target in imap + resumed + http:
        if target.load.first_error:
            print(f"{target.name}: first generator error: {target.load.first_error}")
    if profiled is not None:
        print(f"\nprofiled stalroute: {profiled.per_second:.0f} logins/s under cProfile "
              f"({profiled.errors} errors)")
        print_profile(args.profile.resolve())


def describe_tree(tree: Path) -> str:
    """The commit a checkout is at (and whether it has changes), for the table's header."""
    def git(*argv: str) -> str:
        return subprocess.run(["git", "-C", str(tree), *argv], capture_output=True,
                              text=True).stdout.strip()
    return f"{tree} at {git('rev-parse', '--short', 'HEAD')}" + (
        " with uncommitted changes" if git("status", "--porcelain", "--untracked-files=no")
        else "")


def profile_stalroute(args: argparse.Namespace, config: dict[str, Any], mappings: dict[str, str],
                      cafile: str, workdir: Path) -> Load:
    """A fresh stalroute under cProfile, loaded as in the table; its profile in ``--profile``."""
    path = args.profile.resolve()
    note(f"profiled stalroute: {args.profile_seconds:.0f} s of IMAP logins, profile to {path}")
    with StalrouteProcess(config, workdir / "stalroute-profiled", mappings=mappings,
                          python_args=profile_arguments(path)) as proxy:
        address = proxy.listener("imaps")
        sessions = [(user, address) for user in mappings if user != BIG_USER]
        load = run_generators(imap_generator, (sessions, cafile, args.threads,
                                               args.profile_seconds, None),
                              args.clients, args.profile_seconds)
        write_profile(proxy.pid, path)
        return load


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=12.0,
                        help="IMAP login load per target (split in --slices)")
    parser.add_argument("--resumed-seconds", type=float, default=6.0,
                        help="IMAP logins of returning clients per target (0: skip)")
    parser.add_argument("--slices", type=int, default=3,
                        help="the load moves over the targets in turn this many times")
    parser.add_argument("--clients", type=int, default=2, help="IMAP generator processes")
    parser.add_argument("--threads", type=int, default=8, help="sessions per generator process")
    parser.add_argument("--accounts", type=int, default=16, help="accounts, spread over 2 nodes")
    parser.add_argument("--latency-sessions", type=int, default=50,
                        help="one-client sessions per target")
    parser.add_argument("--idle", type=int, default=1000,
                        help="idle sessions held per proxy for the memory row (0: skip)")
    parser.add_argument("--idle-fetch-kib", type=int, default=0, metavar="KIB",
                        help="then FETCH a message of this size on each held idle session and "
                             "measure again (what a relayed read leaves on an idle session)")
    parser.add_argument("--size-mb", type=int, default=20, help="MiB of the relayed message")
    parser.add_argument("--fetches", type=int, default=5, help="large FETCHes per target")
    parser.add_argument("--http-seconds", type=float, default=12.0,
                        help="HTTP load per target (0: skip HTTP)")
    parser.add_argument("--http-clients", type=int, default=4,
                        help="HTTP keep-alive connections (one process each)")
    parser.add_argument("--max-seconds", type=float, default=60.0,
                        help="time limit for opening the idle sessions")
    parser.add_argument("--baseline-tree", type=Path, metavar="DIR",
                        help="another checkout of stalroute (git worktree add DIR REV), "
                             "measured as one more column in the same run")
    parser.add_argument("--floor", action="store_true",
                        help="add bench/floor_proxy.py (HAProxy's job on stalroute's TLS "
                             "stack, no stalroute logic) as one more column")
    parser.add_argument("--profile", type=Path, metavar="FILE",
                        help="also profile a stalroute under load (cProfile) into FILE")
    parser.add_argument("--profile-seconds", type=float, default=10.0,
                        help="IMAP load on the profiled stalroute")
    args = parser.parse_args(argv)
    minimums = {"seconds": 0.1, "slices": 1, "clients": 1, "threads": 1, "accounts": 2,
                "latency_sessions": 2, "size_mb": 1, "fetches": 1, "http_clients": 1,
                "idle": 0, "http_seconds": 0, "resumed_seconds": 0, "max_seconds": 1,
                "profile_seconds": 1}
    for name, minimum in minimums.items():
        if getattr(args, name) < minimum:
            parser.error(f"--{name.replace('_', '-')} must be at least {minimum}")
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
