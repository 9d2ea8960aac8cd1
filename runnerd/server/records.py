"""What the daemon keeps of a run and of a session while it lives and after, for resends and NOT_FOUND.

The scheduler keeps a :class:`JobRecord` per run id, the session manager a
:class:`SessionRecord` per session id; a session's runs wait in its record
(``pending``, ``current``: :mod:`.session_runs`). Both answer their peers
through :func:`safe_send`.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from ..result import Reason, Result, SessionEnd
from ..sandbox.job import JobSpec
from ..sandbox.session import Session
from . import protocol
from .clients import LOCAL, Client

log = logging.getLogger(__name__)

Send = Callable[[bytes], None]


class State(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"


@dataclass
class Subscriber:
    send: Send
    stream: bool


@dataclass
class JobRecord:
    id: str
    digest: str  # what a resend is compared with, once the spec is gone
    spec: JobSpec | None  # dropped when the job ends: its inputs may be 64 MiB
    state: State = State.QUEUED
    subscribers: dict[Hashable, Subscriber] = field(default_factory=dict)
    chunks: list[tuple[str, int, bytes]] = field(default_factory=list)
    offsets: dict[str, int] = field(default_factory=lambda: {"stdout": 0, "stderr": 0})
    stop: asyncio.Future[Reason] | None = None
    result: Result | None = None
    accepted_at: float = field(default_factory=time.monotonic)
    finished_at: float = 0.0
    size: int = 0
    session: str | None = None  # the session it runs in
    client: Client = LOCAL  # who sent it: max_queued_per_client counts by it
    tenant: str = LOCAL.name  # whose share it is served from (fair_queue.py)
    # That session's record itself: a later session of the same id is another one.
    srec: SessionRecord | None = None

    def chunk_frame(self, stream: str, offset: int, data: bytes) -> bytes:
        return protocol.reply(self.id, stream, data=data, offset=offset)


@dataclass
class SessionRecord:
    id: str
    digest: str
    idle_timeout: float
    client: Client = LOCAL  # who opened it: counted against max_sessions_per_client, and its owner's key
    opened_at: float = field(default_factory=time.monotonic)
    last_active: float = field(default_factory=time.monotonic)
    session: Session | None = None  # None while it opens
    # Opens answered once it is open: (request id, send, a resend of the first?).
    waiters: list[tuple[str, Send, bool]] = field(default_factory=list)
    # Closes sent while it opened: answered once the cage it was getting is gone.
    closers: list[tuple[str, Send]] = field(default_factory=list)
    ended: SessionEnd | None = None
    ended_at: float = 0.0
    # The scheduler's: runs waiting behind the one queued or running.
    pending: deque[JobRecord] = field(default_factory=deque)
    current: JobRecord | None = None
    expiring: bool = False  # past its lifetime: ends once its current run is done
    runs: int = 0

    @property
    def busy(self) -> bool:
        return self.current is not None


def safe_send(send: Send, frame: bytes) -> None:
    """Send, never raising: a transport's problem never reaches the scheduler or the sessions."""
    try:
        send(frame)
    except Exception:
        log.exception("dropping a reply: the send failed")


class Retention:
    """Finished jobs kept for resends: each for ``seconds``, and ``max_bytes`` of results in all (oldest first out)."""

    def __init__(self, seconds: float, max_bytes: int) -> None:
        self.seconds = seconds
        self.max_bytes = max_bytes
        self.bytes = 0
        self._ids: deque[str] = deque()  # in finishing order

    def __len__(self) -> int:
        return len(self._ids)

    def keep(self, record: JobRecord) -> None:
        self._ids.append(record.id)
        self.bytes += record.size

    def evict(self, jobs: dict[str, JobRecord], now: float) -> int:
        """Forget (from *jobs*) those past their time or over the byte budget; returns how many."""
        evicted = 0
        while self._ids:
            record = jobs.get(self._ids[0])
            if record is None:
                self._ids.popleft()
                continue
            if now - record.finished_at < self.seconds and self.bytes <= self.max_bytes:
                break
            self._ids.popleft()
            del jobs[record.id]
            self.bytes -= record.size
            evicted += 1
        return evicted
