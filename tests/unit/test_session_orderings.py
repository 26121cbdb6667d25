"""Every order of the ways a mail session can end, spliced or while its login is routed,
TLS failure and reload included.

The session runs on :mod:`tests.unit.test_session_lifecycle`'s :class:`Pipeline` (its factory,
memory reactor, backend side and ``assert_empty``), its listener on implicit TLS: the client
leg is real TLS over ``iosim`` (:func:`tests.harness.memory.connect`), so a TLS failure is a
record the client's TLS layer never wrote, failing the proxy's TLS layer as a corrupted
record does on a socket. A reload swaps a new runtime into the factory, as
``ProxyService.reload_config`` does (see ``test_reload_glue``). Whatever the order of client
close, backend close, kick, timer expiry, reload and TLS failure, the session is counted
once, and the registry, the slots, the per-IP counts and the timers end empty (issue 12:
fast tests of the Twisted glue).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.test import iosim

from stalroute.config import Config, parse_config
from stalroute.inbound import ConnectionState
from stalroute.outcomes import Outcome
from stalroute.runtime import build_runtime
from stalroute.service import listener_after_reload
from stalroute.session import ClientSession
from tests.harness.memory import client_options_without_verification, connect, lose
from tests.unit import test_session_lifecycle as lifecycle
from tests.unit.test_session_lifecycle import BRIDGE_IDLE, PREAUTH_TIMEOUT, Pipeline, document

CLIENT, LISTENER = ("192.0.2.7", 40000), ("127.0.0.1", 143)
GREETING = b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN] ready\r\n"
#: An application-data record with a MAC no TLS layer wrote: the receiving layer fails.
FORGED_RECORD = b"\x17\x03\x03\x00\x20" + b"\x00" * 32


class TLSClient(Protocol):
    """A mail client on implicit TLS that accepts any certificate."""

    def __init__(self) -> None:
        self.received = b""

    def connectionMade(self) -> None:
        self.transport.startTLS(client_options_without_verification())

    def dataReceived(self, data: bytes) -> None:
        self.received += data


class Session:
    """One client on implicit TLS through :class:`Pipeline`, and its backend leg."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.session = pipeline.factory.buildProtocol(None)
        assert isinstance(self.session, ClientSession)
        self.client = TLSClient()
        self.pump = connect(self.client, self.session, pipeline.reactor, CLIENT, LISTENER)
        self.pump.flush()
        assert self.session.tls is not None  # the handshake completed
        self.client.transport.write(b"a1 LOGIN alice secret\r\n")
        self.pump.flush()

    def splice(self) -> None:
        self.backend, self.server = self.pipeline.backend()
        self.backend.dataReceived(GREETING)
        assert b"AUTHENTICATE PLAIN" in self.server.value()
        self.backend.dataReceived(b"a1 OK logged in\r\n")
        self.pump.flush()
        assert self.session.state is ConnectionState.SPLICED
        assert self.client.received.endswith(b"a1 OK logged in\r\n")

    @property
    def client_open(self) -> bool:
        return not (self.client.transport.disconnecting or self.client.transport.disconnected)

    def client_close(self) -> None:
        if self.client_open:
            self.client.transport.loseConnection()

    def tls_failure(self) -> None:
        if self.client_open:  # beneath the client's TLS layer, straight onto the wire
            iosim.FakeTransport.write(self.client.transport, FORGED_RECORD)

    def settle(self) -> None:
        """Move the bytes and deliver the losses a closing (or aborted) leg ends in; once the
        session has ended, nothing of it may be left (no timer run out, no leg left open)."""
        self.pump.flush()
        if hasattr(self, "server") and self.server.disconnecting:
            lose(self.backend, self.server)
        self.pump.flush()
        if self.session.state is ConnectionState.CLOSED:
            if hasattr(self, "server"):
                assert getattr(self.server, "lost", False)  # the backend leg ended with it
            reactor = self.pipeline.reactor
            if reactor.tcpClients:  # the memory reactor keeps a connect attempt once stopped
                pending = reactor.connectors[-len(reactor.tcpClients):]
                assert all(connector.stoppedConnecting for connector in pending)
                reactor.tcpClients.clear()
            self.pipeline.assert_empty()


def reload(pipeline: Pipeline, config: Config) -> None:
    """What ``ProxyService.reload_config`` swaps: the runtime, and each factory's runtime and
    listener settings (as ``test_reload_glue.Proxy.reload_config``)."""
    pipeline.runtime = build_runtime(pipeline.reactor, config, previous=pipeline.runtime)
    for factory in pipeline.factories.values():
        factory.runtime = pipeline.runtime
        factory.listener = listener_after_reload(factory.listener, pipeline.runtime.config)


def tls_document(folder: Path, protocol: str = "imap") -> dict[str, Any]:
    """test_session_lifecycle's configuration, its listener on implicit TLS (the certificate:
    the self-signed fallback), and no circuit breaker: the orders of a test run one after
    the other, and the failed connects of the earlier ones must not refuse the later ones."""
    settings = document(folder, protocol)
    settings["listener"][protocol]["tls"] = "implicit"
    settings["server"]["host_down_threshold"] = 0
    return settings


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the configuration's (empty) mapping file lives; the same for every test."""
    return tmp_path_factory.mktemp("orderings")


