"""One HTTP request and its response, as an :class:`Exchange`: where it is (:class:`Phase`),
what it has carried, how its messages look on the other leg, and its log line."""

from __future__ import annotations

import enum

from twisted.logger import LogLevel

from stalroute.config import DestinationConfig
from stalroute.http.headers import (
    Forwarding, backend_request_headers, client_response_headers,
)
from stalroute.http.pool import BackendConnection
from stalroute.http.routes import Route, normalize_path, split_target
from stalroute.http.wire import RequestHead, ResponseHead
from stalroute.identity import redact
from stalroute.logs import enabled, logger
from stalroute.outcomes import Outcome
from stalroute.stats import Metrics

log = logger("stalroute.http")

#: Longest path written to the log.
MAX_LOGGED_PATH = 256


class Phase(enum.Enum):
    """Where an exchange is; the client is read on only in the phases that take its bytes."""

    NEW = "new"
    #: Reading the body the route extracts the account from (up to ``body_extract_cap``).
    BUFFERING = "buffering"
    #: Resolving the destination and getting a backend connection (or asking readiness):
    #: reading the client waits.
    ROUTING = "routing"
    #: The request went to a backend; its body follows, its response comes back.
    FORWARDING = "forwarding"
    #: Answered by stalroute itself; the rest of the request body is read and dropped.
    LOCAL = "local"
    #: Switched protocols (WebSocket): bytes flow both ways as they are.
    TUNNEL = "tunnel"


class Exchange:
    """One request and its response."""

    __slots__ = (
        "request", "method", "target", "path", "headers", "started", "has_body", "http10",
        "chunked",
        "phase", "route", "destination", "account", "backend", "status", "bytes_in",
        "bytes_out", "request_complete", "response_started", "response_complete", "buffer",
        "websocket", "streaming", "close_after", "sent_100", "replayable", "retried",
        "outcome", "logged", "host",
    )

    def __init__(self, request: RequestHead, started: float) -> None:
        self.request = request
        self.method = request.method
        self.target = split_target(request.target)
        self.path = normalize_path(self.target.path)
        #: As the client sent them (names in their case).
        self.headers = request.headers
        self.started = started
        self.http10 = request.http_version == b"1.0"
        self.chunked = request.chunked
        self.has_body = request.has_body
        self.host = request.host
        self.phase = Phase.NEW
        self.route: Route | None = None
        self.destination: str | None = None
        self.account: str | None = None
        #: The backend connection the request went to (the last one, after a retry).
        self.backend: BackendConnection | None = None
        self.status: int | None = None
        #: Body bytes each way (tunnel bytes once switched).
        self.bytes_in = self.bytes_out = 0
        self.request_complete = False
        self.response_started = self.response_complete = False
        self.buffer = bytearray()
        self.websocket = False
        self.streaming = False
        #: The client connection closes after this response.
        self.close_after = False
        #: stalroute answered ``Expect: 100-continue`` itself (to read a body it routes by).
        self.sent_100 = False
        #: The whole request can be sent again (no body, or all of it buffered).
        self.replayable = False
        self.retried = False
        #: How it ended, once something went wrong or it was answered; None: fine so far
        #: (recorded as ``ok``).
        self.outcome: Outcome | None = None
        self.logged = False

    @classmethod
    def unreadable(cls, started: float) -> Exchange:
        """Stands for a request whose head could not be read, so that its refusal is logged
        like a request."""
        exchange = cls(RequestHead(b"-", b"/", [], b"1.0"), started)
        exchange.path = "-"
        return exchange

    @property
    def must_close(self) -> bool:
        """The connection cannot serve another request after this one: asked for, or the
        request body is still unread."""
        return self.close_after or (self.has_body and not self.request_complete)

    def backend_request(self, destination: DestinationConfig,
                        forwarding: Forwarding) -> tuple[bytes, bytes, list[tuple[bytes, bytes]]]:
        """The request head as ``destination`` gets it: method, origin-form target and
        headers (hop-by-hop headers dropped, forwarding headers set, ``Host`` filled in for an
        HTTP/1.0 client)."""
        host = self.target.authority
        if host is None and self.host is None:
            port = destination.protocols["http"].port
            host = f"{destination.host}:{port}".encode()
        headers = backend_request_headers(
            self.headers, forwarding, websocket=self.websocket, drop_expect=self.sent_100,
            chunked=self.chunked, host=host)
        # Every part was validated as it was read (the head check, then llhttp) or is ours
        # (forwarding headers, the destination's host).
        return self.method, self.target.origin, headers

    def client_response(self, response: ResponseHead) -> ResponseHead:
        """The backend's response head as the client gets it; notes its status and whether
        it is an event stream."""
        self.status = response.status
        self.response_started = True
        self.close_after = self.must_close
        raw = response.headers
        content_type = next((v for n, v in raw if n.lower() == b"content-type"), b"")
        if content_type.split(b";", 1)[0].strip().lower() == b"text/event-stream":
            self.streaming = True
        headers = client_response_headers(raw, close=self.close_after)
        # As parsed by llhttp from the backend, less hop-by-hop headers, plus ours.
        return ResponseHead(response.status, response.reason, headers)

    def record(self, metrics: Metrics, now: float, *, session: str, listener: str,
               client: tuple[str, int], reason: str | None = None) -> None:
        """Count the request and write its one log line (once)."""
        if self.logged:
            return
        self.logged = True
        outcome = self.outcome or Outcome.OK
        metrics.sessions[("http", self.destination or "-", outcome)] += 1
        if not enabled(LogLevel.info, log.namespace):
            return
        path = self.path or "/"
        account = "-"
        if self.account:
            account = redact(self.account)
            path = path.replace(self.account, account)
        if len(path) > MAX_LOGGED_PATH:
            path = path[:MAX_LOGGED_PATH] + "…"
        log.info("http {method} {path} status={status} destination={destination} "
                 "account={account} in={bytes_in} out={bytes_out} duration={duration:.3f}s "
                 "outcome={outcome} session={session} client={client}{why}",
                 method=self.method.decode("latin-1"), path=path, status=self.status or "-",
                 destination=self.destination or "-", account=account,
                 bytes_in=self.bytes_in, bytes_out=self.bytes_out,
                 duration=now - self.started, outcome=outcome, session=session,
                 protocol="http", listener=listener, client=f"{client[0]}:{client[1]}",
                 why=f" reason={reason!r}" if reason else "")
