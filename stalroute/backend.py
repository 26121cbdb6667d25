"""The backend leg (SPEC §3 step 6–7, §6), shared by every protocol.

``BackendConnector.open`` resolves the destination, connects (from ``source_ips``, with
retries for connect-class errors), sends the PROXY header, starts TLS, and drives the
protocol's :class:`~stalroute.protocols.base.BackendDialogue` until the backend is ready for
the login.  ``BackendLeg.login`` then replays the login.  After a successful login the leg is
attached to the client session and only relays bytes.
"""

from __future__ import annotations

import ipaddress
import itertools
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from twisted.internet import defer
from twisted.internet import error as neterror
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IDelayedCall, IHandshakeListener, IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from zope.interface import implementer

from stalroute import proxyproto
from stalroute.circuit import CircuitBreaker
from stalroute.closing import close_with_grace
from stalroute.config import PASSTHROUGH_PROTOCOLS, Config, DestinationConfig
from stalroute.protocols.base import (
    BackendDialogue, BackendError, BackendEvent, BackendReady, BackendSend, BackendSettings,
    BackendStartTLS, ForwardingInfo, LoginFailed, LoginSucceeded,
)
from stalroute.sasl import Credentials
from stalroute.tls import ResumingClientTLS, TLSDetails, backend_tls, tls_connection
from stalroute.tls_layer import start_tls
from stalroute.transport import IConnectingReactor, StreamTransport, no_delay

RETRY_DELAY = 0.2

#: Failures worth another attempt: nothing reached the backend yet.
_RETRYABLE = (neterror.ConnectionRefusedError, neterror.TCPTimedOutError,
              neterror.NoRouteError, neterror.TimeoutError)


class BackendUnavailable(Exception):
    """No usable leg to the destination: the client gets a temporary failure.

    ``connect_stage`` says whether TCP never came up, which the circuit breaker counts
    differently from later failures (TLS, greeting, early close).
    """

    def __init__(self, reason: str, *, connect_stage: bool = False) -> None:
        super().__init__(reason)
        self.connect_stage = connect_stage


class CircuitOpen(BackendUnavailable):
    """The destination is marked down: no leg is tried until its cooldown has passed."""


class BackendTimeout(BackendUnavailable):
    """The leg was not ready within ``backend_timeout``."""


@dataclass(frozen=True)
class ClientInfo:
    """The client side of a session, as backends must learn it."""

    peer: tuple[str, int]
    local: tuple[str, int]
    tls: TLSDetails | None
    session_id: str
    ttl: int
    helo: str | None = None  # SMTP: the name the client greeted with


def proxy_header(version: int, client: ClientInfo) -> bytes:
    """The PROXY header announcing ``client``; v2 carries the TLS and session TLVs."""
    if version == 1:
        return proxyproto.encode_v1(client.peer, client.local)
    tlvs = [(proxyproto.PP2_TYPE_UNIQUE_ID, client.session_id.encode())]
    if client.tls is not None:
        tlvs.append((proxyproto.PP2_TYPE_SSL,
                     proxyproto.ssl_tlv(client.tls.version, client.tls.cipher)))
        if client.tls.server_name:
            tlvs.append((proxyproto.PP2_TYPE_AUTHORITY, client.tls.server_name.encode()))
    return proxyproto.encode_v2(client.peer, client.local, tlvs)


def forwarding_info(client: ClientInfo) -> ForwardingInfo:
    """What XCLIENT / IMAP ID announce about ``client``."""
    return ForwardingInfo(client_ip=client.peer[0], client_port=client.peer[1],
                          local_ip=client.local[0], local_port=client.local[1],
                          session_id=client.session_id, ttl=client.ttl,
                          client_tls=client.tls is not None)


