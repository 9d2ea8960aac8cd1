"""Wire protocol ``runnerd/1``, the daemon's side: message kinds and the checking of requests.

Every message is one ZeroMQ frame holding one msgpack map (strings as str,
bytes as bin). docs/protocol.md is the contract for clients in any
language. The codec both sides share (the version, the error codes, the
encoding of requests and replies) is :mod:`runnerd.wire`; its names are
importable from here too, so the daemon's modules need one import.

Requests carry ``v: 1``, ``op`` and ``id``; replies carry ``v: 1``, the
request's ``id`` and ``type``. :func:`decode_request` turns a frame into a
typed request or raises :class:`ProtocolError` with the wire error code and
a message a person can act on; it never raises anything else, whatever the
frame holds.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgpack

from .. import wire
from ..config import Limits
from ..errors import JobRejected
from ..result import Result
from ..sandbox.job import InputFile, JobSpec, make_job
from ..wire import (
    BAD_REQUEST,
    BUSY,
    DRAINING,
    ERROR_CODES,
    INTERNAL,
    NOT_FOUND,
    TOO_LARGE,
    UNSUPPORTED_VERSION,
    VERSION,
    decode_reply,
    encode,
    request,
)

__all__ = [
    "BAD_REQUEST",
    "BUSY",
    "DRAINING",
    "ERROR_CODES",
    "INSTANCE",
    "ID_RE",
    "INTERNAL",
    "NOT_FOUND",
    "OPS",
    "TOO_LARGE",
    "UNSUPPORTED_VERSION",
    "VERSION",
    "CancelRequest",
    "CloseRequest",
    "OpenRequest",
    "PingRequest",
    "ProtocolError",
    "Request",
    "RunRequest",
    "StatsRequest",
    "decode_reply",
    "decode_request",
    "encode",
    "error_reply",
    "reply",
    "request",
    "result_reply",
]

ID_RE = wire.ID_RE
OPS = ("run", "cancel", "ping", "stats", "open", "close")
_FIELDS = {
    "run": {"v", "op", "id", "code", "files", "timeout", "stream", "session", "tenant"},
    "open": {"v", "op", "id", "session", "files", "idle_timeout"},
    "close": {"v", "op", "id", "session"},
    "cancel": {"v", "op", "id"},
    "ping": {"v", "op", "id"},
    "stats": {"v", "op", "id"},
}


# This daemon's start, on every reply: a client tells a restarted daemon (a new instance) from one that
# only dropped a connection. A reload keeps it (the process, its jobs and its sessions live on).
INSTANCE = secrets.token_hex(8)


def reply(request_id: str | None, type_: str, **fields: Any) -> bytes:
    return wire.reply(request_id, type_, **{**fields, "instance": INSTANCE})


def error_reply(
    request_id: str | None, code: str, message: str, ended: str | None = None, *, retry_after_ms: int | None = None
) -> bytes:
    extra: dict[str, Any] = {"instance": INSTANCE}
    if retry_after_ms is not None:
        extra["retry_after_ms"] = retry_after_ms
    return wire.error_reply(request_id, code, message, ended, **extra)


def result_reply(request_id: str, result: Result, load: Mapping[str, int]) -> bytes:
    return wire.result_reply(request_id, result, instance=INSTANCE, load=dict(load))


class ProtocolError(Exception):
    """A request that cannot be taken; becomes a ``type: "error"`` reply."""

    def __init__(
        self, code: str, message: str, request_id: str | None = None, *,
        ended: str | None = None, retry_after_ms: int | None = None,
    ) -> None:  # fmt: skip
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id
        self.ended = ended  # NOT_FOUND for a session that ended: how (SessionEnd's word)
        self.retry_after_ms = retry_after_ms  # BUSY: when a retry may find room


@dataclass(frozen=True)
class RunRequest:
    id: str
    job: JobSpec
    stream: bool
    digest: str  # what the job is, to tell a resend from a clash of ids
    session: str | None = None  # the session it runs in; None for a one-off job
    tenant: str | None = None  # whose share of the daemon it is served from; None: its client's


@dataclass(frozen=True)
class OpenRequest:
    id: str
    session: str
    files: tuple[InputFile, ...]
    idle_timeout: float | None  # None: the server's default
    digest: str  # what the session is, to tell a resend from a clash of session ids


@dataclass(frozen=True)
class CloseRequest:
    id: str
    session: str


@dataclass(frozen=True)
class CancelRequest:
    id: str


@dataclass(frozen=True)
class PingRequest:
    id: str


@dataclass(frozen=True)
class StatsRequest:
    id: str


Request = RunRequest | CancelRequest | PingRequest | StatsRequest | OpenRequest | CloseRequest


def _unpack(frame: bytes, max_bytes: int) -> Any:
    if len(frame) > max_bytes:
        raise ProtocolError(TOO_LARGE, f"message is {len(frame)} bytes; the limit is {max_bytes}")
    try:
        return msgpack.unpackb(frame, raw=False, strict_map_key=True, max_ext_len=0, use_list=True)
    except msgpack.exceptions.StackError:
        raise ProtocolError(BAD_REQUEST, "message nests too deeply; a request is a flat map") from None
    except msgpack.exceptions.ExtraData:
        raise ProtocolError(BAD_REQUEST, "frame holds more than one msgpack object; send one map per frame") from None
    except UnicodeDecodeError:
        raise ProtocolError(BAD_REQUEST, "a msgpack str is not valid UTF-8; send bytes as bin") from None
    except (ValueError, TypeError, OverflowError) as exc:
        raise ProtocolError(BAD_REQUEST, f"frame is not valid msgpack: {exc}") from None


def _job_digest(code: str, files: list[tuple[str, bytes]], timeout: Any, session: str | None = None) -> str:
    h = hashlib.sha256()
    h.update(f"{session}\0".encode() if session is not None else b"")
    h.update(code.encode("utf-8", "surrogatepass"))
    for name, data in files:
        h.update(b"\0" + name.encode("utf-8", "surrogatepass") + b"\0" + hashlib.sha256(data).digest())
    h.update(repr(timeout).encode())
    return h.hexdigest()


def decode_request(frame: bytes, limits: Limits, max_bytes: int) -> Request:
    """Decode and check one request frame; ProtocolError (with the id when known) if it is not acceptable."""
    msg = _unpack(frame, max_bytes)
    if not isinstance(msg, dict):
        raise ProtocolError(BAD_REQUEST, f"a request is a msgpack map, got {type(msg).__name__}")
    raw_id = msg.get("id")
    request_id = raw_id if isinstance(raw_id, str) and ID_RE.match(raw_id) else None
    try:
        return _check(msg, limits, request_id)
    except ProtocolError as exc:
        exc.request_id = request_id
        raise


def _check(msg: dict[str, Any], limits: Limits, request_id: str | None) -> Request:
    if "v" not in msg:
        raise ProtocolError(BAD_REQUEST, "missing field 'v' (the protocol version, 1)")
    if msg["v"] != VERSION or isinstance(msg["v"], bool):
        raise ProtocolError(
            UNSUPPORTED_VERSION, f"protocol version {msg['v']!r} is not supported; this daemon speaks v: 1"
        )
    if "id" not in msg:
        raise ProtocolError(BAD_REQUEST, "missing field 'id'")
    if request_id is None:
        raise ProtocolError(BAD_REQUEST, "id must be a string of 1-128 characters from [A-Za-z0-9._:-]")
    op = msg.get("op")
    if op is None:
        raise ProtocolError(BAD_REQUEST, "missing field 'op'")
    if op not in OPS:
        raise ProtocolError(BAD_REQUEST, f"unknown op {op!r}; ops are {', '.join(OPS)}")
    unknown = sorted(set(msg) - _FIELDS[op])
    if unknown:
        raise ProtocolError(BAD_REQUEST, f"unknown field(s) {', '.join(map(repr, unknown))} in a {op} request")
    if op == "cancel":
        return CancelRequest(request_id)
    if op == "ping":
        return PingRequest(request_id)
    if op == "stats":
        return StatsRequest(request_id)
    session = _session_id(msg) if op != "run" or msg.get("session") is not None else None
    if op == "close":
        assert session is not None
        return CloseRequest(request_id, session)
    files = _files(msg, limits)
    if op == "open":
        assert session is not None
        idle = msg.get("idle_timeout")
        if idle is not None:
            if isinstance(idle, bool) or not isinstance(idle, (int, float)) or not math.isfinite(idle) or idle <= 0:
                raise ProtocolError(BAD_REQUEST, f"idle_timeout must be a positive number of seconds, got {idle!r}")
            idle = float(idle)
        try:
            spec = make_job("", files, None, limits=limits)
        except JobRejected as exc:
            raise ProtocolError(exc.code, str(exc)) from None
        digest = _job_digest("", [(f.name, f.data) for f in spec.files], idle, session)
        return OpenRequest(request_id, session, spec.files, idle, digest)

    if "code" not in msg:
        raise ProtocolError(BAD_REQUEST, "missing field 'code'")
    stream = msg.get("stream", False)
    if not isinstance(stream, bool):
        raise ProtocolError(BAD_REQUEST, f"stream must be true or false, got {stream!r}")
    try:
        job = make_job(msg["code"], files, msg.get("timeout"), limits=limits)
    except JobRejected as exc:
        raise ProtocolError(exc.code, str(exc)) from None
    digest = _job_digest(job.code, [(f.name, f.data) for f in job.files], msg.get("timeout"), session)
    tenant = msg.get("tenant")
    if tenant is not None and (not isinstance(tenant, str) or not ID_RE.match(tenant)):
        raise ProtocolError(BAD_REQUEST, "tenant must be a string of 1-128 characters from [A-Za-z0-9._:-]")
    return RunRequest(id=request_id, job=job, stream=stream, digest=digest, session=session, tenant=tenant)


def _session_id(msg: dict[str, Any]) -> str:
    session = msg.get("session")
    if session is None:
        raise ProtocolError(BAD_REQUEST, f"missing field 'session' (the session id) in a {msg['op']} request")
    if not isinstance(session, str) or not ID_RE.match(session):
        raise ProtocolError(BAD_REQUEST, "session must be a string of 1-128 characters from [A-Za-z0-9._:-]")
    return session


def _files(msg: dict[str, Any], limits: Limits) -> list[tuple[Any, Any]]:
    files_raw = msg.get("files", [])
    if not isinstance(files_raw, list):
        raise ProtocolError(BAD_REQUEST, f"files must be a list of {{name, data}} maps, got {type(files_raw).__name__}")
    if len(files_raw) > limits.max_files:
        raise ProtocolError(TOO_LARGE, f"{len(files_raw)} input files; the limit is {limits.max_files}")
    files: list[tuple[Any, Any]] = []
    for index, f in enumerate(files_raw):
        if not isinstance(f, dict):
            raise ProtocolError(BAD_REQUEST, f"files[{index}] must be a map with name and data")
        extra = sorted(set(f) - {"name", "data"})
        if extra or "name" not in f or "data" not in f:
            raise ProtocolError(BAD_REQUEST, f"files[{index}] must have exactly the fields name and data")
        files.append((f["name"], f["data"]))
    return files
