"""The proxy service: the listeners of a configuration, its reloads and its graceful drain.

It binds every ``[listener.*]`` address, serves each with the current :class:`Runtime`
(:mod:`stalroute.runtime`), swaps in a new runtime on SIGHUP or an admin reload, and on stop
drains the sessions. The admin API is a service of its own
(:class:`stalroute.admin.server.AdminService`); the twistd plugin runs both.
"""

from __future__ import annotations

import os
import signal
import socket
from typing import Any

from twisted.application import service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

from stalroute.acme.client import Issued
from stalroute.acme.manager import CertificateManager, build_certificate_manager
from stalroute.acme.roles import FleetLink, install_args
from stalroute.cluster import Cluster, build_cluster
from stalroute.config import Config, ConfigError, ListenerConfig, load_config
from stalroute.control import Control, LocalWorkers
from stalroute.http.connection import HTTPListenerFactory
from stalroute.closing import CLOSE_GRACE
from stalroute.inbound import ListenerFactory
from stalroute.logs import logger, set_level
from stalroute.mapping import InvalidStoreSetting
from stalroute.outcomes import Outcome
from stalroute.protocols import PROTOCOLS
from stalroute.runtime import Runtime, StartupError, bind_refused, build_runtime, refuse_to_start
from stalroute.session import SessionFactory
from stalroute.transport import IServingReactor

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
    changed += [f"cluster.{key}" for key in ("node_id", "coordinator", "url", "roles")
                if getattr(old.cluster, key) != getattr(new.cluster, key)]
    # The ACME renewal service is built once, at startup.
    if old.acme != new.acme:
        changed.append("acme")
    changed += [f"tls.certificate.{name}.acme"
                for name in sorted(old.tls.certificates.keys() | new.tls.certificates.keys())
                if getattr(old.tls.certificates.get(name), "acme", None)
                != getattr(new.tls.certificates.get(name), "acme", None)]
    return changed


def listener_after_reload(running: ListenerConfig, config: Config) -> ListenerConfig:
    """The settings a bound listener serves with after a reload: the new ones, unless the new
    configuration removed or renamed it or changed its protocol; then its port keeps the
    settings it was started with until a restart (the reload reports it as needing one)."""
    new = config.listeners.get(running.name)
    return new if new is not None and new.protocol == running.protocol else running


def _reload_refused(failure: Failure) -> None:
    if failure.check(ConfigError, StartupError):
        exc = failure.value
        problems = exc.problems if isinstance(exc, ConfigError) else [exc]
        log.error("configuration reload refused, keeping the running one: {problems}",
                  problems="; ".join(str(p) for p in problems))
    else:  # a bug: logged as one event, the process goes on
        log.failure("configuration reload failed: unexpected error", failure)


#: Pending connections the kernel queues per listening socket.
BACKLOG = 1024


def bind_listeners(config: Config) -> dict[str, list[socket.socket]]:
    """Bind every listener address: listening, non-blocking sockets by listener name. An IPv6
    socket is made IPv6-only where the same port is bound on IPv4 too, so ``0.0.0.0:993`` and
    ``[::]:993`` bind side by side. StartupError names the first address that cannot be bound
    (the sockets bound before it are closed)."""
    ipv4_ports = {port for listener in config.listeners.values()
                  for host, port in listener.bind if ":" not in host}
    bound: dict[str, list[socket.socket]] = {}
    for name, listener in config.listeners.items():
        for host, port in listener.bind:
            try:
                sock = _listening_socket(host, port, v6only=":" in host and port in ipv4_ports)
            except OSError as exc:
                for sockets in bound.values():
                    for opened in sockets:
                        opened.close()
                raise bind_refused(f"listener.{name}", host, port,
                                   CannotListenError(host, port, exc)) from None
            bound.setdefault(name, []).append(sock)
    return bound


def _listening_socket(host: str, port: int, *, v6only: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    address = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM, 0,
                                 socket.AI_NUMERICHOST)[0][4]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if v6only:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def log_listening(name: str, sock: socket.socket) -> None:
    host, port = sock.getsockname()[:2]
    log.info("listener {name} on {host}:{port}", name=name, host=host, port=port)


