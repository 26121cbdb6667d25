"""Who performs the fleet's maintenance tasks (SPEC §2.11 ``[cluster.roles]``), and how the
renewing process reaches every other one (SPEC §2.13).

**Roles.** ``acme_renew`` (order and renew the ``acme =`` certificates) and ``purge`` (remove
expired values and leases from the shared store). Without a ``[cluster]`` coordinator the
single instance performs both itself, without a lease. With one, the node ids listed for a
task may perform it (an empty or absent list: every node may), and among them a
:class:`Lease` in the shared store lets exactly one process act at a time: it is taken for
:data:`LEASE_TTL` seconds, renewed every third of that, and released on a graceful stop; when
its holder disappears without releasing it, another eligible process takes it once it expired.

**Reaching the others** (:class:`ChallengePublisher`, :func:`announce_issued`). Everything the
renewing process must tell the fleet travels as a *change* through
:meth:`stalroute.control.Control.change`: applied in this process, in each of its worker
processes, and published on the bus to every other instance (which applies it in its own
workers before acknowledging it); the sender waits for every live member's acknowledgement,
or :data:`~stalroute.cluster.ACK_TIMEOUT` naming the laggards:

* ``acme_challenge`` {kind, domain, challenge_token, key_authorization} before a challenge
  is answered, ``acme_challenge_withdraw`` {kind, domain, challenge_token} once the order
  ended (``token`` names the sending process in a bus message): each process puts the
  material in (or takes it out of) its :data:`~stalroute.acme.challenges.CHALLENGES`, so the
  validation may land on any instance behind the balancer and any worker of it. The material
  is also stored under :func:`~stalroute.acme.store.challenge_key` with a ttl (and listed under
  :data:`CHALLENGE_INDEX`), so an instance that starts while an order is pending answers it
  too (:func:`restore_challenges`), and ``purge`` has something to remove.
* ``certificate_issued`` {name} once a new certificate is stored: every other instance reads
  it from the shared store and swaps it in live (its worker processes get the chain and key
  from their supervisor over the local channel, never over the bus).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import LoopingCall, deferLater

from stalroute.acme.challenges import DEFAULT_TTL
from stalroute.acme.client import Challenge, Issued
from stalroute.acme.store import SharedStore, challenge_key
from stalroute.cluster import Acknowledgement
from stalroute.config import Config
from stalroute.logs import logger

log = logger("stalroute.acme")

#: Seconds a lease lasts unless renewed; it is renewed (or tried for) every third of it.
LEASE_TTL = 30.0
#: How often the ``purge`` holder purges the shared store.
PURGE_INTERVAL = 600.0
#: The renewing process waits at most this long for the bus before publishing challenge
#: material (published while the bus is down, it would reach no other instance).
BUS_WAIT = 10.0
BUS_POLL = 0.1
#: The store key listing the tokens of the pending challenges (JSON list).
CHALLENGE_INDEX = "acme/challenge-index"

#: The ACME roles.
ACME_RENEW, PURGE = "acme_renew", "purge"


def fleet_mode(config: Config) -> bool:
    """Whether the instance belongs to a fleet (a ``[cluster]`` coordinator is set)."""
    return config.cluster.coordinator != "none"


def eligible(config: Config, task: str) -> bool:
    """Whether this node may perform ``task`` (``acme_renew`` or ``purge``): always without
    a coordinator; with one, when the task's list is empty or names this node."""
    if not fleet_mode(config):
        return True
    listed: tuple[int, ...] = getattr(config.cluster.roles, task)
    return not listed or config.cluster.node_id in listed


def holder_name(node_id: int, token: str) -> str:
    """Who holds a lease: the node id and the process (its bus token), so a restarted process
    with the same node id is another holder."""
    return f"node {node_id} process {token}"


