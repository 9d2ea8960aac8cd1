"""``runnerd bench``: latency and throughput of the same code, bare, through a cold daemon and a warm one.

Workloads:

* W1 ``print(1)``;
* W2 read a 1,000-row CSV input with pandas, group it, plot it, ``savefig`` a PNG;
* W3 a numpy computation of about 50 ms;
* W4 code that raises.

Sessions (issue 12; picked with ``--workloads`` like the others, e.g.
``--workloads W1,W2,S1,S2,S3,S4`` for one-off and session rows side by side):

* S1 open a session (open -> opened), then close it: a row for each;
* S2 ``print(1)`` in a session that is already open;
* S3 a plot of a 10,000-row DataFrame the session already holds (one PNG figure);
* S4 the memory of idle sessions: PSS of each one's processes (its cgroup's
  ``cgroup.procs``), what the daemon's tree grew by, and the session zygote's own PSS.

Session rows talk runnerd/1 on a raw DEALER socket (:class:`Wire`); in
``bare`` mode a session is a plain interpreter kept running (the floor).

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
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import psutil
import zmq

from .errors import RunnerdError
from .result import Outcome
from .sandbox.sandbox_env import MPLCONFIG
from .server.protocol import decode_reply, request
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


# S3's first run in its session; the measured runs plot what it left.
S3_SETUP = """\
import numpy as np
import pandas as pd
import matplotlib.pyplot as plt
rng = np.random.default_rng(0)
n = 10_000
df = pd.DataFrame({
    "t": np.arange(n),
    "when": pd.date_range("2024-01-01", periods=n, freq="min"),
    "price": 100 + rng.standard_normal(n).cumsum(),
    "volume": rng.integers(1, 1000, n),
    "group": rng.choice(list("abcdefg"), n),
})
print(df.shape)
"""
S3_CODE = 'ax = df.plot(x="t", y="price", title="price")\n'

# S4: how many idle sessions are open at once for the memory reading.
SESSIONS_FOR_MEMORY = 10
# S4: after the opens (and the runs), before reading memory: the zygote re-arms its next child.
MEMORY_SETTLE_S = 2.0


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    code: str
    files: tuple[tuple[str, bytes], ...] = ()
    expect_ok: bool = True
    # "job": a one-off run; sessions: "open" (S1), "run" (code in an open session), "memory" (S4).
    kind: str = "job"
    setup: str = ""  # "run": the session's first run, not measured
    figures: int | None = None  # "run": how many figures each run must return


WORKLOADS: dict[str, Callable[[], Workload]] = {
    "W1": lambda: Workload("W1", "print(1)", "print(1)"),
    "W2": lambda: Workload("W2", "pandas CSV + plot + savefig", W2_CODE, (("data.csv", _w2_csv()),)),
    "W3": lambda: Workload("W3", "numpy, ~50 ms", W3_CODE),
    "W4": lambda: Workload("W4", "raises", "x = {}\nx['missing']\n", expect_ok=False),
    "S1": lambda: Workload("S1", "session open (and close)", "", kind="open"),
    "S2": lambda: Workload("S2", "print(1) in an open session", "print(1)", kind="run"),
    "S3": lambda: Workload(
        "S3", "plot a 10k-row DataFrame the session holds", S3_CODE, kind="run", setup=S3_SETUP, figures=1
    ),
    "S4": lambda: Workload("S4", f"memory of {SESSIONS_FOR_MEMORY} idle sessions", "", kind="memory"),
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
    notes: list[str] = field(default_factory=list)  # printed under the table
    memory: dict[str, Any] | None = None  # S4's readings, in MiB


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


def _bare_env(env_python: Path, home: str) -> dict[str, str]:
    mpl = str(env_python.parent.parent / MPLCONFIG)
    return {"PATH": "/usr/bin:/bin", "HOME": home, "MPLBACKEND": "Agg", "MPLCONFIGDIR": mpl, "OMP_NUM_THREADS": "1"}


def bench_bare(env_python: Path, w: Workload, n: int, progress: Progress) -> Row:
    if w.kind != "job":
        return bench_bare_session(env_python, w, n, progress)
    times, failures = [], 0
    with tempfile.TemporaryDirectory(prefix="runnerd-bench-") as tmp:
        for name, data in w.files:
            Path(tmp, name).write_bytes(data)
        env = _bare_env(env_python, tmp)
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


# ------------------------------------------------------------------ sessions

# The daemons the bench started, by endpoint -> pid: S4 reads their process tree.
STARTED: dict[str, int] = {}

# Targets of issue 12 for the warm rows: (workload, mode) -> p50 ms.
SESSION_TARGETS_MS = {("S2", "warm"): 2.0, ("S3", "warm"): 40.0}
SESSION_TARGET_MIB = 30.0  # S4: an idle warm session, beyond its zygote


def _new_id(kind: str) -> str:
    return f"bench-{kind}-{uuid.uuid4().hex[:16]}"


class Wire:
    """runnerd/1 on one DEALER socket of its own: open, run in a session, close, nothing in between.

    Not :class:`~runnerd.client.Client`: the session rows measure the daemon,
    so no client-side state or resend policy sits on the path. One request at
    a time; replies of other ids (a late one) are skipped.
    """

    TERMINAL = {"open": "opened", "close": "closed", "run": "result"}

    def __init__(self, endpoint: str) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def __enter__(self) -> Wire:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def call(self, op: str, *, wait: float = 600.0, **fields: Any) -> dict[str, Any]:
        """Send one request; its terminal reply (``opened``/``closed``/``result``, or ``error``)."""
        request_id = _new_id(op)
        self.sock.send(request(op, request_id, **fields))
        terminal = self.TERMINAL[op]
        deadline = time.monotonic() + wait
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.sock.poll(int(left * 1000) + 1):
                raise RunnerdError(f"runnerd bench: no reply to {op} in {wait:.0f} s")
            msg = decode_reply(self.sock.recv())
            if msg.get("id") == request_id and msg.get("type") in (terminal, "error"):
                return msg

    def open(self, session: str) -> dict[str, Any]:
        return self.call("open", session=session)

    def run(self, session: str, code: str) -> dict[str, Any]:
        return self.call("run", session=session, code=code, stream=False)

    def close(self, session: str) -> dict[str, Any]:
        return self.call("close", session=session, wait=60.0)


def _why(reply: dict[str, Any]) -> str:
    if reply.get("type") == "error":
        return f"{reply.get('code')}: {reply.get('message')}"
    return f"{reply.get('outcome')} {reply.get('reason')} {str(reply.get('stderr', ''))[-300:]}"


def _run_ok(reply: dict[str, Any], figures: int | None) -> bool:
    return (
        reply.get("type") == "result"
        and reply.get("outcome") == Outcome.OK.value
        and (figures is None or len(reply.get("figures") or ()) == figures)
    )


@contextlib.contextmanager
def _session(wire: Wire, w: Workload) -> Iterator[str]:
    """An open session that has run *w*'s setup; closed on the way out."""
    sid = _new_id(w.name)
    reply = wire.open(sid)
    if reply.get("type") != "opened":
        raise RunnerdError(f"runnerd bench: {w.name}: open failed: {_why(reply)}")
    try:
        if w.setup:
            reply = wire.run(sid, w.setup)
            if not _run_ok(reply, None):
                raise RunnerdError(f"runnerd bench: {w.name}: the session's setup run failed: {_why(reply)}")
        yield sid
    finally:
        wire.close(sid)


