"""Acceptance tests of ``stalroute ctl`` (SPEC §1) against a real stalroute and the Dovecot
pair: every subcommand in readable and ``--json`` form, where the URL and token come from,
exit codes, the progress output, and a 100,000-row ``ctl mappings import`` whose rows are
routable at once."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import DovecotPair, StalrouteFactory
from tests.harness.pki import CertificateAuthority, IssuedCertificate
from tests.harness.stalroute import REPO_ROOT, StalrouteProcess
from tests.integration.test_admin import (
    TOKEN,
    is_closed,
    lands_on,
    logged_in,
    proxy_config,
    wait_until,
)

pytestmark = pytest.mark.integration

ROWS = 100_000


@pytest.fixture
def proxy(stalroute: StalrouteFactory, pki: CertificateAuthority,
          proxy_certificate: IssuedCertificate, dovecot_pair: DovecotPair) -> StalrouteProcess:
    return stalroute(proxy_config(pki, proxy_certificate, dovecot_pair),
                     mappings={"bob": "node2"})


def ctl(proxy: StalrouteProcess | None, pki: CertificateAuthority, *argv: str,
        env: dict[str, str] | None = None, connection: bool = True,
        stderr: Any = subprocess.PIPE, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``python -m stalroute ctl [--url … --cacert …] ARGV`` with the token in the env."""
    environment = {k: v for k, v in os.environ.items()
                   if not k.startswith(("STALROUTE_", "PROXY_"))}
    environment.update({"STALROUTE_ADMIN_TOKEN": TOKEN} if env is None else env)
    options = ["--url", proxy.admin_url, "--cacert", str(pki.cert_path)] \
        if connection and proxy is not None else []
    return subprocess.run([sys.executable, "-m", "stalroute", "ctl", *options, *argv],
                          cwd=REPO_ROOT, env=environment, stdout=subprocess.PIPE,
                          stderr=stderr, text=True, timeout=timeout)


def ok(proxy: StalrouteProcess, pki: CertificateAuthority, *argv: str) -> str:
    done = ctl(proxy, pki, *argv)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_every_subcommand_readable_and_json(proxy: StalrouteProcess, pki: CertificateAuthority,
                                            users: dict[str, str]) -> None:
    stats = ok(proxy, pki, "stats")
    assert "LISTENER" in stats and "imaps" in stats and "cache:" in stats
    assert json.loads(ok(proxy, pki, "stats", "--json"))["listeners"]["imaps"]["protocol"] == \
        "imap"
    destinations = ok(proxy, pki, "destinations").splitlines()
    assert destinations[0].split() == ["NAME", "HOST", "PROTOCOLS", "CIRCUIT", "FAILURES",
                                       "TRIPS", "SESSIONS", "DEFAULT"]
    assert destinations[1].split()[0::3] == ["node1", "closed", "0"]
    assert "circuit of node2 reset" in ok(proxy, pki, "destinations", "reset", "node2")

    assert ok(proxy, pki, "mappings", "get", "bob").strip() == "bob → node2"
    missing = ctl(proxy, pki, "mappings", "get", "carol")
    assert missing.returncode == 1 and "not mapped" in missing.stdout
    assert "carol → node2" in ok(proxy, pki, "mappings", "put", "carol", "node2")
    assert json.loads(ok(proxy, pki, "--json", "mappings", "get", "carol")) == {
        "identifier": "carol", "destination": "node2"}
    assert ok(proxy, pki, "mappings", "export") == "bob\tnode2\ncarol\tnode2\n"
    assert "mapping of carol deleted" in ok(proxy, pki, "mappings", "delete", "carol")
    assert "carol had no mapping" in ok(proxy, pki, "mappings", "delete", "carol")
    assert "1 entries" in ok(proxy, pki, "mappings", "reload")
    assert "entries dropped" in ok(proxy, pki, "cache", "invalidate", "bob")
    assert "(all)" in ok(proxy, pki, "cache", "invalidate")

    alice = logged_in(proxy, pki, users, "alice")
    table = ok(proxy, pki, "connections")
    assert "alice" in table and "node1" in table and "1 sessions" in table
    assert json.loads(ok(proxy, pki, "connections", "list", "--json", "--destination",
                         "node2")) == {"connections": []}
    assert ok(proxy, pki, "kick", "--identifier", "alice").strip() == \
        "kicked 1 sessions of alice"
    wait_until(lambda: is_closed(alice))
    assert "held for 2.5s" in ok(proxy, pki, "delay", "alice", "2.5")
    assert "lifted" in ok(proxy, pki, "delay", "alice", "0")
    assert ok(proxy, pki, "reload").strip() == "configuration reloaded"
    assert ok(proxy, pki, "health").strip() == "ready"
    assert ok(proxy, pki, "health", "--live").strip() == "ok"
    assert "stalroute_cache_hits_total" in ok(proxy, pki, "metrics")


