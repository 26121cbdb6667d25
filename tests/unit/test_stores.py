"""The SQL and Redis stores without servers: placeholders, URLs, redaction, error mapping,
and listing (``entries()``: SQL ``list_query``, Redis ``SCAN``, ``NotListable``).

Behaviour against real servers is in ``tests/integration/test_stores.py``.
"""

from __future__ import annotations

import importlib
import io
import re
import sqlite3
import subprocess
import sys
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer, error
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from stalroute.control import Done
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from stalroute.admin.importer import BATCH as IMPORT_BATCH
from stalroute.admin.importer import Importer
from stalroute.config import (
    ConfigError,
    MappingConfig,
    RedisMappingConfig,
    SQLMappingConfig,
    StoreSettings,
    parse_config,
)
from stalroute.config.stores import SOURCE_ALIASES, STORE_KINDS, StoreKind
from stalroute.mapping import (
    BATCH_CONCURRENCY,
    MappingStore,
    NotListable,
    ReadOnlyStore,
    StoreError,
    redact_url,
    scrub,
    store_error,
    url_secrets,
)
from stalroute.mapping import redis as redis_store
from stalroute.mapping.factory import InvalidStoreSetting, UnsupportedStore, build_store
from stalroute.mapping.file import FileMappingStore
from stalroute.mapping.redis import RedisMappingStore, RedisTarget, parse_redis_url, tls_options
from stalroute.mapping.sql import (
    SQLMappingStore,
    Statement,
    Statements,
    all_pairs,
    build_sql_store,
    first_value,
    one_statement,
    postgresql_dsn,
    sqlite_database,
)
from stalroute.sqlparams import parameter_problem, translate

# --- placeholders ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "postgresql", "sqlite"),
    [
        ("SELECT d FROM m WHERE login = $1",
         "SELECT d FROM m WHERE login = %(p1)s", "SELECT d FROM m WHERE login = ?1"),
        ("INSERT INTO m VALUES ($1, $2) ON CONFLICT (login) DO UPDATE SET d = $2",
         "INSERT INTO m VALUES (%(p1)s, %(p2)s) ON CONFLICT (login) DO UPDATE SET d = %(p2)s",
         "INSERT INTO m VALUES (?1, ?2) ON CONFLICT (login) DO UPDATE SET d = ?2"),
        # a literal % works in both: psycopg2 needs it doubled, SQLite does not
        ("SELECT d FROM m WHERE login = $1 AND note NOT LIKE 'old%' AND 5 % 2 = 1",
         "SELECT d FROM m WHERE login = %(p1)s AND note NOT LIKE 'old%%' AND 5 %% 2 = 1",
         "SELECT d FROM m WHERE login = ?1 AND note NOT LIKE 'old%' AND 5 % 2 = 1"),
        # $1 inside strings, identifiers, comments and dollar quotes is text
        ("SELECT '$1', \"c$1\", E'it\\'s $1', $$ $1 $$, $f$ $2 $f$ -- $1\nFROM t WHERE a=$1",
         "SELECT '$1', \"c$1\", E'it\\'s $1', $$ $1 $$, $f$ $2 $f$ -- $1\nFROM t WHERE a=%(p1)s",
         "SELECT '$1', \"c$1\", E'it\\'s $1', $$ $1 $$, $f$ $2 $f$ -- $1\nFROM t WHERE a=?1"),
        ("SELECT d /* $2 % */ FROM m WHERE login = $1",
         "SELECT d /* $2 %% */ FROM m WHERE login = %(p1)s",
         "SELECT d /* $2 % */ FROM m WHERE login = ?1"),
        # SQLite's own placeholders; "?" is an operator in PostgreSQL (jsonb), left alone
        ("SELECT d FROM m WHERE login = ? AND '?' <> ?1",
         "SELECT d FROM m WHERE login = ? AND '?' <> ?1",
         "SELECT d FROM m WHERE login = ?1 AND '?' <> ?1"),
        ("INSERT INTO m VALUES (?, ?) ON CONFLICT (login) DO UPDATE SET d = ?2",
         "INSERT INTO m VALUES (?, ?) ON CONFLICT (login) DO UPDATE SET d = ?2",
         "INSERT INTO m VALUES (?1, ?2) ON CONFLICT (login) DO UPDATE SET d = ?2"),
    ],
)
def test_placeholders_are_translated_outside_quotes_and_comments(
    sql: str, postgresql: str, sqlite: str
) -> None:
    assert Statement.translate(sql, "postgresql").text == postgresql
    assert Statement.translate(sql, "sqlite").text == sqlite


def test_a_bare_question_mark_is_numbered_as_sqlite_numbers_it() -> None:
    """One more than the largest number assigned before it (SQLite's "Parameters" rule)."""
    _, found = translate("SELECT ?2, ?, $1, ?", "sqlite")
    assert [(p.written, p.number) for p in found] == [("?2", 2), ("?", 3), ("$1", 1), ("?", 4)]
    assert translate("SELECT ?", "postgresql") == ("SELECT ?", [])
    _, [huge] = translate("SELECT $" + "9" * 5000, "postgresql")  # no int() of 5000 digits
    assert huge.number > 32766


@given(st.text(alphabet="ab %$'12 \n-?", max_size=40))
def test_pyformat_translation_leaves_no_lone_percent(sql: str) -> None:
    """psycopg2 formats the whole string: every % that is not a parameter must be doubled."""
    text = Statement.translate(sql, "postgresql").text
    assert "%" not in re.sub(r"%%|%\(p[0-9]+\)s", "", text)


