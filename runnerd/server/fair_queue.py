"""Who is served next: fair queuing of runs between tenants, charged by the time their runs took.

One greedy tenant must not starve the others (docs/protocol.md, Fair
queues). Each tenant has its own FIFO; the next run is the head of the
backlogged tenant that has been *served least* (start-time fair queuing,
as in Goyal et al. and Linux's CFS). Service is measured in seconds of
run time, the cost the daemon really pays: a run is charged an estimate
when it starts (the tenant's recent mean) and the difference when it
ends, so a tenant of long runs gets as many seconds as a tenant of short
ones, not as many runs.

A tenant that was idle comes back at the current virtual time (the least
service of those backlogged), never below: idleness banks no credit, and a
light tenant's run waits only for a free slot, not for the heavy
tenant's backlog. A pick is O(tenants backlogged), at most the queue's
size.

:class:`Backlog` counts what waits (the queue and the runs of sessions
waiting their turn), by client and by tenant, for the caps.
"""

from __future__ import annotations

import asyncio
from collections import Counter, deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from .clients import Client
from .protocol import BUSY, ProtocolError

T = TypeVar("T")

DEFAULT_COST_S = 0.1  # a tenant's first estimate, before any of its runs ended
EWMA_WEIGHT = 0.2  # of the newest run in a tenant's estimate


@dataclass
class _Tenant(Generic[T]):
    served: float = 0.0  # seconds of service, charged (virtual time)
    estimate: float = DEFAULT_COST_S
    waiting: deque[T] = field(default_factory=deque)
    running: int = 0


@dataclass(frozen=True)
class Ticket:
    """A dispatched run: whose it was and what it was charged at its start."""

    tenant: str
    charged: float


class FairQueue(Generic[T]):
    def __init__(self) -> None:
        self._tenants: dict[str, _Tenant[T]] = {}
        self._count = 0
        self._vtime = 0.0
        self._waiters: deque[asyncio.Future[None]] = deque()

    def __len__(self) -> int:
        return self._count

    def put(self, item: T, tenant: str) -> None:
        t = self._tenants.get(tenant)
        if t is None:
            t = self._tenants[tenant] = _Tenant()
        if not t.waiting:
            t.served = max(t.served, self._vtime)  # idle time banks no credit
        t.waiting.append(item)
        self._count += 1
        self._wake()

    def remove(self, item: T, tenant: str) -> bool:
        """Take *item* out (a cancelled run); False if it is not waiting."""
        t = self._tenants.get(tenant)
        if t is None or item not in t.waiting:
            return False
        t.waiting.remove(item)
        self._count -= 1
        self._forget_if_idle(tenant, t)
        return True

    async def get(self) -> tuple[T, Ticket]:
        """The next item, and its ticket (give it to :meth:`done` when the run ends)."""
        while not self._count:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake()  # it was woken for an item: another waiter takes it
                raise
        return self.get_nowait()

    def get_nowait(self) -> tuple[T, Ticket]:
        """The next item now; IndexError if none waits."""
        if not self._count:
            raise IndexError("nothing waits")
        name, t = min(((n, t) for n, t in self._tenants.items() if t.waiting), key=lambda nt: nt[1].served)
        self._vtime = max(self._vtime, t.served)
        item = t.waiting.popleft()
        self._count -= 1
        t.running += 1
        t.served += t.estimate
        return item, Ticket(name, t.estimate)

    def done(self, ticket: Ticket, seconds: float) -> None:
        """A dispatched run ended after *seconds* of run time (0 for one that did not run)."""
        t = self._tenants.get(ticket.tenant)
        if t is None:
            return
        t.running -= 1
        t.served += seconds - ticket.charged
        if seconds > 0:
            t.estimate += EWMA_WEIGHT * (seconds - t.estimate)
        self._forget_if_idle(ticket.tenant, t)

    def _forget_if_idle(self, name: str, t: _Tenant[T]) -> None:
        # Memory stays bounded by what waits or runs; a returning tenant starts at the virtual time anyway.
        if not t.waiting and not t.running:
            del self._tenants[name]

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def shares(self) -> dict[str, float]:
        """Seconds of service charged so far to each tenant that waits or runs (what a test can check)."""
        return {name: round(t.served, 4) for name, t in self._tenants.items()}


class Backlog:
    """What waits, counted in all, by client and by tenant (the caps are checked against these)."""

    def __init__(self) -> None:
        self.total = 0
        self.by_client: Counter[Hashable] = Counter()
        self.by_tenant: Counter[str] = Counter()

    def admit(
        self, client: Client, tenant: str, per_client: int | None, per_tenant: int | None,
        retry_after_ms: Callable[[], int],
    ) -> None:  # fmt: skip
        """ProtocolError (BUSY, naming the setting) if *client* or *tenant* has its cap of runs waiting.

        *retry_after_ms* is asked only for a refusal: it averages the recent run times.
        """
        for limit, held, whose, setting in (
            (per_client, self.by_client[client], f"this client ({client.name})", "max_queued_per_client"),
            (per_tenant, self.by_tenant[tenant], f"tenant {tenant!r}", "max_queued_per_tenant"),
        ):
            if limit is not None and held >= limit:
                raise ProtocolError(
                    BUSY,
                    f"{whose} has {held} runs queued, the limit ({setting} {limit}); wait for a result",
                    retry_after_ms=retry_after_ms(),
                )

    def add(self, client: Hashable, tenant: str) -> None:
        self.total += 1
        self.by_client[client] += 1
        self.by_tenant[tenant] += 1

    def remove(self, client: Hashable, tenant: str) -> None:
        self.total -= 1
        _decrement(self.by_client, client)
        _decrement(self.by_tenant, tenant)


K = TypeVar("K", bound=Hashable)


def _decrement(counter: Counter[K], key: K) -> None:
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]  # the counters hold only who has something waiting
