"""stalroute's TLS layer (``stalroute.tls_layer``) between two in-memory transports: real
handshakes and records, no socket. Every TLS connection of the proxy runs through it; these
tests pin the behaviour it keeps from Twisted's layer and what it does differently."""

from __future__ import annotations

import gc
import weakref
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IHandshakeListener, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.test import iosim
from zope.interface import implementer

from stalroute.tls import ResumingClientTLS
from stalroute.tls_layer import RecordBoundaries, TLSLayer
from tests.harness.memory import (
    TLSFakeTransport, client_options_without_verification, connect, server_options,
)
from tests.harness.pki import CertificateAuthority, IssuedCertificate


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def certificate(ca: CertificateAuthority) -> IssuedCertificate:
    return ca.issue("imap", dns_names=["imap.test"])


@implementer(IHandshakeListener)
class Peer(Protocol):
    """Starts TLS when connected, writes ``greeting`` at once (before the handshake), and
    records what happens."""

    def __init__(self, options: Any, greeting: bytes = b"") -> None:
        self.options = options
        self.greeting = greeting
        self.received: list[bytes] = []
        self.handshakes = 0
        self.reason: Failure | None = None

    def connectionMade(self) -> None:
        self.transport.startTLS(self.options)  # type: ignore[union-attr]
        if self.greeting:
            self.transport.write(self.greeting)  # type: ignore[union-attr]

    def handshakeCompleted(self) -> None:
        self.handshakes += 1

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self.reason = reason

    @property
    def layer(self) -> TLSLayer:
        layer = self.transport.protocol  # type: ignore[union-attr]
        assert isinstance(layer, TLSLayer)
        return layer


def pair(certificate: IssuedCertificate, client_options: Any = None,
         server_greeting: bytes = b"", client_greeting: bytes = b"") -> tuple[Peer, Peer, Any]:
    server = Peer(server_options(certificate.cert_path.read_bytes(),
                                 certificate.key_path.read_bytes()), server_greeting)
    client = Peer(client_options or client_options_without_verification(), client_greeting)
    pump = connect(client, server, MemoryReactorClock(), ("127.0.0.1", 40000),
                   ("127.0.0.1", 993))
    return server, client, pump


def test_writes_before_the_handshake_arrive_after_it_in_order(certificate):
    server, client, pump = pair(certificate, server_greeting=b"* OK ready\r\n",
                                client_greeting=b"a LOGIN\r\n")
    server.transport.write(b"* second line\r\n")
    pump.flush()
    assert (server.handshakes, client.handshakes) == (1, 1)
    assert b"".join(client.received) == b"* OK ready\r\n* second line\r\n"
    assert b"".join(server.received) == b"a LOGIN\r\n"
    assert server.transport.TLS and server.transport.getHandle().get_cipher_name()


def test_what_one_read_decrypts_is_delivered_in_one_call(certificate):
    server, client, pump = pair(certificate)
    pump.flush()
    for n in range(5):  # five TLS records, pumped to the server as one read
        client.transport.write(b"line %d\r\n" % n)
    pump.flush()
    assert server.received == [b"".join(b"line %d\r\n" % n for n in range(5))]


def test_a_large_write_arrives_whole(certificate):
    server, client, pump = pair(certificate)
    pump.flush()
    payload = bytes(range(256)) * 8192  # 2 MiB: many records, several BIO reads
    server.transport.write(payload)
    pump.flush()
    assert b"".join(client.received) == payload


def test_data_moves_through_the_bios_a_record_at_a_time(certificate):
    """A memory BIO keeps the largest size it ever held: a relayed 256 KiB must not leave
    BIOs of that size on an idle connection."""
    server, client, pump = pair(certificate)
    pump.flush()
    into, out_of = [], []
    for peer, sizes, method in ((server, into, "bio_write"), (client, out_of, "bio_read")):
        connection = peer.layer.getHandle()
        original = getattr(connection, method)

        def recorded(arg: Any, original: Any = original, sizes: list[int] = sizes) -> Any:
            result = original(arg)
            sizes.append(len(arg if isinstance(arg, bytes) else result))
            return result

        setattr(connection, method, recorded)
    payload = b"x" * 2**18
    client.transport.write(payload)  # one write, one pump: 256 KiB in one "socket read"
    pump.flush()
    assert b"".join(server.received) == payload
    assert len(server.received) == 1  # still one delivery
    record = 5 + 2**14 + 256  # a record's header and ciphertext, at most
    assert max(into) <= record and max(out_of) <= record and sum(out_of) >= len(payload)


