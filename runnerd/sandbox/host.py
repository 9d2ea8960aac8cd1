"""The host's side of runnerd's state: directories, uid slots, and cleaning up after crashes.

Several runnerd processes may share one state dir (a daemon and a
``runnerd run`` beside it). Each holds a *shared* lock on ``state.lock`` for
its lifetime; one that gets it *exclusively* at start knows nobody else is
running jobs, and only then sweeps what a crash left (job tmpfs mounts, job
dirs, job cgroups). Each running cage holds an exclusive lock on one slot
file, which gives it a uid of its own: the first of the instance's uid range
(:mod:`.uid_ranges`) + slot.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import secrets
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from .. import incage
from ..config import UID_RANGE_SIZE, Config
from ..errors import SandboxError
from . import uid_ranges, workspace
from .cgroups import JOB_PREFIX, SESSIONS_PREFIX, Cgroups

log = logging.getLogger(__name__)

MAX_SLOTS = UID_RANGE_SIZE  # a slot is a uid of the instance's range


def check_traversable(path: Path) -> None:
    """SandboxError unless every directory down to *path* lets any user through.

    The jailed uid is nobody on the host: nsjail resolves bind-mount sources
    with its credentials, so a mode-700 parent (such as /root) breaks them.
    """
    current = Path("/")
    for part in path.parts[1:]:
        current = current / part
        try:
            mode = current.stat().st_mode
        except OSError as exc:
            raise SandboxError(f"{current}: {exc.strerror}") from None
        if stat.S_ISDIR(mode) and not mode & stat.S_IXOTH:
            raise SandboxError(
                f"{current} is not traversable by other users (mode {stat.S_IMODE(mode):o}); "
                f"the jailed user cannot reach {path}. Put it elsewhere or chmod o+x {current}"
            )


@dataclass
class SlotLease:
    slot: int
    uid: int
    fd: int

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing drops the flock
            self.fd = -1


def state_tag(state_dir: Path) -> str:
    """The tag in the names of the job and session cgroups of the runnerd whose state dir is *state_dir*."""
    return hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:8]


class HostState:
    def __init__(self, config: Config, cgroups: Cgroups) -> None:
        self.config = config
        self.cgroups = cgroups
        self._lock_fd = -1
        self._uids: uid_ranges.UidRange | None = None
        # Job cgroups are shared by every runnerd on the host (one parent per
        # controller); the state dir's tag in their names keeps one
        # instance's sweep off another instance's jobs.
        self.tag = state_tag(config.state_dir)
        self.job_prefix = f"{JOB_PREFIX}{self.tag}-"
        self.sessions_cgroup = SESSIONS_PREFIX + self.tag
        cgroups.locate_sessions(self.sessions_cgroup)  # its leftovers are found (and swept) with the jobs

    def uid_range(self) -> tuple[int, int]:
        """The first and last jailed uid of this instance (leased at the first need)."""
        if self._uids is None:
            self._uids = uid_ranges.lease(self.config.uid_base, self.config.state_dir)
        return self._uids.first, self._uids.last

    def new_job_name(self) -> str:
        return f"{self.job_prefix}{int(time.time() * 1000):x}-{secrets.token_hex(4)}"

    def prepare(self) -> int:
        """Make the dirs and cgroup parents; sweep orphans when alone. Returns how many were swept."""
        c = self.config
        try:
            c.state_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
            c.jobs_dir.mkdir(mode=0o711, exist_ok=True)
            c.slots_dir.mkdir(mode=0o700, exist_ok=True)
            c.harness_dir.mkdir(mode=0o755, exist_ok=True)
            os.chmod(c.jobs_dir, 0o711)
            os.chmod(c.harness_dir, 0o755)
        except OSError as exc:
            raise SandboxError(f"cannot create runnerd's state dirs under {c.state_dir}: {exc.strerror}") from None
        check_traversable(c.jobs_dir)
        check_traversable(c.harness_dir)
        self.uid_range()
        self._install_harness()
        self.cgroups.prepare()
        # Before the sweep: it looks for leftovers under the sessions' parent too.
        self.cgroups.configure_sessions(
            self.sessions_cgroup, c.session_memory_budget, c.concurrency * c.limits.max_code_bytes
        )
        swept = 0
        self._lock_fd = os.open(c.state_dir / "state.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another runnerd process uses %s; not sweeping", c.state_dir)
        else:
            swept = self.sweep()
        fcntl.flock(self._lock_fd, fcntl.LOCK_SH)
        return swept

    def _install_harness(self) -> None:
        # A copy, not a bind of the package itself: the package may live
        # where the jailed user cannot traverse (a checkout under /root).
        for name in incage.FILES:
            target = self.config.harness_dir / name
            tmp = target.with_suffix(f".tmp{os.getpid()}")
            shutil.copyfile(incage.DIR / name, tmp)
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)

    def sweep(self) -> int:
        """Remove every job cgroup and job dir present (call only when no job runs)."""
        count = 0
        for cg in self.cgroups.existing(self.job_prefix):
            cg.kill()
            if cg.remove():
                count += 1
        count += workspace.sweep(self.config.jobs_dir)
        if count:
            log.warning("swept %d leftover job cgroup(s)/dir(s) from an earlier run", count)
        return count

    def lease_slot(self) -> SlotLease:
        """A free slot and its uid; SandboxError if all MAX_SLOTS are taken."""
        for slot in range(MAX_SLOTS):
            fd = os.open(self.config.slots_dir / f"{slot}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            return SlotLease(slot=slot, uid=self.uid_range()[0] + slot, fd=fd)
        raise SandboxError(f"all {MAX_SLOTS} cage slots are in use")

    def close(self) -> None:
        self.cgroups.release()
        if self._uids is not None:
            self._uids.release()
            self._uids = None
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
