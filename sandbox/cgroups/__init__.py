"""cgroups: pick the v2 or v1 driver once, from what this host offers.

v2 when the unified hierarchy offers memory, cpu and pids in our own cgroup (a
systemd host, or a delegated subtree); otherwise v1 on the per-controller
hierarchies (hybrid hosts such as the test machine, whose cgroup2 mount at
/sys/fs/cgroup/unified carries no controllers).
"""

from __future__ import annotations

import logging

from sandbox.cgroups.base import CgroupDriver, Usage, check_rel, pjoin, read_proc_cgroup
from sandbox.cgroups.v1 import OPTIONAL, REQUIRED, V1Driver
from sandbox.cgroups.v2 import NEEDED, V2Driver
from sandbox.errors import HostSetupError

__all__ = ["CgroupDriver", "Usage", "V1Driver", "V2Driver", "cgroup_mounts", "detect"]

log = logging.getLogger(__name__)


def cgroup_mounts(mountinfo: str = "/proc/self/mountinfo") -> tuple[str | None, dict[str, str]]:
    """(cgroup2 mount point or None, {v1 controller: mount point}) from mountinfo."""
    v2: str | None = None
    v1: dict[str, str] = {}
    with open(mountinfo) as f:
        for line in f:
            pre, _, post = line.partition(" - ")
            fields = pre.split()
            rest = post.split()
            if len(fields) < 5 or len(rest) < 3:
                continue
            mnt = fields[4].replace("\\040", " ")
            if rest[0] == "cgroup2" and v2 is None:
                v2 = mnt
            elif rest[0] == "cgroup":
                for opt in rest[2].split(","):
                    if opt in (*REQUIRED, *OPTIONAL) and opt not in v1:
                        v1[opt] = mnt
    return v2, v1


def detect(parent: str | None = None, own: dict[str, str] | None = None) -> CgroupDriver:
    """The driver for this host, rooted at our own cgroup (+ `parent`, created lazily).

    `own` overrides /proc/self/cgroup: the daemon hands its own (pre-leaf) map
    to the keepers it starts, so every keeper roots its driver where the
    daemon's is, whichever cgroup the keeper itself runs in.
    """
    if parent:
        check_rel(parent)
    if own is None:
        own = read_proc_cgroup("self")
    v2_mount, v1_mounts = cgroup_mounts()
    if v2_mount is not None and "" in own:
        ctrl_file = pjoin(v2_mount, own[""].lstrip("/"), "cgroup.controllers")
        try:
            with open(ctrl_file) as f:
                have = f.read().split()
        except OSError:
            have = []
        if all(c in have for c in NEEDED):
            log.debug("cgroup v2 at %s, own cgroup %s", v2_mount, own[""])
            return V2Driver(v2_mount, own[""], parent)
    if all(c in v1_mounts for c in REQUIRED):
        log.debug("cgroup v1: %s", v1_mounts)
        return V1Driver(v1_mounts, own, parent)
    raise HostSetupError(
        "no usable cgroup hierarchy: need cgroup v2 with memory, cpu and pids delegated to "
        f"our cgroup, or cgroup v1 with {', '.join(REQUIRED)}",
        hint="run under systemd with Delegate=yes, or mount the v1 controllers",
    )
