"""Admission of client connections in memory: :class:`InboundConnection` through its two
subclasses (the mail :class:`ClientSession`, server-first, and the :class:`HTTPConnection`,
client-first) on ``StringTransport`` s, or ``iosim`` with real TLS, and a
``MemoryReactorClock``.

PROXY headers in every listener mode (``off``, ``optional``, ``required``, ``deferred``):
split across reads, sent with the first protocol bytes (or the TLS ClientHello), late,
invalid, from an untrusted peer, or a LOCAL health check; then the connection limits. Each
way a connection ends must give back its slot, its per-IP count and its registry entry, leave
no timer, and never touch the bans (issue 12: fast tests of the Twisted glue).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from stalroute.closing import CLOSE_GRACE
from stalroute.config import parse_config
from stalroute.http.connection import HTTPListenerFactory
from stalroute.outcomes import Outcome
from stalroute.inbound import ConnectionState, InboundConnection, ListenerFactory
from stalroute.protocols import PROTOCOLS
from stalroute.proxyproto import encode_v1, encode_v2
from stalroute.runtime import build_runtime
from stalroute.session import SessionFactory
from tests.harness.memory import client_options_without_verification, connect

HEADER_TIMEOUT = 5.0
BALANCER = "10.0.0.1"  # in proxy_trusted
STRANGER = "192.0.2.50"  # not
REAL = ("203.0.113.7", 40123)
OTHER_REAL = ("203.0.113.8", 40124)
LISTENER = ("127.0.0.1", 143)
HEADERS = {
    "v1": encode_v1(REAL, LISTENER),
    "v2": encode_v2(REAL, LISTENER),
}
LOCAL_HEADERS = {
    "v2-local": encode_v2(None, None),
    "v1-unknown": b"PROXY UNKNOWN\r\n",
}
#: What each protocol's client sends first, and how the answer begins.
FIRST_BYTES = {"imap": b"a1 CAPABILITY\r\n",
               "http": b"GET /nothing HTTP/1.1\r\nHost: mail.test\r\n\r\n"}
ANSWER = {"imap": b"* CAPABILITY", "http": b"HTTP/1.1 404 "}
GREETING = b"* OK"


def document(tmp_path: Path, protocol: str, tls: str, listener: dict[str, Any]) -> dict[str, Any]:
    (tmp_path / "mappings.tsv").write_text("")
    node = {"host": "127.0.0.1", "allow_plaintext_auth": True, "forwarding": "none",
            "protocol": {protocol: {"port": 1143, "tls": "plain"}}}
    return {
        "server": {"hostname": "stalroute.test", "backend_connect_retries": 0},
        "listener": {"front": {"protocol": protocol, "bind": [f"{LISTENER[0]}:{LISTENER[1]}"],
                               "tls": tls, "proxy_trusted": [f"{BALANCER}/32"],
                               "proxy_header_timeout": f"{HEADER_TIMEOUT:.0f}s", **listener}},
        "capabilities": {"imap": {"allow_plain_auth_without_tls": True}},
        "security": {"auth_fail_ban_threshold": 1},  # a single refused login would ban
        "destination": {"node1": node},
        "routing": {"default_destination": "node1"},
        "mapping": {"source": "file", "file": {"path": str(tmp_path / "mappings.tsv")}},
        "http": {"route": [{"match": "/jmap/**", "extract": {"from": "authorization"}}]},
    }


@dataclass
class Client:
    """One accepted connection on a ``StringTransport``."""

    connection: InboundConnection
    transport: StringTransport

    def send(self, data: bytes) -> None:
        self.connection.dataReceived(data)

    @property
    def refused(self) -> bool:
        """Aborted without a byte written (no greeting, no answer)."""
        return self.transport.disconnected and self.transport.value() == b""

    def lose(self) -> None:
        """The connection loss a closing (or aborted) transport ends in, once."""
        if self.connection.state is not ConnectionState.CLOSED:
            self.connection.connectionLost(Failure(ConnectionDone()))


class Listener:
    """One listener's factory (IMAP sessions or HTTP connections) on a memory reactor."""

    def __init__(self, tmp_path: Path, protocol: str = "imap", tls: str = "plain",
                 **listener: Any) -> None:
        self.protocol = protocol
        self.reactor = MemoryReactorClock()
        config = parse_config(document(tmp_path, protocol, tls, listener), tmp_path, {},
                              check_files=False)
        self.runtime = build_runtime(self.reactor, config)
        self.factory: ListenerFactory
        if protocol == "http":
            self.factory = HTTPListenerFactory(self.reactor, self.runtime, "front")
        else:
            self.factory = SessionFactory(self.reactor, self.runtime, "front",
                                          PROTOCOLS[protocol])

    def connect(self, peer: str = BALANCER, port: int = 50000) -> Client:
        connection = self.factory.buildProtocol(None)
        transport = StringTransport(hostAddress=IPv4Address("TCP", *LISTENER),
                                    peerAddress=IPv4Address("TCP", peer, port))
        connection.makeConnection(transport)
        return Client(connection, transport)

    def greeted(self, client: Client) -> bool:
        """The protocol began: a server-first protocol greeted, a client-first one waits for
        its request (no PROXY header is awaited any more)."""
        if self.protocol == "http":
            return client.connection.state is ConnectionState.HTTP
        return client.transport.value().startswith(GREETING)

    def outcomes(self) -> dict[str, int]:
        """Sessions counted so far, by outcome (HTTP counts requests instead)."""
        return {outcome: count for (_p, _d, outcome), count
                in self.runtime.metrics.sessions.items() if count}

    def assert_empty(self, bans: int = 0) -> None:
        """Nothing of any connection is left, and no ban but ``bans`` was given."""
        assert self.runtime.registry.sessions == {}
        assert self.factory.active == 0
        assert not self.factory.per_ip._counts
        assert self.reactor.getDelayedCalls() == []
        assert self.reactor.tcpClients == []
        assert self.runtime.bans.bans == bans
        if isinstance(self.factory, HTTPListenerFactory):
            assert self.factory.connections == set()


