"""The proxy service: the listeners of a configuration, its reloads and its graceful drain.

It binds every ``[listener.*]`` address, serves each with the current :class:`Runtime`
(:mod:`stalroute.runtime`), swaps in a new runtime on SIGHUP or an admin reload, and on stop
drains the sessions. The admin API is a service of its own
(:class:`stalroute.admin.server.AdminService`); the twistd plugin runs both.
"""

from __future__ import annotations

import signal
import socket

from twisted.application import service
from twisted.internet import tcp
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import deferLater

from stalroute.cluster import Cluster, build_cluster
from stalroute.config import Config, ConfigError, ListenerConfig, load_config
from stalroute.control import Control
from stalroute.http.connection import HTTPListenerFactory
from stalroute.closing import CLOSE_GRACE
from stalroute.inbound import ListenerFactory
from stalroute.logs import logger, set_level
from stalroute.mapping.factory import InvalidStoreSetting
from stalroute.protocols import PROTOCOLS
from stalroute.runtime import Runtime, StartupError, bind_refused, build_runtime, refuse_to_start
from stalroute.session import SessionFactory

log = logger("stalroute.service")

#: How often a replaced runtime checks whether its store may close: it stays open while a
#: connection that started under it may still route a login (pre-auth, held, routing).
RETIRE_DELAY = 30.0

#: How often a drain checks whether the last session has ended.
DRAIN_POLL = 0.1

#: Listener protocols served outside the login pipeline: name → factory(reactor, runtime, name).
OTHER_LISTENERS: dict[str, type[ListenerFactory]] = {"http": HTTPListenerFactory}


def settings_needing_restart(old: Config, new: Config) -> list[str]:
    """Changed settings a reload cannot apply: listener sockets, the admin endpoint, workers,
    the log format (twistd's observer is set once, at startup), the cluster bus and node id."""
    changed = [f"listener.{name}" for name in sorted(old.listeners.keys() | new.listeners.keys())
               if old.listeners.get(name) != new.listeners.get(name)]
    if old.admin != new.admin:
        changed.append("admin")
    if old.server.workers != new.server.workers:
        changed.append("server.workers")
    if old.server.log_format != new.server.log_format:
        changed.append("server.log_format")
    changed += [f"cluster.{key}" for key in ("node_id", "coordinator", "url")
                if getattr(old.cluster, key) != getattr(new.cluster, key)]
    return changed


def listener_after_reload(running: ListenerConfig, config: Config) -> ListenerConfig:
    """The settings a bound listener serves with after a reload: the new ones, unless the new
    configuration removed or renamed it or changed its protocol; then its port keeps the
    settings it was started with until a restart (the reload reports it as needing one)."""
    new = config.listeners.get(running.name)
    return new if new is not None and new.protocol == running.protocol else running


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


class ProxyService(service.Service):
    """Listens on every configured address and serves connections with the current runtime."""

    def __init__(self, reactor, config: Config) -> None:
        self.reactor = reactor
        set_level(config.server.log_level)
        for warning in config.warnings:
            log.warn("configuration: {warning}", warning=str(warning))
        self.runtime: Runtime = build_runtime(reactor, config)
        try:
            #: This instance's end of the fleet's bus (``[cluster]``); it outlives reloads.
            self.cluster: Cluster = build_cluster(config.cluster)
        except InvalidStoreSetting as exc:
            raise StartupError(str(exc)) from exc
        #: The operations on this proxy; it also applies what the other instances publish.
        self.control = Control(self, self.cluster)
        #: The connection factory of each listener, by the name it was started with.
        self.factories: dict[str, ListenerFactory] = {}
        self._ports: list[IListeningPort] = []

    def startService(self) -> None:
        super().startService()
        signal.signal(signal.SIGHUP, lambda *_: self.reactor.callFromThread(self._reload_on_signal))
        try:
            self._listen()
        except StartupError as exc:
            refuse_to_start(exc)
        config = self.runtime.config
        self.runtime.capabilities.start(self.reactor, config)  # answers come in later
        self.cluster.start()
        log.info("stalroute started: {listeners} listeners, {destinations} destinations",
                 listeners=len(config.listeners), destinations=len(config.destinations))

    def _listen(self) -> None:
        """Bind every listener address; StartupError names the first one that cannot be
        bound."""
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

    def _factory_for(self, name: str, protocol: str) -> ListenerFactory:
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
        path = old.config.source_path
        if path is None:
            raise StartupError("the configuration was not read from a file: nothing to reload")
        new = build_runtime(self.reactor, load_config(path), previous=old)
        self.runtime = new
        for factory in self.factories.values():
            factory.runtime = new
            factory.listener = listener_after_reload(factory.listener, new.config)
        set_level(new.config.server.log_level)
        new.capabilities.start(self.reactor, new.config)  # re-probe, keeping the answers meanwhile
        self.reactor.callLater(RETIRE_DELAY, self._retire, old)
        not_applied = settings_needing_restart(old.config, new.config)
        log.info("configuration reloaded; needs a restart to apply: {changed}",
                 changed=", ".join(not_applied) or "nothing")
        return not_applied

    def _retire(self, old: Runtime) -> None:
        """Close a replaced runtime's store once no connection may still route through it."""
        if any(connection.runtime is old and connection.may_route
               for connection in old.registry.sessions.values()):
            self.reactor.callLater(RETIRE_DELAY, self._retire, old)
        else:
            old.router.store.close()

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
        close the rest. The admin API stops accepting at the same moment (the plugin's
        MultiService stops both services at once); its open connections keep answering."""
        super().stopService()
        self.runtime.capabilities.stop()
        self.runtime.registry.draining = True
        stopped = DeferredList([maybeDeferred(port.stopListening) for port in self._ports])
        stopped.addCallback(lambda _: Deferred.fromCoroutine(self._drain()))
        stopped.addCallback(lambda _: self.cluster.stop())
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
