"""One cgroup per job, on cgroup v1 or v2: limits in, counters out, nothing left behind.

runnerd, not nsjail, owns the job cgroups: it needs to read them after the
cage has died (did the OOM killer fire? peak memory? CPU time?), to kill
every process left in them, and to sweep the ones a crash left behind. The
nsjail process itself is moved in before it starts the job (see cage.py),
so everything it forks is counted.

Layout:

* v1: ``<controller mount>/<parent>/<job>`` for memory, pids, cpu, cpuacct
  (``<parent>`` is ``runnerd`` unless configured);
* v2: ``<parent>/<job>`` where ``<parent>`` is a cgroup with the memory,
  pids and cpu controllers enabled for its children: under systemd with
  ``Delegate=yes`` the service's own cgroup (the daemon moves itself into a
  ``supervisor`` leaf first, as cgroup v2 wants no processes in inner
  nodes), otherwise ``/runnerd`` under the root.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import subprocess
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import SandboxError

log = logging.getLogger(__name__)

JOB_PREFIX = "job-"
CGROUP2_SUPER_MAGIC = 0x63677270
V1_CONTROLLERS = ("memory", "pids", "cpu", "cpuacct")
V2_CONTROLLERS = ("memory", "pids", "cpu")
CPU_PERIOD_US = 100_000
# The leaf a delegated daemon moves itself into (v2: no processes in inner nodes).
SUPERVISOR = "supervisor"


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


def _write(path: Path, value: str) -> None:
    try:
        with open(path, "w") as fh:
            fh.write(value)
    except OSError as exc:
        raise SandboxError(f"cannot write {value!r} to {path}: {exc.strerror}") from None


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _keyed(text: str, key: str) -> int:
    """The number after *key* in a "key value" per line file (memory.events, pids.events, ...)."""
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == key:
            try:
                return int(parts[1])
            except ValueError:
                return 0
    return 0


def _int(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        return 0


def _rmdir(path: Path, patience: float = 5.0) -> bool:
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


def _kill_until_empty(procs_files: list[Path], timeout: float = 5.0) -> bool:
    """SIGKILL every process listed until the lists stay empty; False if time ran out."""
    deadline = time.monotonic() + timeout
    while True:
        pids: set[int] = set()
        for f in procs_files:
            pids.update(int(p) for p in _read(f).split() if p.isdigit())
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


def _rmdir_if_empty(path: Path) -> bool:
    """rmdir a parent cgroup unless something (a job cgroup, another runnerd) still uses it."""
    try:
        os.rmdir(path)
        return True
    except FileNotFoundError:
        return True
    except OSError:
        return False


def _mkdir_job(path: Path, prepare: Callable[[], None]) -> None:
    """mkdir a job cgroup; if its parent is gone (a ``runnerd check`` beside this
    process released it between two jobs), make the parents again once."""
    try:
        path.mkdir()
    except FileNotFoundError:
        prepare()
        path.mkdir()


class JobCgroup(ABC):
    name: str

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


class Cgroups(ABC):
    version: int

    @abstractmethod
    def prepare(self) -> None:
        """Make the parent cgroup(s) ready; SandboxError naming what is missing."""

    @abstractmethod
    def create(self, name: str, limits: CgroupLimits, *, quota: bool = True) -> JobCgroup:
        """A job cgroup with *limits*; ``quota=False`` leaves the CPU quota out
        (cgroup v1: one hierarchy fewer to make, join and remove; the process
        keeps its parent's CPU cgroup and quota). CPU time is counted either way."""

    @abstractmethod
    def existing(self, prefix: str = JOB_PREFIX) -> list[JobCgroup]:
        """Job cgroups named *prefix*... present now (orphans, when no job of theirs runs)."""

    @abstractmethod
    def describe(self) -> str: ...

    @abstractmethod
    def release(self) -> None:
        """Remove the parent cgroup(s) this process made, when no job cgroup is left in them."""


# ---------------------------------------------------------------- v1


class JobCgroupV1(JobCgroup):
    def __init__(self, name: str, dirs: dict[str, Path]) -> None:
        self.name = name
        self.dirs = dirs  # controller -> job dir (cpu and cpuacct may share one)

    def _unique_dirs(self) -> list[Path]:
        return list(dict.fromkeys(self.dirs.values()))

    def attach(self, pid: int) -> None:
        for d in self._unique_dirs():
            _write(d / "cgroup.procs", str(pid))

    def stats(self) -> CgroupStats:
        mem = self.dirs["memory"]
        return CgroupStats(
            oom_kills=_keyed(_read(mem / "memory.oom_control"), "oom_kill"),
            peak_bytes=_int(_read(mem / "memory.max_usage_in_bytes")),
            cpu_s=_int(_read(self.dirs["cpuacct"] / "cpuacct.usage")) / 1e9,
            pids_limit_hits=_keyed(_read(self.dirs["pids"] / "pids.events"), "max"),
        )

    def procs(self) -> list[int]:
        return [int(p) for p in _read(self.dirs["pids"] / "cgroup.procs").split() if p.isdigit()]

    def kill(self) -> bool:
        return _kill_until_empty([d / "cgroup.procs" for d in self._unique_dirs()])

    def remove(self) -> bool:
        return all([_rmdir(d) for d in self._unique_dirs()])


class CgroupsV1(Cgroups):
    version = 1

    def __init__(self, mounts: dict[str, Path], parent: str = "runnerd") -> None:
        missing = [c for c in V1_CONTROLLERS if c not in mounts]
        if missing:
            raise SandboxError(
                f"cgroup v1: controller(s) {', '.join(missing)} not mounted; "
                "runnerd needs memory, pids, cpu and cpuacct"
            )
        self.mounts = mounts
        self.parent = parent.strip("/") or "runnerd"
        self._made: set[Path] = set()

    def _parents(self) -> dict[str, Path]:
        return {c: self.mounts[c] / self.parent for c in V1_CONTROLLERS}

    def describe(self) -> str:
        return "cgroup v1 (" + ", ".join(f"{c}: {p}" for c, p in self._parents().items()) + ")"

    def prepare(self) -> None:
        for controller, parent in self._parents().items():
            try:
                parent.mkdir()
                self._made.add(parent)
            except FileExistsError:
                pass
            except OSError as exc:
                raise SandboxError(f"cgroup v1: cannot create {parent}: {exc.strerror} (is runnerd root?)") from None
            if controller == "memory" and _read(parent / "memory.use_hierarchy").strip() == "0":
                # Without hierarchy the job's limit would not cover the processes nsjail forks.
                _write(parent / "memory.use_hierarchy", "1")

    def create(self, name: str, limits: CgroupLimits, *, quota: bool = True) -> JobCgroup:
        dirs: dict[str, Path] = {}
        made: list[Path] = []
        try:
            for controller, parent in self._parents().items():
                if not quota and controller == "cpu" and parent != self._parents()["cpuacct"]:
                    continue
                d = parent / name
                if d not in made:
                    _mkdir_job(d, self.prepare)
                    made.append(d)
                dirs[controller] = d
            mem = dirs["memory"]
            _write(mem / "memory.limit_in_bytes", str(limits.memory_bytes))
            if (mem / "memory.memsw.limit_in_bytes").exists():
                # memory+swap equal to memory: no swap at all.
                _write(mem / "memory.memsw.limit_in_bytes", str(limits.memory_bytes))
            _write(dirs["pids"] / "pids.max", str(limits.pids))
            if quota and limits.cpu_ms_per_sec > 0:
                _write(dirs["cpu"] / "cpu.cfs_period_us", str(CPU_PERIOD_US))
                _write(dirs["cpu"] / "cpu.cfs_quota_us", str(limits.cpu_ms_per_sec * CPU_PERIOD_US // 1000))
        except (OSError, SandboxError) as exc:
            for d in made:
                _rmdir(d, patience=0)
            if isinstance(exc, SandboxError):
                raise
            raise SandboxError(f"cgroup v1: cannot create job cgroup {name}: {exc.strerror}") from None
        return JobCgroupV1(name, dirs)

    def release(self) -> None:
        self._made = {p for p in self._made if not _rmdir_if_empty(p)}

    def existing(self, prefix: str = JOB_PREFIX) -> list[JobCgroup]:
        names: set[str] = set()
        for parent in self._parents().values():
            try:
                names.update(e.name for e in os.scandir(parent) if e.is_dir() and e.name.startswith(prefix))
            except OSError:
                continue
        return [JobCgroupV1(n, {c: p / n for c, p in self._parents().items()}) for n in sorted(names)]


# ---------------------------------------------------------------- v2


class JobCgroupV2(JobCgroup):
    def __init__(self, name: str, path: Path) -> None:
        self.name = name
        self.path = path

    def attach(self, pid: int) -> None:
        _write(self.path / "cgroup.procs", str(pid))

    def stats(self) -> CgroupStats:
        peak = _int(_read(self.path / "memory.peak"))
        return CgroupStats(
            oom_kills=_keyed(_read(self.path / "memory.events"), "oom_kill"),
            peak_bytes=peak,
            cpu_s=_keyed(_read(self.path / "cpu.stat"), "usage_usec") / 1e6,
            pids_limit_hits=_keyed(_read(self.path / "pids.events"), "max"),
        )

    def procs(self) -> list[int]:
        return [int(p) for p in _read(self.path / "cgroup.procs").split() if p.isdigit()]

    def kill(self) -> bool:
        if (self.path / "cgroup.kill").exists():
            try:
                _write(self.path / "cgroup.kill", "1")
            except SandboxError as exc:
                log.warning("%s", exc)
        return _kill_until_empty([self.path / "cgroup.procs"])

    def remove(self) -> bool:
        return _rmdir(self.path)


class CgroupsV2(Cgroups):
    version = 2

    def __init__(self, mount: Path, parent: str = "auto", delegated_unit: str | None = None) -> None:
        self.mount = mount
        self.delegated = False
        self._made_parent = False
        if parent == "auto":
            if delegated_unit:
                # Delegate=yes: the service's own cgroup is ours to divide.
                self.parent = mount / delegated_unit.strip("/")
                self.delegated = True
            else:
                self.parent = mount / "runnerd"
        else:
            self.parent = mount / parent.strip("/")
        self.jobs = self.parent / "jobs" if self.delegated else self.parent

    def describe(self) -> str:
        how = "delegated by systemd" if self.delegated else "made by runnerd"
        return f"cgroup v2 (jobs under {self.jobs}, {how})"

    def _enable(self, cgroup: Path) -> None:
        available = _read(cgroup / "cgroup.controllers").split()
        missing = [c for c in V2_CONTROLLERS if c not in available]
        if missing:
            raise SandboxError(
                f"cgroup v2: {cgroup} lacks controller(s) {', '.join(missing)}; "
                "enable them in its parent's cgroup.subtree_control (under systemd: Delegate=yes)"
            )
        enabled = _read(cgroup / "cgroup.subtree_control").split()
        wanted = [c for c in V2_CONTROLLERS if c not in enabled]
        if wanted:
            _write(cgroup / "cgroup.subtree_control", " ".join(f"+{c}" for c in wanted))

    def prepare(self) -> None:
        if self.delegated:
            # No internal processes: move this daemon into a leaf, then enable
            # the controllers for the parent's children.
            leaf = self.parent / SUPERVISOR
            leaf.mkdir(exist_ok=True)
            _write(leaf / "cgroup.procs", str(os.getpid()))
            self._enable(self.parent)
            self.jobs.mkdir(exist_ok=True)
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

    def release(self) -> None:
        if self._made_parent and _rmdir_if_empty(self.parent):
            self._made_parent = False

    def create(self, name: str, limits: CgroupLimits, *, quota: bool = True) -> JobCgroup:
        # One hierarchy: the CPU quota costs nothing more to set here.
        path = self.jobs / name
        try:
            _mkdir_job(path, self.prepare)
        except OSError as exc:
            raise SandboxError(f"cgroup v2: cannot create {path}: {exc.strerror}") from None
        try:
            _write(path / "memory.max", str(limits.memory_bytes))
            if (path / "memory.swap.max").exists():
                _write(path / "memory.swap.max", "0")
            _write(path / "pids.max", str(limits.pids))
            cpu_max = str(limits.cpu_ms_per_sec * CPU_PERIOD_US // 1000) if limits.cpu_ms_per_sec > 0 else "max"
            _write(path / "cpu.max", f"{cpu_max} {CPU_PERIOD_US}")
        except SandboxError:
            _rmdir(path, patience=0)
            raise
        return JobCgroupV2(name, path)

    def existing(self, prefix: str = JOB_PREFIX) -> list[JobCgroup]:
        try:
            entries = [e.name for e in os.scandir(self.jobs) if e.is_dir() and e.name.startswith(prefix)]
        except OSError:
            return []
        return [JobCgroupV2(n, self.jobs / n) for n in sorted(entries)]


# ---------------------------------------------------------------- detection


def delegated_unit(own: str, is_delegated: Callable[[str], bool]) -> str | None:
    """The systemd unit cgroup (relative to the v2 mount) delegated to this process, if any.

    *own* is this process's cgroup: the unit's own at first start, its
    ``supervisor`` leaf once runnerd has moved there (a reload, or a second
    check in the same process), so both lead to the unit.
    """
    rel = own.strip("/")
    candidates = [rel]
    head, _, leaf = rel.rpartition("/")
    if leaf == SUPERVISOR and head:
        candidates.append(head)
    for candidate in candidates:
        if candidate.endswith((".service", ".scope")) and is_delegated(candidate):
            return candidate
    return None


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


def _mountinfo(text: str) -> list[tuple[Path, str, list[str]]]:
    """(mount point, fs type, super options) of each line of /proc/self/mountinfo."""
    mounts = []
    for line in text.splitlines():
        left, _, right = line.partition(" - ")
        fields = left.split()
        rest = right.split()
        if len(fields) < 5 or len(rest) < 3:
            continue
        mount_point = Path(fields[4].replace("\\040", " "))
        mounts.append((mount_point, rest[0], rest[2].split(",")))
    return mounts


def detect(
    parent: str = "auto",
    mountinfo: str | None = None,
    self_cgroup_text: str | None = None,
    is_delegated: Callable[[str], bool] | None = None,
) -> Cgroups:
    """The cgroup layout of this host; SandboxError if neither v1 nor v2 is usable.

    *is_delegated* (for tests) answers whether the cgroup at a path relative
    to the v2 mount was delegated; by default :func:`systemd_delegated`.
    """
    if mountinfo is None:
        mountinfo = _read(Path("/proc/self/mountinfo"))
    if self_cgroup_text is None:
        self_cgroup_text = _read(Path("/proc/self/cgroup"))
    mounts = _mountinfo(mountinfo)
    v1: dict[str, Path] = {}
    v2_mount: Path | None = None
    for point, fstype, options in mounts:
        if fstype == "cgroup2" and point == Path("/sys/fs/cgroup"):
            v2_mount = point
        elif fstype == "cgroup":
            for controller in V1_CONTROLLERS:
                if controller in options:
                    v1.setdefault(controller, point)
    if v2_mount is not None:
        own = next((line[3:] for line in self_cgroup_text.splitlines() if line.startswith("0::")), "")
        mount = v2_mount
        unit = delegated_unit(own, is_delegated or (lambda rel: systemd_delegated(mount / rel)))
        return CgroupsV2(v2_mount, parent, delegated_unit=unit)
    if v1:
        return CgroupsV1(v1, "runnerd" if parent == "auto" else parent)
    raise SandboxError(
        "no cgroup hierarchy found: mount cgroup v2 at /sys/fs/cgroup, or the v1 memory/pids/cpu/cpuacct controllers"
    )
