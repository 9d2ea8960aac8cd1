"""One daemon as a client sees it: alive or dead, ready or draining, how loaded, which instance.

Health comes from pings, one every :data:`PING_INTERVAL_S` whatever else
goes on (a pong is answered by the daemon's event loop: a wedged daemon
that still holds its TCP connections stops answering). A daemon that has
said nothing for :data:`DEAD_AFTER_MISSES` intervals (three pings missed)
is *dead*, out of placement, until it answers again: the Paranoid Pirate
pattern's numbers, so a dead, wedged or cut-off daemon is out within 3 s of
its last word plus the client's own delay in looking. Any reply counts as a
sign of life, not only pongs. A pong naming another instance than before
means the daemon restarted: whatever lived in the old one (its sessions)
is gone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PING_INTERVAL_S = 1.0
DEAD_AFTER_MISSES = 3
SILENCE_S = DEAD_AFTER_MISSES * PING_INTERVAL_S
# A ping that could not go out (no connection: not up yet, or refused) is tried again this soon, twice as
# late after each failure, up to the ping interval: a new connection is pinged at once, a dead daemon's
# does not wake a waiting client twenty times a second.
PING_RETRY_S = 0.05
# No ping for this long: the client was not waiting (between its calls), so it was not listening either.
WATCH_GAP_S = 2 * PING_INTERVAL_S


@dataclass
class Member:
    endpoint: str
    since: float = 0.0  # when this client started (or started again) to look at it
    instance: str | None = None
    state: str = "unknown"  # "ready", "draining" (its own word), "unknown" before the first pong
    running: int = 0
    queued: int = 0
    concurrency: int = 1
    ping_sent: float | None = None
    heard: float | None = None
    instance_at: float | None = None  # when a reply last named `instance` (older news may predate a restart)
    unsent: int = 0  # pings in a row that could not go out
    load_at: float = float("-inf")  # when a reply last said the load (a pong, or a job's `accepted`/`result`)

    def silent_for(self, now: float) -> float:
        return now - max(self.heard if self.heard is not None else self.since, self.since)

    def watching(self, now: float) -> bool:
        """Whether this client has been pinging it lately (it pings only while it waits for something)."""
        return self.ping_sent is not None and now - self.ping_sent <= WATCH_GAP_S

    def dead(self, now: float) -> bool:
        """Silent for three pings while this client was pinging it; a daemon nobody asked is not silent."""
        return self.watching(now) and self.silent_for(now) >= SILENCE_S

    def placeable(self, now: float) -> bool:
        """New work may go here: it said it is ready, and has not been silent for three pings."""
        return self.state == "ready" and not self.dead(now)

    def ping_due(self, now: float) -> bool:
        """True when a ping should go out now (and it is taken as sent)."""
        if self.ping_sent is not None and now - self.ping_sent < PING_INTERVAL_S:
            return False
        if not self.watching(now):
            self.since = max(self.since, now)  # looking again after a gap: silence counts from here
        self.ping_sent = now
        return True

    def ping_went(self, now: float, sent: bool) -> None:
        """After a due ping: whether it went out; if not, when the next try is due."""
        self.unsent = 0 if sent else min(self.unsent + 1, 32)  # (bounded: 2**n stays a float)
        if not sent:
            self.ping_sent = now - PING_INTERVAL_S + min(PING_INTERVAL_S, PING_RETRY_S * 2 ** (self.unsent - 1))

    def ping_now(self, now: float) -> None:
        """Make a ping due at once (without taking a gap in this client's looking for silence)."""
        if self.watching(now):
            self.ping_sent = now - PING_INTERVAL_S

    def next_event(self, now: float) -> float:
        """When something may change without a reply: the next ping, or the moment it is dead."""
        ping = (self.ping_sent + PING_INTERVAL_S) if self.ping_sent is not None else now
        death = now + max(0.0, SILENCE_S - self.silent_for(now))
        return min(ping, death) if not self.dead(now) else ping

    def on_reply(self, msg: dict[str, Any], now: float) -> None:
        """Any reply from this daemon: it lives; a pong also says its state, and a pong, `accepted` or
        `result` its load (a load a job's reply carries is fresher than the last pong: placement uses it)."""
        self.heard = now
        instance = msg.get("instance")
        if isinstance(instance, str):
            self.instance = instance  # another than before: it restarted (whoever pinned to it compares)
            self.instance_at = now
        if msg.get("type") == "pong":
            state = msg.get("state")
            self.state = state if state in ("ready", "draining") else "ready"  # a daemon before fleets: ready
            self._take_load(msg, now)
        elif isinstance(load := msg.get("load"), dict):
            self._take_load(load, now)

    def _take_load(self, fields: dict[str, Any], now: float) -> None:
        for key in ("running", "queued", "concurrency"):
            value = fields.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                setattr(self, key, value)
                self.load_at = now
        self.concurrency = max(1, self.concurrency)

    def load(self, in_flight: int = 0) -> float:
        """How full it is, with this client's own jobs in flight that it may not have counted yet."""
        return (self.running + self.queued + in_flight) / self.concurrency

    def describe(self, now: float) -> str:
        if self.dead(now):
            return f"{self.endpoint} (silent for {self.silent_for(now):.1f} s)"
        return f"{self.endpoint} ({self.state}, instance {self.instance})"
