"""Every fuzz target (tests/fuzz/targets.py) on its seeds and on random bytes, briefly: the
CI share of the fuzzing that ``scripts/fuzz`` does at length with atheris."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz.targets import SEEDS, TARGETS, reference_sql_reading


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_seeds(name: str) -> None:
    for seed in SEEDS.get(name, [b""]):
        TARGETS[name](seed)


@pytest.mark.parametrize("name", sorted(TARGETS))
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=600))
def test_random_bytes(name: str, data: bytes) -> None:
    TARGETS[name](data)


def test_sqlparams_reference_reads_whole_statements() -> None:
    """The ``sqlparams`` target's oracle reads well-formed SQL to its end (so the target then
    compares whole translations), numbering a bare ``?`` as SQLite does."""
    for seed in SEEDS["sqlparams"]:
        sql = seed[1:].decode()
        for engine in ("postgresql", "sqlite"):
            assert reference_sql_reading(sql, engine)[2] == len(sql)
    text, found, _ = reference_sql_reading("SELECT ?2, ?, $1, '?' || ? -- ?", "sqlite")
    assert found == [(2, "?2"), (3, "?"), (1, "$1"), (4, "?")]
    assert text == "SELECT ?2, ?3, ?1, '?' || ?4 -- ?"
