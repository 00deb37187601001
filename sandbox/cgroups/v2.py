"""cgroup v2 driver: one unified hierarchy, limits through memory.max/cpu.max/pids.max.

Layout: `mount` is where cgroup2 is mounted (/sys/fs/cgroup on systemd hosts,
/sys/fs/cgroup/unified on hybrid ones), `own` the calling process's cgroup from
the "0::" line of /proc/self/cgroup, and `base` = own + parent. Every sandbox
cgroup lives below base.

The no-internal-processes rule (Documentation/admin-guide/cgroup-v2.rst): a
non-root cgroup can only hand controllers to its children (cgroup.subtree_control)
while it has no processes of its own. Under systemd with Delegate=yes the daemon
starts inside corral.service, so it first moves itself into a "supervisor" leaf
(enter_leaf) and only then enables memory/cpu/pids for the subtree.

The mount root is a constructor argument so the unit tests can run these writers
against a temporary directory laid out like cgroupfs.
"""

from __future__ import annotations

import errno
import logging
import os
import time

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
    mkdirs,
    path_exists,
    path_within,
    pjoin,
    read_pids,
    read_proc_cgroup,
    read_text,
    rmdir_retry,
    sigkill,
    walk_dirs,
    write_text,
)
from sandbox.errors import CorralError, HostSetupError, KernelError, NotFound
from sandbox.spec import Limits

log = logging.getLogger(__name__)

#: The controllers a sandbox needs; detection picks v2 only if all are available.
NEEDED = ("memory", "cpu", "pids")

#: cpu.max period (µs): the kernel default, and what the v1 driver uses too.
CPU_PERIOD = 100_000
#: cpu.weight per CPU of allowance (the kernel's default for one cgroup), and its range.
WEIGHT_PER_CPU, WEIGHT_MIN, WEIGHT_MAX = 100, 1, 10000


def weight(cpus: float | None) -> int:
    """cpu.weight for a cgroup allowed `cpus` CPUs (None: the machine): base.cpu_weight."""
    return cpu_weight(cpus, WEIGHT_PER_CPU, WEIGHT_MIN, WEIGHT_MAX)


def plan_limits(limits: Limits) -> list[tuple[str, str]]:
    """The (file, value) writes that apply `limits` to a v2 cgroup, in order. Pure."""
    mem = "max" if limits.memory_bytes is None else str(int(limits.memory_bytes))
    swap = "max" if limits.swap_bytes is None else str(int(limits.swap_bytes))
    if limits.cpus is None:
        cpu = f"max {CPU_PERIOD}"
    else:
        # The kernel refuses quotas below 1 ms.
        cpu = f"{max(1000, round(limits.cpus * CPU_PERIOD))} {CPU_PERIOD}"
    pids = "max" if limits.pids is None else str(int(limits.pids))
    return [("memory.max", mem), ("memory.swap.max", swap), ("cpu.max", cpu),
            ("cpu.weight", str(weight(limits.cpus))), ("pids.max", pids)]


def _int_or_none(text: str) -> int | None:
    text = text.strip()
    return None if text == "max" else int(text)


