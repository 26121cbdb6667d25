"""Certificates from ACME for a fleet (SPEC §2.11 roles, §2.13): a real pebble (with its mock
DNS pointing ``mail.test`` at 127.0.0.1), three stalroute instances sharing a coordinator.

Two relays stand in front of pebble's connections:

* the ACME API is reached through a :class:`RecordingRelay`, which finds the process that
  opened each connection (its socket's inode in ``/proc/net/tcp``, then among the
  ``/proc/<pid>/fd`` links, TEST-ENVIRONMENT.md §8): so the test knows which instance talked
  to pebble without reading stalroute's logs;
* pebble validates tls-alpn-01 on ``tls_port``, where a round-robin :class:`Balancer` sends
  each connection to the next instance's IMAPS listener (pebble validates three times at
  once, so the validations land on three instances, the orderer and two others); and it
  validates http-01 on ``http_port``, where another one sends each connection to the next
  instance's plain HTTP listener.

Over Redis, ``acme_renew = [2]``, two worker processes per instance, in front of Dovecot:
every instance's IMAPS listener (every worker) serves the certificate pebble issued for
mail.test shortly after start; only node 2's process connected to the ACME API; the
validations reached the other instances too, which answered them. Then a renewal forced
through instance 1's admin API (``POST /certificates/renew``) is performed by node 2 and
changes the serial served by all three, while an IMAP IDLE session through instance 1 stays
up. Over PostgreSQL, ``acme_renew = [2, 3]``, by http-01: node 2 takes the
lease and issues, node 3 joining later serves the stored certificate; node 2 stopped, node 3
takes the lease and renews (the certificate is due :data:`DUE_AFTER` s after issuance), and
the instances left serve the new one; both times node 1, which never orders, answered
validations on its HTTP listener.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from tests.conftest import DovecotPair, StalrouteFactory, require_binary
from tests.harness.clients import RawIMAP
from tests.harness.pebble import PebbleServer, Relay
from tests.harness.pki import CertificateAuthority, IssuedCertificate
from tests.harness.postgres import PostgresServer
from tests.harness.ports import LOOPBACK, free_port, free_ports
from tests.harness.redis import RedisServer
from tests.harness.stalroute import (
    StalrouteProcess, admin_section, closed_destination, dovecot_destination,
)
from tests.integration.test_acme import (
    NAME, acme_config, http01_listeners, http_get, intermediate_subject, served_chain,
)
from tests.integration.test_admin import TOKEN, Admin
from tests.integration.test_cluster import (  # noqa: F401 - fixtures, used by name
    postgres_server, redis_server,
)

pytestmark = pytest.mark.integration

#: pebble's certificate lifetime here.
VALIDITY = 3600
#: The PostgreSQL fleet's certificate is due this long after issuance (node 2 must have
#: stopped by then, so that node 3 renews it).
DUE_AFTER = 20


# --- relays ----------------------------------------------------------------------------------------


def _hex_address(port: int) -> str:
    return f"0100007F:{port:04X}"  # 127.0.0.1 as /proc/net/tcp writes it


def connecting_pid(client_port: int, server_port: int) -> int | None:
    """The process owning the loopback socket ``client_port`` → ``server_port``."""
    inode = None
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            if fields[1] == _hex_address(client_port) and fields[2] == _hex_address(server_port):
                inode = fields[9]
                break
    if inode is None:
        return None
    link = f"socket:[{inode}]"
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == link:
                        return int(pid)
    return None


class RecordingRelay(Relay):
    """In front of the ACME API: the pid of every process that connected."""

    def __init__(self, target: tuple[str, int]) -> None:
        super().__init__(target)
        self.pids: list[int | None] = []

    def accepted(self, client: socket.socket) -> None:
        self.pids.append(connecting_pid(client.getpeername()[1], self.port))

    @property
    def directory_url(self) -> str:
        return f"https://{LOOPBACK}:{self.port}/dir"


class Balancer(Relay):
    """Round robin over :attr:`targets` (ports on 127.0.0.1); counts connections per port."""

    def __init__(self, port: int) -> None:
        super().__init__((LOOPBACK, 0), port)
        self.targets: list[int] = []
        self.sent: dict[int, int] = {}
        self._turn = 0

    def route(self) -> tuple[str, int]:
        with self._lock:
            port = self.targets[self._turn % len(self.targets)]
            self._turn += 1
            self.sent[port] = self.sent.get(port, 0) + 1
        return LOOPBACK, port


# --- fixtures ---------------------------------------------------------------------------------------


class Acme:
    """pebble, the recording relay in front of its API, the balancers at its tls_port
    (``balancer``) and http_port (``http_balancer``)."""

    def __init__(self, pebble: PebbleServer, recorder: RecordingRelay,
                 balancer: Balancer, http_balancer: Balancer) -> None:
        self.pebble, self.recorder = pebble, recorder
        self.balancer, self.http_balancer = balancer, http_balancer

    def issuer(self) -> x509.Name:
        return intermediate_subject(self.pebble)

    def talked(self, proxies: dict[int, StalrouteProcess], since: int = 0) -> list[int | str]:
        """Which node's process opened each ACME connection after the ``since``-th."""
        nodes = {proxy.pid: node for node, proxy in proxies.items()}
        return [nodes.get(pid, f"pid {pid}") if pid is not None else "unknown"
                for pid in self.recorder.pids[since:]]


