"""A session's runs in the scheduler: one at a time, in order, behind its open; answered when it ends.

A run of a session is queued like a job, but only when it is the
session's turn: the others wait in the session's record (``pending``,
bounded by ``session_max_pending_runs``) behind the one queued or running
(``current``). :class:`SessionRuns` is the scheduler's part that keeps
that order; the scheduler (:mod:`.scheduler`) runs them in its slots.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod

from ..errors import JobRejected
from ..result import Reason, SessionEnd
from ..sandbox.session import Session
from . import protocol
from .clients import Client
from .fair_queue import Backlog, FairQueue
from .protocol import ProtocolError, RunRequest
from .records import JobRecord, SessionRecord, State
from .sessions import SessionManager


class SessionRuns(ABC):
    """The scheduler's bookkeeping of sessions' runs (a base of :class:`~.scheduler.Scheduler`)."""

    sessions: SessionManager | None
    _queue: FairQueue[JobRecord]
    _backlog: Backlog

    def _unqueue(self, record: JobRecord) -> None:
        """*record* no longer waits (it starts, or is answered without running)."""
        self._backlog.remove(record.client, record.tenant)

    @abstractmethod
    def _refuse(self, record: JobRecord, code: str, message: str, ended: SessionEnd | None = None) -> None:
        """Answer a run that did not run with an error, and forget it."""

    def _admit_to_session(self, req: RunRequest, client: Client) -> SessionRecord:
        """The session a run goes to; ProtocolError (NOT_FOUND, BUSY, BAD_REQUEST) if it cannot take it."""
        if self.sessions is None:
            raise ProtocolError(protocol.NOT_FOUND, "this server has no sessions")
        assert req.session is not None
        record = self.sessions.live(req.session, client)
        limit = self.sessions.config.session_max_pending_runs
        if (record.busy or record.session is None) and len(record.pending) >= limit:
            raise ProtocolError(
                protocol.BUSY,
                f"session {req.session!r} has a run going and {len(record.pending)} waiting, the limit "
                f"(session_max_pending_runs {limit}); wait for a result",
            )
        if record.session is not None:
            names = [f.name for r in record.pending if r.spec for f in r.spec.files]
            if record.current is not None and record.current.spec is not None:
                names += [f.name for f in record.current.spec.files]
            for f in req.job.files:
                if f.name in names:
                    raise ProtocolError(
                        protocol.BAD_REQUEST, f"session {req.session!r} already has an input file {f.name!r}"
                    )
            try:
                record.session.check_inputs(req.job.files)
            except JobRejected as exc:
                raise ProtocolError(exc.code, str(exc)) from None
        return record

    def _session_of(self, record: JobRecord) -> Session | None:
        """The live session a queued run goes to; None (the run answered NOT_FOUND) if it ended."""
        assert self.sessions is not None and record.session is not None
        srec = record.srec
        if srec is not None and srec.ended is None and srec.session is not None:
            return srec.session
        self._unqueue(record)
        message = self.sessions.how_it_ended(srec) if srec and srec.ended else self.sessions.unknown(record.session)
        self._refuse(record, protocol.NOT_FOUND, message, srec.ended if srec else None)
        return None

    def _next_in_session(self, record: JobRecord) -> None:
        """A session's run ended: its next waiting run (if any) goes to the queue; the idle clock restarts."""
        srec, record.srec = record.srec, None  # a retained result need not keep its session
        if srec is None or self.sessions is None or srec.current is not record:
            return
        srec.last_active = time.monotonic()
        srec.current = None
        if srec.expiring and srec.ended is None:
            self.sessions.end(srec, SessionEnd.MAX_LIFETIME)  # its waiting runs hear NOT_FOUND (max_lifetime)
            return
        self._dispatch_next(srec)

    def _dispatch_next(self, srec: SessionRecord) -> None:
        """The session's first waiting run goes to the queue (it is the session's current run from now)."""
        while srec.pending:
            nxt = srec.pending.popleft()
            if nxt.state is State.QUEUED:
                srec.current = nxt
                self._queue.put(nxt, nxt.tenant)
                return

    def _drop_from_session(self, record: JobRecord) -> None:
        srec = record.srec
        if srec is None:
            return
        if record in srec.pending:
            srec.pending.remove(record)
            record.srec = None
        elif srec.current is record:
            self._next_in_session(record)

    def _session_opened(self, srec: SessionRecord, error: tuple[str, str] | None) -> None:
        """Runs sent while the session opened: the first goes to the queue; all hear it if it did not open."""
        if error is not None:
            while srec.pending:
                record = srec.pending.popleft()
                if record.state is State.QUEUED:
                    self._unqueue(record)
                    self._refuse(record, *error)
            return
        if srec.current is None:
            self._dispatch_next(srec)

    def _session_ended(self, srec: SessionRecord) -> None:
        """A session ended: its waiting runs are answered NOT_FOUND; a running one is cancelled (closed)."""
        assert self.sessions is not None
        message = self.sessions.how_it_ended(srec)
        while srec.pending:
            record = srec.pending.popleft()
            if record.state is State.QUEUED:
                self._unqueue(record)
                self._refuse(record, protocol.NOT_FOUND, message, srec.ended)
        current = srec.current
        if current is not None and current.state is State.RUNNING and current.stop is not None:
            if not current.stop.done() and srec.ended is SessionEnd.CLOSED:
                current.stop.set_result(Reason.CANCELLED)
