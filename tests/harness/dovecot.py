"""A private Dovecot 2.3 instance on random loopback ports (``DovecotNode``).

Configuration follows the working recipe of TEST-ENVIRONMENT.md §3: a standalone master
(``dovecot -c CONF -F``) with its own ``instance_name``, ``base_dir``, ``state_dir`` and log,
users from a passwd-file (``{PLAIN}``), maildir homes owned by ``nobody``. Every protocol has
a plain listener, most an implicit-TLS one, and each of those a ``haproxy = yes`` twin that
expects a PROXY header from 127.0.0.0/8 first (stalroute's backend legs). With ``lmtp=True`` a
node also delivers over LMTP (``dovecot-lmtpd``): a plain listener, whose clients from
127.0.0.0/8 may announce the real client with XCLIENT, and its ``haproxy = yes`` twin.

Must run as root (the master drops to ``dovenull``/``nobody``). The node's directory is made
with ``mkdtemp`` and opened to 0755 so those users can reach it; it is removed on ``stop()``.
"""

from __future__ import annotations

import dataclasses
import grp
import imaplib
import os
import pwd
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from tests.harness.clients import SourceIMAP4, make_message
from tests.harness.logs import LogFile
from tests.harness.pki import CertificateAuthority, IssuedCertificate
from tests.harness.ports import LOOPBACK, free_port, free_ports
from tests.harness.processes import ManagedProcess

DOVECOT_BINARY = "dovecot"


@dataclass(frozen=True)
class DovecotPorts:
    """Listener ports of one node. ``*_haproxy`` listeners require a PROXY header first."""

    imap: int
    imaps: int
    imap_haproxy: int
    imaps_haproxy: int
    pop3: int
    pop3s: int
    pop3_haproxy: int
    pop3s_haproxy: int
    sieve: int
    sieve_haproxy: int
    submission: int
    submissions: int
    submission_haproxy: int
    submissions_haproxy: int
    #: Listened on only by a node started with ``lmtp=True``.
    lmtp: int
    lmtp_haproxy: int

    @classmethod
    def allocate(cls) -> DovecotPorts:
        return cls(*free_ports(len(dataclasses.fields(cls))))


# login service → its listeners as (listener name, implicit TLS, PROXY header)
_SERVICES: dict[str, tuple[tuple[str, bool, bool], ...]] = {
    "imap-login": (
        ("imap", False, False),
        ("imaps", True, False),
        ("imap_haproxy", False, True),
        ("imaps_haproxy", True, True),
    ),
    "pop3-login": (
        ("pop3", False, False),
        ("pop3s", True, False),
        ("pop3_haproxy", False, True),
        ("pop3s_haproxy", True, True),
    ),
    "managesieve-login": (("sieve", False, False), ("sieve_haproxy", False, True)),
    "submission-login": (
        ("submission", False, False),
        ("submissions", True, False),
        ("submission_haproxy", False, True),
        ("submissions_haproxy", True, True),
    ),
}
#: The LMTP service's listeners, besides its unix socket (same shape as :data:`_SERVICES`).
_LMTP_LISTENERS = (("lmtp", False, False), ("lmtp_haproxy", False, True))


def _listener_blocks(ports: DovecotPorts) -> str:
    blocks = []
    for service, listeners in _SERVICES.items():
        inner = []
        for name, tls, haproxy in listeners:
            options = [f"port = {getattr(ports, name)}"]
            if tls:
                options.append("ssl = yes")
            if haproxy:
                options.append("haproxy = yes")
            inner.append(_inet_listener(name, options))
        # Performance mode (one login process serves many clients) keeps logins cheap.
        blocks.append(
            f"service {service} {{\n  service_count = 0\n  process_min_avail = 1\n"
            + "\n".join(inner)
            + "\n}"
        )
    return "\n".join(blocks)


def _inet_listener(name: str, options: list[str]) -> str:
    body = "\n".join(f"    {o}" for o in options)
    return f"  inet_listener {name} {{\n{body}\n  }}"


def _lmtp_listener_blocks(ports: DovecotPorts) -> str:
    return "\n".join(
        _inet_listener(name, [f"port = {getattr(ports, name)}"]
                       + (["haproxy = yes"] if haproxy else []))
        for name, _, haproxy in _LMTP_LISTENERS
    )


