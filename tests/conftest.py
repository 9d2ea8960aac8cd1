"""Shared fixtures: a real cage (real nsjail, real cgroups, the real sandbox env).

Tests run as root on a host with the sandbox env built (``./bootstrap.sh
test`` does both). Every test that runs hostile code depends on
``cage_confirmed``: it runs the preflight probe first and *fails* the test
if the cage is not there (a private pid namespace, an unprivileged uid,
seccomp, no network), so hostile code never runs outside a cage.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from runnerd import config as config_mod
from runnerd.config import Config
from runnerd.result import Result
from runnerd.sandbox.job import make_job
from runnerd.sandbox.runtime import Runtime, open_runtime

TEST_ROOT = Path("/var/lib/runnerd-tests")
# Secrets no job may ever see: in every test daemon's environment, and in files on the host.
CANARY = "CANARY-" + uuid.uuid4().hex
CANARY_ENV = "RUNNERD_TEST_CANARY"


def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("runnerd's cage tests need root (nsjail, cgroups, mounts)")


@pytest.fixture(scope="session")
def state_dir() -> Iterator[Path]:
    """A state dir of the session's own (traversable by the jailed uid, unlike pytest's tmp)."""
    _require_root()
    TEST_ROOT.mkdir(mode=0o755, exist_ok=True)
    os.chmod(TEST_ROOT, 0o755)
    path = TEST_ROOT / f"s-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    path.mkdir(mode=0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def base_config(state_dir: Path) -> Config:
    # Not the host's /etc/runnerd/runnerd.toml: tests use the defaults, the
    # env bootstrap built, and a state dir of their own.
    env = Path(os.environ.get("RUNNERD_TEST_ENV", str(config_mod.DEFAULT_STATE_DIR / "env")))
    cfg = Config(state_dir=state_dir, env_path=env)
    cfg.validate()
    return cfg


@pytest.fixture(scope="session")
def runtime(base_config: Config) -> Iterator[Runtime]:
    rt = asyncio.run(open_runtime(base_config, probe=True))
    yield rt
    rt.close()


@pytest.fixture(scope="session")
def cage_confirmed(runtime: Runtime) -> Runtime:
    """The cage, after the probe confirmed it; a failure here fails every hostile test."""
    from runnerd.sandbox.preflight import failures

    bad = failures(runtime.checks)
    if bad or not runtime.checks:
        pytest.fail("the cage is not confirmed; refusing to run hostile code:\n" + "\n".join(c.line() for c in bad))
    return runtime


def run_job(
    rt: Runtime, code: str, files: dict[str, bytes] | None = None, timeout: float | None = None, **kw: Any
) -> Result:
    job = make_job(code, list((files or {}).items()), timeout, limits=rt.config.limits)
    return asyncio.run(rt.cage.run(job, **kw))


@pytest.fixture
def run(cage_confirmed: Runtime):
    def _run(code: str, files: dict[str, bytes] | None = None, timeout: float | None = None, **kw: Any) -> Result:
        return run_job(cage_confirmed, code, files, timeout, **kw)

    return _run


def assert_serves(rt: Runtime) -> None:
    """The next ordinary job still runs: what every hostile case checks after its attack."""
    result = run_job(rt, "print(6 * 7)")
    assert result.ok, result
    assert result.stdout == "42\n"


# ---------------------------------------------------------------- a real daemon process


@dataclass
class DaemonProc:
    proc: subprocess.Popen
    ipc: str
    tcp: str
    config_path: Path
    log_path: Path

    def endpoint(self, kind: str) -> str:
        return self.ipc if kind == "ipc" else self.tcp

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 90) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_daemon(
    state_dir: Path, name: str, env_path: Path, *, extra_env: dict[str, str] | None = None,
    extra_args: tuple[str, ...] = (), wait: bool = True, own_session: bool = False, tcp: str | None = None,
    prefix: tuple[str, ...] = (), **settings: Any,
) -> DaemonProc:  # fmt: skip
    """Start ``python -m runnerd serve`` with its own config; wait until it answers ping.

    *own_session*: in a session (and process group) of its own, which a test may signal as a whole.
    *prefix*: a command it runs under (``nsenter --net=...``: it execs, so the pid is the daemon's).
    """
    from runnerd.client import Client
    from runnerd.errors import ClientError

    sock_dir = state_dir / f"{name}-sock"
    ipc = f"ipc://{sock_dir}/runnerd.sock"
    tcp = tcp or f"tcp://127.0.0.1:{free_port()}"  # a restarted daemon may keep its port
    lines = [
        f'state_dir = "{state_dir}"',
        f'env_path = "{env_path}"',
        f'bind = ["{ipc}", "{tcp}"]',
    ]
    limits = settings.pop("limits", {})
    for key, value in settings.items():
        lines.append(f"{key} = {value!r}" if not isinstance(value, str) else f'{key} = "{value}"')
    if limits:
        lines.append("[limits]")
        lines.extend(f"{k} = {v!r}" for k, v in limits.items())
    config_path = state_dir / f"{name}.toml"
    config_path.write_text("\n".join(lines) + "\n")
    log_path = state_dir / f"{name}.log"
    proc = subprocess.Popen(
        [*prefix, sys.executable, "-m", "runnerd", "--config", str(config_path), "serve", *extra_args],
        stdout=open(log_path, "wb"),
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env={**os.environ, CANARY_ENV: CANARY, **(extra_env or {})},
        start_new_session=own_session,
    )
    daemon = DaemonProc(proc, ipc, tcp, config_path, log_path)
    if not wait:
        return daemon
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the daemon exited with {proc.returncode}:\n{daemon.log()}")
        try:
            with Client(ipc) as c:
                c.ping(timeout=1)
            return daemon
        except ClientError:
            time.sleep(0.1)
    daemon.stop()
    pytest.fail(f"the daemon did not answer ping within 60 s:\n{daemon.log()}")


@pytest.fixture(scope="session")
def daemon(cage_confirmed: Runtime, state_dir: Path) -> Iterator[DaemonProc]:
    d = start_daemon(state_dir, "main", cage_confirmed.config.sandbox_env, concurrency=2, queue_size=64)
    yield d
    assert d.stop() == 0, d.log()


@pytest.fixture(params=["ipc", "tcp"])
def endpoint(request, daemon: DaemonProc) -> str:
    return daemon.endpoint(request.param)


@pytest.fixture(scope="session")
def warm_daemon(cage_confirmed: Runtime, state_dir: Path) -> Iterator[DaemonProc]:
    """A daemon in warm mode (its start-up probe runs through the zygotes)."""
    d = start_daemon(state_dir, "warm", cage_confirmed.config.sandbox_env, concurrency=2, queue_size=64, mode="warm")
    yield d
    assert d.stop() == 0, d.log()


@pytest.fixture(params=["cold", "warm"])
def any_daemon(request) -> DaemonProc:
    """Each test using it runs against a cold and against a warm daemon."""
    return request.getfixturevalue("daemon" if request.param == "cold" else "warm_daemon")


@pytest.fixture(scope="session")
def canary_files(state_dir: Path) -> Iterator[list[Path]]:
    """Host files holding CANARY, readable by anyone on the host: no job may read them."""
    paths = [
        Path("/etc/runnerd-test-canary"),
        Path("/root/runnerd-test-canary"),
        Path("/tmp/runnerd-test-canary"),
        Path("/var/lib/runnerd-test-canary"),
        state_dir / "canary",
    ]
    for p in paths:
        p.write_text(CANARY + "\n")
        p.chmod(0o644)
    yield paths
    for p in paths:
        p.unlink(missing_ok=True)


def jailed_processes(config: Config) -> list[int]:
    """Host pids running as a jailed uid of any instance's range from *config*'s uid_base."""
    import psutil

    from runnerd.config import UID_RANGE_SIZE, UID_RANGES

    low, high = config.uid_base, config.uid_base + UID_RANGES * UID_RANGE_SIZE
    found = []
    for proc in psutil.process_iter(["uids"]):
        uids = proc.info.get("uids")
        if uids and any(low <= u < high for u in uids):
            found.append(proc.pid)
    return found


def _procs(cg) -> list[int]:
    try:
        return cg.procs()
    except Exception:
        return []


def _ppid(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("PPid:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def leftovers(config: Config) -> dict[str, list[str]]:
    """What jobs left behind on the host: processes, cgroups, mounts, job dirs.

    A warm pool's standing state is not a leftover: each zygote (its cgroup,
    its processes, its spool mount) and its armed next child (a job cgroup
    holding only G and U, G a child of the zygote).
    """
    from runnerd.sandbox.cgroup_detect import detect
    from runnerd.sandbox.host import HostState
    from runnerd.sandbox.workspace import mounted_job_dirs

    standing_pids: set[int] = set()
    left_cgroups: list[str] = []
    cgroups = detect(config.cgroup_parent)
    # Only this state dir's: another session's (or a real daemon's) are not ours to judge.
    groups = cgroups.existing(HostState(config, cgroups).job_prefix)
    zygote_pids: set[int] = set()
    for cg in groups:
        if "-zygote" in cg.name:
            pids = _procs(cg)
            standing_pids.update(pids)
            zygote_pids.update(pids)
    for cg in groups:
        if "-zygote" in cg.name:
            continue
        pids = _procs(cg)
        armed = 1 <= len(pids) <= 2 and all(_ppid(p) in zygote_pids or _ppid(p) in pids for p in pids)
        if armed:
            standing_pids.update(pids)
        else:
            left_cgroups.append(cg.name)
    jobs_dir = config.jobs_dir
    spools = [d for d in (jobs_dir.iterdir() if jobs_dir.exists() else []) if "-zygote" in d.name]
    left_dirs = [p.name for p in (jobs_dir.iterdir() if jobs_dir.exists() else []) if "-zygote" not in p.name]
    for spool in spools:
        left_dirs += [f"{spool.name}/{e.name}" for e in spool.iterdir() if e.name != ".main.py"]
    return {
        "processes": [str(p) for p in jailed_processes(config) if p not in standing_pids],
        "cgroups": sorted(left_cgroups),
        "mounts": [str(p) for p in mounted_job_dirs(jobs_dir) if "-zygote" not in p.name],
        "job dirs": sorted(left_dirs),
    }


def describe_pids(pids: list[str]) -> str:
    """State, parent and cgroups of host pids, for a failure message."""
    out = []
    for pid in pids:
        try:
            status = dict(
                line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line
            )
            groups = [
                ln for ln in Path(f"/proc/{pid}/cgroup").read_text().splitlines() if "memory" in ln or "pids" in ln
            ]
            out.append(f"{pid}: {status['State'].strip()} ppid {status['PPid'].strip()} {groups}")
        except OSError:
            out.append(f"{pid}: gone")
    return "; ".join(out)


def wait_clean(config: Config, timeout: float = 5.0) -> dict[str, list[str]]:
    deadline = time.monotonic() + timeout
    while True:
        left = leftovers(config)
        if not any(left.values()) or time.monotonic() > deadline:
            return left
        time.sleep(0.05)
