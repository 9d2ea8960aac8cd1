"""A warm session's PID 1 (G), in the zygote's child given to a session (standard library only).

The host's ``open`` (incage/zygote.py's protocol) gives the zygote's armed
child to a session instead of a job. Its G attaches the tmpfs the host made
for the session's /work (a mount fd: the host's, root's and sticky, so the
inputs it writes there are not the session's to change), mounts fresh
tmpfs at home and figures (and the policy's, and covers /spool, as for a
job), sends the host an fd of the figures dir, locks itself down and hands
the session's control socket to U, which runs the session's runs as they
come (incage/session.py, as in a cold cage). G then reaps, as a cold
session's PID 1 does; the zygote reaps G when the session ends.

Loaded by the zygote from the file beside it, which hands :func:`init` its
own module: the cage's SHAPE, its mounts and lock-down, the in-cage
modules it loaded.
"""

import os
import socket
import types
from typing import Any

AT_FDCWD, MOVE_MOUNT_F_EMPTY_PATH = -100, 4


def _mount(zygote: types.ModuleType, order: dict[str, Any], work: int) -> int:
    """A session's view of the file system: the host's /work (*work*, a mount fd), its own home and figures."""
    shape, lockdown = zygote.SHAPE, zygote.lockdown
    safe = zygote.MS_NOSUID | zygote.MS_NODEV | zygote.MS_NOEXEC
    uid = shape["uid"]
    lockdown.check(
        lockdown.libc.syscall(
            lockdown.NR_MOVE_MOUNT, work, b"", AT_FDCWD, shape["work"].encode(), MOVE_MOUNT_F_EMPTY_PATH
        ),
        "move_mount /work",
    )
    for dst, (size, inodes) in ((shape["home"], order["home"]), (shape["figures"], order["figures"])):
        zygote.mount("tmpfs", dst, "tmpfs", safe, f"size={int(size)},nr_inodes={int(inodes)},mode=0755")
    for path in (shape["home"], shape["figures"]):
        os.chown(path, uid, uid)
    zygote.mount_fresh()
    return os.open(shape["figures"], os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def init(
    zygote: types.ModuleType, zygote_sock: socket.socket, g_end: socket.socket, user: int, order: dict[str, Any],
    fds: list[int], harness: types.ModuleType,
) -> None:  # fmt: skip
    """G of a session: its mounts, the fds of /work and figures to the host, U started; reaps. Never returns."""
    lockdown, session = zygote.lockdown, zygote.session
    ctl_fd, work = fds
    ctl = socket.socket(fileno=ctl_fd)
    try:
        figures_fd = _mount(zygote, order, work)
        os.close(work)
        lockdown.check(lockdown.libc.prctl(4, 0, 0, 0, 0), "PR_SET_DUMPABLE")
        zygote.lock_down()
        harness.ignore_signals()
        session.send_msg(ctl, {"event": "mounted"}, [figures_fd])
        os.close(figures_fd)
        session.send_msg(g_end, order, [ctl_fd])
        g_end.close()
    except BaseException as exc:
        os.write(2, f"runnerd: the session's sandbox could not be set up: {exc}\n".encode())
        os._exit(125)
    code = session.reap_session(user, ctl, harness)
    try:
        session.send_msg(zygote_sock, {"status": code})
    except OSError:
        pass
    os._exit(code)