BOTH = pytest.mark.parametrize("protocol", ["imap", "http"])


# -- off -------------------------------------------------------------------------------------


def test_off_takes_a_header_for_protocol_bytes_even_from_a_trusted_peer(tmp_path, errors):
    listener = Listener(tmp_path, proxy_protocol="off")
    client = listener.connect(BALANCER)
    assert listener.greeted(client)
    client.send(HEADERS["v1"])
    assert b"BAD" in client.transport.value()
    assert client.connection.client == (BALANCER, 50000)
    client.lose()
    assert listener.outcomes() == {"client_closed": 1}
    listener.assert_empty()
    assert errors == []


# -- the header is read -----------------------------------------------------------------------


@BOTH
@pytest.mark.parametrize("mode", ["required", "optional"])
@pytest.mark.parametrize("version", sorted(HEADERS))
def test_a_header_split_across_reads_names_the_client(tmp_path, errors, protocol, mode,
                                                        version):
    listener = Listener(tmp_path, protocol, proxy_protocol=mode)
    client = listener.connect()
    header = HEADERS[version]
    for offset in range(0, len(header), 5):
        assert not listener.greeted(client)  # nothing happens before the client is known
        client.send(header[offset:offset + 5])
    assert listener.greeted(client)
    assert client.connection.client == REAL and client.connection.local == LISTENER
    client.send(FIRST_BYTES[protocol])
    assert ANSWER[protocol] in client.transport.value()
    client.lose()
    listener.assert_empty()
    assert errors == []


@BOTH
@pytest.mark.parametrize("mode", ["required", "optional", "deferred"])
def test_a_header_and_the_first_bytes_in_one_read(tmp_path, errors, protocol, mode):
    listener = Listener(tmp_path, protocol, proxy_protocol=mode, max_connections_per_ip=1)
    client = listener.connect()
    client.send(HEADERS["v2"] + FIRST_BYTES[protocol])
    assert ANSWER[protocol] in client.transport.value()
    assert client.connection.client == REAL
    assert listener.factory.per_ip._counts == {REAL[0]: 1}  # the real client is counted
    client.lose()
    listener.assert_empty()
    assert errors == []


