"""A session zygote, host side: a full zygote whose armed children go to sessions, not jobs.

Sessions fork from zygotes of their own (warm_session_zygotes), so an open
never waits for a job to end. A :class:`SessionZygote` is a
:class:`~.zygotes.Zygote` (its cage, its control socket, its arming) whose
children differ in three ways: each has a CPU quota of its own (sessions
live side by side, where a job zygote runs one job at a time) and joins the
freezer (a session is frozen between its runs); its spool holds nothing (a
session's files are in tmpfs mounts of their own); and :meth:`open_session`
gives the armed child to a session (incage/session_init.py inside the
cage), which lives in this zygote's cage until it ends: the zygote goes
only after its last session (:attr:`sessions_done`).
"""

from __future__ import annotations

import asyncio
import functools
import os
import socket
from pathlib import Path

from ..config import Config
from ..errors import SandboxError
from .cgroups import JobCgroup
from .control import frame
from .host import HostState
from .job import InputFile
from .policy import Policy
from .runner import teardown
from .session import Session
from .session_cage import SESSION_HOME, SessionCage, session_figures
from .session_start import start_session
from .spool import SPOOL_BASE_BYTES, SPOOL_BASE_INODES
from .workspace import detached_tmpfs
from .zygotes import NO_MESSAGE, Zygote, ZygoteGone, to_the_end


class SessionZygote(Zygote):
    """A full zygote whose children go to sessions."""

    def __init__(self, index: int, config: Config, policy: Policy, kafel: str, host: HostState, nsjail: Path) -> None:
        super().__init__(index, config, policy, kafel, host, nsjail, "full")
        # Sessions whose processes live in this zygote's cage (they die with it).
        self.live_sessions = 0
        self.sessions_done = asyncio.Event()
        self.sessions_done.set()

    def spool_size(self) -> tuple[int, int]:
        # A session's files are in tmpfs mounts of their own: nothing comes through the spool.
        return SPOOL_BASE_BYTES, SPOOL_BASE_INODES

    def child_cgroup(self, name: str) -> JobCgroup:
        # Sessions live on side by side: each has a CPU quota of its own, and is frozen between its runs.
        return self.host.cgroups.create(name, self.policy.limits, quota=True, freezer=True)

    async def cleanup(self) -> None:
        """Nothing: a session's cgroup goes when the session ends (its cage's end)."""

    async def open_session(self, session_id: str, files: tuple[InputFile, ...]) -> Session:
        """Give the armed child to a session: its own /work (a tmpfs of the host's, attached by G), home, figures."""
        assert self.armed is not None and self.ctl is not None
        name, cg = self.armed
        self.armed = None
        lim = self.config.limits

        async def end() -> None:
            try:
                await to_the_end(functools.partial(teardown, cg, None))
            finally:
                self.live_sessions -= 1
                if not self.live_sessions:
                    self.sessions_done.set()

        self.live_sessions += 1
        self.sessions_done.clear()
        work = -1
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # Root's with the sticky bit: the inputs the host writes into it stay as they are.
            work = detached_tmpfs(lim.scratch_bytes, lim.scratch_inodes, 0o1777)
            order = {
                "op": "open",
                "home": SESSION_HOME,
                "figures": session_figures(lim),
                "max_figures": lim.max_figures,
                "max_value": lim.max_value_chars,
            }
            socket.send_fds(self.ctl, [frame(order)], [theirs.fileno(), work])
        except (OSError, SandboxError) as exc:
            ours.close()
            if work >= 0:
                os.close(work)
            await end()
            self._gone(f"giving it a session failed: {exc}")
            raise ZygoteGone(f"zygote {self.index} is gone") from None
        finally:
            theirs.close()
        self.arming = asyncio.create_task(self.arm(), name=f"runnerd-arm-session-{self.index}")

        def diagnostics() -> str:
            said = self.diagnostics()
            return "" if said == NO_MESSAGE else said

        cage = SessionCage(cgroup=cg, ctl=ours, work_fd=work, figures_fd=-1, end=end, diagnostics=diagnostics)
        return await start_session(session_id, cage, self.config, self.policy, files)