def bench_session(endpoint: str, mode: str, w: Workload, n: int, clients: int, progress: Progress) -> list[Row]:
    """The session rows of *w* through a daemon."""
    if w.kind == "open":
        return _bench_open(endpoint, mode, w, n, progress)
    if w.kind == "run":
        return _bench_run(endpoint, mode, w, n, clients, progress)
    if w.kind == "memory":
        return [_bench_memory(endpoint, mode, w, progress)]
    raise AssertionError(w.kind)


def _bench_open(endpoint: str, mode: str, w: Workload, n: int, progress: Progress) -> list[Row]:
    opens: list[float] = []
    closes: list[float] = []
    open_failures = close_failures = 0
    with Wire(endpoint) as wire:
        with _session(wire, w):  # a warm-up open (and close)
            pass
        for i in range(n):
            sid = _new_id(w.name)
            t = time.perf_counter()
            reply = wire.open(sid)
            opens.append(time.perf_counter() - t)
            if reply.get("type") != "opened":
                open_failures += 1
                continue
            t = time.perf_counter()
            reply = wire.close(sid)
            closes.append(time.perf_counter() - t)
            close_failures += reply.get("type") != "closed"
            progress(f"{w.name} {mode}", i + 1, n)
    rows = [_row(w.name, mode, opens, open_failures)]
    if closes:
        rows.append(_row(w.name, f"{mode} close", closes, close_failures))
    return rows


