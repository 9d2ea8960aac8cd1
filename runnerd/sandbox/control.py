"""The control sockets' framing, host side: one place for what incage/session.py's send_msg/recv_msg speak.

A message is a 4-byte big-endian length, then that many bytes of JSON (one
object). Both a zygote's socket and a session's use it; a frame longer than
:data:`MAX_MESSAGE` is a broken peer (the cage's code may hold the socket).
"""

from __future__ import annotations

import json
import struct
from typing import Any

MAX_MESSAGE = 1 << 16
HEADER = struct.Struct(">I")


def frame(message: dict[str, Any]) -> bytes:
    body = json.dumps(message).encode()
    return HEADER.pack(len(body)) + body


def size_of(header: bytes) -> int:
    """The length a frame's header announces; ValueError past :data:`MAX_MESSAGE`."""
    (size,) = HEADER.unpack(header)
    if size > MAX_MESSAGE:
        raise ValueError(f"a control message of {size} bytes (the limit is {MAX_MESSAGE})")
    return size
