"""Making and running cages on the host.

``policy`` reads the operator's nsjail config and kafel policy; ``runtime``
turns a config into checked parts (``preflight``); ``host`` holds the state
dir, uid slots and crash sweeps; per job, ``job`` checks the request,
``workspace`` makes its tmpfs, ``cgroups`` its cgroup, ``cage`` (cold) or
``warm`` (zygotes) runs it, ``output`` captures what it prints and
``artifacts`` collects what it wrote; ``sandbox_env`` builds the library set.
"""
