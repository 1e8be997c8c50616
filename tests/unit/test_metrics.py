"""Unit tests of the Prometheus metrics and the upstream states behind /readyz."""

from __future__ import annotations

import ast
import asyncio
import datetime
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trustme
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest

import appliance.proxy as proxy_package
from appliance import metrics
from appliance.config import AppConfig
from appliance.metrics import (
    OUTCOME_LABELS,
    UPSTREAM_ERROR_REASONS,
    CertificateCache,
    Metrics,
    fixed_word,
    outcome_label,
    upstream_error_reason,
)
from appliance.proxy.guard import LOGIN_RESULTS
from appliance.proxy.routing import Route
from appliance.proxy.runtime import ReloadStatus

USER = "alice.secret-user@example.org"
PASSWORD = "pa55-w0rd-never-shown"
OUTCOME_VALUES = {
    *OUTCOME_LABELS.values(),
    "upstream_error",
    "client_tls_error",
    "other",
}


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # AppConfig reads APPLIANCE_* variables, so the caller's shell must not leak in.
    for name in list(os.environ):
        if name.upper().startswith("APPLIANCE_"):
            monkeypatch.delenv(name)


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def meters(registry: CollectorRegistry) -> Metrics:
    return Metrics(registry)


def fake_session(
    *,
    outcome: str = "closed by client",
    listener: str = "imap",
    upstream: str | None = "mail",
    mode: str = "starttls",
    connected: bool = True,
    tls_version: str | None = "TLSv1.3",
    phase: str = "relay",
    received: int = 100,
    sent: int = 2000,
    route: Any = None,
) -> Any:
    """Return an object with the Session attributes that the metrics read."""
    target = None if upstream is None else SimpleNamespace(name=upstream, mode=mode)
    tls_info = None if tls_version is None else (tls_version, "TLS_AES_256_GCM_SHA384")
    connection = SimpleNamespace(tls_info=tls_info) if connected else None
    return SimpleNamespace(
        env=SimpleNamespace(
            listener_name=listener, listener=SimpleNamespace(upstream="mail")
        ),
        outcome=outcome,
        phase=phase,
        user=USER,
        password=PASSWORD,
        client=SimpleNamespace(bytes_received=received, bytes_sent=sent),
        upstream=connection,
        upstream_target=target,
        route=route,
    )


def sample(registry: CollectorRegistry, metric: str, **labels: str) -> float | None:
    return registry.get_sample_value(metric, labels)


# Label mapping


@pytest.mark.parametrize(
    ("outcome", "label"),
    [
        ("closed by client", "closed_by_client"),
        ("closed by upstream", "closed_by_upstream"),
        ("idle timeout", "idle_timeout"),
        ("half-close timeout", "half_close_timeout"),
        ("pre-auth timeout", "pre_auth_timeout"),
        ("shut down in relay", "shutdown"),
        ("rejected: listener at max_connections", "rejected_max_connections"),
        (
            "rejected: client address at max_connections_per_address",
            "rejected_max_connections_per_address",
        ),
        ("rejected: not from a trusted PROXY network", "rejected_proxy_untrusted"),
        (
            "rejected: PROXY header from an untrusted address",
            "rejected_proxy_untrusted",
        ),
        ("rejected: no PROXY header", "rejected_proxy_missing"),
        ("rejected: invalid PROXY header", "rejected_proxy_invalid"),
        (
            "rejected: TLS handshake on a plaintext port",
            "rejected_tls_on_plaintext_port",
        ),
        ("upstream connect", "upstream_error"),
        ("upstream protocol error", "upstream_error"),
        ("client TLS handshake failed: wrong version number", "client_tls_error"),
        ("something new", "other"),
    ],
)
def test_outcome_label_maps_outcomes(outcome: str, label: str) -> None:
    assert outcome_label(outcome) == label


def session_rejection_outcomes() -> set[str]:
    """Return every `rejected: ...` string constant in the modules of appliance.proxy."""
    outcomes = set()
    for path in Path(proxy_package.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and node.value.startswith("rejected: ")
            ):
                outcomes.add(node.value)
    return outcomes


def test_every_session_rejection_has_label() -> None:
    outcomes = session_rejection_outcomes()
    assert "rejected: listener at max_connections" in outcomes
    for outcome in sorted(outcomes):
        assert outcome_label(outcome) != "other", outcome


