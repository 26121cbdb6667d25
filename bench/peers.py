"""The peers of ``compare_bench.py`` (HAProxy, nginx mail) and a Dovecot node roomy enough for
its idle-session phase, each started on random loopback ports in a temp directory and always
reaped (the harness's :class:`ManagedProcess`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

from bench.http_bench import USER as HTTP_USER  # noqa: E402
from bench.workers_bench import process_tree, processes  # noqa: E402
from tests.harness.dovecot import DovecotNode  # noqa: E402
from tests.harness.nginx import NginxNode  # noqa: E402
from tests.harness.pki import IssuedCertificate  # noqa: E402
from tests.harness.ports import LOOPBACK, free_port  # noqa: E402
from tests.harness.processes import ManagedProcess  # noqa: E402

NGINX_MAIL_MODULE = Path("/usr/lib/nginx/modules/ngx_mail_module.so")


class RoomyDovecotNode(DovecotNode):
    """A harness node with room for ``--idle`` sessions (Dovecot runs one ``imap`` process per
    session; the harness allows 500 processes per service)."""

    def __init__(self, *args: Any, process_limit: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.process_limit = process_limit

    def render_config(self) -> str:
        config = super().render_config()
        if "default_process_limit = 500" not in config:
            raise RuntimeError("the harness's Dovecot process limit changed: update compare_bench")
        return config.replace("default_process_limit = 500",
                              f"default_process_limit = {max(500, self.process_limit)}")


def dovecot_sessions(nodes: list[DovecotNode]) -> int:
    """Live ``imap`` processes of the nodes: one per logged-in session."""
    snapshot = processes()
    return sum(snapshot[pid].comm == "imap" for node in nodes
               for pid in process_tree(node.pid, snapshot=snapshot))


def start_server(name: str, directory: Path, config: str, argv: list[str], check: list[str],
                 ports: list[int]) -> ManagedProcess:
    """HAProxy or nginx from ``config`` (checked first): a managed, reaped child."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "server.conf").write_text(config)
    checked = subprocess.run(check, capture_output=True, text=True, timeout=30)
    if checked.returncode != 0:
        raise RuntimeError(f"{name} rejected its config: {checked.stdout}{checked.stderr}")
    return launch(name, directory, argv, ports)


def launch(name: str, directory: Path, argv: list[str], ports: list[int]) -> ManagedProcess:
    """A managed, reaped child, once it listens on ``ports``."""
    process = ManagedProcess(argv, name=name, output_path=directory / "output.log").start()
    try:
        process.wait_for_ports([(LOOPBACK, port) for port in ports], 15.0)
    except BaseException:
        process.stop()
        raise
    return process


def start_haproxy(directory: Path, certificate: IssuedCertificate, ca_file: Path,
                  nodes: list[DovecotNode], nginx: NginxNode) -> tuple[ManagedProcess, int, int]:
    """HAProxy with an IMAP (``mode tcp``) and an HTTP (``mode http``) frontend; returns it and
    the two ports."""
    directory.mkdir(parents=True, exist_ok=True)
    bundle, users_map = directory / "crt.pem", directory / "users.map"
    bundle.write_bytes(certificate.cert_path.read_bytes() + certificate.key_path.read_bytes())
    users_map.write_text(f"{HTTP_USER} nginx\n")
    imap_port, http_port = free_port(), free_port()
    servers = "\n".join(
        f"  server {node.name} {LOOPBACK}:{node.ports.imaps_haproxy} send-proxy-v2-ssl ssl "
        f"verify required ca-file {ca_file} verifyhost {node.hostname} sni str({node.hostname})"
        for node in nodes)
    config = f"""\
global
  maxconn 5000
  nbthread 1
defaults
  timeout connect 5s
  timeout client 10m
  timeout server 10m
frontend imaps
  mode tcp
  bind {LOOPBACK}:{imap_port} ssl crt {bundle}
  default_backend dovecot
backend dovecot
  mode tcp
  balance roundrobin
{servers}
frontend web
  mode http
  bind {LOOPBACK}:{http_port}
  use_backend %[http_auth_user,map({users_map},nginx)]
backend nginx
  mode http
  option forwardfor
  http-request add-header Forwarded for=%[src]
  server nginx {LOOPBACK}:{nginx.pp_port} send-proxy-v2
"""
    path = directory / "server.conf"
    server = start_server("haproxy", directory, config, ["haproxy", "-db", "-f", str(path)],
                              ["haproxy", "-c", "-q", "-f", str(path)], [imap_port, http_port])
    return server, imap_port, http_port


def start_floor_proxy(directory: Path, certificate: IssuedCertificate, ca_file: Path,
                      nodes: list[DovecotNode]) -> tuple[ManagedProcess, int]:
    """``bench/floor_proxy.py`` before the nodes (round robin, as HAProxy); it and its port."""
    port = free_port()
    backends = [f"{LOOPBACK}:{node.ports.imaps_haproxy}:{node.hostname}" for node in nodes]
    argv = [sys.executable, str(Path(__file__).with_name("floor_proxy.py")), str(port),
            str(certificate.cert_path), str(certificate.key_path), str(ca_file), *backends]
    return launch("floor proxy", directory, argv, [port]), port


def start_nginx_mail(directory: Path, certificate: IssuedCertificate,
                     routes: dict[str, DovecotNode]) -> tuple[ManagedProcess, int]:
    """nginx's mail proxy (IMAP over implicit TLS), ``auth_http`` answered by its own ``http``
    block from a map account → node; returns it and the IMAP port."""
    imap_port, auth_port = free_port(), free_port()
    ports = "\n".join(f"    {user} {node.ports.imap_haproxy};" for user, node in routes.items())
    user = "user root root;\n" if os.geteuid() == 0 else ""
    d = directory
    config = f"""\
load_module {NGINX_MAIL_MODULE};
{user}worker_processes 1;
worker_rlimit_nofile 20000;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 10000; }}
http {{
  access_log off;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  map $http_auth_user $account_port {{
{ports}
  }}
  server {{
    listen {LOOPBACK}:{auth_port};
    location = /auth {{
      add_header Auth-Status OK;
      add_header Auth-Server {LOOPBACK};
      add_header Auth-Port $account_port;
      return 204;
    }}
  }}
}}
mail {{
  server_name stalroute.test;
  auth_http {LOOPBACK}:{auth_port}/auth;
  proxy_pass_error_message on;
  ssl_certificate {certificate.cert_path};
  ssl_certificate_key {certificate.key_path};
  ssl_protocols TLSv1.2 TLSv1.3;  # nginx 1.22's mail default stops at TLS 1.2
  server {{
    listen {LOOPBACK}:{imap_port} ssl;
    protocol imap;
    proxy_protocol on;
  }}
}}
"""
    path = d / "server.conf"
    argv = ["nginx", "-p", str(d), "-c", str(path), "-e", str(d / "error.log")]
    server = start_server("nginx mail", d, config, [*argv, "-g", "daemon off;"],
                              [*argv, "-t", "-q"], [imap_port, auth_port])
    return server, imap_port
