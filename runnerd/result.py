"""The result record of one job, and the rules that decide its outcome.

A job that fails is a value, not an exception: :func:`decide` turns what the
host observed about a cage into ``(outcome, reason)``, and :class:`Result`
carries it with the output to the caller (and, as a map, over the wire).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import ClientError


class Outcome(str, enum.Enum):
    OK = "OUTCOME_OK"
    FAILED = "OUTCOME_FAILED"
    DEADLINE_EXCEEDED = "OUTCOME_DEADLINE_EXCEEDED"


class Reason(str, enum.Enum):
    """Why a job did not end with OUTCOME_OK."""

    EXCEPTION = "exception"  # an uncaught exception; ``error`` says which
    EXIT = "exit"  # sys.exit(n) / os._exit(n) with n != 0
    SIGNAL = "signal"  # killed by a signal (segfault, SIGKILL from inside, seccomp)
    MEMORY_LIMIT = "memory_limit"  # the cgroup's OOM killer fired
    OUTPUT_LIMIT = "output_limit"  # stdout+stderr passed limits.output_kill_bytes, or flooded (output.OutputGuard)
    TIMEOUT = "timeout"  # the wall clock ran out (OUTCOME_DEADLINE_EXCEEDED)
    CANCELLED = "cancelled"  # a client cancelled it
    SHUTDOWN = "shutdown"  # the daemon stopped before the job finished
    SANDBOX_ERROR = "sandbox_error"  # the cage could not be set up, or broke under the job; not the code's fault


@dataclass(frozen=True)
class Artifact:
    """A figure or a file the job produced."""

    name: str
    mime: str
    data: bytes

    def to_wire(self) -> dict[str, Any]:
        return {"name": self.name, "mime": self.mime, "data": self.data}

    @classmethod
    def from_wire(cls, m: Mapping[str, Any]) -> Artifact:
        return cls(name=str(m["name"]), mime=str(m["mime"]), data=bytes(m["data"]))


@dataclass(frozen=True)
class ErrorInfo:
    """The uncaught exception, as the model that wrote the code should see it."""

    type: str
    message: str
    traceback: str
    lineno: int | None

    def to_wire(self) -> dict[str, Any]:
        return {"type": self.type, "message": self.message, "traceback": self.traceback, "lineno": self.lineno}

    @classmethod
    def from_wire(cls, m: Mapping[str, Any]) -> ErrorInfo:
        lineno = m.get("lineno")
        return cls(
            type=str(m.get("type", "")),
            message=str(m.get("message", "")),
            traceback=str(m.get("traceback", "")),
            lineno=lineno if isinstance(lineno, int) and not isinstance(lineno, bool) else None,
        )


@dataclass(frozen=True)
class Usage:
    wall_s: float = 0.0
    cpu_s: float = 0.0
    max_rss_bytes: int = 0
    # Whose peak max_rss_bytes is: "run" (this run's), or "session" (a session's since it
    # opened, where the kernel cannot reset a peak: cgroup v2 before Linux 6.12).
    peak_of: str = "run"

    def to_wire(self) -> dict[str, Any]:
        return {
            "wall_s": self.wall_s,
            "cpu_s": self.cpu_s,
            "max_rss_bytes": self.max_rss_bytes,
            "peak_of": self.peak_of,
        }

    @classmethod
    def from_wire(cls, m: Mapping[str, Any]) -> Usage:
        return cls(
            wall_s=float(m.get("wall_s", 0.0)),
            cpu_s=float(m.get("cpu_s", 0.0)),
            max_rss_bytes=int(m.get("max_rss_bytes", 0)),
            peak_of=str(m.get("peak_of", "run")),
        )


class SessionEnd(str, enum.Enum):
    """How a session ended (docs/protocol.md): in a run's ``session``, NOT_FOUND messages and stats."""

    CLOSED = "closed"  # the client closed it
    IDLE_TIMEOUT = "idle_timeout"  # no run for its idle timeout
    MAX_LIFETIME = "max_lifetime"  # open for the server's session_max_lifetime_s
    MEMORY_LIMIT = "memory_limit"  # the out-of-memory killer ended its process
    INTERRUPT_IGNORED = "interrupt_ignored"  # a run did not stop within the grace after its deadline or cancel
    EXITED = "exited"  # its process ended (os._exit, a signal, ...)
    SANDBOX_ERROR = "sandbox_error"  # its cage broke or was killed from outside
    SHUTDOWN = "shutdown"  # the daemon stopped
    HOST_LOST = "host_lost"  # its daemon died or restarted: said by a fleet client (the daemon cannot)


@dataclass(frozen=True)
class SessionState:
    """What a session run's result says of its session."""

    id: str
    alive: bool
    ended: SessionEnd | None = None

    def to_wire(self) -> dict[str, Any]:
        return {"id": self.id, "alive": self.alive, "ended": self.ended.value if self.ended else None}

    @classmethod
    def from_wire(cls, m: Mapping[str, Any]) -> SessionState:
        ended = m.get("ended")
        return cls(id=str(m["id"]), alive=bool(m["alive"]), ended=SessionEnd(ended) if ended else None)


