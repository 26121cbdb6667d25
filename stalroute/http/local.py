"""What stalroute answers itself on an HTTP listener: the health endpoints and its errors,
as JSON bodies (``{"error": "..."}``)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from http import HTTPStatus

from twisted.internet.interfaces import IReactorTime

from stalroute.health import readiness
from stalroute.http.wire import ResponseHead
from stalroute.outcomes import Outcome
from stalroute.runtime import Runtime

HEALTH_PATHS = ("/healthz/live", "/healthz/ready")

_STATUS_TEXT = {
    400: "bad request", 404: "no route for this path", 405: "method not allowed",
    408: "request timeout", 431: "request head too large", 501: "not implemented",
    502: "bad gateway", 503: "service unavailable", 504: "gateway timeout",
    505: "HTTP version not supported",
}


def reason_phrase(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def error_body(status: int, message: str | None = None) -> bytes:
    return json.dumps({"error": message or _STATUS_TEXT.get(status, "error")}).encode() + b"\n"


def local_response(status: int, body: bytes, headers: Iterable[tuple[bytes, bytes]] = (), *,
                   close: bool = False) -> ResponseHead:
    """The head of an answer of ours (never cached): JSON unless ``headers`` name another
    ``Content-Type``."""
    given = list(headers)
    typed = any(name.lower() == b"content-type" for name, _ in given)
    all_headers = [*([] if typed else [(b"Content-Type", b"application/json")]),
                   (b"Content-Length", str(len(body)).encode()),
                   (b"Cache-Control", b"no-store"), *given]
    if close:
        all_headers.append((b"Connection", b"close"))
    return ResponseHead(status, reason_phrase(status), all_headers)


def refusal(status: int, reason: str) -> bytes:
    """A complete response refusing what the client sent, written as it is (past the reader,
    whose state the client's bytes may have broken); the connection closes after it."""
    body = error_body(status, reason)
    head = (f"HTTP/1.1 {status} {reason_phrase(status).decode()}\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    return head + body


@dataclass(frozen=True)
class HealthAnswer:
    status: int
    body: bytes
    headers: tuple[tuple[bytes, bytes], ...] = ()
    #: The request's outcome; None: refused like any request (``405``).
    outcome: Outcome | None = Outcome.HEALTH


async def health(method: bytes, path: str, runtime: Runtime,
                 clock: IReactorTime) -> HealthAnswer:
    """``/healthz/live`` says the process answers; ``/healthz/ready`` is the readiness every
    ``/healthz/ready`` of stalroute shares (:func:`~stalroute.health.readiness`)."""
    if method not in (b"GET", b"HEAD"):
        return HealthAnswer(405, error_body(405), headers=((b"Allow", b"GET, HEAD"),),
                            outcome=None)
    if path == "/healthz/live":
        return HealthAnswer(200, b'{"status":"live"}\n')
    result = await readiness(runtime, clock)
    body = json.dumps({"status": "ready" if result.ready else "not ready",
                       "reasons": list(result.reasons)}).encode() + b"\n"
    return HealthAnswer(200 if result.ready else 503, body)
