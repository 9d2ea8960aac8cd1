"""Running as a service: sd_notify, signals, reload, logs, metrics, the unit and the install."""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from runnerd.client import Client
from runnerd.errors import ClientError, RemoteError
from runnerd.result import Outcome, Reason

from .conftest import DaemonProc, free_port, start_daemon

ROOT = Path(__file__).resolve().parent.parent


def _wait_log(d: DaemonProc, pattern: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = d.log()
        if re.search(pattern, log):
            return log
        if d.proc.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(f"{pattern!r} not in the log:\n{d.log()}")


def test_sd_notify_ready_status_watchdog_reload_stopping(cage_confirmed, state_dir):
    path = state_dir / f"notify-{uuid.uuid4().hex[:6]}.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(path))
    listener.settimeout(60)
    d = start_daemon(state_dir, "notify", cage_confirmed.config.sandbox_env, wait=False,
                     extra_env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "1000000"})  # fmt: skip
    try:
        messages: list[str] = []

        def receive_until(key: str) -> str:
            while True:
                msg = listener.recv(4096).decode()
                messages.append(msg)
                if key in msg.split("\n"):
                    return msg

        ready = receive_until("READY=1")
        # READY means serving: a ping answers at once
        with Client(d.ipc) as c:
            assert c.ping(timeout=2)["pid"] == d.proc.pid
        assert f"MAINPID={d.proc.pid}" in ready and "STATUS=0/" in ready
        assert not any("READY=1" in m for m in messages[:-1])
        t0 = time.monotonic()
        pings = 0
        while pings < 2:
            pings += "WATCHDOG=1" in listener.recv(4096).decode()
        assert time.monotonic() - t0 < 3  # every half of WatchdogSec
        d.proc.send_signal(signal.SIGHUP)
        reload_msgs = [receive_until("RELOADING=1"), receive_until("READY=1")]
        assert "MONOTONIC_USEC=" in reload_msgs[0]
        d.proc.send_signal(signal.SIGTERM)
        stopping = receive_until("STOPPING=1")
        assert "STATUS=draining, then stopping" in stopping
        assert d.proc.wait(timeout=30) == 0
    finally:
        listener.close()
        d.stop()


def test_sigterm_with_running_and_queued_jobs(cage_confirmed, state_dir):
    d = start_daemon(state_dir, "term", cage_confirmed.config.sandbox_env, concurrency=4, queue_size=8,
                     shutdown_grace_s=3.0)  # fmt: skip
    outcomes: dict[str, object] = {}
    codes = {"short-0": 1, "short-1": 1, "long-0": 30, "long-1": 30, "queued-0": 1, "queued-1": 1}

    def submit(name: str) -> None:
        try:
            with Client(d.ipc) as c:
                outcomes[name] = c.run(
                    f"import time\nprint('{name}', flush=True)\ntime.sleep({codes[name]})", timeout=30, wait=60
                )
        except (RemoteError, ClientError) as exc:
            outcomes[name] = exc

    try:
        threads = {n: threading.Thread(target=submit, args=(n,)) for n in codes}
        for n in ("short-0", "short-1", "long-0", "long-1"):
            threads[n].start()
        with Client(d.tcp) as c:
            deadline = time.monotonic() + 20
            while c.stats()["running"] < 4 and time.monotonic() < deadline:
                time.sleep(0.05)
            for n in ("queued-0", "queued-1"):
                threads[n].start()
            while c.stats()["queued"] < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
        t0 = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        # once it says it drains, a new run is refused at once, for another daemon to take
        with Client(d.tcp) as c:
            while c.ping()["state"] != "draining":
                assert time.monotonic() - t0 < 10, "ping never said draining"
            with pytest.raises(RemoteError) as info:
                c.run("print(1)")
        assert info.value.code == "DRAINING" and "draining" in info.value.message
        assert d.proc.wait(timeout=30) == 0
        assert time.monotonic() - t0 < 3.0 + 3.0  # the grace time, plus the flush
        for t in threads.values():
            t.join(timeout=30)
        for n in ("short-0", "short-1"):
            assert outcomes[n].ok and outcomes[n].stdout == f"{n}\n"
        for n in ("long-0", "long-1"):
            assert outcomes[n].outcome is Outcome.FAILED and outcomes[n].reason is Reason.SHUTDOWN
            assert outcomes[n].stdout == f"{n}\n"  # partial output kept
        for n in ("queued-0", "queued-1"):
            assert isinstance(outcomes[n], RemoteError) and outcomes[n].code == "DRAINING"
            assert "was queued and did not run" in outcomes[n].message
        log = d.log()
        assert "queued job(s) refused" in log and "runnerd stopped" in log
    finally:
        d.stop()


