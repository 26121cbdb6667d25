"""Issue 11 (hardening) on a real stalroute: reloads that drop a listener, the reference
``/stats`` keys, admin errors that must stay answers (over-long request lines, refused
mapping files), and a listener port already in use.

The admin API is reached over real HTTPS with :class:`tests.integration.test_admin.Admin`.
"""

from __future__ import annotations

import copy
import imaplib
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import DovecotPair, StalrouteFactory
from tests.harness.pki import CertificateAuthority, IssuedCertificate
from tests.harness.ports import LOOPBACK, free_port
from tests.harness.stalroute import REPO_ROOT, dump_toml
from tests.integration.test_admin import (
    Admin, _admin_address, lands_on, proxy_config, wait_until,
)
from tests.integration.test_ctl import ok as ctl_ok

pytestmark = pytest.mark.integration

REFERENCE_STATS_KEYS = {"cache_hits", "cache_misses", "hit_rate_pct", "cache_entries",
                        "active_connections"}


@pytest.fixture
def start(stalroute: StalrouteFactory, pki: CertificateAuthority,
          proxy_certificate: IssuedCertificate, dovecot_pair: DovecotPair):
    """``start(mappings=...)`` → (proxy, Admin)."""

    def starter(mappings: dict[str, str] | None = None):
        proxy = stalroute(proxy_config(pki, proxy_certificate, dovecot_pair), mappings=mappings)
        return proxy, Admin(proxy, pki)

    return starter


def starttls_login_accepted(proxy, pki: CertificateAuthority, users: dict[str, str],
                      user: str) -> bool:
    """Log in on the ``imap`` (STARTTLS) listener; True when the backend accepted."""
    host, port = proxy.listener("imap")
    with imaplib.IMAP4(host, port, timeout=30) as client:
        client.starttls(ssl_context=pki.client_context())
        status, _ = client.login(user, users[user])
        return status == "OK"


# --- item 3: a reload that renames or removes listeners ------------------------------------


def test_renamed_and_removed_listeners_keep_serving_until_restart(
        start, pki: CertificateAuthority, users: dict[str, str]) -> None:
    proxy, admin = start(mappings={"bob": "node2"})
    config = copy.deepcopy(proxy.config)
    config["listener"]["imaps_new"] = config["listener"].pop("imaps")  # renamed
    del config["listener"]["imap"]  # removed
    proxy.config_path.write_text(dump_toml(config))
    since = proxy.log.size()

    reloaded = admin.ok("POST", "/config/reload")
    assert reloaded["restart_required"] == ["listener.imap", "listener.imaps",
                                            "listener.imaps_new"]
    # The old ports keep serving, under the settings they started with.
    assert lands_on(proxy, pki, users, "bob") == "node2"
    assert starttls_login_accepted(proxy, pki, users, "alice")
    stats = admin.ok("GET", "/stats")
    assert stats["listeners"]["imaps"]["protocol"] == "imap"
    assert set(stats["listeners"]) == {"imaps", "imap"}  # what is bound, under its old name
    metrics = admin.call("GET", "/metrics")
    assert metrics.status == 200, metrics
    names = {f.name for f in text_string_to_metric_families(metrics.body.decode())}
    assert "stalroute_listener_active_connections" in names

    hup = proxy.log.size()
    proxy.reload()  # SIGHUP with the same file: nothing breaks either
    proxy.log.wait_for(r"configuration reloaded", since=hup)
    assert lands_on(proxy, pki, users, "bob") == "node2"
    for path in ("/stats", "/metrics", "/connections", "/destinations", "/healthz/ready"):
        assert admin.call("GET", path).status == 200, path
    log = proxy.log_text(since)
    assert "KeyError" not in log and "Traceback" not in log


# --- item 11: the reference product's /stats keys -----------------------------------------------


