"""Issue 11 (hardening), in-process: a reload that removes or renames a listener, the
reference product's ``/stats`` keys, and admin or reload errors that must stay clear answers
(bulk JSON the decoder cannot take, request heads over 16 KiB, a refused mapping file,
failures nobody foresaw, a port already in use).

The admin API runs on the :class:`tests.unit.test_admin_app.Harness` (a Clock, an in-memory
store); the service parts run a real :class:`~stalroute.service.ProxyService` built from a
TOML file, with its listener factories but no socket.
"""

from __future__ import annotations

import copy
import errno
import io
import json
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.address import IPv4Address
from twisted.internet.defer import maybeDeferred
from twisted.internet.error import CannotListenError
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent, globalLogPublisher

from stalroute.admin import bulk
from stalroute.admin.metrics import metrics_registry, render
from stalroute.config import load_config
from stalroute.control import Control
from stalroute.mapping.file import FileMappingStore
from stalroute.runtime import StartupError, bind_refused, build_runtime
from stalroute.service import RETIRE_DELAY, ProxyService, listener_after_reload
from tests.harness.stalroute import dump_toml
from tests.unit.test_admin_app import AUTH, Harness, document

CLIENT = IPv4Address("TCP", "10.0.0.1", 40000)


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    return Harness(tmp_path)


@pytest.fixture
def events():
    captured: list[dict] = []
    globalLogPublisher.addObserver(captured.append)
    yield captured
    globalLogPublisher.removeObserver(captured.append)


# --- a service built from a file, with listener factories but no sockets -------------------------


def two_listener_document(tmp_path: Path) -> dict:
    config = copy.deepcopy(document(tmp_path))
    config["destination"]["node1"]["protocol"]["pop3"] = {"port": 1995, "tls": "implicit"}
    config["listener"]["pop3s"] = {"protocol": "pop3", "bind": ["127.0.0.1:0"],
                                   "tls": "implicit"}
    return config


class ServiceHarness:
    """A ProxyService on a Clock whose configuration file the test rewrites."""

    def __init__(self, tmp_path: Path) -> None:
        self.path = tmp_path / "stalroute.toml"
        self.document = two_listener_document(tmp_path)
        self.path.write_text(dump_toml(self.document))
        self.clock = Clock()
        self.service = ProxyService(self.clock, load_config(self.path, env={}))
        for name, listener in self.service.runtime.config.listeners.items():
            self.service.factories[name] = self.service._factory_for(name, listener.protocol)
        self.control = Control(self.service)

    def rewrite(self, change) -> None:
        change(self.document["listener"])
        self.path.write_text(dump_toml(self.document))


@pytest.fixture
def served(tmp_path: Path) -> ServiceHarness:
    return ServiceHarness(tmp_path)


# --- item 3: reloads that remove or rename listeners ------------------------------------------


def test_a_removed_or_renamed_listener_keeps_its_settings(served: ServiceHarness) -> None:
    started = dict(served.service.runtime.config.listeners)

    def rename_and_remove(listeners: dict) -> None:
        listeners["imaps_new"] = listeners.pop("imaps")
        del listeners["pop3s"]

    served.rewrite(rename_and_remove)
    assert served.service.reload_config() == ["listener.imaps", "listener.imaps_new",
                                              "listener.pop3s"]
    for name, factory in served.service.factories.items():
        assert factory.runtime is served.service.runtime  # new logins use the new runtime...
        assert factory.listener is started[name]  # ...on the port's own settings
        session = factory.buildProtocol(CLIENT)
        assert session.listener is started[name]
    stats = served.control.stats()
    assert {name: s["protocol"] for name, s in stats["listeners"].items()} == {
        "imaps": "imap", "pop3s": "pop3"}
    exposition = render(metrics_registry([served.control.report()], None)).decode()
    families = {f.name for f in text_string_to_metric_families(exposition)}
    assert "stalroute_listener_active_connections" in families


def test_a_listener_kept_by_a_reload_takes_its_new_settings(served: ServiceHarness) -> None:
    served.rewrite(lambda listeners: listeners["imaps"].update(preauth_timeout="7s"))
    assert served.service.reload_config() == ["listener.imaps"]
    assert served.service.factories["imaps"].listener.preauth_timeout == 7.0


def test_a_replaced_store_stays_open_while_a_connection_may_still_route(
        served: ServiceHarness) -> None:
    """A session in pre-auth (or held by a login delay) when a reload happens routes its login
    through the runtime it started with, however long after the reload that is."""
    old = served.service.runtime
    closed: list[bool] = []
    old.router.store.close = lambda: closed.append(True)  # type: ignore[method-assign]
    waiting = SimpleNamespace(id="1-waiting", runtime=old, may_route=True)
    old.registry.sessions[waiting.id] = waiting  # type: ignore[assignment]
    served.service.reload_config()
    served.clock.advance(10 * RETIRE_DELAY)
    assert closed == []
    waiting.may_route = False  # its login was spliced (or it left)
    served.clock.advance(RETIRE_DELAY)
    assert closed == [True]
    del old.registry.sessions[waiting.id]