def _write_config(d: DaemonProc, env: Path, state_dir: Path, limits: str) -> None:
    text = d.config_path.read_text().split("[limits]")[0]
    d.config_path.write_text(text + "[limits]\n" + limits)


def test_sighup_applies_a_changed_limit_to_the_next_job_only(cage_confirmed, state_dir):
    env = cage_confirmed.config.sandbox_env
    d = start_daemon(state_dir, "hup", env, limits={"max_timeout": 10.0, "default_timeout": 10.0})
    try:
        out: dict[str, object] = {}

        def first() -> None:
            with Client(d.ipc) as c:
                out["a"] = c.run("import time\ntime.sleep(2.5)\nprint('A done')")

        t = threading.Thread(target=first)
        t.start()
        with Client(d.tcp) as c:
            while c.stats()["running"] < 1:
                time.sleep(0.05)
        _write_config(d, env, state_dir, "max_timeout = 1.0\ndefault_timeout = 1.0\n")
        d.proc.send_signal(signal.SIGHUP)
        _wait_log(d, r"reloaded: concurrency")
        t.join(timeout=30)
        assert out["a"].ok and out["a"].stdout == "A done\n"  # started under the old limit
        with Client(d.ipc) as c:
            b = c.run("import time\ntime.sleep(2.5)\nprint('B done')", timeout=10)
        assert b.outcome is Outcome.DEADLINE_EXCEEDED and b.usage.wall_s < 2.0  # the new limit
    finally:
        assert d.stop() == 0, d.log()


def test_sighup_with_a_broken_config_keeps_the_old_one(cage_confirmed, state_dir):
    env = cage_confirmed.config.sandbox_env
    d = start_daemon(state_dir, "badhup", env, limits={"max_timeout": 10.0, "default_timeout": 10.0})
    try:
        _write_config(d, env, state_dir, "max_timeout = 1.0\nmax_timeuot = 3\n")
        d.proc.send_signal(signal.SIGHUP)
        log = _wait_log(d, r"reload refused")
        assert "limits.max_timeuot: unknown key" in log
        with Client(d.ipc) as c:
            r = c.run("import time\ntime.sleep(1.5)\nprint('old limits')", timeout=10)
        assert r.ok and r.stdout == "old limits\n"
        assert d.proc.poll() is None
    finally:
        assert d.stop() == 0, d.log()


