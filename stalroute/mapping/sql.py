"""SQL mapping stores: PostgreSQL through psycopg2, SQLite through the stdlib ``sqlite3``.

Both engines run behind one :class:`SQLMappingStore` on a ``twisted.enterprise.adbapi``
pool, so every statement runs in a pool thread and the reactor never blocks:

* PostgreSQL: ``pool_size`` threads, one connection each, made on first use; the DSN gets a
  ``connect_timeout`` so a dead server cannot hold lookups for the TCP timeout. A statement
  that fails because the server dropped the connection (restart, failover) is retried once
  on a fresh connection, so a restart costs no failed lookup. Statements run in the pool's
  threads on ``pool.connect()`` directly rather than through ``runInteraction``, whose
  rollback of a dead connection logs a traceback for every such statement.
* SQLite: one thread and one connection (SQLite serialises writers anyway). The connection
  is created in that thread; ``check_same_thread`` is off only so that ``close()`` may close
  it from the reactor thread once the worker has stopped. The file must exist
  (``mode=rw``): a typo in the path is an error, not a fresh empty database.

Statements are written with ``$1`` (identifier) and ``$2`` (destination), SQLite's also with
``?NNN`` or ``?``, and translated to the driver's style by :mod:`stalroute.sqlparams` (the
configuration validator has already checked their parameters with it).

Listing every mapping (:meth:`SQLMappingStore.entries`, the admin export) needs the optional
``list_query``: a statement without parameters whose rows are ``identifier, destination``.
Without it the store still has ``entries()``, which fails with :class:`NotListable`. The
list statement runs in one pool thread, bounded by :data:`~stalroute.mapping.LIST_TIMEOUT`
(PostgreSQL: ``statement_timeout`` for that transaction; SQLite: a progress handler).

The bulk import's batches: :meth:`~SQLMappingStore.upsert_many` runs the upsert statement for
every row with one ``executemany`` in one transaction; :meth:`~SQLMappingStore.lookup_many`
runs the lookup statement as written for many identifiers per pool-thread call (the statement
is the operator's own, so it is not rewritten into an ``IN`` list).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

from twisted.enterprise import adbapi
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool

from stalroute import sqlparams
from stalroute.config import MappingConfig, SQLMappingConfig
from stalroute.mapping import (
    LIST_TIMEOUT,
    MappingStore,
    NotListable,
    ReadOnlyStore,
    StoreError,
    redact_url,
    store_error,
    url_secrets,
)

T = TypeVar("T")

#: libpq waits at least 2 s whatever is asked; more than this would hold a pool thread for long.
CONNECT_TIMEOUT_RANGE = (2, 10)


@dataclass(frozen=True)
class Statement:
    """One configured statement in its driver's parameter style."""

    text: str
    #: "postgresql" (psycopg2: named ``%(pN)s``) or "sqlite" (sqlite3: ``?N``).
    engine: str
    #: The highest parameter number used: how many values the driver expects.
    arity: int

    @classmethod
    def translate(cls, sql: str, engine: str) -> Statement:
        """``sql`` (parameters already checked by the configuration) for ``engine``."""
        text, placeholders = sqlparams.translate(sql, engine)
        return cls(text, engine, max((p.number for p in placeholders), default=0))

    def bind(self, values: Sequence[str]) -> dict[str, str] | tuple[str, ...]:
        """The driver's parameters for ``values`` (``$1``, ``$2``, … in order)."""
        if self.engine == "postgresql":
            return {f"p{number}": value for number, value in enumerate(values, start=1)}
        return tuple(values[: self.arity])


