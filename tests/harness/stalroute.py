"""The real stalroute proxy as a child process, and builders for its TOML configuration.

``StalrouteProcess`` writes ``stalroute.toml`` (SPEC §2 schema) and ``mappings.tsv`` into its
work directory and runs twistd from the repository (the plugin in ``twisted/plugins/`` is
found through PYTHONPATH)::

    <python> -c "from twisted.scripts.twistd import run; run()" -n --pidfile= \
        --logfile=<workdir>/stalroute.log stalroute --config <workdir>/stalroute.toml

(``python -m twisted`` would run ``twist``, which has other options.)

Configurations are plain dicts shaped like the TOML file; :func:`dump_toml` serialises them.
:func:`dovecot_destination`, :func:`closed_destination`, :func:`imap_proxy_config`,
:func:`two_node_imap_config` and :func:`admin_section` build the usual pieces, so tests,
the demo and the benchmarks do not repeat TOML.
"""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tests.harness.dovecot import DovecotNode
from tests.harness.logs import LogFile
from tests.harness.pki import IssuedCertificate
from tests.harness.ports import LOOPBACK, free_port, free_ports
from tests.harness.processes import ManagedProcess

REPO_ROOT = Path(__file__).resolve().parents[2]
_TWISTD = "from twisted.scripts.twistd import run; run()"

# --- TOML ------------------------------------------------------------------------------------

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _key(key: str) -> str:
    return key if _BARE_KEY.match(key) else json.dumps(key)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, os.PathLike)):
        return json.dumps(os.fspath(value))  # JSON string escapes are valid TOML escapes
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as a TOML value")


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def dump_toml(document: Mapping[str, Any]) -> str:
    """Serialise nested dicts as TOML: dicts become ``[tables]``, lists of dicts
    ``[[arrays of tables]]``, everything else ``key = value``."""
    lines: list[str] = []

    def table(path: list[str], content: Mapping[str, Any], header: str | None) -> None:
        scalars = [
            (k, v) for k, v in content.items() if not isinstance(v, dict) and not _is_table_array(v)
        ]
        if header is not None and (scalars or not content):
            lines.extend(["", header])
        lines.extend(f"{_key(k)} = {_value(v)}" for k, v in scalars)
        for k, v in content.items():
            sub = path + [_key(k)]
            if isinstance(v, dict):
                table(sub, v, f"[{'.'.join(sub)}]")
            elif _is_table_array(v):
                for item in v:
                    lines.extend(["", f"[[{'.'.join(sub)}]]"])
                    table(sub, item, None)

    table([], document, None)
    return "\n".join(lines).lstrip("\n") + "\n"


# --- configuration builders ------------------------------------------------------------------

# (protocol, tls mode) → DovecotPorts attribute of the plain listener; "_haproxy" is appended
# for the listener that expects a PROXY header.
_DOVECOT_PORTS = {
    ("imap", "implicit"): "imaps",
    ("imap", "starttls"): "imap",
    ("imap", "plain"): "imap",
    ("pop3", "implicit"): "pop3s",
    ("pop3", "starttls"): "pop3",
    ("pop3", "plain"): "pop3",
    ("managesieve", "starttls"): "sieve",
    ("managesieve", "plain"): "sieve",
    ("submission", "implicit"): "submissions",
    ("submission", "starttls"): "submission",
    ("submission", "plain"): "submission",
}


