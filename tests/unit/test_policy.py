"""Unit tests of the upstream TLS policy with a scripted probe instead of a network."""

from __future__ import annotations

import asyncio
import errno
import os
import shlex
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from loguru import logger

from appliance.config import AppConfig
from appliance.proxy.errors import (
    PolicyError,
    UpstreamCertificateError,
    UpstreamError,
)
from appliance.proxy.session import Snapshot
from appliance.tls import known_servers
from appliance.tls.contexts import build_all_contexts
from appliance.tls.known_servers import KnownServerStore, ServerKey, utc_now
from appliance.tls.policy import PLAINTEXT_RECHECK_INTERVAL, UpstreamPlanner
from appliance.tls.probe import ModeReport, ProbeReport, ProbeSettings, probe_server

KEY = ServerKey("imap", "mail.example.org", None)
USABLE_TLS = {"tls_version": "TLSv1.3", "cipher": "TLS_AES_128_GCM_SHA256"}


@pytest.fixture(autouse=True)
def no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("APPLIANCE_"):
            monkeypatch.delenv(name)


@pytest.fixture
def log_lines() -> Iterator[list[str]]:
    lines: list[str] = []
    handler = logger.add(lambda message: lines.append(str(message)), format="{message}")
    yield lines
    logger.remove(handler)


def make_snapshot(**upstream: Any) -> Snapshot:
    entry = {"host": "mail.example.org", "tls": "auto", **upstream}
    known = entry.pop("known_servers", [])
    tls_auto = entry.pop("tls_auto", {})
    config = AppConfig(
        upstreams={"mail": entry}, known_servers=known, tls_auto=tls_auto
    )
    return Snapshot(config, build_all_contexts(config))


def offered(mode: str, port: int, **fields: Any) -> ModeReport:
    usable = fields.pop("usable", True)
    details = USABLE_TLS if mode != "none" and usable else {}
    return ModeReport(
        mode, port, offered=True, usable=usable, reached=True, **{**details, **fields}
    )


def absent(mode: str, port: int) -> ModeReport:
    return ModeReport(mode, port, offered=False, usable=False, detail="refused")


def server_report(*offers: str, unusable: tuple[str, ...] = ()) -> ProbeReport:
    ports = {"implicit": 993, "starttls": 143, "none": 143}
    modes = []
    for mode in ("implicit", "starttls", "none"):
        if mode in offers:
            modes.append(offered(mode, ports[mode], usable=mode not in unusable))
        else:
            modes.append(absent(mode, ports[mode]))
    return ProbeReport("imap", "mail.example.org", None, tuple(modes))


class ScriptedProbe:
    """A probe function that returns queued reports and counts its calls."""

    def __init__(self, *reports: ProbeReport) -> None:
        self.reports = list(reports)
        self.calls: list[ProbeSettings] = []
        self.gate: asyncio.Event | None = None

    async def __call__(self, settings: ProbeSettings) -> ProbeReport:
        self.calls.append(settings)
        if self.gate is not None:
            await self.gate.wait()
        report = self.reports[0] if len(self.reports) == 1 else self.reports.pop(0)
        return report


def make_planner(
    snapshot: Snapshot, probe: ScriptedProbe, store: KnownServerStore | None = None
) -> UpstreamPlanner:
    return UpstreamPlanner(snapshot, store or KnownServerStore(None), probe=probe)


async def plan_modes(planner: UpstreamPlanner, snapshot: Snapshot) -> list[str]:
    targets = await planner.plan(snapshot, "mail", "imap")
    return [target.mode for target in targets]


def learned(planner: UpstreamPlanner, key: ServerKey = KEY):
    return planner.store.get(key)


# Modes from config, records and probes


async def test_explicit_mode_skips_probe() -> None:
    snapshot = make_snapshot(tls="starttls")
    probe = ScriptedProbe(server_report("implicit"))
    planner = make_planner(snapshot, probe)

    assert await plan_modes(planner, snapshot) == ["starttls"]
    assert probe.calls == []


async def test_config_pin_wins_over_record() -> None:
    pin = [{"host": "mail.example.org", "mode": "starttls"}]
    snapshot = make_snapshot(known_servers=pin)
    probe = ScriptedProbe(server_report("implicit"))
    planner = make_planner(snapshot, probe)

    assert await plan_modes(planner, snapshot) == ["starttls"]
    assert probe.calls == []


