"""``runnerd bench --modes fairness``: tenants sharing one daemon's slots, through a real daemon.

One warm daemon; every job sleeps :data:`JOB_S` in its cage, so the slots
are what the tenants share (not the CPUs the bench's own clients use too).
Each tenant's clients name it (``Client(tenant=...)``); each client runs a
job, then thinks for a random time (exponential, mean :data:`THINK_S`),
then runs the next.

1. *light alone*: four light tenants, one client each (about 40% of two slots);
2. *light with heavy*: the same, beside one heavy tenant offering ten times
   a light one's load (ten clients; more than the daemon can run);
3. *backlogged*: three tenants that always have runs waiting, one with ten
   times the others' clients, no thinking; the jobs each is served in the
   same window, and Jain's index of those shares.

Issue 17's targets: the light tenants' p99 with the heavy one at most
:data:`P99_RATIO_TARGET` times their p99 alone; Jain's index of the
backlogged tenants' shares at least :data:`JAIN_TARGET`.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import Counter
from pathlib import Path

from ..errors import RunnerdError
from ..result import Outcome
from .daemon import started
from .report import Progress, Row, row_of

log = logging.getLogger(__name__)

JOB_S = 0.1
THINK_S = 0.4
LIGHT_TENANTS = 4
HEAVY_FACTOR = 10
BACKLOGGED = {"deep": 3 * HEAVY_FACTOR, "b": 3, "c": 3}  # tenant -> clients (no thinking)
P99_RATIO_TARGET = 2.0
JAIN_TARGET = 0.95
WORKLOAD = "F1"
CODE = f"import time\ntime.sleep({JOB_S})\n"


def jain(shares: list[float]) -> float:
    """Jain's fairness index: 1 when all shares are equal, 1/n when one tenant has it all."""
    total = sum(shares)
    return total * total / (len(shares) * sum(x * x for x in shares)) if total else 0.0


class Load:
    """Clients running jobs until told to stop: each job's (tenant, seconds, end) and the failures."""

    def __init__(self, endpoint: str, seed: int) -> None:
        self.endpoint = endpoint
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.done: list[tuple[str, float, float]] = []
        self.failures: Counter[str] = Counter()
        self.threads: list[threading.Thread] = []
        self.rng = random.Random(seed)

    def add(self, tenant: str, clients: int, think_s: float) -> None:
        for _ in range(clients):
            seed = self.rng.random()
            self.threads.append(threading.Thread(target=self._client, args=(tenant, think_s, seed), daemon=True))

    def _client(self, tenant: str, think_s: float, seed: float) -> None:
        from ..client import Client

        rng = random.Random(seed)
        with Client(self.endpoint, tenant=tenant) as c:
            while not self.stop.is_set():
                t = time.perf_counter()
                try:
                    ok = c.run(CODE, wait=120).outcome is Outcome.OK
                except RunnerdError as exc:  # BUSY past a cap, no answer: a failure in the row, and on
                    log.warning("fairness bench: tenant %s: %s", tenant, exc)
                    ok = False
                end = time.perf_counter()
                with self.lock:
                    if ok:
                        self.done.append((tenant, end - t, end))
                    self.failures[tenant] += not ok
                if think_s:
                    self.stop.wait(rng.expovariate(1 / think_s))  # pacing of the offered load, not a wait for it

    def run_for(self, seconds: float, progress: Progress, label: str) -> tuple[float, float]:
        """Run every client for *seconds* after its first jobs are done; the measured window (start, end)."""
        for th in self.threads:
            th.start()
        while len(self.done) < len(self.threads) and all(th.is_alive() for th in self.threads):
            time.sleep(0.05)  # polling a count the clients raise, not waiting on time to pass
        start = time.perf_counter()
        while (left := start + seconds - time.perf_counter()) > 0:
            progress(label, int(seconds - left), int(seconds))
            time.sleep(min(1.0, left))
        progress(label, int(seconds), int(seconds))
        end = time.perf_counter()
        self.stop.set()
        for th in self.threads:
            th.join(timeout=150)
        return start, end

    def within(self, window: tuple[float, float], tenant_prefix: str = "") -> list[tuple[str, float, float]]:
        """The jobs that ended inside *window*, of tenants whose name starts with *tenant_prefix*; at least one."""
        found = [d for d in self.done if window[0] <= d[2] <= window[1] and d[0].startswith(tenant_prefix)]
        if not found:
            raise RunnerdError(f"fairness bench: no job of {tenant_prefix or 'any tenant'} ended in the window")
        return found


def bench_fairness(
    config_path: Path | None, concurrency: int | None, progress: Progress, seconds: float = 20.0
) -> list[Row]:
    """The light tenants' latency alone and beside a heavy tenant, then the backlogged tenants' shares."""
    rows: list[Row] = []
    slots = concurrency or 2
    with started(config_path, "warm", slots) as d:
        alone = Load(d.endpoint, seed=1)
        for i in range(LIGHT_TENANTS):
            alone.add(f"light{i}", 1, THINK_S)
        window = alone.run_for(seconds, progress, "fairness: light alone")
        light = [t for _, t, _ in alone.within(window, "light")]
        rows.append(row_of(WORKLOAD, f"{LIGHT_TENANTS} light tenants", light, sum(alone.failures.values())))

        mixed = Load(d.endpoint, seed=2)
        for i in range(LIGHT_TENANTS):
            mixed.add(f"light{i}", 1, THINK_S)
        mixed.add("heavy", HEAVY_FACTOR, THINK_S)
        window = mixed.run_for(seconds, progress, "fairness: light + heavy")
        with_heavy = [t for _, t, _ in mixed.within(window, "light")]
        failures = sum(n for tenant, n in mixed.failures.items() if tenant.startswith("light"))
        row = row_of(WORKLOAD, f"{LIGHT_TENANTS} light + 1 heavy ({HEAVY_FACTOR}x)", with_heavy, failures)
        row.served = Counter(tenant for tenant, _, _ in mixed.within(window))
        heavy = row.served["heavy"]
        ratio = row.p99_ms / rows[0].p99_ms if rows[0].p99_ms else float("inf")
        row.notes.append(
            f"fairness: light tenants' p99 beside a tenant offering {HEAVY_FACTOR}x a light one's load / alone = "
            f"{ratio:.2f} (target <= {P99_RATIO_TARGET}); the heavy tenant ran {heavy} jobs in the window, "
            f"the light ones {len(with_heavy)}; {slots} slots, jobs of {JOB_S * 1000:.0f} ms"
        )
        rows.append(row)

        backlog = Load(d.endpoint, seed=3)
        for tenant, clients in BACKLOGGED.items():
            backlog.add(tenant, clients, 0.0)
        window = backlog.run_for(seconds / 2, progress, "fairness: backlogged")
        row = row_of(
            WORKLOAD, f"{len(BACKLOGGED)} backlogged tenants", [t for _, t, _ in backlog.within(window)],
            sum(backlog.failures.values()),
        )  # fmt: skip
        row.served = Counter(tenant for tenant, _, _ in backlog.within(window))
        shares = [row.served[t] for t in BACKLOGGED]
        row.notes.append(
            f"fairness: jobs served in {window[1] - window[0]:.0f} s to backlogged tenants of "
            + ", ".join(f"{n} clients" for n in BACKLOGGED.values())
            + f": {', '.join(map(str, shares))}; Jain's index {jain([float(x) for x in shares]):.3f} "
            f"(target >= {JAIN_TARGET})"
        )
        rows.append(row)
    return rows
