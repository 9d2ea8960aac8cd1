"""Jailed uid ranges, one per runnerd instance on a host, so no two instances share a uid.

A cage runs as ``first uid + slot`` on the host (host.py). Two daemons with
different state dirs on one host (a fleet test, two units) each count
slots from 0: with the same ``uid_base`` their jobs would share uids, and
one instance's job could signal, ptrace or count against another's (per-uid
limits). So each instance leases a range of :data:`RANGE_SIZE` uids, host
wide, from ``uid_base`` upwards:

* the registry is :data:`REGISTRY`, one lock file per range held, named by
  its first uid and holding the state dir of its holder;
* a holder keeps a *shared* flock on its range's file for its lifetime
  (``runnerd serve`` and a ``runnerd run`` of the same state dir share one
  range: their slots are arbitrated by the state dir's slot locks);
* a range nobody holds a lock on is free, whatever its file says (a crashed
  holder's lock went with its process);
* taking a range happens under an exclusive lock on the registry itself,
  and no range overlapping another state dir's is taken, whatever the
  other's ``uid_base``.
"""

from __future__ import annotations

import fcntl
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ..config import UID_RANGE_SIZE as RANGE_SIZE
from ..config import UID_RANGES as RANGES
from ..errors import SandboxError

log = logging.getLogger(__name__)

REGISTRY = Path("/run/runnerd/uids")
_LOCK = ".registry.lock"


@dataclass
class UidRange:
    first: int
    fd: int

    @property
    def last(self) -> int:
        return self.first + RANGE_SIZE - 1

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # the flock goes with it
            self.fd = -1


def lease(uid_base: int, state_dir: Path, registry: Path = REGISTRY) -> UidRange:
    """The range of *state_dir*'s instance: the one it already has, else the first free one from *uid_base*."""
    owner = str(state_dir.resolve())
    try:
        registry.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock = os.open(registry / _LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise SandboxError(f"cannot use the uid range registry {registry}: {exc.strerror}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        held = _held(registry)
        for first in range(uid_base, uid_base + RANGES * RANGE_SIZE, RANGE_SIZE):
            if held.get(first) == owner:
                return _join(registry / str(first), first)
            if any(
                o != owner and first < start + RANGE_SIZE and start < first + RANGE_SIZE for start, o in held.items()
            ):
                continue
            return _claim(registry / str(first), first, owner)
        raise SandboxError(
            f"all {RANGES} jailed uid ranges from uid_base {uid_base} are held by other runnerd instances "
            f"(see {registry}); stop one, or give this one another uid_base"
        )
    finally:
        os.close(lock)


def _held(registry: Path) -> dict[int, str]:
    """The ranges some process holds now: first uid -> holder's state dir."""
    held: dict[int, str] = {}
    for path in registry.iterdir():
        if not path.name.isdigit():
            continue
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                held[int(path.name)] = os.pread(fd, 4096, 0).decode(errors="replace")
            else:
                path.unlink()  # nobody's: its holder is gone
        finally:
            os.close(fd)
    return held


def _claim(path: Path, first: int, owner: str) -> UidRange:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.ftruncate(fd, 0)
    os.pwrite(fd, owner.encode(), 0)
    fcntl.flock(fd, fcntl.LOCK_SH)  # under the registry lock: nobody sees the change
    log.info("jailed uids %d..%d are this instance's", first, first + RANGE_SIZE - 1)
    return UidRange(first, fd)


def _join(path: Path, first: int) -> UidRange:
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    fcntl.flock(fd, fcntl.LOCK_SH)
    return UidRange(first, fd)
