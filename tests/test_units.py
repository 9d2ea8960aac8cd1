"""Unit tests of the pure parts: validation, capture, outcome rules, policy and config checks."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from runnerd import config as config_mod
from runnerd.config import Limits
from runnerd.errors import ConfigError, JobRejected, PolicyError, SandboxError
from runnerd.result import Observation, Outcome, Reason, Result, decide
from runnerd.sandbox import artifacts, cgroup_detect, cgroup_v1, cgroup_v2, cgroups, nsjail, report
from runnerd.sandbox import policy as policy_mod
from runnerd.sandbox.artifacts import collect, sniff_image
from runnerd.sandbox.job import make_job
from runnerd.sandbox.output import OutputGuard, StreamCapture

LIMITS = Limits()


# ---------------------------------------------------------------- job validation


@pytest.mark.parametrize(
    "name, problem",
    [
        ("", "empty"),
        ("a/b.csv", "contains '/'"),
        ("..", "not a file name"),
        (".", "not a file name"),
        ("a\x00b", "NUL"),
        ("x" * 256, "256 bytes long"),
        ("\u00e9" * 128, "256 bytes long"),
        (42, "must be a string"),
    ],
)
def test_bad_file_names(name, problem):
    with pytest.raises(JobRejected, match=problem) as info:
        make_job("pass", [(name, b"")], limits=LIMITS)
    assert info.value.code == "BAD_REQUEST"


def test_good_odd_file_names():
    job = make_job("pass", [("d\u00f6:2 x.csv", b"1"), (".hidden", b""), ("x" * 255, b"")], limits=LIMITS)
    assert [f.name for f in job.files][0] == "d\u00f6:2 x.csv"


def test_job_limits():
    small = Limits(max_code_bytes=10, max_files=2, max_files_bytes=5)
    with pytest.raises(JobRejected, match="code is 11 bytes") as info:
        make_job("x" * 11, limits=small)
    assert info.value.code == "TOO_LARGE"
    with pytest.raises(JobRejected, match="more than 2 input files"):
        make_job("", [("a", b""), ("b", b""), ("c", b"")], limits=small)
    with pytest.raises(JobRejected, match="more than 5 bytes"):
        make_job("", [("a", b"123"), ("b", b"456")], limits=small)
    with pytest.raises(JobRejected, match="given twice"):
        make_job("", [("a", b""), ("a", b"")], limits=small)
    with pytest.raises(JobRejected, match="must be bytes"):
        make_job("", [("a", "text")], limits=small)
    with pytest.raises(JobRejected, match="code must be a string"):
        make_job(b"print(1)", limits=small)
    with pytest.raises(JobRejected, match="lone surrogate"):
        make_job("\udc80", limits=LIMITS)


@pytest.mark.parametrize("timeout", [0, -1, float("nan"), float("inf"), "10", True])
def test_bad_timeouts(timeout):
    with pytest.raises(JobRejected, match="timeout"):
        make_job("pass", timeout=timeout, limits=LIMITS)


def test_timeout_default_and_cap():
    assert make_job("pass", limits=LIMITS).timeout == 30.0
    assert make_job("pass", timeout=500, limits=LIMITS).timeout == 30.0
    assert make_job("pass", timeout=2, limits=LIMITS).timeout == 2.0


# ---------------------------------------------------------------- output capture


def test_capture_keeps_everything_under_the_cap():
    c = StreamCapture("stdout", 10)
    assert c.feed(b"abc") == b"abc"
    assert c.feed(b"defghij") == b"defghij"
    assert not c.truncated and c.text() == "abcdefghij"


def test_capture_keeps_head_and_tail():
    c = StreamCapture("stdout", 10)
    streamed = b"".join(c.feed(bytes([65 + i % 26])) for i in range(1000))
    assert streamed == bytes(65 + i % 26 for i in range(10))  # only the cap streams live
    assert c.truncated and c.total == 1000
    text = c.text()
    assert text.startswith("ABCDE") and text.endswith("HIJKL")
    assert "990 bytes of stdout omitted; 1000 in all" in text


def test_capture_flood_in_big_chunks():
    c = StreamCapture("stderr", 1 << 20)
    for _ in range(60):
        c.feed(b"y" * (1 << 20))
    assert len(c.tail) <= 2 * c.tail_cap
    assert len(c.text()) < (1 << 20) + 200


def test_output_guard_stops_a_flood_not_a_burst_nor_a_slow_writer():
    out, err = StreamCapture("stdout", 100), StreamCapture("stderr", 100)
    guard = OutputGuard(out, err, kill_bytes=10_000, window_s=3.0)
    out.feed(b"x" * 90)
    assert guard.check(0.0) is None and not guard.passed_cap
    out.feed(b"x" * 1000)  # a burst past the cap: 990 bytes thrown away; the window starts
    assert guard.check(0.1) is None and guard.passed_cap
    out.feed(b"x" * 50)  # past the window, but no more than the result keeps: it starts again
    assert guard.check(3.2) is None
    out.feed(b"x" * 60)
    assert guard.check(6.1) is None  # 2.9 s into the window
    err.feed(b"y" * 160)  # both streams count: 120 bytes more thrown away in 3.1 s
    why = guard.check(6.3)
    assert why == (
        "killed as an output flood: still writing 3.1 s after passing what the result keeps "
        "(limits.max_output_bytes = 100), 120 bytes more in that time; 1360 bytes in all"
    )


def test_output_guard_byte_limit_is_at_once():
    out, err = StreamCapture("stdout", 100), StreamCapture("stderr", 100)
    guard = OutputGuard(out, err, kill_bytes=1000)
    out.feed(b"x" * 600)
    err.feed(b"y" * 401)
    assert guard.check(0.0) == "killed after writing 1001 bytes to stdout+stderr (limits.output_kill_bytes = 1000)"


# ---------------------------------------------------------------- outcome rules


def obs(**kw) -> Observation:
    base = dict(started=True, finished=True, exit_status=0)
    base.update(kw)
    return Observation(**base)


@pytest.mark.parametrize(
    "kw, expected",
    [
        ({}, (Outcome.OK, None)),
        ({"exit_status": 3}, (Outcome.FAILED, Reason.EXIT)),
        ({"exit_status": 1, "has_error": True}, (Outcome.FAILED, Reason.EXCEPTION)),
        ({"exit_status": -11}, (Outcome.FAILED, Reason.SIGNAL)),
        ({"exit_status": None, "timed_out": True}, (Outcome.DEADLINE_EXCEEDED, Reason.TIMEOUT)),
        ({"exit_status": -9, "oom_kills": 1}, (Outcome.FAILED, Reason.MEMORY_LIMIT)),
        # a child OOM-killed while the job still ended well: still OK
        ({"exit_status": 0, "oom_kills": 1}, (Outcome.OK, None)),
        ({"exit_status": None, "cancelled": True}, (Outcome.FAILED, Reason.CANCELLED)),
        ({"exit_status": None, "output_limit": True}, (Outcome.FAILED, Reason.OUTPUT_LIMIT)),
        ({"started": False, "exit_status": 255}, (Outcome.FAILED, Reason.SANDBOX_ERROR)),
        # the cage broke under the job: never blamed on the code, whatever else it saw
        ({"exit_status": None, "cage_failed": True}, (Outcome.FAILED, Reason.SANDBOX_ERROR)),
        (
            {"exit_status": None, "cage_failed": True, "oom_kills": 1, "has_error": True},
            (Outcome.FAILED, Reason.SANDBOX_ERROR),
        ),
        ({"exit_status": None, "cage_failed": True, "cancelled": True}, (Outcome.FAILED, Reason.CANCELLED)),
        # the deadline wins over everything the job did
        ({"timed_out": True, "oom_kills": 2, "has_error": True}, (Outcome.DEADLINE_EXCEEDED, Reason.TIMEOUT)),
    ],
)
def test_decide(kw, expected):
    assert decide(obs(**kw)) == expected


def test_exit_status_from_nsjail_log():
    log = "[I][...] pid=7 ([STANDALONE MODE]) exited with status: 139, (PIDs left: 0)"
    rep = report.parse_report(b'{"event":"start"}\n{"event":"exit","signal":11}\n')
    assert report.exit_status(nsjail.nsjail_status(log, 139, True), rep) == -11
    # the report cannot turn a status into a signal it does not match
    rep2 = report.parse_report(b'{"event":"start"}\n{"event":"exit","signal":9}\n')
    assert report.exit_status(nsjail.nsjail_status(log, 139, True), rep2) == 139
    assert (
        report.exit_status(nsjail.nsjail_status("pid=7 (x) exited with status: 0, (PIDs left: 0)", 0, True), rep2) == 0
    )
    assert nsjail.nsjail_status("pid=7 (x) terminated with signal: SIGKILL (9), (PIDs", 137, True) == -9
    assert nsjail.nsjail_status("", -9, False) is None and report.exit_status(None, rep) is None


def test_report_parsing_ignores_garbage():
    raw = b'garbage\n{"event":"end","exit_code":0}\n[1,2]\n{"event":"start"}\n\xff\xfe\n{"event":"end","error":{"type":1}}\n'
    rep = report.parse_report(raw)
    assert rep.started and rep.end == {"event": "end", "error": {"type": 1}}
    err = report.error_from_report({"error": {"type": "X" * 999, "message": None, "lineno": "7"}})
    assert err.type == "X" * 200 and err.message == "" and err.lineno is None


def test_result_wire_round_trip():
    r = Result(outcome=Outcome.FAILED, reason=Reason.EXIT, stdout="a", exit_code=3, warnings=("w",))
    assert Result.from_wire(r.to_wire()) == r


def test_pb_string_escapes_everything_odd():
    assert nsjail.pb_string('a"b\\c') == '"a\\042b\\134c"'
    assert nsjail.pb_string("\u00e9\n") == '"\\303\\251\\012"'


# ---------------------------------------------------------------- artifacts


def test_collect_skips_links_fifos_and_caps(tmp_path: Path):
    work, figs = tmp_path / "work", tmp_path / "figs"
    work.mkdir()
    figs.mkdir()
    (tmp_path / "secret").write_text("SECRET")
    os.symlink(tmp_path / "secret", work / "leak.png")
    os.mkfifo(work / "fifo.txt")
    os.link(tmp_path / "secret", work / "hard.txt")  # a hard link is a regular file: returned
    (work / "input.csv").write_text("placeholder")
    (work / "big.bin").write_bytes(b"x" * 2000)
    png = b"\x89PNG\r\n\x1a\n" + b"\0" * 30
    for i in range(4):
        (work / f"p{i}.png").write_bytes(png)
    (figs / "figure_001.png").write_bytes(png)
    deep = work
    for i in range(20):
        deep = deep / f"d{i}"
    deep.mkdir(parents=True)
    limits = Limits(max_figures=3, max_artifact_bytes=1000, max_artifacts_total_bytes=5000)
    got = collect(work, figs, exclude=frozenset({"input.csv"}), limits=limits)
    assert [f.name for f in got.figures] == ["p0.png", "p1.png", "p2.png"]
    assert [f.name for f in got.files] == ["hard.txt"]
    lost, odd = got.warnings.final()
    assert "leak.png: a symbolic link" in "\n".join(odd) and "fifo.txt: not a regular file" in "\n".join(odd)
    text = "\n".join(lost)
    assert "big.bin: 2000 bytes" in text and "more than 3 figures" in text and "deeper than 16" in text
    assert got.dropped


def test_lost_outputs_are_named_before_oddities_and_lines_stay_bounded(tmp_path: Path):
    # One real output dropped among a hundred links to it: the drop is named
    # first, whatever the order of the names; the links are counted.
    work, figs = tmp_path / "work", tmp_path / "figs"
    work.mkdir()
    figs.mkdir()
    (work / "zz_big.bin").write_bytes(b"x" * 2000)
    for i in range(100):
        os.symlink("zz_big.bin", work / f"link{i:03}")
    got = collect(work, figs, exclude=frozenset(), limits=Limits(max_artifact_bytes=1000))
    lost, odd = got.warnings.final(lost_first=["3 open figure(s) not rendered: over 32"])
    assert lost == [
        "3 open figure(s) not rendered: over 32",
        "dropped zz_big.bin: 2000 bytes, over the 1000-byte limit per file",
    ]
    assert len(odd) == artifacts.MAX_WARNINGS - 2 + 1
    assert odd[-1] == "... and 82 more not returned or returned as plain files: 82 symbolic link(s)"
    # Past the room, lost outputs are counted too, and oddities only counted.
    for i in range(30):
        (work / f"big{i:02}.bin").write_bytes(b"x" * 2000)
    lost, odd = collect(work, figs, exclude=frozenset(), limits=Limits(max_artifact_bytes=1000)).warnings.final()
    assert (
        len(lost) == artifacts.MAX_WARNINGS + 1
        and lost[-1] == "... and 11 more output(s) dropped for the reasons above"
    )
    assert odd == ["... and 100 more not returned or returned as plain files: 100 symbolic link(s)"]


def test_sniff_image():
    assert sniff_image(b"\xff\xd8\xff\xe0") == "image/jpeg"
    assert sniff_image(b'<?xml version="1.0"?>\n<svg xmlns=...') == "image/svg+xml"
    assert sniff_image(b"hello") is None


# ---------------------------------------------------------------- policy


POLICY = config_mod.default_policy_path()


def test_default_policy_loads():
    p = policy_mod.load(POLICY)
    assert p.limits == cgroups.CgroupLimits(memory_bytes=1 << 30, pids=64, cpu_ms_per_sec=1000)
    assert p.cwd == "/work"
    assert "clone3" in p.kafel_text


def test_scan_fields_skips_blocks_strings_and_comments():
    text = "a: 1 # b: 2\nmount { c: 3 }\nd: \"x { # y\"\ne: 'q' f: true\ng: { h: 1 }\n"
    assert policy_mod.scan_fields(text) == {
        "a": ["1"],
        "mount": ["{...}"],
        "d": ["x { # y"],
        "e": ["q"],
        "f": ["true"],
        "g": ["{...}"],
    }


@pytest.mark.parametrize(
    "edit, message",
    [
        ("clone_newnet: false", "clone_newnet: false would weaken the cage"),
        ("keep_caps: true", "keep_caps: true would weaken the cage"),
        ('uidmap { inside_id: "0" outside_id: "0" }', "uidmap may not be set"),
        ('cap: "CAP_SYS_ADMIN"', "cap may not be set"),
        ("disable_no_new_privs: true", "disable_no_new_privs"),
        ('iface_own: "eth0"', "iface_own may not be set"),
    ],
)
def test_policy_refuses_weakening(tmp_path: Path, edit: str, message: str):
    (tmp_path / "default.kafel").write_text(POLICY.with_name("default.kafel").read_text())
    bad = tmp_path / "p.cfg"
    bad.write_text(POLICY.read_text() + "\n" + edit + "\n")
    with pytest.raises(PolicyError, match=message):
        policy_mod.load(bad)


def test_policy_requires_limits_and_seccomp(tmp_path: Path):
    text = POLICY.read_text()
    (tmp_path / "default.kafel").write_text("")
    for field in ("cgroup_mem_max", "seccomp_policy_file"):
        cfg = tmp_path / "p.cfg"
        cfg.write_text("\n".join(ln for ln in text.splitlines() if not ln.startswith(field)))
        with pytest.raises(PolicyError, match=f"{field} is missing"):
            policy_mod.load(cfg)


def test_nsjail_rejects_a_broken_policy(tmp_path: Path, runtime):
    kafel = tmp_path / "default.kafel"
    kafel.write_text("POLICY p { ERRNO(1) { no_such_syscall } } USE p DEFAULT ALLOW")
    cfg = tmp_path / "p.cfg"
    cfg.write_text(POLICY.read_text())
    with pytest.raises(PolicyError, match="no_such_syscall"):
        policy_mod.check_with_nsjail(policy_mod.load(cfg), runtime.nsjail)
    kafel.write_text(POLICY.with_name("default.kafel").read_text())
    cfg.write_text(POLICY.read_text() + "\nno_such_field: 3\n")
    with pytest.raises(PolicyError, match="no_such_field"):
        policy_mod.check_with_nsjail(policy_mod.load(cfg), runtime.nsjail)


# ---------------------------------------------------------------- config


def test_config_file_and_overrides(tmp_path: Path):
    f = tmp_path / "r.toml"
    f.write_text(
        'concurrency = 3\nbind = "tcp://127.0.0.1:5555"\n[limits]\nmax_output_bytes = "2MiB"\nmax_timeout = 60\n'
    )
    cfg = config_mod.load(f, {"queue_size": 5})
    assert cfg.concurrency == 3 and cfg.queue_size == 5 and cfg.bind == ("tcp://127.0.0.1:5555",)
    assert cfg.limits.max_output_bytes == 2 << 20 and cfg.limits.max_timeout == 60.0


@pytest.mark.parametrize(
    "text, key",
    [
        ("concurency = 3", "concurency: unknown key"),
        ('concurrency = "3"', "concurrency: expected an integer"),
        ("[limits]\nmax_figures = -1", "limits.max_figures: must be positive"),
        ("[limits]\nnope = 1", "limits.nope: unknown key"),
        ('[limits]\nmax_output_bytes = "lots"', "limits.max_output_bytes: expected a size"),
        ('state_dir = "relative"', "state_dir: must be an absolute path"),
        ('bind = ["http://x"]', "bind: 'http://x' is not"),
        ("concurrency = ", "not valid TOML"),
    ],
)
def test_config_errors_name_the_key(tmp_path: Path, text: str, key: str):
    f = tmp_path / "r.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=key):
        config_mod.load(f)


# ---------------------------------------------------------------- cgroups


MOUNTINFO_V1 = """\
30 23 0:26 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
31 23 0:27 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids
32 23 0:28 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
33 23 0:29 / /sys/fs/cgroup/cpuset rw - cgroup cgroup rw,cpuset
"""
MOUNTINFO_V2 = "30 23 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n"


def test_detect_v1_with_comounted_cpu():
    cg = cgroup_detect.detect("auto", MOUNTINFO_V1, "")
    assert isinstance(cg, cgroup_v1.CgroupsV1)
    assert cg.mounts["cpu"] == cg.mounts["cpuacct"] == Path("/sys/fs/cgroup/cpu,cpuacct")


def test_detect_v2_delegated_by_systemd():
    delegated = {"system.slice/runnerd.service"}
    cg = cgroup_detect.detect("auto", MOUNTINFO_V2, "0::/system.slice/runnerd.service\n", delegated.__contains__)
    assert isinstance(cg, cgroup_v2.CgroupsV2) and cg.delegated
    assert cg.jobs == Path("/sys/fs/cgroup/system.slice/runnerd.service/jobs")
    # After prepare() the daemon lives in the unit's supervisor leaf; a reload
    # detects again from there and must find the same unit, not /runnerd.
    again = cgroup_detect.detect(
        "auto", MOUNTINFO_V2, "0::/system.slice/runnerd.service/supervisor\n", delegated.__contains__
    )
    assert isinstance(again, cgroup_v2.CgroupsV2) and again.delegated and again.jobs == cg.jobs
    assert "delegated by systemd" in again.describe()


@pytest.mark.parametrize(
    "own",
    [
        "/system.slice/runnerd.service",  # a unit without Delegate=yes
        "/user.slice/user-0.slice/session-1.scope",  # a login shell
        "/system.slice/other.service/supervisor/deeper",
        "/",
    ],
)
def test_detect_v2_not_delegated(own: str):
    cg = cgroup_detect.detect("auto", MOUNTINFO_V2, f"0::{own}\n", lambda rel: False)
    assert isinstance(cg, cgroup_v2.CgroupsV2) and not cg.delegated
    assert cg.jobs == Path("/sys/fs/cgroup/runnerd") and "made by runnerd" in cg.describe()


def test_a_containers_cgroup_namespace_is_told_from_the_hosts_root(tmp_path: Path):
    host_root, pod_root = tmp_path / "host", tmp_path / "pod"
    host_root.mkdir()
    pod_root.mkdir()
    (pod_root / "cgroup.type").write_text("domain\n")  # what every cgroup but the host's root has
    assert cgroup_detect.in_container(pod_root, "/") and cgroup_detect.in_container(pod_root, "/supervisor")
    assert not cgroup_detect.in_container(host_root, "/")  # the host's root: runnerd makes /runnerd there
    assert not cgroup_detect.in_container(pod_root, "/system.slice/other.service")  # not at the namespace's root
    # A privileged pod may share the host's cgroup namespace: cgroup_parent = "self" divides where it started.
    assert cgroup_v2.own_cgroup("/kubepods.slice/cri-containerd-1.scope") == "kubepods.slice/cri-containerd-1.scope"
    assert cgroup_v2.own_cgroup("/kubepods.slice/cri-containerd-1.scope/supervisor") == (
        "kubepods.slice/cri-containerd-1.scope"
    )
    assert cgroup_v2.own_cgroup("/") == "" and cgroup_v2.own_cgroup("/supervisor") == ""


def test_a_divided_cgroup_moves_every_process_then_enables_its_controllers(tmp_path: Path):
    """A cgroup file tree stands in for cgroupfs: a write to a leaf's cgroup.procs takes the pid out of the parent's."""
    import unittest.mock

    pod = tmp_path / "pod"
    pod.mkdir()
    (pod / "cgroup.procs").write_text(f"1\n{os.getpid()}\n")
    for cg in (pod, pod / "jobs"):
        cg.mkdir(exist_ok=True)
        (cg / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
        (cg / "cgroup.subtree_control").write_text("")
    joins = iter(["77"])  # a probe's exec joins the parent while the first ones are moved
    moved: list[str] = []
    real_write = cgroup_v2.write_value

    def write(path: Path, value: str) -> None:
        if path.name == "cgroup.procs":
            moved.append(value)
            left = [p for p in (pod / "cgroup.procs").read_text().split() if p != value]
            left += [next(joins, "")] if value == "1" else []
            (pod / "cgroup.procs").write_text("\n".join(p for p in left if p))
            return
        real_write(path, value)

    cg = cgroup_v2.CgroupsV2(pod, "", contained=True)
    assert cg.delegated and cg.jobs == pod / "jobs" and "the container's own" in cg.describe()
    with unittest.mock.patch.object(cgroup_v2, "write_value", write):
        cg.prepare()
    assert moved == [str(os.getpid()), "1", "77"], moved
    assert (pod / "cgroup.subtree_control").read_text() == "+memory +pids +cpu"  # then the controllers, below it
    assert (pod / "jobs" / "cgroup.subtree_control").read_text() == "+memory +pids +cpu"
    # A cgroup it cannot make (read-only in an unprivileged pod) is a SandboxError naming the cause.
    with pytest.raises(SandboxError, match="cannot create .*missing"):
        cgroup_v2._mkdir(tmp_path / "missing" / "leaf")


def test_systemd_delegated_reads_the_xattr(tmp_path: Path):
    marked = tmp_path / "a.service"
    marked.mkdir()
    try:
        os.setxattr(marked, "user.delegate", b"1")
    except OSError as exc:
        pytest.skip(f"this filesystem takes no user xattrs: {exc}")
    assert cgroup_v2.systemd_delegated(marked)
    os.setxattr(marked, "user.delegate", b"0")
    assert not cgroup_v2.systemd_delegated(marked)


def _fake_v2_cgroup(path: Path, controllers: str = "cpu memory pids") -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "cgroup.controllers").write_text(controllers + "\n")
    (path / "cgroup.subtree_control").write_text("")


def test_v2_on_a_fake_tree(tmp_path: Path):
    _fake_v2_cgroup(tmp_path)
    _fake_v2_cgroup(tmp_path / "runnerd")
    cg = cgroup_v2.CgroupsV2(tmp_path, "auto")
    cg.prepare()
    assert (tmp_path / "cgroup.subtree_control").read_text() == "+memory +pids +cpu"
    job = cg.create("job-1", cgroups.CgroupLimits(memory_bytes=1 << 30, pids=64, cpu_ms_per_sec=500))
    d = tmp_path / "runnerd" / "job-1"
    assert (d / "memory.max").read_text() == str(1 << 30)
    assert (d / "pids.max").read_text() == "64"
    assert (d / "cpu.max").read_text() == "50000 100000"
    (d / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    (d / "memory.peak").write_text("123456\n")
    (d / "cpu.stat").write_text("usage_usec 2500000\nuser_usec 1\n")
    (d / "pids.events").write_text("max 7\n")
    assert job.stats() == cgroups.CgroupStats(oom_kills=1, peak_bytes=123456, cpu_s=2.5, pids_limit_hits=7)
    assert [j.name for j in cg.existing()] == ["job-1"]


def test_v2_missing_controller_is_explained(tmp_path: Path):
    _fake_v2_cgroup(tmp_path, "cpu pids")
    with pytest.raises(Exception, match="lacks controller.*memory"):
        cgroup_v2.CgroupsV2(tmp_path, "auto").prepare()


def test_nsjail_problems_leave_out_absent_optional_binds():
    """A minimal host lacks /usr/share/fonts and zoneinfo: nsjail's warning about them must not lead a real error."""
    log = (
        "[I][2026-11-25T15:00:00+0000] Mode: STANDALONE_ONCE\n"
        "[W][2026-11-25T15:00:00+0000][1] mountPt():231 mount('/usr/share/fonts' -> '/tmp/nsjail.0.root//usr/share/fonts'): No such file or directory\n"
        "[W][2026-11-25T15:00:00+0000][1] remountPt():282 mount('/dev/null', flags=MS_NOSUID|MS_REMOUNT|MS_BIND): Operation not permitted\n"
        "[E][2026-11-25T15:00:00+0000][7] standaloneMode():274 Couldn't launch the child process\n"
    )
    assert policy_mod.nsjail_problems(log) == (
        "mount('/dev/null', flags=MS_NOSUID|MS_REMOUNT|MS_BIND): Operation not permitted; Couldn't launch the child process"
    )


