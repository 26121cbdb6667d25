"""The HTTP connection's Twisted glue in memory (``StringTransport``, ``MemoryReactorClock``;
no server, no socket).

Login delays hold HTTP requests too, kicks reach SSE streams and keep-alive connections, a
client that does not read is not read either (issue 11 item 13). Whatever the order of client
close, backend close, kick, timer expiry and a config reload — during a server-sent event
stream, a WebSocket tunnel, an idle keep-alive connection or a request still being routed — a
connection leaves the registry and frees its slot exactly once, logs its request once, and
leaves no timer and no pending connect behind (issue 12).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport

from stalroute.acme.challenges import CHALLENGES
from stalroute.closing import CLOSE_GRACE
from stalroute.config import parse_config
from stalroute.control import Control
from stalroute.http.connection import HTTPConnection, HTTPListenerFactory
from stalroute.inbound import ConnectionState
from stalroute.outcomes import Outcome
from stalroute.runtime import Runtime, build_runtime
from stalroute.service import listener_after_reload
from tests.harness.memory import accept, complete_connect, kicked, lose

BRIDGE_IDLE = 600.0
RELAY_IDLE = 60.0
KEEPALIVE = 75.0
DELAY = 20.0


def document(tmp_path: Path) -> dict[str, Any]:
    (tmp_path / "mappings.tsv").write_text("")
    node = {"host": "127.0.0.1", "allow_plaintext_auth": True, "forwarding": "none",
            "protocol": {"http": {"port": 8080, "tls": "plain"}}}
    return {
        "server": {"hostname": "stalroute.test", "backend_connect_retries": 0,
                   "bridge_idle": f"{BRIDGE_IDLE:.0f}s"},
        "listener": {"web": {"protocol": "http", "bind": ["127.0.0.1:80"], "tls": "plain"}},
        "destination": {"node1": node},
        "routing": {"default_destination": "node1"},
        "mapping": {"source": "file", "file": {"path": str(tmp_path / "mappings.tsv")}},
        "http": {"relay_idle": f"{RELAY_IDLE:.0f}s", "keepalive_timeout": f"{KEEPALIVE:.0f}s",
                 "route": [{"match": "/jmap/**", "extract": {"from": "authorization"}}]},
    }


ALICE = b"Authorization: Basic YWxpY2U6c2VjcmV0\r\n"  # alice:secret
EVENTS = (b"GET /jmap/eventsource HTTP/1.1\r\nHost: mail.test\r\n" + ALICE + b"\r\n")
WEBSOCKET = (b"GET /jmap/ws HTTP/1.1\r\nHost: mail.test\r\n" + ALICE
             + b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
             b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
PLAIN = b"GET /jmap/session HTTP/1.1\r\nHost: mail.test\r\n" + ALICE + b"\r\n"


class Web:
    """One HTTP listener's factory on a memory reactor, its backend side, and the part of a
    reload that concerns live connections."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.reactor = MemoryReactorClock()
        self.runtime: Runtime = build_runtime(self.reactor, self.config())
        self.factory = HTTPListenerFactory(self.reactor, self.runtime, "web")
        self.factories = {"web": self.factory}
        self.control = Control(self)  # type: ignore[arg-type]

    def config(self):
        return parse_config(document(self.tmp_path), self.tmp_path, {}, check_files=False)

    def reload(self) -> None:
        """What ``ProxyService.reload_config`` does to listeners: a new runtime (handed the
        registry, bans, delays and metrics) for new connections; live ones keep theirs."""
        new = build_runtime(self.reactor, self.config(), previous=self.runtime)
        self.runtime = new
        self.factory.runtime = new
        self.factory.listener = listener_after_reload(self.factory.listener, new.config)

    def client(self) -> tuple[HTTPConnection, StringTransport]:
        connection, transport = accept(self.factory, 80)
        assert isinstance(connection, HTTPConnection)
        return connection, transport

    def backend(self) -> tuple[Protocol, StringTransport]:
        """Complete the oldest pending backend connect."""
        protocol, transport, _port = complete_connect(self.reactor)
        return protocol, transport

    def assert_empty(self) -> None:
        """Nothing of any connection is left: registry, slots, per-IP counts, timers."""
        assert self.runtime.registry.sessions == {}
        assert self.factory.active == 0 and self.factory.connections == set()
        assert not self.factory.per_ip._counts
        assert self.reactor.getDelayedCalls() == []
        assert self.reactor.tcpClients == []


