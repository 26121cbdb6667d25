"""State changes shared by the instances of a fleet over a coordinator (SPEC §2.11).

Every change made through the admin API is applied locally at once, then published as one
JSON message ``{"node": node_id, "seq": n, "op": ..., <arguments>}`` on :data:`CHANNEL`;
every other instance applies it (an instance ignores its own messages by ``node``). The
mapping store is shared, so a remote mapping write only drops the cached route.

Two buses: Redis pub/sub (:class:`RedisCoordinator`) and PostgreSQL ``LISTEN/NOTIFY``
(:class:`PostgreSQLCoordinator`, channel :data:`PG_CHANNEL`).

The same channel carries each instance's announces (:mod:`stalroute.membership`): they are
not changes, and are counted apart (``announces_heard``).

Messages published while the bus is down are lost: while it is down the routing cache serves
an entry for at most ``cluster.fallback_ttl`` (a cap the applier sets on the cache), and on
reconnect the applier drops the whole cache. See :class:`Cluster`.
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import select
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, cast
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import psycopg2
import psycopg2.extensions
import txredisapi
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.task import LoopingCall

from stalroute.config import ClusterConfig, Config
from stalroute.logs import logger
from stalroute.mapping import redact_url, scrub, url_secrets
from stalroute.mapping.factory import InvalidStoreSetting
from stalroute.mapping.redis import parse_redis_url, tls_options
from stalroute.mapping.sql import postgresql_dsn
from stalroute.membership import (HEARTBEAT, BadAnnounce, Member, Membership, decode_announce,
                                  describe, encode_announce, is_announce)

log = logger("stalroute.cluster")

#: The one channel every instance publishes to and listens on.
CHANNEL = "stalroute:changes"
#: The same channel under PostgreSQL (a plain identifier: ``LISTEN`` takes no parameter).
PG_CHANNEL = "stalroute_changes"
#: PostgreSQL refuses a NOTIFY payload of 8000 bytes or more.
MAX_NOTIFY_PAYLOAD = 7999
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
}
#: Longest message decoded (a change is a few hundred bytes).
MAX_MESSAGE = 16 * 1024
#: Cap of the reconnection backoff to the coordinator, in seconds.
RECONNECT_MAX_DELAY = 3.0
#: Bound of one connection attempt and of one PUBLISH, in seconds.
COMMAND_TIMEOUT = 5.0

Argument = str | float | None


class BadMessage(ValueError):
    """A message on the channel that is not a change this version understands."""


@dataclass(frozen=True)
class Change:
    """One state change, as published by instance ``node`` (its ``seq``-th)."""

    node: int
    seq: int
    op: str
    args: dict[str, Argument] = field(default_factory=dict)


def encode(change: Change) -> str:
    return json.dumps({"node": change.node, "seq": change.seq, "op": change.op, **change.args},
                      separators=(",", ":"))


def parse(message: str | bytes) -> dict[str, Any]:
    """The JSON object a message carries; BadMessage when it is none."""
    if len(message) > MAX_MESSAGE:
        raise BadMessage(f"longer than {MAX_MESSAGE} bytes")
    try:
        document = json.loads(message)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested too deeply
        raise BadMessage(f"not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise BadMessage("not a JSON object")
    return document


def decode(message: str | bytes) -> Change:
    """The change a message carries; BadMessage when it is not one."""
    return decode_change(parse(message))


def decode_change(document: dict[str, Any]) -> Change:
    """The change a parsed message carries; BadMessage when it is not one."""
    node, seq, op = document.pop("node", None), document.pop("seq", None), document.pop("op", None)
    if type(node) is not int or type(seq) is not int:
        raise BadMessage("node and seq must be integers")
    if op not in OPS:
        raise BadMessage(f"unknown op {op!r}")
    expected = OPS[op]
    if set(document) != set(expected):
        raise BadMessage(f"{op} takes {', '.join(sorted(expected)) or 'no arguments'}")
    for name, types in expected.items():
        if not isinstance(document[name], types) or isinstance(document[name], bool):
            raise BadMessage(f"{op}: bad {name}")
    return Change(node, seq, op, document)


class Coordinator(Protocol):
    """A publish/subscribe bus shared by the instances."""

    kind: str

    @property
    def connected(self) -> bool:
        """Subscribed and able to publish: changes reach this instance and leave it."""

    def start(self, on_message: Callable[[str | bytes], None],
              on_connection: Callable[[bool], None]) -> None:
        """Connect (and keep reconnecting); ``on_message`` gets every message on the
        channel, ``on_connection`` every change of :attr:`connected`."""

    def publish(self, message: str) -> Deferred[bool]:
        """Send ``message`` to every subscriber; False when it could not be sent."""

    def stop(self) -> Deferred[None]:
        """Disconnect for good."""


class Cluster:
    """This instance's end of the bus: numbers and publishes its changes, hands the others'
    to the applier (:meth:`attach`), and counts both. It also announces this instance every
    :data:`~stalroute.membership.HEARTBEAT` and keeps the :class:`Membership` it hears."""

    def __init__(self, node_id: int, coordinator: Coordinator | None,
                 clock: IReactorTime = cast(IReactorTime, reactor),
                 heartbeat: float = HEARTBEAT) -> None:
        self.node_id = node_id
        self.coordinator = coordinator
        self._seq = 0
        self.published = 0
        self.applied = 0
        self.announces_heard = 0
        #: Tells this process from another one given the same node_id.
        self.token = secrets.token_hex(8)
        self.started = clock.seconds()
        self.membership = Membership(clock, heartbeat)
        self._heartbeat = LoopingCall(self.announce)
        self._heartbeat.clock = clock
        self._apply: Callable[[Change], None] = lambda change: None
        self._on_connection: Callable[[bool], None] = lambda connected: None
        self._config: Callable[[], Config] | None = None

    @property
    def connected(self) -> bool:
        return self.coordinator is not None and self.coordinator.connected

    def attach(self, apply: Callable[[Change], None],
               on_connection: Callable[[bool], None],
               config: Callable[[], Config]) -> None:
        """Who applies remote changes and follows the bus state (told the state at once),
        and where this instance's current configuration is read for its announces."""
        self._apply, self._on_connection, self._config = apply, on_connection, config
        if self.coordinator is not None:
            on_connection(self.connected)

    def start(self) -> None:
        if self.coordinator is not None:
            self.coordinator.start(self._received, self._connection_changed)
            self._heartbeat.start(self.membership.heartbeat, now=False)  # connecting announces

    def stop(self) -> Deferred[None]:
        if self._heartbeat.running:
            self._heartbeat.stop()
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

    def view(self) -> dict[str, Any]:
        """``GET /cluster``: the live members and the problems among them."""
        return self.membership.view(self.me())

    def superseded(self) -> bool:
        """Whether another live process with this node_id started before this one."""
        return self.membership.superseded(self.me())

    def publish(self, op: str, **args: Argument) -> None:
        """Announce a change this instance has already applied (lost while disconnected)."""
        if self.coordinator is None:
            return
        self._seq += 1
        change = Change(self.node_id, self._seq, op, args)
        self.coordinator.publish(encode(change)).addCallback(self._count_published)

    def _count_published(self, sent: bool) -> None:
        if sent:
            self.published += 1

    def _received(self, message: str | bytes) -> None:
        try:
            document = parse(message)
            if is_announce(document):
                member = decode_announce(document)
                self.membership.heard(member)
                self.announces_heard += 1
                if member.node_id == self.node_id and member.token != self.token:
                    self.membership.duplicates(self.me())  # logs a new duplicate at once
                return
            change = decode_change(document)
        except (BadMessage, BadAnnounce) as exc:
            log.warn("cluster: ignoring a message on {channel}: {problem}", channel=CHANNEL,
                     problem=str(exc))
            return
        if change.node == self.node_id:
            return
        try:
            self._apply(change)
        except Exception:  # noqa: BLE001 - one bad change must not stop the subscriber
            log.failure("cluster: applying {op} from node {node} failed", op=change.op,
                        node=change.node)
            return
        self.applied += 1

    def _connection_changed(self, connected: bool) -> None:
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
                "announces_heard": self.announces_heard}


