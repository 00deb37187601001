"""release: nothing of a sandbox remains on the host, whatever state it was left in."""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

import pytest

from sandbox import lifecycle, overlay, process
from sandbox.errors import NotFound
from sandbox.spec import SandboxSpec
from tests.integration.sandbox_kit import Box, make_spec

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("need_root")]


def _host_mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(str(path))]


def _assert_gone(b: Box, spec: SandboxSpec, tmp_path: Path, pids: list[int]) -> None:
    assert _host_mounts_under(tmp_path) == []
    assert not b.cg.exists(spec.cgroup)
    assert not os.path.exists(b.cg.path(spec.cgroup))
    if spec.network is not None:
        assert not Path(f"/sys/class/net/{spec.network.veth_host}").exists()
        assert not os.path.exists(spec.network.netns_path)
    assert not os.path.exists(spec.run_dir)
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}"), f"process {pid} survived release"


def test_release_of_a_running_sandbox_leaves_nothing(tmp_path: Path, uniq: str,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="sandbox.netns")
    spec = make_spec(tmp_path, uniq, net=True)
    b = Box(spec)
    try:
        b.prepare()
        st = b.start("/bin/sh", "-c", "sleep 1000 & sleep 1000")
        deadline = time.monotonic() + 30
        while len(b.cg.procs(spec.cgroup)) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        pids = b.cg.procs(spec.cgroup)
        assert st.init_pid in pids  # positive control: it was running, in its cgroup
        assert spec.network is not None
        assert Path(f"/sys/class/net/{spec.network.veth_host}").exists()
        mnt_ns = os.readlink(f"/proc/{st.init_pid}/ns/mnt")
        assert mnt_ns != os.readlink("/proc/self/ns/mnt")
        # release without stopping first: the daemon may have lost the keeper
        lifecycle.release(spec, b.cg, remove_workspace=False)
        os.waitpid(st.init_pid, 0)
        b.started = None
        _assert_gone(b, spec, tmp_path, pids)
        # processes went first, so nothing pinned the netns: the kernel reaped the veth
        assert "by hand" not in caplog.text
        assert Path(overlay.upper_dir(spec)).is_dir()  # the workspace stays unless asked
        lifecycle.release(spec, b.cg, remove_workspace=True)  # idempotent, and removes it
        assert not Path(overlay.upper_dir(spec)).exists()
        assert Path(spec.workspace.project or "", "README").exists()  # project untouched
    finally:
        b.release()


@pytest.mark.parametrize("steps", [0, 1, 2, 3, 4, 5])
def test_release_after_a_crash_at_any_step(tmp_path: Path, uniq: str, steps: int) -> None:
    spec = make_spec(tmp_path, uniq, net=True)
    b = Box(spec)
    try:
        for step in lifecycle.STEPS[:steps]:  # "crash" after `steps` prepare steps
            step.prepare(spec, b.cg)
        lifecycle.release(spec, b.cg)
        lifecycle.release(spec, b.cg)
        _assert_gone(b, spec, tmp_path, [])
    finally:
        b.release()


def test_release_after_init_was_killed(tmp_path: Path, uniq: str) -> None:
    spec = make_spec(tmp_path, uniq, net=True)
    b = Box(spec)
    try:
        b.prepare()
        st = b.start()
        os.kill(st.init_pid, signal.SIGKILL)
        _, status = os.waitpid(st.init_pid, 0)
        b.started = None
        assert os.waitstatus_to_exitcode(status) == -signal.SIGKILL
        with pytest.raises(NotFound):
            process.enter(spec, st.init_pid, ["true"], env={}, cwd="/", stdin=0, stdout=1,
                          stderr=2)
        lifecycle.release(spec, b.cg)
        _assert_gone(b, spec, tmp_path, [st.init_pid])
    finally:
        b.release()
