#!/usr/bin/env python3
"""HTTP benchmark: requests per second through stalroute versus directly to nginx.

Starts, with the test harness, one private nginx node and stalroute in front of it, then
measures both targets **in the same run with the same client**:

* keep-alive: each client process keeps one connection and sends requests one after the
  other (no pipelining);
* no keep-alive: a new TCP connection per request (``Connection: close``).

The request is ``GET /jmap/session`` with ``Authorization: Basic`` for one account, so every
request through stalroute is routed on its own: head checks, route match, Basic decoding,
the (cached) mapping lookup, and a pooled backend connection. The backend leg is the
production shape for nginx: a PROXY v2 header (nginx ``listen ... proxy_protocol``) and
``Forwarded`` / ``X-Forwarded-For`` appended. stalroute logs at ``warn`` so that logging does
not dominate. The client is raw sockets in ``--clients`` processes (no HTTP library cost).

Run: ``.venv/bin/python bench/http_bench.py [--seconds 5 --clients 2]`` (about 25 s).
On a small machine the client, nginx and stalroute share the cores: read the ratio column,
and stalroute's CPU per request (its process's user + system time over the phase, from
``/proc``), which does not depend on how the cores are shared.

``--profile FILE`` runs stalroute under cProfile on the process's CPU clock
(``bench/cpu_profile.py``): the profile of the whole run is written to ``FILE`` and its top
functions by own and cumulative time are printed (cProfile slows stalroute down, about twice
for Python code: read the req/s of a profiled run as relative only).
``--keep-alive-only`` skips the phase with a new connection per request.

Reading the numbers: nginx answering a ``return 200`` in C is the ceiling, not the goal.
Through stalroute every request is parsed (llhttp) and re-serialised twice (client leg and
backend leg) in one Python process; a bare Twisted byte relay (no parsing at all) reaches
roughly 4-7k keep-alive requests/s on the same 2-core machine, which bounds what any Python
proxy does here. Without keep-alive each request also costs a second TCP connection (and a
PROXY header): backend connections are pooled per client connection, never shared between
clients, because each one announces its own client.
"""

from __future__ import annotations

import argparse
import base64
import multiprocessing
import os
import pstats
import re
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

from tests.harness.nginx import NginxNode  # noqa: E402
from tests.harness.ports import LOOPBACK, free_port  # noqa: E402
from tests.harness.stalroute import StalrouteProcess  # noqa: E402

USER = "bench@example.org"
#: The profiler stalroute runs under with ``--profile``.
PROFILER = Path(__file__).with_name("cpu_profile.py")
_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*([0-9]+)")


_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of process ``pid`` and its reaped children, from /proc."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()  # state ppid ... utime at 11
    return sum(int(value) for value in fields[11:15]) / _TICKS


