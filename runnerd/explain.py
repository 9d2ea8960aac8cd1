"""What a result that is not OUTCOME_OK means, in the words a model (or a person) reads.

One wording for every place a failed result is handed to a model: the model
loop's feedback, the Gemini parts' ``codeExecutionResult.output`` and the MCP
tool's text. It also says which failures are not the code's fault (the cage
broke, the daemon stopped, someone cancelled the run): those must never be
handed to a model as its mistake.
"""

from __future__ import annotations

from .result import Outcome, Reason, Result, SessionEnd

# The library set in one phrase, for tool descriptions and refusals (README, "The sandbox env", has the list).
LIBRARIES = "numpy, pandas, matplotlib, scipy, scikit-learn, tensorflow, sympy, opencv and more"
# A tool's text for one run, at most: a print of a big DataFrame must not fill a model's context (smolagents
# cuts its own executor's logs at 20,000 characters too). The head and the tail are kept: the error is last.
MAX_TOOL_TEXT = 20_000


def cut(text: str, limit: int = MAX_TOOL_TEXT) -> str:
    """*text* at most *limit* characters long: its head and tail, and a line saying how much was cut."""
    if len(text) <= limit:
        return text
    head, tail = text[: limit * 3 // 5], text[-(limit * 2 // 5) :]
    return f"{head}\n[... {len(text) - len(head) - len(tail)} characters cut ...]\n{tail}"


# Failures the code did not cause: a model that reads them as its own would
# rewrite working code.
NOT_THE_CODES_FAULT = frozenset({Reason.SANDBOX_ERROR, Reason.SHUTDOWN, Reason.CANCELLED})


def not_the_codes_fault(result: Result) -> bool:
    return result.outcome is not Outcome.OK and result.reason in NOT_THE_CODES_FAULT


def what_happened(result: Result, timeout: float | None = None) -> str:
    """One sentence: how the run ended, when it did not end OK (empty for OK)."""
    if result.outcome is Outcome.OK:
        return ""
    if result.outcome is Outcome.DEADLINE_EXCEEDED:
        limit = f"{timeout:g} s" if timeout else "its time limit"
        return f"TimeoutError: the code did not finish within {limit} and was stopped; make it faster or do less work."
    if result.error is not None:
        where = f" at line {result.error.lineno}" if result.error.lineno else ""
        return f"The code raised {result.error.type}{where}: {result.error.message}"
    reason = result.reason
    if reason is Reason.EXIT:
        return f"SystemExit: the code exited with status {result.exit_code}."
    if reason is Reason.SIGNAL:
        return f"The code's process was killed by signal {-(result.exit_code or 0)}."
    if reason is Reason.MEMORY_LIMIT:
        return "MemoryError: the code used more memory than the sandbox allows and was killed."
    if reason is Reason.OUTPUT_LIMIT:
        return "The code was stopped: it wrote more output than the sandbox keeps."
    if reason is Reason.CANCELLED:
        return "The run was cancelled before the code finished (not the code's fault)."
    if reason is Reason.SHUTDOWN:
        return "The sandbox shut down before the code finished (not the code's fault)."
    if reason is Reason.SANDBOX_ERROR:
        return "The sandbox failed to run the code (not the code's fault)."
    return f"The code failed ({reason.value if reason else 'no reason given'})."


# How a session ended, as the end of "The session ended: ...".
SESSION_ENDS = {
    SessionEnd.CLOSED: "it was closed",
    SessionEnd.IDLE_TIMEOUT: "nothing ran in it for its idle timeout",
    SessionEnd.MAX_LIFETIME: "it reached the longest a session may live",
    SessionEnd.MEMORY_LIMIT: "its process used more memory than the sandbox allows and was killed",
    SessionEnd.INTERRUPT_IGNORED: "the code did not stop soon enough after its deadline or cancel, so it was killed",
    SessionEnd.EXITED: "its Python process ended (os._exit, a signal, ...)",
    SessionEnd.SANDBOX_ERROR: "its sandbox broke (not the code's fault)",
    SessionEnd.SHUTDOWN: "the sandbox service stopped (not the code's fault)",
    SessionEnd.HOST_LOST: "the sandbox host that held it died or restarted (not the code's fault)",
}


def how_it_ended(ended: SessionEnd | None) -> str:
    return SESSION_ENDS.get(ended, "for a reason not given") if ended else "for a reason not given"


def session_replaced(ended: SessionEnd | None) -> str:
    """What a tool says first when the session its calls share had ended, and this call ran in a new one."""
    return (
        f"The previous session ended: {how_it_ended(ended)}. This code ran in a new session: "
        "variables, imports and files from earlier calls are gone."
    )


def session_note(result: Result) -> str:
    """One sentence when this run ended its session (its variables are gone); empty otherwise."""
    state = result.session
    if state is None or state.alive:
        return ""
    return (
        f"The session ended: {how_it_ended(state.ended)}. Its variables, imports and files are gone; "
        "the next code runs in a new session and must redo what it needs."
    )


def result_text(result: Result) -> str:
    """A run as a tool's result shows it to a model (the MCP server's, the agent frameworks' tools): stdout
    and the value, stderr, the error, what else came out, and the session's news."""
    sections: list[str] = []
    # As the Python REPL shows them: the output, then the value on the next line.
    shown = "\n".join(t.rstrip("\n") for t in (result.stdout, result.value) if t)
    if shown:
        sections.append(shown)
    if result.stderr_besides_error:
        sections.append("stderr:\n" + result.stderr.rstrip("\n"))
    if result.error is not None:
        where = f" (line {result.error.lineno})" if result.error.lineno else ""
        sections.append(f"{result.error.type}{where}: {result.error.message}\n{result.error.traceback.rstrip()}")
    # A deadline reaches a session's code as KeyboardInterrupt: without this line a model reads an interrupt
    # nobody sent, not that its code was too slow.
    if result.outcome is not Outcome.OK and (result.error is None or result.outcome is Outcome.DEADLINE_EXCEEDED):
        sections.append(f"{result.outcome.value}: {what_happened(result)}")
    if result.files:
        sections.append("files written: " + ", ".join(f"{f.name} ({len(f.data)} bytes)" for f in result.files))
    for warning in result.warnings:
        sections.append(f"note: {warning}")
    note = session_note(result)
    if note:
        sections.append(note)
    return cut("\n\n".join(sections)) or "(no output)"