async def test_record_wins_over_probe() -> None:
    snapshot = make_snapshot()
    probe = ScriptedProbe(server_report("starttls", "none"))
    planner = make_planner(snapshot, probe)
    planner.store.pin(KEY, "implicit", 993)

    assert await plan_modes(planner, snapshot) == ["implicit"]
    assert probe.calls == []


async def test_first_session_probes_and_records() -> None:
    snapshot = make_snapshot()
    probe = ScriptedProbe(server_report("implicit", "starttls", "none"))
    planner = make_planner(snapshot, probe)

    modes = await plan_modes(planner, snapshot)
    record = learned(planner)

    assert modes == ["implicit"]
    assert record.mode == "implicit"
    assert record.connect_port == 993
    assert record.tls_version == "TLSv1.3"


async def test_second_session_uses_record() -> None:
    snapshot = make_snapshot()
    probe = ScriptedProbe(server_report("starttls", "none"))
    planner = make_planner(snapshot, probe)

    await plan_modes(planner, snapshot)
    modes = await plan_modes(planner, snapshot)

    assert modes == ["starttls"]
    assert len(probe.calls) == 1


async def test_probe_uses_upstream_settings() -> None:
    snapshot = make_snapshot(port=1143, tls_auto={"probe_timeout": 3})
    probe = ScriptedProbe(server_report("starttls"))
    planner = make_planner(snapshot, probe)

    await plan_modes(planner, snapshot)
    settings = probe.calls[0]

    assert settings.port == 1143
    assert settings.timeout == 3
    assert settings.context is snapshot.contexts.upstreams["mail"]
    assert settings.inspect_context is None


async def test_targets_follow_mode_port() -> None:
    snapshot = make_snapshot()
    planner = make_planner(snapshot, ScriptedProbe(server_report("starttls")))

    targets = await planner.plan(snapshot, "mail", "imap")

    assert targets[0].port == 143


async def test_concurrent_first_sessions_share_probe() -> None:
    snapshot = make_snapshot()
    probe = ScriptedProbe(server_report("implicit"))
    probe.gate = asyncio.Event()
    planner = make_planner(snapshot, probe)

    sessions = [asyncio.create_task(plan_modes(planner, snapshot)) for _ in range(20)]
    await asyncio.sleep(0.01)
    probe.gate.set()
    results = await asyncio.gather(*sessions)

    assert len(probe.calls) == 1
    assert planner.probe_count == 1
    assert results == [["implicit"]] * 20


async def test_cancelled_session_keeps_shared_probe() -> None:
    snapshot = make_snapshot()
    probe = ScriptedProbe(server_report("starttls"))
    probe.gate = asyncio.Event()
    planner = make_planner(snapshot, probe)

    first = asyncio.create_task(plan_modes(planner, snapshot))
    second = asyncio.create_task(plan_modes(planner, snapshot))
    await asyncio.sleep(0.01)
    first.cancel()
    probe.gate.set()

    assert await second == ["starttls"]
    assert len(probe.calls) == 1


async def test_protocols_are_probed_separately() -> None:
    snapshot = make_snapshot()
    probe = ScriptedProbe(server_report("starttls"))
    planner = make_planner(snapshot, probe)

    await planner.plan(snapshot, "mail", "imap")
    await planner.plan(snapshot, "mail", "pop3")

    assert [settings.protocol for settings in probe.calls] == ["imap", "pop3"]


# Plain text


async def test_plain_only_server_fails_closed(log_lines: list[str]) -> None:
    snapshot = make_snapshot()
    planner = make_planner(snapshot, ScriptedProbe(server_report("none")))

    with pytest.raises(PolicyError) as caught:
        await plan_modes(planner, snapshot)

    assert "offered no TLS" in caught.value.detail
    assert "upstreams.mail.allow_plaintext: true" in caught.value.detail
    assert learned(planner).mode == "none"
    assert any("none: offered" in line for line in log_lines)


async def test_plain_only_server_with_setting() -> None:
    snapshot = make_snapshot(allow_plaintext=True)
    planner = make_planner(snapshot, ScriptedProbe(server_report("none")))

    assert await plan_modes(planner, snapshot) == ["none"]


