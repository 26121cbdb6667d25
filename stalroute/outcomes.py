"""How a client connection, or one HTTP request, ended: its outcome (SPEC §10).

An :class:`Outcome` is the ``outcome=`` of a session's (or request's) log line and the
``outcome`` label of the finished-sessions metric (and of the reports workers send up). It
is a :class:`~enum.StrEnum`: each member *is* the string those show and compares equal to
it. A connection that has none yet holds ``None``, never an outcome standing in for "unset":
:meth:`stalroute.inbound.InboundConnection.connectionLost` resolves it when the connection
ends (``client_closed``, or ``client_error`` for a spliced one that broke).
"""

from __future__ import annotations

import enum


class Outcome(enum.StrEnum):
    """Every outcome stalroute logs and counts."""

    # The client ended it.
    CLIENT_CLOSED = "client_closed"
    CLIENT_ERROR = "client_error"  # a spliced (or HTTP) connection broke rather than closed
    # The protocol ended it.
    CLOSED = "closed"  # the pre-auth dialogue closed (LOGOUT, QUIT, too many errors)
    PREAUTH_TIMEOUT = "preauth_timeout"
    AUTH_FAILED = "auth_failed"  # the last login was refused (the client may then leave)
    TEMPFAIL = "tempfail"  # the last login could not be routed or replayed
    # stalroute or the backend ended it.
    BACKEND_CLOSED = "backend_closed"
    IDLE = "idle"
    KICKED = "kicked"
    SHUTDOWN = "shutdown"
    INTERNAL_ERROR = "internal_error"
    # Refused at admission (before the protocol starts), or right after the TLS handshake.
    REJECTED = "rejected"  # max_connections
    UNTRUSTED_PROXY = "untrusted_proxy"
    PROXY_HEADER_TIMEOUT = "proxy_header_timeout"
    PROXY_HEADER_MISSING = "proxy_header_missing"
    PROXY_HEADER_INVALID = "proxy_header_invalid"
    BANNED = "banned"
    PER_IP_LIMIT = "per_ip_limit"
    ACME_VALIDATION = "acme_validation"  # a tls-alpn-01 validation, answered by the handshake
    # Counted instead of the outcome: a connection that never sent a protocol byte and ended
    # as one of PROBE_OUTCOMES (a load balancer's health check).
    PROBE = "probe"
    # HTTP requests (``stalroute.http``), and HTTP connections closed after one.
    OK = "ok"
    HEALTH = "health"
    REFUSED = "refused"
    ERROR = "error"
    BAD_REQUEST = "bad_request"
    TIMEOUT = "timeout"
    PROTOCOL_ERROR = "protocol_error"
    BACKEND_ERROR = "backend_error"
    BACKEND_UNAVAILABLE = "backend_unavailable"


#: How a connection that never sent a protocol byte may end and still be a harmless probe
#: (a load balancer's health check): logged at debug level and counted, nothing else.
PROBE_OUTCOMES = frozenset({Outcome.CLIENT_CLOSED, Outcome.CLIENT_ERROR,
                            Outcome.PROXY_HEADER_TIMEOUT, Outcome.PREAUTH_TIMEOUT,
                            Outcome.CLOSED})
