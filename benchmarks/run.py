"""Run the benchmark: `python3 -m benchmarks.run [--quick] [--workloads ...]`.

Starts a throwaway Dovecot with seeded mailboxes and every candidate in front of it,
then runs the workloads with runs interleaved across candidates. The results go to a JSON
file in benchmarks/results/. Full runs also write them as tables into docs/benchmarks.md,
and --docs names another page.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks import report, workloads
from benchmarks.candidates import Appliance, Backend, Candidate, Direct
from benchmarks.peers import DovecotProxy, Nginx
from benchmarks.procinfo import machine_facts, raise_open_files_limit
from benchmarks.workloads import Bench, Plan, prepare_backend
from tests.support.appliance import REPO_ROOT
from tests.support.certs import TestPKI

FULL_PLAN = Plan(
    runs=3,
    workers=2,
    throughput_sessions=8,
    throughput_seconds=3.0,
    bulk_messages=8,
    session_rate_concurrency=16,
    session_rate_seconds=4.0,
    idle_sessions=1000,
    latency_count=2000,
    reload_seconds=8.0,
)
QUICK_PLAN = Plan(
    runs=1,
    workers=2,
    throughput_sessions=2,
    throughput_seconds=1.0,
    bulk_messages=2,
    session_rate_concurrency=4,
    session_rate_seconds=1.0,
    idle_sessions=40,
    latency_count=200,
    reload_seconds=2.0,
    reloads=4,
)
WORKLOADS: dict[str, Callable[[Bench], list[workloads.Row]]] = {
    "throughput": workloads.throughput,
    "session_rate": workloads.session_rate,
    "memory": workloads.idle_memory,
    "latency": workloads.latency,
    "reload": workloads.reload_under_load,
}
CANDIDATES = ("direct", "appliance", "appliance-uvloop", "nginx", "dovecot-proxy")
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
DOCS_PAGE = REPO_ROOT / "docs" / "benchmarks.md"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python3 -m benchmarks.run",
        description="Measure the appliance against direct Dovecot, nginx's mail proxy "
        "and Dovecot's proxy on this machine. Needs root, dovecot and nginx.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="small sizes and one run: a smoke test"
    )
    parser.add_argument(
        "--workloads",
        default=",".join(WORKLOADS),
        help=f"comma-separated subset of {', '.join(WORKLOADS)} (default: all)",
    )
    parser.add_argument(
        "--candidates",
        default=",".join(CANDIDATES),
        help=f"comma-separated subset of {', '.join(CANDIDATES)} (default: all "
        "that can run here)",
    )
    parser.add_argument("--runs", type=int, help="runs per cell (default: 3, quick: 1)")
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=RESULTS_DIR,
        help="folder for the JSON result file (default: benchmarks/results)",
    )
    parser.add_argument(
        "--docs",
        type=Path,
        help="Markdown page whose results section is replaced (default: "
        "docs/benchmarks.md for full runs, none for --quick)",
    )
    parser.add_argument(
        "--no-docs", action="store_true", help="leave the Markdown page unchanged"
    )
    parser.add_argument(
        "--render",
        type=Path,
        metavar="RESULT_JSON",
        help="run nothing; write the tables of an earlier result file into the page",
    )

    args = parser.parse_args(argv)
    args.workload_names = _choose(args.workloads, WORKLOADS, "workload", parser)
    args.candidate_names = _choose(args.candidates, CANDIDATES, "candidate", parser)
    if "direct" not in args.candidate_names:
        parser.error("--candidates must include direct: every ratio is relative to it")
    return args


def _choose(
    text: str, known: Any, what: str, parser: argparse.ArgumentParser
) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in known]
    if unknown:
        parser.error(
            f"unknown {what} {', '.join(unknown)}; expected {', '.join(known)}"
        )
    return names


def log(text: str) -> None:
    stamp = time.strftime("%H:%M:%S")
    print(f"[{stamp}] {text}", file=sys.stderr, flush=True)


def build_candidates(
    names: list[str], backend: Backend, workdir: Path, pki: TestPKI, plan: Plan
) -> tuple[list[Candidate], dict[str, str]]:
    """Create the requested candidates; return them and the reasons for skipped ones."""
    cert = pki.issue_server_cert("bench-proxy")
    connection_limit = plan.idle_sessions + 500
    candidates: list[Candidate] = []
    skipped: dict[str, str] = {}
    for name in names:
        if name == "direct":
            candidates.append(Direct(backend))
        elif name == "appliance":
            candidates.append(
                Appliance(backend, workdir / name, cert, event_loop="asyncio")
            )
        elif name == "appliance-uvloop":
            try:
                import uvloop  # noqa: F401
            except ImportError:
                skipped[name] = "uvloop is not installed (pip install uvloop)"
                continue
            candidates.append(
                Appliance(backend, workdir / name, cert, event_loop="uvloop")
            )
        elif name == "nginx":
            problem = Nginx.available()
            if problem:
                skipped[name] = problem
                continue
            candidates.append(Nginx(backend, cert))
        elif name == "dovecot-proxy":
            candidates.append(DovecotProxy(backend, cert, connection_limit))
    return candidates, skipped


def run(args: argparse.Namespace) -> dict[str, Any]:
    plan = QUICK_PLAN if args.quick else FULL_PLAN
    if args.runs:
        plan.runs = args.runs

    open_files = raise_open_files_limit()
    load_start = os.getloadavg()
    started = time.monotonic()
    run_id = datetime.datetime.now().strftime("%Y%m%d-%H%M%S") + (
        "-quick" if args.quick else ""
    )
    workdir, pki, backend = prepare_backend(plan, "appliance-bench-")

    candidates: list[Candidate] = []
    skipped: dict[str, str] = {}
    rows: list[workloads.Row] = []
    try:
        log(f"starting backend Dovecot with {plan.users} users")
        backend.start()
        candidates, skipped = build_candidates(
            args.candidate_names, backend, workdir, pki, plan
        )
        for name, reason in skipped.items():
            log(f"skipping {name}: {reason}")
        for candidate in candidates:
            log(f"starting {candidate.name}")
            candidate.start()
        bench = Bench(plan, backend, candidates, log)
        for name in args.workload_names:
            log(f"workload {name}")
            rows.extend(WORKLOADS[name](bench))
    finally:
        for candidate in candidates:
            candidate.stop()
        backend.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    summary = [report.summarize_row(row) for row in rows]
    return {
        "meta": {
            "run_id": run_id,
            "quick": args.quick,
            "workloads": args.workload_names,
            "candidates": [c.name for c in candidates],
            "skipped": skipped,
            "plan": asdict(plan),
            "machine": machine_facts(),
            "open_files_limit": open_files,
            "load_start": list(load_start),
            "load_end": list(os.getloadavg()),
            "duration_s": time.monotonic() - started,
        },
        "rows": summary,
        "targets": report.evaluate_targets(summary),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render is not None:
        result = json.loads(args.render.read_text())
        report.update_docs(args.docs or DOCS_PAGE, report.render_results(result))
        return 0
    if os.geteuid() != 0:
        print("benchmarks.run: Dovecot needs root here; run as root", file=sys.stderr)
        return 2
    result = run(args)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    result_file = args.results_dir / f"{result['meta']['run_id']}.json"
    result_file.write_text(json.dumps(result, indent=2) + "\n")
    log(f"wrote {result_file}")
    markdown = report.render_results(result)
    docs = args.docs or (None if args.quick else DOCS_PAGE)
    if docs is not None and not args.no_docs:
        report.update_docs(docs, markdown)
        log(f"updated {docs}")
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