class ProxyService(service.Service):
    """Listens on every configured address and serves connections with the current runtime."""

    def __init__(self, reactor: IServingReactor, config: Config) -> None:
        self.reactor = reactor
        set_level(config.server.log_level)
        for warning in config.warnings:
            log.warn("configuration: {warning}", warning=str(warning))
        self.runtime: Runtime = build_runtime(reactor, self.shaped(config))
        try:
            #: This instance's end of the fleet's bus (``[cluster]``); it outlives reloads.
            self.cluster: Cluster = self._cluster_for(config)
        except InvalidStoreSetting as exc:
            raise StartupError(str(exc)) from exc
        #: The operations on this proxy; it also applies what the other instances publish.
        self.control = Control(self, self.cluster, self.workers)
        #: Orders and renews the ``acme =`` certificates, swapping them into the listeners
        #: (None without any; SPEC §2.13).
        self.certificates: CertificateManager | None = self._certificate_manager_for(config)
        #: The connection factory of each listener, by the name it was started with.
        self.factories: dict[str, ListenerFactory] = {}
        self._ports: list[IListeningPort] = []

    def _certificate_manager_for(self, config: Config) -> CertificateManager | None:
        """The renewal service of this instance (a worker has none: its supervisor runs it).
        Its challenge material and "certificate issued" travel as changes (this process, its
        workers, the fleet: :mod:`stalroute.acme.roles`)."""
        cluster = self.cluster
        link = FleetLink(
            change=self.control.change, token=cluster.token,
            bus_ready=lambda: cluster.coordinator is None or cluster.connected,
            apply_locally=self.control.apply_in_instance)
        return build_certificate_manager(self.reactor, config, self._serve_issued, link)

    def _serve_issued(self, name: str, issued: Issued) -> Deferred[object] | None:
        """A certificate issued by ACME: new connections get it, live ones keep theirs; the
        workers get the chain and key over their channel (the supervisor read the store)."""
        self.runtime.server_tls.install(name, issued.chain_pem, issued.key_pem)
        if self.workers is None:
            return None
        return self.workers.apply("certificate_install",
                                  install_args(name, issued)).addCallback(lambda _: None)

    # What the supervisor and the worker processes of ``server.workers`` do differently.

    #: The worker processes this service runs its listeners in (None: this process serves).
    workers: LocalWorkers | None = None

    def shaped(self, config: Config) -> Config:
        """The configuration this process runs (a worker's share of the limits)."""
        return config

    def _cluster_for(self, config: Config) -> Cluster:
        return build_cluster(config.cluster)

    def _install_signals(self) -> None:
        signal.signal(signal.SIGHUP, lambda *_: self.reactor.callFromThread(self._reload_on_signal))

    def startService(self) -> None:
        super().startService()
        self._install_signals()
        try:
            self._listen()
        except StartupError as exc:
            refuse_to_start(exc)
        config = self.runtime.config
        self.runtime.capabilities.start(self.reactor, config)  # answers come in later
        self.cluster.start()
        if self.certificates is not None:
            self.certificates.startService()
        self._log_started()

    def _log_started(self) -> None:
        config = self.runtime.config
        log.info("stalroute started: {listeners} listeners, {destinations} destinations",
                 listeners=len(config.listeners), destinations=len(config.destinations))

    def _listen(self) -> None:
        """Serve every listening socket of :meth:`_listening_sockets` here."""
        for name, sockets in self._listening_sockets().items():
            factory = self._factory_for(name, self.runtime.config.listeners[name].protocol)
            self.factories[name] = factory
            for fd, family in sockets:
                # Twisted types the factory as a ServerFactory of its placeholder protocol.
                self._ports.append(self.reactor.adoptStreamPort(
                    fd, socket.AddressFamily(family), factory))  # type: ignore[arg-type]
                os.close(fd)  # the port serves a duplicate of it

    def _listening_sockets(self) -> dict[str, list[tuple[int, int]]]:
        """Bind every listener address: (descriptor, address family) by listener name;
        StartupError names the first one that cannot be bound."""
        listening: dict[str, list[tuple[int, int]]] = {}
        for name, sockets in bind_listeners(self.runtime.config).items():
            for sock in sockets:
                log_listening(name, sock)
                family = sock.family
                listening.setdefault(name, []).append((sock.detach(), family))
        return listening

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
        new = build_runtime(self.reactor, self.shaped(load_config(path)), previous=old)
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
        Deferred.fromCoroutine(self.control.reload_config()).addErrback(_reload_refused)

    def stopService(self) -> Deferred[None]:
        """Graceful drain: stop accepting, let sessions finish up to ``shutdown_grace``, then
        close the rest. The admin API stops accepting at the same moment (the plugin's
        MultiService stops both services at once); its open connections keep answering."""
        super().stopService()
        waits: list[Deferred[Any]] = [maybeDeferred(port.stopListening)
                                      for port in self._ports]
        if self.certificates is not None:
            waits.append(self.certificates.stopService())  # its leases released
        self.runtime.capabilities.stop()
        self.runtime.registry.draining = True
        stopped = DeferredList(waits)
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
            session.close(Outcome.SHUTDOWN)
        deadline = self.reactor.seconds() + CLOSE_GRACE + 1
        while sessions and self.reactor.seconds() < deadline:
            await deferLater(self.reactor, DRAIN_POLL)
