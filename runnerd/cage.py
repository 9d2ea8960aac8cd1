"""Run one job in one nsjail cage: from workspace to :class:`~runnerd.result.Result`.

Per job:

1. lease a slot (its uid), make the workspace (workspace.py) and the job's
   cgroup (cgroups.py);
2. start nsjail with ``--config /dev/fd/N``: nsjail blocks reading the
   config pipe, so the host moves it into the job's cgroup *before* it can
   fork anything, then writes the checked policy text plus this job's mounts
   and uid map into the pipe;
3. read stdout, stderr, the harness's report and nsjail's log as they come
   (capped; stdout/stderr streamed to ``on_output``), until the cage exits,
   the deadline passes, the output passes its kill limit, or ``stop`` fires;
4. kill whatever is left in the cgroup, read its counters, collect the
   outputs (artifacts.py), unmount, and decide the outcome (result.py).

The daemon is never the parent of user code through a fork of itself: the
cage is a fresh nsjail process started with ``subprocess`` (vfork+exec).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .artifacts import Collected, collect
from .cgroups import CgroupStats, JobCgroup
from .config import Config
from .errors import SandboxError
from .host import HostState, SlotLease
from .job import JobSpec
from .output import StreamCapture
from .policy import NSJAIL_CGROUPS_OFF, Policy
from .result import ErrorInfo, Observation, Outcome, Reason, Result, Usage, decide
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

_EXIT_RE = re.compile(r"\) exited with status: (\d+)")
_SIGNAL_RE = re.compile(r"\) terminated with signal: \S+ \((\d+)\)")


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


def job_config(policy: Policy, ws: Workspace, *, uid: int, env: Path, harness_dir: Path) -> str:
    """The policy's text plus this job's uid map and mounts (repeated fields, appended)."""
    lines = [
        "",
        "# ---- added by runnerd for this job ----",
        f'uidmap {{ inside_id: "{JAIL_UID}" outside_id: "{uid}" count: 1 }}',
        f'gidmap {{ inside_id: "{JAIL_UID}" outside_id: "{uid}" count: 1 }}',
    ]

    def bind(src: Path | str, dst: str, rw: bool = False, extra: str = "") -> None:
        lines.append(
            f"mount {{ src: {pb_string(str(src))} dst: {pb_string(dst)} is_bind: true rw: {str(rw).lower()} "
            f"nosuid: true nodev: true{extra} }}"
        )

    bind(env, str(env))
    bind(ws.work, "/work", rw=True, extra=" noexec: true")
    for index, name in enumerate(ws.input_names):
        bind(ws.inputs / str(index), f"/work/{name}", extra=" noexec: true")
    bind(ws.home, "/home/user", rw=True, extra=" noexec: true")
    bind(ws.figures, "/runnerd/figures", rw=True, extra=" noexec: true")
    bind(ws.code_file, "/runnerd/main.py")
    for name in ("harness.py", "runnerd_inline.py"):
        bind(harness_dir / name, f"/runnerd/{name}")
    return policy.cfg_text + "\n".join(lines) + "\n"


@dataclass
class _Report:
    started: bool = False
    end: dict[str, Any] | None = None
    exit: dict[str, Any] | None = None


def parse_report(raw: bytes) -> _Report:
    """The harness's JSON lines; anything malformed is ignored (the job may have written it)."""
    report = _Report()
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


def exit_status(nsjail_log: str, report: _Report, returncode: int | None) -> int | None:
    """The job's exit: a code (>= 0), minus a signal number, or None if the cage was killed.

    nsjail's log is the trusted source (it saw PID 1 exit). PID 1 exits
    with the job process's code, or 128+N when it died of signal N; the
    harness's report may turn that 128+N into -N, but only when both agree.
    """
    status: int | None = None
    if m := _EXIT_RE.search(nsjail_log):
        status = int(m.group(1))
    elif m := _SIGNAL_RE.search(nsjail_log):
        return -int(m.group(1))
    elif returncode is not None and returncode >= 0 and report.started:
        status = returncode
    if status is None:
        return None
    signum = _small_int((report.exit or {}).get("signal"))
    if status > 128 and signum is not None and status == 128 + signum:
        return -signum
    return status


def nsjail_problems(nsjail_log: str) -> str:
    lines = [ln for ln in nsjail_log.splitlines() if ln.startswith(("[W]", "[E]", "[F]"))]
    cleaned = [re.sub(r"^\[[WEF]\]\[[^\]]*\](\[\d+\])?\s*\S+\(\):\d+\s*", "", ln) for ln in lines]
    return "; ".join(c for c in cleaned if c)


