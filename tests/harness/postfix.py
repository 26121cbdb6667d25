"""A private Postfix 3.7 instance (TEST-ENVIRONMENT.md §5) and a Dovecot that lends it SASL.

:class:`PostfixInstance` runs ``postfix -c DIR start-fg`` as a managed child with its own
config directory, queue and data directory (owned by ``postfix``), ``chroot = n`` for every
service and the log written to ``DIR/log/maillog`` (there is no syslog on these machines).
The default port-25 listener is removed; two listeners on free loopback ports replace it:

* ``submission``: XCLIENT from 127.0.0.0/8 (``smtpd_authorized_xclient_hosts``), STARTTLS
  offered when a certificate is given, SMTP AUTH through a Dovecot auth socket
  (``smtpd_sasl_type = dovecot``) when ``sasl_path`` is given, relaying only for
  authenticated clients;
* ``proxy``: the port-25 shape behind stalroute's pass-through, with
  ``smtpd_upstream_proxy_protocol = haproxy`` (a PROXY header is required first), relaying
  for ``mynetworks``; STARTTLS offered when a certificate is given.

Everything relays to ``relay`` (an :class:`~tests.harness.smtp_sink.SMTPSink`).
:meth:`PostfixInstance.stop` always runs ``postfix -c DIR stop`` (a ``master`` left running
would block every later start), then reaps the child.

:class:`SASLDovecotNode` is a :class:`~tests.harness.dovecot.DovecotNode` with one more
auth socket, ``<base_dir>/auth-postfix``, owned by the ``postfix`` user for Postfix's SMTP
AUTH.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests.harness.dovecot import DovecotNode
from tests.harness.logs import LogFile
from tests.harness.pki import IssuedCertificate
from tests.harness.ports import LOOPBACK, free_ports
from tests.harness.processes import ManagedProcess, session_processes

POSTFIX_BINARY = "postfix"
SYSTEM_MASTER_CF = Path("/etc/postfix/master.cf")


class SASLDovecotNode(DovecotNode):
    """A Dovecot node that also serves Postfix's SMTP AUTH (``smtpd_sasl_type = dovecot``)."""

    @property
    def auth_socket(self) -> Path:
        return self.dir / "run" / "auth-postfix"

    def render_config(self) -> str:
        return super().render_config() + f"""
# Postfix's SMTP AUTH (tests/harness/postfix.py)
service auth {{
  unix_listener {self.auth_socket} {{
    mode = 0660
    user = postfix
    group = postfix
  }}
}}
"""


class _PostfixProcess(ManagedProcess):
    """``postfix start-fg``, stopped the Postfix way.

    ``postfix-script`` runs ``master -s``, which makes a session of its own, so the generic
    stop (SIGTERM to the script, SIGKILL to the script's group) would leave ``master``
    running. This stop — also what :func:`~tests.harness.processes.reap_all` calls — runs
    ``postfix -c DIR stop``, stops the script, then makes sure every master of this config
    directory (found by its ``MAIL_CONFIG`` environment, so one that was still starting is
    found too) is gone, and reaps its daemons: they are re-parented to this (subreaper)
    process when the master exits, in a session the generic orphan reaping does not visit.
    """

    def __init__(self, binary: str, config_dir: Path, output_path: Path) -> None:
        super().__init__([binary, "-c", config_dir, "start-fg"], name="postfix",
                         output_path=output_path)
        self._binary = binary
        self._config_dir = config_dir
        self._mail_config = f"MAIL_CONFIG={config_dir}".encode()

    def masters(self) -> set[int]:
        """Live ``master`` processes of this configuration directory."""
        found = set()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if (entry / "comm").read_text().strip() != "master":
                    continue
                environ = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if self._mail_config in environ:
                found.add(int(entry.name))
        return found

    def stop(self, timeout: float = 10.0) -> int | None:
        if self._popen is None:
            return None
        masters = self.masters()
        with contextlib.suppress(Exception):
            subprocess.run([self._binary, "-c", str(self._config_dir), "stop"],
                           capture_output=True, timeout=30)
        try:
            return super().stop(timeout)
        finally:
            # "master -s" calls setsid(): its session id is its pid.
            for master in masters | self.masters():
                _end_session(master)


def _end_session(session: int, grace: float = 5.0) -> None:
    """Wait until no process of ``session`` is left, reaping those re-parented to us;
    after ``grace`` SIGTERM the session's group, 3 s later SIGKILL it."""
    me = os.getpid()
    started = time.monotonic()
    signals = [(grace, signal.SIGTERM), (grace + 3.0, signal.SIGKILL)]
    while processes := session_processes(session):
        for pid, parent in processes.items():
            if parent == me:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
        elapsed = time.monotonic() - started
        if signals and elapsed > signals[0][0]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(session, signals.pop(0)[1])
        elif not signals and elapsed > grace + 8.0:
            return  # zombies someone else must reap: give up rather than hang
        time.sleep(0.02)


@dataclass(frozen=True)
class PostfixPorts:
    submission: int
    proxy: int


