"""``python -m tests.harness.demo`` (run by ``scripts/demo``): two Dovecot nodes and stalroute
in front of them, in a temp dir, until Ctrl-C. Prints what to try."""

from __future__ import annotations

import argparse
import contextlib
import secrets
import shlex
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

from tests.harness.dovecot import start_seeded_nodes
from tests.harness.pki import CertificateAuthority
from tests.harness.stalroute import StalrouteProcess, admin_section, two_node_imap_config

USERS = {"alice": "alice-demo-pw", "bob": "bob-demo-pw"}
MAPPINGS = {"bob": "node2"}


def _stop_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def instructions(proxy: StalrouteProcess, ca: CertificateAuthority, token: str | None) -> str:
    """The commands a visitor can paste."""
    host, imaps = proxy.listener("imaps")
    _, imap = proxy.listener("imap")
    cacert = shlex.quote(str(ca.cert_path))
    tsv = shlex.quote(str(proxy.mappings_path))
    lines = [
        "",
        "stalroute demo is running (Ctrl-C stops everything).",
        f"  imaps (implicit TLS) {host}:{imaps}    imap (STARTTLS) {host}:{imap}",
        f"  users: {', '.join(f'{u}/{p}' for u, p in USERS.items())}",
        f"  routing: {tsv} maps bob -> node2; alice is unmapped -> node1 (default)",
        f"  config: {proxy.config_path}   log: {proxy.log.path}",
        "",
        "List and read mail with curl (each INBOX says which node it lives on):",
        f"  curl --cacert {cacert} --user alice:{USERS['alice']} imaps://{host}:{imaps}/",
        f"  curl --cacert {cacert} --user bob:{USERS['bob']} "
        f"'imaps://{host}:{imaps}/INBOX;MAILINDEX=1'",
        "",
        "With Python's imaplib:",
        f'  python3 -c \'import imaplib, ssl; m = imaplib.IMAP4_SSL("{host}", {imaps}, '
        f'ssl_context=ssl.create_default_context(cafile="{ca.cert_path}")); '
        f'm.login("alice", "{USERS["alice"]}"); m.select(); '
        'print(m.fetch("1", "(BODY[HEADER.FIELDS (SUBJECT)])")[1][0][1].decode())\'',
        "",
        "Move alice to node2 (her next login lands there):",
        f"  printf 'alice\\tnode2\\nbob\\tnode2\\n' > {tsv}",
        f"  kill -HUP {proxy.pid}        # reload",
    ]
    if token is not None:
        auth = f"-H 'Authorization: Bearer {token}'"
        lines += [
            "  # or through the admin API: remap, then end her live sessions on node1",
            f"  curl --cacert {cacert} {auth} -X PUT "
            f"'{proxy.admin_url}/mappings?identifier=alice&destination=node2'",
            f"  curl --cacert {cacert} {auth} -X POST "
            f"'{proxy.admin_url}/connections/kick?identifier=alice'",
            "  # the same with the command-line client:",
            f"  STALROUTE_ADMIN_TOKEN={token} .venv/bin/stalroute ctl --url {proxy.admin_url} "
            f"--cacert {cacert} stats",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/demo", description=__doc__)
    parser.add_argument("--no-admin", action="store_true", help="do not enable the admin API")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started in background
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    workdir = Path(tempfile.mkdtemp(prefix="stalroute-demo-"))
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, workdir, True)
        try:
            ca = CertificateAuthority(workdir / "pki")
            nodes = start_seeded_nodes(ca, USERS)
            for node in nodes:
                cleanup.callback(node.stop)
            certificate = ca.issue("stalroute", ["localhost", "stalroute.test"], ["127.0.0.1"])
            config = two_node_imap_config(certificate, ca.cert_path, *nodes)
            config["mapping"].update(positive_ttl="5s", negative_ttl="5s")
            token = None if args.no_admin else secrets.token_urlsafe(36)
            if token is not None:
                config["admin"] = admin_section(token)
            proxy = StalrouteProcess(config, workdir / "stalroute", mappings=MAPPINGS)
            cleanup.callback(proxy.stop)
            proxy.start()
            print(instructions(proxy, ca, token), flush=True)
            while proxy.running:
                time.sleep(0.5)
            print(f"stalroute exited; log tail:\n{proxy.log_text()[-3000:]}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("\nstopping…", file=sys.stderr)
            return 0


if __name__ == "__main__":
    sys.exit(main())
