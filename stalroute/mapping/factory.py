"""Builds the configured mapping store."""

from __future__ import annotations

from collections.abc import Collection

from stalroute.config import MappingConfig
from stalroute.mapping import MappingStore
from stalroute.mapping.file import FileMappingStore


class UnsupportedStore(Exception):
    """A valid ``[mapping] source`` this version cannot run yet."""


def build_store(mapping: MappingConfig, destinations: Collection[str]) -> MappingStore:
    """The store ``[mapping]`` names; raises MappingFileError for a bad TSV file."""
    if mapping.source == "file":
        return FileMappingStore(mapping.file.path, destinations, mapping.normalize)
    raise UnsupportedStore(f"mapping.source: the {mapping.source!r} store is not available "
                           "in this version yet")
