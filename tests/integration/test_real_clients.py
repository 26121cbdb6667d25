"""Real third-party mail clients through stalroute in front of a real Dovecot (issue 11).

One module-scoped set of servers: an SMTP sink, one Dovecot node whose submission service
relays to the sink, and one stalroute with implicit-TLS and STARTTLS listeners for IMAP,
POP3 and submission; every protocol reaches the node over PROXY v2 + implicit TLS. The node
is private to this module, so clients may read (and flag) mail without disturbing the shared
Dovecot pair.

Clients: mbsync (isync) syncs INBOX into a Maildir; fetchmail fetches over POP3 and IMAP into
an MDA that appends to a file; getmail6 retrieves over POP3 SSL into a Maildir; msmtp sends
through the submission listeners and the sink receives the message from the node; imtest and
pop3test (cyrus-clients) log in and log out. Each runs under a timeout with a private HOME
and working directory inside the test's ``tmp_path``; all but imtest and pop3test (which
have no option for a CA file and only print what they cannot verify) check stalroute's
certificate against the test CA. A missing client skips, or fails under ``CI=true``
(``unavailable``). The getmail test also writes to a ``nobody``-owned Maildir in a temp
directory of its own (getmail will not deliver as root), removed afterwards.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import pytest

from tests.conftest import require_binary, unavailable
from tests.harness.clients import make_message
from tests.harness.dovecot import DovecotNode
from tests.harness.pki import CertificateAuthority, IssuedCertificate
from tests.harness.protocol_configs import (
    listeners,
    proxy_config,
    running_nodes,
    running_sink,
    running_stalroute,
    wait_for_login_log,
)
from tests.harness.smtp_sink import SMTPSink
from tests.harness.stalroute import StalrouteProcess, dovecot_destination

pytestmark = pytest.mark.integration

#: Where Debian's cyrus-clients puts imtest and pop3test (not on PATH).
CYRUS_BIN = "/usr/lib/cyrus/bin"
#: The name clients connect to: in the certificate of stalroute's listeners.
HOST = "localhost"
#: Every client run is bounded by this many seconds.
CLIENT_TIMEOUT = 30
RECIPIENT = "someone@example.net"


class Servers(NamedTuple):
    sink: SMTPSink
    node: DovecotNode
    proxy: StalrouteProcess
    ca: Path


@pytest.fixture(scope="module")
def servers(
    tmp_path_factory: pytest.TempPathFactory,
    pki: CertificateAuthority,
    proxy_certificate: IssuedCertificate,
    users: dict[str, str],
) -> Iterator[Servers]:
    dovecot = require_binary("dovecot")
    if os.geteuid() != 0:
        unavailable("the Dovecot fixtures must run as root")
    with (
        running_sink(tmp_path_factory.mktemp("sink")) as sink,
        running_nodes(pki, users, ("node1",), relay=sink.address, binary=dovecot) as (node,),
    ):
        destination = dovecot_destination(
            node, tls="implicit", protocols=("imap", "pop3", "submission"), ca_file=pki.cert_path
        )
        config = proxy_config(
            proxy_certificate,
            {"node1": destination},
            default="node1",
            listener_tables=listeners(
                "imaps", "imap", "pop3s", "pop3", "submissions", "submission"
            ),
            backend_timeout="5s",
        )
        workdir = tmp_path_factory.mktemp("stalroute-real-clients")
        with running_stalroute(config, workdir) as proxy:
            yield Servers(sink, node, proxy, pki.cert_path)


# --- helpers ---------------------------------------------------------------------------------


def cyrus_binary(name: str) -> str:
    """imtest / pop3test: Debian installs them under :data:`CYRUS_BIN`."""
    path = shutil.which(name) or shutil.which(name, path=CYRUS_BIN)
    if path is None:
        unavailable(f"{name} is not installed (cyrus-clients; scripts/bootstrap installs it)")
    return path


def run_client(
    argv: Sequence[str | Path], home: Path, *, stdin: bytes = b""
) -> subprocess.CompletedProcess[str]:
    """Run a client to completion with ``home`` as HOME and working directory (nothing it
    writes lands outside the test's temp dir), under :data:`CLIENT_TIMEOUT`."""
    home.mkdir(parents=True, exist_ok=True)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "LC_ALL": "C",
           "TMPDIR": str(home)}
    result = subprocess.run(
        [str(arg) for arg in argv], input=stdin.decode(), capture_output=True, text=True,
        timeout=CLIENT_TIMEOUT, cwd=home, env=env,
    )
    print(f"$ {' '.join(map(str, argv))}\n--- stdout ---\n{result.stdout[-4000:]}"
          f"\n--- stderr ---\n{result.stderr[-4000:]}")
    return result