@dataclass(frozen=True)
class Statements:
    """The configured statements of ``[mapping.sql]``: no writes when either write statement
    is unset, no listing without ``list_query``."""

    lookup: Statement
    upsert: Statement | None = None
    delete: Statement | None = None
    list: Statement | None = None

    @classmethod
    def configured(cls, settings: SQLMappingConfig) -> Statements:
        """The statements of ``settings``, translated for its engine."""
        engine = settings.backend
        listing = (Statement.translate(settings.list_query, engine)
                   if settings.list_query else None)
        lookup = Statement.translate(settings.query, engine)
        if not settings.writable:
            return cls(lookup, list=listing)
        assert settings.upsert_query and settings.delete_query
        return cls(lookup, Statement.translate(settings.upsert_query, engine),
                   Statement.translate(settings.delete_query, engine), listing)


class _ConnectionDropped(Exception):
    """The server closed the connection under a statement (the statement may be retried)."""


def in_transaction(pool: adbapi.ConnectionPool, work: Callable[[Any], T]) -> T:
    """``work(connection)`` in this pool thread, on its connection (made on first use), as
    one transaction: committed, or rolled back when ``work`` raises (a connection that cannot
    even roll back is dropped from the pool). When the server closed the connection (restart,
    failover), ``work`` runs once more on a fresh one; if that one is dropped too, the
    driver's error is raised."""
    try:
        return _attempt(pool, work)
    except _ConnectionDropped:
        pass
    try:
        return _attempt(pool, work)
    except _ConnectionDropped as dropped:
        assert dropped.__cause__ is not None
        raise dropped.__cause__ from None


def _attempt(pool: adbapi.ConnectionPool, work: Callable[[Any], T]) -> T:
    connection = pool.connect()
    try:
        result = work(connection)
        connection.commit()
        return result
    except Exception as exc:
        if getattr(connection, "closed", 0):  # psycopg2: the server went away
            pool.disconnect(connection)
            raise _ConnectionDropped(str(exc)) from exc
        try:
            connection.rollback()
        except Exception:
            pool.disconnect(connection)
        raise


def set_statement_timeout(cursor: Any, seconds: float) -> None:
    """PostgreSQL: bound each statement of the cursor's transaction (only) by ``seconds``."""
    cursor.execute("SET LOCAL statement_timeout = %s", (max(1, math.ceil(seconds * 1000)),))


#: Rows fetched from the driver at a time by ``entries()``.
FETCH_ROWS = 1000
#: Identifiers looked up per pool thread call by ``lookup_many()``.
LOOKUP_CHUNK = 500


def _cell(value: Any) -> str | None:
    """A column value as text; NULL and blank are None (``CHAR(n)`` columns pad with spaces)."""
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray, memoryview)):
        value = bytes(value).decode("utf-8", "replace")
    return str(value).strip() or None


def first_value(cursor: Any) -> str | None:
    """Lookup result: the first column of the first row (NULL or no row: not mapped)."""
    row = cursor.fetchone()
    return None if row is None else _cell(row[0])


def all_pairs(cursor: Any) -> list[tuple[str, str]]:
    """``entries()`` result: every row's ``(identifier, destination)``, sorted.

    Rows with a NULL or blank identifier or destination are skipped (a lookup would find no
    mapping there either); when an identifier repeats, its first row wins, as for lookups.
    """
    if cursor.description is None:
        raise ValueError("mapping.sql.list_query returned no rows (it must be a SELECT)")
    if len(cursor.description) < 2:
        raise ValueError("mapping.sql.list_query must return two columns, identifier and "
                         f"destination, not {len(cursor.description)}")
    table: dict[str, str] = {}
    while rows := cursor.fetchmany(FETCH_ROWS):
        for row in rows:
            identifier, destination = _cell(row[0]), _cell(row[1])
            if identifier is not None and destination is not None:
                table.setdefault(identifier, destination)
    return sorted(table.items())


#: What runs in a pool thread: given a cursor, executes statements and returns the result.
Work = Callable[[Any], Any]


def one_statement(statement: Statement, values: Sequence[str],
                  read: Callable[[Any], Any]) -> Work:
    """Work: ``statement`` with ``values``, then ``read`` the cursor."""

    def work(cursor: Any) -> Any:
        cursor.execute(statement.text, statement.bind(values))
        return read(cursor)

    return work


