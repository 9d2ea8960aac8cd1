"""Scheduling logic with a stand-in runner (no cage): queue, BUSY, cancel, resend, retention."""

from __future__ import annotations

import asyncio

import msgpack
import pytest

from runnerd.config import Limits
from runnerd.result import Outcome, Reason, Result
from runnerd.sandbox.job import make_job
from runnerd.server.protocol import ProtocolError, RunRequest
from runnerd.server.scheduler import Scheduler


class FakeRunner:
    """Runs a job by waiting until released (or stopped), printing its code to stdout."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.runs = 0
        self.job_ids: list[str | None] = []

    async def __call__(self, job, *, on_output, stop, name=None, job_id=None) -> Result:
        self.runs += 1
        self.job_ids.append(job_id)
        on_output("stdout", job.code.encode())
        waiter = asyncio.ensure_future(self.release.wait())
        await asyncio.wait([waiter, stop], return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if stop.done():
            return Result(outcome=Outcome.FAILED, reason=stop.result())
        return Result(outcome=Outcome.OK, reason=None, stdout=job.code)


def req(i: str, code: str = "x", stream: bool = True) -> RunRequest:
    return RunRequest(id=i, job=make_job(code, limits=Limits()), stream=stream, digest=code)


class Peer:
    def __init__(self) -> None:
        self.frames: list[dict] = []

    def send(self, frame: bytes) -> None:
        self.frames.append(msgpack.unpackb(frame, raw=False))

    def types(self) -> list[str]:
        return [f["type"] for f in self.frames]


def make(runner, **kw) -> Scheduler:
    opts = dict(concurrency=1, queue_size=1, retention_s=300, retention_max_bytes=1 << 30)
    opts.update(kw)
    return Scheduler(runner, **opts)


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


def test_queue_busy_cancel_and_resend():
    async def main():
        runner = FakeRunner()
        s = make(runner)
        s.start()
        a, b, c = Peer(), Peer(), Peer()
        s.submit(req("1", "one"), "a", a.send)
        s.submit(req("2", "two"), "b", b.send)
        await settle()
        assert (s.running, s.queued) == (1, 1)
        with pytest.raises(ProtocolError) as info:
            s.submit(req("3"), "c", c.send)
        assert info.value.code == "BUSY"
        # a resend of a known id is never BUSY: it subscribes
        s.submit(req("1", "one"), "c", c.send)
        assert c.types() == ["accepted", "stdout"] and c.frames[1]["offset"] == 0
        with pytest.raises(ProtocolError, match="different job"):
            s.submit(req("1", "other code"), "c", c.send)
        s.cancel("2", c.send)
        assert b.types() == ["accepted", "result"] and b.frames[-1]["reason"] == "cancelled"
        runner.release.set()
        await settle()
        assert a.types() == ["accepted", "stdout", "result"] and a.frames[-1]["outcome"] == "OUTCOME_OK"
        assert c.types()[-1] == "result"
        assert runner.runs == 1  # job 2 never ran, job 1 ran once
        assert runner.job_ids == ["1"]  # the runner logs a job under the client's id
        with pytest.raises(ProtocolError) as info:
            s.cancel("1", c.send)
        assert info.value.code == "NOT_FOUND"
        stats = s.stats()
        assert stats["done"] == 2 and stats["outcomes"] == {"OUTCOME_FAILED": 1, "OUTCOME_OK": 1}
        await s.close()

    asyncio.run(main())


def test_running_job_cancel_and_shutdown():
    async def main():
        runner = FakeRunner()
        s = make(runner, concurrency=2, queue_size=2)
        s.start()
        peers = [Peer() for _ in range(4)]
        for i, p in enumerate(peers):
            s.submit(req(str(i)), i, p.send)
        await settle()
        s.cancel("0", peers[0].send)
        await settle()
        assert peers[0].frames[-1]["reason"] == "cancelled"
        assert s.refuse_queued("BUSY", "runnerd is shutting down") == 1
        assert s.stop_running(Reason.SHUTDOWN) == 2
        await settle()
        assert peers[3].frames[-1]["type"] == "error" and peers[3].frames[-1]["code"] == "BUSY"
        reasons = sorted(p.frames[-1]["reason"] for p in peers[:3])
        assert reasons == ["cancelled", "shutdown", "shutdown"]
        assert (s.running, s.queued) == (0, 0)
        # An ended job keeps its digest and result, not its inputs.
        assert all(r.spec is None for r in s.jobs.values()) and len(s.jobs) == 3
        await s.close()

    asyncio.run(main())


def test_retention_by_time_and_bytes():
    async def main():
        runner = FakeRunner()
        runner.release.set()
        s = make(runner, concurrency=1, queue_size=10, retention_s=100, retention_max_bytes=5000)
        s.start()
        for i in range(4):
            s.submit(req(str(i), "y" * 1500), i, Peer().send)
            await settle()
        # each result is ~1500*2 bytes + overhead: only the newest fits in 5000 bytes
        assert list(s.jobs) == ["3"]
        s.retention.max_bytes = 1 << 30
        s.submit(req("4"), 4, Peer().send)
        await settle()
        assert s.evict(now=asyncio.get_running_loop().time() + 1000) == 2
        assert s.jobs == {}
        await s.close()

    asyncio.run(main())


def test_a_result_that_cannot_be_packed_is_answered_internal_and_keeps_the_slot():
    """Issue 16: a lone surrogate in a result made msgpack fail in the scheduler's bookkeeping, killing the slot."""

    async def main():
        class Bad(FakeRunner):
            async def __call__(self, job, **kw) -> Result:
                self.runs += 1
                if job.code == "bad":
                    return Result(outcome=Outcome.FAILED, reason=Reason.EXCEPTION, stdout="\udc80")
                return Result(outcome=Outcome.OK, reason=None, stdout=job.code)

        runner = Bad()
        s = make(runner, concurrency=1, queue_size=4)
        s.start()
        peers = [Peer() for _ in range(3)]
        s.submit(req("1", "bad"), "a", peers[0].send)
        s.submit(req("2", "bad"), "b", peers[1].send)
        s.submit(req("3", "good"), "c", peers[2].send)
        for _ in range(50):
            await settle()
            if peers[2].types()[-1:] == ["result"]:
                break
        for peer in peers[:2]:
            assert peer.types() == ["accepted", "error"] and peer.frames[-1]["code"] == "INTERNAL", peer.frames
        assert peers[2].frames[-1]["stdout"] == "good"
        assert (s.running, s.queued, runner.runs) == (0, 0, 3)
        assert "1" not in s.jobs  # forgotten: a resend runs it again
        await s.close()

    asyncio.run(main())


