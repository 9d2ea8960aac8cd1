"""``runnerd bench``: latency and throughput of the same code, bare, through a cold daemon and a warm one.

Workloads (:mod:`runnerd.bench.workloads`):

* W1 ``print(1)``;
* W2 read a 1,000-row CSV input with pandas, group it, plot it, ``savefig`` a PNG;
* W3 a numpy computation of about 50 ms;
* W4 code that raises.

Sessions (issue 12; picked with ``--workloads`` like the others, e.g.
``--workloads W1,W2,S1,S2,S3,S4`` for one-off and session rows side by side):

* S1 open a session (open -> opened), then close it: a row for each;
* S2 ``print(1)`` in a session that is already open;
* S3 W2 in a session that already holds its DataFrame: the session opens
  with W2's ``data.csv``, its setup run (not measured) is W2's imports and
  ``read_csv``, each measured run the rest of W2 (group, print, bar plot,
  ``savefig``); both parts are cut from W2's code;
* S4 the memory of idle sessions: PSS of each one's processes (its cgroup's
  ``cgroup.procs``), what the daemon's tree grew by, and the session zygote's own PSS.

Session rows talk runnerd/1 on a raw DEALER socket (:mod:`runnerd.bench.sessions`);
in ``bare`` mode a session is a plain interpreter kept running, the floor
(:mod:`runnerd.bench.bare`).

Modes, measured in one run so their ratios are comparable:

* ``bare``  - the sandbox env's python as a plain subprocess, no isolation (the floor);
* ``cold``  - a daemon in cold mode (a fresh nsjail per job), started by the bench;
* ``warm``  - a daemon in warm mode (zygotes), started by the bench;
* ``daemon`` - with ``--endpoint``: a daemon that is already running;
* ``fleet`` - two cold daemons pinned to disjoint CPUs, one alone then both
  through the fleet layer (:mod:`runnerd.bench.fleet`);
* ``fairness`` - tenants sharing a warm daemon's slots: light ones alone,
  then beside a heavy one, then backlogged ones' shares
  (:mod:`runnerd.bench.fairness`; its own workload, F1);
* ``integrations`` - one agent step through smolagents' and LangChain's
  integrations beside a direct ``Session.run``, a cold daemon then a warm
  one (:mod:`runnerd.bench.integrations`; needs the extras).

Each daemon mode runs alone (the others stopped, :mod:`runnerd.bench.daemon`)
so they do not share the CPUs. For each workload and mode: latency
percentiles of sequential jobs (the wall clock a client sees), then
throughput with ``--clients`` concurrent clients. Also measured: each
started daemon's memory when idle (PSS of the daemon and everything under
it: zygotes included; :mod:`runnerd.bench.memory`). The table, its notes,
the JSON and the plot: :mod:`runnerd.bench.report`.

The run loop through a daemon is :mod:`runnerd.bench.jobs` (a session
workload goes on to :mod:`runnerd.bench.sessions`); concurrent clients share
their runs by :mod:`runnerd.bench.tickets`. This package's names are what
``runnerd bench`` (:func:`runnerd.cli.cmd_bench`) uses.
"""

from __future__ import annotations

from .bare import bench_bare
from .daemon import started
from .fairness import bench_fairness
from .fleet import bench_fleet
from .integrations import bench_integrations
from .jobs import bench_endpoint
from .memory import tree_pss
from .report import Progress, Row, plot, report_json, table
from .workloads import WORKLOADS, Workload

MODES = ("bare", "cold", "warm", "daemon", "fleet", "fairness", "integrations")

__all__ = [
    "MODES",
    "WORKLOADS",
    "Progress",
    "Row",
    "Workload",
    "bench_bare",
    "bench_endpoint",
    "bench_fairness",
    "bench_fleet",
    "bench_integrations",
    "plot",
    "report_json",
    "started",
    "table",
    "tree_pss",
]