@pytest.mark.parametrize(
    ("outcome", "reason"),
    [
        ("upstream connect", "connect"),
        ("upstream tls", "tls"),
        ("upstream protocol error", "protocol"),
        ("upstream made-up", "other"),
        ("closed by client", None),
    ],
)
def test_upstream_error_reason_parsing(outcome: str, reason: str | None) -> None:
    assert upstream_error_reason(outcome) == reason


@given(st.text(max_size=80))
def test_outcome_labels_stay_fixed_words(outcome: str) -> None:
    assert outcome_label(outcome) in OUTCOME_VALUES
    assert upstream_error_reason(outcome) in {*UPSTREAM_ERROR_REASONS, "other", None}


@given(st.text(max_size=80))
def test_fixed_word_rejects_free_text(value: str) -> None:
    result = fixed_word(value)
    assert result == value or result == "other"
    assert len(result) <= 32
    assert result.replace("_", "").replace("-", "").isalnum()


def test_fixed_word_keeps_code_words() -> None:
    assert fixed_word("applied") == "applied"
    assert fixed_word("Rejected Because X") == "other"


# Counters


def test_session_end_counts_outcome(
    meters: Metrics, registry: CollectorRegistry
) -> None:
    meters.session_ended(fake_session())
    value = sample(
        registry,
        "appliance_sessions_total",
        listener="imap",
        upstream="mail",
        outcome="closed_by_client",
    )
    assert value == 1.0


def test_session_end_counts_bytes(meters: Metrics, registry: CollectorRegistry) -> None:
    meters.session_ended(fake_session(received=100, sent=2000))
    meters.session_ended(fake_session(received=5, sent=7))
    labels = {"listener": "imap", "upstream": "mail"}
    received = sample(
        registry, "appliance_client_bytes_total", direction="received", **labels
    )
    sent = sample(registry, "appliance_client_bytes_total", direction="sent", **labels)
    assert received == 105.0
    assert sent == 2007.0


def test_upstream_error_counted_by_reason(
    meters: Metrics, registry: CollectorRegistry
) -> None:
    meters.session_ended(fake_session(outcome="upstream timeout", connected=False))
    value = sample(
        registry, "appliance_upstream_errors_total", upstream="mail", reason="timeout"
    )
    assert value == 1.0


def test_upstream_error_marks_state_failed(meters: Metrics) -> None:
    meters.session_ended(fake_session(outcome="upstream tls", connected=False))
    state = meters.upstreams["mail"]
    assert state.reachable is False
    assert state.error == "tls"
    assert state.checked_at is not None


def test_client_named_host_leaves_template_state(meters: Metrics) -> None:
    """A login that names a server under a host rule cannot mark the template down."""
    route = Route(user=b"alice", upstream="mail", host="any.example.org")
    failed = fake_session(outcome="upstream connect", connected=False, route=route)
    reached = fake_session(route=route)

    meters.session_ended(failed)
    meters.session_ended(reached)
    meters.login_finished(reached, "succeeded")

    assert "mail" not in meters.upstreams


def test_session_without_target_uses_listener_upstream(
    meters: Metrics, registry: CollectorRegistry
) -> None:
    session = fake_session(
        upstream=None, connected=False, outcome="client disconnected before login"
    )
    meters.session_ended(session)
    value = sample(
        registry,
        "appliance_sessions_total",
        listener="imap",
        upstream="mail",
        outcome="client_disconnected",
    )
    assert value == 1.0


@pytest.mark.parametrize("result", LOGIN_RESULTS)
def test_login_counted_by_result(
    meters: Metrics, registry: CollectorRegistry, result: str
) -> None:
    meters.login_finished(fake_session(phase="pre-auth"), result)
    value = sample(
        registry,
        "appliance_logins_total",
        listener="imap",
        upstream="mail",
        result=result,
    )
    assert value == 1.0


def test_unknown_login_result_counted_as_other(
    meters: Metrics, registry: CollectorRegistry
) -> None:
    meters.login_finished(fake_session(phase="pre-auth"), f"user {USER}")
    value = sample(
        registry,
        "appliance_logins_total",
        listener="imap",
        upstream="mail",
        result="other",
    )
    assert value == 1.0


@pytest.mark.parametrize("result", ["rejected", "cancelled", "invalid"])
def test_login_before_upstream_leaves_state(meters: Metrics, result: str) -> None:
    meters.login_finished(fake_session(phase="pre-auth"), result)
    assert "mail" not in meters.upstreams


def test_unavailable_login_leaves_state(meters: Metrics) -> None:
    # The upstream connection exists, but it failed during the login.
    meters.login_finished(fake_session(phase="pre-auth"), "unavailable")
    assert "mail" not in meters.upstreams


