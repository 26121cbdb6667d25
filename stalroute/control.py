"""Operations on a running proxy, for the admin API and signals (SPEC §7, §8, §9).

The admin HTTP layer stays a thin translation of requests into these calls; everything here
works on the proxy's *current* runtime, so a config reload is picked up at once. The proxy is
whatever offers :class:`RunningProxy` (the proxy service; a stand-in in tests), so this module
does not depend on how the proxy is assembled.

Every state change (kick, invalidation, mapping write, delay, reset) is one *change*: applied in
this process and, with ``server.workers``, in every worker process (:class:`LocalWorkers`),
then published on the :class:`~stalroute.cluster.Cluster` bus when ``[cluster] coordinator`` is
set; the answer waits for all of them (:class:`Done`). :meth:`Control.apply` applies the changes
of the other instances, and :meth:`Control.apply_here` is what a worker runs for its supervisor.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from cryptography import x509
from cryptography.x509.oid import NameOID
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.interfaces import IReactorTime

from stalroute.acme.challenges import add_challenge, remove_challenge
from stalroute.cluster import Acknowledgement, Argument, Change, Cluster
from stalroute.health import Readiness, readiness
from stalroute.identity import normalize_identifier, redact
from stalroute.inbound import ListenerFactory
from stalroute.logs import logger
from stalroute.mapping import ReadOnlyStore
from stalroute.membership import Membership, describe
from stalroute.outcomes import Outcome
from stalroute.reports import (REPORT_PARTS, Report, instance_connections,
                               instance_destinations, instance_stats, measured_report)
from stalroute.runtime import Runtime
from stalroute.tls import certificate_subjects

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


class LocalWorkers(Protocol):
    """The worker processes of this instance (``server.workers``), seen from the supervisor."""

    def apply(self, op: str, args: dict[str, Argument]) -> Deferred[int]:
        """Apply a change in every running worker (the store was written by the supervisor
        or another instance); fires with the sum of their counts."""

    def reports(self, parts: Collection[str] = REPORT_PARTS) -> Deferred[list[Report]]:
        """Every running worker's :meth:`Control.report` of ``parts``, tagged with ``worker``
        and ``pid``."""

    def reload(self) -> Deferred[None]:
        """Make every running worker read the configuration file again."""

    def serving(self) -> int:
        """How many workers are running and connected."""

    def bus_state(self, connected: bool) -> None:
        """Tell every running worker whether the coordinator is connected."""

    def superseded(self, superseded: bool) -> None:
        """Tell every running worker whether another process holds this node_id."""


#: Changes of the ACME renewal service (SPEC §2.13, :mod:`stalroute.acme.roles`);
#: ``certificate_install`` goes from a supervisor to its workers only.
ACME_CHANGES = frozenset({"acme_challenge", "acme_challenge_withdraw", "certificate_issued",
                          "certificate_install", "certificate_renew"})

#: Changes of the mapping store: routes are dropped, the store is shared (or re-read).
STORE_CHANGES = frozenset({"mapping_put", "mapping_delete", "mappings_import",
                           "mappings_reload"})


class UnknownDestination(ValueError):
    """A mapping write names a destination the configuration does not declare."""


@dataclass(frozen=True)
class Done:
    """What one change did on this instance, and who in the fleet applied it."""

    #: Sessions kicked or routes dropped on this instance (every worker of it).
    count: int
    #: Who applied it (None without a coordinator: this instance alone).
    acknowledgement: Acknowledgement | None = None

    def fields(self) -> dict[str, Any]:
        """The admin answer's ``applied``/``members`` (and laggards) when a coordinator is set."""
        return {} if self.acknowledgement is None else self.acknowledgement.as_dict()


