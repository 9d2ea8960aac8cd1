"""What the harness (or a warm child) reported from inside the cage: untrusted, and parsed as such.

The report is JSON lines on a pipe: ``start``, then ``end`` with the
structured error. It can make a result worse, never OK: the exit status
comes from nsjail's log (:mod:`.nsjail`), refined by the report only when
both agree (:func:`exit_status`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ..result import ErrorInfo

MAX_REPORT_BYTES = 1 << 20


@dataclass
class Report:
    started: bool = False
    end: dict[str, Any] | None = None
    exit: dict[str, Any] | None = None


def parse_report(raw: bytes) -> Report:
    """The harness's JSON lines; anything malformed is ignored (the job may have written it)."""
    report = Report()
    for line in raw.splitlines():
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):  # RecursionError: [[[[... nested past the parser's depth
            continue
        if not isinstance(record, dict):
            continue
        event = record.get("event")
        if event == "start":
            report.started = True
        elif event == "end" and report.started:
            report.end = record
        elif event == "exit" and report.started:
            report.exit = record
    return report


def valid_text(value: str) -> str:
    """*value* as valid UTF-8: a lone surrogate (JSON's ``"\\udc80"`` decodes to one) becomes U+FFFD.

    msgpack cannot pack such a string: one left in a result would fail its reply.
    """
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    return value


def small_int(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and -(2**31) < value < 2**31:
        return value
    return None


def error_from_report(end: dict[str, Any] | None) -> ErrorInfo | None:
    """The harness's error record, checked and capped (it is untrusted input)."""
    if not end or not isinstance(end.get("error"), dict):
        return None
    e = end["error"]

    def text(key: str, cap: int) -> str:
        value = e.get(key)
        return valid_text(value[:cap]) if isinstance(value, str) else ""

    return ErrorInfo(
        type=text("type", 200) or "Exception",
        message=text("message", 8 << 10),
        traceback=text("traceback", 40 << 10),
        lineno=small_int(e.get("lineno")),
    )


def value_from_report(end: dict[str, Any] | None, cap: int) -> str | None:
    """The trailing expression's repr the harness reported, capped again here (it is untrusted)."""
    value = (end or {}).get("value")
    return valid_text(value[:cap]) if isinstance(value, str) else None


def exit_status(trusted: int | None, report: Report) -> int | None:
    """The job's exit: a code (>= 0), minus a signal number, or None if the cage was killed.

    *trusted* comes from outside the job (nsjail's log, or the zygote): PID
    1 exits with the job process's code, or 128+N when it died of signal N.
    The harness's report may turn that 128+N into -N, but only when both agree.
    """
    if trusted is None or trusted < 0:
        return trusted
    signum = small_int((report.exit or {}).get("signal"))
    if trusted > 128 and signum is not None and trusted == 128 + signum:
        return -signum
    return trusted
