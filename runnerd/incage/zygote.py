"""runnerd's zygote: the warm path, running *inside* an nsjail cage (standard library only).

A zygote imports numpy, pandas and Matplotlib once (and renders a first
figure), then forks one child per job; a child is never reused. Each child,
before any user code runs:

* enters fresh user, mount, pid, ipc, network and cgroup namespaces (the jailed uid maps to
  itself; the pid namespace takes one more fork: G, its PID 1);
* mounts its job's directory as /work, each input read-only over
  /work/<name>, its own home, figures dir and code, fresh the policy's
  tmpfs mounts (/tmp, /dev/shm), a new read-only /proc, and covers /spool
  (where every job's directory lives) with an empty read-only tmpfs: all as
  the host's SHAPE says;
* sets the policy's rlimits and no_new_privs, drops every capability
  (bounding set included), and stacks a seccomp filter on the cage's that
  refuses again what the zygote's policy lifted from the job's (namespace
  creation, mounts) and the x32 range: a job is under the job's policy;
* reseeds Python's and numpy's random state (a fork copies them).

The child is prepared *before* its job arrives (moved into the job's
cgroup, namespaces made, its processes forked and locked down), so a job's
latency is only: its mounts, one hand-off, the user's code. Protocol with
the host, on the control socket (fd argv[1]): 4-byte big-endian length +
JSON, file descriptors as SCM_RIGHTS.

    zygote -> host  {"event": "warm", "ms": ..., "kind": ...}    once, after the imports
    zygote -> host  {"event": "prepared", "pid": N}              C forked (N: its pid in the cage)
    host -> zygote  {"op": "arm"}                                C is in the job's cgroup now
    zygote -> host  {"event": "armed"}                           G and U wait for the job
    host -> zygote  {"op": "run", "dir": ..., "inputs": [...],   + fds [stdout, stderr, report]
                     "max_figures": 32}
    zygote -> host  {"event": "exit", "code": N} | {"event": "exit", "signal": S}
    host -> zygote  {"op": "open", "home": [size, inodes],        + fds [session control socket, /work]
                     "figures": [size, inodes],
                     "max_figures": 32, "max_value": 8192}
    host -> zygote  {"op": "quit"} (or closes the socket)

"open" gives the armed child to a session instead of a job: its G is
incage/session_init.py's, its U runs the session's runs (incage/session.py).

The next child is prepared while a job runs, so "prepared", "arm" and
"armed" interleave with a job's "run" and "exit".

Two kinds of zygote (argv[3]): "full" imports numpy, pandas and Matplotlib;
"light" imports nothing more than the harness, for code that needs only the
standard library (its children fork and exit in a tenth of the time).

The processes of one job: C (forked by the zygote, moved into the job's
cgroup by the host, makes the namespaces, forks G and leaves), G (PID 1 of
the job's pid namespace: mounts the job's files, locks itself down, hands
the job to U, reaps, reports) and U (forked by G before the job, locked
down before the job, runs the user's code). All of a job's processes are
in its cgroup.
"""

import ctypes
import importlib.util
import io
import json
import os
import random
import resource
import shutil
import signal
import socket
import sys
import time
import types
from collections.abc import Callable
from typing import Any

SPOOL = "/spool"
# The cage's shape, from the host (argv[4], runnerd/sandbox/shape.py): the
# jailed uid, where the job's directory, home, figures and code go, the
# policy's tmpfs mounts and the job's rlimits. Nothing here repeats them.
SHAPE: dict[str, Any] = {}

CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWNET = 0x40000000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND = 32, 4096


def _load_session() -> types.ModuleType:
    """session.py, by its path (-I keeps this file's folder off sys.path); it loads the other in-cage files."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "session.py")
    spec = importlib.util.spec_from_file_location("runnerd_session", path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


session = _load_session()
send_msg, recv_msg = session.send_msg, session.recv_msg
lockdown = session.sibling("lockdown")
session_init = session.sibling("session_init")


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    lockdown.check(
        lockdown.libc.mount(
            source.encode() if source else None, target.encode(), fstype.encode() if fstype else None,
            ctypes.c_ulong(flags), data.encode() if data else None,
        ),
        f"mount {target}",
    )  # fmt: skip


def _bind(source: str, target: str, flags: int) -> None:
    mount(source, target, None, MS_BIND)
    mount(None, target, None, MS_BIND | MS_REMOUNT | flags)


def mount_fresh() -> None:
    """The policy's tmpfs mounts (/tmp, /dev/shm), fresh for this job or session; /spool covered."""
    for t in SHAPE["tmpfs"]:
        flags = (MS_NOSUID if t["nosuid"] else 0) | (MS_NODEV if t["nodev"] else 0) | (MS_NOEXEC if t["noexec"] else 0)
        mount("tmpfs", t["dst"], "tmpfs", flags, t["options"] or None)
    # Every job's directory lives under /spool: cover it (the cage's own
    # mount cannot be unmounted from a less privileged namespace).
    mount("tmpfs", SPOOL, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY, "size=4096,nr_inodes=2,mode=0555")


