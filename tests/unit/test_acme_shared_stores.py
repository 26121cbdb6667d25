"""The ACME shared stores (:mod:`stalroute.acme.shared_stores`) without servers: the factory,
URL checks, the error class and its bounds over a fake Redis pool and a fake clock. Against
real Redis and PostgreSQL: ``tests/integration/test_acme_stores.py``."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psycopg2
import pytest
from twisted.internet import defer
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from stalroute.acme import shared_stores
from stalroute.acme.shared_stores import (
    PostgresSharedStore,
    RedisSharedStore,
    StoreUnavailable,
    shared_store_for,
)
from stalroute.acme.store import SharedStore
from stalroute.config import ClusterConfig, parse_config
from stalroute.mapping.factory import InvalidStoreSetting

REDIS_URL = "redis://:S3cr3t-Pw@cache.example.net:6380/2"
PG_URL = "postgresql://acme:S3cr3t-Pw@db.example.net/fleet"


class FakePool:
    """The part of a txredisapi pool the store uses: commands are recorded and answered by
    ``reply`` (a pending Deferred by default: a silent server)."""

    def __init__(self, connected: bool = True) -> None:
        self._factory = SimpleNamespace(size=1 if connected else 0, stopped=False)
        self.sent: list[tuple[Any, ...]] = []
        self.reply: Any = None
        self.pending: list[Deferred[Any]] = []

    def _answer(self) -> Deferred[Any]:
        if self.reply is not None:
            return succeed(self.reply)
        d: Deferred[Any] = Deferred()
        self.pending.append(d)
        return d

    def execute_command(self, *args: Any) -> Deferred[Any]:
        self.sent.append(args)
        return self._answer()

    def eval(self, script: str, keys: list[str], args: list[Any]) -> Deferred[Any]:
        self.sent.append(("EVAL", script, *keys, *args))
        return self._answer()

    def disconnect(self) -> Deferred[None]:
        return succeed(None)


def redis_store(monkeypatch: pytest.MonkeyPatch, pool: FakePool,
                clock: Clock | None = None) -> RedisSharedStore:
    clock = clock or Clock()

    def connect(self: RedisSharedStore) -> FakePool:
        self._built_at = clock.seconds()
        return pool

    monkeypatch.setattr(RedisSharedStore, "_connect", connect)
    return RedisSharedStore(REDIS_URL, clock, timeout=1.0)


def outcome(d: Deferred[Any]) -> Any:
    """What ``d`` fired with (a Failure's exception: consumed), or the string ``"pending"``
    (then ``d`` is left alone)."""
    if not d.called or isinstance(getattr(d, "result", None), Deferred):
        return "pending"
    results: list[Any] = []
    d.addBoth(results.append)
    if not results:
        return "pending"
    return results[0].value if isinstance(results[0], Failure) else results[0]


# --- the factory -----------------------------------------------------------------------------


def test_no_coordinator_means_no_shared_store() -> None:
    assert shared_store_for(ClusterConfig(), Clock()) is None
    assert shared_store_for(ClusterConfig(coordinator="none"), Clock()) is None


def test_the_coordinator_url_builds_the_store(monkeypatch: pytest.MonkeyPatch) -> None:
    pool = FakePool()
    monkeypatch.setattr(RedisSharedStore, "_connect", lambda self: pool)
    redis = shared_store_for(ClusterConfig(coordinator="redis", url=REDIS_URL), Clock())
    assert isinstance(redis, RedisSharedStore) and "S3cr3t" not in repr(redis)
    postgres = shared_store_for(ClusterConfig(coordinator="postgresql", url=PG_URL), Clock())
    assert isinstance(postgres, PostgresSharedStore) and "S3cr3t" not in postgres.label
    for store in (redis, postgres):
        check: SharedStore = store  # the Protocol, as mypy sees it
        assert outcome(check.close()) is None


def test_the_whole_config_is_accepted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(RedisSharedStore, "_connect", lambda self: FakePool())
    (tmp_path / "m.tsv").write_text("")
    document: dict[str, Any] = {
        "routing": {"default_destination": "main"},
        "mapping": {"source": "file", "file": {"path": "m.tsv"}},
        "destination": {"main": {"host": "b.example.com", "allow_plaintext_auth": True,
                                 "protocol": {"imap": {"port": 143, "tls": "plain"}}}},
        "listener": {"imap": {"protocol": "imap", "bind": ["127.0.0.1:1143"],
                              "tls": "plain"}},
    }
    assert shared_store_for(parse_config(document, tmp_path, {}), Clock()) is None
    document["cluster"] = {"coordinator": "redis", "url": REDIS_URL}
    store = shared_store_for(parse_config(document, tmp_path, {}), Clock())
    assert isinstance(store, RedisSharedStore)


@pytest.mark.parametrize(("coordinator", "url", "message"), [
    ("redis", "redis://127.0.0.1/zero", r"^cluster\.url: the database must be a number"),
    ("redis", "redis://:S3cr3t-Pw@h/1?bogus=1", r"^cluster\.url: unknown parameter 'bogus'"),
    ("postgresql", "postgresql://u:S3cr3t-Pw@h/db?nonsense=1", r"^cluster\.url: "),
])
def test_an_unusable_url_is_named_by_its_key(coordinator: str, url: str, message: str) -> None:
    with pytest.raises(InvalidStoreSetting, match=message) as info:
        shared_store_for(ClusterConfig(coordinator=coordinator, url=url), Clock())
    assert "S3cr3t" not in str(info.value)


def test_the_postgresql_connection_is_bounded() -> None:
    store = PostgresSharedStore(PG_URL + "?keepalives_idle=9", Clock(), timeout=3.0)
    dsn = store._dsn
    for setting in ("connect_timeout=3", "keepalives=1", "keepalives_idle=9",
                    "tcp_user_timeout=10000", "application_name=stalroute"):
        assert setting in dsn, dsn
    assert "keepalives_idle=5" not in dsn  # the URL's own setting wins
    store.close()


# --- Redis over a fake pool ------------------------------------------------------------------


def test_redis_commands_keys_and_values(monkeypatch: pytest.MonkeyPatch) -> None:
    pool = FakePool()
    store = redis_store(monkeypatch, pool)
    pool.reply = b"\x00\xffvalue"
    assert outcome(store.get("acme/account/le")) == b"\x00\xffvalue"
    pool.reply = "OK"
    assert outcome(store.put("acme/challenge/t", b"\x00", ttl=2.5)) is None
    assert outcome(store.put("acme/challenge/t", b"x", ttl=0.0001)) is None
    assert outcome(store.put("k", b"y")) is None
    pool.reply = 1
    assert outcome(store.put("gone", b"z", ttl=0)) is None  # expired already: deleted
    assert outcome(store.acquire_lease("acme_renew", "node-2", 30)) is True
    pool.reply = 0
    assert outcome(store.acquire_lease("acme_renew", "node-3", 30)) is False
    assert outcome(store.release_lease("acme_renew", "node-3")) is None
    assert outcome(store.purge()) == 0  # Redis expires keys by itself
    sent = [command for command in pool.sent if command[0] != "EVAL"]
    assert sent == [("GET", "stalroute:kv:acme/account/le"),
                    ("SET", "stalroute:kv:acme/challenge/t", b"\x00", "PX", 2500),
                    ("SET", "stalroute:kv:acme/challenge/t", b"x", "PX", 1),
                    ("SET", "stalroute:kv:k", b"y"),
                    ("DEL", "stalroute:kv:gone")]
    scripts = [command for command in pool.sent if command[0] == "EVAL"]
    assert [command[2:] for command in scripts] == [
        ("stalroute:lease:acme_renew", "node-2", 30000),
        ("stalroute:lease:acme_renew", "node-3", 30000),
        ("stalroute:lease:acme_renew", "node-3")]
    assert "'NX', 'PX'" in scripts[0][1] and "PEXPIRE" in scripts[0][1]


def test_a_silent_redis_fails_after_the_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    store = redis_store(monkeypatch, FakePool(), clock)
    d = store.get("k")
    clock.advance(0.9)
    assert outcome(d) == "pending"
    clock.advance(0.2)
    error = outcome(d)
    assert isinstance(error, StoreUnavailable)
    assert str(error) == "redis://:***@cache.example.net:6380/2: get failed: no answer in time"


def test_a_disconnected_redis_fails_at_once_after_a_short_wait(
        monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    pool = FakePool(connected=False)
    store = redis_store(monkeypatch, pool, clock)
    d = store.acquire_lease("purge", "node-1", 10)  # a new pool: waits for its connection
    assert outcome(d) == "pending"
    for _ in range(60):
        clock.advance(0.02)
    error = outcome(d)
    assert isinstance(error, StoreUnavailable) and "not connected" in str(error)
    assert pool.sent == []
    error = outcome(store.put("k", b"v"))  # later: at once
    assert isinstance(error, StoreUnavailable)
    assert str(error) == "redis://:***@cache.example.net:6380/2: put failed: not connected"


def test_a_new_redis_pool_that_connects_in_time_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    pool = FakePool(connected=False)
    pool.reply = b"v"
    store = redis_store(monkeypatch, pool, clock)
    d = store.get("k")
    clock.advance(0.1)
    pool._factory.size = 1
    clock.advance(0.02)
    assert outcome(d) == b"v"


def test_a_closed_store_refuses_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    store = redis_store(monkeypatch, FakePool())
    assert outcome(store.close()) is None and outcome(store.close()) is None
    postgres = PostgresSharedStore(PG_URL, Clock())
    assert outcome(postgres.close()) is None
    for closed in (store, postgres):
        calls = [closed.get("k"), closed.put("k", b"v"), closed.delete("k"),
                 closed.acquire_lease("t", "h", 1), closed.release_lease("t", "h"),
                 closed.purge()]
        for d in calls:
            error = outcome(d)
            assert isinstance(error, StoreUnavailable) and "the store is closed" in str(error)


# --- the error mapping -----------------------------------------------------------------------


@pytest.mark.parametrize(("raised", "detail"), [
    (defer.TimeoutError(), "no answer in time"),
    (defer.CancelledError(), "no answer in time"),
    (psycopg2.OperationalError('connection to "db" failed: password S3cr3t-Pw'),
     'connection to "db" failed: password ***'),
    (ConnectionRefusedError("refused"), "refused"),
])
def test_store_failures_become_store_unavailable(raised: Exception, detail: str) -> None:
    failure = shared_stores._unavailable(Failure(raised), "db", "get", ("S3cr3t-Pw",))
    assert failure.check(StoreUnavailable)
    assert str(failure.value) == f"db: get failed: {detail}"


def test_programming_errors_are_not_hidden() -> None:
    failure = shared_stores._unavailable(Failure(TypeError("bug")), "db", "get", ())
    assert failure.check(TypeError)
