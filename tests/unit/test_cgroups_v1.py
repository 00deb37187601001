"""The v1 driver's writers and parsers against a temporary directory laid out like cgroupfs,
plus detection's parsers (/proc/self/cgroup, mountinfo)."""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from sandbox.cgroups import cgroup_mounts
from sandbox.cgroups.base import Usage, cpu_weight, machine_cpus, parse_proc_cgroup, path_within
from sandbox.cgroups.v1 import V1Driver, plan_limits
from sandbox.errors import CorralError, HostSetupError, NotFound
from sandbox.spec import Limits

CTRLS = ("memory", "cpu", "cpuacct", "pids", "freezer")
# As on the test machine: memory's own cgroup is nested, the others are "/".
OWN = {"memory": "/process_api/abc", "cpu": "/", "cpuacct": "/", "pids": "/", "freezer": "/"}


def make_fake(tmp: Path, memsw: bool = True) -> V1Driver:
    mounts = {c: str(tmp / c) for c in CTRLS}
    for c in CTRLS:
        (tmp / c / OWN[c].lstrip("/")).mkdir(parents=True, exist_ok=True)
    return RecordingV1(mounts, OWN, parent="corral-t", memsw=memsw)


class RecordingV1(V1Driver):
    """On a temp dir: files a real cgroupfs would create on mkdir, rmdir order recorded."""

    def __init__(self, mounts: dict[str, str], own: dict[str, str], parent: str,
                 memsw: bool) -> None:
        super().__init__(mounts, own, parent)
        self.memsw = memsw
        self.removed: list[str] = []

    def prepare(self, rel: str, limits: Limits) -> None:
        if self.memsw:
            d = Path(self._dir("memory", rel))
            d.mkdir(parents=True, exist_ok=True)
            f = d / "memory.memsw.limit_in_bytes"
            if not f.exists():
                f.write_text("9223372036854771712\n")
        super().prepare(rel, limits)

    def _rmdir(self, path: str) -> None:
        for f in Path(path).iterdir():
            if f.is_file():
                f.unlink()
        self.removed.append(path)
        os.rmdir(path)


def test_plan_limits_values() -> None:
    ops = plan_limits(Limits(memory_bytes=64 << 20, swap_bytes=0, cpus=0.5, pids=16), True)
    assert ops == [
        ("memory", "memory.limit_in_bytes", str(64 << 20)),
        ("memory", "memory.memsw.limit_in_bytes", str(64 << 20)),  # swap 0: memsw = mem
        ("cpu", "cpu.cfs_period_us", "100000"),
        ("cpu", "cpu.cfs_quota_us", "50000"),
        ("cpu", "cpu.shares", "512"),  # weight follows the CPUs allowed
        ("pids", "pids.max", "16"),
    ]
    ops = plan_limits(Limits(memory_bytes=100, swap_bytes=50), True)
    assert ("memory", "memory.memsw.limit_in_bytes", "150") in ops
    ops = plan_limits(Limits(memory_bytes=None, swap_bytes=None, cpus=None, pids=None), False)
    assert ops == [
        ("memory", "memory.limit_in_bytes", "-1"),
        ("cpu", "cpu.cfs_period_us", "100000"),
        ("cpu", "cpu.cfs_quota_us", "-1"),
        ("cpu", "cpu.shares", str(1024 * machine_cpus())),  # no cap: the whole machine
        ("pids", "pids.max", "max"),
    ]
    # Unlimited memory with unlimited swap accounting.
    assert ("memory", "memory.memsw.limit_in_bytes", "-1") in plan_limits(Limits(), True)


def test_prepare_writes_every_controller(tmp_path: Path) -> None:
    d = make_fake(tmp_path)
    d.prepare("s1", Limits(memory_bytes=64 << 20, swap_bytes=0, cpus=2, pids=16))
    mem = tmp_path / "memory/process_api/abc/corral-t/s1"
    assert d.path("s1") == str(mem)
    assert (mem / "memory.limit_in_bytes").read_text() == str(64 << 20)
    assert (mem / "memory.memsw.limit_in_bytes").read_text() == str(64 << 20)
    assert (tmp_path / "cpu/corral-t/s1/cpu.cfs_quota_us").read_text() == "200000"
    assert (tmp_path / "cpu/corral-t/s1/cpu.cfs_period_us").read_text() == "100000"
    assert (tmp_path / "cpu/corral-t/s1/cpu.shares").read_text() == "2048"
    assert (tmp_path / "pids/corral-t/s1/pids.max").read_text() == "16"
    assert (tmp_path / "freezer/corral-t/s1").is_dir()
    assert (tmp_path / "cpuacct/corral-t/s1").is_dir()
    assert d.exists("s1")
    assert d.children("") == ["s1"]


