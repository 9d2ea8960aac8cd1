"""The protocol state machines both clients drive: what a client knows of a run, a request and a session, without I/O.

:mod:`runnerd.client` and :mod:`runnerd.async_client` own the sockets and
the clocks; everything here is pure (it is handed ``now`` and the decoded
replies) and unit-tested without a daemon. The events a run yields
(:class:`Accepted`, :class:`Output`, :class:`Finished`) are defined here and
re-exported by ``runnerd.client``. Frames are :mod:`runnerd.wire`'s: no part
of the daemon is imported.
"""

from __future__ import annotations

import re
import uuid
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from . import wire
from .errors import ClientError, RemoteError, SessionLost
from .fleet.placement import Pin
from .result import Result, SessionEnd

WAIT_MARGIN_S = 30.0
# An open that got no answer in time is closed (the daemon may open it yet): how long its close is given.
# Long enough for the close to leave the socket; its answer may come later, once the open is done, and
# nothing waits for it.
ABANDON_WAIT_S = 1.0

Files = Mapping[str, bytes] | None


@dataclass(frozen=True)
class Accepted:
    id: str
    state: str


@dataclass(frozen=True)
class Output:
    id: str
    stream: str  # "stdout" or "stderr"
    data: bytes


@dataclass(frozen=True)
class Finished:
    id: str
    result: Result


Event = Accepted | Output | Finished


def new_id() -> str:
    return uuid.uuid4().hex


def _file_bytes(files: Files) -> dict[str, bytes]:
    return {name: bytes(data) for name, data in (files or {}).items()}


def _wire_files(files: Files) -> list[dict[str, Any]]:
    return [{"name": name, "data": data} for name, data in _file_bytes(files).items()]


def _run_request(
    job_id: str, code: str, files: Files, timeout: float | None, stream: bool, session: str | None = None,
    tenant: str | None = None,
) -> bytes:  # fmt: skip
    fields: dict[str, Any] = {"code": code, "stream": stream}
    if tenant is not None:
        fields["tenant"] = tenant
    if files:
        fields["files"] = _wire_files(files)
    if timeout is not None:
        fields["timeout"] = timeout
    if session is not None:
        fields["session"] = session
    return wire.request("run", job_id, **fields)


def _wait_for(timeout: float | None, wait: float | None) -> float:
    if wait is not None:
        return wait
    return (timeout if timeout is not None else 30.0) + WAIT_MARGIN_S


def _run_plan(
    code: str, files: Files, timeout: float | None, wait: float | None, job_id: str | None, stream: bool, *,
    session: str | None = None, default_timeout: float | None = None, tenant: str | None = None,
) -> tuple[str, bytes, float]:  # fmt: skip
    """A run's id (*job_id*, else a new one), its request, and how long to wait for its result.

    Unsaid, the wait follows *timeout*, else *default_timeout* (a session's
    run cap), else the daemon's default, plus a margin.
    """
    job_id = job_id or new_id()
    request = _run_request(job_id, code, files, timeout, stream, session, tenant)
    return job_id, request, _wait_for(timeout if timeout is not None else default_timeout, wait)


def _remote_error(msg: Mapping[str, Any]) -> RemoteError:
    ended = msg.get("ended")
    return RemoteError(str(msg.get("code")), str(msg.get("message")), ended if isinstance(ended, str) else None)


class _Tracker:
    """Turns the replies to one run into events, dropping what a resend repeats."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self.seen = {"stdout": 0, "stderr": 0}
        self.accepted = False

    def events(self, msg: dict[str, Any]) -> list[Event]:
        kind = msg.get("type")
        if kind == "error":
            raise _remote_error(msg)
        if kind == "accepted":
            if self.accepted:
                return []
            self.accepted = True
            return [Accepted(self.job_id, str(msg.get("state", "")))]
        if kind in ("stdout", "stderr"):
            data = msg.get("data", b"")
            offset = msg.get("offset")
            if not isinstance(data, bytes):
                raise ClientError(f"malformed {kind} chunk from the daemon")
            if isinstance(offset, int):
                already = self.seen[kind] - offset
                if already >= len(data):
                    return []
                data = data[max(0, already) :]
            self.seen[kind] += len(data)
            return [Output(self.job_id, kind, data)]
        if kind == "result":
            return [Finished(self.job_id, Result.from_wire(msg))]
        return []  # a reply type this client does not know: ignore (forward compatible)


class _RunExchange:
    """The resend and deadline policy of one run, without I/O: the sync and the async client both drive it.

    The request goes out again after ``resend_interval`` of silence (the
    daemon knows the id: a resend is idempotent); the run fails with
    ClientError once *wait* seconds pass without a result.
    """

    def __init__(self, job_id: str, wait: float, resend_interval: float, endpoint: str, now: float) -> None:
        self.tracker = _Tracker(job_id)
        self.job_id = job_id
        self.wait = wait
        self.deadline = now + wait
        self.resend_interval = resend_interval
        self.endpoint = endpoint
        self.heard = now

    def timeout(self, now: float) -> float:
        """How long to wait for the next reply; ClientError once the run's time is up."""
        if now >= self.deadline:
            raise ClientError(f"no result for job {self.job_id} from {self.endpoint} within {self.wait:.0f} s")
        return min(self.deadline - now, self.resend_interval)

    def resend_due(self, now: float) -> bool:
        """After a wait with no reply: True when the request must go out again (and it is taken as sent)."""
        if now - self.heard >= self.resend_interval:
            self.heard = now
            return True
        return False

    def events(self, msg: dict[str, Any], now: float) -> list[Event]:
        if msg.get("id") != self.job_id:
            return []  # a late reply to an earlier request on this socket
        self.heard = now
        return self.tracker.events(msg)


