"""Serving the admin API: HTTPS only, on ``[admin] bind`` (SPEC §2.10, §8).

The certificate is ``[admin] certificate`` (the name of a ``[tls.certificate.*]`` entry)
or, without it, the same SNI selection as the mail listeners.  Certificates follow config
reloads: the TLS context is rebuilt from the current runtime's ``[tls]`` the first time a
connection arrives after a reload, so a renewed certificate is served without a restart.
The token, the lockout settings and the bind address are read once at startup (a change
to ``[admin]`` is reported by the reload as needing a restart).
"""

from __future__ import annotations

import dataclasses

from OpenSSL import SSL
from twisted.internet.interfaces import IListeningPort, IOpenSSLContextFactory
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from zope.interface import implementer

from stalroute.admin.app import AdminAPI
from stalroute.logs import logger
from stalroute.tls import ServerTLS

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
        site = self.channel.site
        if not site.api.may_upload(self):
            from io import BytesIO

            self._discard_body = True
            self.content = BytesIO()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if not self._discard_body:
            super().handleContentChunk(data)


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


class AdminSite(Site):
    """The Klein resource, with our request class and no access log (our own request log
    line redacts identifiers; the stock one would print them)."""

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

    def __init__(self, service, certificate: str | None) -> None:
        self._service = service
        self._certificate = certificate
        self._runtime = None
        self._context: SSL.Context | None = None
        self.getContext()

    def _build(self, runtime) -> SSL.Context:
        config = runtime.config
        entry = config.tls.certificates.get(self._certificate) if self._certificate else None
        if entry is None:
            return runtime.server_tls.options.getContext()
        only = dataclasses.replace(config.tls, certificates={
            self._certificate: dataclasses.replace(entry, default=True)})
        return ServerTLS(only, config.server.hostname).options.getContext()

    def getContext(self) -> SSL.Context:
        runtime = self._service.runtime
        if runtime is not self._runtime:
            try:
                self._context = self._build(runtime)
            except Exception:  # noqa: BLE001 - keep serving with the previous certificate
                if self._context is None:
                    raise
                log.failure("admin: cannot load the new certificate; keeping the old one")
            self._runtime = runtime
        return self._context


def start_admin(service) -> IListeningPort:
    """Listen with TLS on ``[admin] bind``; raises (stopping startup) if it cannot bind."""
    admin = service.runtime.config.admin
    api = AdminAPI.for_service(service)
    host, port = admin.bind
    listening = service.reactor.listenSSL(port, AdminSite(api),
                                          AdminTLS(service, admin.certificate),
                                          backlog=128, interface=host)
    address = listening.getHost()
    log.info("admin API on https://{host}:{port} (token from {source})", host=address.host,
             port=address.port, source=admin.token_source or "-")
    return listening
