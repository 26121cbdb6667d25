"""``stalroute ctl``: the command-line client of the admin API (SPEC §1, §8).

Only the standard library speaks HTTP here (``http.client`` with an ``ssl`` context), so
``ctl`` starts fast and never loads Twisted's reactor.

Where things come from, first match wins:

* URL: ``--url``, ``$STALROUTE_ADMIN_URL``, ``[admin] bind`` of ``--config`` (or of
  ``$STALROUTE_CONFIG``; a wildcard address becomes loopback), ``https://127.0.0.1:8443``.
* Token: ``--token-file``, ``$STALROUTE_ADMIN_TOKEN`` (or ``$PROXY_ADMIN_TOKEN``), then the
  config's ``bearer_token_file`` / ``bearer_token``.
* Trust: the system store, or ``--cacert FILE``; ``--insecure`` skips verification.

Output is a readable table or sentence; ``--json`` prints the API's JSON instead.  Exit
status: 0 success, 1 the API answered an error (or could not be reached, or a bulk import
rejected rows, or ``health`` is not ready, or ``mappings get`` found no mapping), 2 usage.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import ssl
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlencode, urlsplit

from stalroute.admin import bulk
from stalroute.config import ENV_ADMIN_TOKEN, config_path_from_env, parse_address

EXIT_OK = 0
EXIT_API = 1
EXIT_USAGE = 2
DEFAULT_URL = "https://127.0.0.1:8443"
ENV_URL = "STALROUTE_ADMIN_URL"
DEFAULT_TIMEOUT = 60.0
#: Rows sent per import request (each request is validated and written on its own).
DEFAULT_BATCH = 10_000
#: How often a non-TTY progress line is printed, in seconds.
PROGRESS_INTERVAL = 5.0
USER_AGENT = "stalroute-ctl/0.1.0"


class CtlError(Exception):
    """A failure to report on stderr with exit status ``code``."""

    def __init__(self, message: str, code: int = EXIT_API, body: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.body = body


# --- settings ---------------------------------------------------------------------------


def _admin_table(config_path: str | None, explicit: bool) -> tuple[dict[str, Any], Path | None]:
    """``[admin]`` of the config file, read without validating the rest of it."""
    if not config_path:
        return {}, None
    path = Path(config_path)
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        if explicit:
            raise CtlError(f"cannot read {path}: {exc}", EXIT_USAGE) from None
        return {}, None
    admin = document.get("admin")
    return (admin if isinstance(admin, dict) else {}), path.absolute().parent


def resolve_url(args: argparse.Namespace, environ=os.environ) -> str:
    if args.url:
        return args.url.rstrip("/")
    if environ.get(ENV_URL):
        return environ[ENV_URL].rstrip("/")
    admin, _ = _admin_table(args.config or config_path_from_env(environ), bool(args.config))
    if isinstance(admin.get("bind"), str):
        try:
            host, port = parse_address(admin["bind"])
        except ValueError:
            raise CtlError(f"[admin] bind {admin['bind']!r} is not an address", EXIT_USAGE)
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
        return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
    return DEFAULT_URL


def resolve_token(args: argparse.Namespace, environ=os.environ) -> str:
    if args.token_file:
        try:
            return Path(args.token_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise CtlError(f"cannot read the token file: {exc}", EXIT_USAGE) from None
    for name in ENV_ADMIN_TOKEN:
        if environ.get(name, "").strip():
            return environ[name].strip()
    admin, base = _admin_table(args.config or config_path_from_env(environ), bool(args.config))
    if isinstance(admin.get("bearer_token_file"), str) and base is not None:
        path = base / admin["bearer_token_file"]
        try:
            return path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise CtlError(f"cannot read {path}: {exc}", EXIT_USAGE) from None
    if isinstance(admin.get("bearer_token"), str):
        return admin["bearer_token"].strip()
    raise CtlError("no admin token: use --token-file, set $STALROUTE_ADMIN_TOKEN, or give "
                   "--config with an [admin] token", EXIT_USAGE)


def tls_context(args: argparse.Namespace) -> ssl.SSLContext:
    if args.insecure:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    try:
        return ssl.create_default_context(cafile=args.cacert)
    except (OSError, ssl.SSLError) as exc:
        raise CtlError(f"cannot load --cacert {args.cacert}: {exc}", EXIT_USAGE) from None


# --- HTTP -------------------------------------------------------------------------------


class Client:
    """One keep-alive HTTPS connection to the admin API."""

    def __init__(self, url: str, token: str, context: ssl.SSLContext,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            raise CtlError(f"--url must be https://host:port, not {url!r}", EXIT_USAGE)
        self.url = url
        self._host, self._port = parts.hostname, parts.port or 443
        self._prefix = parts.path.rstrip("/")
        self._token = token
        self._context = context
        self._timeout = timeout
        self._connection: http.client.HTTPSConnection | None = None

    def _connect(self) -> http.client.HTTPSConnection:
        if self._connection is None:
            self._connection = http.client.HTTPSConnection(
                self._host, self._port, context=self._context, timeout=self._timeout)
        return self._connection

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def _target(self, path: str, params: dict[str, Any] | None) -> str:
        query = urlencode({k: v for k, v in (params or {}).items() if v is not None})
        return self._prefix + path + (f"?{query}" if query else "")

    def send(self, method: str, path: str, params: dict[str, Any] | None = None,
             body: bytes | None = None, content_type: str | None = None
             ) -> http.client.HTTPResponse:
        """Send a request and return the response (its body not yet read)."""
        headers = {"Authorization": f"Bearer {self._token}", "User-Agent": USER_AGENT,
                   "Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        target = self._target(path, params)
        for attempt in (1, 2):
            connection = self._connect()
            try:
                connection.request(method, target, body=body, headers=headers)
                return connection.getresponse()
            except (http.client.RemoteDisconnected, BrokenPipeError,
                    ConnectionResetError) as exc:
                self.close()  # the server closed an idle keep-alive connection: retry once
                if attempt == 2:
                    raise CtlError(f"{self.url}: connection lost ({exc})") from None
            except ssl.SSLCertVerificationError as exc:
                self.close()
                raise CtlError(f"{self.url}: certificate not trusted ({exc.verify_message}); "
                               "use --cacert FILE or --insecure") from None
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                raise CtlError(f"cannot reach {self.url}: {exc}") from None
        raise AssertionError("unreachable")  # pragma: no cover

    def call(self, method: str, path: str, params: dict[str, Any] | None = None,
             body: bytes | None = None, content_type: str | None = None,
             accept: tuple[int, ...] = ()) -> tuple[int, Any]:
        """A JSON request: ``(status, document)``; a non-2xx status not in ``accept`` raises
        :class:`CtlError` with the API's error message."""
        response = self.send(method, path, params, body, content_type)
        try:
            raw = response.read()
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise CtlError(f"{self.url}: connection lost ({exc})") from None
        try:
            document = json.loads(raw) if raw else None
        except ValueError:
            document = raw.decode("utf-8", "replace")
        if 200 <= response.status < 300 or response.status in accept:
            return response.status, document
        message = document.get("error") if isinstance(document, dict) else None
        raise CtlError(f"HTTP {response.status}: {message or response.reason}", EXIT_API,
                       body=document)


