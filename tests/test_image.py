"""Issue 18: the container image, run under podman with exactly what deploy/kubernetes grants a pod.

The image is ``./bootstrap.sh image``'s (deploy/image.py; built once, then
cached until its inputs change). Each mode (cold, warm) starts one container
the way the DaemonSet starts a pod: its args, its securityContext turned
into podman's flags (:func:`podman_flags`: anything it grants that podman
cannot be given fails the test, so nothing is quietly left out), its memory
limit, and its volumes at their mount paths: the ConfigMap's runnerd.toml
(with this mode), a CURVE server key and a client's public key, the state
dir, the socket dir. A client reaches it over tcp with CURVE, as a fleet
client reaches a pod; the probes are the manifest's own commands, run with
``podman exec``.

Steps, each asserted, as a table (run with ``-s``): the startup and
readiness probes; the cage confirmed (a private pid namespace, the jailed
uid) before anything hostile; a print job; a figure; a memory bomb; a fork
bomb, then a job; a session keeping state; SIGTERM (as the kubelet sends it,
``podman kill --signal=SIGTERM``), while a job runs whose cgroups are seen
inside the container's: the readiness probe fails saying ``draining``, the
job finishes, new work gets DRAINING, runnerd exits 0 within the grace
period; then no cgroup of the daemon's is left on the host.
"""

from __future__ import annotations

import resource
import shutil
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq.auth

from runnerd.client import Client, curve_keys
from runnerd.errors import RemoteError
from runnerd.result import Outcome, Reason
from runnerd.sandbox.host import state_tag

from .test_manifests import ROOT, manifests, quantity

PORT = 17700  # on the host's loopback, to the container's runnerd port
# The OCI runtime Kubernetes' containerd uses by default (crun also refuses this machine's hybrid cgroups).
RUNTIME = "--runtime=runc"
NPROC = 32768
UID_BASE = 6_000_000
DRAIN_JOB_S = 15  # the job that runs while the container drains


def podman_flags(security: dict[str, Any]) -> list[str]:
    """podman's flags for a container securityContext; ValueError for what this cannot give podman."""
    flags: list[str] = []
    for key, value in security.items():
        if key == "privileged":
            flags += ["--privileged"] if value else []
        elif key == "capabilities":
            flags += [f"--cap-add={c}" for c in value.get("add", [])]
            flags += [f"--cap-drop={c}" for c in value.get("drop", [])]
        elif key == "seccompProfile" and value == {"type": "Unconfined"}:
            flags += ["--security-opt=seccomp=unconfined"]
        elif key == "appArmorProfile" and value == {"type": "Unconfined"}:
            flags += ["--security-opt=apparmor=unconfined"]
        elif key == "procMount" and value == "Unmasked":
            flags += ["--security-opt=unmask=ALL"]
        elif key == "allowPrivilegeEscalation":
            flags += [] if value else ["--security-opt=no-new-privileges"]
        elif key == "readOnlyRootFilesystem":
            flags += ["--read-only"] if value else []
        else:
            raise ValueError(f"securityContext.{key}: {value!r} has no podman flag here; the test cannot grant it")
    return flags


def cfg_state_dir() -> str:
    return str(tomllib.loads(manifests()["ConfigMap"]["data"]["runnerd.toml"])["state_dir"])


def ulimits() -> list[str]:
    """podman's default limits (1,048,576 files, 4,194,304 processes) are more than a runtime without
    CAP_SYS_RESOURCE may set (as on this machine); a node's container runtime sets its own."""
    files = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return [f"--ulimit=nofile={files}:{files}", f"--ulimit=nproc={NPROC}:{NPROC}"]


