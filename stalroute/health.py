"""Readiness (SPEC §9), the one definition behind the admin API's and the HTTP listeners'
``/healthz/ready``: not ready while draining, while the mapping store does not answer,
while the default destination's circuit is open, or while another live process with this
``node_id`` started before this one. Liveness only says the process answers."""

from __future__ import annotations

from dataclasses import dataclass

from twisted.internet.interfaces import IReactorTime

from stalroute.runtime import Runtime

#: Looked up by readiness checks; identifiers never contain a space, so no row matches and
#: the answer only says whether the store responds.
READINESS_PROBE_KEY = "stalroute readiness probe"


@dataclass(frozen=True)
class Readiness:
    ready: bool
    reasons: tuple[str, ...]


async def readiness(runtime: Runtime, clock: IReactorTime) -> Readiness:
    reasons: list[str] = []
    if runtime.registry.draining:
        reasons.append("draining")
    if runtime.registry.superseded:
        reasons.append(f"node_id {runtime.config.cluster.node_id} is used by a process "
                       "that started earlier")
    default = runtime.config.routing.default_destination
    if runtime.connector.breakers[default].state == "open":
        reasons.append(f"default destination {default} is marked down")
    lookup = runtime.router.store.lookup(READINESS_PROBE_KEY)
    lookup.addTimeout(runtime.config.mapping.lookup_timeout, clock)
    try:
        await lookup
    except Exception as exc:  # any failure (error, timeout) means "not ready"
        reasons.append(f"mapping store unreachable ({exc.__class__.__name__})")
    return Readiness(not reasons, tuple(reasons))
