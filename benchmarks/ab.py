"""Compare the appliance's CPU cost under config variants, in interleaved runs.

The full benchmark measures rates on a machine where Dovecot, the candidate and the
load generator share the cores, so a small change in the appliance's own cost hides in
the spread of the rates. This tool reads the appliance's CPU time from /proc around each
sample and divides it by the sessions or MiB of that sample, which is steadier. Variants
run in turn, run 1 of each, then run 2 of each, so drift in machine load hits all alike.

A variant is an event loop and optional settings for every upstream, for example
`asyncio` or `uvloop,session_resumption=true`. Values are read as YAML scalars.

Usage: python3 -m benchmarks.ab --variant asyncio --variant asyncio,session_resumption=true
       [--workload session_rate|throughput] [--protocol imap|pop3] [--path PATH]
       [--runs N] [--seconds S] [--concurrency N]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from benchmarks.candidates import PATHS, Appliance, Backend
from benchmarks.procinfo import raise_open_files_limit, tree_cpu_seconds
from benchmarks.run import FULL_PLAN, log
from benchmarks.workloads import (
    SESSION_RATE_WARMUP,
    Bench,
    prepare_backend,
    session_rate_sample,
    throughput_sample,
)
from tests.support.certs import CertFiles


@dataclass
class Variant:
    """One appliance configuration under comparison, and its results per run."""

    spec: str
    event_loop: str
    upstream_options: dict[str, Any]
    rates: list[float] = field(default_factory=list)
    cpu_costs: list[float] = field(default_factory=list)


def parse_variant(spec: str) -> Variant:
    """Return the variant that `spec` (`LOOP[,KEY=VALUE...]`) describes."""
    event_loop, *settings = spec.split(",")
    if event_loop not in ("asyncio", "uvloop"):
        raise ValueError(f"variant {spec!r}: expected asyncio or uvloop first")
    options: dict[str, Any] = {}
    for setting in settings:
        key, separator, value = setting.partition("=")
        if not separator or not key:
            raise ValueError(f"variant {spec!r}: expected KEY=VALUE, not {setting!r}")
        options[key] = yaml.safe_load(value)
    return Variant(spec, event_loop, options)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python3 -m benchmarks.ab")
    parser.add_argument(
        "--variant", action="append", required=True, help="LOOP[,KEY=VALUE...]"
    )
    parser.add_argument(
        "--workload", choices=("session_rate", "throughput"), default="session_rate"
    )
    parser.add_argument("--protocol", choices=("imap", "pop3"), default="imap")
    parser.add_argument("--path", choices=PATHS, default="upstream_tls")
    parser.add_argument("--runs", type=int, default=4, help="runs of every variant")
    parser.add_argument("--seconds", type=float, default=4.0, help="window per sample")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=FULL_PLAN.session_rate_concurrency,
        help="sessions at a time per load generator worker (session_rate)",
    )
    return parser.parse_args(argv)


def measure(
    bench: Bench, appliance: Appliance, args: argparse.Namespace
) -> tuple[float, float]:
    """Run one sample; return its rate and the appliance's CPU ms per session or MiB."""
    roots = appliance.cpu_roots()
    before = tree_cpu_seconds(roots)
    if args.workload == "throughput":
        sample = throughput_sample(bench, appliance, args.protocol, args.path)
        assert sample is not None
        used = tree_cpu_seconds(roots) - before
        return sample["MiB_per_s"], used * 1000 / (sample["bytes"] / 2**20)
    endpoint = appliance.endpoint(args.protocol, args.path)
    sample = session_rate_sample(bench, appliance, endpoint, args.seconds)
    used = tree_cpu_seconds(roots) - before
    # CPU time covers the warm-up as well, at about the same rate as the window.
    sessions = sample["sessions_per_s"] * (args.seconds + SESSION_RATE_WARMUP)
    return sample["sessions_per_s"], used * 1000 / max(sessions, 1)


def build_appliances(
    variants: list[Variant], backend: Backend, workdir: Path, cert: CertFiles
) -> list[Appliance]:
    """Return one appliance candidate per variant, each in its own folder."""
    return [
        Appliance(
            backend,
            workdir / f"variant-{index}",
            cert,
            event_loop=variant.event_loop,
            upstream_options=variant.upstream_options,
            name=variant.spec,
        )
        for index, variant in enumerate(variants)
    ]


def print_means(variants: list[Variant], args: argparse.Namespace, unit: str) -> None:
    """Print the mean rate and CPU cost of every variant over all runs."""
    print(
        f"\nmean over {args.runs} runs ({args.workload}, {args.protocol} {args.path}):"
    )
    for variant in variants:
        rate = statistics.mean(variant.rates)
        cost = statistics.mean(variant.cpu_costs)
        print(f"  {variant.spec}: rate {rate:.1f}, {cost:.2f} {unit}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        variants = [parse_variant(spec) for spec in args.variant]
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    raise_open_files_limit()
    plan = FULL_PLAN
    plan.throughput_seconds = args.seconds
    plan.session_rate_concurrency = args.concurrency
    workdir, pki, backend = prepare_backend(plan, "appliance-ab-")
    appliances = build_appliances(
        variants, backend, workdir, pki.issue_server_cert("ab-proxy")
    )
    unit = "ms CPU per MiB" if args.workload == "throughput" else "ms CPU per session"

    try:
        backend.start()
        for appliance in appliances:
            appliance.start()
        bench = Bench(plan, backend, appliances, log)
        for run in range(args.runs):
            for variant, appliance in zip(variants, appliances, strict=True):
                rate, cost = measure(bench, appliance, args)
                variant.rates.append(rate)
                variant.cpu_costs.append(cost)
                print(
                    f"run {run + 1} {variant.spec}: rate {rate:.1f}, {cost:.2f} {unit}"
                )
    finally:
        for appliance in appliances:
            appliance.stop()
        backend.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    print_means(variants, args, unit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
