"""The benchmark's quick mode runs one workload end to end and writes well-formed JSON.

This checks the harness only; no number is compared with any speed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.ab import parse_variant
from benchmarks.tls_handshake import measure
from tests.conftest import local_backend_problem
from tests.support.appliance import REPO_ROOT

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict:
    problem = local_backend_problem()
    if problem:
        pytest.skip(f"the benchmark runs Dovecot locally: {problem}")
    results_dir = tmp_path_factory.mktemp("bench-results")
    command = [
        sys.executable,
        "-m",
        "benchmarks.run",
        "--quick",
        "--workloads",
        "latency",
        "--candidates",
        "direct,appliance",
        "--results-dir",
        str(results_dir),
        "--no-docs",
    ]
    completed = subprocess.run(
        command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=150, check=False
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    files = list(Path(results_dir).glob("*.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text())


def test_meta_describes_run_and_machine(result: dict) -> None:
    meta = result["meta"]
    assert meta["quick"] is True
    assert meta["candidates"] == ["direct", "appliance"]
    assert meta["machine"]["nproc"] >= 1
    assert len(meta["load_start"]) == 3
    assert len(meta["load_end"]) == 3


def test_latency_rows_have_samples_and_ratios(result: dict) -> None:
    rows = {row["name"]: row for row in result["rows"]}
    assert set(rows) == {"NOOP round trip p50", "NOOP round trip p99"}
    for row in rows.values():
        assert row["unit"] == "µs"
        for name in ("direct", "appliance"):
            entry = row["candidates"][name]
            assert len(entry["samples"]) == 1
            assert entry["median"] > 0
            assert entry["failure_count"] == 0
        assert row["candidates"]["direct"]["ratio_to_direct"] == 1.0


def test_targets_list_latency_verdict(result: dict) -> None:
    latency = [t for t in result["targets"] if t["target"].startswith("NOOP p99")]
    assert [t["candidate"] for t in latency] == ["appliance"]
    assert latency[0]["met"] in (True, False)


@pytest.mark.parametrize("key_type", ["ECDSA", "RSA"])
def test_tls_handshake_measure_resumes(key_type: str) -> None:
    results = measure(3, key_type)

    assert results["full handshake"].resumed == 0
    assert results["resumed"].resumed == 3
    assert results["resumed"].read_session > 0


def test_ab_reports_every_variant() -> None:
    problem = local_backend_problem()
    if problem:
        pytest.skip(f"the benchmark runs Dovecot locally: {problem}")
    variants = ["asyncio", "asyncio,session_resumption=true"]
    command = [sys.executable, "-m", "benchmarks.ab", "--runs", "1", "--seconds", "1"]
    for variant in variants:
        command += ["--variant", variant]
    completed = subprocess.run(
        command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=150, check=False
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    for variant in variants:
        assert f"  {variant}: rate " in completed.stdout, completed.stdout


@pytest.mark.parametrize(
    ("spec", "loop", "options"),
    [
        ("uvloop", "uvloop", {}),
        ("asyncio,session_resumption=true", "asyncio", {"session_resumption": True}),
        ("asyncio,verify=false,port=993", "asyncio", {"verify": False, "port": 993}),
    ],
)
def test_ab_variant_parsed(spec: str, loop: str, options: dict) -> None:
    variant = parse_variant(spec)

    assert variant.event_loop == loop
    assert variant.upstream_options == options


@pytest.mark.parametrize("spec", ["trio", "asyncio,verify", "asyncio,=1"])
def test_ab_invalid_variant_rejected(spec: str) -> None:
    with pytest.raises(ValueError):
        parse_variant(spec)
