"""HTTP/1.1 per-request routing (SPEC §2.9, §5 HTTP).

Sans-IO:

* :mod:`stalroute.http.routes` — which ``[[http.route]]`` a request takes and which account
  it names (path globs, Basic/Bearer/query/header/body extraction).
* :mod:`stalroute.http.headers` — strict request-head checks (smuggling defences),
  hop-by-hop removal, ``Forwarded`` / ``X-Forwarded-For`` rules.

* :mod:`stalroute.http.wire` — HTTP/1.1 framing of both legs: heads parsed by llhttp
  (httptools) one message at a time, bodies framed and messages re-serialised.

The Twisted side, on the shared client-connection lifecycle of :mod:`stalroute.inbound`:

* :mod:`stalroute.http.server` — the client side: requests read one at a time, keep-alive,
  timers, reading paused and resumed, stalroute's own answers;
* :mod:`stalroute.http.connection` — routing each request, forwarding it, relaying the
  response; its :class:`~stalroute.http.connection.HTTPListenerFactory` is what
  ``service.OTHER_LISTENERS`` registers for ``protocol = "http"`` listeners;
* :mod:`stalroute.http.exchange` — one request and its response, and its log line;
* :mod:`stalroute.http.pool` — the backend connections of a client connection;
* :mod:`stalroute.http.tunnel` — WebSocket tunnels after a ``101``;
* :mod:`stalroute.http.local` — the health endpoints and error bodies.
"""
