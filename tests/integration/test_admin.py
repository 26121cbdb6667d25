"""Acceptance tests of the admin API (SPEC §7 reload, §8, §9 health, §10 metrics) over real
HTTPS against a real stalroute in front of the Dovecot pair.

The migration runbook is run against each mapping store (the TSV file, PostgreSQL, Redis):
``PUT /mappings`` alice → node2, then ``POST /connections/kick`` ends alice's live IMAP
session on node1, her next login lands on node2, and bob's session is untouched.  Then:
draining a node, login delays, the token lockout, config reload (a broken file keeps the
running config; a new destination is usable at once), health, Prometheus metrics parsed by
prometheus_client, bulk import/export (also with curl), and an OpenAPI-driven fuzz run
(schemathesis, positive and negative cases) asserting that no endpoint answers 5xx.
"""

from __future__ import annotations

import http.client
import imaplib
import json
import os
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stalroute.admin.openapi import SPEC
from tests.conftest import DovecotPair, StalrouteFactory, require_binary, start_postgres
from tests.harness.clients import SourceIMAP4_SSL, fetch_subject
from tests.harness.dovecot import welcome_subject
from tests.harness.pki import CertificateAuthority, IssuedCertificate
from tests.harness.ports import LOOPBACK
from tests.harness.postgres import PostgresServer
from tests.harness.redis import RedisServer
from tests.harness.stalroute import (
    StalrouteProcess,
    admin_section,
    closed_destination,
    dovecot_destination,
    dump_toml,
    imap_proxy_config,
    two_node_imap_config,
)

pytestmark = pytest.mark.integration

TOKEN = "Adm1n-" + "k" * 34
REDIS_DB = 2


# --- an HTTPS client for the admin API ------------------------------------------------------


class Reply:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"<Reply {self.status} {self.body[:300]!r}>"


class Admin:
    """Requests to a proxy's admin API, verified against the test CA, from ``source``."""

    def __init__(self, proxy: StalrouteProcess, pki: CertificateAuthority,
                 token: str = TOKEN, source: str = LOOPBACK) -> None:
        self.proxy, self.token, self.source = proxy, token, source
        self.context = pki.client_context()

    def call(self, method: str, path: str, body: bytes | dict | None = None, *,
             token: str | None = None, headers: dict[str, str] | None = None) -> Reply:
        host, port = _admin_address(self.proxy)
        connection = http.client.HTTPSConnection(host, port, context=self.context,
                                                 timeout=60, source_address=(self.source, 0))
        sent = dict(headers or {})
        sent["Authorization"] = f"Bearer {self.token if token is None else token}"
        if isinstance(body, dict):
            body = json.dumps(body).encode()
            sent.setdefault("Content-Type", "application/json")
        try:
            connection.request(method, path, body=body, headers=sent)
            response = connection.getresponse()
            return Reply(response.status, {k.lower(): v for k, v in response.getheaders()},
                         response.read())
        finally:
            connection.close()

    def ok(self, method: str, path: str, body: bytes | dict | None = None) -> Any:
        reply = self.call(method, path, body)
        assert reply.status == 200, reply
        return reply.json


def _admin_address(proxy: StalrouteProcess) -> tuple[str, int]:
    host, _, port = proxy.config["admin"]["bind"].rpartition(":")
    return host, int(port)


# --- mapping stores ---------------------------------------------------------------------------


class Store:
    """A mapping store for the proxy: its ``[mapping]`` table and a way to read it back."""

    name = "file"

    def mapping(self) -> dict[str, Any]:
        return {"source": "file"}

    def read(self, proxy: StalrouteProcess, identifier: str) -> str | None:
        for line in proxy.mappings_path.read_text().splitlines():
            key, _, destination = line.partition("\t")
            if key == identifier:
                return destination
        return None


