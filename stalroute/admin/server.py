"""Serving the admin API: HTTPS only, on ``[admin] bind`` (SPEC §2.10, §8).

The certificate is ``[admin] certificate`` (the name of a ``[tls.certificate.*]`` entry)
or, without it, the same SNI selection as the mail listeners.  Certificates follow config
reloads: the TLS context is rebuilt from the current runtime's ``[tls]`` the first time a
connection arrives after a reload, so a renewed certificate is served without a restart.
The token, the lockout settings and the bind address are read once at startup (a change
to ``[admin]`` is reported by the reload as needing a restart).

:class:`AdminService` is one of the two services the twistd plugin runs, beside the proxy
service it controls through :class:`~stalroute.control.Control`.
"""

from __future__ import annotations

import dataclasses
import json
from io import BytesIO
from typing import cast

from OpenSSL import SSL
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IListeningPort,
    IOpenSSLContextFactory,
    IReactorSSL,
    IReactorTime,
)
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from zope.interface import implementer

from stalroute.admin.app import INTERNAL_ERROR, AdminAPI
from stalroute.admin.auth import Lockout
from stalroute.config import AdminConfig
from stalroute.control import Control
from stalroute.logs import logger
from stalroute.runtime import Runtime, StartupError, bind_refused, refuse_to_start
from stalroute.tls import ISSUED, ServerTLS

log = logger("stalroute.admin")

#: Idle keep-alive connections are closed after this many seconds.
IDLE_TIMEOUT = 120


class AdminRequest(Request):
    """A request whose body is only kept when the request is authenticated.

    The body of an unauthenticated or locked-out request is dropped as it arrives, so the
    API cannot be used to fill the disk or memory without the token.  Form bodies are not
    parsed into ``args`` (a bulk import sent with curl's default form content type must
    stay a body).
    """

    _parsePOSTFormSubmission = False
    _discard_body = False

    def gotLength(self, length):
        site: AdminSite = self.channel.site  # type: ignore[attr-defined]  # set by Site
        if not site.api.may_upload(self):
            self._discard_body = True
            self.content = BytesIO()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if not self._discard_body:
            super().handleContentChunk(data)

    def processingFailed(self, reason):
        """Whatever escapes the API's own error handling (see ``AdminAPI._handle``) is logged
        and answered with a JSON 500, never twisted.web's HTML page."""
        log.failure("admin: unexpected error", failure=reason)
        if self.startedWriting:  # cut a half-written answer, so it cannot pass as whole
            transport = getattr(self.channel, "transport", None)
            if transport is not None:
                transport.abortConnection()
            return reason
        body = json.dumps({"error": INTERNAL_ERROR}).encode() + b"\n"
        self.setResponseCode(500)
        self.setHeader(b"Content-Type", b"application/json")
        self.setHeader(b"Content-Length", b"%d" % len(body))
        self.write(body)
        self.finish()
        return reason


class _JSONGuard(Resource):
    """In front of the Klein resource: a URL that is not UTF-8 gets a JSON 400 as well (Klein
    would answer it in plain text before any route runs)."""

    isLeaf = True

    def __init__(self, inner) -> None:
        super().__init__()
        self._inner = inner

    def render(self, request):
        try:
            for segment in request.postpath:
                segment.decode("utf-8")
        except UnicodeDecodeError:
            request.setResponseCode(400)
            request.setHeader(b"Content-Type", b"application/json")
            return b'{"error": "the URL is not UTF-8"}\n'
        return self._inner.render(request)


class AdminChannel(HTTPChannel):
    """twisted.web's HTTP/1.1 channel, answering a request head it will not read with a JSON
    error before closing: a line over ``MAX_LENGTH`` (16 KiB) would otherwise be dropped
    without an answer, leaving the client waiting for the idle timeout, and a head over
    ``totalHeadersSize`` or a malformed one would get a bare 400."""

    _refused = False

    def dataReceived(self, data: bytes) -> None:
        if not self._refused:  # the rest of a refused request is discarded
            super().dataReceived(data)

    def lineLengthExceeded(self, line: bytes) -> None:
        if self.requests:  # the request line was read: this is a header line
            self._refuse(431, f"a request header line is longer than {self.MAX_LENGTH} bytes")
        else:
            self._refuse(414, f"the request line is longer than {self.MAX_LENGTH} bytes")

    def _respondToBadRequestAndDisconnect(self) -> None:
        """twisted.web's way out of a request it cannot parse (overridden: a bare 400)."""
        if self._receivedHeaderSize > self.totalHeadersSize:
            self._refuse(431, f"the request head is larger than {self.totalHeadersSize} bytes")
        else:
            self._refuse(400, "malformed HTTP request")

    def _refuse(self, status: int, message: str) -> None:
        if self._refused:
            return
        self._refused = True
        body = json.dumps({"error": message}).encode() + b"\n"
        assert self.transport is not None  # only refused while connected
        self.transport.write(b"".join([
            b"HTTP/1.1 %d %s\r\n" % (status, _REASONS[status]),
            b"Content-Type: application/json\r\nCache-Control: no-store\r\n",
            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body), body]))
        self.loseConnection()
        # A TLS close waits for the client's close_notify: do not wait for it for ever.
        self._abortingCall = self.callLater(self.abortTimeout, self.forceAbortClient)


