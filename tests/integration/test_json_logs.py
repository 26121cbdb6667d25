"""``server.log_format = "json"`` (SPEC §2.1, §10) on the real process under twistd: every line
of its log is a JSON object, and the session end line carries the session's fields."""

from __future__ import annotations

import json
import re

import pytest

from stalroute.identity import redact
from tests.conftest import DovecotPair, StalrouteFactory
from tests.harness.clients import SourceIMAP4_SSL
from tests.harness.pki import CertificateAuthority, IssuedCertificate
from tests.harness.stalroute import two_node_imap_config

pytestmark = pytest.mark.integration

CLIENT_IP = "127.0.0.7"


def test_json_log_lines_carry_the_session_fields(
    stalroute: StalrouteFactory,
    pki: CertificateAuthority,
    proxy_certificate: IssuedCertificate,
    dovecot_pair: DovecotPair,
    users: dict[str, str],
) -> None:
    config = two_node_imap_config(proxy_certificate, pki.cert_path, *dovecot_pair)
    config["server"]["log_format"] = "json"
    proxy = stalroute(config)
    host, port = proxy.listener("imaps")

    with SourceIMAP4_SSL(host, port, ssl_context=pki.client_context(),
                         server_hostname="localhost", source=CLIENT_IP) as client:
        client.login("alice", users["alice"])
        client.logout()
    proxy.log.wait_for(r'"bytes_out":')  # the session end line

    text = proxy.log_text()
    lines = [json.loads(line) for line in text.splitlines()]
    assert all({"time", "level", "namespace", "event"} <= line.keys() for line in lines)
    assert any(line["event"].startswith("twistd ") for line in lines)  # twistd's own lines too
    (end,) = [line for line in lines if "bytes_out" in line]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", end["time"])
    assert (end["level"], end["namespace"], end["listener"], end["protocol"],
            end["destination"]) == ("info", "stalroute.session", "imaps", "imap", "node1")
    assert end["client"].startswith(f"{CLIENT_IP}:")
    assert end["account"] == redact("alice")
    # a client that closes with stalroute's close_notify still unread resets the connection
    assert end["outcome"] in ("client_closed", "backend_closed", "client_error")
    assert end["session"] and end["event"].startswith(f"session {end['session']} imap ")
    assert end["bytes_in"] > 0 and end["bytes_out"] > 0
    assert "alice" not in text and users["alice"] not in text
