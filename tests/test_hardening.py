"""Hostile clients, authentication, and nothing left behind: through real daemon processes."""

from __future__ import annotations

import random
import signal
import stat
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import msgpack
import psutil
import pytest
import zmq

from runnerd.client import Client, curve_keys
from runnerd.errors import ClientError, RemoteError
from runnerd.result import Reason

from .conftest import leftovers, start_daemon, wait_clean

REPLY_TYPES = {"error", "pong", "stats", "cancelling", "accepted", "result", "stdout", "stderr"}
ERROR_CODES = {"BAD_REQUEST", "TOO_LARGE", "BUSY", "UNSUPPORTED_VERSION", "NOT_FOUND", "INTERNAL", "DRAINING"}


# ---------------------------------------------------------------- fuzzing


def _frames(rng: random.Random, n: int, max_request: int) -> list[tuple[list[bytes], bool]]:
    """(frames, expect_reply) pairs: random, truncated, mutated, mistyped, huge, deep, oversize."""
    pack = lambda m: msgpack.packb(m, use_bin_type=True)  # noqa: E731
    values = [
        None,
        True,
        1,
        -1,
        2**63,
        1.5,
        float("nan"),
        "",
        "x" * 300,
        b"bytes",
        [],
        {},
        [1, [2, [3]]],
        {"a": {"b": 1}},
    ]
    bases = [
        {"v": 1, "op": "ping", "id": "p1"},
        {"v": 1, "op": "stats", "id": "s1"},
        {"v": 1, "op": "cancel", "id": "nobody-here"},
        {"v": 1, "op": "run", "id": "r1", "code": "print(1)", "timeout": -1},
        {"v": 1, "op": "run", "id": "r2", "code": "print(1)", "files": [{"name": "../x", "data": b"1"}]},
        {"v": 1, "op": "run", "id": "r3", "code": "print(1)", "stream": "yes"},
    ]
    out: list[tuple[list[bytes], bool]] = []
    for i in range(n):
        kind = i % 10
        base = dict(rng.choice(bases))
        if kind == 0:  # random bytes
            out.append(([rng.randbytes(rng.randint(0, 200))], True))
        elif kind == 1:  # truncated valid msgpack
            data = pack(base)
            out.append(([data[: rng.randint(0, len(data) - 1)]], True))
        elif kind == 2:  # bit flips in a valid request
            data = bytearray(pack(base))
            for _ in range(rng.randint(1, 4)):
                pos = rng.randrange(len(data))
                data[pos] ^= 1 << rng.randrange(8)
            out.append(([bytes(data)], True))
        elif kind == 3:  # a field of the wrong type
            key = rng.choice(["v", "op", "id", "code", "files", "timeout", "stream"])
            base[key] = rng.choice(values)
            out.append(([pack(base)], True))
        elif kind == 4:  # huge declared lengths with little behind them
            header = rng.choice([b"\xdb", b"\xc6", b"\xdd", b"\xdf"]) + b"\xff\xff\xff\xff"
            out.append(([header + rng.randbytes(rng.randint(0, 64))], True))
        elif kind == 5:  # deep nesting
            depth = rng.choice([100, 600, 2000, 100_000])
            out.append(([b"\x91" * depth + b"\xc0"], True))
        elif kind == 6:  # not a map
            out.append(([pack(rng.choice([[1, 2], "str", 3, None, b"bin"]))], True))
        elif kind == 7:  # extra frames
            out.append(([pack(base)] * rng.randint(2, 4), True))
        elif kind == 8:  # a valid-looking run with bad fields
            base = {"v": 1, "op": "run", "id": f"f{i}", "code": rng.choice(values),
                    "files": rng.choice([[{"name": rng.choice(["", "a/b", "..", "\x00", "n" * 300]), "data": b""}], "x", [1]])}  # fmt: skip
            out.append(([pack(base)], True))
        else:  # unknown ops, fields and versions
            base[rng.choice(["op", "v", "zzz"])] = rng.choice(["exec", 2, "x", 0])
            out.append(([pack(base)], True))
    # A few frames over libzmq's max message size: the peer is disconnected, no reply.
    for _ in range(3):
        out.append(([b"\x00" * (max_request + 1)], False))
    return out


