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
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.asyncio

from .errors import ClientError, RemoteError
from .result import Result
from .server import protocol

DEFAULT_ENDPOINT = "ipc:///run/runnerd/runnerd.sock"
WAIT_MARGIN_S = 30.0
RESEND_INTERVAL_S = 5.0
CONTROL_TIMEOUT_S = 10.0

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


def _run_request(job_id: str, code: str, files: Files, timeout: float | None, stream: bool) -> bytes:
    fields: dict[str, Any] = {"code": code, "stream": stream}
    if files:
        fields["files"] = [{"name": name, "data": bytes(data)} for name, data in files.items()]
    if timeout is not None:
        fields["timeout"] = timeout
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

    @staticmethod
    def _control_answer(msg: dict[str, Any], request_id: str, expect: tuple[str, ...]) -> dict[str, Any] | None:
        """The reply if it answers this control request; RemoteError for an error; None otherwise."""
        if msg.get("id") != request_id:
            return None
        if msg.get("type") == "error":
            raise RemoteError(str(msg.get("code")), str(msg.get("message")))
        return msg if msg.get("type") in expect else None

    def _no_answer(self, op: str, timeout: float) -> ClientError:
        return ClientError(f"no answer to {op} from {self.endpoint} within {timeout:.0f} s")

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

    def _control(self, op: str, request_id: str, expect: tuple[str, ...], timeout: float) -> dict[str, Any]:
        # A socket of its own: a cancel sent while this client streams a job
        # must not take that job's replies (they carry the same id).
        sock = self._ctx.socket(zmq.DEALER)
        try:
            self._configure(sock)
            sock.send(protocol.request(op, request_id))
            deadline = time.monotonic() + timeout
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not sock.poll(int(remaining * 1000)):
                    raise self._no_answer(op, timeout)
                answer = self._control_answer(self._decode(sock.recv()), request_id, expect)
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

    async def _control(self, op: str, request_id: str, expect: tuple[str, ...], timeout: float) -> dict[str, Any]:
        sock = self._ctx.socket(zmq.DEALER)
        try:
            self._configure(sock)
            await sock.send(protocol.request(op, request_id))
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while True:
                remaining = deadline - loop.time()
                try:
                    frame = await asyncio.wait_for(sock.recv(), timeout=max(0.0, remaining))
                except TimeoutError:
                    raise self._no_answer(op, timeout) from None
                answer = self._control_answer(self._decode(frame), request_id, expect)
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
