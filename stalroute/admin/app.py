"""The admin API routes (SPEC §8): a thin translation of HTTP onto
:class:`~stalroute.control.Control`.

Every handler goes through :meth:`AdminAPI._handle`, which authenticates (bearer token,
per-IP lockout), turns the handler's result or exception into a JSON response with the
proper status, and logs the request line with identifiers redacted (never a token, never a
body).  Parameters come from the query string, as in the reference product; writes also
accept a JSON object body (or a form-encoded one) carrying the same fields, and the query
string wins when both name a field.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Awaitable, Callable, Iterable
from functools import wraps
from importlib.metadata import PackageNotFoundError, version
from typing import Any
from urllib.parse import parse_qsl

from klein import Klein
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.defer import TimeoutError as DeferTimeoutError
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import deferLater
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound
from zope.interface import implementer

from stalroute.admin import bulk
from stalroute.admin.auth import Lockout, TokenCheck
from stalroute.admin.importer import Importer, export_entries
from stalroute.admin.metrics import CONTENT_TYPE_LATEST, metrics_registry, render
from stalroute.admin.openapi import MAX_DELAY, openapi_document
from stalroute.config import ConfigError
from stalroute.control import Control, UnknownDestination
from stalroute.identity import InvalidIdentifier, redact
from stalroute.logs import logger
from stalroute.mapping import NotListable, ReadOnlyStore, StoreError
from stalroute.mapping.file import MappingFileError
from stalroute.runtime import StartupError

log = logger("stalroute.admin")

def _version() -> str:
    try:
        return version("stalroute")
    except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "unknown"


VERSION = _version()
#: Largest JSON / form parameter body accepted (bulk import bodies are not limited).
MAX_PARAMS_BODY = 64 * 1024
#: Export responses are written in pieces of about this size.
EXPORT_CHUNK = 64 * 1024
#: Query parameters whose values are identifiers: redacted in logs.
_IDENTIFIER_PARAMETERS = frozenset({"identifier"})
_SECRET_PARAMETERS = frozenset({"token", "password", "bearer_token"})
#: The answer to a failure nobody foresaw (its traceback is logged).
INTERNAL_ERROR = "internal error (see the stalroute log)"


class ApiError(Exception):
    """An answer other than success: ``status`` and a JSON body ``{"error": message, ...}``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None,
                 **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.body = {"error": message, **extra}
        self.headers = headers or {}


class Reply:
    """A handler's answer: JSON ``body`` or ``raw`` bytes of ``content_type``."""

    def __init__(self, status: int = 200, body: Any = None, *, raw: bytes | None = None,
                 content_type: str = "application/json",
                 headers: dict[str, str] | None = None) -> None:
        self.status, self.body, self.raw = status, body, raw
        self.content_type, self.headers = content_type, headers or {}


#: Returned by a handler that has written its response itself (streamed export).
STREAMED = Reply(200)


def _endpoint(*, auth: bool = True, quiet: bool = False):
    """Mark a method as an admin endpoint: see :meth:`AdminAPI._handle`."""

    def decorate(method: Callable[..., Awaitable[Any]]):
        @wraps(method)
        def handler(self: AdminAPI, request, **kwargs):
            return Deferred.fromCoroutine(self._handle(request, method, auth=auth, quiet=quiet))
        return handler

    return decorate


def _client_ip(request) -> str:
    address = request.getClientAddress()
    return getattr(address, "host", None) or "-"


def _flag(value: str | None, name: str) -> bool:
    if value is None or value.lower() in ("", "0", "false", "no", "off"):
        return False
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    raise ApiError(400, f"{name} must be true or false")


@implementer(IPushProducer)
class _Backpressure:
    """Pauses a streamed response while the client's socket buffer is full."""

    def __init__(self) -> None:
        self._paused: Deferred[None] | None = None
        self.stopped = False

    def pauseProducing(self) -> None:
        if self._paused is None:
            self._paused = Deferred()

    def resumeProducing(self) -> None:
        paused, self._paused = self._paused, None
        if paused is not None:
            paused.callback(None)

    def stopProducing(self) -> None:
        self.stopped = True
        self.resumeProducing()

    async def wait(self) -> None:
        if self._paused is not None:
            await self._paused


