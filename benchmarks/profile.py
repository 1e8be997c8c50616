"""Profile the appliance with py-spy while one workload runs against it.

`python3 -m benchmarks.profile --workload throughput --protocol imap --path plain`
starts the backend and the appliance, attaches `py-spy record` to the appliance for the
measurement window, and prints the functions with the most samples, by own time and
including callees. The collapsed stacks stay in the folder given by --output for
flame graph tools. Needs py-spy (pip install py-spy) and root.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
from pathlib import Path

from benchmarks.candidates import Appliance
from benchmarks.procinfo import raise_open_files_limit
from benchmarks.run import FULL_PLAN, log
from benchmarks.workloads import (
    Bench,
    prepare_backend,
    session_rate_sample,
    throughput_sample,
)

SAMPLE_RATE = 250


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python3 -m benchmarks.profile")
    parser.add_argument(
        "--workload", choices=("throughput", "session_rate"), required=True
    )
    parser.add_argument("--protocol", choices=("imap", "pop3"), default="imap")
    parser.add_argument(
        "--path", choices=("plain", "client_tls", "upstream_tls"), default="plain"
    )
    parser.add_argument(
        "--event-loop", choices=("asyncio", "uvloop"), default="asyncio"
    )
    parser.add_argument("--seconds", type=float, default=8.0, help="window length")
    parser.add_argument("--top", type=int, default=25, help="functions to print")
    parser.add_argument(
        "--output",
        type=Path,
        default=Path("/tmp"),
        help="folder for the collapsed stacks",
    )
    return parser.parse_args(argv)


def summarize(collapsed: Path, top: int) -> str:
    """Return the top functions by own and inclusive samples from py-spy's raw output."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    lines = [f"{total} samples"]
    for title, counter in (("own time", own), ("including callees", inclusive)):
        lines.append(f"\n{title}:")
        for frame, count in counter.most_common(top):
            lines.append(f"{count / total * 100:6.1f}%  {frame}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("py-spy") is None:
        print("py-spy is missing: pip install py-spy", file=sys.stderr)
        return 2

    raise_open_files_limit()
    plan = FULL_PLAN
    plan.throughput_seconds = args.seconds
    workdir, pki, backend = prepare_backend(plan, "appliance-profile-")

    cert = pki.issue_server_cert("profile")
    appliance = Appliance(
        backend, workdir / "appliance", cert, event_loop=args.event_loop
    )
    collapsed = args.output / f"profile-{args.workload}-{args.protocol}-{args.path}.txt"
    try:
        backend.start()
        appliance.start()
        bench = Bench(plan, backend, [appliance], log)
        assert appliance.process is not None
        recorder = subprocess.Popen(
            [
                "py-spy",
                "record",
                "--pid",
                str(appliance.process.pid),
                "--rate",
                str(SAMPLE_RATE),
                "--format",
                "raw",
                "--nonblocking",
                "--duration",
                str(int(args.seconds)),
                "--output",
                str(collapsed),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        if args.workload == "throughput":
            sample = throughput_sample(bench, appliance, args.protocol, args.path)
        else:
            endpoint = appliance.endpoint("imap", args.path)
            sample = session_rate_sample(bench, appliance, endpoint, args.seconds)

        recorder.wait(60)
        log(f"sample: { {k: v for k, v in (sample or {}).items() if k != 'failures'} }")
    finally:
        appliance.stop()
        backend.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    print(summarize(collapsed, args.top))
    print(f"\ncollapsed stacks: {collapsed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
