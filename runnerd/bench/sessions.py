"""``runnerd bench``'s session rows through a daemon (issue 12): S1 open/close, S2 and S3 runs, S4 memory.

They talk runnerd/1 on a raw DEALER socket of their own (:class:`Wire`).
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import zmq

from ..errors import RunnerdError
from ..percentiles import percentiles_ms
from ..result import Outcome
from ..wire import decode_reply, request
from .daemon import STARTED
from .memory import MiB, frozen_cgroups, memory_reading, smaps_rollup, tree_pss
from .report import Progress, Row, row_of
from .tickets import Tickets
from .workloads import SESSIONS_FOR_MEMORY, Workload

# S4: after the opens (and the runs), before reading memory: the zygote re-arms its next child.
MEMORY_SETTLE_S = 2.0


def _new_id(kind: str) -> str:
    return f"bench-{kind}-{uuid.uuid4().hex[:16]}"


class Wire:
    """runnerd/1 on one DEALER socket of its own: open, run in a session, close, nothing in between.

    Not :class:`~runnerd.client.Client`: the session rows measure the daemon,
    so no client-side state or resend policy sits on the path. One request at
    a time; replies of other ids (a late one) are skipped.
    """

    TERMINAL = {"open": "opened", "close": "closed", "run": "result"}

    def __init__(self, endpoint: str) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def __enter__(self) -> Wire:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def call(self, op: str, *, wait: float = 600.0, **fields: Any) -> dict[str, Any]:
        """Send one request; its terminal reply (``opened``/``closed``/``result``, or ``error``)."""
        request_id = _new_id(op)
        self.sock.send(request(op, request_id, **fields))
        terminal = self.TERMINAL[op]
        deadline = time.monotonic() + wait
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.sock.poll(int(left * 1000) + 1):
                raise RunnerdError(f"runnerd bench: no reply to {op} in {wait:.0f} s")
            msg = decode_reply(self.sock.recv())
            if msg.get("id") == request_id and msg.get("type") in (terminal, "error"):
                return msg

    def open(self, session: str, files: tuple[tuple[str, bytes], ...] = ()) -> dict[str, Any]:
        """Open *session*, with *files* as its inputs."""
        if files:
            return self.call("open", session=session, files=[{"name": n, "data": d} for n, d in files])
        return self.call("open", session=session)

    def run(self, session: str, code: str) -> dict[str, Any]:
        return self.call("run", session=session, code=code, stream=False)

    def close(self, session: str) -> dict[str, Any]:
        return self.call("close", session=session, wait=60.0)


def _why(reply: dict[str, Any]) -> str:
    if reply.get("type") == "error":
        return f"{reply.get('code')}: {reply.get('message')}"
    return f"{reply.get('outcome')} {reply.get('reason')} {str(reply.get('stderr', ''))[-300:]}"


def _run_ok(reply: dict[str, Any], figures: int | None) -> bool:
    return (
        reply.get("type") == "result"
        and reply.get("outcome") == Outcome.OK.value
        and (figures is None or len(reply.get("figures") or ()) == figures)
    )


@contextlib.contextmanager
def _session(wire: Wire, w: Workload) -> Iterator[str]:
    """An open session holding *w*'s files that has run *w*'s setup; closed on the way out."""
    sid = _new_id(w.name)
    reply = wire.open(sid, w.files)
    if reply.get("type") != "opened":
        raise RunnerdError(f"runnerd bench: {w.name}: open failed: {_why(reply)}")
    try:
        if w.setup:
            reply = wire.run(sid, w.setup)
            if not _run_ok(reply, None):
                raise RunnerdError(f"runnerd bench: {w.name}: the session's setup run failed: {_why(reply)}")
        yield sid
    finally:
        wire.close(sid)


def bench_session(endpoint: str, mode: str, w: Workload, n: int, clients: int, progress: Progress) -> list[Row]:
    """The session rows of *w* through a daemon."""
    if w.kind == "open":
        return _bench_open(endpoint, mode, w, n, progress)
    if w.kind == "run":
        return _bench_run(endpoint, mode, w, n, clients, progress)
    if w.kind == "memory":
        return [_bench_memory(endpoint, mode, w, progress)]
    raise AssertionError(w.kind)


def _bench_open(endpoint: str, mode: str, w: Workload, n: int, progress: Progress) -> list[Row]:
    opens: list[float] = []
    closes: list[float] = []
    open_failures = close_failures = 0
    with Wire(endpoint) as wire:
        with _session(wire, w):  # a warm-up open (and close)
            pass
        for i in range(n):
            sid = _new_id(w.name)
            t = time.perf_counter()
            reply = wire.open(sid, w.files)
            opens.append(time.perf_counter() - t)
            if reply.get("type") != "opened":
                open_failures += 1
                continue
            t = time.perf_counter()
            reply = wire.close(sid)
            closes.append(time.perf_counter() - t)
            close_failures += reply.get("type") != "closed"
            progress(f"{w.name} {mode}", i + 1, n)
    rows = [row_of(w.name, mode, opens, open_failures)]
    if closes:
        rows.append(row_of(w.name, f"{mode} close", closes, close_failures))
    return rows


def _bench_run(endpoint: str, mode: str, w: Workload, n: int, clients: int, progress: Progress) -> list[Row]:
    """Sequential runs in one session, then *clients* clients with a session each."""
    times: list[float] = []
    walls: list[float] = []
    failures = 0
    with Wire(endpoint) as wire, _session(wire, w) as sid:
        wire.run(sid, w.code)  # warm-up
        for i in range(n):
            t = time.perf_counter()
            reply = wire.run(sid, w.code)
            times.append(time.perf_counter() - t)
            ok = _run_ok(reply, w.figures)
            failures += not ok
            if ok:
                walls.append(float(reply["usage"]["wall_s"]))
            progress(f"{w.name} {mode}", i + 1, n)
    row = row_of(w.name, mode, times, failures)
    if walls:
        inside, whole = percentiles_ms(walls)["p50"], row.p50_ms
        row.notes.append(
            f"{w.name} {mode}: the run itself (result usage.wall_s, send to done) p50 {inside:.2f} ms; "
            f"the rest (queue, thaw, freeze, collect, transport) {whole - inside:.2f} ms of the p50 {whole:.2f} ms"
        )
    rows = [row]

    tickets = Tickets(max(n, 4 * clients), f"{w.name} {mode} x{clients}", progress)
    ready = threading.Barrier(clients + 1)

    def worker() -> None:
        try:
            with Wire(endpoint) as wire, _session(wire, w) as sid:
                wire.run(sid, w.code)
                ready.wait()
                tickets.serve(lambda: _run_ok(wire.run(sid, w.code), w.figures))
        except Exception as exc:  # a failed client must not leave the others (or the bench) at the barrier
            sys.stderr.write(f"{exc}\n")
            tickets.failed()
            ready.abort()

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for th in threads:
        th.start()
    with contextlib.suppress(threading.BrokenBarrierError):
        ready.wait()  # every client's session open and set up
    t0 = time.perf_counter()
    for th in threads:
        th.join()
    elapsed = time.perf_counter() - t0
    if tickets.times:
        rows.append(tickets.row(w.name, f"{mode} x{clients}", clients, elapsed))
    return rows


def _memory_note(label: str, m: dict[str, Any]) -> str:
    if not m["pss_mib"]:
        return f"{label}: no session's cgroup found (no frozen cgroup appeared with the opens)"
    note = (
        f"{label}: PSS per session (its cgroup's processes) mean {m['pss_mean_mib']:.1f} MiB "
        f"(min {min(m['pss_mib']):.1f}, max {max(m['pss_mib']):.1f}), private (USS) mean {m['uss_mean_mib']:.1f} MiB"
    )
    if "tree_growth_mib" in m:
        note += (
            f"; the daemon's tree PSS grew {m['tree_growth_mib']:.1f} MiB = "
            f"{m['tree_growth_per_session_mib']:.1f} MiB per session"
        )
    if "zygote_pss_mib" in m:
        note += f"; session zygote PSS {m['zygote_pss_mib']:.1f} MiB (RSS {m['zygote_rss_mib']:.1f})"
    return note


def _bench_memory(endpoint: str, mode: str, w: Workload, progress: Progress) -> Row:
    """S4: open SESSIONS_FOR_MEMORY sessions and leave them idle; their memory, then again after a print(1) each."""
    n = SESSIONS_FOR_MEMORY
    daemon = STARTED.get(endpoint)
    times: list[float] = []
    failures = 0
    opened: list[str] = []
    cgroups: list[Path] = []
    with Wire(endpoint) as wire:
        try:
            tree_before = tree_pss(daemon) if daemon is not None else None
            for i in range(n):
                before = frozen_cgroups(daemon)
                sid = _new_id(w.name)
                t = time.perf_counter()
                reply = wire.open(sid, w.files)
                times.append(time.perf_counter() - t)
                if reply.get("type") != "opened":
                    failures += 1
                    continue
                opened.append(sid)
                new = frozen_cgroups(daemon) - before
                if len(new) == 1:
                    cgroups.extend(new)
                progress(f"{w.name} {mode}", i + 1, n)
            time.sleep(MEMORY_SETTLE_S)
            idle = memory_reading(daemon, cgroups, tree_before)
            for sid in opened:
                failures += not _run_ok(wire.run(sid, "print(1)"), None)
            time.sleep(MEMORY_SETTLE_S)
            after_run = memory_reading(daemon, cgroups, tree_before)
        finally:
            for sid in opened:
                wire.close(sid)
    row = row_of(w.name, mode, times, failures)
    row.memory = {"idle": idle, "after_print": after_run}
    row.notes.append(_memory_note(f"{w.name} {mode}: {len(opened)} idle sessions", idle))
    row.notes.append(_memory_note(f"{w.name} {mode}: the same after one print(1) in each", after_run))
    zygote = idle.get("zygote_pid")
    if zygote is not None:
        time.sleep(MEMORY_SETTLE_S)  # the sessions closed: the zygote shares its pages with its armed child only
        r = smaps_rollup(zygote)
        alone = {"pss_mib": round(r.get("Pss", 0) / MiB, 2), "rss_mib": round(r.get("Rss", 0) / MiB, 2)}
        row.memory["zygote_alone"] = alone
        row.notes.append(
            f"{w.name} {mode}: the session zygote with no session open: PSS {alone['pss_mib']:.1f} MiB "
            f"(RSS {alone['rss_mib']:.1f})"
        )
    return row
