"""Job cgroups on cgroup v1: ``<controller mount>/<parent>/<job>`` for memory, pids, cpu and cpuacct.

``<parent>`` is ``runnerd`` unless configured; its ``memory.use_hierarchy``
is turned on, so a job's limit covers every process nsjail forks.
"""

from __future__ import annotations

import os
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

V1_CONTROLLERS = ("memory", "pids", "cpu", "cpuacct")
SIGKILL_BIT = 1 << (9 - 1)  # signal N is bit N-1 of /proc/<pid>/status's masks
# Joined by sessions only (a job never needs freezing), when the host mounts it.
FREEZER = "freezer"


class JobCgroupV1(JobCgroup):
    def __init__(self, name: str, dirs: dict[str, Path]) -> None:
        self.name = name
        self.dirs = dirs  # controller -> job dir (cpu and cpuacct may share one)

    def _unique_dirs(self) -> list[Path]:
        return list(dict.fromkeys(self.dirs.values()))

    def attach(self, pid: int) -> None:
        for d in self._unique_dirs():
            write_value(d / "cgroup.procs", str(pid))

    def stats(self) -> CgroupStats:
        mem = self.dirs["memory"]
        return CgroupStats(
            oom_kills=keyed(read_text(mem / "memory.oom_control"), "oom_kill"),
            peak_bytes=to_int(read_text(mem / "memory.max_usage_in_bytes")),
            cpu_s=to_int(read_text(self.dirs["cpuacct"] / "cpuacct.usage")) / 1e9,
            pids_limit_hits=keyed(read_text(self.dirs["pids"] / "pids.events"), "max"),
        )

    def procs(self) -> list[int]:
        return [int(p) for p in read_text(self.dirs["pids"] / "cgroup.procs").split() if p.isdigit()]

    def kill(self) -> bool:
        # A v1 frozen task does not die of SIGKILL until it is thawed.
        self.thaw()
        return kill_until_empty([d / "cgroup.procs" for d in self._unique_dirs()])

    def request_freeze(self) -> None:
        write_value(self.dirs["freezer"] / "freezer.state", "FROZEN")

    def frozen(self) -> bool:
        return read_text(self.dirs["freezer"] / "freezer.state").strip() == "FROZEN"

    def thaw(self) -> None:
        if "freezer" in self.dirs:
            write_value(self.dirs["freezer"] / "freezer.state", "THAWED")

    def kill_pending(self) -> bool:
        # A v1 frozen task keeps a SIGKILL pending until it is thawed: a
        # session killed from outside between runs would look alive.
        for pid in self.procs():
            for line in read_text(Path(f"/proc/{pid}/status")).splitlines():
                if line.startswith(("SigPnd:", "ShdPnd:")) and int(line.split()[1], 16) & SIGKILL_BIT:
                    return True
        return False

    def memory_bytes(self) -> int:
        return to_int(read_text(self.dirs["memory"] / "memory.usage_in_bytes"))

    def reset_peak(self) -> bool:
        try:
            write_value(self.dirs["memory"] / "memory.max_usage_in_bytes", "0")
        except SandboxError:
            return False
        return True

    def remove(self) -> bool:
        return all([rmdir_cgroup(d) for d in self._unique_dirs()])


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
        self.sessions: str | None = None  # the sessions' parent, under ours (configure_sessions)
        self.budget: SessionBudget | None = None

    def _parents(self) -> dict[str, Path]:
        return {c: self.mounts[c] / self.parent for c in V1_CONTROLLERS}

    def _session_parents(self) -> dict[str, Path]:
        assert self.sessions is not None
        controllers = (*V1_CONTROLLERS, FREEZER) if FREEZER in self.mounts else V1_CONTROLLERS
        return {c: self.mounts[c] / self.parent / self.sessions for c in controllers}

    def locate_sessions(self, name: str) -> None:
        self.sessions = name

    def configure_sessions(self, name: str, total: int, reserve: int) -> SessionBudget:
        self.locate_sessions(name)
        self.prepare()
        if FREEZER in self.mounts:
            freezer_parent = self.mounts[FREEZER] / self.parent
            if not freezer_parent.is_dir():
                mkdir_job(freezer_parent, lambda: None)
                self._made.add(freezer_parent)
        for d in dict.fromkeys(self._session_parents().values()):
            try:
                d.mkdir()
            except FileExistsError:
                pass
            except OSError as exc:
                raise SandboxError(f"cgroup v1: cannot create {d}: {exc.strerror}") from None
            self._made.add(d)
        memory = self._session_parents()["memory"]
        self.budget = SessionBudget(
            total, reserve, lambda limit: _set_memory_limit(memory, limit),
            lambda: to_int(read_text(memory / "memory.usage_in_bytes")),
        )  # fmt: skip
        self.budget.apply()
        return self.budget

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
            if controller == "memory" and read_text(parent / "memory.use_hierarchy").strip() == "0":
                # Without hierarchy the job's limit would not cover the processes nsjail forks.
                write_value(parent / "memory.use_hierarchy", "1")

    def create(self, name: str, limits: CgroupLimits, *, quota: bool = True, freezer: bool = False) -> JobCgroup:
        dirs: dict[str, Path] = {}
        made: list[Path] = []
        parents = self._parents()
        if freezer:
            if FREEZER not in self.mounts:
                raise SandboxError("cgroup v1: the freezer controller is not mounted; sessions need it")
            if self.sessions is None:
                raise SandboxError("cgroup v1: no parent for sessions (configure_sessions)")
            parents = self._session_parents()
        try:
            for controller, parent in parents.items():
                if not quota and controller == "cpu" and parent != parents["cpuacct"]:
                    continue
                d = parent / name
                if d not in made:
                    mkdir_job(d, self.prepare)
                    made.append(d)
                dirs[controller] = d
            mem = dirs["memory"]
            write_value(mem / "memory.limit_in_bytes", str(limits.memory_bytes))
            if (mem / "memory.memsw.limit_in_bytes").exists():
                # memory+swap equal to memory: no swap at all.
                write_value(mem / "memory.memsw.limit_in_bytes", str(limits.memory_bytes))
            write_value(dirs["pids"] / "pids.max", str(limits.pids))
            if quota and limits.cpu_ms_per_sec > 0:
                write_value(dirs["cpu"] / "cpu.cfs_period_us", str(CPU_PERIOD_US))
                write_value(dirs["cpu"] / "cpu.cfs_quota_us", str(limits.cpu_ms_per_sec * CPU_PERIOD_US // 1000))
        except (OSError, SandboxError) as exc:
            for d in made:
                rmdir_cgroup(d, patience=0)
            if isinstance(exc, SandboxError):
                raise
            raise SandboxError(f"cgroup v1: cannot create job cgroup {name}: {exc.strerror}") from None
        cg = JobCgroupV1(name, dirs)
        cg.budget = self.budget if freezer else None
        return cg

    def can_freeze(self) -> bool:
        return FREEZER in self.mounts

    def release(self) -> None:
        # Deepest first: the sessions' parent before ours.
        for p in sorted(self._made, key=lambda p: len(p.parts), reverse=True):
            if rmdir_if_empty(p):
                self._made.discard(p)

    def existing(self, prefix: str = JOB_PREFIX) -> list[JobCgroup]:
        found: list[JobCgroup] = []
        groups = [self._parents()]
        if FREEZER in self.mounts:
            groups[0][FREEZER] = self.mounts[FREEZER] / self.parent
        if self.sessions is not None:
            groups.append(self._session_parents())
        for parents in groups:
            names: set[str] = set()
            for parent in parents.values():
                try:
                    names.update(e.name for e in os.scandir(parent) if e.is_dir() and e.name.startswith(prefix))
                except OSError:
                    continue
            found += [
                JobCgroupV1(n, {c: p / n for c, p in parents.items() if (p / n).is_dir() or c in V1_CONTROLLERS})
                for n in sorted(names)
            ]
        return found


def _set_memory_limit(memory: Path, limit: int) -> None:
    """memory (and memory+swap: no swap) of a v1 cgroup to *limit*; memsw is never below memory, so the order."""
    memsw = memory / "memory.memsw.limit_in_bytes"
    files = [memory / "memory.limit_in_bytes"] + ([memsw] if memsw.exists() else [])
    if limit > to_int(read_text(files[0])):
        files.reverse()
    for f in files:
        write_value(f, str(limit))
