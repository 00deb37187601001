"""The cgroup driver interface shared by the v1 and v2 drivers, and their common parts.

A driver owns one *base* directory per hierarchy: the cgroup the calling process
lives in (read from /proc/self/cgroup) plus an optional relative `parent`
subdirectory. Every `rel` path handed to a driver is relative to that base and is
validated here, so a driver can never be talked into creating, killing or removing
a cgroup outside the subtree corral owns (DESIGN.md: "cgroups only below our own
cgroup").
"""

from __future__ import annotations

import abc
import errno
import logging
import os
import re
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from sandbox.errors import CorralError, KernelError
from sandbox.spec import Limits

log = logging.getLogger(__name__)

#: One path component of a cgroup we create: no '/', no '..', nothing the
#: cgroupfs would read as an interface file name ("cgroup.procs") by accident.
_COMPONENT_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")

#: How long kill()/release() wait for the kernel to empty and free a cgroup.
KILL_TIMEOUT = 30.0


def machine_cpus() -> int:
    """The CPUs this process may run on (its affinity), at least 1."""
    return max(1, len(os.sched_getaffinity(0)))


def cpu_weight(cpus: float | None, per_cpu: int, lo: int, hi: int) -> int:
    """The CPU weight of a cgroup allowed `cpus` CPUs (None: the whole machine).

    Weight follows the CPU allowance, `per_cpu` per CPU, as Kubernetes derives
    cpu.shares from a container's CPUs. Left at the default, a cgroup weighs
    as much as one task of its parent: all the agents together, however many
    processes they run, would get one task's share of a busy host (and a
    flooding agent lost a tenth of its speed to the daemon and its SSH
    clients; BENCHMARKS.md). Under contention agents now share CPU time in
    proportion to their `cpus`, and corral's cgroups between the base and
    them weigh the machine's CPUs (see `base_weight` for the base)."""
    n = machine_cpus() if cpus is None else cpus
    return max(lo, min(hi, round(n * per_cpu)))


#: Held while a base's weight is summed and written: the agent's and the
#: keeper's cgroups are prepared in two threads at once (supervisor.agents),
#: and a sum read before the other thread's child was weighed would stick.
WEIGH_LOCK = threading.Lock()


def base_weight(children: list[int], machine: int, lo: int, hi: int) -> int:
    """The CPU weight of corral's base cgroup: the sum of its children's.

    The base holds one subtree per kind of work (the agents, their keepers,
    and on v2 the daemon's leaf), each weighing the machine. Were the base to
    weigh the machine once, the keepers, which read the agents' terminals,
    and the daemon would take their CPU time out of the agents' share: a
    flooding agent and its keeper then got half of what a shell and its
    tmux server get on a busy host (BENCHMARKS.md). Summed, nesting costs
    them nothing against the host's other processes. (Under systemd the base
    sits in corral-agents.service, and that unit's CPUWeight= decides what
    the agents get against other services.) With no children: the machine."""
    return max(lo, min(hi, sum(children) if children else machine))


@dataclass(frozen=True)
class Usage:
    """Resource usage of one cgroup (recursive, as the kernel accounts it)."""

    memory_bytes: int  # memory.current / memory.usage_in_bytes
    memory_max: int | None  # the limit in force; None = unlimited
    cpu_usec: int  # CPU time consumed, microseconds
    pids: int  # tasks right now (pids.current)
    pids_max: int | None  # None = unlimited
    oom_kills: int  # processes killed by the OOM killer inside this cgroup
    pids_denied: int = 0  # forks refused because pids.max was reached (pids.events "max")


def check_rel(rel: str, *, allow_base: bool = False) -> list[str]:
    """Split a relative cgroup path into validated components.

    "" (the base itself) is refused unless `allow_base`: killing or removing the
    base would hit the daemon's own cgroup.
    """
    if not isinstance(rel, str):
        raise CorralError(f"cgroup path {rel!r} must be a string")
    if rel == "":
        if allow_base:
            return []
        raise CorralError("cgroup path must not be empty (that is the driver's own base)")
    if rel.startswith("/"):
        raise CorralError(f"cgroup path {rel!r} must be relative to the driver's base")
    parts = rel.strip("/").split("/")
    for p in parts:
        if not _COMPONENT_RE.match(p) or p in (".", ".."):
            raise CorralError(
                f"invalid cgroup path component {p!r} in {rel!r}",
                hint="use letters, digits, '_', '.', '-' (not starting with '.' or '-')",
            )
    return parts


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """Parse /proc/<pid>/cgroup into {controller: path}; the v2 line is keyed "".

    Lines look like "4:memory:/process_api/abc" or "0::/user.slice"; comounted
    controllers ("2:cpu,cpuacct:/") appear under each of their names, and named
    hierarchies ("9:name=systemd:/") under "name=systemd".
    """
    out: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, ctrls, path = parts
        if ctrls == "":
            out[""] = path
            continue
        for c in ctrls.split(","):
            out[c] = path
    return out