def records(lengths: list[int]) -> bytes:
    return b"".join(b"\x17\x03\x03" + n.to_bytes(2, "big") + bytes(n) for n in lengths)


@given(st.lists(st.integers(0, 300), max_size=8), st.lists(st.integers(1, 400), max_size=8))
def test_record_boundaries_cut_where_records_end_across_reads(lengths, reads):
    """However the stream is split into reads, the pieces join up to it and each piece but
    a read's last ends where a record ends."""
    stream = records(lengths)
    ends, total = set(), 0
    for n in lengths:
        total += 5 + n
        ends.add(total)
    cutter, offset, joined = RecordBoundaries(), 0, b""
    cuts = [min(sum(reads[:i + 1]), len(stream)) for i in range(len(reads))] + [len(stream)]
    for cut in cuts:
        read, offset = stream[offset:cut], max(offset, cut)
        pieces = cutter.cut(read)
        assert b"".join(pieces) == read
        for piece in pieces[:-1]:
            joined += piece
            assert len(joined) in ends
        if pieces:
            joined += pieces[-1]
    assert joined == stream


@given(st.binary(max_size=2000))
def test_record_boundaries_lose_nothing_of_garbage(data):
    cutter = RecordBoundaries()
    assert b"".join(cutter.cut(data[:700]) + cutter.cut(data[700:])) == data


def test_lose_connection_sends_close_notify_and_waits_for_the_peers(certificate):
    server, client, pump = pair(certificate)
    pump.flush()
    server.transport.loseConnection()
    assert server.layer.getHandle().get_shutdown() & SSL.SENT_SHUTDOWN
    assert not server.transport.disconnecting  # the socket waits for the peer's answer
    pump.flush()  # the client's layer answers close_notify and closes
    assert client.reason is not None and client.reason.check(ConnectionDone)
    assert server.reason is not None and server.reason.check(ConnectionDone)


def test_a_peer_that_leaves_without_close_notify_is_reported_as_lost(certificate):
    server, client, pump = pair(certificate)
    pump.flush()
    client.transport.abortConnection()  # below TLS: no close_notify, as a TCP FIN or RST
    pump.flush()
    assert server.reason is not None and server.reason.check(ConnectionLost)


def test_lose_connection_before_the_handshake_aborts(certificate):
    client = Peer(client_options_without_verification())
    client.makeConnection(TLSFakeTransport(client, False, iosim.FakeAddress(),
                                           iosim.FakeAddress()))
    client.transport.loseConnection()  # the ClientHello is out, nothing else is pending
    assert client.layer.disconnecting and client.transport.disconnecting
    client.transport.reportDisconnect()
    assert client.handshakes == 0 and client.reason is not None


def test_writes_after_lose_connection_are_dropped(certificate):
    server, client, pump = pair(certificate)
    pump.flush()
    server.transport.write(b"last\r\n")
    server.transport.loseConnection()
    server.transport.write(b"too late\r\n")
    pump.flush()
    assert b"".join(client.received) == b"last\r\n"


def test_a_certificate_that_fails_verification_is_the_reason(ca, certificate, tmp_path):
    other = CertificateAuthority(tmp_path / "other").issue("imposter", dns_names=["imap.test"])
    trusted = ssl.optionsForClientTLS("imap.test", trustRoot=ssl.Certificate.loadPEM(
        ca.cert_path.read_bytes()))
    server, client, pump = pair(other, client_options=trusted,
                                server_greeting=b"* OK ready\r\n")
    pump.flush()
    assert client.handshakes == 0 and client.received == []
    assert client.reason is not None and client.reason.check(SSL.Error)


@implementer(IPushProducer)
class Producer:
    def __init__(self) -> None:
        self.events: list[str] = []

    def pauseProducing(self) -> None:
        self.events.append("pause")

    def resumeProducing(self) -> None:
        self.events.append("resume")

    def stopProducing(self) -> None:
        self.events.append("stop")


