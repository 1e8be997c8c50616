"""The five workloads. Each returns rows of samples: one list per candidate, one sample
per run, with runs interleaved across candidates so that drift in machine load hits
every candidate alike."""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from benchmarks.candidates import FIRST_BULK_MESSAGE, Backend, Candidate
from benchmarks.loadgen import (
    WorkerPool,
    endpoint_dict,
    idle_worker,
    noop_latency,
    run_workers,
    session_rate_worker,
    throughput_worker,
)
from benchmarks.procinfo import (
    children_cpu_seconds,
    process_tree,
    tree_cpu_seconds,
    tree_pss_kib,
)
from tests.support.certs import TestPKI

MIB = 1024 * 1024
# Seconds between setting up a measurement and its window, for workers to start.
START_DELAY = 0.5
# Session-rate clients start this long before the window, so the window measures a
# steady state.
SESSION_RATE_WARMUP = 1.0
MEMORY_WARMUP_SESSIONS = 20


@dataclass
class Plan:
    """Sizes and durations of one benchmark run."""

    runs: int
    workers: int
    throughput_sessions: int
    throughput_seconds: float
    bulk_messages: int
    session_rate_concurrency: int
    session_rate_seconds: float
    idle_sessions: int
    latency_count: int
    reload_seconds: float
    reloads: int = 20

    @property
    def users(self) -> int:
        return max(self.idle_sessions, self.throughput_sessions, 50)


def prepare_backend(plan: Plan, prefix: str) -> tuple[Path, TestPKI, Backend]:
    """Create a temporary folder, test certificates and a Backend sized for `plan`.

    The folder is world-readable, because Dovecot's unprivileged processes read the
    certificates in it. The caller starts the backend and removes the folder.
    """
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    workdir.chmod(0o755)
    pki = TestPKI(workdir / "pki")
    backend = Backend(
        pki,
        users=plan.users,
        bulk_users=plan.throughput_sessions,
        bulk_messages=plan.bulk_messages,
        connection_limit=plan.idle_sessions + 500,
    )
    return workdir, pki, backend


@dataclass
class Row:
    """One measured quantity, with samples per candidate."""

    workload: str
    name: str
    unit: str
    higher_is_better: bool
    samples: dict[str, list[float]] = field(default_factory=dict)
    details: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    not_run: dict[str, str] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    def add(self, candidate: str, value: float | None, detail: dict[str, Any]) -> None:
        self.details.setdefault(candidate, []).append(detail)
        if value is not None:
            self.samples.setdefault(candidate, []).append(value)


class Bench:
    """The backend, the candidates and the plan that every workload shares."""

    def __init__(
        self, plan: Plan, backend: Backend, candidates: list[Candidate], log: Any
    ) -> None:
        self.plan = plan
        self.backend = backend
        self.candidates = candidates
        self.log = log

    def users_for(self, count: int, offset: int = 0) -> list[tuple[str, str]]:
        names = self.backend.user_names
        chosen = [names[(offset + i) % len(names)] for i in range(count)]
        return [(name, self.backend.password(name)) for name in chosen]

    def split(self, items: list[Any]) -> list[list[Any]]:
        """Divide items among the worker processes, round robin."""
        workers = self.plan.workers
        return [items[i::workers] for i in range(workers) if items[i::workers]]

    def window(self, warmup: float, seconds: float) -> tuple[float, float]:
        start_at = time.monotonic() + START_DELAY + warmup
        return start_at, start_at + seconds


class CpuMeter:
    """CPU use of the candidate, the backend and the load generator over one sample.

    Shown as percent of one CPU, averaged over the whole sample including logins, so
    it shows which process was busy, not an exact cost per byte.
    """

    def __init__(self, bench: Bench, candidate: Candidate) -> None:
        self.groups = {"candidate": candidate.cpu_roots()}
        backend_pid = bench.backend.server.pid
        if candidate.name != "direct" and backend_pid is not None:
            self.groups["backend"] = [backend_pid]

    def __enter__(self) -> Self:
        self.started = time.monotonic()
        self.before = {
            name: tree_cpu_seconds(roots) for name, roots in self.groups.items()
        }
        self.before["load_generator"] = children_cpu_seconds()
        return self

    def __exit__(self, *exc: object) -> None:
        elapsed = time.monotonic() - self.started
        after = {name: tree_cpu_seconds(roots) for name, roots in self.groups.items()}
        after["load_generator"] = children_cpu_seconds()
        self.percent = {
            name: round((after[name] - self.before[name]) / elapsed * 100, 1)
            for name in after
        }


