"""One job in a real nsjail cage, end to end: what the cage issue promises."""

from __future__ import annotations

import logging
import signal
import struct

import psutil
import pytest

from runnerd.result import Outcome, Reason
from runnerd.sandbox.artifacts import MAX_WARNINGS, sniff_image
from runnerd.sandbox.sandbox_env import LIBRARIES

from .conftest import assert_serves, wait_clean


def png_size(data: bytes) -> tuple[int, int]:
    assert sniff_image(data) == "image/png"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_print(run):
    result = run("print('hello')\nimport sys\nprint('oops', file=sys.stderr)")
    assert result.outcome is Outcome.OK and result.reason is None
    assert result.stdout == "hello\n"
    assert result.stderr == "oops\n"
    assert result.exit_code == 0 and result.error is None
    assert result.usage.wall_s > 0 and result.usage.max_rss_bytes > 1 << 20


def test_exception_lineno_and_clean_traceback(run):
    code = "import json\n\ndef load(d):\n    return d['missing']\n\nprint('before')\nload({})\n"
    result = run(code)
    assert result.outcome is Outcome.FAILED and result.reason is Reason.EXCEPTION
    assert result.stdout == "before\n"
    err = result.error
    assert err is not None
    assert err.type == "KeyError" and err.message == "'missing'"
    assert err.lineno == 4  # the innermost line of the user's own code
    assert 'File "main.py", line 7, in <module>' in err.traceback
    assert 'File "main.py", line 4, in load' in err.traceback
    assert "return d['missing']" in err.traceback
    for harness_word in ("harness", "/runnerd/", "exec(", "runpy"):
        assert harness_word not in err.traceback
    # stderr shows the same cut traceback, as python would print it
    assert "KeyError: 'missing'" in result.stderr and "harness" not in result.stderr


def test_library_internal_frames_are_cut(run):
    code = "import pandas as pd\ndf = pd.DataFrame({'a': [1]})\ndf['nope']\n"
    result = run(code)
    assert result.reason is Reason.EXCEPTION
    assert result.error.type == "KeyError" and result.error.lineno == 3
    tb = result.error.traceback
    assert "site-packages" not in tb and "pandas/core" not in tb
    assert "df['nope']" in tb


def test_syntax_error(run):
    result = run("print('never')\nif x = 3:\n    pass\n")
    assert result.reason is Reason.EXCEPTION
    assert result.stdout == ""
    assert result.error.type == "SyntaxError"
    assert result.error.lineno == 2
    assert "if x = 3:" in result.error.traceback and "^" in result.error.traceback


def test_exit_3_is_a_nonzero_exit_not_a_crash(run):
    result = run("print('bye')\nexit(3)\n")
    assert result.outcome is Outcome.FAILED and result.reason is Reason.EXIT
    assert result.exit_code == 3 and result.error is None
    assert result.stdout == "bye\n"


def test_exit_zero_and_os_exit(run):
    assert run("import sys; sys.exit(0)").ok
    result = run("import os; print('x', flush=True); os._exit(5)")
    assert (result.reason, result.exit_code, result.stdout) == (Reason.EXIT, 5, "x\n")


