"""The backend leg's Twisted glue in memory: :class:`BackendConnector` and :class:`BackendLeg`
on a ``MemoryReactorClock``, with ``StringTransport`` s, or ``iosim`` and real TLS.

Every way an establishment ends (ready, refused and retried, timed out before or after
connecting, a dialogue error, a TLS failure, the caller cancelling at any stage) must settle
the caller's Deferred exactly once, leave no timer, and count in the destination's circuit
breaker as its stage says (issue 12: fast tests of the Twisted glue).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import error as neterror
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from stalroute.backend import (
    RETRY_DELAY, BackendConnector, BackendLeg, BackendTimeout, BackendUnavailable, CircuitOpen,
    ClientInfo, proxy_header,
)
from stalroute.closing import CLOSE_GRACE
from stalroute.config import parse_config
from stalroute.protocols import PROTOCOLS
from stalroute.protocols.base import LoginSucceeded
from stalroute.proxyproto import ProxyHeader, ProxyHeaderParser
from stalroute.sasl import Credentials
from tests.harness.memory import connect, failure_of, server_options, settled
from tests.harness.pki import CertificateAuthority, IssuedCertificate

BACKEND_TIMEOUT = 10.0
BACKEND = ("127.0.0.1", 1143)
GREETING = b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN] ready\r\n"
ALICE = Credentials(mechanism="PLAIN", response=b"\0alice\0secret", login="alice")
IMAP = PROTOCOLS["imap"]


def document(tmp_path: Path, *, server: dict[str, Any] | None = None,
             node: dict[str, Any] | None = None, tls: str = "plain",
             bind: str = "127.0.0.1:143") -> dict[str, Any]:
    (tmp_path / "mappings.tsv").write_text("")
    destination = {"host": BACKEND[0], "allow_plaintext_auth": True, "forwarding": "none",
                   "protocol": {"imap": {"port": BACKEND[1], "tls": tls}}, **(node or {})}
    if tls != "plain":
        destination.setdefault("tls_server_name", "imap.test")
    return {
        "server": {"hostname": "stalroute.test", "backend_timeout": f"{BACKEND_TIMEOUT:.0f}s",
                   "backend_connect_retries": 0, "host_down_threshold": 2,
                   "host_down_min_clients": 2, **(server or {})},
        "listener": {"imap": {"protocol": "imap", "bind": [bind], "tls": "plain"}},
        "capabilities": {"imap": {"allow_plain_auth_without_tls": True}},
        "destination": {"node1": destination},
        "routing": {"default_destination": "node1"},
        "mapping": {"source": "file", "file": {"path": str(tmp_path / "mappings.tsv")}},
    }


def client(ip: str = "192.0.2.7") -> ClientInfo:
    return ClientInfo(peer=(ip, 40000), local=("127.0.0.1", 143), tls=None,
                      session_id="node-0123456789ab", ttl=6)




@dataclass
class Backend:
    """One backend connection the connector opened, on a ``StringTransport``."""

    protocol: Protocol  # what the transport delivers to (the endpoint's wrapper of the leg)
    transport: StringTransport

    @property
    def leg(self) -> BackendLeg:
        leg = self.protocol._wrappedProtocol  # type: ignore[attr-defined]
        assert isinstance(leg, BackendLeg)
        return leg

    def receive(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def lose(self) -> None:
        """The connection loss a closing (or aborted) transport ends in."""
        self.protocol.connectionLost(Failure(neterror.ConnectionDone()))


class TLSStringTransport(StringTransport):
    """A ``StringTransport`` that records when TLS was started (and with what)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.tls_started_at: int | None = None
        self.tls_options: object = None

    def startTLS(self, options: object) -> None:
        self.tls_started_at = len(self.value())
        self.tls_options = options


