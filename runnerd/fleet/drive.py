"""A run through a fleet, for the blocking client: placed, resent, failed over, or pinned to its session's daemon.

* A one-off job goes where :class:`~.attempts.Attempts` says; it is resent
  to the same daemon after ``resend_interval`` of silence (the daemon
  knows the id), and to another one when its daemon is lost or refuses it.
  Events are deduplicated by the run's tracker: a second daemon's stream
  starts over, and what was already yielded is not yielded again.
* A session's run goes to the daemon that opened the session, only: if
  that daemon is silent for three pings, or answers as another instance,
  the run raises :class:`~runnerd.errors.SessionLost` (its state is gone;
  a fresh interpreter elsewhere would be a wrong answer).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

from ..errors import RemoteError, SessionLost
from ..exchange import Event, Finished, _RunExchange
from .attempts import Attempts
from .links import Links
from .members import SILENCE_S


@dataclass(frozen=True)
class Pin:
    """Where a session lives: its id, its daemon's endpoint, and that daemon's instance when it opened."""

    session: str
    endpoint: str
    instance: str | None


def lost(pin: Pin, links: Links, now: float) -> SessionLost | None:
    member = links.members.get(pin.endpoint)
    if member is None:
        return SessionLost(pin.session, pin.endpoint, "is no longer in the fleet")
    if member.dead(now):
        return SessionLost(pin.session, pin.endpoint, f"stopped answering (silent for {member.silent_for(now):.1f} s)")
    if pin.instance is not None and member.instance not in (None, pin.instance):
        return SessionLost(pin.session, pin.endpoint, f"restarted (instance {pin.instance} -> {member.instance})")
    return None


def drive(
    links: Links, job_id: str, request: bytes, wait: float, resend_interval: float, spec: str,
    pin: Pin | None = None,
) -> Iterator[Event]:  # fmt: skip
    now = time.monotonic()
    exchange = _RunExchange(job_id, wait, resend_interval, spec, now)
    attempts = Attempts(job_id)
    sent: str | None = None
    target: str | None
    counted: list[str] = []
    if pin is None:
        links.wait_placeable(now + SILENCE_S)
    idle_since = time.monotonic()
    try:
        while True:
            now = time.monotonic()
            if pin is not None:
                gone = lost(pin, links, now)
                if gone is not None:
                    raise gone
                target = pin.endpoint
            else:
                attempts.check(now)
                member = attempts.place(list(links.members.values()), links.in_flight, now)
                target = member.endpoint if member is not None else None
                if target is None and now - idle_since > SILENCE_S:
                    attempts.give_up(list(links.members.values()), now)
            if target is not None and target != sent and links.send(target, request):
                sent = target
                exchange.heard = now  # the resend interval counts from here
                links.in_flight[target] += 1
                links.where[job_id] = target
                counted.append(target)
            if target is None:
                sent = None
            else:
                idle_since = now
            for endpoint, msg in links.wait(exchange.timeout(now)):
                if pin is not None and msg.get("id") == job_id:
                    gone = lost(pin, links, time.monotonic())  # a reply from another instance is no answer
                    if gone is not None:
                        raise gone
                try:
                    events = exchange.events(msg, time.monotonic())
                except RemoteError as exc:
                    if endpoint != sent:
                        continue  # an earlier daemon's word on a job that went elsewhere
                    if pin is None and attempts.on_error(endpoint, exc):
                        sent = None
                        continue
                    raise
                for event in events:
                    yield event
                    if isinstance(event, Finished):
                        return  # the first result wins
            if sent is not None and exchange.resend_due(time.monotonic()):
                links.send(sent, request)
    finally:
        links.where.pop(job_id, None)
        for endpoint in counted:
            links.in_flight[endpoint] -= 1
            if links.in_flight[endpoint] <= 0:
                del links.in_flight[endpoint]
