"""What the benchmarks share: login-rate measurement, a raw-ssl IMAP client, progress notes,
result tables, an RSA-2048 test certificate."""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.harness.pki import CertificateAuthority, IssuedCertificate

#: The header of a "through stalroute versus direct" table.
COMPARISON = ("metric", "direct", "stalroute", "ratio")


@dataclass(frozen=True)
class Target:
    """Where a client connects: host, port and the TLS name to verify."""

    name: str
    host: str
    port: int
    server_hostname: str


@dataclass(frozen=True)
class LoginResult:
    sessions: int
    seconds: float
    latencies: list[float]
    errors: int

    @property
    def per_second(self) -> float:
        return self.sessions / self.seconds if self.seconds else 0.0

    @property
    def p95_ms(self) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return 1000 * ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]


def measure_logins(session: Callable[[Target, CertificateAuthority], None], target: Target,
                   ca: CertificateAuthority, sessions: int, concurrency: int,
                   limit: float) -> LoginResult:
    """Run up to ``sessions`` sessions over ``concurrency`` threads for at most ``limit`` s."""
    lock = threading.Lock()
    started = errors = 0
    latencies: list[float] = []
    deadline = time.monotonic() + limit

    def worker() -> None:
        nonlocal started, errors
        while time.monotonic() < deadline:
            with lock:
                if started >= sessions:
                    return
                started += 1
            begin = time.monotonic()
            try:
                session(target, ca)
            except Exception as exc:  # counted and shown; a bench must not hide failures
                with lock:
                    errors += 1
                    if errors == 1:
                        note(f"{target.name}: first error: {exc!r}")
                continue
            with lock:
                latencies.append(time.monotonic() - begin)

    begin = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(worker) for _ in range(concurrency)]:
            future.result()
    return LoginResult(len(latencies), time.monotonic() - begin, latencies, errors)


def note(what: str) -> None:
    """Progress on stderr (the table goes to stdout)."""
    print(f"... {what}", file=sys.stderr, flush=True)


def ratio(proxied: float, direct: float) -> str:
    return f"{proxied / direct:.2f}" if direct else "-"


def print_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                        for i, (cell, w) in enumerate(zip(row, widths, strict=True))))


def issue_rsa_certificate(ca: CertificateAuthority, name: str, dns_names: Sequence[str],
                          ip_addresses: Sequence[str]) -> IssuedCertificate:
    """An RSA-2048 server certificate signed by ``ca`` (whose own leaves are EC P-256): the
    handshake cost of the key type most production certificates have, the same for every
    server a benchmark compares."""
    ca_cert = x509.load_pem_x509_certificate(ca.cert_path.read_bytes())
    ca_key = serialization.load_pem_private_key((ca.directory / "ca.key").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = datetime.datetime.now(datetime.UTC)
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_names[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = ca.directory / f"{name}.pem", ca.directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return IssuedCertificate(name, cert_path, key_path, cert.fingerprint(hashes.SHA256()).hex())


class ImapConnection:
    """One IMAP connection over a raw ``ssl`` socket (cheaper than imaplib): tagged commands,
    answers read line by line with their literals."""

    def __init__(self, address: tuple[str, int], context: ssl.SSLContext,
                 session: ssl.SSLSession | None = None) -> None:
        """Connect, offering ``session`` (a TLS session made with ``context``) for resumption."""
        raw = socket.create_connection(address, timeout=60)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.tls = context.wrap_socket(raw, server_hostname="localhost", session=session)
        self.reader = self.tls.makefile("rb")
        self._tag = 0
        greeting = self.reader.readline()
        if not greeting.startswith(b"* OK"):
            self.close()
            raise RuntimeError(f"greeting {greeting[:80]!r}")
        #: The session to offer next time, taken after the greeting: TLS 1.3 tickets arrive
        #: after the handshake, and the socket forgets its session when closed.
        self.session = self.tls.session
        self.resumed = bool(self.tls.session_reused)

    def command(self, text: bytes) -> list[bytes]:
        """Send one command; the lines and literals of its answer, the tagged OK last."""
        self._tag += 1
        tag = b"t%d " % self._tag
        self.tls.sendall(tag + text + b"\r\n")
        answer = []
        while True:
            line = self.reader.readline()
            if not line:
                raise ConnectionError(f"closed before the answer to {text.split()[0]!r}")
            answer.append(line)
            if line.startswith(tag):
                if not line.startswith(tag + b"OK"):
                    raise RuntimeError(f"answer {line[:80]!r}")
                return answer
            if line.endswith(b"}\r\n"):
                size = int(line[line.rindex(b"{") + 1:-3])
                literal = self.reader.read(size)
                if len(literal) != size:
                    raise ConnectionError("closed in a literal")
                answer.append(literal)

    def login(self, user: str, password: str, mailbox: str = "INBOX") -> None:
        """LOGIN (the password quoted), then SELECT."""
        self.command(f'LOGIN {user} "{password}"'.encode())
        self.command(b"SELECT " + mailbox.encode())

    def logout(self) -> None:
        """LOGOUT, then read to the server's close: a clean end on both sides."""
        self.command(b"LOGOUT")
        self.reader.read()
        self.close()

    def close(self) -> None:
        self.reader.close()
        self.tls.close()


def imap_session(address: tuple[str, int], context: ssl.SSLContext, user: str,
                 password: str, session: ssl.SSLSession | None = None) -> ImapConnection:
    """TLS connect (offering ``session``), LOGIN, SELECT INBOX, FETCH 1 (header), LOGOUT; the
    closed connection tells whether it resumed and which session to offer next."""
    connection = ImapConnection(address, context, session)
    try:
        connection.login(user, password)
        connection.command(b"FETCH 1 (BODY.PEEK[HEADER])")
        connection.logout()
    finally:
        connection.close()
    return connection
