"""The reload check when the file watch first starts.

The appliance loads its config, binds its listeners and only then starts watching the
files. An edit that lands in between would otherwise wait for the next change or SIGHUP.
These tests run the Reloader in process against real files and watchfiles.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from loguru import logger

from appliance.config import loader
from appliance.config.loader import load_config
from appliance.proxy.runtime import Runtime, build_snapshot
from appliance.reload import WATCH_START, Reloader, start_digests

# Generous: the first watch starts within milliseconds, a reload within a second.
WAIT_SECONDS = 20.0

CONFIG = """\
upstreams:
  mail:
    host: 127.0.0.1
    port: 1
    tls: none
    allow_plaintext: true
limits:
  max_connections: {max_connections}
"""


@pytest.fixture(autouse=True)
def isolated_sources(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Hide the caller's APPLIANCE_* variables and the real default file and folder."""
    for name in list(os.environ):
        if name.upper().startswith("APPLIANCE_"):
            monkeypatch.delenv(name)
    monkeypatch.setattr(loader, "DEFAULT_CONFIG_PATH", tmp_path / "etc" / "absent.yaml")
    monkeypatch.setattr(loader, "DEFAULT_SECRETS_DIR", tmp_path / "run" / "absent")


@pytest.fixture
def messages() -> Iterator[list[str]]:
    """Every log message at DEBUG and above while the test runs."""
    collected: list[str] = []
    sink = logger.add(lambda message: collected.append(str(message)), level="DEBUG")
    yield collected
    logger.remove(sink)


async def wait_for(predicate, what: str) -> None:
    async with asyncio.timeout(WAIT_SECONDS):
        while not predicate():
            await asyncio.sleep(0.02)


def write(path: Path, max_connections: int) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(CONFIG.format(max_connections=max_connections))
    temporary.replace(path)


def start_reloader(path: Path, *, edit_after_load: int | None = None) -> Reloader:
    """Load `path` as the CLI does, optionally edit it, and start a Reloader."""
    loaded = load_config(path)
    if edit_after_load is not None:
        write(path, edit_after_load)
    digests = start_digests(loaded)
    runtime = Runtime(build_snapshot(loaded))
    reloader = Reloader(
        runtime, loaded, config_path=str(path), secrets_dir=None, digests=digests
    )
    reloader.start()
    return reloader


async def test_early_edit_applied(tmp_path: Path, messages: list[str]) -> None:
    path = tmp_path / "appliance.yaml"
    write(path, 100)
    reloader = start_reloader(path, edit_after_load=200)
    try:
        runtime = reloader.runtime
        await wait_for(lambda: runtime.snapshot.version == 2, "the edit to be applied")
        assert runtime.snapshot.config.limits.max_connections == 200
        summary = [m for m in messages if "config reload" in m]
        assert len(summary) == 1, summary
        assert f"config reload ({WATCH_START}) applied version 2" in summary[0]
        assert "limits changed: max_connections" in summary[0]
        assert runtime.status.outcome == "applied"
    finally:
        await reloader.stop()


async def test_unchanged_start_logs_nothing(
    tmp_path: Path, messages: list[str]
) -> None:
    path = tmp_path / "appliance.yaml"
    write(path, 100)
    reloader = start_reloader(path)
    try:
        await wait_for(
            lambda: any("files unchanged since start-up" in m for m in messages),
            "the check at start-up",
        )
        assert not [m for m in messages if "config reload" in m]
        assert reloader.runtime.snapshot.version == 1
        assert reloader.runtime.status.last_reload_at is None
        # The watch runs: a later edit is a normal reload.
        write(path, 300)
        await wait_for(lambda: reloader.runtime.snapshot.version == 2, "the edit")
        assert any(
            "config reload (file change) applied version 2" in m for m in messages
        )
    finally:
        await reloader.stop()


async def test_early_broken_edit_rejected(tmp_path: Path, messages: list[str]) -> None:
    path = tmp_path / "appliance.yaml"
    write(path, 100)
    loaded = load_config(path)
    path.write_text(CONFIG.format(max_connections=0))
    runtime = Runtime(build_snapshot(loaded))
    reloader = Reloader(
        runtime,
        loaded,
        config_path=str(path),
        secrets_dir=None,
        digests=start_digests(loaded),
    )
    reloader.start()
    try:
        await wait_for(lambda: runtime.status.outcome == "rejected", "the rejection")
        rejected = [m for m in messages if "rejected" in m]
        assert "max_connections" in rejected[0], rejected
        assert runtime.snapshot.version == 1
    finally:
        await reloader.stop()