def test_a_producer_is_registered_with_the_socket_and_delays_close_notify(certificate):
    server, client, pump = pair(certificate)
    pump.flush()
    producer = Producer()
    server.transport.registerProducer(producer, True)
    assert server.transport.producer is producer  # passed through: no adapter between
    server.transport.loseConnection()
    server.transport.write(b"still relayed\r\n")  # a producer may finish its writes
    assert not server.layer.getHandle().get_shutdown() & SSL.SENT_SHUTDOWN
    server.transport.unregisterProducer()
    assert server.layer.getHandle().get_shutdown() & SSL.SENT_SHUTDOWN
    pump.flush()
    assert b"".join(client.received) == b"still relayed\r\n"
    assert server.reason is not None and server.reason.check(ConnectionDone)


def test_a_producer_registered_before_tls_moves_under_it(certificate):
    server = Peer(server_options(certificate.cert_path.read_bytes(),
                                 certificate.key_path.read_bytes()))
    producer = Producer()

    class EarlyProducer(Peer):
        def connectionMade(self) -> None:
            self.transport.registerProducer(producer, True)  # type: ignore[union-attr]
            super().connectionMade()

    client = EarlyProducer(client_options_without_verification())
    pump = connect(client, server, MemoryReactorClock(), ("127.0.0.1", 40000),
                   ("127.0.0.1", 993))
    pump.flush()
    assert client.transport.producer is producer and client.layer._producer is producer
    client.transport.unregisterProducer()
    assert client.transport.producer is None


def test_a_producer_registered_after_the_end_is_stopped(certificate):
    server, client, pump = pair(certificate)
    pump.flush()
    client.transport.abortConnection()
    pump.flush()
    producer = Producer()
    server.layer.registerProducer(producer, True)
    assert producer.events == ["stop"]


def test_garbage_instead_of_a_handshake_ends_the_connection_with_the_tls_error(certificate):
    server = Peer(server_options(certificate.cert_path.read_bytes(),
                                 certificate.key_path.read_bytes()))

    class Plain(Protocol):
        def connectionMade(self) -> None:
            self.transport.write(b"a LOGIN alice secret\r\n")  # type: ignore[union-attr]

    pump = connect(Plain(), server, MemoryReactorClock(), ("127.0.0.1", 40000),
                   ("127.0.0.1", 993))
    pump.flush()
    assert server.handshakes == 0 and server.received == []
    assert server.reason is not None and server.reason.check(SSL.Error)


def test_a_tls_error_after_the_handshake_is_the_reason(certificate):
    server, client, pump = pair(certificate)
    pump.flush()
    server.transport.protocol.dataReceived(b"\x17\x03\x03\x00\x05hello")  # a forged record
    assert server.transport.disconnecting
    pump.flush()
    assert server.reason is not None and server.reason.check(SSL.Error)
    assert server.received == []


def test_a_closed_connection_is_freed_without_the_cycle_collector(ca, certificate):
    """Nothing of the layer's refers back to it once the connection is lost, so a finished
    connection's objects and OpenSSL's memory go at once, not at the collector's next full
    pass. The client resumes its session, so Twisted's verify callback is never called (it
    forgets its protocol only when called)."""
    legs = ResumingClientTLS(ssl.optionsForClientTLS("imap.test", trustRoot=ssl.Certificate.loadPEM(
        ca.cert_path.read_bytes())))

    tickets = server_options(certificate.cert_path.read_bytes(),
                             certificate.key_path.read_bytes(), session_tickets=True)

    def conversation() -> tuple[Peer, Peer, Any]:
        server, client = Peer(tickets, b"* OK ready\r\n"), Peer(legs)
        pump = connect(client, server, MemoryReactorClock(), ("127.0.0.1", 40000),
                       ("127.0.0.1", 993))
        pump.flush()  # the tickets came before the greeting
        legs.remember(client.transport.getHandle())
        client.transport.loseConnection()
        pump.flush()
        assert client.reason is not None and server.reason is not None
        return server, client, pump

    conversation()
    server, client, pump = conversation()
    layers = [weakref.ref(server.layer), weakref.ref(client.layer)]
    tls = [weakref.ref(server.transport.getHandle()), weakref.ref(client.transport.getHandle())]
    for transport in (server.transport, client.transport):
        del transport.protocol  # as Twisted's TCP transport does once the connection is lost
    gc.disable()
    try:
        del server, client, pump
        assert [ref() for ref in layers + tls] == [None] * 4
    finally:
        gc.enable()
