"""A worker process of an instance (``server.workers``, SPEC §11), started by the supervisor
(:mod:`stalroute.supervisor`) as ``python -m stalroute.worker CONFIG WORKER FDS``.

It serves the connections of the listening sockets it inherits (adopted with
``adoptStreamPort``) with a runtime of its own, under its share of the connection limits, and
does what the supervisor asks over the channel (:mod:`stalroute.channel`, inherited as
``FDS["channel"]``; ``FDS`` is the JSON ``{"workers": N, "channel": fd, "listeners": {name:
[[fd, family], ...]}}``): apply a change, report, reload, follow the bus state. Its log events
travel over the same channel, so the supervisor writes them into the instance's one log. When
the channel closes (the supervisor is gone) it drains and exits; terminal signals are the
supervisor's to handle.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import socket
import sys
from typing import Any, cast

from twisted.internet.interfaces import IReactorCore
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogBeginner
from twisted.python.failure import Failure
from zope.interface import implementer

from stalroute.channel import Channel, ChannelFactory
from stalroute.cluster import Cluster
from stalroute.config import Config, load_config
from stalroute.logs import CONTEXT_FIELDS, logger
from stalroute.service import ProxyService
from stalroute.transport import IServingReactor

log = logger("stalroute.workers")


def worker_share(config: Config, workers: int) -> Config:
    """``config`` with each listener's connection limits divided among ``workers`` (rounded
    up), so that the instance as a whole stays near the configured limits."""
    listeners = {name: dataclasses.replace(
        listener, max_connections=math.ceil(listener.max_connections / workers),
        max_connections_per_ip=math.ceil(listener.max_connections_per_ip / workers))
        for name, listener in config.listeners.items()}
    return dataclasses.replace(config, listeners=listeners)


class IWorkerReactor(IServingReactor, IReactorCore):
    """A worker's reactor: the proxy service's, which it also stops (and runs, in main)."""


class WorkerService(ProxyService):
    """The proxy service of one worker: inherited sockets, no bus of its own (the supervisor
    is the instance's member), its share of the limits."""

    reactor: IWorkerReactor

    def __init__(self, reactor: IWorkerReactor, config: Config, index: int, workers: int,
                 sockets: dict[str, list[tuple[int, int]]]) -> None:
        self.index = index
        self._workers_in_instance = workers
        self._sockets = sockets
        self._stopping = False
        super().__init__(reactor, config)

    def shaped(self, config: Config) -> Config:
        return worker_share(config, self._workers_in_instance)

    def _cluster_for(self, config: Config) -> Cluster:
        return Cluster(config.cluster.node_id, None)

    def _certificate_manager_for(self, config: Config) -> None:
        """None: the supervisor renews, and hands every certificate down the channel
        (``certificate_install``); the worker applies the challenge material it sends."""
        return None

    def _install_signals(self) -> None:
        pass  # the supervisor relays SIGHUP as a reload call

    def _listening_sockets(self) -> dict[str, list[tuple[int, int]]]:
        return self._sockets  # bound by the supervisor, inherited

    def _log_started(self) -> None:
        log.info("worker {index} serving", index=self.index)

    def handlers(self) -> dict[str, Any]:
        """What the supervisor may call on this worker."""
        control = self.control
        return {
            "apply": control.apply_here,
            "report": lambda parts: {**control.report(parts), "worker": self.index,
                                     "pid": os.getpid()},
            "reload": self.reload_config,
            "bus_state": control.bus_state,
            "superseded": control.superseded,
        }

    def stop_soon(self) -> None:
        """Drain and exit (asked by the supervisor, or the supervisor is gone)."""
        if not self._stopping:
            self._stopping = True
            self.reactor.callLater(0, self.reactor.stop)


@implementer(ILogObserver)
class ChannelLogObserver:
    """Sends every log event over the channel as ``{"event": "log", ...}``: the namespace,
    level, text and the session fields JSON logs carry (:data:`CONTEXT_FIELDS`)."""

    def __init__(self, channel: Channel) -> None:
        self._channel = channel

    def __call__(self, event: LogEvent) -> None:
        text = formatEvent(event)
        failure = event.get("log_failure")
        if isinstance(failure, Failure):
            text += "\n" + failure.getTraceback()
        fields = {key: event[key] for key in CONTEXT_FIELDS if key in event
                  and isinstance(event[key], (str, int, float, bool, type(None)))}
        self._channel.event("log", namespace=event.get("log_namespace") or "-",
                            level=event["log_level"].name, text=text, fields=fields)


def main(argv: list[str]) -> None:
    """Run worker ``argv[2]`` of the instance configured in ``argv[1]``."""
    config_path, index, inherited = argv[1], int(argv[2]), json.loads(argv[3])
    from twisted.internet import reactor as installed

    reactor = cast(IWorkerReactor, installed)

    # Ctrl-C and a terminal hangup reach the whole process group: the supervisor decides.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    config = load_config(config_path, env=os.environ)
    sockets = {name: [(fd, family) for fd, family in pairs]
               for name, pairs in inherited["listeners"].items()}
    proxy = WorkerService(reactor, config, index, inherited["workers"], sockets)
    channel = Channel(proxy.handlers(), on_event=lambda message: None,
                      on_lost=proxy.stop_soon)
    reactor.adoptStreamConnection(inherited["channel"], socket.AF_UNIX,
                                  ChannelFactory(channel))
    os.close(inherited["channel"])
    globalLogBeginner.beginLoggingTo([ChannelLogObserver(channel)],
                                     redirectStandardIO=False)
    reactor.addSystemEventTrigger("before", "shutdown", proxy.stopService)
    proxy.startService()
    reactor.run()


if __name__ == "__main__":
    main(sys.argv)
