"""Issue 11 item 13 against a real stalroute in front of real HTTP backends: an admin login
delay holds that account's HTTP requests (routed by ``Authorization`` to nginx) and nobody
else's, and a kick cuts a live server-sent-events stream (from the Twisted backend) and takes
its connection out of ``GET /connections``.

The backends, the client helpers and the routing table are those of
:mod:`tests.integration.test_http`; only an ``[admin]`` section and one route by account to the
SSE backend are added.
"""

from __future__ import annotations

import base64
import http.client
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tests.harness.pki import CertificateAuthority, IssuedCertificate
from tests.harness.stalroute import admin_section
from tests.harness.websocket_echo import TwistedBackend
from tests.integration.test_admin import TOKEN, Admin, wait_until
from tests.integration.test_http import (  # noqa: F401 - three fixtures among these
    MAPPINGS, NginxPair, curl_binary, http_proxy_config, nginx_pair, served_by, tw_backend, url,
)

pytestmark = pytest.mark.integration

#: An account mapped to the SSE backend, reached through a route that extracts it.
STREAMER = "streamer"
DELAY = 5.0


@pytest.fixture
def web(stalroute, pki: CertificateAuthority, proxy_certificate: IssuedCertificate,
        nginx_pair: NginxPair, tw_backend: TwistedBackend) -> tuple[Any, Admin]:
    """stalroute with test_http's listeners and routes, the admin API, and ``/sse/**``
    routed by the ``Authorization`` account (``streamer`` → the Twisted backend)."""
    config = http_proxy_config(proxy_certificate, nginx_pair, tw_backend, pki.cert_path)
    config["admin"] = admin_section(TOKEN)
    config["http"]["route"].insert(0, {"match": "/sse/**", "extract": {"from": "authorization"}})
    proxy = stalroute(config, mappings={**MAPPINGS, STREAMER: "tw"})
    return proxy, Admin(proxy, pki)


def basic(login: str) -> str:
    return "Basic " + base64.b64encode(f"{login}:secret".encode()).decode()


def connections(admin: Admin, identifier: str) -> list[dict[str, Any]]:
    return admin.ok("GET", f"/connections?identifier={identifier}")["connections"]


def test_a_login_delay_holds_that_accounts_http_requests_only(web, curl_binary: str) -> None:
    proxy, admin = web
    admin.ok("POST", f"/connections/delay?identifier=alice&seconds={DELAY:g}")
    held_from = time.monotonic()
    log_mark = len(proxy.log_text())

    def alice() -> tuple[dict[str, str], float]:
        answer = served_by("-u", "alice:x", url(proxy, "/jmap/session"))
        return answer, time.monotonic()

    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(alice)
        # Once alice's request is held in stalroute, bob's goes through and is answered
        # while alice's still waits.
        wait_until(lambda: "holding the login" in proxy.log_text()[log_mark:] or held.done())
        assert not held.done(), held.result()
        assert served_by("-u", "bob:x", url(proxy, "/jmap/session"))["node"] == "node2"
        assert not held.done(), "alice's request was answered before bob's"
        answer, arrived = held.result(timeout=60)
    # Answered by the real backend, only once the delay was over (a generous lower bound).
    assert (answer["node"], answer["uri"]) == ("node1", "/jmap/session")
    assert arrived - held_from >= DELAY - 1.0, arrived - held_from
    # The delay has passed: alice's requests flow again at once.
    assert served_by("-u", "alice:x", url(proxy, "/jmap/session"))["node"] == "node1"


def test_a_kick_cuts_a_live_sse_stream(web) -> None:
    proxy, admin = web
    conn = http.client.HTTPConnection(*proxy.listener("web"), timeout=30)
    try:
        conn.request("GET", "/sse/events?count=100000&interval=0.2",
                     headers={"Accept": "text/event-stream", "Authorization": basic(STREAMER)})
        response = conn.getresponse()
        assert response.status == 200
        assert response.getheader("content-type") == "text/event-stream"
        assert response.readline().startswith(b"id: 0")
        (row,) = connections(admin, STREAMER)
        assert (row["identifier"], row["destination"]) == (STREAMER, "tw")

        assert admin.ok("POST", f"/connections/kick?identifier={STREAMER}")["kicked"] == 1
        # The stream ends (the events would go on for hours); read what was on the way.
        deadline = time.monotonic() + 20
        ended = False
        while time.monotonic() < deadline:
            try:
                if not response.readline():
                    ended = True
                    break
            except (http.client.IncompleteRead, ConnectionError):
                ended = True
                break
        assert ended, "the SSE stream still flows after the kick"
    finally:
        conn.close()
    wait_until(lambda: connections(admin, STREAMER) == [])
    assert admin.ok("GET", "/connections") == {"connections": []}
