"""Circuit breaker, auth-failure bans and per-IP counters, on a fake clock."""

from __future__ import annotations

import ipaddress

from twisted.internet.task import Clock

from stalroute.circuit import CircuitBreaker
from stalroute.config import SecurityConfig
from stalroute.limits import BanList, PerIPCounter


def breaker(clock: Clock, threshold: int = 3, min_clients: int = 2) -> CircuitBreaker:
    return CircuitBreaker(clock, threshold=threshold, min_clients=min_clients, cooldown=30)


def test_connect_failures_open_the_circuit_then_one_probe_after_cooldown() -> None:
    clock = Clock()
    circuit = breaker(clock)
    for _ in range(3):
        assert circuit.allow()
        circuit.failed("192.0.2.1", connect_stage=True)
    assert circuit.state == "open" and not circuit.allow()
    clock.advance(30)
    assert circuit.state == "half_open"
    assert circuit.allow()
    assert not circuit.allow()  # only one probe at a time
    circuit.succeeded()
    assert circuit.state == "closed" and circuit.allow()
    assert circuit.trips == 1


def test_a_failed_probe_reopens_for_another_cooldown() -> None:
    clock = Clock()
    circuit = breaker(clock, threshold=1)
    circuit.failed("192.0.2.1", connect_stage=True)
    clock.advance(30)
    assert circuit.allow()
    circuit.failed("192.0.2.1", connect_stage=False)
    assert circuit.state == "open"
    clock.advance(29)
    assert not circuit.allow()


def test_post_connect_failures_of_one_client_never_open_the_circuit() -> None:
    circuit = breaker(Clock())
    for _ in range(100):
        circuit.failed("192.0.2.66", connect_stage=False)
    assert circuit.state == "closed"
    circuit.failed("192.0.2.67", connect_stage=False)
    circuit.failed("192.0.2.66", connect_stage=False)
    circuit.failed("192.0.2.67", connect_stage=False)
    assert circuit.state == "open"


def test_threshold_zero_turns_the_breaker_off() -> None:
    circuit = breaker(Clock(), threshold=0)
    for _ in range(50):
        circuit.failed("192.0.2.1", connect_stage=True)
    assert circuit.allow()


def security(**overrides) -> SecurityConfig:
    settings = {"auth_fail_ban_threshold": 3, "auth_fail_ban_window": 60.0,
                "ban_duration": 120.0,
                "allowed_ips": (ipaddress.ip_network("198.51.100.0/24"),)}
    settings.update(overrides)
    return SecurityConfig(**settings)


def test_refused_logins_within_the_window_ban_the_ip_for_the_duration() -> None:
    clock = Clock()
    bans = BanList(clock, security())
    for _ in range(2):
        bans.login_refused("192.0.2.5")
    clock.advance(61)  # the first two fell out of the window
    bans.login_refused("192.0.2.5")
    assert not bans.is_banned("192.0.2.5")
    bans.login_refused("192.0.2.5")
    bans.login_refused("192.0.2.5")
    assert bans.is_banned("192.0.2.5") and not bans.is_banned("192.0.2.6")
    clock.advance(120)
    assert not bans.is_banned("192.0.2.5")


def test_allowed_ips_and_a_zero_threshold_never_ban() -> None:
    clock = Clock()
    allowed, off = BanList(clock, security()), BanList(clock, security(auth_fail_ban_threshold=0))
    for _ in range(10):
        allowed.login_refused("198.51.100.7")
        off.login_refused("192.0.2.5")
    assert not allowed.is_banned("198.51.100.7") and not off.is_banned("192.0.2.5")


def test_per_ip_counter_limits_and_releases() -> None:
    counter = PerIPCounter()
    assert counter.take("192.0.2.1", 2) and counter.take("192.0.2.1", 2)
    assert not counter.take("192.0.2.1", 2)
    counter.release("192.0.2.1")
    assert counter.take("192.0.2.1", 2)
