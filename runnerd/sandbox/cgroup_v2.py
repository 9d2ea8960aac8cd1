"""Job cgroups on cgroup v2, delegated by systemd, a container's own, or made by runnerd.

``<parent>/jobs/<job>`` under a unit with ``Delegate=yes``, and in a
container (a pod) whose cgroup namespace makes its own cgroup the root of
/sys/fs/cgroup: the processes there move into a ``supervisor`` leaf first
(cgroup v2 wants no processes in inner nodes). Else ``/runnerd/<job>``
under the host's root. Delegation is read from systemd's own mark on the
unit's cgroup (:func:`systemd_delegated`), and found again from the
supervisor leaf on a reload (:func:`delegated_unit`); a container's root is
known by its ``cgroup.type`` file, which the host's root does not have.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from ..errors import SandboxError
from .cgroups import (
    CPU_PERIOD_US,
    JOB_PREFIX,
    CgroupLimits,
    Cgroups,
    CgroupStats,
    JobCgroup,
    SessionBudget,
    keyed,
    kill_until_empty,
    mkdir_job,
    read_text,
    rmdir_cgroup,
    rmdir_if_empty,
    to_int,
    write_value,
)

log = logging.getLogger(__name__)

CGROUP2_SUPER_MAGIC = 0x63677270
V2_CONTROLLERS = ("memory", "pids", "cpu")
# The leaf a delegated daemon moves itself into (v2: no processes in inner nodes).
SUPERVISOR = "supervisor"
# cgroup_parent: the cgroup the daemon starts in is its to divide (a container's, a pod's).
SELF = "self"
# A process may join the divided cgroup while its processes are moved (a probe's exec): rounds of moving.
MOVE_ROUNDS = 20


class JobCgroupV2(JobCgroup):
    def __init__(self, name: str, path: Path) -> None:
        self.name = name
        self.path = path
        self._peak_fd = -1  # memory.peak, reset through this fd (kernel 6.12+): reads through it are per run

    def reset_peak(self) -> bool:
        if self._peak_fd < 0:
            try:
                self._peak_fd = os.open(self.path / "memory.peak", os.O_RDWR | os.O_CLOEXEC)
            except OSError:
                return False  # before 6.12 memory.peak is read-only
        try:
            os.pwrite(self._peak_fd, b"reset\n", 0)
        except OSError:
            os.close(self._peak_fd)
            self._peak_fd = -1
            return False
        return True

    def _peak(self) -> int:
        if self._peak_fd >= 0:
            try:
                return to_int(os.pread(self._peak_fd, 64, 0).decode())
            except OSError:
                pass
        return to_int(read_text(self.path / "memory.peak"))

    def attach(self, pid: int) -> None:
        write_value(self.path / "cgroup.procs", str(pid))

    def request_freeze(self) -> None:
        write_value(self.path / "cgroup.freeze", "1")

    def frozen(self) -> bool:
        return keyed(read_text(self.path / "cgroup.events"), "frozen") == 1

    def thaw(self) -> None:
        write_value(self.path / "cgroup.freeze", "0")

    def memory_bytes(self) -> int:
        return to_int(read_text(self.path / "memory.current"))

    def stats(self) -> CgroupStats:
        peak = self._peak()
        return CgroupStats(
            oom_kills=keyed(read_text(self.path / "memory.events"), "oom_kill"),
            peak_bytes=peak,
            cpu_s=keyed(read_text(self.path / "cpu.stat"), "usage_usec") / 1e6,
            pids_limit_hits=keyed(read_text(self.path / "pids.events"), "max"),
        )

    def procs(self) -> list[int]:
        return [int(p) for p in read_text(self.path / "cgroup.procs").split() if p.isdigit()]

    def kill(self) -> bool:
        if (self.path / "cgroup.kill").exists():
            try:
                write_value(self.path / "cgroup.kill", "1")
            except SandboxError as exc:
                log.warning("%s", exc)
        return kill_until_empty([self.path / "cgroup.procs"])

    def remove(self) -> bool:
        if self._peak_fd >= 0:
            os.close(self._peak_fd)
            self._peak_fd = -1
        return rmdir_cgroup(self.path)


class CgroupsV2(Cgroups):
    version = 2

    def __init__(
        self, mount: Path, parent: str = "auto", delegated_unit: str | None = None, *, contained: bool = False
    ) -> None:
        """*contained*: *parent* is the cgroup this daemon started in (relative to *mount*), its to divide."""
        self.mount = mount
        self.delegated = False
        self.contained = contained
        self._made_parent = False
        if contained:
            # A container's own cgroup (a pod's: the jobs count against the pod's limits).
            self.parent = mount / parent.strip("/")
            self.delegated = True
        elif parent == "auto":
            if delegated_unit:
                # Delegate=yes: the service's own cgroup is ours to divide.
                self.parent = mount / delegated_unit.strip("/")
                self.delegated = True
            else:
                self.parent = mount / "runnerd"
        else:
            self.parent = mount / parent.strip("/")
        self.jobs = self.parent / "jobs" if self.delegated else self.parent
        self.sessions: Path | None = None  # the sessions' parent, beside the jobs (configure_sessions)
        self._made_sessions = False
        self.budget: SessionBudget | None = None

    def locate_sessions(self, name: str) -> None:
        self.sessions = self.jobs / name

    def configure_sessions(self, name: str, total: int, reserve: int) -> SessionBudget:
        self.prepare()
        self.locate_sessions(name)
        path = self.jobs / name
        try:
            path.mkdir()
            self._made_sessions = True
        except FileExistsError:
            pass
        except OSError as exc:
            raise SandboxError(f"cgroup v2: cannot create {path}: {exc.strerror}") from None
        self._enable(path)
        if (path / "memory.swap.max").exists():
            write_value(path / "memory.swap.max", "0")
        self.budget = SessionBudget(
            total, reserve, lambda limit: write_value(path / "memory.max", str(limit)),
            lambda: to_int(read_text(path / "memory.current")),
        )  # fmt: skip
        self.budget.apply()
        return self.budget

    def describe(self) -> str:
        how = "made by runnerd"
        if self.delegated:
            how = "the container's own" if self.contained else "delegated by systemd"
        return f"cgroup v2 (jobs under {self.jobs}, {how})"

    def _enable(self, cgroup: Path) -> None:
        available = read_text(cgroup / "cgroup.controllers").split()
        missing = [c for c in V2_CONTROLLERS if c not in available]
        if missing:
            raise SandboxError(
                f"cgroup v2: {cgroup} lacks controller(s) {', '.join(missing)}; "
                "enable them in its parent's cgroup.subtree_control (under systemd: Delegate=yes)"
            )
        enabled = read_text(cgroup / "cgroup.subtree_control").split()
        wanted = [c for c in V2_CONTROLLERS if c not in enabled]
        if wanted:
            write_value(cgroup / "cgroup.subtree_control", " ".join(f"+{c}" for c in wanted))

    def prepare(self) -> None:
        if self.delegated:
            # No internal processes: move every process of the divided cgroup into a leaf (this daemon; in
            # a container its init too), then enable the controllers for the parent's children.
            leaf = self.parent / SUPERVISOR
            _mkdir(leaf)
            self._move_all(leaf)
            self._enable(self.parent)
            _mkdir(self.jobs)
            self._enable(self.jobs)
            return
        ancestors = list(reversed(self.parent.relative_to(self.mount).parents))
        for rel in ancestors:
            self._enable(self.mount / rel)
        try:
            self.parent.mkdir()
            self._made_parent = True
        except FileExistsError:
            pass
        except OSError as exc:
            raise SandboxError(f"cgroup v2: cannot create {self.parent}: {exc.strerror} (is runnerd root?)") from None
        self._enable(self.parent)

    def _move_all(self, leaf: Path) -> None:
        """Every process of the parent into *leaf*, again while new ones join (a probe's exec does)."""
        write_value(leaf / "cgroup.procs", str(os.getpid()))
        for _ in range(MOVE_ROUNDS):
            left = read_text(self.parent / "cgroup.procs").split()
            if not left:
                return
            for pid in left:
                try:
                    write_value(leaf / "cgroup.procs", pid)
                except SandboxError:
                    if Path(f"/proc/{pid}").exists():
                        raise  # not a process that ended meanwhile
        raise SandboxError(f"cgroup v2: processes keep joining {self.parent} (cgroup.procs); cannot divide it")

    def release(self) -> None:
        if self._made_sessions and self.sessions is not None and rmdir_if_empty(self.sessions):
            self._made_sessions = False
        if self._made_parent and rmdir_if_empty(self.parent):
            self._made_parent = False

    def create(self, name: str, limits: CgroupLimits, *, quota: bool = True, freezer: bool = False) -> JobCgroup:
        # One hierarchy: the CPU quota costs nothing more to set here.
        if freezer and self.sessions is None:
            raise SandboxError("cgroup v2: no parent for sessions (configure_sessions)")
        path = (self.sessions if freezer and self.sessions else self.jobs) / name
        try:
            mkdir_job(path, self.prepare)
        except OSError as exc:
            raise SandboxError(f"cgroup v2: cannot create {path}: {exc.strerror}") from None
        try:
            write_value(path / "memory.max", str(limits.memory_bytes))
            if (path / "memory.swap.max").exists():
                write_value(path / "memory.swap.max", "0")
            write_value(path / "pids.max", str(limits.pids))
            cpu_max = str(limits.cpu_ms_per_sec * CPU_PERIOD_US // 1000) if limits.cpu_ms_per_sec > 0 else "max"
            write_value(path / "cpu.max", f"{cpu_max} {CPU_PERIOD_US}")
        except SandboxError:
            rmdir_cgroup(path, patience=0)
            raise
        cg = JobCgroupV2(name, path)
        cg.budget = self.budget if freezer else None
        return cg

    def existing(self, prefix: str = JOB_PREFIX) -> list[JobCgroup]:
        found: list[JobCgroup] = []
        for parent in (self.jobs, self.sessions):
            if parent is None:
                continue
            try:
                entries = [e.name for e in os.scandir(parent) if e.is_dir() and e.name.startswith(prefix)]
            except OSError:
                continue
            found += [JobCgroupV2(n, parent / n) for n in sorted(entries)]
        return found


def _mkdir(path: Path) -> None:
    try:
        path.mkdir(exist_ok=True)
    except OSError as exc:
        raise SandboxError(
            f"cgroup v2: cannot create {path}: {exc.strerror} (a read-only /sys/fs/cgroup: an unprivileged container?)"
        ) from None


def delegated_unit(own: str, is_delegated: Callable[[str], bool]) -> str | None:
    """The systemd unit cgroup (relative to the v2 mount) delegated to this process, if any.

    *own* is this process's cgroup: the unit's own at first start, its
    ``supervisor`` leaf once runnerd has moved there (a reload, or a second
    check in the same process), so both lead to the unit.
    """
    for candidate in dict.fromkeys([own.strip("/"), own_cgroup(own)]):
        if candidate.endswith((".service", ".scope")) and is_delegated(candidate):
            return candidate
    return None


def own_cgroup(own: str) -> str:
    """The cgroup this daemon started in: *own*, or its parent once the daemon moved to the supervisor leaf."""
    head, _, leaf = own.strip("/").rpartition("/")
    return head if leaf == SUPERVISOR else own.strip("/")


def systemd_delegated(path: Path) -> bool:
    """Did systemd delegate the cgroup at *path* (``Delegate=yes``)?

    systemd >= 251 marks such a cgroup with the ``trusted.delegate`` xattr
    (``user.delegate`` from 254); an older one is asked over systemctl.
    """
    for attr in ("trusted.delegate", "user.delegate"):
        try:
            return os.getxattr(path, attr) == b"1"
        except OSError:
            continue
    systemctl = shutil.which("systemctl")
    if systemctl is None or not Path("/run/systemd/system").is_dir():
        return False
    try:
        proc = subprocess.run(
            [systemctl, "show", "--property=Delegate", "--value", path.name], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.stdout.strip() == "yes"
