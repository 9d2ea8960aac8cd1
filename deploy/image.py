"""``./bootstrap.sh image``: runnerd's container image, from Debian's packages and PyPI alone.

No base image is pulled (none can be, here or on an air-gapped build host):

1. **the base** (``localhost/runnerd-base:<key>``): Debian's minimal system
   (mmdebstrap, straight to a tarball, ``podman import``) with the set-up's
   packages (the ``setup`` line of env/debian-packages, as the host test's
   VM) and :data:`IMAGE_PACKAGES`; then the README's ``./bootstrap.sh setup``
   in it, offline from the wheelhouse, for the sandbox env (the locked
   library set, hash-checked, at /var/lib/runnerd/env), and the checkout it
   ran from removed. Its key: the packages, the lock, the recipe; it is
   built again only when one of them changes;
2. **runnerd** (``localhost/runnerd:<key>``, also tagged ``:latest`` and
   ``:<version>``): one layer on the base, made with buildah: the checkout
   copied in, ``./bootstrap.sh setup`` (the env is up to date: nothing to
   do) and ``runnerd install`` (the service venv at /opt/runnerd/venv,
   /usr/local/bin/runnerd, /etc/runnerd with its policies), the checkout and
   the wheelhouse removed. Its key adds the checkout's files.

The image runs ``tini -- runnerd --config /etc/runnerd/runnerd.toml serve``:
tini is PID 1 (it forwards SIGTERM to runnerd, which drains, and reaps
orphans); the config comes from a mounted file (a ConfigMap) in place of the
default one ``runnerd install`` wrote.

Printed at the end: the image's name, size and how long each part took.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from deploy.builds import APT_SOURCES, ROOT, SUITE, Builder, checkout_files, debian_packages, digest, files_digest
from runnerd import __version__

# In the image beside the set-up's packages: the init (PID 1), and groupadd for `runnerd install`.
IMAGE_PACKAGES = ("tini", "passwd")
# Bump when the recipe below changes in a way its inputs do not show.
RECIPE = "1"
NAME = "localhost/runnerd"
BASE = "localhost/runnerd-base"
ENTRYPOINT = ["/usr/bin/tini", "--", "/usr/local/bin/runnerd"]
CONFIG = "/etc/runnerd/runnerd.toml"
CMD = ["--config", CONFIG, "serve"]
PORT = 7700
SRC = "/usr/src/runnerd"  # where the checkout is while a part is built (gone from the image)
# What of the checkout `./bootstrap.sh setup` and `runnerd install` read: the image's inputs (tests and docs
# are not, so changing them rebuilds nothing).
INPUTS = ("bootstrap.sh", "setup.cfg", "pyproject.toml", "README.md", "runnerd/", "policies/", "env/", "systemd/")
WHEELS = "/tmp/wheels"
# Offline: every Python package from the wheelhouse; no pip cache left in a layer.
PIP_ENV = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": WHEELS, "PIP_NO_CACHE_DIR": "1", "HOME": "/root"}
SETUP = f"cd {SRC} && ./bootstrap.sh setup"
INSTALL = f"{SETUP} && .venv/bin/runnerd install"
CLEAN = f"cd / && rm -rf {SRC} {WHEELS} /root/.cache /var/lib/apt/lists/*"

B = Builder("image")


def base_key() -> str:
    return digest(
        RECIPE.encode(), SUITE.encode(), " ".join((*debian_packages("setup"), *IMAGE_PACKAGES)).encode(),
        APT_SOURCES.read_bytes(), (ROOT / "env" / "requirements.lock").read_bytes(),
    )  # fmt: skip


def inputs() -> list[Path]:
    return [p for p in checkout_files() if p.relative_to(ROOT).as_posix().startswith(INPUTS)]


def image_key(base: str) -> str:
    return digest(RECIPE.encode(), base.encode(), files_digest(inputs()))


def exists(ref: str) -> bool:
    return subprocess.run(["podman", "image", "exists", ref]).returncode == 0


def stage_checkout(into: Path) -> Path:
    """A copy of the image's inputs from the checkout (as git sees them) in *into*."""
    for path in inputs():
        dest = into / path.relative_to(ROOT)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest)
    return into


def in_chroot(command: str) -> str:
    """An mmdebstrap customize hook that runs *command* in the new system, offline."""
    env = " ".join(f"{k}={v}" for k, v in PIP_ENV.items())
    return f'--customize-hook=chroot "$1" env {env} sh -c "{command}"'


