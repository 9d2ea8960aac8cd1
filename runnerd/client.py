"""Clients for a runnerd daemon: :class:`Client` (blocking) and :class:`AsyncClient` (asyncio).

Both speak protocol ``runnerd/1`` over a ZeroMQ DEALER socket::

    with Client("ipc:///run/runnerd/runnerd.sock") as c:
        result = c.run("print(1)")
        for event in c.stream(code, files={"data.csv": data}):
            ...

The endpoint comes from the argument, else ``RUNNERD_ENDPOINT``, else the
default ipc socket. ``run``/``stream`` wait at most ``wait`` seconds (by
default the job's timeout plus a margin) and raise ClientError past it.
While waiting, a client that hears nothing for ``resend_interval`` seconds
sends the same request again: the daemon knows the job id and answers with
the job's state instead of running it twice, so a dropped connection or a
lost reply costs nothing.

A *session* keeps Python state across runs (docs/protocol.md, Sessions)::

    with c.session(files={"data.csv": data}) as s:
        s.run("import pandas as pd\ndf = pd.read_csv('data.csv')")
        s.run("df.shape").value            # "(3, 2)"

Its runs are ordinary runs carrying ``session``, so they are resent and
deduplicated like any other; ``open`` and ``close`` are resent too (both are
idempotent on the daemon's side).
"""

from __future__ import annotations

import asyncio
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.asyncio

from .errors import ClientError, RemoteError
from .result import Result, SessionEnd
from .server import protocol

DEFAULT_ENDPOINT = "ipc:///run/runnerd/runnerd.sock"
WAIT_MARGIN_S = 30.0
RESEND_INTERVAL_S = 5.0
CONTROL_TIMEOUT_S = 10.0
# An open may start a cage (cold mode), behind other cages starting on a loaded host.
SESSION_TIMEOUT_S = 60.0

Files = Mapping[str, bytes] | None


def resolve_endpoint(endpoint: str | None) -> str:
    return endpoint or os.environ.get("RUNNERD_ENDPOINT") or DEFAULT_ENDPOINT


def curve_keys(
    client_secret_file: str | os.PathLike[str], server_public_file: str | os.PathLike[str]
) -> dict[str, bytes]:
    """The ``curve=`` argument of a client, from certificate files made by ``runnerd keygen``."""
    import zmq.auth

    public, secret = zmq.auth.load_certificate(os.fspath(client_secret_file))
    server, _ = zmq.auth.load_certificate(os.fspath(server_public_file))
    if not secret:
        raise ValueError(f"{client_secret_file} holds no secret key (give the .key_secret file)")
    return {"public": public, "secret": secret, "server": server}


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


def _wire_files(files: Files) -> list[dict[str, Any]]:
    return [{"name": name, "data": bytes(data)} for name, data in (files or {}).items()]


def _run_request(
    job_id: str, code: str, files: Files, timeout: float | None, stream: bool, session: str | None = None
) -> bytes:
    fields: dict[str, Any] = {"code": code, "stream": stream}
    if files:
        fields["files"] = _wire_files(files)
    if timeout is not None:
        fields["timeout"] = timeout
    if session is not None:
        fields["session"] = session
    return protocol.request("run", job_id, **fields)