def test_deferred_greets_first_and_learns_the_client_from_its_first_bytes(tmp_path, errors):
    listener = Listener(tmp_path, proxy_protocol="deferred")
    client = listener.connect()
    assert listener.greeted(client)  # a server-first client would wait for the greeting
    assert client.connection.client == (BALANCER, 50000)
    client.send(HEADERS["v1"][:7])
    client.send(HEADERS["v1"][7:] + FIRST_BYTES["imap"])
    assert client.connection.client == REAL
    assert ANSWER["imap"] in client.transport.value()
    client.lose()
    listener.assert_empty()
    assert errors == []


@pytest.mark.parametrize("mode", ["optional", "deferred"])
def test_a_trusted_peer_may_send_no_header(tmp_path, errors, mode):
    listener = Listener(tmp_path, proxy_protocol=mode)
    client = listener.connect()
    if mode == "optional":  # a server-first client waits for the greeting until the timeout
        assert not listener.greeted(client)
        listener.reactor.advance(HEADER_TIMEOUT)
        assert listener.greeted(client)
    client.send(FIRST_BYTES["imap"])
    assert ANSWER["imap"] in client.transport.value()
    assert client.connection.client == (BALANCER, 50000)
    client.lose()
    listener.assert_empty()
    assert errors == []


@pytest.mark.parametrize("mode", ["optional", "deferred"])
def test_a_client_first_peer_that_sends_no_header_is_served(tmp_path, errors, mode):
    listener = Listener(tmp_path, "http", proxy_protocol=mode)
    client = listener.connect()
    client.send(FIRST_BYTES["http"])
    assert ANSWER["http"] in client.transport.value()
    assert client.connection.client == (BALANCER, 50000)
    client.lose()
    listener.assert_empty()
    assert errors == []


@BOTH
@pytest.mark.parametrize("mode", ["optional", "deferred"])
def test_an_untrusted_peer_is_served_as_it_is_and_its_header_is_protocol_bytes(
        tmp_path, errors, protocol, mode):
    listener = Listener(tmp_path, protocol, proxy_protocol=mode)
    client = listener.connect(STRANGER)
    assert listener.greeted(client)
    client.send(HEADERS["v1"] + FIRST_BYTES[protocol])
    assert client.connection.client == (STRANGER, 50000)
    answer = client.transport.value()
    assert b" BAD " in answer if protocol == "imap" else answer.startswith(b"HTTP/1.1 400 ")
    client.lose()
    listener.assert_empty()
    assert errors == []


@BOTH
@pytest.mark.parametrize("header", sorted(LOCAL_HEADERS))
def test_a_local_header_is_a_health_check_served_with_the_socket_address(
        tmp_path, errors, protocol, header):
    listener = Listener(tmp_path, protocol, proxy_protocol="required")
    client = listener.connect()
    client.send(LOCAL_HEADERS[header])
    assert listener.greeted(client)
    assert client.connection.client == (BALANCER, 50000)
    client.lose()  # the balancer hangs up: a probe
    assert listener.factory.probes == 1
    if protocol == "imap":
        assert listener.outcomes() == {"probe": 1}
    listener.assert_empty()
    assert errors == []


# -- the header is refused --------------------------------------------------------------------


@BOTH
def test_required_refuses_an_untrusted_peer_at_once(tmp_path, errors, protocol):
    listener = Listener(tmp_path, protocol, proxy_protocol="required")
    client = listener.connect(STRANGER)
    assert client.refused
    client.send(HEADERS["v2"] + FIRST_BYTES[protocol])  # already on its way: dropped
    assert client.transport.value() == b""
    client.lose()
    if protocol == "imap":
        assert listener.outcomes() == {"untrusted_proxy": 1}
    assert listener.factory.probes == 0
    listener.assert_empty()
    assert errors == []


