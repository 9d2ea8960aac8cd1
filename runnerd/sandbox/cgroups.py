"""One cgroup per job, on cgroup v1 or v2: limits in, counters out, nothing left behind.

runnerd, not nsjail, owns the job cgroups: it needs to read them after the
cage has died (did the OOM killer fire? peak memory? CPU time?), to kill
every process left in them, and to sweep the ones a crash left behind. The
nsjail process itself is moved in before it starts the job (see nsjail.py),
so everything it forks is counted.

Layout:

* v1: ``<controller mount>/<parent>/<job>`` for memory, pids, cpu, cpuacct
  (``<parent>`` is ``runnerd`` unless configured);
* v2: ``<parent>/<job>`` where ``<parent>`` is a cgroup with the memory,
  pids and cpu controllers enabled for its children: under systemd with
  ``Delegate=yes`` the service's own cgroup (the daemon moves itself into a
  ``supervisor`` leaf first, as cgroup v2 wants no processes in inner
  nodes), otherwise ``/runnerd`` under the root.

This module is the interface (:class:`Cgroups`, :class:`JobCgroup`) and the
file helpers; :mod:`.cgroup_v1` and :mod:`.cgroup_v2` implement it, and
:mod:`.cgroup_detect` picks the one this host has.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import JobRejected, SandboxError

log = logging.getLogger(__name__)

JOB_PREFIX = "job-"
# The parent of one daemon's session cgroups (SessionBudget), beside its jobs: SESSIONS_PREFIX + its tag.
SESSIONS_PREFIX = "sessions-"
# How long freezing a session's processes may take before it counts as failed.
FREEZE_TIMEOUT_S = 5.0
CPU_PERIOD_US = 100_000


@dataclass(frozen=True)
class CgroupLimits:
    memory_bytes: int
    pids: int
    cpu_ms_per_sec: int  # 0: no CPU quota


@dataclass(frozen=True)
class CgroupStats:
    oom_kills: int = 0
    peak_bytes: int = 0
    cpu_s: float = 0.0
    pids_limit_hits: int = 0

    def since(self, before: CgroupStats) -> CgroupStats:
        """What happened between *before* and these (a session's run): counters as deltas.

        The peak is kept as read: per run where :meth:`JobCgroup.reset_peak` could reset it.
        """
        return CgroupStats(
            oom_kills=max(0, self.oom_kills - before.oom_kills),
            peak_bytes=self.peak_bytes,
            cpu_s=round(max(0.0, self.cpu_s - before.cpu_s), 6),
            pids_limit_hits=max(0, self.pids_limit_hits - before.pids_limit_hits),
        )


class SessionBudget:
    """``session_memory_budget``, kept by the kernel: the limit of one parent cgroup of every session.

    The sessions' cgroups live under it, so together they never hold more
    than its limit: past it the kernel reclaims, then OOM-kills in one of
    them (that session ends ``memory_limit``), and nothing outside is touched.
    What is charged elsewhere is taken off its limit instead: a session's
    input files (the daemon writes them, so their tmpfs pages are the
    daemon's) while the session lives, and a fixed reserve for run code in
    flight (a sealed memfd per run, the daemon's too).
    """

    def __init__(self, total: int, reserve: int, set_limit: Callable[[int], None], usage: Callable[[], int]) -> None:
        self.total = total
        self.reserve_bytes = reserve
        self.inputs = 0
        self._set_limit = set_limit
        self._usage = usage
        self._lock = threading.Lock()  # inputs are reserved from threads (the event loop hands writes off)

    @property
    def limit(self) -> int:
        return max(0, self.total - self.reserve_bytes - self.inputs)

    def apply(self) -> None:
        self._set_limit(self.limit)

    def reserve(self, size: int) -> None:
        """Take *size* bytes of inputs off the sessions' limit; JobRejected (BUSY) if their memory is in the way."""
        if size <= 0:
            return
        with self._lock:
            room = self.limit - self._usage()
            if size > room:
                raise JobRejected(
                    f"input files of {size} bytes do not fit the session memory budget (session_memory_budget "
                    f"{self.total >> 20} MiB: {max(0, room) >> 20} MiB free); close a session or retry later",
                    code="BUSY",
                )
            self.inputs += size
            self._set_limit(self.limit)

    def release(self, size: int) -> None:
        with self._lock:
            self.inputs = max(0, self.inputs - size)
            self._set_limit(self.limit)


def write_value(path: Path, value: str) -> None:
    try:
        with open(path, "w") as fh:
            fh.write(value)
    except OSError as exc:
        raise SandboxError(f"cannot write {value!r} to {path}: {exc.strerror}") from None


def read_text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def keyed(text: str, key: str) -> int:
    """The number after *key* in a "key value" per line file (memory.events, pids.events, ...)."""
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == key:
            try:
                return int(parts[1])
            except ValueError:
                return 0
    return 0


def to_int(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        return 0


def rmdir_cgroup(path: Path, patience: float = 5.0) -> bool:
    """rmdir a cgroup, waiting while the kernel finishes releasing it.

    A task the OOM killer ended can keep its cgroup busy for a while after
    SIGKILL (it is still freeing its memory): up to *patience* seconds.
    """
    deadline = time.monotonic() + patience
    delay = 0.002
    while True:
        try:
            os.rmdir(path)
            return True
        except FileNotFoundError:
            return True
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                log.warning("cannot remove cgroup %s: %s", path, exc.strerror)
                return False
        if time.monotonic() > deadline:
            log.warning("cgroup %s still busy after %.0f s; left for the next sweep", path, patience)
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def kill_until_empty(procs_files: list[Path], timeout: float = 5.0) -> bool:
    """SIGKILL every process listed until the lists stay empty; False if time ran out."""
    deadline = time.monotonic() + timeout
    while True:
        pids: set[int] = set()
        for f in procs_files:
            pids.update(int(p) for p in read_text(f).split() if p.isdigit())
        if not pids:
            return True
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)


def wait_for(predicate: Callable[[], bool], timeout: float) -> bool:
    """Poll *predicate* (a cgroup file's state: the kernel has no event for it here) until true or *timeout*."""
    deadline = time.monotonic() + timeout
    delay = 0.0002
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.01)
    return True


def rmdir_if_empty(path: Path) -> bool:
    """rmdir a parent cgroup unless something (a job cgroup, another runnerd) still uses it."""
    try:
        os.rmdir(path)
        return True
    except FileNotFoundError:
        return True
    except OSError:
        return False


def mkdir_job(path: Path, prepare: Callable[[], None]) -> None:
    """mkdir a job cgroup; if its parent is gone (a ``runnerd check`` beside this
    process released it between two jobs), make the parents again once."""
    try:
        path.mkdir()
    except FileNotFoundError:
        prepare()
        path.mkdir()


class JobCgroup(ABC):
    name: str
    # A session's: the budget its parent keeps (None for a job's).
    budget: SessionBudget | None = None

    @abstractmethod
    def attach(self, pid: int) -> None:
        """Move process *pid* (and so its future children) into this cgroup."""

    @abstractmethod
    def stats(self) -> CgroupStats: ...

    @abstractmethod
    def procs(self) -> list[int]: ...

    @abstractmethod
    def kill(self) -> bool:
        """SIGKILL every process inside; True once it is empty."""

    @abstractmethod
    def remove(self) -> bool:
        """Remove the cgroup (after kill); False if the kernel still holds it."""

    def freeze(self) -> bool:
        """Stop every process inside (a session between runs); True once all are frozen (within FREEZE_TIMEOUT_S)."""
        self.request_freeze()
        return self.frozen() or wait_for(self.frozen, FREEZE_TIMEOUT_S)

    @abstractmethod
    def request_freeze(self) -> None:
        """Ask the kernel to freeze every process inside; :meth:`frozen` says when it has."""

    @abstractmethod
    def frozen(self) -> bool: ...

    @abstractmethod
    def thaw(self) -> None: ...

    @abstractmethod
    def memory_bytes(self) -> int:
        """The memory charged to the cgroup now."""

    def kill_pending(self) -> bool:
        """A process inside has a SIGKILL it cannot act on (cgroup v1: frozen); False where a kill always acts."""
        return False

    def reset_peak(self) -> bool:
        """Start the peak memory over (a session's run); False where the kernel cannot (it stays the cgroup's)."""
        return False


class Cgroups(ABC):
    version: int

    @abstractmethod
    def prepare(self) -> None:
        """Make the parent cgroup(s) ready; SandboxError naming what is missing."""

    @abstractmethod
    def create(self, name: str, limits: CgroupLimits, *, quota: bool = True, freezer: bool = False) -> JobCgroup:
        """A job cgroup with *limits*; ``quota=False`` leaves the CPU quota out
        (cgroup v1: one hierarchy fewer to make, join and remove; the process
        keeps its parent's CPU cgroup and quota). CPU time is counted either way.
        ``freezer`` (a session's): v1 joins the freezer hierarchy too; v2 always can."""

    @abstractmethod
    def existing(self, prefix: str = JOB_PREFIX) -> list[JobCgroup]:
        """Job cgroups named *prefix*... present now (orphans, when no job of theirs runs)."""

    @abstractmethod
    def describe(self) -> str: ...

    def can_freeze(self) -> bool:
        """Whether job cgroups can be frozen (sessions need it between their runs)."""
        return True

    @abstractmethod
    def release(self) -> None:
        """Remove the parent cgroup(s) this process made, when no job cgroup is left in them."""

    @abstractmethod
    def locate_sessions(self, name: str) -> None:
        """The sessions' parent is *name* (for :meth:`existing`); nothing is made or changed."""

    @abstractmethod
    def configure_sessions(self, name: str, total: int, reserve: int) -> SessionBudget:
        """Session cgroups (``create(freezer=True)``) from now on go under a parent *name*, whose memory
        limit is *total* less *reserve* and the inputs of open sessions; SandboxError if it cannot be made."""
