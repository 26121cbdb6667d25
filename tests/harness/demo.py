"""``python -m tests.harness.demo`` (run by ``scripts/demo``): stalroute in front of two
mail nodes, every protocol it serves, in a temp dir, until Ctrl-C. Prints what to try.

Each node is a Dovecot (IMAP, POP3, submission, ManageSieve, and LMTP for delivery) plus an
nginx standing in for its HTTP side (JMAP, WebDAV). Dovecot's submission service relays to
one Postfix, which delivers ``alice@demo.test`` to node1 and ``bob@demo.test`` to node2 over
LMTP, so a message submitted through stalroute can be read back through stalroute.

The ``[capabilities.*]`` lists are what these Dovecot 2.3 nodes accept
(:data:`DOVECOT_CAPABILITIES`); ``tests/integration/test_demo.py`` compares what stalroute
announces with what the nodes announce, and runs every printed command. :func:`running_demo`
starts the whole set for that test too.
"""

from __future__ import annotations

import argparse
import contextlib
import secrets
import shlex
import signal
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.harness.clients import make_message
from tests.harness.dovecot import welcome_subject
from tests.harness.nginx import NginxNode
from tests.harness.pki import CertificateAuthority
from tests.harness.ports import LOOPBACK, free_port
from tests.harness.postfix import PostfixInstance, SASLDovecotNode
from tests.harness.protocol_configs import listener, listeners, proxy_config
from tests.harness.stalroute import StalrouteProcess, admin_section, dovecot_destination

DOMAIN = "demo.test"
USERS = {"alice": "alice-demo-pw", "bob": "bob-demo-pw"}
#: stalroute's mapping table at start; everyone else goes to node1, the default.
MAPPINGS = {"bob": "node2"}
#: Where Postfix delivers each user's mail (its own table, fixed for the demo's lifetime).
MAILBOX_NODES = {"alice": "node1", "bob": "node2"}
#: What the ManageSieve step uploads (not activated: delivery stays as it is).
SIEVE_SCRIPT = '''require "fileinto";
if header :contains "subject" "[list]" {
  fileinto "Lists";
}
'''

#: ``[capabilities.*]`` matching what the demo's Dovecot 2.3 nodes offer before login. The
#: defaults would also promise IMAP4rev2, UTF8=ACCEPT, SMTPUTF8, OAUTHBEARER and XOAUTH2,
#: which these nodes do not accept (Dovecot's own extras, such as LOGIN-REFERRALS or BURL,
#: are simply not announced).
DOVECOT_CAPABILITIES: dict[str, dict[str, Any]] = {
    "imap": {
        "sasl": ["PLAIN", "LOGIN"],
        "advertise": ["IMAP4rev1", "SASL-IR", "LITERAL+", "ID", "ENABLE", "IDLE"],
    },
    "pop3": {"sasl": ["PLAIN", "LOGIN"]},
    "submission": {
        "sasl": ["PLAIN", "LOGIN"],
        "ehlo": ["8BITMIME", "CHUNKING", "ENHANCEDSTATUSCODES", "PIPELINING", "SIZE"],
    },
    "managesieve": {
        "sasl": ["PLAIN", "LOGIN"],
        "sieve": (
            "fileinto reject envelope encoded-character vacation subaddress "
            "comparator-i;ascii-numeric relational regex imap4flags copy include variables "
            "body enotify environment mailbox date index ihave duplicate mime foreverypart "
            "extracttext"
        ).split(),
    },
}


# --- servers ---------------------------------------------------------------------------------


