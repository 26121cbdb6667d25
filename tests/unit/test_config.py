"""Tests of the configuration schema (SPEC §2) and ``stalroute check``."""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stalroute import config as cfg
from stalroute import tls_ciphers
from stalroute.cli import main
from stalroute.config import (
    ConfigError,
    Problem,
    load_config,
    parse_address,
    parse_config,
    parse_duration,
)
from stalroute.net import ip_in_networks, parse_cidr
from tests.harness.pki import CertificateAuthority
from tests.unit.test_composition import plugin_service

REPO = Path(__file__).resolve().parents[2]
TOKEN = "s3cr3t-admin-token-0123456789abcdefXYZ"

# --- helpers -----------------------------------------------------------------------------


def base_document() -> dict[str, Any]:
    """The smallest valid configuration: one IMAP listener, one destination, a file store."""
    return {
        "routing": {"default_destination": "main"},
        "mapping": {"source": "file", "file": {"path": "mappings.tsv"}},
        "destination": {
            "main": {
                "host": "backend.example.com",
                "protocol": {"imap": {"port": 993, "tls": "implicit"}},
            }
        },
        "listener": {"imap": {"protocol": "imap", "bind": ["127.0.0.1:1993"], "tls": "plain"}},
    }


def put(document: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """Set ``a.b.c`` in a nested dict (creating tables); ``value=DELETE`` removes the key."""
    *parents, last = dotted.split(".")
    table = document
    for part in parents:
        table = table.setdefault(part, {})
    if value is DELETE:
        table.pop(last, None)
    else:
        table[last] = value
    return document


DELETE = object()


@pytest.fixture
def base_dir(tmp_path: Path) -> Path:
    (tmp_path / "mappings.tsv").write_text("alice@example.com\tmain\n")
    return tmp_path


def parse(
    base_dir: Path, document: dict[str, Any] | None = None, env: dict | None = None, **kw: Any
) -> cfg.Config:
    return parse_config(
        base_document() if document is None else document, base_dir, env or {}, **kw
    )


def problems_of(
    base_dir: Path, document: dict[str, Any], env: dict | None = None, **kw: Any
) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(base_dir, document, env, **kw)
    return [str(p) for p in info.value.problems]


def with_(*changes: tuple[str, Any]) -> dict[str, Any]:
    document = base_document()
    for dotted, value in changes:
        put(document, dotted, value)
    return document


# --- defaults ----------------------------------------------------------------------------


def test_minimal_config_defaults(base_dir: Path) -> None:
    config = parse(base_dir)

    assert config.server == cfg.ServerConfig(
        hostname=socket.getfqdn(),
        shutdown_grace=30.0,
        bridge_idle=1800.0,
        backend_timeout=10.0,
        backend_connect_retries=1,
        host_down_threshold=5,
        host_down_min_clients=2,
        host_down_cooldown=30.0,
        proxy_ttl=7,
        log_level="info",
        workers=1,
        threads=0,
    )
    listener = config.listeners["imap"]
    assert listener.name == "imap"
    assert listener.bind == (("127.0.0.1", 1993),)
    assert (listener.proxy_protocol, listener.proxy_trusted, listener.proxy_header_timeout) == (
        "off",
        (),
        5.0,
    )
    assert (listener.max_connections, listener.max_connections_per_ip) == (8192, 0)
    assert (listener.preauth_timeout, listener.max_auth_attempts, listener.forwarded) == (
        30.0,
        3,
        "off",
    )

    assert config.tls.certificates == {}
    assert config.tls.protocols == cfg.TLSProtocolsConfig("1.2", False, ())
    assert config.oauth.jwt_username_claim == "email"
    assert config.routing == cfg.RoutingConfig("main", None, ("%",), "tempfail")
    assert config.mapping.source == "file"
    assert config.mapping.settings.path == base_dir / "mappings.tsv"
    assert (
        config.mapping.normalize,
        config.mapping.positive_ttl,
        config.mapping.negative_ttl,
        config.mapping.cache_max_entries,
        config.mapping.lookup_timeout,
    ) == ("none", 600.0, 30.0, 1_000_000, 5.0)
    assert config.http == cfg.HTTPConfig(65536, 75.0, 1000, 65536, True, 60.0, ())
    assert config.admin is None
    assert config.cluster == cfg.ClusterConfig(1, "none", None)
    assert config.security == cfg.SecurityConfig((), 0, 600.0, 900.0)
    assert config.source_path is None and config.warnings == ()


def test_capability_defaults_per_protocol(base_dir: Path) -> None:
    caps = parse(base_dir).capabilities
    for proto in ("imap", "pop3", "submission", "managesieve"):
        pc = caps.for_protocol(proto)
        assert pc.sasl == ("PLAIN", "LOGIN", "OAUTHBEARER", "XOAUTH2")
        assert pc.allow_plain_auth_without_tls is False
        assert pc.banner == "stalroute ready"
    assert caps.for_protocol("imap").advertise == (
        "IMAP4rev2",
        "IMAP4rev1",
        "ENABLE",
        "SASL-IR",
        "LITERAL+",
        "ID",
        "UTF8=ACCEPT",
    )
    assert caps.for_protocol("submission").ehlo == (
        "ENHANCEDSTATUSCODES",
        "8BITMIME",
        "SMTPUTF8",
        "PIPELINING",
        "CHUNKING",
        "SIZE",
    )
    assert "fileinto" in caps.for_protocol("managesieve").sieve
    assert caps.for_protocol("managesieve").implementation == "stalroute"
    assert caps.for_protocol("pop3").advertise == () and caps.for_protocol("pop3").ehlo == ()


def test_capabilities_overrides(base_dir: Path) -> None:
    config = parse(
        base_dir,
        with_(
            (
                "capabilities.imap",
                {"sasl": ["plain", "XOAUTH2"], "banner": "hi", "advertise": ["IMAP4rev1"]},
            ),
            ("capabilities.pop3", {"allow_plain_auth_without_tls": True}),
        ),
    )
    assert config.capabilities.for_protocol("imap").sasl == ("PLAIN", "XOAUTH2")
    assert config.capabilities.for_protocol("imap").advertise == ("IMAP4rev1",)
    assert config.capabilities.for_protocol("imap").banner == "hi"
    assert config.capabilities.for_protocol("pop3").allow_plain_auth_without_tls is True
    assert config.capabilities.for_protocol("submission").ehlo  # untouched sections keep their defaults


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("capabilities.imap.advertise", ["IMAP4rev1", "ÜBER"],
         'capabilities.imap.advertise[1]: "ÜBER" is not an IMAP capability'),
        ("capabilities.imap.advertise", ["X(Y"],
         'capabilities.imap.advertise[0]: "X(Y" is not an IMAP capability'),
        ("capabilities.imap.advertise", ["IMAP4rev1", "X]"],
         'capabilities.imap.advertise[1]: "X]" is not an IMAP capability'),
        ("capabilities.submission.ehlo", ["SIZE", "8BITMIMÉ"],
         'capabilities.submission.ehlo[1]: "8BITMIMÉ" is not an EHLO keyword'),
        ("capabilities.submission.ehlo", ["-X"],
         'capabilities.submission.ehlo[0]: "-X" is not an EHLO keyword'),
        ("capabilities.managesieve.sieve", ["fileinto", "vacaciön"],
         'capabilities.managesieve.sieve[1]: "vacaciön" is not a Sieve extension name'),
        ("capabilities.managesieve.sieve", ['a"b'],
         'capabilities.managesieve.sieve[0]: "a\\"b" is not a Sieve extension name'),
        ("capabilities.managesieve.implementation", "Dövecot",
         'capabilities.managesieve.implementation: "Dövecot" is not printable ASCII text'),
        ("capabilities.imap.banner", "Willkommen über IMAP",
         'capabilities.imap.banner: "Willkommen über IMAP" is not printable ASCII text'),
        ("capabilities.pop3.banner", "tab\there",
         'capabilities.pop3.banner: "tab\\there" is not printable ASCII text'),
        ("server.hostname", "mäil.example.com",
         'server.hostname: "mäil.example.com" is not a printable ASCII host name'),
    ],
)
def test_text_sent_as_it_is_must_be_what_the_protocol_allows(
    base_dir: Path, key: str, value: Any, expected: str
) -> None:
    """Non-ASCII or special characters would break every greeting (issue 11 item 6)."""
    [problem] = problems_of(base_dir, with_((key, value)))
    assert problem.startswith(expected), problem


