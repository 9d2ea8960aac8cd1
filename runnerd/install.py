"""``runnerd install``: put runnerd in place as a systemd service. Safe to run again.

What it does, each step skipped when already done:

1. the ``runnerd`` system group (it may use the ipc socket);
2. a service venv at /opt/runnerd/venv (Debian's python3), with runnerd
   installed from this checkout (not editable: the service does not depend
   on the checkout afterwards), and /usr/local/bin/runnerd pointing at it;
3. the unit at /etc/systemd/system/runnerd.service;
4. /etc/runnerd/runnerd.toml (every key, commented, at its default) and
   /etc/runnerd/policies/ (a copy of the shipped policy, never overwritten:
   edits made there are kept);
5. /run/runnerd (root and the runnerd group), until systemd's
   RuntimeDirectory takes over;
6. the sandbox env at /var/lib/runnerd/env;
7. ``systemctl daemon-reload`` when systemd is running.

``--root DIR`` writes the files under DIR instead (for packaging and tests):
the group is not made and systemctl is not called there.
"""

from __future__ import annotations

import dataclasses
import grp
import hashlib
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from .config import Config, Limits
from .errors import RunnerdError
from .sandbox import sandbox_env

GROUP = "runnerd"
SERVICE_VENV = Path("/opt/runnerd/venv")
COMMAND = Path("/usr/local/bin/runnerd")
UNIT = Path("/etc/systemd/system/runnerd.service")
CONFIG_DIR = Path("/etc/runnerd")
RUN_DIR = Path("/run/runnerd")
DOC = Path("/usr/local/share/doc/runnerd/README.md")


def checkout() -> Path:
    root = Path(__file__).resolve().parent.parent
    if not (root / "setup.cfg").exists() or not (root / "systemd" / "runnerd.service").exists():
        raise RunnerdError(f"runnerd install runs from a checkout of runnerd; {root} is not one")
    return root


def policy_files(root: Path) -> list[Path]:
    """Every file of the shipped policy (the nsjail config and each kafel policy it or warm mode reads)."""
    return sorted(p for p in (root / "policies").iterdir() if p.suffix in (".cfg", ".kafel"))


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for pattern in ("setup.cfg", "pyproject.toml", "runnerd/**/*.py", "policies/*", "env/*"):
        for path in sorted(root.glob(pattern)):
            h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def default_config_text(policy: Path) -> str:
    """runnerd.toml with every key at its default, commented out (the policy set)."""
    cfg = Config()
    lines = [
        "# runnerd's configuration. Every key is shown at its default, commented out;",
        "# the README's Configuration table says what each one does.",
        "# Reload without dropping running jobs: systemctl kill --kill-who=main --signal=HUP runnerd",
        "",
        f'policy = "{policy}"',
    ]

    def show(name: str, value: object) -> str:
        if isinstance(value, Path):
            return f'"{value}"'
        if isinstance(value, str):
            return f'"{value}"'
        if isinstance(value, tuple):
            return "[" + ", ".join(f'"{v}"' for v in value) + "]"
        return str(value).lower() if isinstance(value, bool) else str(value)

    for f in dataclasses.fields(Config):
        if f.name in ("limits", "policy"):
            continue
        value = cfg.sandbox_env if f.name == "env_path" else getattr(cfg, f.name)
        if f.name == "concurrency":
            lines.append("# concurrency = <the number of CPUs>")
            continue
        lines.append(f"# {f.name} = {show(f.name, value)}" if value is not None else f'# {f.name} = ""')
    lines += ["", "[limits]"]
    for f in dataclasses.fields(Limits):
        lines.append(f"# {f.name} = {show(f.name, getattr(cfg.limits, f.name))}")
    return "\n".join(lines) + "\n"