@pytest.fixture(scope="module")
def acme(pki: CertificateAuthority) -> Iterator[Acme]:
    binaries = require_binary("pebble"), require_binary("pebble-challtestsrv")
    balancer, http_balancer = (Balancer(port) for port in free_ports(2))
    pebble = PebbleServer(*binaries, pki, tls_port=balancer.port, http_port=http_balancer.port,
                          validity=VALIDITY)
    recorder = RecordingRelay((LOOPBACK, pebble.relay.port))
    try:
        pebble.start()
        balancer.start()
        http_balancer.start()
        recorder.start()
        yield Acme(pebble, recorder, balancer, http_balancer)
    finally:
        print(f"--- pebble log (tail) ---\n{pebble.log_text()[-4000:]}")
        recorder.cut()
        balancer.cut()
        http_balancer.cut()
        pebble.close()


def member(acme: Acme, tmp_path: Path, node_id: int, kind: str, url: str, workers: int,
           renewers: list[int], http01: bool = False, **options: Any) -> dict[str, Any]:
    """One instance's configuration (``http01``: by http-01, on a plain HTTP listener
    ``web``)."""
    port, web = free_ports(2)
    config = acme_config(acme.pebble, port, tmp_path / f"state-{node_id}", **options)
    if http01:
        http01_listeners(config, web)
    config["acme"]["pebble"]["directory"] = acme.recorder.directory_url
    config["server"]["workers"] = workers
    config["cluster"] = {"node_id": node_id, "coordinator": kind, "url": url,
                         "roles": {"acme_renew": renewers}}
    return config


def imaps_port(proxy: StalrouteProcess) -> int:
    return proxy.listener("imaps")[1]


def web_port(proxy: StalrouteProcess) -> int:
    return proxy.listener("web")[1]


def http01_answered(proxy: StalrouteProcess) -> int:
    """How many http-01 validations ``proxy`` answered (200, ``outcome=acme_validation``)."""
    return sum(1 for line in proxy.log_text().splitlines()
               if "http GET /.well-known/acme-challenge/" in line and " status=200 " in line
               and "outcome=acme_validation" in line)


def leaf(proxy: StalrouteProcess) -> x509.Certificate:
    chain, _, first = served_chain(imaps_port(proxy))
    assert first.startswith(b"* OK")
    return chain[0]


def wait_for(condition: Callable[[], bool], what: str, timeout: float,
             proxies: list[StalrouteProcess]) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {p.workdir.name} ---\n{p.log_text()[-2500:]}" for p in proxies)
            raise AssertionError(f"{what}: not within {timeout}s\n{logs}")
        time.sleep(0.2)