def test_job_rlimits_from_the_policy_fields(tmp_path: Path):
    import resource

    assert policy_mod.job_rlimits({"rlimit_cpu": ["120"]}, tmp_path) == {"RLIMIT_CPU": 120}
    assert policy_mod.job_rlimits({}, tmp_path) == {"RLIMIT_CPU": 600}  # nsjail's default
    assert policy_mod.job_rlimits({"rlimit_cpu_type": ["INF"]}, tmp_path) == {"RLIMIT_CPU": policy_mod.RLIM_INFINITY}
    soft = resource.getrlimit(resource.RLIMIT_CPU)[0]
    want = policy_mod.RLIM_INFINITY if soft == resource.RLIM_INFINITY else soft
    assert policy_mod.job_rlimits({"rlimit_cpu_type": ["SOFT"]}, tmp_path) == {"RLIMIT_CPU": want}
    with pytest.raises(PolicyError, match="rlimit_cpu_type: SOMETIMES is not one of"):
        policy_mod.job_rlimits({"rlimit_cpu_type": ["SOMETIMES"]}, tmp_path)
    with pytest.raises(PolicyError, match="rlimit_cpu must be a number"):
        policy_mod.job_rlimits({"rlimit_cpu": ["lots"]}, tmp_path)


def test_run_exchange_resends_after_silence_and_gives_up_at_the_deadline():
    from runnerd.errors import ClientError
    from runnerd.exchange import Accepted, _RunExchange

    ex = _RunExchange("j1", wait=12.0, resend_interval=5.0, endpoint="ipc://x", now=100.0)
    assert ex.timeout(100.0) == 5.0
    assert not ex.resend_due(103.0)  # silent for 3 s: not yet
    assert ex.resend_due(105.0)  # silent for 5 s: send again
    assert not ex.resend_due(106.0)  # the resend counts as heard
    assert ex.events({"id": "other", "type": "accepted"}, 107.0) == []  # someone else's reply: ignored
    assert ex.events({"id": "j1", "type": "accepted", "state": "queued"}, 108.0) == [Accepted("j1", "queued")]
    assert not ex.resend_due(112.0)  # heard at 108
    assert ex.timeout(110.0) == 2.0  # no more than what is left
    with pytest.raises(ClientError, match="no result for job j1 from ipc://x within 12 s"):
        ex.timeout(112.0)


