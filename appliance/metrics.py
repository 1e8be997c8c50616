"""Prometheus metrics of the running appliance, and the upstream states that /readyz shows.

Label values come only from config names (listener and upstream keys, which the config
restricts to letters, digits, `-` and `_`) and from fixed words in code. A user name, a
password or any text a peer sent never becomes a label value.

Counters move when something finishes: a session ends, a login gets its outcome, a probe or
a reload completes. Gauges that describe the present (active sessions, listeners, certificate
expiry) are computed from the runtime when Prometheus scrapes.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509
from loguru import logger
from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from appliance.files import MAX_CERTIFICATE_FILE_SIZE, read_regular
from appliance.proxy.guard import LOGIN_RESULTS

if TYPE_CHECKING:
    from appliance.proxy.runtime import Runtime
    from appliance.proxy.session import Session

TLS_MODES = ("implicit", "starttls", "none")
UPSTREAM_ERROR_REASONS = frozenset(
    {
        "connect",
        "timeout",
        "tls",
        "starttls",
        "preauth",
        "greeting",
        "closed",
        "protocol",
        "policy",
    }
)
SESSION_PHASES = ("pre-auth", "relay", "closing")
# Session outcomes (the text of the session summary log line) mapped to label values.
# Outcomes that carry details, such as a client's TLS error, are matched by prefix below.
OUTCOME_LABELS = {
    "closed by client": "closed_by_client",
    "closed by upstream": "closed_by_upstream",
    "logged out before login": "logged_out_before_login",
    "idle timeout": "idle_timeout",
    "half-close timeout": "half_close_timeout",
    "pre-auth timeout": "pre_auth_timeout",
    "client protocol error": "client_protocol_error",
    "client disconnected before login": "client_disconnected",
    "rejected: listener at max_connections": "rejected_max_connections",
    "rejected: client address at max_connections_per_address": (
        "rejected_max_connections_per_address"
    ),
    "rejected: not from a trusted PROXY network": "rejected_proxy_untrusted",
    "rejected: PROXY header from an untrusted address": "rejected_proxy_untrusted",
    "rejected: no PROXY header": "rejected_proxy_missing",
    "rejected: invalid PROXY header": "rejected_proxy_invalid",
    "rejected: TLS handshake on a plaintext port": "rejected_tls_on_plaintext_port",
    "shut down before login": "shutdown",
    "shut down in relay": "shutdown",
    "internal error": "internal_error",
    "cancelled": "cancelled",
    "closed": "closed",
}
_FIXED_WORD = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
# A broken metrics update is logged this many times, then only counted.
MAX_FAILURE_LOGS = 10


def outcome_label(outcome: str) -> str:
    """Return the fixed label value for a session outcome."""
    if outcome in OUTCOME_LABELS:
        return OUTCOME_LABELS[outcome]
    if outcome.startswith("upstream "):
        return "upstream_error"
    if outcome.startswith("client "):
        return "client_tls_error"
    return "other"


def upstream_error_reason(outcome: str) -> str | None:
    """Return the `UpstreamError.reason` in a session outcome, or None for other outcomes."""
    if outcome == "upstream protocol error":
        return "protocol"
    if not outcome.startswith("upstream "):
        return None
    reason = outcome.removeprefix("upstream ")
    return reason if reason in UPSTREAM_ERROR_REASONS else "other"


def fixed_word(value: str) -> str:
    """Return `value` when it looks like a fixed word from code, else `other`."""
    return value if _FIXED_WORD.match(value) else "other"


@dataclass
class UpstreamState:
    """Last seen state of an upstream, from its latest session or probe."""

    reachable: bool | None = None
    """Whether the last attempt got through connect, TLS and greeting; None before any."""
    mode: str | None = None
    """TLS mode of the last successful connection: implicit, starttls or none."""
    tls_version: str | None = None
    """Negotiated TLS version of that connection, such as TLSv1.3."""
    error: str | None = None
    """Reason of the last failure, one of UPSTREAM_ERROR_REASONS, or None."""
    checked_at: float | None = None
    """Unix time of the last attempt."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "reachable": self.reachable,
            "tls_mode": self.mode,
            "tls_version": self.tls_version,
            "error": self.error,
            "checked_at": iso_time(self.checked_at),
        }