class PostgresStore(Store):
    name = "postgresql"

    def __init__(self, server: PostgresServer) -> None:
        self.server = server

    def mapping(self) -> dict[str, Any]:
        return {"source": "sql", "sql": {
            "url": self.server.url(),
            "query": "SELECT destination FROM routes WHERE login = $1",
            "upsert_query": "INSERT INTO routes VALUES ($1, $2) ON CONFLICT (login) "
                            "DO UPDATE SET destination = EXCLUDED.destination",
            "delete_query": "DELETE FROM routes WHERE login = $1",
            "list_query": "SELECT login, destination FROM routes", "pool_size": 4}}

    def read(self, proxy: StalrouteProcess, identifier: str) -> str | None:
        rows = self.server.execute("SELECT destination FROM routes WHERE login = %s",
                                   (identifier,))
        return rows[0][0] if rows else None


class RedisStore(Store):
    name = "redis"

    def __init__(self, server: RedisServer) -> None:
        self.server = server

    def mapping(self) -> dict[str, Any]:
        return {"source": "redis", "redis": {"url": self.server.url(REDIS_DB),
                                             "key_prefix": "route:", "pool_size": 4}}

    def read(self, proxy: StalrouteProcess, identifier: str) -> str | None:
        value = self.server.command("GET", f"route:{identifier}", db=REDIS_DB)
        return value.decode() if isinstance(value, bytes) else None


@pytest.fixture(scope="module")
def postgres_server() -> Iterator[PostgresServer]:
    server = start_postgres()
    try:
        server.execute("CREATE TABLE routes (login text PRIMARY KEY, destination text)")
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer(require_binary("redis-server"))
    try:
        yield server.start()
    finally:
        server.close()


@pytest.fixture(params=["file", "postgresql", "redis"])
def store(request: pytest.FixtureRequest) -> Store:
    if request.param == "postgresql":
        server = request.getfixturevalue("postgres_server")
        server.execute("TRUNCATE routes")
        return PostgresStore(server)
    if request.param == "redis":
        server = request.getfixturevalue("redis_server")
        server.command("FLUSHDB", db=REDIS_DB)
        return RedisStore(server)
    return Store()


# --- helpers ----------------------------------------------------------------------------------


def proxy_config(pki: CertificateAuthority, certificate: IssuedCertificate,
                 dovecot_pair: DovecotPair, *, mapping: dict[str, Any] | None = None,
                 **admin: Any) -> dict[str, Any]:
    config = two_node_imap_config(certificate, pki.cert_path, *dovecot_pair)
    config["admin"] = {**admin_section(TOKEN), **admin}
    if mapping is not None:
        config["mapping"] = mapping
    return config


@pytest.fixture
def start(stalroute: StalrouteFactory, pki: CertificateAuthority,
          proxy_certificate: IssuedCertificate, dovecot_pair: DovecotPair):
    """``start(mappings=..., mapping=..., **admin)`` → (proxy, Admin)."""

    def starter(mappings: dict[str, str] | None = None, **options: Any):
        proxy = stalroute(proxy_config(pki, proxy_certificate, dovecot_pair, **options),
                          mappings=mappings)
        return proxy, Admin(proxy, pki)

    return starter


def imaps(proxy: StalrouteProcess, pki: CertificateAuthority) -> SourceIMAP4_SSL:
    host, port = proxy.listener("imaps")
    return SourceIMAP4_SSL(host, port, ssl_context=pki.client_context(),
                           server_hostname="localhost")


def logged_in(proxy: StalrouteProcess, pki: CertificateAuthority, users: dict[str, str],
              user: str) -> SourceIMAP4_SSL:
    client = imaps(proxy, pki)
    client.login(user, users[user])
    return client


def node_of(client: imaplib.IMAP4, user: str) -> str:
    subject = fetch_subject(client)
    for node in ("node1", "node2"):
        if subject == welcome_subject(node, user):
            return node
    raise AssertionError(f"unexpected INBOX subject {subject!r}")