# ---------------------------------------------------------------- sessions: wire and value


def _frame(**fields: object) -> bytes:
    from runnerd.server import protocol

    return protocol.encode({"v": 1, "id": "r1", **fields})


def test_open_close_and_session_runs_decode():
    from runnerd.server import protocol

    limits = Limits()
    req = protocol.decode_request(
        _frame(op="open", session="s-1", files=[{"name": "a.csv", "data": b"x"}], idle_timeout=5), limits, 1 << 20
    )
    assert isinstance(req, protocol.OpenRequest)
    assert (req.session, req.idle_timeout, [f.name for f in req.files]) == ("s-1", 5.0, ["a.csv"])
    same = protocol.decode_request(
        _frame(op="open", session="s-1", files=[{"name": "a.csv", "data": b"x"}], idle_timeout=5), limits, 1 << 20
    )
    other = protocol.decode_request(_frame(op="open", session="s-1"), limits, 1 << 20)
    assert isinstance(same, protocol.OpenRequest) and isinstance(other, protocol.OpenRequest)
    assert same.digest == req.digest != other.digest
    close = protocol.decode_request(_frame(op="close", session="s-1"), limits, 1 << 20)
    assert isinstance(close, protocol.CloseRequest) and close.session == "s-1"
    run = protocol.decode_request(_frame(op="run", code="x", session="s-1"), limits, 1 << 20)
    one_off = protocol.decode_request(_frame(op="run", code="x", session=None), limits, 1 << 20)
    assert isinstance(run, protocol.RunRequest) and isinstance(one_off, protocol.RunRequest)
    assert run.session == "s-1" and one_off.session is None
    # The same job id and code in a session is another job than outside one.
    assert run.digest != one_off.digest


