"""Capped capture of a job's stdout or stderr: keep the head and the tail.

A model printing a 50 MB DataFrame needs the first rows (what it asked
for) and the last lines (where the error usually is), not the middle. The
capture reads everything the cage writes (so the cage never blocks on a
full pipe), keeps at most ``cap`` bytes, and lets through at most ``cap``
bytes for live streaming. :class:`OutputGuard` decides when the output
itself must stop the job.
"""

from __future__ import annotations

# Once stdout or stderr has passed what the result keeps, a job has this
# long to finish writing. Without it a print loop runs until
# limits.output_kill_bytes (128 MiB: ~20 s at print()'s ~6 MB/s through a
# pipe), burning a CPU in the job and one in the host reading it, for
# output that is thrown away. Wall-clock time, not bytes: a loaded host
# slows the flood, not the stop. Well under 5 s, long enough for a job that
# prints tens of MB in one go to finish.
FLOOD_WINDOW_S = 3.0


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


class OutputGuard:
    """When a job's output must stop it: past limits.output_kill_bytes, or a flood.

    A flood is output past what the result keeps (either stream past its
    cap) that is still pouring in FLOOD_WINDOW_S after it passed, at more
    than the result keeps again in that window. A job that prints a lot in
    one go and then finishes is not one, nor one that logs steadily but
    slowly past the cap: the window starts again after each calm one.
    """

    def __init__(
        self, out: StreamCapture, err: StreamCapture, kill_bytes: int, window_s: float = FLOOD_WINDOW_S
    ) -> None:
        self.captures = (out, err)
        self.kill_bytes = kill_bytes
        self.window_s = window_s
        self.keeps = max(out.cap, err.cap)
        self._window: tuple[float, int] | None = None  # (when it started, bytes thrown away by then)

    @property
    def total(self) -> int:
        return sum(c.total for c in self.captures)

    @property
    def passed_cap(self) -> bool:
        """Output is past what the result keeps: what comes now is thrown away."""
        return any(c.truncated for c in self.captures)

    def check(self, now: float) -> str | None:
        """Called as output arrives at time *now*: why the job must stop (a warning), or None."""
        total = self.total
        if total > self.kill_bytes:
            return f"killed after writing {total} bytes to stdout+stderr (limits.output_kill_bytes = {self.kill_bytes})"
        thrown_away = sum(max(0, c.total - c.cap) for c in self.captures)
        if not thrown_away:
            return None
        if self._window is None:
            self._window = (now, thrown_away)
            return None
        started, before = self._window
        if now - started < self.window_s:
            return None
        if thrown_away - before > self.keeps:
            return (
                f"killed as an output flood: still writing {now - started:.1f} s after passing what the result keeps "
                f"(limits.max_output_bytes = {self.keeps}), {thrown_away - before} bytes more in that time; "
                f"{total} bytes in all"
            )
        self._window = (now, thrown_away)
        return None
