"""``runnerd bench --modes fleet``: what a second daemon buys, side by side in one run.

Two cold daemons of one slot each, pinned to disjoint CPUs (``taskset``):
first one alone, through its one endpoint (today's client path); then both,
through the fleet layer (a list of the two). Each one-off workload gets its
latency and throughput rows in both, and the notes say the throughput ratio
(issue 17's target: at least 1.6) and what the fleet layer adds to the p50
of sequential jobs. Session workloads are left out: a fleet's sessions are
each on one daemon, the rows of one daemon say their cost.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import RunnerdError
from .daemon import started
from .jobs import bench_endpoint
from .report import Progress, Row
from .workloads import Workload

ONE, TWO = "1 daemon, 1 CPU", "fleet of 2, 2 CPUs"
THROUGHPUT_TARGET = 1.6


def bench_fleet(
    config_path: Path | None, workloads: list[Workload], n: int, clients: int, progress: Progress
) -> list[Row]:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise RunnerdError("the fleet rows need two CPUs (a daemon pinned to each)")
    jobs = [w for w in workloads if w.kind == "job"]
    rows: list[Row] = []
    with started(config_path, "cold", 1, cpus=str(cpus[0])) as a:
        for w in jobs:
            rows.extend(bench_endpoint(a.endpoint, ONE, w, n, clients, progress))
        with started(config_path, "cold", 1, cpus=str(cpus[1])) as b:
            for w in jobs:
                rows.extend(bench_endpoint(f"{a.endpoint},{b.endpoint}", TWO, w, n, clients, progress))
    by = {(r.workload, r.mode): r for r in rows}
    for w in jobs:
        one, two = by.get((w.name, f"{ONE} x{clients}")), by.get((w.name, f"{TWO} x{clients}"))
        seq_one, seq_two = by.get((w.name, ONE)), by.get((w.name, TWO))
        if one and two and one.throughput_jobs_s and two.throughput_jobs_s:
            ratio = two.throughput_jobs_s / one.throughput_jobs_s
            two.notes.append(
                f"{w.name}: throughput of 2 daemons on 2 CPUs / 1 on 1 CPU = {ratio:.2f} "
                f"(target >= {THROUGHPUT_TARGET})"
            )
        if seq_one and seq_two:
            seq_two.notes.append(
                f"{w.name}: p50 through the fleet layer (2 daemons) - through one endpoint = "
                f"{seq_two.p50_ms - seq_one.p50_ms:+.2f} ms (one endpoint takes the old path: the layer is not on it)"
            )
    return rows
