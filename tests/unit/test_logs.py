"""RepeatLimiter: one log line per key and interval, with the count held back."""

from __future__ import annotations

from appliance.logs import RepeatLimiter


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_first_line_allowed() -> None:
    limiter = RepeatLimiter(60.0, clock=FakeClock())
    assert limiter.allow("imap") == 0


def test_repeats_held_back_within_interval() -> None:
    clock = FakeClock()
    limiter = RepeatLimiter(60.0, clock=clock)
    limiter.allow("imap")
    clock.now += 59.0
    assert limiter.allow("imap") is None
    assert limiter.allow("imap") is None


def test_next_line_counts_held_back() -> None:
    clock = FakeClock()
    limiter = RepeatLimiter(60.0, clock=clock)
    limiter.allow("imap")
    limiter.allow("imap")
    limiter.allow("imap")
    clock.now += 60.0
    assert limiter.allow("imap") == 2
    clock.now += 60.0
    assert limiter.allow("imap") == 0


def test_keys_limited_apart() -> None:
    limiter = RepeatLimiter(60.0, clock=FakeClock())
    limiter.allow(("imap", "plaintext_on_tls_port"))
    assert limiter.allow(("pop3", "plaintext_on_tls_port")) == 0
    assert limiter.allow(("imap", "tls_on_plaintext_port")) == 0
    assert limiter.allow(("imap", "plaintext_on_tls_port")) is None


def test_limiter_counts_weights() -> None:
    clock = FakeClock()
    limiter = RepeatLimiter(60.0, clock)
    limiter.allow("evicted", 3)
    limiter.allow("evicted", 2)
    limiter.allow("evicted", 4)

    clock.now += 60.0

    assert limiter.allow("evicted", 1) == 6