class Metrics:
    """The appliance's metrics on one registry, and the last seen state of each upstream."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.runtime: Runtime | None = None
        self.upstreams: dict[str, UpstreamState] = {}
        self.certificates = CertificateCache()
        self.sessions = Counter(
            "appliance_sessions",
            "Sessions that ended, by listener, upstream and outcome.",
            ["listener", "upstream", "outcome"],
            registry=registry,
        )
        self.client_bytes = Counter(
            "appliance_client_bytes",
            "Bytes received from (direction=received) and sent to (direction=sent) "
            "clients, counted when the session ends.",
            ["listener", "upstream", "direction"],
            registry=registry,
        )
        self.logins = Counter(
            "appliance_logins",
            "Login attempts by result, the word of the `login <result>:` log line: "
            "succeeded, failed, rejected, cancelled, invalid or unavailable.",
            ["listener", "upstream", "result"],
            registry=registry,
        )
        self.upstream_errors = Counter(
            "appliance_upstream_errors",
            "Sessions that ended because the upstream could not be used, by reason.",
            ["upstream", "reason"],
            registry=registry,
        )
        self.upstream_handshakes = Counter(
            "appliance_upstream_tls_handshakes",
            "Completed TLS handshakes with upstreams, by whether they resumed a stored "
            "session (resumed=yes or no).",
            ["upstream", "resumed"],
            registry=registry,
        )
        self.probes = Counter(
            "appliance_probes",
            "TLS probes of upstreams, by the mode chosen (implicit, starttls, none) "
            "or failed.",
            ["upstream", "result"],
            registry=registry,
        )
        self.reloads = Counter(
            "appliance_reloads",
            "Config reloads, by outcome.",
            ["outcome"],
            registry=registry,
        )
        registry.register(StateCollector(self))

    def bind_runtime(self, runtime: Runtime | None) -> None:
        """Set the runtime that the scrape-time gauges read; None removes those gauges."""
        self.runtime = runtime

    def upstream_handshake_finished(self, upstream: str, resumed: bool) -> None:
        self.upstream_handshakes.labels(upstream, "yes" if resumed else "no").inc()

    def session_ended(self, session: Session) -> None:
        listener = session.env.listener_name
        upstream = upstream_name(session)
        self.sessions.labels(listener, upstream, outcome_label(session.outcome)).inc()
        received = self.client_bytes.labels(listener, upstream, "received")
        received.inc(session.client.bytes_received)
        self.client_bytes.labels(listener, upstream, "sent").inc(
            session.client.bytes_sent
        )

        reason = upstream_error_reason(session.outcome)
        if reason is not None:
            self.upstream_errors.labels(upstream, reason).inc()
            if not _client_named_host(session):
                self._mark_failed(upstream, reason)
        elif session.upstream is not None and session.upstream_target is not None:
            # The upstream connection was set up; a closed transport has no TLS version.
            self._mark_reachable(session)

    def login_finished(self, session: Session, result: str) -> None:
        """Count a login outcome, one of LOGIN_RESULTS.

        A login that succeeded or failed also marks its upstream as reachable. The
        other results can come before any upstream connection or, for `unavailable`,
        after a failure of the upstream, so they leave its state alone.
        """
        label = result if result in LOGIN_RESULTS else "other"
        upstream = upstream_name(session)
        self.logins.labels(session.env.listener_name, upstream, label).inc()
        if label in ("succeeded", "failed"):
            self._mark_reachable(session)

    def probe_finished(self, upstream: str, mode: str | None) -> None:
        """Count a probe; `mode` is the mode it chose, None when it found none usable."""
        result = mode if mode in TLS_MODES else "failed"
        self.probes.labels(upstream, result).inc()
        state = self.upstreams.setdefault(upstream, UpstreamState())
        state.checked_at = time.time()
        if result == "failed":
            state.reachable = False
            state.error = "probe"
        else:
            state.reachable = True
            state.error = None
            if state.mode != result:
                state.tls_version = None
            state.mode = result

    def reload_finished(self, outcome: str) -> None:
        self.reloads.labels(fixed_word(outcome)).inc()

    def _mark_reachable(self, session: Session) -> None:
        target = session.upstream_target
        if target is None or _client_named_host(session):
            return
        state = self.upstreams.setdefault(target.name, UpstreamState())
        tls_info = session.upstream.tls_info if session.upstream is not None else None
        if tls_info is not None:
            state.tls_version = tls_info[0]
        elif target.mode == "none" or state.mode != target.mode:
            state.tls_version = None
        state.mode = target.mode
        state.reachable = True
        state.error = None
        state.checked_at = time.time()

    def _mark_failed(self, upstream: str, reason: str) -> None:
        state = self.upstreams.setdefault(upstream, UpstreamState())
        state.reachable = False
        state.error = reason
        state.checked_at = time.time()


def _client_named_host(session: Session) -> bool:
    """Return whether the session went to a host that its login named by a host rule.

    Such a host takes the place of the template upstream's host. The template's state
    would then follow whichever server the last client named, so it is left alone.
    """
    return session.route is not None and session.route.host is not None


def upstream_name(session: Session) -> str:
    """Return the config name of the upstream a session used or would have used."""
    if session.upstream_target is not None:
        return session.upstream_target.name
    return session.env.listener.upstream or "none"


class StateCollector(Collector):
    """Gauges computed at scrape time from the runtime and the upstream states."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        yield from self._upstream_families()
        runtime = self.metrics.runtime
        if runtime is not None:
            yield from self._runtime_families(runtime)

    def _upstream_families(self) -> Iterator[Metric]:
        reachable = GaugeMetricFamily(
            "appliance_upstream_reachable",
            "1 when the last session or probe got through to the upstream, 0 when it "
            "failed; absent before the first attempt.",
            labels=["upstream"],
        )
        modes = GaugeMetricFamily(
            "appliance_upstream_tls_mode",
            "1 for the TLS mode of the last successful connection to the upstream.",
            labels=["upstream", "mode"],
        )
        configured = self._configured_upstreams()
        for name, state in sorted(self.metrics.upstreams.items()):
            if configured is not None and name not in configured:
                continue
            if state.reachable is not None:
                reachable.add_metric([name], 1.0 if state.reachable else 0.0)
            if state.mode is not None:
                for mode in TLS_MODES:
                    modes.add_metric([name, mode], 1.0 if mode == state.mode else 0.0)
        yield reachable
        yield modes

    def _configured_upstreams(self) -> set[str] | None:
        runtime = self.metrics.runtime
        if runtime is None:
            return None
        return set(runtime.snapshot.config.upstreams)

    def _runtime_families(self, runtime: Runtime) -> Iterator[Metric]:
        yield self._active_sessions(runtime)
        yield self._listener_up(runtime)
        yield self._certificate_expiry(runtime)

        status = runtime.status
        version = GaugeMetricFamily(
            "appliance_config_version",
            "Version of the config in use; 1 at start, one more per applied reload.",
            value=status.version,
        )
        loaded = GaugeMetricFamily(
            "appliance_config_loaded_timestamp_seconds",
            "Unix time when the config in use was loaded.",
            value=status.loaded_at,
        )
        yield version
        yield loaded

    def _active_sessions(self, runtime: Runtime) -> Metric:
        family = GaugeMetricFamily(
            "appliance_sessions_active",
            "Open sessions by listener, upstream and phase (pre-auth, relay, closing).",
            labels=["listener", "upstream", "phase"],
        )
        counts: dict[tuple[str, str, str], int] = {}
        for name, listener in runtime.snapshot.config.listeners.items():
            for phase in SESSION_PHASES:
                counts[(name, listener.upstream or "none", phase)] = 0
        for session in runtime.sessions:
            phase = session.phase if session.phase in SESSION_PHASES else "other"
            key = (session.env.listener_name, upstream_name(session), phase)
            counts[key] = counts.get(key, 0) + 1
        for labels, count in sorted(counts.items()):
            family.add_metric(list(labels), count)
        return family

    def _listener_up(self, runtime: Runtime) -> Metric:
        family = GaugeMetricFamily(
            "appliance_listener_up",
            "1 when the listener accepts connections, else 0.",
            labels=["listener"],
        )
        for name in runtime.snapshot.config.listeners:
            family.add_metric([name], 1.0 if listener_accepting(runtime, name) else 0.0)
        return family

    def _certificate_expiry(self, runtime: Runtime) -> Metric:
        family = GaugeMetricFamily(
            "appliance_certificate_expiry_timestamp_seconds",
            "Unix time when the certificate file expires (its first, leaf certificate): "
            "listener certificates (kind=listener) and upstream client certificates "
            "(kind=upstream_client).",
            labels=["kind", "name"],
        )
        config = runtime.snapshot.config
        files = [
            ("listener", name, item.cert_file)
            for name, item in config.listeners.items()
        ]
        files += [
            ("upstream_client", name, item.client_cert_file)
            for name, item in config.upstreams.items()
        ]
        for kind, name, path in files:
            if path is None:
                continue
            expiry = self.metrics.certificates.expiry(path)
            if expiry is not None:
                family.add_metric([kind, name], expiry)
        return family


