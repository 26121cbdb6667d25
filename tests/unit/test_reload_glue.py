"""Config reloads under live sessions, in memory (``StringTransport``, ``MemoryReactorClock``).

A reload swaps a new runtime into the listener factories, as the proxy service does; sessions
that are greeting, routing a login or spliced keep the runtime they started with and end
cleanly, new ones take the new one, and what outlives reloads (the registry, slot and per-IP
counts, metrics, circuit breakers) ends empty and counted once (issue 12: fast tests of the
Twisted glue).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from stalroute.closing import CLOSE_GRACE
from stalroute.config import parse_config
from stalroute.control import Control
from stalroute.inbound import ConnectionState, ListenerFactory
from stalroute.protocols import PROTOCOLS
from stalroute.runtime import Runtime, build_runtime
from stalroute.service import listener_after_reload
from stalroute.session import ClientSession, SessionFactory
from tests.harness.memory import accept, complete_connect, kicked, lose

OLD_PORT, NEW_PORT = 1143, 2143
GREETING = b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN] ready\r\n"
LOGIN = b"a1 LOGIN alice secret\r\n"


def document(tmp_path: Path, *, default: str = "node1", listener: str = "imap",
             max_connections: int = 10, max_per_ip: int = 0) -> dict[str, Any]:
    (tmp_path / "mappings.tsv").write_text("")

    def node(port: int) -> dict[str, Any]:
        return {"host": "127.0.0.1", "allow_plaintext_auth": True, "forwarding": "none",
                "protocol": {"imap": {"port": port, "tls": "plain"}}}

    return {
        "server": {"hostname": "stalroute.test", "backend_connect_retries": 0},
        "listener": {listener: {"protocol": "imap", "bind": ["127.0.0.1:143"], "tls": "plain",
                                "max_connections": max_connections,
                                "max_connections_per_ip": max_per_ip}},
        "capabilities": {"imap": {"allow_plain_auth_without_tls": True}},
        "destination": {"node1": node(OLD_PORT), "node2": node(NEW_PORT)},
        "routing": {"default_destination": default},
        "mapping": {"source": "file", "file": {"path": str(tmp_path / "mappings.tsv")}},
    }


class Proxy:
    """One IMAP listener on a memory reactor, reloaded the way the proxy service reloads.

    It is the :class:`~stalroute.control.RunningProxy` of a :class:`Control`, so kicks and
    listings see the current runtime."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.reactor = MemoryReactorClock()
        self.runtime: Runtime = build_runtime(self.reactor, self._config())
        self.factory = SessionFactory(self.reactor, self.runtime, "imap", PROTOCOLS["imap"])
        self.factories: dict[str, ListenerFactory] = {"imap": self.factory}
        self.control = Control(self)
        self.clients: list[tuple[ClientSession, StringTransport]] = []
        self.backends: list[tuple[Protocol, StringTransport, int]] = []

    def _config(self, **changes: Any):
        return parse_config(document(self.tmp_path, **changes), self.tmp_path, {},
                            check_files=False)

    def reload_config(self, **changes: Any) -> list[str]:
        """What ``ProxyService.reload_config`` swaps: the runtime, and each factory's runtime
        and listener settings."""
        self.runtime = build_runtime(self.reactor, self._config(**changes),
                                     previous=self.runtime)
        for factory in self.factories.values():
            factory.runtime = self.runtime
            factory.listener = listener_after_reload(factory.listener, self.runtime.config)
        return []

    def connect(self, peer: str = "192.0.2.7") -> tuple[ClientSession, StringTransport]:
        session, transport = accept(self.factory, 143, peer)
        assert isinstance(session, ClientSession)
        self.clients.append((session, transport))
        return session, transport

    def backend(self) -> tuple[Protocol, StringTransport, int]:
        """Complete the oldest pending backend connect: its protocol, transport and port."""
        protocol, transport, port = complete_connect(self.reactor)
        self.backends.append((protocol, transport, port))
        return protocol, transport, port

    def end_everything(self) -> None:
        """Let the close timers run out, then deliver every connection's loss (the clients'
        first), once each."""
        self.reactor.advance(CLOSE_GRACE)
        for session, transport in self.clients:
            lose(session, transport)
        for protocol, transport, _port in self.backends:
            lose(protocol, transport)

    def assert_empty(self) -> None:
        assert self.runtime.registry.sessions == {}
        assert self.factory.active == 0
        assert not self.factory.per_ip._counts
        assert self.reactor.getDelayedCalls() == []
        assert self.reactor.tcpClients == []


@pytest.fixture
def proxy(tmp_path: Path) -> Proxy:
    return Proxy(tmp_path)


STAGES = ("preauth", "delayed", "connecting", "greeting", "login", "spliced")


def advance_to(proxy: Proxy, stage: str) -> tuple[ClientSession, StringTransport]:
    """A session of the current runtime, brought to ``stage``."""
    session, client = proxy.connect()
    if stage == "preauth":
        return session, client
    if stage == "delayed":
        proxy.runtime.delays.delay("alice", 20.0)
    session.dataReceived(LOGIN)
    if stage in ("delayed", "connecting"):
        assert session.state is ConnectionState.ROUTING
        return session, client
    backend, _server, _port = proxy.backend()
    if stage == "greeting":
        return session, client
    backend.dataReceived(GREETING)
    if stage == "login":
        return session, client
    backend.dataReceived(b"a1 OK logged in\r\n")
    assert session.state is ConnectionState.SPLICED
    return session, client


