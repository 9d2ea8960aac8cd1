"""``runnerd bench``'s session parts that need no daemon: the wire loop, the bare session, the table."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import msgpack
import zmq

from runnerd import bench


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
        with bench.Wire(endpoint) as wire:
            assert wire.open("s1")["session"] == "s1"
            assert bench._run_ok(wire.run("s1", "print(1)"), None)
    finally:
        th.join(5)
        router.close()
    assert [r["op"] for r in seen] == ["open", "run"]
    assert seen[1]["session"] == "s1" and seen[1]["code"] == "print(1)"


def test_bare_session_keeps_its_namespace(tmp_path: Path) -> None:
    s = bench.BareSession(Path(sys.executable), str(tmp_path))
    try:
        assert s.run("x = 41") == (True, 0)
        assert s.run("print(x + 1)") == (True, 0)
        assert s.run("1 / 0") == (False, 0)
    finally:
        s.close()
    assert s.proc.returncode == 0


def test_smaps_rollup_of_this_process() -> None:
    r = bench.smaps_rollup(os.getpid())
    assert r["Pss"] > 0 and r["Rss"] >= r["Pss"]
    assert bench.smaps_rollup(2**22 + 1) == {}


def test_table_prints_notes_ratios_and_targets() -> None:
    w1 = bench._row("W1", "warm", [0.006] * 5, 0)
    s2 = bench._row("S2", "warm", [0.0015] * 5, 0)
    s2.notes.append("S2 warm: a note")
    s4 = bench._row("S4", "warm", [0.02] * 3, 0)
    s4.memory = {"idle": {"tree_growth_per_session_mib": 12.5}}
    text = bench.table([w1, s2, s4])
    assert "S2 warm: a note" in text
    assert "S2/W1 warm p50 ratio" in text and ": 0.250" in text
    assert "target S2 warm p50 <= 2 ms: 1.50 ms, met" in text
    assert "12.5 MiB, met" in text
    # No session rows: the table as it was.
    assert bench.table([w1]).splitlines()[-1].startswith("W1")
