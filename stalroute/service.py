"""Builds the running proxy from a :class:`~stalroute.config.Config`."""

from __future__ import annotations

import os
import signal
import socket

from OpenSSL import SSL
from twisted.application import service
from twisted.internet import tcp
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import deferLater

from stalroute.backend import BackendConnector
from stalroute.capabilities import DestinationCapabilities
from stalroute.config import Config, ConfigError, ListenerConfig, load_config
from stalroute.limits import BanList, LoginDelays
from stalroute.logs import logger, set_level
from stalroute.mapping.cache import RoutingCache
from stalroute.mapping.factory import UnsupportedStore, build_store
from stalroute.mapping.file import MappingFileError
from stalroute.protocols import PROTOCOLS
from stalroute.router import Router
from stalroute.stats import Metrics
from stalroute.inbound import CLOSE_GRACE
from stalroute.session import Runtime, SessionFactory, SessionRegistry
from stalroute.tls import ServerTLS

log = logger("stalroute.service")

#: How long a replaced runtime's store stays open for logins that were already resolving.
RETIRE_DELAY = 30.0

#: How often a drain checks whether the last session has ended.
DRAIN_POLL = 0.1

from stalroute.http.proxy import HTTPListenerFactory  # noqa: E402

#: Listener protocols served outside the login pipeline: name → factory(reactor, runtime, name).
OTHER_LISTENERS: dict[str, object] = {"http": HTTPListenerFactory}


class StartupError(Exception):
    """The configuration is valid but cannot run: the message names the key or file."""


class UnsupportedSetting(StartupError):
    """A valid setting this version cannot run yet (named by its key)."""


def build_runtime(reactor, config: Config, previous: Runtime | None = None) -> Runtime:
    """Everything a configuration needs at run time.

    On a reload, ``previous`` hands over what must survive it: the live sessions, bans, login
    delays, the destinations' learnt capabilities and the circuit state of destinations that
    still exist. Raises
    :class:`StartupError` (naming the key or file) before anything binds or is swapped.
    """
    for name, listener in config.listeners.items():
        if listener.protocol not in PROTOCOLS and listener.protocol not in OTHER_LISTENERS:
            raise UnsupportedSetting(f"listener.{name}.protocol: {listener.protocol!r} is not "
                                     "available in this version yet")
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
        registry, bans, delays, metrics = (SessionRegistry(), BanList(reactor, config.security),
                                           LoginDelays(reactor), Metrics())
    else:
        registry, bans, delays, metrics = (previous.registry, previous.bans, previous.delays,
                                           previous.metrics)
        bans.security = config.security
        cache.counters = previous.router.cache.counters  # hits and misses count across reloads
        for name in connector.breakers.keys() & previous.connector.breakers.keys():
            connector.breakers[name] = previous.connector.breakers[name]
    return Runtime(config=config, router=Router(config, store, cache, metrics),
                   connector=connector, server_tls=server_tls, registry=registry, bans=bans,
                   delays=delays, metrics=metrics,
                   capabilities=previous.capabilities if previous else DestinationCapabilities())


def settings_needing_restart(old: Config, new: Config) -> list[str]:
    """Changed settings a reload cannot apply: listener sockets, the admin endpoint, workers,
    the log format (twistd's observer is set once, at startup)."""
    changed = [f"listener.{name}" for name in sorted(old.listeners.keys() | new.listeners.keys())
               if old.listeners.get(name) != new.listeners.get(name)]
    if old.admin != new.admin:
        changed.append("admin")
    if old.server.workers != new.server.workers:
        changed.append("server.workers")
    if old.server.log_format != new.server.log_format:
        changed.append("server.log_format")
    return changed


def listener_after_reload(running: ListenerConfig, config: Config) -> ListenerConfig:
    """The settings a bound listener serves with after a reload: the new ones, unless the new
    configuration removed or renamed it or changed its protocol; then its port keeps the
    settings it was started with until a restart (the reload reports it as needing one)."""
    new = config.listeners.get(running.name)
    return new if new is not None and new.protocol == running.protocol else running


def bind_refused(key: str, host: str, port: int, error: CannotListenError) -> StartupError:
    """``listener.imaps: cannot bind 0.0.0.0:993: address already in use``."""
    reason = error.socketError
    errno = getattr(reason, "errno", None)
    text = os.strerror(errno).lower() if errno else str(reason)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return StartupError(f"{key}: cannot bind {address}: {text}")


class ListeningPort(tcp.Port):
    """A TCP port whose IPv6 socket can be made IPv6-only, so that ``0.0.0.0:993`` and
    ``[::]:993`` bind side by side (a plain ``[::]`` socket would also take IPv4)."""

    def __init__(self, *args, v6only: bool = False) -> None:
        super().__init__(*args)
        self._v6only = v6only

    def createInternetSocket(self) -> socket.socket:
        sock = super().createInternetSocket()
        if self._v6only:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        return sock


