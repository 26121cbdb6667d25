"""stalroute as the HTTP/1.1 server its client talks to (SPEC §5 HTTP): the client side of an
HTTP connection, on the shared lifecycle of :class:`~stalroute.inbound.InboundConnection`.

Requests are read one at a time by an h11 server connection, each head first checked by a
:class:`~stalroute.http.headers.HeadGuard` (smuggling defences), and become an
:class:`~stalroute.http.exchange.Exchange`. What stalroute answers itself (health endpoints,
errors: :mod:`stalroute.http.local`) is answered here; every other request is handed to
:meth:`HTTPServerConnection._route`, which :class:`~stalroute.http.connection.HTTPConnection`
implements. Keep-alive, the idle and activity timers, and reading from the client live here.

Reading from the client pauses for a set of reasons (a request being routed, a pipelined
request waiting for the current response, a client that does not read its responses, a
backend whose write buffer is full) and resumes once none is left, so input never piles up
unparsed.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable

import h11
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHandshakeListener
from twisted.python.failure import Failure
from zope.interface import implementer

from stalroute.http.exchange import Exchange, Phase
from stalroute.http.headers import HeadGuard, is_websocket_upgrade
from stalroute.http.local import HEALTH_PATHS, error_body, health, local_response, refusal
from stalroute.http.routes import RouteTable
from stalroute.inbound import ConnectionState, InboundConnection, ListenerFactory
from stalroute.tls import tls_details
from stalroute.transport import ReadingWatch

_ENDED = (ConnectionState.CLOSING, ConnectionState.CLOSED)


@implementer(IHandshakeListener)
class HTTPServerConnection(InboundConnection):
    """One client connection read request by request: keep-alive, local answers, timers.

    States: NEW → [PROXY_HEADER →] HTTP → [SPLICED (a tunnel) →] CLOSING → CLOSED.
    A subclass routes requests (:meth:`_route`) and relays tunnels
    (:meth:`_tunnel_from_client`); while a response is relayed, :meth:`_client_reading` tells
    it whether the client reads.
    """

    client_speaks_first = True
    accounted_per_request = True

    def __init__(self, factory: ListenerFactory, routes: RouteTable) -> None:
        super().__init__(factory)
        self.config = self.runtime.config
        self.http = self.config.http
        self.routes = routes
        self.requests = 0
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=self.http.max_head_size)
        self.heads = HeadGuard(self.http.max_head_size)
        self.exchange: Exchange | None = None
        #: Why reading the client is paused; it reads while the set is empty.
        self._paused: set[Hashable] = set()
        self._write_paused = False
        self._draining = False
        self._pumping = False
        self._pump_again = False
        #: What the connection's one timer does when it fires.
        self._on_timer: Callable[[], None] = self._idle_expired
        self._activity_limit = 0.0
        self._last_activity = 0.0

    # what a subclass does ----------------------------------------------------------------

    def _route(self, ex: Exchange) -> None:
        """``ex`` has a route (and the body the route reads, if any): send it on its way, or
        answer it. Its phase is then ``ROUTING`` (reading the client waits), ``FORWARDING`` or
        ``LOCAL``."""
        raise NotImplementedError

    def _tunnel_from_client(self, data: bytes) -> None:
        """Client bytes once the connection is SPLICED."""
        raise NotImplementedError

    def _client_reading(self, reading: bool) -> None:
        """The client stopped (or resumed) reading what is relayed to it."""

    def _abandon_backend(self, ex: Exchange) -> None:
        """``ex`` is answered locally: the backend connection serving it, if any, stops
        answering (and is not reused if the request was still under way)."""

    # connection lifecycle ------------------------------------------------------------------

    def connectionMade(self) -> None:
        super().connectionMade()
        self._last_activity = self.started

    def start(self) -> None:
        """Admitted: TLS, then wait for a request."""
        self.state = ConnectionState.HTTP
        if self.listener.tls == "implicit":
            self.transport.startTLS(self.runtime.server_tls.options)
        self.transport.registerProducer(ReadingWatch(self.client_write_paused), True)
        self._enter_idle(first=True)

    def handshakeCompleted(self) -> None:
        self.tls = tls_details(self.transport)

    def dataReceived(self, data: bytes) -> None:
        if self.state in _ENDED:
            return
        rest = self.take_proxy_header(data)
        if not rest:  # incomplete header, or nothing after it
            return
        data = rest
        self._client_spoke = True
        self._last_activity = self._clock.seconds()
        self.bytes_in += len(data)
        if self.state is ConnectionState.SPLICED:
            self._tunnel_from_client(data)
        elif self.state is ConnectionState.HTTP:
            self.heads.received(data)
            self.h11.receive_data(data)
            self._pump()

    def _connection_ended(self, reason: Failure) -> None:
        """The request in progress ends with the connection and is logged."""
        ex = self.exchange
        if ex is not None and not ex.logged:
            if ex.outcome == "ok" and not ex.response_complete:
                ex.outcome = "client_closed" if reason.check(ConnectionDone) else "client_error"
            self._record(ex)

    def _end_fields(self) -> dict[str, object]:
        return {"requests": self.requests}

    @property
    def routed(self) -> bool:
        """Routed a request to a destination (kicks reach SSE streams and WebSocket tunnels
        as well as keep-alive connections)."""
        return (self.state in (ConnectionState.HTTP, ConnectionState.SPLICED)
                and self.destination is not None)

    def drain(self) -> None:
        """Shutdown: close when idle, else after the current response."""
        self._draining = True
        if self.exchange is not None and self.state is ConnectionState.HTTP:
            self.exchange.close_after = True
        elif self.state is not ConnectionState.SPLICED:
            self.close("shutdown")

    def _stop_work(self) -> None:
        super()._stop_work()
        self._paused.clear()

    # reading and writing -------------------------------------------------------------------

    def pause_reading(self, reason: Hashable) -> None:
        if self.state in _ENDED:
            return
        if not self._paused:
            self.transport.pauseProducing()
        self._paused.add(reason)

    def resume_reading(self, reason: Hashable) -> None:
        if reason not in self._paused:
            return
        self._paused.discard(reason)
        if not self._paused and self.state not in _ENDED:
            self.transport.resumeProducing()

    def client_write_paused(self, paused: bool) -> None:
        """The client stopped (or resumed) reading: pause what is relayed to it, and take
        no next request until it reads its responses."""
        self._write_paused = paused
        self._client_reading(not paused)
        if not paused and "client_write" in self._paused:
            self.resume_reading("client_write")
            self._pump()

    def _send(self, event: h11.Event) -> None:
        data = self.h11.send(event)
        if data:
            self.bytes_out += len(data)
            self.transport.write(data)

    # timers: one per connection, re-armed in place ------------------------------------------

    def _set_timer(self, delay: float, on_timer: Callable[[], None]) -> None:
        self._on_timer = on_timer
        if self._timer is not None and self._timer.active():
            self._timer.reset(delay)
        else:
            self._timer = self._clock.callLater(delay, self._timer_fired)

    def _timer_fired(self) -> None:
        self._timer = None
        self._on_timer()

    def _enter_idle(self, first: bool = False) -> None:
        """Wait for a request head: ``preauth_timeout`` for the first, then
        ``keepalive_timeout``."""
        limit = self.listener.preauth_timeout if first else self.http.keepalive_timeout
        self._set_timer(limit, self._idle_expired)

    def _idle_expired(self) -> None:
        if self.exchange is not None or self.state is not ConnectionState.HTTP:
            return
        if self.h11.trailing_data[0]:
            self._fatal(408, "request head not received in time", outcome="timeout")
        else:
            self.close("idle" if self.requests else "preauth_timeout")

    def _arm_activity(self, limit: float) -> None:
        """From now on the exchange (or tunnel) may stay silent for ``limit`` seconds."""
        self._activity_limit = limit
        self._last_activity = self._clock.seconds()
        self._set_timer(limit, self._activity_check)

    def _activity_check(self) -> None:
        if self.state not in (ConnectionState.HTTP, ConnectionState.SPLICED):
            return
        idle_for = self._clock.seconds() - self._last_activity
        if idle_for < self._activity_limit:
            self._set_timer(self._activity_limit - idle_for, self._activity_check)
            return
        ex = self.exchange
        if self.state is ConnectionState.SPLICED or ex is None:
            self.close("idle")
            return
        ex.outcome = "timeout"
        if ex.response_started or ex.phase not in (Phase.ROUTING, Phase.FORWARDING,
                                                   Phase.BUFFERING):
            self.close("idle")
        elif ex.phase is Phase.BUFFERING:
            self._local(ex, 408, "request body not received in time", close=True)
        else:
            self._local(ex, 504, "the backend did not answer in time", close=True)

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
            if ex is not None and ex.phase is Phase.ROUTING:
                self.pause_reading("routing")
                return
            if ex is None and self._write_paused:
                self.pause_reading("client_write")
                return
            if self.h11.their_state is h11.IDLE:
                problem = self.heads.check(lambda: self.h11.trailing_data[0])
                if problem is not None:
                    self._fatal(problem.status, problem.reason)
                    return
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as exc:
                self._fatal(exc.error_status_hint or 400, str(exc) or "malformed request")
                return
            if event is h11.NEED_DATA:
                self.resume_reading("pipeline")
                return
            if event is h11.PAUSED:
                self.pause_reading("pipeline")
                return
            if isinstance(event, h11.Data):
                self._on_request_data(event)
            elif isinstance(event, h11.Request):
                self._on_request(event)
            elif isinstance(event, h11.EndOfMessage):
                self._on_request_end()
            elif isinstance(event, h11.ConnectionClosed):
                self.close("client_closed")
                return

    def _on_request(self, request: h11.Request) -> None:
        self.heads.next_request()
        self.requests += 1
        ex = Exchange(request, self._clock.seconds())
        self.exchange = ex
        self._arm_activity(self.http.relay_idle)
        if self.requests >= self.http.max_keepalive_requests or self._draining:
            ex.close_after = True
        if request.method == b"CONNECT":
            self._local(ex, 405, "CONNECT is not supported", close=True)
            return
        if self.http.health and ex.path in HEALTH_PATHS:
            self._health(ex)
            return
        ex.route = self.routes.match(ex.path)
        if ex.route is None:
            self._local(ex, 404, "no route for this path")
            return
        ex.websocket = is_websocket_upgrade(ex.headers)
        if ex.route.needs_body and ex.has_body and self.http.body_extract_cap > 0:
            ex.phase = Phase.BUFFERING
            if self.h11.they_are_waiting_for_100_continue:
                ex.sent_100 = True
                self._send(h11.InformationalResponse(status_code=100, headers=[],
                                                     reason=b"Continue"))
            return
        self._route(ex)

    def _on_request_data(self, event: h11.Data) -> None:
        ex = self.exchange
        assert ex is not None
        ex.bytes_in += len(event.data)
        if ex.phase is Phase.FORWARDING:
            if ex.backend is not None and ex.backend.sending_body:
                ex.backend.send(event)
        elif ex.phase is Phase.BUFFERING:
            ex.buffer += event.data
            if len(ex.buffer) >= self.http.body_extract_cap:
                self._route(ex)
        # local answers and abandoned exchanges: the body is read and dropped

    def _on_request_end(self) -> None:
        ex = self.exchange
        assert ex is not None
        ex.request_complete = True
        if ex.phase is Phase.BUFFERING:
            ex.replayable = True  # the whole body is in the buffer
            self._route(ex)
            return
        if ex.phase is Phase.FORWARDING and ex.backend is not None and ex.backend.sending_body:
            ex.backend.send(h11.EndOfMessage())
        self._maybe_finish(ex)

    def _maybe_finish(self, ex: Exchange) -> None:
        """After the response: next request (keep-alive) or close."""
        if ex is not self.exchange or not ex.response_complete \
                or self.state is not ConnectionState.HTTP:
            return
        our = self.h11.our_state
        if our is h11.MUST_CLOSE or our is h11.CLOSED or ex.close_after:
            self._record(ex)
            self.exchange = None
            self.close("closed")
            return
        if self.h11.their_state is not h11.DONE:
            return  # the rest of the request body is read and dropped first
        self._record(ex)
        self.exchange = None
        try:
            self.h11.start_next_cycle()
        except h11.LocalProtocolError:
            self.close("closed")
            return
        self.resume_reading("routing")
        self.resume_reading("pipeline")
        self._enter_idle()
        self._pump()

    def _record(self, ex: Exchange, reason: str | None = None) -> None:
        ex.record(self.runtime.metrics, self._clock.seconds(), session=self.id,
                  listener=self.listener.name, client=self.client, reason=reason)

    # local answers -----------------------------------------------------------------------------------

    def _health(self, ex: Exchange) -> None:
        ex.phase = Phase.ROUTING  # readiness may wait for the store
        answering = Deferred.fromCoroutine(health(ex.method, ex.path, self.runtime, self._clock))
        answering.addCallback(lambda answer: self._local(
            ex, answer.status, body=answer.body, headers=answer.headers, outcome=answer.outcome))

    def _local(self, ex: Exchange, status: int, message: str | None = None, *,
               body: bytes | None = None, headers: Iterable[tuple[bytes, bytes]] = (),
               close: bool = False, outcome: str | None = None) -> None:
        """Answer the current request from stalroute itself (JSON, ``{"error": message}``
        unless ``body`` is given)."""
        if ex is not self.exchange or self.state is not ConnectionState.HTTP:
            return
        if ex.response_started:
            self.close(ex.outcome if ex.outcome != "ok" else "error")
            return
        self._abandon_backend(ex)
        ex.phase = Phase.LOCAL
        ex.status = status
        ex.response_started = True
        if outcome is not None:
            ex.outcome = outcome
        elif ex.outcome == "ok" and status >= 400:
            ex.outcome = "refused" if status < 500 else "error"
        if body is None:
            body = error_body(status, message)
        ex.close_after = close or ex.must_close
        try:
            self._send(local_response(status, body, headers, close=ex.close_after))
            if ex.method != b"HEAD":
                ex.bytes_out += len(body)
                self._send(h11.Data(data=body))
            self._send(h11.EndOfMessage())
        except h11.LocalProtocolError:
            self.close("error")
            return
        ex.response_complete = True
        self.resume_reading("routing")
        self._maybe_finish(ex)
        if self.state is ConnectionState.HTTP:
            self._pump()

    def _fatal(self, status: int, reason: str, outcome: str = "bad_request") -> None:
        """Refuse what the client sent and close (the request stream cannot be trusted)."""
        ex = self.exchange
        if ex is not None and ex.response_started:
            ex.outcome = outcome
            self.close(outcome)
            return
        status = max(status, 400)
        answer = refusal(status, reason)
        self.transport.write(answer)
        self.bytes_out += len(answer)
        if ex is None:
            ex = self.exchange = Exchange.unreadable(self._clock.seconds())
        ex.status = status
        ex.outcome = outcome
        ex.response_started = ex.response_complete = True
        self._record(ex, reason=reason)
        self.close(outcome)
