"""The buses a fleet's instances share (SPEC §2.11): Redis pub/sub (:class:`RedisCoordinator`)
and PostgreSQL ``LISTEN/NOTIFY`` (:class:`PostgreSQLCoordinator`, channel :data:`PG_CHANNEL`).

A coordinator only carries text: every message published on :data:`CHANNEL` reaches every
subscriber, the sender included, while it is connected; what the messages mean is
:mod:`stalroute.cluster`'s business. A message published while the bus is down is lost (its
``publish`` answers False).
"""

from __future__ import annotations

import os
import queue
import select
import threading
from collections.abc import Callable
from typing import Any, Protocol, cast
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import psycopg2
import psycopg2.extensions
import txredisapi
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IReactorFromThreads

from stalroute.logs import logger
from stalroute.mapping import InvalidStoreSetting, redact_url, scrub, url_secrets
from stalroute.mapping.redis_url import connection_settings
from stalroute.mapping.sql import postgresql_dsn

log = logger("stalroute.cluster")

#: The one channel every instance publishes to and listens on.
CHANNEL = "stalroute:changes"
#: The same channel under PostgreSQL (a plain identifier: ``LISTEN`` takes no parameter).
PG_CHANNEL = "stalroute_changes"
#: PostgreSQL refuses a NOTIFY payload of 8000 bytes or more.
MAX_NOTIFY_PAYLOAD = 7999
#: Cap of the reconnection backoff to the coordinator, in seconds.
RECONNECT_MAX_DELAY = 3.0
#: Bound of one connection attempt and of one PUBLISH, in seconds.
COMMAND_TIMEOUT = 5.0
#: The configuration key of the coordinator's URL (errors about the URL name it).
CLUSTER_URL_KEY = "cluster.url"


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
        self._target, self._tls = connection_settings(url, CLUSTER_URL_KEY)
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


def listener_dsn(url: str, timeout: float = COMMAND_TIMEOUT) -> str:
    """The libpq URI the bus (and the fleet's shared store) connects with: ``url`` plus a
    connect timeout from ``timeout`` and :data:`PG_LIVENESS` unless it sets them."""
    parts = urlsplit(postgresql_dsn(url, timeout))
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
            raise InvalidStoreSetting(
                f"{CLUSTER_URL_KEY}: {scrub(str(exc), self._secrets)}") from None
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