@BOTH
def test_required_refuses_a_trusted_peer_without_a_header(tmp_path, errors, protocol):
    listener = Listener(tmp_path, protocol, proxy_protocol="required")
    client = listener.connect()
    client.send(FIRST_BYTES[protocol])
    assert client.refused
    client.lose()
    if protocol == "imap":
        assert listener.outcomes() == {"proxy_header_missing": 1}
    listener.assert_empty()
    assert errors == []


@BOTH
@pytest.mark.parametrize("mode", ["required", "optional", "deferred"])
def test_an_invalid_header_is_refused(tmp_path, errors, protocol, mode):
    listener = Listener(tmp_path, protocol, proxy_protocol=mode)
    client = listener.connect()
    before = client.transport.value()  # deferred IMAP has greeted
    client.send(b"PROXY TCP4 300.0.0.1 127.0.0.1 1 2\r\n" + FIRST_BYTES[protocol])
    assert client.transport.disconnected and client.transport.value() == before
    client.send(FIRST_BYTES[protocol])  # more bytes before the connection is gone: dropped
    assert client.transport.value() == before
    client.lose()
    if protocol == "imap":
        assert listener.outcomes() == {"proxy_header_invalid": 1}
    listener.assert_empty()
    assert errors == []


@BOTH
@pytest.mark.parametrize("mode", ["required", "optional", "deferred"])
def test_a_header_that_never_completes_times_out(tmp_path, errors, protocol, mode):
    """``required``, and any mode of a client-first protocol: refused, a probe. A server-first
    protocol in ``optional`` is served with the socket address (its client waits for the
    greeting); in ``deferred`` it never waited."""
    listener = Listener(tmp_path, protocol, proxy_protocol=mode)
    client = listener.connect()
    client.send(HEADERS["v2"][:10])
    listener.reactor.advance(HEADER_TIMEOUT)
    served = protocol == "imap" and mode != "required"
    assert client.refused is not served
    assert listener.greeted(client) is served
    client.lose()
    assert listener.factory.probes == 1
    if protocol == "imap":
        assert listener.outcomes() == {"probe": 1}
    listener.assert_empty()
    assert errors == []


@BOTH
def test_a_connection_closed_while_its_header_is_awaited(tmp_path, errors, protocol):
    """The drain closes every registered connection, those still waiting for a header too."""
    listener = Listener(tmp_path, protocol, proxy_protocol="required")
    client = listener.connect()
    client.send(HEADERS["v2"][:10])
    assert client.connection.id in listener.runtime.registry.sessions
    client.connection.close(Outcome.SHUTDOWN)
    assert client.transport.disconnecting and client.transport.value() == b""
    assert [call.getTime() for call in listener.reactor.getDelayedCalls()] == [CLOSE_GRACE]
    client.lose()
    listener.assert_empty()
    assert errors == []


# -- limits on the real client ----------------------------------------------------------------


@BOTH
def test_max_connections_refuses_the_one_too_many_and_counts_nothing_for_it(
        tmp_path, errors, protocol):
    listener = Listener(tmp_path, protocol, proxy_protocol="required", max_connections=1)
    first = listener.connect()
    second = listener.connect(port=50001)
    assert second.refused and listener.factory.rejected == 1
    assert list(listener.runtime.registry.sessions) == [first.connection.id]
    second.lose()
    assert listener.factory.active == 1 and listener.outcomes() == {}
    first.send(HEADERS["v2"])
    assert listener.greeted(first)
    first.lose()
    listener.assert_empty()
    assert errors == []


