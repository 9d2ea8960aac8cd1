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
import json
import logging
import math
import os
import re
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import incage
from ..config import Config
from ..errors import SandboxError
from ..result import ErrorInfo, Observation, Outcome, Reason, Result, Usage, decide
from .artifacts import Collected, collect
from .cgroups import CgroupLimits, CgroupStats, JobCgroup
from .host import HostState, SlotLease
from .job import JobSpec
from .output import OutputGuard, StreamCapture
from .policy import NSJAIL_CGROUPS_OFF, Policy, nsjail_problems
from .sandbox_env import MPLCONFIG
from .workspace import MplConfig, Workspace

log = logging.getLogger(__name__)

OnOutput = Callable[[str, bytes], None]

JAIL_UID = 1000
HARNESS_IN_CAGE = "/runnerd/harness.py"
MAX_REPORT_BYTES = 1 << 20
MAX_LOG_BYTES = 256 << 10
# After the cage has died, how long its pipes may take to report EOF.
PIPE_DRAIN_S = 2.0
READ_CHUNK = 1 << 16
# Past what the result keeps, how long a read that emptied a pipe waits for
# more (see read_pipe): a print() loop writes 12 bytes per syscall, and
# reading each as it comes kept the host as busy as the job. At most one
# pipe buffer (64 KiB) per pause: 64 MB/s still go through.
PACE_S = 0.001

# nsjail itself stays in a cold job's cgroup, as the cage's parent, for the
# whole job: it is moved in before it forks, so nothing of the cage escapes
# the count. The policy's cgroup_pids_max is the job's own processes and
# threads, its PID 1 (the harness's init) included, which is what a warm
# job's cgroup counts (its init G, the user's process, what that starts);
# nsjail's one task comes on top, or a cold job could start one child fewer.
NSJAIL_TASKS = 1

_EXIT_RE = re.compile(r"\) exited with status: (\d+)")
_SIGNAL_RE = re.compile(r"\) terminated with signal: \S+ \((\d+)\)")


def cold_cgroup_limits(policy_limits: CgroupLimits) -> CgroupLimits:
    """The cgroup limits of a cold job: the policy's, plus room for nsjail itself."""
    return dataclasses.replace(policy_limits, pids=policy_limits.pids + NSJAIL_TASKS)


def pb_string(value: str) -> str:
    """A protobuf text-format string literal for *value* (any text, safely escaped)."""
    out = []
    for byte in value.encode("utf-8"):
        ch = chr(byte)
        if 0x20 <= byte < 0x7F and ch not in "\"\\'":
            out.append(ch)
        else:
            out.append(f"\\{byte:03o}")
    return '"' + "".join(out) + '"'


def pb_bind(src: Path | str, dst: str, *, rw: bool = False, noexec: bool = True) -> str:
    return (
        f"mount {{ src: {pb_string(str(src))} dst: {pb_string(dst)} is_bind: true rw: {str(rw).lower()} "
        f"nosuid: true nodev: true{' noexec: true' if noexec else ''} }}"
    )


def pb_idmaps(uid: int) -> list[str]:
    return [
        f'uidmap {{ inside_id: "{JAIL_UID}" outside_id: "{uid}" count: 1 }}',
        f'gidmap {{ inside_id: "{JAIL_UID}" outside_id: "{uid}" count: 1 }}',
    ]


def job_config(policy: Policy, ws: Workspace, *, uid: int, env: Path, harness_dir: Path) -> str:
    """The policy's text plus this job's uid map and mounts (repeated fields, appended)."""
    lines = ["", "# ---- added by runnerd for this job ----", *pb_idmaps(uid)]
    lines.append(pb_bind(env, str(env), noexec=False))
    lines.append(pb_bind(ws.work, "/work", rw=True))
    for index, name in enumerate(ws.input_names):
        lines.append(pb_bind(ws.inputs / str(index), f"/work/{name}"))
    lines.append(pb_bind(ws.home, "/home/user", rw=True))
    lines.append(pb_bind(ws.figures, "/runnerd/figures", rw=True))
    lines.append(pb_bind(ws.code_file, "/runnerd/main.py"))
    for name in incage.COLD_FILES:
        lines.append(pb_bind(harness_dir / name, f"/runnerd/{name}"))
    return policy.cfg_text + "\n".join(lines) + "\n"


