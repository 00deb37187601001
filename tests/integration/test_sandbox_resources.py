"""THREATS.md, resources: bombs stop at the sandbox's own cgroup limits."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from sandbox import process
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


def _has_cap_sys_resource() -> bool:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> 24 & 1)  # CAP_SYS_RESOURCE = 24
    return False


def test_oom_picks_the_bomb_not_our_helpers_under_a_small_limit(tmp_path: Path,
                                                                uniq: str) -> None:
    """A limit below the size of our own helpers in the agent's cgroup (init
    and `enter`'s waiter are forks of this big Python process): the OOM killer
    must still kill the agent's bomb, not init (the whole sandbox) and not the
    waiter (the command's exit status). Lowering a score takes
    CAP_SYS_RESOURCE; where root lacks it (this CI machine's container does)
    the test proves the helpers are left as they were and the workload still
    gets the default score; the VM run (systemd, full root) checks the
    protected path through the daemon (tests/vm/vm_checks.py)."""
    import psutil

    limit = 40 << 20
    ballast = b"\x01" * (96 << 20)  # resident: every fork of us is bigger than the limit
    assert psutil.Process().memory_info().rss > limit + len(ballast) // 2  # else proves nothing
    spec = make_spec(tmp_path, uniq, limits=Limits(pids=64, memory_bytes=limit, swap_bytes=0))
    with box(spec) as b:
        st = b.start()
        init_adj = Path(f"/proc/{st.init_pid}/oom_score_adj").read_text().strip()
        # positive control either way: the command itself is killable (the default score)
        ok = b.exec("cat /proc/self/oom_score_adj")
        assert ok.code == 0, ok.out
        assert ok.out.strip() == "0"
        if not _has_cap_sys_resource():
            assert init_adj == "0"
            assert process.protect_from_oom(st.init_pid) is False
            return
        assert init_adj == "-1000"
        before = b.cg.usage(spec.cgroup).oom_kills
        r = b.exec("python3 -c 'b = []\nwhile True: b.append(bytearray(4 << 20))'")
        assert r.code == 137, r.out  # the waiter lived to report the bomb's SIGKILL
        assert b.cg.usage(spec.cgroup).oom_kills >= before + 1
        assert psutil.pid_exists(st.init_pid)  # and the sandbox is still there
    del ballast