def serve_issued(acme: Acme, proxies: list[StalrouteProcess], timeout: float = 40.0,
                 other_than: int | None = None) -> int:
    """Wait until every proxy serves one certificate issued by pebble (another serial than
    ``other_than``); its serial."""
    issuer = acme.issuer()

    def same() -> bool:
        leaves = [leaf(proxy) for proxy in proxies]
        return (all(cert.issuer == issuer and cert.serial_number != other_than
                    for cert in leaves)
                and len({cert.serial_number for cert in leaves}) == 1)

    wait_for(same, "the pebble certificate served everywhere", timeout, proxies)
    return leaf(proxies[0]).serial_number


# --- tests ------------------------------------------------------------------------------------------


def test_a_fleet_over_redis_serves_what_node_2_alone_ordered(
        acme: Acme, redis_server: RedisServer, stalroute: StalrouteFactory,
        pki: CertificateAuthority, proxy_certificate: IssuedCertificate,
        dovecot_pair: DovecotPair, users: dict[str, str], tmp_path: Path) -> None:
    redis_server.start()
    orders = acme.pebble.log_text().count("Added order")
    since = len(acme.recorder.pids)
    proxies: dict[int, StalrouteProcess] = {}
    acme.balancer.targets = []
    # The renewer last: the others are up when it publishes (a late one would read the
    # material from the store).
    for node_id in (1, 3, 2):
        config = member(acme, tmp_path, node_id, "redis", redis_server.url(), workers=2,
                        renewers=[2])
        node1 = dovecot_destination(dovecot_pair.node1, ca_file=pki.cert_path)
        node1["protocol"]["http"] = closed_destination(("http",))["protocol"]["http"]
        config["destination"] = {"node1": node1}
        config["routing"] = {"default_destination": "node1"}
        config["listener"]["webs"] = {"protocol": "http", "tls": "implicit",
                                      "bind": [f"{LOOPBACK}:{free_ports(1)[0]}"]}
        if node_id == 1:  # the admin API, with a file certificate of its own
            config["tls"]["certificate"]["default"] = {
                "cert": str(proxy_certificate.cert_path),
                "key": str(proxy_certificate.key_path), "default": True}
            config["admin"] = admin_section(TOKEN)
        proxies[node_id] = stalroute(config)
        acme.balancer.targets.append(imaps_port(proxies[node_id]))
    everyone = [proxies[n] for n in (1, 2, 3)]
    serial = serve_issued(acme, everyone)
    # Each worker of each instance serves it: every new connection lands on some worker.
    wait_for(lambda: all({leaf(proxy).serial_number for _ in range(6)} == {serial}
                         for proxy in everyone), "every worker serving it", 5, everyone)
    # The HTTPS listeners too (an unrouted path: 404, answered over the issued certificate).
    for proxy in everyone:
        status, _, served = http_get(proxy.listener("webs")[1], "/unrouted",
                                     acme.pebble.root_pem())
        assert status == 404 and served is not None and served.serial_number == serial

    # Only node 2 talked to pebble, and it ordered once.
    talked = acme.talked(proxies, since)
    assert talked and set(talked) == {2}, talked
    assert acme.pebble.log_text().count("Added order") == orders + 1
    # The validations reached the other instances, which answered them from the material
    # node 2 published (their workers did: the supervisor has no listener).
    ports = {node: imaps_port(proxy) for node, proxy in proxies.items()}
    assert acme.balancer.sent.get(ports[1], 0) + acme.balancer.sent.get(ports[3], 0) >= 1
    answered = [node for node, proxy in proxies.items()
                if f"answering an ACME tls-alpn-01 validation for {NAME}" in proxy.log_text()]
    assert set(answered) - {2}, answered
    for node in (1, 3):
        log = proxies[node].log_text()
        assert "cluster: applied acme_challenge" in log
        assert "cluster: applied certificate_issued" in log
        assert "acme: certificate mail loaded from the store and served" in log
        assert "ordering from" not in log
        assert "does not renew the certificates (cluster.roles.acme_renew)" in log
    log = proxies[2].log_text()
    assert "acme: this process took the acme_renew lease" in log
    assert "acme: certificate mail issued and served" in log
    assert "did not acknowledge" not in log

    # A renewal forced on instance 1: node 2 orders, all three serve the new certificate,
    # and a session through instance 1 that negotiated the old one stays up.
    context = ssl.create_default_context(cadata=acme.pebble.root_pem().decode())
    with RawIMAP.connect(LOOPBACK, imaps_port(proxies[1]), ssl_context=context,
                         server_hostname=NAME, timeout=60) as client:
        assert client.command(b"a1", b"LOGIN frank " + users["frank"].encode())[-1] \
            .startswith(b"a1 OK")
        assert client.command(b"a2", b"SELECT INBOX")[-1].startswith(b"a2 OK")
        client.send(b"a3 IDLE\r\n")
        assert client.readline().startswith(b"+")
        before = len(acme.recorder.pids)
        answer = Admin(proxies[1], pki).ok("POST", "/certificates/renew?name=mail")
        assert (answer["applied"], answer["members"]) == (3, 3), answer
        renewed = serve_issued(acme, everyone, other_than=serial)
        assert renewed != serial
        talked = acme.talked(proxies, before)
        assert talked and set(talked) == {2}, talked
        client.send(b"DONE\r\n")
        assert client.read_until_tagged(b"a3")[-1].startswith(b"a3 OK")
        assert client.command(b"a4", b"NOOP")[-1].startswith(b"a4 OK")
    assert "acme: certificate mail: renewal asked through the admin API" in proxies[2].log_text()
    assert all("PRIVATE KEY" not in proxy.log_text() for proxy in everyone)