def listener_accepting(runtime: Runtime, name: str) -> bool:
    """Return whether the runtime's listener `name` is bound and accepting."""
    listener = runtime.listeners.get(name)
    server = getattr(listener, "server", None)
    return server is not None and server.is_serving()


class CertificateCache:
    """Expiry times of PEM certificate files, re-read when a file's size or mtime changes.

    NOTE: this reads the file on disk, which can be newer than the certificate a listener
    loaded when a reload of that file failed.
    """

    def __init__(self) -> None:
        self._entries: dict[Path, tuple[tuple[int, int], float | None]] = {}

    def expiry(self, path: Path) -> float | None:
        """Return the Unix time when the first certificate in `path` expires, or None."""
        try:
            stat = path.stat()
        except OSError:
            return None
        signature = (stat.st_mtime_ns, stat.st_size)
        cached = self._entries.get(path)
        if cached is not None and cached[0] == signature:
            return cached[1]
        value = _read_expiry(path)
        self._entries[path] = (signature, value)
        return value


def _read_expiry(path: Path) -> float | None:
    try:
        certificates = x509.load_pem_x509_certificates(
            read_regular(path, MAX_CERTIFICATE_FILE_SIZE)
        )
    except (OSError, ValueError) as exc:
        logger.warning("cannot read the expiry time of certificate {}: {}", path, exc)
        return None
    return certificates[0].not_valid_after_utc.timestamp()


