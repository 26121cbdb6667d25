"""The supervisor–worker channel (:mod:`stalroute.channel`) in memory: two :class:`Channel`\\ s
wired by ``iosim``, or one on a ``StringTransport`` fed bytes by hand.

A call settles exactly once (its result, :class:`CallFailed`, or :class:`ChannelClosed`); a
message the channel cannot read closes it cleanly instead of raising out of ``dataReceived``;
a handler's failure is answered and logged, never taken for the channel's.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogEvent, formatEvent
from twisted.python.failure import Failure
from twisted.test import iosim

from stalroute.channel import CallFailed, Channel, ChannelClosed, Handler
from tests.harness.memory import failure_of, settled


class End:
    """One end of a channel and what it was told: its events and how often it was lost."""

    def __init__(self, handlers: dict[str, Handler] | None = None) -> None:
        self.events: list[dict[str, Any]] = []
        self.lost = 0
        self.channel = Channel(handlers or {}, self.events.append, self._lost)

    def _lost(self) -> None:
        self.lost += 1


class Wired:
    """A supervisor end and a worker end joined in memory."""

    def __init__(self, handlers: dict[str, Handler]) -> None:
        self.supervisor, self.worker = End(), End(handlers)
        self.pump = iosim.connect(
            self.worker.channel, iosim.makeFakeServer(self.worker.channel),
            self.supervisor.channel, iosim.makeFakeClient(self.supervisor.channel))

    def call(self, name: str, **args: Any) -> Deferred[Any]:
        answer = self.supervisor.channel.call(name, **args)
        self.pump.flush()
        return answer


def frame(message: object) -> bytes:
    """``message`` as it travels: a 4-byte big-endian length, then the bytes."""
    payload = message if isinstance(message, bytes) else json.dumps(message).encode()
    return struct.pack("!I", len(payload)) + payload




def texts(events: list[LogEvent]) -> list[str]:
    return [formatEvent(event) for event in events]


@pytest.fixture
def alone() -> Iterator[tuple[End, StringTransport]]:
    """One end on a StringTransport: the test plays the other end."""
    end = End({"echo": lambda **args: args})
    transport = StringTransport()
    end.channel.makeConnection(transport)
    yield end, transport


# --- calls and answers ------------------------------------------------------------------------


def test_a_call_travels_as_a_framed_json_object(alone) -> None:
    end, transport = alone
    end.channel.call("apply", op="kick", args={"identifier": "alice"})
    assert transport.value() == frame(b'{"id":1,"call":"apply","args":{"op":"kick",'
                                      b'"args":{"identifier":"alice"}}}')


def test_a_call_fires_with_the_handlers_result(errors) -> None:
    wired = Wired({"add": lambda a, b: a + b, "report": lambda: {"stats": [1, "two"]}})
    assert settled(wired.call("add", a=2, b=3)) == 5
    assert settled(wired.call("report")) == {"stats": [1, "two"]}
    assert errors == []


def test_a_handler_may_answer_later_with_a_deferred(errors) -> None:
    later: Deferred[int] = Deferred()
    wired = Wired({"reload": lambda: later})
    answer = wired.call("reload")
    assert not answer.called
    later.callback(7)
    wired.pump.flush()
    assert settled(answer) == 7
    assert errors == []


def test_a_handler_that_raises_fails_the_call_with_its_message_and_is_logged(errors) -> None:
    def refuse() -> None:
        raise ValueError("no such destination")

    wired = Wired({"apply": refuse})
    failed = failure_of(wired.call("apply"), CallFailed)
    assert str(failed) == "no such destination"
    [logged] = errors
    assert logged["log_failure"].check(ValueError)
    assert "the call apply failed" in formatEvent(logged)
    assert wired.supervisor.channel.connected and wired.worker.channel.connected


def test_an_unknown_call_fails_without_closing_the_channel(errors) -> None:
    wired = Wired({"add": lambda a, b: a + b})
    assert str(failure_of(wired.call("nope"), CallFailed)) == "unknown call 'nope'"
    assert settled(wired.call("add", a=1, b=1)) == 2
    assert errors == []


def test_arguments_that_do_not_fit_the_handler_fail_the_call_only(errors) -> None:
    wired = Wired({"add": lambda a, b: a + b})
    failure_of(wired.call("add", a=1, c=2), CallFailed)
    failure_of(wired.call("add", a=1, b="x"), CallFailed)
    assert settled(wired.call("add", a=1, b=1)) == 2
    assert [event["log_failure"].type for event in errors] == [TypeError, TypeError]


def test_a_result_that_is_not_json_fails_the_call(errors) -> None:
    wired = Wired({"report": lambda: {"when": object()}})
    assert "not JSON serializable" in str(failure_of(wired.call("report"), CallFailed))
    assert [event["log_failure"].type for event in errors] == [TypeError]
    assert wired.worker.channel.connected


def test_an_answer_after_the_callers_timeout_is_ignored(alone, errors) -> None:
    end, transport = alone
    clock = MemoryReactorClock()
    answer = end.channel.call("report").addTimeout(5, clock)
    clock.advance(5)
    failure_of(answer, TimeoutError)
    end.channel.dataReceived(frame({"id": 1, "result": {"late": True}}))
    end.channel.connectionLost(Failure(ConnectionDone()))
    assert errors == []


def test_the_answers_of_several_calls_may_come_in_any_order(alone) -> None:
    end, transport = alone
    first, second = end.channel.call("a"), end.channel.call("b")
    end.channel.dataReceived(frame({"id": 2, "result": "b"}) + frame({"id": 1, "error": "no"}))
    assert settled(second) == "b"
    assert str(failure_of(first, CallFailed)) == "no"


# --- events -------------------------------------------------------------------------------------


def test_events_are_delivered_and_never_answered() -> None:
    wired = Wired({})
    wired.worker.channel.event("log", level="info", text="worker 1 serving")
    wired.pump.flush()
    assert wired.supervisor.events == [{"event": "log", "level": "info",
                                        "text": "worker 1 serving"}]
    assert wired.worker.events == []


def test_an_event_handler_that_raises_is_logged_and_the_channel_stays(errors) -> None:
    def broken(message: dict[str, Any]) -> None:
        raise KeyError("level")

    end = End()
    end.channel = Channel({}, broken, lambda: None)
    transport = StringTransport()
    end.channel.makeConnection(transport)
    end.channel.dataReceived(frame({"event": "log"}))
    assert [event["log_failure"].type for event in errors] == [KeyError]
    assert not transport.disconnecting


# --- closing ------------------------------------------------------------------------------------


def test_a_message_over_the_limit_closes_the_channel_and_fails_the_pending_calls(
        monkeypatch: pytest.MonkeyPatch, errors) -> None:
    monkeypatch.setattr(Channel, "MAX_LENGTH", 200)
    later: Deferred[int] = Deferred()
    wired = Wired({"report": lambda: "x" * 500, "reload": lambda: later})
    waiting = wired.supervisor.channel.call("reload")
    failure_of(wired.call("report"), ChannelClosed)
    failure_of(waiting, ChannelClosed)
    later.callback(1)  # the answer has nowhere to go: dropped
    assert (wired.supervisor.lost, wired.worker.lost) == (1, 1)
    assert any("on the channel; closing it" in text for text in texts(errors))


@pytest.mark.parametrize("payload", [b"{not json", b"\xff\xfe{}", b"[1, 2]", b'"text"', b"7",
                                     b"null", b"[" * 5000 + b"]" * 5000],
                         ids=["syntax", "not-utf8", "array", "string", "number", "null",
                              "deep"])
def test_a_message_that_is_no_json_object_closes_the_channel(alone, payload: bytes,
                                                              errors) -> None:
    end, transport = alone
    after = frame({"event": "log", "text": "read after the close"})
    end.channel.dataReceived(frame(payload) + after)
    assert transport.disconnecting
    end.channel.dataReceived(after)
    assert end.events == []
    assert texts(errors) == ["workers: an unreadable message on the channel; closing it"]


def test_a_lost_connection_fails_every_pending_call_and_is_told_once(alone) -> None:
    end, transport = alone
    calls = [end.channel.call("report"), end.channel.call("reload")]
    end.channel.connectionLost(Failure(ConnectionDone()))
    for call in calls:
        failure_of(call, ChannelClosed)
    assert end.lost == 1


def test_a_call_on_a_closed_channel_raises_channel_closed(alone) -> None:
    end, transport = alone
    end.channel.connectionLost(Failure(ConnectionDone()))
    with pytest.raises(ChannelClosed):
        end.channel.call("report")
    end.channel.event("log", text="dropped")  # no error either
    with pytest.raises(ChannelClosed):
        End().channel.call("report")  # never connected
