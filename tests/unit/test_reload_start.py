"""The reload check when the file watch first starts.

The appliance loads its config, binds its listeners and only then starts watching the
files. An edit that lands in between would otherwise wait for the next change or SIGHUP.
These tests run the Reloader in process against real files and watchfiles.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from loguru import logger

from appliance import metrics
from appliance.config.loader import ConfigError, load_config
from appliance.proxy import runtime as runtime_module
from appliance.proxy.runtime import Runtime, build_snapshot
from appliance.reload import WATCH_RESTART, WATCH_START, Reloader, named_file_digests
from appliance.reload import reloader as reloader_module
from tests.support.appliance import free_port
from tests.support.certs import TestPKI
from tests.support.sources import isolate_config_sources

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

# The listener is created but never bound, because no test here connects to it.
LISTENERS = """\
listeners:
  imap: {protocol: imap, bind: 127.0.0.1, port: 1143, upstream: mail}
"""


@pytest.fixture(autouse=True)
def isolated_sources(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    isolate_config_sources(monkeypatch, tmp_path)


@pytest.fixture
def messages() -> Iterator[list[str]]:
    """The text of every log message at DEBUG and above while the test runs."""
    collected: list[str] = []

    def collect(message: Any) -> None:
        collected.append(message.record["message"])

    sink = logger.add(collect, level="DEBUG")
    yield collected
    logger.remove(sink)


def rejection(messages: list[str], trigger: str) -> tuple[str, list[str]]:
    """Return the summary line of the one rejected reload by `trigger`, and its problems.

    Each problem is a message of its own after the summary, in check-config's format.
    """
    start = f"config reload ({trigger}) rejected: "
    [index] = [i for i, message in enumerate(messages) if message.startswith(start)]
    following = messages[index + 1 :]
    problems = list(itertools.takewhile(lambda m: m.startswith("  - "), following))
    return messages[index], problems


async def wait_for(predicate, description: str) -> None:
    try:
        async with asyncio.timeout(WAIT_SECONDS):
            while not predicate():
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(
            f"timed out after {WAIT_SECONDS}s waiting for {description}"
        ) from None


def reloads_counted(outcome: str) -> float:
    value = metrics.REGISTRY.get_sample_value(
        "appliance_reloads_total", {"outcome": outcome}
    )
    return value or 0.0


def write(path: Path, max_connections: int) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(CONFIG.format(max_connections=max_connections) + LISTENERS)
    temporary.replace(path)


def start_reloader(
    path: Path, *, edit_after_load: int | None = None, secrets_dir: Path | None = None
) -> Reloader:
    """Load `path` as the CLI does, optionally edit it, and start a Reloader."""
    loaded = load_config(path, secrets_dir=secrets_dir)
    if edit_after_load is not None:
        write(path, edit_after_load)
    digests = named_file_digests(loaded)
    runtime = Runtime(build_snapshot(loaded))
    runtime.listeners = {
        name: runtime.create_listener(name, config, runtime.snapshot)
        for name, config in loaded.config.listeners.items()
    }
    reloader = Reloader(
        runtime,
        loaded,
        config_path=str(path),
        secrets_dir=None if secrets_dir is None else str(secrets_dir),
        digests=digests,
    )
    reloader.start()
    return reloader


async def start_up_checked(messages: list[str]) -> None:
    """Wait until the reloader's check at start-up found the files unchanged."""
    await wait_for(
        lambda: any("files unchanged since start-up" in m for m in messages),
        "the check at start-up",
    )


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


async def test_unchanged_start_not_counted(tmp_path: Path, messages: list[str]) -> None:
    path = tmp_path / "appliance.yaml"
    write(path, 100)
    unchanged_before = reloads_counted("unchanged")
    reloader = start_reloader(path)
    try:
        await start_up_checked(messages)
        assert not [m for m in messages if "config reload" in m]
        assert reloader.runtime.snapshot.version == 1
        assert reloader.runtime.status.last_reload_at is None
        assert reloads_counted("unchanged") == unchanged_before
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
    path.write_text(CONFIG.format(max_connections=0) + LISTENERS)
    runtime = Runtime(build_snapshot(loaded))
    reloader = Reloader(
        runtime,
        loaded,
        config_path=str(path),
        secrets_dir=None,
        digests=named_file_digests(loaded),
    )
    reloader.start()
    try:
        await wait_for(lambda: runtime.status.outcome == "rejected", "the rejection")
        summary, [problem] = rejection(messages, WATCH_START)
        assert summary.startswith(f"config reload ({WATCH_START}) rejected: 1 problem")
        assert problem.startswith("  - limits.max_connections: value 0"), problem
        assert runtime.snapshot.version == 1
    finally:
        await reloader.stop()


