"""State changes shared by the instances of a fleet over a coordinator (SPEC §2.11).

Every change made through the admin API is applied locally at once, then published as one
JSON message on the coordinator's channel (:mod:`stalroute.coordinators`)::

    {"node": node_id, "token": sender_token, "seq": n, "op": ..., <arguments>}

``token`` names the sending process (:attr:`Cluster.token`, as in its announces): a process
ignores its own changes by it. Every other one applies the change (the mapping store is
shared, so a remote mapping write only drops the cached route) and, once the applier is done,
acknowledges it on the same channel::

    {"op": "ack", "node": acker_node_id, "token": acker_token, "to": sender_token, "seq": n}

A process reads only the acks addressed to its token (``acks_heard``; an ack is never applied).
:meth:`Cluster.publish` answers an :class:`Acknowledgement` once every member live when it
published (:class:`~stalroute.membership.Membership`) has acked, or after :data:`ACK_TIMEOUT`
naming the silent ones (laggards); while the bus is down, at once, naming every other member
unreachable. "Applied by all" thus means no live instance routes by the old state any more.

The same channel carries each instance's announces (:mod:`stalroute.membership`): they are
neither changes nor acks, and are counted apart (``announces_heard``).

Messages published while the bus is down are lost: while it is down the routing cache serves
an entry for at most ``cluster.fallback_ttl`` (a cap the applier sets on the cache), and on
reconnect the applier drops the whole cache. See :class:`Cluster`.
"""

from __future__ import annotations

import json
import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from twisted.internet import reactor
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from stalroute.config import ClusterConfig, Config
from stalroute.coordinators import (CHANNEL, Coordinator, PostgreSQLCoordinator,
                                    RedisCoordinator)
from stalroute.logs import logger
from stalroute.membership import (HEARTBEAT, BadAnnounce, Member, Membership, decode_announce,
                                  describe, encode_announce, is_announce, is_token)

log = logger("stalroute.cluster")

#: Change kinds and the arguments each carries (with their types).
OPS: dict[str, dict[str, tuple[type, ...]]] = {
    "mapping_put": {"identifier": (str,), "destination": (str,)},
    "mapping_delete": {"identifier": (str,)},
    "mappings_import": {},
    "mappings_reload": {},
    "invalidate": {"identifier": (str, type(None))},
    "kick": {"identifier": (str, type(None)), "destination": (str, type(None))},
    "delay": {"identifier": (str,), "seconds": (int, float)},
    "reset_destination": {"name": (str,)},
    # ACME (SPEC §2.13, stalroute.acme.roles): challenge material before it is answered and
    # after, a certificate stored by the renewing node, a renewal forced through the admin API.
    # (``challenge_token``: ``token`` names the sender of every message.)
    "acme_challenge": {"kind": (str,), "domain": (str,), "challenge_token": (str,),
                       "key_authorization": (str,)},
    "acme_challenge_withdraw": {"kind": (str,), "domain": (str,), "challenge_token": (str,)},
    "certificate_issued": {"name": (str,)},
    "certificate_renew": {"name": (str,)},
}
#: Longest message decoded (a change is a few hundred bytes).
MAX_MESSAGE = 16 * 1024
#: The ``op`` of an acknowledgement (not a state change: never applied).
ACK = "ack"
#: Seconds a write waits for the other members' acknowledgements.
ACK_TIMEOUT = 2.0
#: Writes awaiting acknowledgements at most; a write beyond is answered at once.
MAX_PENDING = 10_000

Argument = str | float | None


class BadMessage(ValueError):
    """A message on the channel that is not a change this version understands."""


@dataclass(frozen=True)
class Change:
    """One state change, as published by process ``token`` of instance ``node`` (its
    ``seq``-th)."""

    node: int
    token: str
    seq: int
    op: str
    args: dict[str, Argument] = field(default_factory=dict)


@dataclass(frozen=True)
class Ack:
    """Process ``token`` of instance ``node`` applied change ``seq`` of process ``to``."""

    node: int
    token: str
    to: str
    seq: int


