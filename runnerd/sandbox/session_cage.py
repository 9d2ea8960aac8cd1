"""A session's cage as the host holds it, cold or warm, and the reading of its control socket.

:class:`SessionCage` is what both runners hand to a session (cold: nsjail
running incage/session.py, :meth:`~.cage.Cage.open_session`; warm: a
session zygote's armed child, :meth:`~.zygotes.Zygote.open_session`): its
cgroup, its control socket, directory fds of its /work and figures dir,
and how to end it. :class:`Control` reads the
socket (the user's code holds the other end too: nothing is trusted beyond
its size). :func:`snapshot` and :func:`write_inputs` are the file side.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import socket
import stat
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Limits
from ..errors import SandboxError
from .cgroups import JobCgroup
from .control import HEADER, size_of
from .job import InputFile

# A session's home (Matplotlib's and pip's caches, dotfiles): a tmpfs of this size and inode count.
SESSION_HOME = (16 << 20, 1024)


def session_figures(limits: Limits) -> tuple[int, int]:
    """A session's figures dir: one run's rendered figures at most (each run starts it empty)."""
    return limits.max_artifacts_total_bytes + (1 << 20), 4 * limits.max_figures + 64


# A run says "running" and "done" once and its PID 1 "exit" once: a session that sends more
# between two runs is flooding the host, and is treated as broken (ended).
MAX_EVENTS_PER_RUN = 8
# U is the first process its PID 1 forks.
USER_NS_PID = "2"

# A file's identity for "did this run make or change it".
Snapshot = dict[str, tuple[int, int, int, int]]


@dataclass
class SessionCage:
    """A started session's cage, cold or warm: what :class:`Session` drives."""

    cgroup: JobCgroup
    ctl: socket.socket  # the host's end of the session's control socket (non-blocking)
    # The session's /work, a tmpfs of the host's (root's, mode 1777): the root of
    # its mount (warm: the mount fd the session attached), and its figures dir.
    work_fd: int
    figures_fd: int
    end: Callable[[], Awaitable[None]]  # kill what is left and remove everything (idempotent)
    diagnostics: Callable[[], str] = lambda: ""

    def close_fds(self) -> None:
        """Once the session is gone: its /work's last reference (warm: the mount fd) goes with these."""
        for fd in (self.work_fd, self.figures_fd):
            if fd >= 0:
                os.close(fd)
        self.work_fd = self.figures_fd = -1

    @contextmanager
    def hold(self) -> Iterator[Dirs]:
        """Copies of the directory fds, for one host step (in a thread, maybe).

        A step never uses :attr:`work_fd` by number: the session may end under
        it, its fds be closed, and the number be reused for another session's
        directory. A copy keeps naming this session's. SandboxError once it is gone.
        """
        if self.work_fd < 0 or self.figures_fd < 0:
            raise SandboxError("the session's cage is gone")
        work = os.dup(self.work_fd)
        try:
            figures = os.dup(self.figures_fd)
        except OSError:
            os.close(work)
            raise
        try:
            yield Dirs(work, figures)
        finally:
            os.close(work)
            os.close(figures)


@dataclass(frozen=True)
class Dirs:
    """A session's /work and figures dir, by fds of a host step's own (:meth:`SessionCage.hold`)."""

    work_fd: int
    figures_fd: int

    @property
    def work(self) -> Path:
        return Path(f"/proc/self/fd/{self.work_fd}")

    @property
    def figures(self) -> Path:
        return Path(f"/proc/self/fd/{self.figures_fd}")