def test_cpu_weight_follows_the_allowance() -> None:
    assert cpu_weight(1.5, 1024, 2, 262144) == 1536
    assert cpu_weight(0.001, 1024, 2, 262144) == 2  # clamped to the kernel's range
    assert cpu_weight(1000, 100, 1, 10000) == 10000
    assert cpu_weight(None, 100, 1, 10000) == 100 * machine_cpus()


def test_our_cgroups_above_a_sandbox_weigh_the_machine(tmp_path: Path) -> None:
    d = make_fake(tmp_path)
    d.prepare("agents/a1", Limits(cpus=0.5))
    machine = str(1024 * machine_cpus())
    assert (tmp_path / "cpu/corral-t/cpu.shares").read_text() == machine
    assert (tmp_path / "cpu/corral-t/agents/cpu.shares").read_text() == machine
    assert (tmp_path / "cpu/corral-t/agents/a1/cpu.shares").read_text() == "512"
    assert not (tmp_path / "cpu/cpu.shares").exists()  # our own cgroup is not ours to set


def test_the_base_weighs_the_sum_of_its_subtrees(tmp_path: Path) -> None:
    # an agent and its keeper each weigh the machine beneath the base: the
    # keeper's work must not come out of the agent's share of a busy host
    d = make_fake(tmp_path)
    d.prepare("agents/a1", Limits(cpus=0.5))
    d.prepare("keepers/a1", Limits())
    machine = 1024 * machine_cpus()
    assert (tmp_path / "cpu/corral-t/agents/cpu.shares").read_text() == str(machine)
    assert (tmp_path / "cpu/corral-t/keepers/cpu.shares").read_text() == str(machine)
    assert (tmp_path / "cpu/corral-t/cpu.shares").read_text() == str(2 * machine)
    # a second agent changes neither subtree's weight, so nor the base's
    d.prepare("agents/a2", Limits(cpus=4))
    assert (tmp_path / "cpu/corral-t/cpu.shares").read_text() == str(2 * machine)
    # a sandbox right beneath the base counts with its own weight
    d.prepare("s1", Limits(cpus=1))
    assert (tmp_path / "cpu/corral-t/cpu.shares").read_text() == str(2 * machine + 1024)


def test_the_base_sum_holds_when_agent_and_keeper_are_prepared_at_once(
        tmp_path: Path) -> None:
    # supervisor.agents prepares both in two threads: a sum read before the
    # other child was weighed must not be the one that stays
    machine = 1024 * machine_cpus()
    for i in range(20):
        d = make_fake(tmp_path / str(i))
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(functools.partial(d.prepare, limits=Limits()), ["agents/a", "keepers/a"]))
        assert (tmp_path / str(i) / "cpu/corral-t/cpu.shares").read_text() == str(2 * machine)


def test_prepare_without_swap_accounting(tmp_path: Path) -> None:
    d = make_fake(tmp_path, memsw=False)
    d.prepare("s1", Limits(memory_bytes=1 << 20))
    assert not (Path(d.path("s1")) / "memory.memsw.limit_in_bytes").exists()
    assert (Path(d.path("s1")) / "memory.limit_in_bytes").read_text() == str(1 << 20)


def test_add_writes_every_controller(tmp_path: Path) -> None:
    d = make_fake(tmp_path)
    d.prepare("s1", Limits())
    d.add("s1", 4242)
    assert (Path(d.path("s1")) / "cgroup.procs").read_text() == "4242"
    for c in ("cpu", "cpuacct", "pids", "freezer"):
        assert (tmp_path / c / "corral-t/s1/cgroup.procs").read_text() == "4242"


