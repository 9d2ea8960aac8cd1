"""Issue 17, the daemon's side of a fleet, through real daemons: who it is, its load, the drain, its uids, its binds.

A client that places work over several daemons needs each to say who it
is (``instance``, on every reply) and how loaded it is (``ping``); a daemon
that stops must drain (DRAINING for new work, running jobs and open
sessions go on); several daemons on one host must not share jailed uids;
and a tcp bind reachable from other hosts needs CURVE.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import psutil
import pytest

from runnerd.config import Config

from .conftest import DaemonProc
from .test_sessions import Wire, _home, assert_clean, daemon_factory, launch, new_id, wait_until

UID_BASE = 2_800_000  # apart from the other files' ranges


@pytest.fixture(scope="module")
def home(cage_confirmed) -> Iterator[Config]:
    yield from _home(cage_confirmed, UID_BASE)


@pytest.fixture
def daemons(home: Config) -> Iterator[Callable[..., DaemonProc]]:
    """Daemons with settings of a test's own; each must stop with 0 and leave nothing."""
    yield from daemon_factory(home)


def ping(w: Wire) -> dict:
    r = w.reply(w.send("ping"))
    assert r["type"] == "pong", r
    return r


def test_ping_says_who_it_is_and_how_loaded_and_every_reply_names_the_instance(daemons):
    d = daemons("who", mode="warm", concurrency=2, max_sessions=8)
    with Wire(d.ipc) as w:
        pong = ping(w)
        for key in ("running", "queued", "concurrency", "sessions_open", "max_sessions"):
            assert isinstance(pong[key], int), (key, pong)
        assert pong["state"] == "ready" and pong["concurrency"] == 2 and pong["max_sessions"] == 8
        assert set(pong["free_cages"]) == {"full", "light", "session"}, pong
        instance = pong["instance"]
        rid = w.start("print(1)")
        accepted = w.reply(rid, {"accepted"})
        result = w.reply(rid)
        error = w.reply(w.send("cancel", "no-such-job"))
        assert accepted["instance"] == result["instance"] == error["instance"] == instance
        # A job's replies say the load too: `accepted` counts the job itself, `result` no longer does.
        assert accepted["load"]["concurrency"] == 2 and accepted["load"]["running"] + accepted["load"]["queued"] == 1
        assert result["load"] == {"running": 0, "queued": 0, "concurrency": 2}, result["load"]
        assert error["code"] == "NOT_FOUND"
        s = new_id("who")
        w.opened(s)
        busy = ping(w)
        assert busy["sessions_open"] == 1, busy
    assert d.stop() == 0
    again = daemons("who-again", mode="cold", concurrency=1)
    with Wire(again.ipc) as w:
        assert ping(w)["instance"] != instance  # a new start is a new instance
        assert ping(w)["free_cages"] is None  # cold: no warm cages to count


def test_sigterm_drains_running_jobs_finish_sessions_serve_new_work_gets_draining(home):
    d = launch(home, "drain", mode="cold", concurrency=1, shutdown_grace_s=60)
    try:
        with Wire(d.ipc) as w:
            s = new_id("drain")
            w.opened(s)
            w.ok("x = 41", s)
            long = w.start("import time\nprint('in', flush=True)\ntime.sleep(3)\nprint('done')", stream=True)
            w.wait_output(long, "in")
            queued = w.start("print('queued')")
            assert w.reply(queued, {"accepted"})["state"] == "queued"
            in_session = w.start("x + 1", s)  # queued too: a session's run, kept by the drain
            signalled = time.monotonic()
            d.proc.send_signal(signal.SIGTERM)
            wait_until(lambda: ping(w)["state"] == "draining", 10, "ping says draining")
            seen = time.monotonic() - signalled
            print(f"draining seen by ping {seen * 1000:.0f} ms after SIGTERM")
            assert seen < 1.0, seen
            r = w.reply(queued)
            assert r["type"] == "error" and r["code"] == "DRAINING" and "did not run" in r["message"], r
            for op, fields in (("run", {"code": "print(2)"}), ("open", {"session": new_id("late")})):
                r = w.reply(w.send(op, **fields))
                assert r["type"] == "error" and r["code"] == "DRAINING", r
            finished = w.result(long)
            assert finished.ok and finished.stdout == "in\ndone\n", finished
            assert w.result(in_session).value == "42"
            assert w.ok("x + 2", s).value == "43"  # sent during the drain: the session still serves
            assert w.close(s)["type"] == "closed"
            # Nothing runs and no session is open: the drain ends and the daemon exits, well before its 60 s.
            assert d.proc.wait(timeout=30) == 0
        log = d.log()
        assert "drained: no job runs and no session is open" in log and "stopping" in log
    finally:
        d.stop()
    assert_clean(home)