def dovecot_destination(
    node: DovecotNode,
    *,
    tls: str = "implicit",
    protocols: tuple[str, ...] = ("imap",),
    ca_file: Path | None = None,
    pin_sha256: str | None = None,
    server_name: str | None = None,
    proxy_protocol: bool = True,
) -> dict[str, Any]:
    """A ``[destination.x]`` table for ``node``: each protocol on the listener for ``tls``
    (its ``haproxy = yes`` twin when ``proxy_protocol``), verified against ``ca_file`` and/or
    pinned to ``pin_sha256``; the name checked is ``server_name`` (default ``node.hostname``)."""
    suffix = "_haproxy" if proxy_protocol else ""
    destination: dict[str, Any] = {
        "host": node.host,
        "tls_server_name": server_name or node.hostname,
        "proxy_protocol": proxy_protocol,
    }
    if ca_file is not None:
        destination["tls_ca_file"] = str(ca_file)
    if pin_sha256 is not None:
        destination["tls_pinned_cert_sha256"] = pin_sha256
    destination["protocol"] = {
        proto: {"port": getattr(node.ports, _DOVECOT_PORTS[proto, tls] + suffix), "tls": tls}
        for proto in protocols
    }
    return destination


def closed_destination(protocols: tuple[str, ...] = ("imap",)) -> dict[str, Any]:
    """A destination whose port nothing listens on (a backend that is down)."""
    port = free_port()
    return {
        "host": LOOPBACK,
        "tls_server_name": "down.test",
        "protocol": {proto: {"port": port, "tls": "implicit"} for proto in protocols},
    }


def imap_proxy_config(
    certificate: IssuedCertificate,
    destinations: Mapping[str, dict[str, Any]],
    *,
    default: str,
    log_level: str = "info",
) -> dict[str, Any]:
    """A full configuration: IMAP listeners ``imaps`` (implicit TLS) and ``imap``
    (STARTTLS) on free loopback ports, ``destinations`` with ``default`` as the default,
    and a file mapping store (its path is filled in by :class:`StalrouteProcess`)."""
    imaps_port, imap_port = free_ports(2)
    return {
        "server": {
            "hostname": "stalroute.test",
            "shutdown_grace": "1s",
            "backend_timeout": "5s",
            "log_level": log_level,
        },
        "tls": {
            "certificate": {
                "default": {
                    "cert": str(certificate.cert_path),
                    "key": str(certificate.key_path),
                    "default": True,
                }
            }
        },
        "listener": {
            "imaps": {"protocol": "imap", "bind": [f"{LOOPBACK}:{imaps_port}"], "tls": "implicit"},
            "imap": {"protocol": "imap", "bind": [f"{LOOPBACK}:{imap_port}"], "tls": "starttls"},
        },
        "destination": copy.deepcopy(dict(destinations)),
        "routing": {"default_destination": default},
        "mapping": {"source": "file"},
    }


def two_node_imap_config(
    certificate: IssuedCertificate,
    ca_file: Path,
    node1: DovecotNode,
    node2: DovecotNode,
    **options: Any,
) -> dict[str, Any]:
    """stalroute in front of ``node1`` (default; backend leg PROXY v2 + implicit TLS) and
    ``node2`` (PROXY v2 + STARTTLS), both verified against ``ca_file``."""
    return imap_proxy_config(
        certificate,
        {
            "node1": dovecot_destination(node1, tls="implicit", ca_file=ca_file),
            "node2": dovecot_destination(node2, tls="starttls", ca_file=ca_file),
        },
        default="node1",
        **options,
    )


def admin_section(token: str) -> dict[str, Any]:
    """An ``[admin]`` table: HTTPS on a free loopback port with bearer ``token`` (≥ 32 chars),
    presenting the default certificate."""
    return {"bind": f"{LOOPBACK}:{free_port()}", "tls": "implicit", "bearer_token": token}


# --- the process -----------------------------------------------------------------------------