async def test_plain_record_reprobed_before_refusal(log_lines: list[str]) -> None:
    snapshot = make_snapshot()
    probe = ScriptedProbe(server_report("none"), server_report("starttls", "none"))
    planner = make_planner(snapshot, probe)
    with pytest.raises(PolicyError):
        await plan_modes(planner, snapshot)
    age_record(planner, PLAINTEXT_RECHECK_INTERVAL + 1)

    modes = await plan_modes(planner, snapshot)

    assert modes == ["starttls"]
    assert len(probe.calls) == 2
    assert any("moved up from none to starttls" in line for line in log_lines)


async def test_plain_recheck_is_rate_limited() -> None:
    snapshot = make_snapshot()
    probe = ScriptedProbe(server_report("none"))
    planner = make_planner(snapshot, probe)
    for _ in range(3):
        with pytest.raises(PolicyError):
            await plan_modes(planner, snapshot)

    assert len(probe.calls) == 1


async def test_learned_plain_target_upgrades_if_offered() -> None:
    snapshot = make_snapshot(allow_plaintext=True)
    planner = make_planner(snapshot, ScriptedProbe(server_report("none")))

    [target] = await planner.plan(snapshot, "mail", "imap")

    assert target.mode == "none"
    assert target.starttls_if_offered


async def test_pinned_plain_target_never_upgrades() -> None:
    snapshot = make_snapshot()
    planner = make_planner(snapshot, ScriptedProbe(server_report("starttls")))
    planner.store.pin(KEY, "none", 143)

    [target] = await planner.plan(snapshot, "mail", "imap")

    assert target.mode == "none"
    assert not target.starttls_if_offered


async def test_unusable_tls_never_falls_back() -> None:
    snapshot = make_snapshot(allow_plaintext=True)
    report = server_report("starttls", "none", unusable=("starttls",))
    planner = make_planner(snapshot, ScriptedProbe(report))

    assert await plan_modes(planner, snapshot) == ["starttls"]
    assert learned(planner).mode == "starttls"


async def test_operator_pin_allows_plain() -> None:
    snapshot = make_snapshot()
    planner = make_planner(snapshot, ScriptedProbe(server_report("implicit")))
    planner.store.pin(KEY, "none", 143)

    assert await plan_modes(planner, snapshot) == ["none"]


async def test_unreachable_server_is_upstream_error() -> None:
    snapshot = make_snapshot()
    planner = make_planner(snapshot, ScriptedProbe(server_report()))

    with pytest.raises(UpstreamError) as caught:
        await plan_modes(planner, snapshot)

    assert caught.value.reason == "probe"
    assert learned(planner) is None


# Session outcomes


def session_target(planner: UpstreamPlanner, snapshot: Snapshot, mode: str):
    return planner._target(
        snapshot, "mail", snapshot.config.upstreams["mail"], mode, "imap"
    )


async def test_recorded_tls_failure_is_downgrade(log_lines: list[str]) -> None:
    snapshot = make_snapshot()
    planner = make_planner(snapshot, ScriptedProbe(server_report("starttls")))
    await plan_modes(planner, snapshot)
    error = UpstreamError("starttls", "server does not offer STARTTLS")

    planner.report(
        snapshot, "imap", session_target(planner, snapshot, "starttls"), None, error
    )

    assert any("looks like a downgrade" in line for line in log_lines)
    assert learned(planner).mode == "starttls"


