"""Clients for a runnerd daemon: :class:`Client` (blocking), and :class:`AsyncClient` (asyncio) re-exported.

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
idempotent on the daemon's side). An open that gets no answer in time may
still happen on the daemon: the client then closes that session id (best
effort, on the open's own socket), and the session takes a new id.

This module is the blocking client's I/O (sockets, clocks, waiting). The
asyncio client is :mod:`runnerd.async_client`; what both share about their
connection (endpoint, keys, socket set-up) is :mod:`runnerd.connection`, and
what they know without I/O (the events, the resend and deadline policy, a
session's state) is :mod:`runnerd.exchange`. What a caller needs of the
three is importable from here (``__all__``). None of them imports the
daemon: frames are :mod:`runnerd.wire`'s.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import zmq

from .async_client import AsyncClient, AsyncSession
from .connection import (
    CONTROL_TIMEOUT_S,
    DEFAULT_ENDPOINT,
    RESEND_INTERVAL_S,
    SESSION_TIMEOUT_S,
    ClientBase,
    curve_keys,
    resolve_endpoint,
)
from .errors import ClientError, RemoteError, SessionLost
from .exchange import (
    WAIT_MARGIN_S,
    Accepted,
    Event,
    Files,
    Finished,
    Output,
    _Ask,
    _run_plan,
    _RunExchange,
    _SessionState,
    new_id,
    session_end_from,
)
from .fleet.drive import Pin, drive
from .fleet.links import Links
from .result import Result, SessionEnd

__all__ = [
    "CONTROL_TIMEOUT_S",
    "DEFAULT_ENDPOINT",
    "RESEND_INTERVAL_S",
    "SESSION_TIMEOUT_S",
    "WAIT_MARGIN_S",
    "Accepted",
    "AsyncClient",
    "AsyncSession",
    "Client",
    "Event",
    "Files",
    "Finished",
    "Output",
    "Session",
    "curve_keys",
    "new_id",
    "resolve_endpoint",
    "session_end_from",
]

log = logging.getLogger(__name__)


class Client(ClientBase):
    """A blocking client. Not thread-safe: one per thread."""

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        resend_interval: float = RESEND_INTERVAL_S,
        curve: Mapping[str, bytes] | None = None,
        context: zmq.Context | None = None,
        tenant: str | None = None,
    ) -> None:
        super().__init__(endpoint, resend_interval=resend_interval, curve=curve, tenant=tenant)
        self._ctx = context or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.DEALER)
        if self.discovery.single:
            self._configure(self._sock)
        else:
            self._links = Links(self.discovery, self._ctx, self._configure)

    def close(self) -> None:
        self._sock.close(0)
        if self._links is not None:
            self._links.close()

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
        job_id, request, wait = _run_plan(code, files, timeout, wait, job_id, stream=True, tenant=self.tenant)
        yield from self._drive(job_id, request, wait)

    def run(
        self, code: str, files: Files = None, timeout: float | None = None, *,
        wait: float | None = None, job_id: str | None = None,
    ) -> Result:  # fmt: skip
        """Run *code* and return its Result. RemoteError if the daemon refuses it (BUSY, ...)."""
        job_id, request, wait = _run_plan(code, files, timeout, wait, job_id, stream=False, tenant=self.tenant)
        for event in self._drive(job_id, request, wait):
            if isinstance(event, Finished):
                return event.result
        raise ClientError("no result")  # pragma: no cover - _drive returns only after Finished

    def _drive(self, job_id: str, request: bytes, wait: float, pin: Pin | None = None) -> Iterator[Event]:
        if isinstance(self._links, Links):
            yield from drive(self._links, job_id, request, wait, self.resend_interval, self.endpoint, pin)
            return
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
        fields: Mapping[str, Any] | None = None, resend: bool = False, endpoint: str | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        """One request, one answer, on a socket of its own, to *endpoint* (in a fleet: a daemon; default: any ready)."""
        # A socket of its own: a cancel sent while this client streams a job
        # must not take that job's replies (they carry the same id).
        if self._links is not None and endpoint is None:
            endpoint = self._some_daemon(timeout)
        sock = self._ctx.socket(zmq.DEALER)
        try:
            self._configure(sock, endpoint)
            ask = self._ask(op, request_id, expect, timeout, fields, resend, time.monotonic(), endpoint)
            try:
                return self._exchange(sock, ask)
            except RemoteError:
                raise
            except ClientError:
                undo = ask.undo(time.monotonic())
                if undo is not None:
                    # Best effort: the caller hears of the timeout, whatever becomes of the undoing.
                    try:
                        self._exchange(sock, undo)
                    except ClientError as exc:
                        log.debug("%s after an unanswered %s %s: %s", undo.op, op, request_id, exc)
                raise
        finally:
            sock.close(0)

    def _exchange(self, sock: zmq.Socket, ask: _Ask) -> dict[str, Any]:
        """Send *ask*'s request on *sock* and wait for its answer, resending it as its policy says."""
        sock.send(ask.request)
        while True:
            if not sock.poll(int(ask.timeout(time.monotonic()) * 1000)):
                if ask.resend_due(time.monotonic()):
                    sock.send(ask.request)
                continue
            answer = ask.answer(self._decode(sock.recv()))
            if answer is not None:
                return answer

    def _some_daemon(self, timeout: float) -> str:
        """A ready daemon of the fleet (waiting up to *timeout* for the first pongs); ClientError if none."""
        assert isinstance(self._links, Links)
        self._links.wait_placeable(self._first_wait(timeout))
        return self._ready_daemon()

    def owner(self, session_id: str, timeout: float = SESSION_TIMEOUT_S) -> str | None:
        """The daemon a session of this id opens on (rendezvous hashing over the ready ones); None for one endpoint."""
        if not isinstance(self._links, Links):
            return None
        self._links.wait_placeable(self._first_wait(timeout))
        return self._owner_now(session_id)

    def ping(self, timeout: float = CONTROL_TIMEOUT_S) -> dict[str, Any]:
        """The daemon's pong; for a fleet, a ready daemon's, with ``members``: what this client knows of each."""
        pong = self._control("ping", new_id(), ("pong",), timeout)
        if isinstance(self._links, Links):
            self._links.ping_all(self._first_wait(timeout))
        return self._with_members(pong)

    def stats(self, timeout: float = CONTROL_TIMEOUT_S) -> dict[str, Any]:
        return self._control("stats", new_id(), ("stats",), timeout)

    def cancel(self, job_id: str, timeout: float = CONTROL_TIMEOUT_S) -> dict[str, Any]:
        """Ask the daemon to cancel *job_id*; its result (reason cancelled) goes to the run's client."""
        return self._control("cancel", job_id, ("cancelling",), timeout, endpoint=self._where(job_id))

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


