"""What a configuration needs at run time (:class:`Runtime`), built by :func:`build_runtime`.

Every listener factory, session and admin operation reads the *current* runtime; a reload
builds a complete new one (or refuses with a :class:`StartupError` naming the key or file)
before anything is swapped. The session registry, bans, login delays, metrics and learnt
capabilities are handed from one runtime to the next, so they outlive reloads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import NoReturn, Protocol

from OpenSSL import SSL
from twisted.internet.error import CannotListenError

from stalroute.backend import BackendConnector
from stalroute.capabilities import DestinationCapabilities
from stalroute.config import Config, ListenerConfig
from stalroute.limits import BanList, LoginDelays
from stalroute.logs import logger
from stalroute.mapping import UnsupportedStore
from stalroute.mapping.cache import RoutingCache
from stalroute.mapping.factory import build_store
from stalroute.mapping.file import MappingFileError
from stalroute.outcomes import Outcome
from stalroute.router import Router
from stalroute.stats import Metrics
from stalroute.tls import ServerTLS
from stalroute.transport import IConnectingReactor

#: Startup refusals are logged under the namespace they always had.
log = logger("stalroute.service")


class StartupError(Exception):
    """The configuration is valid but cannot run: the message names the key or file."""


class UnsupportedSetting(StartupError):
    """A valid setting this version cannot run yet (named by its key)."""


def bind_refused(key: str, host: str, port: int, error: CannotListenError) -> StartupError:
    """``listener.imaps: cannot bind 0.0.0.0:993: address already in use``."""
    reason = error.socketError
    errno = getattr(reason, "errno", None)
    text = os.strerror(errno).lower() if errno else str(reason)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return StartupError(f"{key}: cannot bind {address}: {text}")


def refuse_to_start(problem: StartupError) -> NoReturn:
    """Stop startup with one log line naming the key and address, and exit status 1 (twistd
    would print a traceback for an exception)."""
    log.critical("{problem}", problem=str(problem))
    raise SystemExit(1) from None


class RegisteredConnection(Protocol):
    """What the drain, kicks and listings ask of an open client connection (mail session or
    HTTP connection, see :class:`stalroute.inbound.InboundConnection`)."""

    id: str
    listener: ListenerConfig
    client: tuple[str, int]
    account: str | None
    destination: str | None
    bytes_in: int
    bytes_out: int
    started: float
    runtime: Runtime

    @property
    def routed(self) -> bool:
        """Relaying for an account or destination."""

    @property
    def may_route(self) -> bool:
        """May still route a login or request through its runtime."""

    def close(self, outcome: Outcome) -> None:
        """Flush what was written, then close."""


@dataclass
class SessionRegistry:
    """Every open client connection (for drain), and the routed ones (for kicks and
    listings). It outlives config reloads."""

    sessions: dict[str, RegisteredConnection] = field(default_factory=dict)
    #: Set once a shutdown drain begins (readiness turns false at once).
    draining: bool = False
    #: Set while another live process with this ``node_id`` started before this one (kept by
    #: the fleet's membership; readiness turns false).
    superseded: bool = False

    def add(self, session: RegisteredConnection) -> None:
        self.sessions[session.id] = session

    def discard(self, session: RegisteredConnection) -> None:
        self.sessions.pop(session.id, None)

    def routed(self) -> list[RegisteredConnection]:
        return [s for s in self.sessions.values() if s.routed]


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
    capabilities: DestinationCapabilities


def build_runtime(reactor: IConnectingReactor, config: Config,
                  previous: Runtime | None = None) -> Runtime:
    """Everything ``config`` needs at run time, on ``reactor`` (its clock, and the connections
    of backend legs).

    On a reload, ``previous`` hands over what must survive it: the live sessions, bans, login
    delays, metrics, the destinations' learnt capabilities and the circuit state of
    destinations that still exist. Raises :class:`StartupError` (naming the key or file)
    before anything binds or is swapped.
    """
    try:
        store = build_store(config.mapping, list(config.destinations))
    except MappingFileError as exc:
        raise StartupError(f"mapping.file.path: {exc}") from exc
    except UnsupportedStore as exc:
        raise UnsupportedSetting(str(exc)) from exc
    try:
        server_tls = ServerTLS(config.tls, config.server.hostname)
        connector = BackendConnector(reactor, config)
    except (OSError, ValueError, SSL.Error) as exc:
        raise StartupError(f"cannot load TLS material: {exc}") from exc
    cache = RoutingCache(reactor, config.mapping.positive_ttl, config.mapping.negative_ttl,
                         config.mapping.cache_max_entries, config.mapping.lookup_timeout)
    if previous is None:
        registry, metrics, capabilities = SessionRegistry(), Metrics(), DestinationCapabilities()
        bans, delays = BanList(reactor, config.security), LoginDelays(reactor)
    else:
        registry, bans, delays = previous.registry, previous.bans, previous.delays
        metrics, capabilities = previous.metrics, previous.capabilities
        bans.security = config.security
        cache.counters = previous.router.cache.counters  # hits and misses count across reloads
        cache.max_age = previous.router.cache.max_age  # the cluster bus may still be down
        for name in connector.breakers.keys() & previous.connector.breakers.keys():
            connector.breakers[name] = previous.connector.breakers[name]
    return Runtime(config=config, router=Router(config, store, cache, metrics),
                   connector=connector, server_tls=server_tls, registry=registry, bans=bans,
                   delays=delays, metrics=metrics, capabilities=capabilities)
