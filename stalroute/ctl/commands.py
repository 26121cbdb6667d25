"""The subcommands of ``stalroute ctl``: the table they are parsed from and what each prints.

Most subcommands are one JSON request whose answer is printed as a sentence or a table
(:class:`Request`); the few that stream, accept an error status or check their arguments
first are functions.  A new subcommand is one entry in :data:`SUBCOMMANDS`.
Output is a readable table or sentence; ``--json`` prints the API's JSON instead.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from stalroute.admin import bulk
from stalroute.ctl.client import (
    DEFAULT_TIMEOUT,
    DEFAULT_URL,
    ENV_URL,
    EXIT_API,
    EXIT_OK,
    EXIT_USAGE,
    Client,
    CtlError,
    detect_file_format,
    export_mappings,
    import_mappings,
)

#: Rows sent per import request (each request is validated and written on its own).
DEFAULT_BATCH = 10_000
#: Seconds between two looks at the listing while ``certificates renew --wait`` waits.
RENEW_POLL = 0.5

#: What a subcommand does; its return value is the exit status.
Action = Callable[[Client, argparse.Namespace], int]
#: The readable form of an API answer (``document``) to the parsed arguments.
Render = Callable[[Any, argparse.Namespace], str]
#: The positional and keyword arguments of one ``ArgumentParser.add_argument`` call.
Argument = tuple[tuple[str, ...], dict[str, Any]]


def arg(*flags: str, **options: Any) -> Argument:
    return flags, options


# --- output -----------------------------------------------------------------------------


def format_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    """A plain text table: ``columns`` are ``(key, HEADER)``."""
    cells = [[header for _, header in columns]]
    cells += [["-" if row.get(key) is None else str(row.get(key)) for key, _ in columns]
              for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip()
                     for line in cells)


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    days, seconds = divmod(seconds, 86400)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    if days:
        return f"{days}d{hours:02d}h{minutes:02d}m"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def render_acknowledgement(document: Any) -> str | None:
    """Who in the fleet applied a write, when its answer says (``applied`` of ``members``,
    with the laggards and the members it could not reach); None for any other answer."""
    if not isinstance(document, dict) or "applied" not in document or "members" not in document:
        return None
    parts = [f"applied by {document['applied']} of {document['members']} members"]
    parts += [f"{key}: " + ", ".join(f"node {node}" for node in document[key])
              for key in ("laggards", "unreachable") if document.get(key)]
    return "; ".join(parts)


def emit(args: argparse.Namespace, document: Any, readable: str) -> None:
    """Print the answer: its JSON, or ``readable`` followed by who applied a write."""
    if args.json:
        print(json.dumps(document, indent=2, ensure_ascii=False))
        return
    acknowledgement = render_acknowledgement(document)
    print(readable if acknowledgement is None else f"{readable}\n{acknowledgement}")


# --- one request, one answer --------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """A subcommand that is one JSON request: the arguments named in ``params`` are sent as
    query parameters (``None`` left out), and ``render`` makes the answer readable."""

    method: str
    path: str
    render: Render
    params: tuple[str, ...] = ()

    def __call__(self, client: Client, args: argparse.Namespace) -> int:
        _, document = client.call(self.method, self.path,
                                  {name: getattr(args, name) for name in self.params})
        emit(args, document, self.render(document, args))
        return EXIT_OK


def render_stats(stats: dict[str, Any], args: argparse.Namespace) -> str:
    listeners = [{"name": name, **values} for name, values in stats["listeners"].items()]
    cache = stats["cache"]
    counters = cache.get("counters", {})
    hits = ", ".join(f"{tier} {counters.get(f'hit:{tier}', 0)}"
                     for tier in ("positive", "negative", "transient"))
    sessions = stats["sessions"]
    return "\n".join([
        f"stalroute {stats.get('version', '?')}, up {format_duration(stats.get('uptime', 0))}, "
        f"draining: {'yes' if stats['draining'] else 'no'}",
        "",
        format_table(listeners, [("name", "LISTENER"), ("protocol", "PROTOCOL"),
                                 ("active_connections", "ACTIVE"),
                                 ("rejected_connections", "REJECTED"), ("probes", "PROBES")]),
        "",
        f"sessions: {sessions['open']} open ({sessions['spliced']} logged in, "
        f"{sessions['preauth']} before login)",
        f"cache: {cache['entries']} entries; hits: {hits}; misses {counters.get('miss', 0)}; "
        f"hit rate {stats['hit_rate_pct']}%",
        f"bans: {stats['bans']}; login delays: {stats['login_delays']}",
    ])


def render_cluster(document: dict[str, Any], args: argparse.Namespace) -> str:
    rows = [{**m, "self": "*" if m["self"] else "",
             "listeners": ",".join(f"{listener['name']}/{listener['protocol']}"
                                   for listener in m["listeners"]),
             "config_digest": m["config_digest"][:12],
             "last_seen": f"{m['last_seen']:.1f}s ago"} for m in document["members"]]
    table = format_table(rows, [
        ("self", ""), ("node_id", "NODE"), ("hostname", "HOSTNAME"), ("version", "VERSION"),
        ("workers", "WORKERS"), ("listeners", "LISTENERS"), ("config_digest", "CONFIG"),
        ("last_seen", "LAST SEEN")])
    problems = document["problems"]
    return "\n".join([table, "", "problems: none" if not problems else "problems:",
                      *(f"  - {problem}" for problem in problems)])


def render_destinations(document: dict[str, Any], args: argparse.Namespace) -> str:
    rows = [{**d, "protocols": ",".join(d["protocols"]), "default": "yes" if d["default"]
             else ""} for d in document["destinations"]]
    return format_table(rows, [
        ("name", "NAME"), ("host", "HOST"), ("protocols", "PROTOCOLS"), ("circuit", "CIRCUIT"),
        ("consecutive_failures", "FAILURES"), ("trips", "TRIPS"), ("sessions", "SESSIONS"),
        ("default", "DEFAULT")])


def render_connections(document: dict[str, Any], args: argparse.Namespace) -> str:
    rows = [{**c, "age": format_duration(c["age"])} for c in document["connections"]]
    return format_table(rows, [
        ("id", "SESSION"), ("protocol", "PROTOCOL"), ("listener", "LISTENER"),
        ("client", "CLIENT"), ("identifier", "IDENTIFIER"), ("destination", "DESTINATION"),
        ("bytes_in", "IN"), ("bytes_out", "OUT"), ("age", "AGE")]) + f"\n{len(rows)} sessions"


def render_mapped(document: dict[str, Any], args: argparse.Namespace) -> str:
    return (f"{document['identifier']} → {document['destination']} "
            "(cached route dropped; live sessions stay until kicked)")


def render_mapping_deleted(document: dict[str, Any], args: argparse.Namespace) -> str:
    if document["deleted"]:
        return f"mapping of {document['identifier']} deleted"
    return f"{document['identifier']} had no mapping"


def render_mappings_reloaded(document: dict[str, Any], args: argparse.Namespace) -> str:
    entries = document.get("entries")
    return "mappings reloaded" + (f": {entries} entries" if entries is not None
                                  else "") + "; route cache emptied"


def render_cache_invalidated(document: dict[str, Any], args: argparse.Namespace) -> str:
    what = f"for {document['identifier']}" if args.identifier else "(all)"
    return f"route cache invalidated {what}: {document['invalidated']} entries dropped"


def render_delay(document: dict[str, Any], args: argparse.Namespace) -> str:
    if document["seconds"]:
        return f"logins of {document['identifier']} held for {document['seconds']:g}s"
    return f"hold on logins of {document['identifier']} lifted"


def describe_renewer(certificate: dict[str, Any]) -> str | None:
    """Who renews an acme certificate, in a word or three (None for a file certificate)."""
    renews = certificate.get("renews")
    if not isinstance(renews, dict):
        return None
    nodes = renews.get("nodes")
    if nodes is None:
        return "this instance"
    who = ("any node" if not nodes else
           f"node {nodes[0]}" if len(nodes) == 1 else
           "nodes " + ",".join(str(node) for node in nodes))
    return f"{who} (here)" if renews.get("here") else who


def certificate_row(certificate: dict[str, Any]) -> dict[str, Any]:
    """The table cells of one ``GET /certificates`` entry."""
    expires_in, not_after = certificate.get("expires_in"), certificate.get("not_after")
    issuer = certificate.get("issuer_cn") or certificate.get("issuer")
    if certificate.get("self_signed") and certificate.get("source") != "file":
        issuer = f"{issuer} (placeholder)"
    return {**certificate, "issuer": issuer,
            "expires": not_after[:16].replace("T", " ") if not_after else None,
            "days": None if expires_in is None else int(expires_in // 86400),
            "renews": describe_renewer(certificate)}


def render_certificates(document: dict[str, Any], args: argparse.Namespace) -> str:
    certificates = document["certificates"]
    lines = [format_table([certificate_row(c) for c in certificates], [
        ("name", "NAME"), ("source", "SOURCE"), ("issuer", "ISSUER"),
        ("expires", "EXPIRES (UTC)"), ("days", "DAYS LEFT"), ("serial", "SERIAL"),
        ("renews", "RENEWS")])]
    lines += [f"{c['name']}: {c['failures']} failed renewal attempts, last: {c['last_error']}"
              + (f"; next attempt {c['next_check'][:19].replace('T', ' ')} UTC"
                 if c.get("next_check") else "")
              for c in certificates if c.get("failures")]
    if "node_id" in document:
        lines.append(f"(as served by node {document['node_id']})")
    return "\n".join(lines)


#: Each used twice: the group alone lists, as its ``list`` action does.
LIST_CERTIFICATES = Request("GET", "/certificates", render_certificates)
LIST_DESTINATIONS = Request("GET", "/destinations", render_destinations)
LIST_CONNECTIONS = Request("GET", "/connections", render_connections,
                           ("identifier", "destination"))


# --- subcommands that are more than one request and one answer -----------------------------


def cmd_mappings_get(client: Client, args: argparse.Namespace) -> int:
    status, document = client.call("GET", "/mappings", {"identifier": args.identifier},
                                   accept=(404,))
    if status == 404 and isinstance(document, dict) and "default_destination" in document:
        emit(args, document, f"{document['identifier']}: not mapped (logins go to the "
                             f"default destination {document['default_destination']})")
        return EXIT_API
    if status == 404:
        raise CtlError(f"HTTP 404: {document}")
    emit(args, document, f"{document['identifier']} → {document['destination']}")
    return EXIT_OK


def cmd_mappings_export(client: Client, args: argparse.Namespace) -> int:
    chunks = export_mappings(client, args.format)
    out: BinaryIO = open(args.output, "wb") if args.output else sys.stdout.buffer
    total = 0
    try:
        for chunk in chunks:
            out.write(chunk)
            total += len(chunk)
    finally:
        if args.output:
            out.close()
        else:
            out.flush()
    if args.output:
        print(f"exported {total:,} bytes to {args.output}", file=sys.stderr)
    return EXIT_OK


def cmd_mappings_import(client: Client, args: argparse.Namespace) -> int:
    path = Path(args.file)
    if not path.is_file():
        raise CtlError(f"{path}: no such file", EXIT_USAGE)
    if args.batch_size < 1:
        raise CtlError("--batch-size must be at least 1", EXIT_USAGE)
    fmt = detect_file_format(path, args.format)
    outcome = import_mappings(client, path, fmt, args.batch_size, args.dry_run)
    rows_per_second = round(outcome.sent / max(outcome.elapsed, 1e-6))
    summary = {"rows": outcome.rows, "imported": outcome.imported,
               "unchanged": outcome.unchanged, "duplicates": outcome.duplicates,
               "rejected_count": outcome.rejected_count, "rejected": outcome.rejected[:1000],
               "dry_run": bool(args.dry_run), "seconds": round(outcome.elapsed, 3),
               "rows_per_second": rows_per_second, "file": str(path), "format": fmt}
    verb = "checked" if args.dry_run else "imported"
    lines = [f"{verb} {path.name}: {outcome.sent:,} rows in {outcome.elapsed:.1f}s "
             f"({rows_per_second:,} rows/s): {outcome.imported:,} written, "
             f"{outcome.unchanged:,} unchanged, {outcome.rejected_count:,} rejected"]
    if outcome.rejected:
        lines.append("rejected rows:")
        lines += [f"  line {item['line']}: {item['reason']}" for item in outcome.rejected[:50]]
        if outcome.rejected_count > 50:
            lines.append(f"  … and {outcome.rejected_count - 50:,} more (see --json)")
    emit(args, summary, "\n".join(lines))
    return EXIT_API if outcome.rejected_count else EXIT_OK


def cmd_kick(client: Client, args: argparse.Namespace) -> int:
    if not args.identifier and not args.destination:
        raise CtlError("kick needs --identifier and/or --destination", EXIT_USAGE)
    _, document = client.call("POST", "/connections/kick", {"identifier": args.identifier,
                                                            "destination": args.destination})
    target = " and ".join(part for part in (
        f"of {document['identifier']}" if document.get("identifier") else "",
        f"on {document['destination']}" if document.get("destination") else "") if part)
    emit(args, document, f"kicked {document['kicked']} sessions {target}")
    return EXIT_OK


def describe_served(certificate: dict[str, Any]) -> str:
    row = certificate_row(certificate)
    return f"serial {certificate['serial']} from {row['issuer']}, until {row['expires']} UTC"


def cmd_certificates_renew(client: Client, args: argparse.Namespace) -> int:
    """Ask for the renewal; with ``--wait``, follow this instance's listing until it serves a
    new serial (exit 0) or counts one more failed attempt (exit 1)."""
    if args.wait is not None and args.wait <= 0:
        raise CtlError("--wait must be a positive number of seconds", EXIT_USAGE)
    _, document = client.call("POST", "/certificates/renew", {"name": args.name})
    before = document.get("certificate") or {}
    name = document["name"]
    if args.wait is None:
        text = f"renewal of certificate {name} requested"
        if before.get("serial"):
            text += f"; serving {describe_served(before)} meanwhile"
        emit(args, document, text + "\n(`stalroute ctl certificates` shows the new serial, "
                             "or the failure)")
        return EXIT_OK
    deadline = time.monotonic() + args.wait
    while True:
        time.sleep(RENEW_POLL)
        _, listing = client.call("GET", "/certificates")
        now: dict[str, Any] = next(
            (c for c in listing["certificates"] if c["name"] == name), {})
        if now.get("serial") != before.get("serial"):
            emit(args, {**document, "certificate": now, "renewed": True},
                 f"certificate {name} renewed: now serving {describe_served(now)}")
            return EXIT_OK
        if (now.get("failures") or 0) > (before.get("failures") or 0):
            emit(args, {**document, "certificate": now, "renewed": False},
                 f"renewal of certificate {name} failed: {now.get('last_error')}; still "
                 f"serving {describe_served(now)}")
            return EXIT_API
        if time.monotonic() > deadline:
            raise CtlError(f"certificate {name}: no new certificate and no failure within "
                           f"{args.wait:g}s (is this instance's node the one that renews?)")


def cmd_reload(client: Client, args: argparse.Namespace) -> int:
    try:
        _, document = client.call("POST", "/config/reload")
    except CtlError as exc:
        if isinstance(exc.body, dict) and exc.body.get("problems"):
            problems = "\n".join(f"  {p}" for p in exc.body["problems"])
            raise CtlError(f"{exc}\n{problems}", exc.code, exc.body) from None
        raise
    pending = document.get("restart_required") or []
    emit(args, document, "configuration reloaded" + (
        "; these changes need a restart: " + ", ".join(pending) if pending else ""))
    return EXIT_OK


def cmd_health(client: Client, args: argparse.Namespace) -> int:
    path = "/healthz/live" if args.live else "/healthz/ready"
    status, document = client.call("GET", path, accept=(503,))
    if status == 503:
        reasons = "; ".join(document.get("reasons", [])) if isinstance(document, dict) else ""
        emit(args, document, f"not ready: {reasons}")
        return EXIT_API
    emit(args, document, document.get("status", "ok") if isinstance(document, dict) else "ok")
    return EXIT_OK


def cmd_metrics(client: Client, args: argparse.Namespace) -> int:
    response = client.send("GET", "/metrics")
    body = response.read()
    if response.status != 200:
        raise CtlError(f"HTTP {response.status}: {response.reason}")
    sys.stdout.write(body.decode("utf-8"))
    return EXIT_OK


# --- the command tree -------------------------------------------------------------------


@dataclass(frozen=True)
class Subcommand:
    """One node of the ``ctl`` command tree, named by its ``words`` below ``ctl``; one
    without an action only groups the nodes below it (given alone, it prints its help)."""

    words: str
    help: str
    action: Action | None = None
    arguments: tuple[Argument, ...] = ()


IDENTIFIER = arg("identifier", metavar="IDENTIFIER")

#: Parents before their children; the order is that of ``--help``.
SUBCOMMANDS: tuple[Subcommand, ...] = (
    Subcommand("stats", "listeners, sessions, cache and ban counters",
               Request("GET", "/stats", render_stats)),
    Subcommand("cluster", "the fleet's live members and the mismatches among them",
               Request("GET", "/cluster", render_cluster)),
    Subcommand("destinations", "destinations and their circuit state", LIST_DESTINATIONS),
    Subcommand("destinations list", "list destinations (default)", LIST_DESTINATIONS),
    Subcommand("destinations reset", "close a destination's circuit by hand",
               Request("POST", "/destinations/reset",
                       lambda _, args: f"circuit of {args.destination} reset (closed)",
                       ("destination",)),
               (arg("destination", metavar="NAME"),)),
    Subcommand("mappings", "read and write account mappings"),
    Subcommand("mappings get", "where an account is mapped", cmd_mappings_get, (IDENTIFIER,)),
    Subcommand("mappings put", "map an account to a destination (drops its cached route)",
               Request("PUT", "/mappings", render_mapped, ("identifier", "destination")),
               (IDENTIFIER, arg("destination", metavar="DESTINATION"))),
    Subcommand("mappings delete", "remove an account's mapping",
               Request("DELETE", "/mappings", render_mapping_deleted, ("identifier",)),
               (IDENTIFIER,)),
    Subcommand("mappings reload", "re-read the mapping store and empty the route cache",
               Request("POST", "/mappings/reload", render_mappings_reloaded)),
    Subcommand("mappings export", "write every mapping to stdout (or --output)",
               cmd_mappings_export,
               (arg("--format", choices=bulk.FORMATS, default="tsv"),
                arg("--output", "-o", metavar="FILE"))),
    Subcommand("mappings import",
               "bulk upsert from a TSV or JSON file, with progress and a summary",
               cmd_mappings_import,
               (arg("file", metavar="FILE"),
                arg("--format", choices=bulk.FORMATS,
                    help="default: from the file name (.json) or its first byte"),
                arg("--batch-size", type=int, default=DEFAULT_BATCH, metavar="ROWS",
                    help="rows per request (default: %(default)s)"),
                arg("--dry-run", action="store_true", help="validate only, write nothing"))),
    Subcommand("cache", "the route cache"),
    Subcommand("cache invalidate", "drop one account's cached route, or all of them",
               Request("POST", "/cache/invalidate", render_cache_invalidated, ("identifier",)),
               (arg("identifier", metavar="IDENTIFIER", nargs="?"),)),
    Subcommand("connections", "live (logged-in) sessions", LIST_CONNECTIONS,
               (arg("--identifier"), arg("--destination"))),
    # SUPPRESS: a filter given before "list" is not reset by the sub-parser's default.
    Subcommand("connections list", "list sessions (default)", LIST_CONNECTIONS,
               (arg("--identifier", default=argparse.SUPPRESS),
                arg("--destination", default=argparse.SUPPRESS))),
    Subcommand("kick", "close the live sessions of an account and/or on a destination",
               cmd_kick,
               (arg("--identifier"),
                arg("--destination", help="drain a node: every session on it"))),
    Subcommand("delay", "hold an account's new logins for SECONDS (0 lifts the hold)",
               Request("POST", "/connections/delay", render_delay, ("identifier", "seconds")),
               (IDENTIFIER, arg("seconds", metavar="SECONDS", type=float))),
    Subcommand("certificates", "the TLS certificates served: issuer, expiry, serial, who "
               "renews", LIST_CERTIFICATES),
    Subcommand("certificates list", "list certificates (default)", LIST_CERTIFICATES),
    Subcommand("certificates renew", "order a new certificate for an acme entry now",
               cmd_certificates_renew,
               (arg("name", metavar="NAME"),
                arg("--wait", type=float, metavar="SECONDS",
                    help="wait up to SECONDS for the new certificate (or the failure)"))),
    Subcommand("reload",
               "reload the configuration (like SIGHUP); lists changes that need a restart",
               cmd_reload),
    Subcommand("health", "readiness (or --live: liveness)", cmd_health,
               (arg("--live", action="store_true"),)),
    Subcommand("metrics", "print the Prometheus metrics", cmd_metrics),
)


# --- argument parsing -------------------------------------------------------------------


def add_connection_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """The options every subcommand accepts (before or after the subcommand's name);
    ``suppress`` keeps a sub-parser from resetting what was given before its name."""

    def default(value: object) -> object:
        return argparse.SUPPRESS if suppress else value

    group = parser.add_argument_group("connection")
    group.add_argument("--url", default=default(None),
                       help=f"admin API base URL (default: ${ENV_URL}, [admin] bind of the "
                            f"config, or {DEFAULT_URL})")
    group.add_argument("--config", default=default(None), metavar="CONFIG",
                       help="stalroute.toml to take the URL and token from "
                            "(default: $STALROUTE_CONFIG)")
    group.add_argument("--token-file", default=default(None), metavar="FILE",
                       help="file holding the bearer token (default: $STALROUTE_ADMIN_TOKEN, "
                            "then the config's token)")
    trust = group.add_mutually_exclusive_group()
    trust.add_argument("--cacert", default=default(None), metavar="FILE",
                       help="PEM CA bundle to verify the admin certificate with")
    trust.add_argument("--insecure", "-k", action="store_true", default=default(False),
                       help="do not verify the admin certificate")
    group.add_argument("--timeout", type=float, default=default(DEFAULT_TIMEOUT),
                       metavar="SECONDS",
                       help=f"per-request timeout (default: {DEFAULT_TIMEOUT:g}s)")
    group.add_argument("--json", action="store_true", default=default(False),
                       help="print the API's JSON instead of text")


def add_subcommands(ctl: argparse.ArgumentParser) -> None:
    """Build :data:`SUBCOMMANDS` under the ``ctl`` parser: each sets ``ctl_action`` (and a
    group ``ctl_help``, the parser whose help it prints)."""
    common = argparse.ArgumentParser(add_help=False)
    add_connection_options(common, suppress=True)
    parsers = {"": ctl}
    children: dict[str, argparse._SubParsersAction[argparse.ArgumentParser]] = {}
    for entry in SUBCOMMANDS:
        parent, _, name = entry.words.rpartition(" ")
        if parent not in children:
            children[parent] = parsers[parent].add_subparsers(
                dest=f"{parent}_command" if parent else "ctl_command",
                metavar="ACTION" if parent else "SUBCOMMAND")
        parser = children[parent].add_parser(
            name, help=entry.help, description=entry.help if entry.action else None,
            parents=[common])
        parser.set_defaults(ctl_action=entry.action)
        if entry.action is None:
            parser.set_defaults(ctl_help=parser)
        for flags, options in entry.arguments:
            parser.add_argument(*flags, **options)
        parsers[entry.words] = parser
