#!/usr/bin/env python3
"""Fleet benchmark: how long an admin change takes to reach every instance, per coordinator.

For each coordinator (Redis pub/sub, PostgreSQL ``LISTEN/NOTIFY``), in the same run: start a
private server of it and ``--instances`` stalroute processes (``node_id`` 1 to N, one shared
mapping file, ``--workers`` processes each) with the test harness, then measure on instance 1:

* acknowledged answers: ``--actions`` admin writes (in turn ``PUT /mappings`` alice → node1 or
  node2, ``POST /cache/invalidate?identifier=alice``, ``POST /connections/kick?identifier=alice``),
  one at a time; the time from sending a write to its answer is the propagation time, since
  the answer comes once every member applied it. Also counted: the answers with
  ``applied == members``.
* observed propagation, independent of the acknowledgements: ``--observed`` cache
  invalidations sent on instance 1 while instance N's ``/stats`` is polled until its
  ``cluster.applied`` counter moves. A poll round trip bounds the resolution (its median is
  shown).

The admin connections are kept alive, so TLS handshakes are not counted. The destinations are
ports nothing listens on: no mail flows, only admin traffic and the bus. Every phase is bounded
by its count and ``--max-seconds``. See bench/README.md.
Run (as root: the private PostgreSQL runs as ``postgres``):
``.venv/bin/python bench/fleet_bench.py [--actions 200 --observed 50 --workers 1]``.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import shutil
import ssl
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

from bench.common import note, print_table  # noqa: E402
from tests.harness.pki import CertificateAuthority, IssuedCertificate  # noqa: E402
from tests.harness.postgres import PostgresServer, postgres_bindir  # noqa: E402
from tests.harness.redis import RedisServer  # noqa: E402
from tests.harness.stalroute import (  # noqa: E402
    StalrouteProcess, admin_section, closed_destination, imap_proxy_config, parse_address,
)

TOKEN = "Bench-" + "f" * 34
COORDINATORS = ("redis", "postgresql")
#: The writes of the acknowledged phase, in turn (``{node}`` alternates node1/node2).
ACTIONS = ("PUT /mappings?identifier=alice&destination={node}",
           "POST /cache/invalidate?identifier=alice",
           "POST /connections/kick?identifier=alice")
OBSERVED_ACTION = "POST /cache/invalidate?identifier=alice"


class AdminConnection:
    """One kept-alive HTTPS connection to an instance's admin API (reopened if dropped)."""

    def __init__(self, proxy: StalrouteProcess, context: ssl.SSLContext) -> None:
        self.address = parse_address(proxy.config["admin"]["bind"])
        self.context = context
        self._connection: http.client.HTTPSConnection | None = None

    def request(self, action: str) -> dict[str, Any]:
        """``"METHOD /path"`` → the JSON answer (a non-200 answer is an error)."""
        method, path = action.split(" ", 1)
        try:
            status, body = self._send(method, path)
        except (http.client.RemoteDisconnected, ConnectionError):
            self.close()  # the server closed the kept-alive connection: once more, anew
            status, body = self._send(method, path)
        if status != 200:
            raise RuntimeError(f"{action} answered {status}: {body[:200]!r}")
        return json.loads(body)

    def _send(self, method: str, path: str) -> tuple[int, bytes]:
        if self._connection is None:
            self._connection = http.client.HTTPSConnection(*self.address, context=self.context,
                                                           timeout=10)
        self._connection.request(method, path, headers={"Authorization": f"Bearer {TOKEN}"})
        response = self._connection.getresponse()
        return response.status, response.read()

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


@dataclass
class Figures:
    """One coordinator's measurements, in seconds."""

    acknowledged: list[float] = field(default_factory=list)
    applied_by_all: int = 0
    observed: list[float] = field(default_factory=list)
    polls: list[float] = field(default_factory=list)


def percentile(values: list[float], fraction: float) -> str:
    if not values:
        return "-"
    ordered = sorted(values)
    return f"{1000 * ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]:.1f}"


# --- the fleet ---------------------------------------------------------------------------------


def start_coordinator(kind: str, cleanup: contextlib.ExitStack) -> str:
    """Start a private Redis or PostgreSQL; its URL."""
    if kind == "redis":
        redis = RedisServer(shutil.which("redis-server") or "/usr/bin/redis-server")
        cleanup.callback(redis.close)
        return redis.start().url()
    bindir = postgres_bindir()
    if bindir is None:
        raise SystemExit("PostgreSQL is not installed (scripts/bootstrap)")
    postgres = PostgresServer(bindir)
    cleanup.callback(postgres.close)
    return postgres.start().url()


def start_fleet(kind: str, url: str, certificate: IssuedCertificate, workdir: Path,
                instances: int, workers: int, cleanup: contextlib.ExitStack
                ) -> list[StalrouteProcess]:
    workdir.mkdir()
    shared = workdir / "shared-mappings.tsv"
    shared.write_text("alice\tnode1\n")
    destinations = {"node1": closed_destination(), "node2": closed_destination()}
    proxies = []
    for node_id in range(1, instances + 1):
        config = imap_proxy_config(certificate, destinations, default="node1", log_level="warn")
        config["server"]["workers"] = workers
        config["admin"] = admin_section(TOKEN)
        config["mapping"] = {"source": "file", "positive_ttl": "1h", "negative_ttl": "1h",
                             "file": {"path": str(shared)}}
        config["cluster"] = {"node_id": node_id, "coordinator": kind, "url": url}
        proxy = StalrouteProcess(config, workdir / f"stalroute-{node_id}")
        cleanup.callback(proxy.stop)
        proxies.append(proxy.start())
    return proxies