@BOTH
@pytest.mark.parametrize("mode", ["required", "deferred"])
def test_the_per_ip_limit_counts_the_real_client_named_by_the_header(
        tmp_path, errors, protocol, mode):
    listener = Listener(tmp_path, protocol, proxy_protocol=mode, max_connections_per_ip=1)
    first, second, third = (listener.connect(port=port) for port in (50000, 50001, 50002))
    first.send(HEADERS["v2"])  # the balancer is trusted: only real clients are counted
    assert listener.factory.per_ip._counts == {REAL[0]: 1}
    before = second.transport.value()
    second.send(HEADERS["v1"] + FIRST_BYTES[protocol])  # the same real client
    assert second.transport.disconnected and second.transport.value() == before
    third.send(encode_v2(OTHER_REAL, LISTENER) + FIRST_BYTES[protocol])
    assert ANSWER[protocol] in third.transport.value()
    assert listener.factory.per_ip._counts == {REAL[0]: 1, OTHER_REAL[0]: 1}
    for client in (second, first, third):
        client.lose()
    if protocol == "imap":
        assert listener.outcomes()["per_ip_limit"] == 1
    listener.assert_empty()
    assert errors == []


@BOTH
def test_a_banned_real_client_is_refused_behind_the_balancer(tmp_path, errors, protocol):
    listener = Listener(tmp_path, protocol, proxy_protocol="required")
    listener.runtime.bans.login_refused(REAL[0])  # threshold 1: banned
    assert listener.runtime.bans.is_banned(REAL[0])
    client = listener.connect()
    client.send(HEADERS["v2"] + FIRST_BYTES[protocol])
    assert client.refused
    client.lose()
    other = listener.connect()
    other.send(encode_v2(OTHER_REAL, LISTENER))
    assert listener.greeted(other)
    other.lose()
    listener.assert_empty(bans=1)
    assert errors == []


# -- implicit TLS: the header comes with the ClientHello (iosim, real TLS) --------------------


class TLSClient(Protocol):
    """A client behind a balancer: a PROXY header (if any), then a TLS handshake."""

    def __init__(self, header: bytes, first: bytes) -> None:
        self._header = header
        self._first = first
        self.received = b""

    def connectionMade(self) -> None:
        if self._header:
            self.transport.write(self._header)
        self.transport.startTLS(client_options_without_verification())
        self.transport.write(self._first)

    def dataReceived(self, data: bytes) -> None:
        self.received += data


@BOTH
@pytest.mark.parametrize("mode,header", [("required", "v2"), ("optional", "v1"),
                                         ("optional", ""), ("deferred", "v2")])
def test_implicit_tls_takes_the_client_hello_that_came_with_the_header(
        tmp_path, errors, protocol, mode, header):
    listener = Listener(tmp_path, protocol, tls="implicit", proxy_protocol=mode)
    server = listener.factory.buildProtocol(None)
    client = TLSClient(HEADERS.get(header, b""), FIRST_BYTES[protocol])
    pump = connect(client, server, listener.reactor, (BALANCER, 50000), LISTENER)
    pump.flush()
    if protocol == "imap":
        assert client.received.startswith(GREETING)
    assert ANSWER[protocol] in client.received
    assert server.tls is not None and server.tls.version.startswith("TLSv1")
    assert server.client == (REAL if header else (BALANCER, 50000))
    client.transport.loseConnection()
    pump.flush()
    assert server.state is ConnectionState.CLOSED
    listener.assert_empty()
    assert errors == []


class GarbageClient(Protocol):
    """A client that sends a PROXY header, then bytes that are no TLS ClientHello."""

    def connectionMade(self) -> None:
        self.transport.write(HEADERS["v2"] + b"\x16\x03\x01\x00\x05hello" + b"\r\n" * 20)


@BOTH
def test_a_failed_tls_handshake_after_the_header_ends_as_a_probe(tmp_path, errors, protocol):
    listener = Listener(tmp_path, protocol, tls="implicit", proxy_protocol="required")
    server = listener.factory.buildProtocol(None)
    pump = connect(GarbageClient(), server, listener.reactor, (BALANCER, 50000), LISTENER)
    pump.flush()
    assert server.state is ConnectionState.CLOSED
    assert server.client == REAL and server.tls is None
    assert listener.factory.probes == 1
    listener.assert_empty()
    assert errors == []