class Connector:
    """A :class:`BackendConnector` of one configuration on a memory reactor."""

    def __init__(self, tmp_path: Path, **changes: Any) -> None:
        self.reactor = MemoryReactorClock()
        self.config = parse_config(document(tmp_path, **changes), tmp_path, {},
                                   check_files=False)
        self.connector = BackendConnector(self.reactor, self.config)
        self.breaker = self.connector.breakers["node1"]

    def open(self, ip: str = "192.0.2.7") -> Deferred[BackendLeg]:
        return Deferred.fromCoroutine(self.connector.open(
            self.config.destinations["node1"], "imap", IMAP.dialogue, client(ip)))

    def pending(self) -> tuple[Any, Any]:
        """The oldest pending connect: its factory and its connector."""
        _host, _port, factory, _timeout, _bind = self.reactor.tcpClients.pop(0)
        return factory, self.reactor.connectors.pop(0)

    def fail_connect(self, error: Exception | None = None) -> None:
        factory, connector = self.pending()
        factory.clientConnectionFailed(connector,
                                       Failure(error or neterror.ConnectionRefusedError()))

    def accept(self) -> Backend:
        factory, _connector = self.pending()
        protocol = factory.buildProtocol(IPv4Address("TCP", *BACKEND))
        transport = TLSStringTransport(peerAddress=IPv4Address("TCP", *BACKEND))
        protocol.makeConnection(transport)
        return Backend(protocol, transport)

    def ready(self, ip: str = "192.0.2.7") -> Backend:
        d = self.open(ip)
        backend = self.accept()
        backend.receive(GREETING)
        assert settled(d) is backend.leg
        return backend

    def assert_idle(self) -> None:
        """No timer and no pending connect is left."""
        assert self.reactor.getDelayedCalls() == []
        assert self.reactor.tcpClients == []


@pytest.fixture
def legs(tmp_path: Path) -> Connector:
    return Connector(tmp_path)


# -- establishment -----------------------------------------------------------------------


def test_a_leg_is_ready_after_the_greeting_and_logs_in(legs, errors):
    d = legs.open()
    backend = legs.accept()
    assert not d.called
    backend.receive(GREETING)
    leg = settled(d)
    assert leg is backend.leg
    legs.assert_idle()  # the establishment timeout is gone
    login = leg.login(ALICE, "a1")
    assert backend.transport.value().startswith(b"a1 AUTHENTICATE PLAIN ")
    backend.receive(b"a1 OK logged in\r\n")
    assert isinstance(settled(login), LoginSucceeded)
    relayed: list[bytes] = []
    leg.attach(relayed.append, lambda: None)
    backend.receive(b"* 1 EXISTS\r\n")
    assert relayed == [b"* 1 EXISTS\r\n"]
    assert legs.breaker.failures == 0 and legs.breaker.state == "closed"
    assert errors == []


def test_a_refused_connect_is_retried_after_the_retry_delay(tmp_path, errors):
    legs = Connector(tmp_path, server={"backend_connect_retries": 2})
    d = legs.open()
    legs.fail_connect()
    assert legs.reactor.tcpClients == []
    legs.reactor.advance(RETRY_DELAY / 2)
    assert legs.reactor.tcpClients == []  # not before the delay
    legs.reactor.advance(RETRY_DELAY / 2)
    legs.fail_connect(neterror.TCPTimedOutError())  # the endpoint's own timeout: retried too
    legs.reactor.advance(RETRY_DELAY)
    backend = legs.accept()
    backend.receive(GREETING)
    assert settled(d) is backend.leg
    legs.assert_idle()
    assert legs.breaker.failures == 0
    assert errors == []


def test_a_connect_refused_on_every_attempt_counts_once_at_the_connect_stage(tmp_path, errors):
    legs = Connector(tmp_path, server={"backend_connect_retries": 1})
    d = legs.open()
    legs.fail_connect()
    legs.reactor.advance(RETRY_DELAY)
    legs.fail_connect()
    exc = failure_of(d, BackendUnavailable)
    assert exc.connect_stage and "ConnectionRefusedError" in str(exc)
    legs.assert_idle()
    assert legs.breaker.failures == 1  # connect-stage failures count from one client already
    assert errors == []


def test_a_connect_error_that_is_not_worth_retrying_fails_at_once(tmp_path, errors):
    legs = Connector(tmp_path, server={"backend_connect_retries": 3})
    d = legs.open()
    legs.fail_connect(neterror.ConnectError("no such interface"))
    assert failure_of(d, BackendUnavailable).connect_stage
    legs.assert_idle()
    assert errors == []