def iso_time(value: float | None) -> str | None:
    """Return a Unix time as ISO 8601 UTC text, such as 2024-01-01T10:00:00Z."""
    if value is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(value))


def build_registry() -> CollectorRegistry:
    """Return a registry with the process, platform and garbage collector metrics."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


# Each counter would otherwise export a second `_created` series, which doubles the
# series count and which this appliance's dashboards have no use for.
disable_created_metrics()
REGISTRY = build_registry()
METRICS = Metrics(REGISTRY)
_failures = 0


# The hooks below run inside session, probe and reload code. They catch and log every
# Exception, so a bug in a metric cannot end a session or skip its cleanup.


def record_session_end(session: Session) -> None:
    """Count a finished session: outcome, bytes and upstream errors."""
    _guarded(METRICS.session_ended, session)


def record_login(session: Session, result: str) -> None:
    """Count a login outcome, a word of `LOGIN_RESULTS`, as its log line does."""
    _guarded(METRICS.login_finished, session, result)


def record_upstream_handshake(upstream: str, resumed: bool) -> None:
    """Count a completed TLS handshake with `upstream`, resumed or full."""
    _guarded(METRICS.upstream_handshake_finished, upstream, resumed)


def record_probe(upstream: str, mode: str | None) -> None:
    """Count a TLS probe of `upstream`; `mode` is the chosen mode or None on failure."""
    _guarded(METRICS.probe_finished, upstream, mode)


def record_reload(outcome: str) -> None:
    """Count a config reload; `outcome` is a fixed word such as applied or rejected."""
    _guarded(METRICS.reload_finished, outcome)


def _guarded(function: Any, *args: Any) -> None:
    global _failures
    try:
        function(*args)
    except Exception:  # noqa: BLE001 - metrics must not break the caller
        _failures += 1
        if _failures <= MAX_FAILURE_LOGS:
            logger.opt(exception=True).error(
                "metrics update {} failed ({} failures so far)",
                function.__name__,
                _failures,
            )
