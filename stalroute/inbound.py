"""The life of every client connection, mail session or HTTP (SPEC §3 steps 1–2, §9, §2.12).

Admission: take a connection slot (``max_connections``), read a trusted peer's PROXY header
(``off``, ``optional``, ``required``, ``deferred``, within ``proxy_header_timeout``), then apply
bans and ``max_connections_per_ip`` to the *real* client address. Then the protocol runs
(:meth:`InboundConnection.start`) under a session id, telling backends about the client through
:meth:`~InboundConnection.client_info`. The end: :meth:`~InboundConnection.close` flushes and
closes (aborting after :data:`~stalroute.closing.CLOSE_GRACE`), and ``connectionLost`` gives
back what admission took, exactly once, then counts and logs the session (or the probe).
"""

from __future__ import annotations

import enum
import secrets
from typing import TypedDict

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure

from stalroute.backend import ClientInfo
from stalroute.closing import close_with_grace
from stalroute.config import ListenerConfig
from stalroute.identity import redact
from stalroute.limits import PerIPCounter
from stalroute.logs import logger
from stalroute.net import ip_in_networks
from stalroute.outcomes import PROBE_OUTCOMES, Outcome
from stalroute.proxyproto import NotAProxyHeader, ProxyHeaderError, ProxyHeaderParser
from stalroute.runtime import Runtime
from stalroute.tls import TLSDetails, is_acme_validation
from stalroute.transport import StreamTransport, no_delay

#: The end lines of every client connection, mail session or HTTP.
log = logger("stalroute.session")


class LoopDetected(Exception):
    """The hop TTL announced by an upstream proxy is exhausted."""


class LogContext(TypedDict):
    """The fields of a connection every log line about it carries."""

    session: str
    listener: str
    protocol: str
    account: str  # redacted


class ConnectionState(enum.Enum):
    """Where a client connection is in its life; mail sessions and HTTP share the ends."""

    NEW = "new"
    PROXY_HEADER = "proxy_header"
    PREAUTH = "preauth"  # mail: the protocol's pre-auth dialogue
    ROUTING = "routing"  # mail: a login is being routed and replayed
    HTTP = "http"  # HTTP: requests routed one by one
    SPLICED = "spliced"  # bytes relayed both ways (mail after login, HTTP WebSocket tunnels)
    CLOSING = "closing"  # close requested: input is dropped, output flushes
    CLOSED = "closed"  # connectionLost ran


class ListenerFactory(Factory["InboundConnection"]):
    """Connections of one listener: its slots, per-IP counts and probe count."""

    noisy = False

    def __init__(self, reactor: IReactorTime, runtime: Runtime, listener_name: str) -> None:
        self.reactor = reactor
        #: Replaced by a config reload; live connections keep the runtime they started with.
        self.runtime = runtime
        #: The listener's settings: a reload replaces them, except for a listener the new
        #: configuration removes or renames, which keeps serving its port with these until a
        #: restart (see ``service.listener_after_reload``).
        self.listener: ListenerConfig = runtime.config.listeners[listener_name]
        self.active = 0
        self.rejected = 0
        self.probes = 0
        self.per_ip = PerIPCounter()

    def take_slot(self, listener: ListenerConfig) -> bool:
        if self.active >= listener.max_connections:
            self.rejected += 1
            return False
        self.active += 1
        return True

    def release_slot(self) -> None:
        self.active -= 1


