"""``runnerd serve``: wires the runtime, the scheduler and the front end together.

Signals: the handlers only record the signal; the event loop acts on it.

* SIGTERM or SIGINT, to the daemon or to its process group (Ctrl-C in a
  terminal: the cages are in sessions of their own, so only the daemon
  hears it): drain, then exit 0. A second SIGTERM/SIGINT skips the wait.
* SIGUSR1 (``runnerd drain``): drain, and stay up, refusing work, until
  stopped.
* The drain: ``ping`` says ``state: "draining"`` at once; new one-off runs
  and opens get DRAINING (a client sends them to another daemon), and so
  do queued one-off runs (they never ran); running jobs get
  ``shutdown_grace_s`` to finish and open sessions serve their runs that
  long (until closed or idle); then what is left is killed (reason
  ``shutdown``) and every session ends (reason shutdown).
* SIGHUP: reload the config file and the policy for *new* jobs. The new
  config goes through every start-up check (and a probe job in a cage made
  from it) first; if anything fails, the daemon logs why and keeps the old
  one. Running jobs and open sessions keep the cage they started with (a
  warm pool retires once its sessions have ended). ``bind``,
  ``state_dir`` and the CURVE server key need a restart (the reload says so
  and keeps them); the authorized client keys are re-read.

Under systemd (Type=notify) it sends READY=1 once its sockets are bound and
the checks passed, STATUS= with the counts, RELOADING=1/READY=1 around a
reload, STOPPING=1, and WATCHDOG=1 at half of WatchdogSec.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psutil
import zmq
import zmq.asyncio

from .. import PROTOCOL_VERSION, __version__
from .. import config as config_mod
from ..config import Config
from ..errors import RunnerdError
from ..result import Reason
from ..sandbox.job import InputFile
from ..sandbox.runtime import Runtime, open_runtime
from ..sandbox.session import Session
from ..sandbox.warm import WarmCage
from .frontend import Frontend
from .metrics import Metrics
from .protocol import INSTANCE
from .scheduler import Scheduler
from .sdnotify import Notifier
from .sessions import SessionManager

log = logging.getLogger(__name__)

# Time for the last results to leave the sockets before they close.
FLUSH_S = 0.5
# Imported in a probe job before the daemon takes work: a broken env fails start-up.
CORE_LIBRARIES = ("numpy", "pandas", "matplotlib.pyplot")
STATUS_INTERVAL_S = 1.0
# Settings a reload cannot change under a running daemon.
RESTART_ONLY = ("bind", "state_dir", "curve_server_key", "metrics_port", "metrics_address", "allow_plaintext_tcp")
DRAIN_POLL_S = 0.05
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
HANDLED_SIGNALS = (*STOP_SIGNALS, signal.SIGHUP, signal.SIGUSR1)


def _event(name: str, message: str, *args: Any, level: int = logging.INFO) -> None:
    log.log(level, message, *args, extra={"event": name})


class Daemon:
    def __init__(
        self, config: Config, *, config_path: Path | None = None, overrides: Mapping[str, Any] | None = None
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.overrides = dict(overrides or {})
        self.runtime: Runtime | None = None
        self.scheduler: Scheduler | None = None
        self.sessions: SessionManager | None = None
        self.frontend: Frontend | None = None
        self.metrics: Metrics | None = None
        self.notifier = Notifier()
        self._signals: asyncio.Queue[int] = asyncio.Queue()
        self._process = psutil.Process()
        self._retiring: set[asyncio.Task[None]] = set()
        self._drain_task: asyncio.Task[None] | None = None
        self._stop_now = asyncio.Event()

    @property
    def draining(self) -> bool:
        return self._drain_task is not None

    def info(self) -> dict[str, Any]:
        """What ``ping`` answers (and ``stats`` includes): who this is, and its load, for clients that place work."""
        s, sessions = self.scheduler, self.sessions
        runner = self.runtime.runner if self.runtime is not None else None
        return {
            "server": f"runnerd {__version__}",
            "version": __version__,
            "protocol": PROTOCOL_VERSION,
            "instance": INSTANCE,
            "pid": os.getpid(),
            "rss_bytes": self._process.memory_info().rss,
            "state": "draining" if self.draining else "ready",
            "running": s.running if s else 0,
            "queued": s.queued if s else 0,
            "concurrency": s.concurrency if s else self.config.concurrency,
            "free_cages": runner.free_cages() if isinstance(runner, WarmCage) else None,
            "sessions_open": sessions.open_count if sessions else 0,
            "max_sessions": self.config.max_sessions,
            "uid_range": list(self.runtime.host.uid_range()) if self.runtime is not None else None,
        }

    def _status(self) -> str:
        s = self.scheduler
        if s is None:
            return "starting"
        return f"{s.running}/{s.concurrency} running, {s.queued} queued, {s.done} done"

    async def _open_session(self, session_id: str, files: tuple[InputFile, ...]) -> Session:
        # The runtime of the moment: after a reload, new sessions come from the new one.
        assert self.runtime is not None
        return await self.runtime.open_session(session_id, files)

    def _on_signal(self, signum: int) -> None:
        self._signals.put_nowait(signum)

    async def run(self) -> int:
        cfg = self.config
        loop = asyncio.get_running_loop()
        _event("starting", "runnerd %s starting (pid %d)", __version__, os.getpid())
        self.runtime = await open_runtime(cfg, probe=True, import_check=CORE_LIBRARIES)
        ctx = zmq.asyncio.Context()
        tasks: list[asyncio.Task[Any]] = []
        try:
            sessions = self.sessions = SessionManager(cfg, self._open_session)
            sched = self.scheduler = Scheduler(
                self.runtime.runner.run,
                concurrency=cfg.concurrency,
                queue_size=cfg.queue_size,
                retention_s=cfg.retention_s,
                retention_max_bytes=cfg.retention_max_bytes,
                sessions=sessions,
                max_queued_per_client=cfg.max_queued_per_client,
                max_queued_per_tenant=cfg.max_queued_per_tenant,
            )
            if cfg.metrics_port:
                self.metrics = Metrics(
                    running=lambda: sched.running,
                    queued=lambda: sched.queued,
                    sessions_open=lambda: sessions.open_count,
                )
                sched.on_finish = self.metrics.job_finished
                sessions.metrics = self.metrics
            self.frontend = Frontend(cfg, sched, ctx, info=self.info, metrics=self.metrics)
            self.frontend.open()
            if self.metrics is not None:
                self.metrics.serve(cfg.metrics_address, cfg.metrics_port)
            sched.start()
            for sig in HANDLED_SIGNALS:
                loop.add_signal_handler(sig, self._on_signal, sig)
            tasks = [
                asyncio.create_task(self.frontend.serve(), name="runnerd-frontend"),
                asyncio.create_task(sessions.sweep_forever(), name="runnerd-sessions"),
                asyncio.create_task(sched.evict_forever(), name="runnerd-evict"),
                asyncio.create_task(self._report_status(), name="runnerd-status"),
            ]
            if self.notifier.watchdog_s:
                tasks.append(asyncio.create_task(self._watchdog(self.notifier.watchdog_s), name="runnerd-watchdog"))
            self.notifier.ready(self._status())
            _event(
                "ready", "runnerd %s serving %s: %s mode, concurrency %d, queue %d, policy %s, env %s",
                __version__, ", ".join(cfg.bind), cfg.mode, cfg.concurrency, cfg.queue_size,
                self.runtime.policy.path, cfg.sandbox_env,
            )  # fmt: skip
            await self._serve_signals()
            await asyncio.sleep(FLUSH_S)  # the last results leave the sockets
            _event("stopped", "runnerd stopped")
            return 0
        finally:
            for signum in HANDLED_SIGNALS:
                loop.remove_signal_handler(signum)
            if self._drain_task is not None and not self._drain_task.done():
                self._drain_task.cancel()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self.scheduler is not None:
                await self.scheduler.close()
            if self.frontend is not None:
                self.frontend.close()
            if self.metrics is not None:
                self.metrics.close()
            ctx.term()
            await self.runtime.aclose()
            for task in list(self._retiring):
                await task
            self.notifier.close()

    async def _serve_signals(self) -> None:
        """Act on signals until a stop signal's drain is done."""
        stopping = False
        while True:
            get = asyncio.ensure_future(self._signals.get())
            waits: set[asyncio.Future[Any]] = {get}
            if stopping and self._drain_task is not None:
                waits.add(self._drain_task)
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            if get not in done:
                get.cancel()
                return  # the drain after a stop signal is done
            signum = get.result()
            name = signal.Signals(signum).name
            if signum == signal.SIGHUP:
                if self.draining:
                    log.warning("received SIGHUP while draining: no reload")
                else:
                    await self._reload()
            elif signum == signal.SIGUSR1:
                if not self.draining:
                    _event("drain", "received SIGUSR1: draining (and staying up)")
                    self._start_drain()
            elif stopping:
                _event("stop_now", "received %s again: stopping now", name)
                self._stop_now.set()
            else:
                stopping = True
                _event("stopping", "received %s: draining, then stopping", name)
                self.notifier.stopping("draining, then stopping")
                if not self.draining:
                    self._start_drain()

    def _start_drain(self) -> None:
        self._drain_task = asyncio.create_task(self._drain(), name="runnerd-drain")

    async def _report_status(self) -> None:
        while True:
            self.notifier.status(self._status())
            await asyncio.sleep(STATUS_INTERVAL_S)

    async def _watchdog(self, interval: float) -> None:
        # The loop being able to run this task is what the watchdog checks.
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval / 2)

    async def _reload(self) -> None:
        self.notifier.reloading()
        _event("reloading", "received SIGHUP: reloading %s", self.config_path or "the defaults")
        old = self.config
        try:
            new = config_mod.load(self.config_path, self.overrides)
            kept = [k for k in RESTART_ONLY if getattr(new, k) != getattr(old, k)]
            if kept:
                log.warning("reload: %s change(s) need a restart; keeping the running value(s)", ", ".join(kept))
                new = dataclasses.replace(new, **{k: getattr(old, k) for k in kept})
            runtime = await open_runtime(new, probe=True, import_check=CORE_LIBRARIES)
        except RunnerdError as exc:
            _event("reload_refused", "reload refused, still serving with the old config: %s", exc, level=logging.ERROR)
            if self.metrics is not None:
                self.metrics.reloads.labels("refused").inc()
            self.notifier.ready(self._status())
            return
        assert self.scheduler is not None and self.frontend is not None and self.runtime is not None
        previous, self.runtime, self.config = self.runtime, runtime, new
        sched = self.scheduler
        sched.runner = runtime.runner.run  # running jobs keep the cage they started with
        sched.queue_size = new.queue_size
        sched.retention.seconds = new.retention_s
        sched.retention.max_bytes = new.retention_max_bytes
        sched.max_queued_per_client = new.max_queued_per_client
        sched.max_queued_per_tenant = new.max_queued_per_tenant
        sched.resize(new.concurrency)
        self.frontend.config = new
        self.frontend.reload_clients()
        # The old runtime (a warm pool's zygotes) goes once its running jobs are done.
        retire = asyncio.create_task(previous.aclose(grace=new.limits.max_timeout + 10))
        self._retiring.add(retire)
        retire.add_done_callback(self._retiring.discard)
        if self.sessions is not None:
            self.sessions.config = new
        if self.metrics is not None:
            self.metrics.reloads.labels("ok").inc()
        logging.getLogger().setLevel(new.log_level.upper())
        _event(
            "reloaded",
            "reloaded: concurrency %d, queue %d, policy %s",
            new.concurrency,
            new.queue_size,
            runtime.policy.path,
        )
        self.notifier.ready(self._status())

    async def _drain(self) -> None:
        """Take no new work; let running jobs and open sessions go on for shutdown_grace_s; then end them."""
        sched, sessions = self.scheduler, self.sessions
        assert sched is not None and sessions is not None
        sessions.accepting = False  # no new session; open ones serve their runs until the end
        refused = sched.drain("runnerd is draining (it is stopping or was told to); send new work to another daemon")
        grace = self.config.shutdown_grace_s
        _event(
            "draining",
            "draining: up to %.0f s for %d running job(s) and %d open session(s); %d queued job(s) refused",
            grace, sched.running, sessions.open_count, refused,
        )  # fmt: skip
        deadline = time.monotonic() + grace
        while (sched.running or sessions.open_count) and time.monotonic() < deadline and not self._stop_now.is_set():
            self.notifier.status(f"draining: {sched.running} job(s) running, {sessions.open_count} session(s) open")
            try:
                await asyncio.wait_for(self._stop_now.wait(), timeout=DRAIN_POLL_S)
            except TimeoutError:
                pass
        if sessions.open_count:
            sched.end_sessions_runs()  # before the running ones stop: a session's next run must not start
        if sched.running:
            _event("killing", "stopping %d job(s) still running (reason shutdown)", sched.stop_running(Reason.SHUTDOWN))
            while sched.running:
                await asyncio.sleep(0.02)
        await sessions.shutdown()
        _event("drained", "drained: no job runs and no session is open")
        self.notifier.status("drained: refusing work")