def _bench_run(endpoint: str, mode: str, w: Workload, n: int, clients: int, progress: Progress) -> list[Row]:
    """Sequential runs in one session, then *clients* clients with a session each."""
    times: list[float] = []
    walls: list[float] = []
    failures = 0
    with Wire(endpoint) as wire, _session(wire, w) as sid:
        wire.run(sid, w.code)  # warm-up
        for i in range(n):
            t = time.perf_counter()
            reply = wire.run(sid, w.code)
            times.append(time.perf_counter() - t)
            ok = _run_ok(reply, w.figures)
            failures += not ok
            if ok:
                walls.append(float(reply["usage"]["wall_s"]))
            progress(f"{w.name} {mode}", i + 1, n)
    row = _row(w.name, mode, times, failures)
    if walls:
        inside, whole = percentiles_ms(walls)["p50"], row.p50_ms
        row.notes.append(
            f"{w.name} {mode}: the run itself (result usage.wall_s, send to done) p50 {inside:.2f} ms; "
            f"the rest (queue, thaw, freeze, collect, transport) {whole - inside:.2f} ms of the p50 {whole:.2f} ms"
        )
    rows = [row]

    lock = threading.Lock()
    state = {"next": 0, "failures": 0}
    ctimes: list[float] = []
    total = max(n, 4 * clients)
    ready = threading.Barrier(clients + 1)

    def worker() -> None:
        try:
            with Wire(endpoint) as wire, _session(wire, w) as sid:
                wire.run(sid, w.code)
                ready.wait()
                while True:
                    with lock:
                        if state["next"] >= total:
                            return
                        state["next"] += 1
                    t = time.perf_counter()
                    r = wire.run(sid, w.code)
                    with lock:
                        ctimes.append(time.perf_counter() - t)
                        state["failures"] += not _run_ok(r, w.figures)
                        progress(f"{w.name} {mode} x{clients}", len(ctimes), total)
        except Exception as exc:  # a failed client must not leave the others (or the bench) at the barrier
            sys.stderr.write(f"{exc}\n")
            with lock:
                state["failures"] += 1
            ready.abort()

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for th in threads:
        th.start()
    with contextlib.suppress(threading.BrokenBarrierError):
        ready.wait()  # every client's session open and set up
    t0 = time.perf_counter()
    for th in threads:
        th.join()
    elapsed = time.perf_counter() - t0
    if ctimes:
        crow = _row(w.name, f"{mode} x{clients}", ctimes, state["failures"])
        crow.throughput_jobs_s = round(len(ctimes) / elapsed, 2)
        crow.clients = clients
        rows.append(crow)
    return rows


def _mountinfo_cgroups() -> tuple[Path | None, Path | None]:
    """The cgroup v1 freezer hierarchy's mount point and the cgroup v2 one (either may be None)."""
    freezer = unified = None
    try:
        text = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return None, None
    for line in text.splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        if tail[0] == "cgroup" and "freezer" in tail[2].split(","):
            freezer = Path(fields[4])
        elif tail[0] == "cgroup2":
            unified = Path(fields[4])
    return freezer, unified


