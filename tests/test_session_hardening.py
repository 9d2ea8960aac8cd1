"""Issue 16: what one job or one client must not be able to do to everyone else, through real daemons.

Each test here is the reproduction of a defect a review of sessions found,
run against a real cold and warm daemon over a raw DEALER (:class:`Wire`,
shared with test_sessions.py). The daemons have a state dir and a jailed
uid range of this file's own.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zmq

from runnerd.config import Config
from runnerd.result import Reason, SessionEnd
from runnerd.server.protocol import request

from .conftest import DaemonProc
from .test_sessions import Wire, _home, assert_clean, daemon_factory, launch, new_id, wait_until

UID_BASE = 2_700_000  # apart from test_sessions.py's range


@pytest.fixture(scope="module")
def home16(cage_confirmed) -> Iterator[Config]:
    yield from _home(cage_confirmed, UID_BASE)


@pytest.fixture(scope="module", params=["cold", "warm"])
def hd(request, home16: Config) -> Iterator[DaemonProc]:
    """A cold and then a warm daemon with two slots."""
    d = launch(home16, f"hardening-{request.param}", mode=request.param, concurrency=2)
    yield d
    assert d.stop() == 0, d.log()[-5000:]
    assert_clean(home16)


def all_slots_serve(w: Wire, concurrency: int) -> None:
    """Every slot still runs a job: *concurrency* jobs are seen running at once, then each prints 1."""
    rids = [w.start("import time\nprint('in', flush=True)\ntime.sleep(60)", stream=True) for _ in range(concurrency)]
    for rid in rids:
        w.wait_output(rid, "in", timeout=60)
    assert w.stats()["running"] == concurrency
    for rid in rids:
        w.send("cancel", id=rid)
    for rid in rids:
        assert w.result(rid).reason is Reason.CANCELLED
    for _ in range(concurrency):
        assert w.ok("print(1)").stdout == "1\n"


# A lone surrogate in what the code reports: an exception's message, and a trailing value's repr
# (a str's own repr escapes it; a class's need not).
SURROGATES = [
    'raise ValueError("\\udc80")',
    'class A:\n    def __repr__(self):\n        return "\\udc80"\nA()',
]


def test_a_lone_surrogate_in_a_report_takes_no_slot(hd):
    with Wire(hd.ipc) as w:
        session = new_id("s")
        w.opened(session)
        # Twice as many as there are slots, one-off and in a session: each would have killed a slot.
        for code in SURROGATES * 2:
            one_off = w.result(w.start(code))
            in_session = w.result(w.start(code, session))
            for result in (one_off, in_session):
                got = (result.error.message if result.error else "") + (result.value or "")
                assert "\ufffd" in got and "\udc80" not in got, result
        assert w.result(w.start("print(2)", session)).stdout == "2\n"
        all_slots_serve(w, 2)


@pytest.fixture
def daemons16(home16: Config) -> Iterator[Callable[..., DaemonProc]]:
    """Daemons with settings of a test's own; each must stop with 0 and leave nothing."""
    yield from daemon_factory(home16)


def sessions_cgroup(home: Config) -> Path:
    """The memory cgroup every session of *home*'s daemons lives under (cgroup v1, this machine)."""
    tag = hashlib.sha256(str(home.state_dir.resolve()).encode()).hexdigest()[:8]
    return Path("/sys/fs/cgroup/memory/runnerd") / f"sessions-{tag}"


