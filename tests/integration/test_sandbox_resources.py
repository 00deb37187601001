"""THREATS.md, resources: bombs stop at the sandbox's own cgroup limits."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from sandbox.spec import Limits
from tests.integration.sandbox_kit import box, make_spec

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("need_root")]


def test_fork_bomb_stops_at_pids_max(tmp_path: Path, uniq: str) -> None:
    spec = make_spec(tmp_path, uniq, limits=Limits(pids=48, memory_bytes=256 << 20))
    with box(spec) as b:
        b.start("/bin/sh", "-c", "f() { f | f & }; f; sleep 1000")
        deadline = time.monotonic() + 60
        peak = 0
        while time.monotonic() < deadline:
            u = b.cg.usage(spec.cgroup)
            peak = max(peak, u.pids)
            if peak >= 48:
                break
            time.sleep(0.05)
        assert peak == 48, f"the bomb should saturate pids.max, got {peak}"
        for _ in range(20):
            u = b.cg.usage(spec.cgroup)
            assert u.pids <= 48
            assert u.pids_max == 48
            time.sleep(0.02)
        # the host is fine: we can still fork and run things
        assert subprocess.run(["true"], check=False).returncode == 0
        # release (cgroup kill) ends the bomb completely
        b.release()
        assert not b.cg.exists(spec.cgroup)


def test_memory_bomb_is_oom_killed_inside_only(tmp_path: Path, uniq: str) -> None:
    spec = make_spec(tmp_path, uniq, limits=Limits(pids=64, memory_bytes=64 << 20,
                                                   swap_bytes=0))
    with box(spec) as b:
        before = b.cg.usage(spec.cgroup).oom_kills
        r = b.run("python3 -c 'b = []\nwhile True: b.append(bytearray(8 << 20))'; "
                  "echo rc=$?; echo survived")
        # the bomb got SIGKILL (137), its shell (same cgroup, small) survived
        assert "rc=137" in r.out, r.out
        assert "survived" in r.out
        u = b.cg.usage(spec.cgroup)
        assert u.oom_kills >= before + 1
        assert u.memory_max == 64 << 20
        # positive control: a workload under the limit runs to the end
        ok = b.run("python3 -c 'b = bytearray(16 << 20); print(len(b))'")
        assert ok.code == 0, ok.out
        assert ok.out.strip() == str(16 << 20)
