"""Which cgroup layout this host has: v2 at /sys/fs/cgroup, else the v1 controllers runnerd needs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..errors import SandboxError
from .cgroup_v1 import FREEZER, V1_CONTROLLERS, CgroupsV1
from .cgroup_v2 import SELF, SUPERVISOR, CgroupsV2, delegated_unit, own_cgroup, systemd_delegated
from .cgroups import Cgroups, read_text


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
        mountinfo = read_text(Path("/proc/self/mountinfo"))
    if self_cgroup_text is None:
        self_cgroup_text = read_text(Path("/proc/self/cgroup"))
    mounts = _mountinfo(mountinfo)
    v1: dict[str, Path] = {}
    v2_mount: Path | None = None
    for point, fstype, options in mounts:
        if fstype == "cgroup2" and point == Path("/sys/fs/cgroup"):
            v2_mount = point
        elif fstype == "cgroup":
            for controller in (*V1_CONTROLLERS, FREEZER):
                if controller in options:
                    v1.setdefault(controller, point)
    if v2_mount is not None:
        own = next((line[3:] for line in self_cgroup_text.splitlines() if line.startswith("0::")), "")
        mount = v2_mount
        if parent == SELF or (parent == "auto" and in_container(mount, own)):
            # The cgroup this daemon started in is its to divide: a pod's, a container's.
            return CgroupsV2(v2_mount, own_cgroup(own), contained=True)
        unit = delegated_unit(own, is_delegated or (lambda rel: systemd_delegated(mount / rel)))
        return CgroupsV2(v2_mount, parent, delegated_unit=unit)
    if v1:
        # v1: the hierarchies' roots as this process sees them are a container's own groups already.
        return CgroupsV1(v1, "runnerd" if parent in ("auto", SELF) else parent)
    raise SandboxError(
        "no cgroup hierarchy found: mount cgroup v2 at /sys/fs/cgroup, or the v1 memory/pids/cpu/cpuacct controllers"
    )


def in_container(mount: Path, own: str) -> bool:
    """Is this process at the root of a cgroup namespace that is not the host's (a container's, a pod's)?

    The host's root cgroup has no ``cgroup.type`` file; every other cgroup
    has one, a namespace's root too. *own* is this process's cgroup as the
    namespace shows it: its root, or the supervisor leaf runnerd moved to.
    """
    return own.strip("/") in ("", SUPERVISOR) and (mount / "cgroup.type").exists()