# ---------------------------------------------------------------- what the cage reports


@dataclass
class Report:
    started: bool = False
    end: dict[str, Any] | None = None
    exit: dict[str, Any] | None = None


def parse_report(raw: bytes) -> Report:
    """The harness's JSON lines; anything malformed is ignored (the job may have written it)."""
    report = Report()
    for line in raw.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict):
            continue
        event = record.get("event")
        if event == "start":
            report.started = True
        elif event == "end" and report.started:
            report.end = record
        elif event == "exit" and report.started:
            report.exit = record
    return report


def _small_int(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and -(2**31) < value < 2**31:
        return value
    return None


def error_from_report(end: dict[str, Any] | None) -> ErrorInfo | None:
    """The harness's error record, checked and capped (it is untrusted input)."""
    if not end or not isinstance(end.get("error"), dict):
        return None
    e = end["error"]

    def text(key: str, cap: int) -> str:
        value = e.get(key)
        return value[:cap] if isinstance(value, str) else ""

    return ErrorInfo(
        type=text("type", 200) or "Exception",
        message=text("message", 8 << 10),
        traceback=text("traceback", 40 << 10),
        lineno=_small_int(e.get("lineno")),
    )


def nsjail_status(nsjail_log: str, returncode: int | None, started: bool) -> int | None:
    """PID 1's exit as nsjail saw it: a code, minus a signal number, or None if nsjail never said.

    A job process that dies of a signal makes PID 1 exit 128+N, which nsjail
    logs; None means nsjail itself did not see the job end (it died first).
    """
    if m := _EXIT_RE.search(nsjail_log):
        return int(m.group(1))
    if m := _SIGNAL_RE.search(nsjail_log):
        return -int(m.group(1))
    # No exit line, but nsjail exited by itself: its own exit status is its
    # child's (a policy may set log_level above INFO, which hides the line).
    if returncode is not None and returncode >= 0 and started:
        return returncode
    return None


def nsjail_fault(returncode: int | None, problems: str) -> str:
    """Why the cage failed under a job whose exit nsjail never reported."""
    if returncode is not None and returncode < 0:
        try:
            how = f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            how = f"died of signal {-returncode}"
    else:
        how = f"exited with status {returncode}"
    why = f"nsjail {how} while the job ran, without reporting the job's exit"
    return f"{why} ({problems})" if problems else why


def exit_status(trusted: int | None, report: Report) -> int | None:
    """The job's exit: a code (>= 0), minus a signal number, or None if the cage was killed.

    *trusted* comes from outside the job (nsjail's log, or the zygote): PID
    1 exits with the job process's code, or 128+N when it died of signal N.
    The harness's report may turn that 128+N into -N, but only when both agree.
    """
    if trusted is None or trusted < 0:
        return trusted
    signum = _small_int((report.exit or {}).get("signal"))
    if trusted > 128 and signum is not None and trusted == 128 + signum:
        return -signum
    return trusted


@dataclass
class Execution:
    """What one run in a cage produced, before the outputs are collected."""

    status: int | None = None  # trusted: see exit_status()
    wall_s: float = 0.0
    stop_reason: Reason | None = None
    output_stop: str = ""  # why the output stopped the job, when it did
    report: Report = field(default_factory=Report)  # what the harness said; untrusted
    problem: str = ""  # why the cage did not start, when it did not
    cage_fault: str = ""  # why the cage itself broke while the job ran, when it did
    stats: CgroupStats = field(default_factory=CgroupStats)


# ---------------------------------------------------------------- shared by cold and warm


def spawn_nsjail(
    nsjail: Path,
    cfg_text: str,
    kafel_text: str,
    cg: JobCgroup,
    *,
    args: Iterable[str],
    command: list[str],
    stdout: int,
    stderr: int,
    log_w: int,
    pass_fds: tuple[int, ...] = (),
) -> subprocess.Popen[bytes]:
    """Start nsjail inside cgroup *cg*, with the config and seccomp policy given through pipes."""
    cfg_r, cfg_w = os.pipe()
    kafel_r, kafel_w = os.pipe()
    argv = [
        str(nsjail), "--config", f"/dev/fd/{cfg_r}", "--seccomp_policy", f"/dev/fd/{kafel_r}",
        "--log_fd", str(log_w), *NSJAIL_CGROUPS_OFF, *args,
        *(a for fd in pass_fds for a in ("--pass_fd", str(fd))), "--", *command,
    ]  # fmt: skip
    try:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
            pass_fds=(cfg_r, kafel_r, log_w, *pass_fds), env={"PATH": "/usr/bin:/bin"},
        )  # fmt: skip
    except OSError as exc:
        for fd in (cfg_r, cfg_w, kafel_r, kafel_w):
            os.close(fd)
        raise SandboxError(f"cannot start nsjail ({nsjail}): {exc.strerror}") from None
    os.close(cfg_r)
    os.close(kafel_r)
    try:
        # nsjail is blocked reading its config: nothing of it runs outside the cgroup.
        cg.attach(proc.pid)
        os.write(cfg_w, cfg_text.encode())
        os.write(kafel_w, kafel_text.encode())
    except (SandboxError, OSError) as exc:
        proc.kill()
        proc.wait()
        raise SandboxError(f"cannot hand the cage its policy: {exc}") from None
    finally:
        os.close(cfg_w)
        os.close(kafel_w)
    return proc