def private_file(path: Path, text: str) -> Path:
    """Write a client's configuration, readable by its owner only (fetchmail, msmtp and
    getmail refuse or warn about credentials others can read)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o600)
    return path


def seed(servers: Servers, user: str, what: str, count: int = 2) -> list[str]:
    """Append ``count`` messages with fresh subjects to ``user``'s INBOX on the node."""
    subjects = [f"{what} {index} {uuid.uuid4().hex[:12]}" for index in range(count)]
    servers.node.seed(user, [make_message(subject, to=f"{user}@example.org")
                             for subject in subjects])
    return subjects


def maildir_text(maildir: Path) -> str:
    """Every message file under ``maildir`` (cur and new, any folder), concatenated."""
    files = [p for p in maildir.rglob("*") if p.is_file() and p.parent.name in ("cur", "new")]
    return "".join(p.read_text(errors="replace") for p in files)


def assert_subjects(text: str, subjects: list[str]) -> None:
    for subject in subjects:
        assert f"Subject: {subject}" in text, (subject, text[-2000:])


# --- mbsync (isync) ------------------------------------------------------------------------


@pytest.mark.parametrize(("listener", "ssl_type"), [("imaps", "IMAPS"), ("imap", "STARTTLS")])
def test_mbsync_syncs_inbox_into_a_maildir(
    servers: Servers, users: dict[str, str], tmp_path: Path, listener: str, ssl_type: str
) -> None:
    mbsync = require_binary("mbsync")
    subjects = seed(servers, "alice", f"mbsync {ssl_type}")
    _, port = servers.proxy.listener(listener)
    maildir = tmp_path / "mail"
    maildir.mkdir()
    rc = private_file(tmp_path / "home" / ".mbsyncrc", f"""\
IMAPAccount proxy
Host {HOST}
Port {port}
User alice
Pass "{users['alice']}"
SSLType {ssl_type}
SSLVersions TLSv1.2 TLSv1.3
CertificateFile {servers.ca}
AuthMechs LOGIN
Timeout 20

IMAPStore remote
Account proxy

MaildirStore local
Path {maildir}/
Inbox {maildir}/INBOX

Channel inbox
Far :remote:
Near :local:
Patterns INBOX
Create Near
Sync Pull
SyncState *
""")
    since = servers.node.log.size()
    result = run_client([mbsync, "-V", "-c", rc, "inbox"], tmp_path / "home")
    assert result.returncode == 0, result.stdout + result.stderr
    assert_subjects(maildir_text(maildir / "INBOX"), subjects)
    wait_for_login_log(servers.node, "imap", "alice", "127.0.0.1", since)


# --- fetchmail -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("protocol", "listener", "tls_options"),
    [
        ("POP3", "pop3s", "ssl"),
        ("POP3", "pop3", "sslproto 'TLS1.2+'"),
        ("IMAP", "imaps", "ssl"),
        ("IMAP", "imap", "sslproto 'TLS1.2+'"),
    ],
    ids=["pop3s", "pop3-stls", "imaps", "imap-starttls"],
)
def test_fetchmail_fetches_into_an_mda(
    servers: Servers,
    users: dict[str, str],
    tmp_path: Path,
    protocol: str,
    listener: str,
    tls_options: str,
) -> None:
    """``keep`` leaves the mail on the server; ``fetchall`` fetches what earlier runs saw.
    Without ``ssl``, ``sslproto`` makes fetchmail insist on STARTTLS/STLS (and stalroute
    refuses a cleartext login anyway)."""
    fetchmail = require_binary("fetchmail")
    subjects = seed(servers, "bob", f"fetchmail {listener}")
    _, port = servers.proxy.listener(listener)
    home = tmp_path / "home"
    delivered = tmp_path / "delivered.mbox"
    rc = private_file(home / ".fetchmailrc", f"""\
set no bouncemail
set no spambounce
poll {HOST} protocol {protocol} port {port} timeout 20
    user "bob" there with password "{users['bob']}" is "{os.environ.get('USER', 'root')}" here
    options keep fetchall {tls_options} sslcertck sslcertfile "{servers.ca}"
    mda "/bin/sh -c 'cat >> {delivered}'"
""")
    result = run_client(
        [fetchmail, "--nodetach", "--nosyslog", "--verbose", "--fetchmailrc", rc,
         "--idfile", home / ".fetchids", "--pidfile", home / "fetchmail.pid"],
        home,
    )
    assert result.returncode == 0, result.stdout + result.stderr  # 0: mail was fetched
    assert_subjects(delivered.read_text(errors="replace"), subjects)