@pytest.fixture
def web(tmp_path: Path) -> Web:
    return Web(tmp_path)


# -- delays, kicks, flow control -----------------------------------------------------------


def test_a_login_delay_holds_http_requests_of_that_account(web):
    web.runtime.delays.delay("alice", DELAY)
    connection, client = web.client()
    connection.dataReceived(EVENTS)
    web.reactor.advance(DELAY - 1)
    assert web.reactor.tcpClients == []  # still held
    web.reactor.advance(1)
    assert len(web.reactor.tcpClients) == 1
    connection.dataReceived(b"")  # nothing else pending
    backend, server = web.backend()
    assert server.value().startswith(b"GET /jmap/eventsource")
    connection.close(Outcome.KICKED)
    lose(connection, client)
    lose(backend, server)
    web.assert_empty()


def test_a_client_that_leaves_during_a_delay_cancels_its_request(web):
    web.runtime.delays.delay("alice", DELAY)
    connection, client = web.client()
    connection.dataReceived(EVENTS)
    lose(connection, client)
    web.reactor.advance(DELAY)
    assert web.reactor.tcpClients == []
    web.assert_empty()


def test_a_kick_ends_an_sse_stream_of_the_account(web):
    connection, client = web.client()
    connection.dataReceived(EVENTS)
    backend, server = web.backend()
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n6\r\ndata:1\r\n")
    assert b"data:1" in client.value()
    assert [c["identifier"] for c in web.control.connections()] == ["alice"]
    assert kicked(web.control, identifier="bob") == 0
    assert kicked(web.control, identifier="alice") == 1
    assert client.disconnecting and server.disconnecting
    web.reactor.advance(CLOSE_GRACE)  # neither side answered the close: aborted
    lose(connection, client)
    lose(backend, server)
    web.assert_empty()


def test_a_client_that_does_not_read_gets_no_next_response_and_is_not_read(web):
    connection, client = web.client()
    client.producer.pauseProducing()  # the client's socket buffer is full
    pipelined = b"GET /nowhere HTTP/1.1\r\nHost: mail.test\r\n\r\n" * 1000
    connection.dataReceived(pipelined)
    assert client.value() == b""  # no response while the client does not read
    assert client.producerState == "paused"  # and no more reading
    client.producer.resumeProducing()
    assert client.value().count(b"HTTP/1.1 404") == 1000  # nothing lost
    assert client.producerState == "producing"
    connection.close(Outcome.KICKED)
    lose(connection, client)
    web.assert_empty()


def test_reading_pauses_for_a_pipelined_request_only(web):
    """A client waiting for its response is still read (a pause and a resume of its
    transport per request would cost two system calls); bytes of a next request that
    arrive meanwhile stop the reading until the response is out."""
    connection, client, backend, server = kept_alive(web)
    connection.dataReceived(PLAIN)
    assert client.producerState == "producing"
    connection.dataReceived(PLAIN)  # pipelined behind the one being answered
    assert client.producerState == "paused"
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
    assert client.producerState == "producing"  # the pipelined one went to the backend
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
    assert client.value().count(b"HTTP/1.1 200 OK") == 3 and connection.exchange is None
    connection.close(Outcome.KICKED)
    lose(connection, client)
    lose(backend, server)
    web.assert_empty()


def test_each_request_is_routed_on_its_own_credentials(web):
    """The decision read from the last request's credentials is reused only for the same
    credentials on the same route."""
    connection, client, backend, server = kept_alive(web)
    assert connection.account == "alice"
    bob = b"Authorization: Basic Ym9iOnNlY3JldA==\r\n"  # bob:secret
    for head, account in ((bob, "bob"), (ALICE, "alice"), (ALICE, "alice"), (b"", None)):
        connection.dataReceived(b"GET /jmap/session HTTP/1.1\r\nHost: mail.test\r\n"
                                + head + b"\r\n")
        assert connection.exchange is not None and connection.exchange.account == account
        backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        assert connection.exchange is None
    connection.close(Outcome.KICKED)
    lose(connection, client)
    lose(backend, server)
    web.assert_empty()