def test_over_postgresql_node_3_takes_the_lease_when_node_2_stops(
        acme: Acme, postgres_server: PostgresServer, stalroute: StalrouteFactory,
        tmp_path: Path) -> None:
    """By http-01: pebble's validations go round robin to the instances' HTTP listeners."""
    postgres_server.start()
    url = f"postgresql://fleet@{postgres_server.host}:{postgres_server.port}/fleet"
    since = len(acme.recorder.pids)
    proxies: dict[int, StalrouteProcess] = {}

    def start(node_id: int) -> StalrouteProcess:
        proxies[node_id] = stalroute(member(acme, tmp_path, node_id, "postgresql", url,
                                            workers=1, renewers=[2, 3], http01=True,
                                            renew_before=f"{VALIDITY - DUE_AFTER}s"))
        return proxies[node_id]

    one = start(1)
    acme.http_balancer.targets = [web_port(one)]
    two = start(2)
    acme.http_balancer.targets.append(web_port(two))
    first = serve_issued(acme, [one, two])
    # Node 1 answered validations of node 2's order (node 2 published the material to it).
    answered_first = http01_answered(one)
    assert answered_first >= 1, one.log_text()[-3000:]
    assert "1 http-01 challenges to answer" in two.log_text()
    three = start(3)
    wait_for(lambda: leaf(three).serial_number == first,  # read from the store at start
             "node 3 serving the stored certificate", 10, [three])
    issued_by_two = acme.talked(proxies, since)
    assert set(issued_by_two) == {2}, issued_by_two

    acme.http_balancer.targets = [web_port(one), web_port(three)]
    two.stop()
    assert "acme: released the acme_renew lease" in two.log_text()
    renewed = serve_issued(acme, [one, three], timeout=45, other_than=first)
    assert renewed != first
    talked = acme.talked(proxies, since + len(issued_by_two))
    assert talked and set(talked) == {3}, talked
    log = three.log_text()
    assert "acme: this process took the acme_renew lease" in log
    assert "ordering from [acme.pebble] (due for renewal)" in log
    assert "ordering from" not in one.log_text()
    # Node 1 answered validations of node 3's order too.
    assert http01_answered(one) > answered_first, one.log_text()[-3000:]
    assert "tls-alpn-01 validation" not in one.log_text() + log