class _Tracker:
    """Turns the replies to one run into events, dropping what a resend repeats."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self.seen = {"stdout": 0, "stderr": 0}
        self.accepted = False

    def events(self, msg: dict[str, Any]) -> list[Event]:
        kind = msg.get("type")
        if kind == "error":
            raise RemoteError(str(msg.get("code")), str(msg.get("message")))
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


def _wait_for(timeout: float | None, wait: float | None) -> float:
    if wait is not None:
        return wait
    return (timeout if timeout is not None else 30.0) + WAIT_MARGIN_S


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

    With a *resend_interval* the request goes out again after that much
    silence (for requests the daemon takes idempotently: open, close);
    ClientError once *wait* seconds pass without the answer.
    """

    def __init__(
        self, op: str, request_id: str, expect: tuple[str, ...], wait: float,
        resend_interval: float | None, endpoint: str, now: float,
    ) -> None:  # fmt: skip
        self.op = op
        self.request_id = request_id
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
            raise RemoteError(str(msg.get("code")), str(msg.get("message")))
        return msg if msg.get("type") in self.expect else None


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

    def __init__(self, session_id: str | None, files: Files, idle_timeout: float | None, timeout: float) -> None:
        if idle_timeout is not None and not idle_timeout > 0:
            raise ValueError(f"idle_timeout must be a positive number of seconds, got {idle_timeout!r}")
        self.id = session_id or new_id()
        self.idle_timeout = idle_timeout
        self.timeout = timeout
        self.open_files: dict[str, bytes] = {name: bytes(data) for name, data in (files or {}).items()}
        self.files: dict[str, bytes] = {}
        self.limits: dict[str, Any] = {}
        self.opened = False  # the daemon said opened (it may have ended since)
        self.alive = False
        self.ended: SessionEnd | None = None
        self.end_message: str | None = None  # the daemon's words when it said NOT_FOUND for this session

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

    def _on_opened(self, msg: dict[str, Any]) -> None:
        limits = msg.get("limits")
        self.limits = dict(limits) if isinstance(limits, dict) else {}
        self.files = dict(self.open_files)
        self.opened = self.alive = True

    def _run_args(
        self, code: str, files: Files, timeout: float | None, wait: float | None, job_id: str | None, stream: bool
    ) -> tuple[str, bytes, float, dict[str, bytes]]:
        if not self.opened:
            raise ClientError(f"session {self.id} is not open: use it in a with block, or call open() first")
        job_id = job_id or new_id()
        request = _run_request(job_id, code, files, timeout, stream, session=self.id)
        if wait is None:
            # Unsaid, a run's timeout is the daemon's; a session says its cap.
            run_timeout = self.limits.get("run_timeout")
            default = float(run_timeout) if isinstance(run_timeout, int | float) else None
            wait = _wait_for(timeout if timeout is not None else default, None)
        return job_id, request, wait, {name: bytes(data) for name, data in (files or {}).items()}

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
        if exc.code != protocol.NOT_FOUND:
            return False
        self.alive = False
        self.ended = session_end_from(exc.message) or self.ended
        self.end_message = exc.message
        return True

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


class _Base:
    def __init__(self, endpoint: str | None, *, resend_interval: float, curve: Mapping[str, bytes] | None) -> None:
        self.endpoint = resolve_endpoint(endpoint)
        self.resend_interval = resend_interval
        self._curve = curve

    def _decode(self, frame: bytes) -> dict[str, Any]:
        try:
            return protocol.decode_reply(frame)
        except ValueError as exc:
            raise ClientError(f"undecodable reply from {self.endpoint}: {exc}") from None

    def _configure(self, sock: zmq.Socket) -> None:
        sock.setsockopt(zmq.LINGER, 0)
        if self._curve:
            sock.curve_secretkey = self._curve["secret"]
            sock.curve_publickey = self._curve["public"]
            sock.curve_serverkey = self._curve["server"]
        sock.connect(self.endpoint)