def each_lookup(statement: Statement, identifiers: Sequence[str]) -> Work:
    """Work: the lookup statement once per identifier, the answers in order."""

    def work(cursor: Any) -> list[str | None]:
        answers = []
        for identifier in identifiers:
            cursor.execute(statement.text, statement.bind([identifier]))
            answers.append(first_value(cursor))
        return answers

    return work


def every_upsert(statement: Statement, pairs: Sequence[tuple[str, str]]) -> Work:
    """Work: the upsert statement for every pair, in one ``executemany`` (one transaction)."""

    def work(cursor: Any) -> None:
        cursor.executemany(statement.text, [statement.bind(pair) for pair in pairs])

    return work


class SQLMappingStore(MappingStore):
    """The ``[mapping.sql]`` store on an adbapi pool (see the module docstring)."""

    def __init__(self, pool: adbapi.ConnectionPool, statements: Statements, label: str,
                 secrets: Sequence[str] = ()) -> None:
        self._pool = pool
        self._statements = statements
        self.label = label
        self._secrets = tuple(secrets)
        self._closed = False
        #: Both write statements, or none (writes then fail with ReadOnlyStore).
        self.writable = statements.upsert is not None and statements.delete is not None
        #: A list statement, or entries() fails with NotListable.
        self.listable = statements.list is not None
        #: Bound of one entries() call, in seconds.
        self.list_timeout = LIST_TIMEOUT

    def __repr__(self) -> str:
        return f"<SQLMappingStore {self.label}>"

    # --- MappingStore ---------------------------------------------------------------------

    def lookup(self, identifier: str) -> Deferred[str | None]:
        return self._run("lookup", one_statement(self._statements.lookup, [identifier],
                                                 first_value))

    def lookup_many(self, identifiers: Sequence[str]) -> Deferred[list[str | None]]:
        """The lookup statement as configured, :data:`LOOKUP_CHUNK` identifiers per pool
        thread call (one call at a time, so routing lookups are served between them)."""
        return Deferred.fromCoroutine(self._lookup_chunks(identifiers))

    async def _lookup_chunks(self, identifiers: Sequence[str]) -> list[str | None]:
        answers: list[str | None] = []
        for start in range(0, len(identifiers), LOOKUP_CHUNK):
            chunk = identifiers[start:start + LOOKUP_CHUNK]
            answers += await self._run("lookup", each_lookup(self._statements.lookup, chunk))
        return answers

    def entries(self) -> Deferred[list[tuple[str, str]]]:
        """Every mapping, sorted, from ``list_query`` (NotListable without one)."""
        if self._statements.list is None:
            return fail(NotListable(f"{self.label}: cannot list the mappings (set "
                                    "[mapping.sql] list_query for the export)"))
        d = self._run("list", one_statement(self._statements.list, [], all_pairs),
                      limit=self.list_timeout)
        d.addTimeout(self.list_timeout, reactor)  # a server that went silent
        return d.addErrback(store_error, self.label, "list", self._secrets)

    def upsert(self, identifier: str, destination: str) -> Deferred[None]:
        if self._statements.upsert is None:
            return fail(self._read_only())
        return self._run("upsert", one_statement(self._statements.upsert,
                                                 [identifier, destination], lambda _: None))

    def upsert_many(self, pairs: Sequence[tuple[str, str]]) -> Deferred[None]:
        """Every pair through the upsert statement in one transaction (all or none)."""
        if self._statements.upsert is None:
            return fail(self._read_only())
        if not pairs:
            return succeed(None)
        return self._run("upsert", every_upsert(self._statements.upsert, pairs))

    def delete(self, identifier: str) -> Deferred[bool]:
        if self._statements.delete is None:
            return fail(self._read_only())
        return self._run("delete", one_statement(self._statements.delete, [identifier],
                                                 lambda cursor: cursor.rowcount > 0))

    def reload(self) -> Deferred[int | None]:
        """Nothing to re-read: every lookup asks the database."""
        return succeed(None)

    def close(self) -> Deferred[None]:
        """Stop the pool's threads and close its connections (waits for running statements)."""
        if not self._closed:
            self._closed = True
            self._pool.close()
        return succeed(None)

    # --- running statements ---------------------------------------------------------------

    def _read_only(self) -> ReadOnlyStore:
        return ReadOnlyStore(f"{self.label}: read-only (mapping.sql needs both upsert_query "
                             "and delete_query for writes)")

    def _run(self, action: str, work: Work, limit: float | None = None) -> Deferred[Any]:
        """Run ``work`` in a pool thread; ``limit``: seconds the database may spend."""
        if self._closed:  # a stopped pool would queue the statement forever
            return fail(StoreError(f"{self.label}: {action} failed: the store is closed"))
        d = deferToThreadPool(cast(IReactorFromThreads, reactor), self._pool.threadpool,
                              self._in_thread, work, limit)
        return d.addErrback(store_error, self.label, action, self._secrets)

    def _in_thread(self, work: Work, limit: float | None) -> Any:
        return in_transaction(self._pool,
                              lambda connection: self._limited(connection, work, limit))

    def _limited(self, connection: Any, work: Work, limit: float | None) -> Any:
        """``work`` on a cursor of ``connection``, which spends at most ``limit`` seconds."""
        sqlite = self._pool.dbapiName == "sqlite3"
        cursor = connection.cursor()
        try:
            if limit is not None and sqlite:
                deadline = time.monotonic() + limit
                # SQLite calls this every N VM steps; True interrupts the statement.
                connection.set_progress_handler(lambda: time.monotonic() > deadline, 10_000)
            elif limit is not None:  # PostgreSQL: for this transaction only
                set_statement_timeout(cursor, limit)
            try:
                return work(cursor)
            finally:
                if limit is not None and sqlite:
                    connection.set_progress_handler(None, 0)
        finally:
            cursor.close()


