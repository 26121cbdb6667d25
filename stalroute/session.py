"""The shared pipeline of every interactive protocol (SPEC §3).

A :class:`ClientSession` runs a protocol's sans-IO :class:`PreAuthMachine` on the client
connection, resolves the account, opens a backend leg through the
:class:`~stalroute.backend.BackendConnector`, replays the login, and on success splices the two
connections with flow control (each transport is the other's producer, so a client that stops
reading pauses the backend) until either side closes, ``bridge_idle`` passes, or a kick.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.main import CONNECTION_DONE
from twisted.python.failure import Failure
from zope.interface import implementer

from stalroute.backend import BackendConnector, BackendLeg, BackendUnavailable, ClientInfo
from stalroute.capabilities import DestinationCapabilities
from stalroute.config import Config, DestinationConfig, ListenerConfig
from stalroute.identity import (
    InvalidIdentifier, account_from_credentials, redact, routing_identifier,
)
from stalroute.inbound import ConnectionState, InboundConnection, ListenerFactory
from stalroute.limits import BanList, LoginDelays
from stalroute.logs import logger
from stalroute.protocols.base import (
    Authenticate, BackendEvent, Close, LoginFailed, LoginSucceeded, PreAuthEvent,
    PreAuthSettings, ProtocolSpec, Reply, StartTLS,
)
from stalroute.router import Router, RoutingUnavailable, resolve_login
from stalroute.stats import Metrics
from stalroute.tls import ServerTLS, TLSDetails, tls_details

log = logger("stalroute.session")

#: Pre-auth input is given to the machine this much at a time, so that the replies to one
#: read stay small and a client that does not read them is paused before the next chunk.
FEED_CHUNK = 4096

#: Client bytes held while a login is routed (or the client does not read); reading pauses
#: beyond it.
MAX_PENDING_INPUT = 64 * 1024

#: How a connection that never sent a protocol byte may end and still be a harmless probe
#: (a load balancer's health check): logged at debug level and counted, nothing else.
PROBE_OUTCOMES = frozenset({"client_closed", "client_error", "proxy_header_timeout",
                            "preauth_timeout", "closed"})


class LoopDetected(Exception):
    """The hop TTL announced by an upstream proxy is exhausted."""


#: What a client is told on a temporary failure; backend and store details stay in the log.
CLIENT_REASONS: dict[type[Exception], str] = {
    BackendUnavailable: "Backend temporarily unavailable, try again later",
    RoutingUnavailable: "Account routing temporarily unavailable, try again later",
    InvalidIdentifier: "Invalid characters in the user name",
    LoopDetected: "Proxy loop detected",
}


@dataclass
class Runtime:
    """Everything sessions share; a reload builds a new one, live sessions keep theirs."""

    config: Config
    router: Router
    connector: BackendConnector
    server_tls: ServerTLS
    registry: SessionRegistry
    bans: BanList
    delays: LoginDelays
    metrics: Metrics
    capabilities: DestinationCapabilities = field(default_factory=DestinationCapabilities)


@dataclass
class SessionRegistry:
    """Every open client connection (for drain), and the routed ones (for kicks and
    listings). It outlives config reloads."""

    sessions: dict[str, InboundConnection] = field(default_factory=dict)
    #: Set once a shutdown drain begins (readiness turns false at once).
    draining: bool = False

    def add(self, session: InboundConnection) -> None:
        self.sessions[session.id] = session

    def discard(self, session: InboundConnection) -> None:
        self.sessions.pop(session.id, None)

    def routed(self) -> list[InboundConnection]:
        return [s for s in self.sessions.values() if s.routed]


def preauth_settings(runtime: Runtime, listener: ListenerConfig) -> PreAuthSettings:
    """What ``listener``'s pre-auth machine announces: the configured capabilities, narrowed
    to what the destinations honour where the operator left a list unset."""
    config = runtime.config
    common = {"hostname": config.server.hostname, "tls_mode": listener.tls,
              "max_auth_attempts": listener.max_auth_attempts}
    if getattr(config.capabilities, listener.protocol, None) is None:
        # SMTP/LMTP pass-through: nothing to advertise
        return PreAuthSettings(**common, sasl=(), allow_plain_auth_without_tls=False, banner="")
    advertised = runtime.capabilities.advertised(config, listener.protocol)
    capabilities = advertised.capabilities
    return PreAuthSettings(
        **common, sasl=tuple(capabilities.sasl),
        allow_plain_auth_without_tls=capabilities.allow_plain_auth_without_tls,
        banner=capabilities.banner,
        extra={"advertise": capabilities.advertise, "ehlo": capabilities.ehlo,
               "sieve": capabilities.sieve, "implementation": capabilities.implementation,
               "notify": advertised.notify, "utf8": "UTF8" in advertised.capa})


class SessionFactory(ListenerFactory):
    """Sessions of one interactive (or pass-through) listener."""

    def __init__(self, reactor, runtime: Runtime, listener_name: str,
                 spec: ProtocolSpec) -> None:
        super().__init__(reactor, runtime, listener_name)
        self.spec = spec

    def buildProtocol(self, addr) -> ClientSession:
        return ClientSession(self, self.runtime)


class _PreAuthThrottle:
    """The session's streaming producer toward its client until the splice: a client that
    does not read its replies gets no more of them (its input waits in ``_pending``, and
    reading stops once that is full), so pre-auth memory stays bounded.

    The consumer also pauses it while TLS waits for its handshake; reading must go on then,
    which is why a pause stops the answers, not the reading."""

    def __init__(self, session: ClientSession) -> None:
        self._session = session

    def pauseProducing(self) -> None:
        self._session.output_blocked(True)

    def resumeProducing(self) -> None:
        self._session.output_blocked(False)

    def stopProducing(self) -> None:
        pass  # the connection is going away; connectionLost follows


@implementer(IHandshakeListener)
class ClientSession(InboundConnection):
    """One client connection through pre-auth, routing, login replay and splice.

    Client bytes wait in ``_pending`` until the machine may take them: in pre-auth they are
    fed a chunk at a time while the client reads its replies; while a login is routed they
    wait (and become the pipelined bytes of a successful login). Reading pauses while
    ``_pending`` is full.
    """

    def __init__(self, factory: SessionFactory, runtime: Runtime) -> None:
        self.factory = factory
        self.runtime = runtime
        self.listener = factory.listener
        self.spec = factory.spec
        self.id = f"{runtime.config.cluster.node_id}-{secrets.token_hex(6)}"
        self.account: str | None = None
        self.destination: str | None = None
        self.tls: TLSDetails | None = None
        self.bytes_in = self.bytes_out = 0
        self.leg: BackendLeg | None = None
        self._login: Deferred[None] | None = None
        self._pending = bytearray()
        self._throttle: _PreAuthThrottle | None = None
        self._output_blocked = False
        self._reading_paused = False
        self._client_spoke = False
        self._starttls_pending = False
        self._last_activity = 0.0
        self._login_started = 0.0

    @property
    def routed(self) -> bool:
        """Spliced to a destination: listed by ``GET /connections``, reached by kicks."""
        return self.state is ConnectionState.SPLICED

    @property
    def _log_context(self) -> dict[str, str]:
        """The fields every log line of this session carries (JSON logs show them)."""
        return {"session": self.id, "listener": self.listener.name,
                "protocol": self.spec.name,
                "account": redact(self.account) if self.account else "-"}

    # connection ----------------------------------------------------------------------

    def start(self) -> None:
        self.state = ConnectionState.PREAUTH
        self.machine = self.spec.preauth(preauth_settings(self.runtime, self.listener))
        self._timer = self._clock.callLater(self.listener.preauth_timeout, self._preauth_expired)
        if self.listener.tls == "implicit":
            self.transport.startTLS(self.runtime.server_tls.options)
        self._throttle = _PreAuthThrottle(self)
        self.transport.registerProducer(self._throttle, True)
        self._run(self.machine.greeting())
        if self.spec.passthrough and self.state is ConnectionState.PREAUTH:
            self._start_login(None)

    def handshakeCompleted(self) -> None:
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
            self.close("internal_error")

    def _received(self, data: bytes) -> None:
        if self.state is ConnectionState.SPLICED:
            assert self.leg is not None
            self.bytes_in += len(data)
            self._last_activity = self._clock.seconds()
            self.leg.transport.write(data)
            return
        if self._proxy_header is not None:
            data = self.take_proxy_header(data)
            if data is None:
                return
        if data and self.state in (ConnectionState.PREAUTH, ConnectionState.ROUTING):
            self._client_spoke = True
            self._pending += data
            self._feed()

    def connectionLost(self, reason: Failure = CONNECTION_DONE) -> None:
        was_spliced = self.state is ConnectionState.SPLICED
        released = self.release()
        self._stop_work()
        if not released:
            return
        if was_spliced and self.outcome == "client_closed" and not reason.check(ConnectionDone):
            self.outcome = "client_error"
        probe = not (self._client_spoke or self.bytes_in) and self.outcome in PROBE_OUTCOMES
        if probe:
            self.factory.probes += 1
        self.runtime.metrics.sessions[(self.spec.name, self.destination or "-",
                                       "probe" if probe else self.outcome)] += 1
        (log.debug if probe else log.info)(
            "session {session} {protocol} client={client} account={account} "
            "destination={destination} outcome={outcome} in={bytes_in} out={bytes_out} "
            "duration={duration:.3f}s", **self._log_context,
            client=f"{self.client[0]}:{self.client[1]}", destination=self.destination or "-",
            outcome="probe" if probe else self.outcome, bytes_in=self.bytes_in,
            bytes_out=self.bytes_out, duration=self._clock.seconds() - self.started)

    def close(self, outcome: str) -> None:
        """End the session and its backend leg (kick, backend gone, idle, shutdown): what was
        written is flushed first, and the connection is aborted if it does not go in time."""
        if self.state in (ConnectionState.CLOSING, ConnectionState.CLOSED):
            return
        self.outcome = outcome
        self.state = ConnectionState.CLOSING
        self._stop_work()
        # A TLS transport only closes once no producer is registered with it.
        self.transport.unregisterProducer()
        self.close_transport()

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
                    self.transport.startTLS(self.runtime.server_tls.options)
                case Authenticate():
                    self._login_started = time.monotonic()
                    self._start_login(event)
                case Close():
                    self.close(self.outcome if self.outcome != "client_closed" else "closed")
                    return

    def _preauth_expired(self) -> None:
        self._timer = None
        self.outcome = "preauth_timeout"
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
            if not isinstance(exc, tuple(CLIENT_REASONS)):
                log.failure("session {session}: unexpected error during login",
                            **self._log_context)
            self._unavailable(leg, exc)
            return
        self._login = None
        if isinstance(outcome, LoginFailed):
            leg.close()
            self.outcome = "auth_failed"
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
            return config.destinations[config.routing.smtp_passthrough_destination]
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
        # An upstream proxy may lower the hop TTL, never raise it above ours.
        ttl = self.runtime.config.server.proxy_ttl
        if self.machine.proxy_ttl is not None:
            ttl = min(ttl, self.machine.proxy_ttl)
        ttl -= 1
        if ttl < 0:
            raise LoopDetected("proxy hop TTL exhausted (loop?)")
        return ClientInfo(peer=self.client, local=self.local, tls=self.tls,
                          session_id=self.id, ttl=ttl, helo=self.machine.client_helo)

    async def _with_timeout(self, d: Deferred[BackendEvent]) -> BackendEvent:
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
        self.outcome = "tempfail"
        self._back_to_preauth(self.machine.auth_unavailable(
            CLIENT_REASONS.get(type(error), "Temporary failure, try again later")))

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
        self.outcome = "client_closed"
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
        self.close("backend_closed")

    def _idle_check(self) -> None:
        limit = self.runtime.config.server.bridge_idle
        idle_for = self._clock.seconds() - self._last_activity
        if idle_for >= limit:
            self._timer = None
            self.close("idle")
        else:
            self._timer = self._clock.callLater(limit - idle_for, self._idle_check)