def test_a_connect_that_never_completes_times_out_at_the_connect_stage(legs, errors):
    d = legs.open()
    connector = legs.reactor.connectors[0]
    legs.reactor.advance(BACKEND_TIMEOUT)
    exc = failure_of(d, BackendTimeout)
    assert exc.connect_stage and "timed out connecting" in str(exc)
    assert connector.stoppedConnecting
    legs.reactor.tcpClients.clear()
    legs.assert_idle()
    assert legs.breaker.failures == 1
    assert errors == []


def test_the_timeout_covers_the_retry_delays_too(tmp_path, errors):
    legs = Connector(tmp_path, server={"backend_connect_retries": 100,
                                       "backend_timeout": "1s"})
    d = legs.open()
    for _ in range(4):
        legs.fail_connect()
        legs.reactor.advance(RETRY_DELAY)
    legs.fail_connect()
    legs.reactor.advance(RETRY_DELAY)  # 1 s: the timeout fires while waiting to retry
    assert failure_of(d, BackendTimeout).connect_stage
    legs.reactor.tcpClients.clear()
    legs.reactor.connectors.clear()
    legs.assert_idle()
    assert errors == []


def test_a_backend_that_never_greets_times_out_after_connecting(legs, errors):
    d = legs.open()
    backend = legs.accept()
    legs.reactor.advance(BACKEND_TIMEOUT)
    exc = failure_of(d, BackendTimeout)
    assert not exc.connect_stage and "after connecting" in str(exc)
    assert backend.transport.disconnected  # aborted
    backend.lose()  # the abort ends in connectionLost: no second settlement
    legs.assert_idle()
    assert errors == []


def test_post_connect_failures_count_only_across_distinct_clients(legs, errors):
    """host_down_min_clients = 2, host_down_threshold = 2."""
    for ip in ("192.0.2.1", "192.0.2.1", "192.0.2.1"):  # one client: never marks it down
        d = legs.open(ip)
        legs.accept().receive(b"* BYE go away\r\n")
        assert not failure_of(d, BackendUnavailable).connect_stage
    assert legs.breaker.failures == 0 and legs.breaker.state == "closed"
    for ip in ("192.0.2.2", "192.0.2.3"):
        d = legs.open(ip)
        legs.accept().receive(b"* BYE go away\r\n")
        failure_of(d, BackendUnavailable)
    assert legs.breaker.state == "open"
    d = legs.open()
    assert failure_of(d, CircuitOpen).connect_stage
    assert legs.reactor.tcpClients == []  # nothing was tried
    assert errors == []


def test_a_dialogue_error_aborts_the_leg_and_settles_once(legs, errors):
    d = legs.open()
    backend = legs.accept()
    backend.receive(b"* BYE too many connections\r\n")
    exc = failure_of(d, BackendUnavailable)
    assert "refused the connection" in str(exc) and not exc.connect_stage
    assert backend.transport.disconnected
    backend.lose()
    legs.assert_idle()
    assert errors == []


def test_a_dialogue_error_during_the_login_fails_the_login(legs, errors):
    backend = legs.ready()
    login = backend.leg.login(ALICE, "a1")
    backend.receive(b"zz OK what\r\n")
    assert "unexpected response" in str(failure_of(login, BackendUnavailable))
    assert backend.transport.disconnected
    backend.lose()
    legs.assert_idle()
    assert errors == []


def test_a_backend_that_closes_during_the_login_fails_the_login(legs, errors):
    backend = legs.ready()
    login = backend.leg.login(ALICE, "a1")
    backend.lose()
    assert "closed the connection" in str(failure_of(login, BackendUnavailable))
    legs.assert_idle()
    assert errors == []


# -- what is written first ----------------------------------------------------------------


@pytest.mark.parametrize("version", [1, 2])
def test_the_proxy_header_is_the_first_thing_written(tmp_path, errors, version):
    legs = Connector(tmp_path, node={"forwarding": "proxy", "proxy_protocol_version": version})
    d = legs.open()
    backend = legs.accept()
    header = proxy_header(version, client())
    assert backend.transport.value() == header
    parser = ProxyHeaderParser()
    parsed = parser.feed(header)
    assert isinstance(parsed, ProxyHeader) and parsed.source == client().peer
    backend.receive(GREETING)
    assert settled(d) is backend.leg
    assert errors == []


