"""Everything ``stalroute ctl`` says to the admin API: where the URL and token come from,
the TLS trust, the HTTPS requests and their errors, and the streamed bulk import/export.

Only the standard library speaks HTTP here (``http.client`` with an ``ssl`` context), so
``ctl`` starts fast and never loads Twisted's reactor.  Nothing here prints to stdout:
that is :mod:`stalroute.ctl.commands`' job (only the import's progress goes to stderr).
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
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TextIO
from urllib.parse import urlencode, urlsplit

from stalroute.admin import bulk
from stalroute.config import ENV_ADMIN_TOKEN, config_path_from_env, parse_address

EXIT_OK = 0
EXIT_API = 1
EXIT_USAGE = 2
DEFAULT_URL = "https://127.0.0.1:8443"
ENV_URL = "STALROUTE_ADMIN_URL"
DEFAULT_TIMEOUT = 60.0
#: How often a non-TTY progress line is printed, in seconds.
PROGRESS_INTERVAL = 5.0
USER_AGENT = "stalroute-ctl/0.1.0"
#: Bytes read from the response per write while exporting.
EXPORT_CHUNK = 64 * 1024


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


def resolve_url(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> str:
    """``--url``, ``$STALROUTE_ADMIN_URL``, the config's ``[admin] bind``, the default."""
    url: str | None = args.url
    if url:
        return url.rstrip("/")
    if environ.get(ENV_URL):
        return environ[ENV_URL].rstrip("/")
    admin, _ = _admin_table(args.config or config_path_from_env(environ), bool(args.config))
    bind = admin.get("bind")
    if isinstance(bind, str):
        try:
            host, port = parse_address(bind)
        except ValueError:
            raise CtlError(f"[admin] bind {bind!r} is not an address", EXIT_USAGE)
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
        return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
    return DEFAULT_URL


def resolve_token(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> str:
    """``--token-file``, the token variables, the config's token file or inline token."""
    if args.token_file:
        try:
            return Path(args.token_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise CtlError(f"cannot read the token file: {exc}", EXIT_USAGE) from None
    for name in ENV_ADMIN_TOKEN:
        if environ.get(name, "").strip():
            return environ[name].strip()
    admin, base = _admin_table(args.config or config_path_from_env(environ), bool(args.config))
    token_file, token = admin.get("bearer_token_file"), admin.get("bearer_token")
    if isinstance(token_file, str) and base is not None:
        path = base / token_file
        try:
            return path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise CtlError(f"cannot read {path}: {exc}", EXIT_USAGE) from None
    if isinstance(token, str):
        return token.strip()
    raise CtlError("no admin token: use --token-file, set $STALROUTE_ADMIN_TOKEN, or give "
                   "--config with an [admin] token", EXIT_USAGE)


def tls_context(args: argparse.Namespace) -> ssl.SSLContext:
    """The system trust store, ``--cacert``'s bundle, or no verification (``--insecure``)."""
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

    def _target(self, path: str, params: Mapping[str, Any] | None) -> str:
        query = urlencode({k: v for k, v in (params or {}).items() if v is not None})
        return self._prefix + path + (f"?{query}" if query else "")

    def send(self, method: str, path: str, params: Mapping[str, Any] | None = None,
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

    def call(self, method: str, path: str, params: Mapping[str, Any] | None = None,
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


# --- bulk export ------------------------------------------------------------------------


def export_mappings(client: Client, fmt: str) -> Iterator[bytes]:
    """Ask for every mapping in ``fmt``; the body's chunks, read as they are consumed (an
    error answer raises here, before the caller opens its output)."""
    response = client.send("GET", "/mappings/export", {"format": fmt})
    if response.status != 200:
        raw = response.read()
        try:
            message = json.loads(raw).get("error")
        except (ValueError, AttributeError):
            message = None
        raise CtlError(f"HTTP {response.status}: {message or response.reason}")
    return iter(lambda: response.read(EXPORT_CHUNK), b"")


# --- bulk import ------------------------------------------------------------------------


class Progress:
    """A bar on a TTY (redrawn in place), else a line every :data:`PROGRESS_INTERVAL` s."""

    def __init__(self, total: int, label: str, stream: TextIO | None = None) -> None:
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


#: A request body, the file line number of each of its lines, and the rows it holds.
Batch = tuple[bytes, list[int], int]


def detect_file_format(path: Path, explicit: str | None) -> str:
    """``explicit``, else ``json`` for a JSON file name, else what the first bytes say."""
    if explicit:
        return explicit
    if path.suffix.lower() in (".json", ".jsonl", ".ndjson"):
        return "json"
    with open(path, "rb") as handle:
        return bulk.detect_format(None, None, handle.read(512))


def tsv_batches(handle: BinaryIO, size: int, rejected: list[dict[str, Any]]
                ) -> Iterator[Batch]:
    """Batches of ``size`` rows; lines too long to send are rejected here."""
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


def json_batches(handle: BinaryIO, size: int, rejected: list[dict[str, Any]]
                 ) -> Iterator[Batch]:
    """Batches re-encoded as JSON arrays, one element per line (body line k+2 ↔ element k)."""
    rows: list[bulk.Row] = []

    def body() -> Batch:
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


def count_rows(path: Path, fmt: str) -> int:
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


@dataclass
class ImportOutcome:
    """The sums over every batch of a bulk import; ``rejected`` carries file line numbers
    and holds the rows refused here (unreadable) as well as those the API refused."""

    rows: int  # read from the file: sent, or refused here
    sent: int
    elapsed: float
    imported: int
    unchanged: int
    duplicates: int
    rejected: list[dict[str, Any]]
    rejected_count: int


def import_mappings(client: Client, path: Path, fmt: str, batch_size: int,
                    dry_run: bool) -> ImportOutcome:
    """Upsert the file's rows ``batch_size`` per request (each validated and written on its
    own), showing progress on stderr."""
    progress = Progress(count_rows(path, fmt), f"importing {path.name}")
    local: list[dict[str, Any]] = []  # rows refused before sending (unreadable here)
    listed: list[dict[str, Any]] = []  # rows the server refused, with file line numbers
    sums = {"imported": 0, "unchanged": 0, "duplicates": 0, "rejected_count": 0}
    started = time.monotonic()
    params = {"format": fmt, "dry_run": "true" if dry_run else None}
    done = 0
    with open(path, "rb") as handle:
        batches = (json_batches if fmt == "json" else tsv_batches)(handle, batch_size, local)
        for body, numbers, rows in batches:
            _, result = client.call("POST", "/mappings/import", params, body,
                                    bulk.CONTENT_TYPES[fmt])
            for key in sums:
                sums[key] += result.get(key, 0)
            for item in result.get("rejected", []):
                line = item.get("line", 0)
                listed.append({**item, "line": numbers[line - 1] if 0 < line <= len(numbers)
                               else line})
            done += rows
            progress.update(done)
    progress.update(done, final=True)
    return ImportOutcome(
        rows=done + len(local), sent=done, elapsed=time.monotonic() - started, imported=sums["imported"],
        unchanged=sums["unchanged"], duplicates=sums["duplicates"],
        rejected=sorted(local + listed, key=lambda item: item["line"]),
        rejected_count=sums["rejected_count"] + len(local))
