"""Acceptance tests of the PostgreSQL, SQLite and Redis mapping stores (SPEC §2.7, §2.8, §7).

Private PostgreSQL and Redis servers (``tests/harness/postgres.py``, ``redis.py``) and the
Dovecot pair; stalroute runs as a real process with ``[mapping]`` switched to each store, and
imaplib logs in through it (node1 is the default destination, a mapped account lands on
node2). A store that is down shows as ``NO [UNAVAILABLE]`` (``on_store_error = "tempfail"``)
or as the default destination (``"default"``).

The cache against the real stores (coalescing, TTLs, LRU, timeouts) and listing every
mapping (``entries()``: SQL ``list_query``, Redis ``SCAN``) are exercised in-process by
:func:`scenario_main`, run in a child Python because pytest runs no reactor.
"""

from __future__ import annotations

import imaplib
import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.conftest import DovecotPair, StalrouteFactory, require_binary, start_postgres
from tests.harness.clients import SourceIMAP4_SSL, fetch_subject
from tests.harness.dovecot import welcome_subject
from tests.harness.pki import CertificateAuthority, IssuedCertificate
from tests.harness.ports import free_port
from tests.harness.postgres import PostgresServer
from tests.harness.redis import RedisServer
from tests.harness.stalroute import REPO_ROOT, StalrouteProcess, dump_toml, two_node_imap_config

pytestmark = pytest.mark.integration

PG_PASSWORD = "Pg-Secret-4x9q"
REDIS_PASSWORD = "Redis-Secret-7w2k"
#: Marks the lookup statement in PostgreSQL's statement log, to count lookups server-side.
LOOKUP_MARKER = "/* stalroute-lookup */"
#: The SQL stores' list statement; the literal % checks psycopg2's parameter style.
LIST_QUERY = "SELECT login, destination FROM routes WHERE login NOT LIKE 'zz%'"
REDIS_DB = 3
T = TypeVar("T")


# --- the stores under test -------------------------------------------------------------------


