"""The model loop: write code, run it, read what went wrong, try again (Gemini's rules).

    from runnerd.client import Client
    from runnerd.loop import run_loop

    def generate(task, history):          # your model call
        ...                               # history: the attempts so far, each with .feedback
        return code

    with Client() as client:
        outcome = run_loop("Sum the sales per region", generate, client=client,
                           files={"sales.csv": data})
    outcome.ok, outcome.final.result.stdout, len(outcome.attempts)

Each attempt runs through a runnerd daemon with the job's input files. On
OUTCOME_FAILED or OUTCOME_DEADLINE_EXCEEDED the loop builds the feedback a
model needs to fix its code (:func:`feedback`): the error type, message and
line, the traceback of the model's own frames, the tail of stderr, and a
manifest of the input files with the first lines of text ones. It stops at
the first OUTCOME_OK, or after ``max_attempts`` (5, as Gemini does), and
returns every attempt. A run that failed through no fault of the code
(the sandbox broke, the daemon shut down, a cancel) is never handed to the
model: it is run again, or :class:`~runnerd.errors.AttemptNotRun` says why
not. :func:`arun_loop` is the asyncio flavour; its generator may be a plain
function or a coroutine function.

Given a ``session`` instead of a ``client``, every attempt runs in that one
session, so an attempt (and the next task's, in a conversation of several
``run_loop`` calls on one session) sees the variables earlier ones left::

    with client.session(files={"sales.csv": data}) as s:
        first = run_loop("Load the sales", generate, session=s)
        second = run_loop("Plot them per region", generate, session=s)

Input files go to the session once. When an attempt ends the session (it
used too much memory, ended its process), the feedback says so and the next
attempt runs in a new session (``session.ensure_open()``); when the cage broke
the session, or the daemon that held it died or restarted (a fleet's
:class:`~runnerd.errors.SessionLost`), its state is lost and no rerun can
bring it back: :class:`~runnerd.errors.AttemptNotRun`, and the next
``run_loop`` on that session opens a new one.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .client import AsyncClient, AsyncSession, Client, Session
from .errors import AttemptNotRun, SessionLost
from .explain import how_it_ended, not_the_codes_fault, session_note, what_happened
from .result import Outcome, Reason, Result, SessionEnd, SessionState

MAX_ATTEMPTS = 5
# Runs of one attempt that the cage broke, retried before giving up (not the model's attempts).
CAGE_RETRIES = 2
STDERR_TAIL_CHARS = 2000
MANIFEST_LINES = 5
MANIFEST_LINE_CHARS = 200
_TEXT_SUFFIXES = (
    ".csv",
    ".tsv",
    ".txt",
    ".json",
    ".jsonl",
    ".md",
    ".xml",
    ".html",
    ".yaml",
    ".yml",
    ".py",
    ".log",
    ".ini",
    ".toml",
)


@dataclass(frozen=True)
class Attempt:
    number: int  # 1-based
    code: str
    result: Result
    feedback: str | None  # what the next generation call was told; None for a successful attempt


@dataclass(frozen=True)
class LoopResult:
    task: str
    attempts: tuple[Attempt, ...]

    @property
    def ok(self) -> bool:
        return bool(self.attempts) and self.attempts[-1].result.outcome is Outcome.OK

    @property
    def final(self) -> Attempt:
        return self.attempts[-1]


Generator = Callable[[str, Sequence[Attempt]], str]
AsyncGenerator = Callable[[str, Sequence[Attempt]], str | Awaitable[str]]


def manifest(files: Mapping[str, bytes] | None) -> str:
    """Name, size and (for text files) the first lines of each input file."""
    if not files:
        return "Input files: none."
    lines = ["Input files (in the working directory, read-only):"]
    for name, data in files.items():
        lines.append(f"- {name} ({len(data)} bytes)")
        if name.lower().endswith(_TEXT_SUFFIXES) or b"\0" not in data[:1024]:
            try:
                text = data[:8192].decode("utf-8")
            except UnicodeDecodeError:
                continue
            head = text.splitlines()[:MANIFEST_LINES]
            if head:
                lines.append("  first lines:")
                lines.extend(f"    {line[:MANIFEST_LINE_CHARS]}" for line in head)
    return "\n".join(lines)


def feedback(result: Result, files: Mapping[str, bytes] | None = None, *, timeout: float | None = None) -> str:
    """What a model needs to fix its code after a failed attempt."""
    parts: list[str] = []
    reason = result.reason.value if result.reason else "none"
    parts.append(f"The code failed: {result.outcome.value} ({reason}).")
    parts.append(what_happened(result, timeout))
    err = result.error
    if err is not None:
        parts.append("Traceback (your code's frames only):\n" + err.traceback.rstrip())
    elif result.outcome is Outcome.DEADLINE_EXCEEDED and result.stdout:
        parts.append("Its output before it was stopped (last lines):\n" + result.stdout[-STDERR_TAIL_CHARS:].rstrip())
    if result.stderr_besides_error:
        parts.append("stderr (last lines):\n" + result.stderr[-STDERR_TAIL_CHARS:].rstrip())
    for warning in result.warnings[:5]:
        parts.append(f"Note: {warning}")
    note = session_note(result)
    if note:
        parts.append(note)
    parts.append(manifest(files))
    return "\n\n".join(parts)


def _check_attempts(max_attempts: int, client: object, session: object) -> None:
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
    if (client is None) == (session is None):
        raise TypeError("give the loop a client or a session (not both)")


def _record(
    attempts: list[Attempt], code: str, result: Result, files: Mapping[str, bytes] | None, timeout: float | None
) -> bool:
    """Add the attempt (with its feedback if it failed); True when the loop is done."""
    ok = result.outcome is Outcome.OK
    attempts.append(Attempt(len(attempts) + 1, code, result, None if ok else feedback(result, files, timeout=timeout)))
    return ok


def _lost(exc: SessionLost, attempt: int) -> AttemptNotRun:
    """The session's daemon died or restarted under an attempt: its state is gone, as when its cage broke."""
    state = SessionState(id=exc.session_id, alive=False, ended=SessionEnd.HOST_LOST)
    result = Result(outcome=Outcome.FAILED, reason=Reason.SANDBOX_ERROR, warnings=(str(exc),), session=state)
    return AttemptNotRun(f"attempt {attempt} did not run: {exc}", result)