@pytest.mark.parametrize("mode", ["cold", "warm"])
def test_the_session_memory_budget_is_a_limit_the_kernel_keeps(daemons16, home16, mode):
    budget = 2048 << 20
    d = daemons16(f"budget-{mode}", mode=mode, session_memory_budget=budget)
    parent = sessions_cgroup(home16)
    assert int((parent / "memory.limit_in_bytes").read_text()) <= budget
    (parent / "memory.max_usage_in_bytes").write_text("0")
    with Wire(d.ipc) as w:
        ids = [new_id("big") for _ in range(8)]
        for s in ids:
            w.opened(s)  # all 8 open: each is small until it runs
        rids = [w.start("x = bytearray(b'\\1') * (700 << 20)\nprint('held')", s) for s in ids]
        results = [w.result(rid) for rid in rids]
        held = [r for r in results if r.ok]
        ended = [r for r in results if not r.ok]
        assert len(held) >= 2, results  # two fit, 1400 MiB
        for r in ended:
            assert r.session is not None and r.session.ended is SessionEnd.MEMORY_LIMIT, r
        # 8 x 700 MiB asked for; together they never held more than the budget in RAM (past it the
        # kernel swaps the sessions' pages out where this host has swap it does not account, or kills).
        assert int((parent / "memory.max_usage_in_bytes").read_text()) <= budget
        if (parent / "memory.memsw.limit_in_bytes").exists():
            # No swap to spill to: the kernel killed, a running session or a frozen one (seen by the sweep).
            wait_until(lambda: w.sessions()["ended"].get("memory_limit"), 30, "a session ended memory_limit")
            assert set(w.sessions()["ended"]) == {"memory_limit"}, w.sessions()
        assert w.ok("print(1)").stdout == "1\n"  # the daemon serves on


def pidfds_of(pid: int) -> list[int]:
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:[pidfd]":
                found.append(int(fd))
        except OSError:
            continue
    return found


def test_the_sweep_lives_past_fd_1024(daemons16):
    """select() on a pidfd numbered past 1024 raised, and the sweep died: idle sessions never ended."""
    d = daemons16("fds", mode="cold")
    ctx = zmq.Context()
    ctx.set(zmq.MAX_SOCKETS, 4096)
    socks = []
    try:
        for _ in range(1100):  # each is an fd in the daemon
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(d.ipc)
            s.send(request("ping", new_id("p")))
            socks.append(s)
        for s in socks:
            assert s.poll(30_000), "no pong"
            s.recv()
        assert len(os.listdir(f"/proc/{d.proc.pid}/fd")) > 1100
        with Wire(d.ipc) as w:
            session = new_id("s")
            w.opened(session, idle_timeout=1)
            assert max(pidfds_of(d.proc.pid)) >= 1024, pidfds_of(d.proc.pid)
            wait_until(lambda: w.sessions()["ended"].get("idle_timeout"), 30, "the session idled out")
            assert w.ok("print(1)").stdout == "1\n"
    finally:
        for s in socks:
            s.close()
        ctx.term()


def test_limits_per_client(daemons16):
    d = daemons16("per-client", mode="cold", concurrency=1, max_sessions_per_client=2, max_queued_per_client=2)
    with Wire(d.ipc) as w, Wire(d.ipc) as other:
        w.opened(new_id("a"))
        w.opened(new_id("b"))
        r = w.open(new_id("c"))
        assert r["type"] == "error" and r["code"] == "BUSY" and "max_sessions_per_client 2" in r["message"], r
        other.opened(new_id("d"))  # another client is not held back
        busy = w.start("import time\nprint('in', flush=True)\ntime.sleep(60)", stream=True)
        w.wait_output(busy, "in")
        queued = [w.start(f"print({i})") for i in range(2)]
        r = w.run("print(3)")
        assert r["type"] == "error" and r["code"] == "BUSY" and "max_queued_per_client 2" in r["message"], r
        w.send("cancel", id=busy)
        assert w.result(busy).reason is Reason.CANCELLED
        assert [w.result(q).stdout for q in queued] == ["0\n", "1\n"]


@pytest.fixture(scope="module")
def curve_keys16(home16: Config) -> Path:
    import zmq.auth

    root = home16.state_dir / "keys"
    clients = root / "clients"
    clients.mkdir(parents=True)
    for who in ("server", "alice", "bob"):
        zmq.auth.create_certificates(str(root), who)
    for who in ("alice", "bob"):
        (clients / f"{who}.key").write_bytes((root / f"{who}.key").read_bytes())
    return root


