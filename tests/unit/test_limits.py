"""Circuit breaker, auth-failure bans, per-IP counters and login delays, on a fake clock."""

from __future__ import annotations

import ipaddress

from twisted.internet.task import Clock

from stalroute.circuit import CircuitBreaker
from stalroute.config import SecurityConfig
from stalroute.limits import MAX_TRACKED, BanList, ExpiringTable, LoginDelays, PerIPCounter


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


def addresses(count: int, first: int = 0) -> list[str]:
    return [f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}" for n in range(first, first + count)]


def test_failure_histories_are_bounded_and_leave_after_the_window() -> None:
    # 120,000 addresses, one refused login each: at most MAX_TRACKED are remembered, and
    # none once the window has passed (they used to stay for good).
    clock = Clock()
    bans = BanList(clock, security())
    for ip in addresses(120_000):
        clock.advance(0.0001)
        bans.login_refused(ip)
    assert len(bans._failures) == MAX_TRACKED
    clock.advance(54.00005)  # the 60 s window now starts after the first 60,000 failures
    assert len(bans._failures) == 60_000
    clock.advance(6)
    assert not bans.is_banned("192.0.2.1")
    assert len(bans._failures) == 0


def stored(table: ExpiringTable) -> int:
    """Entries a table keeps in memory, expired or not (``len()`` would sweep first)."""
    return len(table._entries)


def test_expired_histories_and_bans_leave_on_connections_alone() -> None:
    # A flood of failing addresses (some banned), then the window and the bans pass and only
    # connections arrive: everything stored must leave without another refused login. (The
    # failure histories used to stay until the next refused login, a day later as well.)
    clock = Clock()
    bans = BanList(clock, security())
    for ip in addresses(10_000):
        bans.login_refused(ip)
    for ip in addresses(500, first=20_000):
        for _ in range(3):
            bans.login_refused(ip)
    assert (stored(bans._failures), stored(bans._banned)) == (10_000, 500)
    clock.advance(121)  # past both the 60 s window and the 120 s bans
    for ip in addresses(10_000, first=50_000):
        assert not bans.is_banned(ip)
    assert (stored(bans._failures), stored(bans._banned)) == (0, 0)


def test_one_call_sweeps_a_bounded_number_of_expired_entries() -> None:
    # The sweep is amortised: no single connection pays for the whole expired flood.
    clock = Clock()
    bans = BanList(clock, security())
    for ip in addresses(10_000):
        bans.login_refused(ip)
    clock.advance(61)
    assert not bans.is_banned("192.0.2.1")
    assert 9_000 < stored(bans._failures) < 10_000


def test_bans_leave_after_their_duration() -> None:
    clock = Clock()
    bans = BanList(clock, security(auth_fail_ban_threshold=1))
    for ip in addresses(1_000):
        bans.login_refused(ip)
    assert len(bans._banned) == 1_000 and len(bans._failures) == 0
    clock.advance(119)
    assert bans.is_banned("10.0.0.0")
    clock.advance(1)
    assert len(bans._banned) == 0


def test_a_recent_offender_stays_banned_through_a_flood_of_addresses() -> None:
    clock = Clock()
    bans = BanList(clock, security(), max_tracked=1_000)
    for _ in range(3):
        bans.login_refused("192.0.2.66")
    # Ten times the bound in failing addresses, then in banned ones: the oldest are forgotten.
    for ip in addresses(10_000):
        bans.login_refused(ip)
    assert bans.is_banned("192.0.2.66")
    assert len(bans._failures) == 1_000
    for ip in addresses(2_000, first=20_000):
        for _ in range(3):
            bans.login_refused(ip)
    assert len(bans._banned) == 1_000
    assert not bans.is_banned("192.0.2.66")  # the oldest ban made room
    assert bans.is_banned(addresses(1, first=21_999)[0])
    # A failure history cut by the bound starts afresh; banning still works.
    bans.login_refused("10.0.0.1")
    bans.login_refused("10.0.0.1")
    assert not bans.is_banned("10.0.0.1")
    bans.login_refused("10.0.0.1")
    assert bans.is_banned("10.0.0.1")


def test_expiring_table_keeps_the_most_recently_written() -> None:
    clock = Clock()
    table: ExpiringTable[str] = ExpiringTable(clock, limit=3)
    for key in "abcd":
        table.put(key, key.upper(), expires=10)
    assert [table.get(key) for key in "abcd"] == [None, "B", "C", "D"]
    table.put("b", "B2", expires=20)  # rewritten: now the newest
    table.put("e", "E", expires=20)
    assert [table.get(key) for key in "bcde"] == ["B2", None, "D", "E"]
    clock.advance(10)
    assert len(table) == 2 and table.get("d") is None
    table.discard("b")
    clock.advance(10)
    assert len(table) == 0


def test_login_delays_forget_expired_holds() -> None:
    clock = Clock()
    delays = LoginDelays(clock)
    for n in range(100):
        delays.delay(f"user{n}", 30)
    clock.advance(31)
    delays.delay("alice", 60)
    assert delays._until.keys() == {"alice"}
    assert delays.remaining("alice") == 60