@pytest.fixture(scope="module")
def tls_config(folder: Path) -> Config:
    """The configuration a reload loads: the one the pipeline started with."""
    return parse_config(tls_document(folder), folder, {}, check_files=False)


def tls_pipeline(folder: Path) -> Pipeline:
    """test_session_lifecycle's :class:`Pipeline`, built from :func:`tls_document`."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(lifecycle, "document", tls_document)
        return Pipeline(folder)


def assert_ended(pipeline: Pipeline, ended: Session, sessions: int) -> None:
    """The session ended with a resolved outcome, and nothing of any session is left; the
    pipeline counted ``sessions`` sessions in all (each once)."""
    assert ended.session.state is ConnectionState.CLOSED
    assert isinstance(ended.session.outcome, Outcome)  # resolved, never left unset
    pipeline.assert_empty()
    assert sum(pipeline.runtime.metrics.sessions.values()) == sessions


def orders_starting_with(events: tuple[str, ...]) -> pytest.MarkDecorator:
    """One test per first event, each running every order of the other events (one after
    the other on one pipeline: whatever an order left behind, the next one would find)."""
    return pytest.mark.parametrize(
        "orders", [[order for order in itertools.permutations(events) if order[0] == first]
                   for first in events], ids=events)


def run_orders(orders: list[tuple[str, ...]],
               run: Callable[[tuple[str, ...], int], None]) -> None:
    """``run(order, done)`` for each order, ``done`` the number of orders run before it; a
    failure names its order."""
    for done, order in enumerate(orders):
        try:
            run(order, done)
        except AssertionError as exc:
            raise AssertionError(f"order {'-'.join(order)}: {exc}") from exc


SPLICED_EVENTS = ("client_close", "backend_close", "kick", "timer", "reload", "tls_failure")


@orders_starting_with(SPLICED_EVENTS)
def test_every_order_of_endings_of_a_spliced_session_leaves_nothing(
        folder, tls_config, errors, orders):
    pipeline = tls_pipeline(folder)

    def run(order: tuple[str, ...], done: int) -> None:
        ended = Session(pipeline)
        ended.splice()
        started_with = ended.session.runtime
        for event in order:
            if event == "client_close":
                ended.client_close()
            elif event == "backend_close":
                lose(ended.backend, ended.server)
            elif event == "kick":
                pipeline.control.kick(identifier="alice")
            elif event == "timer":  # bridge_idle, and any close grace, run out
                pipeline.reactor.advance(BRIDGE_IDLE)
            elif event == "reload":
                reload(pipeline, tls_config)
            elif event == "tls_failure":
                ended.tls_failure()
            ended.settle()
        assert ended.session.runtime is started_with  # a reload never moves a live session
        assert_ended(pipeline, ended, sessions=done + 1)  # no timer had to run out for it
        assert errors == []

    run_orders(orders, run)
    assert len(orders) == 120


def test_a_tls_failure_of_a_spliced_client_is_a_client_error(folder, errors):
    pipeline = tls_pipeline(folder)
    ended = Session(pipeline)
    ended.splice()
    ended.tls_failure()
    ended.settle()
    assert ended.server.disconnecting  # the backend leg goes with it
    assert ended.session.outcome == "client_error"
    assert_ended(pipeline, ended, sessions=1)
    assert errors == []


ROUTING_EVENTS = ("client_close", "backend_refused", "timer", "reload", "tls_failure")


@orders_starting_with(ROUTING_EVENTS)
def test_every_order_of_endings_while_a_login_is_routed_leaves_nothing(
        folder, tls_config, errors, orders):
    """The login's backend connect is pending: its refusal, the client leaving or failing
    TLS, the pre-auth timer and a reload, in every order."""
    pipeline = tls_pipeline(folder)

    def run(order: tuple[str, ...], done: int) -> None:
        ended = Session(pipeline)
        assert ended.session.state is ConnectionState.ROUTING
        for event in order:
            if event == "client_close":
                ended.client_close()
            elif event == "backend_refused":
                if pipeline.reactor.tcpClients:
                    _host, _port, factory, _timeout, _bind = pipeline.reactor.tcpClients.pop(0)
                    factory.clientConnectionFailed(pipeline.reactor.connectors[-1],
                                                   Failure(ConnectionRefusedError()))
            elif event == "timer":  # the pre-auth timeout (the backend timeout before it)
                pipeline.reactor.advance(PREAUTH_TIMEOUT)
            elif event == "reload":
                reload(pipeline, tls_config)
            elif event == "tls_failure":
                ended.tls_failure()
            ended.settle()
        assert_ended(pipeline, ended, sessions=done + 1)
        assert errors == []

    run_orders(orders, run)
    assert len(orders) == 24
