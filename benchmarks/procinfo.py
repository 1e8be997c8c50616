"""Process trees, proportional set size and machine facts, read from /proc."""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import sys
from pathlib import Path


def parent_map() -> dict[int, list[int]]:
    """Return every process's children by parent PID, from one pass over /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name in brackets may contain spaces and brackets.
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    return children


def process_tree(root: int) -> list[int]:
    """Return `root` and all its descendants."""
    children = parent_map()
    found = [root]
    index = 0
    while index < len(found):
        found.extend(children.get(found[index], []))
        index += 1
    return found


def pss_kib(pid: int) -> int:
    """Return the proportional set size of one process in KiB, 0 if it is gone."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def tree_pss_kib(roots: list[int]) -> int:
    """Return the summed PSS in KiB of the given processes and their descendants."""
    pids = {pid for root in roots for pid in process_tree(root)}
    return sum(pss_kib(pid) for pid in pids)


def cpu_seconds(pid: int) -> float:
    """Return the CPU time of a process plus that of its reaped children, 0 if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    # utime, stime, cutime and cstime are fields 14 to 17 of proc(5), in clock ticks.
    ticks = sum(int(value) for value in fields[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(roots: list[int]) -> float:
    """Return the CPU time of the given processes and all their descendants.

    A child that exited counts through its parent's cutime and cstime once reaped,
    so the sum does not drop when short-lived children such as Dovecot's mail
    processes end.
    """
    pids = {pid for root in roots for pid in process_tree(root)}
    return sum(cpu_seconds(pid) for pid in pids)


def children_cpu_seconds() -> float:
    """Return the CPU time of this process's reaped children (the load generator)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def raise_open_files_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to the hard limit; return the new value.

    Children started afterwards inherit the raised limit.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def tool_version(command: list[str]) -> str:
    """Return the first output line of a version command, or `missing`."""
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return "missing"
    lines = (result.stdout + result.stderr).strip().splitlines()
    return lines[0] if lines else "unknown"


def machine_facts() -> dict[str, object]:
    """Return what the results page states about the machine."""
    try:
        import uvloop

        uvloop_version = uvloop.__version__
    except ImportError:
        uvloop_version = None
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model(),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "uvloop": uvloop_version,
        "dovecot": tool_version(["dovecot", "--version"]),
        "nginx": tool_version(["nginx", "-v"]),
        "memory_kib": _memory_total_kib(),
    }


def _memory_total_kib() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None