class Lease:
    """The lease of one task in the shared store, taken and kept by this process while it
    can (see the module). ``on_change(held)`` is told each time it is taken or lost."""

    def __init__(self, reactor: Any, store: SharedStore, task: str, holder: str,
                 ttl: float = LEASE_TTL) -> None:
        self.reactor = reactor
        self.store = store
        self.task = task
        self.holder = holder
        self.ttl = ttl
        self.held = False
        #: Until when the last successful acquisition holds (reactor time).
        self._valid_until = 0.0
        self.on_change: Callable[[bool], object] = lambda held: None
        self._loop = LoopingCall(self._tick)
        self._loop.clock = reactor

    def start(self) -> None:
        if not self._loop.running:
            self._loop.start(self.ttl / 3, now=True).addErrback(
                lambda failure: log.failure("acme: the {task} lease loop stopped", failure,
                                            task=self.task))

    def _tick(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._try())

    async def _try(self) -> None:
        started = self.reactor.seconds()
        try:
            taken = await self.store.acquire_lease(self.task, self.holder, self.ttl)
        except Exception as exc:  # noqa: BLE001 - the store is down: keep what is still valid
            taken = self.held and self.reactor.seconds() < self._valid_until
            if not self.held:
                consequence = ""
            elif taken:
                left = max(0.0, self._valid_until - self.reactor.seconds())
                consequence = f"; still held for {left:.0f}s"
            else:
                consequence = "; given up"
            log.warn("acme: cannot take or renew the {task} lease in the shared store: {error}"
                     "{consequence}", task=self.task, error=f"{type(exc).__name__}: {exc}",
                     consequence=consequence)
        else:
            if taken:
                self._valid_until = started + self.ttl
        if not self._loop.running:  # stopped meanwhile
            if taken and not self.held:  # taken after stop() released: give it back
                self.store.release_lease(self.task, self.holder).addErrback(lambda _: None)
            return
        self._set(taken)

    def _set(self, held: bool) -> None:
        if held == self.held:
            return
        self.held = held
        log.info("acme: this process {what} the {task} lease ({holder})",
                 what="took" if held else "lost", task=self.task, holder=self.holder)
        try:
            self.on_change(held)
        except Exception:  # noqa: BLE001 - a bug in the listener must not stop the loop
            log.failure("acme: following the {task} lease failed", task=self.task)

    def stop(self) -> Deferred[None]:
        """Stop renewing; give the lease up if held, so another process takes it at once."""
        if self._loop.running:
            self._loop.stop()
        was_held = self.held
        self._set(False)
        if not was_held:
            return succeed(None)
        released = self.store.release_lease(self.task, self.holder)

        def failed(failure: Any) -> None:
            log.warn("acme: cannot release the {task} lease: {error}; it expires within "
                     "{ttl:.0f}s", task=self.task, error=failure.getErrorMessage(),
                     ttl=self.ttl)

        return released.addCallbacks(lambda _: log.info(
            "acme: released the {task} lease", task=self.task), failed)


class Purger:
    """The ``purge`` task: removes expired values and leases from the shared store every
    :data:`PURGE_INTERVAL` while this process holds its lease (always without a lease)."""

    def __init__(self, reactor: Any, store: SharedStore, lease: Lease | None,
                 interval: float = PURGE_INTERVAL) -> None:
        self.reactor = reactor
        self.store = store
        self.lease = lease
        self.interval = interval
        self.purges = 0
        self._loop = LoopingCall(self.purge)
        self._loop.clock = reactor
        if lease is not None:
            lease.on_change = self._lease_changed

    @property
    def active(self) -> bool:
        """Whether this process performs ``purge`` now."""
        return self._loop.running

    def start(self) -> None:
        if self.lease is None:
            self._run()
        else:
            self.lease.start()

    def stop(self) -> Deferred[None]:
        if self._loop.running:
            self._loop.stop()
        return self.lease.stop() if self.lease is not None else succeed(None)

    def _lease_changed(self, held: bool) -> None:
        if held:
            self._run()
        elif self._loop.running:
            self._loop.stop()

    def _run(self) -> None:
        if not self._loop.running:
            self._loop.start(self.interval, now=True).addErrback(
                lambda failure: log.failure("acme: the purge loop stopped", failure))

    def purge(self) -> Deferred[None]:
        def done(removed: int) -> None:
            self.purges += 1
            (log.info if removed else log.debug)(
                "acme: purge removed {removed} expired entries from the shared store",
                removed=removed)

        def failed(failure: Any) -> None:
            log.warn("acme: purging the shared store failed: {error}",
                     error=failure.getErrorMessage())

        return self.store.purge().addCallbacks(done, failed)


# --- reaching the other processes ------------------------------------------------------------


class Applied(Protocol):
    """What a change answers (:class:`stalroute.control.Done`)."""

    @property
    def acknowledgement(self) -> Acknowledgement | None: ...


#: ``change(op, **args)``: apply a change here, in this instance's workers and (published)
#: in the rest of the fleet; fires once all of them applied it or the wait timed out
#: (:meth:`stalroute.control.Control.change`).
ChangeSender = Callable[..., Awaitable[Applied]]


@dataclass(frozen=True)
class FleetLink:
    """How the renewal service of a process reaches the others: its changes, its bus token
    (for lease holders), whether the bus is up, and how to apply a change in this instance
    only (here and in its workers, for material read from the store at start)."""

    change: ChangeSender
    token: str
    bus_ready: Callable[[], bool]
    apply_locally: Callable[[str, dict[str, Any]], Awaitable[object]]


def _laggards(op: str, what: str, answer: Applied) -> None:
    acknowledgement = answer.acknowledgement
    if acknowledgement is None:
        return
    missing = acknowledgement.laggards + acknowledgement.unreachable
    if missing:
        log.warn("acme: {op} {what}: node {nodes} did not acknowledge it; going on "
                 "({applied} of {members} members applied it)", op=op, what=what,
                 nodes=", ".join(map(str, sorted(missing))), applied=acknowledgement.applied,
                 members=acknowledgement.members)