class Backend:
    """A store under test: its ``[mapping]`` table and how to change, stop and start it."""

    name = ""
    secret: str | None = None

    def mapping(self) -> dict[str, Any]:
        raise NotImplementedError

    def set(self, identifier: str, destination: str) -> None:
        raise NotImplementedError

    def set_unmapped(self, identifier: str) -> None:
        """Store something for ``identifier`` that maps it nowhere (NULL, a hash)."""
        raise NotImplementedError

    def clear(self) -> None:
        raise NotImplementedError

    def lookups(self) -> int | None:
        """Lookups the server has answered so far (None: it cannot tell)."""
        return None

    def stop(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        raise NotImplementedError


class PostgresBackend(Backend):
    name = "postgresql"
    secret = PG_PASSWORD  # trust auth ignores it; it must still never be shown

    def __init__(self, server: PostgresServer) -> None:
        self.server = server

    def url(self) -> str:
        return self.server.url().replace("postgres@", f"postgres:{PG_PASSWORD}@", 1)

    def mapping(self) -> dict[str, Any]:
        return {"source": "sql", "sql": {
            "url": self.url(),
            "query": f"SELECT destination FROM routes WHERE login = $1 {LOOKUP_MARKER}",
            "upsert_query": "INSERT INTO routes VALUES ($1, $2) ON CONFLICT (login) "
                            "DO UPDATE SET destination = EXCLUDED.destination",
            "delete_query": "DELETE FROM routes WHERE login = $1",
            "list_query": LIST_QUERY,
            "pool_size": 4,
        }}

    def set(self, identifier: str, destination: str | None) -> None:
        self.server.execute("INSERT INTO routes VALUES (%s, %s) ON CONFLICT (login) "
                            "DO UPDATE SET destination = EXCLUDED.destination",
                            (identifier, destination))

    def set_unmapped(self, identifier: str) -> None:
        self.set(identifier, None)

    def clear(self) -> None:
        self.server.execute("TRUNCATE routes")

    def lookups(self) -> int:
        return self.server.log_text().count(LOOKUP_MARKER)

    def stop(self) -> None:
        self.server.stop()

    def start(self) -> None:
        self.server.start()


class SQLiteBackend(Backend):
    name = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = path

    def mapping(self) -> dict[str, Any]:
        return {"source": "sql", "sql": {
            "url": f"sqlite://{self.path}",  # sqlite:///tmp/…
            "query": "SELECT destination FROM routes WHERE login = $1",
            "upsert_query": "INSERT INTO routes VALUES ($1, $2) ON CONFLICT (login) "
                            "DO UPDATE SET destination = excluded.destination",
            "delete_query": "DELETE FROM routes WHERE login = $1",
            "list_query": LIST_QUERY,
        }}

    def _execute(self, sql: str, params: tuple[str | None, ...] = ()) -> None:
        with sqlite3.connect(self.path) as connection:
            connection.execute(sql, params)
        connection.close()

    def set(self, identifier: str, destination: str | None) -> None:
        self._execute("INSERT OR REPLACE INTO routes VALUES (?, ?)", (identifier, destination))

    def set_unmapped(self, identifier: str) -> None:
        self.set(identifier, None)

    def clear(self) -> None:
        self._execute("DELETE FROM routes")


class RedisBackend(Backend):
    name = "redis"
    secret = REDIS_PASSWORD

    def __init__(self, server: RedisServer) -> None:
        self.server = server

    def mapping(self) -> dict[str, Any]:
        return {"source": "redis", "redis": {
            "url": self.server.url(REDIS_DB), "key_prefix": "route:", "pool_size": 4}}

    def set(self, identifier: str, destination: str) -> None:
        self.server.command("SET", f"route:{identifier}", destination, db=REDIS_DB)

    def set_unmapped(self, identifier: str) -> None:
        self.server.command("HSET", f"route:{identifier}", "destination", "node2", db=REDIS_DB)

    def clear(self) -> None:
        self.server.command("FLUSHDB", db=REDIS_DB)

    def lookups(self) -> int:
        return self.server.stat("get")

    def stop(self) -> None:
        self.server.stop()

    def start(self) -> None:
        self.server.start()


@pytest.fixture(scope="module")
def postgres_server() -> Iterator[PostgresServer]:
    server = start_postgres(log_statements=True)
    try:
        server.execute("CREATE TABLE routes (login text PRIMARY KEY, destination text)")
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer(require_binary("redis-server"), password=REDIS_PASSWORD)
    try:
        yield server.start()
    finally:
        server.close()


@pytest.fixture
def postgresql_backend(postgres_server: PostgresServer) -> PostgresBackend:
    backend = PostgresBackend(postgres_server)
    backend.start()  # a previous test may have stopped it
    backend.clear()
    return backend


@pytest.fixture
def redis_backend(redis_server: RedisServer) -> RedisBackend:
    backend = RedisBackend(redis_server)
    backend.start()
    backend.clear()
    return backend


@pytest.fixture
def sqlite_backend(tmp_path: Path) -> SQLiteBackend:
    backend = SQLiteBackend(tmp_path / "mappings.db")
    backend._execute("CREATE TABLE routes (login text PRIMARY KEY, destination text)")
    return backend


@pytest.fixture(params=["postgresql", "sqlite", "redis"])
def backend(request: pytest.FixtureRequest) -> Backend:
    """Each store in turn."""
    return request.getfixturevalue(f"{request.param}_backend")


@pytest.fixture(params=["postgresql", "redis"])
def server_backend(request: pytest.FixtureRequest) -> Backend:
    """Each store that runs as a server (and so can be stopped)."""
    return request.getfixturevalue(f"{request.param}_backend")


# --- helpers -------------------------------------------------------------------------------


def proxy_config(
    pki: CertificateAuthority,
    certificate: IssuedCertificate,
    dovecot_pair: DovecotPair,
    backend: Backend,
    on_store_error: str = "tempfail",
    **cache: Any,
) -> dict[str, Any]:
    """stalroute in front of both nodes, mapping through ``backend``."""
    node1, node2 = dovecot_pair
    config = two_node_imap_config(certificate, pki.cert_path, node1, node2)
    config["routing"]["on_store_error"] = on_store_error
    config["mapping"] = {**cache, **backend.mapping()}
    return config


def lands_on(proxy: StalrouteProcess, pki: CertificateAuthority, users: dict[str, str],
             user: str) -> str:
    """Log in as ``user`` through the proxy: the node whose INBOX the session sees."""
    host, port = proxy.listener("imaps")
    with SourceIMAP4_SSL(host, port, ssl_context=pki.client_context(),
                         server_hostname="localhost") as client:
        client.login(user, users[user])
        subject = fetch_subject(client)
    for node in ("node1", "node2"):
        if subject == welcome_subject(node, user):
            return node
    raise AssertionError(f"unexpected INBOX: {subject!r}")


def eventually(attempt: Callable[[], T], accept: Callable[[T], bool], timeout: float = 20.0,
               interval: float = 0.5) -> tuple[T, float]:
    """Retry ``attempt`` (exceptions count as misses) until ``accept``; the value and the
    seconds it took."""
    start = time.monotonic()
    last: object = None
    while time.monotonic() - start < timeout:
        try:
            value = attempt()
            if accept(value):
                return value, time.monotonic() - start
            last = value
        except Exception as exc:  # noqa: BLE001 - a miss, retried
            last = exc
        time.sleep(interval)
    raise AssertionError(f"not reached within {timeout}s; last: {last!r}")


def reload_and_wait(proxy: StalrouteProcess) -> None:
    """SIGHUP: the configuration is reloaded, with a new store and an empty cache."""
    since = proxy.log.size()
    proxy.reload()
    proxy.log.wait_for(r"configuration reloaded", since=since)


def run_check(config: dict[str, Any], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """``stalroute check`` on ``config``, in a child process."""
    path = tmp_path / f"check-{time.monotonic_ns()}.toml"
    path.write_text(dump_toml(config))
    return subprocess.run([sys.executable, "-m", "stalroute", "check", str(path)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
                          check=False)


# --- routing through each store ----------------------------------------------------------------


def test_mapped_account_lands_on_node2_and_moves_after_a_change(
    stalroute: StalrouteFactory,
    pki: CertificateAuthority,
    proxy_certificate: IssuedCertificate,
    dovecot_pair: DovecotPair,
    users: dict[str, str],
    backend: Backend,
) -> None:
    backend.set("bob", "node2")
    proxy = stalroute(proxy_config(pki, proxy_certificate, dovecot_pair, backend))
    assert lands_on(proxy, pki, users, "bob") == "node2"
    assert lands_on(proxy, pki, users, "alice") == "node1"  # not mapped: the default

    backend.set("bob", "node1")
    assert lands_on(proxy, pki, users, "bob") == "node2"  # still the cached answer
    reload_and_wait(proxy)
    assert lands_on(proxy, pki, users, "bob") == "node1"


def test_positive_ttl_expiry_picks_up_a_change(
    stalroute: StalrouteFactory,
    pki: CertificateAuthority,
    proxy_certificate: IssuedCertificate,
    dovecot_pair: DovecotPair,
    users: dict[str, str],
    postgresql_backend: PostgresBackend,
) -> None:
    backend = postgresql_backend
    backend.set("carol", "node2")
    proxy = stalroute(proxy_config(pki, proxy_certificate, dovecot_pair, backend,
                                   positive_ttl="1s"))
    assert lands_on(proxy, pki, users, "carol") == "node2"
    backend.set("carol", "node1")
    landed, _ = eventually(lambda: lands_on(proxy, pki, users, "carol"), lambda n: n == "node1",
                           timeout=10)
    assert landed == "node1"


def test_rediss_with_password_and_database_number(
    stalroute: StalrouteFactory,
    pki: CertificateAuthority,
    proxy_certificate: IssuedCertificate,
    dovecot_pair: DovecotPair,
    users: dict[str, str],
) -> None:
    certificate = pki.issue("redis-tls", ["localhost"], ["127.0.0.1"])
    server = RedisServer(require_binary("redis-server"), password=REDIS_PASSWORD,
                         certificate=certificate, ca_file=pki.cert_path)
    with server:
        backend = RedisBackend(server)
        backend.set("bob", "node2")
        assert server.url(REDIS_DB).startswith("rediss://")
        proxy = stalroute(proxy_config(pki, proxy_certificate, dovecot_pair, backend))
        assert lands_on(proxy, pki, users, "bob") == "node2"
        assert lands_on(proxy, pki, users, "alice") == "node1"
        assert REDIS_PASSWORD not in proxy.log_text()


# --- outages -----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["tempfail", "default"])
def test_store_outage_and_recovery(
    stalroute: StalrouteFactory,
    pki: CertificateAuthority,
    proxy_certificate: IssuedCertificate,
    dovecot_pair: DovecotPair,
    users: dict[str, str],
    server_backend: Backend,
    mode: str,
) -> None:
    backend = server_backend
    backend.set("bob", "node2")
    proxy = stalroute(proxy_config(pki, proxy_certificate, dovecot_pair, backend, mode,
                                   positive_ttl="1s", negative_ttl="1s", lookup_timeout="2s"))
    pid = proxy.pid
    assert lands_on(proxy, pki, users, "bob") == "node2"

    backend.stop()
    time.sleep(1.2)  # the cached answer expires
    started = time.monotonic()
    if mode == "tempfail":
        with pytest.raises(imaplib.IMAP4.error, match=r"\[UNAVAILABLE\]"):
            lands_on(proxy, pki, users, "bob")
    else:
        assert lands_on(proxy, pki, users, "bob") == "node1"  # the default, as configured
    assert time.monotonic() - started < 2.5, "an outage must not stall logins"

    backend.start()
    backend.set("bob", "node2")  # Redis keeps nothing across the restart
    landed, took = eventually(lambda: lands_on(proxy, pki, users, "bob"),
                              lambda node: node == "node2")
    print(f"{backend.name} back in service {took:.1f}s after its restart")
    assert proxy.running and proxy.pid == pid
    assert backend.secret not in proxy.log_text()


def test_store_down_at_boot(
    stalroute: StalrouteFactory,
    pki: CertificateAuthority,
    proxy_certificate: IssuedCertificate,
    dovecot_pair: DovecotPair,
    users: dict[str, str],
    server_backend: Backend,
    tmp_path: Path,
) -> None:
    backend = server_backend
    config = proxy_config(pki, proxy_certificate, dovecot_pair, backend)
    backend.stop()

    started = time.monotonic()
    check = run_check(config, tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.startswith("OK: ")
    assert "warning: mapping store unreachable: " in check.stderr
    assert backend.secret not in check.stderr
    assert time.monotonic() - started < 15

    proxy = stalroute(config)  # starts and listens without its store
    with pytest.raises(imaplib.IMAP4.error, match=r"\[UNAVAILABLE\]"):
        lands_on(proxy, pki, users, "bob")

    backend.start()
    backend.set("bob", "node2")
    landed, _ = eventually(lambda: lands_on(proxy, pki, users, "bob"),
                           lambda node: node == "node2")
    assert landed == "node2"
    check = run_check(config, tmp_path)
    assert check.returncode == 0 and "warning" not in check.stderr, check.stderr


def test_check_rejects_an_unusable_statement(
    pki: CertificateAuthority,
    proxy_certificate: IssuedCertificate,
    dovecot_pair: DovecotPair,
    sqlite_backend: SQLiteBackend,
    tmp_path: Path,
) -> None:
    config = proxy_config(pki, proxy_certificate, dovecot_pair, sqlite_backend)
    config["mapping"]["sql"]["query"] = "SELECT destination FROM routes WHERE login = :login"
    check = run_check(config, tmp_path)
    assert check.returncode == 1
    assert check.stdout.startswith("mapping.sql.query: must use $1"), check.stdout


#: SQLite's own placeholder spellings: bare ``?`` (numbered in order) and ``?NNN``.
SQLITE_STATEMENTS = {
    "?": {"query": "SELECT destination FROM routes WHERE login = ?",
          "upsert_query": "INSERT INTO routes VALUES (?, ?) ON CONFLICT (login) "
                          "DO UPDATE SET destination = excluded.destination",
          "delete_query": "DELETE FROM routes WHERE login = ?"},
    "?NNN": {"query": "SELECT destination FROM routes WHERE login = ?1",
             "upsert_query": "INSERT INTO routes VALUES (?1, ?2) ON CONFLICT (login) "
                             "DO UPDATE SET destination = ?2",
             "delete_query": "DELETE FROM routes WHERE login = ?1"},
}


@pytest.mark.parametrize("spelling", sorted(SQLITE_STATEMENTS))
def test_sqlite_statements_with_sqlite_placeholders(
    stalroute: StalrouteFactory,
    pki: CertificateAuthority,
    proxy_certificate: IssuedCertificate,
    dovecot_pair: DovecotPair,
    users: dict[str, str],
    sqlite_backend: SQLiteBackend,
    tmp_path: Path,
    spelling: str,
) -> None:
    """A query written for SQLite loads, routes, and writes (issue 11 item 12)."""
    config = proxy_config(pki, proxy_certificate, dovecot_pair, sqlite_backend)
    config["mapping"]["sql"].update(SQLITE_STATEMENTS[spelling])
    check = run_check(config, tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr
    sqlite_backend.set("bob", "node2")
    proxy = stalroute(config)
    assert lands_on(proxy, pki, users, "bob") == "node2"
    assert lands_on(proxy, pki, users, "alice") == "node1"
    result = run_scenario("writes", config["mapping"])
    assert result == {"writable": True, "upsert": None, "lookup": "node2", "delete": True,
                      "delete_again": False, "after": None}


# --- the cache against the real stores (in-process, in a child) ----------------------------


def run_scenario(name: str, mapping: dict[str, Any]) -> dict[str, Any]:
    """Run :func:`scenario_main` for ``name`` against ``mapping`` in a child Python."""
    code = "import sys; from tests.integration.test_stores import scenario_main; " \
           "scenario_main(sys.argv[1:])"
    done = subprocess.run([sys.executable, "-c", code, name, json.dumps(mapping)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_concurrent_first_lookups_make_one_store_query(backend: Backend) -> None:
    backend.set("carol", "node2")
    before = backend.lookups()
    result = run_scenario("coalesce", backend.mapping())
    assert result == {"answers": ["node2"], "resolved": 1000, "fetches": 1}
    if before is not None:  # the server's own count agrees
        assert backend.lookups() - before == 1


def test_cache_ttls_and_lru_cap(backend: Backend) -> None:
    backend.set("bob", "node2")
    result = run_scenario("ttl", backend.mapping())
    # [what, answer, store lookups so far]
    assert result["ttl"] == [
        ["bob", "node2", 1], ["nobody", None, 2],            # misses: one lookup each
        ["bob", "node2", 2], ["nobody", None, 2],            # rows changed: cached answers
        ["bob", "node2", 2], ["nobody", "node2", 3],         # after negative_ttl only
        ["bob", "node1", 4],                                 # after positive_ttl too
    ]
    assert result["lru"] == [
        ["a", 1], ["b", 2], ["a", 2], ["c", 3],              # c evicts b, the least recent
        ["a", 3], ["b", 4],
    ]


def test_store_writes_and_read_only_stores(backend: Backend) -> None:
    result = run_scenario("writes", backend.mapping())
    assert result == {"writable": True, "upsert": None, "lookup": "node2", "delete": True,
                      "delete_again": False, "after": None}
    if backend.name != "redis":
        mapping = backend.mapping()
        del mapping["sql"]["upsert_query"]
        result = run_scenario("writes", mapping)
        assert result["writable"] is False
        assert result["upsert"].startswith("ReadOnlyStore: ")
        assert result["delete"].startswith("ReadOnlyStore: ")


@pytest.mark.parametrize("kind", ["postgresql", "redis"])
def test_unreachable_and_silent_servers_fail_fast(kind: str) -> None:
    """Nothing listening: a StoreError at once. A server that accepts and never answers:
    a StoreError after ``lookup_timeout``. Neither message shows the password."""
    result = run_scenario("unreachable", {"kind": kind, "port": free_port()})
    for case in ("closed", "silent"):
        error, seconds = result[case]
        assert error.startswith("StoreError: "), error
        assert "Pw-hidden" not in error
        assert seconds < (0.5 if case == "closed" else 1.6), result


def test_postgresql_restart_costs_no_failed_lookup(
    postgresql_backend: PostgresBackend, tmp_path: Path
) -> None:
    backend = postgresql_backend
    backend.set("bob", "node2")
    spec = {"mapping": backend.mapping(), "handshake": str(tmp_path)}
    code = "import sys; from tests.integration.test_stores import scenario_main; " \
           "scenario_main(sys.argv[1:])"
    child = subprocess.Popen([sys.executable, "-c", code, "restart", json.dumps(spec)],
                             cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "ready").exists():
            assert child.poll() is None and time.monotonic() < deadline, child.communicate()
            time.sleep(0.05)
        backend.stop()
        backend.start()
        (tmp_path / "go").touch()
        out, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    assert child.returncode == 0, out + err
    result = json.loads(out.strip().splitlines()[-1])
    assert result == {"before": ["node2"] * 20, "after": ["node2"] * 20}


# --- listing every mapping (the admin export) ---------------------------------------------


def test_entries_list_every_mapping_sorted(backend: Backend) -> None:
    for identifier, destination in (("carol", "node2"), ("jürgen@example.com", "node1"),
                                    ("bob", "node2")):
        backend.set(identifier, destination)
    backend.set_unmapped("nobody")
    result = run_scenario("entries", {"mapping": backend.mapping(), "unlisted": True})
    assert result["listable"] is True
    assert result["entries"] == [["bob", "node2"], ["carol", "node2"], ["dave", "node2"],
                                 ["jürgen@example.com", "node1"]]  # dave: the store's upsert
    if backend.name == "redis":
        assert "unlisted" not in result  # Redis always lists
    else:  # the same SQL store without list_query
        listable, refusal = result["unlisted"]
        assert listable is False and refusal.startswith("NotListable: "), refusal
        assert refusal.endswith(": cannot list the mappings (set [mapping.sql] list_query "
                                "for the export)")
        assert backend.secret is None or backend.secret not in refusal


def test_redis_entries_walk_the_keyspace_in_steps(redis_backend: RedisBackend) -> None:
    """SCAN in bounded steps over a prefix with glob characters, matched literally."""
    server = redis_backend.server
    prefix = "r*[1]:"
    pairs = [item for i in range(2500) for item in (f"{prefix}user{i:04d}", f"node{i % 2 + 1}")]
    server.command("MSET", *pairs, "rzz1:eve", "node2", "route:bob", "node2", db=REDIS_DB)
    mapping = redis_backend.mapping()
    mapping["redis"]["key_prefix"] = prefix
    scans = server.stat("scan")
    result = run_scenario("entries", {"mapping": mapping})
    listed = result["entries"]
    assert len(listed) == 2501  # with "dave", written by the store
    assert listed[:2] == [["dave", "node2"], ["user0000", "node1"]]
    assert listed[-1] == ["user2499", "node2"]
    assert server.stat("scan") - scans >= 3  # COUNT 1000: several steps, Redis never blocks


@pytest.mark.parametrize("kind", ["postgresql", "sqlite"])
def test_sql_listing_is_bounded_and_frees_its_thread(
    kind: str, request: pytest.FixtureRequest
) -> None:
    """A list statement that runs away fails after the store's list timeout, and the
    database stops it: with one pool thread, the next lookup is answered at once."""
    backend = request.getfixturevalue(f"{kind}_backend")
    backend.set("bob", "node2")
    mapping = backend.mapping()
    mapping["sql"]["pool_size"] = 1
    mapping["sql"]["list_query"] = (
        "SELECT login, destination FROM routes CROSS JOIN pg_sleep(30)" if kind == "postgresql"
        else "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n) "
             "SELECT x, x FROM n WHERE x < 0")
    result = run_scenario("slow_list", {"mapping": mapping, "list_timeout": 0.5})
    error, seconds = result["list"]
    assert error.startswith("StoreError: ") and ": list failed: " in error, error
    assert 0.4 < seconds < 2.0, result
    answer, seconds = result["lookup"]
    assert answer == "node2" and seconds < 1.5, result


def _mapping_config(table: dict[str, Any], lookup_timeout: float = 5.0) -> Any:
    from stalroute.config import MappingConfig, RedisMappingConfig, SQLMappingConfig

    if table["source"] == "redis":
        return MappingConfig(source="redis", lookup_timeout=lookup_timeout,
                             settings=RedisMappingConfig(**table["redis"]))
    return MappingConfig(source="sql", lookup_timeout=lookup_timeout,
                         settings=SQLMappingConfig(**table["sql"]))


def scenario_main(argv: list[str]) -> None:
    """Child side of :func:`run_scenario`: run one scenario under the reactor, print JSON."""
    from twisted.internet import defer, task
    from twisted.internet.protocol import Factory, Protocol

    from stalroute.mapping.cache import RoutingCache
    from stalroute.mapping.factory import build_store

    name, spec = argv[0], json.loads(argv[1])
    result: dict[str, Any] = {}

    def sleep(reactor, seconds: float) -> defer.Deferred[None]:
        return task.deferLater(reactor, seconds, lambda: None)

    def counting(store):
        calls = [0]

        def fetch(key: str) -> defer.Deferred[str | None]:
            calls[0] += 1
            return store.lookup(key)

        return fetch, calls

    async def coalesce(reactor) -> None:
        store = build_store(_mapping_config(spec), ["node1", "node2"])
        fetch, calls = counting(store)
        cache = RoutingCache(reactor, 600, 30, 1000, 5)
        answers = await defer.gatherResults([cache.resolve("carol", fetch) for _ in range(1000)])
        result.update(answers=sorted(set(answers)), resolved=len(answers), fetches=calls[0])
        await store.close()

    async def ttl(reactor) -> None:
        store = build_store(_mapping_config(spec), ["node1", "node2"])
        await store.delete("nobody")
        fetch, calls = counting(store)
        cache = RoutingCache(reactor, positive_ttl=2.0, negative_ttl=0.5, max_entries=100,
                             lookup_timeout=5)
        steps: list[Any] = []

        async def resolve(key: str) -> None:
            steps.append([key, await cache.resolve(key, fetch), calls[0]])

        start = reactor.seconds()
        await resolve("bob")
        await resolve("nobody")
        await store.upsert("bob", "node1")
        await store.upsert("nobody", "node2")
        await resolve("bob")
        await resolve("nobody")
        await sleep(reactor, start + 1.0 - reactor.seconds())
        await resolve("bob")
        await resolve("nobody")
        await sleep(reactor, start + 2.4 - reactor.seconds())
        await resolve("bob")
        result["ttl"] = steps

        for key in "abc":
            await store.upsert(key, "node2")
        fetch, calls = counting(store)
        lru = RoutingCache(reactor, 600, 30, max_entries=2, lookup_timeout=5)
        result["lru"] = []
        for key in "abacab":
            await lru.resolve(key, fetch)
            result["lru"].append([key, calls[0]])
        await store.close()

    async def writes(reactor) -> None:
        store = build_store(_mapping_config(spec), ["node1", "node2"])
        result["writable"] = store.writable
        for step, call in (("upsert", lambda: store.upsert("dave", "node2")),
                           ("lookup", lambda: store.lookup("dave")),
                           ("delete", lambda: store.delete("dave")),
                           ("delete_again", lambda: store.delete("dave")),
                           ("after", lambda: store.lookup("dave"))):
            try:
                result[step] = await call()
            except Exception as exc:  # noqa: BLE001 - reported to the test
                result[step] = f"{type(exc).__name__}: {exc}"
        await store.close()

    async def unreachable(reactor) -> None:
        port = spec["port"]
        if spec["kind"] == "redis":
            def table(p: int) -> dict[str, Any]:
                return {"source": "redis", "redis": {"url": f"redis://:Pw-hidden@127.0.0.1:{p}"}}
        else:
            def table(p: int) -> dict[str, Any]:
                return {"source": "sql", "sql": {
                    "url": f"postgresql://app:Pw-hidden@127.0.0.1:{p}/x",
                    "query": "SELECT d FROM m WHERE l = $1"}}
        silent = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
        for case, target in (("closed", port), ("silent", silent.getHost().port)):
            store = build_store(_mapping_config(table(target), 1.0), ["node1"])
            await sleep(reactor, 1.1)  # past the wait of a new Redis pool for its connection
            cache = RoutingCache(reactor, 600, 30, 10, lookup_timeout=1.0)
            began = reactor.seconds()
            try:
                await cache.resolve("bob", store.lookup)
                result[case] = ["answered", 0]
            except Exception as exc:  # noqa: BLE001 - reported to the test
                result[case] = [f"{type(exc).__name__}: {exc}", reactor.seconds() - began]
            await store.close()
        await silent.stopListening()

    async def restart(reactor) -> None:
        """Warm every pooled connection, wait for the parent to restart the server, then
        look up concurrently: the dropped connections are replaced without a failure."""
        store = build_store(_mapping_config(spec["mapping"]), ["node1", "node2"])
        handshake = Path(spec["handshake"])

        async def burst() -> list[Any]:
            outcomes = await defer.DeferredList(
                [defer.maybeDeferred(store.lookup, "bob") for _ in range(20)],
                consumeErrors=True)
            return [value if ok else f"{value.type.__name__}: {value.getErrorMessage()}"
                    for ok, value in outcomes]

        result["before"] = await burst()
        (handshake / "ready").touch()
        while not (handshake / "go").exists():
            await sleep(reactor, 0.05)
        result["after"] = await burst()
        await store.close()

    async def entries(reactor) -> None:
        """A write through the store, then ``entries()``; with ``unlisted``, a SQL store
        without ``list_query`` too."""
        store = build_store(_mapping_config(spec["mapping"]), ["node1", "node2"])
        result["listable"] = store.listable
        await store.upsert("dave", "node2")
        result["entries"] = await store.entries()
        await store.close()
        if spec.get("unlisted") and "sql" in spec["mapping"]:
            table = json.loads(json.dumps(spec["mapping"]))
            del table["sql"]["list_query"]
            store = build_store(_mapping_config(table), ["node1", "node2"])
            try:
                await store.entries()
                result["unlisted"] = [store.listable, "listed"]
            except Exception as exc:  # noqa: BLE001 - reported to the test
                result["unlisted"] = [store.listable, f"{type(exc).__name__}: {exc}"]
            await store.close()

    async def slow_list(reactor) -> None:
        """``entries()`` under a short list timeout, then one lookup: [outcome, seconds]."""
        store = build_store(_mapping_config(spec["mapping"]), ["node1", "node2"])
        store.list_timeout = spec["list_timeout"]
        for step, call in (("list", store.entries), ("lookup", lambda: store.lookup("bob"))):
            began = reactor.seconds()
            try:
                outcome: Any = await call()
            except Exception as exc:  # noqa: BLE001 - reported to the test
                outcome = f"{type(exc).__name__}: {exc}"
            result[step] = [outcome, reactor.seconds() - began]
        await store.close()

    scenarios = {"coalesce": coalesce, "ttl": ttl, "writes": writes,
                 "unreachable": unreachable, "restart": restart, "entries": entries,
                 "slow_list": slow_list}

    async def main(reactor) -> None:
        await scenarios[name](reactor)
        print(json.dumps(result), flush=True)

    task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor)))