# ---------------------------------------------------------------- the child


def _enter_namespaces() -> None:
    # Its own network namespace too: a session outlives the jobs of its zygote, and
    # abstract unix sockets live in the network namespace. Its own cgroup namespace
    # (C is in the job's cgroup by now): /proc/self/cgroup names no host cgroup.
    flags = CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWNET | CLONE_NEWCGROUP
    lockdown.check(lockdown.libc.unshare(flags), "unshare")
    with open("/proc/self/setgroups", "w") as fh:
        fh.write("deny")
    uid = SHAPE["uid"]
    with open("/proc/self/uid_map", "w") as fh:
        fh.write(f"{uid} {uid} 1")
    with open("/proc/self/gid_map", "w") as fh:
        fh.write(f"{uid} {uid} 1")


def _mount_job(job: dict[str, Any]) -> None:
    """This job's view of the file system (G is root-capable in the job's user namespace)."""
    d = os.path.join(SPOOL, job["dir"])
    safe = MS_NOSUID | MS_NODEV | MS_NOEXEC
    _bind(os.path.join(d, "work"), SHAPE["work"], safe)
    for index, name in enumerate(job["inputs"]):
        _bind(os.path.join(d, "in", str(index)), os.path.join(SHAPE["work"], name), safe | MS_RDONLY)
    _bind(os.path.join(d, "home"), SHAPE["home"], safe)
    _bind(os.path.join(d, "figures"), SHAPE["figures"], safe)
    _bind(os.path.join(d, "main.py"), SHAPE["code"], safe | MS_RDONLY)
    mount_fresh()


def _set_rlimits() -> None:
    """The job's rlimits (its CPU time): lowering them needs no privilege, so U sets them once it knows its job."""
    for name, value in SHAPE["rlimits"].items():
        value = resource.RLIM_INFINITY if value < 0 else value
        resource.setrlimit(getattr(resource, name), (value, value))


def lock_down(rlimits: bool = True) -> None:
    """Job limits, no capabilities, no new privileges, the stacked seccomp filter."""
    if rlimits:
        _set_rlimits()
    lockdown.drop_privileges()
    lockdown.install_seccomp(SHAPE["lifted"])


def _reseed() -> None:
    random.seed()
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed()


def _user(sock: socket.socket, harness: types.ModuleType) -> None:
    """U: the process that runs the user's code; made, and locked down, before its job. Never returns."""
    try:
        lock_down(rlimits=False)
        job, fds = recv_msg(sock, max_fds=3)
        if job is not None and job.get("op") == "open" and len(fds) == 1:
            # A session's process lives across its runs: a CPU-time rlimit would add
            # up over all of them. Each run has its wall clock; the cgroup its CPU quota.
            sock.close()
            os.chdir(SHAPE["work"])
            _reseed()
            session.serve_runs(socket.socket(fileno=fds[0]), harness, int(job["max_figures"]), int(job["max_value"]))
        if job is None or len(fds) != 3:
            os._exit(0)
        _set_rlimits()
        sock.close()
        os.dup2(fds[0], 1)
        os.dup2(fds[1], 2)
        os.close(fds[0])
        os.close(fds[1])
        os.chdir(SHAPE["work"])
        _reseed()
        send = harness.reporter(fds[2])
    except BaseException as exc:
        os.write(2, f"runnerd: the job's process could not start: {exc}\n".encode())
        os._exit(125)
    harness.run_user_code(send, int(job["max_figures"]), int(job["max_value"]))  # exits


