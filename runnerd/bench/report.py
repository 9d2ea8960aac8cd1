"""What ``runnerd bench`` measured and how it shows it.

A :class:`Row` per workload and mode; the progress bar; the table with the
notes, ratios and issue 12's targets under it; the JSON report; the plot.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from ..percentiles import percentiles_ms

# Targets of issue 12 for the warm rows: (workload, mode) -> p50 ms.
SESSION_TARGETS_MS = {("S2", "warm"): 2.0, ("S3", "warm"): 40.0}
SESSION_TARGET_MIB = 30.0  # S4: an idle warm session, beyond its zygote

# A session row, the one-off row it replaces, and what the two do.
SESSION_PAIRS = (
    ("S2", "W1", "print(1) in a session / one-off print(1)"),
    ("S3", "W2", "W2 less its imports and read in a session holding df / one-off W2"),
)

DAEMON_MODES = ("cold", "warm", "daemon")


@dataclass
class Row:
    workload: str
    mode: str
    jobs: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    failures: int = 0
    throughput_jobs_s: float | None = None
    clients: int | None = None
    samples_ms: list[float] = field(default_factory=list, repr=False)
    notes: list[str] = field(default_factory=list)  # printed under the table
    memory: dict[str, Any] | None = None  # S4's readings, in MiB
    served: dict[str, int] | None = None  # fairness: jobs each tenant was served in the measured window


def row_of(workload: str, mode: str, times: list[float], failures: int) -> Row:
    """The row of *times* (seconds, one per job)."""
    pct = percentiles_ms(times)
    return Row(
        workload=workload, mode=mode, jobs=len(times),
        p50_ms=pct["p50"], p95_ms=pct["p95"], p99_ms=pct["p99"], mean_ms=round(statistics.fmean(times) * 1000, 2),
        failures=failures, samples_ms=[round(t * 1000, 3) for t in times],
    )  # fmt: skip


class Progress:
    """A one-line progress bar on stderr (when it is a terminal)."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()

    def __call__(self, label: str, done: int, total: int) -> None:
        if not self.tty:
            return
        width = 30
        filled = int(width * done / max(total, 1))
        sys.stderr.write(f"\r{label:<24} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def session_ratios(rows: list[Row]) -> list[str]:
    """A session row against its one-off counterpart and its floor in the same run, and issue 12's targets."""
    by = {(r.workload, r.mode): r for r in rows}
    lines = []
    for session, one_off, what in SESSION_PAIRS:
        for mode in ("bare", *DAEMON_MODES):
            s, o = by.get((session, mode)), by.get((one_off, mode))
            if s and o and o.p50_ms:
                lines.append(f"{session}/{one_off} {mode} p50 ratio ({what}): {s.p50_ms / o.p50_ms:.3f}")
    for session, _, _ in SESSION_PAIRS:
        floor = by.get((session, "bare"))
        for mode in DAEMON_MODES:
            if floor and (s := by.get((session, mode))):
                lines.append(
                    f"{session} {mode} over its floor (bare: an interpreter kept running, the same runs): "
                    f"p50 {floor.p50_ms:.2f} -> {s.p50_ms:.2f} ms, the session adds {s.p50_ms - floor.p50_ms:+.2f} ms"
                )
    for (name, mode), target in SESSION_TARGETS_MS.items():
        if (r := by.get((name, mode))) is not None:
            verdict = "met" if r.p50_ms <= target else "MISSED"
            lines.append(f"target {name} {mode} p50 <= {target:g} ms: {r.p50_ms:.2f} ms, {verdict}")
    mem = by.get(("S4", "warm"))
    if mem is not None and mem.memory and mem.memory["idle"].get("tree_growth_per_session_mib") is not None:
        per = mem.memory["idle"]["tree_growth_per_session_mib"]
        verdict = "met" if per <= SESSION_TARGET_MIB else "MISSED"
        lines.append(
            f"target S4 warm: an idle session <= {SESSION_TARGET_MIB:g} MiB beyond its zygote "
            f"(daemon tree growth per session): {per:.1f} MiB, {verdict}"
        )
    return lines


def table(rows: list[Row]) -> str:
    width = max([12, *(len(r.mode) for r in rows)])  # the fleet's and the integrations' modes are long
    head = (
        f"{'workload':<9} {'mode':<{width}} {'jobs':>5} {'p50 ms':>9} {'p95 ms':>9} {'p99 ms':>9} {'mean ms':>9} "
        f"{'jobs/s':>8} {'fail':>5}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        tput = f"{r.throughput_jobs_s:.1f}" if r.throughput_jobs_s is not None else ""
        lines.append(
            f"{r.workload:<9} {r.mode:<{width}} {r.jobs:>5} {r.p50_ms:>9.1f} {r.p95_ms:>9.1f} {r.p99_ms:>9.1f} "
            f"{r.mean_ms:>9.1f} {tput:>8} {r.failures:>5}"
        )
    notes = [note for r in rows for note in r.notes] + session_ratios(rows)
    if notes:
        lines += ["", *notes]
    return "\n".join(lines)


def machine() -> dict[str, object]:
    try:
        model = next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            "?",
        )
    except OSError:
        model = "?"
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_bytes": psutil.virtual_memory().total,
        "kernel": os.uname().release,
        "python": sys.version.split()[0],
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def report_json(rows: list[Row], extra: dict[str, object]) -> dict[str, object]:
    return {"machine": machine(), **extra, "rows": [asdict(r) for r in rows]}


# Drawn *by runnerd*: the bench sends its JSON as an input file to a job.
PLOT_CODE = """\
import json
import matplotlib.pyplot as plt

data = json.load(open("bench.json"))
rows = [r for r in data["rows"] if "x" not in r["mode"]]
workloads = sorted({r["workload"] for r in rows})
modes = [m for m in ("bare", "cold", "warm", "daemon") if any(r["mode"] == m for r in rows)]
colors = {"bare": "tab:gray", "cold": "tab:blue", "warm": "tab:orange", "daemon": "tab:green"}
fig, axes = plt.subplots(1, len(workloads), figsize=(4 * len(workloads), 4.5), squeeze=False)
for ax, w in zip(axes[0], workloads):
    series = [next((r["samples_ms"] for r in rows if r["workload"] == w and r["mode"] == m), []) for m in modes]
    parts = ax.boxplot(series, tick_labels=modes, showfliers=True, patch_artist=True)
    for patch, m in zip(parts["boxes"], modes):
        patch.set_facecolor(colors[m])
    ax.set_yscale("log")
    ax.set_title(w + ": " + next(r["title"] for r in data["workloads"] if r["name"] == w), fontsize=10)
    ax.set_ylabel("latency per job, ms (log)")
    ax.grid(axis="y", alpha=0.3)
m = data["machine"]
fig.suptitle(f"runnerd bench: sequential latency by mode ({m['cpus']} CPUs, {m['cpu_model'][:40]})", fontsize=11)
fig.tight_layout()
fig.savefig("bench.png", dpi=110)
"""


def plot(endpoint: str, report: dict[str, object]) -> bytes | None:
    """The latency distributions as a PNG, rendered in a runnerd job."""
    from ..client import Client

    with Client(endpoint) as c:
        result = c.run(PLOT_CODE, files={"bench.json": json.dumps(report).encode()}, wait=120)
    for figure in result.figures:
        if figure.name == "bench.png":
            return figure.data
    sys.stderr.write(f"runnerd bench: the plot job failed: {result.reason} {result.stderr[-500:]}\n")
    return None