# --- output -----------------------------------------------------------------------------


def _table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    """A plain text table: ``columns`` are ``(key, HEADER)``."""
    cells = [[header for _, header in columns]]
    cells += [["-" if row.get(key) is None else str(row.get(key)) for key, _ in columns]
              for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip()
                     for line in cells)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    days, seconds = divmod(seconds, 86400)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    if days:
        return f"{days}d{hours:02d}h{minutes:02d}m"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def _emit(args: argparse.Namespace, document: Any, readable: str) -> None:
    if args.json:
        print(json.dumps(document, indent=2, ensure_ascii=False))
    else:
        print(readable)


# --- subcommands ------------------------------------------------------------------------


def cmd_stats(client: Client, args: argparse.Namespace) -> int:
    _, stats = client.call("GET", "/stats")
    listeners = [{"name": name, **values} for name, values in stats["listeners"].items()]
    cache = stats["cache"]
    counters = cache.get("counters", {})
    hits = ", ".join(f"{tier} {counters.get(f'hit:{tier}', 0)}"
                     for tier in ("positive", "negative", "transient"))
    sessions = stats["sessions"]
    text = "\n".join([
        f"stalroute {stats.get('version', '?')}, up {_duration(stats.get('uptime', 0))}, "
        f"draining: {'yes' if stats['draining'] else 'no'}",
        "",
        _table(listeners, [("name", "LISTENER"), ("protocol", "PROTOCOL"),
                           ("active_connections", "ACTIVE"),
                           ("rejected_connections", "REJECTED"), ("probes", "PROBES")]),
        "",
        f"sessions: {sessions['open']} open ({sessions['spliced']} logged in, "
        f"{sessions['preauth']} before login)",
        f"cache: {cache['entries']} entries; hits: {hits}; misses {counters.get('miss', 0)}; "
        f"hit rate {stats['hit_rate_pct']}%",
        f"bans: {stats['bans']}; login delays: {stats['login_delays']}",
    ])
    _emit(args, stats, text)
    return EXIT_OK


