"""``runnerd bench``'s session parts that need no daemon: the wire loop, the bare session, the table."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import msgpack
import pytest
import zmq

from runnerd.bench import bare, memory, report, sessions, workloads


def test_wire_skips_other_replies_and_returns_the_terminal_one(tmp_path: Path) -> None:
    endpoint = f"ipc://{tmp_path}/w.sock"
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(endpoint)
    seen: list[dict] = []

    def serve() -> None:
        for _ in range(2):
            peer, frame = router.recv_multipart()
            req = msgpack.unpackb(frame)
            seen.append(req)
            rid = req["id"]
            if req["op"] == "open":
                replies = [{"id": "other", "type": "opened"}, {"id": rid, "type": "opened", "session": req["session"]}]
            else:
                replies = [{"id": rid, "type": "accepted"}, {"id": rid, "type": "result", "outcome": "OUTCOME_OK"}]
            for r in replies:
                router.send_multipart([peer, msgpack.packb({"v": 1, **r})])

    th = threading.Thread(target=serve)
    th.start()
    try:
        with sessions.Wire(endpoint) as wire:
            assert wire.open("s1")["session"] == "s1"
            assert sessions._run_ok(wire.run("s1", "print(1)"), None)
    finally:
        th.join(5)
        router.close()
    assert [r["op"] for r in seen] == ["open", "run"]
    assert seen[1]["session"] == "s1" and seen[1]["code"] == "print(1)"


def test_bare_session_keeps_its_namespace(tmp_path: Path) -> None:
    s = bare.BareSession(Path(sys.executable), str(tmp_path))
    try:
        assert s.run("x = 41") == (True, 0)
        assert s.run("print(x + 1)") == (True, 0)
        assert s.run("1 / 0") == (False, 0)
    finally:
        s.close()
    assert s.proc.returncode == 0


def test_smaps_rollup_of_this_process() -> None:
    r = memory.smaps_rollup(os.getpid())
    assert r["Pss"] > 0 and r["Rss"] >= r["Pss"]
    assert memory.smaps_rollup(2**22 + 1) == {}


def test_table_prints_notes_ratios_and_targets() -> None:
    w1 = report.row_of("W1", "warm", [0.006] * 5, 0)
    s2 = report.row_of("S2", "warm", [0.0015] * 5, 0)
    s2.notes.append("S2 warm: a note")
    s4 = report.row_of("S4", "warm", [0.02] * 3, 0)
    s4.memory = {"idle": {"tree_growth_per_session_mib": 12.5}}
    text = report.table([w1, s2, s4])
    assert "S2 warm: a note" in text
    assert "S2/W1 warm p50 ratio" in text and ": 0.250" in text
    assert "target S2 warm p50 <= 2 ms: 1.50 ms, met" in text
    assert "12.5 MiB, met" in text
    # No session rows: the table as it was.
    assert report.table([w1]).splitlines()[-1].startswith("W1")


def test_s3_is_w2_cut_at_its_read() -> None:
    w2, s3 = workloads.WORKLOADS["W2"](), workloads.WORKLOADS["S3"]()
    assert s3.setup == 'import pandas as pd\nimport matplotlib.pyplot as plt\ndf = pd.read_csv("data.csv")\n'
    assert s3.setup + s3.code == w2.code
    assert "import" not in s3.code and "read_csv" not in s3.code and 'savefig("plot.png")' in s3.code
    assert s3.files == w2.files and s3.kind == "run"


def test_table_says_what_a_session_adds_over_its_floor() -> None:
    rows = [report.row_of("S3", "bare", [0.010] * 5, 0), report.row_of("S3", "warm", [0.025] * 5, 0)]
    text = report.table(rows)
    assert "S3 warm over its floor" in text and "the session adds +15.00 ms" in text
    assert "target S3 warm p50 <= 40 ms: 25.00 ms, met" in text


def test_bare_session_reads_its_input_files(tmp_path: Path) -> None:
    w = workloads.Workload(
        "S9", "t", "x = open('data.csv').read()", files=(("data.csv", b"a,b\n"),), kind="run", setup="y = 1"
    )
    row = bare.bench_bare_session(Path(sys.executable), w, 3, report.Progress())
    assert row.jobs == 3 and row.failures == 0


def _env_python() -> Path:
    from runnerd import config

    python = config.load(None).sandbox_env / "bin" / "python3"
    if not python.exists():
        pytest.skip("no sandbox env")
    return python


def test_bare_session_renders_as_the_cage_does(tmp_path: Path) -> None:
    s3 = workloads.WORKLOADS["S3"]()
    for name, data in s3.files:
        (tmp_path / name).write_bytes(data)
    s = bare.BareSession(_env_python(), str(tmp_path))
    try:
        assert s.run(s3.setup) == (True, 0)
        assert s.run(s3.code) == (True, 1)  # saved, so not rendered again: it counts as its file
        assert (tmp_path / "plot.png").exists()
        assert s.run("plt.plot([1, 2]); plt.figure()") == (True, 1)  # drawn on: rendered; empty: not a figure
    finally:
        s.close()