async def test_emptied_file_rejected(tmp_path: Path, messages: list[str]) -> None:
    """A file truncated by `: > file`, or caught half-written, keeps the old config."""
    path = tmp_path / "appliance.yaml"
    write(path, 100)
    reloader = start_reloader(path)
    runtime = reloader.runtime
    try:
        await start_up_checked(messages)
        path.write_text("")
        await wait_for(lambda: runtime.status.outcome == "rejected", "the rejection")
        summary, [problem] = rejection(messages, "file change")
        assert "rejected: 1 problem, listed below" in summary
        assert "version 1 stays active" in summary
        assert problem.startswith("  - listeners: no listener is configured")
        assert f"config file {str(path)!r} is empty" in problem
        assert runtime.snapshot.version == 1
        assert list(runtime.snapshot.config.listeners) == ["imap"]
        assert list(runtime.listeners) == ["imap"]
    finally:
        await reloader.stop()


# A secret file that arrives broken, and the problem its rejection must name.
BROKEN_SECRETS = {
    "not UTF-8": (
        "APPLIANCE_LIMITS__MAX_CONNECTIONS",
        b"\xff\xfe",
        "limits.max_connections: secret file {file!r} is not UTF-8 text",
    ),
    "list not JSON": (
        "APPLIANCE_LISTENERS__IMAP__PROXY_PROTOCOL__TRUSTED_NETWORKS",
        b"10.0.0.0/8",
        (
            "listeners.imap.proxy_protocol.trusted_networks: the value (from secret "
            "file {file!r}) is not valid JSON"
        ),
    ),
}


@pytest.mark.parametrize(
    ("name", "content", "expected"), BROKEN_SECRETS.values(), ids=BROKEN_SECRETS.keys()
)
async def test_broken_secret_rejected(
    name: str, content: bytes, expected: str, tmp_path: Path, messages: list[str]
) -> None:
    path = tmp_path / "appliance.yaml"
    write(path, 100)
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    reloader = start_reloader(path, secrets_dir=secrets_dir)
    runtime = reloader.runtime
    try:
        await start_up_checked(messages)
        # Written beside the folder and renamed in, so the reload reads one complete file.
        staged = tmp_path / "staged-secret"
        staged.write_bytes(content)
        secret = secrets_dir / name
        staged.replace(secret)
        await wait_for(lambda: runtime.status.outcome == "rejected", "the rejection")
        summary, [problem] = rejection(messages, "file change")
        assert problem.startswith("  - " + expected.format(file=str(secret)))
        assert "version 1 stays active" in summary
        assert not [m for m in messages if "internal error" in m]
        assert runtime.snapshot.version == 1
    finally:
        await reloader.stop()


def make_directory(path: Path) -> None:
    path.mkdir()


def make_symlink_loop(path: Path) -> None:
    path.symlink_to(path.name)


@pytest.mark.parametrize(
    ("make", "expected"),
    [(make_directory, "is a directory"), (make_symlink_loop, "is a symbolic link loop")],
    ids=["directory", "symlink loop"],
)
async def test_unusable_secret_entry_rejected(
    make: Any, expected: str, tmp_path: Path, messages: list[str]
) -> None:
    path = tmp_path / "appliance.yaml"
    write(path, 100)
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    reloader = start_reloader(path, secrets_dir=secrets_dir)
    runtime = reloader.runtime
    try:
        await start_up_checked(messages)
        # Made beside the folder and renamed in, so the reload reads the finished entry.
        staged = tmp_path / "APPLIANCE_LIMITS__MAX_CONNECTIONS"
        make(staged)
        entry = secrets_dir / staged.name
        staged.replace(entry)
        await wait_for(lambda: runtime.status.outcome == "rejected", "the rejection")
        summary, [problem] = rejection(messages, "file change")
        assert problem.startswith(
            f"  - limits.max_connections: secret file {str(entry)!r} {expected}"
        )
        assert "version 1 stays active" in summary
        assert runtime.snapshot.version == 1
        assert runtime.snapshot.config.limits.max_connections == 100
    finally:
        await reloader.stop()


