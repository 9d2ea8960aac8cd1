"""The one exception hierarchy of runnerd.

Everything runnerd raises on purpose derives from :class:`RunnerdError`, so
a caller can catch one type. A job that fails is *not* an exception: it is a
:class:`runnerd.result.Result` with ``outcome`` set. Exceptions are for things
the operator or the calling program must fix.
"""

from __future__ import annotations


class RunnerdError(Exception):
    """Base class of every error runnerd raises on purpose."""


class ConfigError(RunnerdError):
    """The configuration (file, flags or a value in them) is unusable."""


class PolicyError(RunnerdError):
    """The sandbox policy (nsjail config or seccomp policy) is invalid or unsafe."""


class EnvironmentMissing(RunnerdError):
    """The sandbox environment is not built, or is not the one the lock describes."""


class SandboxError(RunnerdError):
    """The host could not set up or tear down a cage (mounts, cgroups, nsjail)."""


class JobRejected(RunnerdError):
    """A job request breaks a limit or a rule; the message says which.

    ``code`` is the wire error code the daemon answers with
    (``BAD_REQUEST`` or ``TOO_LARGE``).
    """

    def __init__(self, message: str, code: str = "BAD_REQUEST") -> None:
        super().__init__(message)
        self.code = code


class ClientError(RunnerdError):
    """A client-side failure: no answer in time, a closed client, a bad reply."""


class AttemptNotRun(ClientError):
    """The model loop could not run an attempt: the sandbox kept failing, or the run was cancelled.

    ``result`` is the last result; it is not the code's fault and no model saw it.
    """

    def __init__(self, message: str, result: object) -> None:
        super().__init__(message)
        self.result = result


class RemoteError(ClientError):
    """The daemon answered a request with ``type: "error"``."""

    def __init__(self, code: str, message: str, ended: str | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.ended = ended  # NOT_FOUND for a session that ended: how (a SessionEnd value)


class HostLost(ClientError):
    """A one-off job's daemons were lost (dead, wedged, cut off or restarted) before it had a result.

    ``tried`` names each daemon it was sent to, and how it was lost; the job
    ran on at most that many (a fleet client tries two by default).
    """

    code = "HOST_LOST"

    def __init__(self, job_id: str, tried: list[str]) -> None:
        super().__init__(f"HOST_LOST: job {job_id} has no result: its daemons were lost: {'; '.join(tried)}")
        self.job_id = job_id
        self.tried = tried


class SessionLost(ClientError):
    """The daemon that holds a session died or restarted: the session's state is gone with it.

    Never a run in a fresh interpreter elsewhere: open a new session (the
    model loop, the MCP server and ``runnerd repl`` do, with a note).
    """

    def __init__(self, session_id: str, endpoint: str, how: str) -> None:
        super().__init__(f"session {session_id} is lost: its daemon {endpoint} {how}")
        self.session_id = session_id
        self.endpoint = endpoint
        self.how = how
