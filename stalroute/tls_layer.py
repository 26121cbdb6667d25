"""The TLS layer under ``startTLS``: pyOpenSSL on memory BIOs, without Twisted's extra turns.

Twisted's own layer (``TLSMemoryBIOProtocol``, as ``BufferingTLSTransport``) defers every
write to the next reactor turn to aggregate small ones, builds a ``Failure`` for every failed
read, and wraps producers in two adapters. A proxy writes once per read it relays, so none of
that pays here: this layer encrypts and sends at once, delivers what one socket read decrypts
in one call, and passes producers through to the socket (the ciphertext waiting there is what
flow control is about), and moves data through the memory BIOs a record at a time (they never
shrink). Measured in ``bench/README.md`` ("stalroute's TLS layer").

Behaviour kept from Twisted's layer, which the rest of stalroute and its tests rely on:
writes before the handshake wait for it; ``loseConnection`` sends ``close_notify`` once the
pending writes and any registered producer are done, then waits for the peer's (or its FIN;
``closing.close_with_grace`` bounds the wait); a connection that ends without the peer's
``close_notify`` reports ``ConnectionLost``, an orderly one the transport's reason; a TLS error
or a failed certificate verification (``failVerification``, called by Twisted's client
options) is the reason ``connectionLost`` gets; ``transport.TLS`` and ``transport.getHandle()``
give the ``SSL.Connection``.
"""

from __future__ import annotations

import weakref
from functools import partial
from types import SimpleNamespace
from typing import Any

from OpenSSL import SSL
from twisted.internet.abstract import FileDescriptor
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import (
    IOpenSSLContextFactory,
    IProtocol,
)
from twisted.python.failure import Failure

#: Bytes asked of OpenSSL per call (more than a record's plaintext or ciphertext).
_CHUNK = 2**15
#: The most plaintext one TLS record carries. Memory BIOs never shrink, so the layer moves
#: data through them a record at a time: an idle connection that once relayed a large read
#: keeps a record's worth per BIO, not the 64 KiB (or more) of the read.
_RECORD = 2**14
#: A TLS record header: content type (1 byte), version (2), length of the body (2).
_HEADER = 5


def _represents_eof(error: SSL.Error) -> bool:
    """An OpenSSL error that says the peer closed the socket without ``close_notify``."""
    if isinstance(error, SSL.SysCallError):
        return str(error.args[1]).casefold().startswith("unexpected eof")
    queue = error.args[0] if error.args else None
    if not queue:  # OpenSSL 4 reports a truncated stream with an empty queue
        return True
    return str(queue[-1][2]).casefold().startswith("unexpected eof")


class RecordBoundaries:
    """Cuts a stream of TLS records where each record ends, across reads, by the length in
    its header, so that the incoming BIO is given one record at a time. Only where the data
    is cut depends on it: the pieces always join up to the data, valid or not."""

    __slots__ = ("_header", "_left")

    def __init__(self) -> None:
        self._header = b""  # the start of a header that the previous read cut off
        self._left = 0  # bytes of the current record still to come (0: a header is next)

    @property
    def mid_record(self) -> bool:
        """The last piece cut ended inside a record: nothing of it can be decrypted yet."""
        return bool(self._left or self._header)

    def cut(self, data: bytes) -> list[bytes]:
        """``data`` in pieces that end where records end (the last one may end inside a
        record: see :attr:`mid_record`)."""
        pieces: list[bytes] = []
        start = position = 0
        end = len(data)
        while position < end:
            if not self._left:  # a header is next
                if self._header or position + _HEADER > end:  # split between reads
                    taken = min(_HEADER - len(self._header), end - position)
                    self._header += data[position:position + taken]
                    position += taken
                    if len(self._header) < _HEADER:
                        break
                    self._left = self._header[3] << 8 | self._header[4]
                    self._header = b""
                else:
                    self._left = _HEADER + (data[position + 3] << 8 | data[position + 4])
            step = min(self._left, end - position)
            position += step
            self._left -= step
            if not self._left:
                pieces.append(data[start:position])
                start = position
        if start < end:
            pieces.append(data[start:])
        return pieces


class Wire:
    """What the layer writes ciphertext to: the methods of the transport's ``base`` class,
    below the TLS routing of its own (an abort is never routed through TLS)."""

    __slots__ = ("write", "loseConnection", "abortConnection", "registerProducer",
                 "unregisterProducer")

    def __init__(self, transport: Any, base: Any) -> None:
        self.write = partial(base.write, transport)
        self.loseConnection = partial(base.loseConnection, transport)
        self.abortConnection = transport.abortConnection
        self.registerProducer = partial(base.registerProducer, transport)
        self.unregisterProducer = partial(base.unregisterProducer, transport)