def lands_on(proxy: StalrouteProcess, pki: CertificateAuthority, users: dict[str, str],
             user: str) -> str:
    with logged_in(proxy, pki, users, user) as client:
        return node_of(client, user)


def is_closed(client: imaplib.IMAP4) -> bool:
    try:
        client.noop()
    except (imaplib.IMAP4.abort, OSError):
        return True
    return False


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


# --- the migration runbook --------------------------------------------------------------------


def test_runbook_moves_alice_and_leaves_bob(start, store: Store, pki: CertificateAuthority,
                                            users: dict[str, str]) -> None:
    proxy, admin = start(mapping=store.mapping())
    alice = logged_in(proxy, pki, users, "alice")
    bob = logged_in(proxy, pki, users, "bob")
    assert node_of(alice, "alice") == node_of(bob, "bob") == "node1"
    live = admin.ok("GET", "/connections")["connections"]
    assert sorted((c["identifier"], c["destination"]) for c in live) == [
        ("alice", "node1"), ("bob", "node1")]

    # The mailbox has been copied: point alice at node2, then end her live session.
    assert admin.ok("PUT", "/mappings?identifier=alice&destination=node2") == {
        "identifier": "alice", "destination": "node2"}
    assert store.read(proxy, "alice") == "node2"
    assert admin.ok("GET", "/mappings?identifier=alice")["destination"] == "node2"
    assert admin.ok("POST", "/connections/kick?identifier=alice")["kicked"] == 1
    wait_until(lambda: is_closed(alice))

    assert not is_closed(bob)
    assert node_of(bob, "bob") == "node1"  # bob's session goes on, on node1
    assert lands_on(proxy, pki, users, "alice") == "node2"
    assert lands_on(proxy, pki, users, "bob") == "node1"
    bob.logout()

    # Rolling back is the same two calls in reverse.
    assert admin.ok("DELETE", "/mappings?identifier=alice")["deleted"] is True
    assert store.read(proxy, "alice") is None
    assert lands_on(proxy, pki, users, "alice") == "node1"

    # Admin actions are logged, identifiers redacted (never a token).
    proxy.stop()
    admin_lines = [line for line in proxy.log_text().splitlines() if "[stalroute.admin" in line]
    assert any("PUT /mappings?identifier=al…#" in line for line in admin_lines), admin_lines
    assert not [line for line in admin_lines if "alice" in line or TOKEN in line]


def test_bulk_import_into_each_store_is_routable(start, store: Store,
                                                 pki: CertificateAuthority,
                                                 users: dict[str, str]) -> None:
    proxy, admin = start(mapping=store.mapping())
    body = "".join(f"bulk{n:05d}\tnode{1 + n % 2}\n" for n in range(3000))
    body += "erin\tnode2\nfrank\tnowhere\n"
    summary = admin.ok("POST", "/mappings/import", body.encode())
    assert (summary["rows"], summary["imported"], summary["rejected_count"]) == (3002, 3001, 1)
    assert summary["rejected"] == [{"line": 3002, "reason": "unknown destination 'nowhere'"}]
    assert store.read(proxy, "bulk02999") == "node2"
    assert lands_on(proxy, pki, users, "erin") == "node2"
    again = admin.ok("POST", "/mappings/import", body.encode())
    assert (again["imported"], again["unchanged"]) == (0, 3001)
    export = admin.call("GET", "/mappings/export")
    assert export.status == 200
    assert export.body.count(b"\n") == 3001 and b"bulk02999\tnode2\n" in export.body


