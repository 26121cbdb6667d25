"""Configurations, servers and clients for the POP3, ManageSieve, submission and SMTP tests.

Shared by ``tests/integration/test_{pop3,managesieve,submission,smtp_passthrough,imap_id}.py``
and ``bench/protocols_bench.py``:

* **config builders** (SPEC §2, built on :mod:`tests.harness.stalroute`): listeners per
  protocol (:func:`listener`), a destination on a Dovecot node for one protocol with a chosen
  way of announcing the client (:func:`node_destination`: a PROXY v2 header to the
  ``haproxy = yes`` twin, or XCLIENT / IMAP ID to the trusted plain/STARTTLS/TLS listener),
  Postfix destinations, and :func:`proxy_config` for a whole file;
* **servers as plain context managers** (no conftest): :func:`running_sink`,
  :func:`running_postfix`, :func:`running_nodes`, :func:`running_stalroute`; each stops and
  reaps what it started, also when a start fails;
* **clients** that connect from a chosen loopback address (127.0.0.2 is "the client" whose
  address the backends must see): ``poplib`` and ``smtplib`` subclasses, a raw ManageSieve
  client, and helpers for ``curl`` and ``swaks``.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import os
import poplib
import re
import smtplib
import socket
import ssl
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from tests.harness.clients import DEFAULT_TIMEOUT, connect_from
from tests.harness.dovecot import DovecotNode
from tests.harness.pki import CertificateAuthority, IssuedCertificate
from tests.harness.ports import LOOPBACK, free_port
from tests.harness.postfix import PostfixInstance, SASLDovecotNode
from tests.harness.smtp_sink import SMTPSink
from tests.harness.stalroute import StalrouteProcess, dovecot_destination, imap_proxy_config

#: The "real client" address of the tests: every 127.0.0.0/8 address works on Linux loopback.
CLIENT_IP = "127.0.0.2"

# --- configuration builders ------------------------------------------------------------------


def listener(protocol: str, tls: str, **options: Any) -> dict[str, Any]:
    """A ``[listener.x]`` table for ``protocol`` on a free loopback port."""
    return {"protocol": protocol, "bind": [f"{LOOPBACK}:{free_port()}"], "tls": tls, **options}


#: The usual listeners of each protocol: name → (protocol, tls).
STANDARD_LISTENERS: dict[str, tuple[str, str]] = {
    "imaps": ("imap", "implicit"),
    "imap": ("imap", "starttls"),
    "pop3s": ("pop3", "implicit"),
    "pop3": ("pop3", "starttls"),
    "sieve": ("managesieve", "starttls"),
    "submissions": ("submission", "implicit"),
    "submission": ("submission", "starttls"),
    "smtp": ("smtp", "plain"),
}


def listeners(*names: str) -> dict[str, dict[str, Any]]:
    """``[listener.*]`` tables for :data:`STANDARD_LISTENERS` ``names``, on free ports."""
    return {name: listener(*STANDARD_LISTENERS[name]) for name in names}


def node_destination(
    node: DovecotNode,
    protocol: str,
    *,
    tls: str,
    forwarding: str = "proxy",
    ca_file: Path | None = None,
) -> dict[str, Any]:
    """A destination serving ``protocol`` from ``node`` over a ``tls`` leg.

    ``forwarding``: ``"proxy"`` → a PROXY v2 header to the listener's ``haproxy = yes`` twin;
    ``"xclient"`` (XCLIENT for POP3/ManageSieve/submission, ``ID`` for IMAP) or ``"none"`` →
    the trusted listener itself. A ``"plain"`` leg sets ``allow_plaintext_auth``.
    """
    destination = dovecot_destination(
        node,
        tls=tls,
        protocols=(protocol,),
        ca_file=ca_file,
        proxy_protocol=forwarding == "proxy",
    )
    destination["forwarding"] = forwarding
    if tls == "plain":
        destination["allow_plaintext_auth"] = True
    return destination


def closed_port_destination(*protocols: str, tls: str = "implicit") -> dict[str, Any]:
    """A destination on a loopback port nothing listens on: a backend that is down."""
    port = free_port()
    destination: dict[str, Any] = {
        "host": LOOPBACK,
        "tls_server_name": "down.test",
        "protocol": {proto: {"port": port, "tls": tls} for proto in protocols},
    }
    if tls == "plain":
        destination["allow_plaintext_auth"] = True
    return destination


def postfix_submission_destination(
    postfix: PostfixInstance, ca_file: Path, *, tls: str = "starttls"
) -> dict[str, Any]:
    """Postfix's XCLIENT submission listener: STARTTLS, then XCLIENT, then AUTH."""
    destination: dict[str, Any] = {
        "host": postfix.host,
        "tls_server_name": postfix.hostname,
        "tls_ca_file": str(ca_file),
        "forwarding": "xclient",
        "protocol": {"submission": {"port": postfix.ports.submission, "tls": tls}},
    }
    if tls == "plain":
        destination["allow_plaintext_auth"] = True
    return destination