class TLSLayer:
    """The protocol of a transport once TLS starts: decrypts for ``wrapped``, and encrypts
    what the transport is asked to write (Twisted's TCP transport routes ``write``,
    ``loseConnection`` and the producer calls here while ``transport.TLS`` is set)."""

    __slots__ = ("wrapped", "_creator", "_client", "_tls", "_wire", "_records",
                 "disconnecting", "_handshake_done", "_finished", "_reason", "_unsent",
                 "_producer", "__weakref__")

    #: Asked by Twisted's options for the application's ALPN protocols
    #: (``protosFromProtocol``): none under ``startTLS``, as with Twisted's layer.
    factory = SimpleNamespace(wrappedFactory=None)

    def __init__(self, wrapped: IProtocol, creator: Any, client: bool) -> None:
        self.wrapped = wrapped
        self._creator = creator
        self._client = client
        self._tls: SSL.Connection
        self._wire: Wire
        self._records = RecordBoundaries()
        self.disconnecting = False
        self._handshake_done = False
        self._finished = False  # no more TLS traffic: closed, failed or aborted
        self._reason: Failure | None = None
        self._unsent: list[bytes] = []  # written before the handshake (or a renegotiation)
        self._producer: object | None = None

    # -- below: the socket -------------------------------------------------------------

    def makeConnection(self, wire: Wire) -> None:
        self._wire = wire
        self._tls = self._new_connection()
        self._handshake()

    def _new_connection(self) -> SSL.Connection:
        """The ``SSL.Connection`` of the creator: a context factory's context (what
        Twisted's ``startTLS`` amounts to for one), else the creator's own connection
        (client options set SNI and verification there)."""
        creator = self._creator
        if IOpenSSLContextFactory.providedBy(creator):
            connection = SSL.Connection(creator.getContext(), None)
        elif self._client:
            connection = creator.clientConnectionForTLS(_WeakLayer(self))
        else:
            connection = creator.serverConnectionForTLS(self)
        if self._client:
            connection.set_connect_state()
        else:
            connection.set_accept_state()
        connection.set_app_data(self)
        return connection

    def dataReceived(self, data: bytes) -> None:
        """Decrypt a socket read a record at a time (a memory BIO keeps the largest size it
        ever held, for the connection's life), and deliver it all in one call."""
        received: list[bytes] = []
        closed, failure = False, None
        pieces = self._records.cut(data)
        last = len(pieces) - 1
        for index, piece in enumerate(pieces):
            if self._finished or closed or failure:
                break
            self._tls.bio_write(piece)
            if not self._handshake_done:
                self._handshake()
                if not self._handshake_done:
                    continue
            if index < last:  # one whole record: one read takes it
                closed, failure = self._decrypt(received, drain=False)
            elif not self._records.mid_record:  # the last whole record: drain the BIO
                closed, failure = self._decrypt(received, drain=True)
        if self._unsent and self._handshake_done and not self._finished:
            self._send_unsent()  # what a renegotiation held back, before any answer
        self._deliver(received, closed, failure)

    def _handshake(self) -> None:
        try:
            self._tls.do_handshake()
        except SSL.WantReadError:
            self._flush()
            return
        except SSL.Error:
            self._fail(Failure())
            return
        if self._finished:  # the certificate failed verification during the handshake
            return
        self._handshake_done = True
        completed = getattr(self.wrapped, "handshakeCompleted", None)
        if completed is not None:  # first: it may abort (an ACME validation) before a word
            completed()
        if self._unsent:
            self._send_unsent()

    def _decrypt(self, received: list[bytes], drain: bool) -> tuple[bool, Failure | None]:
        """Append the plaintext of a record (``drain``: of every complete record); whether
        the peer closed the stream (``close_notify``), and the TLS error that ended it."""
        recv = self._tls.recv
        while True:
            try:
                received.append(recv(_CHUNK))
            except SSL.WantReadError:
                return False, None
            except SSL.ZeroReturnError:
                return True, None
            except SSL.Error:
                return False, Failure()
            if not drain:
                return False, None

    def _deliver(self, received: list[bytes], closed: bool, failure: Failure | None) -> None:
        """Give the protocol what was decrypted, then send what OpenSSL answers (a
        ``close_notify``, session tickets, an alert)."""
        if received:
            self.wrapped.dataReceived(b"".join(received))  # one part is passed on, not copied
        if closed:
            self._finished = True
            self._shutdown()
            self._wire.loseConnection()
        elif failure is not None:
            self._fail(failure)
        else:
            self._flush()

    def _flush(self) -> None:
        """Send what OpenSSL wrote to the outgoing BIO."""
        ciphertext: list[bytes] = []
        self._take_ciphertext(ciphertext)
        if ciphertext:
            self._wire.write(b"".join(ciphertext))

    def _take_ciphertext(self, ciphertext: list[bytes]) -> None:
        """Move what OpenSSL wrote to the outgoing BIO into ``ciphertext``."""
        try:
            while True:
                chunk = self._tls.bio_read(_CHUNK)
                ciphertext.append(chunk)
                if len(chunk) < _CHUNK:
                    return
        except SSL.WantReadError:
            return

    def _fail(self, reason: Failure) -> None:
        """A TLS error (or a truncated stream): it is the reason the protocol is given."""
        if isinstance(reason.value, SSL.Error) and _represents_eof(reason.value):
            reason = Failure(ConnectionLost())
        if self._reason is None:
            self._reason = reason
        self._finished = True
        self._flush()  # the alert, if OpenSSL wrote one
        self._wire.loseConnection()

    def connectionLost(self, reason: Failure) -> None:
        if not self._finished:  # how did the stream end: close_notify, or truncated?
            self._tls.bio_shutdown()
            received: list[bytes] = []
            self._deliver(received, *self._decrypt(received, drain=True))
            self._finished = True
        self.wrapped.connectionLost(self._reason or reason)
        # The last reference back to the layer: without it, the connection's objects (and
        # OpenSSL's memory) go by reference counting now, not at the collector's next full pass.
        self._tls.set_app_data(None)

    # -- above: what the transport routes here while TLS is on ---------------------------

    def write(self, data: bytes) -> None:
        if self._finished or (self.disconnecting and self._producer is None):
            return
        if not self._handshake_done or self._unsent:
            self._unsent.append(data)
            return
        self._send(data)

    def writeSequence(self, data: list[bytes]) -> None:
        self.write(b"".join(data))

    def _send(self, data: bytes) -> None:
        send = self._tls.send
        ciphertext: list[bytes] = []
        failure = None
        offset = 0
        try:
            while offset < len(data):  # a record at a time, each out of the BIO at once
                offset += send(data[offset:offset + _RECORD])
                self._take_ciphertext(ciphertext)
        except SSL.WantReadError:  # a renegotiation wants the peer first
            self._unsent.append(data[offset:])
        except SSL.Error:
            failure = Failure()
        if ciphertext:
            self._wire.write(b"".join(ciphertext))
        if failure is not None:
            self._fail(failure)

    def _send_unsent(self) -> None:
        unsent, self._unsent = self._unsent, []
        self._send(b"".join(unsent))
        if self.disconnecting and not self._unsent and self._producer is None:
            self._shutdown()

    def loseConnection(self) -> None:
        if self.disconnecting:
            return
        self.disconnecting = True
        if not self._handshake_done:
            if not self._unsent:
                self.abortConnection()
            return
        if not self._unsent and self._producer is None:
            self._shutdown()

    def _shutdown(self) -> None:
        """Send ``close_notify``; close the socket once the peer's arrived too."""
        try:
            both = self._tls.shutdown()
        except SSL.Error:
            both = False
        self._flush()
        if both:
            self._wire.loseConnection()

    def abortConnection(self) -> None:
        self._finished = self.disconnecting = True
        self._wire.abortConnection()

    def failVerification(self, reason: Failure) -> None:
        """Called by Twisted's client options when the peer's certificate fails."""
        self._reason = reason
        self.abortConnection()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        if self._finished:
            producer.stopProducing()
            return
        self._producer = producer
        self._wire.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        if self._producer is None:
            return
        self._producer = None
        self._wire.unregisterProducer()
        if self.disconnecting and not self._unsent and self._handshake_done:
            self._shutdown()

    def getHandle(self) -> SSL.Connection:
        return self._tls


