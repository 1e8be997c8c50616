"""Medians, ratios to `direct`, the targets, and the Markdown that shows them."""

from __future__ import annotations

import re
import statistics
from pathlib import Path
from typing import Any

from benchmarks.workloads import Row

APPLIANCES = ("appliance", "appliance-uvloop")
PEERS = ("nginx", "dovecot-proxy")
RESULTS_START = "<!-- benchmark results: start -->"
RESULTS_END = "<!-- benchmark results: end -->"
WORKLOAD_TITLES = {
    "throughput": "Throughput, 1 MiB messages",
    "session_rate": "Session rate: connect, LOGIN, LOGOUT",
    "memory": "Memory per idle IMAP session in IDLE",
    "latency": "NOOP round trip through one session",
    "reload": "Session rate during hot reloads",
}


def summarize_row(row: Row) -> dict[str, Any]:
    """Return a row as JSON: samples, median, min, max and ratio to direct per candidate."""
    candidates: dict[str, dict[str, Any]] = {}
    for name, samples in row.samples.items():
        median = statistics.median(samples)
        entry: dict[str, Any] = {
            "samples": samples,
            "median": median,
            "min": min(samples),
            "max": max(samples),
            "spread_percent": (max(samples) - min(samples)) / median * 100
            if median
            else None,
            "failure_count": sum(
                d.get("failure_count", 0) for d in row.details.get(name, [])
            ),
        }
        cpu = [
            d["cpu_percent"]["candidate"]
            for d in row.details.get(name, [])
            if d and "cpu_percent" in d
        ]
        if cpu:
            entry["candidate_cpu_percent"] = statistics.median(cpu)
        if name in row.notes:
            entry["note"] = row.notes[name]
        candidates[name] = entry
    direct = candidates.get("direct", {}).get("median")
    for entry in candidates.values():
        entry["ratio_to_direct"] = entry["median"] / direct if direct else None
    return {
        "workload": row.workload,
        "name": row.name,
        "unit": row.unit,
        "higher_is_better": row.higher_is_better,
        "candidates": candidates,
        "not_run": row.not_run,
        "details": row.details,
    }


def _median(
    rows: list[dict[str, Any]], workload: str, name: str, candidate: str
) -> float | None:
    """Return a candidate's median in one row; row names repeat across workloads."""
    for row in rows:
        if row["workload"] != workload or row["name"] != name:
            continue
        if candidate in row["candidates"]:
            return row["candidates"][candidate]["median"]
    return None


def _verdict(
    value: float | None, required: float | None, higher: bool
) -> dict[str, Any]:
    if value is None or required is None:
        return {"measured": value, "required": required, "met": None}
    met = value >= required if higher else value <= required
    return {"measured": value, "required": required, "met": met}


