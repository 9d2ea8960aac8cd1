"""Watching a running cage: its pipes read as they come (capped), its deadline, its exit.

:func:`supervise` serves the cold cage and the warm child alike: stdout and
stderr go to ``on_output`` as they come and into capped captures, the
report into its parser, until the cage exits, the deadline passes, the
output passes its limits (:class:`~.output.OutputGuard`), or ``stop`` fires.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from ..result import Reason
from .cgroups import CgroupStats
from .output import OutputGuard, StreamCapture
from .report import MAX_REPORT_BYTES, Report, parse_report

log = logging.getLogger(__name__)

OnOutput = Callable[[str, bytes], None]
# After the cage has died, how long its pipes may take to report EOF.
PIPE_DRAIN_S = 2.0
READ_CHUNK = 1 << 16
# Past what the result keeps, how long a read that emptied a pipe waits for
# more (see read_pipe): a print() loop writes 12 bytes per syscall, and
# reading each as it comes kept the host as busy as the job. At most one
# pipe buffer (64 KiB) per pause: 64 MB/s still go through.
PACE_S = 0.001
# At most this many reads of READ_CHUNK when a pipe is drained without waiting for its EOF.
DRAIN_READS = 64


@dataclass
class Execution:
    """What one run in a cage produced, before the outputs are collected."""

    status: int | None = None  # trusted: see exit_status()
    wall_s: float = 0.0
    stop_reason: Reason | None = None
    output_stop: str = ""  # why the output stopped the job, when it did
    report: Report = field(default_factory=Report)  # what the harness said; untrusted
    problem: str = ""  # why the cage did not start, when it did not
    cage_fault: str = ""  # why the cage itself broke while the job ran, when it did
    note: str = ""  # a warning the result carries (what the code did that the host had to act on)
    stats: CgroupStats = field(default_factory=CgroupStats)


async def supervise(
    *,
    exited: asyncio.Future[None],
    kill: Callable[[], Awaitable[None]],
    out_r: int,
    err_r: int,
    rep_r: int,
    extra: Iterable[tuple[int, Callable[[bytes], None]]] = (),
    out: StreamCapture,
    err: StreamCapture,
    timeout: float,
    output_kill_bytes: int,
    on_output: OnOutput | None,
    stop: asyncio.Future[Reason] | None,
    drain_s: float = PIPE_DRAIN_S,
    before_drain: Callable[[], Awaitable[None]] | None = None,
) -> Execution:
    """Pump a running cage's pipes until it ends, enforcing the deadline, stop and output limit.

    *exited* resolves when the cage is gone (or a session's run is done);
    *kill* ends it (and must make *exited* resolve). Then *before_drain*
    (a session freezes itself), and the pipes get *drain_s* to reach EOF;
    what is in them past that is read at once. Takes ownership of the read fds.
    """
    loop = asyncio.get_running_loop()
    ex = Execution()
    started = time.monotonic()
    done: asyncio.Future[Reason | None] = loop.create_future()  # the first reason to stop, or None at exit

    def finish(reason: Reason | None) -> None:
        if not done.done():
            done.set_result(reason)

    report = bytearray()
    guard = OutputGuard(out, err, output_kill_bytes)

    def on_stream(capture: StreamCapture) -> Callable[[bytes], None]:
        def sink(data: bytes) -> None:
            live = capture.feed(data)
            if live and on_output is not None:
                try:
                    on_output(capture.name, live)
                except Exception:  # a consumer's bug must not break the job's bookkeeping
                    log.exception("output callback failed")
            if not done.done() and (why := guard.check(time.monotonic())):
                ex.output_stop = why
                finish(Reason.OUTPUT_LIMIT)

        return sink

    eofs = [
        read_pipe(loop, out_r, on_stream(out), pace=lambda: guard.passed_cap),
        read_pipe(loop, err_r, on_stream(err), pace=lambda: guard.passed_cap),
        read_pipe(loop, rep_r, capped(report, MAX_REPORT_BYTES)),
        *(read_pipe(loop, fd, sink) for fd, sink in extra),
    ]
    exited.add_done_callback(lambda _: finish(None))
    deadline = loop.call_later(timeout, finish, Reason.TIMEOUT)
    if stop is not None:
        stop.add_done_callback(lambda f: finish(f.result() if not f.cancelled() else Reason.CANCELLED))
    try:
        ex.stop_reason = await done
        if ex.stop_reason is not None:
            await kill()
        await exited
    finally:
        deadline.cancel()
        if not exited.done():  # cancelled from outside: never leave the cage running
            await asyncio.shield(kill())
            await asyncio.shield(exited)
        ex.wall_s = time.monotonic() - started
        if before_drain is not None:
            await asyncio.shield(before_drain())
        pending = [f for f in eofs if not f.done()]
        if pending and drain_s > 0:
            await asyncio.wait(pending, timeout=drain_s)
        for f in eofs:
            if not f.done():
                f.cancel()  # closes the fd (see read_pipe)
    ex.report = parse_report(bytes(report))
    return ex


def capped(buffer: bytearray, cap: int) -> Callable[[bytes], None]:
    def sink(data: bytes) -> None:
        if len(buffer) < cap:
            buffer.extend(data[: cap - len(buffer)])

    return sink


@dataclass(frozen=True)
class RunPipes:
    """A run's stdout, stderr and report pipes: the readers go to :func:`supervise`, the writers to the run."""

    readers: tuple[int, int, int]
    writers: tuple[int, int, int]

    @classmethod
    def open(cls) -> RunPipes:
        fds: list[int] = []
        try:
            for _ in range(3):
                fds.extend(os.pipe())
        except OSError:
            for fd in fds:
                os.close(fd)
            raise
        return cls(readers=(fds[0], fds[2], fds[4]), writers=(fds[1], fds[3], fds[5]))

    def close_readers(self) -> None:
        """When the run never reached :func:`supervise` (which closes them)."""
        for fd in self.readers:
            os.close(fd)

    def close_writers(self) -> None:
        """Once the run's processes hold them (or could not be given them): EOF comes from them alone."""
        for fd in self.writers:
            os.close(fd)


def read_pipe(
    loop: asyncio.AbstractEventLoop, fd: int, sink: Callable[[bytes], None], *, pace: Callable[[], bool] | None = None,
) -> asyncio.Future[None]:  # fmt: skip
    """Feed everything from *fd* to *sink*; the future resolves at EOF. Cancelling it closes the fd.

    While *pace* says so, a read that emptied the pipe waits PACE_S before
    the next: a writer of small chunks then costs a read per PACE_S, not
    one per write.
    """
    os.set_blocking(fd, False)
    eof: asyncio.Future[None] = loop.create_future()
    paused: asyncio.TimerHandle | None = None

    def close() -> None:
        if paused is not None:
            paused.cancel()
        loop.remove_reader(fd)
        os.close(fd)

    def drain() -> None:
        """What the pipe holds now (its writers are dead or frozen), then close it."""
        for _ in range(DRAIN_READS):
            try:
                data = os.read(fd, READ_CHUNK)
            except OSError:
                break
            if not data:
                break
            sink(data)
        close()

    def resume() -> None:
        nonlocal paused
        paused = None
        loop.add_reader(fd, readable)

    def readable() -> None:
        nonlocal paused
        try:
            data = os.read(fd, READ_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            sink(data)
            if len(data) < READ_CHUNK and pace is not None and pace():
                loop.remove_reader(fd)
                paused = loop.call_later(PACE_S, resume)
            return
        close()
        if not eof.done():
            eof.set_result(None)

    loop.add_reader(fd, readable)
    eof.add_done_callback(lambda f: drain() if f.cancelled() else None)
    return eof


def watch_exit(loop: asyncio.AbstractEventLoop, pid: int) -> asyncio.Future[None]:
    """A future that resolves when process *pid* exits (a pidfd; the caller reaps)."""
    fut: asyncio.Future[None] = loop.create_future()
    pidfd = os.pidfd_open(pid)

    def readable() -> None:
        loop.remove_reader(pidfd)
        os.close(pidfd)
        if not fut.done():
            fut.set_result(None)

    loop.add_reader(pidfd, readable)
    return fut
