"""The ``[mapping]`` section (SPEC §2.8) and the registry of mapping store kinds.

A store kind is one entry of :data:`STORE_KINDS`: the dataclass of its ``[mapping.<kind>]``
table, the function that builds the store from it, and optionally a check of what its keys
must agree on.  The validator (:func:`build_mapping`) and the store factory
(:func:`stalroute.mapping.factory.build_store`) both read this one table, so adding a store
is its module under :mod:`stalroute.mapping`, its settings class here and one entry.

The builder is named as ``"module:function"`` and imported only when that store is built:
the configuration is read by every command (``stalroute check``, the admin API's reload), and
a file-store deployment must never load a database driver it does not have.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from stalroute import sqlparams
from stalroute.config import converters as conv
from stalroute.config.reader import (
    Context,
    Invalid,
    as_table,
    read_table,
    required_keys,
    setting,
)

# --- the settings of each store kind ---------------------------------------------------------


@dataclass(frozen=True)
class StoreSettings:
    """What every ``[mapping.<kind>]`` table answers."""

    @property
    def writable(self) -> bool:
        """Whether the admin API may write mappings to this store."""
        return True


@dataclass(frozen=True)
class FileMappingConfig(StoreSettings):
    """``[mapping.file]``: a TSV of ``identifier destination`` lines."""

    path: Path = setting(conv.path)


def _sql_url(value: Any, ctx: Context, key: str) -> str:
    text: str = conv.text()(value, ctx, key)
    if text.startswith("sqlite://"):
        if not text.startswith("sqlite:///") or len(text) == len("sqlite:///"):
            raise Invalid("a SQLite URL must be sqlite:///path/to/file.db")
        return text
    url: str = conv.url("postgresql", "postgres")(text, ctx, key)
    return url


@dataclass(frozen=True)
class SQLMappingConfig(StoreSettings):
    """``[mapping.sql]``: PostgreSQL (psycopg2) or SQLite (stdlib) lookups and writes."""

    url: str = setting(_sql_url, repr=False)
    query: str = setting(conv.text(single_line=False))
    upsert_query: str | None = setting(conv.text(single_line=False), None)
    delete_query: str | None = setting(conv.text(single_line=False), None)
    pool_size: int = setting(conv.integer(1, 1024), 16)
    #: [ext] No parameters; rows of ``identifier, destination`` (the admin API's export).
    list_query: str | None = setting(conv.text(single_line=False), None)

    @property
    def writable(self) -> bool:
        """Writes through the admin API need both statements (otherwise they answer 501)."""
        return bool(self.upsert_query) and bool(self.delete_query)

    @property
    def backend(self) -> str:
        """``"sqlite"`` or ``"postgresql"``, from the URL scheme."""
        return "sqlite" if self.url.startswith("sqlite:") else "postgresql"

    @property
    def sqlite_path(self) -> str | None:
        """The database file of a ``sqlite:///path`` URL (``:memory:`` kept as is)."""
        if self.backend != "sqlite":
            return None
        rest = self.url[len("sqlite://") :]
        return ":memory:" if rest == "/:memory:" else rest


#: The parameters each ``[mapping.sql]`` statement gets: ``$1`` the first name, …
_SQL_STATEMENT_PARAMETERS = {
    "query": ("identifier",),
    "upsert_query": ("identifier", "destination"),
    "delete_query": ("identifier",),
    "list_query": (),
}


def _check_sql(ctx: Context, sql: SQLMappingConfig) -> None:
    """Each statement uses exactly its parameters, written as its engine accepts them; writes
    need both write statements."""
    if sql.url:
        for name, parameters in _SQL_STATEMENT_PARAMETERS.items():
            statement = getattr(sql, name)
            if statement:
                problem = sqlparams.parameter_problem(statement, sql.backend, parameters)
                if problem:
                    ctx.error(f"mapping.sql.{name}", problem)
    if bool(sql.upsert_query) != bool(sql.delete_query):
        ctx.warn(
            "mapping.sql",
            "writes need both upsert_query and delete_query; "
            "the admin API will answer 501 to mapping writes",
        )


