"""``runnerd bench``'s run loop through a daemon: a one-off workload's rows; a session workload's are in
:mod:`runnerd.bench.sessions`.
"""

from __future__ import annotations

import threading
import time

from ..result import Outcome
from .report import Progress, Row, row_of
from .sessions import bench_session
from .tickets import Tickets
from .workloads import Workload


def bench_endpoint(endpoint: str, mode: str, w: Workload, n: int, clients: int, progress: Progress) -> list[Row]:
    """Sequential latency, then throughput with *clients* concurrent clients, through a daemon."""
    from ..client import Client

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

    tickets = Tickets(max(n, 4 * clients), f"{w.name} {mode} x{clients}", progress)

    def worker() -> None:
        with Client(endpoint) as c:
            tickets.serve(lambda: (c.run(w.code, files=files, wait=600).outcome is Outcome.OK) == w.expect_ok)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    rows.append(tickets.row(w.name, f"{mode} x{clients}", clients, time.perf_counter() - t0))
    return rows