def postfix_passthrough_destination(postfix: PostfixInstance) -> dict[str, Any]:
    """Postfix's ``smtpd_upstream_proxy_protocol = haproxy`` listener for SMTP pass-through:
    a PROXY v2 header, then the client's session unparsed (STARTTLS is between the client
    and Postfix). A plain leg needs no ``allow_plaintext_auth``: no credentials cross it."""
    return {
        "host": postfix.host,
        "forwarding": "proxy",
        "protocol": {"smtp": {"port": postfix.ports.proxy, "tls": "plain"}},
    }


def proxy_config(
    certificate: IssuedCertificate,
    destinations: Mapping[str, dict[str, Any]],
    *,
    default: str,
    listener_tables: Mapping[str, dict[str, Any]],
    passthrough: str | None = None,
    log_level: str = "info",
    **server: Any,
) -> dict[str, Any]:
    """A whole stalroute configuration with ``listener_tables`` (see :func:`listeners`),
    ``destinations``, ``default``, the pass-through destination, and ``server`` overrides
    (``backend_timeout="3s"`` …)."""
    config = imap_proxy_config(certificate, destinations, default=default, log_level=log_level)
    config["listener"] = copy.deepcopy(dict(listener_tables))
    if passthrough is not None:
        config["routing"]["smtp_passthrough_destination"] = passthrough
    config["server"].update(server)
    return config


# --- servers ----------------------------------------------------------------------------------


@contextlib.contextmanager
def running_sink(directory: Path) -> Iterator[SMTPSink]:
    """An :class:`SMTPSink` child process, stopped and reaped on exit."""
    sink = SMTPSink(directory)
    sink.start()
    try:
        yield sink
    finally:
        sink.stop()


@contextlib.contextmanager
def running_nodes(
    ca: CertificateAuthority,
    users: Mapping[str, str],
    names: Sequence[str],
    *,
    relay: tuple[str, int] | None = None,
    sasl_for_postfix: Sequence[str] = (),
    binary: str = "dovecot",
) -> Iterator[list[DovecotNode]]:
    """Dovecot nodes relaying submissions to ``relay``; the nodes named in
    ``sasl_for_postfix`` are :class:`SASLDovecotNode` (an auth socket for Postfix)."""
    nodes: list[DovecotNode] = []
    try:
        for name in names:
            # A file name of its own: the session CA already issued "node1.pem" for the
            # shared nodes, whose files must not be overwritten.
            certificate = ca.issue(
                f"{name}-{os.urandom(4).hex()}", [f"{name}.test", "localhost"], ["127.0.0.1"]
            )
            kind = SASLDovecotNode if name in sasl_for_postfix else DovecotNode
            node = kind(name, users=users, certificate=certificate, relay=relay, binary=binary)
            nodes.append(node)
            node.start()
        yield nodes
    finally:
        for node in nodes:
            node.stop()


@contextlib.contextmanager
def running_postfix(
    *,
    relay: tuple[str, int],
    certificate: IssuedCertificate | None = None,
    sasl_path: Path | None = None,
    binary: str = "postfix",
) -> Iterator[PostfixInstance]:
    """A private Postfix (stopped with ``postfix -c DIR stop`` and reaped on exit)."""
    postfix = PostfixInstance(
        relay=relay, certificate=certificate, sasl_path=sasl_path, binary=binary
    )
    postfix.start()
    try:
        yield postfix
    finally:
        postfix.stop()


@contextlib.contextmanager
def running_stalroute(
    config: Mapping[str, Any], workdir: Path, mappings: Mapping[str, str] | None = None
) -> Iterator[StalrouteProcess]:
    """The real proxy for a whole module; on exit stopped, and its log tail printed."""
    proxy = StalrouteProcess(config, workdir, mappings=mappings)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()
        print(f"--- {proxy.log.path} (tail) ---\n{proxy.log_text()[-4000:]}")


def wait_for_login_log(
    node: DovecotNode, service: str, user: str, client_ip: str, since: int, timeout: float = 10
) -> re.Match[str]:
    """Wait for Dovecot's ``<service>-login: Info: Login: user=<user>, ... rip=<ip>,`` line."""
    return node.wait_for_log(
        rf"{re.escape(service)}-login: Info: Login: user=<{re.escape(user)}>.*"
        rf"rip={re.escape(client_ip)},[^\n]*",
        timeout=timeout,
        since=since,
    )


# --- clients ----------------------------------------------------------------------------------