def test_login_without_upstream_uses_listener_upstream(
    meters: Metrics, registry: CollectorRegistry
) -> None:
    session = fake_session(upstream=None, connected=False, phase="pre-auth")
    meters.login_finished(session, "rejected")
    value = sample(
        registry,
        "appliance_logins_total",
        listener="imap",
        upstream="mail",
        result="rejected",
    )
    assert value == 1.0


def test_login_records_upstream_tls_state(meters: Metrics) -> None:
    meters.login_finished(
        fake_session(mode="implicit", tls_version="TLSv1.2"), "succeeded"
    )
    state = meters.upstreams["mail"]
    assert state.reachable is True
    assert state.mode == "implicit"
    assert state.tls_version == "TLSv1.2"
    assert state.error is None


def test_closed_connection_keeps_tls_version(meters: Metrics) -> None:
    meters.login_finished(fake_session(tls_version="TLSv1.3"), "succeeded")
    meters.session_ended(fake_session(tls_version=None))
    assert meters.upstreams["mail"].tls_version == "TLSv1.3"


def test_plain_connection_clears_tls_version(meters: Metrics) -> None:
    meters.login_finished(fake_session(tls_version="TLSv1.3"), "succeeded")
    meters.login_finished(fake_session(mode="none", tls_version=None), "failed")
    assert meters.upstreams["mail"].mode == "none"
    assert meters.upstreams["mail"].tls_version is None


@pytest.mark.parametrize(
    ("mode", "result"), [("implicit", "implicit"), (None, "failed")]
)
def test_probe_counted_by_result(
    meters: Metrics, registry: CollectorRegistry, mode: str | None, result: str
) -> None:
    meters.probe_finished("mail", mode)
    value = sample(registry, "appliance_probes_total", upstream="mail", result=result)
    assert value == 1.0


def test_failed_probe_marks_upstream_unreachable(meters: Metrics) -> None:
    meters.probe_finished("mail", None)
    assert meters.upstreams["mail"].reachable is False
    assert meters.upstreams["mail"].error == "probe"


def test_reload_outcome_is_sanitized(
    meters: Metrics, registry: CollectorRegistry
) -> None:
    meters.reload_finished("applied")
    meters.reload_finished("Listeners.imap: cannot listen on 127.0.0.1:143")
    assert sample(registry, "appliance_reloads_total", outcome="applied") == 1.0
    assert sample(registry, "appliance_reloads_total", outcome="other") == 1.0


def test_exposition_never_contains_credentials(
    meters: Metrics, registry: CollectorRegistry
) -> None:
    session = fake_session()
    for result in LOGIN_RESULTS:
        meters.login_finished(session, result)
    meters.session_ended(session)
    meters.session_ended(fake_session(outcome=f"client {USER} {PASSWORD}"))
    text = generate_latest(registry).decode()
    assert USER not in text
    assert PASSWORD not in text
    assert "alice" not in text


# Hooks


def test_hook_swallows_metric_errors() -> None:
    broken = SimpleNamespace(env=None, outcome="closed by client")
    metrics.record_session_end(broken)  # must not raise
    metrics.record_login(broken, "succeeded")


# Scrape-time gauges


class FakeServer:
    def __init__(self, serving: bool) -> None:
        self.serving = serving

    def is_serving(self) -> bool:
        return self.serving


def fake_runtime(
    config: AppConfig, sessions: list[Any], serving: dict[str, bool]
) -> Any:
    listeners = {
        name: SimpleNamespace(server=FakeServer(up)) for name, up in serving.items()
    }
    return SimpleNamespace(
        snapshot=SimpleNamespace(config=config),
        listeners=listeners,
        sessions=sessions,
        status=ReloadStatus(version=3, loaded_at=1_700_000_000.0, outcome="applied"),
        stopping=asyncio.Event(),
    )


@pytest.fixture(scope="module")
def listener_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, float]:
    folder = tmp_path_factory.mktemp("cert")
    ca = trustme.CA()
    expires = datetime.datetime(2031, 5, 17, 12, 0, tzinfo=datetime.UTC)
    leaf = ca.issue_cert("localhost", not_after=expires)
    cert_file = folder / "cert.pem"
    key_file = folder / "key.pem"
    leaf.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    leaf.private_key_pem.write_to_path(str(key_file))
    return cert_file, key_file, expires.timestamp()


