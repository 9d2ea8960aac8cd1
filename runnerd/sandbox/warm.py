"""The warm path, host side: pools of zygotes (:mod:`.job_zygote`, :mod:`.session_zygote`), each in its own cage.

A zygote (runnerd/incage/zygote.py, inside the cage) has the heavy libraries
imported (a *full* one: numpy, pandas, Matplotlib) or only the harness (a
*light* one, for code that imports the standard library alone) and forks
one child per job. The host keeps each zygote's next child *armed*:
prepared in fresh namespaces and already moved into the cgroup of the job
it will run, so a job's latency does not pay for namespace creation or the
cgroup v1 migration (milliseconds of RCU waits).

Per job, the pool picks a free zygote of the kind the code needs
(:func:`needs_full`), and the zygote:

1. writes the job's directory (code, inputs, work/, figures/, home/) into
   its spool: a tmpfs the host mounts per zygote (under the jobs dir, so a
   crash sweep finds it) and nsjail binds in as /spool;
2. sends the job with three fresh pipes (stdout, stderr, report) as
   SCM_RIGHTS;
3. supervises it exactly like a cold cage: deadline, cancel, output limit,
   streaming; killing means killing the job's cgroup;
4. takes the exit status from the zygote, the counters from the cgroup, and
   collects the outputs itself from the spool, after every process of the
   job is dead: nothing the job ran can touch them;
5. removes the job's directory and cgroup, and arms its next child.

A zygote that dies or stops answering is replaced; a job it was running
ends with reason sandbox_error, and its slot recovers.
"""

from __future__ import annotations

import ast
import asyncio
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from ..config import Config
from ..errors import SandboxError
from ..result import Reason, Result
from .host import HostState
from .job import InputFile, JobSpec
from .job_zygote import JobZygote, NotHandedOver
from .policy import Policy
from .runner import sandbox_failure
from .session import Session
from .session_zygote import SessionZygote
from .supervise import OnOutput
from .zygotes import Zygote, ZygoteGone

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 60.0
RESTART_BACKOFF_S = (0.5, 2.0, 10.0)


def needs_full(code: str) -> bool:
    """True unless *code* imports only the standard library (statically; a syntax error is light).

    A job that imports something else only at run time (importlib) still
    works on a light zygote: its import is just not warm.
    """
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return False
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        if any(n.split(".")[0] not in sys.stdlib_module_names for n in names):
            return True
    return False


class _Pool:
    """Zygotes of one kind, and the queue of those ready for a job."""

    def __init__(self, kind: str, size: int, make: Callable[[int, str], Zygote]) -> None:
        self.kind = kind
        self.make = make
        self.zygotes = [make(i, kind) for i in range(size)]
        self.ready: asyncio.Queue[Zygote] = asyncio.Queue()


