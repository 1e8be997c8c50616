"""The idle bound of the relay phase (IdleTimer), with stand-in connections.

A config's idle_timeout is at least 30 minutes, so no end-to-end test waits for it.
These tests run the timer with a timeout of a few hundredths of a second.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from appliance.proxy.relay import IdleTimer

TIMEOUT = 0.05


@dataclass
class Side:
    last_activity: float = field(default_factory=time.monotonic)
    closed: bool = False

    def close(self) -> None:
        self.closed = True


@dataclass
class StandInSession:
    client: Side = field(default_factory=Side)
    upstream: Side = field(default_factory=Side)
    outcome: str = "closed"


async def keep_active(side: Side, seconds: float) -> None:
    """Mark `side` active every fifth of the timeout for `seconds`."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        side.last_activity = time.monotonic()
        await asyncio.sleep(TIMEOUT / 5)


def test_quiet_session_closes_both_sides() -> None:
    async def scenario() -> StandInSession:
        session = StandInSession()
        IdleTimer(session, TIMEOUT)  # type: ignore[arg-type]
        await asyncio.sleep(TIMEOUT * 4)
        return session

    session = asyncio.run(scenario())
    assert session.outcome == "idle timeout"
    assert session.client.closed
    assert session.upstream.closed


def test_traffic_either_way_keeps_session() -> None:
    async def scenario(active: str) -> StandInSession:
        session = StandInSession()
        timer = IdleTimer(session, TIMEOUT)  # type: ignore[arg-type]
        await keep_active(getattr(session, active), TIMEOUT * 4)
        timer.cancel()
        return session

    for active in ("client", "upstream"):
        session = asyncio.run(scenario(active))
        assert session.outcome == "closed", active
        assert not session.client.closed
        assert not session.upstream.closed


def test_timer_rearms_after_traffic() -> None:
    async def scenario() -> tuple[StandInSession, bool]:
        session = StandInSession()
        IdleTimer(session, TIMEOUT)  # type: ignore[arg-type]
        await keep_active(session.client, TIMEOUT * 2)
        open_after_traffic = not session.client.closed
        await asyncio.sleep(TIMEOUT * 4)
        return session, open_after_traffic

    session, open_after_traffic = asyncio.run(scenario())
    assert open_after_traffic
    assert session.outcome == "idle timeout"
    assert session.client.closed
    assert session.upstream.closed


def test_cancel_stops_the_timer() -> None:
    async def scenario() -> StandInSession:
        session = StandInSession()
        IdleTimer(session, TIMEOUT).cancel()  # type: ignore[arg-type]
        await asyncio.sleep(TIMEOUT * 4)
        return session

    session = asyncio.run(scenario())
    assert session.outcome == "closed"
    assert not session.client.closed
