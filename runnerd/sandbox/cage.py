"""Run one job in one nsjail cage: from workspace to :class:`~runnerd.result.Result`.

Per job (the cold path; warm.py is the warm one, and shares the rest):

1. lease a slot (its uid), make the workspace (workspace.py) and the job's
   cgroup (cgroups.py);
2. start nsjail with ``--config /dev/fd/N`` (:func:`spawn_nsjail`): nsjail
   blocks reading the config pipe, so the host moves it into the job's
   cgroup *before* it can fork anything, then writes the checked policy text
   plus this job's mounts and uid map into the pipe;
3. :func:`supervise` reads stdout, stderr, the harness's report (and
   nsjail's log) as they come, capped, streaming stdout/stderr to
   ``on_output``, until the cage exits, the deadline passes, the output
   passes its kill limit, or ``stop`` fires;
4. kill whatever is left in the cgroup, read its counters, collect the
   outputs (artifacts.py), unmount, and decide the outcome
   (:func:`build_result`, result.py).

The daemon is never the parent of user code through a fork of itself: the
cage is a fresh nsjail process started with ``subprocess`` (vfork+exec).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import os
import signal
import socket
import subprocess
from pathlib import Path

from .. import incage
from ..config import Config
from ..errors import SandboxError
from ..result import Reason, Result
from .cgroups import CgroupLimits, JobCgroup
from .host import HostState, SlotLease
from .job import InputFile, JobSpec
from .nsjail import MAX_LOG_BYTES, nsjail_fault, nsjail_status, pb_bind, pb_idmaps, spawn_nsjail
from .output import StreamCapture
from .policy import Policy, nsjail_problems
from .runner import execute_and_collect, sandbox_failure, teardown
from .sandbox_env import MPLCONFIG
from .session import Session
from .session_cage import SESSION_HOME, SessionCage, session_figures
from .session_start import start_session
from .shape import INCAGE_DIR, CageShape
from .supervise import Execution, OnOutput, RunPipes, capped, read_pipe, supervise, watch_exit
from .workspace import MplConfig, Workspace, mount_tmpfs

log = logging.getLogger(__name__)


HARNESS_IN_CAGE = f"{INCAGE_DIR}/harness.py"
SESSION_IN_CAGE = f"{INCAGE_DIR}/session.py"

# nsjail itself stays in a cold job's cgroup, as the cage's parent, for the
# whole job: it is moved in before it forks, so nothing of the cage escapes
# the count. The policy's cgroup_pids_max is the job's own processes and
# threads, its PID 1 (the harness's init) included, which is what a warm
# job's cgroup counts (its init G, the user's process, what that starts);
# nsjail's one task comes on top, or a cold job could start one child fewer.
NSJAIL_TASKS = 1


def cold_cgroup_limits(policy_limits: CgroupLimits) -> CgroupLimits:
    """The cgroup limits of a cold job: the policy's, plus room for nsjail itself."""
    return dataclasses.replace(policy_limits, pids=policy_limits.pids + NSJAIL_TASKS)


def session_scratch(ws: Workspace) -> Path:
    """A cold session's /work: a tmpfs inside its workspace's work dir (see Cage.open_session)."""
    return ws.work / "scratch"


def job_config(
    policy: Policy, shape: CageShape, ws: Workspace, *, uid: int, env: Path, harness_dir: Path, session: bool = False
) -> str:
    """The policy's text plus this job's uid map and mounts (repeated fields, appended).

    A *session* has no code file (its runs come over its control socket),
    and its inputs are written into its /work as they come (session.py).
    """
    lines = ["", "# ---- added by runnerd for this job ----", *pb_idmaps(uid)]
    lines.append(pb_bind(env, str(env), noexec=False))
    lines.append(pb_bind(session_scratch(ws) if session else ws.work, shape.work, rw=True))
    for index, name in enumerate(ws.input_names):
        lines.append(pb_bind(ws.inputs / str(index), f"{shape.work}/{name}"))
    lines.append(pb_bind(ws.home, shape.home, rw=True))
    lines.append(pb_bind(ws.figures, shape.figures, rw=True))
    if not session:
        lines.append(pb_bind(ws.code_file, shape.code))
    for name in incage.COLD_FILES:
        lines.append(pb_bind(harness_dir / name, f"{INCAGE_DIR}/{name}"))
    return policy.cfg_text + "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the cold cage


