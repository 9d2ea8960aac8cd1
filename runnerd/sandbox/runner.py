"""What every runner shares: the Runner interface, and a job's result built from what its cage did.

The cold cage (:mod:`.cage`) and the warm pool (:mod:`.warm`) implement
:class:`Runner`; :func:`build_result` turns an :class:`~.supervise.Execution`
and the collected outputs into a :class:`~runnerd.result.Result` for both,
and :func:`sandbox_failure` is the result of a cage that broke.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

from ..config import Config
from ..result import Observation, Outcome, Reason, Result, Usage, decide
from .artifacts import Collected, collect
from .cgroups import JobCgroup
from .host import SlotLease
from .job import JobSpec
from .output import StreamCapture
from .policy import Policy
from .report import error_from_report, exit_status, small_int, value_from_report
from .supervise import Execution, OnOutput
from .workspace import Workspace

log = logging.getLogger(__name__)


class Runner(Protocol):
    """What runs jobs: the cold cage, the warm pool, and a session (sandbox/session.py).

    ``run`` returns a Result: a host-side failure is reason ``sandbox_error``
    (see :func:`sandbox_failure`). Only a session may refuse a job before
    anything of it ran, with JobRejected (an input name it already has). *on_output* gets stdout
    and stderr as they come; *stop*, when it gets a reason (cancelled,
    shutdown), ends the job with it; *name* fixes the job's internal
    cgroup/dir name (tests); *job_id* is the client's id, for log lines.
    """

    async def run(
        self,
        job: JobSpec,
        *,
        on_output: OnOutput | None = None,
        stop: asyncio.Future[Reason] | None = None,
        name: str | None = None,
        job_id: str | None = None,
    ) -> Result: ...

    async def close(self, grace: float = 0.0) -> None:
        """Stop taking jobs; wait up to *grace* s for running ones, then end them."""
        ...


async def execute_and_collect(
    execute: Callable[[StreamCapture, StreamCapture], Awaitable[Execution]],
    ws: Workspace | None,
    *,
    config: Config,
    policy: Policy,
    label: str,
    outputs: Callable[[], Collected] | None = None,
) -> Result:
    """The per-job skeleton every runner shares: captures, execute, collect the outputs, the result.

    *execute* runs the job with the two captures and returns once every
    process of the job is dead (its cgroup's counters read), or frozen (a
    session's): only then are the outputs collected, from *ws* or by
    *outputs*, so nothing the job ran can touch them. Always in a thread:
    a walk of /work takes as long as the job made it.
    A SandboxError goes to the caller, who owns the cage (see sandbox_failure).
    """
    limits = config.limits
    out = StreamCapture("stdout", limits.max_output_bytes)
    err = StreamCapture("stderr", limits.max_output_bytes)
    ex = await execute(out, err)
    if outputs is None:
        assert ws is not None
        work, figures, exclude = ws.work, ws.figures, frozenset(ws.input_names)

        def outputs() -> Collected:
            return collect(work, figures, exclude=exclude, limits=limits)

    collected = await asyncio.to_thread(outputs)
    return build_result(ex, out, err, collected, policy=policy, config=config, job_id=label)


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
    dropped_by_harness = small_int((report.end or {}).get("figures_dropped")) or 0
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
    if ex.note:
        warnings.append(ex.note)
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
        value=value_from_report(report.end, config.limits.max_value_chars),
    )


def sandbox_failure(job_id: str, exc: Exception) -> Result:
    log.error("job %s: sandbox error: %s", job_id, exc)
    return Result(outcome=Outcome.FAILED, reason=Reason.SANDBOX_ERROR, warnings=(f"sandbox error: {exc}",))


def teardown(
    cg: JobCgroup | None, ws: Workspace | None, lease: SlotLease | None = None, *, mounted: bool = True
) -> None:
    """After a job: kill what is left in its cgroup and remove it, remove its directory, free its slot.

    *mounted* False for a job directory with no tmpfs of its own (a warm job's, in its zygote's spool).
    """
    if cg is not None:
        if not cg.kill():
            log.error("job cgroup %s: processes survived SIGKILL for 5 s", cg.name)
        cg.remove()
    if ws is not None:
        ws.destroy(mounted=mounted)
    if lease is not None:
        lease.release()