def test_fuzz_ten_thousand_frames(cage_confirmed, state_dir):
    limits = {"max_files_bytes": 1 << 20, "max_code_bytes": 256 << 10}
    d = start_daemon(state_dir, "fuzz", cage_confirmed.config.sandbox_env, concurrency=1, queue_size=4,
                     max_request_bytes=2 << 20, limits=limits)  # fmt: skip
    try:
        proc = psutil.Process(d.proc.pid)
        rng = random.Random(20261124)
        frames = _frames(rng, 10_000, 2 << 20)
        # warm up the allocator, then measure
        with Client(d.tcp) as c:
            c.ping()
        rss_before = proc.memory_info().rss
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(d.tcp)
        expected = sum(1 for _, reply in frames if reply)
        replies: list[dict] = []
        t0 = time.monotonic()
        for parts, reply in frames:
            if not reply:
                # an oversize frame drops this connection: use a throw-away socket for it
                s2 = ctx.socket(zmq.DEALER)
                s2.setsockopt(zmq.LINGER, 0)
                s2.connect(d.tcp)
                s2.send_multipart(parts)
                time.sleep(0.2)
                s2.close()
                continue
            sock.send_multipart(parts)
            while sock.poll(0):
                replies.append(msgpack.unpackb(sock.recv(), raw=False, strict_map_key=False))
        while len(replies) < expected and sock.poll(10_000):
            replies.append(msgpack.unpackb(sock.recv(), raw=False, strict_map_key=False))
        elapsed = time.monotonic() - t0
        sock.close()
        rss_after = proc.memory_info().rss
        print(f"\nfuzz: {len(frames)} frames in {elapsed:.2f} s = {len(frames) / elapsed:.0f} frames/s; "
              f"RSS {rss_before / 2**20:.1f} -> {rss_after / 2**20:.1f} MiB")  # fmt: skip
        assert d.proc.poll() is None, d.log()
        assert len(replies) == expected
        for r in replies:
            assert isinstance(r, dict) and r.get("type") in REPLY_TYPES and r.get("v") == 1, r
            if r["type"] == "error":
                assert r["code"] in ERROR_CODES and r["code"] != "INTERNAL" and r["message"], r
        assert rss_after - rss_before < 32 << 20, (rss_before, rss_after)
        with Client(d.ipc) as c:
            assert c.run("print('still here')").stdout == "still here\n"
    finally:
        assert d.stop() == 0, d.log()


# ---------------------------------------------------------------- authentication


@pytest.fixture(scope="module")
def keys(state_dir):
    import zmq.auth

    root = state_dir / f"keys-{uuid.uuid4().hex[:6]}"
    clients = root / "clients"
    clients.mkdir(parents=True)
    zmq.auth.create_certificates(str(root), "server")
    zmq.auth.create_certificates(str(root), "alice")
    zmq.auth.create_certificates(str(root), "mallory")
    (clients / "alice.key").write_bytes((root / "alice.key").read_bytes())  # only alice's public key
    return root


def test_curve_on_tcp(cage_confirmed, state_dir, keys):
    d = start_daemon(state_dir, "curve", cage_confirmed.config.sandbox_env,
                     curve_server_key=str(keys / "server.key_secret"), curve_clients_dir=str(keys / "clients"))  # fmt: skip
    try:
        alice = curve_keys(keys / "alice.key_secret", keys / "server.key")
        with Client(d.tcp, curve=alice) as c:
            assert c.ping()["protocol"] == 1
            assert c.run("print('authorized')").stdout == "authorized\n"
        mallory = curve_keys(keys / "mallory.key_secret", keys / "server.key")
        with Client(d.tcp, curve=mallory) as c, pytest.raises(ClientError, match="no answer"):
            c.ping(timeout=2)
        with Client(d.tcp) as c, pytest.raises(ClientError, match="no answer"):  # no CURVE at all
            c.ping(timeout=2)
        with Client(d.ipc) as c:  # ipc: guarded by the directory, not by keys
            assert c.ping()["protocol"] == 1
        assert d.proc.poll() is None
    finally:
        assert d.stop() == 0, d.log()


def test_curve_config_errors_are_named(state_dir, cage_confirmed, tmp_path):
    cfg = tmp_path / "r.toml"
    cfg.write_text(f'state_dir = "{state_dir}"\nenv_path = "{cage_confirmed.config.sandbox_env}"\n'
                   f'bind = ["tcp://127.0.0.1:1"]\ncurve_server_key = "{tmp_path}/missing.key_secret"\n')  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "runnerd", "--config", str(cfg), "serve"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2 and "curve_server_key and curve_clients_dir: set both" in proc.stderr