class Control:
    """What an operator can ask of, and do to, a running stalroute."""

    def __init__(self, proxy: RunningProxy, cluster: Cluster | None = None,
                 workers: LocalWorkers | None = None) -> None:
        self._proxy = proxy
        #: The bus this instance's changes go out on and the others' come in from (None:
        #: changes stay on this instance).
        self._cluster = cluster
        #: The processes that serve this instance's listeners (None: this one).
        self._workers = workers
        if cluster is not None:
            cluster.attach(self.apply, self._bus_changed, lambda: self.runtime.config)
            cluster.on_superseded = self._superseded_changed

    @property
    def runtime(self) -> Runtime:
        return self._proxy.runtime

    # health --------------------------------------------------------------------------

    async def readiness(self) -> Readiness:
        found = await readiness(self.runtime, self._proxy.reactor)
        if self._workers is None:
            return found
        # The workers route: their circuits, not the supervisor's, say whether it is down.
        reasons = list(found.reasons)
        default = self.runtime.config.routing.default_destination
        if any(row["name"] == default and row["circuit"] == "open"
               for row in await self.instance_destinations()):
            reasons.append(f"default destination {default} is marked down")
        if not self._workers.serving():
            reasons.append("no worker process is serving")
        return Readiness(not reasons, tuple(reasons))

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
        """This process's figures: the reference product's top-level keys (``cache_hits`` …
        ``active_connections``), then stalroute's breakdown. Hits are answers the cache gave
        (positive and negative tiers); misses are lookups that went to the store; a remembered
        store failure (transient tier) is neither."""
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
        }

    def report(self, parts: Collection[str] = REPORT_PARTS) -> Report:
        """What the admin API shows of this process, as plain data (what a worker sends its
        supervisor): the ``parts`` asked for, so that a readiness probe does not list every
        session."""
        build = {"stats": self.stats, "connections": self.connections,
                 "destinations": self.destinations,
                 "measured": lambda: measured_report(self.runtime.metrics)}
        return {part: build[part]() for part in parts}

    def reports(self, parts: Collection[str] = REPORT_PARTS) -> Deferred[list[Report]]:
        """The reports of the processes serving this instance: its workers, or this one."""
        if self._workers is not None:
            return self._workers.reports(parts)
        return succeed([self.report(parts)])

    async def instance_stats(self) -> dict[str, Any]:
        """``GET /stats``: every worker's figures summed (each listed under ``workers``), and
        the bus's state."""
        stats = instance_stats(await self.reports(("stats",)), self._workers is not None)
        if self._cluster is not None:
            stats["cluster"] = self._cluster.stats()
        return stats

    async def instance_connections(self) -> list[dict[str, Any]]:
        return instance_connections(await self.reports(("connections",)))

    async def instance_destinations(self) -> list[dict[str, Any]]:
        return instance_destinations(await self.reports(("destinations",)))

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

    def reset_destination(self, name: str) -> Deferred[Done] | None:
        """Close the circuit of ``name`` everywhere; None when no such destination exists."""
        if name not in self.runtime.connector.breakers:
            return None
        log.info("admin: circuit of destination {name} reset", name=name)
        return self.change("reset_destination", name=name)

    # mappings ------------------------------------------------------------------------

    def normalize(self, identifier: str) -> str:
        return normalize_identifier(identifier, self.runtime.config.mapping.normalize)

    async def get_mapping(self, identifier: str) -> str | None:
        return await self.runtime.router.store.lookup(self.normalize(identifier))

    async def put_mapping(self, identifier: str, destination: str) -> Done:
        """Write to the store, then drop the cached route everywhere, so that no login routed
        after the answer sees the old one."""
        runtime = self.runtime
        if destination not in runtime.config.destinations:
            raise UnknownDestination(destination)
        if not runtime.router.store.writable:
            raise ReadOnlyStore("the mapping store is read-only")
        key = self.normalize(identifier)
        await runtime.router.store.upsert(key, destination)
        log.info("admin: mapped {identifier} to {destination}", identifier=redact(key),
                 destination=destination)
        return await self.change("mapping_put", identifier=key, destination=destination)

    async def delete_mapping(self, identifier: str) -> tuple[bool, Done]:
        """Whether the mapping existed, and who dropped the cached route."""
        runtime = self.runtime
        if not runtime.router.store.writable:
            raise ReadOnlyStore("the mapping store is read-only")
        key = self.normalize(identifier)
        existed = await runtime.router.store.delete(key)
        log.info("admin: mapping of {identifier} deleted", identifier=redact(key))
        return existed, await self.change("mapping_delete", identifier=key)

    async def reload_mappings(self) -> tuple[int | None, Done]:
        """The entries now in the store (None when it cannot count them), and who reloaded."""
        entries = await self.runtime.router.store.reload()
        log.info("admin: mappings reloaded ({entries} entries)", entries=entries)
        return entries, await self.change("mappings_reload")

    def imported(self, keys: list[str]) -> Deferred[Done]:
        """A bulk import wrote ``keys``: drop their routes here, and every route elsewhere
        (a change carries no key list)."""
        for key in keys:
            self.runtime.router.cache.invalidate(key)
        return self.change("mappings_import")

    def invalidate(self, identifier: str | None = None) -> Deferred[Done]:
        key = None if identifier is None else self.normalize(identifier)
        log.info("admin: cache invalidated for {what}",
                 what="everything" if key is None else redact(key))
        return self.change("invalidate", identifier=key)

    # sessions ------------------------------------------------------------------------

    def connections(self) -> list[dict]:
        now = self._proxy.reactor.seconds()
        return [{"id": s.id, "protocol": s.listener.protocol, "listener": s.listener.name,
                 "client": f"{s.client[0]}:{s.client[1]}", "identifier": s.account,
                 "destination": s.destination, "bytes_in": s.bytes_in,
                 "bytes_out": s.bytes_out, "age": round(now - s.started, 3)}
                for s in self.runtime.registry.routed()]

    def kick(self, identifier: str | None = None,
             destination: str | None = None) -> Deferred[Done]:
        """Close the spliced sessions of an account and/or on a destination (drain a node)."""
        key = None if identifier is None else self.normalize(identifier)
        done = self.change("kick", identifier=key, destination=destination)

        def logged(done: Done) -> Done:
            log.info("admin: kicked {count} sessions (identifier={identifier}, "
                     "destination={destination})", count=done.count,
                     identifier=redact(key) if key else "-", destination=destination or "-")
            return done

        return done.addCallback(logged)

    def _kick(self, key: str | None, destination: str | None) -> int:
        victims = [s for s in self.runtime.registry.routed()
                   if (key is None or s.account == key)
                   and (destination is None or s.destination == destination)]
        for session in victims:
            try:
                session.close(Outcome.KICKED)
            except Exception:  # one broken session must not spare the others
                log.failure("admin: kicking session {session} failed", session=session.id)
        return len(victims)

    def delay(self, identifier: str, seconds: float) -> Deferred[Done]:
        key = self.normalize(identifier)
        log.info("admin: logins of {identifier} held for {seconds}s", identifier=redact(key),
                 seconds=seconds)
        return self.change("delay", identifier=key, seconds=seconds)

    # changes -------------------------------------------------------------------------

    def change(self, op: str, **args: Argument) -> Deferred[Done]:
        """Apply a change made through this instance here, in its workers and (published) in
        the rest of the fleet; fires once all of them applied it (or gave up waiting)."""
        here = self.apply_here(op, args, remote=False)
        workers = self._workers.apply(op, args) if self._workers is not None else succeed(0)
        published: Deferred[Any] = (
            self._cluster.publish(op, **args)
            if self._cluster is not None and self._cluster.coordinator is not None
            else succeed(None))
        done: Deferred[list[Any]] = gatherResults([here, workers, published],
                                                  consumeErrors=True)
        return done.addCallback(lambda results: Done(results[0] + results[1], results[2]))

    def apply(self, change: Change) -> Deferred[None]:
        """Apply a change another instance made and published, here and in the workers; fires
        once they all did (then the bus acknowledges it)."""
        log.info("cluster: applied {op} #{seq} of node {node}", op=change.op, seq=change.seq,
                 node=change.node)
        return self.apply_in_instance(change.op, change.args)

    def apply_in_instance(self, op: str, args: Mapping[str, Argument]) -> Deferred[None]:
        """Apply a change in this instance only: this process and its workers (a change from
        another instance, or state this instance read from a shared store)."""
        here = self.apply_here(op, args)
        workers = self._workers.apply(op, dict(args)) if self._workers is not None else succeed(0)
        return gatherResults([here, workers], consumeErrors=True).addCallback(lambda _: None)

    def apply_here(self, op: str, args: Mapping[str, Argument],
                   remote: bool = True) -> Deferred[int]:
        """Apply one change in this process: the sessions kicked or routes dropped. ``remote``:
        the mapping store was written by another process, so a store held in memory (the
        file) is re-read before the route is dropped."""
        runtime = self.runtime
        count = 0
        if op in STORE_CHANGES:
            key = _optional(args.get("identifier"))
            if remote:
                return self._store_changed(key)
            if op != "mappings_import":  # imported() dropped the imported keys' routes
                count = runtime.router.cache.invalidate(key)
        elif op == "invalidate":
            count = runtime.router.cache.invalidate(_optional(args["identifier"]))
        elif op == "kick":
            count = self._kick(_optional(args["identifier"]), _optional(args["destination"]))
        elif op == "delay":
            runtime.delays.delay(_text(args["identifier"]), _number(args["seconds"]))
        elif op == "reset_destination":
            breaker = runtime.connector.breakers.get(_text(args["name"]))
            if breaker is not None:
                breaker.reset()
        elif op in ACME_CHANGES:
            return self._acme_change(op, args, remote)
        else:
            raise ValueError(f"unknown change {op!r}")
        return succeed(count)

    def _acme_change(self, op: str, args: Mapping[str, Argument],
                     remote: bool) -> Deferred[int]:
        """The ACME changes (:mod:`stalroute.acme.roles`): challenge material for this
        process's table; a certificate another process stored, to load (the process that
        runs the renewal service: it then hands it to its workers); a certificate handed
        down by the supervisor (``certificate_install``: workers only, never on the bus); a
        forced renewal, for the process that renews now."""
        manager = getattr(self._proxy, "certificates", None)  # the renewal service, if any
        name = _text(args.get("name"))
        if op == "acme_challenge":
            add_challenge(_text(args["kind"]), _text(args["domain"]),
                          _text(args["challenge_token"]), _text(args["key_authorization"]))
        elif op == "acme_challenge_withdraw":
            remove_challenge(_text(args["kind"]), _text(args["domain"]),
                             _text(args["challenge_token"]))
        elif op == "certificate_issued":
            if remote and manager is not None and name in manager.certificates:
                return Deferred.fromCoroutine(manager.load(name)).addCallback(lambda _: 0)
        elif op == "certificate_install":
            self.runtime.server_tls.install(name, _text(args["chain"]).encode("ascii"),
                                            _text(args["key"]).encode("ascii"))
        elif op == "certificate_renew":
            if manager is not None and manager.renews and name in manager.certificates:
                log.info("acme: certificate {name}: renewal asked through the admin API",
                         name=name)
                manager.renew(name)  # the answer does not wait for the order
        return succeed(0)

    def _store_changed(self, key: str | None) -> Deferred[int]:
        """Re-read the store (a no-op but for the file), then drop the route(s)."""
        runtime = self.runtime
        reloaded = runtime.router.store.reload()
        reloaded.addErrback(lambda failure: log.error(
            "cluster: re-reading the mapping store failed: {reason}",
            reason=failure.getErrorMessage()))
        return reloaded.addCallback(lambda _: runtime.router.cache.invalidate(key))

    def _bus_changed(self, connected: bool) -> None:
        """While the bus is down changes may be missed: cap the age of cached routes; once it
        is back, drop them all (they may be stale). Workers follow (:meth:`bus_state`)."""
        self.bus_state(connected)
        if self._workers is not None:
            self._workers.bus_state(connected)

    def _superseded_changed(self, superseded: bool) -> None:
        """Another process with this node_id started earlier (or left): not ready here, on
        the admin API and the HTTP listeners alike, and in every worker."""
        self.superseded(superseded)
        if self._workers is not None:
            self._workers.superseded(superseded)

    def superseded(self, superseded: bool) -> None:
        self.runtime.registry.superseded = superseded

    def bus_state(self, connected: bool) -> int:
        """Follow the bus state in this process; the routes dropped."""
        cache = self.runtime.router.cache
        if connected:
            cache.max_age = None
            dropped = cache.invalidate()
            log.info("cluster: route cache dropped on connecting to the coordinator "
                     "({dropped} entries)", dropped=dropped)
            return dropped
        cache.max_age = self.runtime.config.cluster.fallback_ttl
        return 0

    # configuration -------------------------------------------------------------------

    async def reload_config(self) -> list[str]:
        """Read the configuration file again here (see :meth:`RunningProxy.reload_config`),
        then in every worker."""
        needs_restart = self._proxy.reload_config()
        if self._workers is not None:
            await self._workers.reload()
        return needs_restart

    def cluster_state(self) -> dict[str, Any] | None:
        """The bus's figures for ``/metrics`` (None without ``[cluster]``)."""
        return None if self._cluster is None else self._cluster.stats()

    # certificates --------------------------------------------------------------------

    def certificates(self) -> list[dict[str, Any]]:
        """``GET /certificates``: every ``[tls.certificate.<name>]`` entry as this process
        serves it (read from the listeners' :class:`~stalroute.tls.ServerTLS`, so an ACME
        entry shows its self-signed placeholder until issued), and for ``acme =`` entries
        who renews it and how the renewal goes. Only this instance: with ``[cluster]`` every
        instance lists its own (they serve the same certificates within seconds)."""
        runtime = self.runtime
        config = runtime.config
        now = self._proxy.reactor.seconds()
        managed = self._certificate_manager()
        status: dict[str, dict[str, object]] = (
            {} if managed is None else {str(row["name"]): row for row in managed.status()})
        rows: list[dict[str, Any]] = []
        for name, entry in config.tls.certificates.items():
            leaf = runtime.server_tls.leaves.get(name)
            row: dict[str, Any] = {
                "name": name, "source": "file" if entry.acme is None else f"acme:{entry.acme}",
                "default": entry.default or name == "*",
                **_describe_leaf(leaf, now)}
            if entry.acme is None:
                row["cert"] = str(entry.cert)
            else:
                renewal = status.get(name, {})
                row["renews"] = self._renewer(renewal.get("renews"))
                for key in ("domains", "failures", "last_error", "next_check"):
                    row[key] = renewal.get(key)
                if row["domains"] is None and entry.acme in config.acme:
                    row["domains"] = list(config.acme[entry.acme].domains)
            rows.append(row)
        return rows

    def _certificate_manager(self) -> CertificateStatus | None:
        """This process's renewal service (``ProxyService.certificates``), if any."""
        return getattr(self._proxy, "certificates", None)

    def _renewer(self, here: object) -> dict[str, Any]:
        """Who renews an ACME certificate: ``here`` (this process performs ``acme_renew``)
        and ``nodes``, the node ids of ``[cluster.roles] acme_renew`` (empty: any member, one
        at a time; ``null`` without a coordinator: this instance alone)."""
        cluster = self.runtime.config.cluster
        if cluster.coordinator == "none":
            return {"here": True if here is None else bool(here), "nodes": None}
        nodes = list(cluster.roles.acme_renew)
        if here is None:
            here = not nodes or cluster.node_id in nodes
        return {"here": bool(here), "nodes": nodes}

    def renew_certificate(self, name: str) -> Deferred[Done]:
        """Order a new certificate for the ``acme =`` entry ``name`` now, wherever it is
        renewed (the caller checked that the entry exists and uses ACME)."""
        log.info("admin: renewal of certificate {name} requested", name=name)
        return self.change("certificate_renew", name=name)