def test_protocol_tokens_within_their_grammar_are_kept(base_dir: Path) -> None:
    config = parse(base_dir, with_(
        ("capabilities.imap.advertise", ["IMAP4rev1", "LITERAL+", "UTF8=ACCEPT", "X-VENDOR"]),
        ("capabilities.submission.ehlo", ["SIZE", "X-EXPS", "8BITMIME"]),
        ("capabilities.managesieve.sieve", ["comparator-i;ascii-numeric", "vnd.dovecot.debug"]),
        ("capabilities.managesieve.implementation", 'Dovecot "Pigeonhole" (0.5)'),
        ("capabilities.imap.banner", ""),
        ("server.hostname", "xn--mil-sna.example.com"),
    ))
    assert config.capabilities.for_protocol("imap").advertise[-1] == "X-VENDOR"
    assert config.capabilities.for_protocol("managesieve").sieve[0] == "comparator-i;ascii-numeric"
    assert config.server.hostname == "xn--mil-sna.example.com"


def test_dataclasses_are_frozen(base_dir: Path) -> None:
    config = parse(base_dir)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.server.workers = 3  # type: ignore[misc]


# --- individual problems, each at its key path -------------------------------------------

ERROR_CASES = [
    # (changes, expected problem, substring match)
    (
        (("listener.imap.bind", ["0.0.0.0:993", "1.2.3.4"]),),
        'listener.imap.bind[1]: "1.2.3.4" is not an address (ip:port or [v6]:port)',
    ),
    (
        (("listener.imap.bind", ["mail.example.com:993"]),),
        'listener.imap.bind[0]: "mail.example.com:993" is not an address',
    ),
    (
        (("listener.imap.bind", ["127.0.0.1:99999"]),),
        'listener.imap.bind[0]: "127.0.0.1:99999": port',
    ),
    ((("listener.imap.bind", []),), "listener.imap.bind: must not be empty"),
    ((("listener.imap.bind", DELETE),), "listener.imap.bind: required key is missing"),
    ((("listener.imap.protocol", "imap4"),), 'listener.imap.protocol: "imap4" is not one of'),
    (
        (("listener.imap.tls", "implict"),),
        (
            'listener.imap.tls: "implict" is not one of "implicit", '
            '"starttls", "plain" (did you mean "implicit"?)'
        ),
    ),
    ((("listener.imap.proxy_protocol", "required"),), "listener.imap.proxy_trusted: required when"),
    (
        (("listener.imap.proxy_trusted", ["10.0.0.300/8"]),),
        'listener.imap.proxy_trusted[0]: "10.0.0.300/8" is not an IP address or CIDR',
    ),
    ((("listener.imap.max_connections", 0),), "listener.imap.max_connections: must be at least 1"),
    (
        (("listener.imap.max_connections", "10"),),
        "listener.imap.max_connections: must be an integer, not a string",
    ),
    (
        (("listener.imap.preauth_timeout", 30),),
        "listener.imap.preauth_timeout: must be a duration string",
    ),
    (
        (("listener.imap.preauth_timeout", "0s"),),
        "listener.imap.preauth_timeout: must be greater than zero",
    ),
    (
        (
            ("listener.smtp", {"protocol": "smtp", "bind": ["127.0.0.1:25"], "tls": "starttls"}),
            ("routing.smtp_passthrough_destination", "main"),
            ("destination.main.protocol.smtp", {"port": 25, "tls": "plain"}),
        ),
        'listener.smtp.tls: an smtp listener cannot use "starttls"',
    ),
    (
        (("listener.lmtp", {"protocol": "lmtp", "bind": ["127.0.0.1:24"], "tls": "plain"}),),
        "routing.smtp_passthrough_destination: required: an lmtp listener exists",
    ),
    (
        (
            ("listener.smtp", {"protocol": "smtp", "bind": ["127.0.0.1:25"], "tls": "plain"}),
            ("routing.smtp_passthrough_destination", "main"),
        ),
        "destination.main.protocol: the smtp_passthrough_destination must declare smtp",
    ),
    (
        (("routing.smtp_passthrough_destination", "relay"),),
        'routing.smtp_passthrough_destination: "relay" is not a declared destination',
    ),
    (
        (("routing.default_destination", "mian"),),
        'routing.default_destination: "mian" is not a declared destination (did you mean "main"?)',
    ),
    (
        (("routing.default_destination", DELETE),),
        "routing.default_destination: required key is missing",
    ),
    ((("routing.on_store_error", "drop"),), 'routing.on_store_error: "drop" is not one of'),
    (
        (("listener.pop3", {"protocol": "pop3", "bind": ["127.0.0.1:110"], "tls": "plain"}),),
        (
            "destination.main.protocol: the default destination must declare pop3: "
            "a pop3 listener exists"
        ),
    ),
    (
        (("listener.web", {"protocol": "http", "bind": ["127.0.0.1:8080"], "tls": "plain"}),),
        "destination.main.protocol: the default destination must declare http",
    ),
    (
        (
            ("listener.web", {"protocol": "http", "bind": ["127.0.0.1:8080"], "tls": "starttls"}),
            ("destination.main.protocol.http", {"port": 443, "tls": "implicit"}),
        ),
        'listener.web.tls: an http listener cannot use "starttls"',
    ),
    (
        (("destination.main.host", "10.0.0.5"),),
        'destination.main.tls_server_name: required: host "10.0.0.5" is an IP address',
    ),
    (
        (("destination.main.protocol.imap.tls", "plain"),),
        'destination.main.protocol.imap.tls: "plain" would send imap credentials in cleartext',
    ),
    (
        (("destination.main.protocol.imap.port", 0),),
        "destination.main.protocol.imap.port: must be at least 1",
    ),
    (
        (("destination.main.protocol.imaps", {"port": 993, "tls": "implicit"}),),
        'destination.main.protocol.imaps: unknown key (did you mean "imap"?)',
    ),
    (
        (("destination.main.forwarding", "haproxy"),),
        'destination.main.forwarding: "haproxy" is not one of',
    ),
    (
        (("destination.main.proxy_protocol_version", 3),),
        "destination.main.proxy_protocol_version: 3 is not one of 2, 1",
    ),
    (
        (("destination.main.tls_pinned_cert_sha256", "ab:cd"),),
        "destination.main.tls_pinned_cert_sha256: must be a SHA-256 fingerprint: 64 hex digits",
    ),
    (
        (("destination.main.tls_pinned_cert_sha256", "zz" * 32),),
        "destination.main.tls_pinned_cert_sha256: must be a SHA-256 fingerprint",
    ),
    (
        (("destination.main.source_ips", ["10.0.0.1", "eth0"]),),
        'destination.main.source_ips[1]: "eth0" is not an IP address',
    ),
    ((("destination.main.host", DELETE),), "destination.main.host: required key is missing"),
    (
        (("destination.main.protocol.imap.forwarding", "xclients"),),
        (
            'destination.main.protocol.imap.forwarding: "xclients" is not one of '
            '"proxy", "xclient", "none" '
            '(did you mean "xclient"?)'
        ),
    ),
    (
        (("capabilities.imap.sasl", ["PLAIN", "CRAM-MD5"]),),
        (
            'capabilities.imap.sasl[1]: "CRAM-MD5" is not supported '
            "(PLAIN, LOGIN, OAUTHBEARER, XOAUTH2)"
        ),
    ),
    (
        (("capabilities.pop3.sasl", ["PLAIN", "plain"]),),
        'capabilities.pop3.sasl[1]: "plain" is listed twice',
    ),
    ((("capabilities.pop3.advertise", ["X"]),), "capabilities.pop3.advertise: unknown key"),
    (
        (("capabilities.imap.banner", "hi\r\n* BYE"),),
        "capabilities.imap.banner: must be a single line",
    ),
    ((("capabilities.smtp", {}),), "capabilities.smtp: unknown key"),
    (
        (("mapping.source", "ldap"),),
        'mapping.source: "ldap" is not one of "file", "sql", "redis", "sqlite"',
    ),
    ((("mapping.file", DELETE),), 'mapping.file: required when mapping.source = "file"'),
    ((("mapping.source", "sql"),), 'mapping.sql: required when mapping.source = "sql"'),
    (
        (("mapping.source", "redis"), ("mapping.redis", {})),
        "mapping.redis.url: required key is missing",
    ),
    (
        (("mapping.source", "redis"), ("mapping.redis", {"url": "http://x"})),
        'mapping.redis.url: must be a redis://…, rediss://… URL, got scheme "http"',
    ),
    (
        (("mapping.source", "sql"), ("mapping.sql", {"url": "mysql://u:pw@h/db", "query": "q"})),
        'mapping.sql.url: must be a postgresql://…, postgres://… URL, got scheme "mysql"',
    ),
    (
        (("mapping.source", "sql"), ("mapping.sql", {"url": "sqlite://relative.db", "query": "q"})),
        "mapping.sql.url: a SQLite URL must be sqlite:///path/to/file.db",
    ),
    (
        (("mapping.source", "sqlite"), ("mapping.sql", {"url": "postgresql://h/db", "query": "q"})),
        'mapping.sql.url: mapping.source = "sqlite" needs a sqlite:///path URL',
    ),
    (
        (("mapping.source", "sql"), ("mapping.sql", {"url": "sqlite:///x.db"})),
        "mapping.sql.query: required key is missing",
    ),
    (
        (("mapping.normalize", "upper"),),
        'mapping.normalize: "upper" is not one of "none", "lowercase"',
    ),
    (
        (("mapping.positive_ttl", "10 minutes"),),
        'mapping.positive_ttl: "10 minutes" is not a duration',
    ),
    ((("mapping.file.path", "missing.tsv"),), 'mapping.file.path: "missing.tsv" (resolved to '),
    (
        (("http.route", [{"match": "/**"}]),),
        'http.route[0]: a route needs destination = "<name>" or extract = { from = ... }',
    ),
    (
        (
            (
                "http.route",
                [{"match": "/**", "destination": "main", "extract": {"from": "authorization"}}],
            ),
        ),
        "http.route[0]: a route takes either destination or extract, not both",
    ),
    (
        (("http.route", [{"match": "/**", "destination": "main"}]),),
        'http.route[0].destination: destination "main" does not declare the http protocol',
    ),
    (
        (("http.route", [{"match": "/**", "destination": "nowhere"}]),),
        'http.route[0].destination: "nowhere" is not a declared destination (declared: main)',
    ),
    (
        (("http.route", [{"match": "/**", "extract": {"from": "cookie"}}]),),
        'http.route[0].extract.from: "cookie" is not one of',
    ),
    (
        (("http.route", [{"match": "/**", "extract": {"from": "query"}}]),),
        'http.route[0].extract.param: required with from = "query"',
    ),
    (
        (("http.route", [{"match": "/**", "extract": {"from": "header"}}]),),
        'http.route[0].extract.header: required with from = "header"',
    ),
    (
        (("http.route", [{"match": "/**", "extract": {"from": "header", "param": "user"}}]),),
        'http.route[0].extract.param: not used with from = "header" (it takes header)',
    ),
    (
        (("http.route", [{"match": "/**", "extract": {"from": "body"}}]),),
        'http.route[0].extract.regex: required with from = "body"',
    ),
    (
        (("http.route", [{"match": "/**", "extract": {"from": "body", "regex": "user=[^&]+"}}]),),
        'http.route[0].extract.regex: "user=[^&]+" needs a capture group',
    ),
    (
        (("http.route", [{"match": "/**", "extract": {"from": "body", "regex": "user=([^&+"}}]),),
        'http.route[0].extract.regex: "user=([^&+" is not a valid regular expression',
    ),
    (
        (
            (
                "http.route",
                [{"match": "/**", "extract": {"from": "authorization"}, "fallback": "old"}],
            ),
        ),
        'http.route[0].fallback: "old" is not a declared destination',
    ),
    ((("http.route", {"match": "/**"}),), "http.route: must be an array of tables"),
    ((("http.max_head_size", 10),), "http.max_head_size: must be at least 1024"),
    (
        (("admin", {"bind": "127.0.0.1:8443", "tls": "plain", "bearer_token": TOKEN}),),
        'admin.tls: must be "implicit"',
    ),
    (
        (("admin", {"bind": "localhost:8443", "bearer_token": TOKEN}),),
        'admin.bind: "localhost:8443" is not an address',
    ),
    ((("admin", {"bind": "127.0.0.1:8443"}),), "admin: no bearer token"),
    (
        (("admin", {"bind": "127.0.0.1:8443", "bearer_token": TOKEN, "min_token_len": 0}),),
        "admin.min_token_len: must be at least 1",
    ),
    (
        (("admin", {"bind": "127.0.0.1:8443", "bearer_token": TOKEN, "certificate": "nope"}),),
        'admin.certificate: "nope" is not a [tls.certificate.<name>] entry',
    ),
    (
        (("admin", {"bind": "127.0.0.1:1993", "bearer_token": TOKEN}),),
        "admin.bind: 127.0.0.1:1993 is already bound by listener.imap.bind",
    ),
    ((("cluster.node_id", 0),), "cluster.node_id: must be at least 1"),
    ((("cluster.node_id", -3),), "cluster.node_id: must be at least 1"),
    ((("cluster.coordinator", "redis"),), 'cluster.url: required when coordinator = "redis"'),
    (
        (("cluster.coordinator", "redis"), ("cluster.url", "postgresql://db/x")),
        'cluster.url: coordinator = "redis" needs a redis:// URL',
    ),
    ((("server.workers", -1),), "server.workers: must be at least 0"),
    ((("server.log_level", "verbose"),), 'server.log_level: "verbose" is not one of'),
    (
        (("server.hostname", "mail example"),),
        'server.hostname: "mail example" must not contain spaces',
    ),
    ((("server.proxy_ttl", 0),), "server.proxy_ttl: must be at least 1"),
    ((("tls.protocols.min_version", 1.3),), 'tls.protocols.min_version: must be the string "1.3"'),
    (
        (("tls.protocols.min_version", "1.1"),),
        'tls.protocols.min_version: "1.1" is not one of "1.2", "1.3"',
    ),
    (
        (("tls.certificate.main", {"cert": "cert.pem"}),),
        "tls.certificate.main.key: required key is missing",
    ),
    ((("security.allowed_ips", ["10.0.0.0/33"]),), 'security.allowed_ips[0]: "10.0.0.0/33" is not'),
    (
        (("security.auth_fail_ban_threshold", -1),),
        "security.auth_fail_ban_threshold: must be at least 0",
    ),
    ((("oauth.jwt_username_claim", ""),), "oauth.jwt_username_claim: must not be empty"),
    ((("destination.main", "oops"),), "destination.main: must be a table, not a string"),
    ((("server.unknown_thing", 1),), "server.unknown_thing: unknown key"),
    ((("listeners", {}),), 'listeners: unknown key (did you mean "listener"?)'),
    ((("server.log_levle", "info"),), 'server.log_levle: unknown key (did you mean "log_level"?)'),
    (
        (("listener.imap.proxy_trusteds", []),),
        'listener.imap.proxy_trusteds: unknown key (did you mean "proxy_trusted"?)',
    ),
]


