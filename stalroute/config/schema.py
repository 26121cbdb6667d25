"""The configuration schema (SPEC §2): frozen dataclasses, one per TOML section.

The dataclasses *are* the schema: every field declared with
:func:`~stalroute.config.reader.setting` is a TOML key of the same name (``from`` is the one
exception, spelled ``from_``), its default is the SPEC default, and its converter
(:mod:`stalroute.config.converters`) turns the TOML value into the Python value the rest of
the code uses.  Fields without ``setting``
are filled in by the section builders (:mod:`stalroute.config.sections`).  The ``[mapping]``
section and its store kinds are in :mod:`stalroute.config.stores`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from stalroute.config import converters as conv
from stalroute.config.reader import Problem, setting
from stalroute.config.protocols import (
    CAPABILITY_DEFAULTS,
    DEFAULT_BANNER,
    LISTENER_PROTOCOLS,
)
from stalroute.config.stores import MappingConfig
from stalroute.net import IPAddress, IPNetwork, is_ip
from stalroute.sasl import MECHANISMS

# --- vocabulary --------------------------------------------------------------------------

TLS_MODES = ("implicit", "starttls", "plain")
FORWARDING_MODES = ("proxy", "xclient", "none")
LOG_LEVELS = ("trace", "debug", "info", "warn", "warning", "error", "critical")

#: Environment variables, with the reference product's names accepted as aliases.
ENV_CONFIG = ("STALROUTE_CONFIG", "PROXY_CONFIG")
ENV_ADMIN_TOKEN = ("STALROUTE_ADMIN_TOKEN", "PROXY_ADMIN_TOKEN")
ENV_LOG_LEVEL = "STALROUTE_LOG_LEVEL"

# Text stalroute puts on the wire as written: (pattern, what the operator is told it must be).
#: A banner or implementation name: text of printable ASCII, spaces included.
_BANNER = (r"[ -~]*", "printable ASCII text (characters 32 to 126; no accents or tabs)")
#: ``server.hostname``: the name in SMTP greetings and EHLO (RFC 5321 §4.1.2, ASCII only).
_HOSTNAME = (r"[!-~]+", "a printable ASCII host name (write an internationalised name in "
                        "its xn-- form)")
#: ``[capabilities.imap] advertise``: a capability is an IMAP atom (RFC 9051 §9).
_IMAP_CAPABILITY = (r'[^\x00-\x20\x7f-\U0010ffff(){%*"\\\]]+',
                    'an IMAP capability: an atom of printable ASCII without spaces or '
                    '( ) { % * " \\ ]')
#: ``[capabilities.submission] ehlo``: an EHLO keyword (RFC 5321 §4.1.1.1).
_EHLO_KEYWORD = (r"[A-Za-z0-9][A-Za-z0-9-]*",
                 "an EHLO keyword: ASCII letters, digits and hyphens, not starting with a hyphen")
#: ``[capabilities.managesieve] sieve``: a Sieve extension name, sent in a quoted string.
_SIEVE_EXTENSION = (r'[!#-\[\]-~]+', "a Sieve extension name: printable ASCII without spaces, "
                                    "quotes or backslashes")

# --- sections ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerConfig:
    """``[server]``: process-wide behaviour (SPEC §2.1)."""

    #: ``None`` in the file means ``socket.getfqdn()``, filled in by the validator.
    hostname: str = setting(conv.protocol_text(conv.word(), *_HOSTNAME), None)
    shutdown_grace: float = setting(conv.duration(), 30.0)
    bridge_idle: float = setting(conv.duration(positive=True), 1800.0)
    backend_timeout: float = setting(conv.duration(positive=True), 10.0)
    backend_connect_retries: int = setting(conv.integer(0, 100), 1)
    host_down_threshold: int = setting(conv.integer(0), 5)
    host_down_min_clients: int = setting(conv.integer(1), 2)
    host_down_cooldown: float = setting(conv.duration(positive=True), 30.0)
    proxy_ttl: int = setting(conv.integer(1, 255), 7)
    log_level: str = setting(conv.choice(*LOG_LEVELS), "info")
    #: ``json``: one flat JSON object per line (:func:`stalroute.logs.event_as_json`).
    log_format: str = setting(conv.choice("text", "json"), "text")
    #: Worker processes (:mod:`stalroute.supervisor`); 0 = one per CPU core.
    workers: int = setting(conv.integer(0, 1024), 1)
    #: Accepted for the reference format; stalroute's parallelism is ``workers``.
    threads: int = setting(conv.integer(0), 0)
    #: [ext] Where a single instance keeps state of its own: the ACME account keys and
    #: certificates (``<state_directory>/acme``, mode 0700, files 0600).
    state_directory: Path = setting(conv.directory, Path("/var/lib/stalroute"))


@dataclass(frozen=True)
class CertificateConfig:
    """``[tls.certificate.<name>]``: one inbound certificate, chosen by SNI (SPEC §2.2).

    ``subjects`` is stored lowercased with ``*.`` removed (``*.example.com`` → ``example.com``);
    empty means "the leaf's DNS SANs, else its CN", which the TLS module reads from the file.
    """

    name: str
    #: ``cert`` + ``key``, or ``acme`` (the name of an ``[acme.<name>]`` entry): exactly one
    #: of the two forms (checked by the section builder).
    cert: Path | None = setting(conv.path, None)
    key: Path | None = setting(conv.path, None)
    subjects: tuple[str, ...] = setting(conv.list_of(conv.word()), ())
    default: bool = setting(conv.boolean, False)
    #: [ext] Issued by this ``[acme.<name>]`` entry (SPEC §2.13); ``subjects`` then defaults
    #: to its ``domains``.
    acme: str | None = setting(conv.word(), None)


@dataclass(frozen=True)
class TLSProtocolsConfig:
    """``[tls.protocols]``.  ``disable_cipher_suites`` holds OpenSSL names (translated)."""

    min_version: str = setting(conv.min_version, "1.2")
    ignore_client_order: bool = setting(conv.boolean, False)
    disable_cipher_suites: tuple[str, ...] = setting(conv.list_of(conv.word(), unique=True), ())


@dataclass(frozen=True)
class TLSConfig:
    """``[tls]``: inbound TLS certificates (by name) and protocol settings."""

    certificates: dict[str, CertificateConfig] = field(default_factory=dict)
    protocols: TLSProtocolsConfig = field(default_factory=TLSProtocolsConfig)


@dataclass(frozen=True)
class ListenerConfig:
    """``[listener.<name>]``: one public port set (SPEC §2.3)."""

    name: str
    protocol: str = setting(conv.choice(*LISTENER_PROTOCOLS))
    bind: tuple[tuple[str, int], ...] = setting(
        conv.list_of(conv.address, nonempty=True, unique=True))
    tls: str = setting(conv.choice(*TLS_MODES))
    proxy_protocol: str = setting(conv.choice("off", "optional", "required", "deferred"), "off")
    proxy_trusted: tuple[IPNetwork, ...] = setting(conv.list_of(conv.cidr), ())
    proxy_header_timeout: float = setting(conv.duration(positive=True), 5.0)
    max_connections: int = setting(conv.integer(1), 8192)
    max_connections_per_ip: int = setting(conv.integer(0), 0)
    preauth_timeout: float = setting(conv.duration(positive=True), 30.0)
    max_auth_attempts: int = setting(conv.integer(1), 3)
    forwarded: str = setting(conv.choice("off", "trust"), "off")


@dataclass(frozen=True)
class ProtocolCapabilities:
    """``[capabilities.<proto>]``: what stalroute itself announces before login (SPEC §2.4).

    Every protocol has ``sasl``, ``allow_plain_auth_without_tls`` and ``banner``; only IMAP
    accepts ``advertise``, only submission ``ehlo``, only ManageSieve ``sieve`` and
    ``implementation`` (the others keep the empty defaults).
    """

    sasl: tuple[str, ...] = setting(
        conv.list_of(conv.sasl_mechanism(MECHANISMS), unique=True), MECHANISMS)
    allow_plain_auth_without_tls: bool = setting(conv.boolean, False)
    banner: str = setting(
        conv.protocol_text(conv.text(nonempty=False), *_BANNER), DEFAULT_BANNER)
    advertise: tuple[str, ...] = setting(
        conv.list_of(conv.protocol_text(conv.word(), *_IMAP_CAPABILITY), unique=True), ())
    ehlo: tuple[str, ...] = setting(
        conv.list_of(conv.protocol_text(conv.word(), *_EHLO_KEYWORD), unique=True), ())
    sieve: tuple[str, ...] = setting(
        conv.list_of(conv.protocol_text(conv.word(), *_SIEVE_EXTENSION), unique=True), ())
    implementation: str = setting(conv.protocol_text(conv.text(), *_BANNER), "")
    #: The keys set in the TOML file: a list given there is advertised as written, the
    #: others only as far as the destinations honour them (:mod:`stalroute.capabilities`).
    explicit: frozenset[str] = frozenset()


def _default_capabilities() -> dict[str, ProtocolCapabilities]:
    return {protocol: ProtocolCapabilities(**defaults)
            for protocol, defaults in CAPABILITY_DEFAULTS.items()}


@dataclass(frozen=True)
class CapabilitiesConfig:
    """``[capabilities.*]``: one section per protocol stalroute answers before login
    (:data:`~stalroute.config.protocols.CAPABILITY_KEYS`)."""

    sections: Mapping[str, ProtocolCapabilities] = field(default_factory=_default_capabilities)

    def for_protocol(self, protocol: str) -> ProtocolCapabilities:
        """The section of ``protocol`` (``imap``, ``pop3``, ``submission``, ``managesieve``)."""
        return self.sections[protocol]


@dataclass(frozen=True)
class OAuthConfig:
    """``[oauth]``: how bearer tokens name their account (SPEC §2.5, §4)."""

    jwt_username_claim: str = setting(conv.word(), "email")


@dataclass(frozen=True)
class DestinationProtocolConfig:
    """``[destination.<name>.protocol.<proto>]``: one backend leg."""

    port: int = setting(conv.integer(1, 65535))
    tls: str = setting(conv.choice(*TLS_MODES))
    forwarding: str | None = setting(conv.choice(*FORWARDING_MODES), None)


@dataclass(frozen=True)
class DestinationConfig:
    """``[destination.<name>]``: one backend (SPEC §2.6).

    ``tls_server_name`` is resolved (defaults to ``host``), ``forwarding`` is resolved
    (explicit, else ``proxy`` when ``proxy_protocol`` is true, else ``none``), and
    ``tls_pinned_cert_sha256`` holds the 32 raw digest bytes.
    """

    name: str
    host: str = setting(conv.word())
    tls_server_name: str | None = setting(conv.word(), None)
    tls_allow_invalid_certs: bool = setting(conv.boolean, False)
    tls_pinned_cert_sha256: bytes | None = setting(conv.sha256_pin, None)
    tls_ca_file: Path | None = setting(conv.path, None)
    tls_client_cert: Path | None = setting(conv.path, None)
    tls_client_key: Path | None = setting(conv.path, None)
    proxy_protocol: bool = setting(conv.boolean, True)
    forwarding: str = setting(conv.choice(*FORWARDING_MODES), None)
    proxy_protocol_version: int = setting(conv.choice(2, 1), 2)
    forwarded: bool = setting(conv.boolean, False)
    allow_plaintext_auth: bool = setting(conv.boolean, False)
    source_ips: tuple[IPAddress, ...] = setting(conv.list_of(conv.ip, unique=True), ())
    hide_auth_errors: bool = setting(conv.boolean, False)
    protocols: dict[str, DestinationProtocolConfig] = field(default_factory=dict)

    @property
    def host_is_ip(self) -> bool:
        return is_ip(self.host)

    def forwarding_for(self, protocol: str) -> str:
        """How the client's address is announced on this destination's ``protocol`` leg."""
        leg = self.protocols.get(protocol)
        if leg is not None and leg.forwarding is not None:
            return leg.forwarding
        return self.forwarding


@dataclass(frozen=True)
class RoutingConfig:
    """``[routing]`` (SPEC §2.7)."""

    default_destination: str = setting(conv.word())
    smtp_passthrough_destination: str | None = setting(conv.word(), None)
    master_user_separators: tuple[str, ...] = setting(conv.list_of(conv.word()), ("%",))
    on_store_error: str = setting(conv.choice("tempfail", "default"), "tempfail")


@dataclass(frozen=True)
class HTTPExtractConfig:
    """``extract = { from = ..., param | header | regex = ... }`` of an HTTP route."""

    from_: str = setting(conv.choice("authorization", "query", "header", "body"), toml="from")
    param: str | None = setting(conv.text(), None)
    header: str | None = setting(conv.header_name, None)
    regex: re.Pattern[str] | None = setting(conv.regex, None)


@dataclass(frozen=True)
class HTTPRouteConfig:
    """One ``[[http.route]]``.  ``fallback = "default"`` is resolved to the default destination."""

    match: str = setting(conv.text())
    destination: str | None = setting(conv.word(), None)
    extract: HTTPExtractConfig | None = None
    fallback: str | None = setting(conv.word(), None)


@dataclass(frozen=True)
class HTTPConfig:
    """``[http]`` (SPEC §2.9).  Sizes are bytes."""

    max_head_size: int = setting(conv.integer(1024), 64 * 1024)
    keepalive_timeout: float = setting(conv.duration(positive=True), 75.0)
    max_keepalive_requests: int = setting(conv.integer(1), 1000)
    body_extract_cap: int = setting(conv.integer(0), 64 * 1024)
    health: bool = setting(conv.boolean, True)
    #: Reference-format key: idle limit of a relayed HTTP exchange (its default, 60 s).
    relay_idle: float = setting(conv.duration(positive=True), 60.0)
    routes: tuple[HTTPRouteConfig, ...] = ()


@dataclass(frozen=True)
class AdminConfig:
    """``[admin]`` (SPEC §2.10).  ``token`` is the resolved bearer token (env > file > inline)."""

    bind: tuple[str, int] = setting(conv.address)
    tls: str = setting(conv.choice(*TLS_MODES), "implicit")
    bearer_token_file: Path | None = setting(conv.path, None)
    bearer_token: str | None = setting(conv.secret, None, repr=False)
    min_token_len: int = setting(conv.integer(1), 32)
    lockout_threshold: int = setting(conv.integer(1), 5)
    lockout_duration: float = setting(conv.duration(positive=True), 300.0)
    certificate: str | None = setting(conv.text(), None)
    token: str | None = field(default=None, repr=False)
    #: Where ``token`` came from: ``"$STALROUTE_ADMIN_TOKEN"``, ``"bearer_token_file"``, ...
    token_source: str | None = None


#: ``[acme.<name>] challenge``: the validations stalroute answers itself (SPEC §2.13).
ACME_CHALLENGES = ("tls-alpn-01", "http-01")
#: ``[acme.<name>] key_type``: the certificate's key (the account key is always P-256).
ACME_KEY_TYPES = ("ecdsa-p256", "rsa-2048")


@dataclass(frozen=True)
class AcmeConfig:
    """[ext] ``[acme.<name>]``: one certificate order at an ACME server (SPEC §2.13).

    ``renew_before`` None means "a third of the certificate's lifetime"; ``eab_kid`` and
    ``eab_hmac_key`` (External Account Binding) are set together or not at all.
    """

    name: str
    directory: str = setting(conv.url("https"))
    domains: tuple[str, ...] = setting(
        conv.list_of(conv.dns_name, nonempty=True, unique=True))
    contact: tuple[str, ...] = setting(conv.list_of(conv.mailto_url, unique=True), ())
    challenge: str = setting(conv.choice(*ACME_CHALLENGES), "tls-alpn-01")
    key_type: str = setting(conv.choice(*ACME_KEY_TYPES), "ecdsa-p256")
    renew_before: float | None = setting(conv.duration(positive=True), None)
    ca_file: Path | None = setting(conv.path, None)
    eab_kid: str | None = setting(conv.word(), None)
    eab_hmac_key: str | None = setting(conv.secret, None, repr=False)


#: ``[cluster.roles]``: the maintenance tasks a node id may be given (SPEC §2.11).
CLUSTER_ROLES = ("acme_renew", "purge")


@dataclass(frozen=True)
class ClusterRolesConfig:
    """[ext] ``[cluster.roles]``: the node ids that perform each maintenance task; empty
    means every node may (a lease lets one act at a time)."""

    acme_renew: tuple[int, ...] = setting(
        conv.list_of(conv.integer(1, 2**31 - 1), unique=True), ())
    purge: tuple[int, ...] = setting(conv.list_of(conv.integer(1, 2**31 - 1), unique=True), ())


@dataclass(frozen=True)
class ClusterConfig:
    """[ext] ``[cluster]`` (SPEC §2.11)."""

    node_id: int = setting(conv.integer(1, 2**31 - 1), 1)
    coordinator: str = setting(conv.choice("none", "redis", "postgresql"), "none")
    url: str | None = setting(conv.url("redis", "rediss", "postgresql", "postgres"), None,
                              repr=False)
    #: Longest a cached route is served while the coordinator is unreachable.
    fallback_ttl: float = setting(conv.duration(positive=True), 30.0)
    #: ``[cluster.roles]`` (a sub-table, built by the section builder).
    roles: ClusterRolesConfig = field(default_factory=ClusterRolesConfig)


@dataclass(frozen=True)
class SecurityConfig:
    """[ext] ``[security]`` (SPEC §2.12).  A threshold of 0 turns banning off (the default)."""

    allowed_ips: tuple[IPNetwork, ...] = setting(conv.list_of(conv.cidr), ())
    auth_fail_ban_threshold: int = setting(conv.integer(0), 0)
    auth_fail_ban_window: float = setting(conv.duration(), 600.0)
    ban_duration: float = setting(conv.duration(), 900.0)


@dataclass(frozen=True)
class Config:
    """The whole validated configuration."""

    server: ServerConfig
    tls: TLSConfig
    listeners: dict[str, ListenerConfig]
    capabilities: CapabilitiesConfig
    oauth: OAuthConfig
    destinations: dict[str, DestinationConfig]
    routing: RoutingConfig
    mapping: MappingConfig
    http: HTTPConfig
    admin: AdminConfig | None
    cluster: ClusterConfig
    security: SecurityConfig
    source_path: Path | None = None
    #: [ext] ``[acme.<name>]`` entries by name (SPEC §2.13).
    acme: dict[str, AcmeConfig] = field(default_factory=dict)
    #: Non-fatal findings (``tls_allow_invalid_certs``, self-signed fallback, ...), to log.
    warnings: tuple[Problem, ...] = ()

    @property
    def default_destination(self) -> DestinationConfig:
        return self.destinations[self.routing.default_destination]