def test_ipc_directory_is_for_root_and_the_runnerd_group(daemon):
    sock_dir = Path(daemon.ipc[len("ipc://") :]).parent
    st = sock_dir.stat()
    assert st.st_uid == 0 and not st.st_mode & stat.S_IRWXO, oct(st.st_mode)
    code = (
        "import zmq, sys\ns = zmq.Context().socket(zmq.DEALER); s.setsockopt(zmq.LINGER, 0)\n"
        f"s.connect({daemon.ipc!r})\n"
        "s.send(b'\\x83\\xa1v\\x01\\xa2op\\xa4ping\\xa2id\\xa1x')\n"
        "sys.exit(0 if s.poll(2000) else 3)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], user=65534, group=65534, capture_output=True, timeout=30)
    assert proc.returncode == 3, proc.stderr  # nobody gets no answer: it cannot reach the socket
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30)
    assert proc.returncode == 0, proc.stderr  # root does


def test_second_daemon_on_a_tcp_endpoint_refuses(daemon, state_dir, cage_confirmed, tmp_path):
    cfg = tmp_path / "r.toml"
    cfg.write_text(
        f'state_dir = "{state_dir}"\nenv_path = "{cage_confirmed.config.sandbox_env}"\nbind = ["{daemon.tcp}"]\n'
    )
    proc = subprocess.run(
        [sys.executable, "-m", "runnerd", "--config", str(cfg), "serve"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2 and "already in use" in proc.stderr


# ---------------------------------------------------------------- nothing left behind


def test_no_leftovers_after_200_mixed_jobs(daemon, cage_confirmed):
    kinds = (["print(1)"] * 130 + ["raise ValueError(1)"] * 10 + ["import time\ntime.sleep(10)"] * 20
             + ["b'x' * (3 << 30)"] * 10 + ["CANCEL"] * 30)  # fmt: skip
    random.Random(7).shuffle(kinds)
    reasons: list[object] = []
    lock = threading.Lock()
    work = list(enumerate(kinds))

    def worker() -> None:
        with Client(daemon.ipc) as c, Client(daemon.tcp) as canceller:
            while True:
                with lock:
                    if not work:
                        return
                    i, kind = work.pop()
                if kind == "CANCEL":
                    job_id = f"cancel-{i}-{uuid.uuid4().hex}"
                    got: dict[str, object] = {}

                    def run(job_id=job_id, got=got) -> None:
                        with Client(daemon.ipc) as c2:
                            got["r"] = c2.run("import time\ntime.sleep(20)", job_id=job_id, wait=120)

                    t = threading.Thread(target=run)
                    t.start()
                    time.sleep(random.random() * 0.3)
                    for _ in range(50):
                        try:
                            canceller.cancel(job_id)
                            break
                        except RemoteError:  # not submitted yet
                            time.sleep(0.02)
                    t.join()
                    result = got["r"]
                else:
                    result = c.run(kind, timeout=0.6 if "sleep" in kind else 20, wait=120)
                with lock:
                    reasons.append(result.reason)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(reasons) == 200
    assert reasons.count(Reason.CANCELLED) == 30
    assert reasons.count(Reason.TIMEOUT) == 20
    assert reasons.count(Reason.MEMORY_LIMIT) == 10
    assert reasons.count(None) == 130
    left = wait_clean(cage_confirmed.config)
    assert left == {"processes": [], "cgroups": [], "mounts": [], "job dirs": []}, left


def test_start_up_sweeps_what_a_crash_left(cage_confirmed):
    """SIGKILL a daemon with jobs running; the next one on the same state dir cleans up."""
    from runnerd.config import Config

    state = Path(f"/var/lib/runnerd-tests/crash-{uuid.uuid4().hex[:6]}")
    state.mkdir(mode=0o755)
    env = cage_confirmed.config.sandbox_env
    config = Config(state_dir=state, env_path=env)
    try:
        d = start_daemon(state, "crash", env, concurrency=2)
        results: list[object] = []

        def run() -> None:
            try:
                with Client(d.ipc) as c:
                    results.append(c.run("import time\ntime.sleep(25)", timeout=25, wait=5))
            except ClientError as exc:
                results.append(exc)

        threads = [threading.Thread(target=run) for _ in range(2)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 20
        # Both jobs running: each has its mount and its cgroup (made one after the other).
        while time.monotonic() < deadline:
            now = leftovers(config)
            if len(now["mounts"]) >= 2 and len(now["cgroups"]) >= 2:
                break
            time.sleep(0.05)
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait()
        left = leftovers(config)
        assert len(left["mounts"]) == 2 and len(left["job dirs"]) == 2 and len(left["cgroups"]) >= 2
        assert left["processes"], "the orphaned cages should still be running"
        d2 = start_daemon(state, "crash2", env, concurrency=2)
        try:
            assert "swept" in d2.log()
            mine = leftovers(config)
            assert mine["mounts"] == [] and mine["job dirs"] == []
            with Client(d2.ipc) as c:
                assert c.run("print('after the crash')").ok
        finally:
            assert d2.stop() == 0, d2.log()
        for t in threads:
            t.join()
        assert all(isinstance(r, ClientError) for r in results)
        assert wait_clean(config) == {"processes": [], "cgroups": [], "mounts": [], "job dirs": []}
    finally:
        import shutil

        from runnerd.sandbox.cgroup_detect import detect
        from runnerd.sandbox.host import HostState
        from runnerd.sandbox.workspace import sweep

        # Even when an assertion failed above: no mounts or cgroups left behind.
        HostState(config, detect(config.cgroup_parent)).sweep()
        sweep(state / "jobs")
        shutil.rmtree(state, ignore_errors=True)


def test_cgroup_parents_go_with_the_process_that_made_them(cage_confirmed):
    """`runnerd check` and a stopped daemon leave no parent cgroup behind; one in use stays."""
    from runnerd.sandbox.cgroup_detect import detect
    from runnerd.sandbox.cgroup_v1 import CgroupsV1
    from runnerd.sandbox.cgroups import CgroupLimits

    parent = f"runnerd-release-{uuid.uuid4().hex[:6]}"
    first, second = detect(parent), detect(parent)

    def dirs() -> list[Path]:
        return list(first._parents().values()) if isinstance(first, CgroupsV1) else [first.parent]  # type: ignore[attr-defined]

    first.prepare()
    assert all(d.is_dir() for d in dirs())
    second.prepare()  # found, not made: this one never removes them
    job = first.create("job-release", CgroupLimits(64 << 20, 8, 100))
    first.release()  # a job cgroup is inside: kept
    assert all(d.is_dir() for d in dirs())
    assert job.remove()
    second.release()
    assert all(d.is_dir() for d in dirs())
    first.release()
    assert not any(d.exists() for d in dirs())
    # A job cgroup made after a release (a `runnerd check` beside a daemon) makes its parents again.
    job = second.create("job-release-2", CgroupLimits(64 << 20, 8, 100))
    assert job.remove()
    second.release()
    assert not any(d.exists() for d in dirs())


def test_check_leaves_no_cgroup_behind(cage_confirmed, tmp_path):
    parent = f"runnerd-check-{uuid.uuid4().hex[:6]}"
    conf = tmp_path / "r.toml"
    conf.write_text(
        f'cgroup_parent = "{parent}"\nenv_path = "{cage_confirmed.config.sandbox_env}"\n'
        f'state_dir = "{cage_confirmed.config.state_dir}"\n'
    )
    proc = subprocess.run(
        [sys.executable, "-m", "runnerd", "--config", str(conf), "check"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ok   library set" in proc.stdout
    assert not list(Path("/sys/fs/cgroup").glob(f"**/{parent}")), "check left its cgroup parent behind"


# What systemd's PrivateDevices=yes leaves a service: a tmpfs /dev holding a few
# device nodes and the /dev/fd link, mounted read-only (nosuid, noexec).
PRIVATE_DEVICES = """set -e
mount -t tmpfs -o nosuid,noexec,mode=755 tmpfs /dev
for d in null:1:3 zero:1:5 full:1:7 random:1:8 urandom:1:9; do
    name=${d%%:*}; nums=${d#*:}; mknod -m 666 /dev/$name c ${nums%%:*} ${nums#*:}
done
ln -s /proc/self/fd /dev/fd
mount -o remount,bind,ro,nosuid,noexec /dev
exec "$@"
"""


def test_jobs_run_under_a_read_only_dev(cage_confirmed, tmp_path):
    """The shipped policy's device binds work when the host's /dev is read-only (PrivateDevices=yes)."""
    job = tmp_path / "job.py"
    job.write_text(
        "import os\nwith open('/dev/null', 'w') as f: f.write('x')\n"
        "print('devices ok', len(os.urandom(8)), open('/dev/zero', 'rb').read(2))\n"
    )
    conf = tmp_path / "r.toml"
    conf.write_text(
        f'env_path = "{cage_confirmed.config.sandbox_env}"\nstate_dir = "{cage_confirmed.config.state_dir}"\n'
    )
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", PRIVATE_DEVICES, "sh",
         sys.executable, "-m", "runnerd", "--config", str(conf), "run", str(job), "--timeout", "20"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "devices ok 8 b'\\x00\\x00'" in proc.stdout
