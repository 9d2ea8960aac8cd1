"""The codec of wire protocol ``runnerd/1``, shared by the clients and the daemon.

Every message is one ZeroMQ frame holding one msgpack map (strings as str,
bytes as bin). Requests carry ``v: 1``, ``op`` and ``id``; replies carry
``v: 1``, the request's ``id`` and ``type``; an error reply's ``code`` is one
of :data:`ERROR_CODES`. docs/protocol.md is the contract for clients in any
language.

This module is what both sides need and nothing more: it imports no part of
the daemon, so a client never loads the sandbox. The daemon's checking of
requests (:func:`runnerd.server.protocol.decode_request`) is in the server.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import msgpack

from .result import Result

VERSION = 1
# Ids (of runs, sessions) and tenants: what the daemon takes, and a client checks before it sends.
ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

BAD_REQUEST = "BAD_REQUEST"
TOO_LARGE = "TOO_LARGE"
BUSY = "BUSY"
UNSUPPORTED_VERSION = "UNSUPPORTED_VERSION"
NOT_FOUND = "NOT_FOUND"
INTERNAL = "INTERNAL"
# The daemon is draining (stopping, or told to): it takes no new work; send it to another daemon.
DRAINING = "DRAINING"
ERROR_CODES = (BAD_REQUEST, TOO_LARGE, BUSY, UNSUPPORTED_VERSION, NOT_FOUND, INTERNAL, DRAINING)


def encode(message: Mapping[str, Any]) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def request(op: str, request_id: str, **fields: Any) -> bytes:
    return encode({"v": VERSION, "op": op, "id": request_id, **fields})


def reply(request_id: str | None, type_: str, **fields: Any) -> bytes:
    return encode({"v": VERSION, "id": request_id, "type": type_, **fields})


def error_reply(request_id: str | None, code: str, message: str, ended: str | None = None, **fields: Any) -> bytes:
    """An error; for a session that ended, ``ended`` says how (also in words, last, in the message)."""
    if ended is not None:
        fields["ended"] = ended
    return reply(request_id, "error", code=code, message=message, **fields)


def result_reply(request_id: str, result: Result, **fields: Any) -> bytes:
    return reply(request_id, "result", **result.to_wire(), **fields)


def decode_reply(frame: bytes) -> dict[str, Any]:
    """A reply as a client sees it; ValueError if it is not a map with a type."""
    msg = msgpack.unpackb(frame, raw=False, strict_map_key=False)
    if not isinstance(msg, dict) or "type" not in msg:
        raise ValueError(f"not a runnerd reply: {msg!r:.200}")
    return msg