@pytest.mark.parametrize(
    ("changes", "expected"),
    ERROR_CASES,
    ids=[case[1].split(":")[0] + f"#{i}" for i, case in enumerate(ERROR_CASES)],
)
def test_each_problem_is_reported_at_its_key(base_dir: Path, changes: tuple, expected: str) -> None:
    found = problems_of(base_dir, with_(*changes))
    assert any(p.startswith(expected) for p in found), found


def test_every_problem_is_collected_at_once(base_dir: Path) -> None:
    found = problems_of(
        base_dir,
        with_(
            ("server.shutdown_grace", 30),
            ("listener.imap.bind", ["1.2.3.4", "[::1]:143", "nope"]),
            ("routing.default_destination", "elsewhere"),
            ("mapping.source", "sql"),
            ("cluster.node_id", 0),
        ),
    )
    keys = [p.split(": ", 1)[0] for p in found]
    assert keys == [
        "server.shutdown_grace",
        "listener.imap.bind[0]",
        "listener.imap.bind[2]",
        "mapping.sql",
        "cluster.node_id",
        "routing.default_destination",
    ]


def test_config_error_lists_problems() -> None:
    error = ConfigError([Problem("a.b", "bad"), Problem("c", "worse")])
    assert str(error) == "a.b: bad\nc: worse"
    assert str(error.problems[0]) == "a.b: bad"


def test_keys_with_special_names_are_quoted(base_dir: Path) -> None:
    document = with_(("listener.imap.bind", ["x"]))
    document["listener"]["imap.v2"] = document["listener"].pop("imap")
    assert problems_of(base_dir, document)[0].startswith('listener."imap.v2".bind[0]:')


