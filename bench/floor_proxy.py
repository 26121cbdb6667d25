#!/usr/bin/env python3
"""The floor of a Python proxy: HAProxy's ``mode tcp`` job on stalroute's TLS stack, no more.

``compare_bench.py --floor`` measures it as one more column: it accepts, terminates TLS with
stalroute's layer (``stalroute.tls_layer``) and server options (session tickets on), connects
to the next backend in turn with a PROXY v2 header and TLS that resumes the last leg's session
(``stalroute.tls.ResumingClientTLS``), then relays both ways with flow control. No pre-auth
dialogue, routing, login replay, registry, limits or logs: what stalroute spends above this
column is its own logic; what this column spends above HAProxy's is the price of Twisted,
pyOpenSSL and Python for the same work.

``floor_proxy.py PORT CERT KEY CA HOST:PORT:NAME [HOST:PORT:NAME ...]`` (loopback only).
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402
from twisted.internet import reactor  # noqa: E402
from twisted.internet import ssl  # noqa: E402
from twisted.internet.protocol import ClientFactory, Factory, Protocol  # noqa: E402
from twisted.python.failure import Failure  # noqa: E402

from stalroute.proxyproto import encode_v2  # noqa: E402
from stalroute.tls import ResumingClientTLS  # noqa: E402
from stalroute.tls_layer import start_tls  # noqa: E402
from stalroute.transport import no_delay  # noqa: E402


class BackendLeg(Protocol):
    """The backend end of one session: PROXY v2, TLS, then bytes for the client."""

    def __init__(self, client: ClientLeg, tls: ResumingClientTLS) -> None:
        self.client = client
        self.tls: ResumingClientTLS | None = tls  # until the session to resume is kept

    def connectionMade(self) -> None:
        if self.client.gone:
            self.transport.abortConnection()
            return
        no_delay(self.transport)
        peer, local = self.client.transport.getPeer(), self.client.transport.getHost()
        self.transport.write(encode_v2((peer.host, peer.port), (local.host, local.port)))
        start_tls(self.transport, self.tls)
        self.client.spliced(self)

    def dataReceived(self, data: bytes) -> None:
        if self.tls is not None:  # the greeting: TLS 1.3 tickets came before it
            self.tls.remember(self.transport.getHandle())
            self.tls = None
        self.client.transport.write(data)

    def connectionLost(self, reason: Failure) -> None:
        self.client.transport.unregisterProducer()  # TLS closes once no producer is left
        self.client.transport.loseConnection()


class ClientLeg(Protocol):
    """The client end: TLS at once, then a backend leg; bytes before it wait."""

    def __init__(self, backends: itertools.cycle, server_tls: ssl.CertificateOptions) -> None:
        self.backends = backends
        self.server_tls = server_tls
        self.backend: BackendLeg | None = None
        self.early: list[bytes] = []
        self.gone = False

    def connectionMade(self) -> None:
        no_delay(self.transport)
        start_tls(self.transport, self.server_tls)
        host, port, tls = next(self.backends)
        reactor.connectTCP(host, port, _One(self, tls))  # type: ignore[attr-defined]

    def spliced(self, backend: BackendLeg) -> None:
        self.backend = backend
        backend.transport.write(b"".join(self.early))
        self.early.clear()
        self.transport.registerProducer(backend.transport, True)
        backend.transport.registerProducer(self.transport, True)

    def dataReceived(self, data: bytes) -> None:
        if self.backend is None:
            self.early.append(data)
        else:
            self.backend.transport.write(data)

    def connectionLost(self, reason: Failure) -> None:
        self.gone = True
        backend, self.backend = self.backend, None  # (the legs would refer to each other)
        if backend is not None:
            backend.transport.unregisterProducer()
            backend.transport.loseConnection()


class _One(ClientFactory):
    """Connects one backend leg; a failed connect ends the client's session."""

    noisy = False

    def __init__(self, client: ClientLeg, tls: ResumingClientTLS) -> None:
        self.client = client
        self.tls = tls

    def buildProtocol(self, addr: object) -> BackendLeg:
        return BackendLeg(self.client, self.tls)

    def clientConnectionLost(self, connector: object, reason: Failure) -> None:
        del self.client  # Twisted's connector outlives the leg in a cycle with its transport

    def clientConnectionFailed(self, connector: object, reason: Failure) -> None:
        self.client.transport.abortConnection()


class Listener(Factory):
    noisy = False

    def __init__(self, backends: itertools.cycle, server_tls: ssl.CertificateOptions) -> None:
        self.backends = backends
        self.server_tls = server_tls

    def buildProtocol(self, addr: object) -> ClientLeg:
        return ClientLeg(self.backends, self.server_tls)


def main(argv: list[str]) -> None:
    port, cert, key, ca, *backends = argv
    server_tls = ssl.CertificateOptions(
        privateKey=serialization.load_pem_private_key(Path(key).read_bytes(), None),
        certificate=x509.load_pem_x509_certificate(Path(cert).read_bytes()),
        enableSessionTickets=True)
    trust = ssl.Certificate.loadPEM(Path(ca).read_text())
    legs = []
    for backend in backends:
        host, backend_port, name = backend.split(":")
        legs.append((host, int(backend_port), ResumingClientTLS(ssl.optionsForClientTLS(
            name, trustRoot=trust, extraCertificateOptions={"enableSessionTickets": True}))))
    reactor.listenTCP(  # type: ignore[attr-defined]
        int(port), Listener(itertools.cycle(legs), server_tls), interface="127.0.0.1")
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main(sys.argv[1:])