class _Subscriber(txredisapi.SubscriberProtocol):
    def messageReceived(self, pattern: Any, channel: Any, message: Any) -> None:
        self.factory.bus.received(message)


class _SubscriberFactory(txredisapi.SubscriberFactory):
    """One subscriber connection that subscribes on every (re)connection and reports its
    state; txredisapi's pool slot reconnects with exponential backoff."""

    protocol = _Subscriber
    maxDelay = RECONNECT_MAX_DELAY

    def __init__(self, bus: RedisCoordinator, password: str | None,
                 username: str | None) -> None:
        super().__init__(isLazy=True)
        self.bus = bus
        self.password, self.username = password, username
        self.replyTimeout = COMMAND_TIMEOUT
        self.deferred.addErrback(bus.gave_up)

    def addConnection(self, conn: Any) -> None:
        super().addConnection(conn)
        if conn in self.pool:
            d = conn.execute_command("SUBSCRIBE", CHANNEL, apply_timeout=False)
            d.addCallbacks(lambda _: self.bus.subscribed(True),
                           lambda _: conn.transport.loseConnection())

    def delConnection(self, conn: Any) -> None:
        super().delConnection(conn)
        self.bus.subscribed(False)


class _PublisherFactory(txredisapi.RedisFactory):
    """The command connection ``PUBLISH`` goes out on; reports its state like the subscriber."""

    maxDelay = RECONNECT_MAX_DELAY

    def __init__(self, bus: RedisCoordinator, password: str | None,
                 username: str | None) -> None:
        super().__init__(None, None, 1, isLazy=True, password=password,
                         replyTimeout=COMMAND_TIMEOUT, convertNumbers=False, username=username)
        self.bus = bus
        self.deferred.addErrback(bus.gave_up)

    def addConnection(self, conn: Any) -> None:
        super().addConnection(conn)
        self.bus.update()

    def delConnection(self, conn: Any) -> None:
        super().delConnection(conn)
        self.bus.update()