def two_listener_config(cert_file: Path, key_file: Path) -> AppConfig:
    return AppConfig(
        listeners={
            "imap": {"protocol": "imap", "port": 1143, "upstream": "mail"},
            "imaps": {
                "protocol": "imap",
                "port": 1993,
                "tls": "implicit",
                "cert_file": cert_file,
                "key_file": key_file,
                "upstream": "mail",
            },
        },
        upstreams={
            "mail": {"host": "mail.example.org"},
            "spare": {"host": "192.0.2.1"},
        },
    )


def test_active_sessions_by_phase(
    meters: Metrics,
    registry: CollectorRegistry,
    listener_cert: tuple[Path, Path, float],
) -> None:
    config = two_listener_config(*listener_cert[:2])
    sessions = [fake_session(phase="relay"), fake_session(phase="relay")]
    sessions.append(fake_session(phase="pre-auth", listener="imaps"))
    meters.bind_runtime(fake_runtime(config, sessions, {"imap": True, "imaps": True}))
    labels = {"upstream": "mail"}
    name = "appliance_sessions_active"
    assert sample(registry, name, listener="imap", phase="relay", **labels) == 2.0
    assert sample(registry, name, listener="imaps", phase="pre-auth", **labels) == 1.0
    assert sample(registry, name, listener="imaps", phase="relay", **labels) == 0.0


def test_listener_up_reflects_server(
    meters: Metrics,
    registry: CollectorRegistry,
    listener_cert: tuple[Path, Path, float],
) -> None:
    config = two_listener_config(*listener_cert[:2])
    meters.bind_runtime(fake_runtime(config, [], {"imap": True, "imaps": False}))
    assert sample(registry, "appliance_listener_up", listener="imap") == 1.0
    assert sample(registry, "appliance_listener_up", listener="imaps") == 0.0


def test_certificate_expiry_of_listener(
    meters: Metrics,
    registry: CollectorRegistry,
    listener_cert: tuple[Path, Path, float],
) -> None:
    cert_file, key_file, expires = listener_cert
    config = two_listener_config(cert_file, key_file)
    meters.bind_runtime(fake_runtime(config, [], {"imap": True, "imaps": True}))
    metric = "appliance_certificate_expiry_timestamp_seconds"
    assert sample(registry, metric, kind="listener", name="imaps") == expires
    assert sample(registry, metric, kind="listener", name="imap") is None


def test_config_version_gauge(
    meters: Metrics,
    registry: CollectorRegistry,
    listener_cert: tuple[Path, Path, float],
) -> None:
    config = two_listener_config(*listener_cert[:2])
    meters.bind_runtime(fake_runtime(config, [], {}))
    assert sample(registry, "appliance_config_version") == 3.0
    loaded = sample(registry, "appliance_config_loaded_timestamp_seconds")
    assert loaded == 1_700_000_000.0


def test_tls_mode_gauge_marks_current_mode(
    meters: Metrics, registry: CollectorRegistry
) -> None:
    meters.login_finished(fake_session(mode="starttls"), "succeeded")
    name = "appliance_upstream_tls_mode"
    assert sample(registry, name, upstream="mail", mode="starttls") == 1.0
    assert sample(registry, name, upstream="mail", mode="implicit") == 0.0
    assert sample(registry, "appliance_upstream_reachable", upstream="mail") == 1.0


def test_removed_upstream_drops_from_gauges(
    meters: Metrics,
    registry: CollectorRegistry,
    listener_cert: tuple[Path, Path, float],
) -> None:
    meters.probe_finished("retired", "implicit")
    config = two_listener_config(*listener_cert[:2])
    meters.bind_runtime(fake_runtime(config, [], {}))
    assert sample(registry, "appliance_upstream_reachable", upstream="retired") is None


# Certificate cache


def test_certificate_cache_rereads_changed_file(tmp_path: Path) -> None:
    ca = trustme.CA()
    path = tmp_path / "cert.pem"
    first = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
    second = datetime.datetime(2032, 1, 1, tzinfo=datetime.UTC)
    cache = CertificateCache()
    ca.issue_cert("a.example", not_after=first).cert_chain_pems[0].write_to_path(
        str(path)
    )
    assert cache.expiry(path) == first.timestamp()
    ca.issue_cert("b.example", not_after=second).cert_chain_pems[0].write_to_path(
        str(path)
    )
    os.utime(path, ns=(0, 1))  # a different mtime, whatever the clock's resolution
    assert cache.expiry(path) == second.timestamp()


def test_certificate_cache_ignores_invalid_file(tmp_path: Path) -> None:
    path = tmp_path / "cert.pem"
    path.write_text("not a certificate\n")
    assert CertificateCache().expiry(path) is None
    assert CertificateCache().expiry(tmp_path / "missing.pem") is None
