"""cgroups for real on this host (v1 driver): limits in the kernel files, a fork bomb stopped
at pids.max, a memory bomb OOM-killed inside its cgroup only, kill() and release()."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox.cgroups import CgroupDriver, V1Driver, detect
from sandbox.cgroups.base import machine_cpus
from sandbox.spec import Limits

pytestmark = [pytest.mark.root]


@pytest.fixture
def driver(need_root: None) -> CgroupDriver:
    d = detect()
    assert d.version == "v1", "this machine's controllers are on v1 (see DESIGN.md)"
    return d


@pytest.fixture
def cg(driver: CgroupDriver, uniq: str) -> Iterator[str]:
    """A unique top-level test cgroup, released (processes killed, dirs removed) always."""
    rel = f"{uniq}-cg"
    try:
        yield rel
    finally:
        driver.release(rel)
        assert not driver.exists(rel)


@pytest.fixture
def based(need_root: None, uniq: str) -> Iterator[V1Driver]:
    """A driver rooted at a unique base beneath our cgroup, as the daemon's is;
    its agents/ and keepers/ subtrees and the base itself are removed always."""
    d = detect(parent=f"{uniq}-base")
    assert isinstance(d, V1Driver)
    try:
        yield d
    finally:
        with contextlib.ExitStack() as cleanup:   # every step runs, even if one fails
            for c in d.ctrls:
                base = Path(d.mounts[c] + d.base_cg[c])
                cleanup.callback(lambda base=base: base.is_dir() and base.rmdir())
            for sub in ("agents", "keepers"):
                cleanup.callback(d.release, sub)
        assert not any(Path(d.mounts[c] + d.base_cg[c]).exists() for c in d.ctrls)


def test_the_base_weighs_an_agent_and_its_keeper(based: V1Driver) -> None:
    based.prepare("agents/a1", Limits(cpus=0.5))
    based.prepare("keepers/a1", Limits())
    cpu = Path(based.mounts["cpu"] + based.base_cg["cpu"])
    machine = 1024 * machine_cpus()
    assert (cpu / "agents/a1/cpu.shares").read_text().strip() == "512"
    assert (cpu / "agents/cpu.shares").read_text().strip() == str(machine)
    assert (cpu / "keepers/cpu.shares").read_text().strip() == str(machine)
    assert (cpu / "cpu.shares").read_text().strip() == str(2 * machine)


def controller_dirs(driver: CgroupDriver, rel: str) -> list[Path]:
    """The host's own view: the cgroup's directory in each v1 hierarchy."""
    assert isinstance(driver, V1Driver)
    return [Path(driver.mounts[c] + driver.base_cg[c].rstrip("/") + "/" + rel)
            for c in ("memory", "cpu", "pids", "freezer")]


def spawn_held(driver: CgroupDriver, rel: str, code: str) -> subprocess.Popen[str]:
    """Start `python -c code` that waits on stdin until it is inside the cgroup."""
    p = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.readline()\n" + code],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        driver.add(rel, p.pid)
        assert driver.contains(rel, p.pid)
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    except BaseException:
        stop(p)
        raise
    return p


def stop(p: subprocess.Popen[str]) -> None:
    """Kill (by PID, ours) and reap a test process, closing its pipes."""
    p.kill()
    p.wait()
    for f in (p.stdin, p.stdout):
        if f is not None:
            f.close()


def test_limits_reach_the_kernel_files(driver: CgroupDriver, cg: str) -> None:
    driver.prepare(f"{cg}/inner", Limits(memory_bytes=64 << 20, swap_bytes=0, cpus=0.5,
                                         pids=20))
    mem, cpu, pids, freezer = controller_dirs(driver, f"{cg}/inner")
    assert str(mem) == driver.path(f"{cg}/inner")
    assert (mem / "memory.limit_in_bytes").read_text().strip() == str(64 << 20)
    memsw = mem / "memory.memsw.limit_in_bytes"
    if memsw.exists():  # swap accounting on: no swap on top of memory
        assert memsw.read_text().strip() == str(64 << 20)
    assert (cpu / "cpu.cfs_quota_us").read_text().strip() == "50000"
    assert (cpu / "cpu.cfs_period_us").read_text().strip() == "100000"
    # weight follows the CPUs allowed; our cgroup above it weighs the machine
    assert (cpu / "cpu.shares").read_text().strip() == "512"
    assert (cpu.parent / "cpu.shares").read_text().strip() == str(1024 * machine_cpus())
    assert (pids / "pids.max").read_text().strip() == "20"
    assert (freezer / "freezer.state").read_text().strip() == "THAWED"
    u = driver.usage(f"{cg}/inner")
    assert (u.memory_max, u.pids_max, u.pids, u.oom_kills) == (64 << 20, 20, 0, 0)
    assert driver.children(cg) == ["inner"]
    # Changing limits in place (raising memory needs memsw first: the driver orders it).
    driver.prepare(f"{cg}/inner", Limits(memory_bytes=128 << 20, swap_bytes=0, pids=None))
    assert (mem / "memory.limit_in_bytes").read_text().strip() == str(128 << 20)
    assert (pids / "pids.max").read_text().strip() == "max"
    driver.release(cg)
    assert not any(d.exists() for d in controller_dirs(driver, cg))
    driver.release(cg)  # idempotent


def test_fork_bomb_stops_at_pids_max(driver: CgroupDriver, cg: str) -> None:
    driver.prepare(cg, Limits(pids=16))
    bomb = spawn_held(driver, cg, """