# --- the two engines ------------------------------------------------------------------------


def postgresql_dsn(url: str, lookup_timeout: float) -> str:
    """The libpq URI for ``url``, with a ``connect_timeout`` (and application name) added
    unless the URL sets them."""
    parts = urlsplit(url)
    params = parse_qsl(parts.query, keep_blank_values=True)
    present = {key for key, _ in params}
    low, high = CONNECT_TIMEOUT_RANGE
    if "connect_timeout" not in present:
        params.append(("connect_timeout", str(max(low, min(high, math.ceil(lookup_timeout))))))
    if "application_name" not in present:
        params.append(("application_name", "stalroute"))
    return urlunsplit(parts._replace(query=urlencode(params, quote_via=quote)))


def sqlite_database(path: str) -> str:
    """The ``sqlite3.connect(uri=True)`` name for a ``sqlite:///path`` URL's path.

    ``mode=rw``: a missing file is an error, not a new empty table. ``sqlite:////abs`` (the
    SQLAlchemy spelling) names the same file as ``sqlite:///abs``.
    """
    if path == ":memory:":
        return path
    return f"file:/{quote(path.lstrip('/'))}?mode=rw"


def build_sql_store(settings: SQLMappingConfig, mapping: MappingConfig,
                    destinations: Collection[str]) -> SQLMappingStore:
    """A PostgreSQL or SQLite store for ``[mapping.sql]`` (its registry builder); connects on
    first use only."""
    statements = Statements.configured(settings)
    if settings.backend == "sqlite":
        database = sqlite_database(settings.sqlite_path or "")
        pool = adbapi.ConnectionPool("sqlite3", database, uri=True, check_same_thread=False,
                                     cp_min=1, cp_max=1, cp_noisy=False)
        return SQLMappingStore(pool, statements, settings.url)
    pool = adbapi.ConnectionPool("psycopg2", postgresql_dsn(settings.url, mapping.lookup_timeout),
                                 cp_min=1, cp_max=settings.pool_size, cp_reconnect=True,
                                 cp_noisy=False)
    return SQLMappingStore(pool, statements, redact_url(settings.url),
                           url_secrets(settings.url))