@dataclass
class _Execution:
    """What one nsjail run produced."""

    returncode: int | None = None
    wall_s: float = 0.0
    stop_reason: Reason | None = None
    output_limit: bool = False
    report: bytes = b""
    nsjail_log: str = ""
    stats: CgroupStats = field(default_factory=CgroupStats)


class Cage:
    """Runs jobs, one nsjail each. Safe to use from one event loop for many jobs at once."""

    def __init__(self, config: Config, policy: Policy, host: HostState, nsjail: Path) -> None:
        self.config = config
        self.policy = policy
        self.host = host
        self.nsjail = nsjail
        self.env = config.sandbox_env
        self.mplconfig = MplConfig.load(self.env / "runnerd" / "mplconfig")

    def _argv(self, cfg_fd: int, kafel_fd: int, log_fd: int, report_fd: int, timeout: float) -> list[str]:
        return [
            str(self.nsjail),
            "--config", f"/dev/fd/{cfg_fd}",
            "--seccomp_policy", f"/dev/fd/{kafel_fd}",
            "--log_fd", str(log_fd),
            *NSJAIL_CGROUPS_OFF,
            # A backstop: the host kills the cage at the deadline itself.
            "--time_limit", str(math.ceil(timeout) + 5),
            "--pass_fd", str(report_fd),
            "--",
            str(self.env / "bin" / "python3"), "-I", "-B", "-u",
            HARNESS_IN_CAGE, str(report_fd), str(self.config.limits.max_figures),
        ]  # fmt: skip

    async def run(
        self,
        job: JobSpec,
        *,
        on_output: OnOutput | None = None,
        stop: "asyncio.Future[Reason] | None" = None,
        name: str | None = None,
    ) -> Result:
        """Run *job*; always returns a Result (a host-side failure is reason sandbox_error).

        *stop*, when it gets a result (``Reason.CANCELLED`` or
        ``Reason.SHUTDOWN``), kills the cage and ends the job with that reason.
        """
        name = name or self.host.new_job_name()
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
            cg = self.host.cgroups.create(name, self.policy.limits)
            out = StreamCapture("stdout", limits.max_output_bytes)
            err = StreamCapture("stderr", limits.max_output_bytes)
            ex = await self._execute(job, ws, cg, lease.uid, out, err, on_output, stop)
            collected = await asyncio.to_thread(
                collect, ws.work, ws.figures, exclude=frozenset(ws.input_names), limits=limits
            )
            result = self._result(ex, out, err, collected)
        except SandboxError as exc:
            log.error("job %s: sandbox error: %s", name, exc)
            result = Result(outcome=Outcome.FAILED, reason=Reason.SANDBOX_ERROR, warnings=(f"sandbox error: {exc}",))
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
        stop: "asyncio.Future[Reason] | None",
    ) -> _Execution:
        loop = asyncio.get_running_loop()
        limits = self.config.limits
        ex = _Execution()
        cfg_text = job_config(self.policy, ws, uid=uid, env=self.env, harness_dir=self.config.harness_dir)
        cfg_r, cfg_w = os.pipe()
        kafel_r, kafel_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        log_r, log_w = os.pipe()
        rep_r, rep_w = os.pipe()
        child_ends = (cfg_r, kafel_r, out_w, err_w, log_w, rep_w)
        ours = [cfg_w, kafel_w, out_r, err_r, log_r, rep_r]
        try:
            proc = subprocess.Popen(
                self._argv(cfg_r, kafel_r, log_w, rep_w, job.timeout),
                stdin=subprocess.DEVNULL, stdout=out_w, stderr=err_w,
                pass_fds=(cfg_r, kafel_r, log_w, rep_w), env={"PATH": "/usr/bin:/bin"},
            )  # fmt: skip
        except OSError as exc:
            for fd in (*child_ends, *ours):
                os.close(fd)
            raise SandboxError(f"cannot start nsjail ({self.nsjail}): {exc.strerror}") from None
        started_at = time.monotonic()
        for fd in child_ends:
            os.close(fd)
        try:
            # nsjail is blocked reading its config: nothing of it runs outside the cgroup.
            cg.attach(proc.pid)
            os.write(cfg_w, cfg_text.encode())
            os.write(kafel_w, self.policy.kafel_text.encode())
        except (SandboxError, OSError) as exc:
            proc.kill()
            proc.wait()
            for fd in ours:
                os.close(fd)
            raise SandboxError(f"cannot hand the job to nsjail: {exc}") from None
        finally:
            for fd in (cfg_w, kafel_w):
                try:
                    os.close(fd)
                except OSError:
                    pass

        done = loop.create_future()  # the first reason to stop, or None at exit

        def finish(reason: Reason | None) -> None:
            if not done.done():
                done.set_result(reason)

        report = bytearray()
        nsjail_log = bytearray()

        def on_stream(capture: StreamCapture) -> Callable[[bytes], None]:
            def sink(data: bytes) -> None:
                live = capture.feed(data)
                if live and on_output is not None:
                    try:
                        on_output(capture.name, live)
                    except Exception:  # a consumer's bug must not kill the job's bookkeeping
                        log.exception("output callback failed")
                if out.total + err.total > limits.output_kill_bytes:
                    ex.output_limit = True
                    finish(Reason.OUTPUT_LIMIT)

            return sink

        def capped(buffer: bytearray, cap: int) -> Callable[[bytes], None]:
            def sink(data: bytes) -> None:
                if len(buffer) < cap:
                    buffer.extend(data[: cap - len(buffer)])

            return sink

        eofs = [
            _read_pipe(loop, out_r, on_stream(out)),
            _read_pipe(loop, err_r, on_stream(err)),
            _read_pipe(loop, rep_r, capped(report, MAX_REPORT_BYTES)),
            _read_pipe(loop, log_r, capped(nsjail_log, MAX_LOG_BYTES)),
        ]
        exited = _watch_exit(loop, proc.pid)
        exited.add_done_callback(lambda _: finish(None))
        deadline = loop.call_later(job.timeout, finish, Reason.TIMEOUT)
        if stop is not None:
            stop.add_done_callback(lambda f: finish(f.result() if not f.cancelled() else Reason.CANCELLED))
        try:
            ex.stop_reason = await done
            if ex.stop_reason is not None:
                proc.send_signal(signal.SIGKILL)
            await exited
        finally:
            deadline.cancel()
            if not exited.done():  # cancelled from outside: never leave nsjail running
                proc.kill()
                await asyncio.shield(exited)
            ex.returncode = proc.wait()
            ex.wall_s = time.monotonic() - started_at
            # Anything still in the cgroup (nothing, normally: PID 1's death
            # ends the pid namespace) dies now, which also closes the pipes.
            await asyncio.shield(asyncio.to_thread(cg.kill))
            pending = [f for f in eofs if not f.done()]
            if pending:
                await asyncio.wait(pending, timeout=PIPE_DRAIN_S)
            for f in eofs:
                if not f.done():
                    f.cancel()  # closes the fd (see _read_pipe)
        ex.stats = cg.stats()
        ex.report = bytes(report)
        ex.nsjail_log = nsjail_log.decode("utf-8", "replace")
        return ex

    def _result(self, ex: _Execution, out: StreamCapture, err: StreamCapture, collected: Collected) -> Result:
        report = parse_report(ex.report)
        status = exit_status(ex.nsjail_log, report, ex.returncode) if ex.stop_reason is None else None
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
        )
        outcome, reason = decide(obs)
        warnings = collected.warnings.final()
        limits = self.policy.limits
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
            warnings.append(
                f"killed after writing {out.total + err.total} bytes to stdout+stderr "
                f"(limits.output_kill_bytes = {self.config.limits.output_kill_bytes})"
            )
        dropped_by_harness = _small_int((report.end or {}).get("figures_dropped")) or 0
        if dropped_by_harness > 0:
            warnings.append(f"{dropped_by_harness} open figure(s) not rendered: over {self.config.limits.max_figures}")
        if reason is Reason.SANDBOX_ERROR:
            problem = nsjail_problems(ex.nsjail_log) or err.text().strip()[-2000:] or "nsjail exited before the job started"
            warnings.append(f"sandbox error: {problem}")
            log.error("cage failed to start: %s", problem)
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


def _read_pipe(loop: asyncio.AbstractEventLoop, fd: int, sink: Callable[[bytes], None]) -> "asyncio.Future[None]":
    """Feed everything from *fd* to *sink*; the future resolves at EOF. Cancelling it closes the fd."""
    os.set_blocking(fd, False)
    eof: asyncio.Future[None] = loop.create_future()

    def close() -> None:
        loop.remove_reader(fd)
        os.close(fd)

    def readable() -> None:
        try:
            data = os.read(fd, READ_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            sink(data)
            return
        close()
        if not eof.done():
            eof.set_result(None)

    loop.add_reader(fd, readable)
    eof.add_done_callback(lambda f: close() if f.cancelled() else None)
    return eof


def _watch_exit(loop: asyncio.AbstractEventLoop, pid: int) -> "asyncio.Future[None]":
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