def test_a_worker_that_dies_is_replaced():
    async def main():
        runner = FakeRunner()
        runner.release.set()
        s = make(runner, concurrency=1)
        real = s._worker
        deaths = []

        async def dies_once(slot: int) -> None:
            if not deaths:
                deaths.append(slot)
                raise RuntimeError("a bug")
            await real(slot)

        s._worker = dies_once  # type: ignore[method-assign]
        s.start()
        peer = Peer()
        s.submit(req("1", "after"), "a", peer.send)
        for _ in range(100):
            await asyncio.sleep(0.01)
            if peer.types()[-1:] == ["result"]:
                break
        assert deaths == [0] and peer.frames[-1]["stdout"] == "after", peer.frames
        await s.close()

    asyncio.run(main())


def test_session_opens_are_bounded_by_concurrency():
    """Issue 16: cold opens bypassed concurrency (64 nsjail starts at once); now at most `concurrency` open at once."""
    from runnerd.config import Config
    from runnerd.server.protocol import OpenRequest
    from runnerd.server.sessions import SessionManager

    async def main():
        release = asyncio.Event()
        active, peak = [0], [0]

        async def opener(session_id, files):
            active[0] += 1
            peak[0] = max(peak[0], active[0])
            try:
                await release.wait()
            finally:
                active[0] -= 1
            raise RuntimeError("no cage in a unit test")

        manager = SessionManager(Config(concurrency=2), opener)
        peers = [Peer() for _ in range(6)]
        for i, peer in enumerate(peers):
            manager.open(OpenRequest(id=f"o{i}", session=f"s{i}", files=(), idle_timeout=None, digest="d"), peer.send)
        for _ in range(20):
            await asyncio.sleep(0)
        assert (active[0], peak[0]) == (2, 2)  # four wait for a turn
        release.set()
        for _ in range(50):
            await asyncio.sleep(0)
        assert peak[0] == 2 and all(p.types() == ["error"] for p in peers), [p.frames for p in peers]

    asyncio.run(main())
