"""The renewal service: keeps every ``acme =`` certificate issued and current (SPEC §2.13).

For each ``[tls.certificate.<name>]`` with ``acme = "<acme name>"``, :class:`CertificateManager`

* at start, loads the certificate stored under :func:`~stalroute.acme.store.certificate_key`
  and serves it (until then, :class:`~stalroute.tls.ServerTLS` serves a self-signed
  placeholder);
* orders one (:func:`~stalroute.acme.client.order_certificate`) when none is stored, when the
  stored one does not cover the entry's ``domains``, or once it is within ``renew_before``
  (default: a third of its lifetime) of its expiry;
* on failure keeps serving what it has and tries again after an exponential backoff
  (:class:`Backoff`: 1 minute doubling up to 1 hour), logging each attempt;
* on success stores the chain and key, then calls ``issued`` (by default: swap it into this
  process's listeners, new connections only).

The ways out are callbacks so that a fleet can plug in: ``publish``/``withdraw`` put the
challenge material where the ACME server's validation may land (alone: this process's
:data:`~stalroute.acme.challenges.CHALLENGES`; in a fleet or with workers: every process,
:class:`~stalroute.acme.roles.ChallengePublisher`), ``issued`` serves a certificate in this
instance (its listeners, and its workers'), and ``stored`` tells the rest of the fleet that a
new one is in the store (:func:`~stalroute.acme.roles.announce_issued`).

``renews`` says whether this process performs the ``acme_renew`` task now (SPEC §2.11): a single
instance always does; in a fleet, the process holding the ``acme_renew``
:class:`~stalroute.acme.roles.Lease` does (only on the nodes ``[cluster.roles] acme_renew``
lists, or any node when it lists none), and follows it as it is taken and lost. One that does
not renew loads what is stored at start, when told (``certificate_issued``), and every
:data:`STORE_POLL` seconds (a change missed while the bus was down).
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from cryptography import x509
from twisted.application import service
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from stalroute.acme.challenges import CHALLENGES, ChallengeTable, add_challenge, remove_challenge
from stalroute.acme.client import (
    AcmeError,
    Challenge,
    ChallengeCallback,
    Issued,
    load_or_create_account_key,
    order_certificate,
)
from stalroute.acme.directory_store import DirectoryStore
from stalroute.acme.roles import (
    ACME_RENEW,
    PURGE,
    ChallengePublisher,
    FleetLink,
    Lease,
    Purger,
    announce_issued,
    eligible,
    fleet_mode,
    holder_name,
    restore_challenges,
)
from stalroute.acme.shared_stores import shared_store_for
from stalroute.acme.store import SharedStore, certificate_key
from stalroute.config import AcmeConfig, Config
from stalroute.logs import logger
from stalroute.mapping import InvalidStoreSetting
from stalroute.runtime import StartupError
from stalroute.tls import certificate_subjects, load_material

log = logger("stalroute.acme")

#: Longest sleep between two looks at a certificate that is not due yet (clock changes,
#: a certificate another node stored).
MAX_CHECK_INTERVAL = 12 * 3600.0
#: How often a process that does not renew reads the stored certificates again.
STORE_POLL = 60.0


@dataclass(frozen=True)
class Backoff:
    """Delays between failed attempts: ``initial`` seconds, doubling, at most ``maximum``."""

    initial: float = 60.0
    maximum: float = 3600.0

    def delay(self, failures: int) -> float:
        return min(self.maximum, self.initial * 2 ** max(0, failures - 1))


def local_publisher(table: ChallengeTable = CHALLENGES) -> tuple[ChallengeCallback,
                                                                ChallengeCallback]:
    """``publish`` and ``withdraw`` for one process: its own challenge table."""

    async def publish(challenges: Sequence[Challenge]) -> None:
        for challenge in challenges:
            add_challenge(challenge.kind, challenge.domain, challenge.token,
                          challenge.key_authorization, table)

    async def withdraw(challenges: Sequence[Challenge]) -> None:
        for challenge in challenges:
            remove_challenge(challenge.kind, challenge.domain, challenge.token, table)

    return publish, withdraw


def encode_issued(issued: Issued) -> bytes:
    """The stored form (:func:`~stalroute.acme.store.certificate_key`): JSON chain + key."""
    return json.dumps({"chain": issued.chain_pem.decode("ascii"),
                       "key": issued.key_pem.decode("ascii")}).encode()


def decode_issued(value: bytes) -> Issued:
    """The stored form back; ValueError when it is not a usable chain and key."""
    try:
        document = json.loads(value)
        issued = Issued(document["chain"].encode("ascii"), document["key"].encode("ascii"))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"not a stored certificate ({type(exc).__name__})") from None
    load_material(issued.chain_pem, issued.key_pem)  # parses, and the key matches
    return issued


def covers(issued: Issued, domains: Sequence[str]) -> bool:
    """Whether the leaf names every one of ``domains`` (exactly, wildcards included)."""
    try:
        names = issued.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return False
    dns = {name.lower() for name in names.value.get_values_for_type(x509.DNSName)}
    return all(domain.lower() in dns for domain in domains)


Order = Callable[[AcmeConfig, bytes, ChallengeCallback, ChallengeCallback], Awaitable[Issued]]
#: ``issued(name, issued)``: serve it in this instance; may return a Deferred (the workers).
IssuedCallback = Callable[[str, Issued], object]
#: ``stored(name)``: a new certificate of ``name`` is in the store (tell the fleet).
StoredCallback = Callable[[str], Awaitable[None]]


@dataclass
class ManagedCertificate:
    """The state of one ``acme =`` certificate entry."""

    name: str
    acme: AcmeConfig
    current: Issued | None = None
    failures: int = 0
    ordering: bool = False
    timer: IDelayedCall | None = None
    #: Unix time of the next planned look (for listings).
    next_check: float | None = None
    last_error: str | None = None
    waiting: list[Deferred[None]] = field(default_factory=list)
    #: "none stored yet" was logged (a poll does not log it again).
    reported_missing: bool = False


class CertificateManager(service.Service):
    """Orders and renews the ``acme =`` certificates of a configuration (see the module)."""

    def __init__(self, reactor, config: Config, store: SharedStore, issued: IssuedCallback, *,
                 renews: bool = True, publish: ChallengeCallback | None = None,
                 withdraw: ChallengeCallback | None = None, order: Order | None = None,
                 backoff: Backoff = Backoff(), stored: StoredCallback | None = None,
                 lease: Lease | None = None, purger: Purger | None = None,
                 restore: Callable[[], Awaitable[object]] | None = None,
                 poll_interval: float = STORE_POLL) -> None:
        self.reactor = reactor
        self.store = store
        #: Whether this process performs ``acme_renew`` now (with a lease: while it holds it).
        self.renews = renews and lease is None
        #: The node ids ``[cluster.roles] acme_renew`` lists (empty: any node), for listings.
        self.renewers: tuple[int, ...] = (config.cluster.roles.acme_renew
                                          if fleet_mode(config) else ())
        self.lease = lease
        self.purger = purger
        self._issued = issued
        self._stored = stored
        self._restore = restore
        local_publish, local_withdraw = local_publisher()
        self._publish = publish or local_publish
        self._withdraw = withdraw or local_withdraw
        self._order: Order = order or (lambda acme, key, publish, withdraw: Deferred.fromCoroutine(
            order_certificate(acme, key, publish, withdraw)))
        self.backoff = backoff
        self.poll_interval = poll_interval
        self._poll = LoopingCall(self._poll_store)
        self._poll.clock = reactor
        self.certificates: dict[str, ManagedCertificate] = {
            name: ManagedCertificate(name, config.acme[entry.acme])
            for name, entry in config.tls.certificates.items()
            if entry.acme is not None and entry.acme in config.acme}
        if lease is not None:
            lease.on_change = self.set_renews

    # --- life ------------------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        if self._restore is not None:
            Deferred.fromCoroutine(_awaited(self._restore())).addErrback(
                lambda failure: log.failure("acme: restoring challenge material failed",
                                            failure))
        for managed in self.certificates.values():
            Deferred.fromCoroutine(self._start(managed)).addErrback(self._unexpected, managed)
        if not self.renews:
            self._start_polling()
        if self.lease is not None:
            self.lease.start()
        if self.purger is not None:
            self.purger.start()

    def stopService(self) -> Deferred[None]:
        """Stop the timers; give the leases up (fires once released, or failed to)."""
        super().stopService()
        released: list[Deferred[None]] = []
        if self.lease is not None:
            released.append(self.lease.stop())
        if self.purger is not None:
            released.append(self.purger.stop())
        self._stop_timers()
        if self._poll.running:
            self._poll.stop()
        return gatherResults(released, consumeErrors=True).addCallback(lambda _: None)

    def _stop_timers(self) -> None:
        for managed in self.certificates.values():
            if managed.timer is not None and managed.timer.active():
                managed.timer.cancel()
            managed.timer = None
            managed.next_check = None

    async def _start(self, managed: ManagedCertificate) -> None:
        await self.load(managed.name)
        if self.running and self.renews:
            await self._check(managed)

    def set_renews(self, renews: bool) -> None:
        """Start or stop performing ``acme_renew`` (the lease was taken or lost)."""
        if renews == self.renews:
            return
        self.renews = renews
        if not self.running:
            return
        if renews:
            log.info("acme: this process renews the certificates now")
            if self._poll.running:
                self._poll.stop()
            for managed in self.certificates.values():
                # What the previous renewer stored first: it may be current.
                Deferred.fromCoroutine(self._start(managed)).addErrback(self._unexpected,
                                                                        managed)
        else:
            log.info("acme: this process no longer renews the certificates; it loads what "
                     "another one stores")
            self._stop_timers()
            self._start_polling()

    def _start_polling(self) -> None:
        if self.running and not self._poll.running:
            self._poll.start(self.poll_interval, now=False).addErrback(
                lambda failure: log.failure("acme: the store poll stopped", failure))

    def _poll_store(self) -> Deferred[None]:
        async def poll() -> None:
            for name in self.certificates:
                await self.load(name, quiet=True)
        return Deferred.fromCoroutine(poll())

    # --- loading ---------------------------------------------------------------------------------

    async def load(self, name: str, quiet: bool = False) -> Issued | None:
        """Read the stored certificate of entry ``name`` and serve it if it is newer than the
        one served (a fleet calls this when told another node stored one). ``quiet``: a
        periodic look, which does not repeat "none stored yet"."""
        managed = self.certificates[name]
        try:
            value = await self.store.get(certificate_key(name))
        except Exception as exc:  # noqa: BLE001 - keep serving; the next check retries
            log.error("acme: certificate {name}: cannot read the store: {error}", name=name,
                      error=f"{type(exc).__name__}: {exc}")
            return None
        if value is None:
            if not (quiet and managed.reported_missing):
                log.info("acme: certificate {name}: none stored yet", name=name)
            managed.reported_missing = True
            return None
        try:
            issued = decode_issued(value)
        except ValueError as exc:
            log.error("acme: certificate {name}: the stored certificate is unusable ({error}); "
                      "a new one will be ordered", name=name, error=str(exc))
            return None
        if managed.current is None or issued.not_after > managed.current.not_after:
            await self._serve(managed, issued, "loaded from the store")
        return managed.current

    async def _serve(self, managed: ManagedCertificate, issued: Issued, how: str) -> None:
        managed.current = issued
        try:
            await _awaited(self._issued(managed.name, issued))
        except Exception as exc:  # noqa: BLE001 - a bad chain must not stop the manager
            log.error("acme: certificate {name}: cannot serve it: {error}", name=managed.name,
                      error=f"{type(exc).__name__}: {exc}")
            return
        log.info("acme: certificate {name} {how} and served: {details}", name=managed.name,
                 how=how, details=issued.describe())

    # --- renewal ---------------------------------------------------------------------------------

    def due_at(self, managed: ManagedCertificate) -> float:
        """Unix time at which ``managed`` must be renewed (now if it has none usable)."""
        issued = managed.current
        if issued is None or not covers(issued, managed.acme.domains):
            return self.reactor.seconds()
        not_before, not_after = issued.not_before.timestamp(), issued.not_after.timestamp()
        before = managed.acme.renew_before
        if before is None:
            before = (not_after - not_before) / 3
        return not_after - before

    async def _check(self, managed: ManagedCertificate) -> None:
        """Order now if due, else plan the next look."""
        managed.timer = None
        if not self.running or not self.renews:
            return
        wait = self.due_at(managed) - self.reactor.seconds()
        if wait > 0:
            self._plan(managed, min(wait, MAX_CHECK_INTERVAL))
            return
        await self._attempt(managed)

    def _plan(self, managed: ManagedCertificate, delay: float) -> None:
        if managed.timer is not None and managed.timer.active():
            managed.timer.cancel()
        managed.next_check = self.reactor.seconds() + delay
        managed.timer = self.reactor.callLater(delay, self._run_check, managed)

    def _run_check(self, managed: ManagedCertificate) -> None:
        Deferred.fromCoroutine(self._check(managed)).addErrback(self._unexpected, managed)

    @staticmethod
    def _unexpected(failure: Failure, managed: ManagedCertificate) -> None:
        log.failure("acme: certificate {name}: unexpected error", failure, name=managed.name)

    async def _attempt(self, managed: ManagedCertificate) -> None:
        if managed.ordering:
            return
        managed.ordering = True
        reason = ("no certificate yet" if managed.current is None
                  else "the certificate does not cover every domain"
                  if not covers(managed.current, managed.acme.domains)
                  else "due for renewal")
        log.info("acme: certificate {name}: ordering from [acme.{acme}] ({reason})",
                 name=managed.name, acme=managed.acme.name, reason=reason)
        try:
            account = await load_or_create_account_key(self.store, managed.acme.name)
            issued = await self._order(managed.acme, account, self._publish, self._withdraw)
            await self.store.put(certificate_key(managed.name), encode_issued(issued))
        except Exception as exc:  # noqa: BLE001 - every failure keeps the current certificate
            managed.failures += 1
            managed.last_error = str(exc) if isinstance(exc, AcmeError) else (
                f"{type(exc).__name__}: {exc}")
            delay = self.backoff.delay(managed.failures)
            log.error("acme: certificate {name}: order failed (attempt {failures}): {error}; "
                      "keeping the current certificate ({current}), next attempt in "
                      "{delay:.0f}s", name=managed.name, failures=managed.failures,
                      error=managed.last_error, delay=delay,
                      current=("self-signed placeholder" if managed.current is None
                               else f"valid until {managed.current.not_after:%Y-%m-%d %H:%M} UTC"))
            if self.running and self.renews:
                self._plan(managed, delay)
            return
        finally:
            managed.ordering = False
            waiting, managed.waiting = managed.waiting, []
            for deferred in waiting:
                deferred.callback(None)
        managed.failures, managed.last_error = 0, None
        await self._serve(managed, issued, "issued")
        if self._stored is not None:
            try:
                await self._stored(managed.name)
            except Exception:  # noqa: BLE001 - the others poll the store as well
                log.failure("acme: certificate {name}: telling the fleet failed",
                            name=managed.name)
        if not self.running or not self.renews:
            return
        if self.due_at(managed) <= self.reactor.seconds():
            # renew_before at least the lifetime: do not order again at once, and again...
            log.warn("acme: certificate {name}: the new certificate is due for renewal at once "
                     "(renew_before is not shorter than its lifetime); next order in {delay:.0f}s",
                     name=managed.name, delay=self.backoff.maximum)
            self._plan(managed, self.backoff.maximum)
            return
        await self._check(managed)

    def renew(self, name: str) -> Deferred[None]:
        """Order a new certificate for entry ``name`` now (KeyError if it has no ``acme``);
        fires once the attempt ended, successful or not."""
        managed = self.certificates[name]
        done: Deferred[None] = Deferred()
        managed.waiting.append(done)
        if not managed.ordering:
            if managed.timer is not None and managed.timer.active():
                managed.timer.cancel()
            managed.timer = None
            Deferred.fromCoroutine(self._attempt(managed)).addErrback(self._unexpected, managed)
        return done

    def status(self) -> list[dict[str, object]]:
        """What each managed certificate is: for listings (no key material)."""
        listed: list[dict[str, object]] = []
        for managed in self.certificates.values():
            current = managed.current
            leaf = current.leaf if current is not None else None
            listed.append({
                "name": managed.name, "acme": managed.acme.name,
                "domains": list(managed.acme.domains),
                "issuer": leaf.issuer.rfc4514_string() if leaf is not None else None,
                "serial": f"{leaf.serial_number:x}" if leaf is not None else None,
                "not_after": (leaf.not_valid_after_utc.isoformat()
                              if leaf is not None else None),
                "subjects": certificate_subjects(leaf) if leaf is not None else [],
                "renews": self.renews, "renewers": list(self.renewers),
                "failures": managed.failures,
                "last_error": managed.last_error,
                "next_check": (datetime.datetime.fromtimestamp(
                    managed.next_check, datetime.timezone.utc).isoformat()
                    if managed.next_check is not None else None),
            })
        return listed


async def _awaited(result: object) -> None:
    """Wait for ``result`` when it is a Deferred or a coroutine."""
    if isinstance(result, Deferred) or hasattr(result, "__await__"):
        await result


def build_certificate_manager(reactor, config: Config, issued: IssuedCallback,
                              link: FleetLink | None = None) -> CertificateManager | None:
    """The renewal service of this instance (None when no certificate uses ``acme``).

    Without a ``[cluster]`` coordinator its store is ``<server.state_directory>/acme`` and it
    performs ``acme_renew`` and ``purge`` itself. With one, the store is the coordinator's
    Redis or PostgreSQL (:func:`~stalroute.acme.shared_stores.shared_store_for`) and each task
    is performed by the eligible process holding its lease
    (:mod:`stalroute.acme.roles`). ``link`` (from the proxy service) sends challenge material
    and "certificate issued" to every process of the instance and of the fleet; without it the
    material stays in this process (a single process, in tests)."""
    if not any(entry.acme for entry in config.tls.certificates.values()):
        return None
    store: SharedStore
    if fleet_mode(config):
        try:
            shared = shared_store_for(config, reactor)
        except InvalidStoreSetting as exc:
            raise StartupError(str(exc)) from exc
        if shared is None:
            raise StartupError("cluster.url: the coordinator's URL is needed for the ACME "
                               "shared store")
        store = shared
    else:
        directory = config.server.state_directory / "acme"
        try:
            store = DirectoryStore(directory)
        except OSError as exc:
            raise StartupError(f"server.state_directory: cannot create {directory}: "
                               f"{exc.strerror or exc}") from exc
    publish = withdraw = None
    stored = restore = None
    if link is not None:
        publisher = ChallengePublisher(reactor, store, link)
        publish, withdraw = publisher.publish, publisher.withdraw
        stored = announce_issued(link)
        apply_locally = link.apply_locally

        def restore() -> Awaitable[int]:
            return restore_challenges(store, apply_locally)

    lease: Lease | None = None
    purge_lease: Lease | None = None
    renews = eligible(config, ACME_RENEW)
    may_purge = eligible(config, PURGE)
    if fleet_mode(config):
        holder = holder_name(config.cluster.node_id, link.token if link is not None else "-")
        if renews:
            lease = Lease(reactor, store, ACME_RENEW, holder)
        if may_purge:
            purge_lease = Lease(reactor, store, PURGE, holder)
        log.info("acme: node {node} {renew} and {purge} (leases in {store})",
                 node=config.cluster.node_id,
                 renew=("may renew the certificates" if renews
                        else "does not renew the certificates (cluster.roles.acme_renew)"),
                 purge=("may purge the shared store" if may_purge
                        else "does not purge (cluster.roles.purge)"),
                 store=getattr(store, "label", type(store).__name__))
    purger = Purger(reactor, store, purge_lease) if may_purge else None
    return CertificateManager(reactor, config, store, issued, renews=renews, publish=publish,
                              withdraw=withdraw, stored=stored, lease=lease, purger=purger,
                              restore=restore)
