"""The daemons ``runnerd bench`` starts: one per mode, its own ipc socket, stopped before the next."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from ..errors import ClientError, RunnerdError

# The daemons the bench started, by endpoint -> pid: S4 reads their process tree.
STARTED: dict[str, int] = {}


class BenchDaemon:
    """A daemon started for the bench: the given config file, its own ipc socket, a given mode (and CPUs)."""

    def __init__(self, config_path: Path | None, mode: str, concurrency: int | None, cpus: str | None = None) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="runnerd-bench-")
        self.endpoint = f"ipc://{self.tmp.name}/bench.sock"
        argv = ["taskset", "-c", cpus] if cpus else []  # its cages inherit the affinity
        argv += [sys.executable, "-m", "runnerd"]
        if config_path is not None:
            argv += ["--config", str(config_path)]
        argv += ["serve", "--bind", self.endpoint, "--mode", mode]
        if concurrency:
            argv += ["--concurrency", str(concurrency)]
        self.log = Path(self.tmp.name) / "daemon.log"
        self.proc = subprocess.Popen(
            argv, stdout=open(self.log, "wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        STARTED[self.endpoint] = self.proc.pid

    def wait_ready(self, timeout: float = 300) -> None:
        from ..client import Client

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RunnerdError(f"the bench's daemon exited:\n{self.log.read_text()[-3000:]}")
            try:
                with Client(self.endpoint) as c:
                    c.ping(timeout=1)
                return
            except ClientError:
                time.sleep(0.2)
        raise RunnerdError(f"the bench's daemon did not come up:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        STARTED.pop(self.endpoint, None)
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.tmp.cleanup()


@contextlib.contextmanager
def started(
    config_path: Path | None, mode: str, concurrency: int | None, cpus: str | None = None
) -> Iterator[BenchDaemon]:
    d = BenchDaemon(config_path, mode, concurrency, cpus)
    try:
        d.wait_ready()
        yield d
    finally:
        d.stop()
