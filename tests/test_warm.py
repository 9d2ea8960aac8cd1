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
from runnerd.errors import PolicyError
from runnerd.incage import lockdown
from runnerd.result import Reason, Result
from runnerd.sandbox.job import make_job
from runnerd.sandbox.policy import zygote_kafel
from runnerd.sandbox.runtime import open_runtime
from runnerd.sandbox.shape import LIFTED_FOR_ZYGOTES
from runnerd.sandbox.warm import WarmCage
from runnerd.sandbox.zygotes import Zygote

from .conftest import start_daemon, wait_clean

POLICIES = default_policy_path().parent


# ---------------------------------------------------------------- the stacked filter


def run_bpf(program, nr: int, args=(0, 0, 0, 0, 0, 0), arch: int = lockdown.AUDIT_ARCH_X86_64) -> int:
    """Evaluate a classic BPF seccomp program (the opcodes lockdown.py uses) on one syscall."""
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


EPERM = lockdown.RET_ERRNO | 1
ENOSYS = lockdown.RET_ERRNO | 38
ALLOW = lockdown.RET_ALLOW


LIFTED = tuple(LIFTED_FOR_ZYGOTES)


@pytest.mark.parametrize(
    "nr, args, expected",
    [
        (0, (), ALLOW),  # read
        (39, (), ALLOW),  # getpid
        (272, (0x10000000,), EPERM),  # unshare: lifted for the zygote, refused again
        (165, (), EPERM),  # mount: likewise
        (56, (0x3D0F00,), ALLOW),  # clone for a thread
        (56, (0x01200011,), ALLOW),  # clone for fork()
        (56, (0x10000000 | 17,), EPERM),  # clone with CLONE_NEWUSER
        (56, (0x00020000,), EPERM),  # clone with CLONE_NEWNS
        (101, (), ALLOW),  # ptrace: the zygote's cage policy refuses it (test_the_zygotes_policy...)
        (0x40000000 | 39, (), ENOSYS),  # x32 getpid
        (0x40000000 | 521, (), ENOSYS),  # x32 ptrace
    ],
)
def test_the_childs_filter_refuses_what_the_zygote_lifted(nr, args, expected):
    program = lockdown.seccomp_program(LIFTED)
    assert len(program) < 4096
    assert run_bpf(program, nr, tuple(args) + (0,) * (6 - len(args))) == expected


def test_the_childs_filter_kills_other_architectures():
    i386 = 0x40000003
    assert run_bpf(lockdown.seccomp_program(LIFTED), 20, arch=i386) == lockdown.RET_KILL_PROCESS


def test_the_zygote_refuses_to_start_with_a_lift_it_cannot_refuse_again():
    with pytest.raises(ValueError, match="cannot refuse setns"):
        lockdown.seccomp_program((*LIFTED, "setns"))


def _kafel_names(text: str) -> set[str]:
    block = text[text.index("ERRNO(1) {") : text.index("ERRNO(38)")]
    block = re.sub(r"/\*.*?\*/", "", block, flags=re.S)
    block = re.sub(r"\{[^{}]*\}", "", block[len("ERRNO(1) {") :])  # argument conditions
    block = re.sub(r"\([^()]*\)", "", block)  # argument names
    return {w for w in re.findall(r"[a-z_0-9]+", block) if not w.isdigit()}


def test_the_zygotes_policy_is_the_jobs_less_what_a_child_needs():
    """Derived, not written twice: the job's kafel less LIFTED_FOR_ZYGOTES, everything else kept."""
    default = (POLICIES / "default.kafel").read_text()
    derived = zygote_kafel(default, POLICIES / "default.kafel")
    assert _kafel_names(default) - _kafel_names(derived) == set(LIFTED)
    assert _kafel_names(derived) < _kafel_names(default)
    assert "ERRNO(38)" in derived and "clone3" in derived and "setns" in derived and "umount" in derived
    assert set(LIFTED) == set(lockdown.REFUSABLE)  # the in-cage filter can refuse each


@pytest.mark.parametrize(
    "edit, says",
    [
        (lambda t: t.replace("unshare, setns,", "setns,"), "finds it 0 times"),
        (lambda t: t.replace("mount, umount,", "mount, umount, mount,"), "finds it 2 times"),
    ],
)
def test_a_policy_warm_mode_cannot_derive_is_refused_by_name(edit, says, tmp_path):
    text = edit((POLICIES / "default.kafel").read_text())
    with pytest.raises(PolicyError, match=says):
        zygote_kafel(text, tmp_path / "x.kafel")


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
        # full ones (the CPUs), light ones (twice the concurrency), one for sessions
        assert len(zygotes) == 2 + 4 + 1
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
        # one full, two light, one for sessions
        assert before and not (zygote_pids() & before) and len(zygote_pids()) == 1 + 2 + 1
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


