"""The incremental bulk readers (TSV, JSON array, JSON Lines) of ``stalroute.admin.bulk``."""

from __future__ import annotations

import io
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stalroute.admin import bulk
from stalroute.admin.bulk import BadRow, BulkFormatError, Row


class Trickle(io.RawIOBase):
    """A stream that hands out at most ``step`` bytes per read (chunk boundaries anywhere)."""

    def __init__(self, data: bytes, step: int) -> None:
        self._data, self._pos, self._step = data, 0, step

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        chunk = self._data[self._pos:self._pos + min(self._step, len(buffer))]
        buffer[:len(chunk)] = chunk
        self._pos += len(chunk)
        return len(chunk)


def records(data: bytes, fmt: str, step: int | None = None) -> list:
    stream = io.BytesIO(data) if step is None else io.BufferedReader(Trickle(data, step), 16)
    return list(bulk.read_records(stream, fmt))


# --- TSV ---------------------------------------------------------------------------------


def test_tsv_rows_comments_and_bad_lines() -> None:
    data = (b"# header comment\n"
            b"alice\tnode2\n"
            b"\n"
            b"bob   node1   # trailing comment\n"
            b"carol\n"
            b"dave node1 extra\n"
            b"erin\tnode2")  # no final newline
    assert records(data, "tsv") == [
        Row(2, "alice", "node2"), Row(4, "bob", "node1"),
        BadRow(5, "expected 'identifier<TAB>destination'"),
        BadRow(6, "expected 'identifier<TAB>destination'"),
        Row(7, "erin", "node2")]


def test_tsv_non_utf8_and_overlong_lines_are_bad_rows_not_fatal() -> None:
    data = b"al\xffice\tnode2\n" + b"x" * (bulk.MAX_LINE + 10) + b"\tnode1\nbob\tnode1\n"
    assert records(data, "tsv") == [
        BadRow(1, "not UTF-8"), BadRow(2, f"line longer than {bulk.MAX_LINE} bytes"),
        Row(3, "bob", "node1")]


def test_tsv_line_helper_round_trips() -> None:
    line = bulk.tsv_line("alice@example.com", "node2")
    assert records(line.encode(), "tsv") == [Row(1, "alice@example.com", "node2")]


# --- JSON --------------------------------------------------------------------------------


def test_json_array_of_objects_and_pairs_with_line_numbers() -> None:
    data = b'[\n {"identifier": "alice", "destination": "node2", "note": 1},\n' \
           b' ["bob", "node1"],\n 42,\n {"identifier": "carol"},\n {"identifier": 1, ' \
           b'"destination": "x"}\n]\n'
    assert records(data, "json") == [
        Row(2, "alice", "node2"), Row(3, "bob", "node1"),
        BadRow(4, 'expected {"identifier": ..., "destination": ...}'),
        BadRow(5, "identifier and destination must be strings"),
        BadRow(6, "identifier and destination must be strings")]


def test_json_lines() -> None:
    data = b'{"identifier": "alice", "destination": "node2"}\n\n' \
           b'{"identifier": "bob", "destination": "node1"}\n'
    assert records(data, "json") == [Row(1, "alice", "node2"), Row(3, "bob", "node1")]


@pytest.mark.parametrize("data", [b"", b"  \n", b"[]", b" [ ]\n"])
def test_json_empty_bodies(data: bytes) -> None:
    assert records(data, "json") == []


@pytest.mark.parametrize(("data", "line"), [
    (b'[\n{"identifier": "a", "destination": "b"}\n{"identifier": "c"}]', 3),  # missing ','
    (b'[\n{"identifier": "a", "destination": "b"},\n', 3),  # truncated
    (b'[{"identifier": "a", "destination": "b"}] trailing', 1),
    (b'[\n\n{"identifier": "a", "destination": }]', 3),
    (b'[\n"\xff"]', 2),
])
def test_json_syntax_errors_are_fatal_with_a_line(data: bytes, line: int) -> None:
    with pytest.raises(BulkFormatError) as raised:
        records(data, "json")
    assert raised.value.line == line


def test_json_element_size_is_bounded() -> None:
    data = b'[{"identifier": "' + b"a" * (bulk.MAX_ELEMENT + 10)
    with pytest.raises(BulkFormatError, match="larger than"):
        records(data, "json", step=4096)


def test_json_lines_writer_round_trips() -> None:
    pairs = [("alice", "node2"), ("bob", "node1"), ("ünï", "node2")]
    text = "".join(bulk.json_lines(pairs))
    assert json.loads(text) == [{"identifier": i, "destination": d} for i, d in pairs]
    assert records(text.encode(), "json") == [Row(n + 2, i, d) for n, (i, d) in enumerate(pairs)]
    assert "".join(bulk.json_lines([])).strip() == "[\n]"


_identifiers = st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zs", "Zl", "Zp"),
                                     blacklist_characters="#"), min_size=1, max_size=20)


@settings(max_examples=60, deadline=None)
@given(pairs=st.lists(st.tuples(_identifiers, st.sampled_from(["node1", "node2"])),
                      max_size=30),
       step=st.integers(1, 64), fmt=st.sampled_from(["tsv", "json"]))
def test_any_chunking_gives_the_same_records(pairs, step, fmt) -> None:
    """Numbers, strings and escapes split across reads at any byte are read the same."""
    if fmt == "json":
        data = "".join(bulk.json_lines(pairs)).encode()
    else:
        data = "".join(bulk.tsv_line(i, d) for i, d in pairs).encode()
    whole = records(data, fmt)
    assert records(data, fmt, step=step) == whole
    if fmt == "json":  # TSV splits on any whitespace, so only JSON keeps every identifier
        assert [(r.identifier, r.destination) for r in whole] == pairs


def test_json_numbers_split_across_reads() -> None:
    data = b"[[" + b'"a", "b"], 12345678, [' + b'"c", "d"]]'
    assert records(data, "json", step=1) == records(data, "json")


# --- format detection ----------------------------------------------------------------------


@pytest.mark.parametrize(("explicit", "content_type", "head", "expected"), [
    ("json", "text/plain", b"alice node1", "json"),
    (None, "application/json; charset=utf-8", b"", "json"),
    (None, "application/x-ndjson", b"", "json"),
    (None, "text/tab-separated-values", b"[", "tsv"),
    (None, "application/x-www-form-urlencoded", b"  [\n{", "json"),  # curl --data-binary
    (None, None, b"{\"identifier\"", "json"),
    (None, None, b"alice\tnode1", "tsv"),
])
def test_detect_format(explicit, content_type, head, expected) -> None:
    assert bulk.detect_format(explicit, content_type, head) == expected


def test_detect_format_rejects_unknown_explicit_format() -> None:
    with pytest.raises(ValueError, match="format must be"):
        bulk.detect_format("csv", None, b"")
