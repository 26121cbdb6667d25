"""The HTTP connection's Twisted glue in memory (``StringTransport``, ``MemoryReactorClock``):
login delays hold HTTP requests too, kicks reach SSE streams and keep-alive connections,
and every way a connection ends leaves no slot, registry entry or timer (issue 11 item 13).
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from stalroute.config import parse_config
from stalroute.control import Control
from stalroute.http.proxy import HTTPConnection, HTTPListenerFactory
from stalroute.inbound import CLOSE_GRACE
from stalroute.service import build_runtime

DELAY = 20.0


def document(tmp_path: Path) -> dict[str, Any]:
    (tmp_path / "mappings.tsv").write_text("")
    node = {"host": "127.0.0.1", "allow_plaintext_auth": True, "forwarding": "none",
            "protocol": {"http": {"port": 8080, "tls": "plain"}}}
    return {
        "server": {"hostname": "stalroute.test", "backend_connect_retries": 0},
        "listener": {"web": {"protocol": "http", "bind": ["127.0.0.1:80"], "tls": "plain"}},
        "destination": {"node1": node},
        "routing": {"default_destination": "node1"},
        "mapping": {"source": "file", "file": {"path": str(tmp_path / "mappings.tsv")}},
        "http": {"route": [{"match": "/jmap/**", "extract": {"from": "authorization"}}]},
    }


def request(user: str = "alice") -> bytes:
    credentials = base64.b64encode(f"{user}:secret".encode()).decode()
    return (f"GET /jmap/eventsource HTTP/1.1\r\nHost: mail.test\r\n"
            f"Authorization: Basic {credentials}\r\n\r\n").encode()


class Web:
    def __init__(self, tmp_path: Path) -> None:
        self.reactor = MemoryReactorClock()
        config = parse_config(document(tmp_path), tmp_path, {}, check_files=False)
        self.runtime = build_runtime(self.reactor, config)
        self.factory = HTTPListenerFactory(self.reactor, self.runtime, "web")
        self.control = Control(_Service(self))  # type: ignore[arg-type]

    def client(self) -> tuple[HTTPConnection, StringTransport]:
        connection = self.factory.buildProtocol(None)
        transport = StringTransport(hostAddress=IPv4Address("TCP", "127.0.0.1", 80),
                                    peerAddress=IPv4Address("TCP", "192.0.2.7", 40000))
        connection.makeConnection(transport)
        return connection, transport

    def backend(self) -> tuple[Protocol, StringTransport]:
        _host, _port, factory, _timeout, _bind = self.reactor.tcpClients.pop(0)
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 8080))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 8080))
        protocol.makeConnection(transport)
        return protocol, transport

    def assert_empty(self) -> None:
        assert self.runtime.registry.sessions == {}
        assert self.factory.active == 0 and self.factory.connections == set()
        assert self.reactor.getDelayedCalls() == []


class _Service:
    def __init__(self, web: Web) -> None:
        self.web = web
        self.reactor = web.reactor
        self.factories = {"web": web.factory}

    @property
    def runtime(self):
        return self.web.runtime


def lose(protocol: Protocol) -> None:
    protocol.connectionLost(Failure(ConnectionDone()))


@pytest.fixture
def web(tmp_path: Path) -> Web:
    return Web(tmp_path)


def test_a_login_delay_holds_http_requests_of_that_account(web):
    web.runtime.delays.delay("alice", DELAY)
    connection, client = web.client()
    connection.dataReceived(request("alice"))
    web.reactor.advance(DELAY - 1)
    assert web.reactor.tcpClients == []  # still held
    web.reactor.advance(1)
    assert len(web.reactor.tcpClients) == 1
    connection.dataReceived(b"")  # nothing else pending
    backend, server = web.backend()
    assert server.value().startswith(b"GET /jmap/eventsource")
    connection.close("done")
    lose(connection)
    lose(backend)
    web.assert_empty()


def test_a_client_that_leaves_during_a_delay_cancels_its_request(web):
    web.runtime.delays.delay("alice", DELAY)
    connection, client = web.client()
    connection.dataReceived(request("alice"))
    lose(connection)
    web.reactor.advance(DELAY)
    assert web.reactor.tcpClients == []
    web.assert_empty()


def test_a_kick_ends_an_sse_stream_of_the_account(web):
    connection, client = web.client()
    connection.dataReceived(request("alice"))
    backend, server = web.backend()
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n6\r\ndata:1\r\n")
    assert b"data:1" in client.value()
    assert [c["identifier"] for c in web.control.connections()] == ["alice"]
    assert web.control.kick(identifier="bob") == 0
    assert web.control.kick(identifier="alice") == 1
    assert client.disconnecting and server.disconnecting
    web.reactor.advance(CLOSE_GRACE)  # neither side answered the close: aborted
    lose(connection)
    lose(backend)
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
    connection.close("done")
    lose(connection)
    web.assert_empty()
