"""The coordinators (:mod:`stalroute.coordinators`) without servers: the Redis bus's URL
checks, and the PostgreSQL bus's thread over fake connections. Both against real servers are
``tests/integration/test_cluster.py``; what travels on them is ``test_cluster.py``.
"""

from __future__ import annotations

import queue
import socket
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import psycopg2
import pytest

from stalroute.coordinators import (
    CHANNEL, MAX_NOTIFY_PAYLOAD, PG_CHANNEL, PostgreSQLCoordinator, RedisCoordinator,
    listener_dsn,
)
from stalroute.mapping.factory import InvalidStoreSetting


def test_the_redis_coordinator_refuses_an_unusable_url_under_its_own_key() -> None:
    with pytest.raises(InvalidStoreSetting, match=r"^cluster\.url: the database must be"):
        RedisCoordinator("redis://127.0.0.1/zero")
    coordinator = RedisCoordinator("redis://:secret@127.0.0.1:1")
    assert "secret" not in coordinator.label
    published: list[bool] = []
    coordinator.publish("{}").addCallback(published.append)  # not started: not sent
    assert published == [False] and not coordinator.connected
    assert CHANNEL == "stalroute:changes"



# --- the PostgreSQL coordinator -------------------------------------------------------------


class ReactorThread:
    """Stands in for the reactor: what the bus thread hands over runs in the test's thread."""

    def __init__(self) -> None:
        self.calls: queue.SimpleQueue[tuple[Callable[..., Any], tuple, dict]] = (
            queue.SimpleQueue())

    def callFromThread(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self.calls.put((call, args, kwargs))

    def run_until(self, condition: Callable[[], bool], timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, "the bus thread did not get there"
            try:
                call, args, kwargs = self.calls.get(timeout=0.05)
            except queue.Empty:
                continue
            call(*args, **kwargs)


class FakeConnection:
    """A psycopg2 connection whose server end is a socket pair: a line written there is a
    notification, closing it is the server going away."""

    def __init__(self) -> None:
        self.ours, self.server = socket.socketpair()
        self.notifies: list[SimpleNamespace] = []
        self.executed: list[tuple[str, Any]] = []
        self.autocommit = False
        self.closed = False

    def fileno(self) -> int:
        return self.ours.fileno()

    def cursor(self) -> FakeConnection:
        return self

    def __enter__(self) -> FakeConnection:
        return self

    def __exit__(self, *exc_info: object) -> None:
        pass

    def execute(self, sql: str, params: Any = None) -> None:
        assert self.autocommit  # LISTEN and NOTIFY act at once, outside a transaction
        self.executed.append((sql, params))

    def poll(self) -> None:
        data = self.ours.recv(4096)
        if not data:
            raise psycopg2.OperationalError("server closed the connection unexpectedly")
        self.notifies += [SimpleNamespace(payload=line) for line in data.decode().split()]

    def close(self) -> None:
        self.closed = True
        self.ours.close()


@pytest.fixture
def postgresql_bus(monkeypatch: pytest.MonkeyPatch):
    """A started PostgreSQLCoordinator on fake connections (handed out in turn; none left:
    refused), what it delivered, and its reactor stand-in."""
    connections: list[FakeConnection] = []
    dsns: list[str] = []

    def connect(dsn: str) -> FakeConnection:
        dsns.append(dsn)
        if not connections:
            raise psycopg2.OperationalError("connection refused")
        return connections.pop(0)

    monkeypatch.setattr(psycopg2, "connect", connect)
    reactor = ReactorThread()
    coordinator = PostgreSQLCoordinator("postgresql://bus:secret@db.example/fleet",
                                        reactor=reactor)  # type: ignore[arg-type]
    messages: list[str | bytes] = []
    states: list[bool] = []
    state = SimpleNamespace(coordinator=coordinator, connections=connections, dsns=dsns,
                            reactor=reactor, messages=messages, states=states)
    yield state
    stopped: list[None] = []
    coordinator.stop().addCallback(stopped.append)
    reactor.run_until(lambda: stopped == [None])
    assert all(connection.closed for connection in connections)


def test_the_postgresql_bus_listens_hands_on_notifications_and_publishes(
        postgresql_bus) -> None:
    bus = postgresql_bus
    connection = FakeConnection()
    bus.connections.append(connection)
    bus.coordinator.start(bus.messages.append, bus.states.append)
    bus.reactor.run_until(lambda: bus.states == [True])
    assert bus.coordinator.connected
    assert connection.executed == [(f"LISTEN {PG_CHANNEL}", None)]
    assert "connect_timeout=" in bus.dsns[0] and "keepalives_idle=" in bus.dsns[0]

    connection.server.sendall(b'{"a":1}\n{"b":2}\n')
    bus.reactor.run_until(lambda: len(bus.messages) == 2)
    assert bus.messages == ['{"a":1}', '{"b":2}']

    sent: list[bool] = []
    bus.coordinator.publish('{"c":3}').addCallback(sent.append)
    bus.reactor.run_until(lambda: sent == [True])
    assert connection.executed[-1] == ("SELECT pg_notify(%s, %s)", (PG_CHANNEL, '{"c":3}'))
    bus.connections.append(connection)  # the fixture checks it is closed


def test_the_postgresql_bus_reports_a_lost_server_and_reconnects(postgresql_bus) -> None:
    bus = postgresql_bus
    first, second = FakeConnection(), FakeConnection()
    bus.connections.append(first)
    bus.coordinator.start(bus.messages.append, bus.states.append)
    bus.reactor.run_until(lambda: bus.states == [True])

    bus.connections.append(second)  # after one refused attempt or none
    first.server.close()
    bus.reactor.run_until(lambda: bus.states == [True, False])
    assert first.closed
    sent: list[bool] = []
    bus.coordinator.publish("{}").addCallback(sent.append)
    assert sent == [False]  # not connected: not sent, not queued

    bus.reactor.run_until(lambda: bus.states == [True, False, True])
    assert second.executed == [(f"LISTEN {PG_CHANNEL}", None)]
    second.server.sendall(b"after\n")
    bus.reactor.run_until(lambda: bus.messages == ["after"])
    bus.connections += [first, second]


def test_the_postgresql_bus_retries_an_unreachable_server_until_stopped(
        postgresql_bus) -> None:
    bus = postgresql_bus
    bus.coordinator.start(bus.messages.append, bus.states.append)
    bus.reactor.run_until(lambda: len(bus.dsns) >= 3)  # backoff from 0.1 s
    assert bus.states == [] and not bus.coordinator.connected


def test_the_postgresql_bus_refuses_a_payload_notify_cannot_carry() -> None:
    coordinator = PostgreSQLCoordinator("postgresql://bus:secret@127.0.0.1:1/fleet")
    assert "secret" not in coordinator.label
    published: list[bool] = []
    coordinator.publish("x" * (MAX_NOTIFY_PAYLOAD + 1)).addCallback(published.append)
    coordinator._connected = True  # as if connected: the size alone refuses it
    coordinator.publish("é" * (MAX_NOTIFY_PAYLOAD // 2 + 1)).addCallback(published.append)
    coordinator._connected = False
    coordinator.publish("{}").addCallback(published.append)  # not started: not sent
    assert published == [False, False, False]
    stopped: list[None] = []
    coordinator.stop().addCallback(stopped.append)
    assert stopped == [None]


def test_the_postgresql_coordinator_refuses_an_unusable_url_under_its_own_key() -> None:
    with pytest.raises(InvalidStoreSetting,
                       match=r'^cluster\.url: invalid dsn.*"colour"') as caught:
        PostgreSQLCoordinator("postgresql://bus:secret@127.0.0.1/fleet?colour=blue")
    assert "secret" not in str(caught.value)


def test_the_listener_dsn_keeps_what_the_url_sets() -> None:
    dsn = listener_dsn("postgresql://bus@db/fleet?keepalives_idle=60&connect_timeout=2")
    assert "keepalives_idle=60" in dsn and "keepalives_idle=5" not in dsn
    assert "connect_timeout=2" in dsn and "keepalives_count=3" in dsn
    assert "tcp_user_timeout=10000" in dsn
