"""The sandbox policy: an nsjail config (protobuf text) and the kafel seccomp policy it names.

Loaded once at start-up (and on reload), checked in three steps so that a
bad policy stops runnerd with a clear message instead of failing each job:

1. :func:`load` reads both files and looks at the config's top-level fields:
   runnerd refuses settings it owns (uid maps, log target, fds) and settings
   that would weaken the cage (a namespace turned off, capabilities kept, new
   privileges allowed, network moved in), and takes the cgroup limits, which
   it applies itself (see cgroups.py);
2. :func:`check_with_nsjail` has nsjail itself parse the config and compile
   the kafel policy (runnerd does not re-implement either);
3. the preflight probe (preflight.py) runs a job in a real cage and checks,
   from inside, what the policy promised: unprivileged uid, no capabilities,
   seccomp on, no network.

The checked texts are then given to every nsjail through pipes, so editing
the files on disk changes nothing until the next start or reload.
"""

from __future__ import annotations

import os
import re
import resource
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..errors import PolicyError
from .cgroups import CgroupLimits
from .shape import CODE, FIGURES, JAIL_UID, LIFTED_FOR_ZYGOTES, CageShape, Tmpfs

# Fields runnerd sets per job or relies on; a policy may not set them.
_OWNED = {
    "uidmap": f"runnerd maps inside uid {JAIL_UID} to uid_base + slot itself",
    "gidmap": f"runnerd maps inside gid {JAIL_UID} to uid_base + slot itself",
    "exec_bin": "runnerd runs its harness",
    "log_fd": "runnerd reads nsjail's log on its own fd",
    "log_file": "runnerd reads nsjail's log on its own fd",
    "pass_fd": "runnerd decides which fds reach the job",
    "seccomp_string": "name the kafel file with seccomp_policy_file",
    "silent": "runnerd needs the job's stdout and stderr",
    "stderr_to_null": "runnerd needs the job's stderr",
    "chroot_dir": "bind what the job needs with mount { } instead",
    "daemon": "runnerd waits for each nsjail",
    "port": "runnerd runs nsjail once per job",
}
# Fields that must keep a given value if present (the cage's promises).
_REQUIRED_VALUES = {
    "mode": "ONCE",
    "clone_newuser": "true",
    "clone_newns": "true",
    "clone_newpid": "true",
    "clone_newnet": "true",
    "clone_newipc": "true",
    "clone_newuts": "true",
    "clone_newcgroup": "true",
    "keep_caps": "false",
    "disable_no_new_privs": "false",
    "skip_setsid": "false",
    "is_root_rw": "false",
    "use_pasta": "false",
}
# Fields that would bring a network interface or capabilities in.
_FORBIDDEN = {
    "cap": "capabilities are never kept",
    "iface_own": "the job has no network",
    "macvlan_iface": "the job has no network",
}


# One ``name: value`` of a protobuf text config; the value quoted or bare.
_FIELD = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*:\s*(\"(?:[^\"\\\n]|\\.)*\"|'(?:[^'\\\n]|\\.)*'|[^\s#{};,]+)")


def _unquote(value: str) -> str:
    return value[1:-1] if value[:1] in "\"'" else value