def test_drain_a_node_by_destination(start, pki: CertificateAuthority,
                                     users: dict[str, str]) -> None:
    proxy, admin = start(mappings={"bob": "node2", "carol": "node2"})
    sessions = {user: logged_in(proxy, pki, users, user) for user in ("alice", "bob", "carol")}
    node2 = next(d for d in admin.ok("GET", "/destinations")["destinations"]
                 if d["name"] == "node2")
    assert node2["sessions"] == 2
    on_node2 = admin.ok("GET", "/connections?destination=node2")["connections"]
    assert sorted(c["identifier"] for c in on_node2) == ["bob", "carol"]
    assert admin.ok("POST", "/connections/kick?destination=node2")["kicked"] == 2
    wait_until(lambda: is_closed(sessions["bob"]) and is_closed(sessions["carol"]))
    assert not is_closed(sessions["alice"])
    assert admin.call("POST", "/connections/kick?destination=node9").status == 404
    sessions["alice"].logout()


def test_delay_holds_new_logins(start, pki: CertificateAuthority, users: dict[str, str]) -> None:
    proxy, admin = start()
    assert admin.ok("POST", "/connections/delay?identifier=alice&seconds=2") == {
        "identifier": "alice", "seconds": 2.0}
    started = time.monotonic()
    assert lands_on(proxy, pki, users, "alice") == "node1"
    held = time.monotonic() - started
    started = time.monotonic()
    assert lands_on(proxy, pki, users, "bob") == "node1"
    assert 1.9 <= held < 5, held
    assert time.monotonic() - started < 1.5
    admin.ok("POST", "/connections/delay", {"identifier": "alice", "seconds": 30})
    admin.ok("POST", "/connections/delay", {"identifier": "alice", "seconds": 0})  # lifted
    started = time.monotonic()
    lands_on(proxy, pki, users, "alice")
    assert time.monotonic() - started < 1.5


# --- authentication -----------------------------------------------------------------------------


def test_lockout_after_bad_tokens(start, pki: CertificateAuthority) -> None:
    proxy, admin = start(lockout_threshold=3, lockout_duration="3s")
    attacker = Admin(proxy, pki, source="127.0.0.3")
    for _ in range(3):
        reply = attacker.call("GET", "/stats", token="wrong-" + "w" * 34)
        assert reply.status == 401 and reply.json == {"error": "missing or wrong bearer token"}
    locked = attacker.call("GET", "/stats")  # the right token from a locked address
    assert locked.status == 429
    assert 1 <= int(locked.headers["retry-after"]) <= 3
    assert attacker.call("GET", "/healthz").status == 200  # health needs no token
    assert admin.ok("GET", "/stats")["admin"]["locked_addresses"] == 1  # from 127.0.0.1
    assert admin.call("GET", "/stats", token="").status == 401
    time.sleep(3.1)
    assert attacker.call("GET", "/stats").status == 200


# --- configuration reload -----------------------------------------------------------------------


def test_reload_with_a_broken_file_keeps_serving(start, pki: CertificateAuthority,
                                                 users: dict[str, str]) -> None:
    proxy, admin = start(mappings={"bob": "node2"})
    good = proxy.config_path.read_text()
    proxy.config_path.write_text(good + "\n[routing\n")  # not TOML
    refused = admin.call("POST", "/config/reload")
    assert refused.status == 400
    assert "invalid TOML" in refused.json["problems"][0]
    proxy.config_path.write_text(good.replace('default_destination = "node1"',
                                              'default_destination = "node9"'))
    refused = admin.call("POST", "/config/reload")
    assert refused.status == 400
    assert any(p.startswith("routing.default_destination") for p in refused.json["problems"])

    since = proxy.log.size()
    proxy.reload()  # SIGHUP meets the same broken file
    proxy.log.wait_for(r"configuration reload refused, keeping the running one", since=since)
    assert lands_on(proxy, pki, users, "bob") == "node2"
    assert lands_on(proxy, pki, users, "alice") == "node1"
    assert admin.ok("GET", "/healthz/ready") == {"status": "ready"}

    proxy.config_path.write_text(good)
    assert admin.ok("POST", "/config/reload") == {"reloaded": True, "restart_required": []}