async def supervise(
    *,
    exited: asyncio.Future[None],
    kill: Callable[[], Awaitable[None]],
    out_r: int,
    err_r: int,
    rep_r: int,
    extra: Iterable[tuple[int, Callable[[bytes], None]]] = (),
    out: StreamCapture,
    err: StreamCapture,
    timeout: float,
    output_kill_bytes: int,
    on_output: OnOutput | None,
    stop: asyncio.Future[Reason] | None,
) -> Execution:
    """Pump a running cage's pipes until it ends, enforcing the deadline, stop and output limit.

    *exited* resolves when the cage is gone; *kill* ends it (and must make
    *exited* resolve). Takes ownership of the read fds.
    """
    loop = asyncio.get_running_loop()
    ex = Execution()
    started = time.monotonic()
    done: asyncio.Future[Reason | None] = loop.create_future()  # the first reason to stop, or None at exit

    def finish(reason: Reason | None) -> None:
        if not done.done():
            done.set_result(reason)

    report = bytearray()
    guard = OutputGuard(out, err, output_kill_bytes)

    def on_stream(capture: StreamCapture) -> Callable[[bytes], None]:
        def sink(data: bytes) -> None:
            live = capture.feed(data)
            if live and on_output is not None:
                try:
                    on_output(capture.name, live)
                except Exception:  # a consumer's bug must not break the job's bookkeeping
                    log.exception("output callback failed")
            if not done.done() and (why := guard.check(time.monotonic())):
                ex.output_stop = why
                finish(Reason.OUTPUT_LIMIT)

        return sink

    eofs = [
        read_pipe(loop, out_r, on_stream(out), pace=lambda: guard.passed_cap),
        read_pipe(loop, err_r, on_stream(err), pace=lambda: guard.passed_cap),
        read_pipe(loop, rep_r, capped(report, MAX_REPORT_BYTES)),
        *(read_pipe(loop, fd, sink) for fd, sink in extra),
    ]
    exited.add_done_callback(lambda _: finish(None))
    deadline = loop.call_later(timeout, finish, Reason.TIMEOUT)
    if stop is not None:
        stop.add_done_callback(lambda f: finish(f.result() if not f.cancelled() else Reason.CANCELLED))
    try:
        ex.stop_reason = await done
        if ex.stop_reason is not None:
            await kill()
        await exited
    finally:
        deadline.cancel()
        if not exited.done():  # cancelled from outside: never leave the cage running
            await asyncio.shield(kill())
            await asyncio.shield(exited)
        ex.wall_s = time.monotonic() - started
        pending = [f for f in eofs if not f.done()]
        if pending:
            await asyncio.wait(pending, timeout=PIPE_DRAIN_S)
        for f in eofs:
            if not f.done():
                f.cancel()  # closes the fd (see read_pipe)
    ex.report = parse_report(bytes(report))
    return ex


