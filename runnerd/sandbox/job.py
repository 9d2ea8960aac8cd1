"""A job as the cage takes it: code, input files and a timeout, checked against the limits.

Both doors into runnerd (the CLI and the wire protocol) build a
:class:`JobSpec` through :func:`make_job`, so every job meets the same rules
and a broken one is refused with a message that names the problem.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from ..config import Limits
from ..errors import JobRejected


@dataclass(frozen=True)
class InputFile:
    """One input: readable by *name* in the job's working directory, read-only."""

    name: str
    data: bytes


@dataclass(frozen=True)
class JobSpec:
    code: str
    files: tuple[InputFile, ...] = ()
    timeout: float = 30.0

    @property
    def files_bytes(self) -> int:
        return sum(len(f.data) for f in self.files)


def check_file_name(name: object, limits: Limits) -> str:
    """The name if it is a plain file name; JobRejected saying what is wrong otherwise."""
    if not isinstance(name, str):
        raise JobRejected(f"file name must be a string, got {type(name).__name__}")
    if not name:
        raise JobRejected("file name is empty")
    if "\x00" in name:
        raise JobRejected(f"file name {name!r} contains a NUL byte")
    if "/" in name:
        raise JobRejected(f"file name {name!r} contains '/': give a plain file name, it is opened by that name")
    if name in (".", ".."):
        raise JobRejected(f"file name {name!r} is not a file name")
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        raise JobRejected(f"file name {name!r} is not valid UTF-8") from None
    if len(encoded) > limits.max_file_name_bytes:
        raise JobRejected(
            f"file name {name[:40]!r}... is {len(encoded)} bytes long; the limit is {limits.max_file_name_bytes}"
        )
    return name


def make_job(
    code: object,
    files: Iterable[tuple[object, object]] = (),
    timeout: object = None,
    *,
    limits: Limits,
) -> JobSpec:
    """Check a job against *limits* and build it; JobRejected (with a wire code) if it breaks one.

    *timeout* None means ``limits.default_timeout``; a larger one is capped
    to ``limits.max_timeout`` (the protocol says so), a non-positive or
    non-finite one is refused.
    """
    if not isinstance(code, str):
        raise JobRejected(f"code must be a string, got {type(code).__name__}")
    try:
        code_bytes = len(code.encode("utf-8"))
    except UnicodeEncodeError:
        raise JobRejected("code is not valid UTF-8 (it holds a lone surrogate)") from None
    if code_bytes > limits.max_code_bytes:
        raise JobRejected(f"code is {code_bytes} bytes; the limit is {limits.max_code_bytes}", code="TOO_LARGE")

    checked: list[InputFile] = []
    seen: set[str] = set()
    total = 0
    for index, item in enumerate(files):
        if len(checked) >= limits.max_files:
            raise JobRejected(f"more than {limits.max_files} input files", code="TOO_LARGE")
        name, data = item
        name = check_file_name(name, limits)
        if name in seen:
            raise JobRejected(f"input file {name!r} is given twice")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise JobRejected(f"files[{index}].data must be bytes (msgpack bin), got {type(data).__name__}")
        data = bytes(data)
        total += len(data)
        if total > limits.max_files_bytes:
            raise JobRejected(f"input files add up to more than {limits.max_files_bytes} bytes", code="TOO_LARGE")
        seen.add(name)
        checked.append(InputFile(name=name, data=data))

    if timeout is None:
        seconds = limits.default_timeout
    else:
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
            raise JobRejected(f"timeout must be a number of seconds, got {type(timeout).__name__}")
        seconds = float(timeout)
        if not math.isfinite(seconds) or seconds <= 0:
            raise JobRejected(f"timeout must be a positive number of seconds, got {timeout!r}")
        seconds = min(seconds, limits.max_timeout)
    return JobSpec(code=code, files=tuple(checked), timeout=seconds)
