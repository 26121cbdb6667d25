"""Fixtures shared by the unit tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from twisted.logger import LogEvent, formatEvent, globalLogPublisher

from stalroute import tls
from stalroute.acme.challenges import CHALLENGES
from tests.harness.memory import logged_errors


@pytest.fixture
def errors() -> Iterator[list[LogEvent]]:
    """The error and critical log events of the test (an AlreadyCalledError, an unhandled
    error in a garbage-collected Deferred...): the glue tests expect none."""
    with logged_errors() as events:
        yield events


@pytest.fixture
def logged() -> Iterator[list[str]]:
    """The text of every log event while the test runs."""
    events: list[str] = []

    def observe(event: LogEvent) -> None:
        events.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


@pytest.fixture
def acme_state() -> Iterator[None]:
    """The process-wide ACME state (certificates issued to this process, challenge material)
    empty when the test starts and when it ends."""
    tls.ISSUED.clear()
    CHALLENGES.clear()
    yield
    tls.ISSUED.clear()
    CHALLENGES.clear()
