"""``runnerd drain``: tell the daemon on this host to drain (SIGUSR1), and watch it do so.

The daemon is found through its local ipc endpoint: its ``ping`` says its
pid, which must be a ``runnerd serve`` process here (a tcp endpoint could be
another host's, where the pid means nothing). docs/protocol.md, Draining.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import psutil

from .client import Client
from .errors import RunnerdError

POLL_S = 0.1


def drain(endpoint: str, timeout: float, *, wait: bool = False) -> tuple[dict[str, Any], bool]:
    """Send SIGUSR1; then the last pong, and whether it drains (with *wait*: and has nothing left) in time."""
    if not endpoint.startswith("ipc://"):
        raise RunnerdError(f"{endpoint}: drain a daemon through its local ipc endpoint, on its own host")
    with Client(endpoint) as client:
        pid = client.ping(timeout=timeout).get("pid")
        try:
            cmdline = psutil.Process(pid).cmdline() if isinstance(pid, int) else []
        except psutil.Error:
            cmdline = []
        if not isinstance(pid, int) or "serve" not in cmdline:
            raise RunnerdError(f"{endpoint}: pid {pid!r} is not a runnerd serve process of this host")
        os.kill(pid, signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while True:
            pong = client.ping(timeout=timeout)
            done = pong.get("state") == "draining"
            if wait:
                done = done and not pong.get("running") and not pong.get("sessions_open")
            if done or time.monotonic() > deadline:
                return pong, done
            time.sleep(POLL_S)