import os, time
n = 0
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    try:
        if os.fork() == 0:
            time.sleep(120)
            os._exit(0)
        n += 1
    except BlockingIOError:
        print("blocked", n, flush=True)
        time.sleep(120)
        break
print("never blocked", n, flush=True)
""")
    try:
        assert bomb.stdout is not None
        line = bomb.stdout.readline().split()
        # Positive control: forking worked until the limit; then EAGAIN.
        assert line[0] == "blocked", line
        assert int(line[1]) == 15  # 16 tasks = the bomb + 15 children
        u = driver.usage(cg)
        assert u.pids == 16
        assert u.pids_max == 16
        assert len(driver.procs(cg)) == 16
        driver.kill(cg)
        assert driver.procs(cg) == []
        assert bomb.wait(timeout=30) == -9
    finally:
        stop(bomb)


def test_memory_bomb_is_oom_killed_inside_only(driver: CgroupDriver, cg: str) -> None:
    driver.prepare(cg, Limits(memory_bytes=64 << 20, swap_bytes=0))
    # A bystander outside the cgroup, to show the OOM killer stays inside.
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        # Positive control: 16 MiB fits under the limit.
        ok = spawn_held(driver, cg, "b = bytearray(16 << 20); print('ok', flush=True)")
        assert ok.communicate(timeout=60)[0].strip() == "ok"
        assert ok.returncode == 0
        assert driver.usage(cg).oom_kills == 0
        bomb = spawn_held(driver, cg, """
import time
chunks = []
deadline = time.monotonic() + 60
while time.monotonic() < deadline and len(chunks) < 1024:
    chunks.append(bytearray(1 << 20))   # touched: bytearray zero-fills
print("survived", len(chunks), flush=True)
""")
        out, _ = bomb.communicate(timeout=90)
        assert bomb.returncode == -9, out
        u = driver.usage(cg)
        assert u.oom_kills >= 1
        assert u.memory_max == 64 << 20
        assert bystander.poll() is None  # the host side is untouched
        assert driver.procs(cg) == []
    finally:
        bystander.kill()
        bystander.wait()


def test_kill_empties_nested_cgroups_and_release_removes(driver: CgroupDriver,
                                                         cg: str) -> None:
    driver.prepare(f"{cg}/a", Limits())
    driver.prepare(f"{cg}/b", Limits())
    procs = [subprocess.Popen(["sleep", "120"]) for _ in range(3)]
    try:
        driver.add(f"{cg}/a", procs[0].pid)
        driver.add(f"{cg}/a", procs[1].pid)
        driver.add(f"{cg}/b", procs[2].pid)
        assert driver.procs(cg) == sorted(p.pid for p in procs)
        assert driver.contains(cg, procs[0].pid)
        assert not driver.contains(f"{cg}/b", procs[0].pid)
        assert not driver.contains(cg, os.getpid())
        driver.kill(cg)
        assert [p.wait(timeout=30) for p in procs] == [-9, -9, -9]
        assert driver.procs(cg) == []
        # release with a live process inside kills it first.
        late = subprocess.Popen(["sleep", "120"])
        try:
            driver.add(f"{cg}/b", late.pid)
            driver.release(cg)
            assert late.wait(timeout=30) == -9
        finally:
            late.kill()
            late.wait()
        assert not driver.exists(cg)
        assert not any(d.exists() for d in controller_dirs(driver, cg))
        assert cg not in driver.children("")
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_usage_counts_cpu(driver: CgroupDriver, cg: str) -> None:
    driver.prepare(cg, Limits(cpus=1))
    p = spawn_held(driver, cg, """
import time
t = time.process_time()
while time.process_time() - t < 0.2:
    pass
""")
    try:
        assert p.wait(timeout=60) == 0
        assert driver.usage(cg).cpu_usec >= 100_000
    finally:
        stop(p)
