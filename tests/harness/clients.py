"""Mail clients for tests: imaplib that connects from a chosen source address, a raw
line-level IMAP client for what imaplib cannot send, PROXY v2 headers and test messages."""

from __future__ import annotations

import base64
import imaplib
import os
import re
import socket
import ssl
import struct
from email.utils import formatdate

from tests.harness.ports import LOOPBACK

DEFAULT_TIMEOUT = 15.0


def connect_from(
    host: str,
    port: int,
    *,
    source: str = LOOPBACK,
    timeout: float | None = DEFAULT_TIMEOUT,
    rcvbuf: int | None = None,
) -> socket.socket:
    """A TCP connection to ``host:port`` from ``source`` (any 127.0.0.0/8 address works on
    Linux loopback). ``rcvbuf`` sets SO_RCVBUF before connecting (a deliberately slow reader)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(timeout)
        sock.bind((source, 0))
        sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


class SourceIMAP4(imaplib.IMAP4):
    """``imaplib.IMAP4`` whose connection comes from ``source``."""

    def __init__(
        self, host: str, port: int, *, source: str = LOOPBACK, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        self.source = source
        super().__init__(host, port, timeout=timeout)

    def _create_socket(self, timeout: float | None) -> socket.socket:
        return connect_from(self.host, self.port, source=self.source, timeout=timeout)


class SourceIMAP4_SSL(imaplib.IMAP4_SSL):
    """``imaplib.IMAP4_SSL`` (implicit TLS) whose connection comes from ``source``.

    ``server_hostname`` is the name sent as SNI and verified (default: ``host``).
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext,
        source: str = LOOPBACK,
        server_hostname: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.source = source
        self.server_hostname = server_hostname or host
        super().__init__(host, port, ssl_context=ssl_context, timeout=timeout)

    def _create_socket(self, timeout: float | None) -> socket.socket:
        sock = connect_from(self.host, self.port, source=self.source, timeout=timeout)
        return self.ssl_context.wrap_socket(sock, server_hostname=self.server_hostname)


def fetch_subject(client: imaplib.IMAP4, mailbox: str = "INBOX", message: str = "1") -> str:
    """Subject of ``message`` in ``mailbox`` (selected read-only) of a logged-in client."""
    status, data = client.select(mailbox, readonly=True)
    if status != "OK":
        raise imaplib.IMAP4.error(f"SELECT {mailbox} failed: {data!r}")
    _, data = client.fetch(message, "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    header = data[0][1].decode()
    return header.strip().removeprefix("Subject:").strip()


_LITERAL = re.compile(rb"\{(\d+)\}\r\n$")


class RawIMAP:
    """A line-level IMAP client: send exact bytes, read lines and literals.

    Used for what imaplib cannot express: SASL-IR, literals in LOGIN, IDLE, a client that
    stops reading. :meth:`readline` returns one response line with any literals it announces
    inlined, CRLF included.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._reader = sock.makefile("rb")
        self.greeting = b""

    @classmethod
    def connect(
        cls,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str = "localhost",
        source: str = LOOPBACK,
        timeout: float | None = DEFAULT_TIMEOUT,
        rcvbuf: int | None = None,
    ) -> RawIMAP:
        """Connect (with implicit TLS when ``ssl_context`` is given) and read the greeting."""
        sock = connect_from(host, port, source=source, timeout=timeout, rcvbuf=rcvbuf)
        if ssl_context is not None:
            sock = ssl_context.wrap_socket(sock, server_hostname=server_hostname)
        client = cls(sock)
        client.greeting = client.readline()
        return client

    def starttls(self, ssl_context: ssl.SSLContext, server_hostname: str = "localhost") -> None:
        """Run ``STARTTLS`` and switch the connection to TLS."""
        lines = self.command(b"tls", b"STARTTLS")
        if not lines[-1].startswith(b"tls OK"):
            raise AssertionError(f"STARTTLS refused: {lines!r}")
        self._reader.close()
        self.sock = ssl_context.wrap_socket(self.sock, server_hostname=server_hostname)
        self._reader = self.sock.makefile("rb")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def readline(self) -> bytes:
        """One response line, with announced literals read and inlined."""
        line = self._reader.readline()
        if not line:
            raise ConnectionError("server closed the connection")
        while match := _LITERAL.search(line):
            literal = self._reader.read(int(match.group(1)))
            line += literal + self._reader.readline()
        return line

    def read_until_tagged(self, tag: bytes) -> list[bytes]:
        """Lines up to and including the tagged response for ``tag``."""
        lines = []
        while True:
            line = self.readline()
            lines.append(line)
            if line.startswith(tag + b" "):
                return lines

    def command(self, tag: bytes, text: bytes) -> list[bytes]:
        """Send ``tag text`` and return every line up to the tagged response."""
        self.send(tag + b" " + text + b"\r\n")
        return self.read_until_tagged(tag)

    def close(self) -> None:
        self._reader.close()
        self.sock.close()

    def __enter__(self) -> RawIMAP:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def sasl_plain(user: str, password: str, authzid: str = "") -> bytes:
    """Base64 SASL PLAIN initial response."""
    return base64.b64encode(f"{authzid}\0{user}\0{password}".encode())


_PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def proxy_v2_header(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    """A PROXY v2 header (PROXY command, TCP over IPv4) claiming ``source`` as the client.

    Deliberately independent of stalroute's own codec: the harness is the oracle.
    """
    addresses = (
        socket.inet_aton(source[0])
        + socket.inet_aton(destination[0])
        + struct.pack("!HH", source[1], destination[1])
    )
    return _PROXY_V2_SIGNATURE + bytes([0x21, 0x11]) + struct.pack("!H", len(addresses)) + addresses


def make_message(
    subject: str,
    body: str = "Hello from the stalroute test harness.\r\n",
    *,
    size: int | None = None,
    sender: str = "harness@example.test",
    to: str = "user@example.test",
) -> bytes:
    """An RFC 5322 message with CRLF line ends; ``size`` pads the body with random base64
    lines until the whole message is at least that many bytes."""
    head = (
        f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\nDate: {formatdate()}\r\n"
        f"Message-ID: <{os.urandom(8).hex()}@harness.test>\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
    ).encode()
    message = head + body.encode()
    if size is not None and size > len(message):
        missing = size - len(message)
        lines = missing // 78 + 1
        blob = base64.b64encode(os.urandom(lines * 57))  # 76 characters per 57 bytes
        padding = b"\r\n".join(blob[i : i + 76] for i in range(0, len(blob), 76)) + b"\r\n"
        message += padding
    return message
