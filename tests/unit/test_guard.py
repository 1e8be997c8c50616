"""Unit tests of the per-address guard, the login outcome format and the process limits."""

from __future__ import annotations

import asyncio
import resource
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.config import Limits
from appliance.proxy import guard
from appliance.proxy.guard import (
    ClientGuard,
    MemoryReleaser,
    address_key,
    format_login_outcome,
    raise_open_files_limit,
)
from appliance.proxy.session import decode_login


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limits(**changes: Any) -> Limits:
    return Limits(**changes)


# Address keys


@pytest.mark.parametrize(
    ("host", "key"),
    [
        ("192.0.2.7", "192.0.2.7"),
        ("::ffff:192.0.2.7", "192.0.2.7"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("[2001:db8:1:2::9]", "2001:db8:1:2::/64"),
        ("fe80::1%eth0", "fe80::/64"),
        ("/run/appliance.sock", "/run/appliance.sock"),
    ],
)
def test_address_key_groups_addresses(host, key):
    assert address_key(host, 64) == key


def test_address_key_full_ipv6_length():
    assert address_key("2001:db8::1", 128) == "2001:db8::1/128"


# Open sessions per address


def test_try_open_stops_at_limit():
    client_guard = ClientGuard()
    rules = limits(max_connections_per_address=2)
    keys = [client_guard.try_open("192.0.2.7", rules) for _ in range(3)]
    assert keys[0] == "192.0.2.7"
    assert keys[1] == "192.0.2.7"
    assert keys[2] is None
    assert client_guard.open_sessions("192.0.2.7", rules) == 2


def test_close_frees_a_slot():
    client_guard = ClientGuard()
    rules = limits(max_connections_per_address=1)
    key = client_guard.try_open("192.0.2.7", rules)
    assert key is not None
    client_guard.close(key)
    assert client_guard.try_open("192.0.2.7", rules) == key


def test_limit_is_per_address():
    client_guard = ClientGuard()
    rules = limits(max_connections_per_address=1)
    assert client_guard.try_open("192.0.2.7", rules) is not None
    assert client_guard.try_open("192.0.2.8", rules) is not None


def test_ipv6_prefix_shares_limit():
    client_guard = ClientGuard()
    rules = limits(max_connections_per_address=1)
    assert client_guard.try_open("2001:db8::1", rules) is not None
    assert client_guard.try_open("2001:db8::2", rules) is None


def test_closed_addresses_forgotten():
    client_guard = ClientGuard()
    rules = limits()
    for number in range(100):
        key = client_guard.try_open(f"192.0.2.{number}", rules)
        assert key is not None
        client_guard.close(key)
    assert client_guard._open == {}


# Failed-login delay


def test_no_delay_without_failures():
    assert ClientGuard().login_delay("192.0.2.7", limits()) == 0


def test_delay_doubles_up_to_max():
    clock = FakeClock()
    client_guard = ClientGuard(clock=clock)
    rules = limits(auth_failure_delay=1, auth_failure_delay_max=5)
    delays = []
    for _ in range(5):
        client_guard.record_login("192.0.2.7", rules, succeeded=False)
        delays.append(client_guard.login_delay("192.0.2.7", rules))
        # The login waits its delay, and fails again.
        clock.now += delays[-1]
    assert delays == [1, 2, 4, 5, 5]


def test_parallel_logins_wait_in_turn():
    clock = FakeClock()
    client_guard = ClientGuard(clock=clock)
    rules = limits(auth_failure_delay=2, auth_failure_delay_max=15)
    client_guard.record_login("192.0.2.7", rules, succeeded=False)

    delays = [client_guard.login_delay("192.0.2.7", rules) for _ in range(4)]

    assert delays == [2, 4, 6, 8]
    assert client_guard.login_delay("192.0.2.8", rules) == 0


def test_released_turn_not_waited_for():
    clock = FakeClock()
    client_guard = ClientGuard(clock=clock)
    rules = limits(auth_failure_delay=2, auth_failure_delay_max=15)
    client_guard.record_login("192.0.2.7", rules, succeeded=False)

    gone = client_guard.reserve_login("192.0.2.7", rules)
    client_guard.release_login(gone)
    clock.now += 0.5

    assert gone.delay == 2
    assert client_guard.login_delay("192.0.2.7", rules) == 2


def test_released_turns_do_not_pile_up():
    """Clients that reserve a turn and leave, many at once, never push logins out."""
    clock = FakeClock()
    client_guard = ClientGuard(clock=clock)
    rules = limits(auth_failure_delay=2, auth_failure_delay_max=15)
    client_guard.record_login("192.0.2.7", rules, succeeded=False)

    for _ in range(100):
        turns = [client_guard.reserve_login("192.0.2.7", rules) for _ in range(5)]
        for turn in turns:
            client_guard.release_login(turn)

    assert client_guard.login_delay("192.0.2.7", rules) == 2


def test_release_keeps_later_turns():
    clock = FakeClock()
    client_guard = ClientGuard(clock=clock)
    rules = limits(auth_failure_delay=2, auth_failure_delay_max=15)
    client_guard.record_login("192.0.2.7", rules, succeeded=False)

    first = client_guard.reserve_login("192.0.2.7", rules)
    second = client_guard.reserve_login("192.0.2.7", rules)
    client_guard.release_login(first)

    assert second.delay == 4
    # The next login starts one delay after the turn still held.
    assert client_guard.login_delay("192.0.2.7", rules) == 6


def test_release_after_reset_is_ignored():
    client_guard = ClientGuard(clock=FakeClock())
    rules = limits(auth_failure_delay=2, auth_failure_delay_max=15)
    client_guard.record_login("192.0.2.7", rules, succeeded=False)
    turn = client_guard.reserve_login("192.0.2.7", rules)
    client_guard.record_login("192.0.2.7", rules, succeeded=True)

    client_guard.release_login(turn)

    assert client_guard.login_delay("192.0.2.7", rules) == 0


def test_success_resets_delay():
    client_guard = ClientGuard()
    rules = limits()
    for _ in range(3):
        client_guard.record_login("192.0.2.7", rules, succeeded=False)
    client_guard.record_login("192.0.2.7", rules, succeeded=True)
    assert client_guard.login_delay("192.0.2.7", rules) == 0


def test_delay_is_per_address():
    client_guard = ClientGuard()
    rules = limits()
    client_guard.record_login("192.0.2.7", rules, succeeded=False)
    assert client_guard.login_delay("192.0.2.8", rules) == 0


def test_zero_delay_turns_it_off():
    client_guard = ClientGuard()
    rules = limits(auth_failure_delay=0)
    client_guard.record_login("192.0.2.7", rules, succeeded=False)
    assert client_guard.login_delay("192.0.2.7", rules) == 0


def test_failures_expire():
    clock = FakeClock()
    client_guard = ClientGuard(clock=clock)
    rules = limits(auth_failure_reset_after=60)
    client_guard.record_login("192.0.2.7", rules, succeeded=False)
    clock.now += 61
    assert client_guard.login_delay("192.0.2.7", rules) == 0
    assert client_guard.failure_records == 0


def test_failure_records_bounded():
    client_guard = ClientGuard(max_failure_records=10)
    rules = limits()
    for number in range(50):
        client_guard.record_login(f"192.0.2.{number}", rules, succeeded=False)
    assert client_guard.failure_records == 10
    assert client_guard.login_delay("192.0.2.49", rules) == 1
    assert client_guard.login_delay("192.0.2.0", rules) == 0


def test_many_failures_stay_capped():
    client_guard = ClientGuard()
    rules = limits(auth_failure_delay_max=30)
    for _ in range(200):
        client_guard.record_login("192.0.2.7", rules, succeeded=False)
    assert client_guard.login_delay("192.0.2.7", rules) == 30


def test_delay_larger_than_max_invalid():
    with pytest.raises(ValueError, match="auth_failure_delay"):
        Limits(auth_failure_delay=20, auth_failure_delay_max=10)


# Memory release after a burst


def test_drained_called_at_half_of_peak():
    calls = []
    client_guard = ClientGuard(on_drained=lambda: calls.append(1))
    rules = limits(max_connections_per_address=1000)
    keys = [client_guard.try_open("192.0.2.7", rules) for _ in range(200)]
    for key in keys[:99]:
        client_guard.close(key)
    assert calls == []
    client_guard.close(keys[99])
    assert calls == [1]


def test_small_drain_not_reported():
    calls = []
    client_guard = ClientGuard(on_drained=lambda: calls.append(1))
    rules = limits()
    keys = [client_guard.try_open(f"192.0.2.{n}", rules) for n in range(20)]
    for key in keys:
        client_guard.close(key)
    assert calls == []


def test_memory_release_runs_once_per_request_burst(monkeypatch):
    monkeypatch.setattr(guard, "RELEASE_DELAY", 0.01)
    releases = []

    async def scenario() -> None:
        releaser = MemoryReleaser()
        releaser.release = lambda: releases.append(1)  # type: ignore[method-assign]
        releaser.request()
        releaser.request()
        await asyncio.sleep(0.1)

    asyncio.run(scenario())
    assert releases == [1]


def test_memory_release_collects():
    async def scenario() -> None:
        MemoryReleaser().release()

    asyncio.run(scenario())


# Login outcome lines


def test_outcome_format():
    line = format_login_outcome("failed", "192.0.2.7", 50124, b"alice")
    assert line == 'login failed: client 192.0.2.7 port 50124 user "alice"'


def test_outcome_escapes_crlf_and_quote():
    line = format_login_outcome("failed", "192.0.2.7", 1, b'a\r\nb"c')
    assert line.endswith('user "a\\x0d\\x0ab\\x22c"')


def test_outcome_escapes_backslash():
    line = format_login_outcome("failed", "192.0.2.7", 1, b"a\\x0d\\b")
    assert line.endswith('user "a\\x5cx0d\\x5cb"')


def test_outcome_escapes_eight_bit():
    line = format_login_outcome("succeeded", "192.0.2.7", 1, "us\u00e9r")
    assert line.endswith('user "us\\xc3\\xa9r"')


@pytest.mark.parametrize("login", [b"alice@mail", b"a\xff\xfeb", "usér".encode()])
def test_outcome_same_for_decoded_login(login):
    # Session.user contains a decoded login, and allow-list rejections log the raw bytes.
    decoded = format_login_outcome("failed", "192.0.2.7", 1, decode_login(login))

    assert decoded == format_login_outcome("failed", "192.0.2.7", 1, login)


def test_outcome_without_user():
    assert format_login_outcome("cancelled", "::1", 1, None).endswith('user ""')


def test_outcome_rejects_unknown_result():
    with pytest.raises(ValueError, match="invalid login result"):
        format_login_outcome("maybe", "192.0.2.7", 1, b"alice")


@given(user=st.binary(max_size=300))
def test_outcome_is_one_printable_line(user):
    line = format_login_outcome("failed", "192.0.2.7", 1, user)
    prefix = 'login failed: client 192.0.2.7 port 1 user "'
    assert line.startswith(prefix)
    assert line.isprintable()
    assert line.count('"') == 2


# Open files limit


def test_soft_limit_raised_to_hard(monkeypatch):
    calls = []
    monkeypatch.setattr(resource, "getrlimit", lambda kind: (1024, 65536))
    monkeypatch.setattr(resource, "setrlimit", lambda kind, value: calls.append(value))
    assert raise_open_files_limit() == (65536, 65536)
    assert calls == [(65536, 65536)]


def test_soft_limit_kept_when_equal(monkeypatch):
    calls = []
    monkeypatch.setattr(resource, "getrlimit", lambda kind: (4096, 4096))
    monkeypatch.setattr(resource, "setrlimit", lambda kind, value: calls.append(value))
    assert raise_open_files_limit() == (4096, 4096)
    assert calls == []


def test_soft_limit_failure_logged(monkeypatch):
    def refuse(kind: int, value: tuple[int, int]) -> None:
        raise ValueError("not allowed")

    monkeypatch.setattr(resource, "getrlimit", lambda kind: (1024, 65536))
    monkeypatch.setattr(resource, "setrlimit", refuse)
    assert raise_open_files_limit() == (1024, 65536)
