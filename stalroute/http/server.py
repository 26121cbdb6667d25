"""stalroute as the HTTP/1.1 server its client talks to (SPEC §5 HTTP): the client side of an
HTTP connection, on the shared lifecycle of :class:`~stalroute.inbound.InboundConnection`.

Requests are read one at a time by a :class:`~stalroute.http.wire.RequestReader` (each head
judged first by a :class:`~stalroute.http.headers.HeadGuard`, the smuggling defences, then
parsed by llhttp), and become an
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

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHandshakeListener
from twisted.python.failure import Failure
from zope.interface import implementer

from stalroute.acme.challenges import http01_response
from stalroute.http.exchange import Exchange, Phase
from stalroute.http.headers import is_websocket_upgrade
from stalroute.http.local import HEALTH_PATHS, error_body, health, local_response, refusal
from stalroute.http.routes import RouteTable
from stalroute.http.wire import (
    NEED_DATA, PAUSED, Body, BodyWriter, End, RequestHead, RequestReader, ResponseHead,
    WireError, frame_response, informational_head,
)
from stalroute.inbound import ConnectionState, InboundConnection, ListenerFactory
from stalroute.outcomes import Outcome
from stalroute.tls import tls_details
from stalroute.tls_layer import start_tls
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
        self.reader = RequestReader(self.http.max_head_size)
        #: How the body of the response being sent is framed, and whether the connection
        #: closes after it.
        self._body_writer: BodyWriter | None = None
        self._must_close = False
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
            start_tls(self.transport, self.runtime.server_tls.options)
        self.transport.registerProducer(ReadingWatch(self.client_write_paused), True)
        self._enter_idle(first=True)

    def handshakeCompleted(self) -> None:
        if self.end_acme_validation():
            return
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
            self.reader.receive(data)
            self._pump()

    def _connection_ended(self, reason: Failure) -> None:
        """The request in progress ends with the connection and is logged."""
        ex = self.exchange
        if ex is not None and not ex.logged:
            if ex.outcome is None and not ex.response_complete:
                ex.outcome = (Outcome.CLIENT_CLOSED if reason.check(ConnectionDone)
                              else Outcome.CLIENT_ERROR)
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
            self.close(Outcome.SHUTDOWN)

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

    def _write(self, data: bytes) -> None:
        if data:
            self.bytes_out += len(data)
            self.transport.write(data)

    def _send_response(self, ex: Exchange, response: ResponseHead) -> None:
        """The final response head, framed for this client (:func:`frame_response`)."""
        request = self.reader.request
        data, self._body_writer, must_close = frame_response(
            response, method=ex.method, http10=ex.http10,
            keep_alive=request.keep_alive if request is not None else False)
        self._must_close = self._must_close or must_close
        self.reader.waiting_for_continue = False
        self._write(data)

    def _send_informational(self, response: ResponseHead) -> None:
        self.reader.waiting_for_continue = False
        self._write(informational_head(response.status, response.reason, response.headers))

    def _send_body(self, data: bytes) -> None:
        assert self._body_writer is not None
        self._write(self._body_writer.data(data))

    def _send_end(self) -> None:
        assert self._body_writer is not None
        self._write(self._body_writer.end())

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
        if self.reader.partial_head:
            self._fatal(408, "request head not received in time", outcome=Outcome.TIMEOUT)
        else:
            self.close(Outcome.IDLE if self.requests else Outcome.PREAUTH_TIMEOUT)

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
            self.close(Outcome.IDLE)
            return
        ex.outcome = Outcome.TIMEOUT
        if ex.response_started or ex.phase not in (Phase.ROUTING, Phase.FORWARDING,
                                                   Phase.BUFFERING):
            self.close(Outcome.IDLE)
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
            try:
                event = self.reader.next_event()
            except WireError as exc:
                self._fatal(exc.status, str(exc))
                return
            if event is NEED_DATA:
                self.resume_reading("pipeline")
                return
            if event is PAUSED:
                self.pause_reading("pipeline")
                return
            if isinstance(event, Body):
                self._on_request_data(event)
            elif isinstance(event, RequestHead):
                self._on_request(event)
            elif isinstance(event, End):
                self._on_request_end()

    def _on_request(self, request: RequestHead) -> None:
        self.requests += 1
        self._must_close = False
        self._body_writer = None
        ex = Exchange(request, self._clock.seconds())
        self.exchange = ex
        self._arm_activity(self.http.relay_idle)
        if self.requests >= self.http.max_keepalive_requests or self._draining:
            ex.close_after = True
        if request.method == b"CONNECT":
            self._local(ex, 405, "CONNECT is not supported", close=True)
            return
        challenge = http01_response(ex.path)
        if challenge is not None:  # an ACME http-01 validation, answered before any routing
            self._local(ex, 200, body=challenge, outcome=Outcome.ACME_VALIDATION,
                        headers=[(b"Content-Type", b"application/octet-stream")])
            return
        if self.http.health and ex.path in HEALTH_PATHS:
            self._health(ex)
            return
        ex.route = self.routes.match(ex.path)
        if ex.route is None:
            self._local(ex, 404, "no route for this path")
            return
        ex.websocket = request.upgrade and is_websocket_upgrade(ex.headers)
        if ex.route.needs_body and ex.has_body and self.http.body_extract_cap > 0:
            ex.phase = Phase.BUFFERING
            if self.reader.waiting_for_continue:
                ex.sent_100 = True
                self._send_informational(ResponseHead(100, b"Continue", []))
            return
        self._route(ex)

    def _on_request_data(self, event: Body) -> None:
        ex = self.exchange
        assert ex is not None
        ex.bytes_in += len(event.data)
        if ex.phase is Phase.FORWARDING:
            if ex.backend is not None and ex.backend.sending_body:
                ex.backend.send_body(event.data)
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
            ex.backend.send_end()
        self._maybe_finish(ex)

    def _maybe_finish(self, ex: Exchange) -> None:
        """After the response: next request (keep-alive) or close."""
        if ex is not self.exchange or not ex.response_complete \
                or self.state is not ConnectionState.HTTP:
            return
        if self._must_close or ex.close_after:
            self._record(ex)
            self.exchange = None
            self.close(Outcome.CLOSED)
            return
        if not self.reader.done:
            return  # the rest of the request body is read and dropped first
        self._record(ex)
        self.exchange = None
        self.reader.start_next()
        self.resume_reading("routing")
        self.resume_reading("pipeline")
        self._enter_idle()
        self._pump()

    def _record(self, ex: Exchange, reason: str | None = None) -> None:
        ex.record(self.runtime.metrics, self._clock.seconds(), session=self.id,
                  listener=self.listener.name, client=self.client, reason=reason)

    # local answers -----------------------------------------------------------------------------

    def _health(self, ex: Exchange) -> None:
        ex.phase = Phase.ROUTING  # readiness may wait for the store
        answering = Deferred.fromCoroutine(health(ex.method, ex.path, self.runtime, self._clock))
        answering.addCallback(lambda answer: self._local(
            ex, answer.status, body=answer.body, headers=answer.headers, outcome=answer.outcome))

    def _local(self, ex: Exchange, status: int, message: str | None = None, *,
               body: bytes | None = None, headers: Iterable[tuple[bytes, bytes]] = (),
               close: bool = False, outcome: Outcome | None = None) -> None:
        """Answer the current request from stalroute itself (JSON, ``{"error": message}``
        unless ``body`` is given)."""
        if ex is not self.exchange or self.state is not ConnectionState.HTTP:
            return
        if ex.response_started:
            self.close(ex.outcome or Outcome.ERROR)
            return
        self._abandon_backend(ex)
        ex.phase = Phase.LOCAL
        ex.status = status
        ex.response_started = True
        if outcome is not None:
            ex.outcome = outcome
        elif ex.outcome is None and status >= 400:
            ex.outcome = Outcome.REFUSED if status < 500 else Outcome.ERROR
        if body is None:
            body = error_body(status, message)
        ex.close_after = close or ex.must_close
        try:
            self._send_response(ex, local_response(status, body, headers, close=ex.close_after))
            if ex.method != b"HEAD":
                ex.bytes_out += len(body)
                self._send_body(body)
            self._send_end()
        except WireError:
            self.close(Outcome.ERROR)
            return
        ex.response_complete = True
        self.resume_reading("routing")
        self._maybe_finish(ex)
        if self.state is ConnectionState.HTTP:
            self._pump()

    def _fatal(self, status: int, reason: str,
               outcome: Outcome = Outcome.BAD_REQUEST) -> None:
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