def capped(buffer: bytearray, cap: int) -> Callable[[bytes], None]:
    def sink(data: bytes) -> None:
        if len(buffer) < cap:
            buffer.extend(data[: cap - len(buffer)])

    return sink


def build_result(
    ex: Execution, out: StreamCapture, err: StreamCapture, collected: Collected, *,
    policy: Policy, config: Config, job_id: str,
) -> Result:  # fmt: skip
    """The outcome rules (result.py) applied to what the host saw, with every warning explained.

    *job_id* names the job in the log: the client's id when there is one.
    """
    report = ex.report
    status = exit_status(ex.status, report) if ex.stop_reason is None else None
    error = error_from_report(report.end)
    obs = Observation(
        started=report.started,
        finished=report.end is not None,
        exit_status=status,
        timed_out=ex.stop_reason is Reason.TIMEOUT,
        cancelled=ex.stop_reason is Reason.CANCELLED,
        shutdown=ex.stop_reason is Reason.SHUTDOWN,
        output_limit=ex.stop_reason is Reason.OUTPUT_LIMIT,
        oom_kills=ex.stats.oom_kills,
        has_error=error is not None and status != 0,
        cage_failed=bool(ex.cage_fault),
    )
    outcome, reason = decide(obs)
    dropped_by_harness = _small_int((report.end or {}).get("figures_dropped")) or 0
    unrendered = [f"{dropped_by_harness} open figure(s) not rendered: over {config.limits.max_figures}"]
    # Lost output first (a reader may look at the first lines only), the
    # job's own oddities (links, FIFOs, ...) last.
    warnings, oddities = collected.warnings.final(lost_first=unrendered if dropped_by_harness > 0 else ())
    limits = policy.limits
    for capture in (out, err):
        if capture.truncated:
            warnings.append(capture.describe())
    if reason is Reason.MEMORY_LIMIT:
        warnings.append(f"killed by the out-of-memory killer at the memory limit of {limits.memory_bytes >> 20} MiB")
    elif ex.stats.oom_kills:
        warnings.append(
            f"the out-of-memory killer ended {ex.stats.oom_kills} process(es) of the job "
            f"at the memory limit of {limits.memory_bytes >> 20} MiB"
        )
    if ex.stats.pids_limit_hits:
        warnings.append(
            f"process/thread creation failed {ex.stats.pids_limit_hits} time(s) at the limit of {limits.pids}"
        )
    if reason is Reason.OUTPUT_LIMIT:
        warnings.append(ex.output_stop)
    if reason is Reason.SANDBOX_ERROR and ex.cage_fault:
        warnings.append(f"sandbox error: {ex.cage_fault}")
        # The host's fault, not the job's, and the daemon serves on: a warning.
        log.warning("job %s: sandbox error: %s", job_id, ex.cage_fault)
    elif reason is Reason.SANDBOX_ERROR:
        problem = ex.problem or err.text().strip()[-2000:] or "the cage exited before the job started"
        warnings.append(f"sandbox error: {problem}")
        log.error("job %s: the cage failed to start: %s", job_id, problem)
    warnings += oddities
    return Result(
        outcome=outcome,
        reason=reason,
        stdout=out.text(),
        stderr=err.text(),
        truncated=out.truncated or err.truncated or collected.dropped or dropped_by_harness > 0,
        exit_code=status,
        error=error if status != 0 or ex.stop_reason is not None else None,
        figures=tuple(collected.figures),
        files=tuple(collected.files),
        usage=Usage(wall_s=round(ex.wall_s, 4), cpu_s=round(ex.stats.cpu_s, 4), max_rss_bytes=ex.stats.peak_bytes),
        warnings=tuple(warnings),
    )