class PostfixInstance:
    """One private Postfix; ``start()`` / ``stop()``, also a context manager."""

    def __init__(
        self,
        *,
        relay: tuple[str, int],
        certificate: IssuedCertificate | None = None,
        sasl_path: Path | None = None,
        hostname: str = "mx.test",
        parent_dir: Path | None = None,
        binary: str = POSTFIX_BINARY,
    ) -> None:
        self.binary = binary
        self.relay = relay
        self.certificate = certificate
        self.sasl_path = sasl_path
        self.hostname = hostname
        self.host = LOOPBACK
        self.ports = PostfixPorts(*free_ports(2))
        self.dir = Path(tempfile.mkdtemp(prefix="stalroute-postfix-", dir=parent_dir))
        self.dir.chmod(0o755)
        self.config_dir = self.dir / "etc"
        self.log_path = self.dir / "log" / "maillog"
        self.log = LogFile(self.log_path)
        self._process = _PostfixProcess(binary, self.config_dir, self.dir / "log" / "postfix.out")

    # --- configuration -----------------------------------------------------------------

    def render_main_cf(self) -> str:
        d = self.dir
        relay_host, relay_port = self.relay
        tls = ""
        if self.certificate is not None:
            tls = (f"smtpd_tls_cert_file = {self.certificate.cert_path}\n"
                   f"smtpd_tls_key_file = {self.certificate.key_path}\n")
        return f"""\
# Generated by tests/harness/postfix.py
compatibility_level = 3.6
queue_directory = {d}/spool
data_directory = {d}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = {self.hostname}
mydestination =
inet_interfaces = {self.host}
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relayhost = [{relay_host}]:{relay_port}
smtp_tls_security_level = none
smtpd_tls_security_level = none
{tls}smtpd_relay_restrictions = permit_mynetworks, permit_sasl_authenticated,
    reject_unauth_destination
smtpd_authorized_xclient_hosts =
maillog_file = {self.log_path}
maillog_file_prefixes = {d}
alias_maps =
alias_database =
biff = no
smtpd_banner = $myhostname ESMTP test Postfix
# Loopback only, no DNS: keep lookups and retries short.
smtp_host_lookup = native
disable_dns_lookups = yes
smtpd_peername_lookup = no
"""

    def _service_lines(self) -> list[str]:
        common = "inet n - n - - smtpd"
        submission = [
            "-o syslog_name=postfix/submission",
            "-o smtpd_authorized_xclient_hosts=127.0.0.0/8",
            "-o smtpd_relay_restrictions=permit_sasl_authenticated,reject",
        ]
        proxy = [
            "-o syslog_name=postfix/pp",
            "-o smtpd_upstream_proxy_protocol=haproxy",
        ]
        if self.certificate is not None:
            submission.append("-o smtpd_tls_security_level=may")
            proxy.append("-o smtpd_tls_security_level=may")
        if self.sasl_path is not None:
            submission += [
                "-o smtpd_sasl_auth_enable=yes",
                "-o smtpd_sasl_type=dovecot",
                f"-o smtpd_sasl_path={self.sasl_path}",
                "-o smtpd_tls_auth_only=no",
            ]
        return [
            f"{self.host}:{self.ports.submission}/inet={self.host}:{self.ports.submission} "
            f"{common} {' '.join(submission)}",
            f"{self.host}:{self.ports.proxy}/inet={self.host}:{self.ports.proxy} "
            f"{common} {' '.join(proxy)}",
        ]

    def _postconf(self, *arguments: str) -> None:
        postconf = str(Path(self.binary).with_name("postconf")) if "/" in self.binary \
            else "postconf"
        self._run([postconf, "-c", str(self.config_dir), *arguments])

    def _run(self, argv: list[str], timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}):\n"
                               f"{result.stdout}{result.stderr}")
        return result

    def _write_files(self) -> None:
        for sub in ("etc", "spool", "data", "log"):
            (self.dir / sub).mkdir(exist_ok=True)
        shutil.chown(self.dir / "data", "postfix", "postfix")
        shutil.copy(SYSTEM_MASTER_CF, self.config_dir / "master.cf")
        (self.config_dir / "main.cf").write_text(self.render_main_cf())
        self._postconf("-M#", "smtp/inet")
        for line in self._service_lines():
            self._postconf("-M", line)
        self._postconf("-F", "*/*/chroot = n")
        self._run([self.binary, "-c", str(self.config_dir), "check"])
        self._run([self.binary, "-c", str(self.config_dir), "set-permissions"])

    # --- lifecycle ---------------------------------------------------------------------

    def start(self, timeout: float = 20.0) -> PostfixInstance:
        """Write the configuration, start the master; return once both listeners accept."""
        try:
            self._write_files()
            self._process.start()
            self._process.wait_for_ports(
                [(self.host, self.ports.submission), (self.host, self.ports.proxy)],
                timeout, diagnostics=self.log_text)
        except BaseException:
            self.stop(keep_files=True)
            raise
        return self

    def stop(self, *, keep_files: bool = False) -> None:
        """``postfix -c DIR stop`` (always, also after a failed start), then reap the
        script, the master and its daemons."""
        self._process.stop()
        if not keep_files:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PostfixInstance:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._process.running

    # --- log -----------------------------------------------------------------------------

    def log_text(self, since: int = 0) -> str:
        return self.log.text(since) + self._process.output_text()[-2000:]

    def wait_for_log(self, pattern: str, timeout: float = 15.0, since: int = 0) -> re.Match[str]:
        return self.log.wait_for(pattern, timeout, since)

    def __repr__(self) -> str:
        return (f"<PostfixInstance submission={self.ports.submission} "
                f"proxy={self.ports.proxy} dir={self.dir}>")