# --- durations ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0s", 0.0),
        ("250ms", 0.25),
        ("30s", 30.0),
        ("10m", 600.0),
        ("2h", 7200.0),
        ("1d", 86400.0),
        (" 5s ", 5.0),
        ("5 s", 5.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "30", "1.5s", "-1s", "10x", "s", "10 m s", "1e3s"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


@given(st.integers(min_value=0, max_value=10**9), st.sampled_from(sorted(UNITS)))
def test_duration_round_trip(value: int, unit: str) -> None:
    assert parse_duration(f"{value}{unit}") == pytest.approx(value * UNITS[unit])


def test_bare_integer_duration_names_the_key(base_dir: Path) -> None:
    found = problems_of(base_dir, with_(("server.backend_timeout", 10)))
    assert found == [
        (
            "server.backend_timeout: must be a duration string with a unit (ms s m h d), "
            'e.g. "10s"; a bare number is ambiguous'
        )
    ]


def test_durations_become_float_seconds(base_dir: Path) -> None:
    config = parse(
        base_dir, with_(("server.bridge_idle", "45m"), ("mapping.lookup_timeout", "1500ms"))
    )
    assert config.server.bridge_idle == 2700.0
    assert config.mapping.lookup_timeout == 1.5


# --- addresses and CIDRs -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.0.0.0:993", ("0.0.0.0", 993)),
        ("[::]:993", ("::", 993)),
        ("[2001:DB8::1]:25", ("2001:db8::1", 25)),
        ("[::ffff:10.0.0.1]:143", ("::ffff:a00:1", 143)),
        ("127.0.0.1:0", ("127.0.0.1", 0)),
    ],
)
def test_parse_address(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "1.2.3.4",
        "::1:993",
        "[127.0.0.1]:993",
        "[::1]993",
        "localhost:25",
        "1.2.3.4:",
        "1.2.3.4:x",
        "1.2.3.4:65536",
        "[::1]:-1",
        "",
    ],
)
def test_parse_address_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_address(text)


@given(st.ip_addresses(), st.integers(min_value=0, max_value=65535))
def test_address_round_trip(ip: Any, port: int) -> None:
    text = f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
    assert parse_address(text) == (str(ip), port)


def test_parse_cidr() -> None:
    assert parse_cidr("10.0.0.0/8") == ipaddress.ip_network("10.0.0.0/8")
    assert parse_cidr("10.1.2.3/8") == ipaddress.ip_network("10.0.0.0/8")  # host bits tolerated
    assert parse_cidr("192.0.2.7") == ipaddress.ip_network("192.0.2.7/32")
    assert parse_cidr("2001:db8::/32").version == 6
    with pytest.raises(ValueError):
        parse_cidr("10.0.0.0/40")


def test_ip_in_networks_matches_v4_mapped_peers() -> None:
    networks = [parse_cidr("10.0.0.0/8"), parse_cidr("2001:db8::/32")]
    assert ip_in_networks("10.1.2.3", networks)
    assert ip_in_networks("::ffff:10.1.2.3", networks)
    assert ip_in_networks(ipaddress.ip_address("::ffff:10.1.2.3"), networks)
    assert ip_in_networks("2001:db8::5", networks)
    assert not ip_in_networks("11.0.0.1", networks)
    assert not ip_in_networks("::ffff:11.0.0.1", networks)
    assert not ip_in_networks("not an ip", networks)
    assert not ip_in_networks("10.0.0.1", [])
    assert ip_in_networks("10.0.0.1", ["10.0.0.0/24"])  # string networks are accepted
    assert ip_in_networks("192.0.2.1", [parse_cidr("::ffff:0:0/96")])


@given(st.ip_addresses(v=4), st.ip_addresses(v=4), st.integers(min_value=0, max_value=32))
def test_v4_mapped_matching_agrees_with_plain_v4(peer: Any, base: Any, prefix: int) -> None:
    network = ipaddress.ip_network(f"{base}/{prefix}", strict=False)
    assert ip_in_networks(f"::ffff:{peer}", [network]) == (peer in network)


def test_listener_proxy_trusted_parsed_as_networks(base_dir: Path) -> None:
    config = parse(
        base_dir,
        with_(
            ("listener.imap.proxy_protocol", "deferred"),
            ("listener.imap.proxy_trusted", ["10.0.0.0/16", "192.0.2.1"]),
        ),
    )
    listener = config.listeners["imap"]
    assert listener.proxy_protocol == "deferred"
    assert listener.proxy_trusted == (
        ipaddress.ip_network("10.0.0.0/16"),
        ipaddress.ip_network("192.0.2.1/32"),
    )
    assert ip_in_networks("::ffff:10.0.3.4", listener.proxy_trusted)


def test_duplicate_binds_are_errors(base_dir: Path) -> None:
    found = problems_of(
        base_dir,
        with_(
            ("listener.imap2", {"protocol": "imap", "bind": ["127.0.0.1:1993"], "tls": "plain"}),
            ("listener.imap3", {"protocol": "imap", "bind": ["127.0.0.1:0"], "tls": "plain"}),
        ),
    )
    assert found == ["listener.imap2.bind: 127.0.0.1:1993 is already bound by listener.imap.bind"]


def test_ephemeral_ports_may_repeat(base_dir: Path) -> None:
    document = with_(
        ("listener.imap.bind", ["127.0.0.1:0"]),
        ("listener.imap2", {"protocol": "imap", "bind": ["127.0.0.1:0"], "tls": "plain"}),
    )
    assert len(parse(base_dir, document).listeners) == 2


# --- destinations ------------------------------------------------------------------------


def test_forwarding_inference_and_override(base_dir: Path) -> None:
    document = with_(
        (
            "destination.a",
            {"host": "a.example", "protocol": {"imap": {"port": 993, "tls": "implicit"}}},
        ),
        (
            "destination.b",
            {
                "host": "b.example",
                "proxy_protocol": False,
                "protocol": {"imap": {"port": 993, "tls": "implicit"}},
            },
        ),
        (
            "destination.c",
            {
                "host": "c.example",
                "forwarding": "xclient",
                "proxy_protocol": True,
                "protocol": {
                    "imap": {"port": 143, "tls": "starttls"},
                    "submission": {"port": 587, "tls": "starttls", "forwarding": "none"},
                },
            },
        ),
    )
    dests = parse(base_dir, document).destinations
    assert dests["a"].forwarding == "proxy"
    assert dests["b"].forwarding == "none"
    assert dests["c"].forwarding == "xclient"
    assert dests["c"].forwarding_for("imap") == "xclient"
    assert dests["c"].forwarding_for("submission") == "none"
    assert dests["c"].forwarding_for("pop3") == "xclient"  # undeclared protocol: the default
    assert dests["a"].protocols["imap"] == cfg.DestinationProtocolConfig(993, "implicit", None)


def test_destination_fields(base_dir: Path) -> None:
    pin = ":".join(["AB"] * 32)
    document = with_(
        ("destination.main.host", "10.0.0.5"),
        ("destination.main.tls_server_name", "backend.internal"),
        ("destination.main.tls_pinned_cert_sha256", pin),
        ("destination.main.source_ips", ["192.0.2.1", "2001:db8::1"]),
        ("destination.main.protocol.pop3", {"port": 110, "tls": "plain"}),
        ("destination.main.allow_plaintext_auth", True),
    )
    dest = parse(base_dir, document).destinations["main"]
    assert dest.name == "main"
    assert dest.tls_pinned_cert_sha256 == bytes([0xAB] * 32)
    assert dest.tls_server_name == "backend.internal"
    assert dest.source_ips == (
        ipaddress.ip_address("192.0.2.1"),
        ipaddress.ip_address("2001:db8::1"),
    )
    assert dest.host_is_ip
    assert (dest.proxy_protocol_version, dest.forwarded, dest.hide_auth_errors) == (2, False, False)


def test_tls_server_name_defaults_to_host(base_dir: Path) -> None:
    assert parse(base_dir).destinations["main"].tls_server_name == "backend.example.com"


def test_ip_host_without_tls_needs_no_server_name(base_dir: Path) -> None:
    document = with_(
        ("destination.main.host", "127.0.0.1"),
        ("destination.main.allow_plaintext_auth", True),
        ("destination.main.protocol.imap.tls", "plain"),
    )
    assert parse(base_dir, document).destinations["main"].tls_server_name == "127.0.0.1"


def test_invalid_certs_warns(base_dir: Path) -> None:
    config = parse(base_dir, with_(("destination.main.tls_allow_invalid_certs", True)))
    assert [w.key for w in config.warnings] == ["destination.main.tls_allow_invalid_certs"]


def test_client_cert_needs_key(base_dir: Path) -> None:
    (base_dir / "client.pem").write_text("x")
    found = problems_of(base_dir, with_(("destination.main.tls_client_cert", "client.pem")))
    assert found == [
        (
            "destination.main.tls_client_key: tls_client_cert and tls_client_key go "
            "together: set both or neither"
        )
    ]