def cmd_destinations(client: Client, args: argparse.Namespace) -> int:
    _, document = client.call("GET", "/destinations")
    rows = [{**d, "protocols": ",".join(d["protocols"]), "default": "yes" if d["default"]
             else ""} for d in document["destinations"]]
    _emit(args, document, _table(rows, [
        ("name", "NAME"), ("host", "HOST"), ("protocols", "PROTOCOLS"), ("circuit", "CIRCUIT"),
        ("consecutive_failures", "FAILURES"), ("trips", "TRIPS"), ("sessions", "SESSIONS"),
        ("default", "DEFAULT")]))
    return EXIT_OK


def cmd_destinations_reset(client: Client, args: argparse.Namespace) -> int:
    _, document = client.call("POST", "/destinations/reset", {"destination": args.name})
    _emit(args, document, f"circuit of {args.name} reset (closed)")
    return EXIT_OK


def cmd_mappings_get(client: Client, args: argparse.Namespace) -> int:
    status, document = client.call("GET", "/mappings", {"identifier": args.identifier},
                                   accept=(404,))
    if status == 404 and isinstance(document, dict) and "default_destination" in document:
        _emit(args, document, f"{document['identifier']}: not mapped (logins go to the "
                              f"default destination {document['default_destination']})")
        return EXIT_API
    if status == 404:
        raise CtlError(f"HTTP 404: {document}")
    _emit(args, document, f"{document['identifier']} → {document['destination']}")
    return EXIT_OK


def cmd_mappings_put(client: Client, args: argparse.Namespace) -> int:
    _, document = client.call("PUT", "/mappings", {"identifier": args.identifier,
                                                   "destination": args.destination})
    _emit(args, document, f"{document['identifier']} → {document['destination']} "
                          "(cached route dropped; live sessions stay until kicked)")
    return EXIT_OK


def cmd_mappings_delete(client: Client, args: argparse.Namespace) -> int:
    _, document = client.call("DELETE", "/mappings", {"identifier": args.identifier})
    _emit(args, document, f"mapping of {document['identifier']} deleted" if document["deleted"]
          else f"{document['identifier']} had no mapping")
    return EXIT_OK


def cmd_mappings_reload(client: Client, args: argparse.Namespace) -> int:
    _, document = client.call("POST", "/mappings/reload")
    entries = document.get("entries")
    _emit(args, document, "mappings reloaded" + (f": {entries} entries" if entries is not None
                                                 else "") + "; route cache emptied")
    return EXIT_OK


def cmd_mappings_export(client: Client, args: argparse.Namespace) -> int:
    response = client.send("GET", "/mappings/export", {"format": args.format})
    if response.status != 200:
        raw = response.read()
        try:
            message = json.loads(raw).get("error")
        except (ValueError, AttributeError):
            message = None
        raise CtlError(f"HTTP {response.status}: {message or response.reason}")
    out = open(args.output, "wb") if args.output else sys.stdout.buffer
    total = 0
    try:
        while chunk := response.read(64 * 1024):
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


