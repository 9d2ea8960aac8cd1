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
returns every attempt. :func:`arun_loop` is the asyncio flavour; its
generator may be a plain function or a coroutine function.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Mapping, Sequence, Union

from .client import AsyncClient, Client
from .result import Outcome, Result

MAX_ATTEMPTS = 5
STDERR_TAIL_CHARS = 2000
MANIFEST_LINES = 5
MANIFEST_LINE_CHARS = 200
_TEXT_SUFFIXES = (".csv", ".tsv", ".txt", ".json", ".jsonl", ".md", ".xml", ".html", ".yaml", ".yml", ".py", ".log", ".ini", ".toml")


@dataclass(frozen=True)
class Attempt:
    number: int          # 1-based
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
AsyncGenerator = Callable[[str, Sequence[Attempt]], Union[str, Awaitable[str]]]


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
    err = result.error
    if err is not None:
        where = f" at line {err.lineno}" if err.lineno else ""
        parts.append(f"Error{where}: {err.type}: {err.message}")
        parts.append("Traceback (your code's frames only):\n" + err.traceback.rstrip())
    elif result.outcome is Outcome.DEADLINE_EXCEEDED:
        limit = f"{timeout:g} s" if timeout else "its time limit"
        parts.append(f"It did not finish within {limit} and was stopped. Make it faster or do less work.")
        if result.stdout:
            parts.append("Its output before it was stopped (last lines):\n" + result.stdout[-STDERR_TAIL_CHARS:].rstrip())
    else:
        described = {
            "exit": f"It exited with status {result.exit_code}.",
            "signal": f"Its process was killed by signal {-(result.exit_code or 0)}.",
            "memory_limit": "It used more memory than the sandbox allows and was killed.",
            "output_limit": "It printed more than the sandbox keeps and was stopped.",
        }.get(reason)
        if described:
            parts.append(described)
    if result.stderr_besides_error:
        parts.append("stderr (last lines):\n" + result.stderr[-STDERR_TAIL_CHARS:].rstrip())
    for warning in result.warnings[:5]:
        parts.append(f"Note: {warning}")
    parts.append(manifest(files))
    return "\n\n".join(parts)


def _check_attempts(max_attempts: int) -> None:
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")


def _record(
    attempts: list[Attempt], code: str, result: Result, files: Mapping[str, bytes] | None, timeout: float | None
) -> bool:
    """Add the attempt (with its feedback if it failed); True when the loop is done."""
    ok = result.outcome is Outcome.OK
    attempts.append(Attempt(len(attempts) + 1, code, result, None if ok else feedback(result, files, timeout=timeout)))
    return ok


def run_loop(
    task: str,
    generate: Generator,
    *,
    client: Client,
    files: Mapping[str, bytes] | None = None,
    max_attempts: int = MAX_ATTEMPTS,
    timeout: float | None = None,
) -> LoopResult:
    """Generate and run code until it succeeds or *max_attempts* are used; every attempt is returned."""
    _check_attempts(max_attempts)
    attempts: list[Attempt] = []
    while len(attempts) < max_attempts:
        code = generate(task, tuple(attempts))
        if _record(attempts, code, client.run(code, files=dict(files or {}), timeout=timeout), files, timeout):
            break
    return LoopResult(task, tuple(attempts))


async def arun_loop(
    task: str,
    generate: AsyncGenerator,
    *,
    client: AsyncClient,
    files: Mapping[str, bytes] | None = None,
    max_attempts: int = MAX_ATTEMPTS,
    timeout: float | None = None,
) -> LoopResult:
    """The asyncio flavour of :func:`run_loop`; *generate* may return a str or an awaitable of one."""
    _check_attempts(max_attempts)
    attempts: list[Attempt] = []
    while len(attempts) < max_attempts:
        produced: Any = generate(task, tuple(attempts))
        code = await produced if inspect.isawaitable(produced) else produced
        if _record(attempts, code, await client.run(code, files=dict(files or {}), timeout=timeout), files, timeout):
            break
    return LoopResult(task, tuple(attempts))
