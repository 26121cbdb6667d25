"""``server.workers = 2`` (SPEC §11) on the real process, in front of the Dovecot pair: the
twistd process supervises two worker processes that share the listening sockets.

The admin API answers once for the instance: ``/stats`` sums and lists the workers,
``/connections`` and ``/metrics`` name the worker of each session and series, and a kick or
invalidation reaches every worker. A worker killed with SIGKILL is started again and nothing it
held is still counted; SIGHUP reloads every worker; SIGTERM drains them all and no process is
left.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import DovecotPair, StalrouteFactory
from tests.harness.pki import CertificateAuthority, IssuedCertificate
from tests.harness.stalroute import StalrouteProcess
from tests.integration.test_admin import (
    Admin, is_closed, lands_on, logged_in, node_of, proxy_config, wait_until,
)

pytestmark = pytest.mark.integration

WORKERS = 2


@pytest.fixture
def instance(stalroute: StalrouteFactory, pki: CertificateAuthority,
             proxy_certificate: IssuedCertificate,
             dovecot_pair: DovecotPair) -> tuple[StalrouteProcess, Admin]:
    config = proxy_config(pki, proxy_certificate, dovecot_pair)
    config["server"]["workers"] = WORKERS
    proxy = stalroute(config, mappings={"alice": "node1", "bob": "node2"})
    admin = Admin(proxy, pki)
    wait_until(lambda: len(workers(admin)) == WORKERS)
    return proxy, admin


def workers(admin: Admin) -> list[dict[str, Any]]:
    return admin.ok("GET", "/stats").get("workers", [])


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def all_closed(clients: list) -> Callable[[], bool]:
    return lambda: all(is_closed(client) for client in clients)


def test_two_workers_serve_as_one_instance(instance: tuple[StalrouteProcess, Admin],
                                           pki: CertificateAuthority,
                                           users: dict[str, str]) -> None:
    proxy, admin = instance
    pids = {worker["pid"] for worker in workers(admin)}
    assert len(pids) == WORKERS and proxy.pid not in pids
    clients = [logged_in(proxy, pki, users, "alice") for _ in range(8)]
    assert {node_of(client, "alice") for client in clients} == {"node1"}

    stats = admin.ok("GET", "/stats")
    assert stats["sessions"]["spliced"] == 8 == stats["active_connections"]
    assert sum(worker["sessions"] for worker in stats["workers"]) == 8
    rows = admin.ok("GET", "/connections?identifier=alice")["connections"]
    assert len(rows) == 8 and {row["worker"] for row in rows} <= {1, 2}
    exposition = admin.call("GET", "/metrics").body.decode()
    spliced = [sample for family in text_string_to_metric_families(exposition)
               if family.name == "stalroute_sessions_spliced" for sample in family.samples]
    assert sum(sample.value for sample in spliced) == 8
    assert all("worker" in sample.labels for sample in spliced)

    # A change made through the admin API reaches every worker: the kick closes all eight.
    assert admin.ok("POST", "/connections/kick", {"identifier": "alice"})["kicked"] == 8
    wait_until(all_closed(clients))
    proxy.write_mappings({"alice": "node2", "bob": "node2"})
    admin.ok("POST", "/mappings/reload")
    assert {lands_on(proxy, pki, users, "alice") for _ in range(6)} == {"node2"}


def test_a_killed_worker_is_replaced_and_nothing_it_held_is_counted(
        instance: tuple[StalrouteProcess, Admin], pki: CertificateAuthority,
        users: dict[str, str]) -> None:
    proxy, admin = instance
    clients = [logged_in(proxy, pki, users, "bob") for _ in range(6)]
    victim = max(workers(admin), key=lambda worker: worker["sessions"])
    os.kill(victim["pid"], signal.SIGKILL)
    wait_until(lambda: victim["pid"] not in {w["pid"] for w in workers(admin)}
               and len(workers(admin)) == WORKERS)
    held = victim["sessions"]
    assert admin.ok("GET", "/stats")["active_connections"] == 6 - held
    for client in clients:
        if not is_closed(client):
            client.logout()
    wait_until(lambda: admin.ok("GET", "/stats")["active_connections"] == 0)
    assert lands_on(proxy, pki, users, "bob") == "node2"
    assert "worker 1" in proxy.log_text() or "worker 2" in proxy.log_text()
    assert f"worker {victim['worker']} ended" in proxy.log_text()


def test_sighup_reloads_every_worker_and_sigterm_leaves_no_process(
        instance: tuple[StalrouteProcess, Admin], tmp_path: Path) -> None:
    proxy, admin = instance
    pids = [worker["pid"] for worker in workers(admin)]
    before = proxy.log_text().count("configuration reloaded")
    proxy.reload()
    wait_until(lambda: proxy.log_text().count("configuration reloaded") == before + 1 + WORKERS)
    proxy.stop()
    assert not any(alive(pid) for pid in pids)
    assert "Traceback" not in proxy.log_text()