def test_errors_and_exit_codes(proxy: StalrouteProcess, pki: CertificateAuthority,
                               tmp_path: Path) -> None:
    unknown = ctl(proxy, pki, "mappings", "put", "alice", "node9")
    assert unknown.returncode == 1
    assert "HTTP 400: destination 'node9' is not declared" in unknown.stderr
    wrong = ctl(proxy, pki, "stats", env={"STALROUTE_ADMIN_TOKEN": "w" * 40})
    assert wrong.returncode == 1 and "HTTP 401" in wrong.stderr
    untrusted = ctl(proxy, pki, "--url", proxy.admin_url, "stats", connection=False)
    assert untrusted.returncode == 1 and "--cacert" in untrusted.stderr
    insecure = ctl(proxy, pki, "--url", proxy.admin_url, "--insecure", "stats",
                   connection=False)
    assert insecure.returncode == 0
    assert ctl(proxy, pki, "kick").returncode == 2
    assert ctl(proxy, pki, "delay", "alice", "soon").returncode == 2

    proxy.config_path.write_text(proxy.config_path.read_text() + "\nnonsense = 1\n")
    refused = ctl(proxy, pki, "reload")
    assert refused.returncode == 1
    assert "configuration refused" in refused.stderr and "nonsense" in refused.stderr


def test_url_and_token_from_the_config_or_a_token_file(proxy: StalrouteProcess,
                                                       pki: CertificateAuthority,
                                                       tmp_path: Path) -> None:
    # [admin] bind and bearer_token of the running proxy's own config file.
    from_config = ctl(proxy, pki, "--config", str(proxy.config_path), "--cacert",
                      str(pki.cert_path), "stats", "--json", env={}, connection=False)
    assert from_config.returncode == 0, from_config.stderr
    via_env = ctl(proxy, pki, "--cacert", str(pki.cert_path), "health", connection=False,
                  env={"STALROUTE_CONFIG": str(proxy.config_path)})
    assert via_env.returncode == 0, via_env.stderr
    token_file = tmp_path / "admin.token"
    token_file.write_text(TOKEN + "\n")
    with_file = ctl(proxy, pki, "stats", "--token-file", str(token_file),
                    env={"PROXY_ADMIN_TOKEN": "w" * 40})
    assert with_file.returncode == 0, with_file.stderr
    alias = ctl(proxy, pki, "stats", env={"PROXY_ADMIN_TOKEN": TOKEN})
    assert alias.returncode == 0, alias.stderr


def write_rows(path: Path, rows: int, extra: dict[int, str]) -> None:
    """``rows`` rows user000000…, with ``extra`` lines inserted at those (0-based) rows."""
    with open(path, "w") as handle:
        handle.write("# wave 7 of the migration\n")
        for n in range(rows):
            if n in extra:
                handle.write(extra[n])
            handle.write(f"user{n:06d}\tnode{1 + n % 2}\n")


