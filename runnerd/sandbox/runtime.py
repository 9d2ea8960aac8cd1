"""Start-up: from a Config to a ready, checked runner (the cold cage, or the warm pool).

``runnerd run`` (one job, no daemon), ``runnerd serve`` and ``runnerd
check`` start here, so they refuse the same broken set-ups with the same
messages: no nsjail, a policy nsjail rejects or that weakens the cage, a
missing or stale sandbox env, unusable cgroups. ``serve`` (at start and on
every reload) and ``check`` also run probe jobs that check, from inside a
cage, that it is what the policy promised; ``runnerd run`` does not: a
probe would double the cost of its one job, and ``runnerd check`` is the
command that proves a host.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..config import Config, default_lock_path
from ..errors import PolicyError, SandboxError
from . import preflight
from .cage import Cage
from .host import HostState
from .job import InputFile
from .policy import Policy
from .session import Session
from .session_start import SessionRunner
from .warm import WarmCage

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    config: Config
    policy: Policy
    host: HostState
    cage: Cage
    nsjail: Path
    # What runs jobs: the cold cage, or the warm pool (mode = "warm").
    runner: SessionRunner
    checks: list[preflight.Check] = field(default_factory=list)

    async def probe(self, import_check: tuple[str, ...] = ()) -> list[preflight.Check]:
        """Jobs in the cage that check it is what the policy promises (and that *import_check* imports)."""
        found = await preflight.probe(self.runner)
        if import_check:
            found.append(await preflight.import_probe(self.runner, list(import_check)))
        return found

    async def open_session(self, session_id: str, files: tuple[InputFile, ...]) -> Session:
        """A new session from this runtime's cages (cold: its own nsjail; warm: a session zygote's child)."""
        return await self.runner.open_session(session_id, files)

    def close(self) -> None:
        """Release the host state (the cold path has nothing else); see aclose for the warm pool."""
        self.host.close()

    async def aclose(self, grace: float = 0.0) -> None:
        """Stop the runner (waiting up to *grace* s for running jobs), then release the host state."""
        await self.runner.close(grace)
        self.host.close()


async def open_runtime(
    config: Config,
    *,
    lock: Path | None = None,
    probe: bool = True,
    import_check: tuple[str, ...] = (),
    static: tuple[list[preflight.Check], preflight.HostParts] | None = None,
) -> Runtime:
    """Run every check and return a Runtime; RunnerdError listing what to fix otherwise.

    *import_check* names libraries a probe job imports in the cage (the
    daemon checks the core ones at start-up). *static* is what
    :func:`preflight.static_checks` already returned, when the caller ran it.
    """
    checks, parts = static or preflight.static_checks(config, lock or default_lock_path())
    bad = preflight.failures(checks)
    if bad:
        raise SandboxError("runnerd cannot start here:\n" + "\n".join(c.line() for c in bad))
    assert parts.nsjail and parts.policy and parts.cgroups
    host = HostState(config, parts.cgroups)
    host.prepare()
    cage = Cage(config, parts.policy, host, parts.nsjail)
    runner: SessionRunner = cage
    if config.mode == "warm":
        runner = WarmCage(
            config, parts.policy, parts.policy.zygote_kafel_text(), host, parts.nsjail, config.concurrency
        )
        try:
            await runner.start()
        except BaseException:
            host.close()
            raise
    runtime = Runtime(
        config=config,
        policy=parts.policy,
        host=host,
        cage=cage,
        nsjail=parts.nsjail,
        runner=runner,
        checks=list(checks),
    )
    if probe:
        runtime.checks += await runtime.probe(import_check)
        bad = preflight.failures(runtime.checks)
        if bad:
            await runtime.aclose()
            raise PolicyError("the cage is not what the policy promises:\n" + "\n".join(c.line() for c in bad))
    for check in runtime.checks:
        log.info("check: %s", check.line())
    return runtime