class _Ask:
    """One request answered by one reply (ping, open, close, ...), without I/O.

    ``request`` is the frame to send (*op* with *fields*). With a
    *resend_interval* it goes out again after that much silence (for requests
    the daemon takes idempotently: open, close); ClientError once *wait*
    seconds pass without the answer. An open left unanswered has an
    :meth:`undo`.
    """

    def __init__(
        self, op: str, request_id: str, expect: tuple[str, ...], wait: float,
        resend_interval: float | None, endpoint: str, now: float, fields: Mapping[str, Any] | None = None,
    ) -> None:  # fmt: skip
        self.op = op
        self.request_id = request_id
        self.fields = dict(fields or {})
        self.request = wire.request(op, request_id, **self.fields)
        self.expect = expect
        self.wait = wait
        self.deadline = now + wait
        self.resend_interval = resend_interval
        self.endpoint = endpoint
        self.sent = now

    def timeout(self, now: float) -> float:
        if now >= self.deadline:
            raise ClientError(f"no answer to {self.op} from {self.endpoint} within {self.wait:.0f} s")
        remaining = self.deadline - now
        if self.resend_interval is None:
            return remaining
        return max(0.0, min(remaining, self.sent + self.resend_interval - now))

    def resend_due(self, now: float) -> bool:
        if self.resend_interval is not None and now - self.sent >= self.resend_interval:
            self.sent = now
            return True
        return False

    def answer(self, msg: dict[str, Any]) -> dict[str, Any] | None:
        """The reply if it answers this request; RemoteError for an error; None otherwise."""
        if msg.get("id") != self.request_id:
            return None
        if msg.get("type") == "error":
            raise _remote_error(msg)
        return msg if msg.get("type") in self.expect else None

    def undo(self, now: float) -> _Ask | None:
        """After no answer in time: the request that undoes this one, else None.

        An open that timed out may still happen on the daemon, and that
        session would be left open, unused, until its idle timeout: its close
        undoes it. It must go on the open's socket, so the daemon reads it
        after the open (it ends a session being opened once it is open); its
        answer is waited for at most :data:`ABANDON_WAIT_S`, never resent.
        """
        if self.op != "open" or "session" not in self.fields:
            return None
        fields = {"session": self.fields["session"]}
        return _Ask("close", new_id(), ("closed",), ABANDON_WAIT_S, None, self.endpoint, now, fields)


_WORD_RE = re.compile(r"[a-z_]+")
_END_WORDS = {end.value: end for end in SessionEnd}


def session_end_from(message: str) -> SessionEnd | None:
    """How a session ended, from a NOT_FOUND message; None if it does not say.

    The words after "ended:" may be a sentence ("session 's1' ended: no run
    for its idle timeout (600 s) (idle_timeout)"): the last end reason named
    there is the one.
    """
    _, found, how = message.partition("ended:")
    if not found:
        return None
    named = [_END_WORDS[w] for w in _WORD_RE.findall(how) if w in _END_WORDS]
    return named[-1] if named else None