async def test_downgrade_advice_forgets_one_record(
    tmp_path: Path, log_lines: list[str]
) -> None:
    snapshot = make_snapshot()
    store = KnownServerStore.open(tmp_path / "state")
    planner = make_planner(snapshot, ScriptedProbe(server_report("starttls")), store)
    await plan_modes(planner, snapshot)
    other = ServerKey("imap", "mail.example.org", 10143)
    store.pin(other, "implicit", 10143)
    error = UpstreamError("starttls", "server does not offer STARTTLS")
    planner.report(
        snapshot, "imap", session_target(planner, snapshot, "starttls"), None, error
    )
    [line] = [line for line in log_lines if "looks like a downgrade" in line]
    command = shlex.split(line.split("`")[-2])

    forget = subprocess.run(
        [sys.executable, "-m", "appliance.cli", *command[1:]],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert command[:2] == ["appliance", "known-servers"]
    assert forget.returncode == 0, forget.stderr
    assert "forgot imap://mail.example.org (starttls)" in forget.stdout
    remaining = KnownServerStore(tmp_path / "state")
    assert remaining.get(KEY) is None
    assert remaining.get(other) is not None


async def test_downgrade_advice_names_absolute_state_dir(
    tmp_path: Path, log_lines: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The quick start sets `state_dir: ./state`, and an operator runs the advised
    # command from whatever folder their shell is in.
    monkeypatch.chdir(tmp_path)
    snapshot = make_snapshot()
    store = KnownServerStore.open(Path("state"))
    planner = make_planner(snapshot, ScriptedProbe(server_report("starttls")), store)
    await plan_modes(planner, snapshot)
    error = UpstreamError("starttls", "server does not offer STARTTLS")
    planner.report(
        snapshot, "imap", session_target(planner, snapshot, "starttls"), None, error
    )
    [line] = [line for line in log_lines if "looks like a downgrade" in line]
    command = shlex.split(line.split("`")[-2])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    forget = subprocess.run(
        [sys.executable, "-m", "appliance.cli", *command[1:]],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    state_dir = command[command.index("--state-dir") + 1]
    assert state_dir == str(tmp_path / "state"), command
    assert forget.returncode == 0, forget.stderr
    assert KnownServerStore(tmp_path / "state").get(KEY) is None
    assert not (elsewhere / "state").exists()


async def test_recorded_certificate_failure_named(log_lines: list[str]) -> None:
    snapshot = make_snapshot()
    planner = make_planner(snapshot, ScriptedProbe(server_report("implicit")))
    await plan_modes(planner, snapshot)
    reason = "Hostname mismatch, certificate is not valid for 'mail.example.org'."
    error = UpstreamCertificateError(
        f"mail.example.org:993: certificate verification failed: {reason}", reason
    )

    planner.report(
        snapshot, "imap", session_target(planner, snapshot, "implicit"), None, error
    )

    [line] = [line for line in log_lines if "recorded mode implicit" in line]
    assert f"the certificate failed verification: {reason}" in line
    assert "upstreams.mail.ca_file" in line
    assert "upstreams.mail.server_name" in line
    assert "downgrade" not in line
    assert "known-servers forget" not in line
    assert learned(planner).mode == "implicit"


async def test_other_tls_failure_is_downgrade(log_lines: list[str]) -> None:
    snapshot = make_snapshot()
    planner = make_planner(snapshot, ScriptedProbe(server_report("implicit")))
    await plan_modes(planner, snapshot)
    error = UpstreamError("tls", "mail.example.org:993: TLS handshake failed: EOF")

    planner.report(
        snapshot, "imap", session_target(planner, snapshot, "implicit"), None, error
    )

    assert any("looks like a downgrade" in line for line in log_lines)


class UpgradedConnection:
    """A session's upstream connection after STARTTLS, as report() reads it."""

    tls_info = ("TLSv1.3", "TLS_AES_128_GCM_SHA256")

    def extra(self, name: str) -> None:
        return None


async def test_upgraded_plain_session_moves_record_up(log_lines: list[str]) -> None:
    snapshot = make_snapshot(allow_plaintext=True)
    probe = ScriptedProbe(server_report("none"), server_report("starttls", "none"))
    planner = make_planner(snapshot, probe)
    [target] = await planner.plan(snapshot, "mail", "imap")

    planner.report(snapshot, "imap", target, UpgradedConnection(), None)
    await planner.drain()

    assert any("offered STARTTLS to a session" in line for line in log_lines)
    assert learned(planner).mode == "starttls"
    assert learned(planner).tls_version == "TLSv1.3"


async def test_failed_upgrade_probes_again(log_lines: list[str]) -> None:
    snapshot = make_snapshot(allow_plaintext=True)
    probe = ScriptedProbe(server_report("none"), server_report("starttls"))
    planner = make_planner(snapshot, probe)
    [target] = await planner.plan(snapshot, "mail", "imap")
    error = UpstreamError("tls", "certificate verification failed")

    planner.report(snapshot, "imap", target, None, error)
    await planner.drain()

    assert len(probe.calls) == 2
    assert learned(planner).mode == "starttls"


async def test_preauth_on_plain_target_no_probe(log_lines: list[str]) -> None:
    snapshot = make_snapshot(allow_plaintext=True)
    probe = ScriptedProbe(server_report("none"), server_report("starttls"))
    planner = make_planner(snapshot, probe)
    [target] = await planner.plan(snapshot, "mail", "imap")
    error = UpstreamError("preauth", "server greeting is PREAUTH")

    planner.report(snapshot, "imap", target, None, error)
    await planner.drain()

    assert len(probe.calls) == 1
    assert not any("offered STARTTLS to a session" in line for line in log_lines)
    assert learned(planner).mode == "none"


async def test_connect_failure_is_no_downgrade(log_lines: list[str]) -> None:
    snapshot = make_snapshot()
    planner = make_planner(snapshot, ScriptedProbe(server_report("starttls")))
    await plan_modes(planner, snapshot)
    error = UpstreamError("connect", "connection refused")

    planner.report(
        snapshot, "imap", session_target(planner, snapshot, "starttls"), None, error
    )

    assert not any("downgrade" in line for line in log_lines)


class FakeSslObject:
    def __init__(self, der: bytes) -> None:
        self.der = der

    def getpeercert(self, binary_form: bool = False) -> bytes:
        return self.der


class FakeConnection:
    def __init__(self, der: bytes, version: str) -> None:
        self.ssl_object = FakeSslObject(der)
        self.tls_info = (version, "TLS_AES_128_GCM_SHA256")

    def extra(self, name: str) -> Any:
        return self.ssl_object if name == "ssl_object" else None


async def test_session_records_new_certificate(log_lines: list[str]) -> None:
    snapshot = make_snapshot()
    planner = make_planner(snapshot, ScriptedProbe(server_report("starttls")))
    await plan_modes(planner, snapshot)
    planner.store.update(KEY, fingerprint_sha256="00" * 32)
    connection = FakeConnection(b"certificate", "TLSv1.2")

    planner.report(
        snapshot,
        "imap",
        session_target(planner, snapshot, "starttls"),
        connection,
        None,
    )
    await planner.drain()
    record = learned(planner)

    assert record.tls_version == "TLSv1.2"
    assert record.fingerprint_sha256 != "00" * 32
    assert record.mode == "starttls"
    assert any(
        "certificate of imap://mail.example.org changed" in line for line in log_lines
    )


# Re-probing


def age_record(planner: UpstreamPlanner, seconds: float) -> None:
    planner.store.update(KEY, last_probed=utc_now() - timedelta(seconds=seconds))


async def test_stale_record_moves_up(log_lines: list[str]) -> None:
    # A plain-text record as old as the smallest max_record_age (60 s) is probed before
    # use instead, so a STARTTLS record shows the background probe.
    snapshot = make_snapshot(tls_auto={"max_record_age": 60})
    probe = ScriptedProbe(server_report("starttls"), server_report("implicit", "starttls"))
    planner = make_planner(snapshot, probe)
    await plan_modes(planner, snapshot)
    age_record(planner, 120)

    modes = await plan_modes(planner, snapshot)
    await planner.drain()

    assert modes == ["starttls"]
    assert learned(planner).mode == "implicit"
    assert await plan_modes(planner, snapshot) == ["implicit"]
    assert any("moved up from starttls to implicit" in line for line in log_lines)


async def test_allowed_plain_record_reprobed_before_use(log_lines: list[str]) -> None:
    """A blocked implicit TLS port during the first probe must not last a day."""
    snapshot = make_snapshot(allow_plaintext=True)
    probe = ScriptedProbe(server_report("none"), server_report("implicit", "none"))
    planner = make_planner(snapshot, probe)
    await plan_modes(planner, snapshot)
    age_record(planner, PLAINTEXT_RECHECK_INTERVAL + 1)

    modes = await plan_modes(planner, snapshot)

    assert modes == ["implicit"]
    assert len(probe.calls) == 2
    assert any("moved up from none to implicit" in line for line in log_lines)


async def test_future_probe_time_counts_as_old() -> None:
    snapshot = make_snapshot()
    probe = ScriptedProbe(server_report("none"), server_report("starttls", "none"))
    planner = make_planner(snapshot, probe)
    with pytest.raises(PolicyError):
        await plan_modes(planner, snapshot)
    age_record(planner, -86400)

    assert await plan_modes(planner, snapshot) == ["starttls"]


async def test_fresh_record_is_not_reprobed() -> None:
    snapshot = make_snapshot(tls_auto={"max_record_age": 60})
    probe = ScriptedProbe(server_report("starttls"))
    planner = make_planner(snapshot, probe)
    await plan_modes(planner, snapshot)
    age_record(planner, 30)

    await plan_modes(planner, snapshot)
    await planner.drain()

    assert len(probe.calls) == 1


async def test_weaker_reprobe_keeps_record(log_lines: list[str]) -> None:
    snapshot = make_snapshot(tls_auto={"max_record_age": 60})
    probe = ScriptedProbe(server_report("starttls"), server_report("none"))
    planner = make_planner(snapshot, probe)
    await plan_modes(planner, snapshot)
    age_record(planner, 120)

    await plan_modes(planner, snapshot)
    await planner.drain()
    record = learned(planner)

    assert record.mode == "starttls"
    assert (utc_now() - record.last_probed).total_seconds() < 60
    assert any("looks like a downgrade" in line for line in log_lines)


async def test_unreachable_reprobe_refreshes_probe_time() -> None:
    snapshot = make_snapshot(tls_auto={"max_record_age": 60})
    probe = ScriptedProbe(server_report("implicit"), server_report())
    planner = make_planner(snapshot, probe)
    await plan_modes(planner, snapshot)
    age_record(planner, 120)

    await plan_modes(planner, snapshot)
    await planner.drain()

    assert learned(planner).mode == "implicit"
    assert (utc_now() - learned(planner).last_probed).total_seconds() < 60


async def test_pinned_record_is_not_reprobed() -> None:
    snapshot = make_snapshot(tls_auto={"max_record_age": 60})
    probe = ScriptedProbe(server_report("implicit"))
    planner = make_planner(snapshot, probe)
    planner.store.pin(KEY, "starttls", 143)
    age_record(planner, 120)

    await plan_modes(planner, snapshot)
    await planner.drain()

    assert probe.calls == []


# Store failures


async def test_full_disk_keeps_serving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, log_lines: list[str]
) -> None:
    def disk_full(descriptor: int, data: bytes) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(known_servers, "write_all", disk_full)
    snapshot = make_snapshot()
    store = KnownServerStore.open(tmp_path / "state")
    planner = make_planner(snapshot, ScriptedProbe(server_report("implicit")), store)

    first = await plan_modes(planner, snapshot)
    second = await plan_modes(planner, snapshot)

    assert first == ["implicit"]
    assert second == ["implicit"]
    errors = [line for line in log_lines if "No space left on device" in line]
    assert len(errors) == 1


async def test_write_recovery_is_logged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, log_lines: list[str]
) -> None:
    original = known_servers.write_all

    def disk_full(descriptor: int, data: bytes) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(known_servers, "write_all", disk_full)
    snapshot = make_snapshot(allow_plaintext=True, tls_auto={"max_record_age": 60})
    store = KnownServerStore.open(tmp_path / "state")
    probe = ScriptedProbe(server_report("none"), server_report("implicit"))
    planner = make_planner(snapshot, probe, store)
    await plan_modes(planner, snapshot)
    monkeypatch.setattr(known_servers, "write_all", original)
    age_record(planner, 120)

    await plan_modes(planner, snapshot)
    await planner.drain()

    assert KnownServerStore(tmp_path / "state").get(KEY).mode == "implicit"
    assert any("writing works again" in line for line in log_lines)


# Probe classification against scripted servers on loopback


class FakeMailServer:
    """A loopback server that sends `greeting` and replies to commands as scripted.

    A reply of None closes the connection, and `{tag}` in a reply is the IMAP tag of
    the command. POP3 commands carry no tag.
    """

    def __init__(
        self, greeting: bytes, replies: dict[str, bytes | None], *, tagged: bool = True
    ) -> None:
        self.greeting = greeting
        self.replies = replies
        self.tagged = tagged
        self.commands: list[str] = []
        self.handlers: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> FakeMailServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        for handler in self.handlers:
            handler.cancel()
        await asyncio.gather(*self.handlers, return_exceptions=True)

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.handlers.add(asyncio.current_task())
        writer.write(self.greeting)
        try:
            while line := await reader.readline():
                words = line.decode("latin-1").split() or [""]
                tag = words[0] if self.tagged else ""
                name = words[1] if self.tagged and len(words) > 1 else words[-1]
                self.commands.append(name.upper())
                reply = self.replies.get(name.upper(), b"{tag} BAD unknown\r\n")
                if reply is None:
                    break
                writer.write(reply.replace(b"{tag}", tag.encode()))
        except ConnectionError:
            pass
        finally:
            writer.close()


async def probe_fake(
    server: FakeMailServer, protocol: str = "imap", timeout: float = 5
) -> ProbeReport:
    snapshot = make_snapshot()
    settings = ProbeSettings(
        host="127.0.0.1",
        protocol=protocol,
        port=server.port,
        context=snapshot.contexts.upstreams["mail"],
        server_name="localhost",
        timeout=timeout,
    )
    return await probe_server(settings)


IMAP_STARTTLS_GREETING = b"* OK [CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN] ready\r\n"


async def test_probe_closed_after_starttls_stays_offered() -> None:
    replies = {"STARTTLS": None}
    async with FakeMailServer(IMAP_STARTTLS_GREETING, replies) as server:
        report = await probe_fake(server)

    assert report.mode("starttls").offered
    assert not report.mode("starttls").usable
    assert report.chosen_mode() == "starttls"


async def test_probe_rejected_starttls_stays_offered() -> None:
    replies = {"STARTTLS": b"{tag} NO not now\r\n", "LOGOUT": None}
    async with FakeMailServer(IMAP_STARTTLS_GREETING, replies) as server:
        report = await probe_fake(server)

    assert report.mode("starttls").offered
    assert report.mode("starttls").detail == "server rejected STARTTLS"
    assert report.chosen_mode() == "starttls"


async def test_probe_stalled_handshake_fails_closed() -> None:
    replies = {"STARTTLS": b"{tag} OK begin\r\n"}
    async with FakeMailServer(IMAP_STARTTLS_GREETING, replies) as server:
        report = await probe_fake(server, timeout=0.5)

    assert report.mode("starttls").offered
    assert report.mode("starttls").detail == "timed out"
    assert report.chosen_mode() == "starttls"


async def test_probe_asks_capability_when_greeting_lacks_it() -> None:
    replies = {
        "CAPABILITY": b"* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\n{tag} OK done\r\n",
        "LOGOUT": None,
    }
    async with FakeMailServer(b"* OK ready\r\n", replies) as server:
        report = await probe_fake(server)

    assert "CAPABILITY" in server.commands
    assert not report.mode("starttls").offered
    assert report.mode("none").usable
    assert report.chosen_mode() == "none"


async def test_probe_preauth_greeting_is_unusable() -> None:
    async with FakeMailServer(b"* PREAUTH welcome\r\n", {}) as server:
        report = await probe_fake(server)

    assert not report.mode("none").usable
    assert "PREAUTH" in report.mode("none").detail
    assert report.chosen_mode() is None


async def test_probe_logindisabled_plain_is_unusable() -> None:
    greeting = b"* OK [CAPABILITY IMAP4rev1 LOGINDISABLED] ready\r\n"
    async with FakeMailServer(greeting, {"LOGOUT": None}) as server:
        report = await probe_fake(server)

    assert report.mode("none").offered
    assert not report.mode("none").usable


async def test_probe_pop3_without_stls() -> None:
    replies = {"CAPA": b"+OK list\r\nUSER\r\nUIDL\r\n.\r\n", "QUIT": None}
    async with FakeMailServer(b"+OK POP3 ready\r\n", replies, tagged=False) as server:
        report = await probe_fake(server, "pop3")

    assert not report.mode("starttls").offered
    assert report.mode("starttls").detail == "STLS is not in the server's capabilities"
    assert report.chosen_mode() == "none"


async def test_probe_pop3_stls_closed_stays_offered() -> None:
    replies = {"CAPA": b"+OK list\r\nSTLS\r\n.\r\n", "STLS": None}
    async with FakeMailServer(b"+OK POP3 ready\r\n", replies, tagged=False) as server:
        report = await probe_fake(server, "pop3")

    assert report.mode("starttls").offered
    assert report.chosen_mode() == "starttls"


async def test_probe_plain_port_is_not_implicit() -> None:
    async with FakeMailServer(IMAP_STARTTLS_GREETING, {"STARTTLS": None}) as server:
        report = await probe_fake(server)

    assert not report.mode("implicit").offered
    assert report.mode("implicit").reached
