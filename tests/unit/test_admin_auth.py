"""Admin API authentication: bearer token parsing and comparison, per-IP lockout."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock

from stalroute.admin.auth import Lockout, TokenCheck, bearer_token

TOKEN = "A" * 20 + "b" * 20


@pytest.mark.parametrize(("header", "expected"), [
    (f"Bearer {TOKEN}", TOKEN.encode()),
    (f"bearer   {TOKEN}  ", TOKEN.encode()),
    (f"BEARER {TOKEN}".encode(), TOKEN.encode()),
    (f"Basic {TOKEN}", None),
    ("Bearer", None),
    ("Bearer ", None),
    ("", None),
    (None, None),
])
def test_bearer_token(header, expected) -> None:
    assert bearer_token(header) == expected


def test_token_check() -> None:
    check = TokenCheck(TOKEN)
    assert check.matches(f"Bearer {TOKEN}")
    assert not check.matches(f"Bearer {TOKEN[:-1]}")
    assert not check.matches(f"Bearer {TOKEN}x")
    assert not check.matches(TOKEN)  # no scheme
    assert not check.matches(None)
    assert not TokenCheck(None).matches(f"Bearer {TOKEN}")
    assert not TokenCheck("").matches("Bearer ")


@given(st.binary(max_size=80))
def test_token_check_never_raises_on_garbage(header: bytes) -> None:
    assert TokenCheck(TOKEN).matches(header) == (header.strip().lower().startswith(b"bearer ")
                                                 and header.split(None, 1)[1].strip()
                                                 == TOKEN.encode())


def test_lockout_after_threshold_failures_then_expires() -> None:
    clock = Clock()
    lockout = Lockout(clock, threshold=3, duration=60)
    assert not lockout.failed("10.0.0.1")
    assert not lockout.failed("10.0.0.1")
    assert lockout.locked_for("10.0.0.1") == 0
    assert lockout.failed("10.0.0.1")  # the third locks
    assert lockout.locked_for("10.0.0.1") == 60
    assert lockout.locked_for("10.0.0.2") == 0  # per address
    assert (lockout.lockouts, lockout.locked()) == (1, 1)
    clock.advance(59.5)
    assert lockout.locked_for("10.0.0.1") == pytest.approx(0.5)
    clock.advance(1)
    assert lockout.locked_for("10.0.0.1") == 0
    assert lockout.locked() == 0
    assert not lockout.failed("10.0.0.1")  # counting starts afresh


def test_failures_older_than_the_window_do_not_count() -> None:
    clock = Clock()
    lockout = Lockout(clock, threshold=2, duration=10)
    lockout.failed("10.0.0.1")
    clock.advance(11)
    assert not lockout.failed("10.0.0.1")
    assert lockout.failed("10.0.0.1")


def test_success_clears_failures() -> None:
    lockout = Lockout(Clock(), threshold=2, duration=10)
    lockout.failed("10.0.0.1")
    lockout.succeeded("10.0.0.1")
    assert not lockout.failed("10.0.0.1")


def test_tracked_addresses_are_bounded() -> None:
    lockout = Lockout(Clock(), threshold=5, duration=10, max_tracked=100)
    for n in range(1000):
        lockout.failed(f"10.0.{n // 256}.{n % 256}")
    assert len(lockout._failures) == 100


def test_expired_failures_and_lockouts_leave_on_checks_alone() -> None:
    # Failing addresses (some locked out), then the window passes and only requests arrive
    # (each checks locked_for): everything stored must leave without another failure.
    clock = Clock()
    lockout = Lockout(clock, threshold=5, duration=10)
    for n in range(10_000):
        lockout.failed(f"10.0.{n // 256}.{n % 256}")
    for n in range(200):
        for _ in range(5):
            lockout.failed(f"10.1.{n // 256}.{n % 256}")
    assert (len(lockout._failures._entries), len(lockout._locked_until._entries)) == (10_000, 200)
    clock.advance(11)
    for n in range(10_000):
        assert lockout.locked_for(f"10.2.{n // 256}.{n % 256}") == 0
    assert (len(lockout._failures._entries), len(lockout._locked_until._entries)) == (0, 0)
