"""One zygote, host side: its cage, its control socket, its spool, and each job it runs.

A :class:`Zygote` starts ``incage/zygote.py`` in an nsjail cage of its own
(the job's policy less what a child lifts: policy.zygote_kafel), keeps its next child armed (prepared in
fresh namespaces, already in the cgroup of the job it will run), and runs
one job at a time: the job's directory written into the spool, the job and
three fresh pipes sent over the control socket, the job supervised like a
cold cage (:func:`~.supervise.supervise`), its outputs collected from the
spool once every process of the job is dead. The pool is :mod:`.warm`.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import secrets
import socket
import struct
from pathlib import Path
from typing import Any

from .. import incage
from ..config import Config
from ..errors import SandboxError
from ..result import Reason, Result
from .cgroups import CgroupLimits, JobCgroup
from .host import HostState, SlotLease
from .job import InputFile, JobSpec
from .nsjail import MAX_LOG_BYTES, pb_bind, pb_idmaps, spawn_nsjail
from .output import StreamCapture
from .policy import Policy, nsjail_problems
from .runner import execute_and_collect, sandbox_failure, teardown
from .sandbox_env import MPLCONFIG
from .session import Session, start_session
from .session_cage import SESSION_HOME, SessionCage, session_figures
from .shape import INCAGE_DIR
from .spool import PLACEHOLDER, SPOOL_BASE_BYTES, SPOOL_BASE_INODES, mount_spool
from .supervise import Execution, OnOutput, capped, read_pipe, supervise, watch_exit
from .workspace import MplConfig, Workspace, detached_tmpfs, job_size, resize_tmpfs

log = logging.getLogger(__name__)

ZYGOTE_IN_CAGE = f"{INCAGE_DIR}/zygote.py"
WARM_TIMEOUT_S = 180.0  # imports on a cold disk cache can take a while
EVENT_TIMEOUT_S = 30.0  # a prepared child, an exit after a kill
KILL_GRACE_S = 5.0
# Inputs below this are written on the event loop itself.
INLINE_BYTES = 1 << 20
# The zygote itself: its interpreter, nsjail, and a child before it moves out.
ZYGOTE_PIDS = 32
NO_MESSAGE = "no message"


def _frame(message: dict[str, Any]) -> bytes:
    body = json.dumps(message).encode()
    return struct.pack(">I", len(body)) + body


class ZygoteGone(SandboxError):
    """The zygote died or stopped answering."""


class NotHandedOver(ZygoteGone):
    """The zygote was gone before it took the job: nothing of the job ran, it can go elsewhere."""


class Zygote:
    """One warm slot."""

    def __init__(
        self, index: int, config: Config, policy: Policy, kafel: str, host: HostState, nsjail: Path, kind: str = "full"
    ) -> None:  # fmt: skip
        self.index = index
        # "session": a full zygote whose children go to sessions, not jobs.
        self.for_sessions = kind == "session"
        self.kind = "full" if self.for_sessions else kind
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
        self.spool: Path | None = None
        self._leftover: tuple[JobCgroup, Workspace | None] | None = None
        self.dead = False
        self.closing = False  # set by close(): its end from then on is on purpose
        self.warm_ms = 0.0
        # Sessions whose processes live in this zygote's cage (they die with it).
        self.live_sessions = 0
        self.sessions_done = asyncio.Event()
        self.sessions_done.set()
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
        self.cgroup = await asyncio.to_thread(
            self.host.cgroups.create, name, CgroupLimits(limits.memory_bytes, ZYGOTE_PIDS, limits.cpu_ms_per_sec)
        )
        lim = self.config.limits
        self.spool = self.config.jobs_dir / name
        if self.for_sessions:
            # A session's files are in tmpfs mounts of their own: nothing comes through the spool.
            size, inodes = SPOOL_BASE_BYTES, SPOOL_BASE_INODES
        else:
            size = lim.scratch_bytes + lim.max_files_bytes + lim.max_code_bytes + (8 << 20)
            inodes = lim.scratch_inodes + lim.max_files + 64
        await asyncio.to_thread(mount_spool, self.spool, size, inodes)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        err_r, err_w = os.pipe()
        log_r, log_w = os.pipe()
        try:
            self.proc = await asyncio.to_thread(
                spawn_nsjail, self.nsjail, self._cage_config(self.lease.uid, self.spool), self.kafel, self.cgroup,
                # No CPU rlimit for the zygote itself: it counts the zygote's own
                # CPU time over every job it serves. Each child sets the job's.
                args=("--time_limit", "0", "--proc_rw", "--rlimit_cpu", "inf"),
                command=[str(self.env / "bin" / "python3"), "-I", "-B", "-u", ZYGOTE_IN_CAGE,
                         str(theirs.fileno()), str(self.env / MPLCONFIG), self.kind,
                         self.shape.for_zygote()],  # fmt: skip
                stdout=err_w, stderr=err_w, log_w=log_w, pass_fds=(theirs.fileno(),),
            )  # fmt: skip
        finally:
            theirs.close()
            os.close(err_w)
            os.close(log_w)
        self.ctl = ours
        read_pipe(loop, err_r, capped(self._stderr, MAX_LOG_BYTES))
        read_pipe(loop, log_r, capped(self._nsjail_log, MAX_LOG_BYTES))
        self._tasks.append(asyncio.create_task(self._read_events(), name=f"runnerd-zygote-{self.index}"))
        exited = watch_exit(loop, self.proc.pid)
        exited.add_done_callback(lambda _: self._gone("its cage exited"))
        event = await self._next("warm", WARM_TIMEOUT_S)
        self.warm_ms = float(event.get("ms", 0))
        self.pid = self._only_child(self.proc.pid)
        await self.arm()
        log.info("%s zygote %d ready (pid %d, warmed in %.0f ms)", self.kind, self.index, self.pid, self.warm_ms)

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
                head = await reader.readexactly(4)
                (size,) = struct.unpack(">I", head)
                if size > 1 << 20:
                    raise ValueError(f"zygote message of {size} bytes")
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
        """Move the zygote's next child into a fresh job cgroup, then let it make its job's cage."""
        event = await self._next("prepared", EVENT_TIMEOUT_S)
        child = self._host_pid(int(event["pid"]))
        name = self.host.new_job_name()
        # The job's own memory, pids (and CPU-time) cgroup; its CPU quota is
        # its zygote's (one job at a time), which saves a v1 hierarchy per job.
        # A session zygote's children live on side by side: each has a quota of its own.
        sessions = self.for_sessions
        cg = await asyncio.to_thread(
            functools.partial(self.host.cgroups.create, name, self.policy.limits, quota=sessions, freezer=sessions)
        )
        try:
            await asyncio.to_thread(cg.attach, child)
            assert self.ctl is not None
            self.ctl.sendall(_frame({"op": "arm"}))
            await self._next("armed", EVENT_TIMEOUT_S)
        except (SandboxError, OSError) as exc:
            await asyncio.to_thread(teardown, cg, None)
            if isinstance(exc, OSError):
                self._gone(f"arming failed: {exc}")
                raise ZygoteGone(f"zygote {self.index} is gone") from None
            raise
        self.armed = (name, cg)

    async def next_ready(self) -> None:
        """After a job: tear it down, and wait for (or start) the arming of the next child."""
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
                self.ctl.sendall(_frame({"op": "quit"}))
            except OSError:
                pass
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
            await asyncio.to_thread(teardown, cg, None)
        self.armed = None
        if self.spool is not None:
            await asyncio.to_thread(Workspace(self.spool).destroy)
            self.spool = None
        if self.lease is not None:
            self.lease.release()
            self.lease = None
        self.dead = True

    # ------------------------------------------------------------ a session

    async def open_session(self, session_id: str, files: tuple[InputFile, ...]) -> Session:
        """Give the armed child to a session: its own /work (a tmpfs of the host's, attached by G), home, figures."""
        assert self.armed is not None and self.ctl is not None
        name, cg = self.armed
        self.armed = None
        lim = self.config.limits

        async def end() -> None:
            try:
                await asyncio.to_thread(teardown, cg, None)
            finally:
                self.live_sessions -= 1
                if not self.live_sessions:
                    self.sessions_done.set()

        self.live_sessions += 1
        self.sessions_done.clear()
        work = -1
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # Root's with the sticky bit: the inputs the host writes into it stay as they are.
            work = detached_tmpfs(lim.scratch_bytes, lim.scratch_inodes, 0o1777)
            order = {
                "op": "open",
                "home": SESSION_HOME,
                "figures": session_figures(lim),
                "max_figures": lim.max_figures,
                "max_value": lim.max_value_chars,
            }
            socket.send_fds(self.ctl, [_frame(order)], [theirs.fileno(), work])
        except (OSError, SandboxError) as exc:
            ours.close()
            if work >= 0:
                os.close(work)
            await end()
            self._gone(f"giving it a session failed: {exc}")
            raise ZygoteGone(f"zygote {self.index} is gone") from None
        finally:
            theirs.close()
        self.arming = asyncio.create_task(self.arm(), name=f"runnerd-arm-session-{self.index}")

        def diagnostics() -> str:
            said = self.diagnostics()
            return "" if said == NO_MESSAGE else said

        cage = SessionCage(cgroup=cg, ctl=ours, work_fd=work, figures_fd=-1, end=end, diagnostics=diagnostics)
        return await start_session(session_id, cage, self.config, self.policy, files)

    # ------------------------------------------------------------ a job

    async def run(
        self, job: JobSpec, *, on_output: OnOutput | None, stop: asyncio.Future[Reason] | None, job_id: str | None,
    ) -> Result:  # fmt: skip
        assert self.armed is not None and self.lease is not None and self.ctl is not None
        assert self.spool is not None
        name, cg = self.armed
        label = job_id or name
        self.armed = None
        limits = self.config.limits
        ws: Workspace | None = None
        try:
            # The spool holds one job at a time: give it exactly this job's size,
            # as a cold cage's own tmpfs would have.
            size, inodes = job_size(job, limits.scratch_bytes, limits.scratch_inodes, MplConfig())
            # Microseconds of work for a small job: a thread hop would cost more.
            resize_tmpfs(self.spool, size + SPOOL_BASE_BYTES, inodes + SPOOL_BASE_INODES)
            make_ws = functools.partial(
                Workspace.create, self.spool, name, job, uid=self.lease.uid, gid=self.lease.uid,
                scratch_bytes=limits.scratch_bytes, scratch_inodes=limits.scratch_inodes,
                # the zygote has Matplotlib loaded already: no font cache to copy
                mplconfig=MplConfig(), mount=False,
            )  # fmt: skip
            ws = make_ws() if job.files_bytes < INLINE_BYTES else await asyncio.to_thread(make_ws)
            job_ws = ws
            return await execute_and_collect(
                lambda out, err: self._execute(job, name, job_ws, cg, out, err, on_output, stop),
                ws, config=self.config, policy=self.policy, label=label,
            )  # fmt: skip
        except NotHandedOver:
            raise
        except SandboxError as exc:
            return sandbox_failure(label, exc)
        finally:
            # Torn down by the slot's recycle step, after the result is on its way.
            self._leftover = (cg, ws)

    async def cleanup(self) -> None:
        """Remove the last job's cgroup (killing its last process, G) and its directory."""
        if self._leftover is not None:
            cg, ws = self._leftover
            self._leftover = None
            await asyncio.shield(asyncio.to_thread(functools.partial(teardown, cg, ws, mounted=False)))

    async def _execute(
        self, job: JobSpec, name: str, ws: Workspace, cg: JobCgroup, out: StreamCapture, err: StreamCapture,
        on_output: OnOutput | None, stop: asyncio.Future[Reason] | None,
    ) -> Execution:  # fmt: skip
        loop = asyncio.get_running_loop()
        assert self.ctl is not None
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        rep_r, rep_w = os.pipe()
        message = {
            "op": "run",
            "dir": name,
            "inputs": list(ws.input_names),
            "max_figures": self.config.limits.max_figures,
            "max_value": self.config.limits.max_value_chars,
        }
        try:
            socket.send_fds(self.ctl, [_frame(message)], [out_w, err_w, rep_w])
        except OSError as exc:
            for fd in (out_r, err_r, rep_r):
                os.close(fd)
            self._gone(f"sending it a job failed: {exc}")
            raise NotHandedOver(f"zygote {self.index} is gone") from None
        finally:
            for fd in (out_w, err_w, rep_w):
                os.close(fd)
        # The zygote prepares the next child while this job runs.
        self.arming = asyncio.create_task(self.arm(), name=f"runnerd-arm-{self.kind}-{self.index}")

        exit_event: asyncio.Future[dict[str, Any]] = loop.create_future()

        async def wait_exit() -> None:
            try:
                exit_event.set_result(await self._next("exit", job.timeout + 3600))
            except ZygoteGone as exc:
                exit_event.set_exception(exc)

        waiter = asyncio.create_task(wait_exit())
        exited: asyncio.Future[None] = loop.create_future()

        def settle(_: object) -> None:
            if not exited.done():
                exited.set_result(None)

        exit_event.add_done_callback(settle)

        async def kill() -> None:
            await asyncio.to_thread(cg.kill)
            try:
                await asyncio.wait_for(asyncio.shield(exit_event), KILL_GRACE_S)
            except (TimeoutError, ZygoteGone):
                self._gone("no exit report after the job was killed")

        try:
            ex = await supervise(
                exited=exited, kill=kill, out_r=out_r, err_r=err_r, rep_r=rep_r, out=out, err=err,
                timeout=job.timeout, output_kill_bytes=self.config.limits.output_kill_bytes,
                on_output=on_output, stop=stop,
            )  # fmt: skip
        finally:
            # Nothing of the job runs any more but G (which killed the rest before it
            # reported); the cleanup step removes the cgroup, and G, off the result's path.
            waiter.cancel()
        if exit_event.done() and not exit_event.cancelled() and exit_event.exception() is None:
            event = exit_event.result()
            ex.status = -int(event["signal"]) if "signal" in event else int(event.get("code", -1))
        else:
            ex.status = None
            if ex.stop_reason is None:
                if not ex.report.started:
                    # A zygote being killed still takes a message until its
                    # (slow) exit closes its socket; its G never said "start",
                    # so nothing of the job ran: it can go elsewhere.
                    raise NotHandedOver(f"zygote {self.index} died before the job started")
                # The job ran: its result (sandbox_error, with its output and
                # usage so far) comes from build_result, like a cold cage's.
                said = self.diagnostics()
                ex.cage_fault = f"zygote {self.index} died during the job" + (f": {said}" if said != NO_MESSAGE else "")
        if ex.status == 125:
            # G could not set the job up (zygote.py); it said why on its own
            # stderr, which is the zygote's, not the job's.
            ex.problem = self.diagnostics()
        if ex.cage_fault:
            # No G reaped the job: its processes may outlive the zygote for a
            # moment. None may run while the outputs are collected.
            await asyncio.to_thread(cg.kill)
        ex.stats = cg.stats()  # a few small reads
        return ex