def read_proc_cgroup(pid: int | str = "self", proc: str = "/proc") -> dict[str, str]:
    """{controller: path} of a process; {} if it does not exist (any more)."""
    try:
        with open(f"{proc}/{pid}/cgroup") as f:
            return parse_proc_cgroup(f.read())
    except (FileNotFoundError, ProcessLookupError):
        return {}


def path_within(path: str, top: str) -> bool:
    """Is cgroup `path` equal to `top` or below it (component-wise, not by prefix)?"""
    top = top.rstrip("/") or "/"
    if top == "/":
        return path.startswith("/")
    return path == top or path.startswith(top + "/")


def join_cg(*parts: str) -> str:
    """Join cgroup hierarchy paths ("/a", "b/c") into "/a/b/c"."""
    comps = [c for p in parts for c in p.split("/") if c]
    return "/" + "/".join(comps)


def pjoin(*parts: str) -> str:
    return str(Path(*parts))


def is_dir(path: str) -> bool:
    return Path(path).is_dir()


def path_exists(path: str) -> bool:
    return Path(path).exists()


def mkdirs(path: str) -> None:
    Path(path).mkdir(parents=True, exist_ok=True)


def read_text(path: str) -> str:
    with open(path) as f:
        return f.read()


def child_weights(path: str, fname: str) -> list[int]:
    """`fname` (cpu.shares, cpu.weight) of every child cgroup of `path`."""
    out: list[int] = []
    with os.scandir(path) as it:
        for e in it:
            if e.is_dir(follow_symlinks=False):
                try:
                    out.append(int(read_text(pjoin(e.path, fname))))
                except (OSError, ValueError):
                    continue   # a child without the controller, or going away
    return out


def write_text(path: str, value: str) -> None:
    """Write one value to a cgroup file; errors name the file and the value."""
    log.debug("cgroup write %s <- %r", path, value)
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError as e:
        raise KernelError(
            f"write {value!r} to {path} failed: {errno.errorcode.get(e.errno or 0, e.errno)} "
            f"({e.strerror})",
            errno=e.errno or 0,
        ) from e


def read_pids(path: str) -> list[int]:
    """cgroup.procs of one directory; [] if the cgroup vanished meanwhile."""
    try:
        return [int(x) for x in read_text(path).split()]
    except FileNotFoundError:
        return []


def walk_dirs(top: str) -> list[str]:
    """`top` and every directory below it, parents before children."""
    out: list[str] = []
    if not is_dir(top):
        return out
    for dirpath, dirnames, _ in os.walk(top):
        dirnames.sort()
        out.append(dirpath)
    return out


def sigkill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def rmdir_retry(path: str, timeout: float = KILL_TIMEOUT) -> None:
    """rmdir a cgroup, retrying while the kernel still finishes exiting tasks (EBUSY)."""
    deadline = time.monotonic() + timeout
    delay = 0.001
    while True:
        try:
            Path(path).rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno != errno.EBUSY or time.monotonic() > deadline:
                raise KernelError(f"rmdir {path} failed: {e.strerror}", errno=e.errno or 0,
                                  hint="a process is still in this cgroup") from e
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


class CgroupDriver(abc.ABC):
    """One interface, two drivers (v1.py, v2.py); see each method's docstring."""

    version: str

    @abc.abstractmethod
    def prepare(self, rel: str, limits: Limits) -> None:
        """Create `rel` (and its parents; idempotent) and apply `limits` to it."""

    @abc.abstractmethod
    def add(self, rel: str, pid: int) -> None:
        """Move process `pid` (all its threads) into `rel`."""

    @abc.abstractmethod
    def procs(self, rel: str) -> list[int]:
        """Every process in `rel` and below, sorted."""

    @abc.abstractmethod
    def contains(self, rel: str, pid: int) -> bool:
        """Is `pid` in `rel` or below? Read from /proc/<pid>/cgroup (False if no such pid)."""

    @abc.abstractmethod
    def usage(self, rel: str) -> Usage:
        """Current usage and limits of `rel`."""

    @abc.abstractmethod
    def kill(self, rel: str) -> None:
        """SIGKILL every process in `rel` and below; returns once it is empty."""

    @abc.abstractmethod
    def release(self, rel: str) -> None:
        """Kill leftovers and remove `rel` and its children; no error if absent."""

    @abc.abstractmethod
    def exists(self, rel: str) -> bool:
        """Does the cgroup exist?"""

    @abc.abstractmethod
    def children(self, rel: str) -> list[str]:
        """Names of the child cgroups of `rel` ("" = the base), sorted."""

    @abc.abstractmethod
    def path(self, rel: str) -> str:
        """Host path of the cgroup, for display (v1: the memory controller's dir)."""

    @abc.abstractmethod
    def enter_leaf(self, leaf: str) -> None:
        """Move the calling process into base/`leaf` (v2's no-internal-processes rule)."""