@dataclass(frozen=True)
class Result:
    requests: int
    seconds: float
    latencies: list[float]
    failures: int = 0
    #: CPU seconds the measured server used meanwhile (None: not measured).
    cpu: float | None = None

    @property
    def cpu_ms_per_request(self) -> float:
        if self.cpu is None or not self.requests:
            return float("nan")
        return 1000 * self.cpu / self.requests

    @property
    def per_second(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def percentile(self, fraction: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return 1000 * ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def request_bytes(keepalive: bool) -> bytes:
    token = base64.b64encode(f"{USER}:bench-password".encode()).decode()
    connection = "" if keepalive else "Connection: close\r\n"
    return (f"GET /jmap/session HTTP/1.1\r\nHost: mail.example.org\r\nAccept: */*\r\n"
            f"Authorization: Basic {token}\r\n{connection}\r\n").encode()


def read_response(sock: socket.socket, buffer: bytearray) -> None:
    """Read one response with a Content-Length body; leftovers stay in ``buffer``."""
    while True:
        end = buffer.find(b"\r\n\r\n")
        if end >= 0:
            break
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before the response head")
        buffer += chunk
    head = bytes(buffer[:end]).lower()
    if not head.startswith(b"http/1.1 200"):
        raise RuntimeError(f"unexpected response: {head[:80]!r}")
    length = int(_LENGTH.search(head).group(1))
    total = end + 4 + length
    while len(buffer) < total:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed in the body")
        buffer += chunk
    del buffer[:total]


def client(address: tuple[str, int], keepalive: bool, seconds: float, queue) -> None:
    """Requests one after the other until ``seconds`` pass. A failed request (a reset from
    loopback port churn when every request opens a connection) is counted and retried on a
    new connection; more than 1% failures aborts the run."""
    request = request_bytes(keepalive)
    latencies: list[float] = []
    deadline = time.monotonic() + seconds
    sock = None
    buffer = bytearray()
    count = failures = 0
    error = None
    while time.monotonic() < deadline:
        started = time.monotonic()
        try:
            if sock is None:
                sock = socket.create_connection(address)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                buffer.clear()
            sock.sendall(request)
            read_response(sock, buffer)
        except (ConnectionError, OSError) as exc:
            failures += 1
            if sock is not None:
                sock.close()
                sock = None
            if failures > 10 and failures > count // 100:
                error = f"{type(exc).__name__}: {exc} ({failures} failures)"
                break
            continue
        except Exception as exc:  # noqa: BLE001 - reported by the parent
            error = f"{type(exc).__name__}: {exc}"
            break
        if not keepalive:
            sock.close()
            sock = None
        latencies.append(time.monotonic() - started)
        count += 1
    if sock is not None:
        sock.close()
    queue.put((count, latencies[:: max(1, len(latencies) // 2000)], error, failures))


def measure(address: tuple[str, int], keepalive: bool, seconds: float, clients: int,
            server_pid: int | None = None) -> Result:
    """``clients`` processes for ``seconds``; with ``server_pid``, that process's CPU too."""
    queue: multiprocessing.Queue = multiprocessing.Queue()
    processes = [multiprocessing.Process(target=client, args=(address, keepalive, seconds, queue))
                 for _ in range(clients)]
    cpu_before = cpu_seconds(server_pid) if server_pid is not None else None
    started = time.monotonic()
    for process in processes:
        process.start()
    results = [queue.get(timeout=seconds + 60) for _ in processes]
    elapsed = time.monotonic() - started
    cpu = cpu_seconds(server_pid) - cpu_before if server_pid is not None else None
    for process in processes:
        process.join()
    errors = [r[2] for r in results if r[2]]
    if errors:
        raise RuntimeError(f"client failed against {address}: {errors[0]}")
    return Result(sum(r[0] for r in results), elapsed,
                  [lat for _, sample, _, _ in results for lat in sample],
                  sum(r[3] for r in results), cpu)


def proxy_config(node: NginxNode, port: int) -> dict:
    return {
        "server": {"hostname": "stalroute.test", "log_level": "warn"},
        "listener": {"web": {"protocol": "http", "bind": [f"{LOOPBACK}:{port}"],
                             "tls": "plain", "max_connections": 65536}},
        "destination": {"nginx": {"host": LOOPBACK, "proxy_protocol": True, "forwarded": True,
                                  "allow_plaintext_auth": True,
                                  "protocol": {"http": {"port": node.pp_port, "tls": "plain"}}}},
        "routing": {"default_destination": "nginx"},
        "http": {"max_keepalive_requests": 1_000_000, "route": [
            {"match": "/jmap/**", "extract": {"from": "authorization"}, "fallback": "default"}]},
    }


def profile_arguments(path: Path | None) -> list[str]:
    """Interpreter arguments that run stalroute under cProfile on the CPU clock
    (``bench/cpu_profile.py``); :func:`write_profile` then has it write ``path``."""
    return [] if path is None else [str(PROFILER), str(path)]


def write_profile(pid: int, path: Path, timeout: float = 30.0) -> None:
    """Have the profiled stalroute ``pid`` write its profile to ``path`` now."""
    path.unlink(missing_ok=True)
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"stalroute wrote no profile to {path} in {timeout:.0f} s")
        time.sleep(0.1)


def print_profile(path: Path, top: int = 25) -> None:
    """The ``top`` functions by own time, then by cumulative time."""
    stats = pstats.Stats(str(path))
    stats.strip_dirs()
    for order in ("tottime", "cumtime"):
        print(f"\nstalroute profile ({path}), top {top} by {order}:")
        stats.sort_stats(order).print_stats(top)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per phase")
    parser.add_argument("--clients", type=int, default=2, help="client processes")
    parser.add_argument("--keep-alive-only", action="store_true",
                        help="skip the phase with a new connection per request")
    parser.add_argument("--profile", type=Path, metavar="FILE",
                        help="write a cProfile of stalroute to FILE and print its top costs")
    args = parser.parse_args()
    profile = args.profile.resolve() if args.profile is not None else None

    with tempfile.TemporaryDirectory(prefix="stalroute-http-bench-") as scratch, \
            NginxNode("bench", parent_dir=Path(scratch)) as node:
        proxy = StalrouteProcess(proxy_config(node, free_port()), Path(scratch) / "stalroute",
                                 mappings={USER: "nginx"},
                                 python_args=profile_arguments(profile))
        with proxy:
            direct = (LOOPBACK, node.port)
            routed = proxy.listener("web")
            rows = []
            for keepalive in (True,) if args.keep_alive_only else (True, False):
                label = "keep-alive" if keepalive else "new connection per request"
                measure(direct, keepalive, 0.5, 1)  # warm-up
                measure(routed, keepalive, 0.5, 1)
                base = measure(direct, keepalive, args.seconds, args.clients)
                through = measure(routed, keepalive, args.seconds, args.clients, proxy.pid)
                rows.append((label, base, through))
            rss = proxy.rss_kb()
            if profile is not None:
                write_profile(proxy.pid, profile)

    print(f"\nHTTP: {args.clients} client processes, {args.seconds:.0f} s per phase, "
          f"GET /jmap/session with Basic auth (nginx answers 100-odd bytes)\n")
    print(f"{'phase':<28} {'direct req/s':>13} {'stalroute req/s':>16} {'ratio':>6} "
          f"{'p50 ms (d/s)':>14} {'p95 ms (d/s)':>14} {'stalroute CPU ms/req':>21}")
    for label, base, through in rows:
        ratio = through.per_second / base.per_second if base.per_second else float("nan")
        print(f"{label:<28} {base.per_second:>13.0f} {through.per_second:>16.0f} {ratio:>6.2f} "
              f"{base.percentile(0.5):>6.2f}/{through.percentile(0.5):<7.2f} "
              f"{base.percentile(0.95):>6.2f}/{through.percentile(0.95):<7.2f} "
              f"{through.cpu_ms_per_request:>21.3f}")
    failed = [(label, b.failures, t.failures) for label, b, t in rows if b.failures or t.failures]
    for label, direct_failures, routed_failures in failed:
        print(f"{label}: failed and retried: direct {direct_failures}, "
              f"stalroute {routed_failures}")
    print(f"\nstalroute RSS after the run: {rss / 1024:.1f} MiB (one process, log_level=warn)")
    if profile is not None:
        print_profile(profile)


if __name__ == "__main__":
    main()