class SourcePOP3(poplib.POP3):
    """``poplib.POP3`` connecting from ``source``."""

    def __init__(
        self, host: str, port: int, *, source: str = LOOPBACK, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        self.source = source
        super().__init__(host, port, timeout=timeout)

    def _create_socket(self, timeout: float | None) -> socket.socket:
        return connect_from(self.host, self.port, source=self.source, timeout=timeout)


class SourcePOP3_SSL(poplib.POP3_SSL):
    """``poplib.POP3_SSL`` (implicit TLS) connecting from ``source``."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        context: ssl.SSLContext,
        source: str = LOOPBACK,
        server_hostname: str = "localhost",
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.source = source
        self.server_hostname = server_hostname
        super().__init__(host, port, context=context, timeout=timeout)

    def _create_socket(self, timeout: float | None) -> socket.socket:
        sock = connect_from(self.host, self.port, source=self.source, timeout=timeout)
        return self.context.wrap_socket(sock, server_hostname=self.server_hostname)


def pop3_subject(client: poplib.POP3, number: int = 1) -> str:
    """Subject of message ``number`` of a logged-in POP3 session (``TOP n 0``)."""
    _, lines, _ = client.top(number, 0)
    for line in lines:
        if line.lower().startswith(b"subject:"):
            return line.split(b":", 1)[1].strip().decode()
    raise AssertionError(f"no Subject in {lines!r}")


def smtp(host: str, port: int, *, source: str = LOOPBACK, timeout: float = DEFAULT_TIMEOUT,
         local_hostname: str = "client.example") -> smtplib.SMTP:
    """``smtplib.SMTP`` from ``source`` (EHLO name ``client.example``)."""
    return smtplib.SMTP(host, port, local_hostname=local_hostname, timeout=timeout,
                        source_address=(source, 0))


def smtp_ssl(host: str, port: int, *, context: ssl.SSLContext, source: str = LOOPBACK,
             timeout: float = DEFAULT_TIMEOUT,
             local_hostname: str = "client.example") -> smtplib.SMTP_SSL:
    """``smtplib.SMTP_SSL`` (implicit TLS) from ``source``."""
    return smtplib.SMTP_SSL(host, port, local_hostname=local_hostname, timeout=timeout,
                            source_address=(source, 0), context=context)


_LITERAL = re.compile(rb"\{(\d+)\+?\}\r\n$")
_STATUS = re.compile(rb"(OK|NO|BYE)\b", re.IGNORECASE)


class ManageSieveClient:
    """A raw ManageSieve client (RFC 5804): responses are lists of lines (literals inlined),
    the last one the status line (``OK``/``NO``/``BYE``)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._reader = sock.makefile("rb")
        self.greeting: list[bytes] = []

    @classmethod
    def connect(
        cls,
        host: str,
        port: int,
        *,
        source: str = LOOPBACK,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> ManageSieveClient:
        client = cls(connect_from(host, port, source=source, timeout=timeout))
        client.greeting = client.read_response()
        return client

    @property
    def capabilities(self) -> dict[str, str]:
        """The last capability block read (greeting or after STARTTLS), name → value."""
        found = {}
        for line in self.greeting[:-1]:
            match = re.match(rb'"([^"]+)"(?: "([^"]*)")?', line)
            if match:
                found[match.group(1).decode().upper()] = (match.group(2) or b"").decode()
        return found

    def readline(self) -> bytes:
        line = self._reader.readline()
        if not line:
            raise ConnectionError("server closed the connection")
        while match := _LITERAL.search(line):
            line += self._reader.read(int(match.group(1))) + self._reader.readline()
        return line

    def read_response(self) -> list[bytes]:
        lines = []
        while True:
            line = self.readline()
            lines.append(line)
            if _STATUS.match(line):
                return lines

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def command(self, text: bytes) -> list[bytes]:
        self.send(text + b"\r\n")
        return self.read_response()

    def starttls(self, context: ssl.SSLContext, server_hostname: str = "localhost") -> None:
        status = self.command(b"STARTTLS")[-1]
        if not status.upper().startswith(b"OK"):
            raise AssertionError(f"STARTTLS refused: {status!r}")
        self._reader.close()
        self.sock = context.wrap_socket(self.sock, server_hostname=server_hostname)
        self._reader = self.sock.makefile("rb")
        self.greeting = self.read_response()  # RFC 5804 §2.2: capabilities again

    def authenticate_plain(self, user: str, password: str) -> bytes:
        """``AUTHENTICATE "PLAIN" "<ir>"``; the status line."""
        response = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        return self.command(f'AUTHENTICATE "PLAIN" "{response}"'.encode())[-1]

    def putscript(self, name: str, script: bytes) -> bytes:
        """``PUTSCRIPT`` with a non-synchronising literal; the status line."""
        command = b'PUTSCRIPT "%s" {%d+}\r\n%s' % (name.encode(), len(script), script)
        return self.command(command)[-1]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._reader.close()
            self.sock.close()

    def __enter__(self) -> ManageSieveClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def run_tool(argv: Sequence[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a client tool (curl, swaks) to completion; its output is text."""
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
