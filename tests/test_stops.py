"""Stopping a daemon: a stop leaves nothing behind, and a signal to its process group is its stop, not its jobs'.

Each test starts daemons of its own, in a state dir and under a cgroup
parent of their own: what a stop left is looked for there only (other
runs' cgroups on this host are not these tests' to judge).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import psutil
import pytest
import zmq

from runnerd.config import Config
from runnerd.sandbox.cgroup_detect import detect
from runnerd.sandbox.host import HostState
from runnerd.sandbox.runtime import Runtime
from runnerd.sandbox.workspace import sweep

from .conftest import TEST_ROOT, DaemonProc, start_daemon

STOPS = 10
# With concurrency 2: two jobs running and the rest queued when the stop comes (the 2 + 46).
LOAD = 48
LOAD_CODES = (
    "import time\nprint('started', flush=True)\ntime.sleep(0.5)",  # a light zygote's
    "import numpy\nprint(numpy.arange(4).sum())",  # a full one's
)
SLEEPER = "import time\nprint('sleeping', flush=True)\ntime.sleep(20)"


@pytest.fixture
def own_state(cage_confirmed: Runtime) -> Iterator[tuple[Path, str]]:
    """A state dir and a cgroup parent no other daemon uses; whatever a failed test left there is removed."""
    state = TEST_ROOT / f"stops-{uuid.uuid4().hex[:8]}"
    state.mkdir(mode=0o755)
    parent = f"runnerd-{state.name}"
    yield state, parent
    # Best effort: the test has said what it found; this only keeps the host clean after a failure.
    config = Config(state_dir=state, env_path=cage_confirmed.config.sandbox_env, cgroup_parent=parent)
    HostState(config, detect(parent)).sweep()
    for d in _parent_dirs(parent):
        for inner in sorted((p for p in d.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                inner.rmdir()
        with contextlib.suppress(OSError):
            d.rmdir()
    sweep(state / "jobs")
    shutil.rmtree(state, ignore_errors=True)


def _parent_dirs(parent: str) -> list[Path]:
    root = Path("/sys/fs/cgroup")
    return [p for p in (*root.glob(f"*/{parent}"), root / parent) if p.is_dir()]


def what_is_left(parent: str, jobs_dir: Path) -> list[str]:
    """The daemon's cgroup parent, in any hierarchy, with what is in it; its job dirs.

    The daemon made the parent at its start, and a stop that leaves nothing
    removes it: nothing can be left in a cgroup that is gone.
    """
    left = []
    for d in _parent_dirs(parent):
        inside = sorted(c.name for c in d.iterdir() if c.is_dir())
        left.append(f"{d} holding {inside}" if inside else str(d))
    if jobs_dir.is_dir():
        left += [f"{jobs_dir}/{p.name}" for p in jobs_dir.iterdir()]
    return left


class Wire:
    """runnerd/1 on a DEALER of its own: every reply kept by id, for counting what a stop answered."""

    def __init__(self, endpoint: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.replies: dict[str, list[dict[str, Any]]] = defaultdict(list)

    def __enter__(self) -> Wire:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()
        self.ctx.term()

    def send(self, op: str, request_id: str, **fields: Any) -> None:
        self.sock.send(msgpack.packb({"v": 1, "op": op, "id": request_id, **fields}))

    def types(self, request_id: str) -> list[str]:
        return [r["type"] for r in self.replies[request_id]]

    def last(self, request_id: str) -> dict[str, Any]:
        return self.replies[request_id][-1]

    def until(self, done: Callable[[], bool], wait: float, what: str) -> None:
        """Take replies until *done* says so."""
        deadline = time.monotonic() + wait
        while not done():
            left = deadline - time.monotonic()
            if left <= 0 or not self.sock.poll(int(left * 1000) + 1):
                pytest.fail(f"no {what} within {wait:.0f} s; replies: {dict(self.replies)}")
            reply = msgpack.unpackb(self.sock.recv())
            self.replies[reply["id"]].append(reply)


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (OSError, ValueError):
        return []


def _ns_depth(pid: int) -> int:
    """How many pid namespaces *pid* is in, seen from here (NSpid's entries); 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("NSpid:"):
                return len(line.split()) - 1
    except OSError:
        pass
    return 0


def zygotes_of(daemon: DaemonProc) -> list[int]:
    found = []
    for p in psutil.Process(daemon.proc.pid).children(recursive=True):
        try:
            if "zygote.py" in " ".join(p.cmdline()) and p.parent().name() == "nsjail":
                found.append(p.pid)
        except psutil.Error:
            continue
    return found


class ArmHold:
    """Stops (SIGSTOP) the child a zygote forks for its next job, before that child has answered.

    A zygote forks that child (C) as a job starts; the host moves C into a new
    job cgroup and lets it go; C makes its namespaces, forks the job's PID 1
    (G) and answers (incage/zygote.py). A C with no child yet has not
    answered, so its zygote is still being armed when the daemon stops, as it
    is when a loaded host makes C slow (over a second, measured here under
    load). A C caught too late is let go, and the next one is tried.
    """

    def __init__(self, zygotes: list[int]) -> None:
        self.zygotes = {z: _ns_depth(z) for z in zygotes}
        self.seen = {z: set(_children(z)) for z in zygotes}
        self.held = 0
        self._caught = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> ArmHold:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def wait(self, timeout: float) -> int:
        """The pid of the child held, once there is one."""
        if not self._caught.wait(timeout):
            pytest.fail(f"no zygote's next child was caught before it answered, in {timeout:.0f} s")
        return self.held

    def _watch(self) -> None:
        # A new process is an event /proc has no wait for: look until one comes.
        while not self._done.is_set():
            for zygote, depth in self.zygotes.items():
                for pid in _children(zygote):
                    if pid in self.seen[zygote]:
                        continue
                    self.seen[zygote].add(pid)
                    if _ns_depth(pid) != depth:
                        continue  # a G in a pid namespace of its own (its C has answered and gone)
                    try:
                        os.kill(pid, signal.SIGSTOP)
                    except ProcessLookupError:
                        continue
                    if not _children(pid):
                        self.held = pid
                        self._caught.set()
                        return
                    os.kill(pid, signal.SIGCONT)


def _stop_loaded(d: DaemonProc) -> tuple[int, list[psutil.Process], dict[str, int]]:
    """Load the daemon, hold one zygote in the middle of arming, SIGTERM it; every job's answer counted."""
    ids = [f"load-{j}" for j in range(LOAD)]
    with ArmHold(zygotes_of(d)) as hold, Wire(d.ipc) as wire:
        for j, job_id in enumerate(ids):
            wire.send("run", job_id, code=LOAD_CODES[j % 2], timeout=30)
        wire.until(lambda: all("accepted" in wire.types(i) for i in ids), 60, "acceptance of every job")
        held = hold.wait(30)
        tree = psutil.Process(d.proc.pid).children(recursive=True)
        d.proc.send_signal(signal.SIGTERM)
        answered = {"result", "error"}
        wire.until(lambda: all(answered & set(wire.types(i)) for i in ids), 60, "answer to every accepted job")
    counts: dict[str, int] = defaultdict(int)
    for job_id in ids:
        finals = [r for r in wire.replies[job_id] if r["type"] in answered]
        assert len(finals) == 1, (job_id, wire.replies[job_id])
        final = finals[0]
        if final["type"] == "result":
            assert final["outcome"] == "OUTCOME_OK", final  # the grace let it finish
            counts["ran"] += 1
        else:
            assert final["code"] == "DRAINING" and "did not run" in final["message"], final
            counts["refused"] += 1
    return held, tree, counts


def test_a_loaded_warm_daemon_leaves_nothing_at_any_stop(cage_confirmed, own_state):
    """Issue 16, defect 10: ten stops of a loaded warm daemon, each while a zygote arms its next child.

    A stop cancels what the warm pool is doing. A child being armed had a job
    cgroup that only Zygote.arm() knew until the child answered, and a
    cancelled arm() dropped it: its processes died with the zygote, its empty
    cgroup stayed (with the cgroup parent around it), and the next start
    swept it ("swept 1 leftover job cgroup(s)/dir(s) from an earlier run").
    """
    state, parent = own_state
    left: dict[int, list[str]] = {}
    swept, refused = [], []
    for i in range(STOPS):
        d = start_daemon(
            state, f"stop{i}", cage_confirmed.config.sandbox_env, mode="warm", concurrency=2, queue_size=LOAD,
            cgroup_parent=parent, warm_full_zygotes=1, max_sessions=0,
        )  # fmt: skip
        try:
            held, tree, counts = _stop_loaded(d)
            code = d.proc.wait(60)
        finally:
            d.stop()
        assert code == 0, d.log()
        assert held in [p.pid for p in tree]
        refused.append(counts["refused"])
        if "swept" in d.log():
            swept.append(i)  # what the stop before this start left
        # Orphans (their nsjail gone first) are reaped by init: their exits are waited for.
        _, alive = psutil.wait_procs(tree, timeout=10)
        if found := what_is_left(parent, state / "jobs") + [f"process {p.pid}" for p in alive]:
            left[i] = found
    assert not left, f"{len(left)} of {STOPS} loaded stops left something: {left}"
    assert not swept, f"starts {swept} swept what a stop left"
    # Loaded stops: most jobs were still queued when each stop came.
    assert all(r > LOAD // 2 for r in refused), refused


@pytest.mark.parametrize("mode", ["cold", "warm"])
def test_a_signal_to_the_daemons_group_stops_the_daemon_not_its_jobs(cage_confirmed, own_state, mode):
    """Issue 16, item 11: SIGTERM to ``runnerd serve``'s process group (Ctrl-C in a terminal) is its stop.

    The cages are in sessions of their own: the signal reaches the daemon
    alone, which stops as on its own SIGTERM (daemon.py): a running job (and
    a session's running run) gets shutdown_grace_s, then ends with reason
    ``shutdown``; open sessions end (``shutdown``). Before, a cage in the
    daemon's group died of the signal at once: ``signal``, or ``sandbox_error``
    from a zygote killed under its job.
    """
    state, parent = own_state
    d = start_daemon(
        state, f"group-{mode}", cage_confirmed.config.sandbox_env, mode=mode, concurrency=2, shutdown_grace_s=1,
        cgroup_parent=parent, own_session=True,
    )  # fmt: skip
    try:
        with Wire(d.ipc) as wire:
            wire.send("open", "s1", session="s1")
            wire.until(lambda: bool({"opened", "error"} & set(wire.types("s1"))), 60, "open")
            assert wire.last("s1")["type"] == "opened", wire.replies["s1"]
            wire.send("run", "job", code=SLEEPER, stream=True, timeout=30)
            wire.send("run", "in-s1", code=SLEEPER, stream=True, timeout=30, session="s1")
            both = ("job", "in-s1")
            wire.until(lambda: all("stdout" in wire.types(i) for i in both), 60, "'sleeping' from both")
            os.killpg(d.proc.pid, signal.SIGTERM)  # its own session: the group is its pid
            wire.until(lambda: all("result" in wire.types(i) for i in both), 60, "results")
        assert d.proc.wait(60) == 0, d.log()
    finally:
        d.stop()
    for job_id in both:
        result = wire.last(job_id)
        assert result["type"] == "result", result
        assert (result["outcome"], result["reason"]) == ("OUTCOME_FAILED", "shutdown"), (job_id, result)
    assert d.log().count("received SIGTERM: draining, then stopping") == 1, d.log()
    assert not what_is_left(parent, state / "jobs")