def parse_address(address: str) -> tuple[str, int]:
    """``"127.0.0.1:993"`` or ``"[::1]:993"`` → ``(host, port)``."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


class StalrouteProcess:
    """The proxy running ``config`` from ``workdir``; ``start()`` waits until every listener
    (and the admin API, if configured) accepts connections."""

    def __init__(
        self,
        config: Mapping[str, Any],
        workdir: Path,
        *,
        mappings: Mapping[str, str] | None = None,
        python: str = sys.executable,
        python_args: Sequence[str] = (),
        source: Path = REPO_ROOT,
    ) -> None:
        """``python_args`` go between the interpreter and ``-c`` (a benchmark's profiler,
        ``bench/cpu_profile.py``); ``source`` is the checkout whose stalroute runs (a
        benchmark's baseline commit)."""
        self.workdir = workdir
        self.config = copy.deepcopy(dict(config))
        self.config_path = workdir / "stalroute.toml"
        self.mappings_path = workdir / "mappings.tsv"
        self.log = LogFile(workdir / "stalroute.log", rotated=True)
        mapping = self.config.setdefault("mapping", {"source": "file"})
        if mapping.get("source") == "file":
            mapping.setdefault("file", {}).setdefault("path", str(self.mappings_path))
        self.mappings = dict(mappings or {})
        env = {k: v for k, v in os.environ.items() if not k.startswith(("STALROUTE_", "PROXY_"))}
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(source), os.environ.get("PYTHONPATH", "")) if p
        )
        self._process = ManagedProcess(
            [
                python,
                *python_args,
                "-c",
                _TWISTD,
                "-n",
                "--pidfile=",
                f"--logfile={self.log.path}",
                "stalroute",
                "--config",
                self.config_path,
            ],
            name="stalroute",
            output_path=workdir / "stalroute.out",
            cwd=source,
            env=env,
        )

    # --- files -----------------------------------------------------------------------------

    def write_mappings(self, mappings: Mapping[str, str]) -> None:
        """Replace ``mappings.tsv`` atomically (identifier TAB destination, sorted)."""
        self.mappings = dict(mappings)
        tmp = self.mappings_path.with_suffix(".tmp")
        tmp.write_text("".join(f"{k}\t{v}\n" for k, v in sorted(self.mappings.items())))
        tmp.replace(self.mappings_path)

    def listener(self, name: str) -> tuple[str, int]:
        """Address of ``[listener.<name>]`` (its first bind)."""
        return parse_address(self.config["listener"][name]["bind"][0])

    @property
    def admin_url(self) -> str:
        """Base URL of the admin API (``[admin]`` must be configured)."""
        host, port = parse_address(self.config["admin"]["bind"])
        return f"https://{host}:{port}"

    def _addresses(self) -> list[tuple[str, int]]:
        addresses = [
            parse_address(b)
            for listener in self.config.get("listener", {}).values()
            for b in listener["bind"]
        ]
        if "admin" in self.config:
            addresses.append(parse_address(self.config["admin"]["bind"]))
        return addresses

    # --- lifecycle ---------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> StalrouteProcess:
        """Write the files, start twistd, wait until every listener accepts (or stop it and
        raise :class:`~tests.harness.processes.ProcessStartError` with its log)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(dump_toml(self.config))
        self.write_mappings(self.mappings)
        try:
            self._process.start()
            self._process.wait_for_ports(self._addresses(), timeout, diagnostics=self.log_text)
        except BaseException:
            self.stop()  # the work directory stays, with the log
            raise
        return self

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM (graceful drain, ``shutdown_grace``), then SIGKILL; always reaped."""
        return self._process.stop(timeout)

    def reload(self) -> None:
        """SIGHUP: re-read the configuration (SPEC §1)."""
        os.kill(self.pid, signal.SIGHUP)

    def __enter__(self) -> StalrouteProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def running(self) -> bool:
        return self._process.running

    # --- observation -------------------------------------------------------------------

    def log_text(self, since: int = 0) -> str:
        """twistd's log (rotated parts included) from byte offset ``since``."""
        return self.log.text(since)

    def output_text(self) -> str:
        """What the process wrote to stdout/stderr (tracebacks before logging started)."""
        return self._process.output_text()

    def rss_kb(self) -> int:
        """Resident set size of the (single-worker) process, from /proc/<pid>/status."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("VmRSS missing from /proc status")
