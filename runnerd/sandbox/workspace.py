"""The host side of one job's files: a private, size-capped tmpfs per job.

Layout of ``<jobs_dir>/<job>/`` (a tmpfs mounted nosuid,nodev,noexec):

* ``main.py``   the code (root, 0444), seen in the cage as /runnerd/main.py;
* ``in/<index>`` the inputs (root, 0444), each bound read-only over
  ``/work/<name>`` in the cage;
* ``work/``     the working directory (the jailed uid's), /work in the cage,
  holding an empty root-owned placeholder per input;
* ``figures/``  where the harness renders open figures, /runnerd/figures;
* ``home/``     $HOME, with a writable Matplotlib config dir pre-filled with
  the env's font cache (Matplotlib refuses a read-only config dir and would
  rebuild the cache on every job).

One tmpfs holds it all, sized scratch + inputs, so a job can fill neither
the host's disk nor another job's space, and tearing a job down is one
unmount. Everything the job writes is charged to the tmpfs, and the pages
to the job's memory cgroup.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..errors import SandboxError
from .job import JobSpec

log = logging.getLogger(__name__)

_MS_NOSUID = 2
_MS_NODEV = 4
_MS_NOEXEC = 8
_MNT_DETACH = 2
TMPFS_SOURCE = "runnerd-job"
# Room for the code, the font cache copy and directory blocks.
_SLACK_BYTES = 4 * 1024 * 1024
_SLACK_INODES = 64

_libc = ctypes.CDLL(None, use_errno=True)


def mount_tmpfs(target: Path, size: int, inodes: int, mode: int = 0o711) -> None:
    options = f"size={size},nr_inodes={inodes},mode={mode:04o},uid=0,gid=0".encode()
    flags = _MS_NOSUID | _MS_NODEV | _MS_NOEXEC
    if _libc.mount(TMPFS_SOURCE.encode(), str(target).encode(), b"tmpfs", ctypes.c_ulong(flags), options) != 0:
        err = ctypes.get_errno()
        raise SandboxError(f"cannot mount the job tmpfs at {target}: {os.strerror(err)} (runnerd must run as root)")


_MS_REMOUNT = 32


def resize_tmpfs(target: Path, size: int, inodes: int) -> None:
    """Set a mounted tmpfs's size and inode limits (every bind of it, in any namespace, follows)."""
    options = f"size={size},nr_inodes={inodes}".encode()
    flags = _MS_REMOUNT | _MS_NOSUID | _MS_NODEV | _MS_NOEXEC
    if _libc.mount(None, str(target).encode(), None, ctypes.c_ulong(flags), options) != 0:
        err = ctypes.get_errno()
        raise SandboxError(f"cannot resize the tmpfs at {target}: {os.strerror(err)}")


# The new mount API (x86_64): a tmpfs made here, handed to a cage as a mount fd.
_SYS_FSOPEN, _SYS_FSCONFIG, _SYS_FSMOUNT, _SYS_FSPICK = 430, 431, 432, 433
_FSCONFIG_SET_STRING, _FSCONFIG_CMD_CREATE, _FSCONFIG_CMD_RECONFIGURE = 1, 6, 7
_FSOPEN_CLOEXEC, _FSMOUNT_CLOEXEC, _FSPICK_CLOEXEC, _FSPICK_EMPTY_PATH = 1, 1, 1, 8
_MOUNT_ATTR_NOSUID, _MOUNT_ATTR_NODEV, _MOUNT_ATTR_NOEXEC = 0x2, 0x4, 0x8


def _fs_call(number: int, *args: object, what: str) -> int:
    ret = _libc.syscall(number, *args)
    if ret < 0:
        err = ctypes.get_errno()
        raise SandboxError(f"cannot {what}: {os.strerror(err)}")
    return int(ret)


def _fs_set(fs: int, options: dict[str, str], what: str) -> None:
    for key, value in options.items():
        _fs_call(_SYS_FSCONFIG, fs, _FSCONFIG_SET_STRING, key.encode(), value.encode(), 0, what=f"{what} ({key})")


def detached_tmpfs(size: int, inodes: int, mode: int) -> int:
    """A tmpfs of the host's (root's, nosuid/nodev/noexec) mounted nowhere yet: its mount fd.

    A cage in namespaces of its own attaches it with move_mount (a warm
    session's /work): its files stay the host's to write as root (inputs a
    session cannot change) and its size the host's to set (:func:`resize_tmpfs_fd`).
    """
    fs = _fs_call(_SYS_FSOPEN, b"tmpfs", _FSOPEN_CLOEXEC, what="open a tmpfs context")
    try:
        _fs_set(fs, {"size": str(size), "nr_inodes": str(inodes), "mode": f"{mode:04o}"}, "configure a tmpfs")
        _fs_call(_SYS_FSCONFIG, fs, _FSCONFIG_CMD_CREATE, None, None, 0, what="create a tmpfs")
        flags = _MOUNT_ATTR_NOSUID | _MOUNT_ATTR_NODEV | _MOUNT_ATTR_NOEXEC
        return _fs_call(_SYS_FSMOUNT, fs, _FSMOUNT_CLOEXEC, flags, what="make a tmpfs mount")
    finally:
        os.close(fs)


