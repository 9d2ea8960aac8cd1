"""Hostile code, each case through a real daemon.

Every case asserts that the attack failed, that no canary (a host file, the
daemon's environment) reached the result, that the job left nothing on the
host (processes, cgroups, mounts, job dirs), and that the daemon then
serves an ordinary job. The ``daemon`` fixture depends on
``cage_confirmed``: if the probe cannot confirm the cage (own pid namespace,
unprivileged uid, seccomp, no network), these tests fail without running.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import pytest

from runnerd.client import Client
from runnerd.result import Outcome, Reason, Result

from .conftest import CANARY, DaemonProc, describe_pids, wait_clean

pytestmark = pytest.mark.usefixtures("canary_files")

LIBC = "import ctypes, errno\nlibc = ctypes.CDLL(None, use_errno=True)\ndef err(r): return 'ok' if r >= 0 else errno.errorcode[ctypes.get_errno()]\n"


def everything(result: Result) -> str:
    parts = [repr(result)]
    parts += [a.data.decode("latin-1") for a in (*result.figures, *result.files)]
    return "\n".join(parts)


def hostile(daemon: DaemonProc, cage_confirmed, code: str, *, timeout: float | None = 10, **kw: Any) -> Result:
    """Run *code* through the daemon; check canaries, leftovers and that the daemon still serves."""
    with Client(daemon.ipc) as c:
        result = c.run(code, timeout=timeout, wait=120, **kw)
    assert CANARY not in everything(result), "a canary reached the result"
    left = wait_clean(cage_confirmed.config)
    assert not any(left.values()), f"the job left {left}: {describe_pids(left['processes'])}"
    with Client(daemon.tcp) as c:
        after = c.run("print(6 * 7)")
    assert after.ok and after.stdout == "42\n", after
    return result


@pytest.fixture
def attack(any_daemon, cage_confirmed):
    """Run hostile code through a cold daemon and, as a second case, through a warm one."""
    return lambda code, **kw: hostile(any_daemon, cage_confirmed, code, **kw)


def lines(result: Result) -> list[str]:
    return result.stdout.splitlines()


# ---------------------------------------------------------------- resources


def test_fork_bomb(attack):
    r = attack("import os\nwhile True:\n    try: os.fork()\n    except OSError: pass\n", timeout=3)
    assert r.outcome is Outcome.DEADLINE_EXCEEDED
    assert any("at the limit of 64" in w for w in r.warnings)


def test_memory_bomb(attack):
    r = attack("x = []\nwhile True: x.append(b'x' * (64 << 20))\n", timeout=20)
    assert r.reason is Reason.MEMORY_LIMIT and r.usage.max_rss_bytes <= 1 << 30


def test_memory_bomb_across_multiprocessing_children(attack):
    code = (
        "import multiprocessing as mp, time\n"
        "def hog(_):\n    blocks = [b'x' * (64 << 20) for _ in range(8)]\n    time.sleep(30)\n"
        "procs = [mp.Process(target=hog, args=(i,)) for i in range(4)]\n"
        "[p.start() for p in procs]\n[p.join() for p in procs]\n"
        "print('exit codes', [p.exitcode for p in procs])\n"
    )
    r = attack(code, timeout=15)
    assert r.usage.max_rss_bytes <= 1 << 30
    assert any("out-of-memory" in w for w in r.warnings), r.warnings


def test_busy_loop_past_the_deadline(attack):
    r = attack("while True: pass", timeout=2)
    assert r.outcome is Outcome.DEADLINE_EXCEEDED and r.usage.wall_s < 5


def test_sleep_past_the_deadline(attack):
    r = attack("import time\nprint('before', flush=True)\ntime.sleep(100)", timeout=2)
    assert r.outcome is Outcome.DEADLINE_EXCEEDED and r.stdout == "before\n"


def test_double_forked_setsid_daemon_dies_with_the_job(attack, cage_confirmed):
    code = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        for _ in range(600): time.sleep(0.1)\n"
        "    os._exit(0)\n"
        "time.sleep(0.3)\nprint('parent done')\n"
    )
    r = attack(code)  # hostile() already waits for: no jailed process left
    assert r.ok and r.stdout == "parent done\n"


def test_disk_fill_of_the_scratch_dir(attack):
    code = (
        "n = 0\nblock = b'x' * (1 << 20)\n"
        "try:\n    while True:\n        with open(f'fill{n // 64}.bin', 'ab') as f:\n            f.write(block); n += 1\n"
        "except OSError as e:\n    print('stopped', e.errno, n)\n"
    )
    r = attack(code)
    words = r.stdout.split()
    assert words[0] == "stopped" and words[1] == "28"  # ENOSPC: the job's tmpfs is full, not the host's disk
    assert 250 <= int(words[2]) <= 262
    # the four full 64 MiB files are over the per-file cap; the last, partial one comes back
    assert [f.name for f in r.files] == ["fill4.bin"] and len(r.files[0].data) < 16 << 20
    assert sum("bytes, over the 16777216-byte limit per file" in w for w in r.warnings) == 4


def test_inode_exhaustion_of_the_scratch_dir(attack):
    code = (
        "import os\nn = 0\n"
        "try:\n    while True:\n        open(f'f{n}', 'w').close(); n += 1\n"
        "except OSError as e:\n    print('stopped', e.errno, n)\n"
    )
    r = attack(code, timeout=20)
    words = r.stdout.split()
    assert words[0] == "stopped" and words[1] == "28" and int(words[2]) <= 16384 + 64
    assert len(r.files) == 32 and len(r.warnings) <= 25 and r.truncated


def test_huge_sparse_file(attack):
    code = (
        "import errno\nf = open('sparse.bin', 'wb')\n"
        "try:\n    f.truncate(1 << 40); print('1 TiB ok')\nexcept OSError as e:\n    print('1 TiB', errno.errorcode[e.errno])\n"
        "f.truncate(200 << 20); f.close(); print('200 MiB sparse ok')\n"
    )
    r = attack(code)
    assert lines(r) == ["1 TiB EFBIG", "200 MiB sparse ok"]
    assert not r.files and any("sparse.bin: 209715200 bytes" in w for w in r.warnings)


@pytest.mark.parametrize("where", ["/dev/shm", "/tmp"])
def test_fill_dev_shm_and_tmp(attack, where):
    code = (
        f"n = 0\ntry:\n    with open('{where}/fill', 'wb') as f:\n        while True:\n            f.write(b'x' * (1 << 20)); n += 1\n"
        "except OSError as e:\n    print(e.errno, n)\n"
    )
    r = attack(code)
    errno_, mib = map(int, r.stdout.split())
    assert errno_ == 28 and mib <= 64


def test_fd_exhaustion(attack):
    code = (
        "fds = []\ntry:\n    while True: fds.append(open('/dev/null'))\n"
        "except OSError as e:\n    print(e.errno, len(fds))\n"
    )
    r = attack(code)
    errno_, count = map(int, r.stdout.split())
    assert errno_ == 24 and count < 1024  # EMFILE at the nofile rlimit


def test_unbounded_recursion(attack):
    r = attack("def f(n): return f(n + 1)\nf(0)\n")
    assert r.reason is Reason.EXCEPTION and r.error.type == "RecursionError"
    assert len(r.error.traceback) < 40_000 and "Previous line repeated" in r.error.traceback


def test_recursion_past_the_c_stack(attack):
    r = attack("import sys\nsys.setrecursionlimit(10**8)\ndef f(n): return f(n + 1)\nf(0)\n")
    assert r.outcome is Outcome.FAILED and r.reason in (Reason.SIGNAL, Reason.EXCEPTION, Reason.MEMORY_LIMIT)


def test_thousands_of_threads(attack):
    code = (
        "import threading, time\nthreads = []\n"
        "try:\n    for i in range(5000):\n        t = threading.Thread(target=time.sleep, args=(5,), daemon=True); t.start(); threads.append(t)\n"
        "except RuntimeError as e:\n    print('stopped at', len(threads), e)\n"
    )
    r = attack(code)
    assert r.stdout.startswith("stopped at") and int(r.stdout.split()[2]) < 64


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_output_floods(attack, stream):
    r = attack(f"import sys\nwhile True: sys.{stream}.write('x' * 65536)\n", timeout=20)
    assert r.reason is Reason.OUTPUT_LIMIT
    assert len(getattr(r, stream)) < (1 << 20) + 200 and r.truncated


def test_hundreds_of_figures(attack):
    code = "import matplotlib.pyplot as plt\nfor i in range(300):\n    plt.figure(); plt.plot([0, i])\n"
    r = attack(code, timeout=30)
    assert r.ok and len(r.figures) == 32 and r.truncated
    assert any("268 open figure(s) not rendered" in w for w in r.warnings)


def test_one_huge_figure(attack):
    code = "import matplotlib.pyplot as plt\nplt.figure(figsize=(600, 600), dpi=100)\nplt.plot([1, 2])\n"
    r = attack(code, timeout=20)
    assert r.outcome is not Outcome.DEADLINE_EXCEEDED
    assert not r.figures  # too big to render, or to keep
    assert r.usage.max_rss_bytes <= 1 << 30


# ---------------------------------------------------------------- filesystem and leaks


def test_reading_host_files(attack, canary_files):
    paths = [str(p) for p in canary_files] + ["/etc/shadow", "/root/.bash_history", "/proc/1/root/etc/shadow"]
    code = (
        "for p in %r:\n    try:\n        print('READ', open(p).read())\n    except OSError as e:\n        print(type(e).__name__)\n"
        % paths
    )
    r = attack(code)
    assert "READ" not in r.stdout and len(lines(r)) == len(paths)


def test_walking_the_root(attack):
    code = (
        "import os\nseen = 0\ntop = sorted(os.listdir('/'))\nprint(top)\n"
        "print(os.listdir('/spool') if os.path.exists('/spool') else [])\n"
        "for d, subdirs, files in os.walk('/'):\n"
        "    if d.startswith(('/proc', '/usr', '/var/lib/runnerd/env')):\n        subdirs[:] = []\n        continue\n"
        "    for f in files:\n        seen += 1\n"
        "        try: open(os.path.join(d, f), 'rb').read(1 << 16)\n        except OSError: pass\n"
        "print('files', seen)\n"
    )
    r = attack(code, timeout=20)
    top = eval(lines(r)[0])  # a repr of a list of names
    # warm mode: /spool (where the zygote's jobs live) is there, covered and empty
    assert set(top) <= {
        "bin",
        "dev",
        "etc",
        "home",
        "lib",
        "lib64",
        "proc",
        "runnerd",
        "sbin",
        "spool",
        "tmp",
        "usr",
        "var",
        "work",
    }
    assert lines(r)[1] == "[]"
    assert "root" not in top and "sys" not in top


def test_the_daemons_environment_does_not_leak(attack):
    code = (
        "import os\nprint(sorted(os.environ))\n"
        "for p in ('/proc/self/environ', '/proc/1/environ'):\n"
        "    try: print(open(p, 'rb').read())\n    except OSError as e: print(p, e)\n"
    )
    r = attack(code)
    names = eval(lines(r)[0])
    assert "RUNNERD_TEST_CANARY" not in names and "PATH" in names
    assert set(names) <= {"PATH", "HOME", "USER", "LANG", "LC_ALL", "TMPDIR", "MPLCONFIGDIR", "MPLBACKEND",
                          "TF_CPP_MIN_LOG_LEVEL", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                          "RUNNERD_MAX_FIGURES"}  # fmt: skip


def test_inherited_file_descriptors(attack):
    code = (
        "import os\nfor fd in sorted(int(x) for x in os.listdir('/proc/self/fd')):\n"
        "    try: print(fd, os.readlink(f'/proc/self/fd/{fd}'))\n    except OSError: pass\n"
    )
    r = attack(code)
    targets = [line.split(" ", 1)[1] for line in lines(r)]
    assert not any(t.startswith("socket:") for t in targets), targets  # none of the daemon's sockets
    assert all(t.startswith(("pipe:", "/dev/null", "/proc/")) for t in targets), targets
    assert len(targets) <= 5


def test_proc_and_sys(attack):
    code = (
        "import os\nprint(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))\n"
        "print(os.path.exists('/sys/kernel'))\n"
        "for path, mode in (('/proc/kcore', 'rb'), ('/proc/sysrq-trigger', 'w'), ('/proc/sys/kernel/hostname', 'w'), ('/proc/1/mem', 'rb')):\n"
        "    try:\n        f = open(path, mode); f.write('x') if 'w' in mode else f.read(16); print('OPEN', path)\n"
        "    except OSError as e:\n        print(type(e).__name__)\n"
    )
    r = attack(code)
    out = lines(r)
    assert eval(out[0]) == [1, 2]  # the cage's init and the job: nothing of the host
    assert out[1] == "False" and not any(line.startswith("OPEN") for line in out)


def test_device_files(attack):
    code = (
        LIBC + "import os\nprint(sorted(os.listdir('/dev')))\n"
        "print(err(libc.mknod(b'/work/sda', 0o60600, os.makedev(8, 0))))\n"
        "for p in ('/dev/mem', '/dev/sda', '/dev/kmsg', '/dev/tty'):\n"
        "    print(os.path.exists(p))\n"
    )
    r = attack(code)
    out = lines(r)
    assert eval(out[0]) == sorted(
        ["fd", "full", "null", "random", "shm", "stderr", "stdin", "stdout", "urandom", "zero"]
    )
    assert out[1] == "EPERM" and out[2:] == ["False"] * 4


def test_writing_inputs(attack):
    data = b"a,b\n1,2\n"
    code = (
        "import hashlib, os, shutil\n"
        "for attempt in (lambda: open('data.csv', 'w'), lambda: os.remove('data.csv'), lambda: shutil.move('data.csv', 'x'),\n"
        "                lambda: os.utime('data.csv', (0, 0)), lambda: os.link('data.csv', 'hard.csv'),\n"
        "                lambda: os.symlink('/etc/passwd', 'data.csv')):\n"
        "    try: attempt(); print('CHANGED')\n    except OSError as e: print(type(e).__name__)\n"
        "print(hashlib.sha256(open('data.csv', 'rb').read()).hexdigest())\n"
    )
    r = attack(code, files={"data.csv": data})
    import hashlib

    assert "CHANGED" not in r.stdout and lines(r)[-1] == hashlib.sha256(data).hexdigest()


def test_writing_usr_and_the_interpreter(attack, cage_confirmed):
    env = cage_confirmed.config.sandbox_env
    targets = ["/usr/bin/python3.11", f"{env}/bin/python3", f"{env}/lib/python3.11/site-packages/numpy/__init__.py",
               "/usr/lib/python3.11/os.py", "/etc/passwd", "/runnerd/harness.py", "/runnerd/main.py"]  # fmt: skip
    code = (
        "for p in %r:\n    try: open(p, 'ab').write(b'#'); print('WROTE', p)\n    except OSError as e: print(type(e).__name__)\n"
        % targets
    )
    r = attack(code)
    assert "WROTE" not in r.stdout and len(lines(r)) == len(targets)


def test_links_and_fifos_among_the_outputs(attack):
    code = (
        "import os, socket\n"
        "os.symlink('/etc/passwd', 'passwd.png'); os.symlink('/runnerd-test', 'x.txt'); os.symlink('.', 'loop')\n"
        "os.symlink('/proc/self/environ', 'env.txt'); os.mkfifo('fifo.png'); os.mkfifo('fifo.txt')\n"
        "s = socket.socket(socket.AF_UNIX); s.bind('sock.txt')\n"
        "os.mkdir('d'); os.symlink('/usr', 'd/usr')\n"
        "for src in ('/usr/bin/python3.11', '/etc/passwd'):\n"
        "    try: os.link(src, os.path.basename(src)); print('LINKED', src)\n    except OSError as e: print(type(e).__name__)\n"
        "open('real.txt', 'w').write('mine'); os.link('real.txt', 'real2.txt')\n"
    )
    t0 = time.monotonic()
    r = attack(code)
    assert time.monotonic() - t0 < 10  # the collector never blocked on a FIFO
    assert "LINKED" not in r.stdout
    assert sorted(f.name for f in r.files) == ["real.txt", "real2.txt"] and not r.figures
    skipped = " ".join(r.warnings)
    for name in ("passwd.png", "x.txt", "loop", "env.txt", "fifo.png", "fifo.txt", "sock.txt", "d/usr"):
        assert name in skipped


def test_nothing_is_left_for_the_next_job(any_daemon):
    daemon = any_daemon
    write = (
        "import os\nfor p in ('/work/left.txt', '/tmp/left.txt', '/dev/shm/left.txt', os.path.expanduser('~/left.txt')):\n"
        "    open(p, 'w').write('from the last job')\n"
    )
    look = (
        "import os\nfor p in ('/work/left.txt', '/tmp/left.txt', '/dev/shm/left.txt', os.path.expanduser('~/left.txt')):\n"
        "    print(os.path.exists(p))\nprint(sorted(os.listdir('/work')), sorted(os.listdir('/tmp')))\n"
    )
    with Client(daemon.ipc) as c:
        for _ in range(3):  # in warm mode, on either zygote
            assert c.run(write).ok
            r = c.run(look)
            assert lines(r) == ["False"] * 4 + ["[] []"]


# ---------------------------------------------------------------- network


def test_outside_addresses_and_dns(attack):
    code = (
        "import socket, errno\n"
        "for addr in (('1.1.1.1', 443), ('8.8.8.8', 53), ('151.101.0.223', 443)):\n"
        "    s = socket.socket(); s.settimeout(3)\n"
        "    try: s.connect(addr); print('CONNECTED')\n    except OSError as e: print(errno.errorcode.get(e.errno, e))\n"
        "u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "try: u.sendto(b'x', ('8.8.8.8', 53)); print('SENT')\nexcept OSError as e: print(errno.errorcode[e.errno])\n"
        "try: socket.getaddrinfo('pypi.org', 443); print('RESOLVED')\nexcept OSError as e: print('dns', type(e).__name__)\n"
    )
    r = attack(code)
    assert lines(r) == ["ENETUNREACH"] * 4 + ["dns gaierror"]


def test_a_service_on_the_hosts_loopback(attack):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.5)
    port = server.getsockname()[1]
    try:
        code = (
            "import socket, errno\ns = socket.socket(); s.settimeout(3)\n"
            f"try: s.connect(('127.0.0.1', {port})); print('CONNECTED')\n"
            "except OSError as e: print(errno.errorcode[e.errno])\n"
        )
        r = attack(code)
        assert r.stdout == "ENETUNREACH\n"
        with pytest.raises(socket.timeout):
            server.accept()  # nobody ever reached it
    finally:
        server.close()


def test_netlink_and_raw_sockets(attack):
    code = (
        "import socket, fcntl, struct, errno\n"
        "for fam, kind, proto in ((socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP), (socket.AF_PACKET, socket.SOCK_RAW, 0),\n"
        "                         (socket.AF_INET6, socket.SOCK_RAW, 58)):\n"
        "    try: socket.socket(fam, kind, proto); print('OPENED')\n    except OSError as e: print(errno.errorcode[e.errno])\n"
        "n = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)  # NETLINK_ROUTE: sees only the empty namespace\n"
        "print([name for _, name in socket.if_nameindex()])\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "try: fcntl.ioctl(s, 0x8914, struct.pack('16sH', b'lo', 1)); print('LO UP')\nexcept OSError as e: print(errno.errorcode[e.errno])\n"
    )
    r = attack(code)
    assert lines(r) == ["EPERM", "EPERM", "EPERM", "['lo']", "EPERM"]


def test_vsock(attack):
    r = attack(
        "import socket\ntry: socket.socket(40, socket.SOCK_STREAM); print('OPENED')\nexcept OSError as e: print(e.errno)\n"
    )
    assert r.stdout == "1\n"


def test_the_daemons_own_ipc_socket(attack, any_daemon):
    path = any_daemon.ipc[len("ipc://") :]
    code = (
        "import socket\ns = socket.socket(socket.AF_UNIX)\n"
        f"try: s.connect({path!r}); print('CONNECTED')\nexcept OSError as e: print(type(e).__name__)\n"
        f"try: s2 = socket.socket(socket.AF_UNIX); s2.connect('\\0' + {path!r}); print('CONNECTED')\nexcept OSError as e: print(type(e).__name__)\n"
    )
    r = attack(code)
    assert lines(r) == ["FileNotFoundError", "ConnectionRefusedError"]


# ---------------------------------------------------------------- privilege and syscalls


def test_setuid_root(attack):
    code = (
        "import os\nfor f in (lambda: os.setuid(0), lambda: os.setgid(0), lambda: os.setresuid(0, 0, 0), lambda: os.setgroups([0])):\n"
        "    try: f(); print('BECAME ROOT')\n    except OSError as e: print(type(e).__name__)\n"
        "print(os.getuid(), os.geteuid(), os.getgid())\n"
    )
    r = attack(code)
    assert "BECAME ROOT" not in r.stdout and lines(r)[-1] == "1000 1000 1000"


def test_ptrace(attack):
    r = attack(LIBC + "print(err(libc.ptrace(16, 1, 0, 0)), err(libc.ptrace(0, 0, 0, 0)))\n")
    assert r.stdout == "EPERM EPERM\n"


def test_unshare_and_namespace_clones(attack):
    code = LIBC + (
        "for flag in (0x10000000, 0x20000000, 0x40000000, 0x00020000, 0x08000000, 0x04000000, 0x02000000):\n"
        "    print(err(libc.unshare(flag)), err(libc.syscall(56, flag | 17, 0, 0, 0, 0)))\n"
        "print(err(libc.setns(0, 0)))\n"
    )
    r = attack(code)
    assert lines(r) == ["EPERM EPERM"] * 7 + ["EPERM"]


def test_mount_and_chroot_escape(attack):
    code = LIBC + (
        "import os\n"
        "print(err(libc.mount(b'none', b'/tmp', b'tmpfs', 0, None)), err(libc.umount2(b'/work', 2)))\n"
        "print(err(libc.syscall(430, b'tmpfs', 0)), err(libc.syscall(428, -100, b'/', 0)))\n"  # fsopen, open_tree
        "print(err(libc.chroot(b'/tmp')), err(libc.syscall(155, b'/tmp', b'/tmp')))\n"  # chroot, pivot_root
        "os.chdir('../../../../..'); print(os.getcwd(), sorted(os.listdir('.'))[:3])\n"
    )
    r = attack(code)
    out = lines(r)
    assert out[:3] == ["EPERM EPERM", "EPERM EPERM", "EPERM EPERM"]
    assert out[3].startswith("/ ['bin', 'dev', 'etc']")


def test_raw_syscalls_for_kernel_attack_surface(attack):
    calls = {"bpf": 321, "perf_event_open": 298, "userfaultfd": 323, "keyctl": 250, "add_key": 248, "request_key": 249,
             "io_uring_setup": 425, "io_uring_enter": 426, "kexec_load": 246, "init_module": 175, "finit_module": 313,
             "process_vm_readv": 310, "pidfd_getfd": 438, "open_by_handle_at": 304, "perf_event_open_again": 298}  # fmt: skip
    code = LIBC + "for name, nr in %r.items():\n    print(name, err(libc.syscall(nr, 0, 0, 0, 0, 0)))\n" % calls
    r = attack(code)
    assert lines(r) == [f"{name} EPERM" for name in calls]


def test_tiocsti_and_tioclinux(attack):
    code = (
        "import fcntl, errno\nfor req in (0x5412, 0x541C):\n"
        "    for fd in (0, 1, 2):\n"
        "        try: fcntl.ioctl(fd, req, b'x'); print('INJECTED')\n        except OSError as e: print(errno.errorcode[e.errno])\n"
    )
    r = attack(code)
    assert lines(r) == ["EPERM"] * 6


def test_32_bit_int_0x80_is_killed(attack):
    code = (
        "import ctypes, mmap\n"
        "code = bytes([0xb8, 20, 0, 0, 0, 0xcd, 0x80, 0xc3])  # mov eax, 20 (getpid); int 0x80; ret\n"
        "m = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)\nm.write(code)\n"
        "f = ctypes.CFUNCTYPE(ctypes.c_long)(ctypes.addressof(ctypes.c_char.from_buffer(m)))\n"
        "print('before', flush=True)\nprint('int 0x80 returned', f(), flush=True)\n"
    )
    r = attack(code)
    assert r.reason is Reason.SIGNAL and r.exit_code == -31 and r.stdout == "before\n"  # SIGSYS


def test_x32_syscall_numbers(attack):
    code = LIBC + "for nr in (39, 101, 521, 272, 321):\n    print(err(libc.syscall(0x40000000 | nr, 0, 0, 0, 0)))\n"
    r = attack(code)
    assert lines(r) == ["ENOSYS"] * 5


def test_kill_minus_one(attack, cage_confirmed):
    code = (
        "import os, signal, time\nkids = []\n"
        "for _ in range(3):\n    pid = os.fork()\n    if pid == 0:\n        time.sleep(30); os._exit(0)\n    kids.append(pid)\n"
        "os.kill(-1, signal.SIGKILL)\n"
        "print('alive', [os.waitpid(k, 0)[1] for k in kids])\n"
    )
    r = attack(code)
    assert r.ok and r.stdout == "alive [9, 9, 9]\n"  # it killed only its own children


def test_capabilities_cannot_be_raised(attack):
    code = (
        "import ctypes, errno\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "status = dict(l.split(':', 1) for l in open('/proc/self/status'))\n"
        "print(status['CapEff'].strip(), status['CapBnd'].strip(), status['NoNewPrivs'].strip())\n"
        "hdr = (ctypes.c_uint32 * 2)(0x20080522, 0)\ndata = (ctypes.c_uint32 * 6)(0xffffffff, 0xffffffff, 0, 0xffffffff, 0xffffffff, 0)\n"
        "print(libc.capset(hdr, data), errno.errorcode[ctypes.get_errno()])\n"
    )
    r = attack(code)
    assert lines(r) == ["0000000000000000 0000000000000000 1", "-1 EPERM"]


# ---------------------------------------------------------------- cross-job


def test_two_jobs_at_once_cannot_see_or_touch_each_other(any_daemon, cage_confirmed):
    daemon = any_daemon
    first = (
        "import os, socket, time\n"
        "for p in ('/work/a-secret', '/tmp/a-secret', '/dev/shm/a-secret', os.path.expanduser('~/a-secret')):\n"
        "    open(p, 'w').write('A')\n"
        "srv = socket.socket(socket.AF_UNIX); srv.bind('\\0runnerd-job-a'); srv.listen()\n"
        "print('A ready', flush=True)\ntime.sleep(4)\n"
        "print('A intact', all(os.path.exists(p) for p in ('/work/a-secret', '/tmp/a-secret', '/dev/shm/a-secret')))\n"
    )
    second = (
        "import os, socket, signal\n"
        "print(os.listdir('/work'), os.listdir('/tmp'), os.listdir('/dev/shm'), os.listdir(os.path.expanduser('~')))\n"
        "c = socket.socket(socket.AF_UNIX)\n"
        "try: c.connect('\\0runnerd-job-a'); print('CONNECTED')\nexcept OSError as e: print(type(e).__name__)\n"
        "print(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))\n"
        "for pid in (1, 2, 3):\n"
        "    try: os.kill(pid, 0); print(pid, 'exists')\n    except OSError as e: print(pid, type(e).__name__)\n"
        "try: os.kill(-1, signal.SIGKILL); print('killed all it could')\nexcept OSError as e: print(type(e).__name__)\n"
    )
    out: dict[str, Result] = {}

    def run_first() -> None:
        with Client(daemon.ipc) as c:
            out["a"] = c.run(first, timeout=20)

    t = threading.Thread(target=run_first)
    t.start()
    deadline = time.monotonic() + 20
    with Client(daemon.tcp) as c:
        while c.stats()["running"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.8)  # A has written its files and bound its socket
        out["b"] = c.run(second, timeout=10)
    t.join(timeout=30)
    a, b = out["a"], out["b"]
    assert a.ok and lines(a) == ["A ready", "A intact True"], a
    got = lines(b)
    assert "a-secret" not in b.stdout
    assert got[0] == "[] [] [] ['.config']"
    assert got[1] == "ConnectionRefusedError"
    assert got[2] == "[1, 2]"  # its own init and itself: not A's processes
    assert got[3:6] == ["1 exists", "2 exists", "3 ProcessLookupError"]
    left = wait_clean(cage_confirmed.config)
    assert not any(left.values()), left