class RedisCoordinator:
    """Redis pub/sub: one subscriber connection, one command connection for ``PUBLISH``;
    connected while both are up (a change published meanwhile would be lost)."""

    kind = "redis"

    def __init__(self, url: str) -> None:
        try:
            self._target = parse_redis_url(url)
            self._tls = tls_options(self._target) if self._target.tls else False
        except InvalidStoreSetting as exc:
            raise InvalidStoreSetting(
                "cluster.url: " + str(exc).removeprefix("mapping.redis.url: ")) from None
        self.label = redact_url(url)
        self._subscribed = False
        self._connected = False
        self._on_message: Callable[[str | bytes], None] = lambda message: None
        self._on_connection: Callable[[bool], None] = lambda connected: None
        self._subscriber: _SubscriberFactory | None = None
        self._publisher: _PublisherFactory | None = None

    @property
    def connected(self) -> bool:
        return self._connected

    def start(self, on_message: Callable[[str | bytes], None],
              on_connection: Callable[[bool], None]) -> None:
        self._on_message, self._on_connection = on_message, on_connection
        target = self._target
        self._subscriber = _SubscriberFactory(self, target.password, target.username)
        self._publisher = _PublisherFactory(self, target.password, target.username)
        for factory in (self._subscriber, self._publisher):
            factory.startConnecting(txredisapi._makeEndpoint(
                target.host, target.port, COMMAND_TIMEOUT, self._tls))

    def received(self, message: str | bytes) -> None:
        self._on_message(message)

    def subscribed(self, subscribed: bool) -> None:
        self._subscribed = subscribed
        self.update()

    def update(self) -> None:
        """Tell the cluster when both connections are up, or one went down."""
        connected = (self._subscribed and self._publisher is not None
                     and self._publisher.size > 0)
        if connected != self._connected:
            self._connected = connected
            self._on_connection(connected)

    def gave_up(self, failure: Any) -> None:
        """txredisapi stops reconnecting after a refused AUTH; say so once."""
        log.error("cluster: the coordinator {url} refused us: {reason}", url=self.label,
                  reason=failure.getErrorMessage())

    def publish(self, message: str) -> Deferred[bool]:
        if self._publisher is None or self._publisher.size == 0:
            return succeed(False)  # txredisapi would wait for a connection forever
        d = self._publisher.handler.publish(CHANNEL, message)
        d.addCallback(lambda _: True)
        return d.addErrback(self._publish_failed)

    def _publish_failed(self, failure: Any) -> bool:
        log.warn("cluster: publishing to {url} failed: {reason}", url=self.label,
                 reason=failure.getErrorMessage())
        return False

    def stop(self) -> Deferred[None]:
        self._on_connection = lambda connected: None  # a shutdown is no outage
        running = [part.disconnect() for part in (self._subscriber, self._publisher)
                   if part is not None]
        self._subscriber = self._publisher = None
        return DeferredList(running, consumeErrors=True).addCallback(lambda _: None)