def test_client_cert_pair_checked(base_dir: Path, tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path / "ca")
    one, two = ca.issue("one", client=True), ca.issue("two", client=True)
    document = with_(
        ("destination.main.tls_client_cert", str(one.cert_path)),
        ("destination.main.tls_client_key", str(one.key_path)),
        ("destination.main.tls_ca_file", str(ca.cert_path)),
    )
    dest = parse(base_dir, document).destinations["main"]
    assert dest.tls_client_cert == one.cert_path and dest.tls_ca_file == ca.cert_path
    put(document, "destination.main.tls_client_key", str(two.key_path))
    found = problems_of(base_dir, document)
    assert len(found) == 1 and found[0].startswith("destination.main.tls_client_key: ")
    assert "does not match" in found[0]


def test_ca_file_must_hold_certificates(base_dir: Path) -> None:
    (base_dir / "ca.pem").write_text("not a certificate\n")
    found = problems_of(base_dir, with_(("destination.main.tls_ca_file", "ca.pem")))
    assert found[0].startswith("destination.main.tls_ca_file: ")


# --- files -------------------------------------------------------------------------------


def test_relative_paths_resolve_against_the_config_directory(
    base_dir: Path, tmp_path: Path
) -> None:
    ca = CertificateAuthority(tmp_path / "tls")
    leaf = ca.issue("mail", dns_names=["mail.example.com", "*.example.org"])
    config_file = tmp_path / "stalroute.toml"
    config_file.write_text(
        MINIMAL_TOML
        + '\n[tls.certificate.main]\ncert = "tls/mail.pem"\nkey = "tls/mail.key"\n'
        + 'subjects = ["Mail.Example.com.", "*.example.org"]\n'
    )
    config = load_config(config_file, {})
    cert = config.tls.certificates["main"]
    assert cert.name == "main"
    assert cert.cert == leaf.cert_path and cert.key == leaf.key_path
    assert cert.subjects == ("mail.example.com", "example.org")
    assert config.mapping.settings.path == tmp_path / "mappings.tsv"
    assert config.source_path == config_file


MINIMAL_TOML = """
[routing]
default_destination = "main"

[mapping]
source = "file"

[mapping.file]
path = "mappings.tsv"

[destination.main]
host = "backend.example.com"

[destination.main.protocol.imap]
port = 993
tls = "implicit"

[listener.imap]
protocol = "imap"
bind = ["127.0.0.1:1993"]
tls = "plain"
"""


def test_missing_files_are_reported_against_their_keys(base_dir: Path) -> None:
    found = problems_of(
        base_dir,
        with_(
            (
                "tls.certificate.main",
                {"cert": "/nonexistent/cert.pem", "key": "/nonexistent/key.pem"},
            ),
            ("destination.main.tls_ca_file", "ca.pem"),
            ("admin", {"bind": "127.0.0.1:8443", "bearer_token_file": "admin.token"}),
        ),
    )
    assert found == [
        'tls.certificate.main.cert: "/nonexistent/cert.pem" does not exist',
        'tls.certificate.main.key: "/nonexistent/key.pem" does not exist',
        f'destination.main.tls_ca_file: "ca.pem" (resolved to {base_dir}/ca.pem) does not exist',
        (
            f'admin.bearer_token_file: "admin.token" (resolved to {base_dir}/admin.token) '
            "does not exist"
        ),
    ]


def test_check_files_false_skips_the_file_system(base_dir: Path) -> None:
    document = with_(
        ("tls.certificate.main", {"cert": "/nonexistent/cert.pem", "key": "/nonexistent/key.pem"}),
        ("mapping.file.path", "/nonexistent/mappings.tsv"),
        ("admin", {"bind": "127.0.0.1:8443", "bearer_token_file": "/nonexistent/token"}),
    )
    config = parse(base_dir, document, check_files=False)
    assert config.tls.certificates["main"].cert == Path("/nonexistent/cert.pem")
    assert config.admin.token is None and config.admin.token_source == "admin.bearer_token_file"


def test_path_components_over_255_bytes_are_problems_at_their_keys(base_dir: Path) -> None:
    """``Path.exists()`` raises ENAMETOOLONG for them; each is reported like a missing file."""
    long = "x" * 300
    found = problems_of(base_dir, with_(
        ("tls.certificate.main", {"cert": f"/{long}/cert.pem", "key": f"{long}.pem"}),
        ("destination.main.tls_ca_file", f"{long}/ca.pem"),
        ("mapping.file.path", long),
        ("admin", {"bind": "127.0.0.1:8443", "bearer_token_file": f"/tmp/{long}"}),
    ))
    keys = [problem.split(": ", 1)[0] for problem in found]
    assert keys == ["tls.certificate.main.cert", "tls.certificate.main.key",
                    "destination.main.tls_ca_file", "mapping.file.path",
                    "admin.bearer_token_file"]
    assert all(problem.endswith("cannot be used: File name too long") for problem in found)


def test_certificate_key_mismatch_and_garbage(base_dir: Path, tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path / "ca")
    one, two = ca.issue("one"), ca.issue("two")
    (base_dir / "junk.pem").write_text("junk")
    found = problems_of(
        base_dir,
        with_(
            ("tls.certificate.a", {"cert": str(one.cert_path), "key": str(two.key_path)}),
            ("tls.certificate.b", {"cert": "junk.pem", "key": str(two.key_path)}),
            ("tls.certificate.c", {"cert": str(two.cert_path), "key": "junk.pem"}),
        ),
    )
    assert [p.split(": ")[0] for p in found] == [
        "tls.certificate.a.key",
        "tls.certificate.b.cert",
        "tls.certificate.c.key",
    ]
    assert "does not match" in found[0]


def test_only_one_default_certificate(base_dir: Path, tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path / "ca")
    one = ca.issue("one")
    pair = {"cert": str(one.cert_path), "key": str(one.key_path), "default": True}
    found = problems_of(base_dir, with_(("tls.certificate.a", pair), ("tls.certificate.b", pair)))
    assert found == [
        'tls.certificate.b.default: only one certificate may be the default (already "a")'
    ]


def test_tls_listener_without_certificate_warns(base_dir: Path) -> None:
    config = parse(base_dir, with_(("listener.imap.tls", "implicit")))
    assert [w.key for w in config.warnings] == ["tls.certificate"]


# --- cipher suites -----------------------------------------------------------------------


def test_cipher_suites_translate_iana_to_openssl(base_dir: Path) -> None:
    config = parse(
        base_dir,
        with_(
            (
                "tls.protocols.disable_cipher_suites",
                [
                    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
                    "ECDHE-RSA-AES256-GCM-SHA384",
                    "TLS_CHACHA20_POLY1305_SHA256",
                ],
            )
        ),
    )
    assert config.tls.protocols.disable_cipher_suites == (
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "TLS_CHACHA20_POLY1305_SHA256",
    )


def test_cipher_table_is_tls12_and_tls13_only() -> None:
    table = tls_ciphers.IANA_TO_OPENSSL_CIPHERS
    assert table["TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384"] == "ECDHE-ECDSA-AES256-GCM-SHA384"
    assert table["TLS_AES_128_GCM_SHA256"] == "TLS_AES_128_GCM_SHA256"
    assert "TLS_RSA_WITH_RC4_128_SHA" not in table
    assert tls_ciphers.openssl_cipher_name("NOT-A-CIPHER") is None


def test_unknown_cipher_suite(base_dir: Path) -> None:
    found = problems_of(
        base_dir,
        with_(("tls.protocols.disable_cipher_suites", ["TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA265"])),
    )
    assert found == [
        (
            'tls.protocols.disable_cipher_suites[0]: "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA265" '
            "is not a TLS 1.2/1.3 cipher suite known to OpenSSL (IANA or OpenSSL name) "
            '(did you mean "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256"?)'
        )
    ]


def test_removing_every_cipher_suite_is_an_error(base_dir: Path) -> None:
    document = with_(
        ("tls.protocols.min_version", "1.3"),
        (
            "tls.protocols.disable_cipher_suites",
            ["TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256", "TLS_AES_128_GCM_SHA256"],
        ),
    )
    assert problems_of(base_dir, document) == [
        "tls.protocols.disable_cipher_suites: removes every cipher suite available with TLS 1.3"
    ]
    put(document, "tls.protocols.min_version", "1.2")  # TLS 1.2 suites remain
    assert parse(base_dir, document).tls.protocols.min_version == "1.2"


# --- mapping -----------------------------------------------------------------------------