def test_import_100k_rows_then_an_imported_account_is_routable(
        proxy: StalrouteProcess, pki: CertificateAuthority, users: dict[str, str],
        tmp_path: Path) -> None:
    source = tmp_path / "wave7.tsv"
    # Line numbers: 1 is the comment, row n is on line n + 2 (+1 after each extra line).
    write_rows(source, ROWS, {10: "dave\tnode2\n", 500: "erin\tnode9\n",
                              ROWS - 1: "not a valid row\n"})
    started = time.monotonic()
    done = ctl(proxy, pki, "mappings", "import", str(source))
    elapsed = time.monotonic() - started
    assert done.returncode == 1, done.stdout + done.stderr  # rows were rejected
    out = done.stdout
    assert f"{ROWS + 1:,} written, 0 unchanged, 2 rejected" in out, out
    assert "line 503: unknown destination 'node9'" in out
    assert f"line {ROWS + 3}: expected 'identifier<TAB>destination'" in out
    # Not a TTY: progress lines, no carriage returns.
    assert f"importing wave7.tsv: {ROWS + 3:,}/{ROWS + 3:,} rows (100%)" in done.stderr
    assert "\r" not in done.stderr
    print(f"ctl mappings import: {ROWS + 3:,} rows in {elapsed:.2f}s "
          f"({(ROWS + 3) / elapsed:,.0f} rows/s, whole command)")

    assert lands_on(proxy, pki, users, "dave") == "node2"
    assert lands_on(proxy, pki, users, "bob") == "node2"  # rows already there are kept
    lines = proxy.mappings_path.read_text().splitlines()
    assert len(lines) == ROWS + 2 and "user099999\tnode2" in lines

    again = ctl(proxy, pki, "--json", "mappings", "import", str(source))
    summary = json.loads(again.stdout)
    assert (summary["imported"], summary["unchanged"], summary["rejected_count"]) == (
        0, ROWS + 1, 2)
    assert [r["line"] for r in summary["rejected"]] == [503, ROWS + 3]


def test_import_json_file_and_dry_run(proxy: StalrouteProcess, pki: CertificateAuthority,
                                      users: dict[str, str], tmp_path: Path) -> None:
    source = tmp_path / "wave8.json"
    source.write_text(json.dumps([{"identifier": "frank", "destination": "node2"},
                                  {"identifier": "grace", "destination": "node1"}], indent=1))
    dry = ctl(proxy, pki, "mappings", "import", "--dry-run", str(source))
    assert dry.returncode == 0 and "checked wave8.json: 2 rows" in dry.stdout
    assert lands_on(proxy, pki, users, "frank") == "node1"
    assert ok(proxy, pki, "mappings", "import", "--batch-size", "1", str(source)).startswith(
        "imported wave8.json: 2 rows")
    assert lands_on(proxy, pki, users, "frank") == "node2"
    broken = tmp_path / "broken.json"
    broken.write_text('[{"identifier": "heidi", "destination": "node2"},\n{oops}]')
    refused = ctl(proxy, pki, "mappings", "import", str(broken))
    assert refused.returncode == 1 and "line 2" in refused.stderr
    assert "heidi" not in proxy.mappings_path.read_text()


def test_import_progress_bar_on_a_tty(proxy: StalrouteProcess, pki: CertificateAuthority,
                                      tmp_path: Path) -> None:
    source = tmp_path / "small.tsv"
    write_rows(source, 50, {})
    controller, terminal = pty.openpty()
    try:
        done = ctl(proxy, pki, "mappings", "import", "--batch-size", "10", str(source),
                   stderr=terminal)
        os.close(terminal)
        terminal = -1
        shown = b""
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError:
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(controller)
        if terminal >= 0:
            os.close(terminal)
    assert done.returncode == 0, done.stdout
    text = shown.decode()
    assert text.count("\r") >= 5
    assert "[##############################] 100% 50/50 rows" in text