def _job_init(zygote_sock: socket.socket, harness: types.ModuleType) -> None:
    """G: PID 1 of the job's pid namespace, made before its job. Never returns."""
    try:
        mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY)
        g_end, u_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        user = os.fork()
        if user == 0:
            g_end.close()
            zygote_sock.close()
            _user(u_end, harness)
        u_end.close()
        job, fds = recv_msg(zygote_sock, max_fds=3)
        if job is not None and job.get("op") == "open" and len(fds) == 2:
            session_init.init(sys.modules[__name__], zygote_sock, g_end, user, job, fds, harness)
        if job is None or len(fds) != 3:
            os._exit(0)  # the zygote is going away; U dies with this namespace
        _mount_job(job)
        # U could open /proc/1/fd/... of a dumpable PID 1: not of this one.
        lockdown.check(lockdown.libc.prctl(4, 0, 0, 0, 0), "PR_SET_DUMPABLE")
        lock_down()
        harness.ignore_signals()
        report = harness.reporter(os.dup(fds[2]))
        report(event="start")  # before U can write anything of its own
        send_msg(g_end, job, fds)
        for fd in fds:
            os.close(fd)
        g_end.close()
    except BaseException as exc:
        os.write(2, f"runnerd: the job's sandbox could not be set up: {exc}\n".encode())
        os._exit(125)
    code = _reap(user, harness, report)
    try:
        send_msg(zygote_sock, {"status": code})
    except OSError:
        pass
    os._exit(code)


def _reap(user: int, harness: types.ModuleType, report: Callable[..., None]) -> int:
    """Wait for U (as the cold cage's init does); then end every other process of the job; its status."""
    code = harness.reap(user, report)
    # Whatever U left behind (a daemon, a stray child) dies before the host
    # collects the job's files.
    harness.end_the_rest()
    harness.close_reports()
    return code


def _child(sock: socket.socket, harness: types.ModuleType) -> None:
    """C: moved into its job's cgroup by the host first; makes the namespaces, forks G, leaves."""
    try:
        go, _ = recv_msg(sock)
        if go is None:
            os._exit(0)
        _enter_namespaces()
        g = os.fork()  # the first process in the new pid namespace: its PID 1
        if g == 0:
            _job_init(sock, harness)
        send_msg(sock, {"g": g})
    except BaseException as exc:
        os.write(2, f"runnerd: the child could not prepare the job's namespaces: {exc}\n".encode())
        os._exit(126)
    os._exit(0)


# ---------------------------------------------------------------- the zygote


def _warm(kind: str, mplconfig_src: str) -> tuple[types.ModuleType, float]:
    """Import the libraries children should find loaded; the full kind also draws a figure."""
    started = time.monotonic()
    harness = session.sibling("harness")
    harness.install_backend_finder()
    lockdown.compiled_filter(SHAPE["lifted"])  # built once here, inherited by every child
    # What every job's processes need anyway: loaded here, not per job.
    import atexit  # noqa: E401,F401

    if kind == "full":
        target = os.environ.get("MPLCONFIGDIR")
        if target and os.path.isdir(mplconfig_src):
            os.makedirs(target, exist_ok=True)
            for name in os.listdir(mplconfig_src):
                shutil.copyfile(os.path.join(mplconfig_src, name), os.path.join(target, name))
        import matplotlib.pyplot as plt
        import numpy  # noqa: F401
        import pandas  # noqa: F401

        fig = plt.figure()
        plt.plot([0, 1], [1, 0])
        fig.savefig(io.BytesIO(), format="png")
        plt.close(fig)
    # Children share the zygote's heap copy-on-write: keep the collector from
    # walking (and so copying) it in every child.
    import gc

    gc.collect()
    gc.freeze()
    return harness, (time.monotonic() - started) * 1000


def _status_of(waitstatus: int) -> dict[str, Any]:
    if os.WIFSIGNALED(waitstatus):
        return {"event": "exit", "signal": os.WTERMSIG(waitstatus)}
    return {"event": "exit", "code": os.waitstatus_to_exitcode(waitstatus)}