def test_reload_adds_a_destination_usable_at_once(stalroute: StalrouteFactory,
                                                  pki: CertificateAuthority,
                                                  proxy_certificate: IssuedCertificate,
                                                  dovecot_pair: DovecotPair,
                                                  users: dict[str, str]) -> None:
    config = proxy_config(pki, proxy_certificate, dovecot_pair)
    node2 = config["destination"].pop("node2")
    proxy = stalroute(config)
    admin = Admin(proxy, pki)
    refused = admin.call("PUT", "/mappings?identifier=bob&destination=node2")
    assert refused.status == 400 and "not declared" in refused.json["error"]

    config["destination"]["node2"] = node2
    config["destination"]["spare"] = dovecot_destination(dovecot_pair.node2, ca_file=pki.cert_path)
    config["listener"]["imap"]["bind"] = ["127.0.0.1:0"]  # a socket change needs a restart
    config["mapping"]["file"] = {"path": str(proxy.mappings_path)}
    proxy.config_path.write_text(dump_toml(config))
    reloaded = admin.ok("POST", "/config/reload")
    assert reloaded["restart_required"] == ["listener.imap"]
    names = [d["name"] for d in admin.ok("GET", "/destinations")["destinations"]]
    assert names == ["node1", "node2", "spare"]
    admin.ok("PUT", "/mappings?identifier=bob&destination=node2")
    admin.ok("PUT", "/mappings?identifier=carol&destination=spare")
    assert lands_on(proxy, pki, users, "bob") == "node2"
    assert lands_on(proxy, pki, users, "carol") == "node2"


def served_fingerprint(proxy: StalrouteProcess) -> str:
    """SHA-256 (hex) of the certificate the admin listener presents."""
    import hashlib
    import ssl

    pem = ssl.get_server_certificate(_admin_address(proxy), timeout=10)
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).hexdigest()


def test_reload_serves_a_renewed_admin_certificate(stalroute: StalrouteFactory,
                                                   pki: CertificateAuthority,
                                                   proxy_certificate: IssuedCertificate,
                                                   dovecot_pair: DovecotPair,
                                                   tmp_path: Path) -> None:
    first = pki.issue("admin-1", ["localhost"], ["127.0.0.1"])
    renewed = pki.issue("admin-2", ["localhost"], ["127.0.0.1"])
    token_file = tmp_path / "admin.token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    config = proxy_config(pki, proxy_certificate, dovecot_pair,
                          bearer_token_file=str(token_file))
    config["admin"]["certificate"] = "admin"
    del config["admin"]["bearer_token"]
    config["tls"]["certificate"]["admin"] = {"cert": str(first.cert_path),
                                            "key": str(first.key_path)}
    proxy = stalroute(config)
    admin = Admin(proxy, pki)
    assert served_fingerprint(proxy) == first.sha256
    config["tls"]["certificate"]["admin"] = {"cert": str(renewed.cert_path),
                                            "key": str(renewed.key_path)}
    config["mapping"]["file"] = {"path": str(proxy.mappings_path)}
    proxy.config_path.write_text(dump_toml(config))
    assert admin.ok("POST", "/config/reload")["restart_required"] == []
    assert served_fingerprint(proxy) == renewed.sha256
    assert admin.ok("GET", "/stats")["draining"] is False  # the token file still holds


# --- health, metrics, errors ----------------------------------------------------------------------


