"""The local channel between an instance's supervisor and each of its worker processes
(``server.workers``, SPEC §11): one stream socket (a socketpair) per worker.

Messages are JSON objects, each framed by a 4-byte length (:class:`Int32StringReceiver`):

- a call ``{"id": n, "call": name, "args": {...}}`` answered by ``{"id": n, "result": ...}``
  or ``{"id": n, "error": text}``;
- an event ``{"event": name, ...}`` that is never answered (a worker's log lines).

Both ends are the same :class:`Channel`: what a side answers is its ``handlers`` table.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.protocol import ServerFactory
from twisted.protocols.basic import Int32StringReceiver
from twisted.python.failure import Failure

from stalroute.logs import logger

log = logger("stalroute.workers")

#: Longest message (a worker's report of 100k sessions is ~20 MB).
MAX_MESSAGE = 64 * 1024 * 1024

Handler = Callable[..., Any]
EventHandler = Callable[[dict[str, Any]], None]


class ChannelClosed(ConnectionError):
    """The other end went away before answering."""


class CallFailed(RuntimeError):
    """The other end answered a call with an error."""


class Channel(Int32StringReceiver):
    """One end of a supervisor–worker channel."""

    MAX_LENGTH = MAX_MESSAGE

    def __init__(self, handlers: Mapping[str, Handler], on_event: EventHandler,
                 on_lost: Callable[[], None]) -> None:
        self._handlers = handlers
        self._on_event = on_event
        self._on_lost = on_lost
        self._next_id = 0
        self._waiting: dict[int, Deferred[Any]] = {}
        self._closing = False

    def call(self, name: str, **args: Any) -> Deferred[Any]:
        """Ask the other end to run ``name``; fires with its result, or fails with
        :class:`CallFailed` or :class:`ChannelClosed`."""
        if not self.connected:
            raise ChannelClosed(f"{name}: the channel is closed")
        self._next_id += 1
        call_id = self._next_id

        def forget(_: Deferred[Any]) -> None:
            # Cancelled (a timeout): the answer, if it ever comes, finds no one waiting.
            self._waiting.pop(call_id, None)

        answer: Deferred[Any] = Deferred(forget)
        self._waiting[call_id] = answer
        self._send({"id": call_id, "call": name, "args": args})
        return answer

    def event(self, name: str, **fields: Any) -> None:
        """Tell the other end something it does not answer (dropped once closed)."""
        if self.connected:
            self._send({"event": name, **fields})

    def _send(self, message: dict[str, Any]) -> None:
        self.sendString(json.dumps(message, separators=(",", ":")).encode())

    def dataReceived(self, data: bytes) -> None:
        if not self._closing:  # nothing more is read once this end chose to close
            super().dataReceived(data)

    def stringReceived(self, string: bytes) -> None:
        if self._closing:
            return  # what followed, in the same read, a message that closed the channel
        try:
            message = json.loads(string)
        except (ValueError, RecursionError):
            message = None
        if not isinstance(message, dict):
            log.error("workers: an unreadable message on the channel; closing it")
            self._close()
            return
        if "event" in message:
            try:
                self._on_event(message)
            except Exception:
                log.failure("workers: an event on the channel could not be handled")
        elif "call" in message:
            self._answer(message.get("id"), message["call"], message.get("args") or {})
        else:
            call_id = message.get("id")
            waiting = self._waiting.pop(call_id, None) if isinstance(call_id, int) else None
            if waiting is None:
                return  # answered after the caller gave up
            if "error" in message:
                waiting.errback(CallFailed(message["error"]))
            else:
                waiting.callback(message.get("result"))

    def _answer(self, call_id: Any, name: Any, args: Any) -> None:
        handler = self._handlers.get(name) if isinstance(name, str) else None
        if handler is None:
            self._send({"id": call_id, "error": f"unknown call {name!r}"})
            return
        # Arguments that do not fit the handler (or are no object) fail the call, not us.
        answered = maybeDeferred(lambda: handler(**args))

        def reply(result: Any) -> None:
            if self.connected:
                self._send({"id": call_id, "result": result})

        def failed(failure: Failure) -> None:
            log.failure("workers: the call {name} failed", failure, name=name)
            if self.connected:
                self._send({"id": call_id, "error": failure.getErrorMessage()})

        # A result that cannot be sent (not JSON) is answered as a failure too.
        answered.addCallback(reply).addErrback(failed)

    def lengthLimitExceeded(self, length: int) -> None:
        log.error("workers: a message of {length} bytes on the channel; closing it",
                  length=length)
        self._close()

    def _close(self) -> None:
        self._closing = True
        if self.transport is not None:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.connected = False
        waiting, self._waiting = self._waiting, {}
        for answer in waiting.values():
            answer.errback(ChannelClosed("the other end went away"))
        self._on_lost()


class ChannelFactory(ServerFactory):
    """Builds the one :class:`Channel` of an adopted socket."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel

    def buildProtocol(self, addr: object) -> Channel:
        return self.channel