@pytest.mark.parametrize(
    "fields, problem",
    [
        ({"op": "open"}, "missing field 'session'"),
        ({"op": "close"}, "missing field 'session'"),
        ({"op": "open", "session": "a/b"}, "session must be a string"),
        ({"op": "open", "session": "s", "idle_timeout": 0}, "idle_timeout must be a positive"),
        ({"op": "open", "session": "s", "idle_timeout": True}, "idle_timeout must be a positive"),
        ({"op": "open", "session": "s", "code": "x"}, "unknown field(s) 'code'"),
        ({"op": "close", "session": "s", "files": []}, "unknown field(s) 'files'"),
        ({"op": "open", "session": "s", "files": [{"name": "../x", "data": b""}]}, "contains '/'"),
        ({"op": "run", "code": "x", "session": 3}, "session must be a string"),
    ],
)
def test_bad_session_requests_name_the_problem(fields, problem):
    from runnerd.server import protocol

    with pytest.raises(protocol.ProtocolError) as info:
        protocol.decode_request(_frame(**fields), Limits(), 1 << 20)
    assert problem in info.value.message
    assert info.value.request_id == "r1"


@pytest.mark.parametrize(
    "source, value",
    [
        ("x = 41\nx + 1", "42"),
        ("'a' * 3", "'aaa'"),
        ("x = 1", None),
        ("None", None),
        ("print(1)", None),  # print returns None: nothing to show, as in a notebook
        ("if True:\n    5", None),  # only a trailing statement of the cell's own is shown
        ("'x' * 10000", "cut"),
    ],
)
def test_trailing_expression_value(source, value):
    from runnerd.incage import harness

    code, error, got = harness.execute(source, "main.py", {"__builtins__": __builtins__}, 100)
    assert (code, error) == (0, None)
    if value == "cut":
        assert got is not None and len(got) < 200 and "characters cut" in got
    else:
        assert got == value