def cmd_cache_invalidate(client: Client, args: argparse.Namespace) -> int:
    _, document = client.call("POST", "/cache/invalidate", {"identifier": args.identifier})
    what = f"for {document['identifier']}" if args.identifier else "(all)"
    _emit(args, document, f"route cache invalidated {what}: {document['invalidated']} "
                          "entries dropped")
    return EXIT_OK


def cmd_connections(client: Client, args: argparse.Namespace) -> int:
    _, document = client.call("GET", "/connections", {"identifier": args.identifier,
                                                      "destination": args.destination})
    rows = [{**c, "age": _duration(c["age"])} for c in document["connections"]]
    _emit(args, document, _table(rows, [
        ("id", "SESSION"), ("protocol", "PROTOCOL"), ("listener", "LISTENER"),
        ("client", "CLIENT"), ("identifier", "IDENTIFIER"), ("destination", "DESTINATION"),
        ("bytes_in", "IN"), ("bytes_out", "OUT"), ("age", "AGE")])
        + f"\n{len(rows)} sessions")
    return EXIT_OK


def cmd_kick(client: Client, args: argparse.Namespace) -> int:
    if not args.identifier and not args.destination:
        raise CtlError("kick needs --identifier and/or --destination", EXIT_USAGE)
    _, document = client.call("POST", "/connections/kick", {"identifier": args.identifier,
                                                            "destination": args.destination})
    target = " and ".join(part for part in (
        f"of {document['identifier']}" if document.get("identifier") else "",
        f"on {document['destination']}" if document.get("destination") else "") if part)
    _emit(args, document, f"kicked {document['kicked']} sessions {target}")
    return EXIT_OK


def cmd_delay(client: Client, args: argparse.Namespace) -> int:
    _, document = client.call("POST", "/connections/delay", {"identifier": args.identifier,
                                                             "seconds": args.seconds})
    text = (f"logins of {document['identifier']} held for {document['seconds']:g}s"
            if document["seconds"] else f"hold on logins of {document['identifier']} lifted")
    _emit(args, document, text)
    return EXIT_OK


def cmd_reload(client: Client, args: argparse.Namespace) -> int:
    try:
        _, document = client.call("POST", "/config/reload")
    except CtlError as exc:
        if isinstance(exc.body, dict) and exc.body.get("problems"):
            problems = "\n".join(f"  {p}" for p in exc.body["problems"])
            raise CtlError(f"{exc}\n{problems}", exc.code, exc.body) from None
        raise
    pending = document.get("restart_required") or []
    _emit(args, document, "configuration reloaded" + (
        "; these changes need a restart: " + ", ".join(pending) if pending else ""))
    return EXIT_OK


def cmd_health(client: Client, args: argparse.Namespace) -> int:
    path = "/healthz/live" if args.live else "/healthz/ready"
    status, document = client.call("GET", path, accept=(503,))
    if status == 503:
        reasons = "; ".join(document.get("reasons", [])) if isinstance(document, dict) else ""
        _emit(args, document, f"not ready: {reasons}")
        return EXIT_API
    _emit(args, document, document.get("status", "ok") if isinstance(document, dict) else "ok")
    return EXIT_OK


def cmd_metrics(client: Client, args: argparse.Namespace) -> int:
    response = client.send("GET", "/metrics")
    body = response.read()
    if response.status != 200:
        raise CtlError(f"HTTP {response.status}: {response.reason}")
    sys.stdout.write(body.decode("utf-8"))
    return EXIT_OK


# --- bulk import ------------------------------------------------------------------------