class _SessionState:
    """What a client knows of one session, from the daemon's replies; no I/O (both Session classes share it).

    ``files`` are the inputs the session holds (given at open, or with a run
    the daemon accepted): the daemon refuses a run that gives a name again.
    """

    def __init__(
        self, session_id: str | None, files: Files, idle_timeout: float | None, timeout: float,
        tenant: str | None = None,
    ) -> None:  # fmt: skip
        if idle_timeout is not None and not idle_timeout > 0:
            raise ValueError(f"idle_timeout must be a positive number of seconds, got {idle_timeout!r}")
        self.id = session_id or new_id()
        self.idle_timeout = idle_timeout
        self.timeout = timeout
        self.tenant = tenant  # the client's: a session's runs are queued as its tenant's
        self.open_files: dict[str, bytes] = _file_bytes(files)
        self.files: dict[str, bytes] = {}
        self.limits: dict[str, Any] = {}
        self.opened = False  # the daemon said opened (it may have ended since)
        self.alive = False
        self.ended: SessionEnd | None = None
        self.end_message: str | None = None  # the daemon's words when it said NOT_FOUND for this session
        self.pin: Pin | None = None  # in a fleet: the daemon it lives on

    def __repr__(self) -> str:
        state = "alive" if self.alive else f"ended ({self.ended.value})" if self.ended else "not open"
        return f"<{type(self).__name__} {self.id} {state}>"

    def _open_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"session": self.id}
        if self.open_files:
            fields["files"] = _wire_files(self.open_files)
        if self.idle_timeout is not None:
            fields["idle_timeout"] = self.idle_timeout
        return fields

    def _renew(self) -> None:
        """Become a new, unopened session with the same inputs and idle timeout (the old id stays ended)."""
        self.id = new_id()
        self.files = {}
        self.limits = {}
        self.opened = self.alive = False
        self.ended = None
        self.end_message = None

    def _on_opened(self, msg: dict[str, Any], endpoint: str | None = None) -> None:
        """The daemon said opened; in a fleet, at *endpoint*, as the instance its reply names."""
        limits = msg.get("limits")
        self.limits = dict(limits) if isinstance(limits, dict) else {}
        self.files = dict(self.open_files)
        self.opened = self.alive = True
        if endpoint is not None:
            instance = msg.get("instance")
            self._set_pin(Pin(self.id, endpoint, instance if isinstance(instance, str) else None))

    def _run_args(
        self, code: str, files: Files, timeout: float | None, wait: float | None, job_id: str | None, stream: bool
    ) -> tuple[str, bytes, float, dict[str, bytes]]:
        if not self.opened:
            raise ClientError(f"session {self.id} is not open: use it in a with block, or call open() first")
        # Unsaid, a run's timeout is the daemon's; a session says its cap.
        run_timeout = self.limits.get("run_timeout")
        default = float(run_timeout) if isinstance(run_timeout, int | float) else None
        job_id, request, wait = _run_plan(
            code, files, timeout, wait, job_id, stream, session=self.id, default_timeout=default, tenant=self.tenant
        )
        return job_id, request, wait, _file_bytes(files)

    def _observe(self, event: Event, files: dict[str, bytes]) -> None:
        if isinstance(event, Accepted):
            self.files.update(files)
        elif isinstance(event, Finished) and event.result.session is not None:
            state = event.result.session
            self.alive = state.alive
            if not state.alive:
                self.ended = state.ended

    def _gone(self, exc: RemoteError) -> bool:
        """Note a NOT_FOUND for this session (it ended, or the daemon forgot it); True if that is what *exc* is."""
        if exc.code != wire.NOT_FOUND:
            return False
        self.alive = False
        word = _END_WORDS.get(exc.ended) if exc.ended else None
        self.ended = word or session_end_from(exc.message) or self.ended
        self.end_message = exc.message
        return True

    def _pinned(self) -> Counter[str] | None:
        """The fleet's count of open sessions per daemon (it keeps their connections); None for one endpoint."""
        return None

    def _set_pin(self, pin: Pin | None) -> None:
        """Where it lives now (None: nowhere, any more); the fleet keeps a daemon that holds open sessions."""
        if pin is None and self.pin is None:
            return
        pinned = self._pinned()
        if pinned is not None and self.pin is not None:
            pinned[self.pin.endpoint] -= 1
        self.pin = pin
        if pinned is not None and pin is not None:
            pinned[pin.endpoint] += 1

    def _lost(self, exc: SessionLost) -> None:
        """Its daemon died or restarted: it is gone (``ensure_open`` opens a new one)."""
        self.alive = False
        self.ended = SessionEnd.HOST_LOST
        self.end_message = str(exc)
        self._set_pin(None)

    def _on_closed(self) -> None:
        self.alive = False
        self.ended = SessionEnd.CLOSED

    def _close_needed(self) -> bool:
        return self.opened and self.ended is None

    def new_files(self, files: Files) -> dict[str, bytes]:
        """Those of *files* the session does not hold yet, to give with a run.

        ValueError if a name it holds comes with other data: the session's
        file cannot change (give it another name, or use a new session).
        """
        new: dict[str, bytes] = {}
        for name, data in (files or {}).items():
            held = self.files.get(name)
            if held is None:
                new[name] = bytes(data)
            elif held != bytes(data):
                raise ValueError(f"the session already holds a different file named {name!r}")
        return new