def _kv(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            out[parts[0]] = int(parts[1])
    return out


class V2Driver(CgroupDriver):
    version = "v2"

    def __init__(self, mount: str, own: str, parent: str | None = None,
                 proc: str = "/proc") -> None:
        self.mount = mount.rstrip("/") or "/"
        self.own = join_cg(own)  # hierarchy path of our own cgroup, e.g. "/system.slice/x"
        self.parent_parts = check_rel(parent) if parent else []
        self.base_cg = join_cg(self.own, *self.parent_parts)  # hierarchy path of the base
        self.proc = proc

    # --- paths ---------------------------------------------------------------

    def _dir(self, cg: str) -> str:
        return pjoin(self.mount, cg.lstrip("/")).rstrip("/")

    def _cg(self, rel: str, allow_base: bool = False) -> str:
        return join_cg(self.base_cg, *check_rel(rel, allow_base=allow_base))

    def path(self, rel: str) -> str:
        return self._dir(self._cg(rel, allow_base=True))

    def exists(self, rel: str) -> bool:
        return is_dir(self.path(rel))

    # --- setup ---------------------------------------------------------------

    def _available(self) -> list[str]:
        try:
            have = read_text(pjoin(self._dir(self.own), "cgroup.controllers")).split()
        except FileNotFoundError as e:
            raise HostSetupError(f"{self._dir(self.own)} is not a cgroup2 directory",
                                 hint="mount cgroup2 (cgroup_no_v1=all or systemd's "
                                 "unified hierarchy)") from e
        return [c for c in NEEDED if c in have]

    def _enable_subtree(self, cg_from: str, cg_to: str) -> None:
        """Enable the needed controllers in subtree_control of every cgroup from
        `cg_from` down to `cg_to` (both inclusive), creating them as needed."""
        want = self._available()
        if not want:
            return
        chain = [cg_from]
        rest = cg_to[len(cg_from):].strip("/")
        for comp in [c for c in rest.split("/") if c]:
            chain.append(join_cg(chain[-1], comp))
        for cg in chain:
            d = self._dir(cg)
            mkdirs(d)
            sc = pjoin(d, "cgroup.subtree_control")
            try:
                have = {c.lstrip("+") for c in read_text(sc).split()}
            except FileNotFoundError:
                have = set()
            missing = [c for c in want if c not in have]
            if not missing:
                continue
            try:
                write_text(sc, " ".join("+" + c for c in missing))
            except KernelError as e:
                raise HostSetupError(
                    f"cannot enable {' '.join(missing)} for the children of {d}: {e}",
                    hint="cgroup v2's no-internal-processes rule: the cgroup must hold no "
                    "processes (the daemon calls enter_leaf('supervisor') first); under "
                    "systemd the unit needs Delegate=yes",
                ) from e

    def prepare(self, rel: str, limits: Limits) -> None:
        cg = self._cg(rel)
        missing = [c for c in NEEDED if c not in self._available()]
        if missing:
            raise HostSetupError(
                f"cgroup v2 controllers {', '.join(missing)} are not available in "
                f"{self._dir(self.own)}",
                hint="delegate them to corral (systemd: Delegate=yes) or use the v1 driver")
        parent_cg = cg.rsplit("/", 1)[0] or "/"
        self._enable_subtree(self.own, parent_cg)
        d = self._dir(cg)
        mkdirs(d)
        for fname, value in plan_limits(limits):
            try:
                write_text(pjoin(d, fname), value)
            except KernelError as e:
                # Kernels built without swap accounting have no memory.swap.max (and
                # cgroupfs refuses to create it): without swap there is nothing to limit.
                if fname != "memory.swap.max" or e.errno not in (errno.ENOENT, errno.EACCES,
                                                                 errno.EPERM):
                    raise
                log.debug("no %s/memory.swap.max (no swap accounting); skipped", d)
        self._weigh(self.base_cg, parent_cg)
        log.debug("cgroup v2 %s prepared with %s", d, limits)

    def add(self, rel: str, pid: int) -> None:
        write_text(pjoin(self._dir(self._cg(rel)), "cgroup.procs"), str(int(pid)))

    def enter_leaf(self, leaf: str) -> None:
        check_rel(leaf)
        base = self._dir(self.base_cg)
        mkdirs(base)
        leaf_dir = pjoin(base, leaf)
        mkdirs(leaf_dir)
        write_text(pjoin(leaf_dir, "cgroup.procs"), str(os.getpid()))
        self._enable_subtree(self.own, self.base_cg)
        # the daemon serves every agent's SSH clients: it weighs as they do together
        self._weigh(self.base_cg, join_cg(self.base_cg, leaf))

    def _weigh(self, cg_from: str, cg_to: str) -> None:
        """Every cgroup from `cg_from` down to `cg_to` (both inclusive) below the
        base weighs the whole machine (base.cpu_weight); the base weighs the
        sum of its children (base.base_weight), written last so that it sees
        their new weights. Our own cgroup is not ours to set."""
        if "cpu" not in self._available():
            return   # not delegated to us: prepare() says so, with a hint
        chain = [cg_from]
        for comp in [c for c in cg_to[len(cg_from):].split("/") if c]:
            chain.append(join_cg(chain[-1], comp))
        machine = weight(None)
        with WEIGH_LOCK:
            for cg in reversed(chain):
                if cg == self.own or not path_within(cg, self.own):
                    continue
                d = self._dir(cg)
                value = machine
                if cg == self.base_cg:
                    value = base_weight(child_weights(d, "cpu.weight"), machine,
                                        WEIGHT_MIN, WEIGHT_MAX)
                write_text(pjoin(d, "cpu.weight"), str(value))

    # --- inspection ----------------------------------------------------------

    def procs(self, rel: str) -> list[int]:
        out: set[int] = set()
        for d in walk_dirs(self.path(rel)):
            out.update(read_pids(pjoin(d, "cgroup.procs")))
        return sorted(out)

    def contains(self, rel: str, pid: int) -> bool:
        cg = read_proc_cgroup(pid, self.proc).get("")
        return cg is not None and path_within(cg, self._cg(rel, allow_base=True))

    def children(self, rel: str) -> list[str]:
        d = self.path(rel)
        try:
            return sorted(e.name for e in os.scandir(d) if e.is_dir(follow_symlinks=False))
        except FileNotFoundError:
            return []

    def usage(self, rel: str) -> Usage:
        d = self.path(rel)
        if not is_dir(d):
            raise NotFound(f"cgroup {d} does not exist")

        def rd(name: str) -> str:
            return read_text(pjoin(d, name))

        try:
            return Usage(
                memory_bytes=int(rd("memory.current")),
                memory_max=_int_or_none(rd("memory.max")),
                cpu_usec=_kv(rd("cpu.stat")).get("usage_usec", 0),
                pids=int(rd("pids.current")),
                pids_max=_int_or_none(rd("pids.max")),
                oom_kills=_kv(rd("memory.events")).get("oom_kill", 0),
                pids_denied=_kv(rd("pids.events")).get("max", 0)
                if path_exists(pjoin(d, "pids.events")) else 0,
            )
        except FileNotFoundError as e:
            raise CorralError(f"cgroup {d} has no usage file {e.filename}") from e

    # --- teardown ------------------------------------------------------------

    def kill(self, rel: str) -> None:
        d = self._dir(self._cg(rel))  # never the base: that holds the daemon
        if not is_dir(d):
            return
        deadline = time.monotonic() + KILL_TIMEOUT
        killfile = pjoin(d, "cgroup.kill")
        if path_exists(killfile):
            # Linux >= 5.14: one write kills the whole subtree, forks included.
            write_text(killfile, "1")
        else:
            self._freeze_kill(d, deadline)
        self._wait_empty(rel, deadline)

    def _freeze_kill(self, d: str, deadline: float) -> None:
        # Before cgroup.kill: freeze so nothing can fork while we signal, then thaw
        # so the SIGKILLs are delivered. Repeat until nothing is left.
        freeze = pjoin(d, "cgroup.freeze")
        while True:
            pids = self._procs_dir(d)
            if not pids:
                return
            write_text(freeze, "1")
            sigkill(self._procs_dir(d))
            write_text(freeze, "0")
            if time.monotonic() > deadline:
                return
            time.sleep(0.01)

    def _procs_dir(self, d: str) -> list[int]:
        out: set[int] = set()
        for sub in walk_dirs(d):
            out.update(read_pids(pjoin(sub, "cgroup.procs")))
        return sorted(out)

    def _wait_empty(self, rel: str, deadline: float) -> None:
        delay = 0.001
        while self.procs(rel):
            if time.monotonic() > deadline:
                raise KernelError(f"cgroup {self.path(rel)} still has processes "
                                  f"{self.procs(rel)} after kill")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def release(self, rel: str) -> None:
        d = self._dir(self._cg(rel))  # never the base: that holds the daemon
        if not is_dir(d):
            return
        if self.procs(rel):
            self.kill(rel)
        for sub in reversed(walk_dirs(d)):  # children first
            self._rmdir(sub)
        log.debug("cgroup v2 %s released", d)

    def _rmdir(self, path: str) -> None:
        rmdir_retry(path)