def test_killed_by_signal(run):
    result = run("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    assert result.reason is Reason.SIGNAL and result.exit_code == -11


def test_nsjail_killed_under_the_job_is_a_sandbox_error(run, cage_confirmed, caplog):
    # The cage's own death is not the code's fault: not reason "signal", and
    # the operator hears of it, by job id. (A signal that kills the user's
    # process is still "signal": test_killed_by_signal.)
    killed: list[int] = []

    def kill_nsjail_once_running(stream: str, data: bytes) -> None:
        if b"ready" in data and not killed:
            for cage_proc in psutil.Process().children():
                try:
                    if cage_proc.name() == "nsjail":
                        cage_proc.send_signal(signal.SIGKILL)
                        killed.append(cage_proc.pid)
                except psutil.Error:
                    continue  # another child of this process, gone meanwhile

    code = "import time\nprint('ready', flush=True)\ntime.sleep(20)\n"
    with caplog.at_level(logging.WARNING, logger="runnerd"):
        result = run(code, timeout=25, on_output=kill_nsjail_once_running, job_id="cold-nsjail-killed")
    assert len(killed) == 1
    assert result.outcome is Outcome.FAILED and result.reason is Reason.SANDBOX_ERROR, result
    assert result.exit_code is None and result.error is None
    assert result.stdout.startswith("ready")  # kept: what the job printed before the cage died
    assert any("nsjail was killed by SIGKILL while the job ran" in w for w in result.warnings), result.warnings
    assert 0 < result.usage.wall_s < 20
    logged = [r for r in caplog.records if r.levelno == logging.WARNING and "cold-nsjail-killed" in r.getMessage()]
    assert logged and "sandbox error" in logged[0].getMessage()
    assert not any(wait_clean(cage_confirmed.config).values())
    assert_serves(cage_confirmed)


def test_deadline_keeps_partial_output(run, cage_confirmed):
    result = run("import time\nprint('started', end='')\ntime.sleep(60)\n", timeout=2)
    assert result.outcome is Outcome.DEADLINE_EXCEEDED and result.reason is Reason.TIMEOUT
    assert result.stdout == "started"
    assert 2.0 <= result.usage.wall_s < 10
    assert_serves(cage_confirmed)


def test_memory_bomb(run, cage_confirmed):
    code = "x = []\nwhile True:\n    x.append(bytearray(64 * 1024 * 1024))\n"
    result = run(code, timeout=20)
    assert result.outcome is Outcome.FAILED and result.reason is Reason.MEMORY_LIMIT
    assert result.usage.max_rss_bytes <= cage_confirmed.policy.limits.memory_bytes
    assert any("out-of-memory" in w for w in result.warnings)
    assert_serves(cage_confirmed)


def test_no_network(run):
    code = (
        "import socket, errno\n"
        "for addr in [('1.1.1.1', 53), ('93.184.216.34', 80), ('127.0.0.1', 22)]:\n"
        "    s = socket.socket(); s.settimeout(3)\n"
        "    try:\n"
        "        s.connect(addr); print('CONNECTED', addr)\n"
        "    except OSError as e:\n"
        "        print(errno.errorcode[e.errno])\n"
        "try:\n"
        "    socket.getaddrinfo('example.com', 80); print('RESOLVED')\n"
        "except OSError as e:\n"
        "    print('dns failed')\n"
    )
    result = run(code)
    assert result.ok, result
    assert "CONNECTED" not in result.stdout and "RESOLVED" not in result.stdout
    assert result.stdout.splitlines()[:3] == ["ENETUNREACH"] * 3


def test_input_readable_by_bare_name_and_not_writable(run):
    data = b"a,b\n1,2\n3,4\n"
    code = (
        "import os, pandas as pd\n"
        "print(pd.read_csv('data.csv')['b'].sum())\n"
        "print(open('d\u00f6:2 x.txt').read())\n"
        "for attempt in (lambda: open('data.csv', 'w'), lambda: open('data.csv', 'a'),\n"
        "                lambda: os.remove('data.csv'), lambda: os.rename('data.csv', 'x.csv'),\n"
        "                lambda: os.chmod('data.csv', 0o777), lambda: os.truncate('data.csv', 0)):\n"
        "    try:\n"
        "        attempt(); print('CHANGED')\n"
        "    except OSError as e:\n"
        "        print(type(e).__name__)\n"
        "print(open('data.csv', 'rb').read() == %r)\n" % data
    )
    result = run(code, files={"data.csv": data, "d\u00f6:2 x.txt": b"odd name"})
    assert result.ok, result
    lines = result.stdout.splitlines()
    assert lines[0] == "6" and lines[1] == "odd name"
    assert "CHANGED" not in result.stdout
    assert lines[-1] == "True"
    # inputs are not returned as outputs
    assert not result.files and not result.figures


def test_saved_png_and_open_figure(run):
    code = (
        "import matplotlib.pyplot as plt\n"
        "plt.plot([1, 2, 3], [3, 1, 2]); plt.savefig('saved.png')  # saved: returned once, as saved.png\n"
        "plt.figure(figsize=(4, 3)); plt.scatter([1, 2], [2, 1])  # never saved: rendered\n"
        "plt.figure(); plt.plot([1, 2]); plt.savefig('then.png'); plt.title('changed after saving')  # rendered\n"
        "import os; os.makedirs('plots', exist_ok=True)\n"
        "plt.figure(); plt.bar(['a'], [1]); plt.savefig('plots/bar.jpg'); plt.close()\n"
        "plt.figure()  # empty: no axes, shows nothing in a notebook either\n"
    )
    result = run(code)
    assert result.ok, result
    names = [f.name for f in result.figures]
    assert names == ["plots/bar.jpg", "saved.png", "then.png", "figure_001.png", "figure_002.png"]
    by_name = {f.name: f for f in result.figures}
    assert by_name["plots/bar.jpg"].mime == "image/jpeg"
    assert png_size(by_name["saved.png"].data) == (640, 480)
    assert png_size(by_name["figure_001.png"].data)[0] < png_size(by_name["figure_002.png"].data)[0]  # 4x3 in
    for name in ("figure_001.png", "figure_002.png"):
        w, h = png_size(by_name[name].data)
        assert w > 100 and h > 100
    assert result.stderr == ""  # no "non-interactive backend" warning


def test_show_renders_and_closes(run):
    code = (
        "import matplotlib.pyplot as plt\n"
        "for i in range(3):\n"
        "    plt.plot(range(i + 2)); plt.show()\n"
        "print(plt.get_fignums())\n"
    )
    result = run(code)
    assert result.ok and result.stdout == "[]\n"
    assert [f.name for f in result.figures] == ["figure_001.png", "figure_002.png", "figure_003.png"]


def test_other_files_come_back(run):
    code = "open('out.csv', 'w').write('x,y\\n1,2\\n')\nopen('fake.png', 'w').write('not an image')\n"
    result = run(code)
    assert result.ok
    files = {f.name: f for f in result.files}
    assert files["out.csv"].data == b"x,y\n1,2\n" and files["out.csv"].mime == "text/csv"
    assert files["fake.png"].mime == "application/octet-stream"
    assert not result.figures
    assert any("fake.png is not a valid PNG" in w for w in result.warnings)


def test_symlink_to_host_file_is_not_returned(run, state_dir):
    canary = state_dir / "canary.txt"
    secret = "CANARY-7f3a9c-host-secret"
    canary.write_text(secret)
    canary.chmod(0o644)
    code = (
        f"import os\n"
        f"os.symlink({str(canary)!r}, 'leak.png')\n"
        f"os.symlink('/etc/passwd', 'passwd.txt')\n"
        f"os.mkfifo('pipe.png')\n"
        f"try:\n"
        f"    print(open({str(canary)!r}).read())\n"
        f"except OSError as e:\n"
        f"    print('cannot read', type(e).__name__)\n"
    )
    result = run(code)
    assert result.ok
    everything = repr(result)
    assert secret not in everything
    assert not result.figures and not result.files
    assert result.stdout == "cannot read FileNotFoundError\n"
    assert any("leak.png: a symbolic link" in w for w in result.warnings)
    assert any("pipe.png: not a regular file" in w for w in result.warnings)


def test_a_dropped_output_is_named_before_skipped_links(run):
    code = (
        "import os\n"
        "with open('results.bin', 'wb') as f:\n    f.write(os.urandom(32 << 20))\n"
        "for i in range(100):\n    os.symlink('results.bin', f'alias{i:03}.bin')\n"
    )
    result = run(code, timeout=20)
    assert result.ok and result.truncated and not result.files
    assert result.warnings[0] == "dropped results.bin: 33554432 bytes, over the 16777216-byte limit per file"
    assert len(result.warnings) == MAX_WARNINGS + 1  # bounded: the rest of the links are one count line
    assert result.warnings[-1] == "... and 81 more not returned or returned as plain files: 81 symbolic link(s)"


def test_50mb_print_is_capped(run, cage_confirmed):
    cap = cage_confirmed.config.limits.max_output_bytes
    code = "import sys\nprint('HEAD')\nsys.stdout.write('x' * 50_000_000)\nprint()\nprint('TAIL')\n"
    result = run(code)
    assert result.outcome is Outcome.OK
    assert result.truncated
    assert len(result.stdout.encode()) < cap + 200
    assert result.stdout.startswith("HEAD\n") and result.stdout.endswith("TAIL\n")
    assert "bytes of stdout omitted" in result.stdout
    assert any(w.startswith("stdout: 50000011 bytes") for w in result.warnings)


def test_fork_bomb_is_contained(run, cage_confirmed):
    code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    result = run(code, timeout=3)
    assert result.outcome is Outcome.DEADLINE_EXCEEDED
    assert any("at the limit of 64" in w for w in result.warnings)
    assert_serves(cage_confirmed)


@pytest.mark.slow
def test_every_library_imports_in_the_cage(run):
    names = list(LIBRARIES.values())
    code = (
        "import importlib\n"
        f"for name in {names!r}:\n"
        "    try:\n"
        "        importlib.import_module(name); print('ok', name)\n"
        "    except BaseException as e:\n"
        "        print('FAIL', name, repr(e))\n"
    )
    result = run(code, timeout=30)
    assert result.ok, result
    assert result.stdout.splitlines() == [f"ok {n}" for n in names]
    assert len(names) == 37