class Client(_Base):
    """A blocking client. Not thread-safe: one per thread."""

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        resend_interval: float = RESEND_INTERVAL_S,
        curve: Mapping[str, bytes] | None = None,
        context: zmq.Context | None = None,
    ) -> None:
        super().__init__(endpoint, resend_interval=resend_interval, curve=curve)
        self._ctx = context or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._configure(self._sock)

    def close(self) -> None:
        self._sock.close(0)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _recv(self, timeout: float) -> dict[str, Any] | None:
        if not self._sock.poll(max(0, int(timeout * 1000))):
            return None
        return self._decode(self._sock.recv())

    def stream(
        self, code: str, files: Files = None, timeout: float | None = None, *,
        wait: float | None = None, job_id: str | None = None,
    ) -> Iterator[Event]:  # fmt: skip
        """Run *code*; yield Accepted, then Output chunks as printed, then Finished."""
        job_id = job_id or new_id()
        request = _run_request(job_id, code, files, timeout, stream=True)
        yield from self._drive(job_id, request, _wait_for(timeout, wait))

    def run(
        self, code: str, files: Files = None, timeout: float | None = None, *,
        wait: float | None = None, job_id: str | None = None,
    ) -> Result:  # fmt: skip
        """Run *code* and return its Result. RemoteError if the daemon refuses it (BUSY, ...)."""
        job_id = job_id or new_id()
        request = _run_request(job_id, code, files, timeout, stream=False)
        for event in self._drive(job_id, request, _wait_for(timeout, wait)):
            if isinstance(event, Finished):
                return event.result
        raise ClientError("no result")  # pragma: no cover - _drive returns only after Finished

    def _drive(self, job_id: str, request: bytes, wait: float) -> Iterator[Event]:
        exchange = _RunExchange(job_id, wait, self.resend_interval, self.endpoint, time.monotonic())
        self._sock.send(request)
        while True:
            msg = self._recv(exchange.timeout(time.monotonic()))
            if msg is None:
                if exchange.resend_due(time.monotonic()):
                    self._sock.send(request)
                continue
            for event in exchange.events(msg, time.monotonic()):
                yield event
                if isinstance(event, Finished):
                    return

    def _control(
        self, op: str, request_id: str, expect: tuple[str, ...], timeout: float, *,
        fields: Mapping[str, Any] | None = None, resend: bool = False,
    ) -> dict[str, Any]:  # fmt: skip
        # A socket of its own: a cancel sent while this client streams a job
        # must not take that job's replies (they carry the same id).
        sock = self._ctx.socket(zmq.DEALER)
        try:
            self._configure(sock)
            request = protocol.request(op, request_id, **(fields or {}))
            ask = _Ask(op, request_id, expect, timeout, self.resend_interval if resend else None,
                       self.endpoint, time.monotonic())  # fmt: skip
            sock.send(request)
            while True:
                if not sock.poll(int(ask.timeout(time.monotonic()) * 1000)):
                    if ask.resend_due(time.monotonic()):
                        sock.send(request)
                    continue
                answer = ask.answer(self._decode(sock.recv()))
                if answer is not None:
                    return answer
        finally:
            sock.close(0)

    def ping(self, timeout: float = CONTROL_TIMEOUT_S) -> dict[str, Any]:
        return self._control("ping", new_id(), ("pong",), timeout)

    def stats(self, timeout: float = CONTROL_TIMEOUT_S) -> dict[str, Any]:
        return self._control("stats", new_id(), ("stats",), timeout)

    def cancel(self, job_id: str, timeout: float = CONTROL_TIMEOUT_S) -> dict[str, Any]:
        """Ask the daemon to cancel *job_id*; its result (reason cancelled) goes to the run's client."""
        return self._control("cancel", job_id, ("cancelling",), timeout)

    def session(
        self, files: Files = None, idle_timeout: float | None = None, *,
        session_id: str | None = None, timeout: float = SESSION_TIMEOUT_S,
    ) -> Session:  # fmt: skip
        """A session (not yet open): ``with client.session() as s`` opens it, and closes it at the end.

        *files* are in the session's working directory from the start;
        *idle_timeout* (seconds, default the daemon's) ends it after that
        long without a run; *timeout* bounds the wait for open and close.
        """
        return Session(self, files, idle_timeout, session_id=session_id, timeout=timeout)


