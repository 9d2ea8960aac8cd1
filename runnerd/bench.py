"""``runnerd bench``: latency and throughput of the same code, bare, through a cold daemon and a warm one.

Workloads:

* W1 ``print(1)``;
* W2 read a 1,000-row CSV input with pandas, group it, plot it, ``savefig`` a PNG;
* W3 a numpy computation of about 50 ms;
* W4 code that raises.

Modes, measured in one run so their ratios are comparable:

* ``bare``  - the sandbox env's python as a plain subprocess, no isolation (the floor);
* ``cold``  - a daemon in cold mode (a fresh nsjail per job), started by the bench;
* ``warm``  - a daemon in warm mode (zygotes), started by the bench;
* ``daemon`` - with ``--endpoint``: a daemon that is already running.

Each daemon mode runs alone (the others stopped) so they do not share the
CPUs. For each workload and mode: latency percentiles of sequential jobs
(the wall clock a client sees), then throughput with ``--clients``
concurrent clients. Also measured: each started daemon's memory when idle
(PSS of the daemon and everything under it: zygotes included).
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from .result import Outcome
from .sandbox.sandbox_env import MPLCONFIG
from .server.scheduler import percentiles_ms

W2_CODE = """\
import pandas as pd
import matplotlib.pyplot as plt
df = pd.read_csv("data.csv")
g = df.groupby("group")["value"].agg(["mean", "sum", "count"])
print(g.round(2).to_string())
g["sum"].plot.bar()
plt.savefig("plot.png")
"""

W3_CODE = """\
import numpy as np
rng = np.random.default_rng(0)
a = rng.random((600, 600))
b = a
for _ in range(4):
    b = np.tanh(b @ a / 600)
print(round(float(b.sum()), 3))
"""


def _w2_csv(rows: int = 1000) -> bytes:
    lines = ["id,group,value"]
    for i in range(rows):
        lines.append(f"{i},g{i % 7},{(i * 37) % 101 / 3:.3f}")
    return ("\n".join(lines) + "\n").encode()


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    code: str
    files: tuple[tuple[str, bytes], ...] = ()
    expect_ok: bool = True


WORKLOADS: dict[str, Callable[[], Workload]] = {
    "W1": lambda: Workload("W1", "print(1)", "print(1)"),
    "W2": lambda: Workload("W2", "pandas CSV + plot + savefig", W2_CODE, (("data.csv", _w2_csv()),)),
    "W3": lambda: Workload("W3", "numpy, ~50 ms", W3_CODE),
    "W4": lambda: Workload("W4", "raises", "x = {}\nx['missing']\n", expect_ok=False),
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
    failures: int = 0
    throughput_jobs_s: float | None = None
    clients: int | None = None
    samples_ms: list[float] = field(default_factory=list, repr=False)


def _row(workload: str, mode: str, times: list[float], failures: int) -> Row:
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


def bench_bare(env_python: Path, w: Workload, n: int, progress: Progress) -> Row:
    times, failures = [], 0
    with tempfile.TemporaryDirectory(prefix="runnerd-bench-") as tmp:
        for name, data in w.files:
            Path(tmp, name).write_bytes(data)
        mpl = str(env_python.parent.parent / MPLCONFIG)
        env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "MPLBACKEND": "Agg", "MPLCONFIGDIR": mpl, "OMP_NUM_THREADS": "1"}
        for i in range(n):
            t = time.perf_counter()
            proc = subprocess.run([str(env_python), "-c", w.code], cwd=tmp, capture_output=True, env=env)
            times.append(time.perf_counter() - t)
            failures += (proc.returncode == 0) != w.expect_ok
            progress(f"{w.name} bare", i + 1, n)
    return _row(w.name, "bare", times, failures)


def bench_endpoint(endpoint: str, mode: str, w: Workload, n: int, clients: int, progress: Progress) -> list[Row]:
    """Sequential latency, then throughput with *clients* concurrent clients, through a daemon."""
    from .client import Client

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
    rows = [_row(w.name, mode, times, failures)]

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
    row = _row(w.name, f"{mode} x{clients}", ctimes, state["failures"])
    row.throughput_jobs_s = round(len(ctimes) / elapsed, 2)
    row.clients = clients
    rows.append(row)
    return rows


def tree_pss(pid: int) -> int:
    """PSS of a process and all its descendants, in bytes."""
    total = 0
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    for p in procs:
        try:
            total += p.memory_full_info().pss
        except psutil.Error:
            continue
    return total


class BenchDaemon:
    """A daemon started for the bench: the given config file, its own ipc socket, a given mode."""

    def __init__(self, config_path: Path | None, mode: str, concurrency: int | None) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="runnerd-bench-")
        self.endpoint = f"ipc://{self.tmp.name}/bench.sock"
        argv = [sys.executable, "-m", "runnerd"]
        if config_path is not None:
            argv += ["--config", str(config_path)]
        argv += ["serve", "--bind", self.endpoint, "--mode", mode]
        if concurrency:
            argv += ["--concurrency", str(concurrency)]
        self.log = Path(self.tmp.name) / "daemon.log"
        self.proc = subprocess.Popen(
            argv, stdout=open(self.log, "wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )

    def wait_ready(self, timeout: float = 300) -> None:
        from .client import Client
        from .errors import ClientError, RunnerdError

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RunnerdError(f"the bench's daemon exited:\n{self.log.read_text()[-3000:]}")
            try:
                with Client(self.endpoint) as c:
                    c.ping(timeout=1)
                return
            except ClientError:
                time.sleep(0.2)
        raise RunnerdError(f"the bench's daemon did not come up:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.tmp.cleanup()


@contextlib.contextmanager
def started(config_path: Path | None, mode: str, concurrency: int | None) -> Iterator[BenchDaemon]:
    d = BenchDaemon(config_path, mode, concurrency)
    try:
        d.wait_ready()
        yield d
    finally:
        d.stop()


def table(rows: list[Row]) -> str:
    head = (
        f"{'workload':<9} {'mode':<12} {'jobs':>5} {'p50 ms':>9} {'p95 ms':>9} {'p99 ms':>9} {'mean ms':>9} "
        f"{'jobs/s':>8} {'fail':>5}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        tput = f"{r.throughput_jobs_s:.1f}" if r.throughput_jobs_s is not None else ""
        lines.append(
            f"{r.workload:<9} {r.mode:<12} {r.jobs:>5} {r.p50_ms:>9.1f} {r.p95_ms:>9.1f} {r.p99_ms:>9.1f} "
            f"{r.mean_ms:>9.1f} {tput:>8} {r.failures:>5}"
        )
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
    from .client import Client

    with Client(endpoint) as c:
        result = c.run(PLOT_CODE, files={"bench.json": json.dumps(report).encode()}, wait=120)
    for figure in result.figures:
        if figure.name == "bench.png":
            return figure.data
    sys.stderr.write(f"runnerd bench: the plot job failed: {result.reason} {result.stderr[-500:]}\n")
    return None
