"""The ``runnerd`` command. The only module that exits the process.

Exit codes: ``run`` gives 0 for OUTCOME_OK, 1 for OUTCOME_FAILED and 124 for
OUTCOME_DEADLINE_EXCEEDED (as timeout(1) does); any command gives 2 when it
cannot start (bad flags, config, policy, env, host).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import __version__
from . import config as config_mod
from .errors import RunnerdError
from .one_job import read_inputs, report, run_local, run_remote
from .sandbox import sandbox_env
from .server import logs

log = logging.getLogger(__name__)

EXIT_USAGE = 2


def _load_config(args: argparse.Namespace, **overrides: Any) -> config_mod.Config:
    values = {k: v for k, v in overrides.items() if v is not None}
    return config_mod.load(args.config, values)


def _curve(args: argparse.Namespace) -> dict[str, bytes] | None:
    """CURVE keys for a client command, from --client-key/--server-key or the environment."""
    from .client import curve_keys

    client_key = getattr(args, "client_key", None) or os.environ.get("RUNNERD_CLIENT_KEY")
    server_key = getattr(args, "server_key", None) or os.environ.get("RUNNERD_SERVER_KEY")
    if not client_key and not server_key:
        return None
    if not (client_key and server_key):
        raise RunnerdError("CURVE needs both --client-key (your .key_secret) and --server-key (the server's .key)")
    try:
        return curve_keys(client_key, server_key)
    except (OSError, ValueError) as exc:
        raise RunnerdError(f"cannot load the CURVE keys: {exc}") from None


def cmd_run(args: argparse.Namespace) -> int:
    try:
        code = Path(args.file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RunnerdError(f"cannot read {args.file}: {exc}") from None
    files = read_inputs(args.input)
    endpoint = args.endpoint or os.environ.get("RUNNERD_ENDPOINT")
    if endpoint:
        result = run_remote(endpoint, code, files, args.timeout, _curve(args))
    else:
        result = asyncio.run(run_local(_load_config(args), code, files, args.timeout))
    return report(result, Path(args.out) if args.out else None, streamed=True)


def cmd_serve(args: argparse.Namespace) -> int:
    from .server.daemon import Daemon

    overrides: dict[str, Any] = {
        "bind": tuple(args.bind) if args.bind else None,
        "concurrency": args.concurrency,
        "queue_size": args.queue_size,
        "mode": args.mode,
        "log_level": args.log_level,
    }
    if args.log_json:
        overrides["log_format"] = "json"
    values = {k: v for k, v in overrides.items() if v is not None}
    cfg = config_mod.load(args.config, values)
    logs.setup(cfg.log_level, cfg.log_format)
    return asyncio.run(Daemon(cfg, config_path=args.config, overrides=values).run())


def cmd_ping(args: argparse.Namespace) -> int:
    from .client import Client, resolve_endpoint

    endpoint = resolve_endpoint(args.endpoint)
    with Client(endpoint, curve=_curve(args)) as client:
        pong = client.ping(timeout=args.timeout)
    print(
        f"{endpoint}: {pong.get('server')} (protocol {pong.get('protocol')}, pid {pong.get('pid')}, "
        f"instance {pong.get('instance')}): {pong.get('state', 'ready')}, {pong.get('running')}/"
        f"{pong.get('concurrency')} running, {pong.get('queued')} queued, "
        f"{pong.get('sessions_open')}/{pong.get('max_sessions')} sessions"
    )
    for m in pong.get("members", ()):
        alive = m["state"] if m["alive"] else "dead"
        print(f"  {m['endpoint']}: {alive}, {m['running']}/{m['concurrency']} running, {m['queued']} queued")
    return 1 if args.ready and pong.get("state", "ready") != "ready" else 0


def cmd_drain(args: argparse.Namespace) -> int:
    from .client import resolve_endpoint
    from .drain import drain

    endpoint = resolve_endpoint(args.endpoint)
    pong, done = drain(endpoint, args.timeout, wait=args.wait)
    print(f"{endpoint}: {pong.get('state')}, {pong.get('running')} running, {pong.get('sessions_open')} sessions open")
    return 0 if done else 1


def cmd_stats(args: argparse.Namespace) -> int:
    import json

    from .client import Client, resolve_endpoint

    with Client(resolve_endpoint(args.endpoint), curve=_curve(args)) as client:
        stats = client.stats(timeout=args.timeout)
    for key in ("v", "id", "type"):
        stats.pop(key, None)
    if args.json:
        print(json.dumps(stats, indent=2, sort_keys=True))
        return 0
    lat, run = stats.get("latency_ms", {}), stats.get("run_ms", {})
    print(
        f"{stats.get('server')}  pid {stats.get('pid')}  up {stats.get('uptime_s')} s  "
        f"rss {stats.get('rss_bytes', 0) / 2**20:.1f} MiB"
    )
    print(
        f"running {stats.get('running')}/{stats.get('concurrency')}  "
        f"queued {stats.get('queued')}/{stats.get('queue_size')}  "
        f"done {stats.get('done')}  retained {stats.get('retained')}"
    )
    print("outcomes  " + "  ".join(f"{k} {v}" for k, v in sorted(stats.get("outcomes", {}).items())))
    print("reasons   " + "  ".join(f"{k} {v}" for k, v in sorted(stats.get("reasons", {}).items())))
    print(f"latency   p50 {lat.get('p50')} ms  p95 {lat.get('p95')} ms  p99 {lat.get('p99')} ms (accepted to result)")
    print(f"run       p50 {run.get('p50')} ms  p95 {run.get('p95')} ms  p99 {run.get('p99')} ms (in the cage)")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from .config import default_lock_path
    from .sandbox import preflight, runtime
    from .sandbox.sandbox_env import LIBRARIES

    cfg = _load_config(args)
    static = preflight.static_checks(cfg, default_lock_path())
    for c in static[0]:
        print(c.line(), flush=True)
    if preflight.failures(static[0]):
        return 1

    async def probe() -> list[preflight.Check]:
        rt = await runtime.open_runtime(cfg, probe=False, static=static)
        try:
            return await rt.probe(tuple(LIBRARIES.values()))
        finally:
            await rt.aclose()

    try:
        probed = asyncio.run(probe())
    except RunnerdError as exc:
        probed = [preflight.Check("cage probe", False, str(exc))]
    for c in probed:
        print(c.line())
    return 0 if not preflight.failures(probed) else 1


def cmd_env(args: argparse.Namespace) -> int:
    from .config import default_lock_path

    cfg = _load_config(args)
    lock = Path(args.lock) if args.lock else default_lock_path()
    if args.action == "build":
        sandbox_env.build(
            cfg.sandbox_env, lock, force=args.force, progress=lambda m: print(f"runnerd env: {m}", flush=True)
        )
        return 0
    if args.action == "status":
        st = sandbox_env.status(cfg.sandbox_env, lock)
        print(st.detail)
        return 0 if st.ready else 1
    if args.action == "lock":
        requirements_in = lock.with_name("requirements.in")
        sandbox_env.compile_lock(requirements_in, lock)
        print(f"wrote {lock}")
        return 0
    raise AssertionError(args.action)  # pragma: no cover


def cmd_bench(args: argparse.Namespace) -> int:
    import json
    import time

    from . import bench

    cfg = _load_config(args)
    modes = [m for m in args.modes.split(",") if m]
    unknown = set(modes) - set(bench.MODES)
    if unknown:
        raise RunnerdError(f"unknown mode(s) {', '.join(sorted(unknown))}; modes are {', '.join(bench.MODES)}")
    if "daemon" in modes and not args.endpoint:
        raise RunnerdError("mode daemon benches a running daemon: give --endpoint")
    names = [w for w in args.workloads.split(",") if w]
    for name in names:
        if name not in bench.WORKLOADS:
            raise RunnerdError(f"unknown workload {name!r}; workloads are {', '.join(bench.WORKLOADS)}")
    workloads = [bench.WORKLOADS[n]() for n in names]
    progress = bench.Progress()
    rows: list[bench.Row] = []
    extra: dict[str, Any] = {
        "workloads": [{"name": w.name, "title": w.title} for w in workloads],
        "jobs": args.jobs, "clients": args.clients, "idle_pss_bytes": {},
    }  # fmt: skip
    png: bytes | None = None

    def on(endpoint: str, mode: str, last: bool) -> None:
        nonlocal png
        for w in workloads:
            rows.extend(bench.bench_endpoint(endpoint, mode, w, args.jobs, args.clients, progress))
        if last and args.png:
            png = bench.plot(endpoint, bench.report_json(rows, extra))

    if "bare" in modes:
        for w in workloads:
            rows.append(bench.bench_bare(cfg.sandbox_env / "bin" / "python3", w, args.jobs, progress))
    daemons = [m for m in ("cold", "warm") if m in modes]
    for i, mode in enumerate(daemons):
        with bench.started(args.config, mode, args.concurrency) as d:
            time.sleep(3)  # let it settle before reading its idle memory
            extra["idle_pss_bytes"][mode] = bench.tree_pss(d.proc.pid)
            on(d.endpoint, mode, last=i == len(daemons) - 1 and "daemon" not in modes)
    if "daemon" in modes:
        on(args.endpoint, "daemon", last=True)
    if "fleet" in modes:
        rows.extend(bench.bench_fleet(args.config, workloads, args.jobs, args.clients, progress))
    if "fairness" in modes:
        rows.extend(bench.bench_fairness(args.config, args.concurrency, progress))
    if "integrations" in modes:
        for mode in ("cold", "warm"):
            with bench.started(args.config, mode, args.concurrency) as d:
                rows.extend(bench.bench_integrations(d.endpoint, mode, args.jobs, progress))

    print(bench.table(rows))
    by = {(r.workload, r.mode): r for r in rows}
    for w in workloads:
        cold, warm = by.get((w.name, "cold")), by.get((w.name, "warm"))
        if cold and warm:
            print(f"{w.name} warm/cold p50 ratio: {warm.p50_ms / cold.p50_ms:.3f}")
    for mode, pss in extra["idle_pss_bytes"].items():
        print(f"idle {mode} daemon, PSS of it and everything under it: {pss / 2**20:.1f} MiB")
    if args.json:
        Path(args.json).write_text(json.dumps(bench.report_json(rows, extra), indent=1) + "\n")
        print(f"wrote {args.json}")
    if args.png and png:
        Path(args.png).write_bytes(png)
        print(f"wrote {args.png}")
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    import zmq.auth

    directory = Path(args.dir)
    directory.mkdir(parents=True, exist_ok=True)
    for suffix in (".key", ".key_secret"):
        if (directory / f"{args.name}{suffix}").exists():
            raise RunnerdError(f"{directory / (args.name + suffix)} exists; not overwriting a key")
    public, secret = zmq.auth.create_certificates(str(directory), args.name)
    os.chmod(secret, 0o600)
    print(f"public key (give it out):  {public}")
    print(f"secret key (keep it):      {secret}")
    return 0


def cmd_mcp(args: argparse.Namespace) -> int:
    from .mcp_server import serve

    serve(args.endpoint, _curve(args))
    return 0


def cmd_repl(args: argparse.Namespace) -> int:
    from .repl import main as repl_main

    files = dict(read_inputs(args.file))
    return repl_main(args.endpoint, _curve(args), files=files, idle_timeout=args.idle_timeout,
                     figures=Path(args.figures), timeout=args.timeout)  # fmt: skip


def cmd_install(args: argparse.Namespace) -> int:
    from .install import install

    install(root=Path(args.root), build_env=not args.no_env, say=lambda m: print(f"runnerd install: {m}", flush=True))
    return 0


def _add_curve_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--client-key", default=None, metavar="FILE", help="CURVE: your .key_secret (or $RUNNERD_CLIENT_KEY)"
    )
    p.add_argument(
        "--server-key", default=None, metavar="FILE", help="CURVE: the server's .key (or $RUNNERD_SERVER_KEY)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="runnerd", description="Run model-written Python in nsjail cages.")
    parser.add_argument("--version", action="version", version=f"runnerd {__version__}")
    parser.add_argument(
        "--config", type=Path, default=None, help="TOML config (default /etc/runnerd/runnerd.toml if present)"
    )
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING or ERROR")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run one Python file in a cage and print what happened")
    p.add_argument("file", help="the Python file to run")
    p.add_argument(
        "--input", action="append", default=[], metavar="PATH", help="an input file, readable by its name (repeatable)"
    )
    p.add_argument("--out", metavar="DIR", help="write figures and files here")
    p.add_argument("--timeout", type=float, default=None, metavar="S", help="wall clock in seconds (default 30)")
    p.add_argument(
        "--endpoint", default=None, help="run through this daemon (default: $RUNNERD_ENDPOINT; unset: a local cage)"
    )
    _add_curve_flags(p)
    p.set_defaults(func=cmd_run, default_level="WARNING")

    p = sub.add_parser("serve", help="run the daemon")
    p.add_argument("--bind", action="append", metavar="ENDPOINT", help="ipc://PATH or tcp://HOST:PORT (repeatable)")
    p.add_argument("--concurrency", type=int, default=None, help="cages at once (default: the CPUs)")
    p.add_argument("--queue-size", type=int, default=None, help="jobs waiting beyond those (default 64)")
    p.add_argument("--log-json", action="store_true", help='log JSON lines (log_format = "json")')
    p.add_argument(
        "--mode",
        choices=("cold", "warm"),
        default=None,
        help="cold: nsjail per job; warm: zygotes (default: config, cold)",
    )
    p.set_defaults(func=cmd_serve, default_level="INFO")

    for name, func, what in (
        ("ping", cmd_ping, "check that a daemon answers"),
        ("stats", cmd_stats, "a daemon's counters"),
        ("drain", cmd_drain, "drain a local daemon: it takes no new work, and stays up"),
    ):
        p = sub.add_parser(name, help=what)
        p.add_argument(
            "--endpoint", default=None, help="default: $RUNNERD_ENDPOINT, else ipc:///run/runnerd/runnerd.sock"
        )
        p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the answer")
        if name == "stats":
            p.add_argument("--json", action="store_true", help="print JSON")
        if name == "ping":
            p.add_argument(
                "--ready", action="store_true",
                help="exit 1 unless it says it is ready to take work (a draining daemon is not): a readiness probe",
            )  # fmt: skip
        if name == "drain":
            p.add_argument(
                "--wait", action="store_true", help="until no job runs and no session is open (within --timeout)"
            )
            p.set_defaults(func=func, default_level="WARNING")
            continue  # a local ipc endpoint: no CURVE
        _add_curve_flags(p)
        p.set_defaults(func=func, default_level="WARNING")

    p = sub.add_parser("mcp", help="serve the run_python tool over MCP (stdio), through a daemon")
    p.add_argument(
        "--endpoint", default=None, help="the daemon (default: $RUNNERD_ENDPOINT, else the default ipc socket)"
    )
    _add_curve_flags(p)
    p.set_defaults(func=cmd_mcp, default_level="WARNING")

    p = sub.add_parser("repl", help="a Python prompt into a sandbox session of a daemon (state lives across inputs)")
    p.add_argument(
        "--endpoint", default=None, help="the daemon (default: $RUNNERD_ENDPOINT, else the default ipc socket)"
    )
    p.add_argument(
        "--file", action="append", default=[], metavar="PATH", help="an input file, readable by its name (repeatable)"
    )
    p.add_argument("--idle-timeout", type=float, default=None, metavar="S", help="end the session after S s idle")
    p.add_argument(
        "--timeout", type=float, default=None, metavar="S", help="wall clock of each run (default: the daemon's)"
    )
    p.add_argument(
        "--figures", default="runnerd-figures", metavar="DIR", help="write figures here (default ./runnerd-figures)"
    )
    _add_curve_flags(p)
    p.set_defaults(func=cmd_repl, default_level="WARNING")

    p = sub.add_parser("install", help="install as a systemd service (unit, config, group, socket dir, env)")
    p.add_argument("--root", default="/", help="write the files under this directory instead of /")
    p.add_argument("--no-env", action="store_true", help="do not build the sandbox env")
    p.set_defaults(func=cmd_install, default_level="WARNING")

    p = sub.add_parser("keygen", help="make a CURVE key pair (NAME.key public, NAME.key_secret secret)")
    p.add_argument("dir", help="where to write them")
    p.add_argument("name", help="the pair's name, e.g. server or a client's name")
    p.set_defaults(func=cmd_keygen, default_level="WARNING")

    p = sub.add_parser("bench", help="latency and throughput: bare python, a cold daemon, a warm daemon")
    p.add_argument(
        "--modes",
        default="bare,cold,warm",
        help="comma-separated: bare, cold, warm (started here), daemon (--endpoint), fleet (2 daemons on 2 CPUs), "
        "fairness (tenants sharing a warm daemon)",
    )
    p.add_argument("--endpoint", default=None, help="for mode daemon: a running daemon to drive")
    p.add_argument(
        "--workloads",
        default="W1,W2,W3,W4,S1,S2,S3,S4",
        help="comma-separated: W1 print, W2 pandas+plot, W3 numpy, W4 raises; sessions: S1 open/close, "
        "S2 print in a session, S3 W2's plot on a DataFrame the session holds, S4 idle sessions' memory",
    )
    p.add_argument("--jobs", type=int, default=100, help="sequential jobs per workload and mode")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients for the throughput run")
    p.add_argument("--concurrency", type=int, default=None, help="the started daemons' concurrency (default: config)")
    p.add_argument(
        "--json", default="bench.json", metavar="FILE", help="write the rows here (default bench.json; '' for none)"
    )
    p.add_argument(
        "--png", default="bench.png", metavar="FILE", help="plot the latencies here (default bench.png; '' for none)"
    )
    p.set_defaults(func=cmd_bench, default_level="WARNING")

    p = sub.add_parser("check", help="check the host, the policy and the cage, one line each")
    p.set_defaults(func=cmd_check, default_level="WARNING")

    p = sub.add_parser("env", help="build or inspect the sandbox environment")
    p.add_argument("action", choices=("build", "status", "lock"))
    p.add_argument("--lock", default=None, help="the lock file (default env/requirements.lock)")
    p.add_argument("--force", action="store_true", help="rebuild even if up to date")
    p.set_defaults(func=cmd_env, default_level="INFO")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    logs.setup(args.log_level or os.environ.get("RUNNERD_LOG_LEVEL") or args.default_level)
    try:
        code = args.func(args)
    except RunnerdError as exc:
        print(f"runnerd: {exc}", file=sys.stderr)
        code = EXIT_USAGE
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)
