"""``runnerd serve``: wires the runtime, the scheduler and the front end together.

Signals: the handlers only record the signal; the event loop acts on it.
SIGTERM or SIGINT stops taking new runs (they get BUSY, "shutting down"),
ends queued jobs with reason ``shutdown``, lets running jobs finish for up
to ``shutdown_grace_s``, then kills the rest (reason ``shutdown``), sends
every result and exits 0. A second SIGTERM/SIGINT skips the wait.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from typing import Any

import psutil
import zmq
import zmq.asyncio

from . import PROTOCOL_VERSION, __version__
from .config import Config
from .frontend import Frontend
from .result import Reason
from .runtime import Runtime, open_runtime
from .scheduler import Scheduler

log = logging.getLogger(__name__)

# Time for the last results to leave the sockets before they close.
FLUSH_S = 0.5
# Imported in a probe job before the daemon takes work: a broken env fails start-up.
CORE_LIBRARIES = ("numpy", "pandas", "matplotlib.pyplot")


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.runtime: Runtime | None = None
        self.scheduler: Scheduler | None = None
        self.frontend: Frontend | None = None
        self._signals: asyncio.Queue[int] = asyncio.Queue()
        self._process = psutil.Process()

    def info(self) -> dict[str, Any]:
        return {
            "server": f"runnerd {__version__}",
            "version": __version__,
            "protocol": PROTOCOL_VERSION,
            "pid": os.getpid(),
            "rss_bytes": self._process.memory_info().rss,
        }

    def _on_signal(self, signum: int) -> None:
        self._signals.put_nowait(signum)

    async def run(self) -> int:
        cfg = self.config
        loop = asyncio.get_running_loop()
        self.runtime = await open_runtime(cfg, probe=True, import_check=CORE_LIBRARIES)
        ctx = zmq.asyncio.Context()
        try:
            self.scheduler = Scheduler(
                self.runtime.cage.run,
                concurrency=cfg.concurrency,
                queue_size=cfg.queue_size,
                retention_s=cfg.retention_s,
                retention_max_bytes=cfg.retention_max_bytes,
            )
            self.frontend = Frontend(cfg, self.scheduler, ctx, info=self.info)
            self.frontend.open()
            self.scheduler.start()
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, self._on_signal, signum)
            log.info(
                "runnerd %s serving %s: concurrency %d, queue %d, policy %s, env %s",
                __version__, ", ".join(cfg.bind), cfg.concurrency, cfg.queue_size,
                self.runtime.policy.path, cfg.sandbox_env,
            )  # fmt: skip
            serving = asyncio.create_task(self.frontend.serve(), name="runnerd-frontend")
            evicting = asyncio.create_task(self.scheduler.evict_forever(), name="runnerd-evict")
            signum = await self._signals.get()
            log.info("received %s: shutting down", signal.Signals(signum).name)
            await self._shutdown()
            for task in (serving, evicting):
                task.cancel()
            await asyncio.gather(serving, evicting, return_exceptions=True)
            return 0
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
            if self.scheduler is not None:
                await self.scheduler.close()
            if self.frontend is not None:
                self.frontend.close()
            ctx.term()
            self.runtime.close()

    async def _shutdown(self) -> None:
        sched = self.scheduler
        assert sched is not None
        sched.accepting = False
        sched.refusal = "runnerd is shutting down; retry after it restarts or on another instance"
        ended = sched.end_queued(Reason.SHUTDOWN)
        grace = self.config.shutdown_grace_s
        log.info("waiting up to %.0f s for %d running job(s); ended %d queued job(s)", grace, sched.running, ended)
        deadline = time.monotonic() + grace
        while sched.running and time.monotonic() < deadline:
            try:
                signum = await asyncio.wait_for(self._signals.get(), timeout=0.05)
            except asyncio.TimeoutError:
                continue
            log.info("received %s again: stopping now", signal.Signals(signum).name)
            break
        if sched.running:
            log.info("stopping %d job(s) still running", sched.stop_running(Reason.SHUTDOWN))
            while sched.running:
                await asyncio.sleep(0.02)
        await asyncio.sleep(FLUSH_S)
