"""The shipped configurations (``etc/stalroute.toml``, ``etc/examples/*.toml``) pass
``stalroute check`` once the files they name exist, and ``stalroute check --skip-files``
as they are.

For the full check each file the configuration names (certificate and key, CA bundles, the
token file, the mapping file) is created in a temp dir, with content of the right kind, and
its path is swapped in the shipped text; everything else is checked verbatim. Warnings (a
store or destination that does not answer from this machine) are allowed; errors are not.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.pki import CertificateAuthority
from tests.harness.stalroute import REPO_ROOT

SHIPPED = [REPO_ROOT / "etc" / "stalroute.toml",
           *sorted((REPO_ROOT / "etc" / "examples").glob("*.toml"))]


def check(*arguments: str) -> subprocess.CompletedProcess[str]:
    """``stalroute check`` in a child process, as an operator runs it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STALROUTE_", "PROXY_"))}
    return subprocess.run([sys.executable, "-m", "stalroute", "check", *arguments],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)


def strings(value: Any) -> Iterator[str]:
    """Every string in a parsed TOML document."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)


def create_named_files(config: dict[str, Any], directory: Path) -> dict[str, Path]:
    """Create a stand-in for each file ``config`` names; shipped path → stand-in path."""
    ca = CertificateAuthority(directory / "pki")
    files: dict[str, Path] = {}
    for name, table in config.get("tls", {}).get("certificate", {}).items():
        if "cert" in table:
            issued = ca.issue(f"listener-{name}", table.get("subjects") or ["mail.example.com"])
            files[table["cert"]], files[table["key"]] = issued.cert_path, issued.key_path
    for name, destination in config.get("destination", {}).items():
        if "tls_ca_file" in destination:
            files[destination["tls_ca_file"]] = ca.cert_path
        if "tls_client_cert" in destination:
            issued = ca.issue(f"client-{name}", [f"{name}.example.com"], [], client=True)
            files[destination["tls_client_cert"]] = issued.cert_path
            files[destination["tls_client_key"]] = issued.key_path
    if token_file := config.get("admin", {}).get("bearer_token_file"):
        files[token_file] = directory / "admin.token"
        files[token_file].write_text(secrets.token_urlsafe(36) + "\n")
    if mapping_file := config.get("mapping", {}).get("file", {}).get("path"):
        files[mapping_file] = directory / "mappings.tsv"
        files[mapping_file].write_text("# identifier<TAB>destination\n" + "".join(
            f"someone@{name}.example\t{name}\n" for name in config.get("destination", {})))
    return files


@pytest.mark.parametrize("shipped", SHIPPED, ids=lambda path: path.name)
def test_passes_check_once_its_files_exist(shipped: Path, tmp_path: Path) -> None:
    text = shipped.read_text()
    parsed = tomllib.loads(text)
    files = create_named_files(parsed, tmp_path)
    parsed.pop("http", None)  # its route globs ("/**") are not files
    unknown = [s for s in strings(parsed) if s.startswith("/") and s not in files]
    assert not unknown, f"paths this test does not know how to create: {unknown}"
    for old, new in files.items():
        assert f'"{old}"' in text, old
        text = text.replace(f'"{old}"', f'"{new}"')
    config = tmp_path / shipped.name
    config.write_text(text)

    result = check(str(config))

    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith(f"OK: {config}"), result.stdout


@pytest.mark.parametrize("shipped", SHIPPED, ids=lambda path: path.name)
def test_passes_check_skip_files_as_shipped(shipped: Path) -> None:
    result = check("--skip-files", str(shipped))

    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith(f"OK: {shipped}"), result.stdout
