"""The HTTP/1.1 routing proxy (SPEC §2.9, §5 HTTP): each request routed on its own.

An :class:`HTTPConnection` is the :class:`~stalroute.http.server.HTTPServerConnection` of one
client that routes what it does not answer itself: route table → identifier → the shared
login step (:func:`~stalroute.router.resolve_login`: login delay, then the router) → a backend
connection for that destination (:mod:`stalroute.http.pool`: pooled per client connection, or
opened through the shared :class:`~stalroute.backend.BackendConnector` with PROXY header, TLS
and circuit breaker). Failures are answered from the one table of :mod:`stalroute.failures`.

Both legs are framed by :mod:`stalroute.http.wire` (heads parsed by llhttp, bodies framed
there), so a message is always re-serialised, never passed through with its original
(possibly ambiguous) framing. Flow control: the client transport's producer
pauses whichever backend is answering (a slow reader stops the backend, memory stays bounded);
every backend transport's producer pauses reading from the client while its write buffer is
full. A backend connection that dies before answering a request it could be given again is
retried once on a fresh one.

``Upgrade: websocket`` requests are relayed with their upgrade headers; after the backend's
``101`` both connections become a :class:`~stalroute.http.tunnel.Tunnel`.
``text/event-stream`` responses flow through like every other body (nothing is buffered) under
the long ``bridge_idle`` limit.
"""

from __future__ import annotations

from collections.abc import Awaitable, Coroutine
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from stalroute.backend import BackendUnavailable
from stalroute.config import DestinationConfig, HTTPConfig
from stalroute.failures import reply_for
from stalroute.http.exchange import Exchange, Phase
from stalroute.http.headers import Forwarding, client_response_headers
from stalroute.http.pool import BackendConnection, BackendPool, HTTPBackendDialogue
from stalroute.http.routes import (
    Decision, Route, RouteTable, decide, extract_identifier, extraction_source,
)
from stalroute.http.server import HTTPServerConnection
from stalroute.http.tunnel import Tunnel
from stalroute.http.wire import Body, Closed, End, ResponseHead, WireError
from stalroute.inbound import ConnectionState, ListenerFactory
from stalroute.logs import logger
from stalroute.outcomes import Outcome
from stalroute.router import known_login, resolve_login
from stalroute.runtime import Runtime

__all__ = ["HTTPConnection", "HTTPListenerFactory"]

log = logger("stalroute.http")


class HTTPListenerFactory(ListenerFactory):
    """Connections of one ``protocol = "http"`` listener (``service.OTHER_LISTENERS``)."""

    def __init__(self, reactor: IReactorTime, runtime: Runtime, listener_name: str) -> None:
        super().__init__(reactor, runtime, listener_name)
        self._routes: tuple[HTTPConfig, RouteTable] | None = None
        #: The admitted connections, for the drain.
        self.connections: set[HTTPConnection] = set()

    def stopFactory(self) -> None:
        """The listener stopped (shutdown): idle keep-alive connections close now, busy
        ones after their current response (with ``Connection: close``)."""
        for connection in list(self.connections):
            connection.drain()

    def buildProtocol(self, addr: object) -> HTTPConnection:
        return HTTPConnection(self)

    def routes_for(self, http_config: HTTPConfig) -> RouteTable:
        """The compiled route table of ``http_config`` (rebuilt after a reload)."""
        if self._routes is None or self._routes[0] is not http_config:
            self._routes = (http_config, RouteTable(http_config.routes))
        return self._routes[1]


class _Gone(Exception):
    """The client connection closed while a request was being routed."""


