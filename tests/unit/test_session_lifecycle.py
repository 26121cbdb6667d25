"""The mail session's Twisted glue in memory: :class:`ClientSession` and its backend leg on
``StringTransport``\\ s and a ``MemoryReactorClock`` (no server, no socket).

Whatever the order of client close, backend close, kick, timer expiry and TLS failure, a
session must leave the registry and free its slot exactly once, and leave no timer behind;
an abandoned login must cancel its backend leg (issue 11, items 1, 2 and 7).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport

from stalroute.closing import CLOSE_GRACE
from stalroute.config import parse_config
from stalroute.control import Control
from stalroute.inbound import ConnectionState
from stalroute.protocols import PROTOCOLS
from stalroute.runtime import build_runtime
from stalroute.session import ClientSession, MAX_PENDING_INPUT, SessionFactory
from tests.harness.memory import accept, complete_connect, kicked, lose

PREAUTH_TIMEOUT = 30.0
BACKEND_TIMEOUT = 10.0
BRIDGE_IDLE = 600.0


def document(tmp_path: Path, protocol: str = "imap") -> dict[str, Any]:
    (tmp_path / "mappings.tsv").write_text("")
    node = {"host": "127.0.0.1", "allow_plaintext_auth": True, "forwarding": "none",
            "protocol": {protocol: {"port": 1143, "tls": "plain"}}}
    return {
        "server": {"hostname": "stalroute.test", "backend_timeout": f"{BACKEND_TIMEOUT:.0f}s",
                   "bridge_idle": f"{BRIDGE_IDLE:.0f}s", "backend_connect_retries": 0},
        "listener": {protocol: {"protocol": protocol, "bind": ["127.0.0.1:143"], "tls": "plain",
                                "preauth_timeout": f"{PREAUTH_TIMEOUT:.0f}s"}},
        "capabilities": {protocol: {"allow_plain_auth_without_tls": True}},
        "destination": {"node1": node},
        "routing": {"default_destination": "node1"},
        "mapping": {"source": "file", "file": {"path": str(tmp_path / "mappings.tsv")}},
    }


class Pipeline:
    """One listener's session factory (IMAP unless told) on a memory reactor, and its backend
    side (the running proxy :class:`Control` acts on)."""

    def __init__(self, tmp_path: Path, protocol: str = "imap") -> None:
        self.reactor = MemoryReactorClock()
        config = parse_config(document(tmp_path, protocol), tmp_path, {}, check_files=False)
        self.runtime = build_runtime(self.reactor, config)
        self.factory = SessionFactory(self.reactor, self.runtime, protocol, PROTOCOLS[protocol])
        self.factories = {protocol: self.factory}
        self.control = Control(self)  # type: ignore[arg-type]

    def client(self) -> tuple[ClientSession, StringTransport]:
        session, transport = accept(self.factory, 143)
        assert isinstance(session, ClientSession)
        return session, transport

    def backend(self) -> tuple[Protocol, StringTransport]:
        """Complete the oldest pending backend connect."""
        protocol, transport, _port = complete_connect(self.reactor)
        return protocol, transport

    def spliced(self) -> tuple[ClientSession, StringTransport, Protocol, StringTransport]:
        session, client = self.client()
        session.dataReceived(b"a1 LOGIN alice secret\r\n")
        backend, server = self.backend()
        backend.dataReceived(b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN] ready\r\n")
        assert b"AUTHENTICATE PLAIN" in server.value()
        backend.dataReceived(b"a1 OK logged in\r\n")
        assert session.state is ConnectionState.SPLICED
        return session, client, backend, server

    def assert_empty(self) -> None:
        """Nothing of any session is left: registry, slots, per-IP counts, timers."""
        assert self.runtime.registry.sessions == {}
        assert self.factory.active == 0
        assert not self.factory.per_ip._counts
        assert self.reactor.getDelayedCalls() == []
        assert self.reactor.tcpClients == []


@pytest.fixture
def pipeline(tmp_path: Path) -> Pipeline:
    return Pipeline(tmp_path)


# -- item 1: ghost sessions ------------------------------------------------------------


def test_bytes_after_the_backend_left_are_dropped_and_the_session_ends(pipeline, errors):
    """LOGIN, LOGOUT, then pipelined NOOPs: the backend closes first, the client's last
    bytes arrive while the session closes (as TLS delivers them from connectionLost)."""
    session, client, backend, server = pipeline.spliced()
    backend.dataReceived(b"* BYE logging out\r\na2 OK done\r\n")
    lose(backend, server)
    assert client.disconnecting
    session.dataReceived(b"a3 NOOP\r\n" * 20)
    lose(session, client)
    assert session.state is ConnectionState.CLOSED
    assert session.outcome == "backend_closed"
    pipeline.assert_empty()
    assert errors == []


def test_an_error_on_client_input_closes_the_session_instead_of_escaping(pipeline, errors):
    session, client, backend, server = pipeline.spliced()
    server.write = None  # type: ignore[assignment]  # the relay breaks
    session.dataReceived(b"a2 NOOP\r\n")  # must not raise into the transport
    assert session.outcome == "internal_error" and client.disconnecting
    assert len(errors) == 1  # the failure itself is logged, once
    errors.clear()
    lose(session, client)
    lose(backend, server)
    pipeline.assert_empty()


CLOSE_EVENTS = ("client_lost", "backend_lost", "kick", "idle", "grace")


@pytest.mark.parametrize("order", list(itertools.permutations(CLOSE_EVENTS)),
                         ids=lambda order: "-".join(order))
def test_every_order_of_closes_kicks_and_timers_leaves_nothing(tmp_path, order, errors):
    pipeline = Pipeline(tmp_path)
    session, client, backend, server = pipeline.spliced()
    for event in order:
        if event == "client_lost":
            lose(session, client, clean=False)
        elif event == "backend_lost":
            lose(backend, server)
        elif event == "kick":
            pipeline.control.kick(identifier="alice")
        elif event == "idle":
            pipeline.reactor.advance(BRIDGE_IDLE)
        elif event == "grace":
            pipeline.reactor.advance(CLOSE_GRACE)
        # A transport told to close (or aborted) ends in connectionLost.
        if client.disconnecting:
            lose(session, client)
        if server.disconnecting:
            lose(backend, server)
    pipeline.reactor.advance(CLOSE_GRACE)
    pipeline.assert_empty()
    assert sum(pipeline.runtime.metrics.sessions.values()) == 1
    assert errors == []


def test_a_kick_that_fails_on_one_session_still_kicks_the_others(pipeline, errors):
    first, client1, _b1, _s1 = pipeline.spliced()
    second, client2, _b2, _s2 = pipeline.spliced()

    def broken(outcome: str) -> None:
        raise AttributeError("'Server' object has no attribute 'protocol'")

    first.close = broken  # type: ignore[method-assign]
    assert kicked(pipeline.control, identifier="alice") == 2
    assert client2.disconnecting and second.outcome == "kicked"
    assert len(errors) == 1


def test_a_kicked_session_leaves_the_listing_at_once(pipeline):
    session, client, backend, server = pipeline.spliced()
    assert [c["id"] for c in pipeline.control.connections()] == [session.id]
    pipeline.control.kick(identifier="alice")
    assert pipeline.control.connections() == []
    assert server.disconnecting and client.disconnecting


# -- item 7: abandoned logins ----------------------------------------------------------


def test_a_login_held_longer_than_the_preauth_timeout_never_reaches_the_backend(
        pipeline, errors):
    pipeline.runtime.delays.delay("alice", 3 * PREAUTH_TIMEOUT)
    session, client = pipeline.client()
    session.dataReceived(b"a1 LOGIN alice secret\r\n")
    pipeline.reactor.advance(PREAUTH_TIMEOUT)
    assert b"* BYE" in client.value() and client.disconnecting
    lose(session, client)
    pipeline.reactor.advance(3 * PREAUTH_TIMEOUT)
    pipeline.assert_empty()
    assert errors == []


@pytest.mark.parametrize("stage", ["connecting", "greeting", "login"])
def test_a_client_that_leaves_mid_login_cancels_the_backend_leg(pipeline, errors, stage):
    session, client = pipeline.client()
    session.dataReceived(b"a1 LOGIN alice secret\r\n")
    backend = server = None
    if stage != "connecting":
        backend, server = pipeline.backend()
    if stage == "login":
        backend.dataReceived(b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN] ready\r\n")
        assert b"AUTHENTICATE" in server.value()
    lose(session, client, clean=False)
    if stage == "connecting":
        connector = pipeline.reactor.connectors[0]
        assert connector.stoppedConnecting  # the pending connect was cancelled
        pipeline.reactor.tcpClients.clear()
    else:
        assert server.disconnecting  # aborted, never logged in
        lose(backend, server)
    pipeline.assert_empty()
    assert errors == []


@pytest.mark.parametrize("silent_at", ["greeting", "login"])
def test_a_backend_that_stays_silent_is_a_temporary_failure_and_settles_once(
        pipeline, errors, silent_at):
    session, client = pipeline.client()
    session.dataReceived(b"a1 LOGIN alice secret\r\n")
    backend, server = pipeline.backend()
    if silent_at == "login":
        backend.dataReceived(b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN] ready\r\n")
    pipeline.reactor.advance(BACKEND_TIMEOUT)
    assert server.disconnecting
    lose(backend, server)  # the abort ends in connectionLost: no second settlement
    assert b"a1 NO [UNAVAILABLE]" in client.value()
    assert session.state is ConnectionState.PREAUTH
    session.dataReceived(b"a2 LOGOUT\r\n")
    lose(session, client)
    pipeline.assert_empty()
    assert errors == []


# -- item 2: pre-auth output is flow-controlled ----------------------------------------


#: Per protocol: a pre-auth command a client may repeat, how many times (well over the 64 KiB
#: of input a session buffers), and what marks each of its answers.
PREAUTH_FLOODS = {
    "imap": (b"a CAPABILITY\r\n", 100_000, b"a OK"),  # 1.4 MB
    "pop3": (b"CAPA\r\n", 50_000, b"\r\n.\r\n"),
    "managesieve": (b"CAPABILITY\r\n", 25_000, b'OK "Capability completed."'),
    "submission": (b"EHLO client.test\r\n", 25_000, b"\r\n250 "),
}


@pytest.mark.parametrize("protocol", PREAUTH_FLOODS)
def test_a_client_that_does_not_read_its_replies_is_not_read_either(tmp_path, protocol):
    command, count, answered = PREAUTH_FLOODS[protocol]
    session, client = Pipeline(tmp_path, protocol).client()
    throttle = client.producer
    throttle.pauseProducing()  # what a full socket buffer makes the transport do
    before = len(client.value())
    flood = command * count
    for offset in range(0, len(flood), 65536):
        session.dataReceived(flood[offset:offset + 65536])
    assert client.producerState == "paused"  # reading stopped once 64 KiB waited
    assert len(client.value()) == before  # nothing answered while blocked
    throttle.resumeProducing()
    assert client.value().count(answered) == count  # all answered, nothing lost
    assert client.producerState == "producing"
    assert session.state is ConnectionState.PREAUTH


def test_a_paused_client_is_still_read_until_its_input_fills_the_buffer(pipeline):
    """TLS pauses its producer until the handshake is done; the handshake needs reading."""
    session, client = pipeline.client()
    client.producer.pauseProducing()
    session.dataReceived(b"a CAPABILITY\r\n")
    assert client.producerState == "producing"


def test_bytes_pipelined_while_a_login_is_routed_are_bounded_and_relayed(pipeline):
    session, client = pipeline.client()
    session.dataReceived(b"a1 LOGIN alice secret\r\n")
    session.dataReceived(b"a2 SELECT INBOX\r\n" + b"x" * MAX_PENDING_INPUT)
    assert client.producerState == "paused"
    backend, server = pipeline.backend()
    backend.dataReceived(b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN] ready\r\n")
    server.clear()
    backend.dataReceived(b"a1 OK logged in\r\n")
    assert server.value().startswith(b"a2 SELECT INBOX\r\n")
    assert client.producerState == "producing"
