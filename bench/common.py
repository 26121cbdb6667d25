"""What the benchmarks share: login-rate measurement, progress notes, result tables."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from tests.harness.pki import CertificateAuthority

#: The header of a "through stalroute versus direct" table.
COMPARISON = ("metric", "direct", "stalroute", "ratio")


@dataclass(frozen=True)
class Target:
    """Where a client connects: host, port and the TLS name to verify."""

    name: str
    host: str
    port: int
    server_hostname: str


@dataclass(frozen=True)
class LoginResult:
    sessions: int
    seconds: float
    latencies: list[float]
    errors: int

    @property
    def per_second(self) -> float:
        return self.sessions / self.seconds if self.seconds else 0.0

    @property
    def p95_ms(self) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return 1000 * ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]


def measure_logins(session: Callable[[Target, CertificateAuthority], None], target: Target,
                   ca: CertificateAuthority, sessions: int, concurrency: int,
                   limit: float) -> LoginResult:
    """Run up to ``sessions`` sessions over ``concurrency`` threads for at most ``limit`` s."""
    lock = threading.Lock()
    started = errors = 0
    latencies: list[float] = []
    deadline = time.monotonic() + limit

    def worker() -> None:
        nonlocal started, errors
        while time.monotonic() < deadline:
            with lock:
                if started >= sessions:
                    return
                started += 1
            begin = time.monotonic()
            try:
                session(target, ca)
            except Exception as exc:  # counted and shown; a bench must not hide failures
                with lock:
                    errors += 1
                    if errors == 1:
                        note(f"{target.name}: first error: {exc!r}")
                continue
            with lock:
                latencies.append(time.monotonic() - begin)

    begin = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(worker) for _ in range(concurrency)]:
            future.result()
    return LoginResult(len(latencies), time.monotonic() - begin, latencies, errors)


def note(what: str) -> None:
    """Progress on stderr (the table goes to stdout)."""
    print(f"... {what}", file=sys.stderr, flush=True)


def ratio(proxied: float, direct: float) -> str:
    return f"{proxied / direct:.2f}" if direct else "-"


def print_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                        for i, (cell, w) in enumerate(zip(row, widths, strict=True))))
