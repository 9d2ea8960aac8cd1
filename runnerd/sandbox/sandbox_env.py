"""The sandbox environment: a venv of Debian's Python with the pinned library set.

``env/requirements.in`` names the libraries (the Gemini code-execution set);
``env/requirements.lock`` pins every package, transitive ones too, with
hashes (``runnerd env lock``, made with uv). :func:`build` installs the
lock with pip's hash checking into a venv made from ``/usr/bin/python3``
(the cage binds /usr, so the interpreter must be the system's), adds a
Matplotlib config dir (backend Agg, a prebuilt font cache), and writes a
marker naming the lock's digest. Building again with the same lock does
nothing: the marker matches.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import EnvironmentMissing

log = logging.getLogger(__name__)

SYSTEM_PYTHON = Path("/usr/bin/python3")
MARKER = ".runnerd-env.json"
MPLCONFIG = Path("runnerd") / "mplconfig"
# Build backends of the sdist-only libraries (chess, fpdf, pylatex): installed
# first, from the lock, so that the main install can use --no-build-isolation
# and every byte that runs at build time is hash-checked too.
BUILD_BACKENDS = ("setuptools", "wheel")

# The import name of each library in env/requirements.in, in its order.
LIBRARIES: dict[str, str] = {
    "attrs": "attr",
    "chess": "chess",
    "contourpy": "contourpy",
    "fpdf": "fpdf",
    "geopandas": "geopandas",
    "imageio": "imageio",
    "jinja2": "jinja2",
    "joblib": "joblib",
    "jsonschema": "jsonschema",
    "jsonschema-specifications": "jsonschema_specifications",
    "lxml": "lxml",
    "matplotlib": "matplotlib",
    "mpmath": "mpmath",
    "numpy": "numpy",
    "opencv-python-headless": "cv2",
    "openpyxl": "openpyxl",
    "packaging": "packaging",
    "pandas": "pandas",
    "pillow": "PIL",
    "protobuf": "google.protobuf",
    "pylatex": "pylatex",
    "pyparsing": "pyparsing",
    "PyPDF2": "PyPDF2",
    "python-dateutil": "dateutil",
    "python-docx": "docx",
    "python-pptx": "pptx",
    "reportlab": "reportlab",
    "scikit-learn": "sklearn",
    "scipy": "scipy",
    "seaborn": "seaborn",
    "six": "six",
    "striprtf": "striprtf",
    "sympy": "sympy",
    "tabulate": "tabulate",
    "tensorflow-cpu": "tensorflow",
    "toolz": "toolz",
    "xlrd": "xlrd",
}


def lock_digest(lock: Path) -> str:
    try:
        return hashlib.sha256(lock.read_bytes()).hexdigest()
    except OSError as exc:
        raise EnvironmentMissing(f"cannot read the lock file {lock}: {exc.strerror}") from None


def lock_entries(lock_text: str) -> dict[str, str]:
    """Package name (normalised) -> its whole entry (``name==version`` and its hashes)."""
    entries: dict[str, str] = {}
    current: list[str] = []
    for line in lock_text.splitlines():
        if line and not line[0].isspace() and not line.startswith("#"):
            if current:
                entries[_normalise(current[0].split("==")[0])] = "\n".join(current)
            current = [line]
        elif current and line.strip().startswith("--hash"):
            current.append(line)
    if current:
        entries[_normalise(current[0].split("==")[0])] = "\n".join(current)
    return entries


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name.strip()).lower()


@dataclass(frozen=True)
class EnvStatus:
    path: Path
    ready: bool
    detail: str


def status(env: Path, lock: Path) -> EnvStatus:
    marker = env / MARKER
    if not (env / "bin" / "python3").exists():
        return EnvStatus(env, False, f"no sandbox env at {env}: run `runnerd env build`")
    try:
        data = json.loads(marker.read_text())
    except (OSError, ValueError):
        return EnvStatus(env, False, f"{env} has no valid {MARKER} (an interrupted build?): run `runnerd env build`")
    if data.get("lock_sha256") != lock_digest(lock):
        return EnvStatus(env, False, f"{env} was built from another lock than {lock}: run `runnerd env build`")
    return EnvStatus(
        env, True, f"{env}: built {data.get('built_at', '?')} from {lock.name} ({data.get('packages', '?')} packages)"
    )


def _run(argv: list[str], what: str, env: dict[str, str] | None = None) -> None:
    log.debug("running %s", " ".join(argv))
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip()[-3000:]
        raise EnvironmentMissing(f"{what} failed (exit {proc.returncode}):\n{tail}")


def build(
    env: Path,
    lock: Path,
    *,
    force: bool = False,
    python: Path = SYSTEM_PYTHON,
    progress: Callable[[str], None] = lambda _: None,
) -> bool:
    """Build the env if it is missing or stale; True if it was (re)built."""
    if not force and status(env, lock).ready:
        progress(f"sandbox env {env} is up to date")
        return False
    if not python.exists():
        raise EnvironmentMissing(f"{python} is missing: install Debian's python3 and python3-venv")
    if env.exists():
        if not (env / "pyvenv.cfg").exists() and any(env.iterdir()):
            raise EnvironmentMissing(f"{env} exists and is not a venv; refusing to replace it")
        progress(f"removing the stale env at {env}")
        shutil.rmtree(env)
    started = time.monotonic()
    env.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(env.parent, os.stat(env.parent).st_mode | 0o711)
    progress(f"creating a venv from {python} at {env}")
    _run([str(python), "-m", "venv", str(env)], f"{python} -m venv")
    pip = [str(env / "bin" / "python3"), "-m", "pip", "--disable-pip-version-check", "--no-input"]
    lock_text = lock.read_text()
    entries = lock_entries(lock_text)
    missing = [b for b in BUILD_BACKENDS if b not in entries]
    if missing:
        raise EnvironmentMissing(f"{lock} does not pin {', '.join(missing)}; regenerate it with `runnerd env lock`")
    with tempfile.NamedTemporaryFile("w", suffix=".txt", prefix="runnerd-backends-") as backends:
        backends.write("\n".join(entries[b] for b in BUILD_BACKENDS) + "\n")
        backends.flush()
        progress("installing the pinned build backends (hash-checked)")
        _run([*pip, "install", "--require-hashes", "--no-deps", "-r", backends.name], "pip install (build backends)")
    progress(f"installing {len(entries)} pinned packages from {lock.name} (hash-checked)")
    _run(
        [*pip, "install", "--require-hashes", "--no-deps", "--no-build-isolation", "-r", str(lock)],
        "pip install (the library set)",
    )
    progress("building the Matplotlib config dir and font cache")
    _build_mplconfig(env)
    progress("checking that every library imports")
    verify_imports(env)
    marker = {
        "lock_sha256": lock_digest(lock),
        "lock": str(lock),
        "packages": len(entries),
        "python": subprocess.run(
            [str(env / "bin" / "python3"), "-c", "import sys; print(sys.version.split()[0])"],
            capture_output=True,
            text=True,
        ).stdout.strip(),  # fmt: skip
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "build_seconds": round(time.monotonic() - started, 1),
    }
    (env / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    progress(f"sandbox env ready in {marker['build_seconds']} s")
    return True


def _build_mplconfig(env: Path) -> None:
    """matplotlibrc (backend Agg) and fontlist-v*.json, built with the paths the cage sees."""
    target = env / MPLCONFIG
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    (target / "matplotlibrc").write_text("backend: Agg\n")
    with tempfile.TemporaryDirectory(prefix="runnerd-mplhome-") as home:
        # /usr/share/fonts and the env are bound at the same paths in the
        # cage, so a cache built here holds paths that are valid there.
        _run(
            [
                str(env / "bin" / "python3"),
                "-I",
                "-c",
                "import matplotlib.font_manager as fm; fm.findfont('DejaVu Sans')",
            ],
            "building the Matplotlib font cache",
            env={"MPLCONFIGDIR": str(target), "HOME": home, "PATH": "/usr/bin:/bin"},
        )
    if not list(target.glob("fontlist-v*.json")):
        raise EnvironmentMissing(f"Matplotlib wrote no font cache into {target}")
    for p in target.iterdir():
        os.chmod(p, 0o644)
    os.chmod(target, 0o755)


def verify_imports(env: Path) -> None:
    """Import every library of the set with the env's Python (outside any cage)."""
    code = (
        "import importlib, sys\n"
        f"names = {list(LIBRARIES.values())!r}\n"
        "bad = []\n"
        "for n in names:\n"
        "    try: importlib.import_module(n)\n"
        "    except BaseException as e: bad.append(f'{n}: {e!r}')\n"
        "print('\\n'.join(bad)); sys.exit(1 if bad else 0)\n"
    )
    _run(
        [str(env / "bin" / "python3"), "-I", "-c", code],
        "importing the library set",
        env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "MPLBACKEND": "Agg", "TF_CPP_MIN_LOG_LEVEL": "2"},
    )


def compile_lock(requirements_in: Path, lock: Path, *, python: Path = SYSTEM_PYTHON) -> None:
    """Regenerate the lock with uv (``pip install runnerd[lock]``), for *python*, with hashes."""
    uv = shutil.which("uv")
    if uv is None:
        raise EnvironmentMissing("uv is not installed: pip install 'runnerd[lock]'")
    _run(
        [uv, "pip", "compile", str(requirements_in), "--generate-hashes", "--python", str(python),
         "--custom-compile-command", "runnerd env lock", "-o", str(lock)],
        "uv pip compile",
    )  # fmt: skip
