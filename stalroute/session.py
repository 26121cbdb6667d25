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

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from zope.interface import implementer

from stalroute.backend import BackendConnector, BackendLeg, BackendUnavailable, ClientInfo
from stalroute.config import Config, DestinationConfig, ListenerConfig
from stalroute.identity import (
    InvalidIdentifier, account_from_credentials, redact, routing_identifier,
)
from stalroute.inbound import InboundConnection, ListenerFactory
from stalroute.limits import BanList, LoginDelays
from stalroute.logs import logger
from stalroute.protocols.base import (
    Authenticate, Close, LoginFailed, LoginSucceeded, PreAuthSettings, ProtocolSpec, Reply,
    StartTLS,
)
from stalroute.router import Router, RoutingUnavailable
from stalroute.stats import Metrics
from stalroute.tls import ServerTLS, TLSDetails, tls_details

log = logger("stalroute.session")

#: How long a closing connection may take to flush before it is aborted.
CLOSE_GRACE = 5.0

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


@dataclass
class SessionRegistry:
    """Every open session (for drain), and the spliced ones (for kicks and listings).
    It outlives config reloads."""

    sessions: dict[str, ClientSession] = field(default_factory=dict)
    #: Set once a shutdown drain begins (readiness turns false at once).
    draining: bool = False

    def add(self, session: ClientSession) -> None:
        self.sessions[session.id] = session

    def discard(self, session: ClientSession) -> None:
        self.sessions.pop(session.id, None)

    def spliced(self) -> list[ClientSession]:
        return [s for s in self.sessions.values() if s.state == "spliced"]


def preauth_settings(config: Config, listener: ListenerConfig) -> PreAuthSettings:
    common = {"hostname": config.server.hostname, "tls_mode": listener.tls,
              "max_auth_attempts": listener.max_auth_attempts}
    capabilities = getattr(config.capabilities, listener.protocol, None)
    if capabilities is None:  # SMTP/LMTP pass-through: nothing to advertise
        return PreAuthSettings(**common, sasl=(), allow_plain_auth_without_tls=False, banner="")
    return PreAuthSettings(
        **common, sasl=tuple(capabilities.sasl),
        allow_plain_auth_without_tls=capabilities.allow_plain_auth_without_tls,
        banner=capabilities.banner,
        extra={"advertise": capabilities.advertise, "ehlo": capabilities.ehlo,
               "sieve": capabilities.sieve, "implementation": capabilities.implementation})


class SessionFactory(ListenerFactory):
    """Sessions of one interactive (or pass-through) listener."""

    def __init__(self, reactor, runtime: Runtime, listener_name: str,
                 spec: ProtocolSpec) -> None:
        super().__init__(reactor, runtime, listener_name)
        self.spec = spec

    def buildProtocol(self, addr) -> ClientSession:
        return ClientSession(self, self.runtime)