def resize_tmpfs_fd(fd: int, size: int, inodes: int) -> None:
    """Set the size and inode limits of the tmpfs whose root *fd* is (wherever it is mounted)."""
    fs = _fs_call(_SYS_FSPICK, fd, b"", _FSPICK_CLOEXEC | _FSPICK_EMPTY_PATH, what="pick a tmpfs to resize")
    try:
        _fs_set(fs, {"size": str(size), "nr_inodes": str(inodes)}, "resize a tmpfs")
        _fs_call(_SYS_FSCONFIG, fs, _FSCONFIG_CMD_RECONFIGURE, None, None, 0, what="resize a tmpfs")
    finally:
        os.close(fs)


def job_size(job: JobSpec, scratch_bytes: int, scratch_inodes: int, mplconfig: MplConfig) -> tuple[int, int]:
    """The tmpfs size and inode count one job gets: its scratch, plus its inputs and code."""
    size = scratch_bytes + job.files_bytes + len(job.code.encode()) + mplconfig.size + _SLACK_BYTES
    return size, scratch_inodes + len(job.files) + _SLACK_INODES


def _unmount(target: Path) -> bool:
    if _libc.umount2(str(target).encode(), _MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):
            log.warning("cannot unmount %s: %s", target, os.strerror(err))
        return False
    return True


def mounted_job_dirs(jobs_dir: Path, mountinfo: str | None = None) -> list[Path]:
    """Job tmpfs mounts under *jobs_dir* that are mounted now."""
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text()
        except OSError:
            return []
    found = []
    prefix = str(jobs_dir).rstrip("/") + "/"
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) > 4 and fields[4].startswith(prefix):
            found.append(Path(fields[4].replace("\\040", " ")))
    return found


@dataclass(frozen=True)
class MplConfig:
    """Files copied into every job's Matplotlib config dir (name -> bytes)."""

    files: tuple[tuple[str, bytes], ...] = ()

    @classmethod
    def load(cls, directory: Path) -> MplConfig:
        if not directory.is_dir():
            return cls()
        return cls(tuple((p.name, p.read_bytes()) for p in sorted(directory.iterdir()) if p.is_file()))

    @property
    def size(self) -> int:
        return sum(len(data) for _, data in self.files)


class Workspace:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.code_file = root / "main.py"
        self.inputs = root / "in"
        self.work = root / "work"
        self.figures = root / "figures"
        self.home = root / "home"
        self.input_names: tuple[str, ...] = ()

    @classmethod
    def create(
        cls,
        jobs_dir: Path,
        name: str,
        job: JobSpec,
        *,
        uid: int,
        gid: int,
        scratch_bytes: int,
        scratch_inodes: int,
        mplconfig: MplConfig,
        mount: bool = True,
    ) -> Workspace:
        """Mount and fill the job's tmpfs; SandboxError (with nothing left behind) on failure.

        ``mount=False`` fills a plain directory instead: the warm path's, on
        a zygote's /spool tmpfs, which is the size cap there.
        """
        ws = cls(jobs_dir / name)
        try:
            # 0711: the jailed uid (not root's) must pass through to its parts.
            ws.root.mkdir(mode=0o711)
        except OSError as exc:
            raise SandboxError(f"cannot create job dir {ws.root}: {exc.strerror}") from None
        try:
            if mount:
                mount_tmpfs(ws.root, *job_size(job, scratch_bytes, scratch_inodes, mplconfig))
            ws._fill(job, uid, gid, mplconfig)
        except BaseException:
            ws.destroy()
            raise
        return ws

    def _fill(self, job: JobSpec, uid: int, gid: int, mplconfig: MplConfig) -> None:
        try:
            self.code_file.write_text(job.code, encoding="utf-8")
            os.chmod(self.code_file, 0o444)
            self.inputs.mkdir(mode=0o711)
            for d in (self.work, self.figures, self.home):
                d.mkdir(mode=0o700)
                os.chown(d, uid, gid)
            for index, f in enumerate(job.files):
                # Stored by index: no name a client chose ever becomes part
                # of a host path, or of an nsjail mount source.
                path = self.inputs / str(index)
                with open(path, "xb") as fh:
                    fh.write(f.data)
                os.chmod(path, 0o444)
                # The mount point the read-only bind goes over; root's, so
                # even a job that got under the bind could not replace it.
                placeholder = self.work / f.name
                placeholder.touch(mode=0o444, exist_ok=False)
            mpl = self.home / ".config" / "matplotlib"
            mpl.mkdir(parents=True, mode=0o700)
            for fname, data in mplconfig.files:
                (mpl / fname).write_bytes(data)
            for d in (self.home / ".config", mpl, *(mpl / n for n, _ in mplconfig.files)):
                os.chown(d, uid, gid)
        except OSError as exc:
            raise SandboxError(f"cannot fill job dir {self.root}: {exc.strerror} ({exc.filename})") from None
        self.input_names = tuple(f.name for f in job.files)

    def destroy(self, mounted: bool = True) -> None:
        """Unmount and remove; safe to call twice and on a half-made workspace."""
        if mounted:
            _unmount(self.root)
        if self.root.exists():
            # Not mounted (a failed create): whatever is there lives on the host fs.
            shutil.rmtree(self.root, ignore_errors=True)


def sweep(jobs_dir: Path) -> int:
    """Remove every job dir under *jobs_dir* (after a crash); returns how many."""
    mounted = mounted_job_dirs(jobs_dir)
    # Deepest first: a job dir's own sub-mounts (a cold session's /work) before the dir.
    for mount_point in sorted(mounted, key=lambda p: len(p.parts), reverse=True):
        _unmount(mount_point)
    entries = list(jobs_dir.iterdir()) if jobs_dir.is_dir() else []
    for entry in entries:
        shutil.rmtree(entry, ignore_errors=True)
    return len({p for p in mounted if p.parent == jobs_dir} | set(entries))
