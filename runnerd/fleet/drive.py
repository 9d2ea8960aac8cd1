"""A run through a fleet: placed, resent, failed over, or pinned to its session's daemon.

:class:`FleetRun` decides, without I/O; :func:`drive` (the blocking client)
and :func:`adrive` (the asyncio client) do the sending and the waiting.

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
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

from ..errors import RemoteError, SessionLost
from ..exchange import Event, Finished, _RunExchange
from .attempts import Attempts
from .links import AsyncLinks, Links, LinksBase
from .members import SILENCE_S, Member
from .placement import Pin

__all__ = ["FleetRun", "Pin", "adrive", "drive", "lost"]


def lost(pin: Pin, members: Mapping[str, Member], now: float) -> SessionLost | None:
    member = members.get(pin.endpoint)
    if member is None:
        return SessionLost(pin.session, pin.endpoint, "is no longer in the fleet")
    if member.dead(now):
        return SessionLost(pin.session, pin.endpoint, f"stopped answering (silent for {member.silent_for(now):.1f} s)")
    newer = member.instance_at is not None and member.instance_at > pin.at
    if pin.instance is not None and newer and member.instance != pin.instance:
        return SessionLost(pin.session, pin.endpoint, f"restarted (instance {pin.instance} -> {member.instance})")
    return None


class FleetRun:
    """One run's course through a fleet, without I/O."""

    def __init__(
        self, job_id: str, wait: float, resend_interval: float, spec: str, pin: Pin | None, now: float
    ) -> None:
        self.job_id = job_id
        self.pin = pin
        self.exchange = _RunExchange(job_id, wait, resend_interval, spec, now)
        self.attempts = Attempts(job_id)
        self.sent: str | None = None  # where the request went last
        self.counted: list[str] = []  # daemons it was sent to (this client's in-flight count)
        self.idle_since = now

    def target(self, links: LinksBase, now: float) -> str | None:
        """Where the request must be now; raises when the run is lost (SessionLost, HostLost, a refusal)."""
        if self.pin is not None:
            gone = lost(self.pin, links.members, now)
            if gone is not None:
                raise gone
            return self.pin.endpoint
        self.attempts.check(now)
        member = self.attempts.place(list(links.members.values()), links.in_flight, now)
        if member is None:
            self.sent = None
            if now - self.idle_since > SILENCE_S:
                self.attempts.give_up(list(links.members.values()), now)
            return None
        self.idle_since = now
        return member.endpoint

    def send(self, links: LinksBase, request: bytes, now: float) -> float:
        """Send the request where it must be, if it is not there yet (or resend it); how long to wait then."""
        target = self.target(links, now)
        if target is not None and target != self.sent and links.send(target, request):
            self.sent = target
            self.exchange.heard = now  # the resend interval counts from here
            links.in_flight[target] += 1
            links.where[self.job_id] = target
            self.counted.append(target)
        elif self.sent is not None and self.exchange.resend_due(now):
            links.send(self.sent, request)
        return self.exchange.timeout(now)

    def events(self, links: LinksBase, endpoint: str, msg: dict[str, Any], now: float) -> list[Event]:
        if msg.get("id") != self.job_id:
            return []
        if self.pin is not None:
            gone = lost(self.pin, links.members, now)  # a reply from another instance is no answer
            if gone is not None:
                raise gone
        if self.pin is None and endpoint == self.sent:
            self.attempts.heard_from(msg)
        try:
            return self.exchange.events(msg, now)
        except RemoteError as exc:
            if endpoint != self.sent:
                return []  # an earlier daemon's word on a job that went elsewhere
            if self.pin is None and self.attempts.on_error(endpoint, exc):
                self.sent = None
                return []
            raise

    def done(self, links: LinksBase) -> None:
        links.where.pop(self.job_id, None)
        for endpoint in self.counted:
            links.in_flight[endpoint] -= 1
            if links.in_flight[endpoint] <= 0:
                del links.in_flight[endpoint]


def drive(
    links: Links, job_id: str, request: bytes, wait: float, resend_interval: float, spec: str,
    pin: Pin | None = None,
) -> Iterator[Event]:  # fmt: skip
    run = FleetRun(job_id, wait, resend_interval, spec, pin, time.monotonic())
    if pin is None:
        links.wait_placeable(time.monotonic() + SILENCE_S)
        run.idle_since = time.monotonic()
    try:
        while True:
            for endpoint, msg in links.wait(run.send(links, request, time.monotonic())):
                for event in run.events(links, endpoint, msg, time.monotonic()):
                    yield event
                    if isinstance(event, Finished):
                        return  # the first result wins
    finally:
        run.done(links)


async def adrive(
    links: AsyncLinks, job_id: str, request: bytes, wait: float, resend_interval: float, spec: str,
    pin: Pin | None = None,
) -> AsyncIterator[Event]:  # fmt: skip
    run = FleetRun(job_id, wait, resend_interval, spec, pin, time.monotonic())
    if pin is None:
        await links.wait_placeable(time.monotonic() + SILENCE_S)
        run.idle_since = time.monotonic()
    try:
        while True:
            for endpoint, msg in await links.wait(run.send(links, request, time.monotonic())):
                for event in run.events(links, endpoint, msg, time.monotonic()):
                    yield event
                    if isinstance(event, Finished):
                        return
    finally:
        run.done(links)