class _WeakLayer:
    """The layer as Twisted's client options see it (they ask for ``factory`` and call
    ``failVerification``), held weakly: their verify callback keeps it until it is called,
    which a resumed session never does, and the callback lives in a reference cycle of
    pyOpenSSL's, freed only by the collector's full passes."""

    __slots__ = ("_layer",)

    factory = TLSLayer.factory

    def __init__(self, layer: TLSLayer) -> None:
        self._layer = weakref.ref(layer)

    def failVerification(self, reason: Failure) -> None:
        layer = self._layer()
        if layer is not None:
            layer.failVerification(reason)


def insert_layer(transport: Any, creator: Any, wire: Wire, client: bool) -> None:
    """Put a :class:`TLSLayer` between ``transport`` and its protocol (what Twisted's
    ``startTLS`` does with its own layer, less the ``ISSLTransport`` declaration no caller
    asks for)."""
    producer, streaming = transport.producer, transport.streamingProducer
    if producer is not None:
        transport.unregisterProducer()
    layer = TLSLayer(transport.protocol, creator, client)
    transport.protocol = layer
    transport.TLS = True
    layer.makeConnection(wire)
    # Weakly: a client transport outlives its connection in a reference cycle of Twisted's
    # (with its connector), and must not keep OpenSSL's memory with it.
    handle = weakref.ref(layer.getHandle())
    transport.getHandle = handle
    transport.getPeerCertificate = (
        lambda: handle().get_peer_certificate())  # type: ignore[union-attr]
    if producer is not None:
        transport.registerProducer(producer, streaming)


def start_tls(transport: Any, creator: Any) -> None:
    """Start TLS on a connection: the server end on accepted connections, the client end on
    backend legs. A transport that is not a socket's (tests) starts TLS its own way."""
    if isinstance(transport, FileDescriptor):
        client = transport._tlsClientDefault  # type: ignore[attr-defined]  # as Twisted's
        insert_layer(transport, creator, Wire(transport, FileDescriptor), client)
    else:
        transport.startTLS(creator)