# --- getmail6 ------------------------------------------------------------------------------


def test_getmail_retrieves_over_pop3_ssl_into_a_maildir(
    servers: Servers, users: dict[str, str], tmp_path: Path
) -> None:
    """getmail refuses to deliver as root, so its Maildir belongs to ``nobody`` (``user``),
    in a directory of its own that ``nobody`` can reach (pytest's base temp dir is 0700)."""
    getmail = require_binary("getmail")
    subjects = seed(servers, "carol", "getmail")
    _, port = servers.proxy.listener("pop3s")
    top = Path(tempfile.mkdtemp(prefix="stalroute-getmail-"))
    try:
        top.chmod(0o755)
        maildir = top / "Maildir"
        nobody = pwd.getpwnam("nobody")
        for path in (maildir, *(maildir / sub for sub in ("cur", "new", "tmp"))):
            path.mkdir()
            os.chown(path, nobody.pw_uid, nobody.pw_gid)
        getmaildir = tmp_path / "home" / ".getmail"
        private_file(getmaildir / "getmailrc", f"""\
[retriever]
type = SimplePOP3SSLRetriever
server = {HOST}
port = {port}
username = carol
password = {users['carol']}
ca_certs = {servers.ca}
timeout = 20

[destination]
type = Maildir
path = {maildir}/
user = nobody

[options]
delete = false
read_all = true
verbose = 2
""")
        result = run_client(
            [getmail, "--getmaildir", getmaildir, "--rcfile", "getmailrc"], tmp_path / "home"
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert_subjects(maildir_text(maildir), subjects)
    finally:
        shutil.rmtree(top, ignore_errors=True)


# --- msmtp ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("listener", "starttls"), [("submission", "on"), ("submissions", "off")])
def test_msmtp_sends_through_submission(
    servers: Servers, users: dict[str, str], tmp_path: Path, listener: str, starttls: str
) -> None:
    msmtp = require_binary("msmtp")
    _, port = servers.proxy.listener(listener)
    home = tmp_path / "home"
    rc = private_file(home / ".msmtprc", f"""\
defaults
timeout 20

account proxy
host {HOST}
port {port}
tls on
tls_starttls {starttls}
tls_trust_file {servers.ca}
auth plain
user dave
password {users['dave']}
from dave@example.org
domain client.example

account default : proxy
""")
    subject = f"msmtp {listener} {uuid.uuid4().hex[:12]}"
    message = make_message(subject, sender="dave@example.org", to=RECIPIENT)
    result = run_client(
        [msmtp, "--file", rc, "--account", "proxy", "--read-envelope-from", RECIPIENT],
        home,
        stdin=message,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    received = servers.sink.wait_for_subject(subject).received()[0]
    assert "by node1.test" in received and "with ESMTPSA " in received, received


# --- imtest / pop3test (cyrus-clients) --------------------------------------------------------


@pytest.mark.parametrize(
    ("tool", "listener", "tls_flag", "mechanism", "logout", "ok"),
    [
        ("imtest", "imaps", ["-s"], "login", b"z LOGOUT\r\n", "z OK"),
        ("imtest", "imap", ["-t", ""], "login", b"z LOGOUT\r\n", "z OK"),
        ("pop3test", "pop3s", ["-s"], "user", b"QUIT\r\n", "+OK"),
        ("pop3test", "pop3", ["-t", ""], "user", b"QUIT\r\n", "+OK"),
    ],
    ids=["imtest-imaps", "imtest-starttls", "pop3test-pop3s", "pop3test-stls"],
)
def test_cyrus_test_clients_log_in(
    servers: Servers,
    users: dict[str, str],
    tmp_path: Path,
    tool: str,
    listener: str,
    tls_flag: list[str],
    mechanism: str,
    logout: bytes,
    ok: str,
) -> None:
    binary = cyrus_binary(tool)
    _, port = servers.proxy.listener(listener)
    home = tmp_path / "home"
    script = home / "commands"
    home.mkdir()
    script.write_bytes(logout)
    result = run_client(
        [binary, "-a", "erin", "-w", users["erin"], "-m", mechanism, "-p", str(port),
         *tls_flag, "-f", script, HOST],
        home,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Authenticated." in output, output
    assert ok in output.split("Authenticated.", 1)[1], output
