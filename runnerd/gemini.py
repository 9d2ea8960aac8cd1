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

A multi-turn conversation runs each turn's code in one session
(:meth:`runnerd.client.Client.session`), so a turn sees what earlier turns
defined; the parts of a session's run then read as a notebook cell does: the
trailing expression's value after stdout, and a sentence when the run ended
the session (before the next turn, ``session.ensure_open()`` starts a new
one, as that sentence tells the model)::

    with client.session() as s:
        for code in codes_the_model_wrote:
            s.ensure_open()
            history.append(parts(code, s.run(code)))

Results of one-off runs read as before.
"""

from __future__ import annotations

import base64
from typing import Any

from .explain import session_note, what_happened
from .result import Outcome, Result

MAX_OUTPUT_CHARS = 64 * 1024


def output_text(result: Result, timeout: float | None = None) -> str:
    """What Gemini puts in ``codeExecutionResult.output``: stdout if OK, else the error text.

    For a run in a session, the value of a trailing expression follows
    stdout, and a run that ended the session says so.
    """
    pieces: list[str] = []
    if result.outcome is Outcome.OK:
        if result.session is None:
            return result.stdout[-MAX_OUTPUT_CHARS:]
        if result.stdout:
            pieces.append(result.stdout)
        if result.value is not None:
            pieces.append(result.value)
    elif result.outcome is Outcome.DEADLINE_EXCEEDED:
        if result.stdout:
            pieces.append(result.stdout)
        pieces.append(what_happened(result, timeout))
    elif result.error is not None:
        pieces.append(result.error.traceback)
    else:
        if result.stderr:
            pieces.append(result.stderr)
        pieces.append(what_happened(result, timeout))
    note = session_note(result)
    if note:
        pieces.append(note)
    text = "".join(p if p.endswith("\n") else p + "\n" for p in pieces)
    return text[-MAX_OUTPUT_CHARS:]


def parts(
    code: str, result: Result, *, timeout: float | None = None, include_saved_images: bool = True
) -> list[dict[str, Any]]:
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