def frozen_cgroups(within: int | None = None) -> set[Path]:
    """Frozen ``job-*`` cgroups (sessions between runs): v1's freezer hierarchy, else v2.

    With *within* (a daemon's pid), only those holding a process of its tree.
    """
    freezer, unified = _mountinfo_cgroups()
    found: set[Path] = set()
    if freezer is not None:
        for d in freezer.rglob("job-*"):
            with contextlib.suppress(OSError):
                if (d / "freezer.state").read_text().strip() == "FROZEN":
                    found.add(d)
    elif unified is not None:
        for d in unified.rglob("job-*"):
            with contextlib.suppress(OSError):
                if "frozen 1" in (d / "cgroup.events").read_text().splitlines():
                    found.add(d)
    if within is None:
        return found
    try:
        root = psutil.Process(within)
        tree = {within} | {p.pid for p in root.children(recursive=True)}
    except psutil.Error:
        return found
    return {d for d in found if tree & set(cgroup_procs(d))}


def cgroup_procs(cgroup: Path) -> list[int]:
    try:
        return [int(p) for p in (cgroup / "cgroup.procs").read_text().split()]
    except (OSError, ValueError):
        return []


def smaps_rollup(pid: int) -> dict[str, int]:
    """A process's /proc/<pid>/smaps_rollup in bytes: Rss, Pss, Private_Clean, ...; {} if it is gone."""
    out: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2] == "kB" and parts[0].endswith(":"):
            out[parts[0][:-1]] = int(parts[1]) * 1024
    return out


def _procs_memory(pids: list[int]) -> tuple[int, int]:
    """(PSS, USS) of *pids* together, in bytes."""
    pss = uss = 0
    for pid in pids:
        r = smaps_rollup(pid)
        pss += r.get("Pss", 0)
        uss += r.get("Private_Clean", 0) + r.get("Private_Dirty", 0)
    return pss, uss


def _zygote_of(pids: list[int]) -> int | None:
    """The warm zygote a session was forked from: the parent of its topmost process, if that is a zygote."""
    for pid in pids:
        try:
            parent = psutil.Process(pid).parent()
            if parent is not None and parent.pid not in pids and any("zygote" in a for a in parent.cmdline()):
                return parent.pid
        except psutil.Error:
            continue
    return None


MiB = float(1 << 20)


def _memory_reading(daemon: int | None, cgroups: list[Path], tree_before: int | None) -> dict[str, Any]:
    sessions = [_procs_memory(cgroup_procs(d)) for d in cgroups]
    pss = [p / MiB for p, _ in sessions]
    uss = [u / MiB for _, u in sessions]
    reading: dict[str, Any] = {
        "sessions": len(sessions),
        "pss_mib": [round(v, 2) for v in pss],
        "uss_mib": [round(v, 2) for v in uss],
        "pss_mean_mib": round(statistics.fmean(pss), 2) if pss else None,
        "uss_mean_mib": round(statistics.fmean(uss), 2) if uss else None,
    }
    if daemon is not None and tree_before is not None:
        growth = (tree_pss(daemon) - tree_before) / MiB
        reading["tree_growth_mib"] = round(growth, 2)
        reading["tree_growth_per_session_mib"] = round(growth / max(len(cgroups), 1), 2)
    zygote = next((z for d in cgroups if (z := _zygote_of(cgroup_procs(d))) is not None), None)
    if zygote is not None:
        r = smaps_rollup(zygote)
        reading["zygote_pid"] = zygote
        reading["zygote_pss_mib"] = round(r.get("Pss", 0) / MiB, 2)
        reading["zygote_rss_mib"] = round(r.get("Rss", 0) / MiB, 2)
    return reading


def _memory_note(label: str, m: dict[str, Any]) -> str:
    if not m["pss_mib"]:
        return f"{label}: no session's cgroup found (no frozen cgroup appeared with the opens)"
    note = (
        f"{label}: PSS per session (its cgroup's processes) mean {m['pss_mean_mib']:.1f} MiB "
        f"(min {min(m['pss_mib']):.1f}, max {max(m['pss_mib']):.1f}), private (USS) mean {m['uss_mean_mib']:.1f} MiB"
    )
    if "tree_growth_mib" in m:
        note += (
            f"; the daemon's tree PSS grew {m['tree_growth_mib']:.1f} MiB = "
            f"{m['tree_growth_per_session_mib']:.1f} MiB per session"
        )
    if "zygote_pss_mib" in m:
        note += f"; session zygote PSS {m['zygote_pss_mib']:.1f} MiB (RSS {m['zygote_rss_mib']:.1f})"
    return note


