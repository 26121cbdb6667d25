"""Certificates from ACME, single instance (SPEC §2.13): a real pebble, a real stalroute.

pebble validates ``mail.test`` (its mock DNS says 127.0.0.1) by tls-alpn-01 on the IMAPS
listener's port, or by http-01 on the plain HTTP listener's port; the certificate it issues is
then served (IMAPS, HTTPS), verifiable with pebble's root. With the ACME server unreachable,
stalroute keeps serving what it has and logs the failure.
"""

from __future__ import annotations

import re
import select
import socket
import ssl
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from OpenSSL import SSL

from tests.conftest import StalrouteFactory, require_binary
from tests.harness.pebble import PebbleServer
from tests.harness.pki import CertificateAuthority
from tests.harness.ports import LOOPBACK, free_port, held_ports
from tests.harness.stalroute import StalrouteProcess, closed_destination
from tests.harness.websocket_echo import TwistedBackend
from tests.integration.test_http import (  # noqa: F401 - tw_backend: a fixture, used by name
    http_destination, tw_backend,
)

NAME = "mail.test"
PebbleFactory = Callable[..., PebbleServer]


@pytest.fixture
def pebble(pki: CertificateAuthority) -> Iterator[PebbleFactory]:
    """Factory: ``pebble(tls_port=…)`` starts pebble (+ mock DNS) validating on that port."""
    binaries = require_binary("pebble"), require_binary("pebble-challtestsrv")
    started: list[PebbleServer] = []

    def start(*, tls_port: int, http_port: int | None = None, **kw: Any) -> PebbleServer:
        server = PebbleServer(*binaries, pki, tls_port=tls_port,
                              http_port=http_port or free_port(), **kw)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        print(f"--- pebble log (tail) ---\n{server.log_text()[-4000:]}")
        server.close()


def acme_config(server: PebbleServer, imaps_port: int, state: Path,
                **acme: Any) -> dict[str, Any]:
    return {
        "server": {"hostname": "stalroute.test", "shutdown_grace": "1s",
                   "state_directory": str(state)},
        "tls": {"certificate": {"mail": {"acme": "pebble"}}},
        "acme": {"pebble": {"directory": server.directory_url, "domains": [NAME],
                            "contact": ["mailto:hostmaster@mail.test"],
                            "ca_file": str(server.ca_file), **acme}},
        "listener": {"imaps": {"protocol": "imap", "bind": [f"{LOOPBACK}:{imaps_port}"],
                               "tls": "implicit"}},
        "destination": {"down": closed_destination()},
        "routing": {"default_destination": "down"},
        "mapping": {"source": "file"},
    }


def served_chain(port: int, alpn: list[str] | None = None) -> tuple[list[x509.Certificate],
                                                                    str | None, bytes]:
    """The chain the IMAPS listener presents for SNI mail.test (unverified), the ALPN
    protocol selected, and the first bytes it sends after the handshake."""
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    if alpn:
        context.set_alpn_protos([protocol.encode() for protocol in alpn])
    with socket.create_connection((LOOPBACK, port), timeout=5) as raw:
        raw.settimeout(None)
        tls = SSL.Connection(context, raw)
        tls.set_tlsext_host_name(NAME.encode())
        tls.set_connect_state()
        tls.do_handshake()
        chain = [cert.to_cryptography() for cert in tls.get_peer_cert_chain() or []]
        selected = tls.get_alpn_proto_negotiated().decode() or None
        first = b""
        if select.select([raw], [], [], 2)[0]:
            try:
                first = tls.recv(1024)
            except (SSL.Error, OSError):
                pass
        return chain, selected, first


