#!/usr/bin/env python3
"""Mapping store benchmark: routing cost, cached versus uncached, for every store in one run.

Starts a private PostgreSQL and Redis (random ports, temp dirs, always stopped and reaped),
an SQLite file and a TSV file, each holding ``--entries`` mappings, then measures:

* per lookup, in-process (the store behind the real ``RoutingCache``): the latency of one
  uncached lookup (a store query), of one cached lookup (a cache hit), and the uncached
  throughput with ``--concurrency`` lookups in flight;
* per login, through the real stalroute and one Dovecot node (needs root and Dovecot;
  ``--logins 0`` skips it): the median time of connect + LOGIN + LOGOUT with the cache on
  (``positive_ttl = "10m"``) and off (``"0s"``: every login asks the store).

Every phase stops at its count or after ``--max-seconds``; about 25 s with the defaults.
Run: ``.venv/bin/python bench/store_bench.py [--entries 2000 --logins 100 ...]`` (as root for
the login phase). Everything shares the machine's cores, so compare the rows of one run: a
cached lookup costs the same for every store (the cache answers), and the uncached column
is what a store adds to a login whose account is not in the cache.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

from bench.common import note, print_table  # noqa: E402
from tests.harness.pki import CertificateAuthority  # noqa: E402
from tests.harness.postgres import PostgresServer, postgres_bindir  # noqa: E402
from tests.harness.redis import RedisServer  # noqa: E402

USER, PASSWORD = "bench", "bench-Pw-27182"
DESTINATION = "node1"
STORES = ("file", "sqlite", "postgresql", "redis")
SCHEMA = "CREATE TABLE routes (login text PRIMARY KEY, destination text)"
LOOKUP = "SELECT destination FROM routes WHERE login = $1"


@dataclass
class LookupResult:
    uncached_us: float
    cached_us: float
    uncached_per_s: float
    lookups: int


def identifiers(count: int) -> list[str]:
    return [USER] + [f"user{i:06d}" for i in range(count - 1)]


# --- the stores ------------------------------------------------------------------------------


def prepare_stores(workdir: Path, entries: int, cleanup: contextlib.ExitStack
                   ) -> dict[str, dict[str, Any]]:
    """Start and fill every store; their ``[mapping]`` tables (TOML-shaped)."""
    rows = [(name, DESTINATION) for name in identifiers(entries)]
    tsv = workdir / "mappings.tsv"
    tsv.write_text("".join(f"{name}\t{dest}\n" for name, dest in rows))

    database = workdir / "mappings.db"
    with sqlite3.connect(database) as connection:
        connection.execute(SCHEMA)
        connection.executemany("INSERT INTO routes VALUES (?, ?)", rows)
    connection.close()

    bindir = postgres_bindir()
    if bindir is None:
        raise SystemExit("PostgreSQL is not installed (scripts/bootstrap)")
    postgres = PostgresServer(bindir)
    cleanup.callback(postgres.close)
    postgres.start()
    postgres.execute(SCHEMA)
    postgres.execute("INSERT INTO routes SELECT * FROM unnest(%s::text[], %s::text[])",
                     ([r[0] for r in rows], [r[1] for r in rows]))

    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    redis = RedisServer(binary)
    cleanup.callback(redis.close)
    redis.start()
    for start in range(0, len(rows), 500):
        chunk = rows[start : start + 500]
        redis.command("MSET", *[x for name, dest in chunk for x in (f"route:{name}", dest)])

    sql = {"query": LOOKUP, "pool_size": 16}
    return {
        "file": {"source": "file", "file": {"path": str(tsv)}},
        "sqlite": {"source": "sql", "sql": {"url": f"sqlite://{database}", **sql}},
        "postgresql": {"source": "sql", "sql": {"url": postgres.url(), **sql}},
        "redis": {"source": "redis", "redis": {"url": redis.url(), "pool_size": 16}},
    }


def mapping_config(table: dict[str, Any]) -> Any:
    from stalroute.config import (
        FileMappingConfig,
        MappingConfig,
        RedisMappingConfig,
        SQLMappingConfig,
    )

    kinds = {"file": FileMappingConfig, "sql": SQLMappingConfig, "redis": RedisMappingConfig}
    source = table["source"]
    settings = dict(table[source])
    if source == "file":
        settings["path"] = Path(settings["path"])
    return MappingConfig(source=source, settings=kinds[source](**settings))


# --- per lookup (in-process, under the reactor) ------------------------------------------


async def measure_store(reactor: Any, table: dict[str, Any], names: list[str],
                        concurrency: int, limit: float) -> LookupResult:
    from twisted.internet.defer import DeferredSemaphore, gatherResults

    from stalroute.mapping.cache import RoutingCache
    from stalroute.mapping.factory import build_store

    store = build_store(mapping_config(table), [DESTINATION])

    def cache() -> RoutingCache:
        return RoutingCache(reactor, 600, 30, len(names) + 1, 5)

    try:
        await store.lookup(USER)  # connected and warm
        uncached, cached = cache(), []
        misses: list[float] = []
        deadline = time.monotonic() + limit
        for name in names:
            begin = time.perf_counter()
            await uncached.resolve(name, store.lookup)
            misses.append(time.perf_counter() - begin)
            if time.monotonic() > deadline:
                break
        for name in names[: len(misses)]:
            begin = time.perf_counter()
            await uncached.resolve(name, store.lookup)
            cached.append(time.perf_counter() - begin)

        parallel, gate = cache(), DeferredSemaphore(concurrency)
        subset = names[: len(misses)]
        begin = time.perf_counter()
        await gatherResults([gate.run(parallel.resolve, n, store.lookup) for n in subset])
        wall = time.perf_counter() - begin
        return LookupResult(1e6 * statistics.median(misses), 1e6 * statistics.median(cached),
                            len(subset) / wall, len(misses))
    finally:
        await store.close()


def measure_lookups(tables: dict[str, dict[str, Any]], names: list[str], concurrency: int,
                    limit: float) -> dict[str, LookupResult]:
    """Run the reactor once for every store's lookup phase."""
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred
    from twisted.python.failure import Failure

    results: dict[str, LookupResult] = {}
    outcome: list[Any] = []

    async def all_stores() -> None:
        for name, table in tables.items():
            note(f"{name}: {len(names)} lookups, uncached then cached, then {concurrency} "
                 "in flight")
            results[name] = await measure_store(reactor, table, names, concurrency, limit)

    def start() -> None:
        d = Deferred.fromCoroutine(all_stores())
        d.addBoth(outcome.append).addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(start)
    reactor.run(installSignalHandlers=False)
    if outcome and isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    return results


