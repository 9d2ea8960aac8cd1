"""The scheduler: a bounded queue, concurrency slots, cancel, retention, resend-safe job ids.

Transport-agnostic: it talks to peers only through ``Send`` callables
(one per peer, non-blocking, allowed to drop), so the frontend can route
replies by ZeroMQ identity and tests can drive it without sockets.

Rules:

* at most ``concurrency`` jobs run; up to ``queue_size`` more wait; beyond
  that a run is refused with BUSY at once, with ``retry_after_ms``;
* what waits is served fairly between tenants (:mod:`.fair_queue`): a
  run's ``tenant``, else its client; one tenant may have at most
  ``max_queued_per_tenant`` runs waiting, one client ``max_queued_per_client``;
* draining (:meth:`Scheduler.drain`): new one-off runs get DRAINING (send
  them to another daemon), queued ones too (they never ran); runs of open
  sessions are still taken;
* a job id names one job for as long as it is retained: a ``run`` with an
  id already known (queued, running, or finished less than ``retention_s``
  ago) does not run again; the peer is subscribed and gets ``accepted``,
  the stream so far (with byte offsets, so it can drop what it has seen)
  and the result. The same id with a different job is refused;
* finished jobs are kept ``retention_s`` seconds, and at most
  ``retention_max_bytes`` of results in all (oldest dropped first);
* a peer that disappears costs nothing but its own job's messages: sends
  never block, a send that fails is dropped (the peer can ask again).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Hashable

from ..errors import JobRejected
from ..percentiles import percentiles_ms
from ..result import Outcome, Reason, Result, SessionEnd, SessionState
from . import protocol
from .clients import LOCAL, Client, tenant_of
from .fair_queue import Backlog, FairQueue
from .protocol import ProtocolError, RunRequest
from .records import JobRecord, Retention, Send, State, Subscriber, safe_send
from .session_runs import SessionRuns
from .sessions import SessionManager

log = logging.getLogger(__name__)

# A Runner's run method (sandbox/runner.py): (job, *, on_output, stop, name, job_id) -> Result.
RunFn = Callable[..., Awaitable[Result]]
LATENCY_WINDOW = 1000
RESTART_DELAY_S = 0.05  # before a dead worker's slot gets a new one
RETRY_AFTER_MS = (50, 30_000)  # the bounds of BUSY's hint
SESSIONS_END = "its session ended: runnerd stopped, at the end of its drain (shutdown)"


def _result_size(result: Result) -> int:
    return len(result.stdout) + len(result.stderr) + sum(len(a.data) for a in (*result.figures, *result.files)) + 1024


class Scheduler(SessionRuns):
    def __init__(
        self,
        runner: RunFn,
        *,
        concurrency: int,
        queue_size: int,
        retention_s: float,
        retention_max_bytes: int,
        sessions: SessionManager | None = None,
        max_queued_per_client: int | None = None,
        max_queued_per_tenant: int | None = None,
    ) -> None:
        self.runner = runner
        self.max_queued_per_client = max_queued_per_client
        self.max_queued_per_tenant = max_queued_per_tenant
        self.sessions = sessions
        if sessions is not None:
            sessions.on_session_end = self._session_ended
            sessions.on_session_open = self._session_opened
        self.concurrency = concurrency
        self.queue_size = queue_size
        self.retention = Retention(retention_s, retention_max_bytes)
        self.jobs: dict[str, JobRecord] = {}
        self._queue: FairQueue[JobRecord] = FairQueue()
        self._backlog = Backlog()
        self.running = 0
        self.done = 0
        # For `stats` (always on). metrics.Metrics counts the same jobs for
        # Prometheus, which is off unless configured and keeps its own
        # registry: the two never read each other.
        self.outcomes: Counter[str] = Counter()
        self.reasons: Counter[str] = Counter()
        self._latency: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._run_wall: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._workers: dict[int, asyncio.Task[None]] = {}
        self._idle: set[int] = set()
        self._closing = False
        self._started = time.monotonic()
        self.accepting = True  # False: draining
        self.sessions_ending = False  # the drain's end: sessions' runs are refused too
        self.refusal = "runnerd is draining"
        # Called with (result, seconds from accepted to result) for every finished job.
        self.on_finish: Callable[[Result, float], None] | None = None

    @property
    def queued(self) -> int:
        return self._backlog.total

    @property
    def load(self) -> dict[str, int]:
        """On `accepted` and `result`: what a client placing work sees fresher than its last pong."""
        return {"running": self.running, "queued": self.queued, "concurrency": self.concurrency}

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self.resize(self.concurrency)

    def resize(self, concurrency: int) -> None:
        """Run *concurrency* workers: start more now; extra ones stop when idle (at once if idle now)."""
        self.concurrency = concurrency
        for slot in range(concurrency):
            task = self._workers.get(slot)
            if task is None or task.done():
                self._start_worker(slot)
        for slot, task in list(self._workers.items()):
            if slot >= concurrency and slot in self._idle:
                task.cancel()  # waiting on the queue: nothing is lost

    async def close(self) -> None:
        self._closing = True
        for task in self._workers.values():
            task.cancel()
        await asyncio.gather(*self._workers.values(), return_exceptions=True)

    # ------------------------------------------------------------ requests

    def submit(self, req: RunRequest, peer: Hashable, send: Send, client: Client = LOCAL) -> None:
        """Take a run request (or resubscribe to a known id); ProtocolError (BUSY, BAD_REQUEST) if not."""
        record = self._visible(req.id, client)
        if record is None and req.id in self.jobs:
            raise ProtocolError(protocol.BAD_REQUEST, f"id {req.id!r} cannot be used; choose another (a random one)")
        if record is not None:
            if record.digest != req.digest:
                raise ProtocolError(
                    protocol.BAD_REQUEST,
                    f"id {req.id!r} already names a different job; use a new id for new code",
                )
            self._subscribe(record, peer, Subscriber(send, req.stream), replay=True)
            return
        if not self.accepting and req.session is None:
            raise ProtocolError(protocol.DRAINING, self.refusal)  # an open session's runs are still served
        if self.sessions_ending and req.session is not None:
            raise ProtocolError(protocol.NOT_FOUND, SESSIONS_END, ended=SessionEnd.SHUTDOWN.value)
        if self.queued + self.running >= self.concurrency + self.queue_size:
            raise ProtocolError(
                protocol.BUSY,
                f"{self.running} jobs running and {self.queued} queued (queue_size {self.queue_size}); retry later",
                retry_after_ms=self.retry_after_ms(self.queued + 1),
            )
        tenant = tenant_of(req.tenant, client)
        self._backlog.admit(
            client, tenant, self.max_queued_per_client, self.max_queued_per_tenant, lambda: self.retry_after_ms(1)
        )
        session = self._admit_to_session(req, client) if req.session is not None else None
        record = JobRecord(
            id=req.id, digest=req.digest, spec=req.job, session=req.session, srec=session, client=client, tenant=tenant
        )
        self.jobs[req.id] = record
        self._backlog.add(client, tenant)
        self._subscribe(record, peer, Subscriber(send, req.stream), replay=False)
        if session is None:
            self._queue.put(record, tenant)
        elif session.busy or session.session is None:
            # Its turn comes when the session's current run ends, or once it is open.
            session.pending.append(record)
        else:
            session.current = record
            self._queue.put(record, tenant)

    def retry_after_ms(self, ahead: int) -> int:
        """How long until *ahead* runs have left the queue, at the recent mean run time (BUSY's hint)."""
        mean = sum(self._run_wall) / len(self._run_wall) if self._run_wall else 0.1
        low, high = RETRY_AFTER_MS
        return int(min(high, max(low, 1000 * mean * ahead / max(1, self.concurrency))))

    def _subscribe(self, record: JobRecord, peer: Hashable, sub: Subscriber, *, replay: bool) -> None:
        known = peer in record.subscribers
        record.subscribers[peer] = sub
        accepted = protocol.reply(record.id, "accepted", state=record.state.value, duplicate=replay, load=self.load)
        safe_send(sub.send, accepted)
        if replay and not known and sub.stream:
            for stream, offset, data in record.chunks:
                safe_send(sub.send, record.chunk_frame(stream, offset, data))
        if record.result is not None:
            safe_send(sub.send, protocol.result_reply(record.id, record.result, self.load))

    def _visible(self, job_id: str, client: Client) -> JobRecord | None:
        """The job *job_id*, unless another CURVE key sent it: then it is none of *client*'s."""
        record = self.jobs.get(job_id)
        if record is not None and record.client.key is not None and record.client.key != client.key:
            return None
        return record

    def cancel(self, job_id: str, send: Send, client: Client = LOCAL) -> None:
        """Cancel a queued or running job; NOT_FOUND if there is none with that id."""
        record = self._visible(job_id, client)
        if record is None or record.state is State.DONE:
            why = "has already finished" if record else "is not queued or running"
            raise ProtocolError(protocol.NOT_FOUND, f"no job to cancel: {job_id!r} {why}")
        safe_send(send, protocol.reply(job_id, "cancelling", state=record.state.value))
        if record.state is State.QUEUED:
            self._withdraw(record)
            srec = record.srec
            self._drop_from_session(record)
            state = SessionState(id=srec.id, alive=srec.ended is None, ended=srec.ended) if srec else None
            self._finish(record, Result(outcome=Outcome.FAILED, reason=Reason.CANCELLED, session=state), wall_s=0.0)
        elif record.stop is not None and not record.stop.done():
            record.stop.set_result(Reason.CANCELLED)

    def drain(self, message: str) -> int:
        """Take no new one-off run (DRAINING, *message*); queued ones are answered so too. Returns how many.

        Runs of sessions (queued, or sent later while the session is open) are
        kept: a session serves its runs until it ends.
        """
        self.accepting = False
        self.refusal = message
        return self.refuse_queued(
            protocol.DRAINING, f"{message}: this job was queued and did not run; send it to another daemon",
            sessions=False,
        )  # fmt: skip

    def refuse_queued(self, code: str, message: str, *, sessions: bool = True, ended: SessionEnd | None = None) -> int:
        """Answer every queued job (with *sessions*, sessions' runs too, *ended* saying how) with an error; how many."""
        count = 0
        for record in list(self.jobs.values()):
            if record.state is State.QUEUED and (sessions or record.session is None):
                self._withdraw(record)
                self._drop_from_session(record)
                self._refuse(record, code, message, ended if record.session is not None else None)
                count += 1
        return count

    def _withdraw(self, record: JobRecord) -> None:
        """A queued run answered without running: it no longer waits, in the counts or in the queue."""
        self._unqueue(record)
        self._queue.remove(record, record.tenant)

    def end_sessions_runs(self) -> int:
        """The drain's end: no session's run starts any more; the queued ones hear that their session ends."""
        self.sessions_ending = True
        return self.refuse_queued(protocol.NOT_FOUND, SESSIONS_END, ended=SessionEnd.SHUTDOWN)

    def stop_running(self, reason: Reason) -> int:
        """Ask every running job to stop with *reason* (its cage is killed); returns how many."""
        count = 0
        for record in self.jobs.values():
            if record.state is State.RUNNING and record.stop is not None and not record.stop.done():
                record.stop.set_result(reason)
                count += 1
        return count

    # ------------------------------------------------------------ running

    async def _worker(self, slot: int) -> None:
        while slot < self.concurrency:
            self._idle.add(slot)
            try:
                record, ticket = await self._queue.get()
            finally:
                self._idle.discard(slot)
            started = time.monotonic()
            ran = False
            try:
                ran = await self._run_one(record)
            except asyncio.CancelledError:
                raise
            except Exception:
                # The bookkeeping around a run failed (not the run: the runner's
                # failures are results). The job still gets an answer, and the slot lives on.
                log.exception("job %s: runnerd failed around it", record.id)
                self._internal_error(record)
            finally:
                self._queue.done(ticket, time.monotonic() - started if ran else 0.0)
        self._workers.pop(slot, None)

    def _supervise(self, slot: int, task: asyncio.Task[None]) -> None:
        """A worker that died (a bug) is logged and replaced: a slot is never lost."""
        if task.cancelled() or self._workers.get(slot) is not task:
            return
        exc = task.exception()
        if exc is not None and slot < self.concurrency:
            log.error("slot %d: its worker died; starting another", slot, exc_info=exc)
            # Not at once: a worker that dies at its start would spin.
            asyncio.get_running_loop().call_later(RESTART_DELAY_S, self._restart, slot)

    def _restart(self, slot: int) -> None:
        task = self._workers.get(slot)
        if (task is None or task.done()) and slot < self.concurrency and not self._closing:
            self._start_worker(slot)

    def _start_worker(self, slot: int) -> None:
        task = asyncio.create_task(self._worker(slot), name=f"runnerd-slot-{slot}")
        task.add_done_callback(functools.partial(self._supervise, slot))
        self._workers[slot] = task

    async def _run_one(self, record: JobRecord) -> bool:
        """Run *record*; False if it did not run (cancelled, or its session ended, while it waited)."""
        if record.state is not State.QUEUED:
            return False  # cancelled while it waited
        runner = self.runner
        if record.session is not None:
            session = self._session_of(record)
            if session is None:
                return False  # the session ended while the run waited: answered NOT_FOUND
            runner = session.run
        self._unqueue(record)
        self.running += 1
        record.state = State.RUNNING
        record.stop = asyncio.get_running_loop().create_future()
        started = time.monotonic()
        assert record.spec is not None  # dropped only when the job ends
        try:
            result = await runner(
                record.spec,
                on_output=lambda s, d, r=record: self._output(r, s, d),
                stop=record.stop,
                job_id=record.id,
            )
        except JobRejected as exc:
            # A session's run refused before anything ran (an input name its /work has).
            self._refuse(record, exc.code, str(exc))
            self._next_in_session(record)
            return False
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("job %s: the runner failed", record.id)
            result = Result(
                outcome=Outcome.FAILED, reason=Reason.SANDBOX_ERROR, warnings=("internal error in runnerd",)
            )
        finally:
            self.running -= 1
        self._finish(record, result, wall_s=time.monotonic() - started)
        self._next_in_session(record)
        return True

    def _internal_error(self, record: JobRecord) -> None:
        """Answer *record* with INTERNAL (unless it was answered), keep the counters true, free its session."""
        if record.state is State.QUEUED:
            self._unqueue(record)
        if record.state is not State.DONE:  # _finish packs the reply before it marks the job done
            record.state = State.DONE
            record.spec = None
            self.jobs.pop(record.id, None)
            frame = protocol.error_reply(
                record.id, protocol.INTERNAL, "runnerd failed while handling this job (its log says why); resend it"
            )
            for sub in list(record.subscribers.values()):
                safe_send(sub.send, frame)
        try:
            self._next_in_session(record)
        except Exception:
            log.exception("job %s: its session's next run could not start", record.id)

    def _refuse(self, record: JobRecord, code: str, message: str, ended: SessionEnd | None = None) -> None:
        """Answer a run that did not run with an error, and forget it (the id is free again)."""
        record.state = State.DONE
        self.jobs.pop(record.id, None)
        frame = protocol.error_reply(record.id, code, message, ended.value if ended else None)
        for sub in record.subscribers.values():
            safe_send(sub.send, frame)

    def _output(self, record: JobRecord, stream: str, data: bytes) -> None:
        offset = record.offsets[stream]
        record.offsets[stream] = offset + len(data)
        record.chunks.append((stream, offset, data))
        record.size += len(data)
        frame: bytes | None = None
        for sub in list(record.subscribers.values()):
            if sub.stream:
                frame = frame or record.chunk_frame(stream, offset, data)
                safe_send(sub.send, frame)

    def _finish(self, record: JobRecord, result: Result, *, wall_s: float) -> None:
        frame = protocol.result_reply(record.id, result, self.load)  # first: if it cannot be packed, nothing changed
        record.state = State.DONE
        record.result = result
        record.spec = None
        record.finished_at = time.monotonic()
        record.size += _result_size(result)
        self.done += 1
        self.outcomes[result.outcome.value] += 1
        self.reasons[result.reason.value if result.reason else "none"] += 1
        latency = record.finished_at - record.accepted_at
        self._latency.append(latency)
        if wall_s:
            self._run_wall.append(wall_s)
        u = result.usage
        fields = {
            "id": record.id, "outcome": result.outcome.value, "reason": result.reason.value if result.reason else None,
            "wall_s": u.wall_s, "cpu_s": u.cpu_s, "peak_bytes": u.max_rss_bytes,
            "queued_s": round(max(0.0, latency - wall_s), 4), "session": record.session,
        }  # fmt: skip
        log.info(
            "job %s %s reason=%s wall=%.3fs cpu=%.3fs peak=%.1fMiB queued=%.3fs%s",
            record.id, fields["outcome"], fields["reason"] or "-", u.wall_s, u.cpu_s, u.max_rss_bytes / 2**20,
            fields["queued_s"], f" session={record.session}" if record.session else "", extra={"job": fields},
        )  # fmt: skip
        if self.on_finish is not None:
            try:
                self.on_finish(result, latency)
            except Exception:
                log.exception("the job-finished hook failed")
        for sub in list(record.subscribers.values()):
            safe_send(sub.send, frame)
        self.retention.keep(record)
        self.evict()

    # ------------------------------------------------------------ retention and stats

    def evict(self, now: float | None = None) -> int:
        """Forget finished jobs past retention or over the byte budget; returns how many."""
        return self.retention.evict(self.jobs, time.monotonic() if now is None else now)

    async def evict_forever(self, interval: float = 5.0) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                self.evict()
            except Exception:
                log.exception("evicting finished jobs failed; it goes on")

    def stats(self) -> dict[str, object]:
        return {
            **({"sessions": self.sessions.stats()} if self.sessions is not None else {}),
            "running": self.running,
            "queued": self.queued,
            "draining": not self.accepting,
            "tenants_waiting": len(self._backlog.by_tenant),
            "done": self.done,
            "retained": len(self.retention),
            "retained_bytes": self.retention.bytes,
            "concurrency": self.concurrency,
            "queue_size": self.queue_size,
            "outcomes": dict(self.outcomes),
            "reasons": dict(self.reasons),
            "latency_ms": percentiles_ms(list(self._latency)),
            "run_ms": percentiles_ms(list(self._run_wall)),
            "uptime_s": round(time.monotonic() - self._started, 1),
        }