# -- the situations a connection may be in when its endings begin -------------------------


def streaming(web: Web) -> tuple[HTTPConnection, StringTransport, Protocol, StringTransport]:
    """An SSE response under way."""
    connection, client = web.client()
    connection.dataReceived(EVENTS)
    backend, server = web.backend()
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n6\r\ndata:1\r\n")
    assert b"data:1" in client.value()
    return connection, client, backend, server


def tunnelled(web: Web) -> tuple[HTTPConnection, StringTransport, Protocol, StringTransport]:
    """A WebSocket tunnel, bytes relayed both ways."""
    connection, client = web.client()
    connection.dataReceived(WEBSOCKET)
    backend, server = web.backend()
    backend.dataReceived(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                         b"Upgrade: websocket\r\n\r\n\x81\x02hi")
    assert connection.state is ConnectionState.SPLICED
    assert client.value().endswith(b"\x81\x02hi")
    connection.dataReceived(b"\x81\x02yo")
    assert server.value().endswith(b"\x81\x02yo")
    return connection, client, backend, server


def kept_alive(web: Web) -> tuple[HTTPConnection, StringTransport, Protocol, StringTransport]:
    """A response done; the client and the pooled backend connection wait for more."""
    connection, client = web.client()
    connection.dataReceived(PLAIN)
    backend, server = web.backend()
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
    assert client.value().endswith(b"\r\n\r\n{}") and connection.exchange is None
    assert connection.pool.take("node1") is not None
    return connection, client, backend, server


SITUATIONS: dict[str, tuple[Callable[[Web], Any], float]] = {
    # name: (how to get there, the timer that ends it)
    "sse": (streaming, BRIDGE_IDLE),
    "websocket": (tunnelled, BRIDGE_IDLE),
    "keepalive": (kept_alive, KEEPALIVE),
}
ENDINGS = ("client_lost", "backend_lost", "kick", "timer", "reload")


@pytest.mark.parametrize("situation", list(SITUATIONS))
@pytest.mark.parametrize("order", list(itertools.permutations(ENDINGS)),
                         ids=lambda order: "-".join(order))
def test_every_order_of_endings_leaves_nothing(tmp_path, situation, order, errors):
    web = Web(tmp_path)
    reach, timer = SITUATIONS[situation]
    connection, client, backend, server = reach(web)
    for ending in order:
        if ending == "client_lost":
            lose(connection, client, clean=False)
        elif ending == "backend_lost":
            lose(backend, server)
        elif ending == "kick":
            web.control.kick(identifier="alice")
        elif ending == "timer":
            web.reactor.advance(timer)
        elif ending == "reload":
            web.reload()
        # A transport told to close (or aborted) ends in connectionLost.
        if client.disconnecting:
            lose(connection, client)
        if server.disconnecting:
            lose(backend, server)
    web.reactor.advance(CLOSE_GRACE)
    assert connection.state is ConnectionState.CLOSED
    web.assert_empty()
    assert sum(web.runtime.metrics.sessions.values()) == 1  # the one request, logged once
    assert web.factory.probes == 0
    assert errors == []


ROUTING_ENDINGS = ("client_lost", "kick", "timer", "reload")


@pytest.mark.parametrize("order", list(itertools.permutations(ROUTING_ENDINGS)),
                         ids=lambda order: "-".join(order))
def test_every_order_of_endings_while_connecting_leaves_nothing(web, order, errors):
    """The backend connect is pending: the client goes, is kicked, or the request times out
    (504) — the connect is abandoned either way."""
    connection, client = web.client()
    connection.dataReceived(PLAIN)
    assert len(web.reactor.tcpClients) == 1
    for ending in order:
        if ending == "client_lost":
            lose(connection, client, clean=False)
        elif ending == "kick":
            web.control.kick(identifier="alice")
        elif ending == "timer":
            web.reactor.advance(RELAY_IDLE)
        elif ending == "reload":
            web.reload()
        if client.disconnecting:
            lose(connection, client)
    assert web.reactor.connectors[0].stoppedConnecting  # the pending connect was cancelled
    web.reactor.tcpClients.clear()
    web.reactor.advance(CLOSE_GRACE)
    web.assert_empty()
    assert sum(web.runtime.metrics.sessions.values()) == 1
    assert errors == []


