"""The daemon's sessions: open, close, the idle and lifetime clocks, capacity, how each one ended.

A session (:class:`~runnerd.sandbox.session.Session`) is opened by the
runtime (cold: its own nsjail; warm: a session zygote's armed child) and
then runs one run at a time: the scheduler queues a session's runs behind
each other (:mod:`.session_runs`) and runs each in a slot like a
job. This module keeps what outlives a session's cage: its record, so that
a run, close or resend for a session that ended is answered NOT_FOUND with
how it ended, for as long as job results are retained.

Rules:

* at most ``max_sessions`` open (or opening); and an open is refused while
  the open sessions use ``session_memory_budget`` or more: BUSY naming the
  limit. A live session is never ended to make room;
* a session ends after ``idle_timeout`` without a run (its own, at most
  ``session_max_idle_timeout_s``), ``session_max_lifetime_s`` after it
  opened (after its running run, if one runs), when its process dies
  (memory limit, exit, killed from outside), on close, and at shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from ..config import Config
from ..errors import RunnerdError
from ..explain import SESSION_ENDS
from ..result import SessionEnd
from ..sandbox.job import InputFile
from ..sandbox.session import Session
from . import protocol
from .clients import LOCAL, Client
from .protocol import CloseRequest, OpenRequest, ProtocolError
from .records import Send, SessionRecord, safe_send

if TYPE_CHECKING:
    from .metrics import Metrics

log = logging.getLogger(__name__)

Opener = Callable[[str, tuple[InputFile, ...]], Awaitable[Session]]
SWEEP_INTERVAL_S = 0.25
# Resends of an open that wait for the same session to finish opening.
MAX_OPEN_WAITERS = 16
# How often idle sessions are looked at for a kill from outside they cannot act on (cgroup v1).
KILL_CHECK_INTERVAL_S = 2.0

# The setting behind an end, named beside the one sentence for it (explain.SESSION_ENDS).
_SETTING = {
    SessionEnd.IDLE_TIMEOUT: "its idle_timeout, {idle:g} s",
    SessionEnd.MAX_LIFETIME: "session_max_lifetime_s, {lifetime:g} s",
    SessionEnd.INTERRUPT_IGNORED: "session_interrupt_grace_s, {grace:g} s",
}


class SessionManager:
    def __init__(self, config: Config, opener: Opener, *, metrics: Metrics | None = None) -> None:
        self.config = config
        self.opener = opener
        self.metrics = metrics
        self.records: dict[str, SessionRecord] = {}
        self._ended_order: deque[str] = deque()
        self._tasks: set[asyncio.Future[Any]] = set()
        self._opening: set[asyncio.Future[Any]] = set()
        self.opened = 0
        self.ends: Counter[str] = Counter()
        self.accepting = True
        self.started = time.monotonic()
        self._kill_checked = 0.0
        self._open_slots = asyncio.Semaphore(config.concurrency)
        # Set by the scheduler: stops a run (closed or expired session) and answers queued ones.
        self.on_session_end: Callable[[SessionRecord], None] | None = None
        # Set by the scheduler: runs sent before the session was open go now (or hear why it did not open).
        self.on_session_open: Callable[[SessionRecord, tuple[str, str] | None], None] | None = None

    # ------------------------------------------------------------ requests

    @property
    def open_count(self) -> int:
        return sum(1 for r in self.records.values() if r.ended is None)

    def limits(self, record: SessionRecord) -> dict[str, Any]:
        c, lim = self.config, self.config.limits
        return {
            "idle_timeout": record.idle_timeout,
            "max_lifetime": c.session_max_lifetime_s,
            "run_timeout": lim.max_timeout,
            "memory_bytes": record.session.policy.limits.memory_bytes if record.session else 0,
            "pids": record.session.policy.limits.pids if record.session else 0,
            "scratch_bytes": lim.scratch_bytes,
            "max_pending_runs": c.session_max_pending_runs,
        }

    def unknown(self, session_id: str) -> str:
        up = time.monotonic() - self.started
        return (
            f"no session {session_id!r} here: this daemon started {up:.0f} s ago, and sessions end when the daemon "
            f"stops or restarts; one that ended more than retention_s ({self.config.retention_s:g} s) ago is "
            "forgotten. Open a new one (op open)"
        )

    def how_it_ended(self, record: SessionRecord) -> str:
        assert record.ended is not None
        c = self.config
        setting = _SETTING.get(record.ended, "").format(
            idle=record.idle_timeout, lifetime=c.session_max_lifetime_s, grace=c.session_interrupt_grace_s
        )
        how = SESSION_ENDS[record.ended] + (f" ({setting})" if setting else "")
        return f"session {record.id!r} ended: {how} ({record.ended.value})"

    def _visible(self, session_id: str, client: Client) -> SessionRecord | None:
        """The record of *session_id*, unless it belongs to another CURVE key: then it is none of *client*'s."""
        record = self.records.get(session_id)
        if record is not None and record.client.key is not None and record.client.key != client.key:
            return None
        return record

    def live(self, session_id: str, client: Client = LOCAL) -> SessionRecord:
        """The open session *session_id*; ProtocolError NOT_FOUND saying why there is none."""
        record = self._visible(session_id, client)
        if record is None:
            raise ProtocolError(protocol.NOT_FOUND, self.unknown(session_id))
        if record.ended is not None:
            raise ProtocolError(protocol.NOT_FOUND, self.how_it_ended(record), ended=_word(record))
        if record.expiring:
            raise ProtocolError(
                protocol.NOT_FOUND,
                f"session {session_id!r} is ending: open for the maximum lifetime "
                f"({self.config.session_max_lifetime_s:g} s) (max_lifetime)",
                # It takes no more runs and ends so once its last run is done: clients may read it as ended.
                ended=SessionEnd.MAX_LIFETIME.value,
            )
        return record

    def open(self, req: OpenRequest, send: Send, client: Client = LOCAL) -> None:
        record = self._visible(req.session, client)
        if record is None and req.session in self.records:
            # Another key's: this one cannot have it, nor learn that it exists.
            raise ProtocolError(
                protocol.BAD_REQUEST, f"session id {req.session!r} cannot be used; choose another (a random one)"
            )
        if record is not None:
            if record.ended is not None:
                raise ProtocolError(protocol.NOT_FOUND, self.how_it_ended(record), ended=_word(record))
            if record.digest != req.digest:
                raise ProtocolError(
                    protocol.BAD_REQUEST,
                    f"session {req.session!r} is already open with other files or idle_timeout; use a new session id",
                )
            if record.session is None:
                if len(record.waiters) >= MAX_OPEN_WAITERS:
                    raise ProtocolError(
                        protocol.BUSY, f"session {req.session!r} is opening, with {MAX_OPEN_WAITERS} opens waiting"
                    )
                record.waiters.append((req.id, send, True))
            else:
                send(self._opened(req.id, record, duplicate=True))
            return
        c = self.config
        if not self.accepting:
            raise ProtocolError(protocol.DRAINING, "runnerd is draining (stopping); open the session on another daemon")
        if c.max_sessions == 0:
            raise ProtocolError(protocol.BUSY, "sessions are off on this server (max_sessions = 0)")
        idle = c.session_idle_timeout_s if req.idle_timeout is None else req.idle_timeout
        if idle > c.session_max_idle_timeout_s:
            raise ProtocolError(
                protocol.BAD_REQUEST,
                f"idle_timeout {idle:g} s is above this server's maximum, {c.session_max_idle_timeout_s:g} s",
            )
        if self.open_count >= c.max_sessions:
            raise ProtocolError(
                protocol.BUSY, f"{self.open_count} sessions are open, the limit (max_sessions {c.max_sessions})"
            )
        held = sum(1 for r in self.records.values() if r.ended is None and r.client == client)
        if held >= c.max_sessions_per_client:
            raise ProtocolError(
                protocol.BUSY,
                f"this client ({client.name}) has {held} sessions open, the limit "
                f"(max_sessions_per_client {c.max_sessions_per_client}); close one first",
            )
        used = self.memory_bytes()
        if used >= c.session_memory_budget:
            raise ProtocolError(
                protocol.BUSY,
                f"open sessions use {used >> 20} MiB, the session memory budget "
                f"(session_memory_budget {c.session_memory_budget >> 20} MiB); close one or retry later",
            )
        record = SessionRecord(id=req.session, digest=req.digest, idle_timeout=idle, client=client)
        record.waiters.append((req.id, send, False))
        self.records[req.session] = record
        self._opening.add(self._spawn(self._open(record, req.files)))

    async def _open(self, record: SessionRecord, files: tuple[InputFile, ...]) -> None:
        started = time.monotonic()
        try:
            async with self._open_slots:  # a cold open is an nsjail start: as many at once as jobs run
                session = await self.opener(record.id, files)
        except asyncio.CancelledError:
            # The daemon is stopping: what the open had made is gone already (the opener's cleanup).
            if self.records.get(record.id) is record and record.ended is None:
                del self.records[record.id]
            for request_id, send, _ in record.waiters:
                safe_send(
                    send,
                    protocol.error_reply(
                        request_id, protocol.DRAINING, "runnerd stopped before the session opened; open it elsewhere"
                    ),
                )
            self._answer_closers(record)
            raise
        except Exception as exc:
            # Nothing was opened: the id is free again, and the client hears why.
            if self.records.get(record.id) is record and record.ended is None:
                del self.records[record.id]
            self._answer_closers(record)
            code = getattr(exc, "code", None) or protocol.INTERNAL
            if not isinstance(exc, RunnerdError):
                log.exception("session %s: opening failed", record.id)
            else:
                log.error("session %s: opening failed: %s", record.id, exc)
            message = f"cannot open session {record.id!r}: {exc}"
            for request_id, send, _ in record.waiters:
                safe_send(send, protocol.error_reply(request_id, code, message))
            if self.on_session_open is not None:
                self.on_session_open(record, (code, message))
            return
        session.on_end = lambda s, why: self._ended(record, why)
        record.session = session
        record.last_active = time.monotonic()
        self.opened += 1
        ms = (time.monotonic() - started) * 1000
        log.info(
            "session %s opened in %.1f ms (%s mode, idle timeout %g s)", record.id, ms, self.config.mode,
            record.idle_timeout, extra={"session": {"id": record.id, "event": "opened", "open_ms": round(ms, 2)}},
        )  # fmt: skip
        if self.metrics is not None:
            self.metrics.sessions_opened.inc()
        waiters, record.waiters = record.waiters, []
        if record.ended is not None:  # closed (or the daemon stopping) while it opened
            await session.end(record.ended)
            for request_id, send, _ in waiters:
                safe_send(
                    send, protocol.error_reply(request_id, protocol.NOT_FOUND, self.how_it_ended(record), _word(record))
                )
            self._answer_closers(record)
            return
        for request_id, send, duplicate in waiters:
            safe_send(send, self._opened(request_id, record, duplicate=duplicate))
        if self.on_session_open is not None:
            self.on_session_open(record, None)

    def _answer_closers(self, record: SessionRecord) -> None:
        for request_id, send in record.closers:
            safe_send(send, protocol.reply(request_id, "closed", session=record.id))
        record.closers = []

    def _opened(self, request_id: str, record: SessionRecord, *, duplicate: bool) -> bytes:
        return protocol.reply(request_id, "opened", session=record.id, duplicate=duplicate, limits=self.limits(record))

    def close(self, req: CloseRequest, send: Send, client: Client = LOCAL) -> None:
        record = self.live(req.session, client)
        self.end(record, SessionEnd.CLOSED, reply=(req.id, send))

    def end(self, record: SessionRecord, reason: SessionEnd, reply: tuple[str, Send] | None = None) -> None:
        """End *record*'s session for *reason*: refuse its runs from now, stop the running one, tear it down."""
        if record.ended is None:
            self._ended(record, reason)

        async def teardown() -> None:
            if record.session is None:
                if reply is not None:
                    record.closers.append(reply)  # _open ends what it got, then answers
                return
            await record.session.end(reason)
            if reply is not None:
                safe_send(reply[1], protocol.reply(reply[0], "closed", session=record.id))

        self._spawn(teardown())

    def _ended(self, record: SessionRecord, reason: SessionEnd) -> None:
        """Bookkeeping, once per session, whoever saw the end first (the session itself, or us)."""
        if record.ended is not None:
            return
        record.ended = reason
        record.ended_at = time.monotonic()
        self.ends[reason.value] += 1
        self._ended_order.append(record.id)
        if self.metrics is not None:
            self.metrics.sessions_ended.labels(reason.value).inc()
        runs = record.session.runs if record.session else 0
        log.info(
            "session %s ended: %s after %d run(s), open %.1f s", record.id, reason.value, runs,
            record.ended_at - record.opened_at,
            extra={"session": {"id": record.id, "event": "ended", "reason": reason.value, "runs": runs}},
        )  # fmt: skip
        if self.on_session_end is not None:
            self.on_session_end(record)

    # ------------------------------------------------------------ clocks, capacity, stats

    def memory_bytes(self) -> int:
        return sum(r.session.memory_bytes() for r in self.records.values() if r.session and r.ended is None)

    async def sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            try:
                self.sweep()
            except Exception:
                log.exception("the sessions' sweep failed; it goes on")  # the clocks must never stop

    def sweep(self, now: float | None = None) -> None:
        """End idle and expired sessions; forget ended ones past retention."""
        now = time.monotonic() if now is None else now
        check_kills = now - self._kill_checked >= KILL_CHECK_INTERVAL_S
        if check_kills:
            self._kill_checked = now
        for record in list(self.records.values()):
            try:
                self._sweep_one(record, now, check_kills)
            except Exception:
                log.exception("session %s: its sweep failed; skipped this time", record.id)
        retention = self.config.retention_s
        while self._ended_order:
            gone = self.records.get(self._ended_order[0])
            if gone is not None and gone.ended is not None and now - gone.ended_at < retention:
                break
            self._ended_order.popleft()
            if gone is not None and gone.ended is not None:
                del self.records[gone.id]

    def _sweep_one(self, record: SessionRecord, now: float, check_kills: bool) -> None:
        if record.ended is not None or record.session is None:
            return
        if not record.busy and record.session.broken(deep=check_kills):
            # A frozen OOM victim (the sessions' budget ran out) is ended memory_limit.
            self.end(record, record.session.end_reason(None))
        elif now - record.opened_at >= self.config.session_max_lifetime_s:
            record.expiring = True
            if not record.busy:
                self.end(record, SessionEnd.MAX_LIFETIME)
        elif not record.busy and now - record.last_active >= record.idle_timeout:
            self.end(record, SessionEnd.IDLE_TIMEOUT)

    def stats(self) -> dict[str, Any]:
        return {
            "open": self.open_count,
            "opened": self.opened,
            "closed": self.ends.get(SessionEnd.CLOSED.value, 0),
            "ended": dict(self.ends),
            "max_sessions": self.config.max_sessions,
            "memory_budget_bytes": self.config.session_memory_budget,
            "memory_bytes": self.memory_bytes(),
        }

    async def shutdown(self) -> None:
        """End every session (reason shutdown) and wait until their cages are gone; opens in flight are given up."""
        self.accepting = False
        for task in list(self._opening):
            task.cancel()
        for record in list(self.records.values()):
            if record.ended is None:
                self.end(record, SessionEnd.SHUTDOWN)
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def _spawn(self, coro: Awaitable[None]) -> asyncio.Future[None]:
        task: asyncio.Future[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(self._opening.discard)
        return task


def _word(record: SessionRecord) -> str | None:
    return record.ended.value if record.ended is not None else None