def test_a_listener_whose_protocol_changed_keeps_its_old_settings(served: ServiceHarness) -> None:
    running = served.service.factories["pop3s"].listener
    served.rewrite(lambda listeners: listeners["pop3s"].update(protocol="imap"))
    assert listener_after_reload(running, load_config(served.path, env={})) is running


# --- item 11: the reference /stats keys -----------------------------------------------------------


def test_stats_carry_the_reference_keys(h: Harness) -> None:
    for identifier in ("bob", "bob", "bob", "alice", "alice"):  # 2 misses, 3 hits
        h.runtime.router.resolve(identifier)
    listeners = h.runtime.config.listeners
    h.service.factories = {
        "imaps": SimpleNamespace(listener=listeners["imaps"], active=2, rejected=0, probes=0),
        "other": SimpleNamespace(listener=listeners["imaps"], active=3, rejected=1, probes=0)}
    stats = h.request("GET", "/stats").json()
    assert {key: stats[key] for key in ("cache_hits", "cache_misses", "hit_rate_pct",
                                        "cache_entries", "active_connections")} == {
        "cache_hits": 3, "cache_misses": 2, "hit_rate_pct": 60.0, "cache_entries": 2,
        "active_connections": 5}
    assert stats["cache"]["counters"] == {"miss": 2, "hit:positive": 2, "hit:negative": 1}
    assert stats["listeners"]["other"]["active_connections"] == 3


def test_remembered_store_failures_are_neither_hits_nor_misses(h: Harness) -> None:
    assert h.request("GET", "/stats").json()["hit_rate_pct"] == 0.0  # nothing looked up yet
    h.store.failing = True
    for _ in range(3):
        h.runtime.router.resolve("bob").addErrback(lambda _: None)
    stats = h.request("GET", "/stats").json()
    assert (stats["cache_hits"], stats["cache_misses"], stats["hit_rate_pct"]) == (0, 1, 0.0)
    assert stats["cache"]["counters"]["hit:transient"] == 2


def test_cache_counters_count_across_reloads(h: Harness) -> None:
    h.runtime.router.resolve("bob")
    h.runtime.router.resolve("bob")
    reloaded = build_runtime(h.clock, h.runtime.config, previous=h.runtime)
    reloaded.router.store = h.store
    h.service.runtime = reloaded
    reloaded.router.resolve("bob")  # a miss: the new cache is empty
    stats = h.request("GET", "/stats").json()
    assert (stats["cache_hits"], stats["cache_misses"], stats["cache_entries"]) == (1, 2, 1)


def test_the_openapi_document_describes_the_reference_keys() -> None:
    from stalroute.admin.openapi import SPEC

    schema = SPEC["paths"]["/stats"]["get"]["responses"]["200"]["content"][
        "application/json"]["schema"]
    assert {"cache_hits", "cache_misses", "hit_rate_pct", "cache_entries",
            "active_connections"} <= set(schema["properties"])


# --- item 8: bulk JSON the decoder cannot take ----------------------------------------------------


@pytest.mark.parametrize(("body", "message"), [
    (b"[" * 100_000, "nested too deeply"),
    (b"[" + b"[" * 5000 + b"]" * 5000 + b"]", "nested too deeply"),
    (b'[\n["alice", ' + b"1" * 5000 + b"]]", "number longer than"),
    (b'{"identifier": "a", "destination": ' + b"9" * 100_000 + b"}", "number longer than"),
])
def test_import_of_json_the_decoder_refuses_is_a_400(h: Harness, body: bytes,
                                                     message: str) -> None:
    response = h.request("POST", "/mappings/import?format=json", body)
    assert response.status == 400, response.body[:300]
    assert message in response.json()["error"]
    assert h.store.writes == 0
    with pytest.raises(bulk.BulkFormatError, match=message):
        list(bulk.read_json(io.BytesIO(body)))


def test_a_huge_number_names_its_line() -> None:
    body = b'[\n["alice", "node1"],\n["bob", ' + b"1" * 5000 + b"]\n]"
    with pytest.raises(bulk.BulkFormatError) as raised:
        list(bulk.read_json(io.BytesIO(body)))
    assert raised.value.line == 3


# --- item 8: request heads twisted.web will not read ----------------------------------------------


def connect(h: Harness) -> tuple[object, StringTransport]:
    h.site.reactor = h.clock  # the channel's timeouts run on the test clock
    channel = h.site.buildProtocol(CLIENT)
    transport = StringTransport(peerAddress=CLIENT)
    channel.makeConnection(transport)
    return channel, transport


def answer(transport: StringTransport) -> tuple[int, dict]:
    head, _, body = transport.value().partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)


