"""The admin API (SPEC §8): a Klein app served over HTTPS on ``[admin] bind``.

Modules: ``app`` (routes, a thin translation onto :class:`stalroute.control.Control`),
``auth`` (bearer token and per-IP lockout), ``bulk`` (incremental TSV/JSON parsers, shared
with ``stalroute ctl``), ``metrics`` (Prometheus collector), ``openapi`` (the API as data),
``server`` (``AdminService``: the TLS listener).  This package's ``__init__`` imports nothing, so
``stalroute ctl`` can use ``bulk`` without loading Twisted's reactor.
"""