# --- per login (through stalroute and Dovecot) -------------------------------------------


def measure_logins(tables: dict[str, dict[str, Any]], workdir: Path, count: int,
                   limit: float) -> dict[tuple[str, str], float]:
    """Median ms of connect + LOGIN + LOGOUT per store, with the cache on and off."""
    from tests.harness.clients import SourceIMAP4_SSL
    from tests.harness.dovecot import start_seeded_nodes
    from tests.harness.stalroute import StalrouteProcess, dovecot_destination, imap_proxy_config

    results: dict[tuple[str, str], float] = {}
    with contextlib.ExitStack() as cleanup:
        ca = CertificateAuthority(workdir / "pki")
        (node,) = start_seeded_nodes(ca, {USER: PASSWORD}, (DESTINATION,))
        cleanup.callback(node.stop)
        certificate = ca.issue("stalroute", ["localhost"], ["127.0.0.1"])
        for store, table in tables.items():
            for mode, ttl in (("cached", "10m"), ("uncached", "0s")):
                config = imap_proxy_config(
                    certificate,
                    {DESTINATION: dovecot_destination(node, tls="implicit", ca_file=ca.cert_path)},
                    default=DESTINATION, log_level="warn",
                )
                config["mapping"] = {"positive_ttl": ttl, "negative_ttl": ttl,
                                     **({"source": "file"} if store == "file" else table)}
                proxy = StalrouteProcess(config, workdir / f"stalroute-{store}-{mode}",
                                         mappings={USER: DESTINATION})
                note(f"{store}, {mode}: {count} logins through stalroute")
                with proxy:
                    host, port = proxy.listener("imaps")
                    times: list[float] = []
                    deadline = time.monotonic() + limit
                    for _ in range(count + 1):  # the first one warms up
                        begin = time.perf_counter()
                        client = SourceIMAP4_SSL(host, port, ssl_context=ca.client_context(),
                                                 server_hostname="localhost")
                        client.login(USER, PASSWORD)
                        client.logout()
                        times.append(time.perf_counter() - begin)
                        if time.monotonic() > deadline:
                            break
                results[store, mode] = 1000 * statistics.median(times[1:] or times)
    return results


# --- report ----------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="stalroute-store-bench-"))
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, workdir, True)
        note(f"starting PostgreSQL and Redis, filling every store with {args.entries} entries")
        tables = prepare_stores(workdir, args.entries, cleanup)
        logins: dict[tuple[str, str], float] = {}
        if args.logins:
            if os.geteuid() != 0 or not shutil.which("dovecot", path="/usr/sbin:/usr/bin"):
                note("per-login phase skipped: needs root and Dovecot")
            else:
                logins = measure_logins(tables, workdir, args.logins, args.max_seconds)
        lookups = measure_lookups(tables, identifiers(args.entries), args.concurrency,
                                  args.max_seconds)

    print_table(
        ("store", "uncached µs/lookup", "cached µs/lookup",
         f"uncached lookups/s ({args.concurrency} in flight)", "login ms, cached",
         "login ms, uncached"),
        [
            (store,
             f"{lookups[store].uncached_us:.0f}",
             f"{lookups[store].cached_us:.1f}",
             f"{lookups[store].uncached_per_s:.0f}",
             f"{logins[store, 'cached']:.1f}" if logins else "-",
             f"{logins[store, 'uncached']:.1f}" if logins else "-")
            for store in STORES
        ],
    )
    print(f"\n(medians; {min(r.lookups for r in lookups.values())}+ lookups per store, "
          f"{args.logins} logins per row)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=2000,
                        help="mappings in each store (= distinct lookups)")
    parser.add_argument("--concurrency", type=int, default=32,
                        help="lookups in flight for the throughput figure")
    parser.add_argument("--logins", type=int, default=100,
                        help="logins per store and cache mode (0: skip the login phase)")
    parser.add_argument("--max-seconds", type=float, default=20.0,
                        help="time limit of each phase")
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
