"""cgroup v1 driver (hybrid/legacy hosts): memory, cpu, cpuacct, pids, freezer via cgroupspy.

Each v1 controller is its own hierarchy with its own mount point, and the calling
process may sit at a different place in each (on the test machine memory is at
/process_api/<hash> while the others are at "/"). So the driver keeps one base per
controller: mount + own path for that controller + parent, and a sandbox cgroup
`rel` exists once per controller below those bases.

cgroupspy gives us the tree navigation (Node: create_cgroup/delete_cgroup) and the
typed memory/cpu/cpuacct files. It has no pids or freezer controller classes (and
no memory.memsw/oom_kill semantics beyond plain integers), so those go through its
generic Controller.get_property/set_property, i.e. plain file reads and writes.

Limits: memory.limit_in_bytes (+ memory.memsw.limit_in_bytes when the kernel
accounts swap: swap 0 means memsw = mem), cpu.cfs_quota_us / cfs_period_us,
pids.max. Killing uses the freezer so a fork bomb cannot outrun the signals.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from typing import Any

from cgroupspy.controllers import (
    Controller,
    CpuAcctController,
    CpuController,
    MemoryController,
)
from cgroupspy.nodes import Node

from sandbox.cgroups.base import (
    KILL_TIMEOUT,
    WEIGH_LOCK,
    CgroupDriver,
    Usage,
    base_weight,
    check_rel,
    child_weights,
    cpu_weight,
    is_dir,
    join_cg,
    path_exists,
    path_within,
    pjoin,
    read_pids,
    read_proc_cgroup,
    rmdir_retry,
    sigkill,
    walk_dirs,
    write_text,
)
from sandbox.errors import CorralError, HostSetupError, KernelError, NotFound
from sandbox.spec import Limits

log = logging.getLogger(__name__)

#: Controllers a sandbox cannot do without; cpuacct only feeds usage().
REQUIRED = ("memory", "cpu", "pids", "freezer")
OPTIONAL = ("cpuacct",)

CPU_PERIOD = 100_000
#: cpu.shares per CPU of allowance (the kernel's default for one cgroup), and its range.
SHARES_PER_CPU, SHARES_MIN, SHARES_MAX = 1024, 2, 262144


def shares(cpus: float | None) -> int:
    """cpu.shares for a cgroup allowed `cpus` CPUs (None: the machine): base.cpu_weight."""
    return cpu_weight(cpus, SHARES_PER_CPU, SHARES_MIN, SHARES_MAX)

#: v1 reports "unlimited" as a huge page-aligned number rather than -1.
_UNLIMITED_FLOOR = 1 << 62

_CLASSES: dict[str, type[Any]] = {
    "memory": MemoryController,
    "cpu": CpuController,
    "cpuacct": CpuAcctController,
    "pids": Controller,
    "freezer": Controller,
}


def plan_limits(limits: Limits, has_memsw: bool) -> list[tuple[str, str, str]]:
    """The (controller, file, value) writes that apply `limits`, in order. Pure.

    memory.memsw.limit_in_bytes must never be below memory.limit_in_bytes, so the
    writer retries in the other order when the kernel says EINVAL (see _apply).
    """
    mem = -1 if limits.memory_bytes is None else int(limits.memory_bytes)
    ops: list[tuple[str, str, str]] = [("memory", "memory.limit_in_bytes", str(mem))]
    if has_memsw:
        memsw = -1 if mem == -1 or limits.swap_bytes is None else mem + int(limits.swap_bytes)
        ops.append(("memory", "memory.memsw.limit_in_bytes", str(memsw)))
    quota = -1 if limits.cpus is None else max(1000, round(limits.cpus * CPU_PERIOD))
    ops.append(("cpu", "cpu.cfs_period_us", str(CPU_PERIOD)))
    ops.append(("cpu", "cpu.cfs_quota_us", str(quota)))
    ops.append(("cpu", "cpu.shares", str(shares(limits.cpus))))
    ops.append(("pids", "pids.max", "max" if limits.pids is None else str(int(limits.pids))))
    return ops


class V1Driver(CgroupDriver):
    version = "v1"

    def __init__(self, mounts: dict[str, str], own: dict[str, str],
                 parent: str | None = None, proc: str = "/proc") -> None:
        missing = [c for c in REQUIRED if c not in mounts or c not in own]
        if missing:
            raise HostSetupError(
                f"cgroup v1 controllers missing: {', '.join(missing)}",
                hint="mount them under /sys/fs/cgroup (or boot with the unified hierarchy)",
            )
        self.ctrls = [c for c in (*REQUIRED, *OPTIONAL) if c in mounts and c in own]
        self.mounts = {c: mounts[c].rstrip("/") for c in self.ctrls}
        self.parent_parts = check_rel(parent) if parent else []
        #: hierarchy path of the base in each controller, e.g. "/process_api/abc/corral-x"
        self.own_cg = {c: join_cg(own[c]) for c in self.ctrls}
        self.base_cg = {c: join_cg(own[c], *self.parent_parts) for c in self.ctrls}
        self.proc = proc

    # --- paths and cgroupspy nodes -------------------------------------------

    def _cg(self, ctrl: str, rel: str, allow_base: bool = False) -> str:
        return join_cg(self.base_cg[ctrl], *check_rel(rel, allow_base=allow_base))

    def _dir(self, ctrl: str, rel: str, allow_base: bool = False) -> str:
        return self.mounts[ctrl] + self._cg(ctrl, rel, allow_base).rstrip("/")

    def _node(self, ctrl: str, rel: str, create: bool = False) -> Node:
        """A cgroupspy Node for `rel` in `ctrl`'s hierarchy (creating it and its parents).

        The chain starts at our own cgroup, so nothing above it is ever created.
        """
        node = Node(self.mounts[ctrl] + self.own_cg[ctrl].rstrip("/"))
        for comp in [*self.parent_parts, *check_rel(rel, allow_base=True)]:
            # create_cgroup is a mkdir that tolerates EEXIST
            node = node.create_cgroup(comp) if create else Node(comp, parent=node)
        return node

    def _ctl(self, ctrl: str, rel: str, create: bool = False) -> Any:
        return _CLASSES[ctrl](self._node(ctrl, rel, create))

    def path(self, rel: str) -> str:
        return self._dir("memory", rel, allow_base=True)

    def exists(self, rel: str) -> bool:
        return all(is_dir(self._dir(c, rel, True)) for c in REQUIRED)

    # --- setup ---------------------------------------------------------------

    def prepare(self, rel: str, limits: Limits) -> None:
        check_rel(rel)
        try:
            ctls = {c: self._ctl(c, rel, create=True) for c in self.ctrls}
        except OSError as e:
            raise KernelError(f"creating cgroup {rel!r} failed: {e}", errno=e.errno or 0,
                              hint="our own cgroup must exist and be writable (root)") from e
        has_memsw = path_exists(pjoin(self._dir("memory", rel),
                                                "memory.memsw.limit_in_bytes"))
        ops = plan_limits(limits, has_memsw)
        self._apply_memory(ctls["memory"], [o for o in ops if o[0] == "memory"])
        for ctrl, fname, value in ops:
            if ctrl != "memory":
                self._set(ctls[ctrl], fname, value)
        self._weigh_ancestors(rel)
        log.debug("cgroup v1 %s prepared with %s", rel, limits)

    def _weigh_ancestors(self, rel: str) -> None:
        """Our cgroups between the base and `rel` weigh the whole machine
        (base.cpu_weight); the base, and any of ours above it, weigh the sum
        of their children (base.base_weight). Written bottom-up, so each sum
        sees its children's new weights. Our own cgroup and those above it are
        not ours to set."""
        parts = [*self.parent_parts, *check_rel(rel)[:-1]]
        mount_own = self.mounts["cpu"] + self.own_cg["cpu"]
        machine = str(shares(None))
        with WEIGH_LOCK:
            for i in range(len(parts), 0, -1):
                d = pjoin(mount_own, *parts[:i])
                if i > len(self.parent_parts):
                    write_text(pjoin(d, "cpu.shares"), machine)
                else:
                    value = base_weight(child_weights(d, "cpu.shares"), shares(None),
                                        SHARES_MIN, SHARES_MAX)
                    write_text(pjoin(d, "cpu.shares"), str(value))

    def _set(self, ctl: Any, fname: str, value: str) -> None:
        try:
            ctl.set_property(fname.encode(), value)
        except OSError as e:
            raise KernelError(
                f"write {value!r} to {ctl.filepath(fname.encode()).decode()} failed: "
                f"{errno.errorcode.get(e.errno or 0, e.errno)} ({e.strerror})",
                errno=e.errno or 0) from e

    def _apply_memory(self, ctl: Any, ops: list[tuple[str, str, str]]) -> None:
        # The kernel keeps memsw >= mem at every instant: lowering goes mem first,
        # raising goes memsw first. Try mem-first, and on EINVAL the other order.
        try:
            for _, fname, value in ops:
                self._set(ctl, fname, value)
        except KernelError as e:
            if e.errno != errno.EINVAL or len(ops) < 2:
                raise
            for _, fname, value in reversed(ops):
                self._set(ctl, fname, value)

    def add(self, rel: str, pid: int) -> None:
        check_rel(rel)
        for c in self.ctrls:
            self._set(self._ctl(c, rel), "cgroup.procs", str(int(pid)))

    def enter_leaf(self, leaf: str) -> None:
        # v1 has no no-internal-processes rule: the daemon stays where it is.
        check_rel(leaf)

    # --- inspection ----------------------------------------------------------

    def procs(self, rel: str) -> list[int]:
        out: set[int] = set()
        for c in REQUIRED:
            for d in walk_dirs(self._dir(c, rel, True)):
                out.update(read_pids(pjoin(d, "cgroup.procs")))
        return sorted(out)

    def contains(self, rel: str, pid: int) -> bool:
        cgs = read_proc_cgroup(pid, self.proc)
        return bool(cgs) and all(
            c in cgs and path_within(cgs[c], self._cg(c, rel, allow_base=True))
            for c in ("memory", "pids"))

    def children(self, rel: str) -> list[str]:
        d = self._dir("memory", rel, allow_base=True)
        try:
            return sorted(e.name for e in os.scandir(d) if e.is_dir(follow_symlinks=False))
        except FileNotFoundError:
            return []

    def usage(self, rel: str) -> Usage:
        if not is_dir(self._dir("memory", rel, allow_base=True)):
            raise NotFound(f"cgroup {self.path(rel)} does not exist")
        mem = self._ctl("memory", rel)
        try:
            limit = int(mem.get_property(b"memory.limit_in_bytes"))
            oom = mem.oom_control
            if isinstance(oom, dict) and "oom_kill" in oom:
                oom_kills = int(oom["oom_kill"])
            else:
                # Kernels before 4.13 have no oom_kill counter: count limit hits.
                oom_kills = int(mem.failcnt)
            cpu_usec = 0
            if "cpuacct" in self.ctrls:
                cpu_usec = int(self._ctl("cpuacct", rel).usage) // 1000  # ns -> µs
            pids_ctl = self._ctl("pids", rel)
            pids_max = pids_ctl.get_property(b"pids.max")
            denied = 0
            try:
                for line in pids_ctl.get_property(b"pids.events").splitlines():
                    key, _, val = line.partition(" ")
                    if key == "max":
                        denied = int(val)
            except (OSError, ValueError):
                pass  # pids.events arrived in Linux 4.0's v1 controller; optional
            return Usage(
                memory_bytes=int(mem.usage_in_bytes),
                memory_max=None if limit >= _UNLIMITED_FLOOR else limit,
                cpu_usec=cpu_usec,
                pids=int(pids_ctl.get_property(b"pids.current")),
                pids_max=None if pids_max == "max" else int(pids_max),
                oom_kills=oom_kills,
                pids_denied=denied,
            )
        except FileNotFoundError as e:
            raise CorralError(f"cgroup {self.path(rel)} has no usage file {e.filename}") from e

    # --- teardown ------------------------------------------------------------

    def kill(self, rel: str) -> None:
        check_rel(rel)
        freezer = self._dir("freezer", rel)
        if not is_dir(freezer):
            sigkill(self.procs(rel))
            return
        ctl = self._ctl("freezer", rel)
        deadline = time.monotonic() + KILL_TIMEOUT
        delay = 0.001
        while True:
            pids = self.procs(rel)
            if not pids:
                return
            if time.monotonic() > deadline:
                raise KernelError(f"cgroup {self.path(rel)} still has processes {pids} "
                                  "after kill")
            # Freeze first so nothing forks between reading the list and the signal;
            # a frozen task gets its SIGKILL once thawed.
            self._set(ctl, "freezer.state", "FROZEN")
            self._wait_frozen(ctl, deadline)
            sigkill(self.procs(rel))
            self._set(ctl, "freezer.state", "THAWED")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def _wait_frozen(self, ctl: Any, deadline: float) -> None:
        while ctl.get_property(b"freezer.state") == "FREEZING":
            if time.monotonic() > deadline:
                return
            time.sleep(0.001)

    def release(self, rel: str) -> None:
        check_rel(rel)
        if self.procs(rel):
            self.kill(rel)
        for c in self.ctrls:
            top = self._dir(c, rel)
            for d in reversed(walk_dirs(top)):  # children first
                self._rmdir(d)
        log.debug("cgroup v1 %s released", rel)

    def _rmdir(self, path: str) -> None:
        rmdir_retry(path)

