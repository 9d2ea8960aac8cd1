"""A warm child's lockdown, inside the cage (stdlib only): no capabilities, no new privileges, its own filter.

Loaded by the zygote (incage/zygote.py) from the file beside it. A child
locks itself down before any user code runs; its filter is stacked on the
zygote's cage policy and refuses again what that policy lifted for the
child's set-up (see runnerd/sandbox/shape.py, LIFTED_FOR_ZYGOTES).
"""

import ctypes
import os
import struct
from collections.abc import Sequence

PR_SET_NO_NEW_PRIVS, PR_CAPBSET_DROP, PR_SET_SECCOMP = 38, 24, 22
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
SECCOMP_MODE_FILTER = 2


libc = ctypes.CDLL(None, use_errno=True)


def check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


# The child's own filter, stacked on the zygote's cage policy (the job's
# policy with a few calls lifted so that a child can build its job's cage:
# runnerd/sandbox/shape.py, LIFTED_FOR_ZYGOTES): it refuses those calls
# again, as the job's policy does, and the x32 range, which kafel cannot
# express. The host names the lifted calls in SHAPE["lifted"]; a name this
# filter cannot refuse stops the zygote at start-up (x86_64 numbers).
NR_UNSHARE, NR_MOUNT, NR_CLONE, NR_MOVE_MOUNT = 272, 165, 56, 429
CLONE_NAMESPACE_FLAGS = 0x7E020000
REFUSABLE = ("unshare", "mount", "clone", "move_mount")
AUDIT_ARCH_X86_64 = 0xC000003E
X32_SYSCALL_BIT = 0x40000000
EPERM, ENOSYS = 1, 38

# classic BPF
_LD_W_ABS, _JEQ_K, _JGE_K, _JSET_K, _RET_K = 0x20, 0x15, 0x35, 0x45, 0x06
RET_ALLOW, RET_KILL_PROCESS, RET_ERRNO = 0x7FFF0000, 0x80000000, 0x00050000
_OFF_NR, _OFF_ARCH = 0, 4


def _arg(i: int) -> int:  # the low 32 bits of args[i] in struct seccomp_data (little endian)
    return 16 + 8 * i


def seccomp_program(lifted: Sequence[str]) -> list[tuple[int, int, int, int]]:
    """The child's filter as (code, jt, jf, k) tuples.

    The *lifted* calls refused (EPERM), the x32 range too (ENOSYS), other ABIs killed.
    """
    unknown = sorted(set(lifted) - set(REFUSABLE))
    if unknown:
        raise ValueError(f"the zygote cannot refuse {', '.join(unknown)} in its children")
    p = []

    def stmt(code: int, k: int) -> None:
        p.append((code, 0, 0, k))

    def jump(code: int, k: int, jt: int, jf: int) -> None:
        p.append((code, jt, jf, k))

    errno_ = lambda e: (_RET_K, 0, 0, RET_ERRNO | e)  # noqa: E731
    stmt(_LD_W_ABS, _OFF_ARCH)
    jump(_JEQ_K, AUDIT_ARCH_X86_64, 1, 0)
    stmt(_RET_K, RET_KILL_PROCESS)  # i386 (int 0x80) and any other ABI
    stmt(_LD_W_ABS, _OFF_NR)
    jump(_JGE_K, X32_SYSCALL_BIT, 0, 1)
    p.append(errno_(ENOSYS))  # the whole x32 range, as a range
    for name, nr in (("unshare", NR_UNSHARE), ("mount", NR_MOUNT), ("move_mount", NR_MOVE_MOUNT)):
        if name in lifted:
            jump(_JEQ_K, nr, 0, 1)
            p.append(errno_(EPERM))
    if "clone" in lifted:  # refuse namespace flags (args[0])
        jump(_JEQ_K, NR_CLONE, 0, 4)
        stmt(_LD_W_ABS, _arg(0))
        jump(_JSET_K, CLONE_NAMESPACE_FLAGS, 0, 1)
        p.append(errno_(EPERM))
        stmt(_RET_K, RET_ALLOW)
    stmt(_RET_K, RET_ALLOW)
    return p


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


_COMPILED: list[
    tuple[ctypes.Array[ctypes.c_char], _SockFprog]
] = []  # (buffer, fprog), built once in the zygote and inherited by every child


def compiled_filter(lifted: Sequence[str]) -> _SockFprog:
    if not _COMPILED:
        program = seccomp_program(lifted)
        raw = b"".join(struct.pack("<HBBI", *ins) for ins in program)
        buf = ctypes.create_string_buffer(raw, len(raw))
        _COMPILED.append((buf, _SockFprog(len(program), ctypes.cast(buf, ctypes.c_void_p))))
    return _COMPILED[0][1]


def install_seccomp(lifted: Sequence[str]) -> None:
    check(libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(compiled_filter(lifted)), 0, 0), "seccomp")


def drop_privileges() -> None:
    for cap in range(64):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            break  # past CAP_LAST_CAP
    libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = (ctypes.c_uint32 * 6)()
    check(libc.capset(header, data), "capset")
    check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