def test_with_curve_a_session_is_its_openers_key_s(daemons16, curve_keys16):
    from runnerd.connection import curve_keys

    root = curve_keys16
    d = daemons16(
        "curve", mode="cold", curve_server_key=str(root / "server.key_secret"), curve_clients_dir=str(root / "clients")
    )
    alice = curve_keys(root / "alice.key_secret", root / "server.key")
    bob = curve_keys(root / "bob.key_secret", root / "server.key")
    with Wire(d.tcp, curve=alice) as a, Wire(d.tcp, curve=bob) as b, Wire(d.tcp, curve=alice) as a2:
        session = new_id("s")
        a.opened(session)
        a.ok("x = 42", session)
        r = b.run("print(x)", session)
        assert r["type"] == "error" and r["code"] == "NOT_FOUND", r
        r = b.reply(b.send("close", session=session))
        assert r["type"] == "error" and r["code"] == "NOT_FOUND", r
        r = b.open(session)
        assert r["type"] == "error" and r["code"] == "BAD_REQUEST", r
        assert a2.ok("print(x)", session).stdout == "42\n"  # the key's, on any of its connections
        # A run's id is its key's too: another key can neither cancel it nor subscribe to it.
        rid = a.start("import time\nprint('in', flush=True)\ntime.sleep(30)", stream=True)
        a.wait_output(rid, "in")
        b.send("cancel", id=rid)  # a cancel's replies carry the run's id
        r = b.reply(rid)
        assert r["type"] == "error" and r["code"] == "NOT_FOUND", r
        r = b.reply(b.start("import time\nprint('in', flush=True)\ntime.sleep(30)", stream=True, rid=rid))
        assert r["type"] == "error" and r["code"] == "BAD_REQUEST", r
        a.send("cancel", id=rid)
        assert a.result(rid).reason is Reason.CANCELLED


def test_a_run_reports_its_own_counters_not_the_sessions(hd):
    with Wire(hd.ipc) as w:
        session = new_id("s")
        w.opened(session)
        r = w.result(
            w.start(
                "import subprocess, sys\n"
                "p = subprocess.run([sys.executable, '-c', 'b = bytearray(b\"1\") * (3 << 30)'])\n"
                "print(p.returncode)",
                session,
            )
        )
        assert r.ok and r.stdout.strip() == "-9", r  # the child was OOM-killed, the session lives
        r = w.result(w.start("raise ValueError('mine')", session))
        assert r.reason is Reason.EXCEPTION, r  # not memory_limit: that was the last run
        assert not any("out-of-memory" in x for x in r.warnings), r.warnings
        assert r.usage.peak_of == "run" and r.usage.max_rss_bytes < 512 << 20, r.usage


BREAK_PROTOCOL = (
    "import os, socket, stat, struct\n"
    "fds = [int(f) for f in os.listdir('/proc/self/fd') if int(f) > 2 and os.path.exists(f'/proc/self/fd/{f}')]\n"
    "ctl = next(socket.socket(fileno=f) for f in fds if stat.S_ISSOCK(os.fstat(f).st_mode))\n"
    "ctl.sendall(struct.pack('>I', 1 << 30))\n"  # a frame far past the limit: only code can send that
    "import time\ntime.sleep(30)\n"
)


def test_code_that_breaks_the_control_protocol_is_the_codes_fault(hd):
    """It read sandbox_error ("not the code's fault"), so a model loop ran the same code again."""
    with Wire(hd.ipc) as w:
        session = new_id("s")
        w.opened(session)
        r = w.result(w.start(BREAK_PROTOCOL, session, timeout=20))
        assert r.reason is Reason.SIGNAL and r.exit_code == -9, r
        assert r.session is not None and r.session.ended is SessionEnd.EXITED, r
        assert any("control socket" in x for x in r.warnings), r.warnings
        assert w.ok("print(1)").stdout == "1\n"


def test_a_cancel_right_after_the_run_is_sent_interrupts_it_and_the_session_lives(hd):
    """A SIGINT that reached the session before it took the run's order was ignored (lost): the run ran on
    and its session was killed (interrupt_ignored), 4 times in 40 here."""
    with Wire(hd.ipc) as w:
        session = new_id("s")
        w.opened(session)
        w.ok("x = 1", session)
        for i in range(30):
            rid = w.start("import time\ntime.sleep(20)", session)
            w.send("cancel", id=rid)
            r = w.result(rid, timeout=30)
            assert r.reason is Reason.CANCELLED, (i, r)
            assert r.session is not None and r.session.alive, (i, r)
        assert w.ok("x", session).value == "1"