def wait_for(condition: Callable[[], bool], what: str, limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"gave up waiting: {what}")
        time.sleep(0.05)


# --- the measurements ----------------------------------------------------------------------------


def measure_acknowledged(first: AdminConnection, count: int, limit: float,
                         figures: Figures) -> None:
    deadline = time.monotonic() + limit
    for index in range(count):
        if time.monotonic() > deadline:
            break
        action = ACTIONS[index % len(ACTIONS)].format(node=f"node{1 + index // 3 % 2}")
        begin = time.perf_counter()
        answer = first.request(action)
        figures.acknowledged.append(time.perf_counter() - begin)
        if answer.get("applied") == answer.get("members", -1):
            figures.applied_by_all += 1


def measure_observed(first: AdminConnection, last: AdminConnection, count: int, limit: float,
                     figures: Figures) -> None:
    """Send each write from a thread while ``last``'s applied counter is polled here."""
    deadline = time.monotonic() + limit
    for _ in range(count):
        if time.monotonic() > deadline:
            break
        before = last.request("GET /stats")["cluster"]["applied"]
        sent = threading.Event()
        sent_at: list[float] = []

        def send() -> None:
            sent_at.append(time.perf_counter())
            sent.set()
            first.request(OBSERVED_ACTION)

        writer = threading.Thread(target=send)
        writer.start()
        sent.wait()
        while True:
            begin = time.perf_counter()
            applied = last.request("GET /stats")["cluster"]["applied"]
            seen = time.perf_counter()
            figures.polls.append(seen - begin)
            if applied > before:
                figures.observed.append(seen - sent_at[0])
                break
            if time.monotonic() > deadline + 10:
                raise SystemExit("instance N never applied the write")
        writer.join()


def run_coordinator(kind: str, args: argparse.Namespace, ca: CertificateAuthority,
                    certificate: IssuedCertificate, workdir: Path) -> Figures:
    figures = Figures()
    with contextlib.ExitStack() as cleanup:
        note(f"{kind}: starting the coordinator and {args.instances} instances "
             f"(workers = {args.workers})")
        url = start_coordinator(kind, cleanup)
        proxies = start_fleet(kind, url, certificate, workdir / kind, args.instances,
                              args.workers, cleanup)
        admins = [AdminConnection(proxy, ca.client_context()) for proxy in proxies]
        for admin in admins:
            cleanup.callback(admin.close)
            wait_for(lambda: admin.request("GET /stats")["cluster"]["connected"],
                     f"{kind}: an instance connected to the coordinator")
            wait_for(lambda: len(admin.request("GET /cluster")["members"]) == args.instances,
                     f"{kind}: every instance lists the fleet")
        first, last = admins[0], admins[-1]
        note(f"{kind}: {args.actions} acknowledged writes on instance 1")
        measure_acknowledged(first, args.actions, args.max_seconds, figures)
        note(f"{kind}: {args.observed} writes on instance 1, watched on instance "
             f"{args.instances}")
        measure_observed(first, last, args.observed, args.max_seconds, figures)
    return figures


def report(results: dict[str, Figures]) -> None:
    kinds = list(results)
    rows = []
    for label, value in (
        ("acknowledged answer p50 ms", lambda f: percentile(f.acknowledged, 0.50)),
        ("acknowledged answer p99 ms", lambda f: percentile(f.acknowledged, 0.99)),
        ("acknowledged answer max ms", lambda f: percentile(f.acknowledged, 1.0)),
        ("answers applied == members", lambda f: f"{f.applied_by_all}/{len(f.acknowledged)}"),
        ("observed propagation p50 ms", lambda f: percentile(f.observed, 0.50)),
        ("observed propagation p99 ms", lambda f: percentile(f.observed, 0.99)),
        ("observed propagation max ms", lambda f: percentile(f.observed, 1.0)),
        ("observed writes", lambda f: str(len(f.observed))),
        ("/stats poll round trip p50 ms", lambda f: percentile(f.polls, 0.50)),
    ):
        rows.append((label, *(value(results[kind]) for kind in kinds)))
    print_table(("metric", *kinds), rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--actions", type=int, default=200)
    parser.add_argument("--observed", type=int, default=50)
    parser.add_argument("--instances", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--coordinators", default=",".join(COORDINATORS),
                        help="comma-separated, from: " + ", ".join(COORDINATORS))
    parser.add_argument("--max-seconds", type=float, default=60.0)
    args = parser.parse_args()
    kinds = [kind for kind in args.coordinators.split(",") if kind]
    if not kinds or set(kinds) - set(COORDINATORS) or args.instances < 2:
        parser.error("coordinators are redis and/or postgresql; at least 2 instances")
    workdir = Path(tempfile.mkdtemp(prefix="stalroute-fleet-bench-"))
    try:
        ca = CertificateAuthority(workdir / "pki")
        certificate = ca.issue("stalroute", ["localhost"], ["127.0.0.1"])
        results = {kind: run_coordinator(kind, args, ca, certificate, workdir)
                   for kind in kinds}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report(results)


if __name__ == "__main__":
    main()