@given(st.text(max_size=60), st.sampled_from(["postgresql", "sqlite"]),
       st.integers(min_value=0, max_value=2))
def test_any_statement_gets_an_answer_never_an_exception(sql: str, engine: str,
                                                         arity: int) -> None:
    names = ["identifier", "destination"][:arity]
    problem = parameter_problem(sql, engine, names)
    assert problem is None or isinstance(problem, str)
    if problem is None:  # then the translation binds exactly the parameters it names
        assert Statement.translate(sql, engine).arity == arity


def test_bind_follows_the_engine() -> None:
    upsert = Statement.translate("INSERT INTO m VALUES ($2, $1)", "sqlite")
    assert upsert.arity == 2 and upsert.bind(["bob", "node2"]) == ("bob", "node2")
    lookup = Statement.translate("SELECT d FROM m WHERE a = $1 OR b = $1", "postgresql")
    assert lookup.bind(["bob"]) == {"p1": "bob"}


@pytest.mark.parametrize(
    ("field", "sql", "message"),
    [
        ("query", "SELECT d FROM m WHERE login = %s", r"mapping\.sql\.query: must use \$1"),
        ("query", "SELECT d FROM m WHERE login = $1 AND x = $2",
         r"mapping\.sql\.query: unknown parameter \$2"),
        ("upsert_query", "INSERT INTO m VALUES ($1, 'node1')",
         r"mapping\.sql\.upsert_query: must use \$2"),
        ("delete_query", "DELETE FROM m WHERE login = $3",
         r"mapping\.sql\.delete_query: unknown parameter \$3"),
        # PostgreSQL has no "?" placeholder: the error says so
        ("query", "SELECT d FROM m WHERE login = ?",
         r"mapping\.sql\.query: must use \$1 .*PostgreSQL has no \? placeholder"),
        ("list_query", "SELECT l, d FROM m WHERE l = $1",
         r"mapping\.sql\.list_query: must not use parameters \(\$1 found\)"),
    ],
)
def test_unusable_postgresql_statements_are_configuration_errors(
    tmp_path: Path, field: str, sql: str, message: str
) -> None:
    statements = {"upsert_query": "INSERT INTO m VALUES ($1, $2)",
                  "delete_query": "DELETE FROM m WHERE login = $1", field: sql}
    document = sql_document(url="postgresql://db/x", **statements)
    with pytest.raises(ConfigError) as raised:
        parse_config(document, tmp_path, {}, check_files=False)
    [problem] = raised.value.problems
    assert re.match(message, str(problem)), problem


@pytest.mark.parametrize(
    ("field", "sql", "message"),
    [
        ("query", "SELECT d FROM m WHERE login = :login",
         r"mapping\.sql\.query: must use \$1 .*SQLite's \?1, \?2 and \?"),
        ("query", "SELECT d FROM m WHERE login = ? OR alias = ?",
         r"mapping\.sql\.query: unknown parameter \? \(numbered \?2\)"),
        ("upsert_query", "INSERT INTO m VALUES (?, 'node1')",
         r"mapping\.sql\.upsert_query: must use \$2"),
        ("delete_query", "DELETE FROM m WHERE login = ?3",
         r"mapping\.sql\.delete_query: unknown parameter \?3"),
        ("list_query", "SELECT l, d FROM m WHERE l > ?",
         r"mapping\.sql\.list_query: must not use parameters \(\? found\)"),
    ],
)
def test_unusable_sqlite_statements_are_configuration_errors(
    tmp_path: Path, field: str, sql: str, message: str
) -> None:
    statements = {"upsert_query": "INSERT INTO m VALUES (?1, ?2)",
                  "delete_query": "DELETE FROM m WHERE login = ?", field: sql}
    document = sql_document(**statements)
    with pytest.raises(ConfigError) as raised:
        parse_config(document, tmp_path, {}, check_files=False)
    [problem] = raised.value.problems
    assert re.match(message, str(problem)), problem


@pytest.mark.parametrize("query", ["SELECT d FROM m WHERE login = ?",
                                   "SELECT d FROM m WHERE login = ?1",
                                   "SELECT d FROM m WHERE login = $1"])
def test_sqlite_statements_take_sqlite_placeholders(tmp_path: Path, query: str) -> None:
    document = sql_document(query=query, upsert_query="INSERT INTO m VALUES (?, ?)",
                            delete_query="DELETE FROM m WHERE login = ?1")
    sql = parse_config(document, tmp_path, {}, check_files=False).mapping.settings
    assert isinstance(sql, SQLMappingConfig) and sql.query == query
    statements = Statements.configured(sql)
    assert statements.lookup.text == "SELECT d FROM m WHERE login = ?1"
    assert statements.upsert == Statement("INSERT INTO m VALUES (?1, ?2)", "sqlite", 2)


def test_statements_without_both_writes_are_read_only() -> None:
    only_upsert = SQLMappingConfig(url="sqlite:///m.db", query="SELECT d FROM m WHERE l = $1",
                                   upsert_query="INSERT INTO m VALUES ($1, $2)")
    statements = Statements.configured(only_upsert)
    assert statements.upsert is None and statements.delete is None


