"""The warm path: the child's own seccomp filter, the zygote out of reach, recovery."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import re
import signal
import struct
import threading
import time

import psutil
import pytest

from runnerd.client import Client, Finished, Output
from runnerd.config import default_policy_path
from runnerd.incage import zygote
from runnerd.result import Reason, Result
from runnerd.sandbox.job import make_job
from runnerd.sandbox.runtime import open_runtime
from runnerd.sandbox.warm import WarmCage
from runnerd.sandbox.zygotes import Zygote

from .conftest import start_daemon, wait_clean

POLICIES = default_policy_path().parent


# ---------------------------------------------------------------- the stacked filter


def run_bpf(program, nr: int, args=(0, 0, 0, 0, 0, 0), arch: int = zygote.AUDIT_ARCH_X86_64) -> int:
    """Evaluate a classic BPF seccomp program (the opcodes zygote.py uses) on one syscall."""
    data = struct.pack("<iIQ6Q", nr, arch, 0, *args)
    acc, pc = 0, 0
    while True:
        code, jt, jf, k = program[pc]
        if code == 0x20:  # LD W ABS
            acc = struct.unpack_from("<I", data, k)[0]
        elif code == 0x54:  # AND K
            acc &= k
        elif code in (0x15, 0x35, 0x45):  # JEQ, JGE, JSET
            hit = acc == k if code == 0x15 else acc >= k if code == 0x35 else bool(acc & k)
            pc += jt if hit else jf
        elif code == 0x06:  # RET K
            return k
        else:
            raise AssertionError(f"unknown opcode {code:#x}")
        pc += 1


EPERM = zygote.RET_ERRNO | 1
ENOSYS = zygote.RET_ERRNO | 38
ALLOW = zygote.RET_ALLOW


@pytest.mark.parametrize(
    "nr, args, expected",
    [
        (0, (), ALLOW),  # read
        (39, (), ALLOW),  # getpid
        (101, (), EPERM),  # ptrace
        (272, (0x10000000,), EPERM),  # unshare
        (165, (), EPERM),  # mount
        (321, (), EPERM),  # bpf
        (425, (), EPERM),  # io_uring_setup
        (435, (), ENOSYS),  # clone3
        (56, (0x3D0F00,), ALLOW),  # clone for a thread
        (56, (0x01200011,), ALLOW),  # clone for fork()
        (56, (0x10000000 | 17,), EPERM),  # clone with CLONE_NEWUSER
        (56, (0x00020000,), EPERM),  # clone with CLONE_NEWNS
        (16, (1, 0x5412), EPERM),  # ioctl TIOCSTI
        (16, (1, 0x541C), EPERM),  # ioctl TIOCLINUX
        (16, (1, 0x5401), ALLOW),  # ioctl TCGETS
        (41, (2, 1, 0), ALLOW),  # socket(AF_INET, SOCK_STREAM)
        (41, (2, 3, 1), EPERM),  # socket(AF_INET, SOCK_RAW)
        (41, (10, 3 | 0x80000, 58), EPERM),  # socket(AF_INET6, SOCK_RAW|SOCK_CLOEXEC)
        (41, (10, 2, 0), ALLOW),  # socket(AF_INET6, SOCK_DGRAM)
        (41, (16, 3, 0), ALLOW),  # socket(AF_NETLINK, SOCK_RAW): if_nameindex()
        (41, (40, 1, 0), EPERM),  # AF_VSOCK
        (41, (17, 3, 0), EPERM),  # AF_PACKET
        (0x40000000 | 39, (), ENOSYS),  # x32 getpid
        (0x40000000 | 521, (), ENOSYS),  # x32 ptrace
    ],
)
def test_the_childs_filter(nr, args, expected):
    program = zygote.seccomp_program()
    assert len(program) < 4096
    assert run_bpf(program, nr, tuple(args) + (0,) * (6 - len(args))) == expected


def test_the_childs_filter_kills_other_architectures():
    i386 = 0x40000003
    assert run_bpf(zygote.seccomp_program(), 20, arch=i386) == zygote.RET_KILL_PROCESS


def _kafel_names(text: str) -> set[str]:
    block = text[text.index("ERRNO(1) {") : text.index("ERRNO(38)")]
    block = re.sub(r"/\*.*?\*/", "", block, flags=re.S)
    block = re.sub(r"\{[^{}]*\}", "", block[len("ERRNO(1) {") :])  # argument conditions
    block = re.sub(r"\([^()]*\)", "", block)  # argument names
    return {w for w in re.findall(r"[a-z_0-9]+", block) if not w.isdigit()}


def test_the_childs_filter_covers_the_default_policy():
    names = _kafel_names((POLICIES / "default.kafel").read_text())
    special = {"clone", "ioctl", "socket"}  # filtered on their arguments in both
    assert names - special == set(zygote.DENY), names ^ set(zygote.DENY)


def test_the_zygote_policy_differs_only_by_what_a_child_needs():
    default = _kafel_names((POLICIES / "default.kafel").read_text())
    zyg = _kafel_names((POLICIES / "zygote.kafel").read_text())
    assert default - zyg == {"unshare", "clone", "mount"}
    assert zyg - default == set()


# ---------------------------------------------------------------- through a warm daemon


LIVE_CHILDREN = """
import os
r, w = os.pipe()
children = []
while True:
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        os.close(w)
        os.read(r, 1)  # lives until the parent closes its end
        os._exit(0)
    children.append(pid)
