"""The ACME shared stores against real Redis and PostgreSQL (SPEC §2.11, §2.13;
:mod:`stalroute.acme.shared_stores`).

Private servers from ``tests/harness/redis.py`` and ``postgres.py``. pytest runs no reactor, so
every scenario runs in a child Python (:func:`scenario_main`) and reports JSON; the test
checks it. The property test runs hypothesis in the child too, with the reactor in a thread.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import start_postgres
from tests.harness.ports import free_port
from tests.harness.postgres import PostgresServer
from tests.harness.redis import RedisServer
from tests.harness.stalroute import REPO_ROOT
from tests.integration.test_stores import (  # noqa: F401 - redis_server: a fixture
    REDIS_PASSWORD, redis_server,
)

pytestmark = pytest.mark.integration

KINDS = ("redis", "postgresql")


@pytest.fixture(scope="module")
def postgres_server() -> Iterator[PostgresServer]:
    server = start_postgres()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    redis_server.start()  # a previous test may have stopped it
    redis_server.command("FLUSHALL")
    return redis_server.url()


@pytest.fixture
def postgresql_url(postgres_server: PostgresServer) -> str:
    postgres_server.start()
    postgres_server.execute("DROP TABLE IF EXISTS stalroute_acme, stalroute_leases")
    return postgres_server.url()


@pytest.fixture(params=KINDS)
def store(request: pytest.FixtureRequest) -> dict[str, str]:
    """Each kind of store in turn: the spec the child builds it from."""
    return {"kind": request.param, "url": request.getfixturevalue(f"{request.param}_url")}


CHILD = ("import sys; from tests.integration.test_acme_stores import scenario_main; "
         "scenario_main(sys.argv[1:])")


def run_scenario(name: str, spec: dict[str, Any], timeout: float = 120) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-c", CHILD, name, json.dumps(spec)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- the tests -------------------------------------------------------------------------------


def test_put_get_delete_and_arbitrary_bytes(store: dict[str, str]) -> None:
    result = run_scenario("basics", store)
    assert result["type"] == {"redis": "RedisSharedStore",
                              "postgresql": "PostgresSharedStore"}[store["kind"]]
    assert result["missing"] is None
    assert result["roundtrip"] == [True, True, True, True]  # NUL, every byte, 200 KiB, empty
    assert result["replaced"] == "second"
    assert result["deleted"] is None and result["deleted_again"] == "ok"
    assert result["unicode_key"] == "ü"
    assert REDIS_PASSWORD not in json.dumps(result)


def test_values_expire_after_their_ttl(store: dict[str, str]) -> None:
    result = run_scenario("ttl", store)
    assert result["before"] == "short" and result["after"] is None
    assert result["kept"] == "long"  # a put without ttl clears an earlier one
    assert result["zero_ttl"] is None


def test_leases_have_exactly_one_holder(store: dict[str, str]) -> None:
    result = run_scenario("leases", store)
    assert result["first"] == [True, False]  # a takes it, b is refused
    assert result["renewed"] == [True, False]
    assert result["foreign_release"] is False  # b releasing a's lease changes nothing
    assert result["released"] == [True, False]  # after a releases, b takes it, a is refused
    assert result["race"] == 1, result  # 20 holders at once on two stores: one wins
    assert result["takeover"] == [True, False, True, False]
    assert result["renewal_extends"] == [False, True]
    assert result["tasks_independent"] == [True, True]


def test_purge_removes_only_what_expired(store: dict[str, str],
                                        request: pytest.FixtureRequest) -> None:
    result = run_scenario("purge", store)
    # Redis expires by itself: its purge has nothing to count.
    assert result["purged"] == (2 if store["kind"] == "postgresql" else 0)
    assert result["expired"] == [None, True]  # the value is gone, the lease is free
    assert result["kept"] == ["permanent", False]  # still there, still held
    if store["kind"] == "postgresql":  # the rows left: the permanent value, both live leases
        server: PostgresServer = request.getfixturevalue("postgres_server")
        assert server.execute("SELECT key FROM stalroute_acme") == [("acme/account/x",)]
        assert sorted(server.execute("SELECT task, holder FROM stalroute_leases")) == [
            ("expired", "b"), ("live", "a")]


def test_a_stopped_server_fails_clearly_and_recovers(
        store: dict[str, str], redis_server: RedisServer, postgres_server: PostgresServer,
        tmp_path: Path) -> None:
    server = redis_server if store["kind"] == "redis" else postgres_server
    spec = {**store, "handshake": str(tmp_path)}
    child = subprocess.Popen([sys.executable, "-c", CHILD, "outage", json.dumps(spec)],
                             cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        for step, action in (("up", server.stop), ("down", server.start)):
            deadline = time.monotonic() + 60
            while not (tmp_path / step).exists():
                assert child.poll() is None, child.communicate()[1][-3000:]
                assert time.monotonic() < deadline, f"the child never reached {step}"
                time.sleep(0.05)
            action()
            (tmp_path / f"{step}-go").touch()
        out, err = child.communicate(timeout=90)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    assert child.returncode == 0, err[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["before"] == "v"
    for operation, (outcome, seconds) in result["down"].items():
        assert outcome.startswith("StoreUnavailable: "), (operation, outcome)
        assert " failed: " in outcome and REDIS_PASSWORD not in outcome, outcome
        assert seconds < 4.0, (operation, outcome, seconds)
    assert result["after"] == "again", result


@pytest.mark.parametrize("kind", KINDS)
def test_unreachable_and_silent_servers_fail_within_the_timeout(kind: str) -> None:
    result = run_scenario("unreachable", {"kind": kind, "port": free_port()})
    for case in ("closed", "silent"):
        outcome, seconds = result[case]
        assert outcome.startswith("StoreUnavailable: ") and "Pw-hidden" not in outcome, outcome
        assert seconds < 4.0, (case, outcome, seconds)
    assert result["closed_store"].startswith("StoreUnavailable: "), result


def test_both_stores_agree_with_a_dict(redis_url: str, postgresql_url: str) -> None:
    """Property: on a random sequence of put/get/delete, both stores answer every get as a
    dict does."""
    result = run_scenario("model", {"redis": redis_url, "postgresql": postgresql_url,
                                    "examples": 15})
    assert result["outcome"] == "passed", result["outcome"]
    assert result["examples"] >= 5


# --- the child side --------------------------------------------------------------------------


def _build(spec: dict[str, Any], **options: Any) -> Any:
    from twisted.internet import reactor

    from stalroute.acme.shared_stores import (
        PostgresSharedStore,
        RedisSharedStore,
        shared_store_for,
    )
    from stalroute.config import ClusterConfig

    if options:
        kind = RedisSharedStore if spec["kind"] == "redis" else PostgresSharedStore
        return kind(spec["url"], reactor, **options)
    return shared_store_for(ClusterConfig(coordinator=spec["kind"], url=spec["url"]), reactor)


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode()


def scenario_main(argv: list[str]) -> None:
    """Child side of :func:`run_scenario`: one scenario under the reactor, JSON on stdout."""
    name, spec = argv[0], json.loads(argv[1])
    if name == "model":
        print(json.dumps(model_main(spec)), flush=True)
        return

    from twisted.internet import defer, task
    from twisted.internet.protocol import Factory, Protocol

    result: dict[str, Any] = {}

    def sleep(reactor: Any, seconds: float) -> defer.Deferred[None]:
        return task.deferLater(reactor, max(0.0, seconds), lambda: None)

    async def outcome(call: Any) -> Any:
        try:
            return await call()
        except Exception as exc:  # noqa: BLE001 - reported to the test
            return f"{type(exc).__name__}: {exc}"

    async def basics(reactor: Any) -> None:
        store = _build(spec)
        result["type"] = type(store).__name__
        result["missing"] = _text(await store.get("acme/nothing"))
        values = [b"a\x00b\x00", bytes(range(256)) * 4,
                  bytes(i * 7919 % 251 for i in range(200 * 1024)), b""]
        result["roundtrip"] = []
        for index, value in enumerate(values):
            await store.put(f"acme/bytes/{index}", value)
            result["roundtrip"].append(await store.get(f"acme/bytes/{index}") == value)
        await store.put("acme/replace", b"first")
        await store.put("acme/replace", b"second")
        result["replaced"] = _text(await store.get("acme/replace"))
        await store.delete("acme/replace")
        result["deleted"] = _text(await store.get("acme/replace"))
        await store.delete("acme/replace")
        result["deleted_again"] = "ok"
        await store.put("acme/certificate/mail.test ü", "ü".encode())
        result["unicode_key"] = _text(await store.get("acme/certificate/mail.test ü"))
        await store.close()

    async def ttl(reactor: Any) -> None:
        store = _build(spec)
        await store.put("short", b"short", ttl=0.4)
        await store.put("long", b"x", ttl=0.4)
        await store.put("long", b"long")
        await store.put("zero", b"zero", ttl=0)
        result["before"] = _text(await store.get("short"))
        result["zero_ttl"] = _text(await store.get("zero"))
        await sleep(reactor, 0.8)
        result["after"] = _text(await store.get("short"))
        result["kept"] = _text(await store.get("long"))
        await store.close()

    async def leases(reactor: Any) -> None:
        one, two = _build(spec), _build(spec)
        result["first"] = [await one.acquire_lease("acme_renew", "a", 30),
                           await two.acquire_lease("acme_renew", "b", 30)]
        result["renewed"] = [await one.acquire_lease("acme_renew", "a", 30),
                             await two.acquire_lease("acme_renew", "b", 30)]
        await two.release_lease("acme_renew", "b")
        result["foreign_release"] = await two.acquire_lease("acme_renew", "b", 30)
        await one.release_lease("acme_renew", "a")
        result["released"] = [await two.acquire_lease("acme_renew", "b", 30),
                              await one.acquire_lease("acme_renew", "a", 30)]
        attempts = [store.acquire_lease("race", f"holder-{index}-{side}", 30)
                    for index in range(10) for side, store in enumerate((one, two))]
        result["race"] = sum(await defer.gatherResults(attempts))
        takeover = [await one.acquire_lease("purge", "c", 0.5),
                    await two.acquire_lease("purge", "d", 0.5)]
        await sleep(reactor, 0.8)
        takeover += [await two.acquire_lease("purge", "d", 5),
                     await one.acquire_lease("purge", "c", 5)]
        result["takeover"] = takeover
        start = reactor.seconds()
        await one.acquire_lease("renewal", "e", 1.0)
        await sleep(reactor, start + 0.6 - reactor.seconds())
        await one.acquire_lease("renewal", "e", 1.0)  # now until ~1.6 s
        await sleep(reactor, start + 1.2 - reactor.seconds())
        extended = [await two.acquire_lease("renewal", "f", 5)]
        await sleep(reactor, start + 2.2 - reactor.seconds())
        extended.append(await two.acquire_lease("renewal", "f", 5))
        result["renewal_extends"] = extended
        result["tasks_independent"] = [await one.acquire_lease("task-x", "g", 30),
                                       await two.acquire_lease("task-y", "h", 30)]
        await one.close()
        await two.close()

    async def purge(reactor: Any) -> None:
        store, other = _build(spec), _build(spec)
        await store.put("acme/challenge/old", b"old", ttl=0.3)
        await store.acquire_lease("expired", "a", 0.3)
        await store.put("acme/account/x", b"permanent")
        await store.acquire_lease("live", "a", 30)
        await sleep(reactor, 0.6)
        result["purged"] = await store.purge()
        result["expired"] = [_text(await store.get("acme/challenge/old")),
                             await other.acquire_lease("expired", "b", 30)]
        result["kept"] = [_text(await store.get("acme/account/x")),
                          await other.acquire_lease("live", "b", 30)]
        await store.close()
        await other.close()

    async def outage(reactor: Any) -> None:
        handshake = Path(spec["handshake"])
        store = _build(spec, timeout=1.0)

        async def step(name: str) -> None:
            (handshake / name).touch()
            while not (handshake / f"{name}-go").exists():
                await sleep(reactor, 0.05)

        await store.put("k", b"v")
        result["before"] = _text(await store.get("k"))
        await step("up")  # the parent stops the server
        await sleep(reactor, 0.3)  # the Redis pool notices the closed connections
        calls = {"get": lambda: store.get("k"), "put": lambda: store.put("k", b"w", 5),
                 "delete": lambda: store.delete("k"),
                 "acquire_lease": lambda: store.acquire_lease("t", "a", 5),
                 "release_lease": lambda: store.release_lease("t", "a")}
        if spec["kind"] == "postgresql":
            calls["purge"] = store.purge
        result["down"] = {}
        for operation, call in calls.items():
            began = reactor.seconds()
            answer = await outcome(call)
            result["down"][operation] = [str(answer), reactor.seconds() - began]
        await step("down")  # the parent starts it again
        deadline = reactor.seconds() + 20
        while True:  # the Redis pool reconnects with backoff; Redis lost its data
            answer = await outcome(lambda: store.put("k", b"again"))
            if answer is None or reactor.seconds() > deadline:
                break
            await sleep(reactor, 0.2)
        result["after"] = _text(await store.get("k"))
        await store.close()

    async def unreachable(reactor: Any) -> None:
        silent = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
        scheme = "redis" if spec["kind"] == "redis" else "postgresql"
        for case, port in (("closed", spec["port"]), ("silent", silent.getHost().port)):
            url = f"{scheme}://app:Pw-hidden@127.0.0.1:{port}/0"
            store = _build({"kind": spec["kind"], "url": url}, timeout=1.0)
            await sleep(reactor, 1.1)  # past the wait of a new Redis pool for its connection
            began = reactor.seconds()
            answer = await outcome(lambda: store.get("k"))
            result[case] = [str(answer), reactor.seconds() - began]
            await store.close()
            result["closed_store"] = str(await outcome(lambda: store.get("k")))
        await silent.stopListening()

    scenarios = {"basics": basics, "ttl": ttl, "leases": leases, "purge": purge,
                 "outage": outage, "unreachable": unreachable}

    async def main(reactor: Any) -> None:
        await scenarios[name](reactor)
        print(json.dumps(result), flush=True)

    task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor)))


def model_main(spec: dict[str, Any]) -> dict[str, Any]:
    """Hypothesis in this (child) thread, the reactor in another; both stores and a dict
    get the same random put/get/delete sequence, and every get must agree."""
    import itertools
    import threading

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from twisted.internet import reactor
    from twisted.internet.threads import blockingCallFromThread

    thread = threading.Thread(target=reactor.run, kwargs={"installSignalHandlers": False},
                              daemon=True)
    thread.start()
    stores = blockingCallFromThread(reactor, lambda: [
        _build({"kind": kind, "url": spec[kind]}) for kind in KINDS])
    run = itertools.count()
    keys = st.sampled_from(["a", "b", "acme/c", "", "ü \x01"])
    operations = st.lists(st.one_of(
        st.tuples(st.just("put"), keys, st.binary(max_size=300)),
        st.tuples(st.just("get"), keys, st.just(b"")),
        st.tuples(st.just("delete"), keys, st.just(b""))), max_size=25)

    @settings(max_examples=spec["examples"], deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(operations)
    def agree(steps: list[tuple[str, str, bytes]]) -> None:
        namespace = f"model/{next(run)}/"  # every example starts from an empty keyspace
        model: dict[str, bytes] = {}
        for action, key, value in steps:
            for store in stores:
                if action == "put":
                    blockingCallFromThread(reactor, store.put, namespace + key, value)
                elif action == "delete":
                    blockingCallFromThread(reactor, store.delete, namespace + key)
                else:
                    got = blockingCallFromThread(reactor, store.get, namespace + key)
                    assert got == model.get(key), (type(store).__name__, steps)
            if action == "put":
                model[key] = value
            elif action == "delete":
                model.pop(key, None)

    try:
        agree()
        outcome = "passed"
    except Exception as exc:  # noqa: BLE001 - reported to the test
        outcome = f"{type(exc).__name__}: {exc}"
    finally:
        for store in stores:
            blockingCallFromThread(reactor, store.close)
        reactor.callFromThread(reactor.stop)
        thread.join(10)
    return {"outcome": outcome, "examples": next(run)}