class AdminAPI:
    """The Klein app bound to a running proxy's :class:`~stalroute.control.Control`."""

    app = Klein()

    def __init__(self, control: Control, *, clock, token: str | None,
                 lockout: Lockout) -> None:
        self.control = control
        self._clock = clock
        self._token = TokenCheck(token)
        self.lockout = lockout
        self._started = clock.seconds()

    def resource(self):
        return self.app.resource()

    # --- the common path ------------------------------------------------------------------

    def may_upload(self, request) -> bool:
        """Whether a request body is worth receiving: unauthenticated or locked-out requests
        get theirs discarded as it arrives (they are answered 401/429 anyway)."""
        if self.lockout.locked_for(_client_ip(request)):
            return False
        return self._token.matches(request.getHeader("authorization"))

    def _authenticate(self, request, ip: str) -> None:
        left = self.lockout.locked_for(ip)
        if left:
            raise ApiError(429, "too many failed attempts from this address; try again later",
                           headers={"Retry-After": str(math.ceil(left))})
        if not self._token.matches(request.getHeader("authorization")):
            locked = self.lockout.failed(ip)
            log.warn("admin: {ip} {method} {path}: missing or wrong bearer token{locked}",
                     ip=ip, method=request.method.decode("ascii", "replace"),
                     path=request.path.decode("utf-8", "replace")[:200],
                     locked=f"; address locked out for {self.lockout.duration:g}s"
                     if locked else "")
            raise ApiError(401, "missing or wrong bearer token",
                           headers={"WWW-Authenticate": 'Bearer realm="stalroute admin"'})
        self.lockout.succeeded(ip)

    async def _handle(self, request, method, *, auth: bool, quiet: bool) -> bytes | None:
        started = time.monotonic()
        ip = _client_ip(request)
        try:
            if auth:
                self._authenticate(request, ip)
            result = await method(self, request)
            reply = result if isinstance(result, Reply) else Reply(200, result)
        except ApiError as exc:
            reply = Reply(exc.status, exc.body, headers=exc.headers)
        except CancelledError:
            raise  # the client went away: Klein drops the request
        except Exception as exc:  # noqa: BLE001 - every failure becomes a JSON answer
            reply = self._failure_reply(exc)
        (log.debug if quiet and reply.status < 400 else log.info)(
            "admin: {ip} {method} {target} -> {status} ({elapsed:.3f}s)", ip=ip,
            method=request.method.decode("ascii", "replace"), target=_log_target(request),
            status=reply.status, elapsed=time.monotonic() - started)
        if reply is STREAMED:
            return None
        if request.startedWriting:  # failed mid-stream: cut it, so it cannot pass as whole
            transport = getattr(request.channel, "transport", None)
            if transport is not None:
                transport.abortConnection()
            return None
        request.setResponseCode(reply.status)
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        for name, value in reply.headers.items():
            request.setHeader(name.encode("ascii"), value.encode("ascii"))
        request.setHeader(b"Content-Type", reply.content_type.encode("ascii"))
        if reply.raw is not None:
            return reply.raw
        return json.dumps(reply.body, ensure_ascii=False).encode("utf-8") + b"\n"

    def _failure_reply(self, exc: Exception) -> Reply:
        if isinstance(exc, InvalidIdentifier):
            return Reply(400, {"error": f"invalid identifier: {exc}"})
        if isinstance(exc, UnknownDestination):
            return Reply(400, {"error": f"destination {str(exc)!r} is not declared",
                               "destinations": sorted(self.control.runtime.config.destinations)})
        if isinstance(exc, bulk.BulkFormatError):
            return Reply(400, {"error": f"unreadable body, nothing written: {exc}",
                               "line": exc.line})
        if isinstance(exc, (ConfigError, StartupError)):
            problems = [str(p) for p in getattr(exc, "problems", [exc])]
            return Reply(400, {"error": "configuration refused; the running one is kept",
                               "problems": problems})
        if isinstance(exc, MappingFileError):
            return Reply(400, {"error": f"mapping file refused, the old table is kept: {exc}",
                               "problems": exc.problems})
        if isinstance(exc, ReadOnlyStore):
            return Reply(501, {"error": str(exc) or "the mapping store is read-only"})
        if isinstance(exc, NotListable):
            return Reply(501, {"error": str(exc)})
        if isinstance(exc, StoreError):
            return Reply(503, {"error": f"mapping store unavailable: {exc}"})
        if isinstance(exc, (TimeoutError, DeferTimeoutError)):
            return Reply(503, {"error": "the mapping store did not answer in time"})
        log.failure("admin: unexpected error", failure=None)
        return Reply(500, {"error": INTERNAL_ERROR})

    # --- parameters ---------------------------------------------------------------------

    def _params(self, request, *, body: bool = False) -> dict[str, str]:
        """Query parameters (first value of each), over the JSON or form body's fields."""
        params: dict[str, str] = {}
        if body:
            params.update(self._body_params(request))
        for key, values in (request.args or {}).items():
            try:
                params[key.decode("utf-8")] = values[0].decode("utf-8")
            except UnicodeDecodeError:
                raise ApiError(400, "query parameters must be UTF-8") from None
        return params

    def _body_params(self, request) -> dict[str, str]:
        content = request.content
        if content is None:
            return {}
        content.seek(0)
        data = content.read(MAX_PARAMS_BODY + 1)
        content.seek(0)
        if len(data) > MAX_PARAMS_BODY:
            raise ApiError(413, f"body larger than {MAX_PARAMS_BODY} bytes")
        if not data.strip():
            return {}
        media = (request.getHeader("content-type") or "").split(";", 1)[0].strip().lower()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(400, "the body must be UTF-8") from None
        if media == "application/x-www-form-urlencoded" and not text.lstrip().startswith("{"):
            return dict(parse_qsl(text, keep_blank_values=True))
        try:
            document = json.loads(text)
        except (ValueError, RecursionError):
            raise ApiError(400, "the body must be a JSON object") from None
        if not isinstance(document, dict):
            raise ApiError(400, "the body must be a JSON object")
        params = {}
        for key, value in document.items():
            if isinstance(value, bool):
                params[key] = "true" if value else "false"
            elif isinstance(value, (str, int, float)):
                params[key] = str(value)
            elif value is not None:
                raise ApiError(400, f"{key} must be a string or a number")
        return params

    @staticmethod
    def _required(params: dict[str, str], name: str) -> str:
        value = params.get(name)
        if not value:
            raise ApiError(400, f"missing parameter: {name}")
        return value

    # --- errors Klein raises before a handler runs ----------------------------------------

    @app.handle_errors(HTTPException)
    def _http_error(self, request, failure):
        exc = failure.value
        headers = {}
        if isinstance(exc, NotFound):
            message = "no such endpoint (see /openapi.json)"
        elif isinstance(exc, MethodNotAllowed):
            allowed = sorted(exc.valid_methods or [])
            headers["Allow"] = ", ".join(allowed)
            message = f"method not allowed; use {', '.join(allowed)}"
        else:
            message = exc.description or exc.name
        request.setResponseCode(exc.code)
        for name, value in headers.items():
            request.setHeader(name, value)
        if getattr(exc, "new_url", None):
            request.setHeader(b"Location", exc.new_url.encode("utf-8"))  # a redirect
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps({"error": message}).encode() + b"\n"

    # --- health (no authentication) -----------------------------------------------------

    @app.route("/healthz", methods=["GET"])
    @_endpoint(auth=False, quiet=True)
    async def healthz(self, request):
        return {"status": "ok"}

    @app.route("/healthz/live", methods=["GET"])
    @_endpoint(auth=False, quiet=True)
    async def healthz_live(self, request):
        return {"status": "ok"}

    @app.route("/healthz/ready", methods=["GET"])
    @_endpoint(auth=False, quiet=True)
    async def healthz_ready(self, request):
        readiness = await self.control.readiness()
        if readiness.ready:
            return {"status": "ready"}
        return Reply(503, {"status": "not ready", "reasons": list(readiness.reasons),
                           "error": "not ready: " + "; ".join(readiness.reasons)})

    # --- statistics ---------------------------------------------------------------------

    @app.route("/stats", methods=["GET"])
    @_endpoint()
    async def stats(self, request):
        return {**await self.control.instance_stats(), "version": VERSION,
                "uptime": round(self._clock.seconds() - self._started, 3),
                "admin": {"lockouts": self.lockout.lockouts,
                          "locked_addresses": self.lockout.locked()}}

    @app.route("/cluster", methods=["GET"])
    @_endpoint()
    async def cluster(self, request):
        return self.control.cluster()

    @app.route("/destinations", methods=["GET"])
    @_endpoint()
    async def destinations(self, request):
        return {"destinations": await self.control.instance_destinations()}

    @app.route("/destinations/reset", methods=["POST"])
    @_endpoint()
    async def destinations_reset(self, request):
        name = self._required(self._params(request, body=True), "destination")
        reset = self.control.reset_destination(name)
        if reset is None:
            raise ApiError(404, f"no destination named {name!r}")
        return {"destination": name, "circuit": "closed", **(await reset).fields()}

    @app.route("/metrics", methods=["GET"])
    @_endpoint(quiet=True)
    async def metrics(self, request):
        registry = metrics_registry(await self.control.reports(),
                                    self.control.cluster_state(),
                                    (self.lockout.lockouts, self.lockout.locked()),
                                    self.control.certificates())
        return Reply(200, raw=render(registry), content_type=CONTENT_TYPE_LATEST)

    @app.route("/openapi.json", methods=["GET"])
    @_endpoint(quiet=True)
    async def openapi(self, request):
        return openapi_document()

    # --- mappings -----------------------------------------------------------------------

    @app.route("/mappings", methods=["GET"])
    @_endpoint()
    async def mappings_get(self, request):
        identifier = self.control.normalize(self._required(self._params(request), "identifier"))
        destination = await self.control.get_mapping(identifier)
        if destination is None:
            default = self.control.runtime.config.routing.default_destination
            raise ApiError(404, "not mapped; logins go to the default destination",
                           identifier=identifier, default_destination=default)
        return {"identifier": identifier, "destination": destination}

    @app.route("/mappings", methods=["PUT"])
    @_endpoint()
    async def mappings_put(self, request):
        params = self._params(request, body=True)
        identifier = self.control.normalize(self._required(params, "identifier"))
        destination = self._required(params, "destination")
        done = await self.control.put_mapping(identifier, destination)
        return {"identifier": identifier, "destination": destination, **done.fields()}

    @app.route("/mappings", methods=["DELETE"])
    @_endpoint()
    async def mappings_delete(self, request):
        identifier = self.control.normalize(
            self._required(self._params(request, body=True), "identifier"))
        existed, done = await self.control.delete_mapping(identifier)
        return {"identifier": identifier, "deleted": bool(existed), **done.fields()}

    @app.route("/mappings/reload", methods=["POST"])
    @_endpoint()
    async def mappings_reload(self, request):
        entries, done = await self.control.reload_mappings()
        return {"entries": entries, **done.fields()}

    @app.route("/mappings/export", methods=["GET"])
    @_endpoint()
    async def mappings_export(self, request):
        fmt = self._params(request).get("format") or "tsv"
        if fmt not in bulk.FORMATS:
            raise ApiError(400, f"format must be one of {', '.join(bulk.FORMATS)}")
        entries = await export_entries(self.control)
        pieces: Iterable[str] = (bulk.json_lines(entries) if fmt == "json" else
                                 (bulk.tsv_line(i, d) for i, d in entries))
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", bulk.CONTENT_TYPES[fmt].encode())
        request.setHeader(b"Cache-Control", b"no-store")
        await self._stream(request, pieces)
        return STREAMED

    async def _stream(self, request, pieces: Iterable[str]) -> None:
        producer = _Backpressure()
        request.registerProducer(producer, True)
        try:
            buffered: list[str] = []
            size = 0
            for piece in pieces:
                buffered.append(piece)
                size += len(piece)
                if size >= EXPORT_CHUNK:
                    request.write("".join(buffered).encode("utf-8"))
                    buffered, size = [], 0
                    await producer.wait()
                    if producer.stopped:
                        return
                    await deferLater(self._clock, 0)  # let live sessions have the reactor
            if buffered:
                request.write("".join(buffered).encode("utf-8"))
        finally:
            request.unregisterProducer()

    @app.route("/mappings/import", methods=["POST"])
    @_endpoint()
    async def mappings_import(self, request):
        params = self._params(request)
        dry_run = _flag(params.get("dry_run"), "dry_run")
        content = request.content
        content.seek(0)
        head = content.read(512)
        content.seek(0)
        try:
            fmt = bulk.detect_format(params.get("format"), request.getHeader("content-type"),
                                     head)
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        return await Importer(self.control, self._clock).run(content, fmt, dry_run)

    # --- cache and sessions -------------------------------------------------------------

    @app.route("/cache/invalidate", methods=["POST"])
    @_endpoint()
    async def cache_invalidate(self, request):
        identifier = self._params(request, body=True).get("identifier") or None
        key = None if identifier is None else self.control.normalize(identifier)
        done = await self.control.invalidate(key)
        return {"identifier": key, "invalidated": done.count, **done.fields()}

    @app.route("/connections", methods=["GET"])
    @_endpoint()
    async def connections(self, request):
        params = self._params(request)
        sessions = await self.control.instance_connections()
        if params.get("identifier"):
            key = self.control.normalize(params["identifier"])
            sessions = [s for s in sessions if s["identifier"] == key]
        if params.get("destination"):
            sessions = [s for s in sessions if s["destination"] == params["destination"]]
        return {"connections": sessions}

    @app.route("/connections/kick", methods=["POST"])
    @_endpoint()
    async def connections_kick(self, request):
        params = self._params(request, body=True)
        identifier = params.get("identifier") or None
        destination = params.get("destination") or None
        if identifier is None and destination is None:
            raise ApiError(400, "missing parameter: identifier or destination")
        if identifier is not None:
            identifier = self.control.normalize(identifier)
        if (destination is not None
                and destination not in self.control.runtime.config.destinations
                and not any(s["destination"] == destination
                            for s in await self.control.instance_connections())):
            raise ApiError(404, f"no destination named {destination!r}")
        done = await self.control.kick(identifier=identifier, destination=destination)
        return {"identifier": identifier, "destination": destination, "kicked": done.count,
                **done.fields()}

    @app.route("/connections/delay", methods=["POST"])
    @_endpoint()
    async def connections_delay(self, request):
        params = self._params(request, body=True)
        identifier = self.control.normalize(self._required(params, "identifier"))
        text = self._required(params, "seconds")
        try:
            seconds = float(text)
        except ValueError:
            raise ApiError(400, "seconds must be a number") from None
        if not math.isfinite(seconds) or not 0 <= seconds <= MAX_DELAY:
            raise ApiError(400, f"seconds must be between 0 and {MAX_DELAY}")
        done = await self.control.delay(identifier, seconds)
        return {"identifier": identifier, "seconds": seconds, **done.fields()}

    # --- certificates -------------------------------------------------------------------

    @app.route("/certificates", methods=["GET"])
    @_endpoint()
    async def certificates(self, request):
        return {"node_id": self.control.runtime.config.cluster.node_id,
                "certificates": self.control.certificates()}

    @app.route("/certificates/renew", methods=["POST"])
    @_endpoint()
    async def certificates_renew(self, request):
        name = self._required(self._params(request, body=True), "name")
        entry = self.control.runtime.config.tls.certificates.get(name)
        if entry is None:
            raise ApiError(404, f"no certificate named {name!r}",
                           certificates=sorted(self.control.runtime.config.tls.certificates))
        if entry.acme is None:
            raise ApiError(400, f"certificate {name!r} is read from files (cert/key); only "
                                "acme certificates are renewed by stalroute")
        done = await self.control.renew_certificate(name)
        # The order runs on: GET /certificates shows the new serial, or the failure.
        served = next((row for row in self.control.certificates() if row["name"] == name),
                      None)
        return {"name": name, "requested": True, "certificate": served, **done.fields()}

    # --- configuration ------------------------------------------------------------------

    @app.route("/config/reload", methods=["POST"])
    @_endpoint()
    async def config_reload(self, request):
        return {"reloaded": True, "restart_required": await self.control.reload_config()}


def _log_target(request) -> str:
    """The request's path and query string, identifiers redacted and secrets hidden."""

    def printable(text: str, limit: int) -> str:
        return "".join(c if c.isprintable() and c not in " &" else "?" for c in text[:limit])

    path = printable(request.path.decode("utf-8", "replace"), 200)
    shown = []
    for key, values in (request.args or {}).items():
        name = printable(key.decode("utf-8", "replace"), 50)
        value = values[0].decode("utf-8", "replace") if values else ""
        if name in _IDENTIFIER_PARAMETERS:
            value = redact(value)
        elif name in _SECRET_PARAMETERS:
            value = "***"
        shown.append(f"{name}={printable(value, 100)}")
    return path + ("?" + "&".join(shown) if shown else "")