print(len(children))
os.close(w)
for pid in children:
    os.waitpid(pid, 0)
"""


def test_a_job_starts_as_many_children_cold_as_warm(daemon, warm_daemon, cage_confirmed):
    # cgroup_pids_max counts the job's processes and threads: its PID 1 (the
    # harness's init, or G), the user's process, and what that starts.
    pids_max = cage_confirmed.policy.limits.pids
    counts = {}
    for mode, d in (("cold", daemon), ("warm", warm_daemon)):
        with Client(d.ipc) as c:
            r = c.run(LIVE_CHILDREN, timeout=20)
        assert r.ok, r
        assert any(f"at the limit of {pids_max}" in w for w in r.warnings), r.warnings
        counts[mode] = int(r.stdout)
    assert counts == {"cold": pids_max - 2, "warm": pids_max - 2}


RLIMITS_SEEN = (
    "import resource\n"
    "print(*(resource.getrlimit(getattr(resource, n)) for n in "
    "('RLIMIT_CPU', 'RLIMIT_CORE', 'RLIMIT_FSIZE', 'RLIMIT_NOFILE', 'RLIMIT_STACK')))"
)


def test_job_rlimits_come_from_the_policy_and_not_the_zygotes(daemon, warm_daemon, cage_confirmed):
    """A warm job has the policy's rlimits, as a cold one; its zygote has no CPU rlimit (it lives for many jobs)."""
    seen = {}
    for mode, d in (("cold", daemon), ("warm", warm_daemon)):
        with Client(d.ipc) as c:
            r = c.run(RLIMITS_SEEN, timeout=20)
        assert r.ok, r
        seen[mode] = r.stdout
    want = cage_confirmed.policy.rlimits
    assert seen["cold"] == seen["warm"], seen
    assert seen["warm"].split()[:2] == [f"({want['RLIMIT_CPU']},", f"{want['RLIMIT_CPU']})"], seen
    zygotes = zygote_processes(psutil.Process(warm_daemon.proc.pid))
    assert zygotes
    for z in zygotes:
        assert z.rlimit(psutil.RLIMIT_CPU) == (psutil.RLIM_INFINITY, psutil.RLIM_INFINITY)


def test_an_output_flood_is_stopped_within_seconds(any_daemon):
    # ~6 MB/s: the 128 MiB kill limit alone took ~20 s of two CPUs (the job's and the daemon's).
    with Client(any_daemon.ipc) as c:
        r = c.run("while True: print('hello world')", timeout=30)
    assert r.reason is Reason.OUTPUT_LIMIT, r
    assert r.usage.wall_s < 5, r.usage
    assert r.truncated and r.stdout.startswith("hello world\n") and len(r.stdout) < (1 << 20) + 200
    assert any(w.startswith("killed as an output flood") for w in r.warnings), r.warnings


