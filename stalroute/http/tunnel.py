"""After a backend's ``101 Switching Protocols`` (WebSocket): the client connection and that
backend connection relay opaque bytes both ways until either side closes.

Flow control stays as it was for the exchange: the client transport's producer pauses the
backend, the backend transport's pauses reading the client."""

from __future__ import annotations

from collections.abc import Callable

from stalroute.http.exchange import Exchange, Phase
from stalroute.http.pool import BackendConnection


class Tunnel:
    """The relay of one switched exchange; its bytes are counted on the exchange."""

    def __init__(self, exchange: Exchange, backend: BackendConnection,
                 to_client: Callable[[bytes], None]) -> None:
        self.exchange = exchange
        self.backend = backend
        self._to_client = to_client
        exchange.phase = Phase.TUNNEL
        exchange.status = 101
        exchange.response_started = True
        backend.relay(self.from_backend)

    def open(self, client_rest: bytes, backend_rest: bytes) -> None:
        """Relay what each side sent after the switch, with the request or the ``101``."""
        if client_rest:
            self.from_client(client_rest)
        if backend_rest:
            self.from_backend(backend_rest)

    def from_client(self, data: bytes) -> None:
        self.exchange.bytes_in += len(data)
        self.backend.write_raw(data)

    def from_backend(self, data: bytes) -> None:
        self.exchange.bytes_out += len(data)
        self._to_client(data)
