"""``runnerd run``: one job from the command line, in a cage on this host or through a daemon, and its report.

The job's stdout and stderr stream to the terminal as they come; its
figures and files are written to ``--out``; the outcome is summed up on
stderr and becomes the exit code (:data:`EXIT_CODES`, applied by cli.py,
the only module that exits).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from . import config as config_mod
from .errors import RunnerdError
from .result import Outcome, Result
from .sandbox.job import make_job

log = logging.getLogger(__name__)

EXIT_CODES = {Outcome.OK: 0, Outcome.FAILED: 1, Outcome.DEADLINE_EXCEEDED: 124}


def write_artifacts(result: Result, out_dir: Path) -> list[Path]:
    written = []
    root = out_dir.resolve()
    for artifact in (*result.figures, *result.files):
        target = (root / artifact.name).resolve()
        # Names come from runnerd's collector (relative, no ".."); check anyway.
        if root not in target.parents:
            log.warning("not writing %r: outside %s", artifact.name, root)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(artifact.data)
        written.append(target)
    return written


def summary(result: Result) -> str:
    u = result.usage
    parts = [f"{result.outcome.value}"]
    if result.reason:
        parts.append(f"({result.reason.value})")
    parts.append(f"in {u.wall_s:.3f} s, cpu {u.cpu_s:.3f} s, peak memory {u.max_rss_bytes / 2**20:.1f} MiB")
    if result.exit_code not in (0, None):
        parts.append(f"exit {result.exit_code}")
    return " ".join(parts)


def report(result: Result, out_dir: Path | None, streamed: bool) -> int:
    if not streamed:
        sys.stdout.write(result.stdout)
        sys.stdout.flush()
        sys.stderr.write(result.stderr)
    err = sys.stderr
    if result.value is not None:
        # As `python -i` echoes an expression: after the output, on stdout.
        print(result.value, flush=True)
    if result.error:
        where = f"line {result.error.lineno}: " if result.error.lineno else ""
        print(f"runnerd: error at {where}{result.error.type}: {result.error.message}", file=err)
    for warning in result.warnings:
        print(f"runnerd: warning: {warning}", file=err)
    outputs = [*result.figures, *result.files]
    if out_dir is not None and outputs:
        for path in write_artifacts(result, out_dir):
            print(f"runnerd: wrote {path}", file=err)
    elif outputs:
        names = ", ".join(a.name for a in outputs)
        print(
            f"runnerd: {len(result.figures)} figure(s), {len(result.files)} file(s): {names} (--out DIR saves them)",
            file=err,
        )
    print(f"runnerd: {summary(result)}", file=err)
    return EXIT_CODES[result.outcome]


def read_inputs(paths: Sequence[str]) -> list[tuple[str, bytes]]:
    """The inputs by their bare names; two paths with one name are refused here,
    where both are known (a daemon's files map would keep only the last)."""
    files: dict[str, bytes] = {}
    first: dict[str, str] = {}
    for p in paths:
        path = Path(p)
        if path.name in first:
            raise RunnerdError(
                f"inputs {first[path.name]} and {p} have one name, {path.name!r}: "
                "the job opens inputs by their bare name"
            )
        first[path.name] = p
        try:
            files[path.name] = path.read_bytes()
        except OSError as exc:
            raise RunnerdError(f"cannot read input {p}: {exc.strerror}") from None
    return list(files.items())


async def run_local(cfg: config_mod.Config, code: str, files: list[tuple[str, bytes]], timeout: float | None) -> Result:
    from .sandbox.runtime import open_runtime

    job = make_job(code, files, timeout, limits=cfg.limits)
    # One job: a warm pool (the service's config may ask for one) would only cost its start-up.
    runtime = await open_runtime(dataclasses.replace(cfg, mode="cold"), probe=False)
    try:

        def on_output(stream: str, data: bytes) -> None:
            target = sys.stdout if stream == "stdout" else sys.stderr
            target.buffer.write(data)
            target.flush()

        return await runtime.runner.run(job, on_output=on_output)
    finally:
        await runtime.aclose()


def run_remote(endpoint: str, code: str, files: list[tuple[str, bytes]], timeout: float | None,
                curve: dict[str, bytes] | None) -> Result:  # fmt: skip
    from .client import Client, Finished, Output

    with Client(endpoint, curve=curve) as client:
        for event in client.stream(code, dict(files), timeout):
            if isinstance(event, Output):
                target = sys.stdout if event.stream == "stdout" else sys.stderr
                target.buffer.write(event.data)
                target.flush()
            elif isinstance(event, Finished):
                return event.result
    raise RunnerdError("the daemon sent no result")  # pragma: no cover
