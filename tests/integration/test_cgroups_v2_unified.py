"""The v2 driver's process handling for real, on this host's controller-less cgroup2 mount.

The unified hierarchy here carries no controllers, so limits and usage cannot be
exercised (a VM test does that); but creating cgroups, moving processes, procs(),
contains(), cgroup.kill, the freeze-and-kill fallback and release() all work without
controllers, so they run for real here. prepare() must refuse loudly.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox.cgroups import V2Driver, cgroup_mounts
from sandbox.cgroups.base import KILL_TIMEOUT, read_proc_cgroup
from sandbox.errors import HostSetupError
from sandbox.spec import Limits

pytestmark = [pytest.mark.root]


@pytest.fixture
def v2(need_root: None, uniq: str) -> Iterator[V2Driver]:
    mount, _ = cgroup_mounts()
    assert mount is not None, "this host has a cgroup2 mount (at /sys/fs/cgroup/unified)"
    own = read_proc_cgroup("self")[""]
    d = V2Driver(mount, own, parent=f"{uniq}-v2")
    base = Path(d.path(""))
    try:
        yield d
    finally:
        for child in d.children(""):
            d.release(child)
        if base.exists():
            base.rmdir()


def mkcg(d: V2Driver, rel: str) -> None:
    """Create without limits (prepare needs controllers this mount lacks)."""
    Path(d.path(rel)).mkdir(parents=True, exist_ok=True)


def forker() -> subprocess.Popen[bytes]:
    """A process tree: a parent that forks 5 sleeping children, then sleeps."""
    code = ("import os, time\n"
            "for _ in range(5):\n"
            "    if os.fork() == 0:\n"
            "        time.sleep(120); os._exit(0)\n"
            "print('ready', flush=True)\n"
            "time.sleep(120)\n")
    return subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.readline()\n" + code],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)


def start_in(d: V2Driver, rel: str) -> subprocess.Popen[bytes]:
    p = forker()
    try:
        d.add(rel, p.pid)
        assert p.stdin is not None
        assert p.stdout is not None
        p.stdin.write(b"go\n")
        p.stdin.flush()
        assert p.stdout.readline() == b"ready\n"
    except BaseException:
        stop(p)
        raise
    return p


def stop(p: subprocess.Popen[bytes]) -> None:
    p.kill()
    p.wait()
    for f in (p.stdin, p.stdout):
        if f is not None:
            f.close()


def test_prepare_refuses_without_controllers(v2: V2Driver) -> None:
    with pytest.raises(HostSetupError, match="not available"):
        v2.prepare("x", Limits())


def test_cgroup_kill_empties_the_tree_and_release_removes(v2: V2Driver) -> None:
    mkcg(v2, "a/inner")
    p = start_in(v2, "a/inner")
    try:
        pids = v2.procs("a")
        assert len(pids) == 6  # the parent and its 5 children, all inherited the cgroup
        assert all(v2.contains("a", pid) for pid in pids)
        assert not v2.contains("a", os.getpid())
        assert v2.children("a") == ["inner"]
        v2.kill("a")
        assert v2.procs("a") == []
        assert p.wait(timeout=30) == -9
        v2.release("a")
        assert not v2.exists("a")
        assert not Path(v2.path("a")).exists()
    finally:
        stop(p)


def test_freeze_and_kill_fallback(v2: V2Driver) -> None:
    """Kernels before 5.14 have no cgroup.kill: freeze, signal, thaw, repeat."""
    mkcg(v2, "b")
    p = start_in(v2, "b")
    try:
        assert len(v2.procs("b")) == 6
        v2._freeze_kill(v2.path("b"), time.monotonic() + KILL_TIMEOUT)
        v2._wait_empty("b", time.monotonic() + KILL_TIMEOUT)
        assert v2.procs("b") == []
        assert p.wait(timeout=30) == -9
        assert (Path(v2.path("b")) / "cgroup.freeze").read_text().strip() == "0"
    finally:
        stop(p)


def test_release_kills_leftovers(v2: V2Driver) -> None:
    mkcg(v2, "c/d")
    p = start_in(v2, "c/d")
    try:
        v2.release("c")
        assert p.wait(timeout=30) == -9
        assert not v2.exists("c")
        v2.release("c")  # idempotent
    finally:
        stop(p)