class _Next:
    """The child being prepared for the next job: C, then (once armed) G."""

    def __init__(self, harness: types.ModuleType) -> None:
        self.sock, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.c = os.fork()
        if self.c == 0:
            # Nothing of the zygote's reaches the job: not its control socket,
            # not its selector, not another job's socket. Only this child's own.
            keep = child_end.fileno()
            os.closerange(3, keep)
            os.closerange(keep + 1, 1 << 20)
            _child(child_end, harness)
        child_end.close()
        self.g: int | None = None

    def arm(self) -> None:
        """C was moved into its job's cgroup: let it make the namespaces and G (and U)."""
        send_msg(self.sock, {"go": True})

    def armed(self, zombies: list[int]) -> None:
        """C's answer: G's pid. C leaves; G becomes the zygote's (the cage's init) child."""
        made, _ = recv_msg(self.sock)
        zombies.append(self.c)
        if not made or not isinstance(made.get("g"), int):
            raise RuntimeError("the child could not prepare its job (its reason is above)")
        self.g = made["g"]

    def discard(self) -> None:
        self.sock.close()  # C or G sees EOF and exits
        if self.g is not None:
            try:
                os.kill(self.g, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.waitpid(self.g if self.g is not None else self.c, 0)
        except ChildProcessError:
            pass


def main(argv: list[str]) -> int:
    import selectors

    ctl = socket.socket(fileno=int(argv[1]))
    kind = argv[3] if len(argv) > 3 else "full"
    SHAPE.update(json.loads(argv[4]))
    harness, ms = _warm(kind, argv[2])
    send_msg(ctl, {"event": "warm", "ms": round(ms, 1), "kind": kind})
    nxt: _Next | None = None  # the child for the next job
    running: tuple[int, socket.socket] | None = None  # (g, socket) of the job running now
    zombies: list[int] = []
    sel = selectors.DefaultSelector()
    sel.register(ctl, selectors.EVENT_READ, "ctl")
    try:
        while True:
            if nxt is None:
                # Prepared while the current job runs: the next job finds it armed.
                nxt = _Next(harness)
                send_msg(ctl, {"event": "prepared", "pid": nxt.c})
            # Wake up soon while a C or G still needs reaping, even with no event.
            for key, _ in sel.select(timeout=0.02 if zombies else None):
                if key.data == "ctl":
                    order, fds = recv_msg(ctl, max_fds=3)
                    op = order.get("op") if order else None
                    if op == "arm" and nxt is not None and nxt.g is None:
                        nxt.arm()
                        sel.register(nxt.sock, selectors.EVENT_READ, "next")
                    elif op == "open" and order and nxt and nxt.g is not None and len(fds) == 2 and running is None:
                        # The child is the session's now: the zygote only reaps its G when it ends.
                        send_msg(nxt.sock, order, fds)
                        for fd in fds:
                            os.close(fd)
                        sel.register(nxt.sock, selectors.EVENT_READ, ("session", nxt.g))
                        nxt = None
                    elif op == "run" and order and nxt and nxt.g is not None and len(fds) == 3 and running is None:
                        send_msg(nxt.sock, order, fds)
                        for fd in fds:
                            os.close(fd)
                        running = (nxt.g, nxt.sock)
                        sel.register(nxt.sock, selectors.EVENT_READ, "job")
                        nxt = None
                    else:
                        for fd in fds:
                            os.close(fd)
                        return 0  # "quit", EOF, or an order out of turn
                elif key.data == "next":
                    assert nxt is not None  # its socket is registered only while it is the next child
                    sel.unregister(nxt.sock)
                    nxt.armed(zombies)
                    send_msg(ctl, {"event": "armed"})
                elif isinstance(key.data, tuple):  # a session's G: its status, or EOF, as it ends
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    sel.unregister(sock)
                    sock.close()
                    zombies.append(key.data[1])
                else:
                    assert running is not None  # its socket is registered only while it runs
                    g, sock = running
                    # G reports as soon as the job's processes are gone, before its own
                    # (slow, for a large process) teardown; a G that died says nothing.
                    done, _ = recv_msg(sock)
                    sel.unregister(sock)
                    sock.close()
                    running = None
                    if isinstance(done, dict) and isinstance(done.get("status"), int) and 0 <= done["status"] <= 255:
                        send_msg(ctl, {"event": "exit", "code": done["status"]})
                        zombies.append(g)
                    else:
                        _, status = os.waitpid(g, 0)
                        send_msg(ctl, _status_of(status))
            for pid in list(zombies):
                try:
                    if os.waitpid(pid, os.WNOHANG)[0]:
                        zombies.remove(pid)
                except ChildProcessError:
                    zombies.remove(pid)
    finally:
        if nxt is not None:
            nxt.discard()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
