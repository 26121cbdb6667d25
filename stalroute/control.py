"""Operations on a running proxy, for the admin API and signals (SPEC §7, §8, §9).

The admin HTTP layer stays a thin translation of requests into these calls; everything here
works on the proxy's *current* runtime, so a config reload is picked up at once. The proxy is
whatever offers :class:`RunningProxy` (the proxy service; a stand-in in tests), so this module
does not depend on how the proxy is assembled.

In a fleet (``[cluster] coordinator``) every state change is applied here at once, then
published on the :class:`~stalroute.cluster.Cluster` bus; :meth:`Control.apply` applies the
changes of the other instances.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from twisted.internet.interfaces import IReactorTime

from stalroute.cluster import Argument, Change, Cluster
from stalroute.health import Readiness, readiness
from stalroute.identity import normalize_identifier, redact
from stalroute.inbound import ListenerFactory
from stalroute.logs import logger
from stalroute.mapping import ReadOnlyStore
from stalroute.membership import Membership, describe
from stalroute.runtime import Runtime

log = logger("stalroute.admin")


class RunningProxy(Protocol):
    """What :class:`Control` needs of the running proxy."""

    @property
    def runtime(self) -> Runtime:
        """The current runtime (replaced by each reload)."""

    @property
    def factories(self) -> Mapping[str, ListenerFactory]:
        """The connection factory of each listener, by the name it was started with."""

    @property
    def reactor(self) -> IReactorTime:
        """The clock of ages and timeouts."""

    def reload_config(self) -> list[str]:
        """Read the configuration file again and swap it in; the changed settings that need
        a restart. Raises ConfigError or StartupError (the running configuration is kept)."""


class UnknownDestination(ValueError):
    """A mapping write names a destination the configuration does not declare."""


class Control:
    """What an operator can ask of, and do to, a running stalroute."""

    def __init__(self, proxy: RunningProxy, cluster: Cluster | None = None) -> None:
        self._proxy = proxy
        #: The bus this instance's changes go out on and the others' come in from (None:
        #: changes stay on this instance).
        self._cluster = cluster
        if cluster is not None:
            cluster.attach(self.apply, self._bus_changed, lambda: self.runtime.config)

    @property
    def runtime(self) -> Runtime:
        return self._proxy.runtime

    # health --------------------------------------------------------------------------

    async def readiness(self) -> Readiness:
        superseded = self._cluster is not None and self._cluster.superseded()
        return await readiness(self.runtime, self._proxy.reactor, superseded)

    # fleet ---------------------------------------------------------------------------

    def cluster(self) -> dict[str, Any]:
        """``GET /cluster``: the live members of the fleet (only this instance without a
        coordinator) and the mismatches among them."""
        if self._cluster is not None:
            return self._cluster.view()
        alone = describe(self.runtime.config, "local", 0.0)
        return Membership(self._proxy.reactor).view(alone)

    # statistics ----------------------------------------------------------------------

    def stats(self) -> dict:
        """The reference product's top-level keys (``cache_hits`` … ``active_connections``),
        then stalroute's breakdown. Hits are answers the cache gave (positive and negative
        tiers); misses are lookups that went to the store; a remembered store failure
        (transient tier) is neither."""
        runtime = self.runtime
        sessions = list(runtime.registry.sessions.values())
        spliced = runtime.registry.routed()
        counters = runtime.router.cache.counters
        hits = counters["hit:positive"] + counters["hit:negative"]
        misses = counters["miss"]
        factories = self._proxy.factories
        return {
            "cache_hits": hits,
            "cache_misses": misses,
            "hit_rate_pct": round(100 * hits / (hits + misses), 1) if hits + misses else 0.0,
            "cache_entries": len(runtime.router.cache),
            "active_connections": sum(factory.active for factory in factories.values()),
            "draining": runtime.registry.draining,
            "listeners": {
                # A listener a reload removed is listed under the name it was started with.
                name: {"protocol": factory.listener.protocol,
                       "active_connections": factory.active,
                       "rejected_connections": factory.rejected, "probes": factory.probes}
                for name, factory in factories.items()},
            "sessions": {"open": len(sessions), "spliced": len(spliced),
                         "preauth": len(sessions) - len(spliced)},
            "cache": {"entries": len(runtime.router.cache), "counters": dict(counters)},
            "bans": runtime.bans.bans,
            "login_delays": len(runtime.delays.active()),
            **({"cluster": self._cluster.stats()} if self._cluster is not None else {}),
        }

    def destinations(self) -> list[dict]:
        runtime = self.runtime
        spliced = runtime.registry.routed()
        return [{"name": name, "host": destination.host,
                 "protocols": sorted(destination.protocols),
                 "circuit": runtime.connector.breakers[name].state,
                 "consecutive_failures": runtime.connector.breakers[name].failures,
                 "trips": runtime.connector.breakers[name].trips,
                 "sessions": sum(1 for s in spliced if s.destination == name),
                 "default": name == runtime.config.routing.default_destination}
                for name, destination in runtime.config.destinations.items()]

    def reset_destination(self, name: str) -> bool:
        breaker = self.runtime.connector.breakers.get(name)
        if breaker is None:
            return False
        breaker.reset()
        log.info("admin: circuit of destination {name} reset", name=name)
        self._publish("reset_destination", name=name)
        return True

    # mappings ------------------------------------------------------------------------

    def normalize(self, identifier: str) -> str:
        return normalize_identifier(identifier, self.runtime.config.mapping.normalize)

    async def get_mapping(self, identifier: str) -> str | None:
        return await self.runtime.router.store.lookup(self.normalize(identifier))

    async def put_mapping(self, identifier: str, destination: str) -> None:
        """Write to the store, then drop the cached answer so the next login sees it."""
        runtime = self.runtime
        if destination not in runtime.config.destinations:
            raise UnknownDestination(destination)
        if not runtime.router.store.writable:
            raise ReadOnlyStore("the mapping store is read-only")
        key = self.normalize(identifier)
        await runtime.router.store.upsert(key, destination)
        runtime.router.cache.invalidate(key)
        log.info("admin: mapped {identifier} to {destination}", identifier=redact(key),
                 destination=destination)
        self._publish("mapping_put", identifier=key, destination=destination)

    async def delete_mapping(self, identifier: str) -> bool:
        runtime = self.runtime
        if not runtime.router.store.writable:
            raise ReadOnlyStore("the mapping store is read-only")
        key = self.normalize(identifier)
        existed = await runtime.router.store.delete(key)
        runtime.router.cache.invalidate(key)
        log.info("admin: mapping of {identifier} deleted", identifier=redact(key))
        self._publish("mapping_delete", identifier=key)
        return existed

    async def reload_mappings(self) -> int | None:
        runtime = self.runtime
        entries = await runtime.router.store.reload()
        runtime.router.cache.invalidate()
        log.info("admin: mappings reloaded ({entries} entries)", entries=entries)
        self._publish("mappings_reload")
        return entries

    def imported(self, keys: list[str]) -> None:
        """A bulk import wrote ``keys``: drop their routes here, and every route elsewhere."""
        for key in keys:
            self.runtime.router.cache.invalidate(key)
        self._publish("mappings_import")

    def invalidate(self, identifier: str | None = None) -> int:
        key = None if identifier is None else self.normalize(identifier)
        dropped = self.runtime.router.cache.invalidate(key)
        log.info("admin: cache invalidated for {what}",
                 what="everything" if key is None else redact(key))
        self._publish("invalidate", identifier=key)
        return dropped

    # sessions ------------------------------------------------------------------------

    def connections(self) -> list[dict]:
        now = self._proxy.reactor.seconds()
        return [{"id": s.id, "protocol": s.listener.protocol, "listener": s.listener.name,
                 "client": f"{s.client[0]}:{s.client[1]}", "identifier": s.account,
                 "destination": s.destination, "bytes_in": s.bytes_in,
                 "bytes_out": s.bytes_out, "age": round(now - s.started, 3)}
                for s in self.runtime.registry.routed()]

    def kick(self, identifier: str | None = None, destination: str | None = None) -> int:
        """Close the spliced sessions of an account and/or on a destination (drain a node)."""
        key = None if identifier is None else self.normalize(identifier)
        count = self._kick(key, destination)
        log.info("admin: kicked {count} sessions (identifier={identifier}, "
                 "destination={destination})", count=count,
                 identifier=redact(key) if key else "-", destination=destination or "-")
        self._publish("kick", identifier=key, destination=destination)
        return count

    def _kick(self, key: str | None, destination: str | None) -> int:
        victims = [s for s in self.runtime.registry.routed()
                   if (key is None or s.account == key)
                   and (destination is None or s.destination == destination)]
        for session in victims:
            try:
                session.close("kicked")
            except Exception:  # one broken session must not spare the others
                log.failure("admin: kicking session {session} failed", session=session.id)
        return len(victims)

    def delay(self, identifier: str, seconds: float) -> None:
        key = self.normalize(identifier)
        self.runtime.delays.delay(key, seconds)
        log.info("admin: logins of {identifier} held for {seconds}s", identifier=redact(key),
                 seconds=seconds)
        self._publish("delay", identifier=key, seconds=seconds)

    # the cluster ---------------------------------------------------------------------

    def _publish(self, op: str, **args: Argument) -> None:
        if self._cluster is not None:
            self._cluster.publish(op, **args)

    def apply(self, change: Change) -> None:
        """Apply a change another instance made and published. A mapping write is already in
        the shared store: only the routes cached here are dropped (after re-reading a store
        held in memory, the file)."""
        runtime, args = self.runtime, change.args
        if change.op in ("mapping_put", "mapping_delete"):
            self._store_changed(_text(args["identifier"]))
        elif change.op in ("mappings_import", "mappings_reload"):
            self._store_changed(None)
        elif change.op == "invalidate":
            runtime.router.cache.invalidate(_optional(args["identifier"]))
        elif change.op == "kick":
            self._kick(_optional(args["identifier"]), _optional(args["destination"]))
        elif change.op == "delay":
            runtime.delays.delay(_text(args["identifier"]), _number(args["seconds"]))
        elif change.op == "reset_destination":
            breaker = runtime.connector.breakers.get(_text(args["name"]))
            if breaker is not None:
                breaker.reset()
        log.info("cluster: applied {op} #{seq} of node {node}", op=change.op, seq=change.seq,
                 node=change.node)

    def _store_changed(self, key: str | None) -> None:
        """Re-read the store (a no-op but for the file), then drop the route(s)."""
        runtime = self.runtime
        reloaded = runtime.router.store.reload()
        reloaded.addErrback(lambda failure: log.error(
            "cluster: re-reading the mapping store failed: {reason}",
            reason=failure.getErrorMessage()))
        reloaded.addCallback(lambda _: runtime.router.cache.invalidate(key))

    def _bus_changed(self, connected: bool) -> None:
        """While the bus is down changes may be missed: cap the age of cached routes; once it
        is back, drop them all (they may be stale)."""
        cache = self.runtime.router.cache
        if connected:
            cache.max_age = None
            dropped = cache.invalidate()
            log.info("cluster: route cache dropped on connecting to the coordinator "
                     "({dropped} entries)", dropped=dropped)
        else:
            cache.max_age = self.runtime.config.cluster.fallback_ttl

    # configuration -------------------------------------------------------------------

    def reload_config(self) -> list[str]:
        """See :meth:`RunningProxy.reload_config`."""
        return self._proxy.reload_config()


def _text(value: Argument) -> str:
    return str(value)


def _optional(value: Argument) -> str | None:
    return None if value is None else str(value)


def _number(value: Argument) -> float:
    return float(value) if isinstance(value, (int, float)) else 0.0