def greeting_verified(port: int, root_pem: bytes) -> tuple[bytes, x509.Certificate]:
    """The IMAP greeting over TLS verified against pebble's root for mail.test."""
    context = ssl.create_default_context(cadata=root_pem.decode())
    with socket.create_connection((LOOPBACK, port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname=NAME) as tls:
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return tls.recv(1024), x509.load_der_x509_certificate(der)


def wait_for_issuer(port: int, issuer: x509.Name, timeout: float = 30.0,
                    proxy: StalrouteProcess | None = None) -> list[x509.Certificate]:
    deadline = time.monotonic() + timeout
    while True:
        chain, _, _ = served_chain(port)
        if chain and chain[0].issuer == issuer:
            return chain
        if time.monotonic() > deadline:
            log = proxy.log_text()[-3000:] if proxy else ""
            raise AssertionError(f"not issued by {issuer.rfc4514_string()} within {timeout}s; "
                                 f"served {chain[0].issuer.rfc4514_string()}\n{log}")
        time.sleep(0.2)


def wait_for_log(proxy: StalrouteProcess, text: str, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while text not in (log := proxy.log_text()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} not logged within {timeout}s\n{log[-3000:]}")
        time.sleep(0.1)
    return log


def intermediate_subject(server: PebbleServer) -> x509.Name:
    return x509.load_pem_x509_certificate(server.intermediate_pem()).subject


def http01_listeners(config: dict[str, Any], http_port: int, https_port: int | None = None
                     ) -> dict[str, Any]:
    """``config`` with ``challenge = "http-01"``, a plain HTTP listener ``web`` on
    ``http_port`` (where pebble asks http-01 validations) and, given ``https_port``, an HTTPS
    listener ``webs`` (implicit TLS) there."""
    config["acme"]["pebble"]["challenge"] = "http-01"
    config["destination"]["down"] = closed_destination(("imap", "http"))
    config["listener"]["web"] = {"protocol": "http", "bind": [f"{LOOPBACK}:{http_port}"],
                                 "tls": "plain"}
    if https_port is not None:
        config["listener"]["webs"] = {"protocol": "http", "tls": "implicit",
                                      "bind": [f"{LOOPBACK}:{https_port}"]}
    return config


def http_get(port: int, path: str, root_pem: bytes | None = None
             ) -> tuple[int, bytes, x509.Certificate | None]:
    """``GET path`` (Host: mail.test) on 127.0.0.1:``port``: the status, the body and, over
    TLS verified against ``root_pem`` for mail.test, the certificate served."""
    with socket.create_connection((LOOPBACK, port), timeout=10) as raw:
        sock: socket.socket = raw
        cert = None
        if root_pem is not None:
            context = ssl.create_default_context(cadata=root_pem.decode())
            sock = context.wrap_socket(raw, server_hostname=NAME)
            der = sock.getpeercert(binary_form=True)
            assert der is not None
            cert = x509.load_der_x509_certificate(der)
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {NAME}\r\nConnection: close\r\n\r\n"
                     .encode())
        answer = b""
        while data := sock.recv(65536):
            answer += data
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body, cert


def test_tls_alpn_01_issues_the_certificate_the_imaps_listener_serves(
        pebble: PebbleFactory, stalroute: StalrouteFactory, tmp_path: Path) -> None:
    port = free_port()
    server = pebble(tls_port=port)
    state = tmp_path / "state"
    proxy = stalroute(acme_config(server, port, state))
    chain = wait_for_issuer(port, intermediate_subject(server), proxy=proxy)

    leaf = chain[0]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [NAME]
    assert len(chain) >= 2 and chain[1].subject == leaf.issuer  # the intermediate is sent
    greeting, verified = greeting_verified(port, server.root_pem())
    assert greeting.startswith(b"* OK") and verified.serial_number == leaf.serial_number

    log = proxy.log_text()
    assert "answering an ACME tls-alpn-01 validation for mail.test" in log
    assert "outcome=acme_validation" in log
    assert "acme: certificate mail issued and served" in log
    assert "PRIVATE KEY" not in log
    assert "Issued certificate serial" in server.log_text()

    # The store: a 0700 directory of 0600 files (account key, certificate).
    directory = state / "acme"
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    names = sorted(p.name for p in directory.iterdir())
    assert names == ["acme%2Faccount%2Fpebble", "acme%2Fcertificate%2Fmail"]
    assert all(stat.S_IMODE((directory / n).stat().st_mode) == 0o600 for n in names)

    # A restart serves the stored certificate at once, without a new order.
    orders = server.log_text().count("Added order")
    proxy.stop()
    again = stalroute(acme_config(server, port, state))
    chain, _, _ = served_chain(port)
    assert chain[0].serial_number == leaf.serial_number
    wait_for_log(again, "loaded from the store and served")
    assert server.log_text().count("Added order") == orders


def test_http_01_issues_the_certificate_the_https_and_imaps_listeners_serve(
        pebble: PebbleFactory, stalroute: StalrouteFactory, tw_backend: TwistedBackend,
        tmp_path: Path) -> None:
    with held_ports(3) as (imaps, web, webs):
        # Nothing listens on pebble's tlsPort: only the http-01 validation can succeed.
        server = pebble(tls_port=free_port(), http_port=web)
    config = http01_listeners(acme_config(server, imaps, tmp_path / "state"), web, webs)
    config["destination"]["tw"] = http_destination(tw_backend.port)
    config["http"] = {"route": [{"match": "/tw/**", "destination": "tw"}]}
    proxy = stalroute(config)
    # The HTTP listener is an ordinary one while the order is pending...
    assert http_get(web, "/tw/before")[:2] == (200, b"node=tw|method=GET|path=/tw/before\n")
    assert http_get(web, "/unrouted")[0] == 404
    chain = wait_for_issuer(imaps, intermediate_subject(server), proxy=proxy)

    leaf = chain[0]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [NAME]
    root = server.root_pem()
    greeting, verified = greeting_verified(imaps, root)
    assert greeting.startswith(b"* OK") and verified.serial_number == leaf.serial_number
    # HTTPS serves it too (verified against pebble's root), and routes.
    status, body, served = http_get(webs, "/tw/secure", root)
    assert (status, body) == (200, b"node=tw|method=GET|path=/tw/secure\n")
    assert served is not None and served.serial_number == leaf.serial_number
    # ... and after: routed, unrouted, and an unknown token takes the usual way.
    assert http_get(web, "/tw/after")[:2] == (200, b"node=tw|method=GET|path=/tw/after\n")
    assert http_get(web, "/unrouted")[0] == 404
    assert http_get(web, "/.well-known/acme-challenge/no-such-token")[0] == 404

    log = proxy.log_text()
    assert f"for {NAME}: 1 http-01 challenges to answer" in log
    assert re.search(r"http GET /\.well-known/acme-challenge/[-\w]+ status=200 .*"
                     r"outcome=acme_validation", log)
    assert "tls-alpn-01 validation" not in log
    assert "acme: certificate mail issued and served" in log
    assert "PRIVATE KEY" not in log
    pebble_log = server.log_text()
    assert f"Attempting to validate w/ HTTP: http://{NAME}:{web}/" in pebble_log
    assert "Issued certificate serial" in pebble_log


def test_acme_tls_1_without_a_pending_challenge_is_an_ordinary_connection(
        pebble: PebbleFactory, stalroute: StalrouteFactory, tmp_path: Path) -> None:
    port = free_port()
    server = pebble(tls_port=port)
    proxy = stalroute(acme_config(server, port, tmp_path / "state"))
    wait_for_issuer(port, intermediate_subject(server), proxy=proxy)
    chain, selected, first = served_chain(port, alpn=["acme-tls/1"])
    assert selected is None and first.startswith(b"* OK")
    chain, selected, first = served_chain(port, alpn=["imap"])
    assert selected == "imap" and first.startswith(b"* OK")


def test_an_unreachable_acme_server_leaves_the_placeholder_served_and_logged(
        pebble: PebbleFactory, stalroute: StalrouteFactory, tmp_path: Path) -> None:
    port = free_port()
    server = pebble(tls_port=port)
    server.relay.cut()
    proxy = stalroute(acme_config(server, port, tmp_path / "state"))
    log = wait_for_log(proxy, "order failed (attempt 1)")
    assert "directory and account: cannot reach the ACME server" in log
    assert "next attempt in 60s" in log
    chain, _, first = served_chain(port)
    leaf = chain[0]
    assert leaf.issuer == leaf.subject  # the self-signed placeholder
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == NAME
    assert first.startswith(b"* OK")  # and the listener serves


def test_a_failed_renewal_keeps_the_current_certificate(
        pebble: PebbleFactory, stalroute: StalrouteFactory, tmp_path: Path) -> None:
    port = free_port()
    server = pebble(tls_port=port, validity=3600)
    # Due for renewal 10 s after it is issued.
    proxy = stalroute(acme_config(server, port, tmp_path / "state", renew_before="3590s"))
    chain = wait_for_issuer(port, intermediate_subject(server), proxy=proxy)
    server.relay.cut()
    log = wait_for_log(proxy, "order failed (attempt 1)", timeout=40)
    assert "(due for renewal)" in log
    assert "keeping the current certificate (valid until" in log
    served, _, first = served_chain(port)
    assert served[0].serial_number == chain[0].serial_number and first.startswith(b"* OK")