def test_sql_mapping_and_writability(base_dir: Path) -> None:
    sql = {"url": "postgresql://u:pw@db/routing", "query": "SELECT d FROM m WHERE id = $1"}
    config = parse(base_dir, with_(("mapping.source", "sql"), ("mapping.sql", dict(sql))))
    assert config.mapping.source == "sql" and config.mapping.settings.backend == "postgresql"
    assert not config.mapping.settings.writable and not config.mapping.writable
    assert config.mapping.settings.pool_size == 16
    assert "pw" not in repr(config.mapping)

    sql.update(upsert_query="INSERT INTO m VALUES ($1, $2)",
               delete_query="DELETE FROM m WHERE id = $1")
    config = parse(base_dir, with_(("mapping.source", "sql"), ("mapping.sql", sql)))
    assert config.mapping.settings.writable and config.mapping.writable

    half = dict(sql, delete_query=None)
    del half["delete_query"]
    config = parse(base_dir, with_(("mapping.source", "sql"), ("mapping.sql", half)))
    assert [w.key for w in config.warnings] == ["mapping.sql"]


def test_sqlite_source_is_sql_with_a_sqlite_url(base_dir: Path) -> None:
    config = parse(
        base_dir,
        with_(
            ("mapping.source", "sqlite"),
            (
                "mapping.sql",
                {
                    "url": "sqlite:///var/lib/stalroute/map.db",
                    "query": "SELECT d FROM m WHERE id = ?",
                },
            ),
        ),
    )
    assert config.mapping.source == "sql"
    assert config.mapping.settings.backend == "sqlite"
    assert config.mapping.settings.sqlite_path == "/var/lib/stalroute/map.db"


def test_redis_mapping_defaults(base_dir: Path) -> None:
    config = parse(
        base_dir,
        with_(("mapping.source", "redis"), ("mapping.redis", {"url": "rediss://:pw@cache:6380/2"})),
    )
    assert config.mapping.settings.key_prefix == "route:"
    assert config.mapping.settings.pool_size == 16
    assert config.mapping.writable
    assert "pw" not in repr(config.mapping.settings)


def test_url_values_are_never_echoed(base_dir: Path) -> None:
    found = problems_of(
        base_dir,
        with_(
            ("mapping.source", "sql"),
            ("mapping.sql", {"url": "mysql://u:hunter2@db/x", "query": "q"}),
        ),
    )
    assert "hunter2" not in "\n".join(found)


# --- http --------------------------------------------------------------------------------


def test_http_routes(base_dir: Path) -> None:
    document = with_(
        ("destination.main.protocol.http", {"port": 443, "tls": "implicit"}),
        (
            "destination.new",
            {"host": "new.example", "protocol": {"http": {"port": 443, "tls": "implicit"}}},
        ),
        (
            "listener.web",
            {
                "protocol": "http",
                "bind": ["127.0.0.1:8443"],
                "tls": "implicit",
                "forwarded": "trust",
            },
        ),
        (
            "http",
            {
                "health": False,
                "route": [
                    {"match": "/admin/**", "destination": "new"},
                    {
                        "match": "/auth/token",
                        "extract": {"from": "body", "regex": "client_id=([^&]+)"},
                        "fallback": "main",
                    },
                    {"match": "/q", "extract": {"from": "query", "param": "user"}},
                    {"match": "/h", "extract": {"from": "header", "header": "X-User"}},
                    {"match": "/**", "extract": {"from": "authorization"}, "fallback": "default"},
                ],
            },
        ),
    )
    config = parse(base_dir, document)
    routes = config.http.routes
    assert config.http.health is False
    assert [r.match for r in routes] == ["/admin/**", "/auth/token", "/q", "/h", "/**"]
    assert routes[0].destination == "new" and routes[0].extract is None
    assert routes[1].extract.from_ == "body"
    assert routes[1].extract.regex.search("a=1&client_id=webui&x").group(1) == "webui"
    assert routes[2].extract.param == "user" and routes[3].extract.header == "X-User"
    assert routes[4].fallback == "main"  # "default" resolved to routing.default_destination
    assert config.listeners["web"].forwarded == "trust"


def test_fallback_default_names_a_destination_called_default(base_dir: Path) -> None:
    document = with_(
        ("destination.main.protocol.http", {"port": 443, "tls": "implicit"}),
        (
            "destination.default",
            {"host": "d.example", "protocol": {"http": {"port": 443, "tls": "implicit"}}},
        ),
        (
            "http.route",
            [{"match": "/**", "extract": {"from": "authorization"}, "fallback": "default"}],
        ),
    )
    assert parse(base_dir, document).http.routes[0].fallback == "default"


# --- admin token -------------------------------------------------------------------------


def admin_document(base_dir: Path, **admin: Any) -> dict[str, Any]:
    return with_(("admin", {"bind": "127.0.0.1:8443", **admin}))


def test_admin_defaults(base_dir: Path) -> None:
    admin = parse(base_dir, admin_document(base_dir, bearer_token=TOKEN)).admin
    assert admin.bind == ("127.0.0.1", 8443)
    assert (admin.tls, admin.min_token_len, admin.lockout_threshold, admin.lockout_duration) == (
        "implicit",
        32,
        5,
        300.0,
    )
    assert admin.token == TOKEN and admin.token_source == "admin.bearer_token"
    assert admin.certificate is None


def test_admin_token_precedence(base_dir: Path) -> None:
    (base_dir / "admin.token").write_text("F" * 40 + "\n")
    (base_dir / "admin.token").chmod(0o600)
    document = admin_document(base_dir, bearer_token_file="admin.token", bearer_token=TOKEN)

    admin = parse(
        base_dir, document, env={"STALROUTE_ADMIN_TOKEN": "E" * 40, "PROXY_ADMIN_TOKEN": "P" * 40}
    ).admin
    assert (admin.token, admin.token_source) == ("E" * 40, "$STALROUTE_ADMIN_TOKEN")

    admin = parse(base_dir, document, env={"PROXY_ADMIN_TOKEN": "P" * 40}).admin
    assert (admin.token, admin.token_source) == ("P" * 40, "$PROXY_ADMIN_TOKEN")

    admin = parse(base_dir, document).admin
    assert (admin.token, admin.token_source) == ("F" * 40, "admin.bearer_token_file")
    assert admin.bearer_token_file == base_dir / "admin.token"

    del document["admin"]["bearer_token_file"]
    assert parse(base_dir, document).admin.token == TOKEN


def test_world_readable_token_file_warns(base_dir: Path) -> None:
    (base_dir / "admin.token").write_text("F" * 40)
    (base_dir / "admin.token").chmod(0o644)
    config = parse(base_dir, admin_document(base_dir, bearer_token_file="admin.token"))
    assert "admin.bearer_token_file" in [w.key for w in config.warnings]


def test_short_token_is_an_error_that_never_shows_it(base_dir: Path) -> None:
    secret = "tiny-secret-value"
    for env, document in [
        ({"STALROUTE_ADMIN_TOKEN": secret}, admin_document(base_dir, bearer_token=TOKEN)),
        ({}, admin_document(base_dir, bearer_token=secret)),
    ]:
        with pytest.raises(ConfigError) as info:
            parse(base_dir, document, env=env)
        text = str(info.value) + repr(info.value.problems)
        assert secret not in text
        assert "min_token_len requires at least 32" in text

    (base_dir / "admin.token").write_text(secret)
    (base_dir / "admin.token").chmod(0o600)
    found = problems_of(base_dir, admin_document(base_dir, bearer_token_file="admin.token"))
    assert found == [
        (
            "admin.bearer_token_file: the token has 17 characters; admin.min_token_len "
            "requires at least 32"
        )
    ]


def test_token_never_in_repr(base_dir: Path) -> None:
    config = parse(base_dir, admin_document(base_dir, bearer_token=TOKEN))
    assert TOKEN not in repr(config) and TOKEN not in repr(config.admin)


def test_bearer_token_of_wrong_type_is_not_echoed(base_dir: Path) -> None:
    found = problems_of(base_dir, admin_document(base_dir, bearer_token=123456789))
    assert found == ["admin.bearer_token: must be a string, not an integer"]


def test_token_with_spaces_is_rejected(base_dir: Path) -> None:
    found = problems_of(base_dir, admin_document(base_dir, bearer_token="a" * 20 + " " + "b" * 20))
    assert found == ["admin.bearer_token: the token must not contain spaces or control characters"]


def test_min_token_len_is_configurable(base_dir: Path) -> None:
    config = parse(base_dir, admin_document(base_dir, bearer_token="x" * 8, min_token_len=8))
    assert config.admin.token == "x" * 8


# --- environment -------------------------------------------------------------------------


def test_log_level_environment_beats_the_file(base_dir: Path) -> None:
    document = with_(("server.log_level", "warn"))
    assert parse(base_dir, document).server.log_level == "warn"
    assert (
        parse(base_dir, document, env={"STALROUTE_LOG_LEVEL": "DEBUG"}).server.log_level == "debug"
    )
    found = problems_of(base_dir, document, env={"STALROUTE_LOG_LEVEL": "loud"})
    assert found == [
        (
            '$STALROUTE_LOG_LEVEL: "loud" is not one of "trace", "debug", "info", "warn", '
            '"warning", "error", "critical"'
        )
    ]