def test_a_large_print_that_ends_is_not_a_flood(any_daemon):
    with Client(any_daemon.ipc) as c:
        r = c.run("import sys\nsys.stdout.write('x' * 20_000_000)\nprint()\nprint('done')", timeout=30)
    assert r.ok, r
    assert r.truncated and r.stdout.endswith("x\ndone\n")
    assert r.warnings == (
        "stdout: 20000006 bytes, kept the first 524288 and the last 524288 (limits.max_output_bytes = 1048576)",
    )


def test_a_job_cannot_reach_the_zygote_or_its_own_init(warm_daemon):
    code = (
        "import ctypes, errno, os, signal\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "print(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()), os.getpid(), os.getppid())\n"
        "for path in ('/proc/1/environ', '/proc/1/mem', '/proc/1/maps'):\n"
        "    try: open(path, 'rb').read(10); print('READ', path)\n    except OSError as e: print(type(e).__name__)\n"
        "try: print(os.listdir('/proc/1/fd'))\nexcept OSError as e: print(type(e).__name__)\n"
        "print(libc.ptrace(16, 1, 0, 0), errno.errorcode[ctypes.get_errno()])\n"
        "for sig in (signal.SIGKILL, signal.SIGINT, signal.SIGTERM): os.kill(1, sig)\n"
        "for pid in range(3, 200):\n"
        "    try: os.kill(pid, 0); print('SEES', pid)\n    except ProcessLookupError: pass\n"
        "print('alive')\n"
    )
    with Client(warm_daemon.ipc) as c:
        r = c.run(code)
        after = [c.run("print('next')") for _ in range(4)]
    out = r.stdout.splitlines()
    assert r.ok, r
    assert out[0] == "[1, 2] 2 1"  # its init G and itself: no zygote, no sibling
    assert out[1:4] == ["PermissionError"] * 3 and out[4] == "PermissionError"  # G is not dumpable
    assert out[5] == "-1 EPERM"
    assert "SEES" not in r.stdout and out[-1] == "alive"
    assert all(a.ok for a in after)  # both zygotes still serve


def test_random_state_is_reseeded_per_job(warm_daemon):
    code = "import random, numpy\nprint(random.random(), numpy.random.rand())"
    with Client(warm_daemon.ipc) as c:
        outs = [c.run(code).stdout for _ in range(6)]
    assert len(set(outs)) == 6


def test_no_trace_of_an_earlier_jobs_inputs(warm_daemon):
    secret = f"SECRET-{os.urandom(6).hex()}"
    look = (
        "import os\nfound = []\n"
        "for d, subdirs, files in os.walk('/'):\n"
        "    if d.startswith(('/proc', '/usr', '/var/lib/runnerd/env', '/dev')):\n        subdirs[:] = []\n        continue\n"
        "    for f in files:\n"
        "        if os.path.join(d, f) == '/runnerd/main.py': continue  # this code, which holds the secret\n"
        f"        try:\n            if {secret!r}.encode() in open(os.path.join(d, f), 'rb').read(1 << 20): found.append(os.path.join(d, f))\n"
        "        except OSError: pass\n"
        "print(found, sorted(os.listdir('/work')))\n"
    )
    with Client(warm_daemon.ipc) as c:
        for _ in range(3):
            assert (
                c.run("print(open('secret.txt').read())", files={"secret.txt": secret.encode()}).stdout == secret + "\n"
            )
            r = c.run(look, timeout=20)
            assert r.stdout == "[] []\n", r


def zygote_processes(daemon: psutil.Process) -> list[psutil.Process]:
    """The zygotes' interpreters (their children, G and U, run the same command line)."""
    found = []
    for p in daemon.children(recursive=True):
        try:
            if "zygote.py" in " ".join(p.cmdline()) and p.parent().name() == "nsjail":
                found.append(p)
        except psutil.Error:
            continue
    return found