# Throughput


THROUGHPUT_ROWS = [
    ("imap", "plain"),
    ("pop3", "plain"),
    ("imap", "upstream_tls"),
    ("pop3", "upstream_tls"),
]


def throughput(bench: Bench) -> list[Row]:
    rows = {
        key: Row("throughput", f"{key[0]} {key[1]}", "MiB/s", True)
        for key in THROUGHPUT_ROWS
    }
    for run in range(bench.plan.runs):
        for key, row in rows.items():
            for candidate in bench.candidates:
                sample = throughput_sample(bench, candidate, *key)
                _record(row, candidate, sample, "MiB_per_s")
                bench.log(
                    f"throughput {row.name} {candidate.name} run {run + 1}: {sample}"
                )
    _copy_direct_plain(rows)
    return list(rows.values())


def throughput_sample(
    bench: Bench, candidate: Candidate, protocol: str, path: str
) -> dict[str, Any] | None:
    """Measure MiB/s of bulk fetches through one candidate; None where not offered."""
    if candidate.name == "direct" and path == "upstream_tls":
        return None
    endpoint = candidate.endpoint(protocol, path)
    if endpoint is None:
        return None

    plan = bench.plan
    bulk = bench.backend.bulk_users
    users = [
        (user, bench.backend.password(user))
        for user in bulk[: plan.throughput_sessions]
    ]
    start_at, stop_at = bench.window(0.0, plan.throughput_seconds)
    jobs = [
        {
            "endpoint": endpoint_dict(endpoint),
            "users": part,
            "first": FIRST_BULK_MESSAGE,
            "last": FIRST_BULK_MESSAGE + bench.backend.bulk_messages - 1,
            "start_at": start_at,
            "stop_at": stop_at,
        }
        for part in bench.split(users)
    ]
    with CpuMeter(bench, candidate) as meter:
        results = run_workers(
            throughput_worker, jobs, timeout=plan.throughput_seconds + 30
        )

    errors = [r["error"] for r in results if "error" in r]
    total = sum(r.get("bytes", 0) for r in results)
    failures = [f for r in results for f in r.get("failures", [])]
    return {
        "MiB_per_s": total / MIB / plan.throughput_seconds,
        "bytes": total,
        "cpu_percent": meter.percent,
        "failures": failures[:10] + errors,
        "failure_count": len(failures) + len(errors),
    }


# Session rate


SESSION_RATE_PATHS = ("plain", "client_tls", "upstream_tls")


def session_rate(bench: Bench) -> list[Row]:
    rows = {
        path: Row("session_rate", f"imap {path}", "sessions/s", True)
        for path in SESSION_RATE_PATHS
    }
    for run in range(bench.plan.runs):
        for path, row in rows.items():
            for candidate in bench.candidates:
                if candidate.name == "direct" and path == "upstream_tls":
                    continue
                endpoint = candidate.endpoint("imap", path)
                sample = None
                if endpoint is not None:
                    seconds = bench.plan.session_rate_seconds
                    sample = session_rate_sample(bench, candidate, endpoint, seconds)
                _record(row, candidate, sample, "sessions_per_s")
                bench.log(
                    f"session rate {row.name} {candidate.name} run {run + 1}: {sample}"
                )
    _copy_direct_plain({("imap", path): row for path, row in rows.items()})
    return list(rows.values())


