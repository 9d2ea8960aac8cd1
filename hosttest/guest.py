"""The host test's guest driver: runnerd as a user installs and runs it, on a stock systemd host.

Started by the guest image's runnerd-hosttest unit with Debian's python3
(stdlib only until the set-up has made a venv), it does what the README
says, as root in /root/runnerd: ``./bootstrap.sh setup``, ``runnerd
install``, ``systemctl start runnerd`` with the shipped unit, then jobs and
lifecycle events through the service, in cold mode and again in warm mode.

Each step has its own timeout and writes one line to OUT/steps.txt:
``ok   <name> (<seconds> s) <detail>`` or ``FAIL <name> (...) <why>``; a
failed step does not stop the others of its mode, a failed set-up stops
everything. The journal of each mode is saved as OUT/journal-<mode>.txt.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

CHECKOUT = Path("/root/runnerd")
SOCKET = "ipc:///run/runnerd/runnerd.sock"
UNIT = "runnerd.service"
CONFIG = Path("/etc/runnerd/runnerd.toml")
CGROUP_ROOT = Path("/sys/fs/cgroup")
# Where runnerd must not put anything under systemd (jobs outside the unit).
OUTSIDE = CGROUP_ROOT / "runnerd"
COPY_EXCLUDES = (".venv", ".git", "hosttest/out", "demo-out", "__pycache__", ".pytest_cache")
# [Service] keys of the unit that describe its sandbox (runnerd check runs
# under them); the rest are about the service's lifecycle, or would make a
# second owner of the service's directories.
LIFECYCLE_KEYS = {
    "Type", "NotifyAccess", "ExecStart", "ExecReload", "KillMode", "TimeoutStopSec", "TimeoutStartSec",
    "WatchdogSec", "Restart", "RestartSec", "RuntimeDirectory", "RuntimeDirectoryMode", "StateDirectory",
    "StateDirectoryMode", "ConfigurationDirectory", "ConfigurationDirectoryMode",
}  # fmt: skip


class StepFailed(Exception):
    pass


class Steps:
    def __init__(self, out: Path) -> None:
        self.file = open(out / "steps.txt", "a", buffering=1)
        self.failed = 0

    def line(self, text: str) -> None:
        print(text, flush=True)
        self.file.write(text + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def run(self, name: str, timeout: float, fn: Callable[[], str | None]) -> bool:
        """Run *fn* in a thread with a deadline; one ok/FAIL line. A step that overruns is reported and left."""
        started = time.monotonic()
        box: dict[str, Any] = {}

        def body() -> None:
            try:
                box["detail"] = fn() or ""
            except BaseException as exc:  # noqa: BLE001 - every failure is this step's line
                box["error"] = exc
                box["trace"] = traceback.format_exc()

        t = threading.Thread(target=body, daemon=True, name=name)
        t.start()
        t.join(timeout)
        took = time.monotonic() - started
        if t.is_alive():
            self.failed += 1
            self.line(f"FAIL {name} ({took:.1f} s) timed out after {timeout:.0f} s")
            return False
        if "error" in box:
            self.failed += 1
            exc = box["error"]
            why = str(exc) if isinstance(exc, StepFailed) else f"{type(exc).__name__}: {exc}"
            self.line(f"FAIL {name} ({took:.1f} s) {' '.join(why.split())[:600]}")
            if not isinstance(exc, StepFailed):
                print(box["trace"], file=sys.stderr, flush=True)
            return False
        self.line(f"ok   {name} ({took:.1f} s) {box['detail']}".rstrip())
        return True


def sh(argv: list[str], timeout: float = 120, check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise StepFailed(f"{' '.join(argv)} exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-800:]}")
    return proc


def expect(ok: bool, why: str) -> None:
    if not ok:
        raise StepFailed(why)


def wait_for(what: str, predicate: Callable[[], Any], timeout: float, every: float = 0.2) -> Any:
    """Poll *predicate* until it returns something true (an observed state, not a guess at timing)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise StepFailed(f"{what}: not seen within {timeout:.0f} s")
        time.sleep(every)


# ---------------------------------------------------------------- phase 1: set-up (stdlib only)


