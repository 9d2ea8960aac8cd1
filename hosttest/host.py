"""The host test: runnerd installed as a systemd service on a stock Debian 12 guest.

``./bootstrap.sh hosttest`` runs this. It

1. builds, once, a guest image from Debian's packages with mmdebstrap:
   Debian's minimal system, what makes it a bootable systemd host
   (:data:`BOOT_PACKAGES`), and exactly the packages runnerd's set-up
   declares (the ``setup`` line of env/debian-packages), so a package the
   set-up forgets fails in the guest. The image is cached under
   :data:`CACHE` and rebuilt when one of its inputs changes;
2. makes a wheelhouse of every Python package the set-up installs (the host
   venv with its test extras, the service venv, the sandbox env's lock),
   cached the same way: the guest has no network device;
3. boots the image with qemu (KVM when a guest boots with it here, else
   TCG), the checkout and the wheelhouse shared read-only over virtio-9p and
   a results folder shared writable; the guest runs hosttest/guest.py, which
   drives every step with its own timeout and powers off;
4. prints the guest's step table as it comes, saves the journals beside it,
   and exits non-zero when a step failed or the guest did not finish.

Stdlib only (with deploy/builds.py): it runs before anything but the host venv is installed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from deploy.builds import APT_SOURCES, CACHE, ROOT, SUITE, Builder, debian_packages, digest

IMAGE_FILES = Path(__file__).resolve().parent / "image"
# Debian's minimal system becomes a systemd host that boots under qemu with these.
BOOT_PACKAGES = ("systemd-sysv", "udev", "dbus", "kmod", "linux-image-amd64")
IMAGE_SIZE = "14G"
GUEST_MEMORY = "6G"
# Bump when the recipe below changes in a way its inputs do not show.
RECIPE = "2"
KVM_BOOT_DEADLINE_S = 90.0

B = Builder("hosttest")
log = B.log


# ---------------------------------------------------------------- the image


def image_key() -> str:
    files = sorted(IMAGE_FILES.iterdir())
    return digest(
        RECIPE.encode(), SUITE.encode(), " ".join(BOOT_PACKAGES).encode(), " ".join(debian_packages("setup")).encode(),
        APT_SOURCES.read_bytes(), *(f.name.encode() + b"\0" + f.read_bytes() for f in files),
    )  # fmt: skip


def build_image(tmp: Path) -> None:
    """disk.img, vmlinuz and initrd.img in *tmp*."""
    rootfs = tmp / "rootfs"
    setup = debian_packages("setup")
    log(f"image: building Debian {SUITE} + {', '.join(BOOT_PACKAGES)} + the set-up's {', '.join(setup)}")
    B.run(
        ["mmdebstrap", "--variant=minbase", "--format=directory",
         "--include=" + ",".join((*BOOT_PACKAGES, *setup)), SUITE, str(rootfs), str(APT_SOURCES)],
        "mmdebstrap",
    )  # fmt: skip
    (rootfs / "etc" / "fstab").write_text("/dev/vda / ext4 rw,relatime 0 1\n")
    (rootfs / "etc" / "hostname").write_text("runnerd-host\n")
    entry = rootfs / "usr" / "local" / "sbin" / "runnerd-hosttest"
    entry.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(IMAGE_FILES / "runnerd-hosttest", entry)
    entry.chmod(0o755)
    unit = rootfs / "etc" / "systemd" / "system" / "runnerd-hosttest.service"
    shutil.copyfile(IMAGE_FILES / "runnerd-hosttest.service", unit)
    wants = rootfs / "etc" / "systemd" / "system" / "multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    (wants / "runnerd-hosttest.service").symlink_to("/etc/systemd/system/runnerd-hosttest.service")
    boot = rootfs / "boot"
    kernels = sorted(boot.glob("vmlinuz-*"))
    initrds = sorted(boot.glob("initrd.img-*"))
    if not kernels or not initrds:
        raise B.fail(f"the image has no kernel or initrd in {boot}")
    shutil.copyfile(kernels[-1], tmp / "vmlinuz")
    shutil.copyfile(initrds[-1], tmp / "initrd.img")
    disk = tmp / "disk.img"
    B.run(["truncate", "-s", IMAGE_SIZE, str(disk)], "truncate")
    B.run(["mkfs.ext4", "-q", "-F", "-L", "root", "-d", str(rootfs), str(disk)], "mkfs.ext4 -d")
    shutil.rmtree(rootfs)


# ---------------------------------------------------------------- the guest


def kvm_boots(image: Path, wheels: Path) -> bool:
    """Does a guest boot with KVM here? Asked once per host kernel and qemu (the verdict is cached)."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    qemu_version = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True).stdout.split(
        "\n"
    )[0]
    verdict = CACHE / f"kvm-{digest(os.uname().release.encode(), qemu_version.encode())}"
    if verdict.exists():
        return verdict.read_text().strip() == "yes"
    log(f"kvm: trying a KVM boot (up to {KVM_BOOT_DEADLINE_S:.0f} s)")
    out = CACHE / "kvm-probe"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    (out / "probe-only").write_text("")  # the guest driver powers off at once
    proc = start_qemu(image, wheels, out, accel="kvm")
    booted = False
    deadline = time.monotonic() + KVM_BOOT_DEADLINE_S
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "booted").exists():
            booted = True
            break
        time.sleep(1)
    proc.kill()
    proc.wait()
    verdict.write_text("yes\n" if booted else "no\n")
    log(f"kvm: {'boots' if booted else 'no boot in time: using TCG'}")
    return booted