async def test_watch_restart_keeps_status(
    tmp_path: Path, messages: list[str]
) -> None:
    """A reload that names a file in a new folder restarts the watch.

    The check after the restart finds nothing new, so the reload's "applied" stays.
    """
    pki = TestPKI(tmp_path / "pki")
    path = tmp_path / "appliance.yaml"
    write(path, 100)
    reloader = start_reloader(path)
    runtime = reloader.runtime
    try:
        await start_up_checked(messages)
        text = CONFIG.format(max_connections=100) + LISTENERS
        ca_line = f"    ca_file: {pki.ca_file}\n"
        path.write_text(text.replace("    tls: none\n", "    tls: none\n" + ca_line))
        restart_checked = "files unchanged since the watch restarted"
        await wait_for(
            lambda: any(restart_checked in m for m in messages),
            "the check after the watch restart",
        )
        summary = [m for m in messages if "config reload" in m]
        assert len(summary) == 1, summary
        assert "config reload (file change) applied version 2" in summary[0]
        assert runtime.status.outcome == "applied"
        assert runtime.status.version == 2
        assert pki.ca_file.parent in reloader.watch_set.folders
    finally:
        await reloader.stop()


async def test_watch_restart_skips_same_rejection(
    tmp_path: Path, messages: list[str]
) -> None:
    """A rejected reload that names a file in a new folder restarts the watch.

    The check after the restart finds the same problem, which is logged and counted
    once, by the reload after the file change.
    """
    broken_ca = tmp_path / "ca" / "ca.pem"
    broken_ca.parent.mkdir()
    broken_ca.write_text("not a certificate\n")
    path = tmp_path / "appliance.yaml"
    write(path, 100)
    rejected_before = reloads_counted("rejected")
    reloader = start_reloader(path)
    try:
        await start_up_checked(messages)
        text = CONFIG.format(max_connections=100) + LISTENERS
        ca_line = f"    ca_file: {broken_ca}\n"
        path.write_text(text.replace("    tls: none\n", "    tls: none\n" + ca_line))
        await wait_for(
            lambda: any("problems of the last rejected reload" in m for m in messages),
            "the check after the watch restart",
        )
        summary, [problem] = rejection(messages, "file change")
        assert summary.startswith("config reload (file change) rejected: 1 problem")
        assert problem.startswith(f"  - upstreams.mail.ca_file: {str(broken_ca)!r}")
        assert not [m for m in messages if "config reload (watch restart)" in m]
        assert reloads_counted("rejected") == rejected_before + 1
        assert broken_ca.parent in reloader.watch_set.folders
    finally:
        await reloader.stop()


async def test_watch_restart_logs_other_rejection(
    tmp_path: Path, messages: list[str]
) -> None:
    """The check after a watch restart logs a rejection whose problems changed."""
    path = tmp_path / "appliance.yaml"
    write(path, 100)
    loaded = load_config(path)
    reloader = Reloader(
        Runtime(build_snapshot(loaded)),
        loaded,
        config_path=str(path),
        secrets_dir=None,
        digests=named_file_digests(loaded),
    )
    rejected_before = reloads_counted("rejected")
    write(path, 0)
    assert await reloader.reload("file change") == "rejected"
    path.write_text(
        CONFIG.format(max_connections=0) + "  connect_timeout: -1\n" + LISTENERS
    )

    assert await reloader.reload(WATCH_RESTART) == "rejected"
    summary, problems = rejection(messages, WATCH_RESTART)
    assert summary.startswith(f"config reload ({WATCH_RESTART}) rejected: 2 problems")
    assert problems[0].startswith("  - limits.connect_timeout: value -1")
    assert reloads_counted("rejected") == rejected_before + 2

    # The next check finds the same two problems, so it logs no second rejection.
    assert await reloader.reload(WATCH_RESTART) == "rejected"
    rejection(messages, WATCH_RESTART)
    assert reloads_counted("rejected") == rejected_before + 2