class InboundConnection(Protocol):
    """One client connection from accept to its end, whatever its protocol.

    Subclasses begin their protocol in :meth:`start`, stop what runs on their behalf in
    :meth:`_stop_work`, and may settle what is still open when the connection is lost in
    :meth:`_connection_ended`. ``_timer`` is theirs to use once started (it is cancelled at
    the end); set ``_client_spoke`` when the client sends a protocol byte (so it is no probe).
    """

    #: HTTP clients speak first: ``deferred`` then reads the header like ``optional``, and a
    #: trusted peer that sends nothing before the header timeout is refused.
    client_speaks_first = False
    #: HTTP counts and logs each request (metrics, an ``info`` line), so the end of its
    #: connection is only logged, at ``debug`` level.
    accounted_per_request = False
    #: Twisted declares an optional ``ITransport``; connected, it is a TCP transport.
    transport: StreamTransport  # type: ignore[assignment]

    def __init__(self, factory: ListenerFactory) -> None:
        self.factory = factory
        #: The runtime the connection started with: a reload does not change it.
        self.runtime: Runtime = factory.runtime
        self.listener: ListenerConfig = factory.listener
        self.id = f"{self.runtime.config.cluster.node_id}-{secrets.token_hex(6)}"
        #: The client's and our address: the socket's, or those a PROXY header names.
        self.client = self.local = ("", 0)
        self.started = 0.0
        self.tls: TLSDetails | None = None
        self.account: str | None = None
        self.destination: str | None = None
        self.bytes_in = self.bytes_out = 0
        self.state = ConnectionState.NEW
        #: How it ended, once known; None until then (``connectionLost`` resolves it). A plain
        #: string only when a caller closed it with one that names no :class:`Outcome` (HTTP
        #: and its tests still pass strings; see :meth:`close`).
        self.outcome: Outcome | None = None
        self._client_spoke = False
        self._timer: IDelayedCall | None = None
        self._abort_timer: IDelayedCall | None = None
        self._has_slot = False
        self._counted_ip: str | None = None
        self._proxy_header: ProxyHeaderParser | None = None

    @property
    def _clock(self) -> IReactorTime:
        return self.factory.reactor

    @property
    def _log_context(self) -> LogContext:
        """The fields every log line of this connection carries (JSON logs show them)."""
        return {"session": self.id, "listener": self.listener.name,
                "protocol": self.listener.protocol,
                "account": redact(self.account) if self.account else "-"}

    def connectionMade(self) -> None:
        peer, local = self.transport.getPeer(), self.transport.getHost()
        self.client = (peer.host, peer.port)
        self.local = (local.host, local.port)
        self.started = self._clock.seconds()
        no_delay(self.transport)
        if not self.factory.take_slot(self.listener):
            self._refuse(Outcome.REJECTED)
            return
        self._has_slot = True
        self.runtime.registry.add(self)
        mode = self.listener.proxy_protocol
        trusted = mode != "off" and ip_in_networks(peer.host, self.listener.proxy_trusted)
        if mode == "required" and not trusted:
            self._refuse(Outcome.UNTRUSTED_PROXY)
        elif trusted and (mode != "deferred" or self.listener.tls == "implicit"
                          or self.client_speaks_first):
            # Nothing (greeting, TLS) may happen before the header names the client.
            self.state = ConnectionState.PROXY_HEADER
            self._proxy_header = ProxyHeaderParser()
            self._timer = self._clock.callLater(self.listener.proxy_header_timeout,
                                                self._proxy_header_expired)
        else:
            if trusted:  # deferred: the header comes with the client's first bytes
                self._proxy_header = ProxyHeaderParser()
            self._admit()

    def start(self) -> None:
        """The connection is admitted and the client's address known: begin the protocol."""
        raise NotImplementedError

    @property
    def routed(self) -> bool:
        """Relaying for an account or destination: listed by ``GET /connections``, reached
        by kicks."""
        return False

    @property
    def may_route(self) -> bool:
        """May still route a login or request through its runtime's router (a reload keeps
        the replaced runtime's store open until no connection may)."""
        return self.state not in (ConnectionState.SPLICED, ConnectionState.CLOSING,
                                  ConnectionState.CLOSED)

    def client_info(self, upstream_ttl: int | None = None,
                    helo: str | None = None) -> ClientInfo:
        """The client as a backend learns it (PROXY header, XCLIENT, IMAP ID). The hop TTL is
        ours, or an upstream proxy's if lower, minus this hop; raises :class:`LoopDetected`
        once it is exhausted. ``helo``: the name an SMTP client greeted with."""
        ttl = self.runtime.config.server.proxy_ttl
        if upstream_ttl is not None:
            ttl = min(ttl, upstream_ttl)
        ttl -= 1
        if ttl < 0:
            raise LoopDetected("proxy hop TTL exhausted (loop?)")
        return ClientInfo(peer=self.client, local=self.local, tls=self.tls,
                          session_id=self.id, ttl=ttl, helo=helo)

    def close(self, outcome: Outcome) -> None:
        """End the connection (kick, backend gone, idle, shutdown): stop the work done on its
        behalf, flush what was written, then close, aborting a peer that does not finish
        within :data:`~stalroute.closing.CLOSE_GRACE` (no TLS close_notify, never reads)."""
        if self.state in (ConnectionState.CLOSING, ConnectionState.CLOSED):
            return
        started = self.state not in (ConnectionState.NEW, ConnectionState.PROXY_HEADER)
        self.outcome = outcome
        self.state = ConnectionState.CLOSING
        self._stop_work()
        if started:  # start() registered a producer; TLS only closes once none is registered
            self.transport.unregisterProducer()
        self._abort_timer = close_with_grace(self.transport, self._clock)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """The one end of every connection: give back what admission took and stop the work
        done on its behalf, then count and log the session (once, and only if it was
        admitted)."""
        relaying = self.state is ConnectionState.SPLICED
        released = self._release()
        self._stop_work()
        if not released:
            return
        if self.outcome is None:  # nothing ended it: the client did
            broke = relaying and not reason.check(ConnectionDone)
            self.outcome = Outcome.CLIENT_ERROR if broke else Outcome.CLIENT_CLOSED
        self._connection_ended(reason)
        probe = not (self._client_spoke or self.bytes_in) and self.outcome in PROBE_OUTCOMES
        outcome = str(Outcome.PROBE if probe else self.outcome)
        if probe:
            self.factory.probes += 1
        if not self.accounted_per_request:
            self.runtime.metrics.sessions[(self.listener.protocol, self.destination or "-",
                                           outcome)] += 1
        fields = self._end_fields()
        (log.debug if probe or self.accounted_per_request else log.info)(
            "session {session} {protocol} client={client} account={account} "
            "destination={destination} outcome={outcome} in={bytes_in} out={bytes_out} "
            "duration={duration:.3f}s" + "".join(f" {name}={{{name}}}" for name in fields),
            **self._log_context, **fields, client=f"{self.client[0]}:{self.client[1]}",
            destination=self.destination or "-", outcome=outcome, bytes_in=self.bytes_in,
            bytes_out=self.bytes_out, duration=self._clock.seconds() - self.started)

    def _stop_work(self) -> None:
        """Cancel what runs on the connection's behalf (a login or request in flight, its
        timer, backend connections); called by :meth:`close` and on connection loss."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _connection_ended(self, reason: Failure) -> None:
        """The connection is lost and released: settle what the protocol still has open,
        before the session is counted."""

    def _end_fields(self) -> dict[str, object]:
        """What the protocol adds to the session's end line."""
        return {}

    def _admit(self) -> bool:
        """Bans and the per-IP limit, then :meth:`start`; False when refused."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if not self._client_allowed():
            return False
        self.start()
        return True

    def _client_allowed(self) -> bool:
        """Bans and the per-IP limit for the current client address (again when a deferred
        header names the real client); refuses the connection and returns False if not."""
        if self._counted_ip is not None:
            self.factory.per_ip.release(self._counted_ip)
            self._counted_ip = None
        ip = self.client[0]
        if self.runtime.bans.is_banned(ip):
            self._refuse(Outcome.BANNED)
            return False
        limit = self.listener.max_connections_per_ip
        if limit and not (ip_in_networks(ip, self.listener.proxy_trusted)
                          or ip_in_networks(ip, self.runtime.config.security.allowed_ips)):
            if not self.factory.per_ip.take(ip, limit):
                self._refuse(Outcome.PER_IP_LIMIT)
                return False
            self._counted_ip = ip
        return True

    def end_acme_validation(self) -> bool:
        """Call first thing when the TLS handshake completes: True (and the connection is
        closing) when it was an ACME tls-alpn-01 validation, answered by the handshake itself
        and to be closed without a word of the protocol (RFC 8737 §3)."""
        if not is_acme_validation(self.transport):
            return False
        self._stop_work()
        self._refuse(Outcome.ACME_VALIDATION)
        return True

    def _refuse(self, outcome: Outcome) -> None:
        self.outcome = outcome
        self.state = ConnectionState.CLOSING
        self.transport.abortConnection()

    def _proxy_header_expired(self) -> None:
        """``required`` (or a client-first protocol): close. ``optional``: a trusted peer that
        sent nothing is served with its socket address (a server-first client would otherwise
        wait forever)."""
        if self.listener.proxy_protocol == "required" or self.client_speaks_first:
            self._refuse(Outcome.PROXY_HEADER_TIMEOUT)
        else:
            self._proxy_header = None
            self._admit()

    def take_proxy_header(self, data: bytes) -> bytes | None:
        """The bytes for the protocol: ``data`` when no PROXY header is expected; else what
        follows the header, or None while it is incomplete (or when the connection was refused
        or admitted with them)."""
        parser = self._proxy_header
        if parser is None:
            return data
        waiting = self.state is ConnectionState.PROXY_HEADER
        try:
            header = parser.feed(data)
        except NotAProxyHeader as exc:
            if self.listener.proxy_protocol == "required":
                self._refuse(Outcome.PROXY_HEADER_MISSING)
                return None
            header, rest = None, exc.data
        except ProxyHeaderError:
            self._refuse(Outcome.PROXY_HEADER_INVALID)
            return None
        else:
            if header is None:
                return None
            rest = parser.rest
            if header.source is not None and header.destination is not None:
                self.client, self.local = header.source, header.destination
        self._proxy_header = None
        if not waiting and header is not None and header.source is not None:
            return rest if self._client_allowed() else None  # deferred: the real client now
        if waiting:
            if not self._admit():
                return None
            if rest and self.listener.tls == "implicit":
                # Bytes that came with the header (a ClientHello) belong to the TLS layer.
                self.transport.protocol.dataReceived(rest)
                return None
        return rest

    def _release(self) -> bool:
        """On connection loss: cancel this connection's timers and give back what admission
        took (slot, per-IP count, registry entry) exactly once; False if it took nothing."""
        self.state = ConnectionState.CLOSED
        for timer in (self._timer, self._abort_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._timer = self._abort_timer = None
        if not self._has_slot:
            return False
        self._has_slot = False
        self.factory.release_slot()
        if self._counted_ip is not None:
            self.factory.per_ip.release(self._counted_ip)
        self.runtime.registry.discard(self)
        return True
