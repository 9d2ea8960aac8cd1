"""``runnerd bench``'s memory readings from /proc and the cgroup trees: PSS, USS, sessions' cgroups, zygotes."""

from __future__ import annotations

import contextlib
import statistics
from pathlib import Path
from typing import Any

import psutil

MiB = float(1 << 20)


def tree_pss(pid: int) -> int:
    """PSS of a process and all its descendants, in bytes."""
    total = 0
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    for p in procs:
        try:
            total += p.memory_full_info().pss
        except psutil.Error:
            continue
    return total


def smaps_rollup(pid: int) -> dict[str, int]:
    """A process's /proc/<pid>/smaps_rollup in bytes: Rss, Pss, Private_Clean, ...; {} if it is gone."""
    out: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2] == "kB" and parts[0].endswith(":"):
            out[parts[0][:-1]] = int(parts[1]) * 1024
    return out


def _mountinfo_cgroups() -> tuple[Path | None, Path | None]:
    """The cgroup v1 freezer hierarchy's mount point and the cgroup v2 one (either may be None)."""
    freezer = unified = None
    try:
        text = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return None, None
    for line in text.splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        if tail[0] == "cgroup" and "freezer" in tail[2].split(","):
            freezer = Path(fields[4])
        elif tail[0] == "cgroup2":
            unified = Path(fields[4])
    return freezer, unified


def frozen_cgroups(within: int | None = None) -> set[Path]:
    """Frozen ``job-*`` cgroups (sessions between runs): v1's freezer hierarchy, else v2.

    With *within* (a daemon's pid), only those holding a process of its tree.
    """
    freezer, unified = _mountinfo_cgroups()
    found: set[Path] = set()
    if freezer is not None:
        for d in freezer.rglob("job-*"):
            with contextlib.suppress(OSError):
                if (d / "freezer.state").read_text().strip() == "FROZEN":
                    found.add(d)
    elif unified is not None:
        for d in unified.rglob("job-*"):
            with contextlib.suppress(OSError):
                if "frozen 1" in (d / "cgroup.events").read_text().splitlines():
                    found.add(d)
    if within is None:
        return found
    try:
        root = psutil.Process(within)
        tree = {within} | {p.pid for p in root.children(recursive=True)}
    except psutil.Error:
        return found
    return {d for d in found if tree & set(cgroup_procs(d))}


def cgroup_procs(cgroup: Path) -> list[int]:
    try:
        return [int(p) for p in (cgroup / "cgroup.procs").read_text().split()]
    except (OSError, ValueError):
        return []


def _procs_memory(pids: list[int]) -> tuple[int, int]:
    """(PSS, USS) of *pids* together, in bytes."""
    pss = uss = 0
    for pid in pids:
        r = smaps_rollup(pid)
        pss += r.get("Pss", 0)
        uss += r.get("Private_Clean", 0) + r.get("Private_Dirty", 0)
    return pss, uss


def _zygote_of(pids: list[int]) -> int | None:
    """The warm zygote a session was forked from: the parent of its topmost process, if that is a zygote."""
    for pid in pids:
        try:
            parent = psutil.Process(pid).parent()
            if parent is not None and parent.pid not in pids and any("zygote" in a for a in parent.cmdline()):
                return parent.pid
        except psutil.Error:
            continue
    return None


def memory_reading(daemon: int | None, cgroups: list[Path], tree_before: int | None) -> dict[str, Any]:
    """Sessions' memory now, in MiB: each one's cgroup, the daemon tree's growth since *tree_before*, their zygote."""
    sessions = [_procs_memory(cgroup_procs(d)) for d in cgroups]
    pss = [p / MiB for p, _ in sessions]
    uss = [u / MiB for _, u in sessions]
    reading: dict[str, Any] = {
        "sessions": len(sessions),
        "pss_mib": [round(v, 2) for v in pss],
        "uss_mib": [round(v, 2) for v in uss],
        "pss_mean_mib": round(statistics.fmean(pss), 2) if pss else None,
        "uss_mean_mib": round(statistics.fmean(uss), 2) if uss else None,
    }
    if daemon is not None and tree_before is not None:
        growth = (tree_pss(daemon) - tree_before) / MiB
        reading["tree_growth_mib"] = round(growth, 2)
        reading["tree_growth_per_session_mib"] = round(growth / max(len(cgroups), 1), 2)
    zygote = next((z for d in cgroups if (z := _zygote_of(cgroup_procs(d))) is not None), None)
    if zygote is not None:
        r = smaps_rollup(zygote)
        reading["zygote_pid"] = zygote
        reading["zygote_pss_mib"] = round(r.get("Pss", 0) / MiB, 2)
        reading["zygote_rss_mib"] = round(r.get("Rss", 0) / MiB, 2)
    return reading