def finish_login(proxy: Proxy, session: ClientSession, stage: str) -> int:
    """Carry a session on from ``stage`` to the splice; the backend port it went to."""
    if stage == "preauth":
        session.dataReceived(LOGIN)
    if stage == "delayed":
        proxy.reactor.advance(20.0)
    if stage in ("preauth", "delayed", "connecting"):
        proxy.backend()
    backend, _server, port = proxy.backends[-1]
    if stage in ("preauth", "delayed", "connecting", "greeting"):
        backend.dataReceived(GREETING)
    if stage != "spliced":
        backend.dataReceived(b"a1 OK logged in\r\n")
    assert session.state is ConnectionState.SPLICED
    return port


@pytest.mark.parametrize("stage", STAGES)
def test_a_session_keeps_its_runtime_across_a_reload_and_ends_cleanly(proxy, errors, stage):
    old = proxy.runtime
    session, client = advance_to(proxy, stage)
    proxy.reload_config(default="node2")
    assert proxy.factory.runtime is proxy.runtime is not old
    assert session.runtime is old
    assert finish_login(proxy, session, stage) == OLD_PORT  # routed by its own runtime
    newcomer, _client = proxy.connect("192.0.2.8")
    newcomer.dataReceived(LOGIN)
    assert proxy.backend()[2] == NEW_PORT  # a new session takes the new runtime
    assert {c["id"] for c in proxy.control.connections()} == {session.id}
    session.dataReceived(b"a2 LOGOUT\r\n")
    lose(session, client)  # the client leaves; its backend leg is closed
    proxy.end_everything()
    proxy.assert_empty()
    assert sum(proxy.runtime.metrics.sessions.values()) == 2
    assert errors == []


@pytest.mark.parametrize("stage", STAGES)
def test_a_kick_after_a_reload_reaches_a_session_of_the_old_runtime(proxy, errors, stage):
    session, client = advance_to(proxy, stage)
    proxy.reload_config(default="node2")
    finish_login(proxy, session, stage)
    assert kicked(proxy.control, identifier="alice") == 1
    assert client.disconnecting and session.outcome == "kicked"
    proxy.end_everything()
    proxy.assert_empty()
    assert proxy.runtime.metrics.sessions[("imap", "node1", "kicked")] == 1
    assert errors == []


@pytest.mark.parametrize("stage", STAGES)
def test_reloads_while_a_session_leaves_mid_login(proxy, errors, stage):
    session, client = advance_to(proxy, stage)
    proxy.reload_config(default="node2")
    lose(session, client)  # the client leaves: what it started is cancelled
    proxy.reload_config(default="node1")  # and another reload changes nothing for it
    if stage == "connecting":
        assert proxy.reactor.connectors[0].stoppedConnecting
        proxy.reactor.tcpClients.clear()
    proxy.end_everything()
    proxy.assert_empty()
    breaker = proxy.runtime.connector.breakers["node1"]
    assert breaker.failures == 0 and breaker.state == "closed"
    assert errors == []


def test_circuit_breakers_and_metrics_are_shared_with_sessions_of_the_old_runtime(
        proxy, errors):
    old = proxy.runtime
    session, client = advance_to(proxy, "connecting")
    proxy.reload_config()
    assert proxy.runtime.connector.breakers["node1"] is old.connector.breakers["node1"]
    _host, _port, factory, _timeout, _bind = proxy.reactor.tcpClients.pop(0)
    factory.clientConnectionFailed(proxy.reactor.connectors[0], Failure(ConnectionRefusedError()))
    assert b"a1 NO [UNAVAILABLE]" in client.value()
    assert proxy.runtime.connector.breakers["node1"].failures == 1  # seen by the new runtime
    lose(session, client)
    proxy.end_everything()
    proxy.assert_empty()
    assert proxy.runtime.metrics is old.metrics
    assert proxy.runtime.metrics.sessions[("imap", "node1", "tempfail")] == 1
    assert errors == []


def test_a_lower_max_connections_counts_the_sessions_of_before(proxy, errors):
    advance_to(proxy, "spliced")
    second, second_client = advance_to(proxy, "preauth")
    proxy.reload_config(max_connections=2)
    refused, refused_client = proxy.connect("192.0.2.9")
    assert refused_client.disconnected and proxy.factory.rejected == 1
    lose(refused, refused_client)
    lose(second, second_client)
    admitted, admitted_client = proxy.connect("192.0.2.9")
    assert admitted_client.value().startswith(b"* OK")
    proxy.end_everything()
    proxy.assert_empty()
    assert errors == []


def test_a_per_ip_limit_set_by_a_reload_counts_only_what_it_admits(proxy, errors):
    """Sessions admitted before the limit were not counted: ending them must not drive the
    count below zero or free a slot of the limit."""
    before, before_client = advance_to(proxy, "preauth")
    proxy.reload_config(max_per_ip=1)
    after, after_client = proxy.connect()
    assert after_client.value().startswith(b"* OK")
    lose(before, before_client)
    assert proxy.factory.per_ip._counts == {"192.0.2.7": 1}
    again, again_client = proxy.connect()
    assert again_client.disconnected  # still one of that client
    lose(again, again_client)
    proxy.end_everything()
    proxy.assert_empty()
    assert errors == []


def test_a_listener_the_reload_removes_keeps_serving_with_its_settings(proxy, errors):
    session, client = advance_to(proxy, "spliced")
    old_listener = proxy.factory.listener
    proxy.reload_config(listener="renamed", default="node2")
    assert proxy.factory.listener is old_listener
    newcomer, newcomer_client = proxy.connect("192.0.2.8")
    assert newcomer.listener is old_listener and newcomer.runtime is proxy.runtime
    newcomer.dataReceived(LOGIN)
    assert proxy.backend()[2] == NEW_PORT
    proxy.end_everything()
    proxy.assert_empty()
    assert errors == []