def scan_fields(text: str) -> dict[str, list[str]]:
    """Top-level fields of a protobuf text config: ``name: value`` (unquoted) and ``name { }`` ("{...}").

    Only a scanner for the fields runnerd has to look at: it skips the
    contents of ``{ }`` blocks and comments, and knows quoted strings. The
    real parse is nsjail's (:func:`check_with_nsjail`).
    """
    fields: dict[str, list[str]] = {}
    i, n, depth = 0, len(text), 0
    message = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*:?\s*(?=\{)")
    while i < n:
        c = text[i]
        if c == "#":
            nl = text.find("\n", i)
            i = n if nl < 0 else nl + 1
        elif c in "\"'":
            m = re.compile(rf"{c}(?:[^{c}\\\n]|\\.)*{c}").match(text, i)
            if not m:
                raise PolicyError(f"unterminated string at offset {i}")
            i = m.end()
        elif c == "{":
            depth += 1
            i += 1
        elif c == "}":
            depth -= 1
            if depth < 0:
                raise PolicyError(f"unbalanced '}}' at offset {i}")
            i += 1
        elif depth == 0 and (m := message.match(text, i)):
            fields.setdefault(m.group(1), []).append("{...}")
            i = m.end()
        elif depth == 0 and (m := _FIELD.match(text, i)):
            fields.setdefault(m.group(1), []).append(_unquote(m.group(2)))
            i = m.end()
        else:
            i += 1
    if depth != 0:
        raise PolicyError("unbalanced '{' in the config")
    return fields


def _one_int(fields: Mapping[str, list[str]], name: str, path: Path) -> int:
    values = fields.get(name)
    if not values:
        raise PolicyError(f"{path}: {name} is missing; runnerd applies it to each job's cgroup")
    try:
        value = int(values[-1], 0)
    except ValueError:
        raise PolicyError(f"{path}: {name} must be a number, got {values[-1]!r}") from None
    if value <= 0:
        raise PolicyError(f"{path}: {name} must be positive, got {value}")
    return value


def zygote_kafel(kafel_text: str, where: Path) -> str:
    """The seccomp policy of a warm zygote's cage, derived from the job's: LIFTED_FOR_ZYGOTES taken out.

    PolicyError when an entry is not in the policy once, in the form the
    shipped default.kafel has it (``unshare,``, ``mount,`` and
    ``clone(flags) { ... },`` in the EPERM list).
    """
    # Comments blanked to the same length: a name in a comment is not an entry.
    blanked = re.sub(r"/\*.*?\*/|//[^\n]*", lambda m: " " * len(m.group(0)), kafel_text, flags=re.S)
    spans = []
    for name, form in LIFTED_FOR_ZYGOTES.items():
        found = list(re.finditer(form, blanked))
        if len(found) != 1:
            raise PolicyError(
                f"{where}: warm mode lifts {name} from this policy for its zygotes, and finds it "
                f"{len(found)} times; keep it once, as `{name}` is in the shipped default.kafel's EPERM list"
            )
        spans.append(found[0].span())
    text = kafel_text
    for start, end in sorted(spans, reverse=True):
        text = text[:start] + text[end:]
    return text


def mount_blocks(text: str) -> list[dict[str, str]]:
    """The fields of each top-level ``mount { ... }`` of a protobuf text config (the last value of each)."""
    blanked = re.sub(r"#[^\n]*", lambda m: " " * len(m.group(0)), text)
    blocks = []
    for m in re.finditer(r"(?m)^\s*mount\s*:?\s*\{", blanked):
        end = blanked.find("}", m.end())
        if end < 0:
            raise PolicyError(f"unbalanced '{{' in a mount block at offset {m.start()}")
        blocks.append({k: _unquote(v) for k, v in _FIELD.findall(text[m.end() : end])})
    return blocks


def tmpfs_mounts(text: str, where: Path) -> tuple[Tmpfs, ...]:
    found = []
    for block in mount_blocks(text):
        if block.get("fstype") != "tmpfs":
            continue
        if "dst" not in block:
            raise PolicyError(f"{where}: a tmpfs mount without dst")
        found.append(
            Tmpfs(
                dst=block["dst"],
                options=block.get("options", ""),
                nosuid=block.get("nosuid", "false") == "true",
                nodev=block.get("nodev", "false") == "true",
                noexec=block.get("noexec", "false") == "true",
            )
        )
    return tuple(found)


# The rlimits a warm child sets itself. A zygote's cage gets every rlimit of
# the policy from nsjail, as a cold cage does, and its children inherit
# them, but for RLIMIT_CPU: a zygote lives for many jobs and the limit counts
# its own CPU time across all of them, so its cage has none, and each child
# sets the job's. Name -> (the resource's name in Python's `resource`
# module, nsjail's default value and type).
JOB_RLIMITS: dict[str, tuple[str, int, str]] = {
    "rlimit_cpu": ("RLIMIT_CPU", 600, "VALUE"),
}
RLIM_INFINITY = -1


def job_rlimits(fields: Mapping[str, tuple[str, ...]] | Mapping[str, list[str]], path: Path) -> dict[str, int]:
    """What a warm child sets of the job's rlimits (JOB_RLIMITS), by `resource` name (-1: none).

    As nsjail reads them: a ``<name>_type`` of INF is no limit, SOFT or HARD
    the current soft or hard limit of the process that starts nsjail (this
    one), VALUE (nsjail's default for these) the given value.
    """
    limits: dict[str, int] = {}
    for name, (resource_name, default, default_kind) in JOB_RLIMITS.items():
        kind = (fields.get(f"{name}_type") or (default_kind,))[-1]
        if kind in ("SOFT", "HARD"):
            soft, hard = resource.getrlimit(getattr(resource, resource_name))
            current = soft if kind == "SOFT" else hard
            limits[resource_name] = RLIM_INFINITY if current == resource.RLIM_INFINITY else current
            continue
        if kind == "INF":
            limits[resource_name] = RLIM_INFINITY
            continue
        if kind != "VALUE":
            raise PolicyError(f"{path}: {name}_type: {kind} is not one of VALUE, SOFT, HARD, INF")
        given = fields.get(name)
        try:
            value = int(given[-1], 0) if given else default
        except ValueError:
            raise PolicyError(f"{path}: {name} must be a number, got {given[-1] if given else ''!r}") from None
        if value < 0:
            raise PolicyError(f"{path}: {name} must not be negative, got {value}")
        limits[resource_name] = value
    return limits


@dataclass(frozen=True)
class Policy:
    path: Path
    cfg_text: str
    kafel_path: Path
    kafel_text: str
    limits: CgroupLimits
    fields: Mapping[str, tuple[str, ...]]
    # What each job's process gets (warm children set these themselves).
    rlimits: Mapping[str, int]
    # The tmpfs mounts of every cage (warm children mount them afresh).
    tmpfs: tuple[Tmpfs, ...] = ()

    @property
    def cwd(self) -> str:
        return self.fields.get("cwd", ("/",))[-1]

    @property
    def home(self) -> str:
        """The job's HOME, from the policy's environment."""
        for value in reversed(self.fields.get("envar", ())):
            if value.startswith("HOME="):
                return value[len("HOME=") :]
        return "/home/user"

    def shape(self) -> CageShape:
        """The cage a job gets under this policy, for both runners (:mod:`.shape`)."""
        return CageShape(
            jail_uid=JAIL_UID,
            work=self.cwd,
            home=self.home,
            code=CODE,
            figures=FIGURES,
            tmpfs=self.tmpfs,
            rlimits=dict(self.rlimits),
            lifted=tuple(LIFTED_FOR_ZYGOTES),
        )

    def zygote_kafel_text(self) -> str:
        """The seccomp policy of a warm zygote's cage (:func:`zygote_kafel`); PolicyError if it cannot be derived."""
        return zygote_kafel(self.kafel_text, self.kafel_path)


def load(path: Path) -> Policy:
    """Read and statically check the policy at *path*; PolicyError naming the problem."""
    try:
        cfg_text = path.read_text()
    except OSError as exc:
        raise PolicyError(f"cannot read the nsjail config {path}: {exc.strerror}") from None
    try:
        raw = scan_fields(cfg_text)
    except PolicyError as exc:
        raise PolicyError(f"{path}: {exc}") from None
    for name, why in {**_OWNED, **_FORBIDDEN}.items():
        if name in raw:
            raise PolicyError(f"{path}: {name} may not be set in a runnerd policy ({why})")
    for name, wanted in _REQUIRED_VALUES.items():
        for value in raw.get(name, []):
            if value != wanted:
                raise PolicyError(f"{path}: {name}: {value} would weaken the cage; runnerd needs {name}: {wanted}")
    if raw.get("cwd", ["/"])[-1] != "/work":
        raise PolicyError(f'{path}: cwd must be "/work", where runnerd mounts the job\'s working directory')
    kafel_names = raw.get("seccomp_policy_file")
    if not kafel_names:
        raise PolicyError(f"{path}: seccomp_policy_file is missing; a runnerd policy always has a seccomp filter")
    kafel_path = (path.parent / kafel_names[-1]).resolve()
    try:
        kafel_text = kafel_path.read_text()
    except OSError as exc:
        raise PolicyError(f"cannot read the seccomp policy {kafel_path} (named in {path}): {exc.strerror}") from None
    limits = CgroupLimits(
        memory_bytes=_one_int(raw, "cgroup_mem_max", path),
        pids=_one_int(raw, "cgroup_pids_max", path),
        cpu_ms_per_sec=_one_int(raw, "cgroup_cpu_ms_per_sec", path),
    )
    return Policy(
        path=path,
        cfg_text=cfg_text,
        kafel_path=kafel_path,
        kafel_text=kafel_text,
        limits=limits,
        fields={k: tuple(v) for k, v in raw.items()},
        rlimits=job_rlimits(raw, path),
        tmpfs=tmpfs_mounts(cfg_text, path),
    )


# nsjail's command-line flags that turn its own cgroup handling off: runnerd
# puts the whole nsjail process in the job's cgroup instead.
NSJAIL_CGROUPS_OFF = ("--cgroup_mem_max", "0", "--cgroup_pids_max", "0", "--cgroup_cpu_ms_per_sec", "0")


# nsjail's warning for a bind whose source this host lacks. For a mount the
# policy marks `mandatory: false` (zoneinfo, fonts: absent on a minimal host)
# it is harmless; for a mandatory one an error line follows and says so.
_ABSENT_SOURCE = re.compile(r"^mount\('[^']*' -> '[^']*'\): No such file or directory$")


def nsjail_problems(log: str) -> str:
    """nsjail's warnings and errors, each as its message alone, joined: what a person reads of a failure."""
    lines = [ln for ln in log.splitlines() if ln.startswith(("[W]", "[E]", "[F]"))]
    # "[W][date][pid] function():line message" -> "message"
    cleaned = [re.sub(r"^\[[WEF]\]\[[^\]]*\](\[\d+\])?\s*\S+\(\):\d+\s*", "", ln) for ln in lines]
    return "; ".join(c for c in cleaned if c and not _ABSENT_SOURCE.match(c))


def check_with_nsjail(policy: Policy, nsjail: Path, *, zygote: bool = False) -> None:
    """Have nsjail parse the config and compile the kafel policy; PolicyError with its words if not.

    Runs ``/usr/bin/true`` in a throw-away cage (about 20 ms): nsjail only
    compiles the seccomp policy on the way to running something. With
    *zygote*, the warm mode's zygote policy (derived from it) is compiled instead.
    """
    kafel_text = policy.zygote_kafel_text() if zygote else policy.kafel_text
    with tempfile.TemporaryDirectory(prefix="runnerd-policy-") as scratch:
        os.chmod(scratch, 0o755)
        cfg_r, cfg_w = os.pipe()
        kafel_r, kafel_w = os.pipe()
        try:
            os.write(cfg_w, policy.cfg_text.encode())
            os.write(kafel_w, kafel_text.encode())
        finally:
            os.close(cfg_w)
            os.close(kafel_w)
        argv = [
            str(nsjail), "--config", f"/dev/fd/{cfg_r}", "--seccomp_policy", f"/dev/fd/{kafel_r}",
            "--log_fd", "2", "--quiet", *NSJAIL_CGROUPS_OFF,
            "--user", f"{JAIL_UID}:65534:1", "--group", f"{JAIL_UID}:65534:1",
            "--bindmount_ro", f"{scratch}:/work", "--time_limit", "10",
            "--", "/usr/bin/true",
        ]  # fmt: skip
        try:
            proc = subprocess.run(
                argv, pass_fds=(cfg_r, kafel_r), stdin=subprocess.DEVNULL,
                capture_output=True, text=True, timeout=30,
            )  # fmt: skip
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise PolicyError(f"cannot run nsjail ({nsjail}) to check the policy: {exc}") from None
        finally:
            os.close(cfg_r)
            os.close(kafel_r)
    if proc.returncode != 0:
        which = f"{policy.kafel_path} as warm mode derives it for zygotes" if zygote else policy.path
        raise PolicyError(
            f"nsjail rejects the policy {which}: {nsjail_problems(proc.stderr) or proc.stderr.strip()[-500:]}"
        )