def test_implicit_tls_starts_after_the_header_and_the_dialogue_after_the_handshake(
        tmp_path, errors):
    legs = Connector(tmp_path, tls="implicit", node={"forwarding": "proxy"})
    d = legs.open()
    backend = legs.accept()
    header = proxy_header(2, client())
    assert backend.transport.tls_started_at == len(header) == len(backend.transport.value())
    assert IOpenSSLClientConnectionCreator.providedBy(backend.transport.tls_options)
    backend.receive(GREETING)  # (what the TLS layer would deliver)
    assert settled(d) is backend.leg
    assert errors == []


def test_starttls_runs_when_the_dialogue_asks_and_resumes_after_the_handshake(tmp_path, errors):
    legs = Connector(tmp_path, tls="starttls")
    d = legs.open()
    backend = legs.accept()
    assert backend.transport.tls_started_at is None
    backend.receive(b"* OK [CAPABILITY IMAP4rev1 STARTTLS] ready\r\n")
    assert backend.transport.value().endswith(b"STARTTLS\r\n")
    tag = backend.transport.value().split()[0]
    backend.receive(tag + b" OK begin TLS\r\n")
    assert backend.transport.tls_started_at == len(backend.transport.value())
    backend.transport.clear()
    backend.protocol.handshakeCompleted()  # type: ignore[attr-defined]
    assert backend.transport.value().endswith(b"CAPABILITY\r\n")  # asked again, over TLS
    tag = backend.transport.value().split()[0]
    backend.receive(b"* CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN\r\n" + tag + b" OK\r\n")
    assert settled(d) is backend.leg
    assert errors == []


def test_a_backend_without_starttls_is_refused(tmp_path, errors):
    legs = Connector(tmp_path, tls="starttls")
    d = legs.open()
    backend = legs.accept()
    backend.receive(GREETING)
    assert "does not offer STARTTLS" in str(failure_of(d, BackendUnavailable))
    backend.lose()
    assert errors == []


# -- the loop guard -----------------------------------------------------------------------


@pytest.mark.parametrize("bind", ["127.0.0.1:1143", "0.0.0.0:1143"])
def test_a_destination_that_is_one_of_our_own_listeners_is_refused(tmp_path, errors, bind):
    legs = Connector(tmp_path, bind=bind)
    d = legs.open()
    assert "own listeners (loop)" in str(failure_of(d, BackendUnavailable))
    legs.assert_idle()  # nothing was connected
    assert errors == []


def test_the_same_port_on_another_address_is_no_loop(tmp_path, errors):
    legs = Connector(tmp_path, bind="127.0.0.2:1143")
    d = legs.open()
    legs.accept().receive(GREETING)
    assert isinstance(settled(d), BackendLeg)
    assert errors == []


# -- cancellation by the caller (the client left) -----------------------------------------

STAGES = ("connecting", "retry_wait", "greeting", "starttls_handshake")


def _reach(legs: Connector, stage: str) -> tuple[Deferred[BackendLeg], Backend | None]:
    d = legs.open()
    if stage == "connecting":
        return d, None
    if stage == "retry_wait":
        legs.fail_connect()
        assert len(legs.reactor.getDelayedCalls()) == 2  # the retry and the timeout
        return d, None
    backend = legs.accept()
    if stage == "starttls_handshake":
        backend.receive(b"* OK [CAPABILITY IMAP4rev1 STARTTLS] ready\r\n")
        tag = backend.transport.value().split()[0]
        backend.receive(tag + b" OK begin TLS\r\n")
        assert backend.transport.tls_started_at is not None
    return d, backend


@pytest.mark.parametrize("stage", STAGES)
def test_a_cancelled_establishment_leaves_nothing_and_counts_nothing(tmp_path, errors, stage):
    legs = Connector(tmp_path, tls="starttls" if stage == "starttls_handshake" else "plain",
                     server={"backend_connect_retries": 1})
    d, backend = _reach(legs, stage)
    d.cancel()
    failure_of(d, CancelledError)
    if stage == "connecting":
        assert legs.reactor.connectors[0].stoppedConnecting
        legs.reactor.tcpClients.clear()
    if backend is not None:
        assert backend.transport.disconnected  # aborted
        backend.lose()  # no second settlement
    legs.assert_idle()
    assert legs.breaker.failures == 0 and legs.breaker.state == "closed"
    assert errors == []