def test_value_of_a_failing_repr_and_errors_keep_their_lines():
    from runnerd.incage import harness

    ns: dict[str, object] = {"__builtins__": __builtins__}
    code, error, got = harness.execute("class A:\n    def __repr__(self):\n        1/0\nA()", "cell1.py", ns, 100)
    assert code == 0 and error is None and got is not None and "repr() raised ZeroDivisionError" in got
    code, error, got = harness.execute("y = 1\n\nundefined_name", "cell2.py", ns, 100)
    assert code == 1 and got is None and error is not None
    assert error["type"] == "NameError" and error["lineno"] == 3 and "cell2.py" in error["traceback"]


def _values_that_fit() -> list[object]:
    from collections import OrderedDict, defaultdict, deque, namedtuple

    class L(list):
        pass

    class S(set):
        pass

    class F(frozenset):
        pass

    class Q(deque):
        pass

    class T(str):
        pass

    looped: list[object] = []
    looped.append(looped)
    inside: dict[int, object] = {}
    inside[1] = inside
    through = ([],)
    through[0].append(through)
    ring: deque[object] = deque()
    ring.append(ring)
    return [
        [], (), {}, set(), frozenset(), deque(), deque(maxlen=2), "", b"", (1,), [1, (2,)], {1: [2]}, {3},
        frozenset({4}), looped, inside, through, ring, L([1]), S({1}), S(), F(), F({2}), Q([1], maxlen=3),
        T("x'y"), "it's", 'a "quote"', "both ' and \"", b"it's", b"both ' \"", "\x00\t\\\u00e9\u200b\U0001f600\ud800",
        bytes(range(256)), OrderedDict(a=1), defaultdict(int, b=2), namedtuple("P", "x y")(1, 2),
        [None, 1.5, 10**20, True, {"k": (b"v", {frozenset({1})})}],
    ]  # fmt: skip


