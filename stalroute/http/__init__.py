"""HTTP/1.1 per-request routing (SPEC §2.9, §5 HTTP).

* :mod:`stalroute.http.routes` — which ``[[http.route]]`` a request takes and which account
  it names (path globs, Basic/Bearer/query/header/body extraction). Sans-IO.
* :mod:`stalroute.http.headers` — strict request-head checks (smuggling defences),
  hop-by-hop removal, ``Forwarded`` / ``X-Forwarded-For`` rules. Sans-IO.
* :mod:`stalroute.http.proxy` — the Twisted side: h11 on both legs, a small per-client
  backend pool keyed by destination, flow control, WebSocket tunnels. Its
  :class:`~stalroute.http.proxy.HTTPListenerFactory` is what ``service.OTHER_LISTENERS``
  registers for ``protocol = "http"`` listeners; admission (slots, PROXY header, per-IP
  limits) is the shared :mod:`stalroute.inbound`.
"""