def test_readiness_follows_the_default_destination_circuit(
        stalroute: StalrouteFactory, pki: CertificateAuthority,
        proxy_certificate: IssuedCertificate, users: dict[str, str]) -> None:
    config = imap_proxy_config(proxy_certificate, {"down": closed_destination()}, default="down")
    config["server"].update(host_down_threshold=1, host_down_cooldown="1m")
    config["admin"] = admin_section(TOKEN)
    proxy = stalroute(config)
    admin = Admin(proxy, pki)
    assert admin.call("GET", "/healthz/ready", token="").json == {"status": "ready"}
    with imaps(proxy, pki) as client, pytest.raises(imaplib.IMAP4.error, match="UNAVAILABLE"):
        client.login("alice", users["alice"])
    not_ready = admin.call("GET", "/healthz/ready", token="")
    assert not_ready.status == 503
    assert not_ready.json["reasons"] == ["default destination down is marked down"]
    assert admin.call("GET", "/healthz/live", token="").status == 200
    assert admin.call("GET", "/healthz", token="").status == 200
    (down,) = admin.ok("GET", "/destinations")["destinations"]
    assert (down["circuit"], down["trips"]) == ("open", 1)
    assert admin.ok("POST", "/destinations/reset?destination=down")["circuit"] == "closed"
    assert admin.call("GET", "/healthz/ready").status == 200


def test_metrics_parse_with_prometheus_client(start, pki: CertificateAuthority,
                                              users: dict[str, str]) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    proxy, admin = start(mappings={"bob": "node2"})
    with logged_in(proxy, pki, users, "bob"), logged_in(proxy, pki, users, "alice"):
        reply = admin.call("GET", "/metrics")
    assert reply.status == 200
    assert reply.headers["content-type"].startswith("text/plain; version=")
    families = list(text_string_to_metric_families(reply.body.decode()))
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in families for s in family.samples}
    assert samples[("stalroute_sessions_spliced",
                    (("destination", "node2"), ("protocol", "imap")))] == 1
    assert samples[("stalroute_sessions_spliced",
                    (("destination", "node1"), ("protocol", "imap")))] == 1
    assert samples[("stalroute_listener_active_connections",
                    (("listener", "imaps"), ("protocol", "imap")))] == 2
    assert samples[("stalroute_cache_misses_total", ())] >= 2
    assert samples[("stalroute_destination_circuit_state",
                    (("destination", "node2"), ("state", "closed")))] == 1
    names = {family.name for family in families}
    assert {"stalroute_listener_probes", "stalroute_listener_rejected_connections",
            "stalroute_cache_hits", "stalroute_bans", "process_resident_memory_bytes"} <= names


def test_errors_are_json_with_proper_status(start, pki: CertificateAuthority) -> None:
    proxy, admin = start()
    cases = [
        ("GET", "/stats", {"token": "x" * 40}, 401),
        ("GET", "/nope", {}, 404),
        ("DELETE", "/stats", {}, 405),
        ("GET", "/mappings", {}, 400),
        ("GET", "/mappings?identifier=nobody", {}, 404),
        ("PUT", "/mappings?identifier=alice&destination=node9", {}, 400),
        ("PUT", "/mappings?identifier=al%22ice&destination=node2", {}, 400),
        ("POST", "/connections/delay?identifier=alice&seconds=-5", {}, 400),
        ("POST", "/connections/kick", {}, 400),
        ("POST", "/destinations/reset?destination=node9", {}, 404),
    ]
    for method, path, options, status in cases:
        reply = admin.call(method, path, **options)
        assert reply.status == status, (method, path, reply)
        assert reply.headers["content-type"] == "application/json"
        assert isinstance(reply.json["error"], str) and reply.json["error"]


def test_read_only_store_answers_501(start, pki: CertificateAuthority, tmp_path: Path) -> None:
    import sqlite3

    database = tmp_path / "routes.db"
    with sqlite3.connect(database) as connection:
        connection.execute("CREATE TABLE routes (login text PRIMARY KEY, destination text)")
        connection.execute("INSERT INTO routes VALUES ('bob', 'node2')")
    connection.close()
    proxy, admin = start(mapping={"source": "sql", "sql": {
        "url": f"sqlite://{database}",
        "query": "SELECT destination FROM routes WHERE login = $1"}})
    assert admin.ok("GET", "/mappings?identifier=bob")["destination"] == "node2"
    for method, path, body in [("PUT", "/mappings?identifier=a&destination=node2", None),
                               ("DELETE", "/mappings?identifier=bob", None),
                               ("POST", "/mappings/import", b"a\tnode2\n"),
                               ("GET", "/mappings/export", None)]:
        reply = admin.call(method, path, body)
        assert reply.status == 501, (method, path, reply)
        assert reply.json["error"]