def sandbox_failure(job_id: str, exc: Exception) -> Result:
    log.error("job %s: sandbox error: %s", job_id, exc)
    return Result(outcome=Outcome.FAILED, reason=Reason.SANDBOX_ERROR, warnings=(f"sandbox error: {exc}",))


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

    async def close(self, grace: float = 0.0) -> None:
        """Nothing to stop: cold cages live only as long as their job."""

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
            out = StreamCapture("stdout", limits.max_output_bytes)
            err = StreamCapture("stderr", limits.max_output_bytes)
            ex = await self._execute(job, ws, cg, lease.uid, out, err, on_output, stop)
            collected = await asyncio.to_thread(
                collect, ws.work, ws.figures, exclude=frozenset(ws.input_names), limits=limits
            )
            result = build_result(ex, out, err, collected, policy=self.policy, config=self.config, job_id=label)
        except SandboxError as exc:
            result = sandbox_failure(label, exc)
        finally:
            await asyncio.shield(asyncio.to_thread(self._teardown, cg, ws, lease))
        return result

    @staticmethod
    def _teardown(cg: JobCgroup | None, ws: Workspace | None, lease: SlotLease | None) -> None:
        if cg is not None:
            if not cg.kill():
                log.error("job cgroup %s: processes survived SIGKILL for 5 s", cg.name)
            cg.remove()
        if ws is not None:
            ws.destroy()
        if lease is not None:
            lease.release()

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
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        log_r, log_w = os.pipe()
        rep_r, rep_w = os.pipe()
        try:
            proc = spawn_nsjail(
                self.nsjail,
                job_config(self.policy, ws, uid=uid, env=self.env, harness_dir=self.config.harness_dir),
                self.policy.kafel_text,
                cg,
                # A backstop: the host kills the cage at the deadline itself.
                args=("--time_limit", str(math.ceil(job.timeout) + 5)),
                command=[str(self.env / "bin" / "python3"), "-I", "-B", "-u", HARNESS_IN_CAGE,
                         str(rep_w), str(self.config.limits.max_figures)],  # fmt: skip
                stdout=out_w, stderr=err_w, log_w=log_w, pass_fds=(rep_w,),
            )  # fmt: skip
        except SandboxError:
            for fd in (out_r, err_r, log_r, rep_r):
                os.close(fd)
            raise
        finally:
            for fd in (out_w, err_w, log_w, rep_w):
                os.close(fd)

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


def read_pipe(
    loop: asyncio.AbstractEventLoop, fd: int, sink: Callable[[bytes], None], *, pace: Callable[[], bool] | None = None,
) -> asyncio.Future[None]:  # fmt: skip
    """Feed everything from *fd* to *sink*; the future resolves at EOF. Cancelling it closes the fd.

    While *pace* says so, a read that emptied the pipe waits PACE_S before
    the next: a writer of small chunks then costs a read per PACE_S, not
    one per write.
    """
    os.set_blocking(fd, False)
    eof: asyncio.Future[None] = loop.create_future()
    paused: asyncio.TimerHandle | None = None

    def close() -> None:
        if paused is not None:
            paused.cancel()
        loop.remove_reader(fd)
        os.close(fd)

    def resume() -> None:
        nonlocal paused
        paused = None
        loop.add_reader(fd, readable)

    def readable() -> None:
        nonlocal paused
        try:
            data = os.read(fd, READ_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            sink(data)
            if len(data) < READ_CHUNK and pace is not None and pace():
                loop.remove_reader(fd)
                paused = loop.call_later(PACE_S, resume)
            return
        close()
        if not eof.done():
            eof.set_result(None)

    loop.add_reader(fd, readable)
    eof.add_done_callback(lambda f: close() if f.cancelled() else None)
    return eof


def watch_exit(loop: asyncio.AbstractEventLoop, pid: int) -> asyncio.Future[None]:
    """A future that resolves when process *pid* exits (a pidfd; the caller reaps)."""
    fut: asyncio.Future[None] = loop.create_future()
    pidfd = os.pidfd_open(pid)

    def readable() -> None:
        loop.remove_reader(pidfd)
        os.close(pidfd)
        if not fut.done():
            fut.set_result(None)

    loop.add_reader(pidfd, readable)
    return fut
