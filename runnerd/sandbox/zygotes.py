"""One zygote, host side: its cage, its control socket, its spool, and the arming of its next child.

A :class:`Zygote` starts ``incage/zygote.py`` in an nsjail cage of its own
(the job's policy less what a child lifts: policy.zygote_kafel) and keeps
its next child armed: prepared in fresh namespaces, already in the cgroup
it will live in. What the children are for is a subclass's: a
:class:`~.job_zygote.JobZygote` runs one job at a time in them, a
:class:`~.session_zygote.SessionZygote` gives them to sessions. The pool is
:mod:`.warm`.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import secrets
import socket
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import incage
from ..config import Config
from ..errors import SandboxError
from .cgroups import CgroupLimits, JobCgroup
from .control import HEADER, frame, size_of
from .host import HostState, SlotLease
from .nsjail import MAX_LOG_BYTES, pb_bind, pb_idmaps, spawn_nsjail
from .policy import Policy, nsjail_problems
from .runner import teardown
from .sandbox_env import MPLCONFIG
from .shape import INCAGE_DIR
from .spool import PLACEHOLDER, mount_spool
from .supervise import capped, read_pipe, watch_exit
from .workspace import Workspace

log = logging.getLogger(__name__)

ZYGOTE_IN_CAGE = f"{INCAGE_DIR}/zygote.py"
WARM_TIMEOUT_S = 180.0  # imports on a cold disk cache can take a while
EVENT_TIMEOUT_S = 30.0  # a prepared child, an exit after a kill
# The zygote itself: its interpreter, nsjail, and a child before it moves out.
ZYGOTE_PIDS = 32
NO_MESSAGE = "no message"


async def to_the_end(step: Callable[[], object]) -> None:
    """Run a host step (it makes or removes a cgroup, a mount, a process) in a thread, to its end.

    A stop cancels what a zygote is doing. A cancelled ``to_thread`` stops
    waiting, not its thread: what the thread then made would be nobody's,
    left for the next start's sweep. So the step is awaited through a
    cancellation, which is raised once the step is over; each step records
    what it makes on the zygote itself, where the clean-up finds it.
    """
    done = asyncio.ensure_future(asyncio.to_thread(step))
    cancelled = False
    while not done.done():
        try:
            await asyncio.wait((done,))
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        done.exception()  # retrieved: the cancellation is what goes on
        raise asyncio.CancelledError
    done.result()


class ZygoteGone(SandboxError):
    """The zygote died or stopped answering."""


class Zygote(ABC):
    """One warm slot: a *kind* of zygote ("full" imports the heavy libraries, "light" the harness alone)."""

    def __init__(
        self, index: int, config: Config, policy: Policy, kafel: str, host: HostState, nsjail: Path, kind: str = "full"
    ) -> None:  # fmt: skip
        self.index = index
        self.kind = kind
        self.config = config
        self.policy = policy
        self.shape = policy.shape()
        self.kafel = kafel
        self.host = host
        self.nsjail = nsjail
        self.env = config.sandbox_env
        self.lease: SlotLease | None = None
        self.cgroup: JobCgroup | None = None
        self.proc: Any = None
        self.pid = 0  # the zygote's interpreter, as the host sees it
        self.ctl: socket.socket | None = None
        # One queue per event kind: a job's "exit" and the next child's
        # "prepared"/"armed" arrive interleaved.
        self.events: dict[str, asyncio.Queue[dict[str, Any] | None]] = {
            k: asyncio.Queue() for k in ("warm", "prepared", "armed", "exit")
        }
        self.arming: asyncio.Task[None] | None = None
        self.armed: tuple[str, JobCgroup] | None = None
        # The cgroup of the child being armed, until it is armed (or removed).
        self.unarmed: JobCgroup | None = None
        self.spool: Path | None = None
        self.dead = False
        self.closing = False  # set by close(): its end from then on is on purpose
        self.warm_ms = 0.0
        self._tasks: list[asyncio.Task[Any]] = []
        self._stderr = bytearray()
        self._nsjail_log = bytearray()

    # ------------------------------------------------------------ life

    def _cage_config(self, uid: int, spool: Path) -> str:
        lines = ["", "# ---- added by runnerd for a warm zygote ----", *pb_idmaps(uid)]
        lines.append(pb_bind(self.env, str(self.env), noexec=False))
        for name in incage.FILES:
            lines.append(pb_bind(self.config.harness_dir / name, f"{INCAGE_DIR}/{name}"))
        lines.append(pb_bind(spool, "/spool", rw=True))
        tmpfs = (
            'mount {{ dst: "{dst}" fstype: "tmpfs" rw: true options: "{opts}" nosuid: true nodev: true noexec: true }}'
        )
        # Mount points for each job's own binds (zygote._mount_job), nothing more.
        lines.append(tmpfs.format(dst=self.shape.work, opts="size=1048576,nr_inodes=64,mode=0755"))
        lines.append(tmpfs.format(dst=self.shape.home, opts="size=8388608,nr_inodes=256,mode=0755"))
        lines.append(tmpfs.format(dst=self.shape.figures, opts="size=4096,nr_inodes=4,mode=0755"))
        # The mount point of each job's code. A real file: nsjail's
        # src_content files are deleted, and nothing mounts on those.
        lines.append(pb_bind(spool / PLACEHOLDER, self.shape.code))
        return self.policy.cfg_text + "\n".join(lines) + "\n"

    async def start(self) -> None:
        """Start the cage, wait for the imports, arm the first child."""
        loop = asyncio.get_running_loop()
        self.lease = self.host.lease_slot()
        name = f"{self.host.job_prefix}zygote{self.index}-{secrets.token_hex(3)}"
        limits = self.policy.limits

        def make_cgroup() -> None:
            self.cgroup = self.host.cgroups.create(
                name, CgroupLimits(limits.memory_bytes, ZYGOTE_PIDS, limits.cpu_ms_per_sec)
            )

        await to_the_end(make_cgroup)
        self.spool = self.config.jobs_dir / name
        await to_the_end(functools.partial(mount_spool, self.spool, *self.spool_size()))
        self.ctl, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        err_r, err_w = os.pipe()
        log_r, log_w = os.pipe()
        cage_config, cgroup = self._cage_config(self.lease.uid, self.spool), self.cgroup
        assert cgroup is not None

        def spawn() -> None:
            self.proc = spawn_nsjail(
                self.nsjail, cage_config, self.kafel, cgroup,
                # No CPU rlimit for the zygote itself: it counts the zygote's own
                # CPU time over every job it serves. Each child sets the job's.
                args=("--time_limit", "0", "--proc_rw", "--rlimit_cpu", "inf"),
                command=[str(self.env / "bin" / "python3"), "-I", "-B", "-u", ZYGOTE_IN_CAGE,
                         str(theirs.fileno()), str(self.env / MPLCONFIG), self.kind,
                         self.shape.for_zygote()],  # fmt: skip
                stdout=err_w, stderr=err_w, log_w=log_w, pass_fds=(theirs.fileno(),),
            )  # fmt: skip

        try:
            await to_the_end(spawn)
        finally:
            # Only once nsjail has them: a cancelled wait does not end the spawn.
            theirs.close()
            os.close(err_w)
            os.close(log_w)
        read_pipe(loop, err_r, capped(self._stderr, MAX_LOG_BYTES))
        read_pipe(loop, log_r, capped(self._nsjail_log, MAX_LOG_BYTES))
        self._tasks.append(asyncio.create_task(self._read_events(), name=f"runnerd-zygote-{self.index}"))
        assert self.proc is not None
        exited = watch_exit(loop, self.proc.pid)
        exited.add_done_callback(lambda _: self._gone("its cage exited"))
        event = await self._next("warm", WARM_TIMEOUT_S)
        self.warm_ms = float(event.get("ms", 0))
        self.pid = self._only_child(self.proc.pid)
        await self.arm()
        log.info("%s zygote %d ready (pid %d, warmed in %.0f ms)", self.kind, self.index, self.pid, self.warm_ms)

    @abstractmethod
    def spool_size(self) -> tuple[int, int]:
        """Bytes and inodes of the spool (bound at /spool in the cage)."""

    @abstractmethod
    def child_cgroup(self, name: str) -> JobCgroup:
        """A new cgroup for the next child (called in a thread)."""

    @abstractmethod
    async def cleanup(self) -> None:
        """Remove what the last child's use left on the host (a job's cgroup and directory)."""

    def diagnostics(self) -> str:
        """What the zygote and its nsjail said, for the log and for sandbox errors."""
        said = self._stderr.decode("utf-8", "replace").strip()[-1500:]
        problems = nsjail_problems(self._nsjail_log.decode("utf-8", "replace"))
        return "; ".join(p for p in (problems, said) if p) or NO_MESSAGE

    def _gone(self, why: str) -> None:
        if not self.dead:
            self.dead = True
            # Only a death nobody asked for is news: close() ends every zygote.
            level = logging.DEBUG if self.closing else logging.WARNING
            log.log(level, "%s zygote %d is gone (%s): %s", self.kind, self.index, why, self.diagnostics())
            for queue in self.events.values():
                queue.put_nowait(None)

    async def _read_events(self) -> None:
        assert self.ctl is not None
        reader, _ = await asyncio.open_unix_connection(sock=self.ctl.dup())
        try:
            while True:
                size = size_of(await reader.readexactly(HEADER.size))
                event = json.loads(await reader.readexactly(size))
                queue = self.events.get(str(event.get("event"))) if isinstance(event, dict) else None
                if queue is None:
                    raise ValueError(f"unknown zygote event {event!r:.200}")
                queue.put_nowait(event)
        except (asyncio.IncompleteReadError, ConnectionError, ValueError) as exc:
            self._gone(f"its control socket closed: {exc.__class__.__name__}")

    async def _next(self, kind: str, timeout: float) -> dict[str, Any]:
        queue = self.events[kind]
        try:
            event = await asyncio.wait_for(queue.get(), timeout)
        except TimeoutError:
            self._gone(f"no {kind!r} event within {timeout:.0f} s")
            raise ZygoteGone(f"zygote {self.index} did not answer ({kind})") from None
        if event is None:
            queue.put_nowait(None)  # stays gone for later waiters
            raise ZygoteGone(f"zygote {self.index} died: {self.diagnostics()}")
        return event

    @staticmethod
    def _children(pid: int) -> list[int]:
        try:
            return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        except (OSError, ValueError):
            return []

    def _only_child(self, pid: int) -> int:
        children = self._children(pid)
        if len(children) != 1:
            raise ZygoteGone(f"zygote {self.index}: nsjail has {len(children)} children, expected 1")
        return children[0]

    def _host_pid(self, ns_pid: int) -> int:
        """The host pid of the zygote's child whose pid in the cage is *ns_pid*."""
        for pid in self._children(self.pid):
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("NSpid:") and line.split()[-1] == str(ns_pid):
                        return pid
            except OSError:
                continue
        raise ZygoteGone(f"zygote {self.index}: its child {ns_pid} is not there")

    async def arm(self) -> None:
        """Move the zygote's next child into a fresh job cgroup, then let it make its job's cage.

        The cgroup is :attr:`unarmed` until the child is armed: an error removes
        it at once; a stop that cancels the arming (while the child makes its
        namespaces, which a loaded host can stretch past a second) leaves it
        to :meth:`close`.
        """
        event = await self._next("prepared", EVENT_TIMEOUT_S)
        child = self._host_pid(int(event["pid"]))
        name = self.host.new_job_name()

        def make_cgroup() -> None:
            self.unarmed = self.child_cgroup(name)
            self.unarmed.attach(child)

        try:
            await to_the_end(make_cgroup)
            assert self.ctl is not None
            self.ctl.sendall(frame({"op": "arm"}))
            await self._next("armed", EVENT_TIMEOUT_S)
        except asyncio.CancelledError:
            # Killing the child now would end a zygote whose sessions live on
            # (a reload's old pool): close() removes it, once the zygote quits.
            raise
        except BaseException as exc:
            cg, self.unarmed = self.unarmed, None
            if cg is not None:
                await to_the_end(functools.partial(teardown, cg, None))
            if isinstance(exc, OSError):
                self._gone(f"arming failed: {exc}")
                raise ZygoteGone(f"zygote {self.index} is gone") from None
            raise
        assert self.unarmed is not None
        self.armed, self.unarmed = (name, self.unarmed), None

    async def next_ready(self) -> None:
        """After a child's use (a job, a session's open): clean up, and wait for (or start) the next arming."""
        await self.cleanup()
        task, self.arming = self.arming, None
        if task is not None:
            await task
        elif self.armed is None:
            await self.arm()

    async def close(self) -> None:
        self.closing = True
        if self.arming is not None:
            self.arming.cancel()
            await asyncio.gather(self.arming, return_exceptions=True)
            self.arming = None
        await self.cleanup()
        if self.ctl is not None and not self.dead:
            try:
                self.ctl.sendall(frame({"op": "quit"}))
            except OSError:
                pass
        if self.unarmed is not None:
            # A child whose arming was given up: the zygote's quit need not wait
            # until it has made its namespaces (see arm).
            cg, self.unarmed = self.unarmed, None
            await to_the_end(functools.partial(teardown, cg, None))
        if self.proc is not None:
            try:
                await asyncio.wait_for(asyncio.to_thread(self.proc.wait), 5)
            except TimeoutError:
                self.proc.kill()
                await asyncio.to_thread(self.proc.wait)
        for task in self._tasks:
            task.cancel()
        if self.ctl is not None:
            self.ctl.close()
        for cg in ([self.armed[1]] if self.armed else []) + ([self.cgroup] if self.cgroup else []):
            await to_the_end(functools.partial(teardown, cg, None))
        self.armed = None
        if self.spool is not None:
            await to_the_end(Workspace(self.spool).destroy)
            self.spool = None
        if self.lease is not None:
            self.lease.release()
            self.lease = None
        self.dead = True