def test_bulk_round_trip_with_curl(start, pki: CertificateAuthority, tmp_path: Path) -> None:
    curl = require_binary("curl")
    proxy, admin = start(mappings={"bob": "node2"})
    source = tmp_path / "wave1.json"
    source.write_text(json.dumps([{"identifier": "carol", "destination": "node2"},
                                  ["dave", "node1"], {"identifier": "erin"}]))

    def run(*args: str) -> str:
        done = subprocess.run([curl, "--silent", "--show-error", "--fail-with-body",
                               "--cacert", str(pki.cert_path), "-H",
                               f"Authorization: Bearer {TOKEN}", *args],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    summary = json.loads(run("--data-binary", f"@{source}",
                             f"{proxy.admin_url}/mappings/import"))
    assert (summary["imported"], summary["rejected_count"]) == (2, 1)
    assert summary["rejected"][0]["line"] == 1
    assert run(f"{proxy.admin_url}/mappings/export") == \
        "bob\tnode2\ncarol\tnode2\ndave\tnode1\n"
    exported = json.loads(run(f"{proxy.admin_url}/mappings/export?format=json"))
    assert exported[1] == {"identifier": "carol", "destination": "node2"}
    assert json.loads(run("-X", "PUT", f"{proxy.admin_url}/mappings?identifier=erin&"
                                       "destination=node1"))["destination"] == "node1"
    # A JSON export imports back unchanged.
    back = tmp_path / "export.json"
    back.write_text(json.dumps(exported))
    summary = json.loads(run("-H", "Content-Type: application/json", "--data-binary",
                             f"@{back}", f"{proxy.admin_url}/mappings/import"))
    assert (summary["imported"], summary["unchanged"]) == (0, 3)


# --- fuzzing from the OpenAPI document -----------------------------------------------------------


def test_openapi_fuzz_never_answers_5xx(start, pki: CertificateAuthority) -> None:
    """Every operation of /openapi.json, with schemathesis-generated valid and invalid
    parameters and bodies (bounded), against the live proxy: no 5xx, always JSON errors."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.generation.modes import GenerationMode

    proxy, admin = start(lockout_threshold=1000, mappings={"bob": "node2"})
    served = admin.ok("GET", "/openapi.json")
    assert served == SPEC
    schema = schemathesis.openapi.from_dict(served)
    statuses: Counter[tuple[str, int]] = Counter()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    examples = int(os.environ.get("STALROUTE_FUZZ_EXAMPLES", "12"))

    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            strategy = operation.as_strategy(generation_mode=mode)

            @settings(max_examples=examples, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(case=strategy)
            def check(case) -> None:
                response = case.call(base_url=proxy.admin_url, headers=auth,
                                     verify=str(pki.cert_path), timeout=30)
                statuses[(f"{case.method} {case.path}", response.status_code)] += 1
                assert response.status_code < 500, (case.method, case.path, case.query,
                                                    case.body, response.text[:300])
                if response.status_code >= 400:
                    assert isinstance(response.json()["error"], str)

            try:
                check()
            except Unsatisfiable:
                assert mode is GenerationMode.NEGATIVE  # nothing to make invalid
    operations = {key for key, _ in statuses}
    assert len(operations) == sum(len(item) for item in SPEC["paths"].values())
    print(f"fuzzed {sum(statuses.values())} requests: "
          f"{sorted(Counter(code for _, code in statuses.elements()).items())}")
    assert lands_after_fuzz(admin)


def lands_after_fuzz(admin: Admin) -> bool:
    """The proxy still answers normally after the fuzz run."""
    return admin.call("GET", "/healthz/ready").status in (200, 503) and \
        admin.ok("GET", "/stats")["draining"] is False
