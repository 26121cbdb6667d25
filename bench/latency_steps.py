#!/usr/bin/env python3
"""Where a one-client IMAP session's time goes, step by step: direct Dovecot and stalroute.

One Dovecot node, stalroute in front of it (compare_bench.py's configuration: PROXY v2 +
verified TLS to the node, the same RSA-2048 certificate on both), and one client that runs
sessions one after the other, alternating between the two: connect + TLS + greeting, LOGIN,
SELECT, FETCH of a header, LOGOUT, each timed. The medians per step show what the proxy adds
where. Run as root (Dovecot): ``.venv/bin/python bench/latency_steps.py [--sessions N]``.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

from bench.common import ImapConnection, issue_rsa_certificate, print_table  # noqa: E402
from bench.compare_bench import NAMES, PASSWORD, stalroute_imap_config  # noqa: E402
from tests.harness.clients import make_message  # noqa: E402
from tests.harness.dovecot import DovecotNode  # noqa: E402
from tests.harness.pki import CertificateAuthority  # noqa: E402
from tests.harness.ports import LOOPBACK  # noqa: E402
from tests.harness.stalroute import StalrouteProcess  # noqa: E402

STEPS = ("connect + TLS + greeting", "LOGIN", "SELECT INBOX", "FETCH 1 (BODY.PEEK[HEADER])",
         "LOGOUT")
USER = "bench00"


def timed_session(address: tuple[str, int], context: ssl.SSLContext) -> list[float]:
    """The milliseconds of each of :data:`STEPS`."""
    marks = [time.perf_counter()]
    connection = ImapConnection(address, context)
    try:
        marks.append(time.perf_counter())
        for command in (f'LOGIN {USER} "{PASSWORD}"'.encode(), b"SELECT INBOX",
                        b"FETCH 1 (BODY.PEEK[HEADER])"):
            connection.command(command)
            marks.append(time.perf_counter())
        connection.logout()
        marks.append(time.perf_counter())
    finally:
        connection.close()
    return [(end - begin) * 1000 for begin, end in zip(marks, marks[1:])]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=60, help="per target (10 warm-up more)")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="stalroute-latency-steps-"))
    workdir.chmod(0o755)  # Dovecot's users read their node's files under it
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, workdir, True)
        ca = CertificateAuthority(workdir / "pki")
        certificate = issue_rsa_certificate(ca, "shared-rsa", NAMES, [LOOPBACK])
        context = ssl.create_default_context(cafile=str(ca.cert_path))
        node = DovecotNode("node1", users={USER: PASSWORD}, certificate=certificate,
                           parent_dir=workdir)
        cleanup.callback(node.stop)
        node.start()
        node.seed(USER, [make_message("latency", to=USER)])
        proxy = cleanup.enter_context(StalrouteProcess(
            stalroute_imap_config(certificate, ca, [node]), workdir / "stalroute",
            mappings={USER: node.name}))
        targets = {"direct": (LOOPBACK, node.ports.imaps), "stalroute": proxy.listener("imaps")}
        times: dict[str, list[list[float]]] = {name: [] for name in targets}
        for number in range(args.sessions + 10):
            for name, address in targets.items():
                steps = timed_session(address, context)
                if number >= 10:
                    times[name].append(steps)
    medians = {name: [statistics.median(column) for column in zip(*rows)]
               for name, rows in times.items()}
    rows = [(step, *(f"{medians[name][index]:.2f}" for name in targets),
             f"{medians['stalroute'][index] - medians['direct'][index]:+.2f}")
            for index, step in enumerate(STEPS)]
    rows.append(("whole session", *(f"{sum(medians[name]):.2f}" for name in targets),
                 f"{sum(medians['stalroute']) - sum(medians['direct']):+.2f}"))
    print(f"\nmedian ms per step over {args.sessions} sessions each, one client")
    print_table(("step", *targets, "added"), rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
