"""``runnerd bench``: latency and throughput of the same code, bare, in a cage, and through a daemon.

Modes, all measured in one run so their ratios are comparable:

* ``bare``   - the sandbox env's python as a plain subprocess (no isolation), in
  a temp dir holding the inputs: the floor;
* ``cage``   - runnerd's cold cage, in this process (no daemon, no sockets);
* ``daemon`` - through a running daemon over its endpoint: sequential jobs for
  latency, then ``--clients`` concurrent clients for throughput.

Latency is wall clock per job as the caller sees it.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from .result import Outcome

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

W2_CODE = """\
import pandas as pd
import matplotlib.pyplot as plt
df = pd.read_csv("data.csv")
g = df.groupby("group")["value"].agg(["mean", "sum", "count"])
print(g.round(2).to_string())
g["sum"].plot.bar()
plt.savefig("plot.png")
"""


def _w2_csv(rows: int = 1000) -> bytes:
    lines = ["id,group,value"]
    for i in range(rows):
        lines.append(f"{i},g{i % 7},{(i * 37) % 101 / 3:.3f}")
    return ("\n".join(lines) + "\n").encode()


@dataclass(frozen=True)
class Workload:
    name: str
    code: str
    files: tuple[tuple[str, bytes], ...] = ()
    expect_ok: bool = True


WORKLOADS: dict[str, Callable[[], Workload]] = {
    "print": lambda: Workload("print", "print(1)"),
    "pandas_plot": lambda: Workload("pandas_plot", W2_CODE, (("data.csv", _w2_csv()),)),
    "numpy": lambda: Workload(
        "numpy", "import numpy as np\na = np.random.default_rng(0).random((700, 700))\nprint(float((a @ a).sum()))"
    ),
    "raises": lambda: Workload("raises", "x = {}\nx['missing']\n", expect_ok=False),
    # The README's demo job: examples/demo.py with examples/sales.csv.
    "demo": lambda: Workload(
        "demo", (EXAMPLES / "demo.py").read_text(), (("sales.csv", (EXAMPLES / "sales.csv").read_bytes()),)
    ),
}


@dataclass
class Row:
    workload: str
    mode: str
    jobs: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    throughput_jobs_s: float | None = None
    clients: int | None = None
    failures: int = 0


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def _row(workload: str, mode: str, times: list[float], failures: int) -> Row:
    return Row(
        workload=workload, mode=mode, jobs=len(times),
        p50_ms=round(_pct(times, 0.50), 2), p95_ms=round(_pct(times, 0.95), 2),
        p99_ms=round(_pct(times, 0.99), 2), mean_ms=round(statistics.fmean(times) * 1000, 2),
        failures=failures,
    )  # fmt: skip


def _progress(label: str, done: int, total: int) -> None:
    if not sys.stderr.isatty():
        return
    width = 30
    filled = int(width * done / max(total, 1))
    sys.stderr.write(f"\r{label:<28} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
    if done >= total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def bench_bare(env_python: Path, w: Workload, n: int) -> Row:
    times, failures = [], 0
    with tempfile.TemporaryDirectory(prefix="runnerd-bench-") as tmp:
        for name, data in w.files:
            Path(tmp, name).write_bytes(data)
        env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "MPLBACKEND": "Agg", "MPLCONFIGDIR": str(env_python.parent.parent / "runnerd" / "mplconfig")}
        for i in range(n):
            t = time.perf_counter()
            proc = subprocess.run([str(env_python), "-c", w.code], cwd=tmp, capture_output=True, env=env)
            times.append(time.perf_counter() - t)
            failures += (proc.returncode == 0) != w.expect_ok
            _progress(f"{w.name}/bare", i + 1, n)
    return _row(w.name, "bare", times, failures)


def bench_cage(runtime, w: Workload, n: int) -> Row:  # runtime: runnerd.runtime.Runtime
    from .job import make_job

    job = make_job(w.code, list(w.files), None, limits=runtime.config.limits)
    times, failures = [], 0

    async def go() -> None:
        nonlocal failures
        for i in range(n):
            t = time.perf_counter()
            result = await runtime.cage.run(job)
            times.append(time.perf_counter() - t)
            failures += (result.outcome is Outcome.OK) != w.expect_ok
            _progress(f"{w.name}/cage", i + 1, n)

    asyncio.run(go())
    return _row(w.name, "cage", times, failures)


def bench_daemon(endpoint: str, w: Workload, n: int, clients: int) -> list[Row]:
    from .client import Client

    files = dict(w.files)
    times, failures = [], 0
    with Client(endpoint) as c:
        for i in range(n):
            t = time.perf_counter()
            result = c.run(w.code, files=files)
            times.append(time.perf_counter() - t)
            failures += (result.outcome is Outcome.OK) != w.expect_ok
            _progress(f"{w.name}/daemon", i + 1, n)
    rows = [_row(w.name, "daemon", times, failures)]

    # Throughput: *clients* threads, each with its own socket, n jobs in all.
    lock = threading.Lock()
    counter = {"next": 0, "failures": 0}
    ctimes: list[float] = []

    def worker() -> None:
        with Client(endpoint) as c:
            while True:
                with lock:
                    if counter["next"] >= n:
                        return
                    counter["next"] += 1
                t = time.perf_counter()
                r = c.run(w.code, files=files, wait=600)
                with lock:
                    ctimes.append(time.perf_counter() - t)
                    counter["failures"] += (r.outcome is Outcome.OK) != w.expect_ok
                    _progress(f"{w.name}/daemon x{clients}", len(ctimes), n)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    elapsed = time.perf_counter() - t0
    row = _row(w.name, f"daemon x{clients}", ctimes, counter["failures"])
    row.throughput_jobs_s = round(len(ctimes) / elapsed, 2)
    row.clients = clients
    rows.append(row)
    return rows


def table(rows: list[Row]) -> str:
    head = f"{'workload':<12} {'mode':<12} {'jobs':>5} {'p50 ms':>9} {'p95 ms':>9} {'p99 ms':>9} {'mean ms':>9} {'jobs/s':>8} {'fail':>5}"
    lines = [head, "-" * len(head)]
    for r in rows:
        tput = f"{r.throughput_jobs_s:.1f}" if r.throughput_jobs_s is not None else ""
        lines.append(
            f"{r.workload:<12} {r.mode:<12} {r.jobs:>5} {r.p50_ms:>9.1f} {r.p95_ms:>9.1f} {r.p99_ms:>9.1f} "
            f"{r.mean_ms:>9.1f} {tput:>8} {r.failures:>5}"
        )
    return "\n".join(lines)


def machine() -> dict[str, object]:
    return {
        "cpus": os.cpu_count(),
        "kernel": os.uname().release,
        "python": sys.version.split()[0],
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_json(path: Path, rows: list[Row], extra: dict[str, object]) -> None:
    path.write_text(json.dumps({"machine": machine(), **extra, "rows": [asdict(r) for r in rows]}, indent=2) + "\n")
