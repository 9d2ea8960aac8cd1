"""Opening a session, host side: from a started cage to a ready :class:`~.session.Session`.

The cold cage and the warm pool (the :class:`SessionRunner` s) make the
session's cage, then :func:`start_session` waits for its interpreter,
notes its user process, writes the open's inputs and freezes it.
"""

from __future__ import annotations

import asyncio
import os
from typing import Protocol

from ..config import Config
from ..errors import SandboxError
from .job import InputFile
from .policy import Policy
from .runner import Runner
from .session import Session
from .session_cage import Control, SessionCage, snapshot, user_pid

READY_TIMEOUT_S = 60.0  # a cold session's interpreter start, on a loaded host


class SessionRunner(Runner, Protocol):
    """A runner that also opens sessions (the cold cage, the warm pool); a session is a Runner itself."""

    async def open_session(self, session_id: str, files: tuple[InputFile, ...]) -> Session:
        """A ready session; SandboxError if its cage could not be made."""
        ...


async def start_session(
    session_id: str, cage: SessionCage, config: Config, policy: Policy, files: tuple[InputFile, ...]
) -> Session:
    """Wait for the session's interpreter, note U's pid, write the open's inputs, freeze it: a ready Session."""
    control = Control(cage.ctl, accept_fds=cage.figures_fd < 0)
    user = -1
    session: Session | None = None
    try:
        event = await control.next(READY_TIMEOUT_S)
        if event is not None and event.get("event") == "mounted":
            fds = event.get("fds") or []
            if len(fds) != 1:
                raise SandboxError("the session's cage sent no figures dir fd")
            (cage.figures_fd,) = fds
            control.accept_fds = False
            event = await control.next(READY_TIMEOUT_S)
        if event is None or event.get("event") != "ready":
            said = cage.diagnostics()
            raise SandboxError("the session's interpreter did not start" + (f": {said}" if said else ""))
        user = os.pidfd_open(user_pid(cage.cgroup))
        session = Session(id=session_id, cage=cage, config=config, policy=policy, control=control, user_pidfd=user)
        with cage.hold() as dirs:
            await asyncio.to_thread(session.add_inputs, files, dirs)
            session.baseline = await asyncio.to_thread(snapshot, dirs.work)
        if not cage.cgroup.freeze():
            raise SandboxError("the session's processes did not freeze")
    except BaseException as exc:
        control.close()
        await cage.end()
        cage.close_fds()
        if user >= 0:
            os.close(user)
        if session is not None:
            session.give_back_inputs()
        if isinstance(exc, TimeoutError):
            raise SandboxError(f"the session's interpreter was not ready in {READY_TIMEOUT_S:.0f} s") from None
        raise
    session.start_watching()
    return session