def pod() -> tuple[dict[str, Any], dict[str, Any]]:
    spec = manifests()["DaemonSet"]["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    return spec, container


class Steps:
    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.rows: list[tuple[str, float, str]] = []

    def run(self, name: str, fn) -> None:  # type: ignore[no-untyped-def]
        t = time.monotonic()
        try:
            note = fn()
        except BaseException as exc:
            self.rows.append((f"FAIL {name}", time.monotonic() - t, f"{type(exc).__name__}: {exc}"[:300]))
            self.print()
            raise
        self.rows.append((name, time.monotonic() - t, str(note)))

    def print(self) -> None:
        print(f"\n## {self.mode} mode, under podman with the DaemonSet's securityContext")
        for name, took, note in self.rows:
            print(f"{name:44} {took:6.1f} s  {note}")


class Container:
    """One container, started as the DaemonSet starts its pod."""

    def __init__(self, image: str, mode: str, work: Path) -> None:
        spec, container = pod()
        self.name = f"runnerd-image-test-{mode}"
        self.mode = mode
        self.container = container
        subprocess.run(["podman", "rm", "-f", "-t", "0", self.name], capture_output=True)
        volumes = {v["name"]: v for v in spec["volumes"]}
        # The ConfigMap's runnerd.toml, this mode, two slots (this machine's CPUs).
        text = manifests()["ConfigMap"]["data"]["runnerd.toml"]
        text = text.replace('mode = "warm"', f'mode = "{mode}"').replace("concurrency = 4", "concurrency = 2")
        # The pod's uid-range registry is its own (/run/runnerd, an emptyDir): on this machine, whose tests run
        # daemons beside it, its cages take uids no daemon of the host's registry leases.
        text += f"uid_base = {UID_BASE}\n"
        (work / "config").mkdir()
        (work / "config" / "runnerd.toml").write_text(text)
        # The Secret (the server's key) and the clients' ConfigMap (a client's public key).
        zmq.auth.create_certificates(str(work), "server")
        zmq.auth.create_certificates(str(work), "client")
        (work / "curve").mkdir()
        shutil.copy(work / "server.key_secret", work / "curve" / "server.key_secret")
        (work / "clients").mkdir()
        shutil.copy(work / "client.key", work / "clients" / "client.key")
        self.curve = curve_keys(work / "client.key_secret", work / "server.key")
        (work / "state").mkdir()
        argv = ["podman", "run", "-d", f"--name={self.name}", RUNTIME, *podman_flags(container["securityContext"])]
        argv += ulimits()
        limits = container["resources"]["limits"]
        memory = quantity(limits["memory"])
        argv += [f"--memory={memory}", f"--memory-swap={memory}"]  # no swap, as on a node
        for mount in container["volumeMounts"]:
            volume, path = volumes[mount["name"]], mount["mountPath"]
            if volume.get("emptyDir", {}).get("medium") == "Memory":
                argv += [f"--tmpfs={path}:size={quantity(volume['emptyDir']['sizeLimit'])}"]
            else:  # a ConfigMap's or a Secret's files, or an emptyDir on disk: a folder of the test's
                source = work / ("state" if "emptyDir" in volume else mount["name"])
                argv += [f"--volume={source}:{path}{':ro' if mount.get('readOnly') else ''}"]
        argv += [f"--publish=127.0.0.1:{PORT}:{container['ports'][0]['containerPort']}", image, *container["args"]]
        self.argv = argv
        out = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        self.endpoint = f"tcp://127.0.0.1:{PORT}"

    def probe(self, which: str) -> subprocess.CompletedProcess[str]:
        command = self.container[which]["exec"]["command"]
        timeout = self.container[which]["timeoutSeconds"]
        return subprocess.run(["podman", "exec", self.name, *command], capture_output=True, text=True, timeout=timeout)

    def says_draining(self) -> bool:
        """The readiness probe fails, and says why: the daemon drains."""
        try:
            r = self.probe("readinessProbe")
        except subprocess.TimeoutExpired:
            return False
        return r.returncode == 1 and ": draining," in r.stdout

    def client(self) -> Client:
        return Client(self.endpoint, curve=self.curve)

    def running(self) -> bool:
        state = subprocess.run(
            ["podman", "inspect", "-f", "{{.State.Running}}", self.name], capture_output=True, text=True
        )
        return state.stdout.strip() == "true"

    def logs(self) -> str:
        return subprocess.run(["podman", "logs", self.name], capture_output=True, text=True).stdout[-3000:]

    def remove(self) -> None:
        subprocess.run(["podman", "rm", "-f", "-t", "0", self.name], capture_output=True)


@pytest.fixture(scope="module")
def image() -> str:
    """``./bootstrap.sh image``'s image (its last line names it): built once, cached until its inputs change."""
    out = subprocess.run([sys.executable, "-m", "deploy.image"], cwd=ROOT, capture_output=True, text=True, timeout=3600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    print(out.stdout)
    return out.stdout.strip().splitlines()[-1]


@pytest.fixture
def container(image: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Container]:
    c = Container(image, request.param, tmp_path)
    try:
        yield c
    finally:
        c.remove()


@pytest.mark.parametrize("container", ["cold", "warm"], indirect=True)
def test_the_image_under_the_pods_privileges(container: Container) -> None:
    c = container
    steps = Steps(c.mode)
    spec = c.container

    def started() -> str:
        probe = spec["startupProbe"]
        deadline = time.monotonic() + probe["periodSeconds"] * probe["failureThreshold"]
        while time.monotonic() < deadline:
            r = c.probe("startupProbe")
            if r.returncode == 0:
                return r.stdout.strip()[:120]
            assert c.running(), f"the container stopped:\n{c.logs()}"
            time.sleep(probe["periodSeconds"] / 5)  # the kubelet's cadence, faster: polling the probe, not a wait
        raise AssertionError(f"the startup probe never passed:\n{c.logs()}")

    def ready() -> str:
        r = c.probe("readinessProbe")
        assert r.returncode == 0, r
        return r.stdout.strip()[:120]

    with c.client() as cl:

        def cage() -> str:
            r = cl.run("import os\nprint(os.getpid(), os.getuid(), len(os.listdir('/proc')))", timeout=30)
            assert r.outcome is Outcome.OK, (r.outcome, r.stderr)
            pid, uid, _ = (int(x) for x in r.stdout.split())
            assert pid < 10 and uid == 1000, r.stdout  # a pid namespace of its own, the jailed uid
            return f"pid {pid}, uid {uid} in the cage"

        def print_job() -> str:
            r = cl.run("print(6 * 7)", timeout=30)
            assert r.outcome is Outcome.OK and r.stdout.strip() == "42", (r.outcome, r.stderr)
            return f"42 in {r.usage.wall_s:.2f} s"

        def figure() -> str:
            r = cl.run("import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nplt.show()", timeout=60)
            assert r.outcome is Outcome.OK and r.figures and r.figures[0].data.startswith(b"\x89PNG"), r.stderr
            return f"PNG {len(r.figures[0].data)} bytes"

        def memory_bomb() -> str:
            r = cl.run("b = []\nwhile True:\n    b.append(bytearray(64 << 20))", timeout=60)
            assert r.outcome is Outcome.FAILED and r.reason is Reason.MEMORY_LIMIT, (r.outcome, r.reason)
            return f"memory_limit, peak {r.usage.max_rss_bytes >> 20} MiB"

        def fork_bomb() -> str:
            code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
            r = cl.run(code, timeout=10)
            assert r.outcome in (Outcome.DEADLINE_EXCEEDED, Outcome.FAILED), (r.outcome, r.reason)
            after = cl.run("print('after')", timeout=30)
            assert after.outcome is Outcome.OK, (after.outcome, after.stderr)
            return f"{r.outcome.value} {r.reason}; the next job OK"

        def session() -> str:
            with cl.session() as s:
                s.run("x = 41")
                r = s.run("x + 1")
                assert r.value == "42", r
            return "x kept across runs; closed"

        def ours() -> list[Path]:
            """The host's cgroups of this daemon's jobs, zygotes and sessions (their names carry its tag)."""
            return [p for p in Path("/sys/fs/cgroup").glob(f"**/*{state_tag(Path(cfg_state_dir()))}*") if p.is_dir()]

        def nothing_left() -> str:
            left = ours()
            assert not left, left
            return "no cgroup of its jobs or sessions on the host (while a job ran, all were inside the container's)"

        def drain() -> str:
            box: dict[str, Any] = {}
            started = threading.Event()

            def sleeper() -> None:
                with c.client() as other:
                    code = f"print('up', flush=True)\nimport time\ntime.sleep({DRAIN_JOB_S})\nprint('done')"
                    for event in other.stream(code, timeout=DRAIN_JOB_S + 30):
                        started.set()
                        box["last"] = event

            th = threading.Thread(target=sleeper)
            th.start()
            assert started.wait(60)
            # While a job runs, its cgroups (and every other of this daemon's) are inside the container's.
            inside = subprocess.run(
                ["podman", "inspect", "-f", "{{.State.CgroupPath}}", c.name], capture_output=True, text=True
            ).stdout.strip("/\n")
            tagged = [str(p) for p in ours()]
            assert inside and tagged and all(f"/{inside}/" in p for p in tagged), (inside, tagged)
            # As the kubelet: SIGTERM, then the grace period (`podman stop` would refuse the probes' exec
            # meanwhile; a kubelet's runtime runs them until the container exits).
            grace = pod()[0]["terminationGracePeriodSeconds"]
            subprocess.run(["podman", "kill", "--signal=SIGTERM", c.name], check=True, capture_output=True)
            stop = subprocess.Popen(["podman", "wait", c.name], stdout=subprocess.DEVNULL)
            # The job outlasts the probes' own slowness (a podman exec takes seconds on a loaded machine).
            deadline = time.monotonic() + DRAIN_JOB_S - 3
            while not c.says_draining():  # the probe failing because the daemon said so, not for any reason
                assert time.monotonic() < deadline, f"not draining {DRAIN_JOB_S - 3} s after SIGTERM"
            try:
                cl.run("print(1)", timeout=10, wait=10)
                refused = "ran"
            except RemoteError as exc:
                refused = exc.code
            th.join(60)
            assert stop.wait(grace) == 0, "runnerd did not exit within the grace period"
            result = box["last"].result
            assert result.outcome is Outcome.OK and "done" in result.stdout, result
            assert refused == "DRAINING", refused
            code = subprocess.run(
                ["podman", "inspect", "-f", "{{.State.ExitCode}}", c.name], capture_output=True, text=True
            ).stdout.strip()
            assert code == "0", f"runnerd exited {code}:\n{c.logs()}"
            return f"readiness: draining; the running job finished; new work: {refused}; runnerd exit 0"

        for name, fn in (
            ("startup probe passes", started), ("readiness probe passes", ready),
            ("the cage confirmed (pid namespace, jailed uid)", cage), ("print job", print_job),
            ("Matplotlib figure (PNG back)", figure), ("memory bomb: memory_limit", memory_bomb),
            ("fork bomb: contained, next job runs", fork_bomb), ("session keeps state", session),
            ("SIGTERM: drains, exits", drain), ("nothing left on the host", nothing_left),
        ):  # fmt: skip
            if name.startswith(("memory bomb", "fork bomb")):
                assert steps.rows and steps.rows[2][0].startswith("the cage"), "hostile code only in a confirmed cage"
            steps.run(name, fn)
    steps.print()
