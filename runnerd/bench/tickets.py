"""``runnerd bench``'s throughput rows: concurrent clients sharing a fixed number of runs.

Each client thread takes the next ticket under one lock until none is left,
so the row has exactly ``total`` runs whatever the clients' speeds. One-off
jobs (:mod:`runnerd.bench.jobs`) and runs in sessions
(:mod:`runnerd.bench.sessions`) share it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from .report import Progress, Row, row_of


class Tickets:
    """*total* runs for concurrent clients: who runs next, and each run's time and verdict."""

    def __init__(self, total: int, label: str, progress: Progress) -> None:
        self.total = total
        self.label = label
        self.progress = progress
        self.lock = threading.Lock()
        self.taken = 0
        self.failures = 0
        self.times: list[float] = []

    def serve(self, run: Callable[[], bool]) -> None:
        """Take tickets until none is left, timing *run* for each (it says whether the run went as expected)."""
        while True:
            with self.lock:
                if self.taken >= self.total:
                    return
                self.taken += 1
            t = time.perf_counter()
            ok = run()
            with self.lock:
                self.times.append(time.perf_counter() - t)
                self.failures += not ok
                self.progress(self.label, len(self.times), self.total)

    def failed(self) -> None:
        """A client that broke before its runs: one failure in the row."""
        with self.lock:
            self.failures += 1

    def row(self, workload: str, mode: str, clients: int, elapsed: float) -> Row:
        """The throughput row of the runs done in *elapsed* seconds."""
        row = row_of(workload, mode, self.times, self.failures)
        row.throughput_jobs_s = round(len(self.times) / elapsed, 2)
        row.clients = clients
        return row