@implementer(IHandshakeListener)
class BackendLeg(Protocol):
    """One connection to a backend: the dialogue first, then a relay for a client session."""

    #: Twisted declares an optional ``ITransport``; connected, it is a TCP transport.
    transport: StreamTransport  # type: ignore[assignment]

    def __init__(self, clock: IReactorTime, dialogue: BackendDialogue, tls_mode: str,
                 preamble: bytes, tls: ResumingClientTLS | None) -> None:
        self._clock = clock
        self.dialogue = dialogue
        self._tls_mode = tls_mode
        self._preamble = preamble
        self._tls = tls
        self._starttls_pending = False
        #: Fires with the leg when the backend is ready for the login (kept once fired, so
        #: a client-first leg that is ready at once can still be awaited).
        self._established: Deferred[BackendLeg] = Deferred(canceller=self._abort)
        #: The Deferred the current phase (establishment, then login) settles.
        self._waiting: Deferred | None = self._established
        self._relay_to: Callable[[bytes], None] | None = None
        self._on_lost: Callable[[], None] | None = None
        self._lost = False
        self._abort_timer: IDelayedCall | None = None

    # establishment and login --------------------------------------------------------

    def ready(self) -> Deferred[BackendLeg]:
        return self._established

    def login(self, credentials: Credentials | None,
              context: object) -> Deferred[LoginSucceeded | LoginFailed]:
        """Replay the login; fires with :class:`LoginSucceeded` or :class:`LoginFailed`."""
        self._waiting = Deferred(canceller=self._abort)
        waiting = self._waiting
        self._handle(self.dialogue.login(credentials, context))
        return waiting

    def _abort(self, _d: Deferred) -> None:
        """Canceller of the phase's Deferred (a timeout, or the client left): the Deferred
        is settled by the cancellation, so connection loss must not settle it again."""
        self._waiting = None
        if self.transport is not None and not self._lost:
            self.transport.abortConnection()

    def connectionMade(self) -> None:
        no_delay(self.transport)
        if self._preamble:
            self.transport.write(self._preamble)
        if self._tls_mode == "implicit":
            start_tls(self.transport, self._tls)
        else:
            self._handle(self.dialogue.connected())

    def handshakeCompleted(self) -> None:
        if self._starttls_pending:
            self._starttls_pending = False
            self._handle(self.dialogue.tls_started())
        elif self._tls_mode == "implicit":
            self._handle(self.dialogue.connected())

    def dataReceived(self, data: bytes) -> None:
        if self._relay_to is not None:
            self._relay_to(data)
        else:
            self._handle(self.dialogue.receive(data))

    def _handle(self, events: list[BackendEvent]) -> None:
        for event in events:
            if isinstance(event, BackendSend):
                self.transport.write(event.data)
            elif isinstance(event, BackendStartTLS):
                self._starttls_pending = True
                start_tls(self.transport, self._tls)
            elif isinstance(event, BackendReady):
                connection = tls_connection(self.transport)
                if self._tls is not None and connection is not None:
                    self._tls.remember(connection)
                self._settle(self)
            elif isinstance(event, (LoginSucceeded, LoginFailed)):
                self._settle(event)
            elif isinstance(event, BackendError):
                self._settle(Failure(BackendUnavailable(event.reason)))
                self.transport.abortConnection()
                return

    def _settle(self, result: object) -> None:
        waiting, self._waiting = self._waiting, None
        if waiting is None or waiting.called:
            return
        if isinstance(result, Failure):
            waiting.errback(result)
        else:
            waiting.callback(result)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lost = True
        if self._abort_timer is not None and self._abort_timer.active():
            self._abort_timer.cancel()
        self._abort_timer = None
        if self._waiting is not None:
            self._settle(Failure(BackendUnavailable(
                f"backend closed the connection ({reason.getErrorMessage()})")))
        on_lost, self._on_lost = self._on_lost, None
        if on_lost is not None:
            on_lost()

    # relay ---------------------------------------------------------------------------

    def attach(self, relay_to: Callable[[bytes], None], on_lost: Callable[[], None]) -> None:
        """Hand the leg to a client session: backend bytes go to ``relay_to`` from now on."""
        self._relay_to = relay_to
        leftover = self.dialogue.leftover
        if leftover:
            relay_to(leftover)
        if self._lost:
            on_lost()
        else:
            self._on_lost = on_lost

    def close(self) -> None:
        """Close without telling the session (it asked); abort a backend that does not
        finish closing within :data:`~stalroute.closing.CLOSE_GRACE`."""
        self._on_lost = None
        if self.transport is None or self._lost or self._abort_timer is not None:
            return
        if self._relay_to is not None:  # the client side is registered as our producer
            self.transport.unregisterProducer()  # and TLS waits for it before closing
        self._abort_timer = close_with_grace(self.transport, self._clock)


@dataclass
class _Progress:
    """How far one establishment got, for the circuit breaker when it times out."""

    connected: bool = False


class _OneLeg(Factory):
    """Connects one prepared leg (quietly: one factory per connection would log twice).

    It lets go of the leg once built: Twisted's connector and its client transport refer to
    each other until the collector's next full pass, and the leg must not wait with them."""

    noisy = False

    def __init__(self, leg: BackendLeg) -> None:
        self._leg: BackendLeg | None = leg

    def buildProtocol(self, addr) -> BackendLeg | None:
        leg, self._leg = self._leg, None
        return leg