def test_usage_parses_kernel_files(tmp_path: Path) -> None:
    d = make_fake(tmp_path)
    d.prepare("s1", Limits(memory_bytes=1 << 20, pids=7))
    mem = Path(d.path("s1"))
    (mem / "memory.usage_in_bytes").write_text("4096\n")
    (mem / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 3\n")
    (mem / "memory.failcnt").write_text("99\n")
    (tmp_path / "cpuacct/corral-t/s1/cpuacct.usage").write_text("5000000\n")  # ns
    (tmp_path / "pids/corral-t/s1/pids.current").write_text("2\n")
    assert d.usage("s1") == Usage(memory_bytes=4096, memory_max=1 << 20, cpu_usec=5000,
                                  pids=2, pids_max=7, oom_kills=3)
    # Unlimited reads back as a huge page-aligned number, and "max".
    (mem / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    (tmp_path / "pids/corral-t/s1/pids.max").write_text("max\n")
    # Old kernels: no oom_kill line, fall back to failcnt.
    (mem / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\n")
    u = d.usage("s1")
    assert (u.memory_max, u.pids_max, u.oom_kills) == (None, None, 99)


def test_release_children_first_in_every_controller(tmp_path: Path) -> None:
    d = make_fake(tmp_path)
    d.prepare("a/b", Limits())
    d.prepare("a/c", Limits())
    d.release("a")
    assert isinstance(d, RecordingV1)
    for c in CTRLS:
        top = tmp_path / c / OWN[c].lstrip("/") / "corral-t"
        mine = [p for p in d.removed if p.startswith(str(top) + "/")]
        assert mine == [str(top / "a/c"), str(top / "a/b"), str(top / "a")], c
        assert top.is_dir()  # the base stays
    assert not d.exists("a")
    d.release("a")  # idempotent


def test_procs_and_contains(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    for pid, mem, pids in ((7, "/process_api/abc/corral-t/a/b", "/corral-t/a/b"),
                           (8, "/process_api/abc/corral-t/ab", "/corral-t/ab"),
                           (9, "/process_api/abc/corral-t/a", "/")):
        (proc / str(pid)).mkdir(parents=True)
        (proc / str(pid) / "cgroup").write_text(
            f"9:name=systemd:/\n8:pids:{pids}\n6:freezer:/\n4:memory:{mem}\n1:cpu:/\n0::/\n")
    make_fake(tmp_path)
    mounts = {c: str(tmp_path / c) for c in CTRLS}
    d = V1Driver(mounts, OWN, parent="corral-t", proc=str(proc))
    d.prepare("a/b", Limits())
    (Path(d._dir("pids", "a")) / "cgroup.procs").write_text("5\n")
    (Path(d._dir("memory", "a/b")) / "cgroup.procs").write_text("7\n6\n")
    assert d.procs("a") == [5, 6, 7]
    assert d.contains("a", 7)
    assert d.contains("a/b", 7)
    assert not d.contains("a", 8)  # sibling with a common prefix
    assert not d.contains("a", 9)  # memory says yes, pids says no
    assert not d.contains("a", 10)  # no such process


def test_missing_controllers_is_a_host_setup_error(tmp_path: Path) -> None:
    with pytest.raises(HostSetupError, match="freezer"):
        V1Driver({"memory": str(tmp_path), "cpu": str(tmp_path), "pids": str(tmp_path)},
                 OWN)


@pytest.mark.parametrize("rel", ["", "/abs", "..", "a/../b", ".x", "a b"])
def test_rel_paths_are_validated(tmp_path: Path, rel: str) -> None:
    d = make_fake(tmp_path)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    for call in (lambda: d.prepare(rel, Limits()), lambda: d.release(rel),
                 lambda: d.kill(rel), lambda: d.add(rel, 1)):
        with pytest.raises(CorralError):
            call()
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_parse_proc_cgroup() -> None:
    text = ("12:cpu,cpuacct:/a\n4:memory:/process_api/x\n9:name=systemd:/\n0::/user.slice\n")
    assert parse_proc_cgroup(text) == {"cpu": "/a", "cpuacct": "/a",
                                       "memory": "/process_api/x", "name=systemd": "/",
                                       "": "/user.slice"}


def test_path_within() -> None:
    assert path_within("/a/b", "/a")
    assert path_within("/a", "/a")
    assert not path_within("/ab", "/a")
    assert path_within("/anything", "/")


def test_cgroup_mounts(tmp_path: Path) -> None:
    mi = tmp_path / "mountinfo"
    mi.write_text(
        "30 25 0:26 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
        "31 25 0:27 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n"
        "32 25 0:28 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
        "33 25 0:29 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids\n"
        "34 25 0:30 / /sys/fs/cgroup/freezer rw - cgroup cgroup rw,freezer\n"
        "35 25 0:31 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,xattr,name=systemd\n"
        "36 25 0:32 / /proc rw - proc proc rw\n")
    v2, v1 = cgroup_mounts(str(mi))
    assert v2 == "/sys/fs/cgroup/unified"
    assert v1 == {"cpu": "/sys/fs/cgroup/cpu,cpuacct", "cpuacct": "/sys/fs/cgroup/cpu,cpuacct",
                  "memory": "/sys/fs/cgroup/memory", "pids": "/sys/fs/cgroup/pids",
                  "freezer": "/sys/fs/cgroup/freezer"}


def test_usage_of_a_missing_cgroup_is_not_found(tmp_path: Path) -> None:
    d = make_fake(tmp_path)
    with pytest.raises(NotFound):
        d.usage("nope")


def test_nothing_is_created_above_our_own_cgroup(tmp_path: Path) -> None:
    mounts = {c: str(tmp_path / c) for c in CTRLS}
    for c in CTRLS:
        (tmp_path / c).mkdir()
    d = V1Driver(mounts, OWN, parent="corral-t")
    # memory's own cgroup (/process_api/abc) does not exist: refuse, never mkdir it.
    with pytest.raises(CorralError, match="creating cgroup"):
        d.prepare("s1", Limits())
    assert not (tmp_path / "memory/process_api").exists()
