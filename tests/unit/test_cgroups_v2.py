"""The v2 driver's writers and parsers against a temporary directory laid out like cgroupfs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sandbox.cgroups.base import Usage, machine_cpus
from sandbox.cgroups.v2 import V2Driver, plan_limits
from sandbox.errors import CorralError, HostSetupError, NotFound
from sandbox.spec import Limits

OWN = "/system.slice/corral.service"


@pytest.fixture
def fake(tmp_path: Path) -> Path:
    """A cgroup2 mount with our own cgroup offering the usual controllers."""
    own = tmp_path / OWN.lstrip("/")
    own.mkdir(parents=True)
    (own / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb pids rdma misc\n")
    (own / "cgroup.subtree_control").write_text("")
    (own / "cgroup.procs").write_text("")
    return tmp_path


class RecordingV2(V2Driver):
    """Records rmdir order; a temp dir needs its files removed before rmdir."""

    def __init__(self, *a: object, **kw: object) -> None:
        super().__init__(*a, **kw)  # type: ignore[arg-type]
        self.removed: list[str] = []

    def _rmdir(self, path: str) -> None:
        for f in Path(path).iterdir():
            if f.is_file():
                f.unlink()
        self.removed.append(path)
        os.rmdir(path)


def test_plan_limits_values() -> None:
    ops = dict(plan_limits(Limits(memory_bytes=256 << 20, swap_bytes=0, cpus=1.5, pids=64)))
    assert ops == {"memory.max": str(256 << 20), "memory.swap.max": "0",
                   "cpu.max": "150000 100000", "cpu.weight": "150", "pids.max": "64"}
    ops = dict(plan_limits(Limits(memory_bytes=None, swap_bytes=None, cpus=None, pids=None)))
    assert ops == {"memory.max": "max", "memory.swap.max": "max", "cpu.max": "max 100000",
                   "cpu.weight": str(100 * machine_cpus()), "pids.max": "max"}
    # The kernel refuses quotas below 1 ms.
    assert dict(plan_limits(Limits(cpus=0.001)))["cpu.max"] == "1000 100000"


def test_prepare_writes_limits_and_enables_controllers(fake: Path) -> None:
    d = V2Driver(str(fake), OWN, parent="corral-x")
    d.prepare("agents/a1", Limits(memory_bytes=1 << 30, swap_bytes=0, cpus=0.5, pids=100))
    leaf = fake / OWN.lstrip("/") / "corral-x/agents/a1"
    assert d.path("agents/a1") == str(leaf)
    assert (leaf / "memory.max").read_text() == str(1 << 30)
    assert (leaf / "memory.swap.max").read_text() == "0"
    assert (leaf / "cpu.max").read_text() == "50000 100000"
    assert (leaf / "cpu.weight").read_text() == "50"
    assert (leaf / "pids.max").read_text() == "100"
    # corral's cgroups above the leaf weigh the machine; our own cgroup is left alone
    machine = str(100 * machine_cpus())
    for sub in ("corral-x", "corral-x/agents"):
        assert (fake / OWN.lstrip("/") / sub / "cpu.weight").read_text() == machine, sub
    assert not (fake / OWN.lstrip("/") / "cpu.weight").exists()
    # Every cgroup from our own down to the leaf's parent hands the controllers on.
    for sub in ("", "corral-x", "corral-x/agents"):
        sc = (fake / OWN.lstrip("/") / sub / "cgroup.subtree_control").read_text().split()
        assert sorted(sc) == ["+cpu", "+memory", "+pids"], sub
    assert not (leaf / "cgroup.subtree_control").exists()
    assert d.exists("agents/a1")
    assert d.children("agents") == ["a1"]
    assert d.children("") == ["agents"]


def test_prepare_refuses_missing_controllers(fake: Path) -> None:
    (fake / OWN.lstrip("/") / "cgroup.controllers").write_text("memory pids\n")
    d = V2Driver(str(fake), OWN)
    with pytest.raises(HostSetupError, match="cpu"):
        d.prepare("a", Limits())
    assert not d.exists("a")


def test_prepare_is_idempotent_and_updates(fake: Path) -> None:
    d = V2Driver(str(fake), OWN)
    d.prepare("a", Limits(pids=10))
    d.prepare("a", Limits(pids=20, memory_bytes=None))
    assert (Path(d.path("a")) / "pids.max").read_text() == "20"
    assert (Path(d.path("a")) / "memory.max").read_text() == "max"


def test_usage_parses_kernel_files(fake: Path) -> None:
    d = V2Driver(str(fake), OWN)
    d.prepare("a", Limits(memory_bytes=1000, pids=5))
    leaf = Path(d.path("a"))
    (leaf / "memory.current").write_text("12345\n")
    (leaf / "cpu.stat").write_text("usage_usec 777\nuser_usec 700\nsystem_usec 77\n")
    (leaf / "pids.current").write_text("3\n")
    (leaf / "memory.events").write_text("low 0\nhigh 0\nmax 9\noom 2\noom_kill 2\n"
                                        "oom_group_kill 0\n")
    assert d.usage("a") == Usage(memory_bytes=12345, memory_max=1000, cpu_usec=777, pids=3,
                                 pids_max=5, oom_kills=2)
    (leaf / "memory.max").write_text("max\n")
    (leaf / "pids.max").write_text("max\n")
    u = d.usage("a")
    assert u.memory_max is None
    assert u.pids_max is None


def test_usage_missing_file_is_a_clear_error(fake: Path) -> None:
    d = V2Driver(str(fake), OWN)
    d.prepare("a", Limits())
    with pytest.raises(CorralError, match=r"memory\.current"):
        d.usage("a")


def test_release_removes_children_first(fake: Path) -> None:
    d = RecordingV2(str(fake), OWN, parent="p")
    d.prepare("a/b/c", Limits())
    d.prepare("a/d", Limits())
    d.release("a")
    base = fake / OWN.lstrip("/") / "p"
    assert d.removed == [str(base / "a/d"), str(base / "a/b/c"), str(base / "a/b"),
                         str(base / "a")]
    assert not d.exists("a")
    assert d.exists("")  # the base stays
    d.release("a")  # idempotent: absent is fine


def test_kill_uses_cgroup_kill(fake: Path) -> None:
    d = V2Driver(str(fake), OWN)
    d.prepare("a", Limits())
    (Path(d.path("a")) / "cgroup.kill").write_text("0")
    d.kill("a")
    assert (Path(d.path("a")) / "cgroup.kill").read_text() == "1"


def test_procs_is_recursive(fake: Path) -> None:
    d = V2Driver(str(fake), OWN)
    d.prepare("a/b", Limits())
    (Path(d.path("a")) / "cgroup.procs").write_text("10\n")
    (Path(d.path("a/b")) / "cgroup.procs").write_text("30\n20\n")
    assert d.procs("a") == [10, 20, 30]
    assert d.procs("a/b") == [20, 30]


def test_add_and_contains(fake: Path, tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    (proc / "42").mkdir(parents=True)
    (proc / "42/cgroup").write_text(f"0::{OWN}/p/a/b\n")
    (proc / "43").mkdir()
    (proc / "43/cgroup").write_text(f"0::{OWN}/p/ab\n")  # a sibling with a common prefix
    d = V2Driver(str(fake), OWN, parent="p", proc=str(proc))
    d.prepare("a/b", Limits())
    d.add("a/b", 42)
    assert (Path(d.path("a/b")) / "cgroup.procs").read_text() == "42"
    assert d.contains("a", 42)
    assert d.contains("a/b", 42)
    assert not d.contains("a", 43)
    assert not d.contains("a", 44)  # no such process


def test_enter_leaf_moves_caller_then_enables(fake: Path) -> None:
    d = V2Driver(str(fake), OWN)
    d.enter_leaf("supervisor")
    own = fake / OWN.lstrip("/")
    assert (own / "supervisor/cgroup.procs").read_text() == str(os.getpid())
    assert (own / "supervisor/cpu.weight").read_text() == str(100 * machine_cpus())
    assert not (own / "cpu.weight").exists()  # base == own here: not ours to set
    assert sorted((own / "cgroup.subtree_control").read_text().split()) == [
        "+cpu", "+memory", "+pids"]


def test_the_base_weighs_the_sum_of_its_subtrees(fake: Path) -> None:
    d = V2Driver(str(fake), OWN, parent="corral-x")
    d.enter_leaf("supervisor")
    d.prepare("agents/a1", Limits(cpus=0.2))
    d.prepare("keepers/a1", Limits())
    base = fake / OWN.lstrip("/") / "corral-x"
    machine = 100 * machine_cpus()
    assert (base / "agents/a1/cpu.weight").read_text() == "20"
    for sub in ("supervisor", "agents", "keepers"):
        assert (base / sub / "cpu.weight").read_text() == str(machine)
    assert (base / "cpu.weight").read_text() == str(min(10000, 3 * machine))
    assert not (fake / OWN.lstrip("/") / "cpu.weight").exists()  # our own: not ours to set


@pytest.mark.parametrize("rel", ["", "/abs", "..", "a/../b", "a/./b", ".hidden", "a b",
                                 "-x", "a\nb"])
def test_rel_paths_are_validated(fake: Path, rel: str) -> None:
    d = V2Driver(str(fake), OWN)
    before = sorted(str(p) for p in fake.rglob("*"))
    with pytest.raises(CorralError):
        d.prepare(rel, Limits())
    with pytest.raises(CorralError):
        d.release(rel)
    with pytest.raises(CorralError):
        d.kill(rel)
    assert sorted(str(p) for p in fake.rglob("*")) == before  # nothing created or removed


def test_parent_is_validated(fake: Path) -> None:
    with pytest.raises(CorralError):
        V2Driver(str(fake), OWN, parent="../escape")


def test_usage_of_a_missing_cgroup_is_not_found(fake: Path) -> None:
    with pytest.raises(NotFound):
        V2Driver(str(fake), OWN).usage("nope")


def test_enter_leaf_without_the_cpu_controller_sets_no_weight(fake: Path) -> None:
    # the daemon still starts; creating an agent then says what is missing
    (fake / OWN.lstrip("/") / "cgroup.controllers").write_text("memory pids\n")
    d = V2Driver(str(fake), OWN, parent="corral-x")
    d.enter_leaf("supervisor")
    assert not (fake / OWN.lstrip("/") / "corral-x/cpu.weight").exists()
    with pytest.raises(HostSetupError, match="cpu"):
        d.prepare("a", Limits())
