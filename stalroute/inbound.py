"""What every listener does before its protocol starts (SPEC §3 steps 1–2, §9, §2.12).

Take a connection slot (``max_connections``), read a trusted peer's PROXY header (``off``,
``optional``, ``required``, ``deferred``, within ``proxy_header_timeout``), then apply bans and
``max_connections_per_ip`` to the *real* client address. Every path that ends the connection
releases what it took. The mail session pipeline and the HTTP listener both build on this.
"""

from __future__ import annotations

import enum

from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Factory, Protocol

from stalroute.config import ListenerConfig, ip_in_networks
from stalroute.limits import PerIPCounter
from stalroute.proxyproto import NotAProxyHeader, ProxyHeaderError, ProxyHeaderParser


#: How long a closing connection may take to flush before it is aborted.
CLOSE_GRACE = 5.0


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


class ListenerFactory(Factory):
    """Connections of one listener: its slots, per-IP counts and probe count."""

    noisy = False

    def __init__(self, reactor, runtime, listener_name: str) -> None:
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
    """Admission of one client connection; subclasses start their protocol in :meth:`start`.

    Attributes a subclass sets in ``__init__``: ``factory``, ``runtime``, ``listener``.
    """

    #: HTTP clients speak first: ``deferred`` then reads the header like ``optional``, and a
    #: trusted peer that sends nothing before the header timeout is refused.
    client_speaks_first = False

    factory: ListenerFactory
    id: str
    account: str | None = None
    destination: str | None = None
    bytes_in = 0
    bytes_out = 0
    state = ConnectionState.NEW
    outcome = "client_closed"
    _timer: IDelayedCall | None = None
    _abort_timer: IDelayedCall | None = None
    _has_slot = False
    _counted_ip: str | None = None
    _proxy_header: ProxyHeaderParser | None = None

    @property
    def _clock(self):
        return self.factory.reactor

    def connectionMade(self) -> None:
        peer, local = self.transport.getPeer(), self.transport.getHost()
        self.client = (peer.host, peer.port)
        self.local = (local.host, local.port)
        self.started = self._clock.seconds()
        if not self.factory.take_slot(self.listener):
            self._refuse("rejected")
            return
        self._has_slot = True
        self.runtime.registry.add(self)
        mode = self.listener.proxy_protocol
        trusted = mode != "off" and ip_in_networks(peer.host, self.listener.proxy_trusted)
        if mode == "required" and not trusted:
            self._refuse("untrusted_proxy")
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

    def close(self, outcome: str) -> None:
        """End the connection (kick, shutdown): flush what was written, then close."""
        raise NotImplementedError

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
            self._refuse("banned")
            return False
        limit = self.listener.max_connections_per_ip
        if limit and not (ip_in_networks(ip, self.listener.proxy_trusted)
                          or ip_in_networks(ip, self.runtime.config.security.allowed_ips)):
            if not self.factory.per_ip.take(ip, limit):
                self._refuse("per_ip_limit")
                return False
            self._counted_ip = ip
        return True

    def _refuse(self, outcome: str) -> None:
        self.outcome = outcome
        self.state = ConnectionState.CLOSING
        self.transport.abortConnection()

    def _proxy_header_expired(self) -> None:
        """``required`` (or a client-first protocol): close. ``optional``: a trusted peer that
        sent nothing is served with its socket address (a server-first client would otherwise
        wait forever)."""
        if self.listener.proxy_protocol == "required" or self.client_speaks_first:
            self._refuse("proxy_header_timeout")
        else:
            self._proxy_header = None
            self._admit()

    def take_proxy_header(self, data: bytes) -> bytes | None:
        """Feed an expected PROXY header: the bytes that follow it, for the protocol, or None
        while it is incomplete (or when the connection was refused or admitted with them)."""
        waiting = self.state is ConnectionState.PROXY_HEADER
        try:
            header = self._proxy_header.feed(data)
        except NotAProxyHeader as exc:
            if self.listener.proxy_protocol == "required":
                self._refuse("proxy_header_missing")
                return None
            header, rest = None, exc.data
        except ProxyHeaderError:
            self._refuse("proxy_header_invalid")
            return None
        else:
            if header is None:
                return None
            rest = self._proxy_header.rest
            if header.source is not None:
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

    def close_transport(self) -> None:
        """Flush and close the client connection, aborting it if it is still open after
        :data:`CLOSE_GRACE` (a peer that never answers a TLS close_notify, or never reads)."""
        self.transport.loseConnection()
        self._abort_timer = self._clock.callLater(CLOSE_GRACE, self.transport.abortConnection)

    def release(self) -> bool:
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
