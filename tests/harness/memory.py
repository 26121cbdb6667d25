"""In-memory connections for tests of the Twisted glue: no socket, no server, real TLS.

``twisted.test.iosim`` pumps bytes between two protocols, but its ``startTLS`` only pretends
(no handshake, no ``handshakeCompleted``, no failure). :class:`TLSFakeTransport` starts real
TLS the way a TCP transport does in stalroute (``stalroute.tls_layer``): a ``TLSLayer`` is
put between the transport and its protocol, so a handshake succeeds, fails on a certificate,
or waits for a ``close_notify`` exactly as it would on a socket.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet import ssl
from twisted.internet.defer import Deferred
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import (
    IOpenSSLContextFactory, IProtocol, IPushProducer,
)
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.logger import LogEvent, LogLevel, globalLogPublisher
from twisted.test import iosim

from stalroute.control import Control, Done
from stalroute.tls_layer import TLSLayer, Wire, insert_layer


class TLSFakeTransport(iosim.FakeTransport):
    """An ``iosim`` transport whose ``startTLS`` negotiates real TLS with stalroute's layer,
    routed the way Twisted's TCP transport routes it (``twisted.internet._newtls``)."""

    TLS = False

    def startTLS(self, contextFactory: IOpenSSLContextFactory, beNormal: bool = True) -> None:
        insert_layer(self, contextFactory, Wire(self, iosim.FakeTransport),
                     client=beNormal != self.isServer)

    @property
    def tls_layer(self) -> TLSLayer | None:
        return self.protocol if self.TLS else None

    def write(self, data: bytes) -> None:
        if self.tls_layer is not None:
            self.tls_layer.write(data)
        else:
            super().write(data)

    def loseConnection(self) -> None:
        if self.tls_layer is not None:
            self.tls_layer.loseConnection()
        else:
            super().loseConnection()

    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None:
        if self.tls_layer is not None:
            self.tls_layer.registerProducer(producer, streaming)
        else:
            super().registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        if self.tls_layer is not None:
            self.tls_layer.unregisterProducer()
        else:
            super().unregisterProducer()


def connect(client: IProtocol, server: IProtocol, clock: MemoryReactorClock,
            client_address: tuple[str, int], server_address: tuple[str, int]) -> iosim.IOPump:
    """Connect ``client`` to ``server`` in memory (their greetings are exchanged at once);
    pumping the result moves the bytes and runs ``clock``'s calls that are due."""
    client_side, server_side = (IPv4Address("TCP", *client_address),
                                IPv4Address("TCP", *server_address))
    return iosim.connect(server, TLSFakeTransport(server, True, server_side, client_side),
                         client, TLSFakeTransport(client, False, client_side, server_side),
                         clock=clock)


def server_options(cert_pem: bytes, key_pem: bytes,
                   session_tickets: bool = False) -> IOpenSSLContextFactory:
    """The TLS settings of an in-memory server presenting one certificate (issuing session
    tickets, with ``session_tickets``, so that a client can resume)."""
    return ssl.CertificateOptions(certificate=x509.load_pem_x509_certificate(cert_pem),
                                  privateKey=serialization.load_pem_private_key(key_pem, None),
                                  enableSessionTickets=session_tickets)


def client_options_without_verification() -> IOpenSSLContextFactory:
    """A TLS client that accepts any certificate (the tests check the proxy, not the CA)."""
    return ssl.CertificateOptions(verify=False)


@contextmanager
def logged_errors() -> Iterator[list[LogEvent]]:
    """The error and critical log events of a block (an AlreadyCalledError, an unhandled
    error in a Deferred that was garbage collected at the end)."""
    events: list[LogEvent] = []

    def observe(event: LogEvent) -> None:
        if event.get("log_level") in (LogLevel.error, LogLevel.critical) \
                or event.get("isError"):
            events.append(event)

    globalLogPublisher.addObserver(observe)
    gc.freeze()  # the collection at the end then only scans what the block allocated
    try:
        yield events
        gc.collect()  # unhandled failures in garbage Deferreds are logged now
    finally:
        gc.unfreeze()
        globalLogPublisher.removeObserver(observe)


# --- plain in-memory connections (StringTransport) ---------------------------------------------


def accept(factory: Factory, port: int, peer: str = "192.0.2.7") -> tuple[IProtocol, StringTransport]:
    """A client connection accepted by a listener ``factory`` on 127.0.0.1:``port``."""
    protocol = factory.buildProtocol(IPv4Address("TCP", peer, 40000))
    transport = StringTransport(hostAddress=IPv4Address("TCP", "127.0.0.1", port),
                                peerAddress=IPv4Address("TCP", peer, 40000))
    protocol.makeConnection(transport)
    return protocol, transport


def complete_connect(reactor: MemoryReactorClock) -> tuple[IProtocol, StringTransport, int]:
    """Complete the oldest connect the code asked ``reactor`` for (a backend leg): its protocol,
    transport and port."""
    _host, port, factory, _timeout, _bind = reactor.tcpClients.pop(0)
    protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", port))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", port))
    protocol.makeConnection(transport)
    return protocol, transport, port


def lose(protocol: IProtocol, transport: StringTransport, clean: bool = True) -> None:
    """Deliver the connection loss a closing (or failing) transport ends in, once."""
    if getattr(transport, "lost", False):
        return
    transport.lost = True  # type: ignore[attr-defined]
    protocol.connectionLost(Failure(ConnectionDone() if clean else ConnectionLost()))


def settled(d: Deferred[Any]) -> Any:
    """What ``d`` fired with (a result or a Failure), consuming a failure."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    return results[0]


def failure_of(d: Deferred[Any], kind: type[BaseException]) -> BaseException:
    """The exception ``d`` failed with, which must be a ``kind``."""
    result = settled(d)
    assert isinstance(result, Failure), f"succeeded with {result!r}"
    assert result.check(kind) and result.value is not None, result
    return result.value


def kicked(control: Control, **who: str) -> int:
    """The sessions a kick closed in this process (the change settles at once without a
    coordinator or workers)."""
    done: Done = settled(control.kick(**who))
    return done.count
