"""Builds the running proxy from a :class:`~stalroute.config.Config`."""

from __future__ import annotations

import signal

from OpenSSL import SSL
from twisted.application import service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import deferLater

from stalroute.backend import BackendConnector
from stalroute.config import Config
from stalroute.limits import BanList
from stalroute.logs import logger, set_level
from stalroute.mapping.cache import RoutingCache
from stalroute.mapping.factory import UnsupportedStore, build_store
from stalroute.mapping.file import MappingFileError
from stalroute.protocols import PROTOCOLS
from stalroute.router import Router
from stalroute.session import CLOSE_GRACE, Runtime, SessionFactory, SessionRegistry
from stalroute.tls import ServerTLS

log = logger("stalroute.service")

#: How often a drain checks whether the last session has ended.
DRAIN_POLL = 0.1

#: Listener protocols served outside the login pipeline: name → factory(reactor, runtime, name).
OTHER_LISTENERS: dict[str, object] = {}


class StartupError(Exception):
    """The configuration is valid but cannot run: the message names the key or file."""


class UnsupportedSetting(StartupError):
    """A valid setting this version cannot run yet (named by its key)."""


def build_runtime(reactor, config: Config, registry: SessionRegistry) -> Runtime:
    """Everything a configuration needs at run time.

    Raises :class:`StartupError` (naming the key or file) before anything binds.
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
    return Runtime(config=config, router=Router(config, store, cache), connector=connector,
                   server_tls=server_tls, registry=registry,
                   bans=BanList(reactor, config.security))


class StalrouteService(service.Service):
    """Listens on every configured address and serves sessions with the current runtime."""

    def __init__(self, reactor, config: Config) -> None:
        self.reactor = reactor
        set_level(config.server.log_level)
        for warning in config.warnings:
            log.warn("configuration: {warning}", warning=str(warning))
        self.runtime = build_runtime(reactor, config, SessionRegistry())
        self.factories: dict[str, SessionFactory] = {}
        self.draining = False
        self._ports: list[IListeningPort] = []

    def startService(self) -> None:
        super().startService()
        signal.signal(signal.SIGHUP, lambda *_: self.reactor.callFromThread(self.reload_mappings))
        config = self.runtime.config
        for name, listener in config.listeners.items():
            factory = self._factory_for(name, listener.protocol)
            self.factories[name] = factory
            for host, port in listener.bind:
                # Synchronous, so that a port we cannot bind stops startup instead of a log line.
                listening = self.reactor.listenTCP(port, factory, backlog=1024, interface=host)
                address = listening.getHost()
                log.info("listener {name} on {host}:{port}", name=name, host=address.host,
                         port=address.port)
                self._ports.append(listening)
        log.info("stalroute started: {listeners} listeners, {destinations} destinations",
                 listeners=len(config.listeners), destinations=len(config.destinations))

    def _factory_for(self, name: str, protocol: str):
        """The connection factory of one listener: the shared session pipeline for the
        interactive protocols, a protocol's own factory for the others."""
        if protocol in OTHER_LISTENERS:
            return OTHER_LISTENERS[protocol](self.reactor, self.runtime, name)
        return SessionFactory(self.reactor, self.runtime, name, PROTOCOLS[protocol])

    def reload_mappings(self) -> Deferred[int | None]:
        """SIGHUP: re-read the mapping table (a bad file is refused, the old one kept)."""
        router = self.runtime.router

        def reloaded(entries: int | None) -> None:
            router.cache.invalidate()
            log.info("mappings reloaded: {entries} entries", entries=entries)

        def refused(failure) -> None:
            log.error("mapping reload refused, keeping the old table: {error}",
                      error=failure.getErrorMessage())

        return router.store.reload().addCallbacks(reloaded, refused)

    def stopService(self) -> Deferred[None]:
        """Graceful drain: stop accepting, let sessions finish up to ``shutdown_grace``, then
        close the rest."""
        super().stopService()
        self.draining = True
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
