"""The composition root (issue 12): the twistd plugin runs the admin API and the proxy as one
MultiService; a port that cannot be bound stops startup with one line and exit status 1; a
stop closes the admin port at the moment the proxy's drain begins.

The services are built from a TOML file on a Clock (or the global reactor, for the plugin),
without binding a socket.
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.plugins.stalroute_plugin import Options, serviceMaker

from stalroute.admin.server import AdminService
from stalroute.config import load_config
from stalroute.control import Control
from stalroute.service import ProxyService
from tests.harness.stalroute import dump_toml
from tests.unit.test_hardening_admin import two_listener_document


def write_config(tmp_path: Path, admin: bool = True) -> Path:
    document = two_listener_document(tmp_path)
    if not admin:
        del document["admin"]
    path = tmp_path / "stalroute.toml"
    path.write_text(dump_toml(document))
    return path


def plugin_service(path: Path) -> MultiService:
    options = Options()
    options.parseOptions(["--config", str(path)])
    options.parent = {}  # twistd's own options: text logs need none of them
    built = serviceMaker.makeService(options)
    assert isinstance(built, MultiService)
    return built


@pytest.fixture
def events():
    captured: list[dict] = []
    globalLogPublisher.addObserver(captured.append)
    yield captured
    globalLogPublisher.removeObserver(captured.append)


def test_the_plugin_runs_the_admin_api_before_the_proxy(tmp_path: Path) -> None:
    services = list(plugin_service(write_config(tmp_path)))
    assert [type(service) for service in services] == [AdminService, ProxyService]


def test_without_an_admin_section_the_plugin_runs_the_proxy_alone(tmp_path: Path) -> None:
    services = list(plugin_service(write_config(tmp_path, admin=False)))
    assert [type(service) for service in services] == [ProxyService]


class _TakenPorts(Clock):
    """A reactor on which every port is already in use."""

    def listenSSL(self, port, factory, context_factory, backlog=50, interface=""):
        raise CannotListenError(interface, port, OSError(errno.EADDRINUSE, "in use"))


def test_an_admin_port_in_use_stops_startup_with_one_line(tmp_path: Path, events) -> None:
    config = load_config(write_config(tmp_path), env={})
    proxy = ProxyService(Clock(), config)
    admin = AdminService(_TakenPorts(), Control(proxy), config.admin)
    with pytest.raises(SystemExit) as stopped:
        admin.startService()
    assert stopped.value.code == 1
    critical = [formatEvent(event) for event in events
                if event.get("log_level") is LogLevel.critical]
    assert critical == ["admin: cannot bind 127.0.0.1:0: address already in use"]


class _Port:
    def __init__(self) -> None:
        self.listening = True

    def stopListening(self) -> Deferred[None]:
        self.listening = False
        return succeed(None)


def test_the_admin_port_closes_when_the_drain_begins(tmp_path: Path) -> None:
    clock = Clock()
    config = load_config(write_config(tmp_path), env={})
    proxy = ProxyService(clock, config)
    admin = AdminService(clock, Control(proxy), config.admin)
    root = MultiService()
    admin.setServiceParent(root)
    proxy.setServiceParent(root)
    admin._port = port = _Port()  # type: ignore[assignment]
    stopped = root.stopService()
    assert proxy.runtime.registry.draining and not port.listening
    assert stopped.called  # no session to wait for