class FakeCursor:
    def __init__(self, row: tuple[object, ...] | None) -> None:
        self.row = row

    def fetchone(self) -> tuple[object, ...] | None:
        return self.row


@pytest.mark.parametrize(
    ("row", "expected"),
    [(("node2",), "node2"), (None, None), ((None,), None), (("node2   ",), "node2"),
     ((b"node2",), "node2"), ((7, "x"), "7"), (("",), None)],
)
def test_lookup_reads_the_first_column_of_the_first_row(
    row: tuple[object, ...] | None, expected: str | None
) -> None:
    assert first_value(FakeCursor(row)) == expected


@pytest.mark.parametrize(
    ("url", "database"),
    [("sqlite:///var/lib/m.db", "file:/var/lib/m.db?mode=rw"),
     ("sqlite:////var/lib/m.db", "file:/var/lib/m.db?mode=rw"),
     ("sqlite:///srv/my maps#1.db", "file:/srv/my%20maps%231.db?mode=rw"),
     ("sqlite:///:memory:", ":memory:")],
)
def test_sqlite_urls_open_existing_files_only(url: str, database: str) -> None:
    settings = SQLMappingConfig(url=url, query="SELECT d FROM m WHERE l = $1")
    assert sqlite_database(settings.sqlite_path or "") == database


# --- PostgreSQL DSN ------------------------------------------------------------------------


def test_dsn_gets_a_connect_timeout_and_keeps_the_url() -> None:
    dsn = postgresql_dsn("postgresql://u:p%40ss@db.example:5433/routes?sslmode=require", 5.0)
    parts = urlsplit(dsn)
    assert parts.netloc == "u:p%40ss@db.example:5433" and parts.path == "/routes"
    assert parse_qs(parts.query) == {
        "sslmode": ["require"], "connect_timeout": ["5"], "application_name": ["stalroute"]}


@pytest.mark.parametrize(("lookup_timeout", "expected"), [(0.2, "2"), (3.5, "4"), (60, "10")])
def test_connect_timeout_follows_the_lookup_timeout_within_bounds(
    lookup_timeout: float, expected: str
) -> None:
    query = parse_qs(urlsplit(postgresql_dsn("postgresql://db/x", lookup_timeout)).query)
    assert query["connect_timeout"] == [expected]


def test_dsn_keeps_an_explicit_connect_timeout() -> None:
    dsn = postgresql_dsn("postgresql://db/x?connect_timeout=7&application_name=me", 5.0)
    assert parse_qs(urlsplit(dsn).query) == {"connect_timeout": ["7"],
                                             "application_name": ["me"]}


# --- redaction -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://app:S3cr%40t@db:5432/routes", "postgresql://app:***@db:5432/routes"),
        ("postgresql://db/routes?password=S3cr3t&sslmode=require",
         "postgresql://db/routes?password=***&sslmode=require"),
        ("redis://:S3cr3t@127.0.0.1:6379/2", "redis://:***@127.0.0.1:6379/2"),
        ("rediss://user:S3cr3t@[::1]:6380", "rediss://user:***@[::1]:6380"),
        ("redis://127.0.0.1:6379", "redis://127.0.0.1:6379"),
        ("sqlite:///var/lib/stalroute/m.db", "sqlite:///var/lib/stalroute/m.db"),
    ],
)
def test_urls_are_redacted(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert "S3cr" not in redact_url(url)


def test_secrets_are_scrubbed_in_every_spelling() -> None:
    secrets = url_secrets("postgresql://app:S3cr%40t@db/x?password=Other1")
    assert set(secrets) == {"S3cr%40t", "S3cr@t", "Other1"}
    message = 'invalid dsn: "password=S3cr@t" near S3cr%40t\n   and Other1'
    assert scrub(message, secrets) == 'invalid dsn: "password=***" near *** and ***'


def test_store_error_names_the_store_and_hides_secrets() -> None:
    failure = Failure(RuntimeError("FATAL: no login for app/S3cr3t\n  detail"))
    converted = store_error(failure, "postgresql://app:***@db/x", "lookup", ["S3cr3t"])
    assert converted.check(StoreError)
    assert converted.getErrorMessage() == (
        "postgresql://app:***@db/x: lookup failed: FATAL: no login for app/*** detail")


@pytest.mark.parametrize("exc", [error.TimeoutError(), defer.CancelledError(),
                                 defer.TimeoutError()])
def test_timeouts_become_store_errors(exc: Exception) -> None:
    converted = store_error(Failure(exc), "redis://h", "lookup", [])
    assert converted.getErrorMessage() == "redis://h: lookup failed: no answer in time"


def test_store_errors_pass_through() -> None:
    read_only = Failure(ReadOnlyStore("read-only"))
    assert store_error(read_only, "x", "upsert", []) is read_only


# --- Redis URLs ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "target"),
    [
        ("redis://127.0.0.1", RedisTarget("127.0.0.1", 6379, None, None, None, False)),
        ("redis://:p%40ss@cache:6380/4",
         RedisTarget("cache", 6380, 4, None, "p@ss", False)),
        ("rediss://app:pw@[::1]:6390?db=2",
         RedisTarget("::1", 6390, 2, "app", "pw", True)),
        ("rediss://cache/1?ssl_cert_reqs=none",
         RedisTarget("cache", 6379, 1, None, None, True, verify=False)),
        ("rediss://cache?ssl_ca_certs=/etc/ca.pem",
         RedisTarget("cache", 6379, None, None, None, True, ca_file=Path("/etc/ca.pem"))),
    ],
)
def test_redis_urls(url: str, target: RedisTarget) -> None:
    assert parse_redis_url(url) == target


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis://:S3cr3t@cache/zero", "the database must be a number"),
        ("redis://:S3cr3t@cache?timeout=3", "unknown parameter 'timeout'"),
        ("redis://:S3cr3t@cache:port", "the port is not a number"),
        ("rediss://:S3cr3t@cache?ssl_cert_reqs=maybe", "ssl_cert_reqs must be"),
    ],
)
def test_bad_redis_urls_are_startup_errors_without_the_password(url: str, message: str) -> None:
    with pytest.raises(InvalidStoreSetting, match=message) as raised:
        parse_redis_url(url)
    assert str(raised.value).startswith("mapping.redis.url: ")
    assert "S3cr3t" not in str(raised.value)


