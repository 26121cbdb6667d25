"""TLS session resumption on both legs, in memory (issue 14): a client that comes back with
its session ticket skips the full handshake at stalroute; a backend leg offers the session of
the last leg to the same destination port, and the backend resumes it.

The peers are Python's ``ssl`` module (what a client or a backend library does) and stalroute's
own OpenSSL contexts, wired through memory BIOs; ``session_reused`` is the peer's own word.
"""

from __future__ import annotations

import ssl
from types import SimpleNamespace
from typing import Protocol

import pytest
from OpenSSL import SSL

from stalroute.config import (
    CertificateConfig, DestinationConfig, TLSConfig, TLSProtocolsConfig,
)
from stalroute.tls import ResumingClientTLS, ServerTLS, backend_tls
from tests.harness.pki import CertificateAuthority

GREETING = b"* OK ready\r\n"


class End(Protocol):
    def handshake(self) -> bool: ...

    def send(self, data: bytes) -> None: ...

    def receive(self) -> bytes: ...

    def take(self) -> bytes: ...

    def give(self, data: bytes) -> None: ...


class PythonEnd:
    """A Python ``ssl`` peer on memory BIOs."""

    def __init__(self, context: ssl.SSLContext, server_side: bool,
                 session: ssl.SSLSession | None = None) -> None:
        self._incoming, self._outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self._incoming, self._outgoing, server_side=server_side,
                                    server_hostname=None if server_side else "localhost",
                                    session=session)

    def handshake(self) -> bool:
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            return False
        return True

    def send(self, data: bytes) -> None:
        self.tls.write(data)

    def receive(self) -> bytes:
        try:
            return self.tls.read(65536)
        except ssl.SSLWantReadError:
            return b""

    def take(self) -> bytes:
        return self._outgoing.read()

    def give(self, data: bytes) -> None:
        self._incoming.write(data)


class OpenSSLEnd:
    """A pyOpenSSL peer (stalroute's side) on its memory BIO."""

    def __init__(self, connection: SSL.Connection) -> None:
        self.connection = connection

    def handshake(self) -> bool:
        try:
            self.connection.do_handshake()
        except SSL.WantReadError:
            return False
        return True

    def send(self, data: bytes) -> None:
        self.connection.send(data)

    def receive(self) -> bytes:
        try:
            return self.connection.recv(65536)
        except SSL.WantReadError:
            return b""

    def take(self) -> bytes:
        try:
            return self.connection.bio_read(65536)
        except SSL.WantReadError:
            return b""

    def give(self, data: bytes) -> None:
        if data:
            self.connection.bio_write(data)


def converse(client: End, server: End) -> bytes:
    """Handshake, then the server greets; what the client read (its tickets came first)."""
    client_done = server_done = False
    for _ in range(20):
        client_done = client_done or client.handshake()
        server.give(client.take())
        server_done = server_done or server.handshake()
        client.give(server.take())
        if client_done and server_done:
            break
    assert client_done and server_done
    server.send(GREETING)
    client.give(server.take())
    return client.receive()


class LegProtocol:
    """What Twisted's TLS glue would be as the connection's app data: its factory (asked for
    ALPN protocols: none) and the verification failure it would report."""

    factory = SimpleNamespace(wrappedFactory=None)

    def failVerification(self, reason: object) -> None:
        raise AssertionError(f"verification failed: {reason}")


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority(tmp_path_factory.mktemp("ca"))


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_a_returning_client_resumes_its_session(ca: CertificateAuthority,
                                                version: ssl.TLSVersion) -> None:
    issued = ca.issue("stalroute", ["localhost"], ())
    certificate = CertificateConfig(name="main", cert=issued.cert_path, key=issued.key_path)
    server = ServerTLS(TLSConfig(certificates={"main": certificate},
                                 protocols=TLSProtocolsConfig()), "localhost")
    context = ca.client_context()
    context.minimum_version = context.maximum_version = version

    def connect(session: ssl.SSLSession | None) -> PythonEnd:
        client = PythonEnd(context, server_side=False, session=session)
        peer = SSL.Connection(server.options.getContext(), None)
        peer.set_accept_state()
        assert converse(client, OpenSSLEnd(peer)) == GREETING
        return client

    first = connect(None)
    assert not first.tls.session_reused
    again = connect(first.tls.session)
    assert again.tls.session_reused


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_a_backend_leg_resumes_the_session_of_the_last_one(ca: CertificateAuthority,
                                                           version: ssl.TLSVersion) -> None:
    issued = ca.issue("backend", ["localhost"], ())
    backend = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    backend.load_cert_chain(issued.cert_path, issued.key_path)
    backend.minimum_version = backend.maximum_version = version
    destination = DestinationConfig(name="node1", host="localhost", tls_ca_file=ca.cert_path)
    legs = ResumingClientTLS(backend_tls(destination))

    def leg() -> bool:
        connection = legs.clientConnectionForTLS(LegProtocol())
        connection.set_connect_state()
        server = PythonEnd(backend, server_side=True)
        assert converse(OpenSSLEnd(connection), server) == GREETING
        legs.remember(connection)
        connection.shutdown()  # as a leg ends (OpenSSL forgets the session of an aborted one)
        return server.tls.session_reused

    assert [leg(), leg(), leg()] == [False, True, True]