def start_qemu(image: Path, wheels: Path, out: Path, *, accel: str) -> subprocess.Popen[bytes]:
    disk = out / "disk.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(image / "disk.img"), str(disk)], check=True
    )
    share = "local,security_model=none,path={},mount_tag={}"
    argv = [
        "qemu-system-x86_64", "-name", "runnerd-hosttest", "-machine", "q35",
        "-accel", "kvm" if accel == "kvm" else "tcg,thread=multi",
        "-cpu", "host" if accel == "kvm" else "max", "-smp", str(os.cpu_count() or 2), "-m", GUEST_MEMORY,
        "-kernel", str(image / "vmlinuz"), "-initrd", str(image / "initrd.img"),
        "-append", "root=/dev/vda rw console=ttyS0 panic=1 systemd.show_status=0",
        "-drive", f"file={disk},if=virtio,format=qcow2,cache=unsafe",
        "-virtfs", share.format(ROOT, "src") + ",readonly=on",
        "-virtfs", share.format(wheels, "wheels") + ",readonly=on",
        "-virtfs", share.format(out, "out"),
        "-nic", "none", "-display", "none", "-monitor", "none", "-no-reboot",
        "-serial", f"file:{out / 'console.log'}",
    ]  # fmt: skip
    return subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=open(out / "qemu.log", "wb")
    )


def follow(path: Path, offset: int) -> int:
    """Print what *path* gained since *offset*; the new offset."""
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except FileNotFoundError:
        return offset
    if data:
        sys.stdout.write(data.decode(errors="replace"))
        sys.stdout.flush()
    return offset + len(data)


def main() -> int:
    parser = argparse.ArgumentParser(prog="bootstrap.sh hosttest", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--accel", choices=("auto", "kvm", "tcg"), default="auto", help="auto: KVM if a guest boots with it"
    )
    parser.add_argument("--timeout", type=float, default=50 * 60, help="seconds for the whole guest run (default 3000)")
    parser.add_argument("--modes", default="cold,warm", help="daemon modes to test, in order (default cold,warm)")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "hosttest" / "out", help="results folder (default hosttest/out)"
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("hosttest: run as root (mmdebstrap, qemu's shares)", file=sys.stderr)
        return 2
    started = time.monotonic()
    CACHE.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    image = B.cached("image", image_key(), build_image)
    image_s = time.monotonic() - t0
    t0 = time.monotonic()
    wheels = B.wheelhouse()
    wheels_s = time.monotonic() - t0
    accel = args.accel
    if accel == "auto":
        accel = "kvm" if kvm_boots(image, wheels) else "tcg"

    out = args.out.resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    (out / "modes").write_text(args.modes + "\n")
    log(f"booting the guest ({accel}); results in {out}")
    t0 = time.monotonic()
    proc = start_qemu(image, wheels, out, accel=accel)
    offset = 0
    deadline = time.monotonic() + args.timeout
    timed_out = False
    while proc.poll() is None:
        if time.monotonic() > deadline:
            timed_out = True
            proc.kill()
            break
        offset = follow(out / "steps.txt", offset)
        time.sleep(1)  # polling a file for progress to show; nothing waits on this for correctness
    proc.wait()
    follow(out / "steps.txt", offset)
    guest_s = time.monotonic() - t0
    (out / "disk.qcow2").unlink(missing_ok=True)

    lines = (out / "steps.txt").read_text().splitlines() if (out / "steps.txt").exists() else []
    passed = sum(1 for line in lines if line.startswith("ok "))
    failed = sum(1 for line in lines if line.startswith("FAIL"))
    exit_file = out / "guest.exit"
    finished = exit_file.exists() and exit_file.read_text().strip() == "0"
    if timed_out:
        log(f"FAIL: the guest did not finish in {args.timeout:.0f} s (console: {out / 'console.log'})")
        failed += 1
    elif not finished:
        log(f"FAIL: the guest driver did not finish cleanly (see {out / 'guest.log'} and {out / 'console.log'})")
        failed += 1
    log(f"image {image_s:.0f} s, wheelhouse {wheels_s:.0f} s, guest ({accel}) {guest_s:.0f} s, "
        f"total {time.monotonic() - started:.0f} s; journals and logs in {out}")  # fmt: skip
    print(f"hosttest: {passed} passed, {failed} failed", flush=True)
    return 0 if failed == 0 and passed > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