def _bench_memory(endpoint: str, mode: str, w: Workload, progress: Progress) -> Row:
    """S4: open SESSIONS_FOR_MEMORY sessions and leave them idle; their memory, then again after a print(1) each."""
    n = SESSIONS_FOR_MEMORY
    daemon = STARTED.get(endpoint)
    times: list[float] = []
    failures = 0
    opened: list[str] = []
    cgroups: list[Path] = []
    with Wire(endpoint) as wire:
        try:
            tree_before = tree_pss(daemon) if daemon is not None else None
            for i in range(n):
                before = frozen_cgroups(daemon)
                sid = _new_id(w.name)
                t = time.perf_counter()
                reply = wire.open(sid)
                times.append(time.perf_counter() - t)
                if reply.get("type") != "opened":
                    failures += 1
                    continue
                opened.append(sid)
                new = frozen_cgroups(daemon) - before
                if len(new) == 1:
                    cgroups.extend(new)
                progress(f"{w.name} {mode}", i + 1, n)
            time.sleep(MEMORY_SETTLE_S)
            idle = _memory_reading(daemon, cgroups, tree_before)
            for sid in opened:
                failures += not _run_ok(wire.run(sid, "print(1)"), None)
            time.sleep(MEMORY_SETTLE_S)
            after_run = _memory_reading(daemon, cgroups, tree_before)
        finally:
            for sid in opened:
                wire.close(sid)
    row = _row(w.name, mode, times, failures)
    row.memory = {"idle": idle, "after_print": after_run}
    row.notes.append(_memory_note(f"{w.name} {mode}: {len(opened)} idle sessions", idle))
    row.notes.append(_memory_note(f"{w.name} {mode}: the same after one print(1) in each", after_run))
    zygote = idle.get("zygote_pid")
    if zygote is not None:
        time.sleep(MEMORY_SETTLE_S)  # the sessions closed: the zygote shares its pages with its armed child only
        r = smaps_rollup(zygote)
        alone = {"pss_mib": round(r.get("Pss", 0) / MiB, 2), "rss_mib": round(r.get("Rss", 0) / MiB, 2)}
        row.memory["zygote_alone"] = alone
        row.notes.append(
            f"{w.name} {mode}: the session zygote with no session open: PSS {alone['pss_mib']:.1f} MiB "
            f"(RSS {alone['rss_mib']:.1f})"
        )
    return row


# A session without runnerd: one interpreter, code in and a status out over its stdin and stdout.
BARE_SESSION = r"""
import contextlib, io, struct, sys
inp, out = sys.stdin.buffer, sys.stdout.buffer
namespace = {"__name__": "__main__"}

def render():
    plt = sys.modules.get("matplotlib.pyplot")
    if plt is None:
        return 0
    nums = plt.get_fignums()
    for num in nums:  # as the cage's backend renders what is left open
        plt.figure(num).savefig(io.BytesIO(), format="png", bbox_inches="tight")
    plt.close("all")
    return len(nums)

out.write(b"R")
out.flush()
while True:
    head = inp.read(4)
    if len(head) < 4:
        break
    code = inp.read(struct.unpack(">I", head)[0]).decode()
    ok = 1
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            exec(compile(code, "<cell>", "exec"), namespace)
        except BaseException:
            ok = 0
    out.write(struct.pack(">BI", ok, render()))
    out.flush()
"""


