"""A private Redis server on a random loopback port (``RedisServer``).

The recipe of TEST-ENVIRONMENT.md §2: ``redis-server --port P --bind 127.0.0.1 --save ''
--appendonly no --daemonize no --dir D --logfile D/redis.log``, run as a
:class:`~tests.harness.processes.ManagedProcess` child (always reaped). Optionally with a
password (``requirepass``) and TLS only (``--port 0 --tls-port P``, certificate from the
test CA). ``stop()``/``start()`` keep the port, for restart tests; nothing is persisted, so
the data is gone after a restart. ``command()`` is a small synchronous client for setup.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

from tests.harness.pki import IssuedCertificate
from tests.harness.ports import LOOPBACK, free_port
from tests.harness.processes import ManagedProcess, ProcessStartError

RespValue = bytes | int | list["RespValue"] | None


class RedisError(Exception):
    """An ``-ERR …`` reply."""


class RedisServer:
    """One throwaway Redis: ``start()``, ``stop()`` (restartable), ``close()``, ``url()``."""

    def __init__(
        self,
        binary: str,
        *,
        password: str | None = None,
        certificate: IssuedCertificate | None = None,
        ca_file: Path | None = None,
    ) -> None:
        self.binary = binary
        self.host = LOOPBACK
        self.port = free_port()
        self.password = password
        self.certificate = certificate
        self.ca_file = ca_file
        self.directory = Path(tempfile.mkdtemp(prefix="stalroute-redis-"))
        self._process: ManagedProcess | None = None

    def _argv(self) -> list[str]:
        argv = [self.binary, "--bind", self.host, "--save", "", "--appendonly", "no",
                "--daemonize", "no", "--dir", str(self.directory),
                "--logfile", str(self.directory / "redis.log")]
        if self.certificate is not None:
            assert self.ca_file is not None
            argv += ["--port", "0", "--tls-port", str(self.port),
                     "--tls-cert-file", str(self.certificate.cert_path),
                     "--tls-key-file", str(self.certificate.key_path),
                     "--tls-ca-cert-file", str(self.ca_file), "--tls-auth-clients", "no"]
        else:
            argv += ["--port", str(self.port)]
        if self.password is not None:
            argv += ["--requirepass", self.password]
        return argv

    # --- lifecycle -------------------------------------------------------------------------

    def start(self, timeout: float = 15.0) -> RedisServer:
        """Start on the same port as before and wait until it answers PING."""
        if self.running:
            return self
        self._process = ManagedProcess(
            self._argv(), name="redis-server", output_path=self.directory / "redis.out"
        ).start()
        self._process.wait_for_port(self.host, self.port, timeout)
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.command("PING") == b"PONG":
                    return self
            except (OSError, RedisError) as exc:
                if time.monotonic() > deadline:
                    self.stop()
                    raise ProcessStartError(f"redis-server not ready: {exc}") from exc
            time.sleep(0.02)

    def stop(self) -> None:
        """SIGTERM (nothing to save), then reap."""
        process, self._process = self._process, None
        if process is not None:
            process.stop(timeout=10.0)

    def close(self) -> None:
        """Stop for good and remove the directory."""
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.running

    # --- use -------------------------------------------------------------------------------

    def url(self, db: int | None = None, *, password: str | None = None) -> str:
        """A ``redis://`` (``rediss://`` with TLS, trusting the test CA) URL of this server.

        ``password`` overrides the server's own (to test a wrong one)."""
        password = self.password if password is None else password
        scheme = "rediss" if self.certificate is not None else "redis"
        auth = f":{quote(password, safe='')}@" if password is not None else ""
        path = f"/{db}" if db is not None else ""
        query = f"?ssl_ca_certs={self.ca_file}" if self.certificate is not None else ""
        return f"{scheme}://{auth}{self.host}:{self.port}{path}{query}"

    def command(self, *args: str | int, db: int | None = None) -> RespValue:
        """Send one command (after AUTH and SELECT as needed) and return its reply."""
        sock = socket.create_connection((self.host, self.port), timeout=5)
        if self.certificate is not None:
            context = ssl.create_default_context(cafile=str(self.ca_file))
            sock = context.wrap_socket(sock, server_hostname=self.host)
        with sock, sock.makefile("rb") as replies:
            commands: list[tuple[str | int, ...]] = []
            if self.password is not None:
                commands.append(("AUTH", self.password))
            if db is not None:
                commands.append(("SELECT", db))
            commands.append(args)
            for command in commands:
                sock.sendall(_encode(command))
            answers = [_read(replies) for _ in commands]
        return answers[-1]

    def stat(self, name: str) -> int:
        """Calls of command ``name`` since the last start (from ``INFO commandstats``)."""
        info = self.command("INFO", "commandstats")
        assert isinstance(info, bytes)
        for line in info.decode().splitlines():
            if line.startswith(f"cmdstat_{name.lower()}:"):
                fields = dict(item.split("=") for item in line.split(":", 1)[1].split(","))
                return int(fields["calls"])
        return 0

    def log_text(self) -> str:
        try:
            return (self.directory / "redis.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""


def _encode(args: tuple[str | int, ...]) -> bytes:
    parts = [str(a).encode() for a in args]
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)


def _read(stream) -> RespValue:
    line = stream.readline()
    if not line:
        raise OSError("connection closed by redis-server")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest
    if kind == b"-":
        raise RedisError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        length = int(rest)
        return None if length < 0 else stream.read(length + 2)[:-2]
    if kind == b"*":
        count = int(rest)
        return None if count < 0 else [_read(stream) for _ in range(count)]
    raise OSError(f"unexpected reply {line!r}")
