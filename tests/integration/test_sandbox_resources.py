"""THREATS.md, resources: bombs stop at the sandbox's own cgroup limits."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from sandbox.spec import Limits
from tests.integration.sandbox_kit import Box, box, make_spec

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("need_root")]


def _states(b: Box) -> list[str]:
    out = []
    for pid in b.cg.procs(b.spec.cgroup):
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read().rsplit(")", 1)[1].split()[0]
            with open(f"/proc/{pid}/wchan") as f:
                out.append(f"{pid}:{stat}:{f.read()}")
        except OSError:
            pass
    return out


def test_fork_bomb_stops_at_pids_max(tmp_path: Path, uniq: str) -> None:
    spec = make_spec(tmp_path, uniq, limits=Limits(pids=48, memory_bytes=256 << 20))
    with box(spec) as b:
        # Every process keeps forking and survives its failed forks (a shell's
        # bomb dies at the first failed fork, which would end the test early).
        b.start("/usr/bin/python3", "-c",
                "import os, time\n"
                "while True:\n"
                "    try:\n"
                "        os.fork()\n"
                "    except OSError:\n"
                "        time.sleep(0.05)\n")
        deadline = time.monotonic() + 120
        peak = 0
        while time.monotonic() < deadline:
            u = b.cg.usage(spec.cgroup)
            peak = max(peak, u.pids)
            if peak >= 48:
                break
            time.sleep(0.05)
        assert peak == 48, f"the bomb should saturate pids.max, got {peak}: {_states(b)}"
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
    # The limit is well above this test process's RSS: `enter`'s host-side
    # waiter is forked from it and sits in the sandbox's cgroup, and the OOM
    # killer picks by resident size, so a limit below that could pick the
    # waiter instead of the bomb.
    spec = make_spec(tmp_path, uniq, limits=Limits(pids=64, memory_bytes=256 << 20,
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
        assert u.memory_max == 256 << 20
        # positive control: a workload under the limit runs to the end
        ok = b.run("python3 -c 'b = bytearray(16 << 20); print(len(b))'")
        assert ok.code == 0, ok.out
        assert ok.out.strip() == str(16 << 20)