def test_stats_keep_the_reference_top_level_keys(start, pki: CertificateAuthority,
                                                 users: dict[str, str]) -> None:
    proxy, admin = start(mappings={"bob": "node2"})
    assert lands_on(proxy, pki, users, "bob") == "node2"  # a miss (store lookup)
    assert lands_on(proxy, pki, users, "bob") == "node2"  # a positive hit
    assert lands_on(proxy, pki, users, "alice") == "node1"  # a miss (no row: negative)
    assert lands_on(proxy, pki, users, "alice") == "node1"  # a negative hit
    stats = admin.ok("GET", "/stats")
    assert REFERENCE_STATS_KEYS <= set(stats)
    assert (stats["cache_hits"], stats["cache_misses"]) == (2, 2)
    assert stats["hit_rate_pct"] == 50.0
    assert stats["cache_entries"] == 2 == stats["cache"]["entries"]
    assert "hit rate 50.0%" in ctl_ok(proxy, pki, "stats")
    with imaplib.IMAP4_SSL(*proxy.listener("imaps"), ssl_context=pki.client_context()) as held:
        held.noop()
        wait_until(lambda: admin.ok("GET", "/stats")["active_connections"] == 1)
        now = admin.ok("GET", "/stats")
        assert sum(listener["active_connections"] for listener in now["listeners"].values()) \
            == now["active_connections"]


# --- item 8: admin errors stay answers ------------------------------------------------------------


def test_an_over_long_request_line_is_answered_at_once(start, pki: CertificateAuthority) -> None:
    proxy, admin = start()
    host, port = _admin_address(proxy)
    for head in (b"GET /stats?identifier=" + b"a" * 20_000 + b" HTTP/1.1\r\n",
                 b"GET /stats HTTP/1.1\r\nX-Filler: " + b"b" * 20_000 + b"\r\n"):
        with socket.create_connection((host, port), timeout=10) as raw, \
                pki.client_context().wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(head)
            answer = b""
            while chunk := tls.recv(65536):  # a timeout here (10 s) fails the test
                answer += chunk
        status = int(answer.split(b" ", 2)[1])
        assert status in (414, 431), answer[:200]
        assert b'"error"' in answer
    assert admin.call("GET", "/stats").status == 200  # the API still answers


def test_a_refused_mapping_file_keeps_the_old_table(start, pki: CertificateAuthority,
                                                     users: dict[str, str]) -> None:
    """A non-UTF-8 line or an invalid identifier: the admin API and SIGHUP name the file and
    the line, and logins keep the old table."""
    proxy, admin = start(mappings={"bob": "node2"})
    for bad, where in ((b"bob\tnode2\n\xff\xfe\tnode1\n", "line 2"),
                       (b"bob\tnode2\ncar\x00ol\tnode1\n", "line 2")):
        proxy.mappings_path.write_bytes(bad)
        refused = admin.call("POST", "/mappings/reload")
        assert refused.status == 400, refused
        assert str(proxy.mappings_path) in refused.json["error"]
        assert any(where in problem for problem in refused.json["problems"])
        assert admin.call("POST", "/config/reload").status == 400
        since = proxy.log.size()
        proxy.reload()
        line = proxy.log.wait_for(r"configuration reload refused.*", since=since).group(0)
        assert where in line and str(proxy.mappings_path) in line
        assert "Traceback" not in proxy.log_text(since)
        assert lands_on(proxy, pki, users, "bob") == "node2"  # the old table is kept


# --- newcomer friction: a port already in use -----------------------------------------------------


def run_twistd(config_path: Path, log_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n",
         "--pidfile=", f"--logfile={log_path}", "stalroute", "--config", str(config_path)],
        cwd=REPO_ROOT, env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("taken", ["listener", "admin"])
def test_a_port_in_use_is_one_clear_line(taken: str, pki: CertificateAuthority,
                                        proxy_certificate: IssuedCertificate,
                                        dovecot_pair: DovecotPair, tmp_path: Path) -> None:
    config = proxy_config(pki, proxy_certificate, dovecot_pair)
    config["mapping"]["file"] = {"path": str(tmp_path / "mappings.tsv")}
    (tmp_path / "mappings.tsv").write_text("")
    port = free_port()
    if taken == "listener":
        config["listener"]["imaps"]["bind"] = [f"{LOOPBACK}:{port}"]
        expected = f"listener.imaps: cannot bind {LOOPBACK}:{port}: address already in use"
    else:
        config["admin"]["bind"] = f"{LOOPBACK}:{port}"
        expected = f"admin: cannot bind {LOOPBACK}:{port}: address already in use"
    config_path = tmp_path / "stalroute.toml"
    config_path.write_text(dump_toml(config))
    log_path = tmp_path / "stalroute.log"
    with socket.socket() as holder:
        holder.bind((LOOPBACK, port))
        holder.listen()
        done = run_twistd(config_path, log_path)
    log = log_path.read_text()
    assert done.returncode == 1, done.stdout + done.stderr + log
    assert expected in log
    assert "Traceback" not in log + done.stdout + done.stderr
    assert "CannotListenError" not in log

