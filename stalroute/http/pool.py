"""The backend side of one HTTP client connection: its backend connections and their pool.

Each :class:`BackendConnection` is a :class:`~stalroute.backend.BackendLeg` (opened through
the shared connector: PROXY header, TLS, circuit breaker) whose responses are read by its own
:class:`~stalroute.http.wire.ResponseReader`, so a response is always parsed and
re-serialised, never passed through with its original framing. A client connection keeps at
most one per destination, for keep-alive (:class:`BackendPool`).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from typing import Protocol

from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from stalroute.backend import BackendLeg
from stalroute.config import DestinationConfig
from stalroute.http.wire import (
    Body, BodyWriter, Closed, End, ResponseHead, ResponseReader, WireError, frame_request,
)
from stalroute.protocols.base import (
    BackendDialogue, BackendEvent, BackendReady, BackendSettings, LoginSucceeded,
)
from stalroute.sasl import Credentials

#: Backend connections one client connection keeps (one per destination, least recent out).
MAX_POOLED_BACKENDS = 8


class HTTPBackendDialogue(BackendDialogue):
    """HTTP is client-first and carries no login: the leg is ready as soon as it is up."""

    def __init__(self, settings: BackendSettings) -> None:
        self._leftover = bytearray()

    def connected(self) -> list[BackendEvent]:
        return [BackendReady()]

    def receive(self, data: bytes) -> list[BackendEvent]:
        self._leftover += data
        return []

    def tls_started(self) -> list[BackendEvent]:
        return []

    def login(self, credentials: Credentials | None, context: object) -> list[BackendEvent]:
        return [LoginSucceeded(b"")]

    @property
    def leftover(self) -> bytes:
        leftover, self._leftover = bytes(self._leftover), bytearray()
        return leftover


class BackendOwner(Protocol):
    """What a backend connection tells the client connection it serves."""

    def backend_event(self, backend: BackendConnection,
                      event: ResponseHead | Body | End | Closed) -> None:
        """A response event (head, informational or final; body data; end; closed)."""

    def backend_gone(self, backend: BackendConnection, reason: str) -> None:
        """The connection closed or broke the protocol; it is closed already."""

    def pause_reading(self, reason: Hashable) -> None:
        """Stop reading the client for ``reason`` (until :meth:`resume_reading`)."""

    def resume_reading(self, reason: Hashable) -> None:
        """``reason`` no longer holds reading back."""


@implementer(IPushProducer)
class _BackendWriteProducer:
    """Registered on a backend transport: its full write buffer pauses reading the client."""

    def __init__(self, owner: BackendOwner, reason: Hashable) -> None:
        self._owner = owner
        self._reason = reason

    def pauseProducing(self) -> None:
        self._owner.pause_reading(self._reason)

    def resumeProducing(self) -> None:
        self._owner.resume_reading(self._reason)

    def stopProducing(self) -> None:
        self._owner.resume_reading(self._reason)


class BackendConnection:
    """One connection to a destination's HTTP leg: requests written, responses read."""

    _ids = itertools.count(1)

    def __init__(self, owner: BackendOwner, destination: DestinationConfig, leg: BackendLeg,
                 max_head_size: int) -> None:
        self.id = next(self._ids)
        self.owner = owner
        self.name = destination.name
        self.destination = destination
        self.leg = leg
        self.reader = ResponseReader(max_head_size)
        #: The body writer of the request being sent (None: none sent yet).
        self._writer: BodyWriter | None = None
        #: Serving a request: from its head until the end of its response.
        self.busy = False
        #: Responses completed on this connection (a reused one may be retried on a new one).
        self.served = 0
        self.closed = False
        self.read_paused = False
        #: Once a tunnel: the receiver of the raw bytes (no more HTTP on this connection).
        self._relay_to: Callable[[bytes], None] | None = None
        self._flow_reason = ("backend", self.id)
        leg.transport.registerProducer(_BackendWriteProducer(owner, self._flow_reason), True)
        leg.attach(self._received, self._lost)

    @property
    def reusable(self) -> bool:
        return (not self.closed and not self.busy and self.reader.keep_alive
                and self.reader.idle and (self._writer is None or self._writer.finished))

    @property
    def tunnel(self) -> bool:
        return self._relay_to is not None

    @property
    def sending_body(self) -> bool:
        """Open and expecting the rest of the request body."""
        return not self.closed and self._writer is not None and not self._writer.finished

    def send_head(self, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], *,
                  chunked: bool, length: int) -> None:
        """Write a request head; its response is read next. Raises :class:`WireError` while
        another request is under way."""
        self.reader.expect(method)
        data, self._writer = frame_request(method, target, headers, chunked=chunked,
                                           length=length)
        self.leg.transport.write(data)

    def send_body(self, data: bytes) -> None:
        assert self._writer is not None
        data = self._writer.data(data)
        if data:
            self.leg.transport.write(data)

    def send_end(self) -> None:
        assert self._writer is not None
        data = self._writer.end()
        if data:
            self.leg.transport.write(data)

    def write_raw(self, data: bytes) -> None:
        self.leg.transport.write(data)

    def relay(self, relay_to: Callable[[bytes], None]) -> None:
        """Become a tunnel: every byte from the backend goes to ``relay_to`` as it is."""
        self._relay_to = relay_to

    def pause_reading(self, paused: bool) -> None:
        if self.closed or self.read_paused == paused or self.leg.transport is None:
            return
        self.read_paused = paused
        if paused:
            self.leg.transport.pauseProducing()
        else:
            self.leg.transport.resumeProducing()

    def close(self) -> None:
        """Close on our initiative (the owner is not told)."""
        if self.closed:
            return
        self.closed = True
        self.owner.resume_reading(self._flow_reason)
        if self.read_paused and self.leg.transport is not None:
            self.leg.transport.resumeProducing()
        self.leg.close()  # unregisters our write producer

    def finish_exchange(self) -> None:
        """The response ended: back to idle (reusable) or closed."""
        self.busy = False
        self.served += 1
        if not self.reusable:
            self.close()
        else:
            self.pause_reading(False)

    # backend → owner -----------------------------------------------------------------

    def _received(self, data: bytes) -> None:
        if self.closed:
            return
        if self._relay_to is not None:
            self._relay_to(data)
            return
        self.reader.receive(data)
        self._drain()

    def _drain(self) -> None:
        reader = self.reader
        while not self.closed and self._relay_to is None:
            try:
                event = reader.next_event()
            except WireError as exc:
                self.close()
                self.owner.backend_gone(self, f"invalid response from the backend: {exc}")
                return
            if not isinstance(event, (ResponseHead, Body, End)):  # NEED_DATA, PAUSED
                return
            self.owner.backend_event(self, event)

    def _lost(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.owner.resume_reading(self._flow_reason)
        if self._relay_to is not None:
            self.owner.backend_gone(self, "backend closed the tunnel")
            return
        # A body delimited by the connection's end (HTTP/1.0 style) ends here.
        for event in self.reader.connection_lost():
            self.owner.backend_event(self, event)
        self.owner.backend_gone(self, "the backend closed the connection")


class BackendPool:
    """The backend connections a client connection keeps for its next requests: one per
    destination, at most :data:`MAX_POOLED_BACKENDS` (the least recently used idle one goes)."""

    def __init__(self) -> None:
        self._connections: OrderedDict[str, BackendConnection] = OrderedDict()

    def __iter__(self) -> Iterator[BackendConnection]:
        return iter(list(self._connections.values()))

    def take(self, destination: str) -> BackendConnection | None:
        """The pooled connection to ``destination`` if it can serve a request now; one that
        cannot is closed and dropped."""
        pooled = self._connections.get(destination)
        if pooled is None:
            return None
        if pooled.reusable:
            self._connections.move_to_end(destination)
            return pooled
        pooled.close()
        del self._connections[destination]
        return None

    def add(self, backend: BackendConnection) -> None:
        """Keep ``backend`` (replacing another to its destination), then trim the pool."""
        old = self._connections.pop(backend.name, None)
        if old is not None and old is not backend:
            old.close()
        self._connections[backend.name] = backend
        while len(self._connections) > MAX_POOLED_BACKENDS:
            name, oldest = next(iter(self._connections.items()))
            if oldest.busy:
                break
            del self._connections[name]
            oldest.close()

    def forget(self, backend: BackendConnection) -> None:
        if self._connections.get(backend.name) is backend:
            del self._connections[backend.name]

    def close_all(self, keep: BackendConnection | None = None) -> None:
        """Close every pooled connection except ``keep``, and empty the pool."""
        for backend in self._connections.values():
            if backend is not keep:
                backend.close()
        self._connections.clear()
