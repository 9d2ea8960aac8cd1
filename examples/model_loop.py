"""The model loop with a scripted stand-in for a model, through a runnerd daemon.

    RUNNERD_ENDPOINT=ipc:///run/runnerd/runnerd.sock python examples/model_loop.py

The "model" first writes code with a wrong pandas column name; the daemon
runs it; the loop hands the error back; the "model" reads the KeyError and
the CSV's header line in that feedback, fixes the column, and the second
attempt succeeds. Replace ``scripted_model`` by a call to your model.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from runnerd.client import Client
from runnerd.gemini import parts
from runnerd.loop import Attempt, run_loop

HERE = Path(__file__).resolve().parent
TASK = "Using sales.csv, print the total sales per region, largest first, and plot them as a bar chart."

FIRST_TRY = """\
import pandas as pd
import matplotlib.pyplot as plt

df = pd.read_csv("sales.csv")
totals = df.groupby("region")["{column}"].sum().sort_values(ascending=False)
print(totals.to_string())
totals.plot.bar(title="Total sales per region")
"""


def scripted_model(task: str, history: tuple[Attempt, ...]) -> str:
    """Stands in for an LLM: guesses a column, then fixes it from the feedback."""
    if not history:
        return FIRST_TRY.format(column="revenue")  # the bug: there is no such column
    feedback = history[-1].feedback or ""
    missing = re.search(r"KeyError: '([^']+)'", feedback)
    header = re.search(r"sales\.csv \(\d+ bytes\)\n  first lines:\n    (.+)", feedback)
    if missing and header:
        columns = header.group(1).split(",")
        # the numeric column the task is about: the one that is neither the key nor a date
        fixed = next(c for c in columns if c not in ("region", "month"))
        return FIRST_TRY.format(column=fixed)
    return history[-1].code  # a model that learned nothing tries the same again


def main() -> int:
    files = {"sales.csv": (HERE / "sales.csv").read_bytes()}
    with Client() as client:
        outcome = run_loop(TASK, scripted_model, client=client, files=files)
    for attempt in outcome.attempts:
        print(f"--- attempt {attempt.number}: {attempt.result.outcome.value}")
        if attempt.feedback:
            print("feedback given to the model:")
            print("    " + attempt.feedback.replace("\n", "\n    "))
    final = outcome.final.result
    print(f"--- {'solved' if outcome.ok else 'gave up'} after {len(outcome.attempts)} attempt(s); output:")
    print(final.stdout, end="")
    gemini = parts(outcome.final.code, final)
    print(f"--- as Gemini parts: {[next(iter(p)) for p in gemini]}")
    print(json.dumps(gemini[1]))
    return 0 if outcome.ok else 1


if __name__ == "__main__":
    sys.exit(main())
