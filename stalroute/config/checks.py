"""Cross-section checks: what no single section can know is right.

Names must point at declared things (destinations, certificates), every listener's protocol
must have somewhere to go, and no two listeners may bind one address.  Run once every section
has been built, on the assembled :class:`~stalroute.config.schema.Config`.
"""

from __future__ import annotations

from stalroute.config.reader import Context, article, join_key, suggest
from stalroute.config.protocols import INTERACTIVE_PROTOCOLS, PASSTHROUGH_PROTOCOLS
from stalroute.config.schema import Config


def check_references(ctx: Context, config: Config) -> None:
    """Checks that need several sections: destinations named, protocols declared, binds unique."""
    destinations = config.destinations
    declared = ", ".join(sorted(destinations)) or "none"

    def exists(key: str, name: str | None) -> bool:
        if name is None or name in destinations:
            return name is not None
        hint = suggest(name, destinations, list_all=False) or f" (declared: {declared})"
        ctx.error(key, f'"{name}" is not a declared destination{hint}')
        return False

    listeners = config.listeners.values()
    listener_protocols = {listener.protocol for listener in listeners if listener.protocol}
    default_name = config.routing.default_destination
    if exists("routing.default_destination", default_name):
        default = destinations[default_name]
        for protocol in INTERACTIVE_PROTOCOLS:
            if protocol in listener_protocols and protocol not in default.protocols:
                ctx.error(
                    join_key(join_key("destination", default_name), "protocol"),
                    f"the default destination must declare {protocol}: "
                    f"{article(protocol)} listener exists",
                )

    passthrough = config.routing.smtp_passthrough_destination
    needed = [p for p in PASSTHROUGH_PROTOCOLS if p in listener_protocols]
    if passthrough is None:
        if needed:
            ctx.error(
                "routing.smtp_passthrough_destination", f"required: {article(needed[0])} listener exists"
            )
    elif exists("routing.smtp_passthrough_destination", passthrough):
        for protocol in needed:
            if protocol not in destinations[passthrough].protocols:
                ctx.error(
                    join_key(join_key("destination", passthrough), "protocol"),
                    f"the smtp_passthrough_destination must declare {protocol}: "
                    f"{article(protocol)} listener exists",
                )

    for index, route in enumerate(config.http.routes):
        for attr in ("destination", "fallback"):
            name = getattr(route, attr)
            key = f"http.route[{index}].{attr}"
            if name is None or not exists(key, name):
                continue
            if "http" not in destinations[name].protocols:
                ctx.error(key, f'destination "{name}" does not declare the http protocol')

    if (
        config.admin is not None
        and config.admin.certificate is not None
        and config.admin.certificate not in config.tls.certificates
    ):
        ctx.error(
            "admin.certificate",
            f'"{config.admin.certificate}" is not a '
            "[tls.certificate.<name>] entry"
            + suggest(config.admin.certificate, config.tls.certificates, list_all=False),
        )

    seen: dict[tuple[str, int], str] = {}
    binds = [
        (join_key(join_key("listener", name), "bind"), listener.bind or ())
        for name, listener in config.listeners.items()
    ]
    if config.admin is not None and config.admin.bind:
        binds.append(("admin.bind", (config.admin.bind,)))
    for key, addresses in binds:
        for address in addresses:
            if address[1] == 0:
                continue  # an ephemeral port never collides
            if address in seen:
                ctx.error(key, f"{address[0]}:{address[1]} is already bound by {seen[address]}")
            else:
                seen[address] = key

    check_acme(ctx, config)

    tls_listeners = [listener for listener in listeners if listener.tls in ("implicit", "starttls")]
    if (tls_listeners or config.admin is not None) and not config.tls.certificates:
        ctx.warn(
            "tls.certificate",
            "no certificate configured: a self-signed one will be generated at startup",
        )
    if (
        "imap" in listener_protocols
        and config.server.bridge_idle is not None
        and config.server.bridge_idle < 29 * 60
    ):
        ctx.warn(
            "server.bridge_idle",
            "shorter than the 29-minute IMAP IDLE refresh; idle IMAP clients will be disconnected",
        )


def check_acme(ctx: Context, config: Config) -> None:
    """``acme = "<name>"`` names a declared entry; each entry's challenge has a listener to
    be answered on (SPEC §2.13); an entry no certificate uses is worth a warning."""
    used: set[str] = set()
    for name, certificate in config.tls.certificates.items():
        if certificate.acme is None:
            continue
        used.add(certificate.acme)
        if certificate.acme not in config.acme:
            declared = ", ".join(sorted(config.acme)) or "none"
            hint = (suggest(certificate.acme, config.acme, list_all=False)
                    or f" (declared: {declared})")
            ctx.error(join_key(join_key("tls.certificate", name), "acme"),
                      f'"{certificate.acme}" is not an [acme.<name>] entry{hint}')
    listeners = config.listeners.values()
    implicit = any(listener.tls == "implicit" for listener in listeners)
    http = any(listener.protocol == "http" and listener.tls == "plain" for listener in listeners)
    for name, acme in config.acme.items():
        key = join_key(join_key("acme", name), "challenge")
        if acme.challenge == "tls-alpn-01" and not implicit:
            ctx.error(key, '"tls-alpn-01" is answered on implicit-TLS listeners (port 443 for '
                           'the ACME server): add a listener with tls = "implicit", or use '
                           '"http-01"')
        elif acme.challenge == "http-01" and not http:
            ctx.error(key, '"http-01" is answered on plain HTTP listeners (port 80 for the ACME '
                           'server): add a listener with protocol = "http" and tls = "plain", '
                           'or use "tls-alpn-01"')
        if name not in used:
            ctx.warn(join_key("acme", name),
                     "no [tls.certificate.<name>] uses this entry (acme = "
                     f'"{name}"): nothing is ordered')
