"""A Twisted HTTP backend with an autobahn WebSocket echo, run as a child process.

``TwistedBackend`` starts this module (``python -m tests.harness.websocket_echo --port N``)
as a reaped child on a random loopback port. It serves, for any path prefix (so a routing
prefix such as ``/tw/`` can stay on the request):

* ``.../ws`` — WebSocket echo (autobahn): every message comes back unchanged; the ``jmap``
  subprotocol is accepted when offered (JMAP over WebSocket, RFC 8887);
* ``.../events?count=N&interval=S`` — ``text/event-stream``: N events, S seconds apart, each
  written as soon as it is due (twisted.web sends it chunked), then the end of the stream;
* ``.../die`` — announces ``Content-Length: 1000000``, sends 10000 bytes, then aborts the
  connection (a backend that dies mid-body);
* ``.../die-early`` — aborts the connection before answering;
* ``.../sha256`` — reads the whole request body, answers ``size=… sha256=…``;
* ``.../close-delimited`` — an HTTP/1.0-style answer: no length, no chunking, the body ends
  when the connection closes;
* ``.../then-drop`` — a normal answer, but the *next* request on that connection is dropped
  unanswered (the keep-alive race: a backend closing an idle connection as a request arrives);
* anything else — ``node=<name> method=… path=…``.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import tempfile
from pathlib import Path

from tests.harness.ports import LOOPBACK, free_port
from tests.harness.processes import ManagedProcess

REPO_ROOT = Path(__file__).resolve().parents[2]


class TwistedBackend:
    """The child process. ``start()`` returns once its port accepts."""

    def __init__(self, name: str = "tw", *, python: str = sys.executable) -> None:
        self.name = name
        self.host = LOOPBACK
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix=f"stalroute-{name}-"))
        self._process = ManagedProcess(
            [python, "-m", "tests.harness.websocket_echo", "--port", str(self.port),
             "--name", name],
            name=f"twisted backend {name}",
            output_path=self.dir / "backend.out",
            cwd=REPO_ROOT,
        )

    def start(self, timeout: float = 20.0) -> TwistedBackend:
        try:
            self._process.start()
            self._process.wait_for_ports([(self.host, self.port)], timeout,
                                         diagnostics=self._process.output_text)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        self._process.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def output_text(self) -> str:
        return self._process.output_text()

    def __enter__(self) -> TwistedBackend:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


# --- the server (child process) ------------------------------------------------------------


def serve(port: int, name: str) -> None:  # pragma: no cover - runs in the child
    from autobahn.twisted.resource import WebSocketResource
    from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
    from twisted.internet import reactor
    from twisted.web.resource import Resource
    from twisted.web.server import NOT_DONE_YET, Site

    class Echo(WebSocketServerProtocol):
        def onConnect(self, request):
            return "jmap" if "jmap" in request.protocols else None

        def onMessage(self, payload, isBinary):
            self.sendMessage(payload, isBinary)

    factory = WebSocketServerFactory()
    factory.protocol = Echo
    websocket = WebSocketResource(factory)

    def events(request):
        count = int(request.args.get(b"count", [b"3"])[0])
        interval = float(request.args.get(b"interval", [b"0.5"])[0])
        request.setHeader(b"content-type", b"text/event-stream")
        request.setHeader(b"cache-control", b"no-cache")
        gone = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def tick(index):
            if gone:
                return
            request.write(f"id: {index}\nevent: state\ndata: {{\"n\": {index}}}\n\n".encode())
            if index + 1 < count:
                reactor.callLater(interval, tick, index + 1)
            else:
                request.finish()

        tick(0)
        return NOT_DONE_YET

    def die(request):
        request.setHeader(b"content-length", b"1000000")
        request.setHeader(b"content-type", b"application/octet-stream")
        request.write(b"x" * 10000)
        reactor.callLater(0.3, request.channel.transport.abortConnection)
        return NOT_DONE_YET

    def die_early(request):
        request.channel.transport.abortConnection()
        return NOT_DONE_YET

    def close_delimited(request):
        transport = request.channel.transport
        transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n"
                        + f"node={name}|close-delimited\n".encode() + b"z" * 100000)
        transport.unregisterProducer()  # the channel's producer would hold the close back
        transport.loseConnection()
        return NOT_DONE_YET

    def then_drop(request):
        request.channel.drop_next = True
        return default(request)

    def sha256(request):
        body = request.content.read()
        request.setHeader(b"content-type", b"text/plain")
        return f"size={len(body)} sha256={hashlib.sha256(body).hexdigest()}\n".encode()

    def default(request):
        request.setHeader(b"content-type", b"text/plain")
        return f"node={name}|method={request.method.decode()}|path={request.path.decode()}\n" \
            .encode()

    handlers = {b"events": events, b"die": die, b"die-early": die_early, b"sha256": sha256,
                b"close-delimited": close_delimited, b"then-drop": then_drop}

    class Root(Resource):
        def getChild(self, path, request):
            if getattr(request.channel, "drop_next", False):
                return Leaf(die_early)
            last = request.path.rstrip(b"/").rsplit(b"/", 1)[-1]
            if last == b"ws":
                return websocket
            return Leaf(handlers.get(last, default))

    class Leaf(Resource):
        isLeaf = True

        def __init__(self, handler):
            super().__init__()
            self.handler = handler

        def render(self, request):
            return self.handler(request)

    site = Site(Root())
    site.noisy = False
    reactor.listenTCP(port, site, interface=LOOPBACK)
    reactor.run()


def main(argv: list[str] | None = None) -> None:  # pragma: no cover - runs in the child
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", default="tw")
    args = parser.parse_args(argv)
    serve(args.port, args.name)


if __name__ == "__main__":  # pragma: no cover
    main()