def install_args(name: str, issued: Issued) -> dict[str, Any]:
    """The arguments of ``certificate_install``: a supervisor hands a certificate to its
    workers over their local channel (never over the bus: it carries the key)."""
    return {"name": name, "chain": issued.chain_pem.decode("ascii"),
            "key": issued.key_pem.decode("ascii")}


def challenge_args(challenge: Challenge) -> dict[str, Any]:
    return {"kind": challenge.kind, "domain": challenge.domain,
            "challenge_token": challenge.token, "key_authorization": challenge.key_authorization}


def encode_challenge(challenge: Challenge) -> bytes:
    return json.dumps(challenge_args(challenge)).encode()


def decode_challenge(value: bytes) -> Challenge | None:
    try:
        document = json.loads(value)
        challenge = Challenge(*(str(document[key]) for key in
                                ("kind", "domain", "challenge_token",
                                 "key_authorization")))
    except (ValueError, KeyError, TypeError):
        return None
    return challenge if challenge.kind in ("tls-alpn-01", "http-01") else None


class ChallengePublisher:
    """``publish``/``withdraw`` of the renewal service in a fleet or with workers: the
    material is stored (with a ttl) and sent to every process as a change (see the module)."""

    def __init__(self, reactor: Any, store: SharedStore, link: FleetLink,
                 ttl: float = DEFAULT_TTL, bus_wait: float = BUS_WAIT) -> None:
        self.reactor = reactor
        self.store = store
        self.link = link
        self.ttl = ttl
        self.bus_wait = bus_wait
        self._pending: dict[str, Challenge] = {}

    async def _bus(self) -> None:
        """Wait (bounded) for the bus: material published while it is down reaches no one."""
        deadline = self.reactor.seconds() + self.bus_wait
        if self.link.bus_ready():
            return
        log.info("acme: waiting up to {wait:.0f}s for the cluster bus before publishing "
                 "challenge material", wait=self.bus_wait)
        while not self.link.bus_ready() and self.reactor.seconds() < deadline:
            await deferLater(self.reactor, BUS_POLL, lambda: None)

    async def _store(self, key: str, value: bytes | None) -> None:
        try:
            if value is None:
                await self.store.delete(key)
            else:
                await self.store.put(key, value, self.ttl)
        except Exception as exc:  # noqa: BLE001 - the bus is what answers the validation
            log.warn("acme: cannot write {key} to the shared store: {error}", key=key,
                     error=f"{type(exc).__name__}: {exc}")

    async def _index(self) -> None:
        await self._store(CHALLENGE_INDEX, json.dumps(sorted(self._pending)).encode()
                          if self._pending else None)

    async def publish(self, challenges: Sequence[Challenge]) -> None:
        await self._bus()
        for challenge in challenges:
            self._pending[challenge.token] = challenge
            await self._store(challenge_key(challenge.token), encode_challenge(challenge))
        await self._index()
        for challenge in challenges:
            answer = await self.link.change("acme_challenge", **challenge_args(challenge))
            _laggards("acme_challenge", f"for {challenge.domain}", answer)

    async def withdraw(self, challenges: Sequence[Challenge]) -> None:
        for challenge in challenges:
            self._pending.pop(challenge.token, None)
            await self._store(challenge_key(challenge.token), None)
        await self._index()
        for challenge in challenges:
            answer = await self.link.change("acme_challenge_withdraw", kind=challenge.kind,
                                            domain=challenge.domain,
                                            challenge_token=challenge.token)
            _laggards("acme_challenge_withdraw", f"for {challenge.domain}", answer)


async def restore_challenges(store: SharedStore,
                             apply: Callable[[str, dict[str, Any]], Awaitable[object]]) -> int:
    """Apply (``apply("acme_challenge", args)``, in this instance only) the challenge
    material pending in the store: for an instance that starts while another orders. The
    number applied; a store failure counts 0 (logged)."""
    try:
        index = await store.get(CHALLENGE_INDEX)
        tokens = json.loads(index) if index else []
        if not isinstance(tokens, list):
            return 0
        restored = 0
        for token in tokens:
            value = await store.get(challenge_key(str(token)))
            challenge = decode_challenge(value) if value else None
            if challenge is not None:
                await apply("acme_challenge", challenge_args(challenge))
                restored += 1
    except Exception as exc:  # noqa: BLE001 - at worst this instance misses one validation
        log.warn("acme: cannot read the pending challenge material from the shared store: "
                 "{error}", error=f"{type(exc).__name__}: {exc}")
        return 0
    if restored:
        log.info("acme: {count} pending challenges read from the shared store", count=restored)
    return restored


def announce_issued(link: FleetLink) -> Callable[[str], Awaitable[None]]:
    """The renewal service's ``stored`` callback: tell the fleet a certificate was stored."""

    async def stored(name: str) -> None:
        answer = await link.change("certificate_issued", name=name)
        _laggards("certificate_issued", f"of {name}", answer)

    return stored