def setup_phase(args: argparse.Namespace, steps: Steps) -> bool:
    env = dict(os.environ, PIP_NO_INDEX="1", PIP_FIND_LINKS=str(args.wheels), HOME="/root")

    def copy() -> str:
        shutil.rmtree(CHECKOUT, ignore_errors=True)

        def ignore(directory: str, names: list[str]) -> list[str]:
            rel = Path(directory).relative_to(args.src)
            return [n for n in names if n in COPY_EXCLUDES or (rel / n).as_posix() in COPY_EXCLUDES]

        shutil.copytree(args.src, CHECKOUT, ignore=ignore, symlinks=True)
        return f"{sum(1 for _ in CHECKOUT.rglob('*'))} files"

    def bootstrap() -> str:
        with open(args.out / "setup.log", "w") as log:
            proc = subprocess.run(
                ["./bootstrap.sh", "setup"], cwd=CHECKOUT, env=env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, timeout=2400,
            )  # fmt: skip
        tail = (args.out / "setup.log").read_text()[-600:]
        expect(proc.returncode == 0, f"exit {proc.returncode}: {tail}")
        expect("installing Debian packages" not in (args.out / "setup.log").read_text(),
               "bootstrap wanted Debian packages the image does not have (the guest has no network)")  # fmt: skip
        return "ok: " + tail.strip().splitlines()[-1]

    def install() -> str:
        with open(args.out / "install.log", "w") as log:
            proc = subprocess.run([str(CHECKOUT / ".venv/bin/runnerd"), "install"], cwd=CHECKOUT, env=env, stdout=log,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=1800)  # fmt: skip
        expect(proc.returncode == 0, f"exit {proc.returncode}: {(args.out / 'install.log').read_text()[-600:]}")
        installed = Path("/etc/systemd/system") / UNIT
        expect(
            installed.read_bytes() == (CHECKOUT / "systemd" / UNIT).read_bytes(),
            "the installed unit differs from the shipped one",
        )
        policies = sorted(p.name for p in Path("/etc/runnerd/policies").iterdir())
        return f"unit as shipped; /etc/runnerd/policies: {', '.join(policies)}"

    def security() -> str:
        proc = sh(["systemd-analyze", "security", UNIT], check=False)
        m = re.search(r"Overall exposure level for \S+: ([0-9.]+) (\S+)", proc.stdout)
        expect(m is not None, f"no exposure level in: {proc.stdout[-300:]} {proc.stderr[-300:]}")
        assert m is not None
        (args.out / "security.txt").write_text(proc.stdout)
        return f"exposure {m.group(1)} {m.group(2)}"

    cgroup_fs = "cgroup2" if " /sys/fs/cgroup cgroup2 " in Path("/proc/self/mounts").read_text() else "not cgroup2"
    steps.line(f"## set-up (kernel {os.uname().release}, /sys/fs/cgroup is {cgroup_fs})")
    return (
        steps.run("copy the checkout", 300, copy)
        and steps.run("./bootstrap.sh setup", 2500, bootstrap)
        and steps.run("runnerd install", 1900, install)
        and steps.run("systemd-analyze security", 120, security)
    )


# ---------------------------------------------------------------- phase 2: the service (runnerd's venv)