class DeliveringPostfix(PostfixInstance):
    """The nodes' submission relay. Dovecot's relay client sends ``XCLIENT LOGIN=<user>``
    (``submission_relay_trusted``), which counts as authenticated because SASL is enabled
    (``sasl_path``); ``routes`` (address → (host, LMTP port)) are delivered over LMTP, other
    addresses of :data:`DOMAIN` are refused at RCPT, other domains bounced."""

    def __init__(self, *, routes: Mapping[str, tuple[str, int]], **kwargs: Any) -> None:
        super().__init__(relay=(LOOPBACK, free_port()), **kwargs)
        self.routes = dict(routes)

    def render_main_cf(self) -> str:
        table = ", ".join(
            f"{{{address} = lmtp:inet:{host}:{port}}}"
            for address, (host, port) in self.routes.items()
        )
        return super().render_main_cf() + f"""
# Delivery over LMTP to the demo's Dovecot nodes (tests/harness/demo.py)
relay_domains = {DOMAIN}
transport_maps = inline:{{ {table} }}
relay_recipient_maps = inline:{{ {table} }}
default_transport = error:only {DOMAIN} is delivered in this demo
"""


@dataclass
class Demo:
    """Everything :func:`running_demo` started."""

    ca: CertificateAuthority
    nodes: list[SASLDovecotNode]
    web: list[NginxNode]
    postfix: DeliveringPostfix
    proxy: StalrouteProcess
    token: str | None
    sieve_script: Path


def demo_config(ca: CertificateAuthority, nodes: list[SASLDovecotNode],
                web: list[NginxNode]) -> dict[str, Any]:
    """stalroute's configuration: every listener kind on free loopback ports, node1 (the
    default; TLS legs) and node2 (STARTTLS legs), each with a PROXY v2 header, and HTTP
    routed by the login in the Authorization header."""
    certificate = ca.issue("stalroute", ["localhost", "stalroute.test"], ["127.0.0.1"])
    destinations = {}
    for node, site, tls in zip(nodes, web, ("implicit", "starttls")):
        destination = dovecot_destination(
            node, tls=tls, protocols=("imap", "pop3", "submission"), ca_file=ca.cert_path
        )
        destination["protocol"]["managesieve"] = {"port": node.ports.sieve_haproxy,
                                                  "tls": "starttls"}
        # nginx's proxy_protocol listener on loopback: cleartext, which must be allowed.
        destination["protocol"]["http"] = {"port": site.pp_port, "tls": "plain"}
        destination["allow_plaintext_auth"] = True
        destinations[node.name] = destination
    tables = listeners("imaps", "imap", "pop3s", "pop3", "submissions", "submission", "sieve")
    tables["https"] = listener("http", "implicit")
    config = proxy_config(certificate, destinations, default="node1", listener_tables=tables)
    config["mapping"].update(positive_ttl="5s", negative_ttl="5s")
    config["capabilities"] = DOVECOT_CAPABILITIES
    config["http"] = {
        "route": [{"match": "/**", "extract": {"from": "authorization"}, "fallback": "default"}]
    }
    return config


@contextlib.contextmanager
def running_demo(workdir: Path, *, admin: bool = True) -> Iterator[Demo]:
    """Start the demo's servers in ``workdir``; stop every one of them on exit."""
    with contextlib.ExitStack() as stack:
        ca = CertificateAuthority(workdir / "pki")
        nodes = []
        for name in ("node1", "node2"):
            certificate = ca.issue(name, [f"{name}.test", "localhost"], ["127.0.0.1"])
            nodes.append(SASLDovecotNode(name, users=USERS, certificate=certificate, lmtp=True))
            stack.callback(nodes[-1].stop)
        by_name = {node.name: node for node in nodes}
        postfix = DeliveringPostfix(
            routes={f"{user}@{DOMAIN}": (LOOPBACK, by_name[node].ports.lmtp)
                    for user, node in MAILBOX_NODES.items()},
            sasl_path=nodes[0].auth_socket,
        )
        stack.callback(postfix.stop)
        for node in nodes:
            node.relay = (postfix.host, postfix.ports.submission)
            node.start()
            for user in USERS:
                node.seed(user, [make_message(welcome_subject(node.name, user), to=user)])
        postfix.start()  # after node1: its smtpd needs node1's SASL socket from the start
        web = []
        for name in ("node1", "node2"):
            web.append(NginxNode(name))
            stack.callback(web[-1].stop)
            web[-1].start()
        config = demo_config(ca, nodes, web)
        token = secrets.token_urlsafe(36) if admin else None
        if token is not None:
            config["admin"] = admin_section(token)
        proxy = StalrouteProcess(config, workdir / "stalroute", mappings=MAPPINGS)
        stack.callback(proxy.stop)
        proxy.start()
        sieve_script = workdir / "lists.sieve"
        sieve_script.write_text(SIEVE_SCRIPT)
        yield Demo(ca, nodes, web, postfix, proxy, token, sieve_script)