class BareSession:
    """The floor of a session: the sandbox env's python kept running, no cage, no daemon."""

    def __init__(self, env_python: Path, home: str) -> None:
        self.proc = subprocess.Popen(
            [str(env_python), "-c", BARE_SESSION], cwd=home, env=_bare_env(env_python, home),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )  # fmt: skip
        if self._read(1) != b"R":
            raise RunnerdError("runnerd bench: the bare session did not start")

    def _read(self, size: int) -> bytes:
        stdout: IO[bytes] | None = self.proc.stdout
        assert stdout is not None
        return stdout.read(size)

    def run(self, code: str) -> tuple[bool, int]:
        """(ok, figures rendered)."""
        stdin: IO[bytes] | None = self.proc.stdin
        assert stdin is not None
        body = code.encode()
        stdin.write(struct.pack(">I", len(body)) + body)
        stdin.flush()
        answer = self._read(5)
        if len(answer) < 5:
            raise RunnerdError("runnerd bench: the bare session ended")
        ok, figures = struct.unpack(">BI", answer)
        return bool(ok), figures

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def bench_bare_session(env_python: Path, w: Workload, n: int, progress: Progress) -> Row:
    """A session workload on a bare interpreter kept running: one row (S1: the open; S4: PSS in notes)."""
    times: list[float] = []
    failures = 0
    with tempfile.TemporaryDirectory(prefix="runnerd-bench-") as tmp:
        if w.kind == "open":
            closes: list[float] = []
            for i in range(n):
                t = time.perf_counter()
                s = BareSession(env_python, tmp)
                times.append(time.perf_counter() - t)
                t = time.perf_counter()
                s.close()
                closes.append(time.perf_counter() - t)
                progress(f"{w.name} bare", i + 1, n)
            row = _row(w.name, "bare", times, 0)
            row.notes.append(f"{w.name} bare: close (stdin EOF, exit) p50 {percentiles_ms(closes)['p50']:.2f} ms")
            return row
        if w.kind == "memory":
            sessions = []
            try:
                for i in range(SESSIONS_FOR_MEMORY):
                    t = time.perf_counter()
                    sessions.append(BareSession(env_python, tmp))
                    times.append(time.perf_counter() - t)
                    progress(f"{w.name} bare", i + 1, SESSIONS_FOR_MEMORY)
                pss = [smaps_rollup(s.proc.pid).get("Pss", 0) / MiB for s in sessions]
            finally:
                for s in sessions:
                    s.close()
            row = _row(w.name, "bare", times, 0)
            row.memory = {"idle": {"sessions": len(pss), "pss_mib": [round(v, 2) for v in pss]}}
            row.notes.append(f"{w.name} bare: an idle interpreter's PSS mean {statistics.fmean(pss):.1f} MiB")
            return row
        s = BareSession(env_python, tmp)
        try:
            if w.setup and not s.run(w.setup)[0]:
                raise RunnerdError(f"runnerd bench: {w.name}: the bare session's setup failed")
            s.run(w.code)  # warm-up
            for i in range(n):
                t = time.perf_counter()
                ok, figures = s.run(w.code)
                times.append(time.perf_counter() - t)
                failures += not ok or (w.figures is not None and figures != w.figures)
                progress(f"{w.name} bare", i + 1, n)
        finally:
            s.close()
    return _row(w.name, "bare", times, failures)


def session_ratios(rows: list[Row]) -> list[str]:
    """A session row against its one-off counterpart in the same run, and issue 12's targets."""
    by = {(r.workload, r.mode): r for r in rows}
    lines = []
    pairs = (("S2", "W1", "print(1) in a session / one-off print(1)"),
             ("S3", "W2", "plot in a session holding the data / one-off pandas CSV + plot"))  # fmt: skip
    for session, one_off, what in pairs:
        for mode in ("bare", "cold", "warm", "daemon"):
            s, o = by.get((session, mode)), by.get((one_off, mode))
            if s and o and o.p50_ms:
                lines.append(f"{session}/{one_off} {mode} p50 ratio ({what}): {s.p50_ms / o.p50_ms:.3f}")
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
        STARTED[self.endpoint] = self.proc.pid

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
        STARTED.pop(self.endpoint, None)
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
    from .client import Client

    with Client(endpoint) as c:
        result = c.run(PLOT_CODE, files={"bench.json": json.dumps(report).encode()}, wait=120)
    for figure in result.figures:
        if figure.name == "bench.png":
            return figure.data
    sys.stderr.write(f"runnerd bench: the plot job failed: {result.reason} {result.stderr[-500:]}\n")
    return None