def test_invalid_config_key_stops_serve_with_the_key_named(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('queue_size = "many"\n')
    proc = subprocess.run([sys.executable, "-m", "runnerd", "--config", str(cfg), "serve"],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 2 and "queue_size: expected an integer" in proc.stderr


def test_json_logs_and_prometheus_metrics(cage_confirmed, state_dir):
    port = free_port()
    d = start_daemon(state_dir, "metrics", cage_confirmed.config.sandbox_env, extra_args=("--log-json",),
                     metrics_port=port)  # fmt: skip
    try:
        with Client(d.ipc) as c:
            assert c.run("print(1)").ok
            assert c.run("raise KeyError('k')").reason is Reason.EXCEPTION
        with pytest.raises(RemoteError, match="BAD_REQUEST"), Client(d.tcp) as c:
            c.run(42)  # type: ignore[arg-type]  # a BAD_REQUEST to count
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        assert 'runnerd_jobs_total{outcome="OUTCOME_OK",reason="none"} 1.0' in body
        assert 'runnerd_jobs_total{outcome="OUTCOME_FAILED",reason="exception"} 1.0' in body
        assert 'runnerd_request_errors_total{code="BAD_REQUEST"} 1.0' in body
        assert "runnerd_jobs_running 0.0" in body and "runnerd_job_run_seconds_count 2.0" in body
    finally:
        assert d.stop() == 0
    records = [json.loads(line) for line in d.log().splitlines() if line.strip()]
    jobs = [r for r in records if "job" in r]
    assert len(jobs) == 2 and {j["job"]["outcome"] for j in jobs} == {"OUTCOME_OK", "OUTCOME_FAILED"}
    assert {"id", "reason", "wall_s", "cpu_s", "peak_bytes"} <= set(jobs[0]["job"])
    events = [r["event"] for r in records if "event" in r]
    assert events[:2] == ["starting", "ready"] and events[-1] == "stopped"


def test_the_unit_passes_systemd_analyze(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is missing: bootstrap.sh installs Debian's systemd package for the tests")
    unit = (ROOT / "systemd" / "runnerd.service").read_text()
    assert "Type=notify" in unit and "Delegate=yes" in unit and "WatchdogSec=" in unit
    # verify checks that ExecStart exists: point it at this checkout's runnerd
    runnerd = Path(sys.executable).with_name("runnerd")
    copy = tmp_path / "runnerd.service"
    copy.write_text(unit.replace("/usr/local/bin/runnerd", str(runnerd)))
    proc = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr
    sec = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(copy)], capture_output=True, text=True, timeout=60
    )
    score = float(re.search(r"Overall exposure level for .*: ([0-9.]+)", sec.stdout).group(1))
    print(f"\nsystemd-analyze security: exposure {score}")
    assert score <= 5.0


def test_install_is_safe_to_run_twice(tmp_path):
    root = tmp_path / "root"
    cmd = [sys.executable, "-m", "runnerd", "install", "--root", str(root), "--no-env"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr + first.stdout
    conf = root / "etc/runnerd/runnerd.toml"
    conf.write_text(conf.read_text().replace("# queue_size = 64", "queue_size = 5"))  # an operator's edit
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert "up to date" in second.stdout and "present, kept" in second.stdout
    assert "queue_size = 5" in conf.read_text()
    assert (root / "etc/systemd/system/runnerd.service").read_text() == (ROOT / "systemd/runnerd.service").read_text()
    assert Path(str(root / "usr/local/bin/runnerd")).is_symlink()
    installed = root / "opt/runnerd/venv/bin/runnerd"
    help_ = subprocess.run([str(installed), "--version"], capture_output=True, text=True, cwd=tmp_path)
    assert help_.returncode == 0 and help_.stdout.startswith("runnerd ")
    # the installed config parses, with the installed policy path
    check = subprocess.run(
        [str(root / "opt/runnerd/venv/bin/python"), "-c",
         f"from runnerd import config; c = config.load(__import__('pathlib').Path({str(conf)!r})); print(c.queue_size, c.policy)"],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert check.stdout.split() == ["5", "/etc/runnerd/policies/default.cfg"], check.stderr
    assert (root / "run/runnerd").stat().st_mode & 0o777 == 0o750
    # Every policy file (warm mode derives its zygotes' policy from default.kafel), in /etc and the venv's data.
    shipped = sorted(p.name for p in (ROOT / "policies").iterdir())
    assert shipped == ["default.cfg", "default.kafel"]
    assert sorted(p.name for p in (root / "etc/runnerd/policies").iterdir()) == shipped
    data = root / "opt/runnerd/venv/share/runnerd/policies"
    assert sorted(p.name for p in data.iterdir()) == shipped
