#!/usr/bin/env python3
"""IMAP benchmark: stalroute versus direct Dovecot, measured in the same run.

Starts one private Dovecot node and stalroute in front of it (PROXY v2 + implicit TLS on the
backend leg) with the test harness, then measures, for both targets with the same client:

* logins per second: N sessions of TLS connect, LOGIN, SELECT, FETCH (header), LOGOUT over
  a few concurrent clients;
* relay throughput: FETCH of one large message, MB/s (median of a few runs);
* memory per idle session (stalroute only): RSS delta over N authenticated idle sessions / N.

Every phase is bounded by a session count and a time limit. See bench/README.md.
Run: ``.venv/bin/python bench/imap_bench.py [--sessions 300 --concurrency 4 ...]``.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

from bench.common import (  # noqa: E402
    COMPARISON, Target, measure_logins, note, print_table, ratio,
)
from tests.harness.clients import SourceIMAP4_SSL, make_message  # noqa: E402
from tests.harness.dovecot import start_seeded_nodes  # noqa: E402
from tests.harness.pki import CertificateAuthority  # noqa: E402
from tests.harness.stalroute import (  # noqa: E402
    StalrouteProcess,
    dovecot_destination,
    imap_proxy_config,
)

USER, PASSWORD = "bench", "bench-Pw-31415"
BIG_MAILBOX = "Bench"


def connect(target: Target, ca: CertificateAuthority) -> SourceIMAP4_SSL:
    return SourceIMAP4_SSL(
        target.host,
        target.port,
        ssl_context=ca.client_context(),
        server_hostname=target.server_hostname,
        timeout=60,
    )


def one_session(target: Target, ca: CertificateAuthority) -> None:
    """TLS connect, LOGIN, SELECT, FETCH a header, LOGOUT."""
    client = connect(target, ca)
    try:
        client.login(USER, PASSWORD)
        client.select("INBOX", readonly=True)
        client.fetch("1", "(BODY.PEEK[HEADER])")
    finally:
        client.logout()


def measure_relay(
    target: Target, ca: CertificateAuthority, size: int, runs: int, limit: float
) -> float:
    """Median MB/s of FETCH BODY.PEEK[] of the large message."""
    rates = []
    deadline = time.monotonic() + limit
    client = connect(target, ca)
    try:
        client.login(USER, PASSWORD)
        client.select(BIG_MAILBOX, readonly=True)
        while len(rates) < runs and (not rates or time.monotonic() < deadline):
            begin = time.monotonic()
            _, data = client.fetch("1", "(BODY.PEEK[])")
            elapsed = time.monotonic() - begin
            if len(data[0][1]) != size:
                raise RuntimeError("FETCH returned the wrong size")
            rates.append(size / 2**20 / elapsed)
    finally:
        client.logout()
    return statistics.median(rates)


def measure_idle_memory(
    proxy: StalrouteProcess, target: Target, ca: CertificateAuthority, count: int, limit: float
) -> tuple[int, float]:
    """Open up to ``count`` authenticated idle sessions; (sessions, KiB of RSS per session)."""
    clients: list[SourceIMAP4_SSL] = []
    before = proxy.rss_kb()
    deadline = time.monotonic() + limit
    try:
        while len(clients) < count and time.monotonic() < deadline:
            client = connect(target, ca)
            clients.append(client)
            client.login(USER, PASSWORD)
            client.select("INBOX", readonly=True)
        time.sleep(1.0)
        after = proxy.rss_kb()
    finally:
        for client in clients:
            with contextlib.suppress(Exception):
                client.logout()
    return len(clients), (after - before) / max(len(clients), 1)


def run(args: argparse.Namespace) -> None:
    payload = make_message("benchmark payload", size=args.size_mb * 2**20)
    size = len(payload)
    workdir = Path(tempfile.mkdtemp(prefix="stalroute-bench-"))
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, workdir, True)
        ca = CertificateAuthority(workdir / "pki")
        (node,) = start_seeded_nodes(ca, {USER: PASSWORD}, ("node1",))
        cleanup.callback(node.stop)
        node.seed(USER, [payload], mailbox=BIG_MAILBOX)
        certificate = ca.issue("stalroute", ["localhost"], ["127.0.0.1"])
        config = imap_proxy_config(
            certificate,
            {"node1": dovecot_destination(node, tls="implicit", ca_file=ca.cert_path)},
            default="node1",
            log_level="warn",
        )
        proxy = StalrouteProcess(config, workdir / "stalroute")
        cleanup.callback(proxy.stop)
        proxy.start()

        direct = Target("direct", node.host, node.ports.imaps, node.hostname)
        proxied = Target("stalroute", *proxy.listener("imaps"), "localhost")
        logins = {}
        relay = {}
        for target in (direct, proxied):
            note(f"{target.name}: {args.sessions} sessions over {args.concurrency} clients")
            one_session(target, ca)  # warm-up
            logins[target.name] = measure_logins(
                one_session, target, ca, args.sessions, args.concurrency, args.max_seconds
            )
            note(f"{target.name}: FETCH of {args.size_mb} MB × {args.fetches}")
            relay[target.name] = measure_relay(target, ca, size, args.fetches, args.max_seconds)
        note(f"stalroute: {args.idle} idle sessions")
        idle_sessions, idle_kib = measure_idle_memory(
            proxy, proxied, ca, args.idle, args.max_seconds
        )

    d, s = logins["direct"], logins["stalroute"]
    print_table(
        COMPARISON,
        [
            (
                "logins/s (connect+LOGIN+SELECT+FETCH+LOGOUT)",
                f"{d.per_second:.1f}",
                f"{s.per_second:.1f}",
                ratio(s.per_second, d.per_second),
            ),
            (
                "session p95 latency, ms",
                f"{d.p95_ms:.1f}",
                f"{s.p95_ms:.1f}",
                ratio(s.p95_ms, d.p95_ms),
            ),
            ("sessions completed", str(d.sessions), str(s.sessions), ""),
            (
                f"relay MB/s (FETCH {args.size_mb} MB, median of {args.fetches})",
                f"{relay['direct']:.1f}",
                f"{relay['stalroute']:.1f}",
                ratio(relay["stalroute"], relay["direct"]),
            ),
            (f"RSS per idle session, KiB ({idle_sessions} sessions)", "-", f"{idle_kib:.1f}", ""),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=300, help="login sessions per target")
    parser.add_argument("--concurrency", type=int, default=4, help="concurrent clients")
    parser.add_argument("--size-mb", type=int, default=32, help="size of the FETCHed message")
    parser.add_argument("--fetches", type=int, default=3, help="large FETCHes per target")
    parser.add_argument(
        "--idle", type=int, default=200, help="idle sessions for the memory figure (at most ~400)"
    )
    parser.add_argument("--max-seconds", type=float, default=60.0, help="time limit of each phase")
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
