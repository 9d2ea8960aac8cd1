"""Issue 17, the client's side: one Client over three real daemons on this host (tcp on loopback).

Placement, failover of one-off jobs when a daemon is killed or wedged,
sessions pinned to their daemon and lost with it, a draining daemon left
alone, and HOST_LOST when the daemons a job went to are lost. The daemons
are separate processes with their own state dirs and uid ranges; the fleet
test across network namespaces (links cut, DNS discovery) is the next step.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator

import pytest

from runnerd.client import Client, Finished, Output
from runnerd.config import Config
from runnerd.errors import HostLost, SessionLost
from runnerd.fleet.members import SILENCE_S
from runnerd.result import SessionEnd

from .conftest import DaemonProc, free_port
from .test_integrations import assert_reopened_and_told
from .test_sessions import _home, assert_clean, launch, wait_until

UID_BASE = 2_900_000
SLOW = "import time\nprint('in', flush=True)\ntime.sleep(2)\nprint('done')"


class Fleet:
    def __init__(self, home: Config, names: tuple[str, ...]) -> None:
        self.home = home
        self.tcp = {name: f"tcp://127.0.0.1:{free_port()}" for name in names}
        self.daemons: dict[str, DaemonProc] = {}
        for name in names:
            self.start(name)

    def start(self, name: str) -> DaemonProc:
        state = self.home.state_dir / name
        state.mkdir(exist_ok=True)
        config = Config(state_dir=state, env_path=self.home.sandbox_env, uid_base=self.home.uid_base)
        d = launch(config, name, mode="cold", concurrency=1, tcp=self.tcp[name], shutdown_grace_s=5)
        self.daemons[name] = d
        return d

    def spec(self, *names: str) -> str:
        return ",".join(self.tcp[n] for n in (names or tuple(self.tcp)))

    def name_of(self, endpoint: str) -> str:
        return next(n for n, e in self.tcp.items() if e == endpoint)

    def done(self, name: str) -> int:
        with Client(self.daemons[name].ipc) as c:
            return c.stats()["done"]

    def stop_all(self) -> None:
        for d in self.daemons.values():
            if d.proc.poll() is None:
                d.proc.send_signal(signal.SIGCONT)
            assert d.stop() in (0, -9), d.log()[-3000:]


@pytest.fixture(scope="module")
def fleet(cage_confirmed) -> Iterator[Fleet]:
    for home in _home(cage_confirmed, UID_BASE):
        f = Fleet(home, ("a", "b", "c"))
        try:
            yield f
        finally:
            f.stop_all()
        assert_clean(home)


def restart(fleet: Fleet, name: str) -> None:
    d = fleet.daemons[name]
    if d.proc.poll() is None:
        d.proc.send_signal(signal.SIGCONT)
        d.stop()
    fleet.start(name)  # a new instance on the same port; it sweeps what the old one left


def running_on(c: Client) -> str:
    assert c.fleet is not None
    (endpoint,) = c.fleet.in_flight
    return endpoint


def test_one_off_jobs_spread_over_the_ready_daemons(fleet):
    before = {n: fleet.done(n) for n in fleet.tcp}
    results = []

    def worker() -> None:
        with Client(fleet.spec()) as c:
            results.extend(c.run(f"print({i})") for i in range(4))

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == 12 and all(r.ok for r in results), results
    served = {n: fleet.done(n) - before[n] for n in fleet.tcp}
    assert sum(served.values()) == 12 and sum(1 for v in served.values() if v) >= 2, served
    with Client(fleet.spec()) as c:
        members = c.ping()["members"]
    assert sorted(m["endpoint"] for m in members if m["alive"] and m["state"] == "ready") == sorted(fleet.tcp.values())


@pytest.mark.parametrize("fault", ["kill", "stop"])
def test_a_job_whose_daemon_is_killed_or_wedged_runs_elsewhere_and_is_answered_once(fleet, fault):
    with Client(fleet.spec()) as c:
        events = c.stream(SLOW)
        victim = None
        seen: list[object] = []
        for event in events:
            seen.append(event)
            if isinstance(event, Output) and victim is None:
                victim = fleet.name_of(running_on(c))
                hit = time.monotonic()
                fleet.daemons[victim].proc.send_signal(signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
            if isinstance(event, Finished):
                break
        took = time.monotonic() - hit
        result = seen[-1].result
        assert result.ok and result.stdout == "in\ndone\n", result
        assert sum(isinstance(e, Finished) for e in seen) == 1
        assert b"".join(e.data for e in seen if isinstance(e, Output)) == b"in\ndone\n"  # no line twice
        print(f"{fault}: the job's result came {took:.2f} s after the fault (3 s silence + a 2 s run)")
        assert took < 3.5 + 2 + 3, took
    restart(fleet, victim)


def test_a_session_stays_on_its_daemon_and_is_lost_with_it(fleet):
    with Client(fleet.spec()) as c:
        s = c.session()
        s.open()
        assert s.pin is not None and s.pin.endpoint == c.owner(s.id)
        home = fleet.name_of(s.pin.endpoint)
        s.run("x = 41")
        for _ in range(3):
            assert s.run("x + 1").value == "42"  # every run on its opening instance
        time.sleep(SILENCE_S + 1)  # a model thinking: no call, so no pings; that silence is the client's own
        assert s.run("x + 1").value == "42"
        with Client(fleet.daemons[home].ipc) as direct:
            assert direct.stats()["sessions"]["open"] == 1
        fleet.daemons[home].proc.send_signal(signal.SIGKILL)
        with pytest.raises(SessionLost) as info:
            s.run("x + 2")
        assert fleet.tcp[home] in str(info.value) and "stopped answering" in str(info.value)
        assert not s.alive and s.ended is SessionEnd.HOST_LOST
        assert s.ensure_open() is True  # a new session, on a live daemon
        assert s.pin.endpoint != fleet.tcp[home]
        assert s.run("'x' in dir()").value == "False"  # a fresh interpreter, as said: never a silent one
        s.close()
    restart(fleet, home)


def test_an_agents_session_lost_with_its_daemon_is_opened_again_elsewhere_and_the_agent_told(fleet):
    from smolagents.default_tools import FinalAnswerTool
    from smolagents.monitoring import AgentLogger, LogLevel

    from runnerd.integrations.langchain import RunnerdPython
    from runnerd.integrations.smolagents import RunnerdExecutor

    executor = RunnerdExecutor([], AgentLogger(level=LogLevel.OFF), fleet.spec())
    tool = RunnerdPython(endpoint=fleet.spec())
    thread = {"configurable": {"thread_id": "t"}}
    homes: set[str] = set()
    try:
        executor.send_tools({"final_answer": FinalAnswerTool()})
        executor("x = 41")
        assert tool.invoke({"code": "x = 41\nprint(x)"}, thread)[0]["text"] == "41"
        homes = {fleet.name_of(executor.session.pin.endpoint), fleet.name_of(tool._threads["t"].session.pin.endpoint)}
        for home in homes:  # one or two of the three
            fleet.daemons[home].proc.send_signal(signal.SIGKILL)
        assert_reopened_and_told(executor, tool, thread, "the sandbox host that held it died or restarted")
        assert fleet.name_of(executor.session.pin.endpoint) not in homes  # the new sessions are elsewhere
        assert fleet.name_of(tool._threads["t"].session.pin.endpoint) not in homes
    finally:
        executor.cleanup()
        tool.close()
        for home in homes:  # its leftover cages go with the restart
            restart(fleet, home)


def test_a_draining_daemon_is_left_alone_and_nothing_fails(fleet):
    drained = "c"
    fleet.daemons[drained].proc.send_signal(signal.SIGUSR1)
    with Client(fleet.spec()) as c:
        wait_until(lambda: (c.ping(), c.fleet.members[fleet.tcp[drained]].state == "draining")[1], 10, "draining seen")
        before = fleet.done(drained)
        results = [c.run(f"print({i})") for i in range(6)]
    assert all(r.ok for r in results)
    assert fleet.done(drained) == before
    restart(fleet, drained)


def test_host_lost_names_the_daemons_it_went_to(fleet):
    with Client(fleet.spec("a", "b")) as c:
        c.ping()
        victims = ("a", "b")
        events = c.stream("import time\nprint('in', flush=True)\ntime.sleep(30)")
        with pytest.raises(HostLost) as info:
            for event in events:
                if isinstance(event, Output):
                    for v in victims:
                        fleet.daemons[v].proc.send_signal(signal.SIGSTOP)
        assert info.value.code == "HOST_LOST"
        assert any(fleet.tcp[v] in str(info.value) for v in victims), info.value
    for v in victims:
        restart(fleet, v)


def test_the_asyncio_client_places_fails_over_and_pins_sessions_the_same_way(fleet):
    import asyncio

    from runnerd.client import AsyncClient

    async def main() -> None:
        async with AsyncClient(fleet.spec()) as c:
            for i in range(3):  # one run at a time: a client is one task's
                assert (await c.run(f"print({i})")).stdout == f"{i}\n"
            victim = None
            finished = None
            async for event in c.stream(SLOW):
                if isinstance(event, Output) and victim is None:
                    (endpoint,) = c.fleet.in_flight
                    victim = fleet.name_of(endpoint)
                    fleet.daemons[victim].proc.send_signal(signal.SIGKILL)
                if isinstance(event, Finished):
                    finished = event.result
            assert finished is not None and finished.ok and finished.stdout == "in\ndone\n", finished
            restart(fleet, victim)
            s = c.session()
            await s.open()
            home = fleet.name_of(s.pin.endpoint)
            assert (await s.run("x = 6 * 7\nx")).value == "42"
            fleet.daemons[home].proc.send_signal(signal.SIGKILL)
            with pytest.raises(SessionLost):
                await s.run("x")
            assert s.ended is SessionEnd.HOST_LOST and await s.ensure_open() is True
            assert s.pin.endpoint != fleet.tcp[home]
            await s.close()
            restart(fleet, home)

    asyncio.run(main())


def test_bench_fleet_rows(cage_confirmed, tmp_path):
    """``runnerd bench --modes fleet``: one daemon on one CPU, then two on two through the fleet layer."""
    import json
    import subprocess
    import sys

    config = tmp_path / "bench.toml"
    config.write_text(
        f'state_dir = "{cage_confirmed.config.state_dir}"\nenv_path = "{cage_confirmed.config.sandbox_env}"\n'
    )
    out = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, "-m", "runnerd", "--config", str(config), "bench", "--modes", "fleet", "--workloads", "W1",
         "--jobs", "6", "--clients", "2", "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {(r["workload"], r["mode"]): r for r in json.loads(out.read_text())["rows"]}
    for mode in ("1 daemon, 1 CPU", "fleet of 2, 2 CPUs"):
        assert rows[("W1", mode)]["jobs"] == 6 and rows[("W1", mode)]["failures"] == 0
        assert rows[("W1", f"{mode} x2")]["throughput_jobs_s"] > 0
    assert "throughput of 2 daemons on 2 CPUs / 1 on 1 CPU" in run.stdout, run.stdout
    assert "p50 through the fleet layer" in run.stdout


def test_bench_fairness_through_a_real_daemon(cage_confirmed, tmp_path):
    """``runnerd bench --modes fairness``, short: tenants named by their clients share a warm daemon's slots
    equally (a FIFO queue would serve the 30-client tenant ten times the others: Jain 0.47)."""
    from runnerd.bench import Progress
    from runnerd.bench.fairness import BACKLOGGED, JAIN_TARGET, LIGHT_TENANTS, bench_fairness, jain

    config = tmp_path / "bench.toml"
    config.write_text(
        f'state_dir = "{cage_confirmed.config.state_dir}"\nenv_path = "{cage_confirmed.config.sandbox_env}"\n'
    )
    alone, mixed, backlogged = bench_fairness(config, 2, Progress(), seconds=4.0)
    assert alone.mode == f"{LIGHT_TENANTS} light tenants" and alone.jobs >= LIGHT_TENANTS and not alone.failures
    assert not mixed.failures and mixed.served is not None and "light tenants' p99" in mixed.notes[0]
    assert mixed.served["heavy"] > 0 and all(mixed.served[f"light{i}"] > 0 for i in range(LIGHT_TENANTS))
    assert not backlogged.failures and backlogged.served is not None
    shares = [backlogged.served[t] for t in BACKLOGGED]
    assert min(shares) > 0 and jain([float(x) for x in shares]) >= JAIN_TARGET, backlogged.notes