class Progress:
    """A bar on a TTY (redrawn in place), else a line every :data:`PROGRESS_INTERVAL` s."""

    def __init__(self, total: int, label: str, stream=None) -> None:
        self.total = max(total, 1)
        self.label = label
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.started = self._last = time.monotonic()

    def update(self, done: int, final: bool = False) -> None:
        now = time.monotonic()
        rate = done / max(now - self.started, 1e-6)
        fraction = min(done / self.total, 1.0)
        if self.tty:
            width = 30
            filled = int(width * fraction)
            bar = "#" * filled + "-" * (width - filled)
            self.stream.write(f"\r{self.label} [{bar}] {fraction:4.0%} {done:,}/{self.total:,} "
                              f"rows {rate:,.0f} rows/s" + ("\n" if final else ""))
            self.stream.flush()
        elif final or now - self._last >= PROGRESS_INTERVAL:
            self._last = now
            self.stream.write(f"{self.label}: {done:,}/{self.total:,} rows ({fraction:.0%}), "
                              f"{rate:,.0f} rows/s\n")
            self.stream.flush()


def _detect_file_format(path: Path, explicit: str | None) -> str:
    if explicit:
        return explicit
    if path.suffix.lower() in (".json", ".jsonl", ".ndjson"):
        return "json"
    with open(path, "rb") as handle:
        return bulk.detect_format(None, None, handle.read(512))


def _tsv_batches(handle: BinaryIO, size: int, rejected: list[dict[str, Any]]
                 ) -> Iterator[tuple[bytes, list[int], int]]:
    """``(body, line numbers of the body's lines, rows)`` per batch of ``size`` rows; lines
    too long to send are rejected here."""
    lines: list[bytes] = []
    numbers: list[int] = []
    rows = 0
    number = 0
    while True:
        raw = handle.readline(bulk.MAX_LINE + 1)
        if not raw:
            break
        number += 1
        if len(raw) > bulk.MAX_LINE and not raw.endswith(b"\n"):
            while (rest := handle.readline(bulk.CHUNK)) and not rest.endswith(b"\n"):
                pass
            rejected.append({"line": number, "reason": f"line longer than {bulk.MAX_LINE} "
                                                       "bytes"})
            continue
        stripped = raw.strip()
        if not stripped or stripped.startswith(b"#"):
            continue
        lines.append(raw if raw.endswith(b"\n") else raw + b"\n")
        numbers.append(number)
        rows += 1
        if rows >= size:
            yield b"".join(lines), numbers, rows
            lines, numbers, rows = [], [], 0
    if lines:
        yield b"".join(lines), numbers, rows


def _json_batches(handle: BinaryIO, size: int, rejected: list[dict[str, Any]]
                  ) -> Iterator[tuple[bytes, list[int], int]]:
    """Batches re-encoded as JSON arrays, one element per line (body line k+2 ↔ element k)."""
    rows: list[bulk.Row] = []

    def body() -> tuple[bytes, list[int], int]:
        text = "".join(bulk.json_lines((r.identifier, r.destination) for r in rows))
        return text.encode("utf-8"), [0] + [r.line for r in rows], len(rows)

    for record in bulk.read_json(handle):
        if isinstance(record, bulk.BadRow):
            rejected.append({"line": record.line, "reason": record.reason})
            continue
        rows.append(record)
        if len(rows) >= size:
            yield body()
            rows = []
    if rows:
        yield body()


def _count_rows(path: Path, fmt: str) -> int:
    """Rows in the file (a first pass: it also refuses a JSON file that is unreadable
    further on before anything is sent)."""
    with open(path, "rb") as handle:
        if fmt == "json":
            try:
                return sum(1 for _ in bulk.read_json(handle))
            except bulk.BulkFormatError as exc:
                raise CtlError(f"{path}: {exc}; nothing imported") from None
        return sum(1 for raw in handle
                   if (s := raw.strip()) and not s.startswith(b"#"))


