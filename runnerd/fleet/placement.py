"""Where work goes: a one-off job to the less loaded of two random daemons; a session to its owner.

* One-off jobs: the power of two choices (Mitzenmacher): two placeable
  daemons at random, the one with the lower load (its reported running and
  queued jobs plus this client's own in flight there, over its slots). Close
  to the best choice, without every client piling onto the same "least
  loaded" daemon between two pings. A load is as fresh as the last reply
  that said it: a pong, or any job's `accepted` or `result`; of two equal
  loads, the fresher wins.
* Sessions: rendezvous (highest random weight) hashing of the session id
  over the placeable daemons: every client agrees on the owner without
  talking, and a daemon joining or leaving moves only its own share.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .members import Member


@dataclass(frozen=True)
class Pin:
    """Where a session lives: its id, its daemon's endpoint, and that daemon's instance when it opened."""

    session: str
    endpoint: str
    instance: str | None  # as the open's reply named it (the open went on a socket of its own)
    at: float = field(default_factory=time.monotonic)  # when: what the fleet heard before is older news


def choose(
    members: Sequence[Member], in_flight: Mapping[str, int], now: float, *,
    exclude: frozenset[str] = frozenset(), rng: random.Random | None = None,
) -> Member | None:  # fmt: skip
    """The daemon for a one-off job; None when none is placeable (or all are in *exclude*)."""
    pool = [m for m in members if m.placeable(now) and m.endpoint not in exclude]
    if not pool:
        return None
    if len(pool) == 1:
        return pool[0]
    two = (rng or random).sample(pool, 2)
    # Equal loads: the one whose load is the fresher news (often the daemon this client's last job ran on).
    return min(two, key=lambda m: (m.load(in_flight.get(m.endpoint, 0)), -m.load_at))


def weight(session_id: str, endpoint: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{session_id}\0{endpoint}".encode(), digest_size=8).digest(), "big")


def owner(session_id: str, members: Sequence[Member], now: float) -> Member | None:
    """The daemon a new session opens on: the placeable one of highest weight for its id; None if none is."""
    pool = [m for m in members if m.placeable(now)]
    return max(pool, key=lambda m: weight(session_id, m.endpoint)) if pool else None