@implementer(IHandshakeListener)
class ClientSession(InboundConnection):
    """One client connection through pre-auth, routing, login replay and splice."""

    def __init__(self, factory: SessionFactory, runtime: Runtime) -> None:
        self.factory = factory
        self.runtime = runtime
        self.listener = runtime.config.listeners[factory.listener_name]
        self.spec = factory.spec
        self.id = f"{runtime.config.cluster.node_id}-{secrets.token_hex(6)}"
        self.state = "new"  # new → [proxy_header →] preauth ⇄ routing → spliced → closed
        self.account: str | None = None
        self.destination: str | None = None
        self.tls: TLSDetails | None = None
        self.bytes_in = self.bytes_out = 0
        self.leg: BackendLeg | None = None
        self._client_spoke = False
        self._starttls_pending = False
        self._timer = None
        self._last_activity = 0.0
        self._login_started = 0.0

    # connection ----------------------------------------------------------------------

    @property
    def _account_label(self) -> str:
        """The account as logs may show it (redacted)."""
        return redact(self.account) if self.account else "-"

    def start(self) -> None:
        self.state = "preauth"
        self.machine = self.spec.preauth(preauth_settings(self.runtime.config, self.listener))
        self._timer = self._clock.callLater(self.listener.preauth_timeout, self._preauth_expired)
        if self.listener.tls == "implicit":
            self.transport.startTLS(self.runtime.server_tls.options)
        self._run(self.machine.greeting())
        if self.spec.passthrough:
            self.state = "routing"
            Deferred.fromCoroutine(self._login(None))

    def handshakeCompleted(self) -> None:
        self.tls = tls_details(self.transport)
        if self._starttls_pending:
            self._starttls_pending = False
            self._run(self.machine.tls_started())

    def dataReceived(self, data: bytes) -> None:
        if self.state == "spliced":
            self.bytes_in += len(data)
            self._last_activity = self._clock.seconds()
            self.leg.transport.write(data)
            return
        if self._proxy_header is not None:
            data = self.take_proxy_header(data)
            if data is None:
                return
        if data and self.state in ("preauth", "routing"):
            self._client_spoke = True
            self._run(self.machine.receive(data))

    def connectionLost(self, reason: Failure = None) -> None:
        was_spliced = self.state == "spliced"
        self.state = "closed"
        if not self.release():
            return
        if self.leg is not None:
            self.leg.close()
        if was_spliced and self.outcome == "client_closed" and not reason.check(ConnectionDone):
            self.outcome = "client_error"
        probe = not self._client_spoke and self.outcome in PROBE_OUTCOMES
        if probe:
            self.factory.probes += 1
        self.runtime.metrics.sessions[(self.spec.name, self.destination or "-",
                                       "probe" if probe else self.outcome)] += 1
        (log.debug if probe else log.info)(
            "session {session} {protocol} client={client} account={account} "
            "destination={destination} outcome={outcome} in={bytes_in} out={bytes_out} "
            "duration={duration:.3f}s", session=self.id, protocol=self.spec.name,
            client=f"{self.client[0]}:{self.client[1]}", account=self._account_label,
            destination=self.destination or "-", outcome="probe" if probe else self.outcome,
            bytes_in=self.bytes_in, bytes_out=self.bytes_out,
            duration=self._clock.seconds() - self.started)

    def close(self, outcome: str) -> None:
        """End the session (and its backend leg); abort if the client does not drain."""
        if self.state == "closed":
            return
        self.outcome = outcome
        if self.leg is not None:
            self.leg.close()
        # A TLS transport only closes once no producer is registered with it.
        self.transport.unregisterProducer()
        self.transport.loseConnection()
        self._clock.callLater(CLOSE_GRACE, self._abort_if_open)

    def _abort_if_open(self) -> None:
        if self.state != "closed":
            self.transport.abortConnection()

    # pre-auth ------------------------------------------------------------------------

    def _run(self, events) -> None:
        for event in events:
            if self.state == "closed":
                return
            match event:
                case Reply(data=data):
                    self.transport.write(data)
                case StartTLS():
                    self._starttls_pending = True
                    self.transport.startTLS(self.runtime.server_tls.options)
                case Authenticate():
                    self.state = "routing"
                    self._login_started = time.monotonic()
                    Deferred.fromCoroutine(self._login(event))
                case Close():
                    self.close(self.outcome if self.outcome != "client_closed" else "closed")
                    return

    def _preauth_expired(self) -> None:
        self.outcome = "preauth_timeout"
        self._run(self.machine.timed_out())

    # routing, backend leg, replay ----------------------------------------------------

    async def _login(self, event: Authenticate | None) -> None:
        """Route, open the backend leg, replay the login (``event`` is None for pass-through)."""
        leg = None
        try:
            destination = await self._destination(event)
            self.destination = destination.name
            leg = await self.runtime.connector.open(
                destination, self.spec.name, self.spec.dialogue, self._client_info())
            if self.state == "closed":
                leg.close()
                return
            credentials, context = (event.credentials, event.context) if event else (None, None)
            outcome = await self._with_timeout(leg.login(credentials, context))
        except tuple(CLIENT_REASONS) as exc:
            self._unavailable(leg, exc)
            return
        except Exception as exc:
            log.failure("session {session}: unexpected error during login", session=self.id)
            self._unavailable(leg, exc)
            return
        if self.state == "closed":
            leg.close()
        elif isinstance(outcome, LoginFailed):
            leg.close()
            self.state = "preauth"
            self.outcome = "auth_failed"
            self.runtime.bans.login_refused(self.client[0])
            log.info("session {session}: login refused by {destination} for {account}",
                     session=self.id, destination=self.destination,
                     account=self._account_label)
            self._run(self.machine.auth_failed(outcome.reply))
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
        if self.account and (held := self.runtime.delays.remaining(self.account)):
            log.info("session {session}: holding the login of {account} for {held:.1f}s",
                     session=self.id, account=self._account_label, held=held)
            await deferLater(self._clock, held)
        return await self.runtime.router.resolve(self.account)

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

    async def _with_timeout(self, d: Deferred):
        d.addTimeout(self.runtime.config.server.backend_timeout, self._clock)
        try:
            return await d
        except defer.TimeoutError as exc:
            raise BackendUnavailable("backend login timed out") from exc

    def _unavailable(self, leg: BackendLeg | None, error: Exception) -> None:
        """A temporary failure: the detail goes to the log, the client gets a fixed text."""
        if leg is not None:
            leg.close()
        if self.state == "closed":
            return
        log.warn("session {session}: temporary failure for {account}: {reason}",
                 session=self.id, account=self._account_label, reason=str(error))
        self.state = "preauth"
        self.outcome = "tempfail"
        self._run(self.machine.auth_unavailable(
            CLIENT_REASONS.get(type(error), "Temporary failure, try again later")))

    # splice --------------------------------------------------------------------------

    def _splice(self, leg: BackendLeg, outcome: LoginSucceeded) -> None:
        self._timer.cancel()
        self.leg = leg
        self.state = "spliced"
        self.outcome = "client_closed"
        self.transport.write(outcome.reply)
        pipelined = self.machine.auth_succeeded()
        leg.attach(self._from_backend, self._backend_lost)
        if pipelined:
            self.bytes_in += len(pipelined)
            leg.transport.write(pipelined)
        self.transport.registerProducer(leg.transport, True)
        leg.transport.registerProducer(self.transport, True)
        self._last_activity = self._clock.seconds()
        self._timer = self._clock.callLater(self.runtime.config.server.bridge_idle,
                                            self._idle_check)
        log.info("session {session}: {account} spliced to {destination}", session=self.id,
                 account=self._account_label,
                 destination=self.destination)

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
            self.close("idle")
        else:
            self._timer = self._clock.callLater(limit - idle_for, self._idle_check)
