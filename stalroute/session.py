"""The shared pipeline of every interactive protocol (SPEC §3).

A :class:`ClientSession` runs a protocol's sans-IO :class:`PreAuthMachine` on the client
connection, resolves the account, opens a backend leg through the
:class:`~stalroute.backend.BackendConnector`, replays the login, and on success splices the two
connections with flow control (each transport is the other's producer, so a client that stops
reading pauses the backend) until either side closes, ``bridge_idle`` passes, or a kick.
"""

from __future__ import annotations

import time

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IAddress, IHandshakeListener, IReactorTime
from zope.interface import implementer

from stalroute.backend import BackendLeg, BackendUnavailable, ClientInfo
from stalroute.config import DestinationConfig
from stalroute.failures import reply_for
from stalroute.identity import account_from_credentials, routing_identifier
from stalroute.inbound import ConnectionState, InboundConnection, ListenerFactory
from stalroute.logs import logger
from stalroute.outcomes import Outcome
from stalroute.protocols.base import (
    Authenticate, Close, LoginFailed, LoginSucceeded, PreAuthEvent, ProtocolSpec,
    Reply, StartTLS,
)
from stalroute.router import resolve_login
from stalroute.runtime import Runtime
from stalroute.tls import tls_details
from stalroute.tls_layer import start_tls
from stalroute.transport import ReadingWatch

log = logger("stalroute.session")

#: Pre-auth input is given to the machine this much at a time, so that the replies to one
#: read stay small and a client that does not read them is paused before the next chunk.
FEED_CHUNK = 4096

#: Client bytes held while a login is routed (or the client does not read); reading pauses
#: beyond it.
MAX_PENDING_INPUT = 64 * 1024


class SessionFactory(ListenerFactory):
    """Sessions of one interactive (or pass-through) listener."""

    def __init__(self, reactor: IReactorTime, runtime: Runtime, listener_name: str,
                 spec: ProtocolSpec) -> None:
        super().__init__(reactor, runtime, listener_name)
        self.spec = spec

    def buildProtocol(self, addr: IAddress | None) -> ClientSession:
        return ClientSession(self)


