"""What the host test's VM image and the container image are built from, and how each build is cached.

Both start from Debian's packages (mmdebstrap: no base image is pulled) and
install runnerd the way the README does, with no network: every Python
package comes from a wheelhouse made here once (:func:`build_wheelhouse`).
A build lands in ``CACHE/<kind>-<key>``, where the key digests its inputs; a
build whose key is already there is not done again, and the older builds of
that kind go, but for one a running build or test still uses (each user
holds a shared lock on its build's ``.done`` until it exits: the host test's
guest reads its wheelhouse for half an hour, while an image build may want
another).

Stdlib only: it runs before anything but the host venv is installed.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("RUNNERD_HOSTTEST_CACHE", "/var/cache/runnerd-hosttest"))
SUITE = "bookworm"
APT_SOURCES = Path("/etc/apt/sources.list.d/debian.sources")


class Builder:
    """A tool's voice (``name: message``) and its steps, each a command that must succeed."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._held: list[int] = []  # shared locks on the builds in use, until this process exits

    def log(self, message: str) -> None:
        print(f"{self.name}: {message}", flush=True)

    def fail(self, message: str) -> SystemExit:
        return SystemExit(f"{self.name}: {message}")

    def run(self, argv: list[str], what: str, **kw: object) -> str:
        """Run *argv*; its stdout. A failure ends the build, with the command's last words."""
        started = time.monotonic()
        proc = subprocess.run(argv, capture_output=True, text=True, **kw)  # type: ignore[call-overload]
        if proc.returncode != 0:
            raise self.fail(f"{what} failed (exit {proc.returncode}):\n{(proc.stderr or proc.stdout)[-4000:]}")
        self.log(f"{what}: done in {time.monotonic() - started:.0f} s")
        return str(proc.stdout)

    def cached(self, kind: str, key: str, build: Callable[[Path], None]) -> Path:
        """CACHE/KIND-KEY, made by *build* into a fresh folder when missing; older KIND-* go.

        One process at a time looks, builds and evicts for a kind (an exclusive lock on
        CACHE/.KIND.lock); the build it returns is held (a shared lock) before that lock is let go.
        """
        CACHE.mkdir(parents=True, exist_ok=True)
        lock = os.open(CACHE / f".{kind}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            done = CACHE / f"{kind}-{key}"
            if (done / ".done").exists():
                self.log(f"{kind}: cached ({done})")
            else:
                for old in CACHE.glob(f"{kind}-*"):
                    if not self._in_use(old):
                        shutil.rmtree(old, ignore_errors=True)
                tmp = CACHE / f"building-{kind}-{key}"
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
                build(tmp)
                (tmp / ".done").write_text(key + "\n")
                tmp.rename(done)
            self._hold(done)
            return done
        finally:
            os.close(lock)

    def _hold(self, done: Path) -> None:
        fd = os.open(done / ".done", os.O_RDONLY | os.O_CLOEXEC)
        fcntl.flock(fd, fcntl.LOCK_SH)
        self._held.append(fd)

    @staticmethod
    def _in_use(build: Path) -> bool:
        try:
            fd = os.open(build / ".done", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False  # half made by a build that died: nobody's
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def wheelhouse(self) -> Path:
        """Every wheel and sdist ``./bootstrap.sh setup`` and ``runnerd install`` take, for a build with no index."""
        return self.cached("wheels", wheel_key(), lambda tmp: build_wheelhouse(self, tmp))


def debian_packages(line: str) -> list[str]:
    """The packages of one line of env/debian-packages (``setup``, ``test``, ...): the one list."""
    for raw in (ROOT / "env" / "debian-packages").read_text().splitlines():
        key, sep, value = raw.partition(":")
        if sep and key.strip() == line and not raw.lstrip().startswith("#"):
            return value.split()
    raise SystemExit(f"env/debian-packages has no `{line}:` line")


def digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()[:16]


def files_digest(paths: Iterable[Path]) -> bytes:
    """Names and contents of *paths* (relative to the checkout), as one input to a key."""
    return b"".join(p.relative_to(ROOT).as_posix().encode() + b"\0" + p.read_bytes() for p in sorted(paths))


def checkout_files() -> list[Path]:
    """The checkout's files as git sees them: tracked, and new ones not ignored (no .venv, no build output)."""
    out = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True, check=True,
    ).stdout  # fmt: skip
    return sorted(ROOT / name for name in out.decode().split("\0") if name and (ROOT / name).is_file())


def wheel_key() -> str:
    return digest(
        *(p.read_bytes() for p in (ROOT / "setup.cfg", ROOT / "pyproject.toml", ROOT / "env" / "requirements.lock"))
    )


def build_wheelhouse(b: Builder, tmp: Path) -> None:
    """Every wheel and sdist a build's pip installs, with no index, in *tmp*."""
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "download", "-q", "-d", str(tmp)]
    # runnerd with its test extras (bootstrap's .venv), and the build backend
    # pip needs to install runnerd itself (the service venv, .venv).
    b.run([*pip, f"{ROOT}[test]", "setuptools>=61", "wheel"], "pip download (runnerd and its dependencies)")
    b.run([*pip, "--no-deps", "--require-hashes", "-r", str(ROOT / "env" / "requirements.lock")],
          "pip download (the sandbox env's lock)")  # fmt: skip
    for built in tmp.glob("runnerd-*"):
        built.unlink()  # a build installs runnerd from its own copy of the checkout
