#!/usr/bin/env python3
"""POP3 and submission login rates: stalroute versus direct Dovecot, measured in the same run.

Starts, with the test harness, an SMTP sink, one private Dovecot node (its submission service
relays to the sink) and stalroute in front of it with ``pop3s`` and ``submissions`` listeners
(backend legs in the production shape: PROXY v2 header, then implicit TLS verified against the
test CA). Then, for both targets with the same client:

* POP3 logins/s: sessions of TLS connect, ``USER``/``PASS``, ``STAT``, ``QUIT``;
* submission logins/s: sessions of TLS connect, ``EHLO``, ``AUTH PLAIN``, ``NOOP``, ``QUIT``,

each spread over ``--concurrency`` client threads and bounded by ``--sessions`` and
``--max-seconds``. The table shows the rates, the p95 session latency and the ratio
stalroute/direct. Run as root (Dovecot)::

    .venv/bin/python bench/protocols_bench.py [--sessions 300 --concurrency 4 --max-seconds 30]

As with ``imap_bench.py``, absolute numbers depend on the machine (client, Dovecot and
stalroute share its cores); through stalroute every login costs two TLS handshakes, a second
TCP connection and the mapping lookup, so expect ratios below 1.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import smtplib
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

from bench.common import (  # noqa: E402
    COMPARISON, LoginResult, Target, measure_logins, note, print_table, ratio,
)
from tests.harness.clients import make_message  # noqa: E402
from tests.harness.dovecot import DovecotNode  # noqa: E402
from tests.harness.pki import CertificateAuthority  # noqa: E402
from tests.harness.protocol_configs import (  # noqa: E402
    SourcePOP3_SSL,
    listeners,
    node_destination,
    proxy_config,
)
from tests.harness.smtp_sink import SMTPSink  # noqa: E402
from tests.harness.stalroute import StalrouteProcess  # noqa: E402

USER, PASSWORD = "bench", "bench-Pw-27182"


def pop3_session(target: Target, ca: CertificateAuthority) -> None:
    """TLS connect, USER/PASS, STAT, QUIT."""
    client = SourcePOP3_SSL(target.host, target.port, context=ca.client_context(),
                            server_hostname=target.server_hostname, timeout=60)
    try:
        client.user(USER)
        client.pass_(PASSWORD)
        client.stat()
    finally:
        client.quit()


class _SMTPS(smtplib.SMTP_SSL):
    """``SMTP_SSL`` verifying ``server_hostname`` rather than the address connected to."""

    def __init__(self, target: Target, ca: CertificateAuthority) -> None:
        self._server_hostname = target.server_hostname
        super().__init__(target.host, target.port, local_hostname="bench.example",
                         context=ca.client_context(), timeout=60)

    def _get_socket(self, host, port, timeout):
        sock = smtplib.SMTP._get_socket(self, host, port, timeout)
        return self.context.wrap_socket(sock, server_hostname=self._server_hostname)


def submission_session(target: Target, ca: CertificateAuthority) -> None:
    """TLS connect, EHLO, AUTH PLAIN, NOOP, QUIT."""
    client = _SMTPS(target, ca)
    try:
        client.ehlo()
        client.user, client.password = USER, PASSWORD
        client.auth("PLAIN", client.auth_plain)
        client.noop()
    finally:
        client.quit()


def run(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="stalroute-bench-"))
    results: dict[str, dict[str, LoginResult]] = {}
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, workdir, True)
        ca = CertificateAuthority(workdir / "pki")
        sink = SMTPSink(workdir / "sink")
        cleanup.callback(sink.stop)
        sink.start()
        node = DovecotNode("node1", users={USER: PASSWORD}, relay=sink.address,
                           certificate=ca.issue("node1", ["node1.test"], ["127.0.0.1"]))
        cleanup.callback(node.stop)
        node.start()
        node.seed(USER, [make_message("bench message", to=USER)])  # something for STAT
        certificate = ca.issue("stalroute", ["localhost"], ["127.0.0.1"])
        destination = node_destination(node, "pop3", tls="implicit", ca_file=ca.cert_path)
        destination["protocol"].update(
            node_destination(node, "submission", tls="implicit", ca_file=ca.cert_path)["protocol"])
        config = proxy_config(certificate, {"node1": destination}, default="node1",
                              listener_tables=listeners("pop3s", "submissions"),
                              log_level="warn")
        proxy = StalrouteProcess(config, workdir / "stalroute")
        cleanup.callback(proxy.stop)
        proxy.start()

        plans = {
            "pop3": (pop3_session,
                     Target("direct", node.host, node.ports.pop3s, node.hostname),
                     Target("stalroute", *proxy.listener("pop3s"), "localhost")),
            "submission": (submission_session,
                           Target("direct", node.host, node.ports.submissions, node.hostname),
                           Target("stalroute", *proxy.listener("submissions"), "localhost")),
        }
        for protocol, (session, *targets) in plans.items():
            results[protocol] = {}
            for target in targets:
                note(f"{protocol} {target.name}: {args.sessions} sessions over "
                     f"{args.concurrency} clients")
                session(target, ca)  # warm-up (and fail early if the path is broken)
                results[protocol][target.name] = measure_logins(
                    session, target, ca, args.sessions, args.concurrency, args.max_seconds)

    rows = []
    for protocol, label in (("pop3", "POP3 logins/s (TLS+USER/PASS+STAT+QUIT)"),
                            ("submission", "submission logins/s (TLS+EHLO+AUTH PLAIN+QUIT)")):
        d, s = results[protocol]["direct"], results[protocol]["stalroute"]
        rows += [
            (label, f"{d.per_second:.1f}", f"{s.per_second:.1f}",
             ratio(s.per_second, d.per_second)),
            (f"{protocol} session p95 latency, ms", f"{d.p95_ms:.1f}", f"{s.p95_ms:.1f}",
             ratio(s.p95_ms, d.p95_ms)),
            (f"{protocol} sessions completed (errors)", f"{d.sessions} ({d.errors})",
             f"{s.sessions} ({s.errors})", ""),
        ]
    print_table(COMPARISON, rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=300, help="sessions per target")
    parser.add_argument("--concurrency", type=int, default=4, help="concurrent clients")
    parser.add_argument("--max-seconds", type=float, default=30.0,
                        help="time limit of each phase")
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