def test_a_request_held_by_a_login_delay_times_out_with_504_and_never_connects(web, errors):
    web.runtime.delays.delay("alice", 3 * RELAY_IDLE)
    connection, client = web.client()
    connection.dataReceived(PLAIN)
    web.reactor.advance(RELAY_IDLE)
    assert client.value().startswith(b"HTTP/1.1 504 ") and client.disconnecting
    lose(connection, client)
    web.reactor.advance(3 * RELAY_IDLE)
    web.assert_empty()
    assert web.runtime.metrics.sessions == {("http", "-", "timeout"): 1}
    assert errors == []


def test_a_connection_from_before_a_reload_is_still_kicked_and_counted(web, errors):
    connection, client, backend, server = streaming(web)
    old = connection.runtime
    web.reload()
    assert connection.runtime is old and web.factory.runtime is not old
    assert [c["id"] for c in web.control.connections()] == [connection.id]
    assert kicked(web.control, identifier="alice") == 1
    lose(connection, client)
    lose(backend, server)
    web.assert_empty()
    assert web.runtime.metrics.sessions == {("http", "node1", "client_closed"): 1}
    assert errors == []


def test_a_retry_in_flight_is_abandoned_when_the_client_leaves(web, errors):
    """A reused backend connection died before answering: the request goes again on a new
    one; the client leaving meanwhile cancels that connect."""
    connection, client, backend, server = kept_alive(web)
    connection.dataReceived(PLAIN)
    assert server.value().count(b"GET /jmap/session") == 2
    lose(backend, server)  # before any answer: retried on a fresh connection
    assert len(web.reactor.tcpClients) == 1
    lose(connection, client, clean=False)
    assert web.reactor.connectors[-1].stoppedConnecting
    web.reactor.tcpClients.clear()
    web.reactor.advance(CLOSE_GRACE)
    web.assert_empty()
    assert errors == []


def test_a_connect_and_close_probe_is_counted_as_a_probe_only(web, errors):
    connection, client = web.client()
    lose(connection, client)
    web.assert_empty()
    assert web.factory.probes == 1
    assert web.runtime.metrics.sessions == {}  # HTTP counts requests, not connections
    assert errors == []


def test_a_drained_idle_connection_closes_and_a_busy_one_after_its_response(web, errors):
    idle, idle_client, idle_backend, idle_server = kept_alive(web)
    busy, busy_client = web.client()
    busy.dataReceived(PLAIN)
    busy_backend, busy_server = web.backend()
    web.factory.stopFactory()
    assert idle_client.disconnecting and idle.outcome == "shutdown"
    assert not busy_client.disconnecting
    busy_backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
    assert b"connection: close" in busy_client.value().lower() and busy_client.disconnecting
    for protocol, transport in ((idle, idle_client), (busy, busy_client),
                                (idle_backend, idle_server), (busy_backend, busy_server)):
        lose(protocol, transport)
    web.assert_empty()
    assert errors == []


def test_an_acme_http01_validation_is_answered_before_any_routing(web):
    CHALLENGES.add_http01("tok-en_1", "tok-en_1.thumbprint")
    try:
        connection, client = web.client()
        connection.dataReceived(b"GET /.well-known/acme-challenge/tok-en_1 HTTP/1.1\r\n"
                                b"Host: mail.test\r\n\r\n")
        answer = client.value()
        assert answer.startswith(b"HTTP/1.1 200 ")
        assert b"Content-Type: application/octet-stream\r\n" in answer
        assert b"application/json" not in answer
        assert answer.endswith(b"\r\n\r\ntok-en_1.thumbprint")
        assert web.reactor.tcpClients == []  # no backend, no route needed
        connection.dataReceived(b"GET /.well-known/acme-challenge/other HTTP/1.1\r\n"
                                b"Host: mail.test\r\n\r\n")
        assert client.value().count(b"HTTP/1.1 404 ") == 1  # unknown token: routed as usual
    finally:
        CHALLENGES.remove_http01("tok-en_1")
    lose(connection, client)
    web.assert_empty()
