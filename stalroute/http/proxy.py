"""The HTTP/1.1 routing proxy (SPEC §2.9, §5 HTTP): the thin Twisted layer over h11.

One :class:`HTTPConnection` per client connection. Each request is parsed by an h11 server
connection (after :func:`~stalroute.http.headers.check_request_head` has refused ambiguous
heads), answered locally (health endpoints, errors) or routed on its own: route table →
identifier → :class:`~stalroute.router.Router` → a backend connection for that destination,
taken from a small per-client pool keyed by destination or opened through the shared
:class:`~stalroute.backend.BackendConnector` (PROXY header, TLS, circuit breaker). Each backend
connection speaks through its own h11 client connection, so both legs are framed by the same
well-kept parser and a message is always re-serialised, never passed through with its
original (possibly ambiguous) framing.

Flow control: the client transport has a streaming producer that pauses whichever backend is
currently answering (a slow reader stops the backend, memory stays bounded); every backend
transport has one that pauses reading from the client while the backend's write buffer is
full. Reading from the client is also paused while a request is being routed and while a
pipelined request waits for the current response, so input never piles up unparsed.

``Upgrade: websocket`` requests are relayed with their upgrade headers; after the backend's
``101`` both connections become an opaque tunnel. ``text/event-stream`` responses flow
through like every other body (nothing is buffered) under the long ``bridge_idle`` limit.
"""

from __future__ import annotations

