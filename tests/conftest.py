"""Shared fixtures: the test CA, two seeded Dovecot nodes, and the stalroute factory.

Servers are real (no mocks), on random loopback ports, in per-run temp directories, and
always stopped and reaped. A missing server binary skips a test with the reason, except
under ``CI=true``, where it fails: CI must never pass by skipping.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

import pytest

from tests.harness.dovecot import DovecotNode, start_seeded_nodes
from tests.harness.pki import CertificateAuthority, IssuedCertificate
from tests.harness.postgres import PostgresServer, postgres_bindir
from tests.harness.processes import reap_all
from tests.harness.stalroute import StalrouteProcess

#: Accounts present on every Dovecot node (login → password). Passwords are distinctive so
#: a test can search logs for them.
USERS: dict[str, str] = {
    user: f"{user}-Pw-{index}7q2x"
    for index, user in enumerate(
        ("alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi"), start=1
    )
}

_SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")


def unavailable(reason: str) -> NoReturn:
    """Skip the test, or fail it under ``CI=true`` (CI must run everything)."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: a missing prerequisite is a failure)")
    pytest.skip(reason)


def require_binary(name: str) -> str:
    """Full path of the executable ``name`` (PATH and the sbin directories); otherwise
    :func:`unavailable`."""
    path = shutil.which(name) or shutil.which(name, path=os.pathsep.join(_SBIN))
    if path is None:
        unavailable(f"{name} is not installed (scripts/bootstrap installs it)")
    return path


def start_postgres(*, log_statements: bool = False) -> PostgresServer:
    """A private PostgreSQL server, started (it runs as the ``postgres`` user, so as root);
    :func:`unavailable` names what is missing. The caller closes it."""
    bindir = postgres_bindir()
    if bindir is None:
        unavailable("PostgreSQL (initdb, postgres) is not installed (scripts/bootstrap)")
    if os.geteuid() != 0:
        unavailable("the PostgreSQL fixture runs as root (it switches to the postgres user)")
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        unavailable("there is no postgres user (the postgresql package creates it)")
    server = PostgresServer(bindir, log_statements=log_statements)
    try:
        server.start()
    except BaseException:
        server.close()
        raise
    return server


class DovecotPair(NamedTuple):
    """node1 (the default destination) and node2; same users, different mailboxes."""

    node1: DovecotNode
    node2: DovecotNode


def pytest_configure(config: pytest.Config) -> None:
    """Make SIGTERM (``timeout``, a cancelled CI job) unwind like Ctrl-C: pytest then runs the
    fixtures' teardown, which stops the servers and removes their temp dirs. Python's default
    would exit at once and leave both behind (a Postfix master even keeps running)."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Reap any managed child a failing fixture may have left behind."""
    reap_all()


@pytest.fixture(scope="session")
def users() -> dict[str, str]:
    """Login → password of the accounts on every Dovecot node."""
    return dict(USERS)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    """The run's throwaway CA (``pki.cert_path`` is the file to trust)."""
    return CertificateAuthority(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def proxy_certificate(pki: CertificateAuthority) -> IssuedCertificate:
    """stalroute's listener certificate: ``localhost``, ``stalroute.test``, 127.0.0.1."""
    return pki.issue("stalroute", ["localhost", "stalroute.test"], ["127.0.0.1"])


@pytest.fixture(scope="session")
def dovecot_pair(pki: CertificateAuthority) -> Iterator[DovecotPair]:
    """Two Dovecot nodes with :data:`USERS`; each INBOX holds "<node> welcome for <user>"."""
    binary = require_binary("dovecot")
    if os.geteuid() != 0:
        unavailable("the Dovecot fixtures must run as root")
    nodes = start_seeded_nodes(pki, USERS, ("node1", "node2"), binary=binary)
    try:
        yield DovecotPair(*nodes)
    finally:
        for node in nodes:
            node.stop()


StalrouteFactory = Callable[..., StalrouteProcess]


@pytest.fixture
def stalroute(tmp_path: Path) -> Iterator[StalrouteFactory]:
    """Factory: ``stalroute(config, mappings={"bob": "node2"})`` starts the real proxy with
    that configuration (a dict shaped like the TOML file) and returns it once its listeners
    accept. Every proxy is stopped at teardown; its log tail is printed (pytest shows it
    when the test failed)."""
    started: list[StalrouteProcess] = []

    def start(
        config: Mapping[str, Any], mappings: Mapping[str, str] | None = None
    ) -> StalrouteProcess:
        proxy = StalrouteProcess(config, tmp_path / f"stalroute-{len(started)}", mappings=mappings)
        started.append(proxy)
        return proxy.start()

    yield start
    for proxy in started:
        proxy.stop()
        print(f"--- {proxy.log.path} (tail) ---\n{proxy.log_text()[-6000:]}")
        if output := proxy.output_text():
            print(f"--- stalroute stdout/stderr ---\n{output[-3000:]}")