class HTTPConnection(HTTPServerConnection):
    """One client connection whose requests are routed one by one over pooled backends."""

    factory: HTTPListenerFactory

    def __init__(self, factory: HTTPListenerFactory) -> None:
        super().__init__(factory, factory.routes_for(factory.runtime.config.http))
        self.pool = BackendPool()
        #: The backend connection whose response is being relayed.
        self.answering: BackendConnection | None = None
        self.tunnel: Tunnel | None = None
        #: The routing (or retry) in flight, cancelled when the connection ends.
        self._dispatching: Deferred[None] | None = None
        #: How requests announce this client, by the destination's ``forwarded`` setting.
        self._forwardings: dict[bool, Forwarding] = {}
        #: The last decision, its route and the request part it was read from.
        self._last_decision: tuple[Route, bytes | str, Decision] | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        if self._has_slot:
            self.factory.connections.add(self)

    def _connection_ended(self, reason: Failure) -> None:
        self.factory.connections.discard(self)
        super()._connection_ended(reason)

    def _stop_work(self) -> None:
        """Cancel the routing in flight, close every backend connection."""
        dispatching, self._dispatching = self._dispatching, None
        if dispatching is not None:
            dispatching.cancel()
        super()._stop_work()
        self.pool.close_all()
        for backend in (self.answering, self.tunnel.backend if self.tunnel else None):
            if backend is not None:
                backend.close()

    # flow control ----------------------------------------------------------------------------

    def _client_reading(self, reading: bool) -> None:
        backend = self.tunnel.backend if self.tunnel is not None else self.answering
        if backend is not None:
            backend.pause_reading(not reading)

    def _set_answering(self, backend: BackendConnection | None) -> None:
        previous, self.answering = self.answering, backend
        if previous is not None and previous is not backend:
            previous.pause_reading(False)
        if backend is not None:
            backend.pause_reading(self._write_paused)

    # routing ----------------------------------------------------------------------------------

    def _route(self, ex: Exchange) -> None:
        """Resolve and connect; called from the pump, which pauses reading the client if this
        does not finish at once. A pinned route or a cached mapping is known without waiting
        (and a pooled connection then takes the request at once): only a store lookup, a
        login delay or a new connection goes through a coroutine."""
        ex.phase = Phase.ROUTING
        try:
            decision = self._decide(ex)
            destination = self._known_destination(ex, decision)
        except Exception as exc:
            self._routing_failed(ex, exc)
            return
        if destination is None:
            self._start_dispatching(self._dispatch(ex, decision))
            return
        ex.destination = self.destination = destination.name
        backend = self.pool.take(destination.name)
        if backend is not None:
            self._forward(ex, backend)
        else:
            self._start_dispatching(
                self._forward_when_connected(ex, self._open_backend(destination)))

    def _start_dispatching(self, work: Coroutine[Any, Any, None]) -> None:
        dispatching = Deferred.fromCoroutine(work)
        if not dispatching.called:
            self._dispatching = dispatching

    async def _dispatch(self, ex: Exchange, decision: Decision) -> None:
        await self._forward_when_connected(ex, self._routed_backend(ex, decision))

    async def _retry(self, ex: Exchange, destination: DestinationConfig) -> None:
        """A reused connection died before answering: the same request on a fresh one."""
        await self._forward_when_connected(ex, self._open_backend(destination))

    async def _routed_backend(self, ex: Exchange, decision: Decision) -> BackendConnection:
        """The identifier's destination through the shared login step (login delay, then the
        router), then a backend connection to it."""
        destination = await resolve_login(self.runtime.router, self.runtime.delays, self._clock,
                                          decision.identifier, self.id)
        if self.state is not ConnectionState.HTTP:
            raise _Gone()
        ex.destination = self.destination = destination.name
        return self.pool.take(destination.name) or await self._open_backend(destination)

    async def _forward_when_connected(self, ex: Exchange,
                                      connecting: Awaitable[BackendConnection]) -> None:
        try:
            backend = await connecting
        except (_Gone, CancelledError):
            return
        except Exception as exc:
            self._dispatching = None
            self._routing_failed(ex, exc)
            return
        self._dispatching = None
        if self.state is ConnectionState.HTTP and self.exchange is ex:
            self._forward(ex, backend)

    def _routing_failed(self, ex: Exchange, error: Exception) -> None:
        """No destination or no backend connection: the answer of :mod:`stalroute.failures`."""
        reply = reply_for(error)
        if not reply.expected:
            log.failure("http {session}: unexpected error while routing", session=self.id,
                        failure=Failure(error))
            ex.outcome = Outcome.ERROR
        elif isinstance(error, BackendUnavailable):
            ex.outcome = Outcome.BACKEND_UNAVAILABLE
            log.warn("http {session}: destination {destination} unavailable: {reason}",
                     session=self.id, destination=ex.destination, reason=str(error))
        else:
            ex.outcome = Outcome.TEMPFAIL
        self._local(ex, reply.status, reply.http_error(ex.destination),
                    headers=reply.http_headers(self.config.server), close=not reply.expected)

    def _known_destination(self, ex: Exchange, decision: Decision) -> DestinationConfig | None:
        """Pinned by the route, else the destination of the identifier the request names (or
        of the route's ``fallback``, or the default) when it is known at once
        (:func:`~stalroute.router.known_login`); None when it takes waiting."""
        if decision.destination is not None:
            return self.config.destinations[decision.destination]
        ex.account = self.account = decision.identifier
        return known_login(self.runtime.router, self.runtime.delays, decision.identifier)

    def _decide(self, ex: Exchange) -> Decision:
        """:func:`decide` on what the route extracts. A keep-alive client sends the same
        credentials request after request: when the route and the part of the request it
        reads are those of the last request, so is the decision (the destination is still
        resolved per request)."""
        route = ex.route
        assert route is not None
        extract = route.config.extract
        source = None
        if extract is not None:
            source = extraction_source(extract, headers=ex.headers, query=ex.target.query)
            last = self._last_decision
            if source is not None and last is not None and last[0] is route \
                    and last[1] == source:
                return last[2]
        config = self.config
        raw = None
        if extract is not None:
            raw = extract_identifier(
                extract, headers=ex.headers, query=ex.target.query,
                body=bytes(ex.buffer[: self.http.body_extract_cap]) if ex.buffer else None,
                jwt_username_claim=config.oauth.jwt_username_claim)
        decision = decide(route, raw, separators=config.routing.master_user_separators,
                          normalize=config.mapping.normalize,
                          default_destination=config.routing.default_destination)
        if source is not None:
            self._last_decision = (route, source, decision)
        return decision

    async def _open_backend(self, destination: DestinationConfig) -> BackendConnection:
        leg = await self.runtime.connector.open(destination, "http", HTTPBackendDialogue,
                                                self.client_info())
        if self.state is not ConnectionState.HTTP:
            leg.close()
            raise _Gone()
        if not leg.transport.connected:
            leg.close()
            raise BackendUnavailable(f"destination {destination.name}: the connection closed "
                                     "before the request was sent")
        backend = BackendConnection(self, destination, leg, self.http.max_head_size)
        self.pool.add(backend)
        return backend

    def _forward(self, ex: Exchange, backend: BackendConnection) -> None:
        """Send the request head (and any buffered body) to ``backend``."""
        ex.backend = backend
        backend.busy = True
        ex.phase = Phase.FORWARDING
        if not ex.has_body:
            ex.replayable = True
        self._set_answering(backend)
        try:
            method, target, headers = ex.backend_request(
                backend.destination, self._forwarding(backend.destination.forwarded))
            backend.send_head(method, target, headers, chunked=ex.chunked,
                              length=ex.request.content_length)
            if ex.buffer:
                backend.send_body(bytes(ex.buffer))
            if ex.request_complete:
                backend.send_end()
        except WireError as exc:
            backend.close()
            ex.outcome = Outcome.ERROR
            self._local(ex, 400, f"request cannot be forwarded: {exc}", close=True)
            return
        self.resume_reading("routing")
        self._pump()

    def _forwarding(self, append: bool) -> Forwarding:
        forwarding = self._forwardings.get(append)
        if forwarding is None:
            forwarding = self._forwardings[append] = Forwarding(
                client_ip=self.client[0],
                proto="https" if self.listener.tls == "implicit" else "http",
                trust=self.listener.forwarded == "trust", append=append)
        return forwarding

    # the response side ------------------------------------------------------------------------

    def _serving(self, backend: BackendConnection) -> Exchange | None:
        """The current exchange if ``backend`` is serving it."""
        ex = self.exchange
        if backend.busy and ex is not None and ex.backend is backend \
                and self.state is ConnectionState.HTTP:
            return ex
        return None

    def backend_event(self, backend: BackendConnection,
                      event: ResponseHead | Body | End | Closed) -> None:
        ex = self._serving(backend)
        if ex is None:
            if not isinstance(event, Closed):
                # Bytes on an idle connection (a late 408, garbage): it is not reused.
                self._discard(backend)
            return
        self._last_activity = self._clock.seconds()
        try:
            if isinstance(event, Body):
                ex.bytes_out += len(event.data)
                self._send_body(event.data)
            elif isinstance(event, ResponseHead):
                if event.status < 200:
                    self._on_informational(ex, backend, event)
                    return
                self._send_response(ex, ex.client_response(event))
                if ex.streaming:
                    self._arm_activity(self.config.server.bridge_idle)
            elif isinstance(event, End):
                self._send_end()
                ex.response_complete = True
                self._set_answering(None)
                backend.finish_exchange()
                if backend.closed:
                    self._forget(backend)
                self._maybe_finish(ex)
        except WireError as exc:
            log.warn("http {session}: cannot relay the response: {error}", session=self.id,
                     error=str(exc))
            ex.outcome = Outcome.ERROR
            self.close(Outcome.PROTOCOL_ERROR)

    def _on_informational(self, ex: Exchange, backend: BackendConnection,
                          event: ResponseHead) -> None:
        if event.status == 101:
            if ex.websocket and self.reader.done:
                self._start_tunnel(ex, backend, event)
            else:
                self._discard(backend)
                ex.outcome = Outcome.BACKEND_ERROR
                self._local(ex, 502, "unexpected protocol switch from the backend", close=True)
            return
        if event.status == 100 and (ex.sent_100 or not self.reader.waiting_for_continue):
            return
        if ex.http10:
            return
        self._send_informational(ResponseHead(event.status, event.reason,
                                              client_response_headers(event.headers)))

    def _start_tunnel(self, ex: Exchange, backend: BackendConnection,
                      event: ResponseHead) -> None:
        headers = client_response_headers(event.headers, switching=True)
        self._send_informational(ResponseHead(101, event.reason, headers))
        self.state = ConnectionState.SPLICED
        self.tunnel = Tunnel(ex, backend, self._tunnel_to_client)
        self.pool.close_all(keep=backend)
        self._paused.discard("pipeline")
        self._paused.discard("routing")
        if not self._paused:
            self.transport.resumeProducing()
        self._arm_activity(self.config.server.bridge_idle)
        self.tunnel.open(self.reader.leftover(), backend.reader.leftover())

    def _tunnel_from_client(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.from_client(data)

    def _tunnel_to_client(self, data: bytes) -> None:
        if self.state is not ConnectionState.SPLICED:
            return
        self._last_activity = self._clock.seconds()
        self.bytes_out += len(data)
        self.transport.write(data)

    def _abandon_backend(self, ex: Exchange) -> None:
        if ex.backend is not None and not ex.backend.closed and not ex.backend.reusable:
            self._discard(ex.backend)
        self._set_answering(None)

    def _forget(self, backend: BackendConnection) -> None:
        self.pool.forget(backend)
        if self.answering is backend:
            self._set_answering(None)

    def _discard(self, backend: BackendConnection) -> None:
        backend.close()
        self._forget(backend)

    def backend_gone(self, backend: BackendConnection, reason: str) -> None:
        """A backend connection closed or broke the protocol (it is already closed)."""
        self._forget(backend)
        ex = self._serving(backend)
        backend.busy = False
        if self.state is ConnectionState.SPLICED and self.tunnel is not None \
                and backend is self.tunnel.backend:
            if self.tunnel.exchange.outcome is None:
                self.tunnel.exchange.outcome = Outcome.BACKEND_CLOSED
            self.close(Outcome.BACKEND_CLOSED)
            return
        if ex is None or ex.response_complete:
            return
        if not ex.response_started:
            if backend.served > 0 and ex.replayable and not ex.retried:
                ex.retried = True
                ex.phase = Phase.ROUTING
                self.pause_reading("routing")
                self._start_dispatching(self._retry(ex, backend.destination))
                return
            ex.outcome = Outcome.BACKEND_ERROR
            log.warn("http {session}: {destination}: {reason}", session=self.id,
                     destination=backend.name, reason=reason)
            self._local(ex, 502, "the backend closed the connection without answering")
            return
        # Mid-response: the client's connection ends (it sees a truncated body).
        ex.outcome = Outcome.BACKEND_CLOSED
        log.warn("http {session}: {destination} ended the response early: {reason}",
                 session=self.id, destination=backend.name, reason=reason)
        self.close(Outcome.BACKEND_CLOSED)