def test_a_dead_zygote_is_replaced(cage_confirmed, state_dir):
    d = start_daemon(state_dir, "zdeath", cage_confirmed.config.sandbox_env, concurrency=2, mode="warm")
    try:
        results: dict[str, Result] = {}
        working = {job_id: threading.Event() for job_id in ("zdeath-1", "zdeath-2")}

        def long_job(job_id: str) -> None:
            code = "x = bytearray(32 << 20)\nprint('working', flush=True)\nsum(range(10**9))"
            with Client(d.ipc) as c:
                for event in c.stream(code, job_id=job_id, wait=60):
                    if isinstance(event, Output):
                        working[job_id].set()
                    elif isinstance(event, Finished):
                        results[job_id] = event.result

        threads = [threading.Thread(target=long_job, args=(job_id,)) for job_id in working]
        for t in threads:
            t.start()
        for started in working.values():
            assert started.wait(60), "a job did not start"
        daemon = psutil.Process(d.proc.pid)
        zygotes = zygote_processes(daemon)
        assert len(zygotes) == 2 + 4  # full ones (the CPUs) and light ones (twice the concurrency)
        for z in zygotes:
            z.send_signal(signal.SIGKILL)
        for t in threads:
            t.join(timeout=60)
        assert sorted(results) == sorted(working)
        for job_id, r in results.items():
            assert r.reason is Reason.SANDBOX_ERROR, r
            assert any("zygote" in w and "died during the job" in w for w in r.warnings), r.warnings
            assert r.stdout.startswith("working")  # print() writes the newline apart: the kill may fall between
            # It ran until the zygote died: what it used is known, and reported.
            assert r.usage.wall_s > 0 and r.usage.cpu_s > 0 and r.usage.max_rss_bytes > 32 << 20, r.usage
            assert f"job {job_id}: sandbox error: zygote" in d.log()
        assert "job job-" not in d.log()  # never the internal cgroup name
        with Client(d.ipc) as c:
            fresh = [c.run("print('recovered')", wait=90) for _ in range(4)]
        assert all(r.ok and r.stdout == "recovered\n" for r in fresh), fresh
        assert "replacing it" in d.log() or "is gone" in d.log()
    finally:
        assert d.stop() == 0, d.log()
    assert not any(wait_clean(cage_confirmed.config).values())


def test_warm_daemon_reload_retires_the_old_pool(cage_confirmed, state_dir):
    d = start_daemon(state_dir, "wreload", cage_confirmed.config.sandbox_env, concurrency=1, mode="warm")
    try:
        daemon = psutil.Process(d.proc.pid)

        def zygote_pids() -> set[int]:
            return {p.pid for p in zygote_processes(daemon)}

        before = zygote_pids()
        d.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 60
        while "reloaded" not in d.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        with Client(d.ipc) as c:
            assert c.run("print('after reload')").ok
        while (zygote_pids() & before) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert before and not (zygote_pids() & before) and len(zygote_pids()) == 1 + 2  # one full, two light
    finally:
        assert d.stop() == 0, d.log()
    # The old pool (retired by the reload) and the new one (SIGTERM) ended on purpose: no warnings.
    assert "is gone" not in d.log(), d.log()


def test_only_a_zygote_death_nobody_asked_for_warns(cage_confirmed, caplog):
    config = dataclasses.replace(cage_confirmed.config, mode="warm", concurrency=1)

    async def scenario() -> Zygote:
        rt = await open_runtime(config, probe=False)
        try:
            assert isinstance(rt.runner, WarmCage)
            assert (await rt.runner.run(make_job("print(1)", limits=config.limits))).ok
            victim = rt.runner.pools["full"].zygotes[0]
            os.kill(victim.pid, signal.SIGKILL)
            deadline = time.monotonic() + 30
            while not victim.dead and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            return victim
        finally:
            await rt.aclose()  # ends the other zygotes (two light ones) on purpose

    with caplog.at_level(logging.WARNING, logger="runnerd"):
        victim = asyncio.run(scenario())
    gone = [r.getMessage() for r in caplog.records if "is gone" in r.getMessage()]
    assert victim.dead and len(gone) == 1, gone
    assert gone[0].startswith("full zygote 0 is gone")
