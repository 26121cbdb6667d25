"""The admin API described as OpenAPI 3.0 (served at ``GET /openapi.json``).

Kept as data beside the routes; ``tests/unit/test_admin_app.py`` checks that every route
of the Klein app is described here and the other way round, and the integration tests fuzz
the live server from this document.
"""

from __future__ import annotations

import copy
from typing import Any

from stalroute.identity import MAX_IDENTIFIER_LENGTH

#: Longest login delay ``POST /connections/delay`` accepts, in seconds.
MAX_DELAY = 3600


def _error(description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def _json(description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": schema or {"type": "object"}}}}


def _query(name: str, description: str, schema: dict[str, Any], required: bool = False
           ) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": required, "description": description,
            "schema": schema}


IDENTIFIER = {"type": "string", "minLength": 1, "maxLength": MAX_IDENTIFIER_LENGTH}
NAME = {"type": "string", "minLength": 1, "maxLength": 200}
_IDENTIFIER_Q = _query("identifier", "Account identifier (normalized like a login).", IDENTIFIER)
_DESTINATION_Q = _query("destination", "Destination name from [destination.*].", NAME)
_FORMAT_Q = _query("format", "tsv (default) or json.", {"type": "string", "enum": ["tsv", "json"]})

_AUTH_ERRORS = {"401": _error("Missing or wrong bearer token"),
                "429": _error("Too many failed tokens from this address; see Retry-After")}
_STORE_ERRORS = {"503": _error("The mapping store did not answer")}


def _params_body(*required: str, properties: dict[str, Any]) -> dict[str, Any]:
    """The optional JSON body that may carry the same fields as the query string."""
    return {"required": False, "content": {"application/json": {"schema": {
        "type": "object", "properties": properties, "required": list(required)}}}}


def _op(summary: str, responses: dict[str, Any], *, parameters: list | None = None,
        body: dict | None = None, auth: bool = True, tag: str = "admin") -> dict[str, Any]:
    operation: dict[str, Any] = {"summary": summary, "tags": [tag],
                                 "responses": {**responses, **(_AUTH_ERRORS if auth else {})}}
    if parameters:
        operation["parameters"] = parameters
    if body:
        operation["requestBody"] = body
    if not auth:
        operation["security"] = []
    return operation


_COUNT = {"type": "integer", "minimum": 0}
#: ``GET /stats``: the reference product's top-level keys first, then stalroute's breakdown.
_STATISTICS = {"type": "object", "required": [
    "cache_hits", "cache_misses", "hit_rate_pct", "cache_entries", "active_connections",
    "listeners", "sessions", "cache"], "properties": {
    "cache_hits": {**_COUNT, "description": "Lookups the routing cache answered (positive "
                   "and negative tiers)."},
    "cache_misses": {**_COUNT, "description": "Lookups that went to the mapping store."},
    "hit_rate_pct": {"type": "number", "minimum": 0, "maximum": 100, "description":
                     "cache_hits / (cache_hits + cache_misses) in percent, one decimal; 0 "
                     "before the first lookup."},
    "cache_entries": {**_COUNT, "description": "Entries in the routing cache."},
    "active_connections": {**_COUNT, "description": "Open client connections, all listeners."},
    "draining": {"type": "boolean"},
    "listeners": {"type": "object", "description": "Per listener: protocol, "
                  "active_connections, rejected_connections, probes.",
                  "additionalProperties": {"type": "object"}},
    "sessions": {"type": "object", "description": "open, spliced, preauth."},
    "cache": {"type": "object", "description": "entries, and counters by tier (hit:positive, "
              "hit:negative, hit:transient, miss)."},
    "bans": _COUNT, "login_delays": _COUNT,
    "version": {"type": "string"}, "uptime": {"type": "number"},
    "admin": {"type": "object", "description": "lockouts, locked_addresses."}}}

_NULLABLE_TEXT = {"type": "string", "nullable": True}
#: One row of ``GET /certificates`` (:meth:`stalroute.control.Control.certificates`).
_CERTIFICATE = {"type": "object", "required": ["name", "source", "serial", "not_after",
                                               "expires_in"], "properties": {
    "name": {"type": "string", "description": "The [tls.certificate.<name>] entry."},
    "source": {"type": "string", "description": "file, or acme:<name of the [acme.*] entry>."},
    "default": {"type": "boolean"},
    "subjects": {"type": "array", "items": {"type": "string"},
                 "description": "Names the served leaf covers (DNS SANs, else its CN)."},
    "issuer": _NULLABLE_TEXT, "issuer_cn": _NULLABLE_TEXT,
    "self_signed": {"type": "boolean", "nullable": True, "description": "True for the "
                    "placeholder an acme entry serves until its first certificate is issued."},
    "serial": {**_NULLABLE_TEXT, "description": "Hexadecimal."},
    "not_before": _NULLABLE_TEXT, "not_after": _NULLABLE_TEXT,
    "expires_in": {"type": "number", "nullable": True,
                   "description": "Seconds until not_after (negative once expired)."},
    "cert": {"type": "string", "description": "file entries: the PEM chain's path."},
    "renews": {"type": "object", "description": "acme entries: here (this process performs "
               "acme_renew) and nodes ([cluster.roles] acme_renew; empty: any member; null "
               "without a coordinator)."},
    "domains": {"type": "array", "items": {"type": "string"}},
    "failures": {"type": "integer", "nullable": True,
                 "description": "Failed orders since the last success."},
    "last_error": _NULLABLE_TEXT, "next_check": _NULLABLE_TEXT}}

_MAPPING = {"type": "object", "properties": {
    "identifier": {"type": "string"}, "destination": {"type": "string", "nullable": True}}}

SPEC: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {"title": "stalroute admin API", "version": "1",
             "description": "Operate a running stalroute (SPEC §8). Parameters go in the query "
                            "string, as in the reference product; writes also accept them as a "
                            "JSON object body. Errors are JSON objects {\"error\": \"...\"}."},
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "schemas": {
            "Error": {"type": "object", "required": ["error"],
                      "properties": {"error": {"type": "string"}}},
        },
    },
    "security": [{"bearer": []}],
    "paths": {
        "/healthz": {"get": _op("Liveness (the process answers)", {
            "200": _json("Alive")}, auth=False, tag="health")},
        "/healthz/live": {"get": _op("Liveness (the process answers)", {
            "200": _json("Alive")}, auth=False, tag="health")},
        "/healthz/ready": {"get": _op(
            "Readiness: not while draining, while the mapping store is unreachable or while "
            "the default destination's circuit is open", {
                "200": _json("Ready"), "503": _json("Not ready, with the reasons")},
            auth=False, tag="health")},
        "/stats": {"get": _op("Counters: listeners, sessions, cache, bans", {
            "200": _json("Statistics", _STATISTICS)})},
        "/cluster": {"get": _op(
            "The fleet's live members (only this instance without a coordinator) and the "
            "mismatches among them: a node_id used twice, different server.hostname, "
            "destinations or configuration digests", {"200": _json("Members and problems")})},
        "/destinations": {"get": _op("Destinations with their circuit state", {
            "200": _json("Destinations")})},
        "/destinations/reset": {"post": _op("Close a destination's circuit by hand", {
            "200": _json("Reset"), "400": _error("No destination given"),
            "404": _error("No such destination")},
            parameters=[{**_DESTINATION_Q, "required": False}],
            body=_params_body("destination", properties={"destination": NAME}))},
        "/mappings": {
            "get": _op("Where an account is mapped (in the store, not the cache)", {
                "200": _json("Mapped", _MAPPING), "400": _error("Bad identifier"),
                "404": _error("Not mapped (the default destination applies)"),
                **_STORE_ERRORS}, parameters=[{**_IDENTIFIER_Q, "required": True}]),
            "put": _op("Map an account to a destination; its cache entry is dropped", {
                "200": _json("Written", _MAPPING),
                "400": _error("Bad identifier or undeclared destination"),
                "501": _error("The mapping store is read-only"), **_STORE_ERRORS},
                parameters=[_IDENTIFIER_Q, _DESTINATION_Q],
                body=_params_body("identifier", "destination", properties={
                    "identifier": IDENTIFIER, "destination": NAME})),
            "delete": _op("Remove an account's mapping; its cache entry is dropped", {
                "200": _json("Deleted (or there was nothing to delete)"),
                "400": _error("Bad identifier"),
                "501": _error("The mapping store is read-only"), **_STORE_ERRORS},
                parameters=[_IDENTIFIER_Q],
                body=_params_body("identifier", properties={"identifier": IDENTIFIER})),
        },
        "/mappings/reload": {"post": _op("Re-read the mapping store (file) and drop the cache", {
            "200": _json("Reloaded"), "400": _error("The file was refused; the old table is "
                                                    "kept"), **_STORE_ERRORS})},
        "/mappings/export": {"get": _op("Every mapping, streamed as TSV or JSON", {
            "200": {"description": "The mappings", "content": {
                "text/tab-separated-values": {"schema": {"type": "string"}},
                "application/json": {"schema": {"type": "array", "items": _MAPPING}}}},
            "400": _error("Bad format"),
            "501": _error("The store cannot list its mappings"), **_STORE_ERRORS},
            parameters=[_FORMAT_Q])},
        "/mappings/import": {"post": _op(
            "Bulk upsert from a TSV or JSON body; rows are validated one by one (rejected rows "
            "are reported with their line), written in batches, and their cache entries "
            "dropped", {
                "200": _json("Summary", {"type": "object", "properties": {
                    "rows": {"type": "integer"}, "imported": {"type": "integer"},
                    "unchanged": {"type": "integer"}, "rejected_count": {"type": "integer"},
                    "rejected": {"type": "array", "items": {"type": "object"}}}}),
                "400": _error("Unreadable body (JSON syntax) or bad parameters; nothing "
                              "written"),
                "501": _error("The mapping store is read-only"), **_STORE_ERRORS},
            parameters=[_FORMAT_Q, _query("dry_run", "Validate only, write nothing.",
                                          {"type": "boolean"})],
            body={"required": True, "content": {
                "text/tab-separated-values": {"schema": {"type": "string"}},
                "application/json": {"schema": {"type": "array", "items": {
                    "type": "object", "properties": {"identifier": IDENTIFIER,
                                                     "destination": NAME}}}}}})},
        "/cache/invalidate": {"post": _op("Drop one cached route, or all of them", {
            "200": _json("Invalidated"), "400": _error("Bad identifier")},
            parameters=[_IDENTIFIER_Q],
            body=_params_body(properties={"identifier": IDENTIFIER}))},
        "/connections": {"get": _op("Live (logged-in) sessions", {
            "200": _json("Sessions"), "400": _error("Bad identifier")},
            parameters=[_IDENTIFIER_Q, _DESTINATION_Q])},
        "/connections/kick": {"post": _op(
            "Close the live sessions of an account and/or on a destination (drain a node)", {
                "200": _json("Kicked"), "400": _error("Neither identifier nor destination"),
                "404": _error("No such destination")},
            parameters=[_IDENTIFIER_Q, _DESTINATION_Q],
            body=_params_body(properties={"identifier": IDENTIFIER, "destination": NAME}))},
        "/connections/delay": {"post": _op(
            "Hold an account's new logins for some seconds (0 lifts the hold)", {
                "200": _json("Held"), "400": _error("Bad identifier or seconds")},
            parameters=[_IDENTIFIER_Q, _query("seconds", f"0 to {MAX_DELAY}.", {
                "type": "number", "minimum": 0, "maximum": MAX_DELAY})],
            body=_params_body("identifier", "seconds", properties={
                "identifier": IDENTIFIER,
                "seconds": {"type": "number", "minimum": 0, "maximum": MAX_DELAY}}))},
        "/certificates": {"get": _op(
            "The TLS certificates this instance serves, file and acme, with expiry, issuer, "
            "serial and who renews (with [cluster]: only the answering instance)", {
                "200": _json("Certificates", {"type": "object", "properties": {
                    "node_id": {"type": "integer"},
                    "certificates": {"type": "array", "items": _CERTIFICATE}}})})},
        "/certificates/renew": {"post": _op(
            "Order a new certificate for an acme entry now, on the node that renews it; the "
            "current one is served until the new one is issued. The answer does not wait for "
            "the order: GET /certificates then shows the new serial, or failures and "
            "last_error", {
                "200": _json("Requested; certificate is what this instance serves now", {
                    "type": "object", "properties": {
                        "name": {"type": "string"}, "requested": {"type": "boolean"},
                        "certificate": {**_CERTIFICATE, "nullable": True}}}),
                "400": _error("No name given, or a certificate read from files"),
                "404": _error("No such certificate entry")},
            parameters=[_query("name", "The [tls.certificate.<name>] entry.", NAME)],
            body=_params_body("name", properties={"name": NAME}))},
        "/config/reload": {"post": _op(
            "Validate the configuration file and swap it in (like SIGHUP); the answer lists "
            "changed settings that need a restart", {
                "200": _json("Reloaded"),
                "400": _error("Refused (the running configuration is kept), with problems")})},
        "/metrics": {"get": _op("Prometheus metrics", {
            "200": {"description": "Prometheus text format",
                    "content": {"text/plain": {"schema": {"type": "string"}}}}})},
        "/openapi.json": {"get": _op("This document", {"200": _json("OpenAPI 3.0")})},
    },
}


def openapi_document() -> dict[str, Any]:
    """A copy of :data:`SPEC` (callers may change it)."""
    return copy.deepcopy(SPEC)
