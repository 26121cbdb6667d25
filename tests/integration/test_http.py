"""Acceptance tests of the HTTP router (SPEC §2.9, §5 HTTP, §6) with real backends.

Backends: two nginx nodes (``node1`` reached on its ``proxy_protocol`` listener with a PROXY
v2 header, ``node2`` on its plain listener with ``Forwarded``/``X-Forwarded-For`` appended),
each answering which node it is, and a Twisted backend (``tw``: autobahn WebSocket echo,
server-sent events, a backend that dies mid-body). The client is ``curl`` wherever curl can
say it, raw sockets where it cannot (smuggling bytes, WebSocket frames, a slow reader).

Routing table of these tests (``mappings.tsv``, normalised to lowercase): bob and
bob@example.org, carol@example.org and the OAuth client id ``webui`` → node2; everyone else
→ node1 (the default).
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import re
import socket
import struct
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from tests.conftest import require_binary
from tests.harness.clients import connect_from
from tests.harness.nginx import NginxNode, parse_answer
from tests.harness.pki import CertificateAuthority, IssuedCertificate
from tests.harness.ports import LOOPBACK, free_port, free_ports
from tests.harness.stalroute import StalrouteProcess
from tests.harness.websocket_echo import TwistedBackend

pytestmark = pytest.mark.integration

MAPPINGS = {"bob": "node2", "bob@example.org": "node2", "carol@example.org": "node2",
            "webui": "node2"}
CLIENT_IP = "127.0.0.2"
BODY_EXTRACT_CAP = 4096
MAX_KEEPALIVE_REQUESTS = 8
KEEPALIVE_TIMEOUT = 3
PREAUTH_TIMEOUT = 2


class NginxPair(NamedTuple):
    node1: NginxNode
    node2: NginxNode


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def curl_binary() -> str:
    return require_binary("curl")


@pytest.fixture(scope="module")
def nginx_pair(pki: CertificateAuthority) -> Any:
    binary = require_binary("nginx")
    nodes: list[NginxNode] = []
    try:
        for name in ("node1", "node2"):
            certificate = pki.issue(f"web-{name}", [f"{name}.test"], ["127.0.0.1"])
            nodes.append(NginxNode(name, binary=binary, certificate=certificate).start())
        yield NginxPair(*nodes)
    finally:
        for node in nodes:
            node.stop()


@pytest.fixture(scope="module")
def tw_backend() -> Any:
    with TwistedBackend("tw") as backend:
        yield backend


def http_destination(port: int, *, proxy: bool = False, forwarded: bool = False,
                     ) -> dict[str, Any]:
    return {"host": LOOPBACK, "proxy_protocol": proxy, "forwarded": forwarded,
            "allow_plaintext_auth": True, "protocol": {"http": {"port": port, "tls": "plain"}}}


def http_proxy_config(certificate: IssuedCertificate, nodes: NginxPair, tw: TwistedBackend,
                      ca_file: Path) -> dict[str, Any]:
    web, trusting, webs, tight = free_ports(4)
    return {
        "server": {"hostname": "stalroute.test", "shutdown_grace": "1s", "backend_timeout": "3s",
                   "host_down_threshold": 0},
        "tls": {"certificate": {"default": {"cert": str(certificate.cert_path),
                                            "key": str(certificate.key_path), "default": True}}},
        "listener": {
            "web": {"protocol": "http", "bind": [f"{LOOPBACK}:{web}"], "tls": "plain",
                    "preauth_timeout": f"{PREAUTH_TIMEOUT}s"},
            "trusting": {"protocol": "http", "bind": [f"{LOOPBACK}:{trusting}"], "tls": "plain",
                         "forwarded": "trust"},
            "webs": {"protocol": "http", "bind": [f"{LOOPBACK}:{webs}"], "tls": "implicit"},
            "tight": {"protocol": "http", "bind": [f"{LOOPBACK}:{tight}"], "tls": "plain",
                      "max_connections": 3},
        },
        "destination": {
            "node1": http_destination(nodes.node1.pp_port, proxy=True),
            "node2": http_destination(nodes.node2.port, forwarded=True),
            "node2tls": {"host": LOOPBACK, "tls_server_name": "node2.test",
                         "tls_ca_file": str(ca_file), "proxy_protocol": False,
                         "protocol": {"http": {"port": nodes.node2.tls_port, "tls": "implicit"}}},
            "tw": http_destination(tw.port),
            "down": http_destination(free_port()),
        },
        "routing": {"default_destination": "node1"},
        "mapping": {"source": "file", "normalize": "lowercase"},
        "http": {
            "body_extract_cap": BODY_EXTRACT_CAP,
            "max_keepalive_requests": MAX_KEEPALIVE_REQUESTS,
            "keepalive_timeout": f"{KEEPALIVE_TIMEOUT}s",
            "route": [
                {"match": "/pinned/**", "destination": "node2"},
                {"match": "/auth/token",
                 "extract": {"from": "body", "regex": "client_id=([^&]+)"}, "fallback": "node1"},
                {"match": "/dav/form/**",
                 "extract": {"from": "body", "regex": "client_id=([^&]+)"}, "fallback": "node1"},
                {"match": "/q/**", "extract": {"from": "query", "param": "account"}},
                {"match": "/h/**", "extract": {"from": "header", "header": "X-Account"}},
                {"match": "/tw/**", "destination": "tw"},
                {"match": "/tls/**", "destination": "node2tls"},
                {"match": "/down/**", "destination": "down"},
                {"match": "/jmap/**", "extract": {"from": "authorization"},
                 "fallback": "default"},
                {"match": "/dav/**", "extract": {"from": "authorization"}},
            ],
        },
    }


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, proxy_certificate: IssuedCertificate,
          pki: CertificateAuthority, nginx_pair: NginxPair, tw_backend: TwistedBackend) -> Any:
    config = http_proxy_config(proxy_certificate, nginx_pair, tw_backend, pki.cert_path)
    process = StalrouteProcess(config, tmp_path_factory.mktemp("stalroute-http"),
                               mappings=MAPPINGS)
    process.start()
    try:
        yield process
    finally:
        process.stop()
        print(f"--- {process.log.path} (tail) ---\n{process.log_text()[-6000:]}")
        if output := process.output_text():
            print(f"--- stalroute stdout/stderr ---\n{output[-3000:]}")


def url(proxy: StalrouteProcess, path: str, listener: str = "web") -> str:
    host, port = proxy.listener(listener)
    scheme = "https" if listener == "webs" else "http"
    return f"{scheme}://{'localhost' if listener == 'webs' else host}:{port}{path}"


# --- clients ---------------------------------------------------------------------------------


def curl(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["curl", "-sS", "--max-time", str(int(timeout)), *args],
                            capture_output=True, timeout=timeout + 10)
    if check and result.returncode != 0:
        raise AssertionError(f"curl {args} exited {result.returncode}: {result.stderr!r}")
    return result


def served_by(*args: str) -> dict[str, str]:
    """The nginx answer (which node, what it saw) to one curl request."""
    return parse_answer(curl(*args).stdout.decode())


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwt(claims: dict[str, Any]) -> str:
    return ".".join([b64url(b'{"alg":"RS256","typ":"JWT"}'), b64url(json.dumps(claims).encode()),
                     b64url(b"not-checked")])


def sw1_token(address: str) -> str:
    return f"sw1.{b64url(os.urandom(24))}.{b64url(address.encode())}"


def raw_exchange(proxy: StalrouteProcess, data: bytes, listener: str = "web",
                 timeout: float = 5.0) -> bytes:
    """Send raw bytes, read until the server closes (or ``timeout``)."""
    sock = socket.create_connection(proxy.listener(listener), timeout=timeout)
    with sock:
        sock.sendall(data)
        chunks = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except (socket.timeout, ConnectionResetError):
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """True when the peer closes ``sock`` within ``seconds`` (data read is discarded)."""
    sock.settimeout(seconds)
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            if not sock.recv(65536):
                return True
    except (socket.timeout, TimeoutError):
        return False
    except ConnectionResetError:
        return True
    return False


# --- routing per request ---------------------------------------------------------------------------


@pytest.mark.parametrize(("login", "node"),
                         [("alice", "node1"), ("bob", "node2"), ("Bob%admin", "node2"),
                          ("bob@example.org", "node2"), ("frank@example.org", "node1")])
def test_basic_auth_routes_by_login(proxy: StalrouteProcess, curl_binary: str, login: str,
                                    node: str) -> None:
    answer = served_by("-u", f"{login}:secret", url(proxy, "/jmap/session"))
    assert answer["node"] == node
    assert answer["uri"] == "/jmap/session"


@pytest.mark.parametrize(
    ("token", "node"),
    [(jwt({"sub": "1234", "email": "bob@example.org"}), "node2"),
     (jwt({"preferred_username": "carol@example.org"}), "node2"),
     (jwt({"email": "dave@example.org"}), "node1"),
     (sw1_token("carol@example.org"), "node2"),
     (sw1_token("erin@example.org"), "node1"),
     ("opaque-token-nobody-can-read", "node1")],
)
def test_bearer_tokens_route_by_account(proxy: StalrouteProcess, curl_binary: str, token: str,
                                        node: str) -> None:
    answer = served_by("-H", f"Authorization: Bearer {token}", url(proxy, "/jmap/api"))
    assert answer["node"] == node


def test_pinned_route_ignores_the_account(proxy: StalrouteProcess, curl_binary: str) -> None:
    assert served_by("-u", "alice:x", url(proxy, "/pinned/app.js"))["node"] == "node2"
    assert served_by("-u", "alice:x", url(proxy, "/pinned"))["node"] == "node2"


def test_query_and_header_extraction(proxy: StalrouteProcess, curl_binary: str) -> None:
    assert served_by(url(proxy, "/q/download?x=1&account=bob"))["node"] == "node2"
    assert served_by(url(proxy, "/q/download?account=alice"))["node"] == "node1"
    assert served_by("-H", "X-Account: BOB", url(proxy, "/h/x"))["node"] == "node2"
    assert served_by(url(proxy, "/h/x"))["node"] == "node1"  # nothing to extract: default


def test_no_route_answers_404(proxy: StalrouteProcess, curl_binary: str) -> None:
    result = curl("-i", url(proxy, "/nothing/here"))
    head, _, body = result.stdout.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 404")
    assert b"application/json" in head
    assert "no route" in json.loads(body)["error"]


@pytest.mark.parametrize(("body", "node"),
                         [("grant_type=authorization_code&client_id=webui&code=x", "node2"),
                          ("client_id=WebUI", "node2"),
                          ("grant_type=refresh_token&client_id=other-app", "node1"),
                          ("grant_type=password", "node1")])
def test_body_extraction_on_the_token_endpoint(proxy: StalrouteProcess, curl_binary: str,
                                               body: str, node: str) -> None:
    answer = served_by("-d", body, url(proxy, "/auth/token"))
    assert (answer["node"], answer["method"]) == (node, "POST")


def test_body_extraction_forwards_the_whole_body(proxy: StalrouteProcess, curl_binary: str,
                                                 nginx_pair: NginxPair, tmp_path: Path) -> None:
    """A body longer than body_extract_cap: routed on its start, stored intact; curl's
    ``Expect: 100-continue`` is answered by stalroute itself on a body route."""
    body = b"client_id=webui&pad=" + os.urandom(2 * 1024 * 1024)
    source = tmp_path / "form.bin"
    source.write_bytes(body)
    name = f"form-{uuid.uuid4().hex}.bin"
    result = curl("-v", "-T", str(source), "-o", "/dev/null", "-w", "%{http_code}",
                  url(proxy, f"/dav/form/{name}"))
    assert result.stdout in (b"201", b"204")
    assert b"< HTTP/1.1 100 Continue" in result.stderr, result.stderr.decode()[-3000:]
    stored = nginx_pair.node2.dav_path(f"form/{name}")
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == hashlib.sha256(body).hexdigest()
    assert not nginx_pair.node1.dav_path(f"form/{name}").exists()


def test_two_accounts_on_one_keepalive_connection_reach_two_nodes(
        proxy: StalrouteProcess, curl_binary: str) -> None:
    """SPEC §5 [ext]: a later request for another destination opens (or reuses) a connection
    to it; the client connection is never refused or switched."""
    args: list[str] = []
    for index, user in enumerate(["alice", "bob", "alice", "bob"]):
        if index:
            args.append("--next")
        args += ["-u", f"{user}:pw", "-w", "connects=%{num_connects}\n",
                 url(proxy, f"/jmap/{index}")]
    lines = curl(*args).stdout.decode().splitlines()  # nginx's line, then curl's write-out
    answers = [parse_answer(f"{body}|{connects}") for body, connects in zip(lines[::2],
                                                                             lines[1::2])]
    assert [a["node"] for a in answers] == ["node1", "node2", "node1", "node2"]
    assert [a["connects"] for a in answers] == ["1", "0", "0", "0"]  # one client connection
    # Each node saw one backend connection, reused for its second request.
    assert answers[0]["conn"] == answers[2]["conn"] and answers[2]["req"] == "2"
    assert answers[1]["conn"] == answers[3]["conn"] and answers[3]["req"] == "2"


def test_head_and_http10_requests(proxy: StalrouteProcess, curl_binary: str) -> None:
    head = curl("-I", "-u", "bob:pw", url(proxy, "/jmap/head")).stdout
    assert head.startswith(b"HTTP/1.1 200") and re.search(rb"(?i)content-length: \d+", head)
    # HTTP/1.0 without Host: the backend still gets a Host, the client an answer and a close.
    response = raw_exchange(proxy, b"GET /jmap/old HTTP/1.0\r\n\r\n")
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    answer = parse_answer(body.decode())
    assert (answer["node"], answer["host"]) == ("node1", LOOPBACK)


def test_backend_over_tls(proxy: StalrouteProcess, curl_binary: str) -> None:
    answer = served_by("-u", "alice:pw", url(proxy, "/tls/x"), "--next", "-u", "alice:pw",
                       url(proxy, "/tls/y"))
    assert (answer["node"], answer["scheme"]) == ("node2", "https")


def test_close_delimited_response_is_reframed(proxy: StalrouteProcess, curl_binary: str) -> None:
    result = curl("-w", "|%{num_connects}|%{size_download}\n", url(proxy, "/tw/close-delimited"),
                  "--next", "-w", "|%{num_connects}\n", url(proxy, "/tw/after"))
    lines = result.stdout.decode().splitlines()
    assert lines[0] == "node=tw|close-delimited"
    assert lines[1] == "z" * 100000 + "|1|" + str(len(lines[0]) + 1 + 100000)
    assert lines[2:] == ["node=tw|method=GET|path=/tw/after", "|0"]  # keep-alive survived


def test_reused_backend_connection_that_died_is_retried(proxy: StalrouteProcess,
                                                        curl_binary: str) -> None:
    """The keep-alive race: the pooled connection to ``tw`` drops the next request unanswered;
    a request without a body is resent once on a fresh connection."""
    result = curl(url(proxy, "/tw/then-drop"), "--next", "-w", "|%{http_code}\n",
                  url(proxy, "/tw/second"))
    assert result.stdout.decode().splitlines() == [
        "node=tw|method=GET|path=/tw/then-drop", "node=tw|method=GET|path=/tw/second", "|200"]


def test_pipelined_requests_are_answered_in_order(proxy: StalrouteProcess) -> None:
    auth = {user: base64.b64encode(f"{user}:pw".encode()) for user in ("alice", "bob")}
    requests = b"".join(
        b"GET /jmap/p" + str(i).encode() + b" HTTP/1.1\r\nHost: h\r\nAuthorization: Basic "
        + auth[user] + b"\r\n" + (b"Connection: close\r\n" if i == 2 else b"") + b"\r\n"
        for i, user in enumerate(["bob", "alice", "bob"]))
    response = raw_exchange(proxy, requests).decode()
    nodes = re.findall(r"node=(node\d)\|method=GET\|uri=/jmap/p(\d)", response)
    assert nodes == [("node2", "0"), ("node1", "1"), ("node2", "2")]


# --- bodies, streams, tunnels ------------------------------------------------------------------------


def test_chunked_upload_of_50_mb_arrives_intact(proxy: StalrouteProcess, curl_binary: str,
                                               nginx_pair: NginxPair, tmp_path: Path) -> None:
    data = os.urandom(50 * 1024 * 1024)
    digest = hashlib.sha256(data).hexdigest()
    source = tmp_path / "upload.bin"
    source.write_bytes(data)
    name = f"up-{uuid.uuid4().hex}.bin"
    target = url(proxy, f"/dav/{name}")
    result = curl("-v", "-u", "alice:pw", "-T", str(source), "-H", "Transfer-Encoding: chunked",
                  "-o", "/dev/null", "-w", "%{http_code}", target, timeout=120)
    assert result.stdout in (b"201", b"204")
    assert b"> Transfer-Encoding: chunked" in result.stderr
    assert b"< HTTP/1.1 100 Continue" in result.stderr  # nginx's 100, relayed
    stored = nginx_pair.node1.dav_path(name)
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == digest
    downloaded = tmp_path / "download.bin"
    curl("-u", "alice:pw", "-o", str(downloaded), target, timeout=120)
    assert hashlib.sha256(downloaded.read_bytes()).hexdigest() == digest
    stored.unlink()


def test_a_slow_reader_pauses_the_backend(proxy: StalrouteProcess, nginx_pair: NginxPair) -> None:
    """Flow control: a client that stops reading a 50 MB download does not make stalroute
    buffer it."""
    data = os.urandom(50 * 1024 * 1024)
    name = f"big-{uuid.uuid4().hex}.bin"
    nginx_pair.node1.dav_path(name).write_bytes(data)
    host, port = proxy.listener("web")
    sock = connect_from(host, port, rcvbuf=16384, timeout=30)
    try:
        before = proxy.rss_kb()
        sock.sendall(f"GET /dav/{name} HTTP/1.1\r\nHost: h\r\n\r\n".encode())
        time.sleep(2.0)
        grown_mb = (proxy.rss_kb() - before) / 1024
        assert grown_mb < 16, f"stalroute grew by {grown_mb:.1f} MB for a paused reader"
        received = bytearray()
        while True:
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            received += chunk
            head_end = received.find(b"\r\n\r\n")
            if head_end >= 0 and len(received) - head_end - 4 >= len(data):
                break
    finally:
        sock.close()
        nginx_pair.node1.dav_path(name).unlink()
    body = bytes(received[received.find(b"\r\n\r\n") + 4:])
    assert hashlib.sha256(body).digest() == hashlib.sha256(data).digest()


def test_server_sent_events_stream_without_buffering(proxy: StalrouteProcess) -> None:
    conn = http.client.HTTPConnection(*proxy.listener("web"), timeout=10)
    try:
        conn.request("GET", "/tw/events?count=4&interval=0.6",
                     headers={"Accept": "text/event-stream"})
        started = time.monotonic()
        response = conn.getresponse()
        assert response.status == 200
        assert response.getheader("content-type") == "text/event-stream"
        arrivals = []
        while True:
            line = response.readline()
            if not line:
                break
            if line.startswith(b"id: "):
                arrivals.append(time.monotonic() - started)
    finally:
        conn.close()
    assert len(arrivals) == 4
    # The backend writes an event every 0.6 s: each must reach the client when it is written,
    # not when the stream ends 1.8 s later.
    assert arrivals[0] < 0.5, arrivals
    assert arrivals[1] < 1.1, arrivals
    assert arrivals[3] - arrivals[0] > 1.4, arrivals


def ws_frame(opcode: int, payload: bytes) -> bytes:
    """A masked client frame (RFC 6455)."""
    mask = os.urandom(4)
    length = len(payload)
    if length < 126:
        header = struct.pack("!BB", 0x80 | opcode, 0x80 | length)
    elif length < 65536:
        header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, length)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return header + mask + masked


def read_exact(sock: socket.socket, count: int, buffer: bytearray) -> bytes:
    while len(buffer) < count:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        buffer += chunk
    out = bytes(buffer[:count])
    del buffer[:count]
    return out


def ws_read(sock: socket.socket, buffer: bytearray) -> tuple[int, bytes]:
    first, second = read_exact(sock, 2, buffer)
    length = second & 0x7F
    if length == 126:
        (length,) = struct.unpack("!H", read_exact(sock, 2, buffer))
    elif length == 127:
        (length,) = struct.unpack("!Q", read_exact(sock, 8, buffer))
    return first & 0x0F, read_exact(sock, length, buffer)


def test_websocket_round_trip(proxy: StalrouteProcess) -> None:
    key = base64.b64encode(os.urandom(16)).decode()
    sock = socket.create_connection(proxy.listener("web"), timeout=10)
    with sock:
        sock.sendall((f"GET /tw/jmap/ws HTTP/1.1\r\nHost: mail.example.org\r\n"
                      f"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
                      f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Protocol: jmap\r\n\r\n")
                     .encode())
        buffer = bytearray()
        while b"\r\n\r\n" not in buffer:
            buffer += sock.recv(4096)
        head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
        buffer = bytearray(rest)
        assert head.startswith(b"HTTP/1.1 101"), head
        accept = base64.b64encode(hashlib.sha1(
            (key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest())
        assert b"Sec-WebSocket-Accept: " + accept in head
        assert re.search(rb"(?i)sec-websocket-protocol: jmap", head)
        message = json.dumps({"@type": "Request", "using": ["urn:ietf:params:jmap:core"]})
        sock.sendall(ws_frame(0x1, message.encode()))
        assert ws_read(sock, buffer) == (0x1, message.encode())
        blob = os.urandom(200_000)
        sock.sendall(ws_frame(0x2, blob))
        assert ws_read(sock, buffer) == (0x2, blob)
        sock.sendall(ws_frame(0x8, struct.pack("!H", 1000)))
        opcode, _ = ws_read(sock, buffer)
        assert opcode == 0x8


# --- client address -------------------------------------------------------------------------------------

SPOOF = ["-H", "X-Forwarded-For: 6.6.6.6", "-H", "Forwarded: for=6.6.6.6"]


def test_forwarded_headers_per_listener_and_destination(proxy: StalrouteProcess,
                                                        curl_binary: str) -> None:
    host, port = proxy.listener("web")
    off = served_by("--interface", CLIENT_IP, "-u", "bob:pw", *SPOOF, url(proxy, "/jmap/f"))
    assert off["node"] == "node2"
    assert off["xff"] == CLIENT_IP  # the spoofed hop was stripped, the real one appended
    assert off["forwarded"] == f'for={CLIENT_IP};host="{host}:{port}";proto=http'
    assert off["proto"] == "http"
    trusting = served_by("--interface", CLIENT_IP, "-u", "bob:pw", *SPOOF,
                         url(proxy, "/jmap/f", "trusting"))
    assert trusting["xff"] == f"6.6.6.6, {CLIENT_IP}"
    assert trusting["forwarded"].startswith(f"for=6.6.6.6, for={CLIENT_IP};")


def test_proxy_v2_carries_the_client_to_node1(proxy: StalrouteProcess, curl_binary: str,
                                              nginx_pair: NginxPair) -> None:
    since = nginx_pair.node1.log.size()
    answer = served_by("--interface", CLIENT_IP, "-u", "alice:pw", *SPOOF,
                       url(proxy, "/jmap/pp"))
    assert (answer["node"], answer["pp"]) == ("node1", CLIENT_IP)
    assert answer["xff"] == "" and answer["forwarded"] == ""  # node1 does not append; off strips
    nginx_pair.node1.wait_for_log(rf"pp={re.escape(CLIENT_IP)} \"GET /jmap/pp ", since=since)


def test_implicit_tls_listener(proxy: StalrouteProcess, curl_binary: str,
                               pki: CertificateAuthority) -> None:
    tls = ["--cacert", str(pki.cert_path)]
    assert served_by(*tls, "-u", "alice:pw", url(proxy, "/jmap/s", "webs"))["pp"] == LOOPBACK
    answer = served_by(*tls, "-u", "bob:pw", url(proxy, "/jmap/s", "webs"))
    assert (answer["node"], answer["proto"]) == ("node2", "https")
    assert answer["forwarded"].endswith("proto=https")


# --- health, errors, limits ----------------------------------------------------------------------------


def test_health_endpoints(proxy: StalrouteProcess, curl_binary: str,
                          pki: CertificateAuthority) -> None:
    live = curl("-i", url(proxy, "/healthz/live"))
    assert live.stdout.startswith(b"HTTP/1.1 200")
    assert json.loads(live.stdout.partition(b"\r\n\r\n")[2]) == {"status": "live"}
    for ready in (curl("-i", url(proxy, "/healthz/ready")),
                  curl("-i", "--cacert", str(pki.cert_path), url(proxy, "/healthz/ready/", "webs"))):
        assert ready.stdout.startswith(b"HTTP/1.1 200")
        assert json.loads(ready.stdout.partition(b"\r\n\r\n")[2])["status"] == "ready"
    refused = curl("-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST",
                   url(proxy, "/healthz/live"))
    assert refused.stdout == b"405"


def test_unreachable_backend_is_502_and_the_connection_lives_on(proxy: StalrouteProcess,
                                                                curl_binary: str) -> None:
    result = curl("-w", "|%{http_code}|%{num_connects}\n", url(proxy, "/down/x"), "--next",
                  "-u", "bob:pw", "-w", "|%{http_code}|%{num_connects}\n", url(proxy, "/jmap/y"))
    error, first, answer, second = result.stdout.decode().splitlines()  # body, write-out
    assert first == "|502|1"
    assert "down" in json.loads(error)["error"]
    assert parse_answer(answer)["node"] == "node2"
    assert second == "|200|0"  # same client connection, next request served


def test_backend_dying_mid_body_ends_the_client_connection(proxy: StalrouteProcess,
                                                           curl_binary: str) -> None:
    died = curl("-o", "-", url(proxy, "/tw/die"), check=False)
    assert died.returncode == 18, died  # curl: partial file (transfer closed early)
    assert len(died.stdout) == 10000
    early = curl("-o", "/dev/null", "-w", "%{http_code}", url(proxy, "/tw/die-early"))
    assert early.stdout == b"502"
    assert proxy.running
    assert served_by("-u", "bob:pw", url(proxy, "/jmap/after"))["node"] == "node2"


def test_a_client_vanishing_mid_upload_leaves_the_proxy_serving(
        proxy: StalrouteProcess, nginx_pair: NginxPair, curl_binary: str) -> None:
    name = f"gone-{uuid.uuid4().hex}.bin"
    sock = socket.create_connection(proxy.listener("web"), timeout=5)
    auth = base64.b64encode(b"bob:pw").decode()
    sock.sendall(f"PUT /dav/{name} HTTP/1.1\r\nHost: h\r\nContent-Length: 100000000\r\n"
                 f"Authorization: Basic {auth}\r\n\r\n".encode())
    for _ in range(16):
        sock.sendall(os.urandom(65536))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # RST, mid-body
    time.sleep(0.5)
    assert proxy.running
    assert not nginx_pair.node2.dav_path(name).exists()
    assert served_by("-u", "bob:pw", url(proxy, "/jmap/still-here"))["node"] == "node2"


#: Each attempt hides a second request, ``/jmap/smuggled-<n>b``, that a backend must never
#: see; attempts refused at the head also never show their own ``/jmap/smuggled-<n>``.
SMUGGLED = b"GET /jmap/smuggled-{n}b HTTP/1.1\r\nHost: h\r\n\r\n"
SMUGGLING = {
    "content-length and transfer-encoding":
        b"POST /jmap/smuggled-{n} HTTP/1.1\r\nHost: h\r\nContent-Length: 6\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "conflicting content-length":
        b"POST /jmap/smuggled-{n} HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n"
        b"Content-Length: 44\r\n\r\n" + SMUGGLED,
    "obs-fold":
        b"POST /jmap/smuggled-{n} HTTP/1.1\r\nHost: h\r\nX-A: 1\r\n Transfer-Encoding: chunked\r\n"
        b"Content-Length: 44\r\n\r\n" + SMUGGLED,
    "bare LF":
        b"POST /jmap/smuggled-{n} HTTP/1.1\nHost: h\nContent-Length: 44\n\n" + SMUGGLED,
    "bare CR":
        b"POST /jmap/smuggled-{n} HTTP/1.1\r\nHost: h\rTransfer-Encoding: chunked\r\n"
        b"Content-Length: 44\r\n\r\n" + SMUGGLED,
    "space before colon":
        b"POST /jmap/smuggled-{n} HTTP/1.1\r\nHost: h\r\nTransfer-Encoding : chunked\r\n"
        b"Content-Length: 44\r\n\r\n" + SMUGGLED,
    "obfuscated transfer-encoding":
        b"POST /jmap/smuggled-{n} HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: xchunked\r\n"
        b"\r\n0\r\n\r\n" + SMUGGLED,
    "two transfer-encodings":
        b"POST /jmap/smuggled-{n} HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n"
        b"Transfer-Encoding: identity\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "bad chunk size":  # a valid head, a broken body: the stream ends there
        b"POST /jmap/smuggled-{n} HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"zz\r\n" + SMUGGLED,
}


@pytest.mark.parametrize("attempt", list(SMUGGLING), ids=list(SMUGGLING))
def test_smuggling_attempts_are_answered_400(proxy: StalrouteProcess, nginx_pair: NginxPair,
                                             attempt: str) -> None:
    n = str(list(SMUGGLING).index(attempt) + 1).encode()
    response = raw_exchange(proxy, SMUGGLING[attempt].replace(b"{n}", n))
    assert response.startswith(b"HTTP/1.1 400 "), response[:200]
    assert b"Connection: close" in response
    assert response.count(b"HTTP/1.1 ") == 1  # nothing else was answered on that stream
    time.sleep(0.2)
    for node in nginx_pair:
        log = node.log.text()
        assert f"/jmap/smuggled-{n.decode()}b " not in log
        if attempt != "bad chunk size":
            assert f"/jmap/smuggled-{n.decode()} " not in log


def test_oversized_head_is_431(proxy: StalrouteProcess) -> None:
    response = raw_exchange(proxy, b"GET /jmap/x HTTP/1.1\r\nHost: h\r\nX-Big: "
                            + b"a" * (70 * 1024) + b"\r\n\r\n")
    assert response.startswith(b"HTTP/1.1 431 ")


def test_max_keepalive_requests(proxy: StalrouteProcess) -> None:
    conn = http.client.HTTPConnection(*proxy.listener("web"), timeout=10)
    try:
        answers = []
        for index in range(MAX_KEEPALIVE_REQUESTS):
            conn.request("GET", f"/jmap/k{index}")
            response = conn.getresponse()
            answers.append((response.getheader("connection"), response.read()))
        assert all(header is None for header, _ in answers[:-1])
        assert answers[-1][0] == "close"
        assert conn.sock is None  # http.client saw the close
    finally:
        conn.close()


def test_idle_limits_before_and_between_requests(proxy: StalrouteProcess) -> None:
    silent = socket.create_connection(proxy.listener("web"))
    served = socket.create_connection(proxy.listener("web"))
    try:
        served.sendall(b"GET /jmap/idle HTTP/1.1\r\nHost: h\r\n\r\n")
        started = time.monotonic()
        assert closed_within(silent, PREAUTH_TIMEOUT + 3)
        assert time.monotonic() - started >= PREAUTH_TIMEOUT - 0.5
        assert closed_within(served, KEEPALIVE_TIMEOUT + 3)
        assert time.monotonic() - started >= KEEPALIVE_TIMEOUT - 0.5
    finally:
        silent.close()
        served.close()


def held_connection(proxy: StalrouteProcess, listener: str) -> socket.socket:
    """A keep-alive connection that has been served once (so it certainly holds a slot)."""
    sock = socket.create_connection(proxy.listener(listener), timeout=5)
    sock.sendall(b"GET /healthz/live HTTP/1.1\r\nHost: h\r\n\r\n")
    received = b""
    while not received.endswith(b"}\n"):
        chunk = sock.recv(4096)
        assert chunk, "closed before answering"
        received += chunk
    assert received.startswith(b"HTTP/1.1 200 ")
    return sock


def test_connection_slots_are_released(proxy: StalrouteProcess, curl_binary: str) -> None:
    for _ in range(20):  # connect-and-close probes
        socket.create_connection(proxy.listener("tight")).close()
    time.sleep(0.3)
    held = [held_connection(proxy, "tight") for _ in range(3)]  # max_connections = 3
    try:
        extra = socket.create_connection(proxy.listener("tight"))
        assert closed_within(extra, 3), "a fourth connection was accepted"
        extra.close()
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.3)
    for _ in range(3):
        assert served_by("-u", "bob:pw", url(proxy, "/jmap/slot", "tight"))["node"] == "node2"


def test_one_log_line_per_request_with_the_account_redacted(proxy: StalrouteProcess,
                                                            curl_binary: str) -> None:
    since = proxy.log.size()
    marker = uuid.uuid4().hex
    served_by("-u", "carol@example.org:Sekr3t", url(proxy, f"/jmap/{marker}?token=hidden"))
    line = proxy.log.wait_for(rf"http GET /jmap/{marker} status=200 .*", since=since).group(0)
    assert "destination=node2" in line and "account=car…#" in line
    text = proxy.log_text(since)
    assert "carol@example.org" not in text and "Sekr3t" not in text and "hidden" not in text


def test_readiness_follows_the_default_destination_and_drain_is_prompt(
        stalroute: Any, proxy_certificate: IssuedCertificate, pki: CertificateAuthority,
        nginx_pair: NginxPair, tw_backend: TwistedBackend, curl_binary: str) -> None:
    """``/healthz/ready`` turns 503 while the default destination's circuit is open; on SIGTERM
    idle keep-alive connections are closed at once instead of holding the drain."""
    config = http_proxy_config(proxy_certificate, nginx_pair, tw_backend, pki.cert_path)
    config["server"].update(host_down_threshold=1, shutdown_grace="20s")
    config["routing"]["default_destination"] = "down"
    proxy = stalroute(config)
    assert json.loads(curl(url(proxy, "/healthz/ready")).stdout)["status"] == "ready"
    assert curl("-o", "/dev/null", "-w", "%{http_code}", url(proxy, "/jmap/x")).stdout == b"502"
    not_ready = curl("-i", url(proxy, "/healthz/ready")).stdout
    assert not_ready.startswith(b"HTTP/1.1 503 ")
    assert "default destination down is marked down" in \
        json.loads(not_ready.partition(b"\r\n\r\n")[2])["reasons"]
    idle = held_connection(proxy, "web")
    started = time.monotonic()
    proxy.stop()
    assert time.monotonic() - started < 5
    assert closed_within(idle, 1)
    idle.close()