class AsyncClient(_Base):
    """The asyncio client. Not safe to share between concurrent runs: use one per task."""

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        resend_interval: float = RESEND_INTERVAL_S,
        curve: Mapping[str, bytes] | None = None,
        context: zmq.asyncio.Context | None = None,
    ) -> None:
        super().__init__(endpoint, resend_interval=resend_interval, curve=curve)
        self._ctx = context or zmq.asyncio.Context.instance()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._configure(self._sock)

    def close(self) -> None:
        self._sock.close(0)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    async def _recv(self, timeout: float) -> dict[str, Any] | None:
        try:
            frame = await asyncio.wait_for(self._sock.recv(), timeout=max(0.0, timeout))
        except TimeoutError:
            return None
        return self._decode(frame)

    async def stream(
        self, code: str, files: Files = None, timeout: float | None = None, *,
        wait: float | None = None, job_id: str | None = None,
    ) -> AsyncIterator[Event]:  # fmt: skip
        job_id = job_id or new_id()
        request = _run_request(job_id, code, files, timeout, stream=True)
        async for event in self._drive(job_id, request, _wait_for(timeout, wait)):
            yield event

    async def run(
        self, code: str, files: Files = None, timeout: float | None = None, *,
        wait: float | None = None, job_id: str | None = None,
    ) -> Result:  # fmt: skip
        job_id = job_id or new_id()
        request = _run_request(job_id, code, files, timeout, stream=False)
        async for event in self._drive(job_id, request, _wait_for(timeout, wait)):
            if isinstance(event, Finished):
                return event.result
        raise ClientError("no result")  # pragma: no cover

    async def _drive(self, job_id: str, request: bytes, wait: float) -> AsyncIterator[Event]:
        loop = asyncio.get_running_loop()
        exchange = _RunExchange(job_id, wait, self.resend_interval, self.endpoint, loop.time())
        await self._sock.send(request)
        while True:
            msg = await self._recv(exchange.timeout(loop.time()))
            if msg is None:
                if exchange.resend_due(loop.time()):
                    await self._sock.send(request)
                continue
            for event in exchange.events(msg, loop.time()):
                yield event
                if isinstance(event, Finished):
                    return

    async def _control(
        self, op: str, request_id: str, expect: tuple[str, ...], timeout: float, *,
        fields: Mapping[str, Any] | None = None, resend: bool = False,
    ) -> dict[str, Any]:  # fmt: skip
        sock = self._ctx.socket(zmq.DEALER)
        try:
            self._configure(sock)
            request = protocol.request(op, request_id, **(fields or {}))
            loop = asyncio.get_running_loop()
            ask = _Ask(op, request_id, expect, timeout, self.resend_interval if resend else None,
                       self.endpoint, loop.time())  # fmt: skip
            await sock.send(request)
            while True:
                try:
                    frame = await asyncio.wait_for(sock.recv(), timeout=ask.timeout(loop.time()))
                except TimeoutError:
                    if ask.resend_due(loop.time()):
                        await sock.send(request)
                    continue
                answer = ask.answer(self._decode(frame))
                if answer is not None:
                    return answer
        finally:
            sock.close(0)

    async def ping(self, timeout: float = CONTROL_TIMEOUT_S) -> dict[str, Any]:
        return await self._control("ping", new_id(), ("pong",), timeout)

    async def stats(self, timeout: float = CONTROL_TIMEOUT_S) -> dict[str, Any]:
        return await self._control("stats", new_id(), ("stats",), timeout)

    async def cancel(self, job_id: str, timeout: float = CONTROL_TIMEOUT_S) -> dict[str, Any]:
        return await self._control("cancel", job_id, ("cancelling",), timeout)

    def session(
        self, files: Files = None, idle_timeout: float | None = None, *,
        session_id: str | None = None, timeout: float = SESSION_TIMEOUT_S,
    ) -> AsyncSession:  # fmt: skip
        """A session (not yet open): ``async with client.session() as s`` opens it and closes it at the end."""
        return AsyncSession(self, files, idle_timeout, session_id=session_id, timeout=timeout)