class DovecotNode:
    """One private Dovecot node. ``start()`` / ``stop()``; also a context manager.

    ``users`` maps login → password (same login names on every node is the migration case).
    ``relay`` is the SMTP server Dovecot's submission service relays to (host, port); by
    default a closed port, enough for everything but sending mail. ``binary`` is the
    ``dovecot`` executable. ``lmtp`` adds the LMTP service's TCP listeners (recipients are
    the local part of ``RCPT TO``: ``alice@anything`` is delivered to ``alice``).
    """

    def __init__(
        self,
        name: str,
        *,
        users: Mapping[str, str],
        certificate: IssuedCertificate,
        relay: tuple[str, int] | None = None,
        parent_dir: Path | None = None,
        binary: str = DOVECOT_BINARY,
        lmtp: bool = False,
    ) -> None:
        self.name = name
        self.lmtp = lmtp
        self.hostname = f"{name}.test"
        self.users = dict(users)
        self.certificate = certificate
        self.relay = relay or (LOOPBACK, free_port())
        self.host = LOOPBACK
        self.ports = DovecotPorts.allocate()
        self.dir = Path(tempfile.mkdtemp(prefix=f"stalroute-{name}-", dir=parent_dir))
        self.dir.chmod(0o755)
        self.config_path = self.dir / "dovecot.conf"
        self.log_path = self.dir / "log" / "dovecot.log"
        self.log = LogFile(self.log_path)
        self.instance_name = self.dir.name
        self._process = ManagedProcess(
            [binary, "-c", self.config_path, "-F"],
            name=f"dovecot {name}",
            output_path=self.dir / "log" / "dovecot.out",
        )

    # --- configuration -----------------------------------------------------------------

    def _write_files(self) -> None:
        for sub in ("run", "state", "log", "home"):
            (self.dir / sub).mkdir(exist_ok=True)
        home = self.dir / "home"
        os.chown(home, pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid)
        users = self.dir / "users"
        for login, password in self.users.items():
            if ":" in login + password or "\n" in login + password:
                raise ValueError(f"unusable passwd-file entry for {login!r}")
        users.write_text("".join(f"{u}:{{PLAIN}}{p}\n" for u, p in self.users.items()))
        self.config_path.write_text(self.render_config())

    def render_config(self) -> str:
        """The ``dovecot.conf`` of this node (Dovecot 2.3 syntax)."""
        d = self.dir
        relay_host, relay_port = self.relay
        protocols = "imap pop3 submission sieve" + (" lmtp" if self.lmtp else "")
        lmtp_listeners = _lmtp_listener_blocks(self.ports) if self.lmtp else ""
        return f"""\
# Generated by tests/harness/dovecot.py for node {self.name}
instance_name = {self.instance_name}
base_dir = {d}/run
state_dir = {d}/state
listen = {self.host}
protocols = {protocols}
hostname = {self.hostname}

log_path = {self.log_path}
info_log_path = {self.log_path}
debug_log_path = {self.log_path}
auth_verbose = yes
verbose_proctitle = yes

ssl = yes
ssl_cert = <{self.certificate.cert_path}
ssl_key = <{self.certificate.key_path}
ssl_dh = </usr/share/dovecot/dh.pem

disable_plaintext_auth = no
auth_mechanisms = plain login
auth_failure_delay = 0

passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {d}/users
}}
userdb {{
  driver = static
  args = uid=nobody gid=nogroup home={d}/home/%u
}}
mail_location = maildir:~/Maildir

# PROXY headers are honoured on haproxy = yes listeners, only from these networks.
haproxy_trusted_networks = 127.0.0.0/8
# IMAP ID x-originating-ip and XCLIENT (login services and LMTP) are accepted from these.
login_trusted_networks = 127.0.0.0/8

# Room for benchmarks: many sessions of one user from one address.
default_process_limit = 500
default_client_limit = 4000
mail_max_userip_connections = 1000

{_listener_blocks(self.ports)}

submission_relay_host = {relay_host}
submission_relay_port = {relay_port}
submission_relay_trusted = yes
submission_relay_ssl = no

# No auth penalty (a growing delay after failed logins from one IP): tests fail on purpose.
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
service lmtp {{
  unix_listener lmtp {{
    mode = 0600
  }}
{lmtp_listeners}
}}
protocol lmtp {{
  # The local part names the account (the passwd-file has no domains).
  auth_username_format = %Ln
}}
plugin {{
  sieve = file:~/sieve;active=~/.dovecot.sieve
}}
"""

    # --- lifecycle ---------------------------------------------------------------------

    def start(self, timeout: float = 15.0) -> DovecotNode:
        """Write the config and start the master; return once every listener accepts."""
        self._write_files()
        addresses = [(self.host, port) for port in self.listening_ports()]
        try:
            self._process.start()
            self._process.wait_for_ports(addresses, timeout, diagnostics=self.log_text)
        except BaseException:
            self.stop()
            raise
        return self

    def listening_ports(self) -> list[int]:
        """The ports this node listens on (the LMTP ones only with ``lmtp=True``)."""
        lmtp = {name for name, _, _ in _LMTP_LISTENERS}
        return [getattr(self.ports, field.name) for field in dataclasses.fields(self.ports)
                if self.lmtp or field.name not in lmtp]

    def stop(self, *, keep_files: bool = False) -> None:
        """Stop the master (and reap its workers); remove the node directory."""
        self._process.stop()
        if not keep_files:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> DovecotNode:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        return self._process.pid

    # --- log -----------------------------------------------------------------------------

    def log_text(self, since: int = 0) -> str:
        """The Dovecot log from byte offset ``since`` (see ``log.size()``)."""
        return self.log.text(since)

    def wait_for_log(self, pattern: str, timeout: float = 10.0, since: int = 0) -> re.Match[str]:
        """Wait until the regex ``pattern`` appears in the log after offset ``since``."""
        return self.log.wait_for(pattern, timeout, since)

    # --- mail ------------------------------------------------------------------------------

    def imap(self, user: str) -> SourceIMAP4:
        """A logged-in ``imaplib`` session on the plain listener (loopback counts as secure)."""
        client = SourceIMAP4(self.host, self.ports.imap)
        try:
            client.login(user, self.users[user])
        except BaseException:
            client.shutdown()
            raise
        return client

    def seed(self, user: str, messages: Iterable[bytes], mailbox: str = "INBOX") -> None:
        """APPEND ``messages`` to ``user``'s ``mailbox`` (created when missing) directly."""
        client = self.imap(user)
        try:
            if mailbox.upper() != "INBOX":
                client.create(mailbox)  # "already exists" is a harmless NO
            for message in messages:
                status, data = client.append(mailbox, None, None, message)
                if status != "OK":
                    raise imaplib.IMAP4.error(f"APPEND to {self.name}/{user} failed: {data!r}")
        finally:
            client.logout()

    def __repr__(self) -> str:
        return f"<DovecotNode {self.name} imap={self.ports.imap} dir={self.dir}>"


def welcome_subject(node: str, user: str) -> str:
    """Subject of the message :func:`start_seeded_nodes` puts in each user's INBOX."""
    return f"{node} welcome for {user}"


def start_seeded_nodes(
    ca: CertificateAuthority,
    users: Mapping[str, str],
    names: Iterable[str] = ("node1", "node2"),
    *,
    binary: str = DOVECOT_BINARY,
) -> list[DovecotNode]:
    """Start one node per name (certificate for ``<name>.test``, ``localhost`` and
    127.0.0.1), each user's INBOX seeded with :func:`welcome_subject`, so every node's
    mailboxes are recognisable. The caller stops them; on error, none is left running."""
    nodes: list[DovecotNode] = []
    try:
        for name in names:
            certificate = ca.issue(name, [f"{name}.test", "localhost"], ["127.0.0.1"])
            node = DovecotNode(name, users=users, certificate=certificate, binary=binary)
            nodes.append(node)
            node.start()
            for user in users:
                node.seed(user, [make_message(welcome_subject(name, user), to=user)])
    except BaseException:
        for node in nodes:
            node.stop()
        raise
    return nodes