def install(*, root: Path = Path("/"), build_env: bool = True, say: Callable[[str], None] = print) -> None:
    src = checkout()
    inside = lambda p: root / p.relative_to("/")  # noqa: E731
    real_root = root == Path("/")

    # 1. the group
    if real_root:
        try:
            grp.getgrnam(GROUP)
            say(f"group {GROUP}: present")
        except KeyError:
            subprocess.run(["groupadd", "--system", GROUP], check=True)
            say(f"group {GROUP}: created")
    else:
        say(f"group {GROUP}: skipped (--root)")

    # 2. the service venv and the command
    venv = inside(SERVICE_VENV)
    stamp = venv / ".runnerd-source"
    digest = _tree_digest(src)
    if stamp.exists() and stamp.read_text() == digest:
        say(f"{SERVICE_VENV}: up to date")
    else:
        if not (venv / "bin" / "python3").exists():
            venv.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run([str(sandbox_env.SYSTEM_PYTHON), "-m", "venv", str(venv)], check=True)
        proc = subprocess.run(
            [str(venv / "bin" / "pip"), "install", "--disable-pip-version-check", "-q", "--upgrade", str(src)],
            capture_output=True, text=True,
        )  # fmt: skip
        if proc.returncode != 0:
            raise RunnerdError(f"pip install into {venv} failed:\n{proc.stderr[-2000:]}")
        stamp.write_text(digest)
        say(f"{SERVICE_VENV}: runnerd installed from {src}")
    command = inside(COMMAND)
    command.parent.mkdir(parents=True, exist_ok=True)
    target = SERVICE_VENV / "bin" / "runnerd"
    if command.is_symlink() and Path(os.readlink(command)) == target:
        say(f"{COMMAND}: present")
    else:
        if command.exists() or command.is_symlink():
            command.unlink()
        command.symlink_to(target)
        say(f"{COMMAND} -> {target}")

    # 3. the unit, and the README it points to
    for source, dest in ((src / "systemd" / "runnerd.service", inside(UNIT)), (src / "README.md", inside(DOC))):
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists() and dest.read_bytes() == source.read_bytes():
            say(f"/{dest.relative_to(root)}: up to date")
        else:
            shutil.copyfile(source, dest)
            say(f"/{dest.relative_to(root)}: written")

    # 4. config and policies (never overwritten)
    conf_dir = inside(CONFIG_DIR)
    (conf_dir / "policies").mkdir(parents=True, exist_ok=True)
    for shipped in policy_files(src):
        name = shipped.name
        dest = conf_dir / "policies" / name
        if not dest.exists():
            shutil.copyfile(shipped, dest)
            say(f"{CONFIG_DIR}/policies/{name}: written")
        elif dest.read_bytes() != shipped.read_bytes():
            say(f"{CONFIG_DIR}/policies/{name}: differs from the shipped one; kept (the shipped copy: {shipped})")
    conf = conf_dir / "runnerd.toml"
    if conf.exists():
        say(f"{CONFIG_DIR}/runnerd.toml: present, kept")
    else:
        conf.write_text(default_config_text(CONFIG_DIR / "policies" / "default.cfg"))
        say(f"{CONFIG_DIR}/runnerd.toml: written")

    # 5. the socket dir
    run_dir = inside(RUN_DIR)
    run_dir.mkdir(parents=True, exist_ok=True)
    if real_root:
        os.chown(run_dir, 0, grp.getgrnam(GROUP).gr_gid)
    os.chmod(run_dir, 0o750)

    # 6. the sandbox env
    if build_env:
        env_path = inside(Path("/var/lib/runnerd/env"))
        sandbox_env.build(env_path, src / "env" / "requirements.lock", progress=lambda m: say(f"sandbox env: {m}"))
    else:
        say("sandbox env: skipped (--no-env)")

    # 7. systemd
    if real_root and Path("/run/systemd/system").is_dir():
        subprocess.run(["systemctl", "daemon-reload"], check=True)
        say("systemctl daemon-reload: done; start it with: systemctl enable --now runnerd")
    else:
        say("systemd is not running here: start the daemon with `runnerd serve`, or enable the unit on a systemd host")