def _cage_fault(result: Result, tries: int, attempt: int) -> bool:
    """True to run the same code again: the cage, not the code, failed. Raises when retrying cannot help."""
    if not not_the_codes_fault(result):
        return False
    if result.reason is Reason.CANCELLED:
        raise AttemptNotRun(f"attempt {attempt} was cancelled before it finished", result)
    if result.session is not None and not result.session.alive:
        # A rerun would start from an empty session: not the attempt the model wrote for.
        raise AttemptNotRun(
            f"attempt {attempt} did not run: its session ended ({how_it_ended(result.session.ended)})", result
        )
    if tries > CAGE_RETRIES:
        raise AttemptNotRun(
            f"attempt {attempt} did not run: {result.reason.value if result.reason else '?'} "
            f"{tries} times ({'; '.join(result.warnings[:2]) or 'no detail'})",
            result,
        )
    return True


def run_loop(
    task: str,
    generate: Generator,
    *,
    client: Client | None = None,
    session: Session | None = None,
    files: Mapping[str, bytes] | None = None,
    max_attempts: int = MAX_ATTEMPTS,
    timeout: float | None = None,
) -> LoopResult:
    """Generate and run code until it succeeds or *max_attempts* are used; every attempt is returned.

    Runs go through *client*, or all into the open *session*. A run the
    cage broke (sandbox_error, shutdown) is run again, up to CAGE_RETRIES
    times, and never counts as an attempt; past that, for a cancelled run,
    or when it ended the session, :class:`AttemptNotRun` is raised.
    """
    _check_attempts(max_attempts, client, session)
    attempts: list[Attempt] = []
    while len(attempts) < max_attempts:
        code = generate(task, tuple(attempts))
        tries = 0
        while True:
            tries += 1
            if session is not None:
                session.ensure_open()
                try:
                    result = session.run(code, files=session.new_files(files), timeout=timeout)
                except SessionLost as exc:
                    raise _lost(exc, len(attempts) + 1) from exc
            else:
                assert client is not None
                result = client.run(code, files=dict(files or {}), timeout=timeout)
            if not _cage_fault(result, tries, len(attempts) + 1):
                break
        if _record(attempts, code, result, files, timeout):
            break
    return LoopResult(task, tuple(attempts))


async def arun_loop(
    task: str,
    generate: AsyncGenerator,
    *,
    client: AsyncClient | None = None,
    session: AsyncSession | None = None,
    files: Mapping[str, bytes] | None = None,
    max_attempts: int = MAX_ATTEMPTS,
    timeout: float | None = None,
) -> LoopResult:
    """The asyncio flavour of :func:`run_loop`; *generate* may return a str or an awaitable of one."""
    _check_attempts(max_attempts, client, session)
    attempts: list[Attempt] = []
    while len(attempts) < max_attempts:
        produced: Any = generate(task, tuple(attempts))
        code = await produced if inspect.isawaitable(produced) else produced
        tries = 0
        while True:
            tries += 1
            if session is not None:
                await session.ensure_open()
                try:
                    result = await session.run(code, files=session.new_files(files), timeout=timeout)
                except SessionLost as exc:
                    raise _lost(exc, len(attempts) + 1) from exc
            else:
                assert client is not None
                result = await client.run(code, files=dict(files or {}), timeout=timeout)
            if not _cage_fault(result, tries, len(attempts) + 1):
                break
        if _record(attempts, code, result, files, timeout):
            break
    return LoopResult(task, tuple(attempts))