def session_rate_sample(
    bench: Bench, candidate: Candidate, endpoint: Any, seconds: float
) -> dict[str, Any]:
    plan = bench.plan
    concurrency = plan.session_rate_concurrency
    start_at, stop_at = bench.window(SESSION_RATE_WARMUP, seconds)
    jobs = [
        {
            "endpoint": endpoint_dict(endpoint),
            "users": bench.users_for(len(bench.backend.user_names), offset=index * 7),
            "concurrency": concurrency,
            "start_at": start_at,
            "stop_at": stop_at,
        }
        for index in range(plan.workers)
    ]
    with CpuMeter(bench, candidate) as meter:
        results = run_workers(session_rate_worker, jobs, timeout=seconds + 40)
    errors = [r["error"] for r in results if "error" in r]
    sessions = sum(r.get("sessions", 0) for r in results)
    failures = [f for r in results for f in r.get("failures", [])]
    return {
        "sessions_per_s": sessions / seconds,
        "sessions": sessions,
        "cpu_percent": meter.percent,
        "failures": failures[:10] + errors,
        "failure_count": sum(r.get("failure_count", 0) for r in results) + len(errors),
    }


# Memory per idle session


def idle_memory(bench: Bench) -> list[Row]:
    row = Row("memory", "PSS per idle IMAP session", "KiB", False)
    for run in range(bench.plan.runs):
        for candidate in bench.candidates:
            sample = _idle_memory_sample(bench, candidate)
            _record(row, candidate, sample, "KiB_per_session")
            bench.log(f"memory {candidate.name} run {run + 1}: {sample}")
    return [row]


def _idle_memory_sample(bench: Bench, candidate: Candidate) -> dict[str, Any] | None:
    endpoint = candidate.endpoint("imap", "plain")
    if endpoint is None:
        return None
    plan = bench.plan
    _wait_for_backend_idle(bench)
    if candidate.name != "direct":
        # A process keeps freed heap pages, so each sample starts from a fresh one.
        # Direct's per-session cost is its mail processes, which exit with the sessions.
        candidate.stop()
        candidate.start()
    # First sessions pay for one-off allocations (imports, caches, pools), which are
    # not per-session costs, so a few run before the baseline.
    warmup = _hold_idle_sessions(
        bench, endpoint, bench.users_for(MEMORY_WARMUP_SESSIONS)
    )
    warmup.release()
    warmup.collect(timeout=60)
    warmup.join()
    _wait_for_backend_idle(bench)

    roots = candidate.memory_roots()
    before = tree_pss_kib(roots)
    pool = _hold_idle_sessions(bench, endpoint, bench.users_for(plan.idle_sessions))
    try:
        opened = pool.opened
        # Let buffers from the login burst settle before reading PSS.
        time.sleep(2.0)
        after = tree_pss_kib(roots)
        processes = len({pid for root in roots for pid in process_tree(root)})
        pool.release()
        results = pool.collect(timeout=60)
    finally:
        pool.join()

    failures = [f for r in results for f in r.get("failures", [])]
    errors = [r["error"] for r in results if "error" in r]
    return {
        "KiB_per_session": (after - before) / opened if opened else None,
        "sessions": opened,
        "pss_before_kib": before,
        "pss_after_kib": after,
        "processes": processes,
        "failures": failures[:10] + errors,
        "failure_count": sum(r.get("failure_count", 0) for r in results) + len(errors),
    }


def _hold_idle_sessions(
    bench: Bench, endpoint: Any, users: list[tuple[str, str]]
) -> WorkerPool:
    """Start workers that open sessions in IDLE; return once all of them report."""
    jobs = [
        {
            "endpoint": endpoint_dict(endpoint),
            "users": part,
            "open_timeout": 120.0,
            "hold_timeout": 60.0,
        }
        for part in bench.split(users)
    ]
    pool = WorkerPool(idle_worker, jobs, with_events=True)
    pool.start()
    pool.opened = pool.wait_ready(timeout=150)
    return pool


def _wait_for_backend_idle(bench: Bench, timeout: float = 30.0) -> None:
    """Wait until the backend's mail processes from earlier sessions have exited."""
    pid = bench.backend.server.pid
    assert pid is not None
    deadline = time.monotonic() + timeout
    baseline = 20
    while time.monotonic() < deadline and len(process_tree(pid)) > baseline:
        time.sleep(0.2)


