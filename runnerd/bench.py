"""``runnerd bench``: latency and throughput of the same code, bare, through a cold daemon and a warm one.

Workloads (:mod:`runnerd.bench_workloads`):

* W1 ``print(1)``;
* W2 read a 1,000-row CSV input with pandas, group it, plot it, ``savefig`` a PNG;
* W3 a numpy computation of about 50 ms;
* W4 code that raises.

Sessions (issue 12; picked with ``--workloads`` like the others, e.g.
``--workloads W1,W2,S1,S2,S3,S4`` for one-off and session rows side by side):

* S1 open a session (open -> opened), then close it: a row for each;
* S2 ``print(1)`` in a session that is already open;
* S3 W2 in a session that already holds its DataFrame: the session opens
  with W2's ``data.csv``, its setup run (not measured) is W2's imports and
  ``read_csv``, each measured run the rest of W2 (group, print, bar plot,
  ``savefig``); both parts are cut from W2's code;
* S4 the memory of idle sessions: PSS of each one's processes (its cgroup's
  ``cgroup.procs``), what the daemon's tree grew by, and the session zygote's own PSS.

Session rows talk runnerd/1 on a raw DEALER socket (:mod:`runnerd.bench_sessions`);
in ``bare`` mode a session is a plain interpreter kept running, the floor
(:mod:`runnerd.bench_bare`).

Modes, measured in one run so their ratios are comparable:

* ``bare``  - the sandbox env's python as a plain subprocess, no isolation (the floor);
* ``cold``  - a daemon in cold mode (a fresh nsjail per job), started by the bench;
* ``warm``  - a daemon in warm mode (zygotes), started by the bench;
* ``daemon`` - with ``--endpoint``: a daemon that is already running.

Each daemon mode runs alone (the others stopped, :mod:`runnerd.bench_daemon`)
so they do not share the CPUs. For each workload and mode: latency
percentiles of sequential jobs (the wall clock a client sees), then
throughput with ``--clients`` concurrent clients. Also measured: each
started daemon's memory when idle (PSS of the daemon and everything under
it: zygotes included; :mod:`runnerd.bench_memory`). The table, its notes,
the JSON and the plot: :mod:`runnerd.bench_report`.

This module is the entry point ``runnerd bench`` (:func:`runnerd.cli.cmd_bench`)
uses, and the one-off jobs' run loop through a daemon.
"""

from __future__ import annotations

import threading
import time

from .bench_bare import bench_bare
from .bench_daemon import started
from .bench_memory import tree_pss
from .bench_report import Progress, Row, plot, report_json, row_of, table
from .bench_sessions import bench_session
from .bench_workloads import WORKLOADS, Workload
from .result import Outcome

__all__ = [
    "WORKLOADS",
    "Progress",
    "Row",
    "Workload",
    "bench_bare",
    "bench_endpoint",
    "plot",
    "report_json",
    "started",
    "table",
    "tree_pss",
]


def bench_endpoint(endpoint: str, mode: str, w: Workload, n: int, clients: int, progress: Progress) -> list[Row]:
    """Sequential latency, then throughput with *clients* concurrent clients, through a daemon."""
    from .client import Client

    if w.kind != "job":
        return bench_session(endpoint, mode, w, n, clients, progress)

    files = dict(w.files)
    times, failures = [], 0
    with Client(endpoint) as c:
        c.run(w.code, files=files, wait=600)  # one warm-up job (first imports, page cache)
        for i in range(n):
            t = time.perf_counter()
            result = c.run(w.code, files=files, wait=600)
            times.append(time.perf_counter() - t)
            failures += (result.outcome is Outcome.OK) != w.expect_ok
            progress(f"{w.name} {mode}", i + 1, n)
    rows = [row_of(w.name, mode, times, failures)]

    lock = threading.Lock()
    state = {"next": 0, "failures": 0}
    ctimes: list[float] = []
    total = max(n, 4 * clients)

    def worker() -> None:
        with Client(endpoint) as c:
            while True:
                with lock:
                    if state["next"] >= total:
                        return
                    state["next"] += 1
                t = time.perf_counter()
                r = c.run(w.code, files=files, wait=600)
                with lock:
                    ctimes.append(time.perf_counter() - t)
                    state["failures"] += (r.outcome is Outcome.OK) != w.expect_ok
                    progress(f"{w.name} {mode} x{clients}", len(ctimes), total)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    elapsed = time.perf_counter() - t0
    row = row_of(w.name, f"{mode} x{clients}", ctimes, state["failures"])
    row.throughput_jobs_s = round(len(ctimes) / elapsed, 2)
    row.clients = clients
    rows.append(row)
    return rows