import itertools
import json
from http import HTTPStatus
import secrets
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import h11
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.main import CONNECTION_DONE
from twisted.internet.interfaces import (
    IHandshakeListener, IPushProducer,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from stalroute.backend import BackendLeg, BackendUnavailable, ClientInfo
from stalroute.config import DestinationConfig
from stalroute.http.headers import (
    Forwarding, HeadProblem, backend_request_headers, check_partial_head, check_request_head,
    client_response_headers, find_head_end, is_websocket_upgrade,
)
from stalroute.http.routes import (
    Route, RouteTable, decide, extract_identifier, normalize_path, split_target,
)
from stalroute.health import readiness
from stalroute.identity import redact
from stalroute.inbound import ConnectionState, InboundConnection, ListenerFactory
from stalroute.logs import logger
from stalroute.protocols.base import (
    BackendDialogue, BackendEvent, BackendReady, BackendSettings, LoginSucceeded,
)
from stalroute.router import RoutingUnavailable, resolve_login
from stalroute.tls import tls_details

__all__ = ["HTTPBackendDialogue", "HTTPConnection", "HTTPListenerFactory"]

log = logger("stalroute.http")

#: Backend connections one client connection keeps (one per destination, least recent out).
MAX_POOLED_BACKENDS = 8
#: ``Retry-After`` of a 503 caused by a mapping-store outage.
STORE_RETRY_AFTER = 5
HEALTH_PATHS = ("/healthz/live", "/healthz/ready")
#: Longest path written to the log.
MAX_LOGGED_PATH = 256
_STATUS_TEXT = {
    400: "bad request", 404: "no route for this path", 405: "method not allowed",
    408: "request timeout", 431: "request head too large", 501: "not implemented",
    502: "bad gateway", 503: "service unavailable", 504: "gateway timeout",
    505: "HTTP version not supported",
}


def _no_delay(transport: Any) -> None:
    """Small writes (WebSocket frames, events) leave at once, as in any proxy."""
    try:
        transport.setTcpNoDelay(True)
    except Exception:  # noqa: BLE001 - not a TCP transport
        pass


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


# --- the backend dialogue --------------------------------------------------------------------


class HTTPBackendDialogue(BackendDialogue):
    """HTTP is client-first and carries no login: the leg is ready as soon as it is up."""

    def __init__(self, settings: BackendSettings) -> None:
        self._leftover = bytearray()

    def connected(self) -> list[BackendEvent]:
        return [BackendReady()]

    def receive(self, data: bytes) -> list[BackendEvent]:
        self._leftover += data
        return []

    def tls_started(self) -> list[BackendEvent]:
        return []

    def login(self, credentials: object, context: object) -> list[BackendEvent]:
        return [LoginSucceeded(b"")]

    @property
    def leftover(self) -> bytes:
        leftover, self._leftover = bytes(self._leftover), bytearray()
        return leftover


# --- factory ----------------------------------------------------------------------------------


class HTTPListenerFactory(ListenerFactory):
    """Connections of one ``protocol = "http"`` listener (``service.OTHER_LISTENERS``)."""

    def __init__(self, reactor: Any, runtime: Any, listener_name: str) -> None:
        super().__init__(reactor, runtime, listener_name)
        self._routes: tuple[Any, RouteTable] | None = None
        self.requests = 0
        self.connections: set[HTTPConnection] = set()
        self.draining = False

    def stopFactory(self) -> None:
        """The listener stopped (shutdown): idle keep-alive connections close now, busy
        ones after their current response (with ``Connection: close``)."""
        self.draining = True
        for connection in list(self.connections):
            connection.drain()

    def buildProtocol(self, addr: Any) -> HTTPConnection:
        return HTTPConnection(self)

    def routes_for(self, http_config: Any) -> RouteTable:
        """The compiled route table of ``http_config`` (rebuilt after a reload)."""
        if self._routes is None or self._routes[0] is not http_config:
            self._routes = (http_config, RouteTable(http_config.routes))
        return self._routes[1]


# --- producers ----------------------------------------------------------------------------------


@implementer(IPushProducer)
class _ClientWriteProducer:
    """Registered on the client transport: its full write buffer pauses the answering backend."""

    def __init__(self, connection: HTTPConnection) -> None:
        self.connection = connection

    def pauseProducing(self) -> None:
        self.connection._client_write_paused(True)

    def resumeProducing(self) -> None:
        self.connection._client_write_paused(False)

    def stopProducing(self) -> None:
        pass


@implementer(IPushProducer)
class _BackendWriteProducer:
    """Registered on a backend transport: its full write buffer pauses reading the client."""

    def __init__(self, connection: HTTPConnection, backend: _Backend) -> None:
        self.connection = connection
        self.reason = ("backend", backend.id)

    def pauseProducing(self) -> None:
        self.connection._pause_reading(self.reason)

    def resumeProducing(self) -> None:
        self.connection._resume_reading(self.reason)

    def stopProducing(self) -> None:
        self.connection._resume_reading(self.reason)


# --- one backend connection ------------------------------------------------------------------------


class _Backend:
    """One connection to a destination's HTTP leg, framed by an h11 client connection."""

    _ids = itertools.count(1)

    def __init__(self, owner: HTTPConnection, destination: DestinationConfig,
                 leg: BackendLeg) -> None:
        self.id = next(self._ids)
        self.owner = owner
        self.name = destination.name
        self.destination = destination
        self.leg = leg
        self.h11 = h11.Connection(h11.CLIENT,
                                  max_incomplete_event_size=owner.http.max_head_size)
        self.exchange: _Exchange | None = None
        self.served = 0
        self.closed = False
        self.tunnel = False
        self.read_paused = False
        _no_delay(leg.transport)
        leg.transport.registerProducer(_BackendWriteProducer(owner, self), True)
        leg.attach(self._received, self._lost)

    @property
    def reusable(self) -> bool:
        return (not self.closed and self.exchange is None
                and self.h11.our_state is h11.IDLE and self.h11.their_state is h11.IDLE)

    def send(self, event: Any) -> None:
        data = self.h11.send(event)
        if data:
            self.leg.transport.write(data)

    def write_raw(self, data: bytes) -> None:
        self.leg.transport.write(data)

    def pause_reading(self, paused: bool) -> None:
        if self.closed or self.read_paused == paused or self.leg.transport is None:
            return
        self.read_paused = paused
        if paused:
            self.leg.transport.pauseProducing()
        else:
            self.leg.transport.resumeProducing()

    def close(self) -> None:
        """Close on our initiative (the leg's loss callback is not run)."""
        if self.closed:
            return
        self.closed = True
        self.owner._resume_reading(("backend", self.id))
        if self.read_paused and self.leg.transport is not None:
            self.leg.transport.resumeProducing()
        self.leg.close()  # unregisters our write producer

    def finish_exchange(self) -> None:
        """The response ended: back to idle (reusable) or closed."""
        self.exchange = None
        self.served += 1
        if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self.h11.start_next_cycle()
        if not self.reusable:
            self.close()
        else:
            self.pause_reading(False)

    # backend → owner -----------------------------------------------------------------

    def _received(self, data: bytes) -> None:
        if self.closed:
            return
        if self.tunnel:
            self.owner._tunnel_from_backend(data)
            return
        self.h11.receive_data(data)
        self._drain()

    def _drain(self) -> None:
        while not self.closed and not self.tunnel:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as exc:
                self.close()
                self.owner._backend_gone(self, f"invalid response from the backend: {exc}")
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            self.owner._backend_event(self, event)
            if type(event) is h11.ConnectionClosed:
                return

    def _lost(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.owner._resume_reading(("backend", self.id))
        if self.tunnel:
            self.owner._backend_gone(self, "backend closed the tunnel")
            return
        # A body delimited by the connection's end (HTTP/1.0 style) ends here.
        try:
            self.h11.receive_data(b"")
            while True:
                event = self.h11.next_event()
                if event is h11.NEED_DATA or event is h11.PAUSED:
                    break
                self.owner._backend_event(self, event)
                if type(event) is h11.ConnectionClosed:
                    break
        except h11.RemoteProtocolError:
            pass
        self.owner._backend_gone(self, "the backend closed the connection")


# --- one request ------------------------------------------------------------------------------------


class _Exchange:
    """One request and its response."""

    __slots__ = (
        "request", "method", "target", "path", "headers", "started", "has_body", "http10",
        "phase", "route", "destination", "account", "backend", "status", "bytes_in",
        "bytes_out", "request_complete", "response_started", "response_complete", "buffer",
        "websocket", "streaming", "close_after", "sent_100", "replayable", "retried",
        "outcome", "logged", "host",
    )

    def __init__(self, request: h11.Request, started: float) -> None:
        self.request = request
        self.method = request.method
        self.target = split_target(request.target)
        self.path = normalize_path(self.target.path)
        self.headers = request.headers.raw_items()
        self.started = started
        self.http10 = request.http_version == b"1.0"
        lengths = [v for n, v in request.headers if n == b"content-length"]
        chunked = any(n == b"transfer-encoding" for n, _ in request.headers)
        self.has_body = chunked or bool(lengths and int(lengths[0]) > 0)
        self.host = next((v for n, v in request.headers if n == b"host"), None)
        self.phase = "new"  # buffering | routing | forwarding | local | tunnel
        self.route: Route | None = None
        self.destination: str | None = None
        self.account: str | None = None
        self.backend: _Backend | None = None
        self.status: int | None = None
        self.bytes_in = self.bytes_out = 0
        self.request_complete = False
        self.response_started = self.response_complete = False
        self.buffer = bytearray()
        self.websocket = False
        self.streaming = False
        self.close_after = False
        self.sent_100 = False
        self.replayable = False
        self.retried = False
        self.outcome = "ok"
        self.logged = False


class _Gone(Exception):
    """The client connection closed while a request was being routed."""


# --- the client connection -----------------------------------------------------------------------------


@implementer(IHandshakeListener)
class HTTPConnection(InboundConnection):
    """One client connection: requests routed one by one, keep-alive, pooled backends."""

    client_speaks_first = True

    def __init__(self, factory: HTTPListenerFactory) -> None:
        self.factory = factory
        self.runtime = factory.runtime
        self.config = self.runtime.config
        self.http = self.config.http
        self.routes = factory.routes_for(self.http)
        self.listener = factory.listener
        self.id = f"{self.config.cluster.node_id}-{secrets.token_hex(6)}"
        # NEW → [PROXY_HEADER →] HTTP → [SPLICED (WebSocket) →] CLOSING → CLOSED
        self.client = self.local = ("", 0)
        self.tls = None
        self.account: str | None = None
        self.destination: str | None = None
        self.bytes_in = self.bytes_out = 0
        self.started = 0.0
        self.requests = 0
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=self.http.max_head_size)
        self.exchange: _Exchange | None = None
        self.pool: OrderedDict[str, _Backend] = OrderedDict()
        self.answering: _Backend | None = None
        self.tunnel: _Backend | None = None
        self._client_spoke = False
        self._paused: set[Any] = set()
        self._write_paused = False
        self._head_checked = False
        self._head: bytearray | None = None
        self._head_scanned = 0
        self._pumping = False
        self._pump_again = False
        self._timer = None
        self._timer_kind = "idle"
        self._dispatching: Deferred[None] | None = None
        self._activity_limit = 0.0
        self._last_activity = 0.0

    # connection lifecycle ------------------------------------------------------------------

    def connectionMade(self) -> None:
        super().connectionMade()
        if self._has_slot:
            self._last_activity = self.started
            self.factory.connections.add(self)

    def start(self) -> None:
        """Admitted: TLS, then wait for a request."""
        self.state = ConnectionState.HTTP
        _no_delay(self.transport)
        if self.listener.tls == "implicit":
            self.transport.startTLS(self.runtime.server_tls.options)
        self.transport.registerProducer(_ClientWriteProducer(self), True)
        self._enter_idle(first=True)

    def handshakeCompleted(self) -> None:
        self.tls = tls_details(self.transport)

    def dataReceived(self, data: bytes) -> None:
        if self.state in (ConnectionState.CLOSING, ConnectionState.CLOSED):
            return
        if self._proxy_header is not None:
            data = self.take_proxy_header(data)
            if data is None:
                return
        if not data:
            return
        self._client_spoke = True
        self._last_activity = self._clock.seconds()
        self.bytes_in += len(data)
        if self.state is ConnectionState.SPLICED:
            self.exchange.bytes_in += len(data)
            self.tunnel.write_raw(data)
            return
        if self.state is not ConnectionState.HTTP:
            return
        if self._head is not None:
            self._head += data
        self.h11.receive_data(data)
        self._pump()

    def connectionLost(self, reason: Failure = CONNECTION_DONE) -> None:
        released = self.release()
        self._stop_work()
        if not released:
            return
        self.factory.connections.discard(self)
        ex = self.exchange
        if ex is not None and not ex.logged:
            if ex.outcome == "ok" and not ex.response_complete:
                ex.outcome = "client_closed" if reason is None or reason.check(ConnectionDone) \
                    else "client_error"
            self._log_exchange(ex)
        probe = not self._client_spoke and self.requests == 0
        if probe:
            self.factory.probes += 1
        log.debug(
            "http connection {session} client={client} requests={requests} outcome={outcome} "
            "in={bytes_in} out={bytes_out} duration={duration:.3f}s", session=self.id,
            client=f"{self.client[0]}:{self.client[1]}", requests=self.requests,
            outcome="probe" if probe else self.outcome,
            bytes_in=self.bytes_in, bytes_out=self.bytes_out,
            duration=self._clock.seconds() - self.started)

    @property
    def routed(self) -> bool:
        """Routed a request to a destination (kicks reach SSE streams and WebSocket tunnels
        as well as keep-alive connections)."""
        return (self.state in (ConnectionState.HTTP, ConnectionState.SPLICED)
                and self.destination is not None)

    def close(self, outcome: str) -> None:
        """End the connection (kick, shutdown): what was written is flushed first."""
        self._close(outcome)

    def drain(self) -> None:
        """Shutdown: close when idle, else after the current response."""
        if self.exchange is not None and self.state is ConnectionState.HTTP:
            self.exchange.close_after = True
        elif self.state is not ConnectionState.SPLICED:
            self._close("shutdown")

    def _close(self, outcome: str) -> None:
        if self.state in (ConnectionState.CLOSING, ConnectionState.CLOSED):
            return
        self.state = ConnectionState.CLOSING
        self.outcome = outcome
        self._stop_work()
        try:
            self.transport.unregisterProducer()
        except Exception:  # noqa: BLE001 - none registered yet
            pass
        self._paused.clear()
        self.close_transport()

    def _stop_work(self) -> None:
        """Cancel the routing in flight and the timer, close every backend connection."""
        dispatching, self._dispatching = self._dispatching, None
        if dispatching is not None:
            dispatching.cancel()
        self._cancel_timer()
        for backend in self._all_backends():
            backend.close()
        self.pool.clear()

    def _all_backends(self) -> list[_Backend]:
        backends = list(self.pool.values())
        for extra in (self.answering, self.tunnel):
            if extra is not None and extra not in backends:
                backends.append(extra)
        return backends

    # reading and writing -------------------------------------------------------------------

    def _pause_reading(self, reason: Any) -> None:
        if self.state in (ConnectionState.CLOSING, ConnectionState.CLOSED):
            return
        if not self._paused:
            self.transport.pauseProducing()
        self._paused.add(reason)

    def _resume_reading(self, reason: Any) -> None:
        if reason not in self._paused:
            return
        self._paused.discard(reason)
        if not self._paused and self.state not in (ConnectionState.CLOSING,
                                                   ConnectionState.CLOSED):
            self.transport.resumeProducing()

    def _client_write_paused(self, paused: bool) -> None:
        """The client stopped (or resumed) reading: pause the backend answering it, and take
        no next request until the client reads its responses."""
        self._write_paused = paused
        backend = self.tunnel or self.answering
        if backend is not None:
            backend.pause_reading(paused)
        if not paused and "client_write" in self._paused:
            self._resume_reading("client_write")
            self._pump()

    def _set_answering(self, backend: _Backend | None) -> None:
        previous, self.answering = self.answering, backend
        if previous is not None and previous is not backend:
            previous.pause_reading(False)
        if backend is not None:
            backend.pause_reading(self._write_paused)

    def _send(self, event: Any) -> None:
        data = self.h11.send(event)
        if data:
            self.bytes_out += len(data)
            self.transport.write(data)

    # timers --------------------------------------------------------------------------------

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _set_timer(self, delay: float, kind: str) -> None:
        """One timer per connection, re-armed in place (``kind``: idle or activity)."""
        self._timer_kind = kind
        if self._timer is not None and self._timer.active():
            self._timer.reset(delay)
        else:
            self._timer = self._clock.callLater(delay, self._timer_fired)

    def _timer_fired(self) -> None:
        self._timer = None
        if self._timer_kind == "idle":
            self._idle_expired()
        else:
            self._activity_check()

    def _enter_idle(self, first: bool = False) -> None:
        limit = self.listener.preauth_timeout if first else self.http.keepalive_timeout
        self._set_timer(limit, "idle")

    def _idle_expired(self) -> None:
        if self.exchange is not None or self.state is not ConnectionState.HTTP:
            return
        if self.h11.trailing_data[0]:
            self._fatal(408, "request head not received in time", outcome="timeout")
        else:
            self._close("idle" if self.requests else "preauth_timeout")

    def _arm_activity(self, limit: float) -> None:
        self._activity_limit = limit
        self._last_activity = self._clock.seconds()
        self._set_timer(limit, "activity")

    def _activity_check(self) -> None:
        if self.state not in (ConnectionState.HTTP, ConnectionState.SPLICED):
            return
        idle_for = self._clock.seconds() - self._last_activity
        if idle_for < self._activity_limit:
            self._set_timer(self._activity_limit - idle_for, "activity")
            return
        ex = self.exchange
        if self.state is ConnectionState.SPLICED or ex is None:
            self._close("idle")
        elif not ex.response_started and ex.phase in ("routing", "forwarding", "buffering"):
            ex.outcome = "timeout"
            status = 504 if ex.phase != "buffering" else 408
            self._local(ex, status, "the backend did not answer in time" if status == 504
                        else "request body not received in time", close=True)
        else:
            ex.outcome = "timeout"
            self._close("idle")

    # the request side -----------------------------------------------------------------------

    def _pump(self) -> None:
        """Process the client's bytes as far as the current exchange allows."""
        if self._pumping:
            self._pump_again = True
            return
        self._pumping = True
        try:
            while True:
                self._pump_again = False
                self._pump_events()
                if not self._pump_again:
                    break
        finally:
            self._pumping = False

    def _pump_events(self) -> None:
        while self.state is ConnectionState.HTTP:
            ex = self.exchange
            if ex is not None and ex.phase == "routing":
                self._pause_reading("routing")
                return
            if ex is None and self._write_paused:
                self._pause_reading("client_write")
                return
            if self.h11.their_state is h11.IDLE and not self._check_head():
                return
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as exc:
                self._fatal(exc.error_status_hint or 400, str(exc) or "malformed request")
                return
            kind = type(event)
            if event is h11.NEED_DATA:
                self._resume_reading("pipeline")
                return
            if event is h11.PAUSED:
                self._pause_reading("pipeline")
                return
            if kind is h11.Data:
                self._on_request_data(event)
            elif kind is h11.Request:
                self._on_request(event)
            elif kind is h11.EndOfMessage:
                self._on_request_end()
            elif kind is h11.ConnectionClosed:
                self._close("client_closed")
                return

    def _check_head(self) -> bool:
        """Strict checks on the raw head before h11 reads it; False when refused.

        The bytes of a head still arriving are mirrored in ``_head`` (one snapshot of h11's
        buffer per request, then what ``dataReceived`` adds), and only new bytes are scanned.
        """
        if self._head_checked:
            return True
        if self._head is None:
            self._head = bytearray(self.h11.trailing_data[0])
            self._head_scanned = 0
        pending = self._head
        if not pending:
            return True
        start, self._head_scanned = self._head_scanned, len(pending)
        end = find_head_end(pending, start)
        if end is None:
            problem = check_partial_head(pending, self.http.max_head_size, start)
        elif end > self.http.max_head_size:
            # h11 only limits heads that are still incomplete.
            problem = HeadProblem(431, "request head too large")
        else:
            problem = check_request_head(bytes(pending[:end]))
        if problem is not None:
            self._fatal(problem.status, problem.reason)
            return False
        if end is not None:
            self._head_checked = True
            self._head = None
        return True

    def _on_request(self, request: h11.Request) -> None:
        self._head_checked = False
        self.requests += 1
        self.factory.requests += 1
        ex = _Exchange(request, self._clock.seconds())
        self.exchange = ex
        self._arm_activity(self.http.relay_idle)
        if self.requests >= self.http.max_keepalive_requests or self.factory.draining:
            ex.close_after = True
        if request.method == b"CONNECT":
            self._local(ex, 405, "CONNECT is not supported", close=True)
            return
        if self.http.health and ex.path in HEALTH_PATHS:
            self._health(ex)
            return
        route = self.routes.match(ex.path)
        if route is None:
            self._local(ex, 404, "no route for this path")
            return
        ex.route = route
        ex.websocket = is_websocket_upgrade(ex.headers)
        if route.needs_body and ex.has_body and self.http.body_extract_cap > 0:
            ex.phase = "buffering"
            if self.h11.they_are_waiting_for_100_continue:
                ex.sent_100 = True
                self._send(h11.InformationalResponse(status_code=100, headers=[],
                                                     reason=b"Continue"))
            return
        self._route(ex)

    def _on_request_data(self, event: h11.Data) -> None:
        ex = self.exchange
        size = len(event.data)
        ex.bytes_in += size
        if ex.phase == "forwarding":
            backend = ex.backend
            if backend is not None and not backend.closed \
                    and backend.h11.our_state is h11.SEND_BODY:
                backend.send(event)
        elif ex.phase == "buffering":
            ex.buffer += event.data
            if len(ex.buffer) >= self.http.body_extract_cap:
                self._route(ex)
        # local answers and abandoned exchanges: the body is read and dropped

    def _on_request_end(self) -> None:
        ex = self.exchange
        ex.request_complete = True
        if ex.phase == "buffering":
            ex.replayable = True  # the whole body is in the buffer
            self._route(ex)
            return
        if ex.phase == "forwarding":
            backend = ex.backend
            if backend is not None and not backend.closed \
                    and backend.h11.our_state is h11.SEND_BODY:
                backend.send(h11.EndOfMessage())
        self._maybe_finish(ex)

    # routing ----------------------------------------------------------------------------------

    def _route(self, ex: _Exchange) -> None:
        """Resolve and connect; called from the pump, which pauses reading the client if this
        does not finish at once (a cached mapping and a pooled connection finish at once)."""
        ex.phase = "routing"
        dispatching = Deferred.fromCoroutine(self._dispatch(ex))
        if not dispatching.called:
            self._dispatching = dispatching

    async def _dispatch(self, ex: _Exchange) -> None:
        try:
            destination = await self._destination(ex)
            ex.destination = self.destination = destination.name
            backend = await self._backend_for(destination)
        except (_Gone, CancelledError):
            return
        except Exception as exc:
            self._dispatching = None
            self._routing_failed(ex, exc)
            return
        self._dispatching = None
        if self.state is not ConnectionState.HTTP or self.exchange is not ex:
            return
        self._forward(ex, backend)

    def _routing_failed(self, ex: _Exchange, error: Exception) -> None:
        if isinstance(error, RoutingUnavailable):
            ex.outcome = "tempfail"
            self._local(ex, 503, "routing is temporarily unavailable, retry later",
                        headers=[(b"Retry-After", str(STORE_RETRY_AFTER).encode())])
        elif isinstance(error, BackendUnavailable):
            self._backend_unavailable(ex, error)
        else:
            log.failure("http {session}: unexpected error while routing", session=self.id,
                        failure=Failure(error))
            ex.outcome = "error"
            self._local(ex, 502, "internal error while routing", close=True)

    async def _destination(self, ex: _Exchange) -> DestinationConfig:
        config = self.config
        route = ex.route
        raw = None
        if route.config.extract is not None:
            raw = extract_identifier(
                route.config.extract, headers=ex.headers, query=ex.target.query,
                body=bytes(ex.buffer[: self.http.body_extract_cap]) if ex.buffer else None,
                jwt_username_claim=config.oauth.jwt_username_claim)
        decision = decide(route, raw, separators=config.routing.master_user_separators,
                          normalize=config.mapping.normalize,
                          default_destination=config.routing.default_destination)
        if decision.destination is not None:
            return config.destinations[decision.destination]
        ex.account = self.account = decision.identifier
        destination = await resolve_login(self.runtime.router, self.runtime.delays, self._clock,
                                          decision.identifier, self.id)
        if self.state is not ConnectionState.HTTP:
            raise _Gone()
        return destination

    async def _backend_for(self, destination: DestinationConfig) -> _Backend:
        pooled = self.pool.get(destination.name)
        if pooled is not None:
            if pooled.reusable:
                self.pool.move_to_end(destination.name)
                return pooled
            pooled.close()
            self.pool.pop(destination.name, None)
        return await self._open_backend(destination)

    async def _open_backend(self, destination: DestinationConfig) -> _Backend:
        leg = await self.runtime.connector.open(destination, "http", self._make_dialogue,
                                                self._client_info())
        if self.state is not ConnectionState.HTTP:
            leg.close()
            raise _Gone()
        if leg.transport is None or not leg.transport.connected:
            leg.close()
            raise BackendUnavailable(f"destination {destination.name}: the connection closed "
                                     "before the request was sent")
        backend = _Backend(self, destination, leg)
        old = self.pool.pop(destination.name, None)
        if old is not None and old is not backend:
            old.close()
        self.pool[destination.name] = backend
        while len(self.pool) > MAX_POOLED_BACKENDS:
            name, oldest = next(iter(self.pool.items()))
            if oldest.exchange is not None:
                break
            self.pool.pop(name)
            oldest.close()
        return backend

    def _make_dialogue(self, settings: BackendSettings) -> HTTPBackendDialogue:
        return HTTPBackendDialogue(settings)

    def _client_info(self) -> ClientInfo:
        ttl = max(0, self.config.server.proxy_ttl - 1)
        return ClientInfo(peer=self.client, local=self.local, tls=self.tls,
                          session_id=self.id, ttl=ttl)

    def _backend_unavailable(self, ex: _Exchange, exc: BackendUnavailable) -> None:
        reason = str(exc)
        headers = []
        if "circuit open" in reason:
            status = 503
            headers.append((b"Retry-After",
                            str(int(self.config.server.host_down_cooldown)).encode()))
        elif "timed out" in reason:
            status = 504
        else:
            status = 502
        ex.outcome = "backend_unavailable"
        log.warn("http {session}: destination {destination} unavailable: {reason}",
                 session=self.id, destination=ex.destination, reason=reason)
        self._local(ex, status, f"destination {ex.destination} is unavailable",
                    headers=headers)

    # forwarding -----------------------------------------------------------------------------------

    def _forwarding(self, ex: _Exchange, backend: _Backend) -> Forwarding:
        return Forwarding(client_ip=self.client[0],
                          proto="https" if self.listener.tls == "implicit" else "http",
                          trust=self.listener.forwarded == "trust",
                          append=backend.destination.forwarded)

    def _forward(self, ex: _Exchange, backend: _Backend) -> None:
        """Send the request head (and any buffered body) to ``backend``."""
        ex.backend = backend
        backend.exchange = ex
        ex.phase = "forwarding"
        if not ex.has_body:
            ex.replayable = True
        self._set_answering(backend)
        host = ex.target.authority
        if host is None and ex.host is None:
            port = backend.destination.protocols["http"].port
            host = f"{backend.destination.host}:{port}".encode()
        headers = backend_request_headers(
            ex.headers, self._forwarding(ex, backend), websocket=ex.websocket,
            drop_expect=ex.sent_100, chunked=any(n.lower() == b"transfer-encoding"
                                                 for n, _ in ex.headers),
            host=host)
        try:
            backend.send(h11.Request(method=ex.method, target=ex.target.origin,
                                     headers=headers))
            if ex.buffer:
                backend.send(h11.Data(data=bytes(ex.buffer)))
            if ex.request_complete:
                backend.send(h11.EndOfMessage())
        except h11.LocalProtocolError as exc:
            backend.close()
            ex.outcome = "error"
            self._local(ex, 400, f"request cannot be forwarded: {exc}", close=True)
            return
        self._resume_reading("routing")
        self._pump()

    async def _retry(self, ex: _Exchange, destination: DestinationConfig) -> None:
        """A reused connection died before answering: the same request on a fresh one."""
        try:
            backend = await self._open_backend(destination)
        except _Gone:
            return
        except BackendUnavailable as exc:
            self._backend_unavailable(ex, exc)
            return
        if self.state is ConnectionState.HTTP and self.exchange is ex:
            self._forward(ex, backend)

    # the response side ------------------------------------------------------------------------------

    def _backend_event(self, backend: _Backend, event: Any) -> None:
        ex = backend.exchange
        kind = type(event)
        if ex is None or ex is not self.exchange or self.state is not ConnectionState.HTTP:
            if kind is not h11.ConnectionClosed:
                # Bytes on an idle connection (a late 408, garbage): it is not reused.
                self._discard(backend)
            return
        self._last_activity = self._clock.seconds()
        try:
            if kind is h11.Data:
                ex.bytes_out += len(event.data)
                self._send(event)
            elif kind is h11.Response:
                self._on_response(ex, event)
            elif kind is h11.EndOfMessage:
                self._send(h11.EndOfMessage())
                ex.response_complete = True
                self._set_answering(None)
                backend.finish_exchange()
                if backend.closed:
                    self._forget(backend)
                self._maybe_finish(ex)
            elif kind is h11.InformationalResponse:
                self._on_informational(ex, backend, event)
        except h11.LocalProtocolError as exc:
            log.warn("http {session}: cannot relay the response: {error}", session=self.id,
                     error=str(exc))
            ex.outcome = "error"
            self._close("protocol_error")

    def _on_response(self, ex: _Exchange, response: h11.Response) -> None:
        ex.status = response.status_code
        ex.response_started = True
        close = ex.close_after or (ex.has_body and not ex.request_complete)
        ex.close_after = close
        content_type = next((v for n, v in response.headers if n == b"content-type"), b"")
        if content_type.split(b";", 1)[0].strip().lower() == b"text/event-stream":
            ex.streaming = True
            self._arm_activity(self.config.server.bridge_idle)
        headers = client_response_headers(response.headers.raw_items(), close=close)
        self._send(h11.Response(status_code=response.status_code, headers=headers,
                                reason=response.reason))

    def _on_informational(self, ex: _Exchange, backend: _Backend,
                          event: h11.InformationalResponse) -> None:
        if event.status_code == 101:
            if ex.websocket and self.h11.their_state is h11.MIGHT_SWITCH_PROTOCOL:
                self._start_tunnel(ex, backend, event)
            else:
                backend.close()
                self._forget(backend)
                ex.outcome = "backend_error"
                self._local(ex, 502, "unexpected protocol switch from the backend", close=True)
            return
        if event.status_code == 100 and (ex.sent_100
                                         or not self.h11.they_are_waiting_for_100_continue):
            return
        if ex.http10:
            return
        self._send(h11.InformationalResponse(
            status_code=event.status_code, reason=event.reason,
            headers=client_response_headers(event.headers.raw_items())))

    def _maybe_finish(self, ex: _Exchange) -> None:
        """After the response: next request (keep-alive) or close."""
        if ex is not self.exchange or not ex.response_complete or self.state is not ConnectionState.HTTP:
            return
        our = self.h11.our_state
        if our is h11.MUST_CLOSE or our is h11.CLOSED or ex.close_after:
            self._log_exchange(ex)
            self.exchange = None
            self._close("closed")
            return
        if self.h11.their_state is not h11.DONE:
            return  # the rest of the request body is read and dropped first
        self._log_exchange(ex)
        self.exchange = None
        try:
            self.h11.start_next_cycle()
        except h11.LocalProtocolError:
            self._close("closed")
            return
        self._resume_reading("routing")
        self._resume_reading("pipeline")
        self._enter_idle()
        self._pump()

    def _forget(self, backend: _Backend) -> None:
        if self.pool.get(backend.name) is backend:
            del self.pool[backend.name]
        if self.answering is backend:
            self._set_answering(None)

    def _discard(self, backend: _Backend) -> None:
        backend.close()
        self._forget(backend)

    def _backend_gone(self, backend: _Backend, reason: str) -> None:
        """A backend connection closed or broke the protocol (it is already closed)."""
        self._forget(backend)
        ex, backend.exchange = backend.exchange, None
        if self.state is ConnectionState.SPLICED and backend is self.tunnel:
            if self.exchange is not None and self.exchange.outcome == "ok":
                self.exchange.outcome = "backend_closed"
            self._close("backend_closed")
            return
        if ex is None or ex is not self.exchange or self.state is not ConnectionState.HTTP \
                or ex.response_complete:
            return
        if not ex.response_started:
            if backend.served > 0 and ex.replayable and not ex.retried:
                ex.retried = True
                ex.phase = "routing"
                self._pause_reading("routing")
                Deferred.fromCoroutine(self._retry(ex, backend.destination))
                return
            ex.outcome = "backend_error"
            log.warn("http {session}: {destination}: {reason}", session=self.id,
                     destination=backend.name, reason=reason)
            self._local(ex, 502, "the backend closed the connection without answering")
            return
        # Mid-response: the client's connection ends (it sees a truncated body).
        ex.outcome = "backend_closed"
        log.warn("http {session}: {destination} ended the response early: {reason}",
                 session=self.id, destination=backend.name, reason=reason)
        self._close("backend_closed")

    # WebSocket tunnel --------------------------------------------------------------------------------

    def _start_tunnel(self, ex: _Exchange, backend: _Backend,
                      event: h11.InformationalResponse) -> None:
        headers = client_response_headers(event.headers.raw_items(), switching=True)
        self._send(h11.InformationalResponse(status_code=101, headers=headers,
                                             reason=event.reason))
        ex.status = 101
        ex.response_started = True
        ex.phase = "tunnel"
        self.state = ConnectionState.SPLICED
        self.tunnel = backend
        backend.tunnel = True
        for other in list(self.pool.values()):
            if other is not backend:
                other.close()
        self.pool.clear()
        self._paused.discard("pipeline")
        self._paused.discard("routing")
        if not self._paused:
            self.transport.resumeProducing()
        self._arm_activity(self.config.server.bridge_idle)
        client_rest = self.h11.trailing_data[0]
        backend_rest = backend.h11.trailing_data[0]
        if client_rest:
            ex.bytes_in += len(client_rest)
            backend.write_raw(client_rest)
        if backend_rest:
            self._tunnel_from_backend(backend_rest)

    def _tunnel_from_backend(self, data: bytes) -> None:
        if self.state is not ConnectionState.SPLICED:
            return
        self._last_activity = self._clock.seconds()
        self.exchange.bytes_out += len(data)
        self.bytes_out += len(data)
        self.transport.write(data)

    # local answers -----------------------------------------------------------------------------------

    def _health(self, ex: _Exchange) -> None:
        if ex.method not in (b"GET", b"HEAD"):
            self._local(ex, 405, "method not allowed", headers=[(b"Allow", b"GET, HEAD")])
            return
        if ex.path == "/healthz/live":
            self._local(ex, 200, body=b'{"status":"live"}\n', outcome="health")
            return
        ex.phase = "routing"
        Deferred.fromCoroutine(self._ready(ex))

    async def _ready(self, ex: _Exchange) -> None:
        result = await readiness(self.runtime, self._clock)
        body = json.dumps({"status": "ready" if result.ready else "not ready",
                           "reasons": list(result.reasons)}).encode() + b"\n"
        self._local(ex, 200 if result.ready else 503, body=body, outcome="health")

    def _local(self, ex: _Exchange, status: int, message: str | None = None, *,
               body: bytes | None = None, headers: Iterable[tuple[bytes, bytes]] = (),
               close: bool = False, outcome: str | None = None) -> None:
        """Answer the current request from stalroute itself."""
        if ex is not self.exchange or self.state is not ConnectionState.HTTP:
            return
        if ex.response_started:
            self._close(ex.outcome if ex.outcome != "ok" else "error")
            return
        if ex.backend is not None and not ex.backend.closed and not ex.backend.reusable:
            self._discard(ex.backend)
        ex.phase = "local"
        ex.status = status
        ex.response_started = True
        if outcome is not None:
            ex.outcome = outcome
        elif ex.outcome == "ok" and status >= 400:
            ex.outcome = "refused" if status < 500 else "error"
        if body is None:
            body = json.dumps({"error": message or _STATUS_TEXT.get(status, "error")}).encode()
            body += b"\n"
        close = close or ex.close_after or (ex.has_body and not ex.request_complete)
        ex.close_after = close
        all_headers = [(b"Content-Type", b"application/json"),
                       (b"Content-Length", str(len(body)).encode()),
                       (b"Cache-Control", b"no-store"), *headers]
        if close:
            all_headers.append((b"Connection", b"close"))
        try:
            self._send(h11.Response(status_code=status, headers=all_headers,
                                    reason=_reason(status)))
            if ex.method != b"HEAD":
                ex.bytes_out += len(body)
                self._send(h11.Data(data=body))
            self._send(h11.EndOfMessage())
        except h11.LocalProtocolError:
            self._close("error")
            return
        ex.response_complete = True
        self._set_answering(None)
        self._resume_reading("routing")
        self._maybe_finish(ex)
        if self.state is ConnectionState.HTTP:
            self._pump()

    def _fatal(self, status: int, reason: str, outcome: str = "bad_request") -> None:
        """Refuse what the client sent and close (the request stream cannot be trusted)."""
        ex = self.exchange
        if ex is not None and ex.response_started:
            ex.outcome = outcome
            self._close(outcome)
            return
        if status < 400:
            status = 400
        body = json.dumps({"error": reason}).encode() + b"\n"
        head = (f"HTTP/1.1 {status} {_reason(status).decode()}\r\n"
                "Content-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        self.transport.write(head + body)
        self.bytes_out += len(head) + len(body)
        if ex is None:
            ex = _Exchange(h11.Request(method=b"-", target=b"/", headers=[],
                                       http_version=b"1.0"), self._clock.seconds())
            ex.path = "-"
            self.exchange = ex
        ex.status = status
        ex.outcome = outcome
        ex.response_started = ex.response_complete = True
        self._log_exchange(ex, reason=reason)
        self._close(outcome)

    # logging --------------------------------------------------------------------------------------------

    def _log_exchange(self, ex: _Exchange, reason: str | None = None) -> None:
        if ex.logged:
            return
        ex.logged = True
        self.runtime.metrics.sessions[("http", ex.destination or "-", ex.outcome)] += 1
        path = ex.path or "/"
        account = "-"
        if ex.account:
            account = redact(ex.account)
            path = path.replace(ex.account, account)
        if len(path) > MAX_LOGGED_PATH:
            path = path[:MAX_LOGGED_PATH] + "…"
        log.info("http {method} {path} status={status} destination={destination} "
                 "account={account} in={bytes_in} out={bytes_out} duration={duration:.3f}s "
                 "outcome={outcome} session={session} client={client}{why}",
                 method=ex.method.decode("latin-1"), path=path, status=ex.status or "-",
                 destination=ex.destination or "-", account=account, bytes_in=ex.bytes_in,
                 bytes_out=ex.bytes_out, duration=self._clock.seconds() - ex.started,
                 outcome=ex.outcome, session=self.id, protocol="http",
                 listener=self.listener.name, client=f"{self.client[0]}:{self.client[1]}",
                 why=f" reason={reason!r}" if reason else "")