# NOOP latency


def latency(bench: Bench) -> list[Row]:
    rows = {
        "p50": Row("latency", "NOOP round trip p50", "µs", False),
        "p99": Row("latency", "NOOP round trip p99", "µs", False),
    }
    for run in range(bench.plan.runs):
        for candidate in bench.candidates:
            endpoint = candidate.endpoint("imap", "plain")
            sample = None
            if endpoint is not None:
                job = {
                    "endpoint": endpoint_dict(endpoint),
                    "users": bench.users_for(1, offset=run),
                    "warmup": max(20, bench.plan.latency_count // 10),
                    "count": bench.plan.latency_count,
                }
                sample = run_workers(noop_latency, [job], timeout=60)[0]
            _record(rows["p50"], candidate, sample, "p50_us")
            _record(rows["p99"], candidate, sample, "p99_us")
            bench.log(f"latency {candidate.name} run {run + 1}: {sample}")
    return list(rows.values())


# Session rate during reloads


def reload_under_load(bench: Bench) -> list[Row]:
    quiet = Row("reload", "imap plain without reloads", "sessions/s", True)
    busy = Row(
        "reload", f"imap plain during {bench.plan.reloads} reloads", "sessions/s", True
    )
    seconds = bench.plan.reload_seconds
    for candidate in bench.candidates:
        # Only the appliance is measured here; the peers' reloads are out of scope.
        reason = getattr(candidate, "reload_unsupported", None)
        if reason and not candidate.supports_reload:
            quiet.not_run[candidate.name] = reason
            busy.not_run[candidate.name] = reason
    for run in range(bench.plan.runs):
        for candidate in bench.candidates:
            if not candidate.supports_reload:
                continue
            endpoint = candidate.endpoint("imap", "plain")
            sample = session_rate_sample(bench, candidate, endpoint, seconds)
            _record(quiet, candidate, sample, "sessions_per_s")
            sample = _session_rate_with_reloads(bench, candidate, endpoint, seconds)
            _record(busy, candidate, sample, "sessions_per_s")
            bench.log(f"reload {candidate.name} run {run + 1}: {sample}")
    return [quiet, busy]


def _session_rate_with_reloads(
    bench: Bench, candidate: Candidate, endpoint: Any, seconds: float
) -> dict[str, Any]:
    import threading

    reloads = bench.plan.reloads
    interval = seconds / reloads
    done = threading.Event()
    sent: list[float] = []

    def reload_loop() -> None:
        # The first reload comes half an interval into the window, the last half an
        # interval before its end, so all of them fall inside it.
        time.sleep(START_DELAY + SESSION_RATE_WARMUP + interval / 2)
        for _ in range(reloads):
            if done.is_set():
                return
            candidate.reload()
            sent.append(time.monotonic())
            done.wait(interval)

    applied_before = candidate.applied_reloads()
    thread = threading.Thread(target=reload_loop, daemon=True)
    thread.start()
    try:
        sample = session_rate_sample(bench, candidate, endpoint, seconds)
    finally:
        done.set()
        thread.join(30)
    # The watcher ends a burst of file events after a short quiet step, so the last
    # reload may still be running when the window closes.
    time.sleep(1.5)
    sample["reloads_written"] = len(sent)
    sample["reloads_applied"] = candidate.applied_reloads() - applied_before
    return sample


# Helpers


def _record(
    row: Row, candidate: Candidate, sample: dict[str, Any] | None, key: str
) -> None:
    if sample is None:
        return
    row.add(candidate.name, sample.get(key), sample)


def _copy_direct_plain(rows: dict[tuple[str, str], Row]) -> None:
    """Use direct's plain samples as the reference in upstream-TLS rows."""
    for (protocol, path), row in rows.items():
        if path != "upstream_tls":
            continue
        plain = rows.get((protocol, "plain"))
        if plain is not None and "direct" in plain.samples:
            row.samples["direct"] = list(plain.samples["direct"])
            row.notes["direct"] = "the plain row's samples: direct has no upstream"
