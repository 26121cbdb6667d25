"""A private pebble ACME server (RFC 8555 test server) with its mock DNS (``PebbleServer``).

The recipe of TEST-ENVIRONMENT.md §8: ``pebble-challtestsrv`` answers every A query with
127.0.0.1 (so ``mail.test`` reaches the stalroute under test) on a port free for UDP and TCP;
``pebble`` validates through it, connecting to ``tls_port`` (tls-alpn-01) and ``http_port``
(http-01) on 127.0.0.1: the ports of the stalroute listeners. The ACME API's own HTTPS
certificate comes from the test CA (``ca_file`` is what the client trusts).

Both run as :class:`~tests.harness.processes.ManagedProcess` children (always reaped), with
``PEBBLE_VA_NOSLEEP=1 PEBBLE_WFE_NONCEREJECT=0 PEBBLE_AUTHZREUSE=0`` (no random 0–15 s
validation sleeps, no random badNonce, every order validated afresh).

The ACME API is reached through a :class:`Relay` on ``acme_port``: :meth:`Relay.cut` makes
the server unreachable (connection refused, live connections closed) while pebble keeps its
accounts in memory, and :meth:`Relay.restore` brings it back on the same port.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import ssl
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from tests.harness.pki import CertificateAuthority
from tests.harness.ports import LOOPBACK, free_port
from tests.harness.processes import ManagedProcess, ProcessStartError

PEBBLE_ENV = {"PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0", "PEBBLE_AUTHZREUSE": "0"}


def free_udp_and_tcp_port(host: str = LOOPBACK) -> int:
    """A port free for both TCP and UDP (the mock DNS binds both)."""
    for _ in range(50):
        port = free_port(host)
        with contextlib.suppress(OSError), socket.socket(socket.AF_INET,
                                                         socket.SOCK_DGRAM) as udp:
            udp.bind((host, port))
            return port
    raise RuntimeError("no port free for both UDP and TCP")


class Relay:
    """A TCP relay ``127.0.0.1:port`` → ``target`` (or where :meth:`route` says) that can be
    cut and restored."""

    def __init__(self, target: tuple[str, int], port: int | None = None) -> None:
        self.target = target
        self.port = port or free_port()
        self.connections = 0
        self._listener: socket.socket | None = None
        self._live: set[socket.socket] = set()
        self._lock = threading.Lock()

    def start(self) -> Relay:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((LOOPBACK, self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True,
                         name=f"relay-{self.port}").start()
        return self

    @property
    def running(self) -> bool:
        return self._listener is not None

    def cut(self) -> None:
        """Refuse new connections and close the live ones."""
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            live, self._live = self._live, set()
        for sock in live:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def restore(self) -> None:
        if not self.running:
            self.start()

    def accepted(self, client: socket.socket) -> None:
        """A client was accepted (before its upstream connection is made)."""

    def route(self) -> tuple[str, int]:
        """Where this connection goes."""
        return self.target

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            self.accepted(client)
            try:
                upstream = socket.create_connection(self.route(), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                if self._listener is not listener:  # cut meanwhile
                    client.close()
                    upstream.close()
                    return
                self._live.update((client, upstream))
                self.connections += 1
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            with self._lock:
                self._live.discard(source)
                self._live.discard(sink)
            source.close()


class PebbleServer:
    """pebble + pebble-challtestsrv: ``start()``, ``close()``, ``directory_url``, ``ca_file``,
    ``intermediate_pem()``; ``relay.cut()``/``relay.restore()`` for an unreachable server."""

    def __init__(self, pebble: str, challtestsrv: str, ca: CertificateAuthority, *,
                 tls_port: int, http_port: int, validity: int | None = None) -> None:
        self.binaries = (pebble, challtestsrv)
        self.ca = ca
        self.tls_port, self.http_port = tls_port, http_port
        self.validity = validity
        self.directory = Path(tempfile.mkdtemp(prefix="stalroute-pebble-"))
        self.api_port, self.mgmt_port = free_port(), free_port()
        self.dns_port, self.dns_mgmt_port = free_udp_and_tcp_port(), free_port()
        self.relay = Relay((LOOPBACK, self.api_port))
        self._processes: list[ManagedProcess] = []

    @property
    def ca_file(self) -> Path:
        """The CA that signed the ACME API's HTTPS certificate (``[acme.*] ca_file``)."""
        return self.ca.cert_path

    @property
    def directory_url(self) -> str:
        return f"https://{LOOPBACK}:{self.relay.port}/dir"

    def start(self, timeout: float = 20.0) -> PebbleServer:
        pebble, challtestsrv = self.binaries
        dns = ManagedProcess(
            [challtestsrv, "-dns01", f"{LOOPBACK}:{self.dns_port}", "-http01", "",
             "-https01", "", "-tlsalpn01", "",
             "-management", f"{LOOPBACK}:{self.dns_mgmt_port}",
             "-defaultIPv4", LOOPBACK, "-defaultIPv6", ""],
            name="pebble-challtestsrv", output_path=self.directory / "challtestsrv.log")
        self._processes.append(dns.start())
        dns.wait_for_ports([(LOOPBACK, self.dns_mgmt_port), (LOOPBACK, self.dns_port)], timeout)

        https = self.ca.issue("pebble-api", ["localhost"], [LOOPBACK])
        settings: dict[str, object] = {
            "listenAddress": f"{LOOPBACK}:{self.api_port}",
            "managementListenAddress": f"{LOOPBACK}:{self.mgmt_port}",
            "certificate": str(https.cert_path), "privateKey": str(https.key_path),
            "httpPort": self.http_port, "tlsPort": self.tls_port,
            "ocspResponderURL": "", "externalAccountBindingRequired": False,
        }
        if self.validity is not None:
            settings["certificateValidityPeriod"] = self.validity
        config = self.directory / "pebble.json"
        config.write_text(json.dumps({"pebble": settings}, indent=2))
        server = ManagedProcess(
            [pebble, "-config", str(config), "-dnsserver", f"{LOOPBACK}:{self.dns_port}"],
            name="pebble", output_path=self.directory / "pebble.log",
            env={"PATH": "/usr/bin:/bin", **PEBBLE_ENV})
        self._processes.append(server.start())
        server.wait_for_ports([(LOOPBACK, self.api_port), (LOOPBACK, self.mgmt_port)], timeout)
        self.relay.start()
        deadline = time.monotonic() + timeout
        while True:  # the directory answers once pebble is ready
            try:
                self._get(f"https://{LOOPBACK}:{self.api_port}/dir")
                return self
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise ProcessStartError(f"pebble not ready: {exc}\n{self.log_text()}") from exc
                time.sleep(0.05)

    def _get(self, url: str) -> bytes:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        with urllib.request.urlopen(url, context=context, timeout=5) as answer:
            body: bytes = answer.read()
            return body

    def intermediate_pem(self) -> bytes:
        """The intermediate that signs issued certificates (new at every pebble start)."""
        return self._get(f"https://{LOOPBACK}:{self.mgmt_port}/intermediates/0")

    def root_pem(self) -> bytes:
        return self._get(f"https://{LOOPBACK}:{self.mgmt_port}/roots/0")

    def log_text(self) -> str:
        try:
            return (self.directory / "pebble.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        self.relay.cut()
        while self._processes:
            self._processes.pop().stop(timeout=10.0)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> PebbleServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()
