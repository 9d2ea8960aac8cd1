"""The ``runnerd`` command as a user types it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def runnerd(*args: str, config: Path, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "runnerd", "--config", str(config), *args],
        capture_output=True, text=True, cwd=cwd, timeout=120, env=env,
    )  # fmt: skip


@pytest.fixture
def cli_config(cage_confirmed, state_dir, tmp_path) -> Path:
    cfg = tmp_path / "runnerd.toml"
    cfg.write_text(f'state_dir = "{state_dir}"\nenv_path = "{cage_confirmed.config.sandbox_env}"\n')
    return cfg


@pytest.mark.parametrize(
    "code, exit_code, words",
    [
        ("print('fine')", 0, "OUTCOME_OK"),
        ("raise ValueError('nope')", 1, "error at line 1: ValueError: nope"),
        ("import sys; sys.exit(7)", 1, "OUTCOME_FAILED (exit)"),
        ("import time; time.sleep(30)", 124, "OUTCOME_DEADLINE_EXCEEDED (timeout)"),
    ],
)
def test_run_exit_codes(cli_config, tmp_path, code, exit_code, words):
    job = tmp_path / "job.py"
    job.write_text(code)
    proc = runnerd("run", str(job), "--timeout", "2", config=cli_config, cwd=tmp_path)
    assert proc.returncode == exit_code, proc.stderr
    assert words in proc.stderr


def test_run_demo_writes_the_figures(cli_config, tmp_path):
    out = tmp_path / "out"
    proc = runnerd(
        "run", str(EXAMPLES / "demo.py"), "--input", str(EXAMPLES / "sales.csv"), "--out", str(out),
        config=cli_config, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "Total sales by region:" in proc.stdout and "east     3746" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == ["figure_001.png", "sales_by_region.png"]
    assert (out / "figure_001.png").read_bytes().startswith(b"\x89PNG")


def test_run_bad_input_is_a_usage_error(cli_config, tmp_path):
    job = tmp_path / "job.py"
    job.write_text("print(1)")
    proc = runnerd("run", str(job), "--input", str(tmp_path / "missing.csv"), config=cli_config, cwd=tmp_path)
    assert proc.returncode == 2 and "cannot read input" in proc.stderr
    proc = runnerd("run", str(job), "--timeout", "-1", config=cli_config, cwd=tmp_path)
    assert proc.returncode == 2 and "timeout must be a positive number" in proc.stderr


@pytest.mark.parametrize("through_daemon", [False, True])
def test_two_inputs_with_one_name_are_refused(cli_config, tmp_path, daemon, through_daemon):
    job = tmp_path / "job.py"
    job.write_text("print(open('x.csv').read())")
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "x.csv").write_text(d)
    where = ["--endpoint", daemon.ipc] if through_daemon else []
    proc = runnerd("run", str(job), "--input", "a/x.csv", "--input", "b/x.csv", *where, config=cli_config, cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "inputs a/x.csv and b/x.csv have one name, 'x.csv'" in proc.stderr


def test_bad_config_key_stops_with_its_name(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[limits]\nmax_figurs = 3\n")
    proc = runnerd("check", config=cfg, cwd=tmp_path)
    assert proc.returncode == 2 and "limits.max_figurs: unknown key" in proc.stderr


def test_check_explains_every_line(cli_config, tmp_path):
    proc = runnerd("check", config=cli_config, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert all(line.startswith("ok   ") for line in lines)
    for name in ("nsjail", "cgroups", "sandbox env", "policy", "jailed user", "seccomp", "network", "x32 syscalls"):
        assert any(line.startswith(f"ok   {name}:") for line in lines), name


def test_run_through_a_daemon(daemon, tmp_path, cli_config):
    job = tmp_path / "job.py"
    job.write_text("import time\nfor i in range(3):\n    print(i, flush=True)\n    time.sleep(0.1)\n")
    proc = runnerd("run", str(job), "--endpoint", daemon.tcp, config=cli_config, cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout == "0\n1\n2\n"
    ping = runnerd("ping", "--endpoint", daemon.ipc, config=cli_config, cwd=tmp_path)
    assert ping.returncode == 0 and "protocol 1" in ping.stdout
    stats = runnerd("stats", "--endpoint", daemon.ipc, config=cli_config, cwd=tmp_path)
    assert stats.returncode == 0 and "latency   p50" in stats.stdout