_REASONS = {400: b"Bad Request", 414: b"URI Too Long", 431: b"Request Header Fields Too Large"}


class AdminSite(Site):
    """The Klein resource, with our request class and channel and no access log (our own
    request log line redacts identifiers; the stock one would print them)."""

    protocol = AdminChannel  # type: ignore[assignment]  # a Site's channel class
    requestFactory = AdminRequest
    displayTracebacks = False
    noisy = False

    def __init__(self, api: AdminAPI) -> None:
        super().__init__(_JSONGuard(api.resource()), timeout=IDLE_TIMEOUT)
        self.api = api

    def log(self, request) -> None:
        pass


@implementer(IOpenSSLContextFactory)
class AdminTLS:
    """The TLS context of the admin listener, following config reloads."""

    def __init__(self, control: Control, certificate: str | None) -> None:
        self._control = control
        self._certificate = certificate
        self._runtime: Runtime | None = None
        self._issued: tuple[bytes, bytes] | None = None
        self._context: SSL.Context | None = None
        self.getContext()

    def _build(self, runtime: Runtime) -> SSL.Context:
        config = runtime.config
        name = self._certificate
        entry = config.tls.certificates.get(name) if name else None
        if name is None or entry is None:
            return runtime.server_tls.options.getContext()
        only = dataclasses.replace(config.tls, certificates={
            name: dataclasses.replace(entry, default=True)})
        return ServerTLS(only, config.server.hostname).options.getContext()

    def getContext(self) -> SSL.Context:
        """Rebuilt after a reload, and after an ACME entry's certificate was issued anew."""
        runtime = self._control.runtime
        issued = ISSUED.get(self._certificate) if self._certificate else None
        if runtime is not self._runtime or issued is not self._issued:
            try:
                self._context = self._build(runtime)
            except Exception:  # noqa: BLE001 - keep serving with the previous certificate
                if self._context is None:
                    raise
                log.failure("admin: cannot load the new certificate; keeping the old one")
            self._runtime = runtime
            self._issued = issued
        assert self._context is not None
        return self._context


class IAdminReactor(IReactorTime, IReactorSSL):
    """The admin service's reactor: its clock (lockouts, uptime) and its HTTPS port."""


class AdminService(Service):
    """The admin API, with TLS on ``[admin] bind``."""

    def __init__(self, reactor: IAdminReactor, control: Control, settings: AdminConfig) -> None:
        self._reactor = reactor
        self._control = control
        self._settings = settings
        lockout = Lockout(reactor, settings.lockout_threshold, settings.lockout_duration)
        self._api = AdminAPI(control, clock=reactor, token=settings.token, lockout=lockout)
        self._port: IListeningPort | None = None

    def startService(self) -> None:
        super().startService()
        try:
            self._port = self._listen()
        except StartupError as exc:
            refuse_to_start(exc)

    def _listen(self) -> IListeningPort:
        """StartupError (naming ``admin`` and the address) if the port cannot be bound."""
        host, port = self._settings.bind
        try:
            listening = self._reactor.listenSSL(
                port, AdminSite(self._api), AdminTLS(self._control, self._settings.certificate),
                backlog=128, interface=host)
        except CannotListenError as exc:
            raise bind_refused("admin", host, port, exc) from None
        address = cast("IPv4Address | IPv6Address", listening.getHost())  # a TCP port's
        log.info("admin API on https://{host}:{port} (token from {source})", host=address.host,
                 port=address.port, source=self._settings.token_source or "-")
        return listening

    def stopService(self) -> Deferred[None] | None:
        """Stop accepting; open connections keep answering while the proxy drains."""
        super().stopService()
        port, self._port = self._port, None
        return None if port is None else port.stopListening()