# --- what to try -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """Commands to paste, run in order from the repository; the last one's output contains
    ``shows`` (``eventually``: after a moment, e.g. once Postfix has delivered)."""

    title: str
    commands: tuple[str, ...]
    shows: str
    eventually: bool = False


def steps(demo: Demo) -> list[Step]:
    """What :func:`instructions` prints, one step per protocol, then a user's move."""
    proxy = demo.proxy
    host = LOOPBACK
    port = {name: proxy.listener(name)[1] for name in proxy.config["listener"]}
    curl = f"curl -sS --cacert {shlex.quote(str(demo.ca.cert_path))}"
    login = {user: f"--user {user}:{password}" for user, password in USERS.items()}
    tsv = shlex.quote(str(proxy.mappings_path))

    def sieve(action: str) -> str:
        return (f"echo {USERS['alice']} | sieve-connect --server {host} --port {port['sieve']} "
                f"--tlscafile {shlex.quote(str(demo.ca.cert_path))} --user alice "
                f"--passwordfd 0 {action}")

    message = (r"'From: bob@demo.test\r\nTo: alice@demo.test\r\nSubject: hello from bob\r\n"
               r"\r\nHi Alice!\r\n'")
    result = [
        Step("Validate the demo's configuration the way startup does",
             (f".venv/bin/stalroute check {shlex.quote(str(proxy.config_path))}",), "OK:"),
        Step("IMAP: read the first message of alice's INBOX (it names the node it is on)",
             (f"{curl} {login['alice']} 'imaps://{host}:{port['imaps']}/INBOX;MAILINDEX=1'",),
             "node1 welcome for alice"),
        Step("IMAP with STARTTLS: bob is mapped to node2",
             (f"{curl} --ssl-reqd {login['bob']} "
              f"'imap://{host}:{port['imap']}/INBOX;MAILINDEX=1'",),
             "node2 welcome for bob"),
        Step("POP3: bob's first message",
             (f"{curl} {login['bob']} pop3s://{host}:{port['pop3s']}/1",),
             "node2 welcome for bob"),
        Step("Submission (STARTTLS): bob writes to alice; node2's Dovecot relays to Postfix, "
             "which delivers to alice's INBOX on node1 over LMTP; a moment later, read it back",
             (f"printf {message} | {curl} --ssl-reqd {login['bob']} "
              f"--mail-from bob@{DOMAIN} --mail-rcpt alice@{DOMAIN} -T - "
              f"smtp://{host}:{port['submission']}",
              f"{curl} {login['alice']} 'imaps://{host}:{port['imaps']}/INBOX;MAILINDEX=2'"),
             "Subject: hello from bob", eventually=True),
        Step("ManageSieve (STARTTLS): upload a Sieve script for alice, then list her scripts",
             (sieve(f"--upload --localsieve {shlex.quote(str(demo.sieve_script))}"),
              sieve("--list")),
             demo.sieve_script.name),
        Step("HTTP: stalroute's own readiness endpoint, then a request routed by its "
             "Basic-auth login (nginx stands in for JMAP or WebDAV: it says which node it is, "
             "and checks no password)",
             (f"{curl} https://{host}:{port['https']}/healthz/ready",
              f"{curl} {login['bob']} https://{host}:{port['https']}/jmap/session"),
             "node=node2"),
        Step("Move alice to node2: edit the mapping table, reload (SIGHUP); her next login "
             "lands there",
             (f"printf 'alice\\tnode2\\nbob\\tnode2\\n' > {tsv}",
              f"kill -HUP {proxy.pid}",
              f"{curl} {login['alice']} 'imaps://{host}:{port['imaps']}/INBOX;MAILINDEX=1'"),
             "node2 welcome for alice", eventually=True),
    ]
    if demo.token is not None:
        auth = f"-H 'Authorization: Bearer {demo.token}'"
        result.append(Step(
            "Admin API: move alice back to node1, end her live sessions; the same API with "
            "stalroute's command-line client",
            (f"{curl} {auth} -X PUT "
             f"'{proxy.admin_url}/mappings?identifier=alice&destination=node1'",
             f"{curl} {auth} -X POST '{proxy.admin_url}/connections/kick?identifier=alice'",
             f".venv/bin/stalroute ctl --config {shlex.quote(str(proxy.config_path))} "
             f"--cacert {shlex.quote(str(demo.ca.cert_path))} mappings get alice"),
            "node1"))
    return result


