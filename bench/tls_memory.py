#!/usr/bin/env python3
"""What OpenSSL holds per TLS connection of stalroute, after its handshake (the floor of the
"memory per idle session" row).

In one process, without sockets: ``--connections`` pairs over memory BIOs, each with stalroute's
own TLS settings on its end (``ServerTLS`` for a client leg's server end, ``ResumingClientTLS``
over ``backend_tls`` for a backend leg's client end) and pyOpenSSL's defaults on the peer's;
each pair does its handshake, a greeting and a command, then only stalroute's end is kept. The
C heap in use (glibc ``mallinfo2``: what OpenSSL allocates, and Python objects over 512 bytes)
before and after, divided by the connections. The OpenSSL is the one pyOpenSSL runs on
(``cryptography``'s bundled library).

``.venv/bin/python bench/tls_memory.py`` (a few seconds; no servers, no root).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

from cryptography.hazmat.backends.openssl.backend import backend  # noqa: E402
from OpenSSL import SSL  # noqa: E402

from bench.common import issue_rsa_certificate, print_table  # noqa: E402
from stalroute.config import (  # noqa: E402
    CertificateConfig, DestinationConfig, TLSConfig, TLSProtocolsConfig,
)
from stalroute.tls import ResumingClientTLS, ServerTLS, backend_tls  # noqa: E402
from stalroute.tls_layer import TLSLayer  # noqa: E402
from tests.harness.pki import CertificateAuthority  # noqa: E402


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


_libc = ctypes.CDLL("libc.so.6")
_libc.mallinfo2.restype = _MallInfo2


def heap_in_use() -> int:
    gc.collect()
    info = _libc.mallinfo2()
    return info.uordblks + info.hblkhd


class _LegProtocol:
    """What Twisted's client options ask of the protocol (ALPN: none) and may call."""

    factory = TLSLayer.factory

    def failVerification(self, reason: object) -> None:
        raise RuntimeError(f"verification failed: {reason}")


def converse(client: SSL.Connection, server: SSL.Connection) -> None:
    """Handshake, greeting (the TLS 1.3 tickets come before it), one command."""
    def move(source: SSL.Connection, sink: SSL.Connection) -> None:
        try:
            sink.bio_write(source.bio_read(65536))
        except SSL.WantReadError:
            pass

    for _ in range(6):
        for end, peer in ((client, server), (server, client)):
            try:
                end.do_handshake()
            except SSL.WantReadError:
                pass
            move(end, peer)
    server.send(b"* OK ready\r\n")
    move(server, client)
    client.recv(4096)
    client.send(b"a LOGIN alice secret\r\n")
    move(client, server)
    server.recv(4096)


def per_connection(count: int, make: Callable[[], SSL.Connection]) -> float:
    """KiB of C heap each of ``count`` connections that ``make`` returns holds."""
    before = heap_in_use()
    kept = [make() for _ in range(count)]
    grown = heap_in_use() - before
    del kept
    return grown / count / 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=500)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as directory:
        ca = CertificateAuthority(Path(directory))
        issued = issue_rsa_certificate(ca, "tls-memory", ["localhost"], [])
        server_tls = ServerTLS(TLSConfig(
            certificates={"main": CertificateConfig(name="main", cert=issued.cert_path,
                                                    key=issued.key_path)},
            protocols=TLSProtocolsConfig()), "localhost")
        destination = DestinationConfig(name="node1", host="localhost",
                                        tls_ca_file=ca.cert_path)
        fresh, resuming = (ResumingClientTLS(backend_tls(destination)) for _ in range(2))
    peer_context = SSL.Context(SSL.TLS_METHOD)

    def server_end() -> SSL.Connection:
        end = SSL.Connection(server_tls.options.getContext())
        end.set_accept_state()
        peer = SSL.Connection(peer_context)
        peer.set_connect_state()
        converse(peer, end)
        return end

    def client_end(legs: ResumingClientTLS) -> SSL.Connection:
        end = legs.clientConnectionForTLS(_LegProtocol())
        end.set_connect_state()
        peer = SSL.Connection(server_tls.options.getContext())
        peer.set_accept_state()
        converse(end, peer)
        if legs is resuming:
            legs.remember(end)
        return end

    first = client_end(resuming)  # its session, for the resumed ones (kept open: OpenSSL
    # forgets the session of a connection freed without close_notify)
    rows = [
        ("SSL_new only (no handshake), server end", per_connection(
            args.connections, lambda: SSL.Connection(server_tls.options.getContext()))),
        ("client leg, server end (full handshake, RSA-2048)",
         per_connection(args.connections, server_end)),
        ("backend leg, client end (full handshake)",
         per_connection(args.connections, lambda: client_end(fresh))),
        ("backend leg, client end (resumed session)",
         per_connection(args.connections, lambda: client_end(resuming))),
    ]
    del first
    print(f"{backend.openssl_version_text()}; {args.connections} connections held per row\n")
    print_table(("connection", "KiB of C heap each"), [(name, f"{kib:.1f}") for name, kib in rows])
    return 0


if __name__ == "__main__":
    sys.exit(main())