def _text(value: Argument) -> str:
    return str(value)


def _optional(value: Argument) -> str | None:
    return None if value is None else str(value)


def _number(value: Argument) -> float:
    return float(value) if isinstance(value, (int, float)) else 0.0


class CertificateStatus(Protocol):
    """What :meth:`Control.certificates` reads of the renewal service
    (:class:`~stalroute.acme.manager.CertificateManager`)."""

    def status(self) -> list[dict[str, object]]:
        """Per ``acme =`` entry: name, failures, last_error, next_check, renews, domains …"""


def _describe_leaf(leaf: x509.Certificate | None, now: float) -> dict[str, Any]:
    """The listing fields of a served leaf certificate (all None when nothing is served)."""
    if leaf is None:
        return {"subjects": [], "issuer": None, "issuer_cn": None, "self_signed": None,
                "serial": None, "not_before": None, "not_after": None, "expires_in": None}
    not_after = leaf.not_valid_after_utc
    common_names = leaf.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)
    return {"subjects": certificate_subjects(leaf), "issuer": leaf.issuer.rfc4514_string(),
            "issuer_cn": str(common_names[0].value) if common_names else None,
            "self_signed": leaf.issuer == leaf.subject, "serial": f"{leaf.serial_number:x}",
            "not_before": leaf.not_valid_before_utc.isoformat(),
            "not_after": not_after.isoformat(),
            "expires_in": round(not_after.timestamp() - now, 3)}