def test_a_value_that_fits_is_its_repr_exactly():
    from runnerd.incage import harness

    for value in _values_that_fit():
        assert harness._values.value_repr(value, 8192) == repr(value), value


def _cut_apart(text: str) -> tuple[str, int, str, str]:
    """A cut repr's head, the count and unit its marker line says, and its tail."""
    head, rest = text.split("\n... [", 1)
    said, tail = rest.split(" cut] ...\n", 1)
    count, unit = said.split(" ")
    return head, int(count), unit, tail


def test_a_long_value_keeps_its_reprs_head_and_tail_and_counts_what_was_cut():
    from collections import deque

    from runnerd.incage import harness

    cap = 8192
    numbers = list(range(100_000))
    cases: list[tuple[object, str]] = [
        (numbers, "items"), (tuple(numbers), "items"), (set(numbers), "items"), (frozenset(numbers), "items"),
        (deque(numbers, maxlen=200_000), "items"), ({i: str(i) for i in numbers}, "items"),
        ({"k": numbers}, "items"), ([["x" * 10**6]], "characters"), ("\u00e9\n" * 10**5, "characters"),
        (bytes(range(256)) * 1000, "bytes"), ([str(i) * 50 for i in range(1000)], "items"),
    ]  # fmt: skip
    for value, unit in cases:
        full = repr(value)
        got = harness._values.value_repr(value, cap)
        head, count, said, tail = _cut_apart(got)
        assert len(got) <= cap and said == unit, (type(value), got[:100])
        assert full.startswith(head) and full.endswith(tail) and len(head) + len(tail) > cap * 0.9, type(value)
    # The count is of what is not shown whole: items of the list, characters of the string (not of its repr)
    head, count, _, tail = _cut_apart(harness._values.value_repr(numbers, cap))
    whole, start, end_of_head, start_of_tail = 0, 1, len(head), len(repr(numbers)) - len(tail)
    for n in numbers:  # where each item is in the whole repr
        whole += start + len(repr(n)) <= end_of_head or start >= start_of_tail
        start += len(repr(n)) + len(", ")
    assert count == len(numbers) - whole
    text = "\u00e9\n" * 10**5
    head, count, _, tail = _cut_apart(harness._values.value_repr(text, cap))
    assert count == len(text) - len(re.findall(r"\\n|\u00e9", head[1:])) - len(re.findall(r"\\n|\u00e9", tail[:-1]))
    head, count, _, tail = _cut_apart(harness._values.value_repr([["x" * 10**6]], cap))
    assert (head[:3], tail[-3:], count) == ("[['", "']]", 10**6 - (len(head) - 3) - (len(tail) - 3))
    # A str with nothing to escape is cut exactly as the cap cuts its whole repr.
    plain = "a" * 100_000 + "END"
    assert harness._values.value_repr(plain, cap) == harness._values.cut(repr(plain), cap)


