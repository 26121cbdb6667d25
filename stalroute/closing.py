"""Closing a connection: flush what was written, then abort a peer that does not finish.

One rule for client connections (:mod:`stalroute.inbound`) and backend legs
(:mod:`stalroute.backend`); the shutdown drain waits this long for the last closes.
"""

from __future__ import annotations

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from stalroute.transport import StreamTransport

#: How long a closing connection may take to flush before it is aborted.
CLOSE_GRACE = 5.0


def close_with_grace(transport: StreamTransport, clock: IReactorTime) -> IDelayedCall:
    """Flush and close ``transport``; the returned timer aborts it after :data:`CLOSE_GRACE`
    (a peer that never answers a TLS close_notify, or never reads). Cancel it once the
    connection is lost."""
    transport.loseConnection()
    return clock.callLater(CLOSE_GRACE, transport.abortConnection)