class Service:
    def __init__(self, out: Path, mode: str) -> None:
        from runnerd.config import UID_RANGE_SIZE, UID_RANGES, Config

        self.out = out
        self.mode = mode
        self.uid_base = Config().uid_base
        self.uid_span = UID_RANGES * UID_RANGE_SIZE  # every instance's range
        self.unit_cgroup = CGROUP_ROOT / "system.slice" / UNIT

    # -- systemd

    def show(self, *props: str) -> dict[str, str]:
        proc = sh(["systemctl", "show", UNIT, *(f"--property={p}" for p in props)])
        return dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)

    def main_pid(self) -> int:
        return int(self.show("MainPID")["MainPID"])

    def journal(self, since: float) -> str:
        return sh(["journalctl", "-u", UNIT, "--since", f"@{since:.0f}", "-o", "short-precise", "--no-pager"]).stdout

    def wait_journal(self, pattern: str, since: float, timeout: float) -> str:
        def seen() -> str | None:
            m = re.search(pattern, self.journal(since))
            return m.group(0) if m else None

        return str(wait_for(f"journal line /{pattern}/", seen, timeout, every=1.0))

    def wait_active(self, timeout: float, not_pid: int = 0) -> int:
        def up() -> int:
            s = self.show("ActiveState", "SubState", "MainPID")
            pid = int(s["MainPID"])
            return pid if s["ActiveState"] == "active" and s["SubState"] == "running" and pid not in (0, not_pid) else 0

        return int(wait_for(f"{UNIT} active", up, timeout, every=0.5))

    # -- clients

    def client(self) -> Any:
        from runnerd.client import Client

        return Client(SOCKET)

    def run(self, code: str, **kw: Any) -> Any:
        with self.client() as c:
            return c.run(code, **kw)

    # -- cgroups and leftovers

    def job_cgroups(self) -> list[Path]:
        """Jobs', and sessions' (under their parent, whose memory.max is session_memory_budget)."""
        jobs = self.unit_cgroup / "jobs"
        return sorted(p for p in [*jobs.glob("job-*"), *jobs.glob("sessions-*/job-*")] if p.is_dir())

    def job_cgroup_files(self, *names: str) -> dict[Path, list[str]]:
        """Each job cgroup's named files, stripped; a cgroup that goes while it is read (a job or a zygote
        of a step before ending) is left out, not an error."""
        found: dict[Path, list[str]] = {}
        for cg in self.job_cgroups():
            try:
                found[cg] = [(cg / name).read_text().strip() for name in names]
            except FileNotFoundError:
                continue
        return found

    def processes(self) -> list[tuple[int, int, str, str]]:
        """(pid, uid, comm, cgroup) of every process."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                uid = int((entry / "status").read_text().split("\nUid:")[1].split()[0])
                comm = (entry / "comm").read_text().strip()
                cgroup = (entry / "cgroup").read_text().strip().split("::")[-1]
            except (OSError, IndexError, ValueError):
                continue
            found.append((int(entry.name), uid, comm, cgroup))
        return found

    def cage_processes(self) -> list[tuple[int, int, str, str]]:
        """nsjail and every process of a jailed uid."""
        return [
            p for p in self.processes() if p[2] == "nsjail" or self.uid_base <= p[1] < self.uid_base + self.uid_span
        ]

    def all_inside_unit(self) -> str:
        """Every cage process is in the unit's cgroup, and nothing is under /sys/fs/cgroup/runnerd."""
        if OUTSIDE.exists():
            raise StepFailed(f"{OUTSIDE} exists: jobs escaped the unit ({sorted(p.name for p in OUTSIDE.iterdir())})")
        cages = self.cage_processes()
        rel = "/" + str(self.unit_cgroup.relative_to(CGROUP_ROOT))
        outside = [p for p in cages if not p[3].startswith(rel + "/jobs/")]
        expect(not outside, f"cage processes outside {rel}/jobs: {outside[:5]}")
        return f"{len(cages)} cage processes, all under {rel}/jobs"

    def leftovers(self) -> dict[str, list[str]]:
        mounts = [
            line.split()[4]
            for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if "/var/lib/runnerd/jobs/" in line
        ]
        jobs_dir = Path("/var/lib/runnerd/jobs")
        return {
            "job cgroups": [str(p) for p in self.job_cgroups()],
            "outside cgroups": [str(OUTSIDE)] if OUTSIDE.exists() else [],
            "mounts": mounts,
            "job dirs": sorted(p.name for p in jobs_dir.iterdir()) if jobs_dir.is_dir() else [],
            "cage processes": [f"{p[0]} {p[2]} uid {p[1]}" for p in self.cage_processes()],
        }


SLEEPER = "import time\nprint('started', flush=True)\ntime.sleep({s})\nprint('finished')"


