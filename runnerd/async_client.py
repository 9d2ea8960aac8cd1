"""The asyncio client of a runnerd daemon: :class:`AsyncClient` and its :class:`AsyncSession`.

The same protocol, policy and methods as the blocking :class:`runnerd.client.Client`
(see that module for the whole story), as coroutines::

    async with AsyncClient("ipc:///run/runnerd/runnerd.sock") as c:
        result = await c.run("print(1)")
        async with c.session() as s:
            await s.run("x = 1")

Both names are importable from :mod:`runnerd.client` too. What both clients
know without I/O is :mod:`runnerd.exchange`; their connection is
:mod:`runnerd.connection`.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from typing import Any

import zmq
import zmq.asyncio

from .connection import CONTROL_TIMEOUT_S, RESEND_INTERVAL_S, SESSION_TIMEOUT_S, ClientBase
from .errors import ClientError, RemoteError, SessionLost
from .exchange import Event, Files, Finished, _Ask, _run_plan, _RunExchange, _SessionState, new_id
from .fleet.drive import Pin, adrive
from .fleet.links import AsyncLinks
from .result import Result

__all__ = ["AsyncClient", "AsyncSession"]

log = logging.getLogger(__name__)


class AsyncClient(ClientBase):
    """The asyncio client. Not safe to share between concurrent runs: use one per task."""

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        resend_interval: float = RESEND_INTERVAL_S,
        curve: Mapping[str, bytes] | None = None,
        context: zmq.asyncio.Context | None = None,
        tenant: str | None = None,
    ) -> None:
        super().__init__(endpoint, resend_interval=resend_interval, curve=curve, tenant=tenant)
        self._ctx = context or zmq.asyncio.Context.instance()
        self._sock = self._ctx.socket(zmq.DEALER)
        if self.discovery.single:
            self._configure(self._sock)
        else:
            self._links = AsyncLinks(self.discovery, self._ctx, self._configure)

    def close(self) -> None:
        self._sock.close(0)
        if self._links is not None:
            self._links.close()

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
        job_id, request, wait = _run_plan(code, files, timeout, wait, job_id, stream=True, tenant=self.tenant)
        async for event in self._drive(job_id, request, wait):
            yield event

    async def run(
        self, code: str, files: Files = None, timeout: float | None = None, *,
        wait: float | None = None, job_id: str | None = None,
    ) -> Result:  # fmt: skip
        job_id, request, wait = _run_plan(code, files, timeout, wait, job_id, stream=False, tenant=self.tenant)
        async for event in self._drive(job_id, request, wait):
            if isinstance(event, Finished):
                return event.result
        raise ClientError("no result")  # pragma: no cover

    async def _drive(self, job_id: str, request: bytes, wait: float, pin: Pin | None = None) -> AsyncIterator[Event]:
        if isinstance(self._links, AsyncLinks):
            async for event in adrive(self._links, job_id, request, wait, self.resend_interval, self.endpoint, pin):
                yield event
            return
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
        fields: Mapping[str, Any] | None = None, resend: bool = False, endpoint: str | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        if isinstance(self._links, AsyncLinks) and endpoint is None:
            await self._links.wait_placeable(self._first_wait(timeout))
            endpoint = self._ready_daemon()
        sock = self._ctx.socket(zmq.DEALER)
        try:
            self._configure(sock, endpoint)
            loop = asyncio.get_running_loop()
            ask = self._ask(op, request_id, expect, timeout, fields, resend, loop.time(), endpoint)
            try:
                return await self._exchange(sock, ask)
            except RemoteError:
                raise
            except ClientError:
                undo = ask.undo(loop.time())
                if undo is not None:
                    # Best effort: the caller hears of the timeout, whatever becomes of the undoing.
                    try:
                        await self._exchange(sock, undo)
                    except ClientError as exc:
                        log.debug("%s after an unanswered %s %s: %s", undo.op, op, request_id, exc)
                raise
        finally:
            sock.close(0)

    async def _exchange(self, sock: zmq.asyncio.Socket, ask: _Ask) -> dict[str, Any]:
        """Send *ask*'s request on *sock* and wait for its answer, resending it as its policy says."""
        loop = asyncio.get_running_loop()
        await sock.send(ask.request)
        while True:
            try:
                frame = await asyncio.wait_for(sock.recv(), timeout=ask.timeout(loop.time()))
            except TimeoutError:
                if ask.resend_due(loop.time()):
                    await sock.send(ask.request)
                continue
            answer = ask.answer(self._decode(frame))
            if answer is not None:
                return answer

    async def owner(self, session_id: str, timeout: float = SESSION_TIMEOUT_S) -> str | None:
        """The daemon a session of this id opens on (as :meth:`runnerd.client.Client.owner`); None for one endpoint."""
        if not isinstance(self._links, AsyncLinks):
            return None
        await self._links.wait_placeable(self._first_wait(timeout))
        return self._owner_now(session_id)

    async def ping(self, timeout: float = CONTROL_TIMEOUT_S) -> dict[str, Any]:
        pong = await self._control("ping", new_id(), ("pong",), timeout)
        if isinstance(self._links, AsyncLinks):
            await self._links.ping_all(self._first_wait(timeout))
        return self._with_members(pong)

    async def stats(self, timeout: float = CONTROL_TIMEOUT_S) -> dict[str, Any]:
        return await self._control("stats", new_id(), ("stats",), timeout)

    async def cancel(self, job_id: str, timeout: float = CONTROL_TIMEOUT_S) -> dict[str, Any]:
        return await self._control("cancel", job_id, ("cancelling",), timeout, endpoint=self._where(job_id))

    def session(
        self, files: Files = None, idle_timeout: float | None = None, *,
        session_id: str | None = None, timeout: float = SESSION_TIMEOUT_S,
    ) -> AsyncSession:  # fmt: skip
        """A session (not yet open): ``async with client.session() as s`` opens it and closes it at the end."""
        return AsyncSession(self, files, idle_timeout, session_id=session_id, timeout=timeout)


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
        super().__init__(session_id, files, idle_timeout, timeout, client.tenant)
        self.client = client

    def _pinned(self) -> Counter[str] | None:
        return self.client.fleet.pinned if self.client.fleet is not None else None

    async def open(self) -> AsyncSession:
        """Open it; as :meth:`runnerd.client.Session.open` (an open that times out is closed, and takes a new id)."""
        endpoint = await self.client.owner(self.id, self.timeout)
        try:
            reply = await self.client._control(
                "open", new_id(), ("opened",), self.timeout, fields=self._open_fields(), resend=True, endpoint=endpoint
            )
        except RemoteError:
            raise
        except ClientError:
            self._renew()
            raise
        self._on_opened(reply, endpoint)
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
                "close", new_id(), ("closed",), self.timeout, fields={"session": self.id}, resend=True,
                endpoint=self.pin.endpoint if self.pin else None,
            )  # fmt: skip
        except RemoteError as exc:
            if not self._gone(exc):
                raise
        else:
            self._on_closed()
        self._set_pin(None)

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
            async for event in self.client._drive(job_id, request, wait, self.pin):
                self._observe(event, given)
                yield event
        except RemoteError as exc:
            self._gone(exc)
            raise
        except SessionLost as exc:
            self._lost(exc)
            raise

    async def run(
        self, code: str, files: Files = None, timeout: float | None = None, *,
        wait: float | None = None, job_id: str | None = None,
    ) -> Result:  # fmt: skip
        job_id, request, wait, given = self._run_args(code, files, timeout, wait, job_id, stream=False)
        try:
            async for event in self.client._drive(job_id, request, wait, self.pin):
                self._observe(event, given)
                if isinstance(event, Finished):
                    return event.result
        except RemoteError as exc:
            self._gone(exc)
            raise
        except SessionLost as exc:
            self._lost(exc)
            raise
        raise ClientError("no result")  # pragma: no cover