def test_unreadable_redis_ca_file_is_a_startup_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty.pem"
    empty.write_text("not a certificate\n")
    for path in (tmp_path / "missing.pem", empty):
        with pytest.raises(InvalidStoreSetting, match="ssl_ca_certs"):
            tls_options(parse_redis_url(f"rediss://cache?ssl_ca_certs={path}"))


# --- listing: shared ------------------------------------------------------------------------


def result_of(d: Deferred[Any]) -> Any:
    """The synchronous result of a fired Deferred, or its failure's exception."""
    outcomes: list[Any] = []
    d.addBoth(outcomes.append)
    assert outcomes, "the Deferred has not fired"
    outcome = outcomes[0]
    return outcome.value if isinstance(outcome, Failure) else outcome


def test_not_listable_is_a_store_error_that_passes_through() -> None:
    refused = Failure(NotListable("sqlite:///m.db: cannot list"))
    assert isinstance(refused.value, StoreError)
    assert store_error(refused, "x", "list", []) is refused


def test_the_file_store_always_lists(tmp_path: Path) -> None:
    path = tmp_path / "mappings.tsv"
    path.write_text("zoe node2\nbob\tnode1\n")
    store = FileMappingStore(path, ["node1", "node2"], "none")
    assert store.listable
    assert result_of(store.entries()) == [("bob", "node1"), ("zoe", "node2")]


# --- listing: SQL ----------------------------------------------------------------------------

SQLITE_LOOKUP = "SELECT destination FROM routes WHERE login = $1"


def sql_document(**sql: Any) -> dict[str, Any]:
    """A minimal configuration with a ``[mapping.sql]`` table (``sql`` overrides)."""
    return {
        "routing": {"default_destination": "node1"},
        "mapping": {"source": "sql",
                    "sql": {"url": "sqlite:///var/lib/m.db", "query": SQLITE_LOOKUP, **sql}},
        "destination": {"node1": {"host": "node1.example",
                                  "protocol": {"imap": {"port": 993, "tls": "implicit"}}}},
        "listener": {"imap": {"protocol": "imap", "bind": ["127.0.0.1:1993"], "tls": "plain"}},
    }


