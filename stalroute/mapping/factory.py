"""Builds the configured mapping store from its registry entry.

The registry (:data:`stalroute.config.stores.STORE_KINDS`) names each store's builder as
``"module:function"``; the module is imported here, when that store is built, so the drivers
(psycopg2, txredisapi) are loaded only when their store is configured. What the network
stores share (URL redaction, :func:`~stalroute.mapping.store_error`) lives in
:mod:`stalroute.mapping`.
"""

from __future__ import annotations

import importlib
from collections.abc import Collection

from stalroute.config.stores import STORE_KINDS, MappingConfig
from stalroute.mapping import InvalidStoreSetting, MappingStore, UnsupportedStore

#: Defined in :mod:`stalroute.mapping` (the store modules raise them, and this module imports
#: the store modules); named here too for the callers of :func:`build_store`.
__all__ = ["InvalidStoreSetting", "UnsupportedStore", "build_store"]


def build_store(mapping: MappingConfig, destinations: Collection[str]) -> MappingStore:
    """The store ``[mapping]`` names.

    Raises MappingFileError for a bad TSV file and InvalidStoreSetting for unusable Redis
    settings (the SQL statements were checked with the configuration). Network stores never
    contact their server here: one that is down at boot must not stop stalroute from starting
    (its lookups fail until it is back).
    """
    kind = STORE_KINDS.get(mapping.source)
    if kind is None or not isinstance(mapping.settings, kind.settings):
        raise UnsupportedStore(f"mapping.source: the {mapping.source!r} store is not "
                               "available in this version yet")
    module, _, function = kind.builder.partition(":")
    store: MappingStore = getattr(importlib.import_module(module), function)(
        mapping.settings, mapping, destinations)
    return store