def test_runnerd_drain_drains_and_the_daemon_stays_up_until_stopped(home):
    d = launch(home, "drain-cmd", mode="cold", concurrency=1, shutdown_grace_s=5)
    try:
        with Wire(d.ipc) as w:
            s = new_id("drain-cmd")
            w.opened(s)
            probe = [sys.executable, "-m", "runnerd", "ping", "--ready", "--endpoint", d.ipc, "--timeout", "30"]
            ready = subprocess.run(probe, capture_output=True, text=True, timeout=60)
            assert ready.returncode == 0 and ": ready," in ready.stdout, ready  # a readiness probe passes
            cmd = [sys.executable, "-m", "runnerd", "drain", "--endpoint", d.ipc, "--wait", "--timeout", "60"]
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            assert out.returncode == 0, out
            assert "draining, 0 running, 0 sessions open" in out.stdout, out.stdout
            # The session was ended by the drain's deadline (reason shutdown); the daemon is still up.
            r = w.run("1", s)
            assert r["type"] == "error" and r["code"] == "NOT_FOUND" and r.get("ended") == "shutdown", r
            assert ping(w)["state"] == "draining" and d.proc.poll() is None
            r = w.run("print(1)")
            assert r["type"] == "error" and r["code"] == "DRAINING", r
            w.mine.clear()
            draining = subprocess.run(probe, capture_output=True, text=True, timeout=60)
            assert draining.returncode == 1 and ": draining," in draining.stdout, draining  # and now fails
    finally:
        assert d.stop() == 0, d.log()[-3000:]
    assert_clean(home)


def test_two_daemons_on_one_host_never_share_jailed_uids(home, daemons):
    a = daemons("uids-a", mode="cold", concurrency=1)
    (home.state_dir / "other").mkdir(exist_ok=True)
    b = launch(Config(state_dir=home.state_dir / "other", env_path=home.sandbox_env, uid_base=home.uid_base), "uids-b",
               mode="cold", concurrency=1)  # fmt: skip
    try:
        with Wire(a.ipc) as wa, Wire(b.ipc) as wb:
            ra, rb = ping(wa)["uid_range"], ping(wb)["uid_range"]
            assert ra[1] < rb[0] or rb[1] < ra[0], (ra, rb)
            rid = wb.start("import time\nprint('in', flush=True)\ntime.sleep(60)", stream=True)
            wb.wait_output(rid, "in")
            uids = {u for p in psutil.process_iter(["uids"]) for u in (p.info["uids"] or ()) if u >= home.uid_base}
            assert uids and all(rb[0] <= u <= rb[1] for u in uids), (uids, ra, rb)
            wb.send("cancel", rid)
            assert wb.result(rid).reason.value == "cancelled"
    finally:
        assert b.stop() == 0, b.log()[-3000:]


def test_a_plaintext_tcp_bind_other_hosts_can_reach_is_refused_at_start(tmp_path):
    config = tmp_path / "runnerd.toml"
    config.write_text(f'state_dir = "{tmp_path}"\nbind = ["tcp://0.0.0.0:7799"]\n')
    out = subprocess.run(
        [sys.executable, "-m", "runnerd", "--config", str(config), "serve"],
        capture_output=True, text=True, timeout=60, env={**os.environ},
    )  # fmt: skip
    assert out.returncode != 0
    assert "tcp://0.0.0.0:7799 is reachable from other hosts and has no CURVE" in out.stderr, out.stderr
    assert "allow_plaintext_tcp" in out.stderr
