"""Run one asyncio scenario on a named event loop, for tests that cover both loops."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

LOOPS = ["asyncio", "uvloop"]


def run_on_loop(
    loop_name: str, scenario: Callable[[], Awaitable[None]], timeout: float
) -> None:
    """Run `scenario` on a fresh asyncio or uvloop loop; skip when uvloop is missing."""
    if loop_name == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        factory = uvloop.new_event_loop
    else:
        factory = asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(asyncio.wait_for(scenario(), timeout))