def test_a_cancelled_login_aborts_the_leg(legs, errors):
    backend = legs.ready()
    login = backend.leg.login(ALICE, "a1")
    login.cancel()
    failure_of(login, CancelledError)
    assert backend.transport.disconnected
    backend.lose()
    legs.assert_idle()
    assert errors == []


@pytest.mark.parametrize("stage", STAGES)
def test_a_cancelled_probe_lets_the_next_one_through(tmp_path, errors, stage):
    """A half-open circuit lets one probe through; a client that leaves while it runs
    neither closes nor re-opens the circuit, and the next client may probe."""
    legs = Connector(tmp_path, tls="starttls" if stage == "starttls_handshake" else "plain",
                     server={"backend_connect_retries": 1, "host_down_threshold": 1,
                             "host_down_cooldown": "30s"})
    d = legs.open()
    legs.reactor.advance(BACKEND_TIMEOUT)  # times out connecting: the circuit opens
    failure_of(d, BackendTimeout)
    legs.reactor.tcpClients.clear()
    legs.reactor.connectors.clear()
    assert legs.breaker.state == "open"
    legs.reactor.advance(30)
    assert legs.breaker.state == "half_open"
    d, backend = _reach(legs, stage)
    d.cancel()
    failure_of(d, CancelledError)
    if backend is not None:
        backend.lose()
    legs.reactor.tcpClients.clear()
    legs.reactor.connectors.clear()
    assert legs.breaker.state == "half_open" and legs.breaker.trips == 1
    d = legs.open()  # the next client probes; its failure opens the circuit again
    legs.fail_connect()
    legs.reactor.advance(RETRY_DELAY)
    legs.fail_connect()
    failure_of(d, BackendUnavailable)
    assert legs.breaker.state == "open"  # for another cooldown
    legs.assert_idle()
    assert errors == []


# -- closing a leg ------------------------------------------------------------------------


def test_closing_a_leg_arms_an_abort_that_its_connection_loss_cancels(legs, errors):
    backend = legs.ready()
    lost: list[bool] = []
    backend.leg.attach(lambda data: None, lambda: lost.append(True))
    backend.transport.registerProducer(object(), True)  # as the session does at the splice
    backend.leg.close()
    assert backend.transport.disconnecting and not backend.transport.disconnected
    assert backend.transport.producer is None  # TLS would wait for it before closing
    assert [call.getTime() for call in legs.reactor.getDelayedCalls()] == [CLOSE_GRACE]
    backend.leg.close()  # twice: still one timer
    assert len(legs.reactor.getDelayedCalls()) == 1
    backend.lose()
    assert lost == []  # the session asked: it is not told
    legs.assert_idle()
    assert errors == []


def test_a_leg_that_does_not_finish_closing_is_aborted(legs, errors):
    backend = legs.ready()
    backend.leg.close()
    legs.reactor.advance(CLOSE_GRACE)
    assert backend.transport.disconnected
    backend.lose()
    legs.assert_idle()
    assert errors == []


def test_a_leg_lost_before_it_is_attached_tells_the_session_at_once(legs, errors):
    backend = legs.ready()
    backend.lose()
    lost: list[bool] = []
    backend.leg.attach(lambda data: None, lambda: lost.append(True))
    assert lost == [True]
    backend.leg.close()  # nothing left to close
    legs.assert_idle()
    assert errors == []


# -- real TLS (iosim) -----------------------------------------------------------------------


