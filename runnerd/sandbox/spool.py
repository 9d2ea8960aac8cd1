"""A zygote's spool: one tmpfs the host mounts per zygote, holding the directory of the job it runs.

nsjail binds it into the zygote's cage as /spool; the host writes each
job's directory there (the cold path's workspace layout, without a tmpfs
of its own) and resizes the spool to the job's exact cold-mode size
(:data:`SPOOL_BASE_BYTES` on top). It lives under the jobs dir, so a
crash sweep finds it. :data:`PLACEHOLDER` is the mount point of each
job's code: a real file, as nothing mounts on nsjail's src_content files.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import SandboxError
from .workspace import Workspace, mount_tmpfs

PLACEHOLDER = ".main.py"


# What the spool holds besides the job: its root and the placeholder.
SPOOL_BASE_BYTES = 64 << 10


SPOOL_BASE_INODES = 4


def mount_spool(path: Path, size: int, inodes: int) -> None:
    try:
        path.mkdir(mode=0o711)
    except OSError as exc:
        raise SandboxError(f"cannot create the zygote spool {path}: {exc.strerror}") from None
    try:
        mount_tmpfs(path, size, inodes)
        (path / PLACEHOLDER).touch(mode=0o444)
    except (SandboxError, OSError) as exc:
        Workspace(path).destroy()
        raise SandboxError(f"cannot prepare the zygote spool {path}: {exc}") from None
