"""``scripts/demo`` (tests/harness/demo.py): every command it prints works, and stalroute
advertises nothing the demo's Dovecot nodes do not accept.

The demo's servers are started by the same :func:`~tests.harness.demo.running_demo` the script
uses; the printed commands are run as printed (``bash -c``, from the repository, in order:
the later steps move alice). Root only (Dovecot, Postfix); curl and sieve-connect are the
clients, as for a visitor.
"""

from __future__ import annotations

import os
import poplib
import re
import smtplib
import ssl
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.conftest import require_binary, unavailable
from tests.harness.clients import RawIMAP
from tests.harness.demo import DOVECOT_CAPABILITIES, Demo, instructions, running_demo, steps
from tests.harness.protocol_configs import ManageSieveClient
from tests.harness.stalroute import REPO_ROOT

pytestmark = pytest.mark.integration

#: How long an "eventually" step (Postfix delivering, a reload) may take to show its result.
SETTLE_SECONDS = 20


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    if os.geteuid() != 0:
        unavailable("the demo's Dovecot and Postfix must run as root")
    for binary in ("dovecot", "postfix", "nginx", "curl", "sieve-connect"):
        require_binary(binary)
    with running_demo(tmp_path_factory.mktemp("demo")) as started:
        yield started
        print(f"--- stalroute log (tail) ---\n{started.proxy.log_text()[-4000:]}")


def run(command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-c", command], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=60)


def test_every_printed_command_works(demo: Demo) -> None:
    printed = instructions(demo)
    for step in steps(demo):
        for command in step.commands:
            assert f"  {command}\n" in printed, command
            result = run(command)
            if command == step.commands[-1] and step.eventually:
                deadline = time.monotonic() + SETTLE_SECONDS
                while (result.returncode or step.shows not in result.stdout) \
                        and time.monotonic() < deadline:
                    time.sleep(0.5)
                    result = run(command)
            assert result.returncode == 0, (step.title, command, result.stdout, result.stderr)
        assert step.shows in result.stdout, (step.title, result.stdout, result.stderr)


# --- capabilities: stalroute's (through its listeners) against the nodes' (directly) ----------


def imap_capabilities(raw: RawIMAP) -> set[str]:
    line = next(ln for ln in raw.command(b"c1", b"CAPABILITY") if ln.startswith(b"* CAPABILITY"))
    return set(line.decode().split()[2:])


def pop3_capabilities(client: poplib.POP3) -> dict[str, list[str]]:
    capabilities = client.capa()
    client.quit()
    return capabilities


def ehlo_keywords(client: smtplib.SMTP) -> dict[str, str]:
    client.ehlo("client.example")
    keywords = {name.upper(): value for name, value in client.esmtp_features.items()}
    client.quit()
    return keywords


def sieve_capabilities(client: ManageSieveClient) -> dict[str, set[str]]:
    with client:
        return {name: set(value.split()) for name, value in client.capabilities.items()}


def words(values: dict[str, str] | dict[str, list[str]], key: str) -> set[str]:
    value = values.get(key, "")
    return set(value.split() if isinstance(value, str) else value)


def test_stalroute_advertises_only_what_the_nodes_offer(demo: Demo) -> None:
    context = ssl.create_default_context(cafile=str(demo.ca.cert_path))
    host = demo.proxy.listener("imaps")[0]
    port = {name: demo.proxy.listener(name)[1] for name in demo.proxy.config["listener"]}

    with RawIMAP.connect(host, port["imaps"], ssl_context=context) as raw:
        imap = imap_capabilities(raw)
    pop3 = pop3_capabilities(poplib.POP3_SSL(host, port["pop3s"], context=context))
    submission = ehlo_keywords(smtplib.SMTP_SSL(host, port["submissions"], context=context))
    sieve_client = ManageSieveClient.connect(host, port["sieve"])
    sieve_client.starttls(context)
    sieve = sieve_capabilities(sieve_client)

    for node in demo.nodes:
        with RawIMAP.connect(node.host, node.ports.imap) as raw:
            node_imap = imap_capabilities(raw)
        stalroute_own = {c for c in imap if c.startswith(("AUTH=", "STARTTLS", "LOGINDISABLED"))}
        assert imap - stalroute_own <= node_imap, (node.name, imap, node_imap)
        assert {c for c in imap if c.startswith("AUTH=")} <= node_imap, node.name
        assert "IMAP4rev2" not in imap

        node_pop3 = pop3_capabilities(poplib.POP3(node.host, node.ports.pop3))
        assert set(pop3) - {"STLS", "USER"} <= set(node_pop3), (node.name, pop3)
        assert words(pop3, "SASL") <= words(node_pop3, "SASL")

        node_submission = ehlo_keywords(smtplib.SMTP(node.host, node.ports.submission))
        assert set(submission) - {"STARTTLS", "AUTH"} <= set(node_submission), node.name
        assert words(submission, "AUTH") <= words(node_submission, "AUTH")
        assert "SMTPUTF8" not in submission

        node_sieve = sieve_capabilities(ManageSieveClient.connect(node.host, node.ports.sieve))
        for name in ("SIEVE", "SASL", "NOTIFY"):
            assert sieve.get(name, set()) <= node_sieve.get(name, set()), (node.name, name)

    # The configured lists are exactly what the nodes offer (minus what is left out on
    # purpose), so nothing they accept goes unadvertised by mistake either.
    assert sieve["SIEVE"] == set(DOVECOT_CAPABILITIES["managesieve"]["sieve"])
    for mechanism in ("PLAIN", "LOGIN"):
        assert f"AUTH={mechanism}" in imap
    assert not re.search(r"OAUTHBEARER|XOAUTH2", " ".join(imap | words(submission, "AUTH")))
