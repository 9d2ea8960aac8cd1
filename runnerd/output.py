"""Capped capture of a job's stdout or stderr: keep the head and the tail.

A model printing a 50 MB DataFrame needs the first rows (what it asked
for) and the last lines (where the error usually is), not the middle. The
capture reads everything the cage writes (so the cage never blocks on a
full pipe), keeps at most ``cap`` bytes, and lets through at most ``cap``
bytes for live streaming.
"""

from __future__ import annotations


class StreamCapture:
    def __init__(self, name: str, cap: int) -> None:
        self.name = name
        self.cap = cap
        self.head_cap = cap // 2
        self.tail_cap = cap - self.head_cap
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0
        self.streamed = 0

    def feed(self, data: bytes) -> bytes:
        """Take a chunk; returns the part of it that may still be streamed live."""
        self.total += len(data)
        room = self.head_cap - len(self.head)
        if room > 0:
            self.head += data[:room]
            data_rest = data[room:]
        else:
            data_rest = data
        if data_rest:
            self.tail += data_rest
            # Trim in bulk so a flood costs amortised O(1) per byte.
            if len(self.tail) > 2 * self.tail_cap:
                del self.tail[: len(self.tail) - self.tail_cap]
        stream_room = self.cap - self.streamed
        if stream_room <= 0:
            return b""
        out = data if len(data) <= stream_room else data[:stream_room]
        self.streamed += len(out)
        return out

    @property
    def truncated(self) -> bool:
        return self.total > self.cap

    def text(self) -> str:
        """The kept text: all of it, or head + a marker + tail when it was too long."""
        if not self.truncated:
            return (bytes(self.head) + bytes(self.tail)).decode("utf-8", "replace")
        tail = bytes(self.tail[-self.tail_cap :])
        omitted = self.total - len(self.head) - len(tail)
        marker = f"\n... [{omitted} bytes of {self.name} omitted; {self.total} in all] ...\n"
        return bytes(self.head).decode("utf-8", "replace") + marker + tail.decode("utf-8", "replace")

    def describe(self) -> str:
        return (
            f"{self.name}: {self.total} bytes, kept the first {len(self.head)} and the last "
            f"{min(len(self.tail), self.tail_cap)} (limits.max_output_bytes = {self.cap})"
        )