def build_base(ref: str, wheels: Path, work: Path) -> None:
    packages = (*debian_packages("setup"), *IMAGE_PACKAGES)
    B.log(f"base: Debian {SUITE} (minbase) + {', '.join(packages)}, then the sandbox env")
    src = stage_checkout(work / "src")
    tarball = work / "base.tar"
    B.run(
        ["mmdebstrap", "--variant=minbase", "--format=tar", "--include=" + ",".join(packages),
         f'--customize-hook=mkdir -p "$1{SRC}" "$1{WHEELS}"',
         f"--customize-hook=sync-in {src} {SRC}", f"--customize-hook=sync-in {wheels} {WHEELS}",
         in_chroot(SETUP), in_chroot(CLEAN), SUITE, str(tarball), str(APT_SOURCES)],
        "mmdebstrap (Debian, the set-up's packages, ./bootstrap.sh setup)",
    )  # fmt: skip
    B.run(["podman", "import", "--quiet", str(tarball), ref], "podman import (the base)")


def build_image(base: str, ref: str, wheels: Path, work: Path) -> None:
    src = stage_checkout(work / "src")
    ctr = B.run(["buildah", "from", "--pull=never", base], "buildah from (the base)").strip()
    try:
        B.run(["buildah", "copy", "--quiet", ctr, str(src), SRC], "buildah copy (the checkout)")
        B.run(["buildah", "copy", "--quiet", ctr, str(wheels), WHEELS], "buildah copy (the wheelhouse)")
        env = [f"--env={k}={v}" for k, v in PIP_ENV.items()]
        B.run(["buildah", "run", "--isolation=chroot", *env, ctr, "--", "sh", "-c", f"{INSTALL} && {CLEAN}"],
              "buildah run (./bootstrap.sh setup, runnerd install)")  # fmt: skip
        B.run(
            ["buildah", "config", f"--entrypoint={json.dumps(ENTRYPOINT)}", f"--cmd={json.dumps(CMD)}",
             "--stop-signal=SIGTERM", f"--port={PORT}", "--env=PYTHONUNBUFFERED=1", "--workingdir=/",
             f"--label=org.opencontainers.image.version={__version__}",
             "--label=org.opencontainers.image.title=runnerd", ctr],
            "buildah config",
        )  # fmt: skip
        B.run(["buildah", "commit", "--quiet", "--rm", ctr, ref], "buildah commit")
    except BaseException:
        subprocess.run(["buildah", "rm", ctr], capture_output=True)
        raise


def build() -> str:
    """The image for this checkout, built if it is not there yet; its name (``localhost/runnerd:<key>``)."""
    t0 = time.monotonic()
    wheels = B.wheelhouse()
    base = f"{BASE}:{base_key()}"
    ref = f"{NAME}:{image_key(base)}"
    with tempfile.TemporaryDirectory(prefix="runnerd-image-", dir=os.environ.get("TMPDIR", "/var/tmp")) as tmp:
        if exists(base):
            B.log(f"base: present ({base})")
        else:
            build_base(base, wheels, Path(tmp) / "base")
        if exists(ref):
            B.log(f"image: present ({ref})")
        else:
            build_image(base, ref, wheels, Path(tmp) / "image")
    for tag in (f"{NAME}:latest", f"{NAME}:{__version__}"):
        B.run(["podman", "tag", ref, tag], f"podman tag {tag}")
    prune(base, ref)
    size = int(B.run(["podman", "image", "inspect", "--format", "{{.Size}}", ref], "podman image inspect"))
    B.log(f"{ref}: {size / 2**20:.0f} MiB, in {time.monotonic() - t0:.0f} s")
    return ref


def prune(base: str, ref: str) -> None:
    """Older builds of the base and the image go (the tags moved to the new one)."""
    listed = B.run(["podman", "images", "--format", "{{.Repository}}:{{.Tag}}"], "podman images").split()
    for name in listed:
        if name.split(":")[0] in (NAME, BASE) and name not in (base, ref) and re.fullmatch(r".*:[0-9a-f]{16}", name):
            subprocess.run(["podman", "rmi", name], capture_output=True)


def main() -> int:
    parser = argparse.ArgumentParser(prog="bootstrap.sh image", description=__doc__.split("\n\n")[0])
    parser.add_argument("--save", type=Path, help="also write the image here, an OCI archive (for `podman load`)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("image: run as root (mmdebstrap, podman and buildah's storage)", file=sys.stderr)
        return 2
    ref = build()
    if args.save:
        B.run(["podman", "save", "--format=oci-archive", "-o", str(args.save), ref], f"podman save {args.save}")
    print(ref)
    return 0


if __name__ == "__main__":
    sys.exit(main())