class Background:
    """A job streamed from a thread: wait until it runs (its first output), then for its result."""

    def __init__(self, svc: Service, code: str, **kw: Any) -> None:
        self.box: dict[str, Any] = {}
        self.running = threading.Event()
        self.thread = threading.Thread(target=self._go, args=(svc, code, kw), daemon=True)
        self.thread.start()

    def _go(self, svc: Service, code: str, kw: dict[str, Any]) -> None:
        from runnerd.client import Finished, Output

        try:
            with svc.client() as c:
                for event in c.stream(code, **kw):
                    if isinstance(event, Output):
                        self.running.set()
                    elif isinstance(event, Finished):
                        self.box["result"] = event.result
        except BaseException as exc:  # noqa: BLE001 - reported by the step
            self.box["error"] = exc
        self.running.set()

    def started(self, timeout: float = 120) -> None:
        expect(
            self.running.wait(timeout) and "error" not in self.box, f"the job did not start: {self.box.get('error')}"
        )

    def result(self, timeout: float = 60) -> Any:
        self.thread.join(timeout)
        r = self.box.get("result")
        expect(r is not None, f"no result: {self.box.get('error') or 'still running'}")
        return r


def service_phase(out: Path, mode: str, steps: Steps) -> None:
    from runnerd.result import Outcome, Reason

    svc = Service(out, mode)
    since = time.time() - 1
    steps.line(f"## {mode} mode")

    def configure_and_start() -> str:
        text = CONFIG.read_text()
        text = re.sub(r'(?m)^mode = ".*"\n', "", text)
        if mode == "warm":
            text = re.sub(r"(?m)^(policy = .*\n)", r'\1mode = "warm"\n', text, count=1)
        CONFIG.write_text(text)
        sh(["systemctl", "start", UNIT], timeout=600)
        pid = svc.wait_active(30)
        ready = svc.wait_journal(r"serving .*", since, 30)
        return f"main pid {pid}; {ready[:160]}"

    def print_job() -> str:
        r = svc.run("print(6 * 7)", timeout=30)
        expect(
            r.outcome is Outcome.OK and r.stdout.strip() == "42",
            f"{r.outcome} {r.reason} {r.stdout!r} {r.stderr[-300:]!r}",
        )
        return f"42 in {r.usage.wall_s:.2f} s"

    def figure_job() -> str:
        code = (
            "import pandas as pd, matplotlib.pyplot as plt\n"
            "df = pd.read_csv('sales.csv')\nprint(df.groupby('region')['sales'].sum())\n"
            "df.groupby('region')['sales'].sum().plot.bar()\nplt.title('sales')\n"
        )
        csv = b"region,sales\nnorth,10\nsouth,20\nnorth,5\n"
        r = svc.run(code, files={"sales.csv": csv}, timeout=60)
        expect(r.outcome is Outcome.OK, f"{r.outcome} {r.reason} {r.stderr[-500:]!r}")
        expect(len(r.figures) == 1 and r.figures[0].data.startswith(b"\x89PNG\r\n\x1a\n"), f"figures: {len(r.figures)}")
        expect("north" in r.stdout and "15" in r.stdout, r.stdout)
        return f"PNG {len(r.figures[0].data)} bytes in {r.usage.wall_s:.1f} s"

    def limits_in_unit() -> str:
        job = Background(svc, SLEEPER.format(s=20), timeout=30)
        job.started()
        files = svc.job_cgroup_files("memory.max", "memory.swap.max", "pids.max")
        cgs = list(files)
        expect(bool(cgs), f"no job cgroup under {svc.unit_cgroup}/jobs")
        from runnerd.sandbox import policy
        from runnerd.sandbox.cage import NSJAIL_TASKS
        from runnerd.sandbox.zygotes import ZYGOTE_PIDS

        limits = policy.load(Path("/etc/runnerd/policies/default.cfg")).limits
        # A cold job's cgroup also holds nsjail; a zygote's holds its cage.
        pids_ok = {str(limits.pids + NSJAIL_TASKS)} if mode == "cold" else {str(limits.pids), str(ZYGOTE_PIDS)}
        seen = {" ".join(values) for values in files.values()}
        expect(all(v.split()[:2] == [str(limits.memory_bytes), "0"] and v.split()[2] in pids_ok for v in seen),
               f"memory.max, memory.swap.max, pids.max: {seen} (pids.max wanted in {pids_ok})")  # fmt: skip
        inside = svc.all_inside_unit()
        with svc.client() as c:
            stats = c.stats()
        r = job.result()
        expect(r.outcome is Outcome.OK, f"the sleeper ended {r.outcome} {r.reason}")
        shown = f"(memory.max memory.swap.max pids.max): {sorted(seen)}"
        return f"{len(cgs)} job cgroup(s), {shown}; {inside}; running {stats.get('running')}"

    def memory_bomb() -> str:
        r = svc.run("b = []\nwhile True:\n    b.append(bytearray(64 << 20))", timeout=60)
        expect(r.outcome is Outcome.FAILED and r.reason is Reason.MEMORY_LIMIT, f"{r.outcome} {r.reason} {r.warnings}")
        return f"memory_limit, peak {r.usage.max_rss_bytes >> 20} MiB"

    def fork_bomb() -> str:
        code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
        r = svc.run(code, timeout=10)
        expect(r.outcome in (Outcome.DEADLINE_EXCEEDED, Outcome.FAILED), f"{r.outcome} {r.reason}")
        after = svc.run("print('after the bomb')", timeout=30)
        expect(after.outcome is Outcome.OK, f"the next job: {after.outcome} {after.reason} {after.stderr[-300:]}")
        return f"{r.outcome.value} {r.reason}; next job OK"

    def deadline() -> str:
        r = svc.run("print('partial', flush=True)\nimport time\ntime.sleep(60)", timeout=3)
        expect(r.outcome is Outcome.DEADLINE_EXCEEDED and "partial" in r.stdout, f"{r.outcome} {r.stdout!r}")
        return f"DEADLINE_EXCEEDED after {r.usage.wall_s:.1f} s, partial output kept"

    def cancel() -> str:
        from runnerd.client import new_id

        job_id = new_id()
        job = Background(svc, SLEEPER.format(s=60), timeout=60, job_id=job_id)
        job.started()
        with svc.client() as c:
            c.cancel(job_id)
        r = job.result()
        expect(r.reason is Reason.CANCELLED, f"{r.outcome} {r.reason}")
        return f"{r.outcome.value} cancelled after {r.usage.wall_s:.1f} s"

    def session() -> str:
        import uuid

        import zmq

        from runnerd import wire

        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.connect(SOCKET)

        def ask(op: str, want: str, **fields: Any) -> dict[str, Any]:
            request_id = uuid.uuid4().hex[:12]
            sock.send(wire.request(op, request_id, **fields))
            while True:
                if not sock.poll(120_000):
                    raise StepFailed(f"no answer to {op}")
                msg = wire.decode_reply(sock.recv())
                if msg.get("id") == request_id and msg["type"] in (want, "error"):
                    expect(msg["type"] == want, f"{op}: {msg}")
                    return msg

        def frozen_cgroups() -> list[Path]:
            return [cg for cg, (events,) in svc.job_cgroup_files("cgroup.events").items() if "frozen 1" in events]

        try:
            # (A warm session's cgroup is its child's, made before the open: count the frozen ones.)
            expect(not frozen_cgroups(), f"frozen job cgroups before any session: {frozen_cgroups()}")
            ask("open", "opened", session="hosttest", files=[{"name": "n.txt", "data": b"41"}])
            r1 = ask("run", "result", session="hosttest", code="x = int(open('n.txt').read())\nx")
            expect(r1["value"] == "41", f"run 1: {r1}")
            frozen = frozen_cgroups()
            expect(len(frozen) == 1, f"between runs, frozen session cgroups: {frozen} of {svc.job_cgroups()}")
            parent = frozen[0].parent
            budget = int((parent / "memory.max").read_text())
            expect(
                parent.name.startswith("sessions-") and 0 < budget <= 4096 << 20,
                f"a session's cgroup is not under the sessions' parent with the budget: {parent} {budget}",
            )
            r2 = ask("run", "result", session="hosttest", code="x + 1")
            expect(r2["value"] == "42" and r2["session"]["alive"], f"run 2: {r2}")
            peak_of = r2["usage"].get("peak_of")
            expect(peak_of in ("run", "session"), f"run 2's usage: {r2['usage']}")
            ask("close", "closed", session="hosttest")
            expect(not frozen[0].exists(), f"{frozen[0]} left after close")
        finally:
            sock.close(0)
        return (
            f"state kept across runs, {frozen[0].name} frozen (cgroup.freeze) between them, gone at close; "
            f"under {parent.name} (memory.max {budget >> 20} MiB); peak_of {peak_of}"
        )

    def check_in_sandbox() -> str:
        props = []
        section = ""
        for raw in (Path("/etc/systemd/system") / UNIT).read_text().splitlines():
            line = raw.strip()
            if line.startswith("["):
                section = line
            elif section == "[Service]" and line and not line.startswith("#") and "=" in line:
                key = line.split("=", 1)[0]
                if key not in LIFECYCLE_KEYS:
                    props += ["-p", line]
        proc = sh(["systemd-run", "--wait", "--pipe", "--collect", "--quiet", "--unit", "runnerd-check", *props,
                   "/usr/local/bin/runnerd", "--config", str(CONFIG), "check"], timeout=900, check=False)  # fmt: skip
        (out / f"check-{mode}.txt").write_text(proc.stdout + proc.stderr)
        fails = [line for line in proc.stdout.splitlines() if line.startswith("FAIL")]
        expect(proc.returncode == 0 and not fails, f"exit {proc.returncode}: {fails or proc.stderr[-500:]}")
        cg_line = next((line for line in proc.stdout.splitlines() if "cgroups:" in line), "")
        expect("delegated by systemd" in cg_line, f"check in a Delegate=yes unit: {cg_line}")
        lib = next((line for line in proc.stdout.splitlines() if "library set" in line), "")
        return f"{sum(1 for line in proc.stdout.splitlines() if line.startswith('ok'))} ok lines; {lib[5:]}"

    def check_undelegated() -> str:
        # This driver runs in a unit of its own without Delegate=yes, as a shell would.
        proc = sh(["/usr/local/bin/runnerd", "--config", str(CONFIG), "check"], timeout=900, check=False)
        (out / f"check-undelegated-{mode}.txt").write_text(proc.stdout + proc.stderr)
        fails = [line for line in proc.stdout.splitlines() if line.startswith("FAIL")]
        expect(proc.returncode == 0 and not fails, f"exit {proc.returncode}: {fails or proc.stderr[-500:]}")
        cg_line = next((line for line in proc.stdout.splitlines() if "cgroups:" in line), "")
        expect("made by runnerd" in cg_line, f"check outside a delegated unit: {cg_line}")
        expect(not OUTSIDE.exists(), f"check left {OUTSIDE} behind")
        return f"{cg_line[5:90]}...; nothing left at {OUTSIDE}"

    def reload() -> str:
        before = time.time() - 1
        pid = svc.main_pid()
        sh(["systemctl", "kill", "--kill-who=main", "--signal=HUP", UNIT])
        line = svc.wait_journal(r"(reloaded|reload refused).*", before, 600)
        expect(line.startswith("reloaded"), line)
        expect(svc.main_pid() == pid, "the main process changed")
        job = Background(svc, SLEEPER.format(s=5), timeout=30)
        job.started()
        inside = svc.all_inside_unit()
        r = job.result()
        expect(r.outcome is Outcome.OK, f"{r.outcome} {r.reason}")
        return f"{line[:60]}; {inside}"

    def watchdog() -> str:
        before = time.time() - 1
        pid = svc.main_pid()
        os.kill(pid, 19)  # SIGSTOP: the watchdog pings stop
        line = svc.wait_journal(r"Watchdog timeout.*", before, 120)
        try:
            os.kill(pid, 18)  # SIGCONT, as systemd itself sends after its watchdog signal
        except ProcessLookupError:
            pass  # systemd's SIGABRT + SIGCONT already ended it
        new = svc.wait_active(300, not_pid=pid)
        expect(svc.run("print('back')", timeout=30).ok, "the restarted daemon does not run jobs")
        return f"{line[:80]}; restarted as pid {new}"

    def kill9() -> str:
        before = time.time() - 1
        job = Background(svc, SLEEPER.format(s=8), timeout=60, wait=600)
        job.started()
        old = {p.name for p in svc.job_cgroups()}
        pid = svc.main_pid()
        sh(["systemctl", "kill", "--kill-who=main", "--signal=KILL", UNIT])
        new = svc.wait_active(300, not_pid=pid)
        left = {p.name for p in svc.job_cgroups()} & old
        expect(not left, f"old job cgroups still there after the restart: {left}")
        swept = re.search(r"swept \d+ leftover.*", svc.journal(before))
        r = job.result(300)
        expect(r.outcome is Outcome.OK and "finished" in r.stdout, f"the client's resend: {r.outcome} {r.reason}")
        how = swept.group(0) if swept else "systemd had removed them with the old processes"
        return f"restarted as pid {new}; old job cgroups gone ({how}); the client's resend ran the job"

    def stop_drains() -> str:
        job = Background(svc, SLEEPER.format(s=6), timeout=60)
        job.started()
        sh(["systemctl", "stop", UNIT], timeout=120)
        r = job.result()
        expect(r.outcome is Outcome.OK and "finished" in r.stdout, f"the running job: {r.outcome} {r.reason}")
        s = svc.show("Result", "ExecMainStatus", "ActiveState")
        expect(s["Result"] == "success" and s["ExecMainStatus"] == "0" and s["ActiveState"] == "inactive", str(s))
        return f"the running job finished; {s}"

    def nothing_left() -> str:
        left = wait_for(
            "no leftovers", lambda: (lambda d: d if not any(d.values()) else None)(svc.leftovers()) or None, 30
        )
        return str(left)

    def save_journal() -> str:
        text = svc.journal(since)
        (out / f"journal-{mode}.txt").write_text(text)
        return f"{len(text.splitlines())} lines in journal-{mode}.txt"

    if not steps.run("start (shipped unit)", 700, configure_and_start):
        steps.run("journal saved", 60, save_journal)
        return
    steps.run("print job", 120, print_job)
    steps.run("pandas + Matplotlib job (PNG back)", 300, figure_job)
    steps.run("job cgroup inside the unit, with the policy's limits", 300, limits_in_unit)
    steps.run("memory bomb: memory_limit", 300, memory_bomb)
    steps.run("fork bomb: contained, next job runs", 300, fork_bomb)
    steps.run("sleep past its timeout: DEADLINE_EXCEEDED, partial output", 120, deadline)
    steps.run("cancel a running job", 300, cancel)
    steps.run("session: state kept, frozen between runs, gone at close", 300, session)
    steps.run("runnerd check in the unit's sandbox (systemd-run)", 1000, check_in_sandbox)
    if mode == "cold":
        steps.run("runnerd check outside a delegated unit: says so, leaves nothing", 1000, check_undelegated)
    steps.run("reload (SIGHUP): new jobs and zygotes inside the unit", 900, reload)
    steps.run("watchdog: a stopped daemon is killed and restarted", 600, watchdog)
    steps.run("kill -9: restarted, old job cgroups swept, resend runs", 700, kill9)
    steps.run("systemctl stop with a running job: drains, exit 0", 300, stop_drains)
    steps.run("nothing left: cgroups, mounts, job dirs, cage processes", 60, nothing_left)
    steps.run("journal saved", 60, save_journal)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--src", type=Path, required=True)
    parser.add_argument("--wheels", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--phase", choices=("setup", "service"), default="setup")
    args = parser.parse_args()
    if (args.out / "probe-only").exists():
        return 0  # the host only asked whether the guest boots
    steps = Steps(args.out)
    if args.phase == "setup":
        if not setup_phase(args, steps):
            return 1
        # The rest uses runnerd's client: go on in the venv the set-up made.
        venv_python = str(CHECKOUT / ".venv" / "bin" / "python")
        os.execv(venv_python, [venv_python, __file__, "--src", str(args.src), "--wheels", str(args.wheels),
                               "--out", str(args.out), "--phase", "service"])  # fmt: skip
    sys.path.insert(0, str(CHECKOUT))
    modes = (args.out / "modes").read_text().split(",") if (args.out / "modes").exists() else ["cold", "warm"]
    for mode in (m.strip() for m in modes):
        service_phase(args.out, mode, steps)
        sh(["systemctl", "stop", UNIT], timeout=120, check=False)
    steps.line(f"## done: {steps.failed} failed step(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