@implementer(IHandshakeListener)
class ClientSession(InboundConnection):
    """One client connection through pre-auth, routing, login replay and splice.

    Client bytes wait in ``_pending`` until the machine may take them: in pre-auth they are
    fed a chunk at a time while the client reads its replies; while a login is routed they
    wait (and become the pipelined bytes of a successful login). Reading pauses while
    ``_pending`` is full.
    """

    def __init__(self, factory: SessionFactory) -> None:
        super().__init__(factory)
        self.spec = factory.spec
        self.leg: BackendLeg | None = None
        self._login: Deferred[None] | None = None
        self._pending = bytearray()
        self._output_blocked = False
        self._reading_paused = False
        self._starttls_pending = False
        self._last_activity = 0.0
        self._login_started = 0.0

    @property
    def routed(self) -> bool:
        """Spliced to a destination: listed by ``GET /connections``, reached by kicks."""
        return self.state is ConnectionState.SPLICED

    # connection ----------------------------------------------------------------------

    def start(self) -> None:
        self.state = ConnectionState.PREAUTH
        self.machine = self.spec.preauth(
            self.runtime.capabilities.preauth_settings(self.runtime.config, self.listener))
        self._timer = self._clock.callLater(self.listener.preauth_timeout, self._preauth_expired)
        if self.listener.tls == "implicit":
            start_tls(self.transport, self.runtime.server_tls.options)
        # Until the splice: a client that does not read its replies gets no more of them
        # (its input waits in _pending, and reading stops once that is full).
        self.transport.registerProducer(ReadingWatch(self.output_blocked), True)
        self._run(self.machine.greeting())
        if self.spec.passthrough and self.state is ConnectionState.PREAUTH:
            self._start_login(None)

    def handshakeCompleted(self) -> None:
        if self.end_acme_validation():
            return
        self.tls = tls_details(self.transport)
        if self._starttls_pending and self.state is ConnectionState.PREAUTH:
            self._starttls_pending = False
            self._run(self.machine.tls_started())
            self._feed()

    def dataReceived(self, data: bytes) -> None:
        # An exception here would escape into the TLS layer and could skip connectionLost.
        try:
            self._received(data)
        except Exception:
            log.failure("session {session}: internal error on client input", session=self.id)
            self.close(Outcome.INTERNAL_ERROR)

    def _received(self, data: bytes) -> None:
        if self.state is ConnectionState.SPLICED:
            assert self.leg is not None
            self.bytes_in += len(data)
            self._last_activity = self._clock.seconds()
            self.leg.transport.write(data)
            return
        rest = self.take_proxy_header(data)
        if rest is None:
            return
        data = rest
        if data and self.state in (ConnectionState.PREAUTH, ConnectionState.ROUTING):
            self._client_spoke = True
            self._pending += data
            self._feed()

    def _stop_work(self) -> None:
        """Cancel what runs on the session's behalf: the login in flight, the timer, the leg."""
        login, self._login = self._login, None
        if login is not None:
            login.cancel()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        leg, self.leg = self.leg, None
        if leg is not None:
            leg.close()

    # pre-auth ------------------------------------------------------------------------

    def output_blocked(self, blocked: bool) -> None:
        """The client stopped (or resumed) reading its replies."""
        self._output_blocked = blocked
        if not blocked:
            self._feed()
        self._throttle_reading()

    def _feed(self) -> None:
        """Give pending client bytes to the machine, a chunk at a time, while it is in
        pre-auth and the client reads what it answers."""
        while (self._pending and self.state is ConnectionState.PREAUTH
               and not self._output_blocked and not self._starttls_pending):
            chunk = bytes(self._pending[:FEED_CHUNK])
            del self._pending[:FEED_CHUNK]
            self._run(self.machine.receive(chunk))
        self._throttle_reading()

    def _throttle_reading(self) -> None:
        if self.state not in (ConnectionState.PREAUTH, ConnectionState.ROUTING):
            return
        pause = len(self._pending) >= MAX_PENDING_INPUT
        if pause != self._reading_paused:
            self._reading_paused = pause
            if pause:
                self.transport.pauseProducing()
            else:
                self.transport.resumeProducing()

    def _run(self, events: list[PreAuthEvent]) -> None:
        for event in events:
            if self.state is not ConnectionState.PREAUTH:
                return
            match event:
                case Reply(data=data):
                    self.transport.write(data)
                case StartTLS():
                    # Bytes sent after STARTTLS, before the handshake, are dropped (SPEC §5).
                    self._pending.clear()
                    self._starttls_pending = True
                    start_tls(self.transport, self.runtime.server_tls.options)
                case Authenticate():
                    self._login_started = time.monotonic()
                    self._start_login(event)
                case Close():
                    self.close(Outcome.CLOSED if self.outcome is None else self.outcome)
                    return

    def _preauth_expired(self) -> None:
        self._timer = None
        self.outcome = Outcome.PREAUTH_TIMEOUT
        if self.state is ConnectionState.ROUTING:  # the login in flight is abandoned
            self.state = ConnectionState.PREAUTH
        self._run(self.machine.timed_out())

    # routing, backend leg, replay ----------------------------------------------------

    def _start_login(self, event: Authenticate | None) -> None:
        self.state = ConnectionState.ROUTING
        login = Deferred.fromCoroutine(self._route_and_replay(event))
        if not login.called:  # (a login that failed at once may have started the next one)
            self._login = login

    async def _route_and_replay(self, event: Authenticate | None) -> None:
        """Route, open the backend leg, replay the login (``event`` is None for pass-through).
        Cancelled (the client left, the pre-auth timer expired) it closes what it opened."""
        leg = None
        try:
            destination = await self._destination(event)
            self.destination = destination.name
            leg = await self.runtime.connector.open(
                destination, self.spec.name, self.spec.dialogue, self._client_info())
            credentials, context = (event.credentials, event.context) if event else (None, None)
            outcome = await self._with_timeout(leg.login(credentials, context))
        except CancelledError:
            if leg is not None:
                leg.close()
            return
        except Exception as exc:
            self._login = None
            if not reply_for(exc).expected:
                log.failure("session {session}: unexpected error during login",
                            **self._log_context)
            self._unavailable(leg, exc)
            return
        self._login = None
        if isinstance(outcome, LoginFailed):
            leg.close()
            self.outcome = Outcome.AUTH_FAILED
            self.runtime.bans.login_refused(self.client[0])
            log.info("session {session}: login refused by {destination} for {account}",
                     destination=self.destination, **self._log_context)
            self._back_to_preauth(self.machine.auth_failed(outcome.reply))
        else:
            if event is not None:
                self.runtime.metrics.login_latency.observe(
                    time.monotonic() - self._login_started)
            self._splice(leg, outcome)

    async def _destination(self, event: Authenticate | None) -> DestinationConfig:
        config = self.runtime.config
        if event is None:
            passthrough = config.routing.smtp_passthrough_destination
            assert passthrough is not None  # required by the config with smtp/lmtp listeners
            return config.destinations[passthrough]
        self.account = self._identifier(event)
        return await resolve_login(self.runtime.router, self.runtime.delays, self._clock,
                                   self.account, self.id)

    def _identifier(self, event: Authenticate) -> str | None:
        config = self.runtime.config
        account = account_from_credentials(event.credentials, config.oauth.jwt_username_claim)
        if account is None:
            return None
        return routing_identifier(account, config.routing.master_user_separators,
                                  config.mapping.normalize)

    def _client_info(self) -> ClientInfo:
        """With what the pre-auth dialogue learnt: an upstream proxy's hop TTL (IMAP ID),
        the name an SMTP client greeted with."""
        return self.client_info(self.machine.proxy_ttl, self.machine.client_helo)

    async def _with_timeout(
            self, d: Deferred[LoginSucceeded | LoginFailed]) -> LoginSucceeded | LoginFailed:
        timed_out = False

        def expire() -> None:
            nonlocal timed_out
            timed_out = True
            d.cancel()

        timer = self._clock.callLater(self.runtime.config.server.backend_timeout, expire)
        try:
            return await d
        except CancelledError as exc:
            if timed_out:
                raise BackendUnavailable("backend login timed out") from exc
            raise
        finally:
            if timer.active():
                timer.cancel()

    def _unavailable(self, leg: BackendLeg | None, error: Exception) -> None:
        """A temporary failure: the detail goes to the log, the client gets a fixed text."""
        if leg is not None:
            leg.close()
        log.warn("session {session}: temporary failure for {account}: {reason}",
                 reason=str(error), **self._log_context)
        self.outcome = Outcome.TEMPFAIL
        self._back_to_preauth(self.machine.auth_unavailable(reply_for(error).text))

    def _back_to_preauth(self, events: list[PreAuthEvent]) -> None:
        self.state = ConnectionState.PREAUTH
        self._run(events)
        self._feed()

    # splice --------------------------------------------------------------------------

    def _splice(self, leg: BackendLeg, outcome: LoginSucceeded) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self.leg = leg
        self.state = ConnectionState.SPLICED
        self.outcome = None  # what pre-auth ended as no longer applies
        self.transport.unregisterProducer()  # the pre-auth throttle
        self.transport.write(outcome.reply)
        pipelined = self.machine.auth_succeeded() + bytes(self._pending)
        self._pending.clear()
        leg.attach(self._from_backend, self._backend_lost)
        if self.leg is None:  # the backend went away while its leftover was relayed
            return
        if pipelined:
            self.bytes_in += len(pipelined)
            leg.transport.write(pipelined)
        self.transport.registerProducer(leg.transport, True)
        leg.transport.registerProducer(self.transport, True)
        if self._reading_paused:  # from now on the backend's buffer decides
            self._reading_paused = False
            self.transport.resumeProducing()
        self._last_activity = self._clock.seconds()
        self._timer = self._clock.callLater(self.runtime.config.server.bridge_idle,
                                            self._idle_check)
        log.info("session {session}: {account} spliced to {destination}",
                 destination=self.destination, **self._log_context)

    def _from_backend(self, data: bytes) -> None:
        self.bytes_out += len(data)
        self._last_activity = self._clock.seconds()
        self.transport.write(data)

    def _backend_lost(self) -> None:
        self.leg = None
        self.close(Outcome.BACKEND_CLOSED)

    def _idle_check(self) -> None:
        limit = self.runtime.config.server.bridge_idle
        idle_for = self._clock.seconds() - self._last_activity
        if idle_for >= limit:
            self._timer = None
            self.close(Outcome.IDLE)
        else:
            self._timer = self._clock.callLater(limit - idle_for, self._idle_check)