class WarmCage:
    """Pools of zygotes, full and light; the same ``run`` as the cold Cage.

    Up to ``warm_full_zygotes`` full zygotes (the CPUs by default; never more
    than *size*, the daemon's concurrency) and 2 x *size* light ones: a job
    takes a ready one of the kind its code needs (waiting if all are busy),
    and the zygote is back in its queue once it has armed its next child
    (prepared while the job ran). The scheduler runs at most *size* jobs at
    once. Full zygotes cost memory (about 100 MiB each); light ones a few
    MiB, so slots beyond the CPU count mostly serve standard-library jobs.
    """

    def __init__(self, config: Config, policy: Policy, kafel: str, host: HostState, nsjail: Path, size: int) -> None:
        full = config.warm_full_zygotes or len(os.sched_getaffinity(0))

        def make(index: int, kind: str) -> Zygote:
            if kind == "session":
                return SessionZygote(index, config, policy, kafel, host, nsjail)
            return JobZygote(index, config, policy, kafel, host, nsjail, kind)

        # Light zygotes cost a few MiB: twice as many keep one armed for every
        # slot while the last one's next child is still being prepared.
        self.pools = {
            "full": _Pool("full", min(full, size), make),
            "light": _Pool("light", 2 * size, make),
            # Sessions fork from zygotes of their own: an open never waits for a job to end.
            "session": _Pool("session", config.warm_session_zygotes if self._sessions_on(config, host) else 0, make),
        }
        self._recycling: set[asyncio.Task[None]] = set()
        # Session zygotes out of their pool (a failed re-arm) whose sessions still run.
        self._retired: set[SessionZygote] = set()
        self._closing = False
        self.busy = 0

    @staticmethod
    def _sessions_on(config: Config, host: HostState) -> bool:
        if not config.max_sessions:
            return False
        if not host.cgroups.can_freeze():
            log.warning("sessions are off: %s has no freezer (mount the v1 freezer)", host.cgroups.describe())
            return False
        return True

    @property
    def zygotes(self) -> list[Zygote]:
        return [z for pool in self.pools.values() for z in pool.zygotes]

    def free_cages(self) -> dict[str, int]:
        """Zygotes ready for a job now, by kind (full, light, session), for ``ping``."""
        return {kind: pool.ready.qsize() for kind, pool in self.pools.items()}

    async def start(self) -> None:
        started = time.monotonic()
        results = await asyncio.gather(*(z.start() for z in self.zygotes), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await self.close()
            raise SandboxError(f"warm mode: a zygote did not start: {errors[0]}")
        for pool in self.pools.values():
            for z in pool.zygotes:
                pool.ready.put_nowait(z)
        log.info(
            "warm pools: %d full, %d light and %d session zygote(s) ready in %.1f s",
            len(self.pools["full"].zygotes),
            len(self.pools["light"].zygotes),
            len(self.pools["session"].zygotes),
            time.monotonic() - started,
        )

    async def run(
        self, job: JobSpec, *, on_output: OnOutput | None = None, stop: asyncio.Future[Reason] | None = None,
        name: str | None = None, job_id: str | None = None,
    ) -> Result:  # fmt: skip
        """Run *job* on a zygote of the kind its code needs; the same contract as Cage.run.

        *name* only labels the log when there is no *job_id*: a warm job's host
        resources are named when its child is armed, before the job arrives.
        """
        pool = self.pools["full" if needs_full(job.code) else "light"]
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            try:
                zygote = await self._take(pool, deadline)
            except SandboxError as exc:
                return sandbox_failure(job_id or name or "?", exc)
            assert isinstance(zygote, JobZygote)
            self.busy += 1
            try:
                return await zygote.run(job, on_output=on_output, stop=stop, job_id=job_id)
            except NotHandedOver:
                continue  # nothing ran: the job goes to another zygote
            finally:
                self.busy -= 1
                self._start_recycle(pool, zygote)

    async def open_session(self, session_id: str, files: tuple[InputFile, ...]) -> Session:
        """A session from a session zygote's armed child; SandboxError if none is ready in time."""
        pool = self.pools["session"]
        if not pool.zygotes:
            raise SandboxError("sessions are off here (max_sessions = 0, or no cgroup freezer: see the daemon's log)")
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            zygote = await self._take(pool, deadline)
            assert isinstance(zygote, SessionZygote)
            try:
                return await zygote.open_session(session_id, files)
            except ZygoteGone:
                continue  # nothing of the session started: try the next (or the replaced) zygote
            finally:
                self._start_recycle(pool, zygote)

    async def _take(self, pool: _Pool, deadline: float) -> Zygote:
        """A ready zygote of *pool* (a dead one met on the way is replaced); SandboxError past *deadline*."""
        while True:
            try:
                zygote = await asyncio.wait_for(pool.ready.get(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                why = "; ".join(z.diagnostics() for z in pool.zygotes if z.dead) or "all busy recovering"
                raise SandboxError(f"no {pool.kind} zygote became ready in {READY_TIMEOUT_S:.0f} s ({why})") from None
            if not zygote.dead:
                return zygote
            self._start_recycle(pool, zygote)  # died while it waited: replace it, take another

    def _start_recycle(self, pool: _Pool, zygote: Zygote) -> None:
        task = asyncio.create_task(self._recycle(pool, zygote))
        self._recycling.add(task)
        task.add_done_callback(self._recycling.discard)

    async def _recycle(self, pool: _Pool, zygote: Zygote) -> None:
        """Get the zygote's next child armed, or replace the zygote; then give the slot back."""
        attempt = 0
        while not self._closing:
            try:
                if zygote.dead:
                    raise ZygoteGone("dead")
                if attempt == 0:
                    await zygote.next_ready()
                else:
                    await zygote.start()
                break
            except SandboxError as exc:
                log.warning("%s zygote %d: %s; replacing it", pool.kind, zygote.index, exc)
                if isinstance(zygote, SessionZygote) and zygote.live_sessions and not zygote.dead:
                    # Its sessions live in its cage: it takes no new one, and goes when they end.
                    self._retire(zygote)
                else:
                    await zygote.close()
                if attempt:
                    delay = RESTART_BACKOFF_S[min(attempt - 1, len(RESTART_BACKOFF_S) - 1)]
                    await asyncio.sleep(delay)
                attempt += 1
                fresh = pool.make(zygote.index, pool.kind)
                pool.zygotes[zygote.index] = fresh
                zygote = fresh
        if not self._closing:
            pool.ready.put_nowait(zygote)

    def _retire(self, zygote: SessionZygote) -> None:
        async def when_its_sessions_end() -> None:
            await zygote.sessions_done.wait()
            await zygote.close()

        self._retired.add(zygote)
        task = asyncio.create_task(when_its_sessions_end())
        task.add_done_callback(lambda _: self._retired.discard(zygote))

    async def close(self, grace: float = 0.0) -> None:
        """Stop every zygote, after up to *grace* s for the jobs they run (a reload's old pool)."""
        deadline = time.monotonic() + grace
        while self.busy and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self._closing = True
        for task in list(self._recycling):
            task.cancel()
        await asyncio.gather(*self._recycling, return_exceptions=True)
        # A reload's old pool: its open sessions live on in their zygotes' cages
        # until they end (closed, idle, lifetime, shutdown); only then do those go.
        everyone = [*self.zygotes, *self._retired]
        hosting = [z for z in everyone if isinstance(z, SessionZygote) and z.live_sessions]
        await asyncio.gather(*(z.close() for z in everyone if z not in hosting), return_exceptions=True)
        if hosting:
            log.info("keeping %d session zygote(s) until their sessions end", len(hosting))
            await asyncio.gather(*(z.sessions_done.wait() for z in hosting))
            await asyncio.gather(*(z.close() for z in hosting), return_exceptions=True)
