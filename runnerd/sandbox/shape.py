"""The cage's shape: the one description from which a cold job's nsjail config and a warm child's set-up are both made.

What the operator decides lives in the policy (policies/): the tmpfs mounts
and their sizes, the rlimits, the cgroup limits, HOME, the seccomp rules
(a warm zygote's policy is derived from the same kafel file:
:func:`~.policy.zygote_kafel`). What runnerd decides lives here: the
jailed uid, and where the job's directory, code and figures appear.
:meth:`~.policy.Policy.shape` puts the two together. A cold job gets it all
as nsjail config (:func:`~.cage.job_config`); a warm
zygote gets it as JSON on its command line (:meth:`CageShape.for_zygote`)
and mounts and sets the same for each child (incage/zygote.py).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

# The job's uid and gid inside its user namespace; runnerd maps it to an
# unprivileged host uid of its own (uid_base + slot).
JAIL_UID = 1000
# In-cage files runnerd binds (incage/), the job's code and its figures dir.
INCAGE_DIR = "/runnerd"
CODE = f"{INCAGE_DIR}/main.py"
FIGURES = f"{INCAGE_DIR}/figures"

# What a warm zygote's child must still do under its zygote's seccomp
# policy to build its job's cage (fresh user, mount, pid, ipc, net and cgroup namespaces;
# its mounts): the zygote's policy is default.kafel with these entries of
# the EPERM list lifted, and each child refuses them again with a filter of
# its own before any user code runs (incage/zygote.py), so a job is under
# exactly default.kafel in both modes. Name -> the entry's form in kafel.
LIFTED_FOR_ZYGOTES = {
    "unshare": r"(?<![\w])unshare\s*,\s*",
    "mount": r"(?<![\w])mount\s*,\s*",
    # A session's G attaches the /work the host made (a mount fd).
    "move_mount": r"(?<![\w])move_mount\s*,\s*",
    "clone": r"(?<![\w])clone\s*\([^()]*\)\s*\{[^{}]*\}\s*,\s*",
}


@dataclass(frozen=True)
class Tmpfs:
    """A tmpfs the policy mounts in every cage (/tmp, /dev/shm): a warm child mounts it afresh per job."""

    dst: str
    options: str  # the mount's data: size=...,nr_inodes=...,mode=...
    nosuid: bool
    nodev: bool
    noexec: bool


@dataclass(frozen=True)
class CageShape:
    jail_uid: int
    work: str  # the job's working directory, inputs read-only inside (the policy's cwd)
    home: str
    code: str
    figures: str
    tmpfs: tuple[Tmpfs, ...]
    rlimits: Mapping[str, int]
    lifted: tuple[str, ...]  # what a zygote's policy lifts from the job's; each child refuses it again

    def for_zygote(self) -> str:
        """The shape as the zygote reads it (JSON; incage/zygote.py's SHAPE)."""
        return json.dumps(
            {
                "uid": self.jail_uid,
                "work": self.work,
                "home": self.home,
                "code": self.code,
                "figures": self.figures,
                "tmpfs": [
                    {"dst": t.dst, "options": t.options, "nosuid": t.nosuid, "nodev": t.nodev, "noexec": t.noexec}
                    for t in self.tmpfs
                ],
                "rlimits": dict(self.rlimits),
                "lifted": list(self.lifted),
            }
        )