def test_config_path_from_env() -> None:
    assert cfg.config_path_from_env({"STALROUTE_CONFIG": "/a", "PROXY_CONFIG": "/b"}) == "/a"
    assert cfg.config_path_from_env({"PROXY_CONFIG": "/b"}) == "/b"
    assert cfg.config_path_from_env({}) is None


# --- cluster and security ----------------------------------------------------------------


def test_cluster_and_security(base_dir: Path) -> None:
    config = parse(
        base_dir,
        with_(
            ("cluster", {"node_id": 7, "coordinator": "postgresql", "url": "postgres://db/x"}),
            (
                "security",
                {
                    "allowed_ips": ["10.0.0.0/8"],
                    "auth_fail_ban_threshold": 5,
                    "auth_fail_ban_window": "5m",
                    "ban_duration": "1h",
                },
            ),
        ),
    )
    assert config.cluster.node_id == 7 and config.cluster.coordinator == "postgresql"
    assert config.security.allowed_ips == (ipaddress.ip_network("10.0.0.0/8"),)
    assert (config.security.auth_fail_ban_window, config.security.ban_duration) == (300.0, 3600.0)


# --- load_config and the shipped configurations ------------------------------------------


def test_load_config_reports_toml_syntax_errors(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[server\nhostname = 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    [problem] = info.value.problems
    assert problem.key == str(path) and problem.message.startswith("invalid TOML:")


def test_load_config_reports_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.toml", {})
    assert "cannot read the file" in str(info.value)


SHIPPED = [REPO / "etc" / "stalroute.toml", *sorted((REPO / "etc" / "examples").glob("*.toml"))]


def test_every_scenario_has_an_example() -> None:
    names = {p.name for p in SHIPPED}
    assert {
        "dovecot-postfix-to-stalwart.toml",
        "stalwart-upgrade-with-http.toml",
        "cluster-cache-locality-postgresql.toml",
        "behind-load-balancer.toml",
    } <= names


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_configurations_load(path: Path) -> None:
    config = load_config(path, {}, check_files=False)
    assert config.listeners and config.destinations
    assert config.admin is not None


def test_dovecot_example_uses_both_forwarding_modes() -> None:
    config = load_config(
        REPO / "etc/examples/dovecot-postfix-to-stalwart.toml", {}, check_files=False
    )
    assert config.destinations["legacy"].forwarding_for("imap") == "xclient"
    assert config.destinations["stalwart"].forwarding_for("smtp") == "proxy"
    assert len(config.destinations["legacy"].tls_pinned_cert_sha256) == 32


# A configuration in the reference product's schema (Stalwart migration proxy), written from its
# documented examples: it must load unchanged.
REFERENCE_STYLE = """
[server]
threads = 0
hostname = "mx.example.net"
shutdown_grace = "30s"
log_level = "info"

[tls.certificate.default]
cert = "/etc/proxy/tls/fullchain.pem"
key = "/etc/proxy/tls/privkey.pem"
default = true

[tls.protocols]
min_version = "1.2"

[routing]
default_destination = "legacy"
smtp_passthrough_destination = "stalwart"

[mapping]
source = "file"
normalize = "lowercase"
negative_ttl = "30s"
positive_ttl = "10m"

[mapping.file]
path = "/etc/proxy/mappings.tsv"

[destination.legacy]
host = "192.0.2.10"
tls_server_name = "legacy.example.net"
forwarding = "xclient"
tls_allow_invalid_certs = true

[destination.legacy.protocol.imap]
port = 143
tls = "starttls"
[destination.legacy.protocol.pop3]
port = 110
tls = "starttls"
[destination.legacy.protocol.submission]
port = 587
tls = "starttls"
[destination.legacy.protocol.managesieve]
port = 4190
tls = "starttls"
[destination.legacy.protocol.http]
port = 443
tls = "implicit"

[destination.stalwart]
host = "stalwart.example.net"
proxy_protocol = true
forwarded = true

[destination.stalwart.protocol.imap]
port = 993
tls = "implicit"
[destination.stalwart.protocol.http]
port = 443
tls = "implicit"
[destination.stalwart.protocol.smtp]
port = 25
tls = "plain"

[capabilities.imap]
allow_plain_auth_without_tls = false

[oauth]
jwt_username_claim = "email"

[listener.imap]
protocol = "imap"
bind = ["0.0.0.0:993", "[::]:993"]
tls = "implicit"

[listener.imap-starttls]
protocol = "imap"
bind = ["0.0.0.0:143", "[::]:143"]
tls = "starttls"

[listener.pop3]
protocol = "pop3"
bind = ["0.0.0.0:995"]
tls = "implicit"

[listener.submission]
protocol = "submission"
bind = ["0.0.0.0:587"]
tls = "starttls"

[listener.managesieve]
protocol = "managesieve"
bind = ["0.0.0.0:4190"]
tls = "starttls"

[listener.https]
protocol = "http"
bind = ["0.0.0.0:443"]
tls = "implicit"
forwarded = "off"

[listener.smtp]
protocol = "smtp"
bind = ["0.0.0.0:25"]
tls = "plain"
proxy_protocol = "optional"
proxy_trusted = ["10.0.0.0/8"]

[http]
body_extract_cap = 65536
max_head_size = 65536
relay_idle = "60s"
keepalive_timeout = "75s"
max_keepalive_requests = 1000

[[http.route]]
match = "/.well-known/**"
destination = "legacy"

[[http.route]]
match = "/auth/token"
extract = { from = "body", regex = "client_id=([^&]+)" }
fallback = "legacy"

[[http.route]]
match = "/**"
extract = { from = "authorization" }
fallback = "default"

[admin]
bind = "127.0.0.1:9443"
tls = "implicit"
bearer_token_file = "/etc/proxy/admin.token"
min_token_len = 32
lockout_threshold = 5
lockout_duration = "5m"
"""


def test_reference_product_configuration_loads_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(REFERENCE_STYLE)
    config = load_config(path, {"PROXY_ADMIN_TOKEN": TOKEN}, check_files=False)
    assert len(config.listeners) == 7 and set(config.destinations) == {"legacy", "stalwart"}
    assert config.destinations["legacy"].forwarding_for("imap") == "xclient"
    assert config.destinations["stalwart"].forwarding_for("smtp") == "proxy"
    assert config.http.routes[2].fallback == "legacy"
    assert config.http.relay_idle == 60.0
    assert config.admin.token == TOKEN


# --- stalroute check ---------------------------------------------------------------------


def test_check_ok(base_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = base_dir / "stalroute.toml"
    path.write_text(MINIMAL_TOML)
    assert main(["check", str(path)]) == 0
    out, err = capsys.readouterr()
    assert out == f"OK: {path} (1 listeners, 1 destinations)\n"
    assert err == ""


def test_check_prints_every_problem(base_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = base_dir / "stalroute.toml"
    path.write_text(
        MINIMAL_TOML.replace('"127.0.0.1:1993"', '"127.0.0.1"')
        + "\n[server]\nworkers = -1\nshutdown_grace = 5\n"
    )
    assert main(["check", str(path)]) == 1
    out, _ = capsys.readouterr()
    assert out.splitlines() == [
        (
            'server.shutdown_grace: must be a duration string with a unit (ms s m h d), e.g. "5s"; '
            "a bare number is ambiguous"
        ),
        "server.workers: must be at least 0, not -1",
        'listener.imap.bind[0]: "127.0.0.1" is not an address (ip:port or [v6]:port)',
    ]


def test_check_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(tmp_path / "none.toml")]) == 1
    assert "cannot read the file" in capsys.readouterr().out


def test_check_uses_the_environment(
    base_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = base_dir / "stalroute.toml"
    path.write_text(MINIMAL_TOML.replace('tls = "plain"', 'tls = "implicit"'))
    monkeypatch.setenv("STALROUTE_CONFIG", str(path))
    assert main(["check"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("OK: ") and err.startswith("warning: tls.certificate: ")
    monkeypatch.delenv("STALROUTE_CONFIG")
    monkeypatch.delenv("PROXY_CONFIG", raising=False)
    assert main(["check"]) == 2


def test_check_reports_non_ascii_capabilities(
    base_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = base_dir / "stalroute.toml"
    path.write_text(MINIMAL_TOML + '\n[capabilities.imap]\nadvertise = ["IMAP4rev1", "ÜBER"]\n',
                    encoding="utf-8")
    assert main(["check", str(path)]) == 1
    out, _ = capsys.readouterr()
    assert out.splitlines() == [
        'capabilities.imap.advertise[1]: "ÜBER" is not an IMAP capability: an atom of printable '
        'ASCII without spaces or ( ) { % * " \\ ]']


#: Mapping files refused as a whole, and the problem named: the first two are unreadable
#: lines, the last a destination the configuration does not declare.
BAD_MAPPING_FILES = [
    (b"bob main\n\xff\xfe main\n", "line 2: not UTF-8 text"),
    (b"b\"ob main\n", "line 1: invalid identifier (identifier contains a quote or backslash)"),
    (b"bob nowhere\n", "line 1: unknown destination 'nowhere'"),
]


@pytest.mark.parametrize(("content", "problem"), BAD_MAPPING_FILES)
def test_check_reports_a_bad_mapping_file_as_one_problem(
    base_dir: Path, capsys: pytest.CaptureFixture[str], content: bytes, problem: str
) -> None:
    (base_dir / "mappings.tsv").write_bytes(content)
    path = base_dir / "stalroute.toml"
    path.write_text(MINIMAL_TOML)
    assert main(["check", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == f"mapping.file.path: {base_dir / 'mappings.tsv'}: {problem}\n"
    assert "Traceback" not in err


def test_check_of_a_config_path_too_long_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / ("x" * 300 + ".toml")
    assert main(["check", str(path)]) == 1
    assert capsys.readouterr().out == f"{path}: cannot read the file: File name too long\n"


def twistd_startup(config_path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """What ``twistd stalroute --config config_path`` prints when startup is refused: the
    plugin must stop with exit status 1 (a SystemExit, which twistd does not print as a
    traceback); its stderr is returned."""
    with pytest.raises(SystemExit) as stopped:
        plugin_service(config_path)
    assert stopped.value.code == 1
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    return err


@pytest.mark.parametrize(("content", "problem"), BAD_MAPPING_FILES[:2])
def test_startup_with_a_bad_mapping_file_is_one_line(
    base_dir: Path, capsys: pytest.CaptureFixture[str], content: bytes, problem: str
) -> None:
    (base_dir / "mappings.tsv").write_bytes(content)
    path = base_dir / "stalroute.toml"
    path.write_text(MINIMAL_TOML)
    assert twistd_startup(path, capsys) == \
        f"{path}: mapping.file.path: {base_dir / 'mappings.tsv'}: {problem}\n"


def test_startup_with_a_config_path_too_long_is_one_line_naming_it_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / ("x" * 300 + ".toml")
    assert twistd_startup(path, capsys) == f"{path}: cannot read the file: File name too long\n"


def test_startup_with_a_file_path_too_long_in_the_config_is_one_line(
    base_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    long = "x" * 300
    path = base_dir / "stalroute.toml"
    path.write_text(MINIMAL_TOML.replace('path = "mappings.tsv"', f'path = "{long}"'))
    assert twistd_startup(path, capsys) == \
        f'{path}: mapping.file.path: "{long}" (resolved to {base_dir / long}) cannot be used: ' \
        "File name too long\n"


def test_check_skip_files_validates_a_config_for_another_host(
    base_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Files named by the config are neither read nor looked for; everything else is checked."""
    elsewhere = MINIMAL_TOML.replace('path = "mappings.tsv"', 'path = "/srv/other/map.tsv"') + (
        '\n[tls.certificate.main]\ncert = "/etc/other/cert.pem"\nkey = "/etc/other/key.pem"\n'
        '\n[admin]\nbind = "127.0.0.1:8443"\nbearer_token_file = "/etc/other/token"\n'
    )
    path = base_dir / "stalroute.toml"
    path.write_text(elsewhere)
    assert main(["check", str(path)]) == 1
    assert "does not exist" in capsys.readouterr().out
    assert main(["check", "--skip-files", str(path)]) == 0
    out, err = capsys.readouterr()
    assert out == f"OK: {path} (1 listeners, 1 destinations; files not checked)\n"
    assert err == ""

    path.write_text(elsewhere + '\n[capabilities.pop3]\nbanner = "héllo"\n[server]\nworkers = -1\n',
                    encoding="utf-8")
    assert main(["check", "--skip-files", str(path)]) == 1
    assert capsys.readouterr().out.splitlines() == [
        "server.workers: must be at least 0, not -1",
        'capabilities.pop3.banner: "héllo" is not printable ASCII text (characters 32 to 126; '
        "no accents or tabs)",
    ]


def test_check_skip_files_still_checks_store_settings(
    base_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    redis = MINIMAL_TOML.replace('source = "file"', 'source = "redis"').replace(
        '[mapping.file]\npath = "mappings.tsv"',
        '[mapping.redis]\nurl = "rediss://cache:6380/0?ssl_ca_certs=/etc/other/ca.pem&tls=1"')
    path = base_dir / "stalroute.toml"
    path.write_text(redis)
    assert main(["check", "--skip-files", str(path)]) == 1
    assert capsys.readouterr().out.startswith("mapping.redis.url: unknown parameter 'tls'")
    path.write_text(redis.replace("&tls=1", ""))
    assert main(["check", "--skip-files", str(path)]) == 0
    sqlite = MINIMAL_TOML.replace('source = "file"', 'source = "sqlite"').replace(
        '[mapping.file]\npath = "mappings.tsv"',
        '[mapping.sql]\nurl = "sqlite:///srv/other/m.db"\nquery = "SELECT d FROM m"')
    path.write_text(sqlite)
    capsys.readouterr()
    assert main(["check", "--skip-files", str(path)]) == 1
    assert capsys.readouterr().out.startswith("mapping.sql.query: must use $1")


def test_check_requires_a_subcommand() -> None:
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2


def test_python_dash_m_runs_the_cli(base_dir: Path) -> None:
    path = base_dir / "stalroute.toml"
    path.write_text(MINIMAL_TOML)
    result = subprocess.run(
        [sys.executable, "-m", "stalroute", "check", str(path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("OK: ")


# --- smaller behaviours ------------------------------------------------------------------


def test_master_user_separators(base_dir: Path) -> None:
    config = parse(base_dir, with_(("routing.master_user_separators", ["%", "*"])))
    assert config.routing.master_user_separators == ("%", "*")
    found = problems_of(base_dir, with_(("routing.master_user_separators", ["%", ""])))
    assert found == ["routing.master_user_separators[1]: must not be empty"]


def test_sqlite_memory_url(base_dir: Path) -> None:
    config = parse(
        base_dir,
        with_(
            ("mapping.source", "sql"),
            ("mapping.sql", {"url": "sqlite:///:memory:", "query": "SELECT d FROM m WHERE id = ?"}),
        ),
    )
    assert config.mapping.settings.sqlite_path == ":memory:"


@pytest.mark.parametrize(
    ("changes", "warning_key"),
    [
        ((("listener.imap.forwarded", "trust"),), "listener.imap.forwarded"),
        ((("destination.spare", {"host": "spare.example"}),), "destination.spare.protocol"),
        (
            (
                ("destination.main.protocol.http", {"port": 443, "tls": "implicit"}),
                ("http.route", [{"match": "/**", "destination": "main", "fallback": "main"}]),
            ),
            "http.route[0].fallback",
        ),
        ((("server.bridge_idle", "10m"),), "server.bridge_idle"),
    ],
)
def test_warnings(base_dir: Path, changes: tuple, warning_key: str) -> None:
    config = parse(base_dir, with_(*changes))
    assert [w.key for w in config.warnings] == [warning_key]


def test_admin_certificate_reference(base_dir: Path, tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path / "ca")
    leaf = ca.issue("admin")
    config = parse(
        base_dir,
        with_(
            ("tls.certificate.admin", {"cert": str(leaf.cert_path), "key": str(leaf.key_path)}),
            ("admin", {"bind": "[::1]:8443", "bearer_token": TOKEN, "certificate": "admin"}),
        ),
    )
    assert config.admin.certificate == "admin" and config.admin.bind == ("::1", 8443)
    assert config.warnings == ()


def test_default_destination_property(base_dir: Path) -> None:
    config = parse(base_dir)
    assert config.default_destination is config.destinations["main"]


def test_deferred_proxy_header_is_refused_on_passthrough_listeners(base_dir: Path) -> None:
    document = with_(
        ("listener.mx", {"protocol": "smtp", "bind": ["127.0.0.1:2525"], "tls": "plain",
                         "proxy_protocol": "deferred", "proxy_trusted": ["10.0.0.0/8"]}),
    )
    problems = problems_of(base_dir, document)
    assert any(p.startswith("listener.mx.proxy_protocol:") and "deferred" in p for p in problems)
