"""Builds the configured mapping store.

The drivers (psycopg2, txredisapi) are imported only when their store is configured, so a
file-store deployment never loads them. What the network stores share (URL redaction,
:func:`~stalroute.mapping.store_error`) lives in :mod:`stalroute.mapping`.
"""

from __future__ import annotations

from collections.abc import Collection

from stalroute.config import MappingConfig
from stalroute.mapping import MappingStore
from stalroute.mapping.file import FileMappingStore


class UnsupportedStore(Exception):
    """``[mapping]`` settings this version cannot run (startup refuses them, naming the key)."""


class InvalidStoreSetting(UnsupportedStore):
    """A store setting that parses as TOML but cannot work (an unknown Redis URL parameter, a
    missing CA file). The message starts with the key path."""


def build_store(mapping: MappingConfig, destinations: Collection[str]) -> MappingStore:
    """The store ``[mapping]`` names.

    Raises MappingFileError for a bad TSV file and InvalidStoreSetting for unusable Redis
    settings (the SQL statements were checked with the configuration). Network stores never
    contact their server here: one that is down at boot must not stop stalroute from starting
    (its lookups fail until it is back).
    """
    if mapping.source == "file" and mapping.file is not None:
        return FileMappingStore(mapping.file.path, destinations, mapping.normalize)
    if mapping.source == "sql" and mapping.sql is not None:
        from stalroute.mapping.sql import build_sql_store

        return build_sql_store(mapping.sql, mapping.lookup_timeout)
    if mapping.source == "redis" and mapping.redis is not None:
        from stalroute.mapping.redis import RedisMappingStore

        return RedisMappingStore(mapping.redis, mapping.lookup_timeout)
    raise UnsupportedStore(f"mapping.source: the {mapping.source!r} store is not available "
                           "in this version yet")