@dataclass(frozen=True)
class Acknowledgement:
    """Who applied one change: this instance counts as one member and has applied it."""

    #: Members that applied it (this instance included).
    applied: int
    #: Members live when it was published (this instance included), plus any unexpected acker.
    members: int
    #: Node ids of live members that did not ack within :data:`ACK_TIMEOUT`.
    laggards: tuple[int, ...] = ()
    #: Node ids of live members it could not be sent to (bus down, publish failed).
    unreachable: tuple[int, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """The admin API's answer: ``laggards``/``unreachable`` only when there are some."""
        answer: dict[str, Any] = {"applied": self.applied, "members": self.members}
        if self.laggards:
            answer["laggards"] = list(self.laggards)
        if self.unreachable:
            answer["unreachable"] = list(self.unreachable)
        return answer


def encode(change: Change) -> str:
    return json.dumps({"node": change.node, "token": change.token, "seq": change.seq,
                       "op": change.op, **change.args}, separators=(",", ":"))


def encode_ack(ack: Ack) -> str:
    return json.dumps({"op": ACK, "node": ack.node, "token": ack.token, "to": ack.to,
                       "seq": ack.seq}, separators=(",", ":"))


def _finite(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise BadMessage(f"{text} is out of range")
    return number


def _no_constant(name: str) -> float:
    raise BadMessage(f"{name} is no number")


def parse(message: str | bytes) -> dict[str, Any]:
    """The JSON object a message carries (finite numbers only); BadMessage when it is none."""
    if len(message) > MAX_MESSAGE:
        raise BadMessage(f"longer than {MAX_MESSAGE} bytes")
    try:
        document = json.loads(message, parse_float=_finite, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested too deeply
        raise BadMessage(f"not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise BadMessage("not a JSON object")
    return document


def decode_message(message: str | bytes) -> Change | Ack | Member:
    """What a message on the channel carries; BadMessage (BadAnnounce for an announce) when
    it is nothing this version reads."""
    document = parse(message)
    if is_announce(document):
        return decode_announce(document)
    if document.get("op") == ACK:
        return decode_ack(document)
    return decode_change(document)


def decode_change(document: dict[str, Any]) -> Change:
    """The change a parsed message carries; BadMessage when it is not one."""
    node, token, seq, op = (document.pop(key, None) for key in ("node", "token", "seq", "op"))
    if type(node) is not int or type(seq) is not int:
        raise BadMessage("node and seq must be integers")
    if not is_token(token):
        raise BadMessage("token must be a short string")
    if not isinstance(op, str) or op not in OPS:  # a list or an object is no key
        raise BadMessage(f"unknown op {op!r}")
    expected = OPS[op]
    if set(document) != set(expected):
        raise BadMessage(f"{op} takes {', '.join(sorted(expected)) or 'no arguments'}")
    for name, types in expected.items():
        if not isinstance(document[name], types) or isinstance(document[name], bool):
            raise BadMessage(f"{op}: bad {name}")
    return Change(node, token, seq, op, document)


def decode_ack(document: dict[str, Any]) -> Ack:
    """The acknowledgement a parsed message carries; BadMessage when it is not one."""
    if set(document) != {"op", "node", "token", "to", "seq"}:
        raise BadMessage("an ack carries op, node, token, to and seq")
    node, token, to, seq = (document[key] for key in ("node", "token", "to", "seq"))
    if type(node) is not int or type(seq) is not int:
        raise BadMessage("ack: node and seq must be integers")
    if not is_token(token) or not is_token(to):
        raise BadMessage("ack: token and to must be short strings")
    return Ack(node, token, to, seq)


@dataclass
class _Pending:
    """One published change awaiting the acknowledgements of the other members."""

    op: str
    published: float
    #: The members yet to ack, node_id by token.
    waiting: dict[str, int]
    timer: IDelayedCall
    #: The members that acked, node_id by token.
    acked: dict[str, int] = field(default_factory=dict)
    answer: Deferred[Acknowledgement] = field(default_factory=Deferred)

    def acknowledgement(self, sent: bool) -> Acknowledgement:
        """So far; those yet to ack are laggards, or unreachable when it was not ``sent``."""
        silent = tuple(sorted(self.waiting.values()))
        return Acknowledgement(1 + len(self.acked), 1 + len(self.acked) + len(self.waiting),
                               laggards=silent if sent else (),
                               unreachable=() if sent else silent)


class Cluster:
    """This instance's end of the bus: numbers and publishes its changes and waits for their
    acknowledgements, hands the others' changes to the applier (:meth:`attach`) and
    acknowledges them, and counts all of it. It also announces this instance every
    :data:`~stalroute.membership.HEARTBEAT` and keeps the :class:`Membership` it hears."""

    def __init__(self, node_id: int, coordinator: Coordinator | None,
                 clock: IReactorTime = cast(IReactorTime, reactor),
                 heartbeat: float = HEARTBEAT) -> None:
        self.node_id = node_id
        self.coordinator = coordinator
        self._clock = clock
        self._seq = 0
        self.published = 0
        self.applied = 0
        self.announces_heard = 0
        self.acks_heard = 0
        #: Round trip of the slowest ack of the last write every member acked (None: none yet).
        self.ack_seconds: float | None = None
        #: This process's writes awaiting acknowledgements, by seq.
        self._pending: dict[int, _Pending] = {}
        #: Tells this process from another one given the same node_id.
        self.token = secrets.token_hex(8)
        self.started = clock.seconds()
        self.membership = Membership(clock, heartbeat)
        self._heartbeat = LoopingCall(self.announce)
        self._heartbeat.clock = clock
        self._apply: Callable[[Change], Deferred[None] | None] = lambda change: None
        self._on_connection: Callable[[bool], None] = lambda connected: None
        self._config: Callable[[], Config] | None = None
        #: Told whenever :meth:`superseded` changes (checked at each heartbeat and announce).
        self.on_superseded: Callable[[bool], None] = lambda superseded: None
        self._superseded = False

    @property
    def connected(self) -> bool:
        return self.coordinator is not None and self.coordinator.connected

    def attach(self, apply: Callable[[Change], Deferred[None] | None],
               on_connection: Callable[[bool], None],
               config: Callable[[], Config]) -> None:
        """Who applies remote changes (a change is acknowledged once ``apply`` returned, or
        the Deferred it returned fired, without an error) and follows the bus state (told the
        state at once), and where this instance's current configuration is read for its
        announces."""
        self._apply, self._on_connection, self._config = apply, on_connection, config
        if self.coordinator is not None:
            on_connection(self.connected)

    def start(self) -> None:
        if self.coordinator is not None:
            self.coordinator.start(self._received, self._connection_changed)
            self._heartbeat.start(self.membership.heartbeat, now=False)  # connecting announces

    def stop(self) -> Deferred[None]:
        """Disconnect; the writes still awaiting acknowledgements are answered (laggards)."""
        if self._heartbeat.running:
            self._heartbeat.stop()
        while self._pending:
            self._settle(next(iter(self._pending)))
        return self.coordinator.stop() if self.coordinator is not None else succeed(None)

    def me(self) -> Member:
        """This instance as it announces itself (under its current configuration)."""
        if self._config is None:
            raise RuntimeError("Cluster.attach was not called")
        return describe(self._config(), self.token, self.started)

    def announce(self) -> None:
        """Tell the others this instance is alive (lost while disconnected)."""
        if self.coordinator is not None and self.coordinator.connected:
            self.coordinator.publish(encode_announce(self.me()))
        self._check_superseded()

    def _check_superseded(self) -> None:
        superseded = self.superseded()
        if superseded != self._superseded:
            self._superseded = superseded
            self.on_superseded(superseded)

    def view(self) -> dict[str, Any]:
        """``GET /cluster``: the live members and the problems among them."""
        return self.membership.view(self.me())

    def superseded(self) -> bool:
        """Whether another live process with this node_id started before this one."""
        return self.membership.superseded(self.me())

    # --- this instance's changes ---------------------------------------------------------

    def publish(self, op: str, **args: Argument) -> Deferred[Acknowledgement]:
        """Announce a change this instance has already applied. Fires once every other live
        member acknowledged it, or after :data:`ACK_TIMEOUT` naming the laggards; while the
        bus is down (or when the coordinator could not send it), naming the others
        unreachable. Never fails."""
        if self.coordinator is None:
            return succeed(Acknowledgement(1, 1))
        others = self.membership.others(self.token)
        if not self.coordinator.connected:
            return succeed(Acknowledgement(1, 1 + len(others),
                                           unreachable=tuple(sorted(others.values()))))
        self._seq += 1
        seq = self._seq
        message = encode(Change(self.node_id, self.token, seq, op, args))
        if len(self._pending) >= MAX_PENDING:
            log.error("cluster: {count} writes await acknowledgements already; not waiting for "
                      "those of {op} #{seq}", count=len(self._pending), op=op, seq=seq)
            self.coordinator.publish(message).addCallback(self._count_published)
            return succeed(Acknowledgement(1, 1 + len(others),
                                           laggards=tuple(sorted(others.values()))))
        timer = self._clock.callLater(ACK_TIMEOUT, self._settle, seq)
        pending = _Pending(op, self._clock.seconds(), others, timer)
        self._pending[seq] = pending  # before publishing: the acks may come at once
        self.coordinator.publish(message).addCallback(self._sent, seq)
        return pending.answer

    def _count_published(self, sent: bool) -> None:
        if sent:
            self.published += 1

    def _sent(self, sent: bool, seq: int) -> None:
        """The coordinator's answer: settle a write it could not send, or one nobody else
        has to acknowledge."""
        self._count_published(sent)
        pending = self._pending.get(seq)
        if pending is not None and (not sent or not pending.waiting):
            self._settle(seq, sent)

    def _acked(self, ack: Ack) -> None:
        if ack.to != self.token or ack.token == self.token:
            return
        self.acks_heard += 1
        pending = self._pending.get(ack.seq)
        if pending is None:
            return  # settled already: a late ack, or a repeated one
        pending.waiting.pop(ack.token, None)  # absent: a member this one had not heard of yet
        pending.acked[ack.token] = ack.node
        if not pending.waiting:
            self._settle(ack.seq)

    def _settle(self, seq: int, sent: bool = True) -> None:
        """Answer write ``seq`` with who applied it: everyone acked, or the time is up, or it
        was not sent, or this instance stops."""
        pending = self._pending.pop(seq)
        if pending.timer.active():
            pending.timer.cancel()
        answer = pending.acknowledgement(sent)
        if answer.laggards:
            log.warn("cluster: {op} #{seq} was not acknowledged by node {laggards} within "
                     "{timeout}s", op=pending.op, seq=seq, timeout=ACK_TIMEOUT,
                     laggards=", ".join(map(str, answer.laggards)))
        elif sent and pending.acked:
            self.ack_seconds = self._clock.seconds() - pending.published
        pending.answer.callback(answer)

    # --- the others' messages ------------------------------------------------------------

    def _received(self, message: str | bytes) -> None:
        try:
            decoded = decode_message(message)
        except (BadMessage, BadAnnounce) as exc:
            log.warn("cluster: ignoring a message on {channel}: {problem}", channel=CHANNEL,
                     problem=str(exc))
            return
        if isinstance(decoded, Member):
            self._heard(decoded)
        elif isinstance(decoded, Ack):
            self._acked(decoded)
        elif decoded.token != self.token:
            maybeDeferred(self._apply, decoded).addCallbacks(
                self._applied, self._apply_failed, callbackArgs=(decoded,),
                errbackArgs=(decoded,))

    def _heard(self, member: Member) -> None:
        newcomer = not self.membership.knows(member.token) and member.token != self.token
        self.membership.heard(member)
        self.announces_heard += 1
        if newcomer:  # it cannot know us before our next heartbeat: tell it now
            self.announce()
        if member.node_id == self.node_id and member.token != self.token:
            self.membership.duplicates(self.me())  # logs a new duplicate at once
            self._check_superseded()

    def _applied(self, _: None, change: Change) -> None:
        self.applied += 1
        if self.coordinator is not None and self.coordinator.connected:
            self.coordinator.publish(encode_ack(Ack(self.node_id, self.token, change.token,
                                                    change.seq)))

    def _apply_failed(self, failure: Failure, change: Change) -> None:
        """One bad change must not stop the subscriber; unacknowledged, it makes this
        instance a laggard to the sender."""
        log.failure("cluster: applying {op} #{seq} of node {node} failed", failure=failure,
                    op=change.op, seq=change.seq, node=change.node)

    def _connection_changed(self, connected: bool) -> None:
        self.membership.bus_state(connected)
        if connected:
            log.info("cluster: connected to the {kind} coordinator", kind=self.kind)
            self.announce()
        else:
            log.warn("cluster: lost the {kind} coordinator; cached routes live at most "
                     "cluster.fallback_ttl until it is back", kind=self.kind)
        self._on_connection(connected)

    @property
    def kind(self) -> str:
        return self.coordinator.kind if self.coordinator is not None else "none"

    def stats(self) -> dict[str, Any]:
        if self.coordinator is None:
            return {"coordinator": "none", "node_id": self.node_id}
        return {"coordinator": self.kind, "node_id": self.node_id, "connected": self.connected,
                "published": self.published, "applied": self.applied,
                "announces_heard": self.announces_heard, "acks_heard": self.acks_heard,
                "members": 1 + len(self.membership.others(self.token)),
                "pending_acks": len(self._pending), "ack_seconds": self.ack_seconds}


def build_cluster(settings: ClusterConfig) -> Cluster:
    """This instance's end of ``[cluster]``; InvalidStoreSetting for an unusable URL."""
    coordinator: Coordinator | None = None
    if settings.coordinator == "redis" and settings.url:
        coordinator = RedisCoordinator(settings.url)
    elif settings.coordinator == "postgresql" and settings.url:
        coordinator = PostgreSQLCoordinator(settings.url)
    return Cluster(settings.node_id, coordinator)