class IMAPBackend(Protocol):
    """A scripted IMAP backend: a PROXY header (if announced), implicit TLS or STARTTLS,
    capabilities, then silence."""

    def __init__(self, tls: Any, implicit: bool, proxy: bool) -> None:
        self._tls = tls
        self._implicit = implicit
        self._proxy = ProxyHeaderParser() if proxy else None
        self.header: ProxyHeader | None = None
        self._buffer = b""

    def connectionMade(self) -> None:
        if self._proxy is None:
            self._begin()

    def _begin(self) -> None:
        if self._implicit:
            self.transport.startTLS(self._tls)
            self.transport.write(GREETING)
        else:
            self.transport.write(b"* OK [CAPABILITY IMAP4rev1 STARTTLS] ready\r\n")

    def dataReceived(self, data: bytes) -> None:
        if self._proxy is not None:
            self.header = self._proxy.feed(data)
            if self.header is None:
                return
            rest, self._proxy = self._proxy.rest, None
            self._begin()
            if rest:
                self.transport.protocol.dataReceived(rest)  # (the ClientHello, to TLS)
            return
        self._buffer += data
        while b"\r\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\r\n", 1)
            tag, command = line.split(b" ", 1)
            if command == b"STARTTLS":
                self.transport.write(tag + b" OK begin TLS\r\n")
                self.transport.startTLS(self._tls)
            elif command == b"CAPABILITY":
                self.transport.write(b"* CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN\r\n"
                                     + tag + b" OK\r\n")


@dataclass(frozen=True)
class Certificates:
    ca: Path
    trusted: IssuedCertificate
    untrusted: IssuedCertificate


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    ca = CertificateAuthority(tmp_path_factory.mktemp("ca"))
    other = CertificateAuthority(tmp_path_factory.mktemp("other-ca"))
    return Certificates(ca.cert_path, ca.issue("imap", dns_names=["imap.test"]),
                        other.issue("imposter", dns_names=["imap.test"]))


def tls_connector(tmp_path: Path, certificates: Certificates, mode: str) -> Connector:
    return Connector(tmp_path, tls=mode, node={
        "forwarding": "proxy", "tls_ca_file": str(certificates.ca),
        "tls_server_name": "imap.test"})


def tls_backend(legs: Connector, certificate: IssuedCertificate,
                implicit: bool) -> tuple[IMAPBackend, Any]:
    """Complete the pending connect with an in-memory IMAP backend over real TLS."""
    factory, _connector = legs.pending()
    server = IMAPBackend(server_options(certificate.cert_path.read_bytes(),
                                        certificate.key_path.read_bytes()),
                         implicit, proxy=True)
    pump = connect(factory.buildProtocol(None), server, legs.reactor,
                   ("127.0.0.1", 50000), BACKEND)
    pump.flush()
    return server, pump


@pytest.mark.parametrize("mode", ["implicit", "starttls"])
def test_a_tls_leg_is_ready_after_a_real_handshake(tmp_path, certificates, errors, mode):
    legs = tls_connector(tmp_path, certificates, mode)
    d = legs.open()
    server, pump = tls_backend(legs, certificates.trusted, implicit=mode == "implicit")
    assert server.header is not None and server.header.source == client().peer
    leg = settled(d)
    assert isinstance(leg, BackendLeg) and leg.transport.TLS
    legs.assert_idle()
    leg.close()  # close_notify both ways, then the connection is lost
    pump.flush()
    legs.assert_idle()
    assert errors == []


@pytest.mark.parametrize("mode", ["implicit", "starttls"])
def test_an_untrusted_backend_certificate_fails_the_leg_after_connecting(
        tmp_path, certificates, errors, mode):
    legs = tls_connector(tmp_path, certificates, mode)
    d = legs.open()
    tls_backend(legs, certificates.untrusted, implicit=mode == "implicit")
    exc = failure_of(d, BackendUnavailable)
    assert not exc.connect_stage and "certificate verify failed" in str(exc)
    legs.assert_idle()
    assert legs.breaker.failures == 0  # one client's post-connect failure: not yet counted
    assert errors == []


def test_a_tls_backend_that_never_answers_the_close_is_aborted(tmp_path, certificates, errors):
    legs = tls_connector(tmp_path, certificates, "implicit")
    d = legs.open()
    _server, pump = tls_backend(legs, certificates.trusted, implicit=True)
    leg = settled(d)
    leg.close()  # the close_notify is written, the backend's never comes (nothing pumped)
    assert len(legs.reactor.getDelayedCalls()) == 1
    legs.reactor.advance(CLOSE_GRACE)
    pump.flush()
    legs.assert_idle()
    assert errors == []
