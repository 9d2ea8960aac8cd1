"""Fair queues between tenants, draining, and the fleet-facing limits, without a cage (pure logic).

The fair queue is driven by a discrete-event simulation in virtual time
(slots, arrivals, run costs): what it proves is the policy, exactly and
without timing noise. The daemon-level behaviour is in test_fleet_daemon.py.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from pathlib import Path

import msgpack
import pytest

from runnerd.config import Config, Limits
from runnerd.errors import ConfigError, SandboxError
from runnerd.percentiles import percentiles_ms
from runnerd.sandbox import uid_ranges
from runnerd.sandbox.job import make_job
from runnerd.server import protocol
from runnerd.server.clients import Client, tenant_of
from runnerd.server.fair_queue import FairQueue
from runnerd.server.protocol import ProtocolError, RunRequest
from runnerd.server.scheduler import Scheduler

from .test_scheduler import FakeRunner, Peer, settle


def simulate(arrivals: list[tuple[float, str, float]], slots: int) -> list[tuple[str, float, float, float]]:
    """Run (arrival time, tenant, cost) jobs through a FairQueue on *slots*: (tenant, arrival, start, end) each."""
    q: FairQueue[int] = FairQueue()
    events: list[tuple[float, int, int, str]] = []  # (time, kind 0=end 1=arrival, job, tenant)
    seq = itertools.count()
    jobs = {}
    for i, (at, tenant, cost) in enumerate(arrivals):
        jobs[i] = [tenant, at, cost, None, None]
        heapq.heappush(events, (at, 1, next(seq), i))
    free, tickets = slots, {}
    while events:
        now, kind, _, i = heapq.heappop(events)
        if kind == 0:
            free += 1
            q.done(tickets.pop(i), jobs[i][2])
        else:
            q.put(i, jobs[i][0])
        while free and len(q):
            j, ticket = q.get_nowait()
            tickets[j] = ticket
            free -= 1
            jobs[j][3], jobs[j][4] = now, now + jobs[j][2]
            heapq.heappush(events, (now + jobs[j][2], 0, next(seq), j))
    return [(t, at, start, end) for t, at, _, start, end in jobs.values()]


def jain(values: list[float]) -> float:
    return sum(values) ** 2 / (len(values) * sum(v * v for v in values))


def test_backlogged_tenants_of_different_run_costs_get_equal_service():
    # Four tenants, always backlogged, whose runs cost 1 s, 0.5 s, 0.2 s and 0.05 s.
    costs = {"a": 1.0, "b": 0.5, "c": 0.2, "d": 0.05}
    arrivals = [(0.0, t, c) for t, c in costs.items() for _ in range(int(400 / c))]
    done = simulate(arrivals, slots=2)
    window = 100.0  # all four are still backlogged then
    served = {
        t: sum(min(end, window) - start for tt, _, start, end in done if tt == t and start < window) for t in costs
    }
    assert jain(list(served.values())) >= 0.95, served
    # Round robin by runs would give "a" 20x the service of "d"; fair queuing by time does not.
    assert max(served.values()) / min(served.values()) < 1.3, served


def test_light_tenants_keep_their_latency_beside_a_tenant_with_ten_times_their_load():
    # Four light tenants each offer 0.4 run-s per s; the heavy one offers 10x that: 4 run-s per s on 2 slots.
    light = [(i * 0.5 + k * 0.1, f"light{k}", 0.2) for k in range(4) for i in range(200)]
    heavy = [(i * 0.05, "heavy", 0.2) for i in range(2000)]

    def light_p99(arrivals):
        done = simulate(arrivals, slots=2)
        waits = [end - at for t, at, _, end in done if t.startswith("light")]
        return percentiles_ms(waits)["p99"]

    alone, beside = light_p99(light), light_p99(light + heavy)
    assert beside <= 2 * alone, (alone, beside)


def test_an_idle_tenant_banks_no_credit():
    # "a" runs alone for 50 s; "b" then arrives with a backlog: they alternate, "b" does not get 50 s alone.
    arrivals = [(0.0, "a", 1.0) for _ in range(200)] + [(50.0, "b", 1.0) for _ in range(200)]
    done = simulate(arrivals, slots=1)
    after = sorted((start, t) for t, _, start, _ in done if 50.0 <= start < 70.0)
    assert [t for _, t in after].count("a") >= 9, after


def test_remove_and_a_cancelled_get_lose_nothing():
    async def main():
        q: FairQueue[str] = FairQueue()
        getter = asyncio.ensure_future(q.get())
        await settle()
        getter.cancel()
        q.put("x", "t")
        await settle()
        assert len(q) == 1
        item, first = await q.get()
        assert item == "x"
        q.done(first, 0.3)
        q.put("y", "t")
        q.put("z", "u")
        assert q.remove("y", "t") and not q.remove("y", "t")
        item, ticket = await q.get()
        assert item == "z"
        q.done(ticket, 0.0)
        assert len(q) == 0 and q.shares() == {}

    asyncio.run(main())


def req(i: str, tenant: str | None = None, session: str | None = None) -> RunRequest:
    return RunRequest(id=i, job=make_job("x", limits=Limits()), stream=False, digest="x" + i, tenant=tenant)


def test_a_tenant_past_its_cap_gets_busy_with_a_retry_hint_and_others_still_get_in():
    async def main():
        runner = FakeRunner()
        s = Scheduler(runner, concurrency=1, queue_size=10, retention_s=60, retention_max_bytes=1 << 30,
                      max_queued_per_tenant=2)  # fmt: skip
        s.start()
        peer = Peer()
        s.submit(req("r", "t1"), "p", peer.send)
        await settle()
        s.submit(req("q1", "t1"), "p", peer.send)
        s.submit(req("q2", "t1"), "p", peer.send)
        with pytest.raises(ProtocolError) as info:
            s.submit(req("q3", "t1"), "p", peer.send)
        assert info.value.code == "BUSY" and "max_queued_per_tenant 2" in info.value.message
        assert 50 <= (info.value.retry_after_ms or 0) <= 30_000
        s.submit(req("o1", "t2"), "p", peer.send)  # another tenant is not held back by t1's cap
        # t2's run goes before t1's second queued one: t1 has been served already.
        runner.release.set()
        for _ in range(50):
            await settle()
        order = [i for i in runner.job_ids]
        assert order.index("o1") < order.index("q2"), order
        await s.close()

    asyncio.run(main())


def test_a_draining_scheduler_refuses_new_and_queued_one_off_runs_with_draining():
    async def main():
        runner = FakeRunner()
        s = Scheduler(runner, concurrency=1, queue_size=10, retention_s=60, retention_max_bytes=1 << 30)
        s.start()
        running, queued = Peer(), Peer()
        s.submit(req("a"), "p1", running.send)
        await settle()
        s.submit(req("b"), "p2", queued.send)
        assert s.drain("draining for a test") == 1
        assert queued.frames[-1]["code"] == "DRAINING" and "did not run" in queued.frames[-1]["message"]
        with pytest.raises(ProtocolError) as info:
            s.submit(req("c"), "p3", Peer().send)
        assert info.value.code == "DRAINING"
        runner.release.set()  # the running one finishes
        for _ in range(20):
            await settle()
        assert running.frames[-1]["type"] == "result" and running.frames[-1]["outcome"] == "OUTCOME_OK"
        assert s.stats()["draining"] is True
        await s.close()

    asyncio.run(main())


def test_every_reply_carries_the_instance_and_a_tenant_is_checked():
    for frame in (
        protocol.reply("i", "pong"),
        protocol.error_reply("i", protocol.BUSY, "full", retry_after_ms=120),
    ):
        msg = msgpack.unpackb(frame, raw=False)
        assert msg["instance"] == protocol.INSTANCE and len(protocol.INSTANCE) == 16
    assert msgpack.unpackb(protocol.error_reply("i", "BUSY", "m", retry_after_ms=7), raw=False)["retry_after_ms"] == 7
    frame = protocol.request("run", "j", code="1", tenant="bad tenant!")
    with pytest.raises(ProtocolError, match="tenant must be"):
        protocol.decode_request(frame, Limits(), 1 << 20)
    ok = protocol.decode_request(protocol.request("run", "j", code="1", tenant="team-a"), Limits(), 1 << 20)
    assert ok.tenant == "team-a"
    # With CURVE a named tenant is the key's own; without, one name is one tenant across connections.
    keyed, plain = Client("key:K", "K"), Client("connection 01", None)
    assert tenant_of(ok.tenant, keyed) == "key:K/team-a" and tenant_of(ok.tenant, plain) == "team-a"
    assert tenant_of(None, plain) == "connection 01"


@pytest.mark.parametrize(
    "bind, ok",
    [
        ("tcp://127.0.0.1:7700", True),
        ("tcp://[::1]:7700", True),
        ("tcp://localhost:7700", True),
        ("tcp://0.0.0.0:7700", False),
        ("tcp://*:7700", False),
        ("tcp://10.1.2.3:7700", False),
        ("tcp://eth0:7700", False),
    ],
)
def test_a_plaintext_tcp_bind_beyond_loopback_is_refused_unless_the_operator_says_so(bind, ok):
    config = Config(bind=(bind,))
    if ok:
        config.validate()
        return
    with pytest.raises(ConfigError, match="no CURVE"):
        config.validate()
    Config(bind=(bind,), allow_plaintext_tcp=True).validate()
    Config(bind=(bind,), curve_server_key=Path("/k.key_secret"), curve_clients_dir=Path("/keys")).validate()


def test_instances_with_other_state_dirs_never_share_jailed_uids(tmp_path):
    registry = tmp_path / "uids"
    a = uid_ranges.lease(2_000_000, tmp_path / "a", registry)
    a_again = uid_ranges.lease(2_000_000, tmp_path / "a", registry)  # a `runnerd run` beside the daemon
    b = uid_ranges.lease(2_000_000, tmp_path / "b", registry)
    c = uid_ranges.lease(2_000_500, tmp_path / "c", registry)  # another uid_base that overlaps both
    assert a.first == a_again.first == 2_000_000
    assert b.first == 2_001_024
    spans = [(r.first, r.last) for r in (a, b, c)]
    for (f1, l1), (f2, l2) in itertools.combinations(spans, 2):
        assert l1 < f2 or l2 < f1, spans
    for r in (a, a_again, b, c):
        r.release()
    # Released (or its holder dead): the range is free again.
    assert uid_ranges.lease(2_000_000, tmp_path / "b", registry).first == 2_000_000


def test_when_every_range_is_held_the_error_says_so(tmp_path):
    registry = tmp_path / "uids"
    held = [uid_ranges.lease(2_000_000, tmp_path / f"s{i}", registry) for i in range(uid_ranges.RANGES)]
    with pytest.raises(SandboxError, match="all 64 jailed uid ranges"):
        uid_ranges.lease(2_000_000, tmp_path / "one-more", registry)
    for r in held:
        r.release()


def test_jains_index():
    from runnerd.bench.fairness import jain

    assert jain([60.0, 60.0, 60.0]) == 1.0
    assert jain([1.0, 0.0, 0.0, 0.0]) == 0.25  # one tenant has it all: 1/n
    assert round(jain([30.0, 3.0, 3.0]), 2) == 0.47  # shares in proportion to clients (a FIFO queue's)
    assert jain([0.0, 0.0]) == 0.0