def test_a_long_value_is_cut_without_making_its_whole_repr():
    import tracemalloc

    from runnerd.incage import harness

    class Counted:
        __slots__ = ()
        made = 0

        def __repr__(self) -> str:
            type(self).made += 1
            return "C"

    many = [Counted() for _ in range(10**6)]
    got = harness._values.value_repr(many, 8192)
    # Only the items the head and the tail show had their repr made (each once), not a million.
    assert len(got) <= 8192 and Counted.made <= 2 * (8192 // len("C, ")) + 2, Counted.made
    del many
    # What repr() would make: 88 MB for the list, 100 MB for the str; the cut ones take less than 1 MiB.
    for value in (list(range(10**7)), "a" * 10**8):
        started = not tracemalloc.is_tracing()
        tracemalloc.start()
        tracemalloc.reset_peak()
        try:
            got = harness._values.value_repr(value, 8192)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            if started:
                tracemalloc.stop()
        assert len(got) <= 8192 and "cut] ..." in got and peak < 2**20, (type(value), peak)


def test_a_repr_that_raises_or_nests_too_deep_inside_a_container_is_said_as_before():
    from runnerd.incage import harness

    class Bad:
        def __repr__(self) -> str:
            raise ZeroDivisionError

    deep: list[object] = []
    for _ in range(100_000):
        deep = [deep]
    for value, raised in (([Bad()], "ZeroDivisionError"), ([1] * 100_000 + [Bad()], "ZeroDivisionError"),
                          (deep, "RecursionError")):  # fmt: skip
        assert harness._values.value_repr(value, 8192) == f"<list object; repr() raised {raised}>"


# ---------------------------------------------------------------- issue 16: host steps and untrusted strings


def test_a_host_step_holds_its_own_fds_when_the_session_closes_under_it(tmp_path):
    """A walk in a thread keeps naming its session's /work though the cage's fds are closed and reused."""
    import threading

    from runnerd.sandbox.session_cage import SessionCage, snapshot

    mine, other = tmp_path / "mine", tmp_path / "other"
    for d, name in ((mine, "mine.txt"), (other, "other.txt")):
        (d / "figs").mkdir(parents=True)
        (d / name).write_text(name)
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
    cage = SessionCage(
        cgroup=None, ctl=None, work_fd=os.open(mine, flags), figures_fd=os.open(mine / "figs", flags), end=None
    )  # type: ignore[arg-type]
    closed, seen = threading.Event(), {}
    with cage.hold() as dirs:

        def walk() -> None:
            closed.wait(10)
            seen.update(snapshot(dirs.work))

        t = threading.Thread(target=walk)
        t.start()
        number = cage.work_fd
        cage.close_fds()  # the session ended under the walk
        reused = os.open(other, flags)  # another session's /work, maybe under the same number
        closed.set()
        t.join(10)
    os.close(reused)
    assert reused == number  # the number was reused: a walk by number would have seen other.txt
    assert set(seen) == {"mine.txt"}, seen
    with pytest.raises(Exception, match="gone"):
        with cage.hold():
            pass


def test_report_strings_are_valid_utf8():
    end = {"error": {"type": "ValueError", "message": "\udc80 x", "traceback": "\ud800"}, "value": "'\udfff'"}
    error = report.error_from_report(end)
    assert error is not None
    for text in (error.message, error.traceback, report.value_from_report(end, 100) or ""):
        text.encode("utf-8")  # would raise on a lone surrogate
        assert "\ufffd" in text


def test_cgroup_stats_since_are_per_run():
    before = cgroups.CgroupStats(oom_kills=1, peak_bytes=10, cpu_s=2.0, pids_limit_hits=3)
    after = cgroups.CgroupStats(oom_kills=1, peak_bytes=7, cpu_s=2.5, pids_limit_hits=3)
    assert after.since(before) == cgroups.CgroupStats(oom_kills=0, peak_bytes=7, cpu_s=0.5, pids_limit_hits=0)


def test_session_budget_takes_inputs_off_the_limit_and_refuses_what_does_not_fit():
    limits: list[int] = []
    usage = [0]
    budget = cgroups.SessionBudget(1000, 100, limits.append, lambda: usage[0])
    budget.apply()
    budget.reserve(300)
    usage[0] = 550
    with pytest.raises(JobRejected, match="session_memory_budget") as info:
        budget.reserve(100)  # 1000 - 100 - 300 - 550 = 50 free
    assert info.value.code == "BUSY"
    budget.release(300)
    assert limits == [900, 600, 900]


def test_files_past_the_count_caps_are_not_read(tmp_path, monkeypatch):
    """Issue 16: each file was read before the count caps were checked (16,000 files, 16,000 reads)."""
    work, figures = tmp_path / "work", tmp_path / "figures"
    work.mkdir()
    figures.mkdir()
    for i in range(200):
        (work / f"f{i:03}.txt").write_text("x")
        (work / f"g{i:03}.png").write_bytes(b"not an image")
    reads = []
    real = artifacts._read_capped
    monkeypatch.setattr(artifacts, "_read_capped", lambda path, cap: reads.append(path) or real(path, cap))
    limits = Limits(max_artifact_files=5, max_figures=3)
    out = collect(work, figures, exclude=frozenset(), limits=limits)
    assert len(out.files) == 5 and out.dropped
    assert len(reads) == 5  # the .png files are not images: files too, and the files were full
    text = "\n".join(out.warnings.final()[0])
    assert "more than 5 files" in text


@pytest.mark.parametrize("fmt, mime", [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("GIF", "image/gif")])
def test_a_figures_size_is_read_from_its_header_as_pil_reads_it(fmt: str, mime: str) -> None:
    import io

    from PIL import Image

    from runnerd.shown_figures import image_size

    for size in ((1, 1), (640, 480), (3000, 17)):
        out = io.BytesIO()
        Image.new("RGB", size).save(out, fmt, **({"progressive": True} if fmt == "JPEG" else {}))
        data = out.getvalue()
        assert image_size(data, mime) == size
        assert image_size(data[:9], mime) is None  # cut before the size
    other = "image/gif" if mime != "image/gif" else "image/png"
    assert image_size(data, other) is None  # a header must be what the mime says
    assert image_size(b"<svg/>", "image/svg+xml") is None


def test_what_a_model_is_shown_of_a_runs_figures() -> None:
    import struct

    from runnerd.result import Artifact
    from runnerd.shown_figures import MAX_FIGURE_PIXELS, MAX_SHOWN, shown

    def png(w: int, h: int) -> bytes:
        return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + struct.pack(">II", w, h) + b"\x08\x02\0\0\0"

    figures = [
        Artifact("huge.png", "image/png", png(MAX_FIGURE_PIXELS, 2)),
        Artifact("a.svg", "image/svg+xml", b"<svg/>"),
    ]
    figures += [Artifact(f"f{i}.png", "image/png", png(640, 480)) for i in range(MAX_SHOWN + 2)]
    out = shown(Result(Outcome.OK, None, figures=tuple(figures)))
    assert [f.name for f in out.figures] == [f"f{i}.png" for i in range(MAX_SHOWN)]
    assert [n.split(":")[0] for n in out.notes] == [
        "figure huge.png not shown", "figure a.svg not shown", f"figure f{MAX_SHOWN}.png not shown",
        f"figure f{MAX_SHOWN + 1}.png not shown",
    ]  # fmt: skip


def test_a_tools_text_is_cut_in_the_middle_with_a_line_saying_so() -> None:
    from runnerd.explain import MAX_TOOL_TEXT, cut, result_text

    assert cut("short") == "short"
    text = "".join(f"{i:06d}\n" for i in range(10_000))  # 70,000 characters
    out = cut(text)
    assert len(out) <= MAX_TOOL_TEXT + 60 and out.startswith("000000\n") and out.endswith("009999\n")
    assert f"[... {len(text) - MAX_TOOL_TEXT} characters cut ...]" in out
    assert len(result_text(Result(Outcome.OK, None, stdout=text))) <= MAX_TOOL_TEXT + 60