async def test_certificate_replaced_during_start_applied(
    tmp_path: Path, messages: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """run_appliance takes the digests before its TLS contexts read the files.

    The certificate is replaced just after the start-up contexts read it. Digests taken
    after that read would already match the new file, and the old certificate would stay.
    """
    pki = TestPKI(tmp_path / "pki")
    first = pki.issue_server_cert("first")
    second = pki.issue_server_cert("second")
    cert_file = tmp_path / "listener.pem"
    key_file = tmp_path / "listener.key"
    cert_file.write_bytes(first.cert_file.read_bytes())
    key_file.write_bytes(first.key_file.read_bytes())
    path = tmp_path / "appliance.yaml"
    text = CONFIG.format(max_connections=100) + (
        f"state_dir: {tmp_path / 'state'}\n"
        "listeners:\n"
        "  imaps:\n"
        "    protocol: imap\n"
        "    bind: 127.0.0.1\n"
        f"    port: {free_port()}\n"
        "    upstream: mail\n"
        "    tls: implicit\n"
        f"    cert_file: {cert_file}\n"
        f"    key_file: {key_file}\n"
    )
    path.write_text(text)
    real_build = runtime_module.build_snapshot

    def build_then_replace(loaded, version=1):
        snapshot = real_build(loaded, version)
        cert_file.write_bytes(second.cert_file.read_bytes())
        key_file.write_bytes(second.key_file.read_bytes())
        return snapshot

    monkeypatch.setattr(runtime_module, "build_snapshot", build_then_replace)
    running = asyncio.create_task(
        runtime_module.run_appliance(load_config(path), config_arg=str(path))
    )
    try:
        await wait_for(
            lambda: any(f"({WATCH_START}) applied version 2" in m for m in messages),
            "the replaced certificate to be applied",
        )
    finally:
        # run_appliance stops on SIGTERM through its loop signal handler.
        await wait_for(
            lambda: running.done() or any("appliance ready" in m for m in messages),
            "the appliance to be ready",
        )
        if not running.done():
            os.kill(os.getpid(), signal.SIGTERM)
        exit_code = await asyncio.wait_for(running, WAIT_SECONDS)
    assert exit_code == 0


# Config warnings on reload


@pytest.fixture
def warnings_logged() -> Iterator[list[str]]:
    """Every message logged at WARNING while the test runs."""
    collected: list[str] = []

    def collect(message: Any) -> None:
        collected.append(message.record["message"])

    def is_warning(record: Any) -> bool:
        return record["level"].name == "WARNING"

    sink = logger.add(collect, level="WARNING", filter=is_warning)
    yield collected
    logger.remove(sink)


def count_summaries(messages: list[str], text: str) -> int:
    """Count the summary lines of reloads after a file change that contain `text`."""
    return len([m for m in messages if "config reload (file change)" in m and text in m])


async def test_reload_warns_about_new_secret_file(
    tmp_path: Path, messages: list[str], warnings_logged: list[str]
) -> None:
    path = tmp_path / "appliance.yaml"
    write(path, 100)
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    reloader = start_reloader(path, secrets_dir=secrets_dir)
    try:
        await start_up_checked(messages)
        unknown = secrets_dir / "APPLIANCE_BOGUS"
        unknown.write_text("s3cr3t-content\n")
        await wait_for(
            lambda: count_summaries(messages, "found no changes") == 1,
            "the reload after the new secret file",
        )
        warning = f"secret file {str(unknown)!r} matches no config field and is ignored"
        assert len([w for w in warnings_logged if w.startswith(warning)]) == 1
        assert "s3cr3t-content" not in warnings_logged[0]

        # Later reloads find the same warning, so they do not repeat it.
        write(path, 200)
        await wait_for(
            lambda: reloader.runtime.snapshot.version == 2, "the edit to be applied"
        )
        assert len([w for w in warnings_logged if w.startswith(warning)]) == 1
    finally:
        await reloader.stop()


async def test_reload_skips_warning_logged_at_start(
    tmp_path: Path, messages: list[str], warnings_logged: list[str]
) -> None:
    path = tmp_path / "appliance.yaml"
    write(path, 100)
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    (secrets_dir / "APPLIANCE_BOGUS").write_text("value\n")
    # The CLI logs the start-up load's warnings before the reloader starts.
    reloader = start_reloader(path, secrets_dir=secrets_dir)
    try:
        await start_up_checked(messages)
        write(path, 200)
        await wait_for(
            lambda: reloader.runtime.snapshot.version == 2, "the edit to be applied"
        )
        assert warnings_logged == []
    finally:
        await reloader.stop()


def write_level(path: Path, level: str) -> None:
    text = CONFIG.format(max_connections=100) + f"logging:\n  level: {level}\n"
    path.write_text(text + LISTENERS)


@pytest.mark.parametrize("found_at_start", [True, False], ids=["at-start", "on-reload"])
async def test_warning_suppressed_by_level_logged_later(
    found_at_start: bool,
    tmp_path: Path,
    messages: list[str],
    warnings_logged: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A warning found while logging.level is ERROR is logged once WARNING lines are.

    The test's sinks take WARNING lines at any configured level, so the lines that the
    level suppresses are counted too.
    """
    # configure_logging would remove the test's sinks when the level changes.
    monkeypatch.setattr(reloader_module, "configure_logging", lambda *args: None)
    path = tmp_path / "appliance.yaml"
    write_level(path, "ERROR")
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    unknown = secrets_dir / "APPLIANCE_OTHER_TOKEN"
    if found_at_start:
        unknown.write_text("value\n")
    reloader = start_reloader(path, secrets_dir=secrets_dir)
    warning = f"secret file {str(unknown)!r} matches no config field and is ignored"
    try:
        await start_up_checked(messages)
        if not found_at_start:
            unknown.write_text("value\n")
            await wait_for(
                lambda: count_summaries(messages, "found no changes") == 1,
                "the reload after the new secret file",
            )
        # Found by the start-up check or by the reload, while the level was ERROR.
        assert len([w for w in warnings_logged if w.startswith(warning)]) == 1

        write_level(path, "INFO")
        await wait_for(
            lambda: reloader.runtime.snapshot.version == 2, "the level change"
        )
        assert len([w for w in warnings_logged if w.startswith(warning)]) == 2

        # WARNING lines were written this time, so the next reload does not repeat it.
        write(path, 200)
        await wait_for(lambda: reloader.runtime.snapshot.version == 3, "the edit")
        assert len([w for w in warnings_logged if w.startswith(warning)]) == 2
    finally:
        await reloader.stop()


async def test_reload_warns_about_new_exposure(
    tmp_path: Path, messages: list[str], warnings_logged: list[str]
) -> None:
    path = tmp_path / "appliance.yaml"
    write(path, 100)
    reloader = start_reloader(path)
    try:
        await start_up_checked(messages)
        # 192.0.2.1 is a documentation address, and no session connects to it.
        text = CONFIG.format(max_connections=100) + LISTENERS
        path.write_text(text.replace("host: 127.0.0.1", "host: 192.0.2.1"))
        await wait_for(
            lambda: reloader.runtime.snapshot.version == 2, "the host change"
        )
        warning = "upstreams.mail: tls: none sends every login to 192.0.2.1 in plain text"
        assert len([w for w in warnings_logged if w.startswith(warning)]) == 1

        # A reload that changes something else does not repeat the warning.
        text = CONFIG.format(max_connections=200) + LISTENERS
        path.write_text(text.replace("host: 127.0.0.1", "host: 192.0.2.1"))
        await wait_for(
            lambda: reloader.runtime.snapshot.version == 3, "the limit change"
        )
        assert len([w for w in warnings_logged if w.startswith(warning)]) == 1

        # Once the warning is gone, its return is new again.
        write(path, 300)
        await wait_for(lambda: reloader.runtime.snapshot.version == 4, "the host reset")
        path.write_text(text.replace("host: 127.0.0.1", "host: 192.0.2.1"))
        await wait_for(
            lambda: reloader.runtime.snapshot.version == 5, "the second host change"
        )
        assert len([w for w in warnings_logged if w.startswith(warning)]) == 2
    finally:
        await reloader.stop()


async def test_rejection_lists_each_problem(
    tmp_path: Path, messages: list[str]
) -> None:
    path = tmp_path / "appliance.yaml"
    write(path, 100)
    reloader = start_reloader(path)
    runtime = reloader.runtime
    try:
        await start_up_checked(messages)
        limits = CONFIG.format(max_connections=0) + "  connect_timeout: -1\n"
        staged = tmp_path / "staged.yaml"
        staged.write_text(limits + LISTENERS)
        staged.replace(path)
        with pytest.raises(ConfigError) as caught:
            load_config(path)
        await wait_for(lambda: runtime.status.outcome == "rejected", "the rejection")
        summary, problems = rejection(messages, "file change")
        assert summary.startswith(
            "config reload (file change) rejected: 2 problems, listed below; "
            "version 1 stays active; took "
        )
        # The same lines as check-config prints.
        assert problems == [f"  - {problem}" for problem in caught.value.problems]
        assert problems[0].startswith("  - limits.connect_timeout: value -1")
        assert problems[1].startswith("  - limits.max_connections: value 0")
        assert runtime.snapshot.version == 1
    finally:
        await reloader.stop()