class Control:
    """The host's reader of a session's control socket: framed JSON (incage/session.py), fds with "mounted".

    The user's code holds the same socket: nothing read is trusted beyond
    its size, fds are taken only until *accept_fds* is turned off (the
    warm cage's "mounted", before any user code), and a flood of events ends it.
    """

    def __init__(self, sock: socket.socket, *, accept_fds: bool) -> None:
        self.sock = sock
        self.events: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self.closed = False
        self.accept_fds = accept_fds
        self.budget = MAX_EVENTS_PER_RUN
        self.broken = False  # it sent what the session's own code never sends (a flood, a frame too large)
        self._buffer = b""
        self._fds: list[int] = []
        loop = asyncio.get_running_loop()
        sock.setblocking(False)
        loop.add_reader(sock.fileno(), self._readable)
        self._loop = loop

    def _readable(self) -> None:
        try:
            data, fds, _, _ = socket.recv_fds(self.sock, 1 << 16, 4)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data, fds = b"", []
        if self.accept_fds:
            self._fds.extend(fds)
        else:
            for fd in fds:
                os.close(fd)
        if not data:
            self._eof()
            return
        self._buffer += data
        while len(self._buffer) >= HEADER.size:
            try:
                size = size_of(self._buffer[: HEADER.size])
            except ValueError:
                self.broken = True  # the session broke the protocol: it is treated as gone
                self._eof()
                return
            end = HEADER.size + size
            if len(self._buffer) < end:
                break
            body, self._buffer = self._buffer[HEADER.size : end], self._buffer[end:]
            self.budget -= 1
            if self.budget < 0:
                self.broken = True
                self._eof()
                return
            try:
                event = json.loads(body)
            except (ValueError, RecursionError):  # RecursionError: [[[[... nested past the parser's depth
                event = None
            if isinstance(event, dict):
                if event.get("event") == "mounted":
                    event["fds"], self._fds = self._fds, []
                self.events.put_nowait(event)

    def _eof(self) -> None:
        if not self.closed:
            self.closed = True
            self._loop.remove_reader(self.sock.fileno())
            self.events.put_nowait(None)

    def take_fds(self) -> list[int]:
        fds, self._fds = self._fds, []
        return fds

    async def next(self, timeout: float | None = None) -> dict[str, Any] | None:
        """The next event, None once the socket closed (it stays closed for later callers)."""
        event = await asyncio.wait_for(self.events.get(), timeout)
        if event is None:
            self.events.put_nowait(None)
        return event

    def close(self) -> None:
        """Stop reading (whoever waits for an event gets None), close the socket and any fds not taken."""
        if self.sock.fileno() >= 0:
            self._eof()
        for fd in self.take_fds():
            os.close(fd)
        self.sock.close()


def snapshot(work: Path) -> Snapshot:
    """What /work holds now (every file, by path): the baseline "this run made or changed" is measured on."""
    found: Snapshot = {}
    stack = [(work, "")]
    while stack and len(found) < 100_000:
        directory, prefix = stack.pop()
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            relative = prefix + entry.name
            if stat.S_ISDIR(st.st_mode):
                stack.append((Path(entry.path), relative + "/"))
            else:  # links and special files too: a warning about one is news only once
                found[relative] = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    return found


def code_file(code: str) -> int:
    """A run's code as a sealed memfd (read-only to whoever gets it): the session reads it, the order stays small."""
    fd = os.memfd_create("runnerd-run", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(code.encode("utf-8", "surrogatepass"))
        while view:
            view = view[os.write(fd, view) :]
        fcntl.fcntl(
            fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
        )
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_inputs(work_fd: int, files: Iterable[InputFile]) -> None:
    """The run's input files in /work, root's and read-only, by their (checked, plain) names.

    /work is root's with the sticky bit: the session can neither change,
    remove nor replace them, and writes files of its own beside them.
    """
    for f in files:
        fd = os.open(f.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o444, dir_fd=work_fd)
        try:
            view = memoryview(f.data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)


def user_pid(cg: JobCgroup) -> int:
    """U's host pid: the session's process whose pid in its own namespace is 2."""
    for pid in cg.procs():
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("NSpid:") and len(line.split()) > 2 and line.split()[-1] == USER_NS_PID:
                    return pid
        except OSError:
            continue
    raise SandboxError("the session's process is not in its cgroup")