class Session(_SessionState):
    """A session of a blocking :class:`Client`; made by :meth:`Client.session`.

    ``alive`` and ``ended`` follow what the daemon said last (each run's
    result says it); ``limits`` are the session's, from ``opened``.
    """

    def __init__(
        self, client: Client, files: Files = None, idle_timeout: float | None = None, *,
        session_id: str | None = None, timeout: float = SESSION_TIMEOUT_S,
    ) -> None:  # fmt: skip
        super().__init__(session_id, files, idle_timeout, timeout)
        self.client = client

    def open(self) -> Session:
        """Open it (RemoteError if the daemon refuses: BUSY, BAD_REQUEST, NOT_FOUND for an id that ended)."""
        reply = self.client._control(
            "open", new_id(), ("opened",), self.timeout, fields=self._open_fields(), resend=True
        )
        self._on_opened(reply)
        return self

    def reopen(self) -> Session:
        """Close it if it is still open, then open a new session (a new id) with the same files and idle timeout."""
        self.close()
        self._renew()
        return self.open()

    def ensure_open(self) -> bool:
        """Open it if it is not: the first time, or anew after it ended. True when a new one replaced an ended one."""
        if self.alive:
            return False
        if not self.opened:
            self.open()
            return False
        self.reopen()
        return True

    def close(self) -> None:
        """Close it. Closing a session that already ended (or was never opened) is not an error."""
        if not self._close_needed():
            return
        try:
            self.client._control("close", new_id(), ("closed",), self.timeout, fields={"session": self.id}, resend=True)
        except RemoteError as exc:
            # A resent close, or a session that ended on its own: either way it is gone.
            if not self._gone(exc):
                raise
        else:
            self._on_closed()

    def __enter__(self) -> Session:
        return self.open()

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
            return
        try:
            self.close()
        except ClientError:
            pass  # the exception on its way out says more; the daemon's idle timeout ends the session

    def stream(
        self, code: str, files: Files = None, timeout: float | None = None, *,
        wait: float | None = None, job_id: str | None = None,
    ) -> Iterator[Event]:  # fmt: skip
        """Run *code* in the session: Accepted, Output chunks as printed, then Finished (as :meth:`Client.stream`)."""
        job_id, request, wait, given = self._run_args(code, files, timeout, wait, job_id, stream=True)
        try:
            for event in self.client._drive(job_id, request, wait):
                self._observe(event, given)
                yield event
        except RemoteError as exc:
            self._gone(exc)
            raise

    def run(
        self, code: str, files: Files = None, timeout: float | None = None, *,
        wait: float | None = None, job_id: str | None = None,
    ) -> Result:  # fmt: skip
        """Run *code* in the session and return its Result (``result.session`` says if the session lives on)."""
        job_id, request, wait, given = self._run_args(code, files, timeout, wait, job_id, stream=False)
        try:
            for event in self.client._drive(job_id, request, wait):
                self._observe(event, given)
                if isinstance(event, Finished):
                    return event.result
        except RemoteError as exc:
            self._gone(exc)
            raise
        raise ClientError("no result")  # pragma: no cover - _drive returns only after Finished


class AsyncSession(_SessionState):
    """A session of an :class:`AsyncClient`; made by :meth:`AsyncClient.session`.

    Its runs share the client's socket: run one at a time (the daemon runs a
    session's runs one at a time anyway). ``close`` has a socket of its own,
    so it may be awaited while a run is under way (that run is stopped).
    """

    def __init__(
        self, client: AsyncClient, files: Files = None, idle_timeout: float | None = None, *,
        session_id: str | None = None, timeout: float = SESSION_TIMEOUT_S,
    ) -> None:  # fmt: skip
        super().__init__(session_id, files, idle_timeout, timeout)
        self.client = client

    async def open(self) -> AsyncSession:
        reply = await self.client._control(
            "open", new_id(), ("opened",), self.timeout, fields=self._open_fields(), resend=True
        )
        self._on_opened(reply)
        return self

    async def reopen(self) -> AsyncSession:
        await self.close()
        self._renew()
        return await self.open()

    async def ensure_open(self) -> bool:
        if self.alive:
            return False
        if not self.opened:
            await self.open()
            return False
        await self.reopen()
        return True

    async def close(self) -> None:
        if not self._close_needed():
            return
        try:
            await self.client._control(
                "close", new_id(), ("closed",), self.timeout, fields={"session": self.id}, resend=True
            )
        except RemoteError as exc:
            if not self._gone(exc):
                raise
        else:
            self._on_closed()

    async def __aenter__(self) -> AsyncSession:
        return await self.open()

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            await self.close()
            return
        try:
            await self.close()
        except ClientError:
            pass

    async def stream(
        self, code: str, files: Files = None, timeout: float | None = None, *,
        wait: float | None = None, job_id: str | None = None,
    ) -> AsyncIterator[Event]:  # fmt: skip
        job_id, request, wait, given = self._run_args(code, files, timeout, wait, job_id, stream=True)
        try:
            async for event in self.client._drive(job_id, request, wait):
                self._observe(event, given)
                yield event
        except RemoteError as exc:
            self._gone(exc)
            raise

    async def run(
        self, code: str, files: Files = None, timeout: float | None = None, *,
        wait: float | None = None, job_id: str | None = None,
    ) -> Result:  # fmt: skip
        job_id, request, wait, given = self._run_args(code, files, timeout, wait, job_id, stream=False)
        try:
            async for event in self.client._drive(job_id, request, wait):
                self._observe(event, given)
                if isinstance(event, Finished):
                    return event.result
        except RemoteError as exc:
            self._gone(exc)
            raise
        raise ClientError("no result")  # pragma: no cover