_PROTOCOLS = {"imap": "IMAP", "pop3": "POP3", "submission": "submission",
              "managesieve": "ManageSieve", "http": "HTTP"}
_TLS = {"implicit": "TLS", "starttls": "STARTTLS", "plain": "plain"}


def instructions(demo: Demo) -> str:
    """The banner: where everything is, then :func:`steps`."""
    proxy = demo.proxy
    lines = ["", "stalroute demo is running (Ctrl-C stops everything).", ""]
    for protocol, title in _PROTOCOLS.items():
        served = [f"{name} {':'.join(map(str, proxy.listener(name)))} ({_TLS[table['tls']]})"
                  for name, table in proxy.config["listener"].items()
                  if table["protocol"] == protocol]
        lines.append(f"  {title:<12}{'   '.join(served)}")
    delivery = ", ".join(f"{user}@{DOMAIN} to {node}" for user, node in MAILBOX_NODES.items())
    lines += [
        "",
        "  nodes:    node1 (the default) and node2, each a Dovecot 2.3 (IMAP, POP3, submission,",
        "            ManageSieve) and an nginx (HTTP); [capabilities.*] lists what they accept",
        f"  mail:     Dovecot relays to Postfix, which delivers {delivery} (LMTP)",
        f"  users:    {', '.join(f'{u} / {p}' for u, p in USERS.items())}",
        f"  routing:  {proxy.mappings_path}: bob to node2; alice is unmapped, so node1",
        f"  config:   {proxy.config_path}",
        f"  log:      {proxy.log.path}",
        f"  trust:    {demo.ca.cert_path} (the demo's CA)",
        "",
        "stalroute's own commands are in .venv/bin (or run `. .venv/bin/activate` first).",
    ]
    for step in steps(demo):
        lines += ["", f"{step.title}:"] + [f"  {command}" for command in step.commands]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/demo", description=__doc__)
    parser.add_argument("--no-admin", action="store_true", help="do not enable the admin API")
    args = parser.parse_args(argv)
    # Ctrl-C, and SIGTERM too, even when started in the background: stop and clean up.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        with tempfile.TemporaryDirectory(prefix="stalroute-demo-") as workdir, \
                running_demo(Path(workdir), admin=not args.no_admin) as demo:
            print(instructions(demo), flush=True)
            while demo.proxy.running:
                time.sleep(0.5)
            print(f"stalroute exited; log tail:\n{demo.proxy.log_text()[-3000:]}",
                  file=sys.stderr)
            return 1
    except KeyboardInterrupt:
        print("\nstopping…", file=sys.stderr)
        return 0


if __name__ == "__main__":
    sys.exit(main())