#: libpq settings of the bus connection, so a server gone silent is noticed in ~11 s while
#: idle (TCP keepalives) and in 10 s while a NOTIFY is unanswered (``tcp_user_timeout``).
PG_LIVENESS = (("keepalives", "1"), ("keepalives_idle", "5"), ("keepalives_interval", "2"),
               ("keepalives_count", "3"), ("tcp_user_timeout", "10000"))


def listener_dsn(url: str) -> str:
    """The libpq URI the bus connects with: ``url`` plus a connect timeout and
    :data:`PG_LIVENESS` unless it sets them."""
    parts = urlsplit(postgresql_dsn(url, COMMAND_TIMEOUT))
    params = parse_qsl(parts.query, keep_blank_values=True)
    present = {key for key, _ in params}
    params += [(key, value) for key, value in PG_LIVENESS if key not in present]
    return urlunsplit(parts._replace(query=urlencode(params, quote_via=quote)))


class PostgreSQLCoordinator:
    """PostgreSQL ``LISTEN/NOTIFY`` on one connection owned by one dedicated thread.

    The thread connects (blocking, bounded by ``connect_timeout``), runs ``LISTEN``, then
    waits in ``select()`` on the connection and on a wake-up pipe: readable connection ->
    ``poll()`` and hand every notification to the reactor; wake-up -> send the queued
    ``pg_notify`` calls on the same connection. A lost connection (``poll`` or a statement
    raises) is reported, the queued messages answer False, and the thread reconnects with
    backoff. Connected once ``LISTEN`` succeeded; every state change reaches the reactor
    through ``callFromThread``, so the callbacks run there.
    """

    kind = "postgresql"

    def __init__(self, url: str,
                 reactor: IReactorFromThreads = cast(IReactorFromThreads, reactor)) -> None:
        self._dsn = listener_dsn(url)
        self._secrets = url_secrets(url)
        try:
            psycopg2.extensions.parse_dsn(self._dsn)
        except psycopg2.ProgrammingError as exc:
            raise InvalidStoreSetting(f"cluster.url: {scrub(str(exc), self._secrets)}") from None
        self.label = redact_url(url)
        self._reactor = reactor
        self._connected = False
        self._on_message: Callable[[str | bytes], None] = lambda message: None
        self._on_connection: Callable[[bool], None] = lambda connected: None
        self._outbox: queue.SimpleQueue[tuple[str, Deferred[bool]]] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._wake_read, self._wake_write = -1, -1
        self._stopped: Deferred[None] | None = None

    @property
    def connected(self) -> bool:
        return self._connected

    def start(self, on_message: Callable[[str | bytes], None],
              on_connection: Callable[[bool], None]) -> None:
        self._on_message, self._on_connection = on_message, on_connection
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_write, False)
        self._stopped = Deferred()
        threading.Thread(target=self._run, name="stalroute-cluster-postgresql",
                         daemon=True).start()

    def publish(self, message: str) -> Deferred[bool]:
        size = len(message.encode())
        if size > MAX_NOTIFY_PAYLOAD:
            log.error("cluster: not publishing a change of {size} bytes (PostgreSQL NOTIFY "
                      "takes at most {limit})", size=size, limit=MAX_NOTIFY_PAYLOAD)
            return succeed(False)
        if not self._connected:
            return succeed(False)
        sent: Deferred[bool] = Deferred()
        self._outbox.put((message, sent))
        self._wake()
        return sent

    def stop(self) -> Deferred[None]:
        self._on_connection = lambda connected: None  # a shutdown is no outage
        if self._stopped is None:  # never started, or stopped already
            return succeed(None)
        if self._stopping.is_set():
            return self._stopped
        self._stopping.set()
        self._wake()
        return self._stopped

    def _wake(self) -> None:
        try:
            os.write(self._wake_write, b"!")
        except BlockingIOError:
            pass  # the pipe is full: the thread is woken already

    # --- in the reactor thread, through callFromThread -------------------------------------

    def _set_connected(self, connected: bool) -> None:
        if connected != self._connected:
            self._connected = connected
            self._on_connection(connected)

    def _finished(self) -> None:
        self._connected = False
        os.close(self._wake_read)
        os.close(self._wake_write)
        stopped, self._stopped = self._stopped, None
        if stopped is not None:
            stopped.callback(None)

    # --- in the bus thread ------------------------------------------------------------------

    def _run(self) -> None:
        delay, failing = 0.1, False
        while not self._stopping.is_set():
            try:
                connection = psycopg2.connect(self._dsn)
            except psycopg2.Error as exc:
                if not failing:
                    self._reactor.callFromThread(
                        log.warn, "cluster: cannot reach the coordinator {url}: {reason}",
                        url=self.label, reason=scrub(str(exc), self._secrets))
                failing = True
                self._sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX_DELAY)
                continue
            try:
                connection.autocommit = True
                with connection.cursor() as cursor:
                    cursor.execute(f"LISTEN {PG_CHANNEL}")
                self._answer_outbox(False)  # queued while the reactor still saw the last one
                self._reactor.callFromThread(self._set_connected, True)
                delay, failing = 0.1, False
                self._serve(connection)
            except psycopg2.Error as exc:
                if not self._stopping.is_set():
                    self._reactor.callFromThread(
                        log.warn, "cluster: the connection to {url} failed: {reason}",
                        url=self.label, reason=scrub(str(exc), self._secrets))
            finally:
                connection.close()
                self._answer_outbox(False)
                self._reactor.callFromThread(self._set_connected, False)
            self._sleep(delay)
        self._reactor.callFromThread(self._finished)

    def _serve(self, connection: psycopg2.extensions.connection) -> None:
        """Send what is queued, hand on what arrived, wait; until stopped or an error."""
        socket = connection.fileno()
        with connection.cursor() as cursor:
            while not self._stopping.is_set():
                self._send_outbox(cursor)
                while connection.notifies:
                    payload = connection.notifies.pop(0).payload
                    self._reactor.callFromThread(self._on_message, payload)
                readable, _, _ = select.select([socket, self._wake_read], [], [])
                if self._wake_read in readable:
                    os.read(self._wake_read, 4096)
                if socket in readable:
                    connection.poll()

    def _send_outbox(self, cursor: psycopg2.extensions.cursor) -> None:
        while True:
            try:
                message, sent = self._outbox.get_nowait()
            except queue.Empty:
                return
            try:
                cursor.execute("SELECT pg_notify(%s, %s)", (PG_CHANNEL, message))
            except psycopg2.Error:
                self._reactor.callFromThread(sent.callback, False)
                raise
            self._reactor.callFromThread(sent.callback, True)

    def _answer_outbox(self, sent: bool) -> None:
        while True:
            try:
                _, answer = self._outbox.get_nowait()
            except queue.Empty:
                return
            self._reactor.callFromThread(answer.callback, sent)

    def _sleep(self, seconds: float) -> None:
        """Wait before reconnecting; a stop ends the wait."""
        self._stopping.wait(seconds)


def build_cluster(settings: ClusterConfig) -> Cluster:
    """This instance's end of ``[cluster]``; InvalidStoreSetting for an unusable URL."""
    coordinator: Coordinator | None = None
    if settings.coordinator == "redis" and settings.url:
        coordinator = RedisCoordinator(settings.url)
    elif settings.coordinator == "postgresql" and settings.url:
        coordinator = PostgreSQLCoordinator(settings.url)
    return Cluster(settings.node_id, coordinator)