@dataclass(frozen=True)
class RedisMappingConfig(StoreSettings):
    """``[mapping.redis]``: ``GET``/``SET``/``DEL`` of ``key_prefix + identifier``."""

    url: str = setting(conv.url("redis", "rediss"), repr=False)
    key_prefix: str = setting(conv.text(nonempty=False), "route:")
    pool_size: int = setting(conv.integer(1, 1024), 16)


# --- the registry ----------------------------------------------------------------------------

S = TypeVar("S", bound=StoreSettings)


@dataclass(frozen=True)
class StoreKind(Generic[S]):
    """One mapping store kind: how its table reads and which function builds the store."""

    settings: type[S]
    #: ``"module:function"``; the function takes ``(settings, mapping, destinations)`` (the
    #: :class:`MappingConfig` and the declared destination names) and returns the store.
    builder: str
    #: Problems that need several keys of the table (reported with ``ctx.error``/``warn``).
    check: Callable[[Context, S], None] | None = None


STORE_KINDS: dict[str, StoreKind[Any]] = {
    "file": StoreKind(FileMappingConfig, "stalroute.mapping.file:build_file_store"),
    "sql": StoreKind(SQLMappingConfig, "stalroute.mapping.sql:build_sql_store", _check_sql),
    "redis": StoreKind(RedisMappingConfig, "stalroute.mapping.redis:build_redis_store"),
}
#: Other names ``mapping.source`` takes: ``sqlite`` is the SQL store on a ``sqlite:///`` URL.
SOURCE_ALIASES = {"sqlite": "sql"}


# --- the section -----------------------------------------------------------------------------


@dataclass(frozen=True)
class MappingConfig:
    """``[mapping]`` (SPEC §2.8).  ``source`` names a :data:`STORE_KINDS` entry.

    ``source = "sqlite"`` in the file is stored as ``sql`` (its ``[mapping.sql] url`` must be a
    ``sqlite:///`` URL): the SQL store serves both engines.  ``settings`` is the source's
    ``[mapping.<source>]`` table (every table given is validated; only that one is kept).
    """

    settings: StoreSettings
    source: str = setting(conv.choice(*STORE_KINDS, *SOURCE_ALIASES))
    normalize: str = setting(conv.choice("none", "lowercase"), "none")
    positive_ttl: float = setting(conv.duration(), 600.0)
    negative_ttl: float = setting(conv.duration(), 30.0)
    cache_max_entries: int = setting(conv.integer(1), 1_000_000)
    lookup_timeout: float = setting(conv.duration(positive=True), 5.0)

    @property
    def writable(self) -> bool:
        """Whether the admin API may write mappings to this store."""
        return self.settings.writable


def build_mapping(ctx: Context, table: Any) -> MappingConfig:
    """``[mapping]`` and its ``[mapping.<kind>]`` tables."""
    table = as_table(ctx, table, "mapping")
    values = read_table(ctx, table, "mapping", MappingConfig, subtables=STORE_KINDS)
    given: dict[str, StoreSettings] = {}
    for name, kind in STORE_KINDS.items():
        if name in table:
            given[name] = kind.settings(**read_table(ctx, table[name], f"mapping.{name}",
                                                     kind.settings))
    source = values.get("source")
    kind_name = SOURCE_ALIASES.get(source, source) if source else None
    if kind_name and kind_name not in given:
        needs = " and ".join(required_keys(STORE_KINDS[kind_name].settings))
        ctx.error(
            f"mapping.{kind_name}",
            f'required when mapping.source = "{source}" '
            f"(a [mapping.{kind_name}] table with {needs})",
        )
    sql = given.get("sql")
    if source == "sqlite" and isinstance(sql, SQLMappingConfig) and sql.url \
            and sql.backend != "sqlite":
        ctx.error("mapping.sql.url", 'mapping.source = "sqlite" needs a sqlite:///path URL')
    for name, settings in given.items():
        check = STORE_KINDS[name].check
        if check is not None:
            check(ctx, settings)
    values["source"] = kind_name
    values["settings"] = given.get(kind_name) if kind_name else None  # None: problems reported
    return MappingConfig(**values)
