"""``runnerd bench``'s workloads: the code each row runs, its input files, and what a run must give back."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

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


def _w2_files(rows: int = 1000) -> tuple[tuple[str, bytes], ...]:
    """W2's input (and S3's, given at the session's open): ``data.csv``, *rows* rows."""
    lines = ["id,group,value"]
    for i in range(rows):
        lines.append(f"{i},g{i % 7},{(i * 37) % 101 / 3:.3f}")
    return (("data.csv", ("\n".join(lines) + "\n").encode()),)


def _reads_w2_input(line: str) -> bool:
    """W2's imports and its ``read_csv``: what S3's session does once, before the measured runs."""
    return line.startswith(("import ", "from ")) or "read_csv(" in line


def _w2_lines(*, reading: bool) -> str:
    return "".join(line for line in W2_CODE.splitlines(keepends=True) if _reads_w2_input(line) == reading)


# S3 is W2 split at the data: its setup run (not measured) imports and reads
# data.csv; each measured run is the rest of W2 (group, print, bar plot,
# savefig) on the DataFrame the session holds.
S3_SETUP = _w2_lines(reading=True)
S3_CODE = _w2_lines(reading=False)

# S4: how many idle sessions are open at once for the memory reading.
SESSIONS_FOR_MEMORY = 10


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    code: str
    files: tuple[tuple[str, bytes], ...] = ()  # a job's inputs; a session's, given at its open
    expect_ok: bool = True
    # "job": a one-off run; sessions: "open" (S1), "run" (code in an open session), "memory" (S4).
    kind: str = "job"
    setup: str = ""  # "run": the session's first run, not measured
    figures: int | None = None  # "run": how many figures each run must return


WORKLOADS: dict[str, Callable[[], Workload]] = {
    "W1": lambda: Workload("W1", "print(1)", "print(1)"),
    "W2": lambda: Workload("W2", "pandas CSV + plot + savefig", W2_CODE, _w2_files()),
    "W3": lambda: Workload("W3", "numpy, ~50 ms", W3_CODE),
    "W4": lambda: Workload("W4", "raises", "x = {}\nx['missing']\n", expect_ok=False),
    "S1": lambda: Workload("S1", "session open (and close)", "", kind="open"),
    "S2": lambda: Workload("S2", "print(1) in an open session", "print(1)", kind="run"),
    "S3": lambda: Workload(
        "S3", "W2 on the DataFrame the session holds", S3_CODE, _w2_files(), kind="run", setup=S3_SETUP, figures=1
    ),
    "S4": lambda: Workload("S4", f"memory of {SESSIONS_FOR_MEMORY} idle sessions", "", kind="memory"),
}
