"""The ZeroMQ front end: one ROUTER per endpoint, on asyncio.

It decodes each frame (protocol.py), answers what it cannot take with a
``type: "error"`` reply, hands runs and cancels to the scheduler, and
routes replies back by the peer's ZeroMQ identity on the socket the
request came in on. Nothing a peer sends can stop it: every frame is
handled inside a guard that answers INTERNAL and goes on.

Sockets are non-blocking for sends (``ROUTER_MANDATORY`` plus
``DONTWAIT``): a reply to a peer that is gone or too slow to read is
dropped, never waited for, and the peer can ask again by job id.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import grp
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import zmq
import zmq.asyncio
import zmq.auth
from zmq.auth.asyncio import AsyncioAuthenticator

from ..config import Config
from ..errors import ConfigError, RunnerdError
from . import protocol
from .clients import Client
from .protocol import CancelRequest, CloseRequest, OpenRequest, PingRequest, ProtocolError, RunRequest, StatsRequest
from .scheduler import Scheduler

if TYPE_CHECKING:
    from .metrics import Metrics

log = logging.getLogger(__name__)

SOCKET_GROUP = "runnerd"
SNDHWM = 100_000


class EndpointInUse(RunnerdError):
    """Another process already serves this endpoint."""


def load_server_certificate(path: Path) -> tuple[bytes, bytes]:
    """(public, secret) from a secret certificate file; ConfigError naming the file if unusable."""
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"curve_server_key: cannot load {path}: {exc}") from None
    if not secret:
        raise ConfigError(f"curve_server_key: {path} holds no secret key (give the .key_secret file)")
    return public, secret


@dataclass
class Endpoint:
    address: str
    socket: zmq.asyncio.Socket
    lock_fd: int = -1


def _ipc_path(address: str) -> Path | None:
    return Path(address[len("ipc://") :]) if address.startswith("ipc://") else None


def _prepare_ipc(path: Path) -> int:
    """Make the socket's directory (root and the runnerd group only) and take the endpoint's lock."""
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    try:
        gid = grp.getgrnam(SOCKET_GROUP).gr_gid
    except KeyError:
        gid = -1
    if os.geteuid() == 0 and directory != Path("/tmp"):
        os.chown(directory, 0, gid)
        os.chmod(directory, 0o750 if gid >= 0 else 0o700)
    lock = path.with_name(path.name + ".lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise EndpointInUse(
            f"ipc://{path} is already served by another runnerd (it holds {lock}); stop it first"
        ) from None
    return fd


class Frontend:
    def __init__(
        self, config: Config, scheduler: Scheduler, ctx: zmq.asyncio.Context, *,
        info: Callable[[], dict[str, Any]], metrics: Metrics | None = None,
    ) -> None:  # fmt: skip
        self.config = config
        self.metrics = metrics
        self.scheduler = scheduler
        self.ctx = ctx
        self.info = info
        self.endpoints: list[Endpoint] = []
        self.frames_in = 0
        self.errors_out = 0
        self._auth: AsyncioAuthenticator | None = None
        self._curve: tuple[bytes, bytes] | None = None

    def open(self) -> None:
        """Bind every endpoint; EndpointInUse/RunnerdError (and nothing left bound) on failure."""
        try:
            self._start_auth()
            for address in self.config.bind:
                self.endpoints.append(self._bind(address))
        except BaseException:
            self.close()
            raise

    def _start_auth(self) -> None:
        cfg = self.config
        if cfg.curve_server_key is None or cfg.curve_clients_dir is None:
            return
        if not zmq.has("curve"):
            raise ConfigError("curve_server_key: this libzmq was built without CURVE")
        self._curve = load_server_certificate(cfg.curve_server_key)
        if not cfg.curve_clients_dir.is_dir():
            raise ConfigError(f"curve_clients_dir: {cfg.curve_clients_dir} is not a directory")
        # ZAP: a tcp peer must present a public key found in the directory.
        self._auth = AsyncioAuthenticator(self.ctx, log=logging.getLogger(__name__ + ".auth"))
        self._auth.start()
        self._auth.configure_curve(domain="*", location=str(cfg.curve_clients_dir))
        log.info("CURVE on tcp endpoints; authorized client keys from %s", cfg.curve_clients_dir)

    def reload_clients(self) -> None:
        """Re-read the authorized client keys (new connections only)."""
        if self._auth is not None and self.config.curve_clients_dir is not None:
            self._auth.configure_curve(domain="*", location=str(self.config.curve_clients_dir))

    def _bind(self, address: str) -> Endpoint:
        lock_fd = -1
        ipc = _ipc_path(address)
        if ipc is not None:
            lock_fd = _prepare_ipc(ipc)
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.MAXMSGSIZE, self.config.max_request_bytes)
        sock.setsockopt(zmq.SNDHWM, SNDHWM)
        if self._curve is not None and address.startswith("tcp://"):
            sock.curve_publickey, sock.curve_secretkey = self._curve
            sock.curve_server = True
        try:
            sock.bind(address)
        except zmq.ZMQError as exc:
            sock.close(0)
            if lock_fd >= 0:
                os.close(lock_fd)
            if exc.errno == errno.EADDRINUSE:
                raise EndpointInUse(f"{address} is already in use (another runnerd?)") from None
            raise RunnerdError(f"cannot bind {address}: {exc.strerror}") from None
        log.info("listening on %s", address)
        return Endpoint(address, sock, lock_fd)

    def close(self) -> None:
        for ep in self.endpoints:
            ep.socket.close(0)
            if ep.lock_fd >= 0:
                os.close(ep.lock_fd)
        self.endpoints = []
        if self._auth is not None:
            self._auth.stop()
            self._auth = None

    async def serve(self) -> None:
        import asyncio

        await asyncio.gather(*(self._serve_one(ep) for ep in self.endpoints))

    async def _serve_one(self, ep: Endpoint) -> None:
        while True:
            try:
                frames = await ep.socket.recv_multipart(copy=False)
            except zmq.ZMQError as exc:
                if exc.errno in (zmq.ETERM, zmq.ENOTSOCK):
                    return
                log.warning("%s: receive failed: %s", ep.address, exc)
                continue
            self.frames_in += 1
            try:
                self._handle(ep, frames)
            except Exception:
                log.exception("%s: unexpected error handling a frame", ep.address)
                self._send(
                    ep,
                    frames[0].bytes,
                    protocol.error_reply(None, protocol.INTERNAL, "internal error; see the daemon's log"),
                )

    def _send(self, ep: Endpoint, identity: bytes, frame: bytes) -> None:
        # zmq.asyncio hands back an asyncio Future, done at once with DONTWAIT (its stub says Awaitable).
        fut = cast("asyncio.Future[Any]", ep.socket.send_multipart([identity, frame], flags=zmq.DONTWAIT, copy=False))
        exc = fut.exception() if fut.done() else None
        if exc is not None:
            # EHOSTUNREACH: the peer is gone. EAGAIN: it does not read.
            log.debug("%s: reply dropped: %s", ep.address, exc)

    def _sender(self, ep: Endpoint, identity: bytes) -> Callable[[bytes], None]:
        return lambda frame: self._send(ep, identity, frame)

    def _handle(self, ep: Endpoint, parts: list[zmq.Frame]) -> None:
        frames = [p.bytes for p in parts]
        identity, payload = frames[0], frames[1:]
        send = self._sender(ep, identity)
        client = _client_of(ep.address, identity, parts[-1])
        if len(payload) != 1:
            message = f"a request is one frame holding one msgpack map, got {len(payload)} frames; use a DEALER socket"
            self._error(send, None, protocol.BAD_REQUEST, message)
            return
        try:
            req = protocol.decode_request(payload[0], self.config.limits, self.config.max_request_bytes)
        except ProtocolError as exc:
            self._error(send, exc.request_id, exc.code, exc.message)
            return
        try:
            self._dispatch(req, ep, identity, send, client)
        except ProtocolError as exc:
            self._error(send, req.id, exc.code, exc.message, exc.ended, exc.retry_after_ms)

    def _error(
        self, send: Callable[[bytes], None], request_id: str | None, code: str, message: str,
        ended: str | None = None, retry_after_ms: int | None = None,
    ) -> None:  # fmt: skip
        self.errors_out += 1
        if self.metrics is not None:
            self.metrics.errors.labels(code).inc()
        send(protocol.error_reply(request_id, code, message, ended, retry_after_ms=retry_after_ms))

    def _dispatch(
        self, req: protocol.Request, ep: Endpoint, identity: bytes, send: Callable[[bytes], None], client: Client
    ) -> None:
        if isinstance(req, RunRequest):
            self.scheduler.submit(req, (ep.address, identity), send, client)
        elif isinstance(req, CancelRequest):
            self.scheduler.cancel(req.id, send, client)
        elif isinstance(req, (OpenRequest, CloseRequest)):
            sessions = self.scheduler.sessions
            if sessions is None:
                raise ProtocolError(protocol.BAD_REQUEST, "this server has no sessions")
            if isinstance(req, OpenRequest):
                sessions.open(req, send, client)
            else:
                sessions.close(req, send, client)
        elif isinstance(req, PingRequest):
            send(protocol.reply(req.id, "pong", **self.info()))
        elif isinstance(req, StatsRequest):
            stats = self.scheduler.stats()
            stats.update(frames_in=self.frames_in, errors_out=self.errors_out, **self.info())
            send(protocol.reply(req.id, "stats", **stats))


def _client_of(address: str, identity: bytes, frame: zmq.Frame) -> Client:
    """Who sent *frame*: its CURVE key where the endpoint has CURVE (ZAP's User-Id), else its connection."""
    try:
        key = frame.get("User-Id")
    except zmq.ZMQError:
        key = None  # no ZAP on this endpoint (ipc, plain tcp)
    if isinstance(key, str) and key:
        return Client(name=f"key:{key}", key=key)
    return Client(name=f"connection {identity.hex()} on {address}", key=None)