class Session(_SessionState):
    """A session of a blocking :class:`Client`; made by :meth:`Client.session`.

    ``alive`` and ``ended`` follow what the daemon said last (each run's
    result says it); ``limits`` are the session's, from ``opened``.
    """

    def __init__(
        self, client: Client, files: Files = None, idle_timeout: float | None = None, *,
        session_id: str | None = None, timeout: float = SESSION_TIMEOUT_S,
    ) -> None:  # fmt: skip
        super().__init__(session_id, files, idle_timeout, timeout, client.tenant)
        self.client = client

    def _pinned(self) -> Counter[str] | None:
        return self.client.fleet.pinned if self.client.fleet is not None else None

    def open(self) -> Session:
        """Open it (RemoteError if the daemon refuses: BUSY, BAD_REQUEST, NOT_FOUND for an id that ended).

        ClientError if no answer comes within ``timeout``: the daemon may
        still open it, so that id has been closed (best effort), and the
        session takes a new id for the next :meth:`open`.
        """
        endpoint = self.client.owner(self.id, self.timeout)
        try:
            reply = self.client._control(
                "open", new_id(), ("opened",), self.timeout, fields=self._open_fields(), resend=True, endpoint=endpoint
            )
        except RemoteError:
            raise
        except ClientError:
            self._renew()
            raise
        self._on_opened(reply, endpoint)
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

    def run_renewing(
        self, code: str, timeout: float | None = None, *, on_new: Callable[[], None] | None = None
    ) -> tuple[Result, list[SessionEnd | None]]:
        """Run *code*, in a new session if this one had ended (found before the run, or by it: an idle
        timeout, its daemon lost), as a tool whose calls share a session does; *on_new* runs after each new
        open (to set it up again). Also returns how each replaced session ended, for the tool to say so."""
        replaced: list[SessionEnd | None] = []
        ended = self.ended
        if self.ensure_open():
            replaced.append(ended)
            if on_new is not None:
                on_new()
        try:
            return self.run(code, timeout=timeout), replaced
        except (RemoteError, SessionLost):
            if self.alive:  # a refusal (BUSY, TOO_LARGE), not the session's end: run noted NOT_FOUND
                raise
        replaced.append(self.ended)
        self.reopen()
        if on_new is not None:
            on_new()
        return self.run(code, timeout=timeout), replaced

    def close(self) -> None:
        """Close it. Closing a session that already ended (or was never opened) is not an error."""
        if not self._close_needed():
            return
        try:
            self.client._control(
                "close", new_id(), ("closed",), self.timeout, fields={"session": self.id}, resend=True,
                endpoint=self.pin.endpoint if self.pin else None,
            )  # fmt: skip
        except RemoteError as exc:
            # A resent close, or a session that ended on its own: either way it is gone.
            if not self._gone(exc):
                raise
        else:
            self._on_closed()
        self._set_pin(None)

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
            for event in self.client._drive(job_id, request, wait, self.pin):
                self._observe(event, given)
                yield event
        except RemoteError as exc:
            self._gone(exc)
            raise
        except SessionLost as exc:
            self._lost(exc)
            raise

    def run(
        self, code: str, files: Files = None, timeout: float | None = None, *,
        wait: float | None = None, job_id: str | None = None,
    ) -> Result:  # fmt: skip
        """Run *code* in the session and return its Result (``result.session`` says if the session lives on)."""
        job_id, request, wait, given = self._run_args(code, files, timeout, wait, job_id, stream=False)
        try:
            for event in self.client._drive(job_id, request, wait, self.pin):
                self._observe(event, given)
                if isinstance(event, Finished):
                    return event.result
        except RemoteError as exc:
            self._gone(exc)
            raise
        except SessionLost as exc:
            self._lost(exc)
            raise
        raise ClientError("no result")  # pragma: no cover - _drive returns only after Finished