def evaluate_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Check each appliance variant against the targets; unmeasured parts give met=None."""
    targets = []

    def add(text: str, candidate: str, unit: str, verdict: dict[str, Any]) -> None:
        targets.append(
            {"target": text, "candidate": candidate, "unit": unit, **verdict}
        )

    def ratio(workload: str, name: str, candidate: str, reference: str) -> float | None:
        value = _median(rows, workload, name, candidate)
        base = _median(rows, workload, name, reference)
        return value / base if value is not None and base else None

    def best_peer(name: str) -> float | None:
        medians = [_median(rows, "session_rate", name, peer) for peer in PEERS]
        values = [value for value in medians if value is not None]
        return max(values) if values else None

    for candidate in APPLIANCES:
        if not any(candidate in row["candidates"] for row in rows):
            continue
        for protocol, required in (("imap", 0.85), ("pop3", 0.9)):
            add(
                f"{protocol.upper()} throughput >= {required}x direct",
                candidate,
                "x direct",
                _verdict(
                    ratio("throughput", f"{protocol} plain", candidate, "direct"),
                    required,
                    True,
                ),
            )
        for protocol in ("imap", "pop3"):
            add(
                f"{protocol.upper()} upstream-TLS throughput >= 1.2x dovecot-proxy",
                candidate,
                "x dovecot-proxy",
                _verdict(
                    ratio(
                        "throughput",
                        f"{protocol} upstream_tls",
                        candidate,
                        "dovecot-proxy",
                    ),
                    1.2,
                    True,
                ),
            )
        for path in ("plain", "client_tls"):
            name = f"imap {path}"
            best = best_peer(name)
            value = _median(rows, "session_rate", name, candidate)
            add(
                f"session rate ({path}) >= the better of nginx and dovecot-proxy",
                candidate,
                "x best peer",
                _verdict(
                    value / best if value is not None and best else None, 1.0, True
                ),
            )
        add(
            "session rate (upstream_tls) >= 1.1x dovecot-proxy",
            candidate,
            "x dovecot-proxy",
            _verdict(
                ratio("session_rate", "imap upstream_tls", candidate, "dovecot-proxy"),
                1.1,
                True,
            ),
        )
        add(
            "PSS per idle session <= 10 KiB",
            candidate,
            "KiB",
            _verdict(
                _median(rows, "memory", "PSS per idle IMAP session", candidate),
                10.0,
                False,
            ),
        )
        p99 = _median(rows, "latency", "NOOP round trip p99", candidate)
        direct_p99 = _median(rows, "latency", "NOOP round trip p99", "direct")
        add(
            "NOOP p99 <= direct + 200 µs",
            candidate,
            "µs above direct",
            _verdict(
                p99 - direct_p99 if p99 is not None and direct_p99 else None,
                200.0,
                False,
            ),
        )
        quiet = next((r for r in rows if r["name"].endswith("without reloads")), None)
        busy = next(
            (r for r in rows if r["workload"] == "reload" and r is not quiet), None
        )
        reload_ratio = None
        if (
            quiet
            and busy
            and candidate in quiet["candidates"]
            and candidate in busy["candidates"]
        ):
            reload_ratio = (
                busy["candidates"][candidate]["median"]
                / quiet["candidates"][candidate]["median"]
            )
        add(
            "session rate during reloads >= 0.95x without",
            candidate,
            "x without reloads",
            _verdict(reload_ratio, 0.95, True),
        )
    return targets


# Markdown


def _format(value: float | None, unit: str) -> str:
    if value is None:
        return "–"
    if unit in ("sessions/s", "µs") or abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:,.1f}"


def render_rows(rows: list[dict[str, Any]], candidates: list[str]) -> str:
    lines = []
    for workload, title in WORKLOAD_TITLES.items():
        selected = [row for row in rows if row["workload"] == workload]
        if not selected:
            continue
        unit = selected[0]["unit"]
        better = "higher" if selected[0]["higher_is_better"] else "lower"
        with_cpu = workload in ("throughput", "session_rate", "reload")
        cpu_head = " candidate CPU % |" if with_cpu else ""
        lines += [
            f"### {title} ({unit}, {better} is better)",
            "",
            f"| row | candidate | median | min – max | ratio to direct |{cpu_head}",
            "| --- | --- | ---: | ---: | ---: |" + (" ---: |" if with_cpu else ""),
        ]
        for row in selected:
            for name in candidates:
                entry = row["candidates"].get(name)
                if entry is None:
                    reason = row["not_run"].get(name)
                    if reason:
                        blank = " |" if with_cpu else ""
                        lines.append(
                            f"| {row['name']} | {name} | not run: {reason} | | |{blank}"
                        )
                    continue
                ratio = entry["ratio_to_direct"]
                spread = (
                    f"{_format(entry['min'], unit)} – {_format(entry['max'], unit)}"
                )
                note = " (plain row)" if entry.get("note") else ""
                failures = entry["failure_count"]
                failure_text = f", {failures} failed" if failures else ""
                cpu = ""
                if with_cpu:
                    value = entry.get("candidate_cpu_percent")
                    cpu = (
                        " – |"
                        if value is None or entry.get("note")
                        else f" {value:.0f} |"
                    )
                lines.append(
                    f"| {row['name']} | {name}{note} | {_format(entry['median'], unit)}"
                    f"{failure_text} | {spread} | "
                    f"{'–' if ratio is None else f'{ratio:.2f}x'} |{cpu}"
                )
        lines.append("")
    return "\n".join(lines)


def render_targets(targets: list[dict[str, Any]]) -> str:
    lines = [
        "| target | candidate | measured | required | verdict |",
        "| --- | --- | ---: | ---: | --- |",
    ]
    for target in targets:
        measured, required = target["measured"], target["required"]
        if target["met"] is None:
            verdict = "not measured"
        elif target["met"]:
            verdict = "met"
        else:
            verdict = f"missed by {abs(measured - required):.2f} {target['unit']}"
        shown = "–" if measured is None else f"{measured:.2f}"
        lines.append(
            f"| {target['target']} | {target['candidate']} | {shown} | {required} | {verdict} |"
        )
    return "\n".join(lines) + "\n"


def render_results(result: dict[str, Any]) -> str:
    meta = result["meta"]
    machine = meta["machine"]
    load_start = ", ".join(f"{x:.2f}" for x in meta["load_start"])
    load_end = ", ".join(f"{x:.2f}" for x in meta["load_end"])
    header = [
        (
            f"Run `{meta['run_id']}` ({'quick' if meta['quick'] else 'full'}): "
            f"{meta['plan']['runs']} runs per cell, medians shown, "
            f"{meta['duration_s']:.0f} s in all."
        ),
        (
            f"Machine: `nproc` {machine['nproc']} ({machine['cpu_model']}), "
            f"{_gib(machine.get('memory_kib'))} memory, kernel {machine['kernel']}, "
            f"Python {machine['python']}, "
            f"uvloop {machine['uvloop'] or 'not installed'}, "
            f"Dovecot {machine['dovecot']}, {machine['nginx']}."
        ),
        f"Load average (1, 5, 15 min) at start: {load_start}; at end: {load_end}.",
        "",
        "",
    ]
    return (
        "\n".join(header)
        + render_rows(result["rows"], meta["candidates"])
        + "\n### Targets\n\n"
        + render_targets(result["targets"])
    )


def _gib(kib: int | None) -> str:
    return "unknown" if kib is None else f"{kib / 1024 / 1024:.0f} GiB"


def update_docs(path: Path, results_markdown: str) -> None:
    """Replace the generated section of the benchmarks page, keeping the prose."""
    block = f"{RESULTS_START}\n{results_markdown}{RESULTS_END}"
    if path.exists():
        text = path.read_text()
        pattern = re.compile(
            re.escape(RESULTS_START) + ".*?" + re.escape(RESULTS_END), re.DOTALL
        )
        if pattern.search(text):
            path.write_text(pattern.sub(lambda _: block, text))
            return
        path.write_text(text.rstrip("\n") + "\n\n## Latest results\n\n" + block + "\n")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# Benchmarks\n\n## Latest results\n\n" + block + "\n")