class StalrouteService(service.Service):
    """Listens on every configured address and serves sessions with the current runtime."""

    def __init__(self, reactor, config: Config) -> None:
        self.reactor = reactor
        set_level(config.server.log_level)
        for warning in config.warnings:
            log.warn("configuration: {warning}", warning=str(warning))
        self.runtime = build_runtime(reactor, config)
        self.factories: dict[str, SessionFactory] = {}
        self._ports: list[IListeningPort] = []

    def startService(self) -> None:
        super().startService()
        signal.signal(signal.SIGHUP, lambda *_: self.reactor.callFromThread(self._reload_on_signal))
        try:
            self._listen()
        except StartupError as exc:
            # One line naming the listener and address, and exit status 1: twistd would print
            # a traceback for an exception.
            log.critical("{problem}", problem=str(exc))
            raise SystemExit(1) from None
        config = self.runtime.config
        self.runtime.capabilities.start(self.reactor, config)  # answers come in later
        log.info("stalroute started: {listeners} listeners, {destinations} destinations",
                 listeners=len(config.listeners), destinations=len(config.destinations))

    def _listen(self) -> None:
        """Bind every listener address and the admin API; StartupError names the first
        address that cannot be bound."""
        config = self.runtime.config
        ipv4_ports = {port for listener in config.listeners.values()
                      for host, port in listener.bind if ":" not in host}
        for name, listener in config.listeners.items():
            factory = self._factory_for(name, listener.protocol)
            self.factories[name] = factory
            for host, port in listener.bind:
                listening = ListeningPort(port, factory, 1024, host, self.reactor,
                                          v6only=":" in host and port in ipv4_ports)
                # Synchronous, so that a port we cannot bind stops startup instead of a log line.
                try:
                    listening.startListening()
                except CannotListenError as exc:
                    raise bind_refused(f"listener.{name}", host, port, exc) from None
                address = listening.getHost()
                log.info("listener {name} on {host}:{port}", name=name, host=address.host,
                         port=address.port)
                self._ports.append(listening)
        if config.admin:
            from stalroute.admin.server import start_admin  # here: admin imports control → us

            self._ports.append(start_admin(self))

    def _factory_for(self, name: str, protocol: str):
        """The connection factory of one listener: the shared session pipeline for the
        interactive protocols, a protocol's own factory for the others."""
        if protocol in OTHER_LISTENERS:
            return OTHER_LISTENERS[protocol](self.reactor, self.runtime, name)
        return SessionFactory(self.reactor, self.runtime, name, PROTOCOLS[protocol])

    def reload_config(self) -> list[str]:
        """Validate and build the new configuration completely, then swap it in atomically.

        New connections use it; live sessions keep the runtime they started with. Returns the
        changed settings that need a restart. Raises ConfigError or StartupError (the running
        configuration is kept).
        """
        old = self.runtime
        new = build_runtime(self.reactor, load_config(old.config.source_path), previous=old)
        self.runtime = new
        for factory in self.factories.values():
            factory.runtime = new
            factory.listener = listener_after_reload(factory.listener, new.config)
        set_level(new.config.server.log_level)
        new.capabilities.start(self.reactor, new.config)  # re-probe, keeping the answers meanwhile
        # In-flight lookups of sessions still holding the old runtime may use the old store.
        self.reactor.callLater(RETIRE_DELAY, old.router.store.close)
        not_applied = settings_needing_restart(old.config, new.config)
        log.info("configuration reloaded; needs a restart to apply: {changed}",
                 changed=", ".join(not_applied) or "nothing")
        return not_applied

    def _reload_on_signal(self) -> None:
        try:
            self.reload_config()
        except (ConfigError, StartupError) as exc:
            problems = exc.problems if isinstance(exc, ConfigError) else [exc]
            log.error("configuration reload refused, keeping the running one: {problems}",
                      problems="; ".join(str(p) for p in problems))
        except Exception:  # noqa: BLE001 - a bug: logged as one event, the process goes on
            log.failure("configuration reload failed: unexpected error")

    def stopService(self) -> Deferred[None]:
        """Graceful drain: stop accepting, let sessions finish up to ``shutdown_grace``, then
        close the rest."""
        super().stopService()
        self.runtime.capabilities.stop()
        self.runtime.registry.draining = True
        stopped = DeferredList([port.stopListening() for port in self._ports])
        stopped.addCallback(lambda _: Deferred.fromCoroutine(self._drain()))
        return stopped.addCallback(lambda _: self.runtime.router.store.close())

    async def _drain(self) -> None:
        sessions = self.runtime.registry.sessions
        grace = self.runtime.config.server.shutdown_grace
        log.info("draining {count} sessions for up to {grace}s", count=len(sessions), grace=grace)
        deadline = self.reactor.seconds() + grace
        while sessions and self.reactor.seconds() < deadline:
            await deferLater(self.reactor, DRAIN_POLL)
        for session in list(sessions.values()):
            session.close("shutdown")
        deadline = self.reactor.seconds() + CLOSE_GRACE + 1
        while sessions and self.reactor.seconds() < deadline:
            await deferLater(self.reactor, DRAIN_POLL)
