"""The Debian package (SPEC §1): build, lintian, install, run, upgrade, purge — for real.

The package is built once for this module from a copy of the work tree
(``dpkg-buildpackage -us -uc -b``, a minute or two: pip fetches the pinned dependencies from
PyPI into the bundled virtualenv), then installed on this machine with ``dpkg -i``. The tests
run in file order against that installation and the last one purges it; the module fixture
purges again at teardown, whatever failed, deletes the system user the purge keeps (unless
the package was installed before the test) and removes the build directory. A ``stalroute``
package already installed on the machine is purged first: this test owns the package while
it runs.

The installed proxy is started with the unit's own ``ExecStart`` command line (only the
configuration path swapped for a test one) as the ``stalroute`` user, with the capabilities the
unit grants (``setpriv``: ambient CAP_NET_BIND_SERVICE, no_new_privs), and must relay an IMAP
login to a real Dovecot from a privileged port, using the certificate and mapping file the
package generated. PID 1 is not systemd here, so "enabled" is checked through the
``multi-user.target.wants`` symlink, and the unit through ``systemd-analyze verify``.

Root only; ``dpkg-buildpackage``, ``dh_virtualenv``, ``lintian``, ``systemd-analyze`` and
``dovecot`` are required (``scripts/bootstrap`` installs them); under CI=true a missing one
fails.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shlex
import shutil
import socket
import ssl
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from tests.conftest import DovecotPair, require_binary, unavailable
from tests.harness import debian
from tests.harness.clients import SourceIMAP4_SSL, fetch_subject
from tests.harness.debian import CONFIG, CONFIG_DIR, UNIT, VENV, WANTS_LINK
from tests.harness.dovecot import welcome_subject
from tests.harness.pki import CertificateAuthority, IssuedCertificate, sha256_fingerprint
from tests.harness.ports import LOOPBACK, free_port
from tests.harness.processes import ManagedProcess
from tests.harness.stalroute import dovecot_destination, dump_toml, imap_proxy_config

pytestmark = pytest.mark.integration

TOKEN = CONFIG_DIR / "admin.token"
CERT = CONFIG_DIR / "tls" / "cert.pem"
KEY = CONFIG_DIR / "tls" / "key.pem"
MAPPINGS = CONFIG_DIR / "mappings.tsv"
STATE_DIR = Path("/var/lib/stalroute")
SERVICE_USER = "stalroute"
#: setpriv options that give a process what stalroute.service gives it.
UNIT_PRIVILEGES = [
    f"--reuid={SERVICE_USER}",
    f"--regid={SERVICE_USER}",
    "--init-groups",
    "--inh-caps=-all,+net_bind_service",
    "--ambient-caps=-all,+net_bind_service",
    "--bounding-set=-all,+net_bind_service",
    "--no-new-privs",
]


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built_package(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The ``.deb`` built from the current work tree. Its build directory (a copy of the
    tree and the bundled virtualenv: a few hundred MB) is removed after the module, passed
    or failed; a failed build's log tail is in the error."""
    if os.geteuid() != 0:
        unavailable("building and installing the Debian package needs root")
    for tool in ("dpkg-buildpackage", "dh_virtualenv", "dh", "git"):
        require_binary(tool)
    workdir = tmp_path_factory.mktemp("debian-build")
    try:
        yield debian.build_package(workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def installed(built_package: Path) -> Iterator[str]:
    """The package installed on this machine (dpkg's output); purged at teardown. Unless the
    package was installed before the test, the ``stalroute`` system user and group that a
    purge keeps are deleted too, so the machine is left as it was found."""
    with debian.exclusive_installation():
        was_installed = debian.installed_version() is not None
        debian.purge()
        try:
            yield debian.install(built_package)
        finally:
            debian.purge()
            if not was_installed:
                debian.remove_service_user()


def service_argv(config: Path) -> list[str]:
    """The unit's ExecStart with ``config`` in place of /etc/stalroute/stalroute.toml."""
    line = next(
        ln for ln in UNIT.read_text().splitlines() if ln.startswith("ExecStart=")
    )
    argv = shlex.split(line.removeprefix("ExecStart="))
    assert str(CONFIG) in argv, line
    return [str(config) if arg == str(CONFIG) else arg for arg in argv]


def unit_settings() -> dict[str, list[str]]:
    """``key → values`` of the installed unit (a key may repeat)."""
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def as_service_user(argv: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` as the stalroute user with the unit's privileges."""
    return debian.run(["setpriv", *UNIT_PRIVILEGES, "--", *argv], check=False, **kwargs)


def free_privileged_port(host: str = LOOPBACK) -> int:
    """A port below 1024 that nothing listens on (binding it here needs root)."""
    for port in range(700, 1000):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 700..999")


def certificate_names(path: Path) -> list[str]:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.DNSName)


def owner(path: Path) -> tuple[str, str, int]:
    st = path.stat()
    return pwd.getpwuid(st.st_uid).pw_name, grp.getgrgid(st.st_gid).gr_name, stat.S_IMODE(
        st.st_mode
    )


# --- the package file ------------------------------------------------------------------------


def test_lintian_reports_no_errors(built_package: Path) -> None:
    require_binary("lintian")
    tags = debian.lintian(built_package)
    errors = [tag for tag in tags if tag.startswith("E:")]
    assert not errors, "\n".join(tags)


def test_package_contents(built_package: Path) -> None:
    members = set(debian.deb_members(built_package))
    site = next(m for m in members if m.endswith("/site-packages/twisted/plugins/"))
    for path in (
        "./usr/bin/stalroute",
        f".{UNIT}",
        f".{CONFIG}",
        f".{VENV}/bin/twistd",
        f".{VENV}/bin/stalroute",
        f"{site}stalroute_plugin.py",
        "./usr/share/doc/stalroute/README.Debian",
        "./usr/share/man/man1/stalroute.1.gz",
    ):
        assert path in members, path
    # Generated per host by postinst, never shipped (they would be overwritten on upgrade).
    for path in (TOKEN, CERT, KEY, MAPPINGS):
        assert f".{path}" not in members
    assert not [m for m in members if "__pycache__" in m or m.endswith("dropin.cache")]
    conffiles = debian.run(["dpkg-deb", "--info", str(built_package), "conffiles"]).stdout
    assert conffiles.split() == [str(CONFIG)]
    fields = debian.run(["dpkg-deb", "--field", str(built_package)]).stdout
    assert re.search(r"^Depends:.*\badduser\b.*\bopenssl\b", fields, re.M), fields


# --- installed -------------------------------------------------------------------------------


def test_install_creates_user_configuration_and_enabled_unit(installed: str) -> None:
    assert debian.installed_version() is not None, installed
    user = pwd.getpwnam(SERVICE_USER)
    assert user.pw_uid < 1000, "a system user"
    assert user.pw_dir == str(STATE_DIR)
    assert user.pw_shell in ("/usr/sbin/nologin", "/bin/false")
    assert grp.getgrgid(user.pw_gid).gr_name == SERVICE_USER

    assert owner(CONFIG_DIR) == ("root", SERVICE_USER, 0o770)
    assert owner(CONFIG_DIR / "tls") == ("root", SERVICE_USER, 0o750)
    assert owner(TOKEN) == (SERVICE_USER, SERVICE_USER, 0o600)
    assert owner(KEY) == (SERVICE_USER, SERVICE_USER, 0o600)
    assert owner(MAPPINGS)[:2] == (SERVICE_USER, SERVICE_USER)
    assert owner(STATE_DIR)[:2] == (SERVICE_USER, SERVICE_USER)
    assert re.fullmatch(r"[A-Za-z0-9]{48}", TOKEN.read_text()), "48 random characters"

    hostname = debian.run(["hostname", "-f"], check=False).stdout.strip()
    if hostname:
        assert certificate_names(CERT) == [hostname]
    config = CONFIG.read_text()
    assert config.count("\n#") > 10, "a commented starting configuration"
    assert 'bearer_token_file = "/etc/stalroute/admin.token"' in config

    # stalroute on PATH, pointing into the private virtualenv.
    command = shutil.which("stalroute", path=debian.STANDARD_PATH)
    assert command is not None
    assert Path(command).resolve() == (VENV / "bin" / "stalroute").resolve()

    # Enabled (the wants symlink deb-systemd-helper makes) but not started.
    assert WANTS_LINK.is_symlink() and WANTS_LINK.resolve() == UNIT.resolve()
    running = debian.run(["pgrep", "-u", SERVICE_USER], check=False)
    assert running.returncode == 1, f"something runs as {SERVICE_USER}: {running.stdout}"


def test_unit_settings(installed: str) -> None:
    settings = unit_settings()
    for key, value in {
        "User": SERVICE_USER,
        "AmbientCapabilities": "CAP_NET_BIND_SERVICE",
        "CapabilityBoundingSet": "CAP_NET_BIND_SERVICE",
        "LimitNOFILE": "65536",
        "Restart": "on-failure",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "Environment": f"STALROUTE_CONFIG={CONFIG}",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ReadWritePaths": str(CONFIG_DIR),
        "WantedBy": "multi-user.target",
    }.items():
        assert value in settings.get(key, []), (key, settings.get(key))
    argv = service_argv(Path("/x.toml"))
    assert argv[0] == str(VENV / "bin" / "twistd")
    assert {"--nodaemon", "--pidfile=", "--logfile=-", "stalroute"} <= set(argv)


def test_systemd_analyze_verifies_unit(installed: str) -> None:
    tool = require_binary("systemd-analyze")
    result = debian.run([tool, "verify", str(UNIT)], check=False, cwd=Path("/"))
    assert result.returncode == 0, result.stdout
    assert "stalroute.service" not in result.stdout, result.stdout


def test_twistd_of_the_venv_lists_the_plugin(installed: str) -> None:
    result = debian.run([str(VENV / "bin" / "twistd"), "--help"])
    assert re.search(r"^\s+stalroute\s", result.stdout, re.M), result.stdout


def test_default_configuration_passes_check(installed: str) -> None:
    result = debian.run(["stalroute", "check", str(CONFIG)], check=False)
    assert result.returncode == 0, result.stdout
    assert re.search(rf"^OK: {re.escape(str(CONFIG))}", result.stdout, re.M), result.stdout
    # The service user can read everything the configuration names (token, key, mappings).
    result = as_service_user(["/usr/bin/stalroute", "check", str(CONFIG)], cwd=STATE_DIR)
    assert result.returncode == 0, result.stdout


def test_service_user_can_rewrite_mappings(installed: str) -> None:
    """The admin API's file-store write (temp file + rename in /etc/stalroute) works for the
    service user; the result is a valid table for the default configuration."""
    script = (
        "from pathlib import Path; from stalroute.mapping.file import write_atomically; "
        f"write_atomically(Path('{MAPPINGS}'), {{'alice': 'new'}})"
    )
    result = as_service_user([str(VENV / "bin" / "python"), "-I", "-c", script], cwd=STATE_DIR)
    assert result.returncode == 0, result.stdout
    assert MAPPINGS.read_text() == "alice\tnew\n"
    assert owner(MAPPINGS)[:2] == (SERVICE_USER, SERVICE_USER)
    assert not [p for p in CONFIG_DIR.iterdir() if p.name.startswith(".")], "temp file left"
    result = debian.run(["stalroute", "check", str(CONFIG)], check=False)
    assert result.returncode == 0, result.stdout


def test_installed_proxy_relays_imap_as_service_user(
    installed: str,
    pki: CertificateAuthority,
    dovecot_pair: DovecotPair,
    users: dict[str, str],
) -> None:
    """The unit's command line, as the stalroute user with the unit's capabilities, bound to
    a privileged port, serving the generated certificate, in front of real Dovecot nodes, routing
    with the installed mappings.tsv (alice → "new" since the test above; bob unmapped)."""
    node1, node2 = dovecot_pair
    workdir = Path(tempfile.mkdtemp(prefix="stalroute-deb-"))
    try:
        workdir.chmod(0o755)  # the service user reads the test config and CA from here
        ca_file = workdir / "ca.pem"
        shutil.copyfile(pki.cert_path, ca_file)
        ca_file.chmod(0o644)
        generated = IssuedCertificate("installed", CERT, KEY, sha256_fingerprint(CERT))
        config = imap_proxy_config(
            generated,
            {
                "node1": dovecot_destination(node1, tls="implicit", ca_file=ca_file),
                "new": dovecot_destination(node2, tls="implicit", ca_file=ca_file),
            },
            default="node1",
        )
        port = free_privileged_port()
        config["server"]["shutdown_grace"] = "1s"
        config["listener"]["imaps"]["bind"] = [f"{LOOPBACK}:{port}"]
        config["listener"]["imap"]["bind"] = [f"{LOOPBACK}:{free_port()}"]
        config["mapping"]["file"] = {"path": str(MAPPINGS)}
        config_path = workdir / "stalroute.toml"
        config_path.write_text(dump_toml(config))
        config_path.chmod(0o644)

        env = debian.clean_env(STALROUTE_CONFIG=str(config_path))
        proxy = ManagedProcess(
            ["setpriv", *UNIT_PRIVILEGES, "--", *service_argv(config_path)],
            name="installed stalroute",
            output_path=workdir / "stalroute.out",
            cwd=STATE_DIR,
            env=env,
        )
        with proxy:
            proxy.wait_for_ports([(LOOPBACK, port)], 30, diagnostics=proxy.output_text)
            status = Path(f"/proc/{proxy.pid}/status").read_text()
            uid = re.search(r"^Uid:\s+(\d+)", status, re.M)
            assert uid and int(uid.group(1)) == pwd.getpwnam(SERVICE_USER).pw_uid, status

            context = ssl.create_default_context(cafile=str(CERT))
            name = certificate_names(CERT)[0]
            for user, node in (("alice", "node2"), ("bob", "node1")):
                with SourceIMAP4_SSL(
                    LOOPBACK, port, ssl_context=context, server_hostname=name
                ) as client:
                    client.login(user, users[user])
                    assert fetch_subject(client) == welcome_subject(node, user)
                    client.logout()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# --- upgrade and purge (these change the installation: keep them last) ------------------------


def test_upgrade_keeps_edited_configuration_token_and_certificate(
    installed: str, built_package: Path, tmp_path: Path
) -> None:
    generated = {path: path.read_bytes() for path in (TOKEN, CERT, KEY, MAPPINGS)}
    original = CONFIG.read_text()
    assert 'backend_timeout = "10s"' in original
    edited = original.replace('backend_timeout = "10s"', 'backend_timeout = "12s"')
    edited += "# edited by test_debian\n"
    CONFIG.write_text(edited)

    # The same package again over the edit, then a newer version whose conffile changed too.
    debian.install(built_package)
    assert CONFIG.read_text() == edited
    newer = debian.repack_as_upgrade(
        built_package, tmp_path, conffile_addition="# new in the upgrade\n"
    )
    output = debian.install(newer)
    assert debian.installed_version().endswith("+upgradetest1"), output
    assert CONFIG.read_text() == edited, output
    dist = CONFIG.with_name("stalroute.toml.dpkg-dist")
    assert dist.read_text().endswith("# new in the upgrade\n"), "dpkg kept the new one aside"

    for path, content in generated.items():
        assert path.read_bytes() == content, f"{path} changed on upgrade"
    assert owner(CONFIG_DIR) == ("root", SERVICE_USER, 0o770)
    assert owner(TOKEN) == (SERVICE_USER, SERVICE_USER, 0o600)
    result = debian.run(["stalroute", "check", str(CONFIG)], check=False)
    assert result.returncode == 0, result.stdout


def test_purge_removes_configuration(installed: str) -> None:
    output = debian.purge()
    assert debian.package_state() == "not-installed", output
    for path in (CONFIG_DIR, STATE_DIR, VENV.parent, WANTS_LINK, UNIT, Path("/usr/bin/stalroute")):
        assert not os.path.lexists(path), f"{path} left after purge:\n{output}"
    overrides = debian.run(["dpkg-statoverride", "--list"], check=False).stdout
    assert str(CONFIG_DIR) not in overrides
    # Debian practice: the system user stays (files it owns may remain elsewhere).
    pwd.getpwnam(SERVICE_USER)
