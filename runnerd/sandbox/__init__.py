"""Making and running cages on the host.

``policy`` reads the operator's nsjail config and kafel policy and, with
``shape``, makes the one description of a job's cage both runners build
from; ``runtime`` turns a config into checked parts (``preflight``);
``host`` holds the state dir, uid slots and crash sweeps. Per job: ``job``
checks the request, ``workspace`` makes its tmpfs, ``cgroups`` (``cgroup_v1``,
``cgroup_v2``, ``cgroup_detect``) its cgroup; a ``runner.Runner`` runs it:
``cage`` (cold: ``nsjail`` per job) or ``warm`` (a pool of ``zygotes``, each
with its ``spool``); ``supervise`` and ``output`` watch it, ``report`` reads
what it said, ``artifacts`` collects what it wrote, ``runner`` builds the
result. A ``session`` is the third runner: a cage (``session_cage``) opened
by either of the two and kept, frozen, between its runs. ``sandbox_env``
builds the library set.
"""
