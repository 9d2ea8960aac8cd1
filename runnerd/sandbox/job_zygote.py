"""A job zygote, host side: a full or light zygote that runs one job at a time in its armed children.

Per job (:meth:`JobZygote.run`): the job's directory written into the
spool, the job and three fresh pipes sent over the control socket, the job
supervised like a cold cage (:func:`~.supervise.supervise`), its outputs
collected from the spool once every process of the job is dead; its cgroup
and directory removed by :meth:`JobZygote.cleanup`, off the result's path.
The zygote's cage and arming are :class:`~.zygotes.Zygote`'s.
"""

from __future__ import annotations

import asyncio
import functools
import socket
from pathlib import Path
from typing import Any

from ..config import Config
from ..errors import SandboxError
from ..result import Reason, Result
from .cgroups import JobCgroup
from .control import frame
from .host import HostState
from .job import JobSpec
from .output import StreamCapture
from .policy import Policy
from .runner import execute_and_collect, sandbox_failure, teardown
from .spool import SPOOL_BASE_BYTES, SPOOL_BASE_INODES
from .supervise import Execution, OnOutput, RunPipes, supervise
from .workspace import MplConfig, Workspace, job_size, resize_tmpfs
from .zygotes import NO_MESSAGE, Zygote, ZygoteGone, to_the_end

KILL_GRACE_S = 5.0
# Inputs below this are written on the event loop itself.
INLINE_BYTES = 1 << 20


class NotHandedOver(ZygoteGone):
    """The zygote was gone before it took the job: nothing of the job ran, it can go elsewhere."""


class JobZygote(Zygote):
    """A zygote whose children run jobs, one at a time."""

    def __init__(
        self, index: int, config: Config, policy: Policy, kafel: str, host: HostState, nsjail: Path, kind: str = "full"
    ) -> None:  # fmt: skip
        super().__init__(index, config, policy, kafel, host, nsjail, kind)
        # The last job's cgroup and directory, until cleanup() removes them.
        self._leftover: tuple[JobCgroup, Workspace | None] | None = None

    def spool_size(self) -> tuple[int, int]:
        # The largest job's directory fits.
        lim = self.config.limits
        return (
            lim.scratch_bytes + lim.max_files_bytes + lim.max_code_bytes + (8 << 20),
            lim.scratch_inodes + lim.max_files + 64,
        )

    def child_cgroup(self, name: str) -> JobCgroup:
        # The job's own memory, pids and CPU-time cgroup; its CPU quota is its
        # zygote's (one job at a time), which saves a v1 hierarchy per job.
        return self.host.cgroups.create(name, self.policy.limits, quota=False)

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
            await to_the_end(functools.partial(teardown, cg, ws, mounted=False))

    async def _execute(
        self, job: JobSpec, name: str, ws: Workspace, cg: JobCgroup, out: StreamCapture, err: StreamCapture,
        on_output: OnOutput | None, stop: asyncio.Future[Reason] | None,
    ) -> Execution:  # fmt: skip
        loop = asyncio.get_running_loop()
        assert self.ctl is not None
        pipes = RunPipes.open()
        out_r, err_r, rep_r = pipes.readers
        message = {
            "op": "run",
            "dir": name,
            "inputs": list(ws.input_names),
            "max_figures": self.config.limits.max_figures,
            "max_value": self.config.limits.max_value_chars,
        }
        try:
            socket.send_fds(self.ctl, [frame(message)], list(pipes.writers))
        except OSError as exc:
            pipes.close_readers()
            self._gone(f"sending it a job failed: {exc}")
            raise NotHandedOver(f"zygote {self.index} is gone") from None
        finally:
            pipes.close_writers()
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
