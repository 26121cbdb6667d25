"""Helpers shared by the pre-auth machine tests of every protocol."""

from __future__ import annotations

from stalroute.protocols.base import Authenticate, Close, Reply, StartTLS


def text(events) -> bytes:
    """Every reply's bytes, joined."""
    return b"".join(event.data for event in events if isinstance(event, Reply))


def authenticates(events) -> list[Authenticate]:
    return [event for event in events if isinstance(event, Authenticate)]


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at the given positions (taken modulo its length)."""
    cuts = sorted(set(cut % (len(data) + 1) for cut in cuts))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]


def assert_well_formed(events, max_reply: int = 1024) -> None:
    """What any input may produce: bounded CRLF-terminated replies, at most one login, and a
    Close only as the very last event."""
    for event in events:
        assert isinstance(event, (Reply, Authenticate, StartTLS, Close))
        if isinstance(event, Reply):
            assert len(event.data) <= max_reply and event.data.endswith(b"\r\n")
    closes = [index for index, event in enumerate(events) if isinstance(event, Close)]
    assert not closes or closes == [len(events) - 1]
    assert sum(isinstance(event, Authenticate) for event in events) <= 1
