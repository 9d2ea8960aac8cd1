"""Sessions, host side: one cage that keeps its interpreter between runs; the third :class:`~.runner.Runner`.

A session's cage is made from the same shape as a job's, by the cold cage
(:meth:`~.cage.Cage.open_session`: nsjail running incage/session.py) or by
a warm zygote (:meth:`~.zygotes.Zygote.open_session`: an armed child given
to the session). Either way the host ends up with a :class:`SessionCage`:
the session's own cgroup (memory, pids, freezer), the control socket to
its process, and directory fds of its /work and figures dir.

Per run (:meth:`Session.run`): the run's inputs go into the session's
/work, root's and read-only (/work is root's, sticky), the cgroup is thawed, the run is sent with three fresh
pipes and supervised like a job (:func:`~.supervise.supervise`); when the
session says ``done`` the cgroup is frozen again, so nothing the session
started runs or prints until its next run, and the outputs this run made
or changed are collected while nothing can touch them. At the deadline or
on cancel the run gets SIGINT (``KeyboardInterrupt``); a session that does
not stop within ``session_interrupt_grace_s`` is killed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import signal
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from ..config import Config
from ..errors import JobRejected, SandboxError
from ..result import Outcome, Reason, Result, SessionEnd, SessionState
from .artifacts import Collected, collect
from .cgroups import FREEZE_TIMEOUT_S, CgroupStats, JobCgroup, wait_for
from .control import frame
from .job import InputFile, JobSpec
from .output import StreamCapture
from .policy import Policy
from .report import small_int
from .runner import execute_and_collect, sandbox_failure
from .session_cage import (
    MAX_EVENTS_PER_RUN,
    Control,
    Dirs,
    SessionCage,
    Snapshot,
    code_file,
    snapshot,
    write_inputs,
)
from .supervise import Execution, OnOutput, RunPipes, supervise
from .workspace import resize_tmpfs_fd

log = logging.getLogger(__name__)

SESSION_PEAK_WARNING = (
    "usage.max_rss_bytes is the session's peak since it opened: this kernel cannot start a cgroup's peak over"
)
# What a tmpfs may take beyond a file's bytes (its last page): /work grows by it per input.
INPUT_SLACK_BYTES = 4096


@dataclass
class _RunState:
    done: asyncio.Future[None]
    running: asyncio.Future[None]  # the session took the order: a SIGINT from now on reaches the run
    exit_event: dict[str, Any] | None = None


@dataclass
class Session:
    """One open session: a Runner whose runs share one interpreter. Not thread-safe; one run at a time."""

    id: str
    cage: SessionCage
    config: Config
    policy: Policy
    control: Control
    user_pidfd: int  # U, as the host sees it: SIGINT goes there, and its exit shows there
    input_names: set[str] = field(default_factory=set)
    input_bytes: int = 0
    baseline: Snapshot = field(default_factory=dict)
    ended: SessionEnd | None = None
    runs: int = 0
    on_end: Callable[[Session, SessionEnd], None] | None = None
    _run: _RunState | None = None
    _watch: asyncio.Task[None] | None = None
    _killing: SessionEnd | None = None  # why the host is killing it, once it is
    _teardown: asyncio.Future[None] | None = None

    @property
    def alive(self) -> bool:
        return self.ended is None

    def start_watching(self) -> None:
        """Between runs too: a session whose process ends (killed from outside) ends at once."""
        self._watch = asyncio.create_task(self._watch_control(), name=f"runnerd-session-{self.id}")

    async def _watch_control(self) -> None:
        while True:
            event = await self.control.next()
            run = self._run
            if event is None:
                if run is not None:
                    # The run in progress ends the session itself, once it has read the counters.
                    if not run.done.done():
                        run.done.set_result(None)
                elif self.ended is None:
                    await self._finish(self.end_reason(None))
                return
            kind = event.get("event")
            if kind == "exit" and run is not None:
                run.exit_event = event
            elif kind == "done" and run is not None and not run.done.done():
                run.done.set_result(None)
            elif kind == "running" and run is not None and not run.running.done():
                run.running.set_result(None)

    def end_reason(self, exit_event: dict[str, Any] | None) -> SessionEnd:
        if self._killing is not None:
            return self._killing
        if self.control.broken:
            return SessionEnd.EXITED  # its code broke the control protocol: killed, the code's doing
        if self.cage.cgroup.stats().oom_kills:
            return SessionEnd.MEMORY_LIMIT
        return SessionEnd.EXITED if exit_event is not None else SessionEnd.SANDBOX_ERROR

    async def _finish(self, reason: SessionEnd) -> None:
        """End the session for *reason* (the first caller's), and wait until its cage is gone.

        The teardown is a task of its own: whoever started it may be
        cancelled (the watcher, by end()), the teardown still runs to the end.
        """
        if self._teardown is None:
            self.ended = reason
            self.control.close()
            if self._run is not None and not self._run.done.done():
                self._run.done.set_result(None)  # the run in progress ends with the session
            self._teardown = asyncio.ensure_future(self._tear_down(reason))
        await asyncio.shield(self._teardown)

    async def _tear_down(self, reason: SessionEnd) -> None:
        # Told first: from now on its runs are refused and the end's reason is this one.
        if self.on_end is not None:
            self.on_end(self, reason)
        try:
            await self.cage.end()
        finally:
            self.cage.close_fds()
            os.close(self.user_pidfd)
            self.give_back_inputs()

    def give_back_inputs(self) -> None:
        """The inputs' pages are gone with the session's /work: the sessions' budget has them again."""
        budget = self.cage.cgroup.budget
        if budget is not None and self.input_bytes:
            budget.release(self.input_bytes)
        self.input_bytes = 0

    # ------------------------------------------------------------ Runner

    def check_inputs(self, files: Iterable[InputFile]) -> None:
        """JobRejected naming the first input this session already has (or that would pass its input budget)."""
        total = self.input_bytes
        count = len(self.input_names)
        limits = self.config.limits
        for f in files:
            if f.name in self.input_names:
                raise JobRejected(f"session {self.id!r} already has an input file {f.name!r}")
            total += len(f.data)
            count += 1
        if total > limits.max_files_bytes:
            raise JobRejected(
                f"session {self.id!r}: its input files would add up to {total} bytes; "
                f"the limit for a session is {limits.max_files_bytes}",
                code="TOO_LARGE",
            )
        if count > limits.max_files:
            raise JobRejected(f"session {self.id!r}: more than {limits.max_files} input files", code="TOO_LARGE")

    def add_inputs(self, files: tuple[InputFile, ...], dirs: Dirs) -> None:
        """Write this run's inputs into /work (the session is frozen); JobRejected if /work has one of the names.

        /work grows by their size first: its scratch space stays the same.
        Their pages are charged to the daemon, not the session's cgroup: the
        sessions' budget gives them up first (:meth:`~.cgroups.SessionBudget.reserve`).
        """
        self.check_inputs(files)
        if not files:
            return
        for f in files:
            try:
                os.stat(f.name, dir_fd=dirs.work_fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            raise JobRejected(f"session {self.id!r} already has a file {f.name!r} in /work (written by a run)")
        limits = self.config.limits
        added = sum(len(f.data) for f in files)
        total = self.input_bytes + added
        count = len(self.input_names) + len(files)
        budget = self.cage.cgroup.budget
        if budget is not None:
            budget.reserve(added)  # JobRejected (BUSY) when the sessions' memory cannot give it up
        try:
            room = total + count * INPUT_SLACK_BYTES  # a tmpfs counts whole pages
            resize_tmpfs_fd(dirs.work_fd, limits.scratch_bytes + room, limits.scratch_inodes + count)
            write_inputs(dirs.work_fd, files)
        except OSError as exc:
            raise SandboxError(f"cannot write the session's input files: {exc}") from None
        finally:
            self.input_bytes = total  # reserved: given back when the session ends, whatever was written
        for f in files:
            self.input_names.add(f.name)

    async def run(
        self, job: JobSpec, *, on_output: OnOutput | None = None, stop: asyncio.Future[Reason] | None = None,
        name: str | None = None, job_id: str | None = None,
    ) -> Result:  # fmt: skip
        """Run *job* in this session; JobRejected (before anything ran) for an input name it already has."""
        label = job_id or name or self.id
        if self.ended is not None:
            return self._with_state(
                Result(
                    outcome=Outcome.FAILED,
                    reason=Reason.SANDBOX_ERROR,
                    warnings=(f"session ended: {self.ended.value}",),
                )
            )
        cg = self.cage.cgroup
        try:
            with self.cage.hold() as dirs:
                if job.files:
                    await asyncio.to_thread(self.add_inputs, job.files, dirs)
                before = cg.stats()
                per_run_peak = cg.reset_peak()
                cg.thaw()
                self.runs += 1
                result = await execute_and_collect(
                    lambda out, err: self._execute(job, out, err, on_output, stop, before),
                    None, config=self.config, policy=self.policy, label=label,
                    outputs=lambda: self._collect(dirs),
                )  # fmt: skip
        except JobRejected:
            raise  # nothing ran: the session is as it was (frozen)
        except Exception as exc:
            # The host could not do its part (an input, the freezer, a bug): whatever
            # state the session is in, it cannot go on safely, and nothing of it stays.
            if not isinstance(exc, SandboxError):
                log.exception("session %s: run %s failed on the host", self.id, label)
            await self._finish(SessionEnd.SANDBOX_ERROR)
            return self._with_state(sandbox_failure(label, exc))
        if not per_run_peak:
            result = replace(
                result,
                usage=replace(result.usage, peak_of="session"),
                warnings=(*result.warnings, SESSION_PEAK_WARNING),
            )
        return self._with_state(result)

    def _with_state(self, result: Result) -> Result:
        return replace(result, session=SessionState(id=self.id, alive=self.alive, ended=self.ended))

    def _collect(self, dirs: Dirs) -> Collected:
        if self.ended is not None:
            return Collected()
        before = self.baseline
        after = snapshot(dirs.work)
        self.baseline = after
        unchanged = frozenset(path for path, key in after.items() if before.get(path) == key)
        return collect(
            dirs.work, dirs.figures, exclude=frozenset(self.input_names), limits=self.config.limits, skip=unchanged
        )

    async def _execute(
        self, job: JobSpec, out: StreamCapture, err: StreamCapture, on_output: OnOutput | None,
        stop: asyncio.Future[Reason] | None, before: CgroupStats,
    ) -> Execution:  # fmt: skip
        loop = asyncio.get_running_loop()
        cg = self.cage.cgroup
        # The order is a few bytes, and the code a sealed file of its own: the send
        # never waits on the session (one that does not read must not stall the daemon).
        code_fd = code_file(job.code)  # first: nothing else is open yet if it fails
        try:
            run_pipes = RunPipes.open()
        except OSError:
            os.close(code_fd)
            raise
        out_r, err_r, rep_r = run_pipes.readers
        run = _RunState(done=loop.create_future(), running=loop.create_future())
        self._run = run
        self.control.budget = MAX_EVENTS_PER_RUN
        order = frame({"op": "run"})
        try:
            if socket.send_fds(self.control.sock, [order], [*run_pipes.writers, code_fd]) != len(order):
                raise BlockingIOError("a part of the order")
        except BlockingIOError:
            # Its socket is full: it does not read its orders. It cannot run anything.
            self._killing = SessionEnd.SANDBOX_ERROR
            await asyncio.to_thread(cg.kill)
            run.done.set_result(None)
        except OSError:
            run.done.set_result(None)  # the session is gone: its watcher says how
        finally:
            run_pipes.close_writers()
            os.close(code_fd)
        grace = self.config.session_interrupt_grace_s
        interrupted_in_time = True

        async def interrupt() -> None:
            nonlocal interrupted_in_time
            deadline = loop.time() + grace
            # Not before it took the order: a SIGINT while it waits for one is ignored, and lost.
            await asyncio.wait((run.running, run.done), timeout=grace, return_when=asyncio.FIRST_COMPLETED)
            try:
                signal.pidfd_send_signal(self.user_pidfd, signal.SIGINT)  # KeyboardInterrupt in the user's code
            except OSError:
                pass  # gone already: the run's end says how
            try:
                await asyncio.wait_for(asyncio.shield(run.done), max(0.0, deadline - loop.time()))
            except TimeoutError:
                interrupted_in_time = False
                self._killing = SessionEnd.INTERRUPT_IGNORED
                await asyncio.to_thread(cg.kill)
                if not run.done.done():
                    run.done.set_result(None)

        exited: asyncio.Future[None] = loop.create_future()

        def settle(_: object) -> None:
            if not exited.done():
                exited.set_result(None)

        run.done.add_done_callback(settle)
        try:
            ex = await supervise(
                exited=exited, kill=interrupt, out_r=out_r, err_r=err_r, rep_r=rep_r, out=out, err=err,
                timeout=job.timeout, output_kill_bytes=self.config.limits.output_kill_bytes,
                on_output=on_output, stop=stop, drain_s=0.0,
                before_drain=lambda: self._settle(cg),
            )  # fmt: skip
        finally:
            self._run = None
        ex.stats = cg.stats().since(before)
        end = ex.report.end
        if self._killing is SessionEnd.SANDBOX_ERROR and ex.stop_reason is None and not ex.cage_fault:
            ex.cage_fault = "the session did not freeze after its run, or did not take its order; it was ended"
        if self.control.closed or not interrupted_in_time or self._killing is not None:
            # The session's process is gone (or was killed for not stopping).
            exit_event = run.exit_event
            reason = self.end_reason(exit_event)
            if self.control.broken and ex.stop_reason is None:
                self._code_broke_protocol(ex, "wrote to the session's control socket (runnerd's own)")
            elif exit_event is not None and ex.stop_reason is None:
                signum = small_int(exit_event.get("signal"))
                ex.status = -signum if signum else small_int(exit_event.get("exit_code"))
            elif ex.stop_reason is None and not ex.cage_fault:
                ex.cage_fault = (
                    "the session's processes ended without a word from its PID 1 "
                    f"(killed from outside, or its cage broke){self._said()}"
                )
            await self._finish(reason)
        elif end is not None:
            ex.status = small_int(end.get("exit_code"))
        else:
            # "done" with no end in the run's report: not the session's loop but the
            # run's code speaking on the control socket. The session cannot be trusted on.
            self._code_broke_protocol(ex, "said on the session's control socket that it was done before it ended")
            self._killing = SessionEnd.EXITED
            await self._finish(SessionEnd.EXITED)
        return ex

    @staticmethod
    def _code_broke_protocol(ex: Execution, what: str) -> None:
        """Only the run's code can break the control protocol (runnerd's side in the cage never does):
        the code's fault, not the sandbox's, so a model loop does not run the same code again."""
        ex.status = -signal.SIGKILL
        ex.note = f"the code {what}, so its session was killed (runnerd's protocol with it was broken)"

    async def _settle(self, cg: JobCgroup) -> None:
        """After the run: freeze the session (unless it ended) before its pipes are drained and outputs read."""
        if self.control.closed:
            return
        cg.request_freeze()
        if cg.frozen() or await asyncio.to_thread(wait_for, cg.frozen, FREEZE_TIMEOUT_S):
            return
        # Running on, it could change /work under the host's walk of it: it ends first.
        log.warning("session %s: its processes did not freeze in %.0f s; ending it", self.id, FREEZE_TIMEOUT_S)
        self._killing = SessionEnd.SANDBOX_ERROR
        await asyncio.to_thread(cg.kill)

    def _said(self) -> str:
        said = self.cage.diagnostics()
        return f": {said}" if said else ""

    async def close(self, grace: float = 0.0) -> None:
        """End the session now (its processes, cgroup, mounts and files).

        *grace* is not waited: a session's end is a close, and a run in it
        ends with it (the daemon stops running runs before it closes sessions).
        """
        if self._watch is not None:
            self._watch.cancel()
        await self._finish(SessionEnd.CLOSED)

    async def end(self, reason: SessionEnd) -> None:
        """End the session for *reason* (idle, lifetime, shutdown, closed)."""
        self._killing = self._killing or reason
        if self._watch is not None:
            self._watch.cancel()
        await self._finish(reason)

    def broken(self, *, deep: bool = False) -> bool:
        """Between runs: its process is gone (killed from outside), or (*deep*, slower) a kill waits on a thaw."""
        if self.ended is not None or self._run is not None:
            return False
        # poll, not select: a pidfd numbered past FD_SETSIZE (1024) is fine here.
        poller = select.poll()
        poller.register(self.user_pidfd, select.POLLIN)
        return bool(poller.poll(0)) or (deep and self.cage.cgroup.kill_pending())

    def memory_bytes(self) -> int:
        """What it holds: its cgroup's memory, and its inputs (the host wrote them: charged to the daemon)."""
        return self.cage.cgroup.memory_bytes() + self.input_bytes if self.ended is None else 0