def cmd_mappings_import(client: Client, args: argparse.Namespace) -> int:
    path = Path(args.file)
    if not path.is_file():
        raise CtlError(f"{path}: no such file", EXIT_USAGE)
    if args.batch_size < 1:
        raise CtlError("--batch-size must be at least 1", EXIT_USAGE)
    fmt = _detect_file_format(path, args.format)
    total = _count_rows(path, fmt)
    progress = Progress(total, f"importing {path.name}")
    local: list[dict[str, Any]] = []  # rows refused before sending (unreadable here)
    listed: list[dict[str, Any]] = []  # rows the server refused, with file line numbers
    summary: dict[str, Any] = {"rows": 0, "imported": 0, "unchanged": 0, "duplicates": 0,
                               "rejected_count": 0}
    started = time.monotonic()
    params = {"format": fmt, "dry_run": "true" if args.dry_run else None}
    done = 0
    with open(path, "rb") as handle:
        batches = (_json_batches if fmt == "json" else _tsv_batches)(
            handle, args.batch_size, local)
        for body, numbers, rows in batches:
            _, result = client.call("POST", "/mappings/import", params, body,
                                    bulk.CONTENT_TYPES[fmt])
            for key in ("imported", "unchanged", "duplicates", "rejected_count"):
                summary[key] += result.get(key, 0)
            for item in result.get("rejected", []):
                line = item.get("line", 0)
                listed.append({**item, "line": numbers[line - 1] if 0 < line <= len(numbers)
                               else line})
            done += rows
            progress.update(done)
    progress.update(done, final=True)
    rejected = sorted(local + listed, key=lambda item: item["line"])
    summary["rows"] = done + len(local)
    summary["rejected_count"] += len(local)
    elapsed = time.monotonic() - started
    summary.update(rejected=rejected[:1000], dry_run=bool(args.dry_run),
                   seconds=round(elapsed, 3), rows_per_second=round(done / max(elapsed, 1e-6)),
                   file=str(path), format=fmt)
    verb = "checked" if args.dry_run else "imported"
    lines = [f"{verb} {path.name}: {done:,} rows in {elapsed:.1f}s "
             f"({summary['rows_per_second']:,} rows/s): {summary['imported']:,} written, "
             f"{summary['unchanged']:,} unchanged, {summary['rejected_count']:,} rejected"]
    if rejected:
        lines.append("rejected rows:")
        lines += [f"  line {item['line']}: {item['reason']}" for item in rejected[:50]]
        if summary["rejected_count"] > 50:
            lines.append(f"  … and {summary['rejected_count'] - 50:,} more (see --json)")
    _emit(args, summary, "\n".join(lines))
    return EXIT_API if summary["rejected_count"] else EXIT_OK


# --- argument parsing -------------------------------------------------------------------


def _connection_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """The options every subcommand accepts (before or after the subcommand's name)."""

    def default(value: Any) -> Any:
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