def test_list_query_is_optional(tmp_path: Path) -> None:
    sql = parse_config(sql_document(), tmp_path, {}, check_files=False).mapping.settings
    assert isinstance(sql, SQLMappingConfig) and sql.list_query is None
    listing = "SELECT login, destination FROM routes -- every row, '$1' is text"
    config = parse_config(sql_document(list_query=listing), tmp_path, {}, check_files=False)
    sql = config.mapping.settings
    assert isinstance(sql, SQLMappingConfig) and sql.list_query == listing


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("SELECT login, destination FROM routes WHERE login > $1",
         "mapping.sql.list_query: must not use parameters ($1 found)"),
        ("SELECT login, destination\nFROM routes /* $1 */ WHERE tenant = $2",
         "mapping.sql.list_query: must not use parameters ($2 found)"),
        ("  ", "mapping.sql.list_query: must not be empty"),
        (42, "mapping.sql.list_query: must be a string, not an integer"),
    ],
)
def test_unusable_list_queries_are_configuration_errors(
    tmp_path: Path, value: Any, message: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_config(sql_document(list_query=value), tmp_path, {}, check_files=False)
    [problem] = raised.value.problems
    assert str(problem).startswith(message)


def test_list_query_is_translated_like_the_others() -> None:
    settings = SQLMappingConfig(url="postgresql://db/x", query=SQLITE_LOOKUP,
                                list_query="SELECT l, d FROM m WHERE note LIKE 'x%'")
    statements = Statements.configured(settings)
    assert statements.upsert is None  # listing does not need writes
    assert statements.list == Statement("SELECT l, d FROM m WHERE note LIKE 'x%%'",
                                        "postgresql", 0)
    assert statements.list.bind([]) == {}  # psycopg2 formats with {}: %% becomes %
    assert Statements.configured(SQLMappingConfig(url="sqlite:///m.db",
                                                  query=SQLITE_LOOKUP)).list is None


@pytest.fixture
def routes() -> Iterator[sqlite3.Connection]:
    connection = sqlite3.connect(":memory:")
    connection.execute("CREATE TABLE routes (login, destination)")
    yield connection
    connection.close()


def test_listed_rows_are_cleaned_deduplicated_and_sorted(
    routes: sqlite3.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("stalroute.mapping.sql.FETCH_ROWS", 2)  # several fetchmany rounds
    routes.executemany("INSERT INTO routes VALUES (?, ?)", [
        ("zoe", "node2"), ("bob", "node1   "), (b"j\xc3\xbcrgen", b"node2"), ("bob", "node2"),
        ("nobody", None), (None, "node1"), ("blank", "  "), ("  ", "node1"), (7, "node1"),
    ])
    cursor = routes.execute("SELECT login, destination, 'extra' FROM routes ORDER BY rowid")
    assert all_pairs(cursor) == [("7", "node1"), ("bob", "node1"), ("jürgen", "node2"),
                                 ("zoe", "node2")]


def test_an_empty_table_lists_nothing(routes: sqlite3.Connection) -> None:
    assert all_pairs(routes.execute("SELECT login, destination FROM routes")) == []


@pytest.mark.parametrize(
    ("sql", "message"),
    [("SELECT login FROM routes", "must return two columns, identifier and destination, not 1"),
     ("DELETE FROM routes", "returned no rows (it must be a SELECT)")],
)
def test_list_results_of_the_wrong_shape_are_errors(
    routes: sqlite3.Connection, sql: str, message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        all_pairs(routes.execute(sql))


@pytest.fixture
def sqlite_file(tmp_path: Path) -> Path:
    path = tmp_path / "routes.db"
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE routes (login text PRIMARY KEY, destination text)")
        connection.execute("INSERT INTO routes VALUES ('bob', 'node2')")
    connection.close()
    return path


def sqlite_store(path: Path, **sql: Any) -> SQLMappingStore:
    settings = SQLMappingConfig(url=f"sqlite://{path}", query=SQLITE_LOOKUP, **sql)
    return build_sql_store(settings, MappingConfig(source="sql", settings=settings), [])


def test_sql_store_without_list_query_is_not_listable(sqlite_file: Path) -> None:
    store = sqlite_store(sqlite_file)
    try:
        assert not store.listable
        refused = result_of(store.entries())  # fails at once: no thread, no query
        assert isinstance(refused, NotListable)
        assert str(refused) == (f"sqlite://{sqlite_file}: cannot list the mappings "
                                "(set [mapping.sql] list_query for the export)")
    finally:
        store.close()


def test_sqlite_listing_is_interrupted_after_its_time_limit(sqlite_file: Path) -> None:
    """The progress handler stops a runaway list statement and is removed afterwards (the
    worker thread's own steps, run here synchronously)."""
    endless = ("WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n) "
               "SELECT x, x FROM n WHERE x < 0")
    store = sqlite_store(sqlite_file, list_query=endless)
    try:
        assert store.listable
        statements = store._statements
        assert statements.list is not None
        with pytest.raises(sqlite3.OperationalError, match="interrupted"):
            store._in_thread(one_statement(statements.list, [], all_pairs), 0.2)
        assert store._in_thread(one_statement(statements.lookup, ["bob"], first_value),
                                None) == "node2"
    finally:
        store.close()


# --- listing: Redis --------------------------------------------------------------------------


class FakeRedis:
    """The part of a txredisapi pool ``entries()`` uses, over a dict: ``SCAN`` walks the
    sorted keys ``count`` at a time (the pattern is taken as a literal prefix + ``*``),
    ``MGET`` answers nil for hashes (stored as dicts). With a clock, replies come 0.5 s late."""

    def __init__(self, data: dict[Any, Any], clock: Clock | None = None,
                 endless: bool = False) -> None:
        self.data = data
        self.clock = clock
        self.endless = endless
        self.scans: list[tuple[str, str, int]] = []
        self.mgets: list[list[Any]] = []
        self.msets: list[dict[str, str]] = []
        self._factory = SimpleNamespace(size=1, stopped=False)

    def _reply(self, value: Any) -> Deferred[Any]:
        if self.clock is None:
            return succeed(value)
        d: Deferred[Any] = Deferred()
        self.clock.callLater(0.5, d.callback, value)
        return d

    def scan(self, cursor: str, pattern: str, count: int) -> Deferred[Any]:
        self.scans.append((cursor, pattern, count))
        prefix = re.sub(r"\\(.)", r"\1", pattern[:-1]).encode()
        keys = sorted(self.data, key=lambda k: k if isinstance(k, bytes) else k.encode())
        start = int(cursor)
        chunk = [k for k in keys[start:start + count]
                 if (k if isinstance(k, bytes) else k.encode()).startswith(prefix)]
        following = start + count
        done = following >= len(keys) and not self.endless
        return self._reply(["0" if done else str(following), chunk])

    def mget(self, keys: list[Any]) -> Deferred[Any]:
        self.mgets.append(keys)
        values = [self.data.get(key) for key in keys]
        return self._reply([None if isinstance(v, dict) else v for v in values])

    def mset(self, mapping: dict[str, str]) -> Deferred[Any]:
        self.msets.append(dict(mapping))
        self.data.update(mapping)
        return self._reply("OK")

    def disconnect(self) -> Deferred[None]:
        return succeed(None)


def fake_redis_store(monkeypatch: pytest.MonkeyPatch, fake: FakeRedis,
                     prefix: str = "route:") -> RedisMappingStore:
    monkeypatch.setattr(RedisMappingStore, "_connect", lambda self: fake)
    return RedisMappingStore(RedisMappingConfig(url="redis://:S3cr3t@cache/2",
                                                key_prefix=prefix), 5.0)


def test_redis_lists_by_scan_steps_and_mget(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redis_store, "SCAN_COUNT", 3)
    fake = FakeRedis({
        "route:zoe": "node2", "route:bob": "node1 ", "route:jürgen": "node2",
        "route:h": {"field": "node1"},      # not a string: MGET reads nil
        b"route:\xff": "node1",             # not UTF-8 (txredisapi leaves it as bytes)
        "route:": "node1",                  # the bare prefix: no identifier
        "route:empty": "", "other:eve": "node2", "routes": "node1",
    })
    store = fake_redis_store(monkeypatch, fake)
    assert store.listable
    assert result_of(store.entries()) == [("bob", "node1"), ("jürgen", "node2"),
                                          ("zoe", "node2")]
    assert [cursor for cursor, _, _ in fake.scans] == ["0", "3", "6"]
    assert {(pattern, count) for _, pattern, count in fake.scans} == {("route:*", 3)}
    assert all(0 < len(keys) <= 3 for keys in fake.mgets)
    assert b"route:\xff" not in [key for keys in fake.mgets for key in keys]


def test_redis_key_prefix_is_matched_literally(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeRedis({"r*[1]?\\:bob": "node2"})
    store = fake_redis_store(monkeypatch, fake, prefix="r*[1]?\\:")
    assert result_of(store.entries()) == [("bob", "node2")]
    assert fake.scans[0][1] == "r\\*\\[1\\]\\?\\\\:*"


def test_an_empty_redis_prefix_lists_every_string_key(monkeypatch: pytest.MonkeyPatch) -> None:
    store = fake_redis_store(monkeypatch, FakeRedis({"bob": "node1", "h": {}}), prefix="")
    assert result_of(store.entries()) == [("bob", "node1")]


def test_redis_listing_is_bounded_as_a_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """A keyspace that never ends (every step answers in time): StoreError at the bound."""
    clock = Clock()
    monkeypatch.setattr(redis_store, "reactor", clock)
    fake = FakeRedis({"route:bob": "node1"}, clock, endless=True)
    store = fake_redis_store(monkeypatch, fake)
    store.list_timeout = 10.0
    outcome = store.entries()
    failures: list[Failure] = []
    outcome.addErrback(failures.append)
    while not failures and clock.seconds() < 60:
        clock.advance(0.5)
    assert clock.seconds() == 10.0
    assert failures[0].check(StoreError)
    assert failures[0].getErrorMessage() == "redis://:***@cache/2: list failed: no answer in time"
    steps = len(fake.scans)
    clock.advance(5)
    assert len(fake.scans) == steps  # the walk stopped with it


def test_redis_listing_failures_are_store_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeRedis({})
    fake.scan = lambda *args: defer.fail(RuntimeError("ERR S3cr3t unknown command"))
    store = fake_redis_store(monkeypatch, fake)
    failure = result_of(store.entries())
    assert isinstance(failure, StoreError)
    assert str(failure) == "redis://:***@cache/2: list failed: ERR *** unknown command"
    fake._factory.size = 0  # the pool is down (and past its startup wait)
    store._built_at = -100.0
    assert str(result_of(store.entries())) == "redis://:***@cache/2: list failed: not connected"


def test_every_configured_store_can_be_asked_to_list(tmp_path: Path,
                                                     sqlite_file: Path) -> None:
    """No hasattr/isinstance checks: entries() exists everywhere, NotListable when it cannot."""
    settings = SQLMappingConfig(url=f"sqlite://{sqlite_file}", query=SQLITE_LOOKUP)
    mapping = MappingConfig(source="sql", settings=settings)
    store = build_store(mapping, ["node1", "node2"])
    try:
        assert callable(store.entries) and store.listable is False
        assert isinstance(result_of(store.entries()), NotListable)
    finally:
        store.close()


# --- the store registry ------------------------------------------------------------------------


def test_every_registered_store_kind_names_a_builder_and_its_settings() -> None:
    assert set(STORE_KINDS) == {"file", "sql", "redis"}
    for name, kind in STORE_KINDS.items():
        module, _, function = kind.builder.partition(":")
        assert module == f"stalroute.mapping.{name}"
        assert callable(getattr(importlib.import_module(module), function))
        assert issubclass(kind.settings, StoreSettings)
    assert set(SOURCE_ALIASES.values()) <= set(STORE_KINDS)


def test_the_source_key_takes_the_registered_kinds(tmp_path: Path) -> None:
    document = sql_document()
    document["mapping"]["source"] = "memcached"
    with pytest.raises(ConfigError) as raised:
        parse_config(document, tmp_path, {}, check_files=False)
    [problem] = raised.value.problems
    assert str(problem) == ('mapping.source: "memcached" is not one of "file", "sql", "redis", '
                            '"sqlite"')


def test_a_missing_store_table_names_its_required_keys(tmp_path: Path) -> None:
    document = sql_document()
    del document["mapping"]["sql"]
    with pytest.raises(ConfigError) as raised:
        parse_config(document, tmp_path, {}, check_files=False)
    assert [str(p) for p in raised.value.problems] == [
        ('mapping.sql: required when mapping.source = "sql" (a [mapping.sql] table with url '
         "and query)")]


def test_tables_of_other_stores_are_checked_but_not_kept(tmp_path: Path) -> None:
    document = sql_document()
    document["mapping"]["redis"] = {"url": "http://cache"}
    with pytest.raises(ConfigError) as raised:
        parse_config(document, tmp_path, {}, check_files=False)
    assert [p.key for p in raised.value.problems] == ["mapping.redis.url"]
    document["mapping"]["redis"] = {"url": "redis://cache"}
    mapping = parse_config(document, tmp_path, {}, check_files=False).mapping
    assert mapping.source == "sql" and isinstance(mapping.settings, SQLMappingConfig)


@dataclass(frozen=True)
class MemorySettings(StoreSettings):
    """The settings of a store kind registered by a test."""

    table: tuple[tuple[str, str], ...] = ()


class DictStore(MappingStore):
    """A store that implements only the required operations (the batch ones by default)."""

    writable = True
    listable = True

    def __init__(self, table: dict[str, str] | None = None) -> None:
        self.table = dict(table or {})
        self.upserts: list[tuple[str, str]] = []

    def lookup(self, identifier: str) -> Deferred[str | None]:
        return succeed(self.table.get(identifier))

    def entries(self) -> Deferred[list[tuple[str, str]]]:
        return succeed(sorted(self.table.items()))

    def upsert(self, identifier: str, destination: str) -> Deferred[None]:
        self.upserts.append((identifier, destination))
        self.table[identifier] = destination
        return succeed(None)

    def delete(self, identifier: str) -> Deferred[bool]:
        return succeed(self.table.pop(identifier, None) is not None)

    def reload(self) -> Deferred[int | None]:
        return succeed(None)

    def close(self) -> Deferred[None]:
        return succeed(None)


def build_memory_store(settings: MemorySettings, mapping: MappingConfig,
                       destinations: Collection[str]) -> DictStore:
    return DictStore(dict(settings.table))


def test_build_store_builds_whatever_kind_the_registry_names(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(STORE_KINDS, "memory",
                        StoreKind(MemorySettings, f"{__name__}:build_memory_store"))
    mapping = MappingConfig(source="memory", settings=MemorySettings((("bob", "node2"),)))
    store = build_store(mapping, ["node2"])
    assert isinstance(store, DictStore) and store.table == {"bob": "node2"}
    with pytest.raises(UnsupportedStore, match="'nosuch' store is not available"):
        build_store(MappingConfig(source="nosuch", settings=MemorySettings()), [])
    with pytest.raises(UnsupportedStore):  # settings of another kind
        build_store(MappingConfig(source="sql", settings=MemorySettings()), [])


def test_reading_the_configuration_loads_no_store_driver(tmp_path: Path) -> None:
    """The registry names builders lazily: neither the validator nor the factory module
    imports psycopg2 or txredisapi, and a SQLite store loads no PostgreSQL driver."""
    (tmp_path / "routes.db").touch()
    config = tmp_path / "stalroute.toml"
    config.write_text(
        '[routing]\ndefault_destination = "node1"\n'
        '[mapping]\nsource = "sqlite"\n'
        f'[mapping.sql]\nurl = "sqlite://{tmp_path}/routes.db"\n'
        'query = "SELECT d FROM m WHERE l = $1"\n'
        '[mapping.redis]\nurl = "redis://cache"\n'
        '[destination.node1]\nhost = "127.0.0.1"\ntls_server_name = "n"\n'
        '[destination.node1.protocol.imap]\nport = 993\ntls = "implicit"\n')
    script = (
        "import sys\n"
        "from stalroute.config import load_config\n"
        "from stalroute.mapping.factory import build_store\n"
        f"config = load_config({str(config)!r})\n"
        "assert 'txredisapi' not in sys.modules and 'psycopg2' not in sys.modules\n"
        "build_store(config.mapping, ['node1']).close()\n"
        "assert 'txredisapi' not in sys.modules and 'psycopg2' not in sys.modules\n"
        "assert 'stalroute.mapping.sql' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=Path(__file__).parents[2])


# --- batch operations ----------------------------------------------------------------------------


def test_the_default_batch_operations_loop_over_the_single_ones() -> None:
    store = DictStore({"bob": "node1"})
    assert result_of(store.lookup_many(["bob", "eve", "bob"])) == ["node1", None, "node1"]
    assert result_of(store.upsert_many([("eve", "node2"), ("bob", "node2")])) is None
    assert store.upserts == [("eve", "node2"), ("bob", "node2")]
    assert result_of(store.lookup_many([])) == []
    assert result_of(store.upsert_many([])) is None


def test_the_default_batch_operations_bound_their_concurrency(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    pending: list[Deferred[str | None]] = []

    def slow_lookup(identifier: str) -> Deferred[str | None]:
        d: Deferred[str | None] = Deferred()
        pending.append(d)
        return d

    store = DictStore()
    monkeypatch.setattr(store, "lookup", slow_lookup)
    answers = store.lookup_many([f"user{n}" for n in range(BATCH_CONCURRENCY + 5)])
    assert len(pending) == BATCH_CONCURRENCY
    while pending:
        pending.pop(0).callback("node1")
    assert result_of(answers) == ["node1"] * (BATCH_CONCURRENCY + 5)


def test_the_default_batch_operations_fail_with_the_store_error() -> None:
    store = DictStore()
    store.upsert = lambda identifier, destination: defer.fail(  # type: ignore[method-assign]
        StoreError(f"memory: upsert of {identifier} failed"))
    failure = result_of(store.upsert_many([("bob", "node1"), ("eve", "node2")]))
    assert isinstance(failure, StoreError) and str(failure) == "memory: upsert of bob failed"


@pytest.fixture
def threadless_sql(monkeypatch: pytest.MonkeyPatch) -> None:
    """The SQL store's pool-thread calls run at once, in the test's thread."""
    monkeypatch.setattr("stalroute.mapping.sql.deferToThreadPool",
                        lambda reactor, pool, f, *args: maybeDeferred(f, *args))


UPSERT = ("INSERT INTO routes VALUES ($1, $2) "
          "ON CONFLICT (login) DO UPDATE SET destination = excluded.destination")


def test_sql_batches_look_up_in_chunks_and_write_in_one_transaction(
    sqlite_file: Path, threadless_sql: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("stalroute.mapping.sql.LOOKUP_CHUNK", 2)
    store = sqlite_store(sqlite_file, upsert_query=UPSERT,
                         delete_query="DELETE FROM routes WHERE login = $1")
    runs: list[Any] = []
    in_thread = store._in_thread
    monkeypatch.setattr(store, "_in_thread", lambda work, limit: runs.append(work)
                        or in_thread(work, limit))
    try:
        assert result_of(store.lookup_many(["a", "bob", "c", "d", "bob"])) == [
            None, "node2", None, None, "node2"]
        assert len(runs) == 3  # chunks of 2
        runs.clear()
        pairs = [(f"user{n}", "node1") for n in range(50)] + [("bob", "node1")]
        assert result_of(store.upsert_many(pairs)) is None
        assert len(runs) == 1  # one executemany, one commit
        assert result_of(store.lookup_many(["bob", "user49"])) == ["node1", "node1"]
    finally:
        store.close()


def test_a_sql_batch_that_fails_writes_nothing(sqlite_file: Path, threadless_sql: None) -> None:
    store = sqlite_store(sqlite_file, upsert_query="INSERT INTO routes VALUES ($1, $2)",
                         delete_query="DELETE FROM routes WHERE login = $1")
    try:  # the plain INSERT fails on the row "bob" already has
        failure = result_of(store.upsert_many([("a", "node1"), ("bob", "node1")]))
        assert isinstance(failure, StoreError) and "upsert failed" in str(failure)
        assert result_of(store.lookup_many(["a", "bob"])) == [None, "node2"]
    finally:
        store.close()


def test_a_read_only_sql_store_refuses_batches_too(sqlite_file: Path) -> None:
    store = sqlite_store(sqlite_file)
    try:
        assert isinstance(result_of(store.upsert_many([("a", "node1")])), ReadOnlyStore)
    finally:
        store.close()


def test_redis_batches_use_mget_and_mset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redis_store, "BATCH_KEYS", 2)
    fake = FakeRedis({"route:bob": "node1", "route:h": {"field": "x"}})
    store = fake_redis_store(monkeypatch, fake)
    assert result_of(store.lookup_many(["bob", "eve", "h"])) == ["node1", None, None]
    assert fake.mgets == [["route:bob", "route:eve"], ["route:h"]]
    assert result_of(store.upsert_many([("eve", "node2"), ("bob", "node2"), ("zoe", "n")])) \
        is None
    assert fake.msets == [{"route:eve": "node2", "route:bob": "node2"}, {"route:zoe": "n"}]
    assert result_of(store.upsert_many([])) is None and len(fake.msets) == 2


# --- the bulk import -------------------------------------------------------------------------


class RecordingStore(DictStore):
    """Counts the batch calls the importer makes (and fails any single upsert)."""

    def __init__(self) -> None:
        super().__init__({"user7": "node1"})
        self.lookup_batches: list[int] = []
        self.upsert_batches: list[int] = []

    def lookup_many(self, identifiers: Sequence[str]) -> Deferred[list[str | None]]:
        self.lookup_batches.append(len(identifiers))
        return succeed([self.table.get(i) for i in identifiers])

    def upsert_many(self, pairs: Sequence[tuple[str, str]]) -> Deferred[None]:
        self.upsert_batches.append(len(pairs))
        self.table.update(pairs)
        return succeed(None)

    def upsert(self, identifier: str, destination: str) -> Deferred[None]:
        raise AssertionError("the importer writes in batches only")


def test_a_large_import_reads_and_writes_in_batches() -> None:
    store = RecordingStore()
    invalidated: list[str] = []
    router = SimpleNamespace(store=store)
    runtime = SimpleNamespace(router=router, config=SimpleNamespace(
        destinations={"node1": None, "node2": None}))

    def imported(keys: list[str]) -> Deferred[Done]:
        invalidated.extend(keys)
        return succeed(Done(len(keys)))

    control = SimpleNamespace(runtime=runtime, normalize=str.lower, imported=imported)
    rows = 100_000
    body = io.BytesIO(b"".join(b"User%d\tnode1\n" % n for n in range(rows)))
    clock = Clock()
    outcome = Deferred.fromCoroutine(Importer(control, clock).run(body, "tsv", dry_run=False))
    while not outcome.called:
        clock.advance(0)
    summary = result_of(outcome)
    batches = -(-rows // IMPORT_BATCH)
    assert summary["imported"] == rows - 1 and summary["unchanged"] == 1
    assert store.lookup_batches == [IMPORT_BATCH] * batches
    assert len(store.upsert_batches) == batches and sum(store.upsert_batches) == rows - 1
    assert len(invalidated) == rows - 1 and len(store.table) == rows
