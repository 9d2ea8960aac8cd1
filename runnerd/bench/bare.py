"""``runnerd bench``'s ``bare`` mode, the floor: the sandbox env's python with no daemon and no cage.

A one-off workload is a subprocess per job; a session workload is one
interpreter kept running (:class:`BareSession`), code in and a status out
over its stdin and stdout.
"""

from __future__ import annotations

import statistics
import struct
import subprocess
import tempfile
import time
from pathlib import Path
from typing import IO

from ..errors import RunnerdError
from ..percentiles import percentiles_ms
from ..sandbox.sandbox_env import MPLCONFIG
from .memory import MiB, smaps_rollup
from .report import Progress, Row, row_of
from .workloads import SESSIONS_FOR_MEMORY, Workload


def _bare_env(env_python: Path, home: str) -> dict[str, str]:
    mpl = str(env_python.parent.parent / MPLCONFIG)
    return {"PATH": "/usr/bin:/bin", "HOME": home, "MPLBACKEND": "Agg", "MPLCONFIGDIR": mpl, "OMP_NUM_THREADS": "1"}


def _write_files(w: Workload, directory: str) -> None:
    for name, data in w.files:
        Path(directory, name).write_bytes(data)


def bench_bare(env_python: Path, w: Workload, n: int, progress: Progress) -> Row:
    """*w*'s row in bare mode: *n* sequential jobs (or, for a session workload, its floor)."""
    if w.kind != "job":
        return bench_bare_session(env_python, w, n, progress)
    times, failures = [], 0
    with tempfile.TemporaryDirectory(prefix="runnerd-bench-") as tmp:
        _write_files(w, tmp)
        env = _bare_env(env_python, tmp)
        for i in range(n):
            t = time.perf_counter()
            proc = subprocess.run([str(env_python), "-c", w.code], cwd=tmp, capture_output=True, env=env)
            times.append(time.perf_counter() - t)
            failures += (proc.returncode == 0) != w.expect_ok
            progress(f"{w.name} bare", i + 1, n)
    return row_of(w.name, "bare", times, failures)


# A session without runnerd: one interpreter, code in and a status out over its stdin and stdout.
BARE_SESSION = r"""
import contextlib, io, struct, sys
inp, out = sys.stdin.buffer, sys.stdout.buffer
namespace = {"__name__": "__main__"}

def render():
    # As the cage's backend: each figure left open is rendered, unless it is
    # empty, or the code saved it (drawn: not stale) and did not change it
    # since; that one counts as its saved file does in the cage.
    plt = sys.modules.get("matplotlib.pyplot")
    if plt is None:
        return 0
    figures = 0
    for num in plt.get_fignums():
        fig = plt.figure(num)
        if not fig.axes and not fig.lines:
            continue
        if fig.stale:
            fig.savefig(io.BytesIO(), format="png", bbox_inches="tight")
        figures += 1
    plt.close("all")
    return figures

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
    with tempfile.TemporaryDirectory(prefix="runnerd-bench-") as tmp:
        _write_files(w, tmp)  # a session's inputs: in its working directory from the start
        if w.kind == "open":
            return _bare_open(env_python, w, n, progress, tmp)
        if w.kind == "memory":
            return _bare_memory(env_python, w, progress, tmp)
        return _bare_run(env_python, w, n, progress, tmp)


def _bare_open(env_python: Path, w: Workload, n: int, progress: Progress, tmp: str) -> Row:
    times: list[float] = []
    closes: list[float] = []
    for i in range(n):
        t = time.perf_counter()
        s = BareSession(env_python, tmp)
        times.append(time.perf_counter() - t)
        t = time.perf_counter()
        s.close()
        closes.append(time.perf_counter() - t)
        progress(f"{w.name} bare", i + 1, n)
    row = row_of(w.name, "bare", times, 0)
    row.notes.append(f"{w.name} bare: close (stdin EOF, exit) p50 {percentiles_ms(closes)['p50']:.2f} ms")
    return row


def _bare_memory(env_python: Path, w: Workload, progress: Progress, tmp: str) -> Row:
    times: list[float] = []
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
    row = row_of(w.name, "bare", times, 0)
    row.memory = {"idle": {"sessions": len(pss), "pss_mib": [round(v, 2) for v in pss]}}
    row.notes.append(f"{w.name} bare: an idle interpreter's PSS mean {statistics.fmean(pss):.1f} MiB")
    return row


def _bare_run(env_python: Path, w: Workload, n: int, progress: Progress, tmp: str) -> Row:
    times: list[float] = []
    failures = 0
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
    return row_of(w.name, "bare", times, failures)