def add_ctl_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``ctl`` and its subcommands on the ``stalroute`` subparsers object."""
    ctl = subparsers.add_parser(
        "ctl", help="command-line client for the admin API",
        description="Talk to a running stalroute's admin API (HTTPS).",
        epilog="Exit status: 0 ok, 1 API error (or rows rejected, not ready, not mapped), "
               "2 usage.")
    _connection_options(ctl, suppress=False)
    ctl.set_defaults(handler=run_ctl, ctl_action=None)
    common = argparse.ArgumentParser(add_help=False)
    _connection_options(common, suppress=True)
    commands = ctl.add_subparsers(dest="ctl_command", metavar="SUBCOMMAND")

    def command(parent, name: str, action, help: str, **kwargs) -> argparse.ArgumentParser:
        parser = parent.add_parser(name, help=help, description=help, parents=[common],
                                   **kwargs)
        parser.set_defaults(ctl_action=action)
        return parser

    command(commands, "stats", cmd_stats, "listeners, sessions, cache and ban counters")

    destinations = command(commands, "destinations", cmd_destinations,
                           "destinations and their circuit state")
    dest_actions = destinations.add_subparsers(dest="destinations_command", metavar="ACTION")
    command(dest_actions, "list", cmd_destinations, "list destinations (default)")
    reset = command(dest_actions, "reset", cmd_destinations_reset,
                    "close a destination's circuit by hand")
    reset.add_argument("name", metavar="NAME")

    mappings = commands.add_parser("mappings", help="read and write account mappings",
                                   parents=[common])
    mappings.set_defaults(ctl_action=None, ctl_help=mappings)
    map_actions = mappings.add_subparsers(dest="mappings_command", metavar="ACTION")
    get = command(map_actions, "get", cmd_mappings_get, "where an account is mapped")
    get.add_argument("identifier", metavar="IDENTIFIER")
    put = command(map_actions, "put", cmd_mappings_put,
                  "map an account to a destination (drops its cached route)")
    put.add_argument("identifier", metavar="IDENTIFIER")
    put.add_argument("destination", metavar="DESTINATION")
    delete = command(map_actions, "delete", cmd_mappings_delete, "remove an account's mapping")
    delete.add_argument("identifier", metavar="IDENTIFIER")
    command(map_actions, "reload", cmd_mappings_reload,
            "re-read the mapping store and empty the route cache")
    export = command(map_actions, "export", cmd_mappings_export,
                     "write every mapping to stdout (or --output)")
    export.add_argument("--format", choices=bulk.FORMATS, default="tsv")
    export.add_argument("--output", "-o", metavar="FILE")
    imp = command(map_actions, "import", cmd_mappings_import,
                  "bulk upsert from a TSV or JSON file, with progress and a summary")
    imp.add_argument("file", metavar="FILE")
    imp.add_argument("--format", choices=bulk.FORMATS,
                     help="default: from the file name (.json) or its first byte")
    imp.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, metavar="ROWS",
                     help="rows per request (default: %(default)s)")
    imp.add_argument("--dry-run", action="store_true", help="validate only, write nothing")

    cache = commands.add_parser("cache", help="the route cache", parents=[common])
    cache.set_defaults(ctl_action=None, ctl_help=cache)
    cache_actions = cache.add_subparsers(dest="cache_command", metavar="ACTION")
    invalidate = command(cache_actions, "invalidate", cmd_cache_invalidate,
                         "drop one account's cached route, or all of them")
    invalidate.add_argument("identifier", metavar="IDENTIFIER", nargs="?")

    connections = command(commands, "connections", cmd_connections, "live (logged-in) sessions")
    conn_actions = connections.add_subparsers(dest="connections_command", metavar="ACTION")
    listing = command(conn_actions, "list", cmd_connections, "list sessions (default)")
    for parser in (connections, listing):
        parser.add_argument("--identifier", default=argparse.SUPPRESS if parser is listing
                            else None)
        parser.add_argument("--destination", default=argparse.SUPPRESS if parser is listing
                            else None)

    kick = command(commands, "kick", cmd_kick,
                   "close the live sessions of an account and/or on a destination")
    kick.add_argument("--identifier")
    kick.add_argument("--destination", help="drain a node: every session on it")

    delay = command(commands, "delay", cmd_delay,
                    "hold an account's new logins for SECONDS (0 lifts the hold)")
    delay.add_argument("identifier", metavar="IDENTIFIER")
    delay.add_argument("seconds", metavar="SECONDS", type=float)

    command(commands, "reload", cmd_reload,
            "reload the configuration (like SIGHUP); lists changes that need a restart")

    health = command(commands, "health", cmd_health, "readiness (or --live: liveness)")
    health.add_argument("--live", action="store_true")

    command(commands, "metrics", cmd_metrics, "print the Prometheus metrics")
    ctl.set_defaults(ctl_help=ctl)
    return ctl


def run_ctl(args: argparse.Namespace) -> int:
    action = getattr(args, "ctl_action", None)
    if action is None:
        args.ctl_help.print_help(sys.stderr)
        return EXIT_USAGE
    client = None
    try:
        client = Client(resolve_url(args), resolve_token(args), tls_context(args), args.timeout)
        return action(client, args)
    except CtlError as exc:
        print(f"stalroute ctl: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("stalroute ctl: interrupted", file=sys.stderr)
        return EXIT_API
    except BrokenPipeError:  # `ctl mappings export | head`
        return EXIT_OK
    finally:
        if client is not None:
            client.close()
