"""Who is in the fleet (SPEC §2.11): every instance announces itself on the coordinator's
channel at start and every :data:`HEARTBEAT`; each keeps the members it heard from (itself
included) until :data:`EXPIRY_BEATS` heartbeats pass in silence, and names the mismatches an
operator must fix (``GET /cluster``).

An announce is ``{"op": "announce", "node": node_id, "token": ..., ...}``: the per-process
``token`` tells apart two processes given the same ``node_id``; of those, the one that started
later (``started``; the token breaks a tie) reports itself not ready.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from twisted.internet.interfaces import IReactorTime

from stalroute.config import Config
from stalroute.logs import logger
from stalroute.mapping import redact_url

log = logger("stalroute.cluster")

#: Seconds between two announces of one instance.
HEARTBEAT = 5.0
#: A member silent for this many heartbeats has left.
EXPIRY_BEATS = 3
#: The ``op`` of an announce (not a state change: never applied nor acknowledged).
ANNOUNCE = "announce"
#: Longest process token read (this version sends 16 hex digits).
MAX_TOKEN = 64


def _package_version() -> str:
    try:
        return version("stalroute")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


VERSION = _package_version()


class BadAnnounce(ValueError):
    """An announce this version cannot read."""


@dataclass(frozen=True)
class Member:
    """One instance, as it describes itself."""

    node_id: int
    token: str
    started: float
    hostname: str | None
    version: str
    workers: int
    #: ``{"name", "protocol", "bind": ["host:port", ...]}`` per listener.
    listeners: tuple[dict[str, Any], ...]
    destinations: tuple[str, ...]
    config_digest: str


def _public(value: Any) -> Any:
    """``value`` as plain JSON data; of the fields kept out of ``repr`` (secrets), only URLs
    are kept, with their passwords hidden (a store URL says where routes come from)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        shown = {f.name: _public(getattr(value, f.name)) for f in dataclasses.fields(value)
                 if f.repr}
        shown.update({f.name: redact_url(getattr(value, f.name))
                      for f in dataclasses.fields(value) if not f.repr
                      and isinstance(getattr(value, f.name), str)
                      and "://" in getattr(value, f.name)})
        return shown
    if isinstance(value, dict):
        return {str(key): _public(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [_public(item) for item in value]
        return sorted(items, key=repr) if isinstance(value, (set, frozenset)) else items
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)  # paths, addresses, compiled patterns


def config_digest(config: Config) -> str:
    """sha256 of what decides where a login goes: destinations, routing, the mapping store's
    settings (secrets left out) and the HTTP routes."""
    routing = {"destinations": config.destinations, "routing": config.routing,
               "mapping": config.mapping, "http_routes": config.http.routes}
    canonical = json.dumps(_public(routing), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def describe(config: Config, token: str, started: float) -> Member:
    """This instance under ``config``."""
    listeners = tuple({"name": name, "protocol": listener.protocol,
                       "bind": [f"{host}:{port}" for host, port in listener.bind]}
                      for name, listener in config.listeners.items())
    return Member(config.cluster.node_id, token, started, config.server.hostname, VERSION,
                  config.server.workers, listeners, tuple(sorted(config.destinations)),
                  config_digest(config))


def encode_announce(member: Member) -> str:
    fields = dataclasses.asdict(member)
    fields["node"] = fields.pop("node_id")
    return json.dumps({"op": ANNOUNCE, **fields}, separators=(",", ":"))


def is_announce(document: object) -> bool:
    return isinstance(document, dict) and document.get("op") == ANNOUNCE


def is_token(value: object) -> bool:
    """Whether ``value`` can name a process: a short non-empty string."""
    return isinstance(value, str) and 0 < len(value) <= MAX_TOKEN


def decode_announce(document: dict[str, Any]) -> Member:
    """The member an announce document describes; BadAnnounce when it is malformed."""
    try:
        member = Member(
            node_id=document["node"], token=document["token"], started=document["started"],
            hostname=document["hostname"], version=document["version"],
            workers=document["workers"], listeners=tuple(document["listeners"]),
            destinations=tuple(document["destinations"]),
            config_digest=document["config_digest"])
    except (KeyError, TypeError) as exc:
        raise BadAnnounce(f"announce without {exc}") from None
    if (type(member.node_id) is not int or type(member.workers) is not int
            or not is_token(member.token) or not isinstance(member.version, str)
            or not isinstance(member.started, (int, float)) or isinstance(member.started, bool)
            or not isinstance(member.hostname, (str, type(None)))
            or not isinstance(member.config_digest, str)
            or not isinstance(document["listeners"], list)
            or not isinstance(document["destinations"], list)
            or not all(isinstance(name, str) for name in member.destinations)
            or not all(isinstance(listener, dict) for listener in member.listeners)):
        raise BadAnnounce("announce with a field of the wrong type")
    return member


def _started_first(member: Member) -> tuple[float, str]:
    return (member.started, member.token)


class Membership:
    """The members this instance heard from, by token, with when it last heard them."""

    def __init__(self, clock: IReactorTime, heartbeat: float = HEARTBEAT) -> None:
        self._clock = clock
        self.heartbeat = heartbeat
        self._seen: dict[str, tuple[Member, float]] = {}
        #: Tokens of the duplicates of our node_id already logged.
        self._reported: set[str] = set()
        #: Until when silent members are kept: forever while the bus is down (nobody can be
        #: heard, and a write must name them unreachable), one expiry window after it is back.
        self._keep_until = 0.0

    def knows(self, token: str) -> bool:
        return token in self._seen

    def heard(self, member: Member) -> None:
        self._seen[member.token] = (member, self._clock.seconds())

    def bus_state(self, connected: bool) -> None:
        """Keep every member while the bus is down; after it is back, forget those that do
        not announce themselves within one expiry window."""
        limit = EXPIRY_BEATS * self.heartbeat
        self._keep_until = self._clock.seconds() + limit if connected else float("inf")

    def _forget_silent(self) -> None:
        """Forget the members not heard within :data:`EXPIRY_BEATS` heartbeats."""
        now = self._clock.seconds()
        if now < self._keep_until:
            return
        limit = EXPIRY_BEATS * self.heartbeat
        for token in [t for t, (_, seen) in self._seen.items() if now - seen > limit]:
            del self._seen[token]

    def live(self, me: Member) -> list[tuple[Member, float]]:
        """The members heard within :data:`EXPIRY_BEATS` heartbeats (``me`` always), by
        node_id, with seconds since each was last heard; forgets the others."""
        self._forget_silent()
        now = self._clock.seconds()
        others = [(member, now - seen) for member, seen in self._seen.values()
                  if member.token != me.token]
        return sorted([(me, 0.0), *others],
                      key=lambda pair: (pair[0].node_id, _started_first(pair[0])))

    def others(self, token: str) -> dict[str, int]:
        """The node_id of every live member but the process ``token``, by token: those that
        must acknowledge what that process publishes."""
        self._forget_silent()
        return {other: member.node_id for other, (member, _) in self._seen.items()
                if other != token}

    def duplicates(self, me: Member) -> list[Member]:
        """Live members with ``me``'s node_id, another process; each logged once."""
        found = [member for member, _ in self.live(me)
                 if member.node_id == me.node_id and member.token != me.token]
        for member in found:
            if member.token not in self._reported:
                self._reported.add(member.token)
                log.error("cluster: another process (on {hostname}, started at {started}) "
                          "also runs as node_id {node}; give each instance its own node_id",
                          hostname=member.hostname or "?", started=member.started,
                          node=me.node_id)
        return found

    def superseded(self, me: Member) -> bool:
        """Whether ``me`` duplicates the node_id of a live member that started before it."""
        return any(_started_first(other) < _started_first(me) for other in self.duplicates(me))

    def view(self, me: Member) -> dict[str, Any]:
        """``GET /cluster``: the live members and the mismatches among them."""
        live = self.live(me)
        members = [{"node_id": member.node_id, "hostname": member.hostname,
                    "version": member.version, "workers": member.workers,
                    "listeners": list(member.listeners),
                    "destinations": list(member.destinations),
                    "config_digest": member.config_digest, "started": member.started,
                    "last_seen": round(age, 3), "self": member.token == me.token}
                   for member, age in live]
        return {"members": members, "problems": problems([member for member, _ in live])}


def problems(members: list[Member]) -> list[str]:
    """What differs among ``members`` that must not."""
    found: list[str] = []
    by_node: dict[int, list[Member]] = {}
    for member in members:
        by_node.setdefault(member.node_id, []).append(member)
    for node_id, same in sorted(by_node.items()):
        if len(same) > 1:
            later = sorted(same, key=_started_first)[1:]
            found.append(f"node_id {node_id} is used by {len(same)} processes (on "
                         f"{', '.join(m.hostname or '?' for m in same)}); the later "
                         f"{'one is' if len(later) == 1 else 'ones are'} not ready")
    for label, values in (("server.hostname", lambda m: m.hostname or "(unset)"),
                          ("destinations", lambda m: ",".join(m.destinations)),
                          ("config digest", lambda m: m.config_digest[:12])):
        seen: dict[str, list[int]] = {}
        for member in members:
            seen.setdefault(values(member), []).append(member.node_id)
        if len(seen) > 1:
            found.append(f"{label} differs: " + "; ".join(
                f"{value} on node {', '.join(map(str, nodes))}"
                for value, nodes in sorted(seen.items())))
    return found
