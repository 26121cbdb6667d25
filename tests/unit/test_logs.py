"""Tests of ``server.log_format = "json"``: the JSON line observer and its twistd wiring."""

from __future__ import annotations

import io
import json
import re
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
from twisted.application import service
from twisted.logger import ILogObserver, Logger, globalLogPublisher
from twisted.python import log as legacy_log
from twisted.python.logfile import LogFile

from stalroute.config import ConfigError, parse_config
from stalroute.identity import redact
from stalroute.logs import (
    LoggingApplicationService, event_as_json, json_file_observer, twistd_log_file,
)
from stalroute.service import settings_needing_restart

RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def logged(namespace: str = "stalroute.session") -> tuple[Logger, list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []
    return Logger(namespace=namespace, observer=events.append), events


def as_json(event: dict[str, Any]) -> dict[str, Any]:
    line = event_as_json(event)
    assert line.endswith("\n") and "\n" not in line[:-1]
    assert line.isascii()
    return json.loads(line)


class Secretive:
    """An object logged by mistake: its attributes must never reach a log line."""

    password = "hunter2-attribute"

    def __str__(self) -> str:
        return "<secretive>"


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no text")


# --- the line --------------------------------------------------------------------------------


def test_session_end_event_carries_its_context_as_fields() -> None:
    log, events = logged()
    log.info("session {session} {protocol} client={client} account={account} "
             "destination={destination} outcome={outcome} in={bytes_in} out={bytes_out} "
             "duration={duration:.3f}s", session="s-1", listener="imaps", protocol="imap",
             client="127.0.0.5:40000", account=redact("alice@example.com"),
             destination="node1", outcome="client_closed", bytes_in=10, bytes_out=20,
             duration=1.5)

    line = as_json(events[0])

    assert RFC3339_UTC.match(line["time"])
    assert line["level"] == "info"
    assert line["namespace"] == "stalroute.session"
    assert line["event"].startswith("session s-1 imap client=127.0.0.5:40000 account=ali…#")
    assert {k: line[k] for k in ("session", "listener", "protocol", "client", "destination",
                                 "outcome", "bytes_in", "bytes_out", "duration")} == {
        "session": "s-1", "listener": "imaps", "protocol": "imap", "client": "127.0.0.5:40000",
        "destination": "node1", "outcome": "client_closed", "bytes_in": 10, "bytes_out": 20,
        "duration": 1.5}
    assert line["account"] == redact("alice@example.com")
    assert "alice@example.com" not in event_as_json(events[0])


def test_time_is_utc() -> None:
    log, events = logged()
    log.info("x")
    events[0]["log_time"] = 0.25

    assert as_json(events[0])["time"] == "1970-01-01T00:00:00.250Z"


def test_only_known_keys_are_lifted_and_as_text() -> None:
    log, events = logged()
    log.warn("odd {destination}", destination=Secretive(), credentials=Secretive(),
             password="hunter2-kwarg", outcome=Unprintable(), duration=float("nan"))

    line = as_json(events[0])
    text = event_as_json(events[0])

    assert line["level"] == "warn"
    assert line["destination"] == "<secretive>"
    assert line["duration"] == "nan"
    assert "Unprintable" in line["outcome"]  # safe_str's stand-in, not an exception
    assert "credentials" not in line and "password" not in line
    assert "hunter2" not in text


def test_foreign_events_keep_their_keys_to_themselves() -> None:
    log, events = logged("twisted.internet.tcp")
    log.info("{protocol} starting", protocol=Secretive())

    line = as_json(events[0])

    assert line["event"] == "<secretive> starting"
    assert "protocol" not in line


def test_failure_is_a_traceback_string_without_frame_locals() -> None:
    log, events = logged()

    def login() -> None:
        password = "hunter2-local"  # noqa: F841 - must not be logged
        raise ValueError("backend said no")

    try:
        login()
    except ValueError:
        log.failure("session {session}: unexpected error during login", session="s-2")

    line = as_json(events[0])

    assert line["level"] == "critical"
    assert line["session"] == "s-2"
    assert "Traceback" in line["traceback"] and "ValueError: backend said no" in line["traceback"]
    assert "hunter2" not in event_as_json(events[0])


def test_legacy_log_events() -> None:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        legacy_log.msg("Starting factory", system="SessionFactory")
    finally:
        globalLogPublisher.removeObserver(events.append)

    line = as_json(events[-1])

    assert (line["event"], line["level"], line["system"]) == (
        "Starting factory", "info", "SessionFactory")


def test_file_observer_writes_one_line_per_event() -> None:
    out = io.StringIO()
    log = Logger(namespace="stalroute.service", observer=json_file_observer(out))
    log.info("one")
    log.error("two {listener}", listener="imaps")

    lines = [json.loads(text) for text in out.getvalue().splitlines()]

    assert [(x["event"], x["level"]) for x in lines] == [("one", "info"), ("two imaps", "error")]
    assert lines[1]["listener"] == "imaps"


# --- configuration ---------------------------------------------------------------------------


def document(**server: Any) -> dict[str, Any]:
    return {
        "server": server,
        "routing": {"default_destination": "main"},
        "mapping": {"source": "file", "file": {"path": "mappings.tsv"}},
        "destination": {"main": {"host": "backend.example.com",
                                 "protocol": {"imap": {"port": 993, "tls": "implicit"}}}},
        "listener": {"imap": {"protocol": "imap", "bind": ["127.0.0.1:1993"], "tls": "plain"}},
    }


@pytest.fixture
def base_dir(tmp_path: Path) -> Path:
    (tmp_path / "mappings.tsv").write_text("")
    return tmp_path


def test_log_format_defaults_to_text_and_accepts_json(base_dir: Path) -> None:
    assert parse_config(document(), base_dir, {}).server.log_format == "text"
    assert parse_config(document(log_format="json"), base_dir, {}).server.log_format == "json"


def test_unknown_log_format_names_its_key(base_dir: Path) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(document(log_format="xml"), base_dir, {})

    assert [str(p) for p in info.value.problems] == [
        'server.log_format: "xml" is not one of "text", "json"']


def test_changing_log_format_needs_a_restart(base_dir: Path) -> None:
    old = parse_config(document(), base_dir, {})
    new = parse_config(document(log_format="json"), base_dir, {})

    assert "server.log_format" in settings_needing_restart(old, new)


# --- twistd ----------------------------------------------------------------------------------


@pytest.mark.parametrize("options", [
    {"nodaemon": True, "logfile": "-"},
    {"nodaemon": True, "logfile": None},
])
def test_twistd_log_file_is_stdout_where_twistd_logs_there(options: dict[str, Any]) -> None:
    assert twistd_log_file(options) is sys.stdout


@pytest.mark.parametrize("options", [
    {"nodaemon": True, "syslog": True, "logfile": None},
    {"nodaemon": True, "logger": "my.observer", "logfile": "x.log"},
    {"nodaemon": False, "logfile": "-"},
])
def test_twistd_keeps_its_own_observer_elsewhere(options: dict[str, Any]) -> None:
    assert twistd_log_file(options) is None


def test_twistd_log_file_is_twistds_rotating_file(tmp_path: Path) -> None:
    previous = signal.getsignal(signal.SIGUSR1)
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    try:
        log_file = twistd_log_file({"nodaemon": True, "logfile": str(tmp_path / "s.log")})
        assert isinstance(log_file, LogFile)
        assert callable(signal.getsignal(signal.SIGUSR1))
        json_file_observer(log_file)({"log_format": "hi", "log_time": 1.0})
        log_file.close()
    finally:
        signal.signal(signal.SIGUSR1, previous)

    assert json.loads((tmp_path / "s.log").read_text())["event"] == "hi"


def test_application_gets_the_observer_when_twistd_parents_the_service() -> None:
    def observer(event: dict[str, Any]) -> None:
        pass

    inner = service.Service()
    application = service.Application("stalroute")

    LoggingApplicationService(inner, observer).setServiceParent(application)

    assert application.getComponent(ILogObserver) is observer
    assert inner.parent.parent is service.IServiceCollection(application)