class Cage:
    """Runs jobs, one nsjail each. Safe to use from one event loop for many jobs at once."""

    def __init__(self, config: Config, policy: Policy, host: HostState, nsjail: Path) -> None:
        self.config = config
        self.policy = policy
        self.host = host
        self.nsjail = nsjail
        self.env = config.sandbox_env
        self.mplconfig = MplConfig.load(self.env / MPLCONFIG)
        self.shape = policy.shape()

    async def close(self, grace: float = 0.0) -> None:
        """Nothing to stop: cold cages live only as long as their job."""

    async def open_session(self, session_id: str, files: tuple[InputFile, ...]) -> Session:
        """A session in a cage of its own: nsjail running incage/session.py until the session ends."""
        name = self.host.new_job_name()
        limits = self.config.limits
        lease = self.host.lease_slot()
        ws: Workspace | None = None
        cg: JobCgroup | None = None
        proc: subprocess.Popen[bytes] | None = None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        said = bytearray()
        nsjail_log = bytearray()
        unread: list[int] = []
        cage: SessionCage | None = None

        async def end() -> None:
            # nsjail is in the session's cgroup: killing the cgroup (thawed first) ends it too.
            if cg is not None:
                await asyncio.to_thread(cg.kill)
            if proc is not None:
                if proc.poll() is None:
                    proc.kill()
                await asyncio.to_thread(proc.wait)
            await asyncio.to_thread(teardown, cg, ws, lease)

        def diagnostics() -> str:
            problems = nsjail_problems(nsjail_log.decode("utf-8", "replace"))
            return "; ".join(p for p in (problems, said.decode("utf-8", "replace").strip()[-1500:]) if p)

        try:
            ws = await asyncio.to_thread(
                Workspace.create, self.config.jobs_dir, name, JobSpec(code=""),
                # Beside /work (a tmpfs of its own, below): home and the figures of a run.
                uid=lease.uid, gid=lease.uid, scratch_bytes=SESSION_HOME[0] + session_figures(limits)[0],
                scratch_inodes=SESSION_HOME[1] + session_figures(limits)[1], mplconfig=self.mplconfig,
            )  # fmt: skip
            # /work a tmpfs of its own, as a warm session's: root's and sticky (1777),
            # so the inputs the host writes into it are not the session's to change. It is
            # mounted inside the workspace's work dir (the jailed uid's, 0700): no other
            # user of the host can reach a directory anyone may write to.
            scratch = session_scratch(ws)
            scratch.mkdir(mode=0o700)
            await asyncio.to_thread(mount_tmpfs, scratch, limits.scratch_bytes, limits.scratch_inodes, 0o1777)
            cg = self.host.cgroups.create(name, cold_cgroup_limits(self.policy.limits), freezer=True)
            out_r, out_w = os.pipe()
            log_r, log_w = os.pipe()
            unread = [out_r, log_r]  # closed here if nsjail does not start; by read_pipe once read
            config = job_config(
                self.policy, self.shape, ws, uid=lease.uid, env=self.env, harness_dir=self.config.harness_dir,
                session=True,
            )  # fmt: skip
            try:
                proc = spawn_nsjail(
                    self.nsjail, config, self.policy.kafel_text, cg,
                    # The host ends a session: no time limit of nsjail's own.
                    # No CPU-time rlimit either: its process lives across its runs, and it
                    # would add up over all of them (each run has its wall clock; the cgroup
                    # its CPU quota).
                    args=("--time_limit", "0", "--rlimit_cpu", "inf"),
                    command=[str(self.env / "bin" / "python3"), "-I", "-B", "-u", SESSION_IN_CAGE,
                             str(theirs.fileno()), str(limits.max_figures), str(limits.max_value_chars)],
                    stdout=out_w, stderr=out_w, log_w=log_w, pass_fds=(theirs.fileno(),),
                )  # fmt: skip
            finally:
                os.close(out_w)
                os.close(log_w)
            loop = asyncio.get_running_loop()
            read_pipe(loop, out_r, capped(said, MAX_LOG_BYTES))
            read_pipe(loop, log_r, capped(nsjail_log, MAX_LOG_BYTES))
            unread.clear()
            cage = SessionCage(cgroup=cg, ctl=ours, work_fd=-1, figures_fd=-1, end=end, diagnostics=diagnostics)
            flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
            cage.work_fd = os.open(scratch, flags)
            cage.figures_fd = os.open(ws.figures, flags)
        except BaseException:
            for fd in unread:
                os.close(fd)
            if cage is not None:
                cage.close_fds()
            ours.close()
            await end()
            raise
        finally:
            theirs.close()
        return await start_session(session_id, cage, self.config, self.policy, files)

    async def run(
        self,
        job: JobSpec,
        *,
        on_output: OnOutput | None = None,
        stop: asyncio.Future[Reason] | None = None,
        name: str | None = None,
        job_id: str | None = None,
    ) -> Result:
        """Run *job*; always returns a Result (a host-side failure is reason sandbox_error).

        *stop*, when it gets a result (``Reason.CANCELLED`` or
        ``Reason.SHUTDOWN``), kills the cage and ends the job with that reason.
        *name* names the job's host resources (cgroup, directory); *job_id*,
        the client's id, names it in the log (the name when there is none).
        """
        name = name or self.host.new_job_name()
        label = job_id or name
        lease: SlotLease | None = None
        ws: Workspace | None = None
        cg: JobCgroup | None = None
        limits = self.config.limits
        try:
            lease = self.host.lease_slot()
            ws = await asyncio.to_thread(
                Workspace.create, self.config.jobs_dir, name, job,
                uid=lease.uid, gid=lease.uid, scratch_bytes=limits.scratch_bytes,
                scratch_inodes=limits.scratch_inodes, mplconfig=self.mplconfig,
            )  # fmt: skip
            cg = self.host.cgroups.create(name, cold_cgroup_limits(self.policy.limits))
            uid, job_ws, job_cg = lease.uid, ws, cg
            result = await execute_and_collect(
                lambda out, err: self._execute(job, job_ws, job_cg, uid, out, err, on_output, stop),
                ws, config=self.config, policy=self.policy, label=label,
            )  # fmt: skip
        except SandboxError as exc:
            result = sandbox_failure(label, exc)
        finally:
            await asyncio.shield(asyncio.to_thread(teardown, cg, ws, lease))
        return result

    async def _execute(
        self,
        job: JobSpec,
        ws: Workspace,
        cg: JobCgroup,
        uid: int,
        out: StreamCapture,
        err: StreamCapture,
        on_output: OnOutput | None,
        stop: asyncio.Future[Reason] | None,
    ) -> Execution:
        loop = asyncio.get_running_loop()
        limits = self.config.limits
        pipes = RunPipes.open()
        out_r, err_r, rep_r = pipes.readers
        out_w, err_w, rep_w = pipes.writers
        try:
            log_r, log_w = os.pipe()  # nsjail's own
        except OSError:
            pipes.close_readers()
            pipes.close_writers()
            raise
        try:
            proc = spawn_nsjail(
                self.nsjail,
                job_config(self.policy, self.shape, ws, uid=uid, env=self.env, harness_dir=self.config.harness_dir),
                self.policy.kafel_text,
                cg,
                # A backstop: the host kills the cage at the deadline itself.
                args=("--time_limit", str(math.ceil(job.timeout) + 5)),
                command=[str(self.env / "bin" / "python3"), "-I", "-B", "-u", HARNESS_IN_CAGE,
                         str(rep_w), str(limits.max_figures), str(limits.max_value_chars)],  # fmt: skip
                stdout=out_w, stderr=err_w, log_w=log_w, pass_fds=(rep_w,),
            )  # fmt: skip
        except SandboxError:
            pipes.close_readers()
            os.close(log_r)
            raise
        finally:
            pipes.close_writers()
            os.close(log_w)

        exited = watch_exit(loop, proc.pid)

        async def kill() -> None:
            proc.send_signal(signal.SIGKILL)

        nsjail_log = bytearray()
        try:
            ex = await supervise(
                exited=exited, kill=kill, out_r=out_r, err_r=err_r, rep_r=rep_r,
                extra=[(log_r, capped(nsjail_log, MAX_LOG_BYTES))], out=out, err=err, timeout=job.timeout,
                output_kill_bytes=self.config.limits.output_kill_bytes, on_output=on_output, stop=stop,
            )  # fmt: skip
        finally:
            returncode = proc.wait()
            # Anything still in the cgroup (nothing, normally: PID 1's death
            # ends the pid namespace) dies now.
            await asyncio.shield(asyncio.to_thread(cg.kill))
        text = nsjail_log.decode("utf-8", "replace")
        ex.status = nsjail_status(text, returncode, ex.report.started)
        ex.problem = nsjail_problems(text)
        if ex.status is None and ex.stop_reason is None and ex.report.started:
            ex.cage_fault = nsjail_fault(returncode, ex.problem)
        ex.stats = cg.stats()
        return ex
