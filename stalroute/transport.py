"""The transport of a TCP connection as stalroute uses it, client connection or backend leg.

Twisted declares ``Protocol.transport`` as an optional ``ITransport``; once connected, it is a
TCP transport (possibly under TLS), which also consumes and produces with flow control and
aborts. :class:`StreamTransport` says so for the type checker.

The reactor is typed by the Twisted interfaces a part uses: ``IReactorTime`` for a clock
alone; :class:`IConnectingReactor` where backend legs are connected; :class:`IServingReactor`
for the proxy service, which also adopts listening sockets and is handed SIGHUP from the
signal handler. They only combine Twisted's interfaces (every real reactor provides them all);
a process's entry point casts the reactor it imports to the one it passes on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import (
    IProtocol,
    IPushProducer,
    IReactorFromThreads,
    IReactorSocket,
    IReactorTCP,
    IReactorTime,
)
from zope.interface import implementer


class StreamTransport(Protocol):
    """A connected TCP transport (``ITCPTransport``, ``IConsumer``, ``IPushProducer``; TLS
    starts on it with :func:`stalroute.tls_layer.start_tls`)."""

    @property
    def connected(self) -> bool:
        """False once the connection is lost."""

    #: The protocol the transport delivers to (under TLS: the TLS layer).
    protocol: IProtocol

    def getPeer(self) -> IPv4Address | IPv6Address: ...

    def getHost(self) -> IPv4Address | IPv6Address: ...

    def write(self, data: bytes) -> None: ...

    def loseConnection(self) -> None: ...

    def abortConnection(self) -> None: ...

    def registerProducer(self, producer: IPushProducer | StreamTransport,
                         streaming: bool) -> None:
        """``producer``: a push producer, such as the transport of the other leg."""

    def unregisterProducer(self) -> None: ...

    def pauseProducing(self) -> None: ...

    def resumeProducing(self) -> None: ...

    def setTcpNoDelay(self, enabled: bool) -> None: ...


class IConnectingReactor(IReactorTime, IReactorTCP):
    """A clock that opens TCP connections: what backend legs need (``BackendConnector``,
    ``build_runtime``, the capability probes)."""


class IServingReactor(IConnectingReactor, IReactorSocket, IReactorFromThreads):
    """The proxy service's reactor: backend legs, adopted listening sockets
    (``adoptStreamPort``) and ``callFromThread`` (SIGHUP leaves the signal handler by it)."""


def no_delay(transport: StreamTransport) -> None:
    """Small writes (an IMAP tagged answer, a WebSocket frame) leave at once, as in any
    proxy: Nagle's algorithm would hold one back until the peer acknowledges the last."""
    try:
        transport.setTcpNoDelay(True)
    except Exception:  # noqa: BLE001 - not a TCP transport (tests, a UNIX socket)
        pass


@implementer(IPushProducer)
class ReadingWatch:
    """Registered as a client transport's producer: tells the connection when its client
    stops (``True``) and resumes (``False``) reading what is written to it, so that it answers
    no more meanwhile. TLS also pauses its producer until the handshake is done, which needs
    reading: a pause must hold back the answers, never the reading itself."""

    def __init__(self, blocked: Callable[[bool], None]) -> None:
        self._blocked = blocked

    def pauseProducing(self) -> None:
        self._blocked(True)

    def resumeProducing(self) -> None:
        self._blocked(False)

    def stopProducing(self) -> None:
        pass  # the connection is going away; connectionLost follows
