"""The section builders: one TOML section in, its dataclass out, every problem collected.

Each ``build_*`` reads its section with :func:`~stalroute.config.reader.read_table`, then
resolves what the schema leaves open (defaults that depend on other keys, environment
overrides, the admin token) and checks what spans several keys of the section.  Checks that
need several sections are in :mod:`stalroute.config.checks`; ``[mapping]`` is built in
:mod:`stalroute.config.stores`.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import socket
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from stalroute.config import converters as conv
from stalroute.config.reader import (
    Context,
    Invalid,
    article,
    as_table,
    check_unknown,
    join_key,
    kind,
    named_tables,
    read_table,
    show,
    suggest,
)
from stalroute.config.protocols import (
    CAPABILITY_DEFAULTS,
    CAPABILITY_KEYS,
    INTERACTIVE_PROTOCOLS,
    LISTENER_PROTOCOLS,
    PASSTHROUGH_PROTOCOLS,
)
from stalroute.config.schema import (
    ENV_ADMIN_TOKEN,
    ENV_LOG_LEVEL,
    LOG_LEVELS,
    AdminConfig,
    CapabilitiesConfig,
    AcmeConfig,
    CertificateConfig,
    ClusterConfig,
    ClusterRolesConfig,
    DestinationConfig,
    DestinationProtocolConfig,
    HTTPConfig,
    HTTPExtractConfig,
    HTTPRouteConfig,
    ListenerConfig,
    ProtocolCapabilities,
    ServerConfig,
    TLSConfig,
    TLSProtocolsConfig,
)
from stalroute.net import is_ip
from stalroute.tls_ciphers import (
    IANA_TO_OPENSSL_CIPHERS,
    default_server_ciphers,
    openssl_cipher_name,
)


def build_server(ctx: Context, table: Any) -> ServerConfig:
    values = read_table(ctx, table, "server", ServerConfig)
    if values.get("hostname") is None:
        values["hostname"] = socket.getfqdn()
    level = ctx.env.get(ENV_LOG_LEVEL)
    if level:
        try:
            values["log_level"] = conv.choice(*LOG_LEVELS)(level.strip().lower(), ctx, "")
        except Invalid as exc:
            ctx.error(f"${ENV_LOG_LEVEL}", exc.message)
    return ServerConfig(**values)


def build_tls(ctx: Context, table: Any) -> TLSConfig:
    table = as_table(ctx, table, "tls")
    check_unknown(ctx, table, "tls", ["certificate", "protocols"])
    certificates = {}
    named = named_tables(ctx, table.get("certificate", {}), "tls.certificate")
    for name, cert_table in named.items():
        key = join_key("tls.certificate", name)
        values = read_table(ctx, cert_table, key, CertificateConfig)
        values["subjects"] = tuple(
            s.lower().rstrip(".").removeprefix("*.") for s in values.get("subjects") or ()
        )
        certificate = CertificateConfig(name=name, **values)
        _check_certificate_form(ctx, key, cert_table)
        if ctx.check_files and certificate.cert and certificate.key:
            _check_certificate_pair(
                ctx, join_key(key, "cert"), join_key(key, "key"), certificate.cert, certificate.key
            )
        certificates[name] = certificate
    defaults = [name for name, c in certificates.items() if c.default]
    if len(defaults) > 1:
        for name in defaults[1:]:
            ctx.error(
                join_key(join_key("tls.certificate", name), "default"),
                f'only one certificate may be the default (already "{defaults[0]}")',
            )

    protocols_values = read_table(ctx, table.get("protocols", {}), "tls.protocols",
                                  TLSProtocolsConfig)
    requested = protocols_values.get("disable_cipher_suites")
    if requested:
        protocols_values["disable_cipher_suites"] = _translate_ciphers(
            ctx, requested, protocols_values.get("min_version") or "1.2"
        )
    return TLSConfig(certificates=certificates, protocols=TLSProtocolsConfig(**protocols_values))


def _check_certificate_form(ctx: Context, key: str, table: dict[str, Any]) -> None:
    """``cert`` + ``key`` or ``acme``: exactly one of the two forms."""
    if "acme" in table:
        for name in ("cert", "key"):
            if name in table:
                ctx.error(join_key(key, name),
                          'not used with acme = "<name>" (the certificate and its key are '
                          "issued): remove it, or remove acme")
        return
    missing = [name for name in ("cert", "key") if name not in table]
    if len(missing) == 2:
        ctx.error(key, 'needs cert and key (PEM files) or acme = "<name>" of an [acme.<name>] '
                       "entry")
    elif missing:
        ctx.error(join_key(key, missing[0]), "required key is missing (cert and key go together)")


def _translate_ciphers(ctx: Context, names: tuple[str, ...], min_version: str) -> tuple[str, ...]:
    """IANA or OpenSSL names → OpenSSL names; unknown names and removing everything are errors."""
    key = "tls.protocols.disable_cipher_suites"
    translated = []
    for index, name in enumerate(names):
        openssl = openssl_cipher_name(name)
        if openssl is None:
            ctx.error(
                f"{key}[{index}]",
                f"{show(name)} is not a TLS 1.2/1.3 cipher suite known "
                "to OpenSSL (IANA or OpenSSL name)" + suggest(name, IANA_TO_OPENSSL_CIPHERS),
            )
        elif openssl not in translated:
            translated.append(openssl)
    baseline = default_server_ciphers(min_version)
    if baseline and baseline <= set(translated):
        ctx.error(key, f"removes every cipher suite available with TLS {min_version}")
    return tuple(translated)


def _check_certificate_pair(
    ctx: Context, cert_key: str, key_key: str, cert_path: Path, key_path: Path
) -> None:
    """The PEM chain parses, the key parses, and the key belongs to the leaf."""
    try:
        chain = x509.load_pem_x509_certificates(cert_path.read_bytes())
    except (ValueError, OSError) as exc:
        ctx.error(cert_key, f"{cert_path} is not a PEM certificate chain ({exc})")
        return
    try:
        private = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except TypeError:
        ctx.error(key_key, f"{key_path} is encrypted; stalroute needs an unencrypted key")
        return
    except Exception as exc:  # noqa: BLE001 - any parse failure is the operator's to fix
        ctx.error(key_key, f"{key_path} is not a PEM private key ({type(exc).__name__})")
        return
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if chain[0].public_key().public_bytes(*spki) != private.public_key().public_bytes(*spki):
        ctx.error(key_key, f"{key_path} does not match the first certificate of {cert_path}")


def _check_ca_file(ctx: Context, key: str, path: Path) -> None:
    try:
        x509.load_pem_x509_certificates(path.read_bytes())
    except (ValueError, OSError) as exc:
        ctx.error(key, f"{path} is not a PEM bundle of certificates ({exc})")


def build_listener(ctx: Context, name: str, table: dict[str, Any]) -> ListenerConfig:
    key = join_key("listener", name)
    values = read_table(ctx, table, key, ListenerConfig)
    listener = ListenerConfig(name=name, **values)
    if listener.tls == "starttls" and listener.protocol in (*PASSTHROUGH_PROTOCOLS, "http"):
        reason = (
            "a pass-through listener relays bytes unparsed"
            if listener.protocol != "http"
            else "HTTP has no STARTTLS"
        )
        ctx.error(
            join_key(key, "tls"),
            f'{article(listener.protocol)} listener cannot use "starttls" '
            f'({reason}); use "plain" or "implicit"',
        )
    if (listener.proxy_protocol == "deferred" and listener.protocol in PASSTHROUGH_PROTOCOLS
            and listener.tls != "implicit"):
        ctx.error(
            join_key(key, "proxy_protocol"),
            f'"deferred" cannot work for {article(listener.protocol)} pass-through listener: the '
            "client waits for the backend's greeting, which needs the header first; use "
            '"required" or "optional"',
        )
    if listener.proxy_protocol not in (None, "off") and not listener.proxy_trusted:
        ctx.error(
            join_key(key, "proxy_trusted"),
            f'required when proxy_protocol = "{listener.proxy_protocol}": '
            "list the balancer networks allowed to send a PROXY header",
        )
    if listener.forwarded == "trust" and listener.protocol not in (None, "http"):
        ctx.warn(join_key(key, "forwarded"), "only HTTP listeners use this setting; ignored")
    return listener


def build_capabilities(ctx: Context, table: Any) -> CapabilitiesConfig:
    table = as_table(ctx, table, "capabilities")
    check_unknown(ctx, table, "capabilities", CAPABILITY_KEYS)
    sections = {}
    for protocol, own_keys in CAPABILITY_KEYS.items():
        only = ("sasl", "allow_plain_auth_without_tls", "banner", *own_keys)
        values = read_table(
            ctx,
            table.get(protocol, {}),
            join_key("capabilities", protocol),
            ProtocolCapabilities,
            only=only,
        )
        given = {k: v for k, v in values.items() if v is not None}
        sections[protocol] = ProtocolCapabilities(**{**CAPABILITY_DEFAULTS[protocol], **given},
                                                  explicit=frozenset(given))
    return CapabilitiesConfig(sections)


def build_destination(ctx: Context, name: str, table: dict[str, Any]) -> DestinationConfig:
    key = join_key("destination", name)
    values = read_table(ctx, table, key, DestinationConfig, subtables=("protocol",))
    protocols = {}
    legs_key = join_key(key, "protocol")
    legs = as_table(ctx, table.get("protocol", {}), legs_key)
    check_unknown(ctx, legs, legs_key, LISTENER_PROTOCOLS)
    for protocol in LISTENER_PROTOCOLS:
        if protocol in legs:
            leg_key = join_key(legs_key, protocol)
            leg = DestinationProtocolConfig(
                **read_table(ctx, legs[protocol], leg_key, DestinationProtocolConfig)
            )
            protocols[protocol] = leg
            cleartext = leg.tls == "plain" and protocol in INTERACTIVE_PROTOCOLS
            if cleartext and not values.get("allow_plaintext_auth"):
                ctx.error(
                    join_key(leg_key, "tls"),
                    f'"plain" would send {protocol} credentials in cleartext; set '
                    "allow_plaintext_auth = true on the destination to allow it",
                )
            if leg.tls == "starttls" and protocol in PASSTHROUGH_PROTOCOLS:
                ctx.error(
                    join_key(leg_key, "tls"),
                    f'{article(protocol)} pass-through leg cannot use "starttls" (the session is '
                    'relayed unparsed); use "plain" or "implicit"',
                )
    if not protocols:
        ctx.warn(legs_key, "the destination declares no protocol and can receive no traffic")

    host = values.get("host")
    if host and host.startswith("[") and host.endswith("]"):
        values["host"] = host = host[1:-1]
    if host and values.get("tls_server_name") is None:
        uses_tls = any(leg.tls in ("implicit", "starttls") for leg in protocols.values())
        if is_ip(host) and uses_tls:
            ctx.error(
                join_key(key, "tls_server_name"),
                f"required: host {show(host)} is an IP address and a leg uses TLS, so "
                "there is no name to verify the backend against",
            )
        values["tls_server_name"] = host
    if values.get("forwarding") is None:
        values["forwarding"] = "proxy" if values.get("proxy_protocol", True) else "none"
    if ("tls_client_cert" in table) != ("tls_client_key" in table):
        missing = "tls_client_key" if "tls_client_cert" in table else "tls_client_cert"
        ctx.error(
            join_key(key, missing),
            "tls_client_cert and tls_client_key go together: set both or neither",
        )
    elif ctx.check_files and values.get("tls_client_cert") and values.get("tls_client_key"):
        _check_certificate_pair(
            ctx,
            join_key(key, "tls_client_cert"),
            join_key(key, "tls_client_key"),
            values["tls_client_cert"],
            values["tls_client_key"],
        )
    if ctx.check_files and values.get("tls_ca_file"):
        _check_ca_file(ctx, join_key(key, "tls_ca_file"), values["tls_ca_file"])
    if values.get("tls_allow_invalid_certs") and not values.get("tls_pinned_cert_sha256"):
        ctx.warn(
            join_key(key, "tls_allow_invalid_certs"),
            "the backend's certificate is not verified; prefer tls_pinned_cert_sha256",
        )
    return DestinationConfig(name=name, protocols=protocols, **values)


def build_http(ctx: Context, table: Any) -> HTTPConfig:
    table = as_table(ctx, table, "http")
    values = read_table(ctx, table, "http", HTTPConfig, subtables=("route",))
    raw_routes = table.get("route", [])
    routes = []
    if not isinstance(raw_routes, list):
        ctx.error("http.route", "must be an array of tables ([[http.route]])")
        raw_routes = []
    for index, raw in enumerate(raw_routes):
        key = f"http.route[{index}]"
        if not isinstance(raw, dict):
            ctx.error(key, f"must be a table, not {kind(raw)}")
            continue
        route_values = read_table(ctx, raw, key, HTTPRouteConfig, subtables=("extract",))
        extract = None
        if "extract" in raw:
            extract = _build_extract(ctx, raw["extract"], f"{key}.extract")
        if route_values.get("destination") and "extract" in raw:
            ctx.error(key, "a route takes either destination or extract, not both")
        elif (
            not route_values.get("destination")
            and "extract" not in raw
            and "destination" not in raw
        ):
            ctx.error(key, 'a route needs destination = "<name>" or extract = { from = ... }')
        if route_values.get("fallback") and "extract" not in raw:
            ctx.warn(join_key(key, "fallback"), "only used with extract; ignored")
        routes.append(HTTPRouteConfig(extract=extract, **route_values))
    return HTTPConfig(routes=tuple(routes), **values)


#: ``extract.from`` → the companion key it takes (``authorization`` takes none).
_EXTRACT_COMPANION = {"query": "param", "header": "header", "body": "regex", "authorization": None}


def _build_extract(ctx: Context, raw: Any, key: str) -> HTTPExtractConfig:
    values = read_table(ctx, raw, key, HTTPExtractConfig)
    extract = HTTPExtractConfig(**values)
    source = extract.from_
    if source in _EXTRACT_COMPANION:
        needed = _EXTRACT_COMPANION[source]
        for companion in ("param", "header", "regex"):
            present = isinstance(raw, dict) and companion in raw
            if companion == needed and not present:
                ctx.error(join_key(key, companion), f'required with from = "{source}"')
            elif companion != needed and present:
                ctx.error(
                    join_key(key, companion),
                    f'not used with from = "{source}"'
                    + (f" (it takes {needed})" if needed else ""),
                )
    return extract


def build_admin(ctx: Context, table: Any) -> AdminConfig:
    values = read_table(ctx, table, "admin", AdminConfig)
    table = table if isinstance(table, dict) else {}
    if values.get("tls") not in (None, "implicit"):
        ctx.error("admin.tls", 'must be "implicit": the admin API is served over HTTPS only')
    token: str | None = None
    source: str | None = None
    env_name = next((n for n in ENV_ADMIN_TOKEN if ctx.env.get(n)), None)
    if env_name:
        token, source = ctx.env[env_name].strip(), f"${env_name}"
    elif values.get("bearer_token_file") is not None:
        source = "admin.bearer_token_file"
        if ctx.check_files:
            token = _read_token_file(ctx, values["bearer_token_file"])
    elif values.get("bearer_token") is not None:
        token, source = values["bearer_token"].strip(), "admin.bearer_token"
    elif "bearer_token_file" not in table and "bearer_token" not in table:
        ctx.error(
            "admin",
            "no bearer token: set bearer_token_file, bearer_token or $STALROUTE_ADMIN_TOKEN",
        )
    minimum = values.get("min_token_len") or 32
    if token is not None and source is not None:
        if any(ch.isspace() or ord(ch) < 32 for ch in token):
            ctx.error(source, "the token must not contain spaces or control characters")
        elif len(token) < minimum:
            ctx.error(
                source,
                f"the token has {len(token)} characters; admin.min_token_len "
                f"requires at least {minimum}",
            )
    return AdminConfig(token=token, token_source=source, **values)


def _read_token_file(ctx: Context, path: Path) -> str | None:
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        ctx.error("admin.bearer_token_file", f"cannot read {path}: {type(exc).__name__}")
        return None
    try:
        if path.stat().st_mode & 0o004:
            ctx.warn("admin.bearer_token_file", f"{path} is readable by every local user")
    except OSError:  # pragma: no cover - raced with a delete
        pass
    return token


def build_cluster(ctx: Context, table: Any) -> ClusterConfig:
    values = read_table(ctx, table, "cluster", ClusterConfig, subtables=("roles",))
    roles_table = table.get("roles", {}) if isinstance(table, dict) else {}
    roles = ClusterRolesConfig(**read_table(ctx, roles_table, "cluster.roles",
                                            ClusterRolesConfig))
    cluster = ClusterConfig(roles=roles, **values)
    if cluster.coordinator in ("redis", "postgresql"):
        if not cluster.url:
            if not isinstance(table, dict) or "url" not in table:
                ctx.error("cluster.url", f'required when coordinator = "{cluster.coordinator}"')
        else:
            scheme = cluster.url.split("://", 1)[0].lower()
            expected = (
                ("redis", "rediss")
                if cluster.coordinator == "redis"
                else ("postgresql", "postgres")
            )
            if scheme not in expected:
                ctx.error(
                    "cluster.url",
                    f'coordinator = "{cluster.coordinator}" needs a '
                    f'{expected[0]}:// URL, got scheme "{scheme}"',
                )
    return cluster


def build_acme(ctx: Context, name: str, table: dict[str, Any]) -> AcmeConfig:
    """``[acme.<name>]`` (SPEC §2.13)."""
    key = join_key("acme", name)
    values = read_table(ctx, table, key, AcmeConfig)
    if ("eab_kid" in table) != ("eab_hmac_key" in table):
        missing = "eab_hmac_key" if "eab_kid" in table else "eab_kid"
        ctx.error(join_key(key, missing),
                  "eab_kid and eab_hmac_key (External Account Binding) go together: set both "
                  "or neither")
    for index, domain in enumerate(values.get("domains") or ()):
        if domain.startswith("*."):
            ctx.error(f"{join_key(key, 'domains')}[{index}]",
                      f'"{domain}": a wildcard name needs the dns-01 challenge, which stalroute '
                      "does not answer; list the names")
    hmac_key = values.get("eab_hmac_key")
    if hmac_key is not None and not _is_base64url(hmac_key):
        ctx.error(join_key(key, "eab_hmac_key"),
                  "must be the base64url-encoded MAC key the ACME server gave (A-Z a-z 0-9 - _)")
    if ctx.check_files and values.get("ca_file"):
        _check_ca_file(ctx, join_key(key, "ca_file"), values["ca_file"])
    return AcmeConfig(name=name, **values)


def _is_base64url(text: str) -> bool:
    stripped = text.strip().rstrip("=")
    if not stripped or any(not (ch.isascii() and (ch.isalnum() or ch in "-_")) for ch in stripped):
        return False
    try:
        base64.urlsafe_b64decode(stripped + "=" * (-len(stripped) % 4))
    except (binascii.Error, ValueError):
        return False
    return True


def acme_subjects(tls: TLSConfig, acme: dict[str, AcmeConfig]) -> TLSConfig:
    """``[tls.certificate.<name>] acme = ...`` without ``subjects`` serves the ACME entry's
    ``domains`` (``*.example.com`` stored as ``example.com``, as for ``subjects``)."""
    certificates = {}
    for name, entry in tls.certificates.items():
        if entry.acme is not None and not entry.subjects and entry.acme in acme:
            domains = acme[entry.acme].domains or ()
            entry = dataclasses.replace(
                entry, subjects=tuple(d.removeprefix("*.") for d in domains))
        certificates[name] = entry
    return dataclasses.replace(tls, certificates=certificates)