@dataclass(frozen=True)
class Result:
    outcome: Outcome
    reason: Reason | None
    stdout: str = ""
    stderr: str = ""
    # True when stdout or stderr lost their middle, or figures/files were
    # dropped; ``warnings`` says exactly what.
    truncated: bool = False
    exit_code: int | None = None
    error: ErrorInfo | None = None
    figures: tuple[Artifact, ...] = ()
    files: tuple[Artifact, ...] = ()
    usage: Usage = field(default_factory=Usage)
    warnings: tuple[str, ...] = ()
    # The repr of a trailing bare expression (as a notebook cell shows it), capped; None if there was none.
    value: str | None = None
    session: SessionState | None = None  # for a run in a session

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.OK

    @property
    def stderr_besides_error(self) -> str:
        """stderr, or "" when it holds nothing but the error's traceback (no need to show it twice)."""
        if self.error is not None and self.stderr.strip() == self.error.traceback.strip():
            return ""
        return self.stderr

    def to_wire(self) -> dict[str, Any]:
        return {
            "outcome": self.outcome.value,
            "reason": self.reason.value if self.reason else None,
            "stdout": self.stdout,
            "stderr": self.stderr,
            "truncated": self.truncated,
            "exit_code": self.exit_code,
            "error": self.error.to_wire() if self.error else None,
            "figures": [a.to_wire() for a in self.figures],
            "files": [a.to_wire() for a in self.files],
            "usage": self.usage.to_wire(),
            "warnings": list(self.warnings),
            "value": self.value,
            "session": self.session.to_wire() if self.session else None,
        }

    @classmethod
    def from_wire(cls, m: Mapping[str, Any]) -> Result:
        """Rebuild a Result from a ``type: "result"`` reply; ClientError if it is malformed."""
        try:
            reason = m.get("reason")
            error = m.get("error")
            return cls(
                outcome=Outcome(m["outcome"]),
                reason=Reason(reason) if reason else None,
                stdout=str(m.get("stdout", "")),
                stderr=str(m.get("stderr", "")),
                truncated=bool(m.get("truncated", False)),
                exit_code=m.get("exit_code"),
                error=ErrorInfo.from_wire(error) if error else None,
                figures=tuple(Artifact.from_wire(a) for a in m.get("figures", ())),
                files=tuple(Artifact.from_wire(a) for a in m.get("files", ())),
                usage=Usage.from_wire(m.get("usage") or {}),
                warnings=tuple(str(w) for w in m.get("warnings", ())),
                value=str(m["value"]) if m.get("value") is not None else None,
                session=SessionState.from_wire(m["session"]) if m.get("session") else None,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ClientError(f"malformed result from the daemon: {exc!r}") from None


@dataclass(frozen=True)
class Observation:
    """What the host saw of a finished cage; the input of :func:`decide`."""

    started: bool  # the harness reported that it began
    finished: bool  # the harness reported that it ended (not killed mid-way)
    exit_status: int | None  # the cage's exit: >= 0 a code, < 0 minus a signal number
    timed_out: bool = False
    cancelled: bool = False
    shutdown: bool = False
    output_limit: bool = False
    oom_kills: int = 0
    has_error: bool = False  # the harness reported an uncaught exception
    # The cage itself broke while the job ran (nsjail or the zygote died, or
    # did not report the job's exit): how the job would have ended is unknown.
    cage_failed: bool = False


def decide(obs: Observation) -> tuple[Outcome, Reason | None]:
    """The outcome rules, in priority order.

    What the host did (deadline, cancel, shutdown, output kill) wins over what
    it saw, then a cage that failed (to start, or under the job: the job's
    own end is then unknown, and never blamed on its code), then the
    kernel's word (OOM kill), then the harness's report,
    then the bare exit status. The harness only runs inside the cage, so its
    report can only make a job look *worse* than the status says: a job
    never becomes OK on the harness's word alone.
    """
    if obs.timed_out:
        return Outcome.DEADLINE_EXCEEDED, Reason.TIMEOUT
    if obs.cancelled:
        return Outcome.FAILED, Reason.CANCELLED
    if obs.shutdown:
        return Outcome.FAILED, Reason.SHUTDOWN
    if obs.output_limit:
        return Outcome.FAILED, Reason.OUTPUT_LIMIT
    if not obs.started or obs.cage_failed:
        return Outcome.FAILED, Reason.SANDBOX_ERROR
    status = obs.exit_status
    if obs.oom_kills and status != 0:
        return Outcome.FAILED, Reason.MEMORY_LIMIT
    if obs.has_error:
        return Outcome.FAILED, Reason.EXCEPTION
    if status is None or status < 0:
        return Outcome.FAILED, Reason.SIGNAL
    if status != 0:
        return Outcome.FAILED, Reason.EXIT
    return Outcome.OK, None