class BackendConnector:
    """Opens backend legs for one configuration (TLS settings and source rotation per destination)."""

    def __init__(self, reactor: IConnectingReactor, config: Config) -> None:
        self._reactor = reactor
        self._config = config
        tls = {name: backend_tls(dest) for name, dest in config.destinations.items()
               if any(leg.tls != "plain" for leg in dest.protocols.values())}
        #: The client TLS of each destination's TLS ports (each resumes its own sessions).
        self._tls = {(name, leg.port): ResumingClientTLS(tls[name])
                     for name, dest in config.destinations.items()
                     for leg in dest.protocols.values() if leg.tls != "plain"}
        self._sources: dict[tuple[str, int], Iterator[str]] = {}
        server = config.server
        self.breakers = {name: CircuitBreaker(reactor, server.host_down_threshold,
                                              server.host_down_min_clients,
                                              server.host_down_cooldown)
                         for name in config.destinations}
        self._own = {(ipaddress.ip_address(host), port)
                     for listener in config.listeners.values() for host, port in listener.bind}

    async def open(self, destination: DestinationConfig, protocol: str,
                   make_dialogue: Callable[[BackendSettings], BackendDialogue],
                   client: ClientInfo) -> BackendLeg:
        """A leg ready for the login, within ``backend_timeout``."""
        leg_config = destination.protocols.get(protocol)
        if leg_config is None:
            raise BackendUnavailable(f"destination {destination.name} does not serve {protocol}")
        if (leg_config.tls == "plain" and not destination.allow_plaintext_auth
                and protocol not in PASSTHROUGH_PROTOCOLS):  # no credentials cross those
            raise BackendUnavailable(f"destination {destination.name}: cleartext {protocol} leg "
                                     "refused (allow_plaintext_auth is off)")
        forwarding = destination.forwarding_for(protocol)
        dialogue = make_dialogue(BackendSettings(
            tls_mode=leg_config.tls,
            forwarding=forwarding_info(client) if forwarding == "xclient" else None,
            hide_auth_errors=destination.hide_auth_errors,
            ehlo_name=client.helo or self._config.server.hostname))
        preamble = b""
        if forwarding == "proxy":
            preamble = proxy_header(destination.proxy_protocol_version, client)
        breaker = self.breakers[destination.name]
        if not breaker.allow():
            raise CircuitOpen(f"destination {destination.name} is marked down (circuit open)",
                              connect_stage=True)
        progress = _Progress()
        d = Deferred.fromCoroutine(self._establish(destination, leg_config, dialogue, preamble,
                                                   progress))
        d.addTimeout(self._config.server.backend_timeout, self._reactor)
        try:
            leg = await d
        except defer.TimeoutError as exc:
            breaker.failed(client.peer[0], connect_stage=not progress.connected)
            stage = "after connecting" if progress.connected else "connecting"
            raise BackendTimeout(f"destination {destination.name}: timed out {stage}",
                                 connect_stage=not progress.connected) from exc
        except BackendUnavailable as exc:
            breaker.failed(client.peer[0], connect_stage=exc.connect_stage)
            raise
        except Exception:  # cancelled (the client left), or a bug: nothing learnt
            breaker.abandoned()
            raise
        breaker.succeeded()
        return leg

    async def _establish(self, destination: DestinationConfig, leg_config,
                         dialogue: BackendDialogue, preamble: bytes,
                         progress: _Progress) -> BackendLeg:
        """Connect (with retries) and run the dialogue up to ready. A cancellation (the
        timeout, or the client left) propagates as CancelledError and aborts the leg."""
        addresses = await self._resolve(destination.host, leg_config.port)
        attempts = 1 + self._config.server.backend_connect_retries
        for attempt in range(attempts):
            address = addresses[attempt % len(addresses)]
            leg = BackendLeg(self._reactor, dialogue, leg_config.tls, preamble,
                             self._tls.get((destination.name, leg_config.port)))
            try:
                await self._endpoint(destination, address, leg_config.port).connect(_OneLeg(leg))
            except _RETRYABLE as exc:
                if attempt + 1 == attempts:
                    raise BackendUnavailable(f"destination {destination.name}: "
                                             f"{exc.__class__.__name__}", connect_stage=True) from exc
                await deferLater(self._reactor, RETRY_DELAY)
                continue
            except neterror.ConnectingCancelledError as exc:
                raise CancelledError() from exc
            except neterror.ConnectError as exc:
                raise BackendUnavailable(f"destination {destination.name}: {exc}",
                                         connect_stage=True) from exc
            progress.connected = True
            return await leg.ready()
        raise AssertionError("unreachable")

    async def _resolve(self, host: str, port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        """The addresses of ``host`` (resolved at every connect), minus our own listeners."""
        try:
            addresses = [ipaddress.ip_address(host)]
        except ValueError:
            try:
                infos = await deferToThread(socket.getaddrinfo, host, port,
                                            type=socket.SOCK_STREAM)
            except OSError as exc:
                raise BackendUnavailable(f"cannot resolve {host}: {exc}") from exc
            addresses = list(dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in infos))
        usable = [address for address in addresses if not self._is_own(address, port)]
        if not usable:
            raise BackendUnavailable(f"{host}:{port} is one of stalroute's own listeners (loop)")
        return usable

    def _is_own(self, address, port: int) -> bool:
        return any(port == own_port and (own == address or (own.is_unspecified
                   and own.version == address.version and address.is_loopback))
                   for own, own_port in self._own)

    def _endpoint(self, destination: DestinationConfig, address, port: int):
        family = address.version
        sources = [ip for ip in destination.source_ips if ip.version == family]
        bind = None
        if sources:
            rotation = self._sources.setdefault((destination.name, family),
                                                itertools.cycle([str(ip) for ip in sources]))
            bind = (next(rotation), 0)
        endpoint_class = TCP4ClientEndpoint if family == 4 else TCP6ClientEndpoint
        return endpoint_class(self._reactor, str(address), port,
                              timeout=max(1, int(self._config.server.backend_timeout)),
                              bindAddress=bind)

