"""The admin API's HTTP layer in-process: real twisted.web requests through the Klein app
onto a real :class:`~stalroute.control.Control` over a runtime built from a parsed
configuration on a :class:`~twisted.internet.task.Clock` (the store is an in-memory one, so
no thread or reactor is needed).  Status codes, JSON bodies, parameters, auth and lockout,
bulk import/export, the OpenAPI document and the metrics exposition are checked here; the
same API over real HTTPS against a real proxy is in ``tests/integration/test_admin.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.address import IPv4Address
from twisted.internet.defer import fail, succeed
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.web.test.requesthelper import DummyChannel

from stalroute.admin.app import AdminAPI
from stalroute.admin.auth import Lockout
from stalroute.admin.openapi import SPEC
from stalroute.admin.server import AdminRequest, AdminSite
from stalroute.config import ConfigError, parse_config
from stalroute.control import Control
from stalroute.identity import redact
from stalroute.mapping import MappingStore, NotListable, StoreError
from stalroute.runtime import build_runtime

TOKEN = "T0ken-" + "x" * 34
AUTH = {b"Authorization": f"Bearer {TOKEN}".encode()}


class MemoryStore(MappingStore):
    """An in-memory mapping store answering synchronously."""

    def __init__(self, table: dict[str, str] | None = None, *, writable: bool = True,
                 listable: bool = True) -> None:
        self.table = dict(table or {})
        self.writable = writable
        self.failing = False
        self.writes = 0
        self.listable = listable

    def lookup(self, identifier):
        return fail(StoreError("memory: down")) if self.failing else \
            succeed(self.table.get(identifier))

    def upsert(self, identifier, destination):
        self.writes += 1
        self.table[identifier] = destination
        return succeed(None)

    def delete(self, identifier):
        return succeed(self.table.pop(identifier, None) is not None)

    def reload(self):
        return succeed(len(self.table))

    def entries(self):
        if not self.listable:
            return fail(NotListable("memory: cannot list"))
        return succeed(sorted(self.table.items()))

    def close(self):
        return succeed(None)


def document(tmp_path: Path) -> dict[str, Any]:
    (tmp_path / "mappings.tsv").write_text("")
    destination = {"host": "127.0.0.1", "tls_server_name": "node.test",
                   "protocol": {"imap": {"port": 1993, "tls": "implicit"}}}
    return {
        "server": {"hostname": "stalroute.test"},
        "listener": {"imaps": {"protocol": "imap", "bind": ["127.0.0.1:0"], "tls": "implicit"}},
        "destination": {"node1": destination, "node2": destination},
        "routing": {"default_destination": "node1"},
        "mapping": {"source": "file", "normalize": "lowercase",
                    "file": {"path": str(tmp_path / "mappings.tsv")}},
        "admin": {"bind": "127.0.0.1:0", "bearer_token": TOKEN, "lockout_threshold": 3,
                  "lockout_duration": "60s"},
    }


class Harness:
    """An AdminAPI on a Clock, and a way to send it requests."""

    def __init__(self, tmp_path: Path) -> None:
        self.clock = Clock()
        config = parse_config(document(tmp_path), tmp_path, {}, check_files=False)
        self.runtime = build_runtime(self.clock, config)
        self.store = MemoryStore({"bob": "node2"})
        self.runtime.router.store = self.store
        self.reloads: list[Any] = []
        self.service = SimpleNamespace(runtime=self.runtime, factories={},
                                       reactor=self.clock, reload_config=self._reload)
        self.control = Control(self.service)
        self.api = AdminAPI(self.control, clock=self.clock, token=TOKEN,
                            lockout=Lockout(self.clock, 3, 60.0))
        self.site = AdminSite(self.api)

    def _reload(self):
        outcome = self.reloads.pop(0) if self.reloads else []
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def request(self, method: str, uri: str, body: bytes = b"",
                headers: dict[bytes, bytes] | None = None, ip: str = "10.0.0.1",
                auth: bool = True) -> Response:
        channel = DummyChannel(peer=IPv4Address("TCP", ip, 40000))
        channel.site = self.site
        request = AdminRequest(channel)
        for name, value in {**(AUTH if auth else {}), **(headers or {})}.items():
            request.requestHeaders.addRawHeader(name, value)
        request.gotLength(len(body))
        request.handleContentChunk(body)
        request.requestReceived(method.encode(), uri.encode(), b"HTTP/1.0")
        for _ in range(10_000):  # run the deferLater(0) turns handlers take
            if request.finished:
                break
            self.clock.advance(0)
        assert request.finished, f"{method} {uri} did not finish"
        return Response(channel.transport.written.getvalue(), request)


class Response:
    def __init__(self, raw: bytes, request) -> None:
        head, _, self.body = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        self.headers = {k.lower(): v.strip() for k, _, v in
                        (line.partition(":") for line in lines[1:])}
        self.request = request

    def json(self) -> Any:
        assert self.headers["content-type"].startswith("application/json"), self.headers
        return json.loads(self.body)


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    return Harness(tmp_path)


# --- health and authentication ------------------------------------------------------------


@pytest.mark.parametrize("path", ["/healthz", "/healthz/live", "/healthz/ready"])
def test_health_needs_no_token(h: Harness, path: str) -> None:
    response = h.request("GET", path, auth=False)
    assert response.status == 200
    assert response.json()["status"] in ("ok", "ready")


def test_readiness_reports_reasons(h: Harness) -> None:
    h.runtime.registry.draining = True
    h.store.failing = True
    response = h.request("GET", "/healthz/ready", auth=False)
    assert response.status == 503
    reasons = response.json()["reasons"]
    assert reasons[0] == "draining" and "mapping store unreachable" in reasons[1]
    assert response.json()["error"].startswith("not ready")
    assert h.request("GET", "/healthz/live", auth=False).status == 200


@pytest.mark.parametrize("headers", [{}, {b"Authorization": b"Bearer wrong"},
                                     {b"Authorization": f"Basic {TOKEN}".encode()}])
def test_requests_without_the_token_get_401(h: Harness, headers) -> None:
    response = h.request("GET", "/stats", headers=headers, auth=False)
    assert response.status == 401
    assert response.json() == {"error": "missing or wrong bearer token"}
    assert response.headers["www-authenticate"].startswith("Bearer")


def test_lockout_per_address_even_with_the_right_token(h: Harness) -> None:
    bad = {b"Authorization": b"Bearer " + b"y" * 40}
    for _ in range(3):
        assert h.request("GET", "/stats", headers=bad, auth=False).status == 401
    locked = h.request("GET", "/stats")  # the right token, from the locked address
    assert locked.status == 429
    assert locked.json()["error"].startswith("too many failed attempts")
    assert locked.headers["retry-after"] == "60"
    assert h.request("GET", "/stats", ip="10.0.0.2").status == 200  # another address
    assert h.request("GET", "/healthz", auth=False).status == 200  # health is never locked
    assert h.request("GET", "/stats", ip="10.0.0.2").json()["admin"] == {
        "lockouts": 1, "locked_addresses": 1}
    h.clock.advance(60)
    assert h.request("GET", "/stats").status == 200


def test_unauthenticated_bodies_are_dropped_as_they_arrive(h: Harness) -> None:
    response = h.request("POST", "/mappings/import", b"alice\tnode2\n" * 1000, auth=False)
    assert response.status == 401
    assert response.request._discard_body  # never written to content
    assert "alice" not in h.store.table


# --- routing errors ---------------------------------------------------------------------------


def test_unknown_path_is_a_json_404(h: Harness) -> None:
    response = h.request("GET", "/nope")
    assert response.status == 404
    assert "error" in response.json()


def test_a_url_that_is_not_utf8_is_a_json_400(h: Harness) -> None:
    response = h.request("GET", "/stats%FF")
    assert response.status == 400
    assert response.json() == {"error": "the URL is not UTF-8"}


def test_wrong_method_is_a_json_405_with_allow(h: Harness) -> None:
    response = h.request("DELETE", "/stats")
    assert response.status == 405
    assert "error" in response.json()
    assert "GET" in response.headers["allow"]


# --- statistics -------------------------------------------------------------------------------


def test_stats_and_destinations(h: Harness) -> None:
    stats = h.request("GET", "/stats").json()
    assert stats["listeners"] == {}  # no listener started in-process
    assert stats["sessions"] == {"open": 0, "spliced": 0, "preauth": 0}
    assert stats["version"]
    destinations = h.request("GET", "/destinations").json()["destinations"]
    assert [(d["name"], d["circuit"], d["default"]) for d in destinations] == [
        ("node1", "closed", True), ("node2", "closed", False)]


def test_destination_reset(h: Harness) -> None:
    breaker = h.runtime.connector.breakers["node2"]
    for n in range(5):
        breaker.failed(f"10.0.0.{n}", connect_stage=True)
    assert breaker.state == "open"
    response = h.request("POST", "/destinations/reset?destination=node2")
    assert response.json() == {"destination": "node2", "circuit": "closed"}
    assert breaker.state == "closed"
    assert h.request("POST", "/destinations/reset?destination=nope").status == 404
    assert h.request("POST", "/destinations/reset").status == 400


# --- mappings ---------------------------------------------------------------------------------


def test_get_mapping(h: Harness) -> None:
    assert h.request("GET", "/mappings?identifier=BOB").json() == {
        "identifier": "bob", "destination": "node2"}
    missing = h.request("GET", "/mappings?identifier=alice")
    assert missing.status == 404
    assert missing.json()["default_destination"] == "node1"
    assert h.request("GET", "/mappings").status == 400


@pytest.mark.parametrize(("uri", "body", "headers"), [
    ("/mappings?identifier=Alice&destination=node2", b"", {}),
    ("/mappings", b'{"identifier": "Alice", "destination": "node2"}',
     {b"Content-Type": b"application/json"}),
    ("/mappings", b"identifier=Alice&destination=node2",
     {b"Content-Type": b"application/x-www-form-urlencoded"}),
    ("/mappings?destination=node2", b'{"identifier": "Alice"}', {}),
], ids=["query", "json", "form", "mixed"])
def test_put_mapping_writes_the_store_and_drops_the_cache_entry(h: Harness, uri, body,
                                                                headers) -> None:
    cache = h.runtime.router.cache
    assert h.runtime.router.resolve("alice").result.name == "node1"  # cached: negative
    assert len(cache) == 1
    response = h.request("PUT", uri, body, headers)
    assert response.status == 200, response.body
    assert response.json() == {"identifier": "alice", "destination": "node2"}
    assert h.store.table["alice"] == "node2"  # normalized (lowercase) before the write
    assert len(cache) == 0
    assert h.runtime.router.resolve("alice").result.name == "node2"


@pytest.mark.parametrize(("uri", "body", "status", "message"), [
    ("/mappings?identifier=alice&destination=node9", b"", 400, "not declared"),
    ("/mappings?identifier=al%20ice&destination=node2", b"", 400, "invalid identifier"),
    ("/mappings?identifier=al%22ice&destination=node2", b"", 400, "invalid identifier"),
    ("/mappings?identifier=" + "a" * 600 + "&destination=node2", b"", 400, "too long"),
    ("/mappings?destination=node2", b"", 400, "missing parameter: identifier"),
    ("/mappings?identifier=alice", b"", 400, "missing parameter: destination"),
    ("/mappings", b"[1, 2]", 400, "JSON object"),
    ("/mappings", b"{nope", 400, "JSON object"),
    ("/mappings", b'{"identifier": ["a"]}', 400, "string or a number"),
    ("/mappings", b'\xff{"identifier": "a"}', 400, "UTF-8"),
    ("/mappings?identifier=%FF&destination=node2", b"", 400, "UTF-8"),
    ("/mappings", b"{" + b" " * 70_000 + b"}", 413, "larger than"),
])
def test_put_mapping_errors(h: Harness, uri, body, status, message) -> None:
    response = h.request("PUT", uri, body)
    assert response.status == status
    assert message in response.json()["error"]
    assert h.store.writes == 0


def test_read_only_store_answers_501(h: Harness) -> None:
    h.store.writable = False
    for method, uri, body in [("PUT", "/mappings?identifier=a&destination=node2", b""),
                              ("DELETE", "/mappings?identifier=a", b""),
                              ("POST", "/mappings/import", b"a\tnode2\n")]:
        response = h.request(method, uri, body)
        assert response.status == 501, (method, uri)
        assert "read-only" in response.json()["error"]
    assert h.request("POST", "/mappings/import?dry_run=true", b"a\tnode2\n").status == 200


def test_store_failure_answers_503(h: Harness) -> None:
    h.store.failing = True
    response = h.request("GET", "/mappings?identifier=bob")
    assert response.status == 503
    assert "memory: down" in response.json()["error"]


def test_delete_mapping(h: Harness) -> None:
    assert h.request("DELETE", "/mappings?identifier=Bob").json() == {
        "identifier": "bob", "deleted": True}
    assert h.request("DELETE", "/mappings", b'{"identifier": "bob"}').json()["deleted"] is False


def test_reload_mappings(h: Harness) -> None:
    assert h.request("POST", "/mappings/reload").json() == {"entries": 1}


# --- bulk -------------------------------------------------------------------------------------


def test_export_tsv_and_json(h: Harness) -> None:
    h.store.table.update({"alice": "node1", "ünï": "node2"})
    tsv = h.request("GET", "/mappings/export")
    assert tsv.status == 200
    assert tsv.headers["content-type"].startswith("text/tab-separated-values")
    assert tsv.body.decode() == "alice\tnode1\nbob\tnode2\nünï\tnode2\n"
    exported = h.request("GET", "/mappings/export?format=json").json()
    assert exported == [{"identifier": i, "destination": d}
                        for i, d in sorted(h.store.table.items())]
    assert h.request("GET", "/mappings/export?format=csv").status == 400


def test_export_streams_large_tables_in_pieces(h: Harness) -> None:
    h.store.table = {f"user{n:06d}": "node2" for n in range(20_000)}
    response = h.request("GET", "/mappings/export")
    assert response.body.count(b"\n") == 20_000


def test_export_from_a_store_that_cannot_list_is_501(h: Harness) -> None:
    h.runtime.router.store = MemoryStore(listable=False)
    response = h.request("GET", "/mappings/export")
    assert response.status == 501
    assert "cannot list" in response.json()["error"]


def test_import_tsv_reports_rejected_lines_and_counts(h: Harness) -> None:
    body = (b"# migrated wave 1\n"
            b"Alice\tnode2\n"
            b"bob\tnode2\n"        # already so: unchanged
            b"carol\tnode9\n"      # unknown destination
            b"da\"ve\tnode2\n"     # invalid identifier
            b"erin node1 extra\n"  # malformed
            b"frank\tnode1\n")
    h.runtime.router.resolve("alice")  # cached (negative) before the import
    summary = h.request("POST", "/mappings/import", body).json()
    assert summary["imported"] == 2 and summary["unchanged"] == 1
    assert summary["rows"] == 6 and summary["rejected_count"] == 3
    assert [(r["line"], r["reason"].split(" (")[0]) for r in summary["rejected"]] == [
        (4, "unknown destination 'node9'"), (5, "invalid identifier"),
        (6, "expected 'identifier<TAB>destination'")]
    assert h.store.table == {"alice": "node2", "bob": "node2", "frank": "node1"}
    assert len(h.runtime.router.cache) == 0  # imported rows are routable at once


def test_import_json_and_dry_run(h: Harness) -> None:
    body = json.dumps([{"identifier": "alice", "destination": "node2"},
                       ["carol", "node1"]]).encode()
    dry = h.request("POST", "/mappings/import?dry_run=true", body,
                    {b"Content-Type": b"application/json"}).json()
    assert dry["rows"] == 2 and dry["imported"] == 0 and dry["dry_run"] is True
    assert h.store.writes == 0
    summary = h.request("POST", "/mappings/import?format=json", body).json()
    assert summary["imported"] == 2
    assert h.store.table["carol"] == "node1"


def test_import_with_a_json_syntax_error_writes_nothing(h: Harness) -> None:
    body = b'[{"identifier": "alice", "destination": "node2"},\n{"identifier": oops}]'
    response = h.request("POST", "/mappings/import", body)
    assert response.status == 400
    assert response.json()["line"] == 2
    assert h.store.writes == 0


@pytest.mark.parametrize("query", ["format=csv", "dry_run=maybe"])
def test_import_parameter_errors(h: Harness, query: str) -> None:
    assert h.request("POST", f"/mappings/import?{query}", b"a\tnode1\n").status == 400


def test_import_in_batches(h: Harness) -> None:
    body = "".join(f"user{n:05d}\tnode{1 + n % 2}\n" for n in range(12_000)).encode()
    summary = h.request("POST", "/mappings/import", body).json()
    assert summary["imported"] == 12_000 and summary["rejected_count"] == 0
    assert h.store.table["user11999"] == "node2"
    again = h.request("POST", "/mappings/import", body).json()
    assert again["imported"] == 0 and again["unchanged"] == 12_000


# --- cache, sessions, delays ------------------------------------------------------------------


def test_cache_invalidate_one_or_all(h: Harness) -> None:
    for identifier in ("alice", "bob", "carol"):
        h.runtime.router.resolve(identifier)
    assert h.request("POST", "/cache/invalidate?identifier=ALICE").json() == {
        "identifier": "alice", "invalidated": 1}
    assert h.request("POST", "/cache/invalidate").json() == {
        "identifier": None, "invalidated": 2}


def test_kick_parameters(h: Harness) -> None:
    assert h.request("POST", "/connections/kick").status == 400
    assert h.request("POST", "/connections/kick?destination=node9").status == 404
    assert h.request("POST", "/connections/kick?identifier=alice").json()["kicked"] == 0
    assert h.request("POST", "/connections/kick", b'{"destination": "node2"}').json() == {
        "identifier": None, "destination": "node2", "kicked": 0}
    assert h.request("GET", "/connections").json() == {"connections": []}


def test_delay(h: Harness) -> None:
    response = h.request("POST", "/connections/delay?identifier=Alice&seconds=30")
    assert response.json() == {"identifier": "alice", "seconds": 30.0}
    assert h.runtime.delays.remaining("alice") == 30
    h.request("POST", "/connections/delay", b'{"identifier": "alice", "seconds": 0}')
    assert h.runtime.delays.remaining("alice") == 0


@pytest.mark.parametrize("seconds", ["-1", "nan", "inf", "3601", "abc", ""])
def test_delay_rejects_bad_seconds(h: Harness, seconds: str) -> None:
    response = h.request("POST", f"/connections/delay?identifier=alice&seconds={seconds}")
    assert response.status == 400


# --- configuration reload ---------------------------------------------------------------------


def test_config_reload(h: Harness) -> None:
    h.reloads = [["listener.imaps"], ConfigError(["routing.default_destination: required"])]
    assert h.request("POST", "/config/reload").json() == {
        "reloaded": True, "restart_required": ["listener.imaps"]}
    refused = h.request("POST", "/config/reload")
    assert refused.status == 400
    assert refused.json()["problems"] == ["routing.default_destination: required"]


def test_unexpected_errors_are_a_json_500_without_details(h: Harness) -> None:
    h.reloads = [RuntimeError("secret detail")]
    response = h.request("POST", "/config/reload")
    assert response.status == 500
    assert "secret detail" not in response.body.decode()


# --- logging ------------------------------------------------------------------------------------


def test_admin_actions_are_logged_with_identifiers_redacted(h: Harness) -> None:
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        h.request("PUT", "/mappings?identifier=alice.smith@example.com&destination=node2")
        h.request("POST", "/connections/delay", b'{"identifier": "alice.smith@example.com", '
                                                 b'"seconds": 5}')
        h.request("GET", "/stats", headers={b"Authorization": b"Bearer not-the-token"},
                  auth=False)
    finally:
        globalLogPublisher.removeObserver(events.append)
    from twisted.logger import formatEvent

    lines = [formatEvent(e) for e in events if e.get("log_namespace") == "stalroute.admin"]
    assert any("PUT /mappings?identifier=" + redact("alice.smith@example.com") in line
               for line in lines), lines
    assert any("missing or wrong bearer token" in line for line in lines)
    text = "\n".join(lines)
    assert "alice.smith" not in text and "example.com" not in text
    assert TOKEN not in text and "not-the-token" not in text


# --- OpenAPI and metrics ------------------------------------------------------------------------


def test_openapi_describes_exactly_the_routes(h: Harness) -> None:
    routes = {(rule.rule, method.lower()) for rule in AdminAPI.app.url_map.iter_rules()
              for method in rule.methods - {"HEAD", "OPTIONS"}}
    documented = {(path, method) for path, item in SPEC["paths"].items() for method in item}
    assert routes == documented
    served = h.request("GET", "/openapi.json").json()
    assert served == SPEC


def test_openapi_document_loads_in_schemathesis() -> None:
    schemathesis = pytest.importorskip("schemathesis")
    schema = schemathesis.openapi.from_dict(SPEC)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == sum(len(item) for item in SPEC["paths"].values())


def test_metrics_parse_and_reflect_the_runtime(h: Harness) -> None:
    h.runtime.router.resolve("bob")
    h.runtime.router.resolve("bob")
    h.runtime.router.resolve("alice")
    response = h.request("GET", "/metrics")
    assert response.status == 200
    assert response.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(response.body.decode())}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in families.values() for s in f.samples}
    assert samples[("stalroute_cache_hits_total", (("tier", "positive"),))] == 1
    assert samples[("stalroute_cache_misses_total", ())] == 2
    assert samples[("stalroute_destination_circuit_state",
                    (("destination", "node1"), ("state", "closed")))] == 1
    for name in ("stalroute_listener_active_connections", "stalroute_sessions_open",
                 "stalroute_sessions_spliced", "stalroute_bans", "stalroute_login_delays",
                 "stalroute_destination_circuit_trips", "stalroute_admin_lockouts",
                 "process_cpu_seconds"):
        assert name in families, name

    # A reload builds a new cache: the counters keep counting from where they were.
    h.service.runtime = build_runtime(h.clock, h.runtime.config, previous=h.runtime)
    h.service.runtime.router.store = h.store
    h.service.runtime.router.resolve("carol")
    again = {f.name: f for f in text_string_to_metric_families(
        h.request("GET", "/metrics").body.decode())}
    misses = [s.value for s in again["stalroute_cache_misses"].samples
              if s.name == "stalroute_cache_misses_total"]
    assert misses == [3]
