"""Where one one-off job goes, and when it goes elsewhere: the failover policy, without I/O.

A one-off job is idempotent by construction (no network, read-only inputs,
a client-chosen id), so a job whose daemon is lost (dead, wedged, cut off,
restarted) is sent again, with the same id, to another daemon; the first
result wins (replies name the id, and later ones are dropped). At most
:data:`MAX_EXECUTIONS` daemons may run it; past that, :class:`HostLost`
names each and how it was lost. A refusal (``DRAINING``, ``BUSY``) means it
did not run there: another daemon is tried, and it does not count.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ..errors import ClientError, HostLost, RemoteError
from ..wire import BUSY, DRAINING
from . import placement
from .members import Member

MAX_EXECUTIONS = 2
REFUSALS = (DRAINING, BUSY)


class Attempts:
    def __init__(self, job_id: str, max_executions: int = MAX_EXECUTIONS) -> None:
        self.job_id = job_id
        self.max_executions = max_executions
        self.target: Member | None = None
        self.instance: str | None = None  # the target's, as its first reply to this job named it
        self.lost: dict[str, str] = {}  # daemons that may have run it -> how each was lost
        self.refused: dict[str, RemoteError] = {}

    @property
    def sent_to(self) -> frozenset[str]:
        return frozenset({*self.lost, *self.refused, *([self.target.endpoint] if self.target else [])})

    def place(self, members: Sequence[Member], in_flight: Mapping[str, int], now: float) -> Member | None:
        """The daemon to send the job to now; None when no daemon it has not been to is placeable.

        When every placeable daemon refused it (all BUSY, say), that refusal is raised.
        """
        if self.target is not None:
            return self.target
        member = placement.choose(members, in_flight, now, exclude=self.sent_to)
        if member is None:
            if self.refused and not self.lost and any(m.placeable(now) for m in members):
                raise next(reversed(self.refused.values()))
            return None
        self.target = member
        self.instance = None  # what the client knew of it may predate a restart: its reply will say
        return member

    def heard_from(self, msg: Mapping[str, object]) -> None:
        """A reply to this job from its target: the instance that has it."""
        instance = msg.get("instance")
        if self.instance is None and isinstance(instance, str):
            self.instance = instance

    def check(self, now: float) -> None:
        """Is the target lost? Then the job goes elsewhere (HostLost once MAX_EXECUTIONS daemons are spent)."""
        target = self.target
        if target is None:
            return
        how = None
        if target.dead(now):
            how = f"silent for {target.silent_for(now):.1f} s"
        elif self.instance is not None and target.instance != self.instance:
            how = f"restarted (instance {self.instance} -> {target.instance})"
        if how is None:
            return
        self.lost[target.endpoint] = how
        self.target = None
        if len(self.lost) >= self.max_executions:
            self._host_lost()

    def _host_lost(self) -> None:
        raise HostLost(self.job_id, [f"{endpoint} {how}" for endpoint, how in self.lost.items()])

    def on_error(self, endpoint: str, exc: RemoteError) -> bool:
        """A refusal from the target: True when the job may go elsewhere (it did not run there)."""
        if exc.code not in REFUSALS or self.target is None or endpoint != self.target.endpoint:
            return False
        self.refused[endpoint] = exc
        self.target = None
        return True

    def give_up(self, members: Sequence[Member], now: float) -> None:
        """No daemon has been placeable for a while: raise what became of the job."""
        if self.lost:
            self._host_lost()
        if self.refused:
            raise next(reversed(self.refused.values()))
        raise ClientError(
            f"job {self.job_id}: no daemon is ready: " + "; ".join(m.describe(now) for m in members)
            if members
            else f"job {self.job_id}: no daemon found"
        )