# ---------------------------------------------------------------- one cage shape, both modes

SHAPE_SEEN = """
import errno, json, os, resource
def fs(path):
    s = os.statvfs(path)
    return [s.f_blocks * s.f_frsize, s.f_files]
seen = {
    "tmp": fs("/tmp"), "shm": fs("/dev/shm"), "home": os.environ["HOME"],
    "home_writable": os.access(os.environ["HOME"], os.W_OK), "cwd": os.getcwd(),
    "rlimits": {n: list(resource.getrlimit(getattr(resource, n)))
                for n in ("RLIMIT_CPU", "RLIMIT_FSIZE", "RLIMIT_NOFILE", "RLIMIT_STACK", "RLIMIT_CORE", "RLIMIT_MEMLOCK")},
}
try:
    os.getpriority(os.PRIO_PROCESS, 0)
    seen["getpriority"] = "ok"
except OSError as e:
    seen["getpriority"] = errno.errorcode[e.errno]
print(json.dumps(seen))
"""

# Every field of the cage's shape an operator sets in policies/, changed.
POLICY_EDITS = (
    ("size=67108864,nr_inodes=4096,mode=1777", "size=33554432,nr_inodes=2048,mode=1777"),  # /tmp
    ("size=67108864,nr_inodes=1024,mode=1777", "size=16777216,nr_inodes=512,mode=1777"),  # /dev/shm
    ('envar: "HOME=/home/user"', 'envar: "HOME=/home/sandbox"'),
    ('envar: "MPLCONFIGDIR=/home/user/', 'envar: "MPLCONFIGDIR=/home/sandbox/'),
    ("rlimit_cpu: 120 ", "rlimit_cpu: 90 "),
    ("rlimit_fsize: 256 ", "rlimit_fsize: 64 "),
    ("rlimit_nofile: 1024", "rlimit_nofile: 512"),
    ("rlimit_stack: 8 ", "rlimit_stack: 16 "),
    ("rlimit_memlock: 64 ", "rlimit_memlock: 128 "),
    ("cgroup_pids_max: 64 ", "cgroup_pids_max: 40 "),
)


def test_an_edited_policy_shapes_cold_and_warm_cages_alike(cage_confirmed, state_dir, tmp_path):
    cfg_text = (POLICIES / "default.cfg").read_text()
    for old, new in POLICY_EDITS:
        assert cfg_text.count(old) == 1, old
        cfg_text = cfg_text.replace(old, new)
    (tmp_path / "default.cfg").write_text(cfg_text)
    kafel = (POLICIES / "default.kafel").read_text()
    entry = "    ptrace, process_vm_readv,"
    assert kafel.count(entry) == 1
    (tmp_path / "default.kafel").write_text(kafel.replace(entry, "    ptrace, getpriority, process_vm_readv,"))

    async def in_mode(mode: str) -> dict[str, dict]:
        config = dataclasses.replace(
            cage_confirmed.config, policy=tmp_path / "default.cfg", mode=mode, concurrency=1, warm_full_zygotes=1
        )
        rt = await open_runtime(config, probe=False)
        try:
            seen = {}
            for name, code in (("shape", SHAPE_SEEN), ("children", LIVE_CHILDREN)):
                r = await rt.runner.run(make_job(code, limits=config.limits), job_id=f"shape-{mode}-{name}")
                assert r.ok, (mode, name, r)
                seen[name] = r.stdout
            return seen
        finally:
            await rt.aclose()

    cold, warm = asyncio.run(in_mode("cold")), asyncio.run(in_mode("warm"))
    assert cold == warm, (cold, warm)
    import json

    seen = json.loads(cold["shape"])
    assert seen["tmp"] == [32 << 20, 2048] and seen["shm"] == [16 << 20, 512]
    assert seen["home"] == "/home/sandbox" and seen["home_writable"] and seen["cwd"] == "/work"
    assert seen["rlimits"] == {
        "RLIMIT_CPU": [90, 90], "RLIMIT_FSIZE": [64 << 20, 64 << 20], "RLIMIT_NOFILE": [512, 512],
        "RLIMIT_STACK": [16 << 20, 16 << 20], "RLIMIT_CORE": [0, 0], "RLIMIT_MEMLOCK": [128 << 10, 128 << 10],
    }  # fmt: skip
    assert seen["getpriority"] == "EPERM"  # a rule added to the kafel policy holds in both modes
    assert int(cold["children"]) == 40 - 2  # cgroup_pids_max, less the job's init and main process
