"""The routing cache and the TSV file store."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.task import Clock

from stalroute.mapping import StoreError
from stalroute.mapping.cache import TRANSIENT_TTL, RoutingCache
from stalroute.mapping.file import MAX_REPORTED_PROBLEMS, FileMappingStore, MappingFileError


def result_of(d: Deferred):
    """The synchronous result of a fired Deferred (or its failure's exception)."""
    results = []
    d.addBoth(results.append)
    assert results, "Deferred has not fired"
    outcome = results[0]
    return outcome.value if hasattr(outcome, "value") and hasattr(outcome, "trap") else outcome


class CountingStore:
    def __init__(self, table: dict[str, str]) -> None:
        self.table = table
        self.queries = 0
        self.pending: list[Deferred] = []

    def lookup_now(self, key: str) -> Deferred:
        self.queries += 1
        return succeed(self.table.get(key))

    def lookup_later(self, key: str) -> Deferred:
        self.queries += 1
        d: Deferred = Deferred()
        self.pending.append(d)
        return d

    def lookup_failing(self, key: str) -> Deferred:
        self.queries += 1
        return fail(StoreError("down"))


def make_cache(clock: Clock, max_entries: int = 100) -> RoutingCache:
    return RoutingCache(clock, positive_ttl=600, negative_ttl=30, max_entries=max_entries,
                        lookup_timeout=5)


def test_positive_and_negative_tiers_expire_on_their_own_ttl() -> None:
    clock, store = Clock(), CountingStore({"bob": "node2"})
    cache = make_cache(clock)
    assert result_of(cache.resolve("bob", store.lookup_now)) == "node2"
    assert result_of(cache.resolve("alice", store.lookup_now)) is None
    assert store.queries == 2
    clock.advance(29)
    cache.resolve("bob", store.lookup_now)
    cache.resolve("alice", store.lookup_now)
    assert store.queries == 2
    clock.advance(2)  # negative entry (30 s) expired, positive (600 s) not
    cache.resolve("bob", store.lookup_now)
    cache.resolve("alice", store.lookup_now)
    assert store.queries == 3
    assert cache.counters["hit:positive"] == 2 and cache.counters["hit:negative"] == 1


def test_known_answers_only_what_resolve_would_answer_at_once() -> None:
    clock, store = Clock(), CountingStore({"bob": "node2"})
    cache = make_cache(clock)
    assert cache.known("bob") is None and cache.counters["miss"] == 0  # a miss is not counted
    cache.resolve("bob", store.lookup_now)
    cache.resolve("alice", store.lookup_now)
    assert cache.known("bob") == ("node2",) and cache.known("alice") == (None,)
    assert cache.counters["hit:positive"] == 1 and cache.counters["hit:negative"] == 1
    cache.max_age = 10.0  # the coordinator is away: older entries are not served
    clock.advance(11)
    assert cache.known("bob") is None
    cache.max_age = None
    cache.resolve("carol", store.lookup_failing)
    assert cache.known("carol") is None  # a remembered failure goes through resolve()
    assert store.queries == 3


def test_concurrent_misses_share_one_lookup() -> None:
    clock, store = Clock(), CountingStore({})
    cache = make_cache(clock)
    waiters = [cache.resolve("alice", store.lookup_later) for _ in range(1000)]
    assert store.queries == 1
    store.pending[0].callback("node2")
    assert {result_of(w) for w in waiters} == {"node2"}


def test_store_errors_are_remembered_briefly_in_the_transient_tier() -> None:
    clock, store = Clock(), CountingStore({})
    cache = make_cache(clock)
    assert isinstance(result_of(cache.resolve("alice", store.lookup_failing)), StoreError)
    assert isinstance(result_of(cache.resolve("alice", store.lookup_failing)), StoreError)
    assert store.queries == 1
    clock.advance(TRANSIENT_TTL + 0.1)
    assert result_of(cache.resolve("alice", CountingStore({"alice": "n1"}).lookup_now)) == "n1"


def test_lookup_timeout_counts_as_a_store_error() -> None:
    clock, store = Clock(), CountingStore({})
    cache = make_cache(clock)
    waiter = cache.resolve("alice", store.lookup_later)
    clock.advance(5.1)
    assert isinstance(result_of(waiter), StoreError)


def test_lru_cap_evicts_the_least_recently_used() -> None:
    clock, store = Clock(), CountingStore({"a": "x", "b": "x", "c": "x"})
    cache = make_cache(clock, max_entries=2)
    for key in ("a", "b", "a", "c"):
        cache.resolve(key, store.lookup_now)
    assert len(cache) == 2 and store.queries == 3
    cache.resolve("a", store.lookup_now)  # still cached
    cache.resolve("b", store.lookup_now)  # evicted
    assert store.queries == 4


def test_invalidation_drops_entries_and_ignores_answers_fetched_before_it() -> None:
    clock, store = Clock(), CountingStore({})
    cache = make_cache(clock)
    waiter = cache.resolve("alice", store.lookup_later)
    assert cache.invalidate() == 0
    store.pending[0].callback("stale")
    assert result_of(waiter) == "stale"
    assert len(cache) == 0


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_file_store_reads_comments_blank_lines_and_whitespace(tmp_path: Path) -> None:
    path = write(tmp_path / "m.tsv", "# header\n\nBob@Example.org\tnode2\ncarol   node1  # x\n")
    store = FileMappingStore(path, ["node1", "node2"], "lowercase")
    assert result_of(store.lookup("bob@example.org")) == "node2"
    assert result_of(store.lookup("carol")) == "node1"
    assert result_of(store.lookup("alice")) is None


def test_file_store_rejects_unknown_destinations_with_line_numbers(tmp_path: Path) -> None:
    path = write(tmp_path / "m.tsv", "bob node2\ncarol nowhere\nbad line here\n")
    with pytest.raises(MappingFileError) as info:
        FileMappingStore(path, ["node1", "node2"], "none")
    assert info.value.problems == ["line 2: unknown destination 'nowhere'",
                                   "line 3: expected 'identifier destination'"]


def test_file_store_refuses_invalid_identifiers_and_non_utf8_lines(tmp_path: Path) -> None:
    """Each bad line named with its number, the file named too; never a traceback."""
    path = tmp_path / "m.tsv"
    path.write_bytes(b"bob node2\n\xff\xfe\tnode1\ncar\x00ol\tnode1\nal\"ice node1\n"
                     b"# caf\xc3\xa9 is fine in a comment\nb\xc3\xa9a node1\n")
    with pytest.raises(MappingFileError) as info:
        FileMappingStore(path, ["node1", "node2"], "none")
    assert info.value.problems == [
        "line 2: not UTF-8 text",
        "line 3: invalid identifier (identifier contains a control character)",
        "line 4: invalid identifier (identifier contains a quote or backslash)",
    ]
    assert str(info.value).startswith(f"{path}: line 2: not UTF-8 text; line 3: ")


def test_a_file_of_garbage_gives_a_bounded_error(tmp_path: Path) -> None:
    path = tmp_path / "m.tsv"
    path.write_bytes(b"a\x01 node1\n" * 1000)
    with pytest.raises(MappingFileError) as info:
        FileMappingStore(path, ["node1"], "none")
    assert len(info.value.problems) == MAX_REPORTED_PROBLEMS + 1
    assert info.value.problems[-1] == "and 980 more bad lines"


def test_rewrite_is_sorted_tab_separated_and_keeps_the_file_mode(tmp_path: Path) -> None:
    from stalroute.mapping.file import write_atomically

    path = write(tmp_path / "m.tsv", "old node1\n")
    path.chmod(0o640)
    write_atomically(path, {"zed": "node1", "amy": "node2"})
    assert path.read_text() == "amy\tnode2\nzed\tnode1\n"
    assert path.stat().st_mode & 0o777 == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["m.tsv"]  # no temp file left behind


def test_file_store_batches_read_the_table_and_write_it_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes: list[dict[str, str]] = []

    def write_now(function, path: Path, table: dict[str, str]) -> Deferred:
        writes.append(dict(table))
        return maybeDeferred(function, path, table)

    monkeypatch.setattr("stalroute.mapping.file.deferToThread", write_now)
    path = write(tmp_path / "m.tsv", "bob node2\n")
    store = FileMappingStore(path, ["node1", "node2"], "none")
    assert result_of(store.lookup_many(["bob", "eve"])) == ["node2", None]
    pairs = [(f"user{n}", "node1") for n in range(1000)] + [("bob", "node1")]
    assert result_of(store.upsert_many(pairs)) is None
    assert len(writes) == 1 and len(writes[0]) == 1001  # one atomic rewrite
    assert result_of(store.lookup_many(["bob", "user999"])) == ["node1", "node1"]
    assert path.read_text().count("\n") == 1001
