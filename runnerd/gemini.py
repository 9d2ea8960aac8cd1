"""Results in the shape of the Gemini API's code-execution parts.

One attempt (code and its result) becomes the parts a Gemini conversation
history holds for a code-execution turn:

    {"executableCode": {"language": "PYTHON", "code": ...}}
    {"codeExecutionResult": {"outcome": "OUTCOME_OK", "output": ...}}
    {"inlineData": {"mimeType": "image/png", "data": <base64>}}   (one per figure)

:func:`parts` gives the JSON form (camelCase, base64), usable with any HTTP
client; :func:`genai_parts` gives ``google.genai.types.Part`` objects
(``pip install 'runnerd[gemini]'``). As in Gemini, ``output`` is stdout when
the code ran to the end, and the error text otherwise.
"""

from __future__ import annotations

import base64
from typing import Any

from .result import Outcome, Result

MAX_OUTPUT_CHARS = 64 * 1024


def output_text(result: Result, timeout: float | None = None) -> str:
    """What Gemini puts in ``codeExecutionResult.output``: stdout if OK, else the error text."""
    if result.outcome is Outcome.OK:
        return result.stdout[-MAX_OUTPUT_CHARS:]
    pieces: list[str] = []
    if result.outcome is Outcome.DEADLINE_EXCEEDED:
        if result.stdout:
            pieces.append(result.stdout)
        limit = f" of {timeout:g} s" if timeout else ""
        pieces.append(f"TimeoutError: the code did not finish within the deadline{limit}; it was stopped.\n")
    elif result.error is not None:
        pieces.append(result.error.traceback)
    else:
        if result.stderr:
            pieces.append(result.stderr)
        what = {
            "exit": f"SystemExit: the code exited with status {result.exit_code}",
            "signal": f"the code's process was killed by signal {-(result.exit_code or 0)}",
            "memory_limit": "MemoryError: the code was killed at the sandbox's memory limit",
            "output_limit": "the code was stopped: it wrote more output than the sandbox keeps",
            "cancelled": "the run was cancelled",
            "shutdown": "the sandbox shut down before the code finished",
            "sandbox_error": "the sandbox failed to start the code (not the code's fault)",
        }.get(result.reason.value if result.reason else "", "the code failed")
        pieces.append(what + "\n")
    text = "".join(p if p.endswith("\n") else p + "\n" for p in pieces)
    return text[-MAX_OUTPUT_CHARS:]


def parts(code: str, result: Result, *, timeout: float | None = None, include_saved_images: bool = True) -> list[dict[str, Any]]:
    """The Gemini JSON parts of one attempt: executableCode, codeExecutionResult, inlineData per image."""
    out: list[dict[str, Any]] = [
        {"executableCode": {"language": "PYTHON", "code": code}},
        {"codeExecutionResult": {"outcome": result.outcome.value, "output": output_text(result, timeout)}},
    ]
    for figure in result.figures:
        if not include_saved_images and not figure.name.startswith("figure_"):
            continue
        out.append({"inlineData": {"mimeType": figure.mime, "data": base64.b64encode(figure.data).decode("ascii")}})
    return out


def genai_parts(code: str, result: Result, *, timeout: float | None = None) -> list[Any]:
    """The same parts as ``google.genai.types.Part`` objects (needs ``runnerd[gemini]``)."""
    try:
        from google.genai import types
    except ImportError:  # pragma: no cover - depends on the extra
        raise ImportError("genai_parts needs the google-genai package: pip install 'runnerd[gemini]'") from None
    return [types.Part.model_validate(p) for p in parts(code, result, timeout=timeout)]
