"""What a client is told when its login or request cannot be served: one table for every
protocol. The mail protocols send ``text`` in their temporary-failure reply; HTTP answers with
``status``, ``http_text`` as its JSON error, and ``Retry-After`` where a retry has a known
time. Backend and store details stay in the log."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus

from stalroute.backend import BackendTimeout, BackendUnavailable, CircuitOpen
from stalroute.config import ServerConfig
from stalroute.identity import InvalidIdentifier
from stalroute.inbound import LoopDetected
from stalroute.router import RoutingUnavailable

#: ``Retry-After`` of an answer to a mapping-store outage, in seconds.
STORE_RETRY_AFTER = 5


@dataclass(frozen=True)
class ClientReply:
    """The answer to one kind of failure."""

    #: For the mail protocols.
    text: str
    status: HTTPStatus
    #: For HTTP; ``{destination}`` is replaced by the destination's name.
    http_text: str
    #: Seconds an HTTP client should wait before retrying, from the server settings.
    retry_after: Callable[[ServerConfig], float] | None = None
    #: A failure the proxy foresees; any other is a bug, logged with its traceback.
    expected: bool = True

    def http_error(self, destination: str | None) -> str:
        return self.http_text.format(destination=destination or "-")

    def http_headers(self, server: ServerConfig) -> list[tuple[bytes, bytes]]:
        """``Retry-After``, if a retry has a known time."""
        if self.retry_after is None:
            return []
        return [(b"Retry-After", str(int(self.retry_after(server))).encode())]


_BACKEND = "Backend temporarily unavailable, try again later"
_DESTINATION = "destination {destination} is unavailable"

#: Failure type → answer, the first entry the failure is an instance of (subclasses first).
REPLIES: dict[type[Exception], ClientReply] = {
    CircuitOpen: ClientReply(_BACKEND, HTTPStatus.SERVICE_UNAVAILABLE, _DESTINATION,
                             retry_after=lambda server: server.host_down_cooldown),
    BackendTimeout: ClientReply(_BACKEND, HTTPStatus.GATEWAY_TIMEOUT, _DESTINATION),
    BackendUnavailable: ClientReply(_BACKEND, HTTPStatus.BAD_GATEWAY, _DESTINATION),
    RoutingUnavailable: ClientReply("Account routing temporarily unavailable, try again later",
                                    HTTPStatus.SERVICE_UNAVAILABLE,
                                    "routing is temporarily unavailable, retry later",
                                    retry_after=lambda _server: STORE_RETRY_AFTER),
    InvalidIdentifier: ClientReply("Invalid characters in the user name",
                                   HTTPStatus.BAD_REQUEST, "invalid characters in the user name"),
    LoopDetected: ClientReply("Proxy loop detected", HTTPStatus.LOOP_DETECTED,
                              "proxy loop detected"),
}

#: The answer to an unforeseen error.
UNEXPECTED = ClientReply("Temporary failure, try again later", HTTPStatus.BAD_GATEWAY,
                         "internal error while routing", expected=False)


def reply_for(error: BaseException) -> ClientReply:
    """The first entry of :data:`REPLIES` that ``error`` is an instance of, else
    :data:`UNEXPECTED`."""
    for kind, reply in REPLIES.items():
        if isinstance(error, kind):
            return reply
    return UNEXPECTED