@pytest.mark.parametrize(("head", "status"), [
    (b"GET /stats?identifier=" + b"a" * 20_000 + b" HTTP/1.1\r\n", 414),
    (b"GET /stats?identifier=" + b"a" * 20_000, 414),  # no end of line yet
    (b"GET /stats HTTP/1.1\r\nX-Filler: " + b"b" * 20_000 + b"\r\n", 431),
    (b"GET /stats HTTP/1.1\r\n" + b"X-Filler: " + b"c" * 8000 + b"\r\n" * 1
     + b"X-More: " + b"d" * 9000 + b"\r\n\r\n", 431),  # each line fits, the head does not
    (b"NONSENSE\r\n\r\n", 400),
])
def test_a_head_that_cannot_be_read_is_answered_and_closed(h: Harness, head: bytes,
                                                          status: int) -> None:
    channel, transport = connect(h)
    for start in range(0, len(head), 4096):  # as a client would send it, in pieces
        channel.dataReceived(head[start:start + 4096])
    got, body = answer(transport)
    assert got == status
    assert "error" in body
    assert transport.disconnecting
    written = transport.value()
    channel.dataReceived(b"b" * 50_000 + b"\r\n\r\n")  # the rest of the request is dropped
    assert transport.value() == written
    h.clock.advance(channel.abortTimeout)  # a client that never closes is cut off
    assert transport.disconnected


def test_a_normal_request_on_the_channel_still_works(h: Harness) -> None:
    channel, transport = connect(h)
    channel.dataReceived(b"GET /stats HTTP/1.1\r\nHost: x\r\nAuthorization: "
                         + AUTH[b"Authorization"] + b"\r\n\r\n")
    for _ in range(100):
        h.clock.advance(0)
    assert transport.value().startswith(b"HTTP/1.1 200")
    assert not transport.disconnecting


# --- item 8: a refused mapping file, through every caller ----------------------------------------

BAD_MAPPING_FILES = {
    "non-UTF-8": b"bob\tnode2\n\xff\xfe\tnode1\n",
    "invalid identifier": b"bob\tnode2\ncar\x00ol\tnode1\n",
}


@pytest.mark.parametrize("bad", sorted(BAD_MAPPING_FILES))
def test_mappings_reload_refuses_a_bad_file_naming_file_and_line(
        h: Harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bad: str) -> None:
    monkeypatch.setattr("stalroute.mapping.file.deferToThread", maybeDeferred)  # on the clock
    path = tmp_path / "mappings.tsv"
    path.write_text("bob\tnode2\n")
    store = FileMappingStore(path, h.runtime.config.destinations, "lowercase")
    h.runtime.router.store = store
    path.write_bytes(BAD_MAPPING_FILES[bad])
    response = h.request("POST", "/mappings/reload")
    assert response.status == 400, response.body
    error = response.json()
    assert str(path) in error["error"] and "line 2" in error["error"]
    assert any(problem.startswith("line 2") for problem in error["problems"])
    assert len(store) == 1  # the old table is kept


@pytest.mark.parametrize("bad", sorted(BAD_MAPPING_FILES))
def test_sighup_with_a_bad_mapping_file_logs_one_refusal(served: ServiceHarness, events,
                                                         bad: str) -> None:
    path = Path(served.document["mapping"]["file"]["path"])
    running = served.service.runtime
    path.write_bytes(BAD_MAPPING_FILES[bad])
    with pytest.raises(StartupError, match="line 2"):
        served.service.reload_config()
    served.service._reload_on_signal()
    assert served.service.runtime is running
    refusals = [event for event in events if "reload refused" in (formatEvent(event) or "")]
    assert len(refusals) == 1 and "log_failure" not in refusals[0]  # one line, no traceback
    assert str(path) in formatEvent(refusals[0]) and "line 2" in formatEvent(refusals[0])


# --- item 8: failures nobody foresaw ------------------------------------------------------------


def test_an_answer_that_cannot_be_encoded_is_a_json_500(h: Harness, events) -> None:
    h.control.stats = lambda: {"unencodable": object()}
    response = h.request("GET", "/stats")
    assert response.status == 500
    assert response.json() == {"error": "internal error (see the stalroute log)"}
    assert any(event.get("log_failure") is not None for event in events)


def test_a_kick_that_raises_is_a_json_500_logged(h: Harness, events) -> None:
    def broken(**_):
        raise AttributeError("'Server' object has no attribute 'protocol'")

    h.control.kick = broken
    response = h.request("POST", "/connections/kick?identifier=alice")
    assert response.status == 500
    assert response.json() == {"error": "internal error (see the stalroute log)"}
    assert "no attribute 'protocol'" in "".join(
        event["log_failure"].getErrorMessage() for event in events if "log_failure" in event)


# --- newcomer friction: a port already in use ---------------------------------------------------


def test_a_port_in_use_is_named_with_its_listener() -> None:
    error = CannotListenError("0.0.0.0", 993, OSError(errno.EADDRINUSE, "in use"))
    assert str(bind_refused("listener.imaps", "0.0.0.0", 993, error)) == \
        "listener.imaps: cannot bind 0.0.0.0:993: address already in use"
    error = CannotListenError("::", 993, socket.error(errno.EACCES, "denied"))
    assert str(bind_refused("admin", "::", 993, error)) == \
        "admin: cannot bind [::]:993: permission denied"
