"""SIGKILL of the daemon at every lifecycle step, then a restart: nothing is
lost and nothing leaks (THREATS.md, "The daemon itself")."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.e2e.conftest import CORRAL, Daemon

pytestmark = pytest.mark.root


def _kill_at(d: Daemon, step: str, *cmd: str) -> None:
    """Run `corral cmd` with the daemon parked at `step`, then SIGKILL the daemon."""
    d.stop()
    marker = Path(d.state_dir, "paused-at")
    marker.unlink(missing_ok=True)
    d.start(extra_env={"CORRAL_TEST_PAUSE_AT": step})
    cli = subprocess.Popen([CORRAL, "--socket", d.socket, *cmd], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert time.monotonic() < deadline, f"never paused at {step}:\n{d.log()}"
            assert cli.poll() is None or marker.exists(), f"{cmd} ended early:\n{d.log()}"
            time.sleep(0.05)
        assert marker.read_text() == step
        d.stop(signal.SIGKILL)
    finally:
        cli.kill()
        cli.wait(10)
    marker.unlink(missing_ok=True)
    d.start()


@pytest.mark.parametrize("step", ["recorded", "leased", "prepared", "keeper", "running"])
def test_kill_during_create_finishes_it(daemon: Daemon, project: Path, step: str) -> None:
    daemon.created.append("k1")
    _kill_at(daemon, step, "create", "k1", "--template", "default", "--project", str(project))
    info = daemon.wait_state("k1", ("running",))
    assert daemon.cli("exec", "k1", "--", "true").returncode == 0
    assert info["session"]["pid"]
    daemon.cli("rm", "--force", "k1", check=True)
    assert not daemon.leftovers(), daemon.leftovers()
    assert daemon.json("ps", "--all") == []


@pytest.mark.parametrize("step", ["stopping", "released"])
def test_kill_during_stop_finishes_it(daemon: Daemon, project: Path, step: str) -> None:
    daemon.create("k2", "--template", "default", "--project", str(project))
    daemon.wait_state("k2", ("running",))
    _kill_at(daemon, step, "stop", "k2")
    daemon.wait_state("k2", ("stopped",))
    assert not daemon.leftovers(), daemon.leftovers()
    # and it starts again
    daemon.cli("start", "k2", check=True)
    daemon.wait_state("k2", ("running",))


def test_kill_during_remove_finishes_it(daemon: Daemon, project: Path) -> None:
    daemon.create("k3", "--template", "default", "--project", str(project))
    info = daemon.wait_state("k3", ("running",))
    _kill_at(daemon, "removing", "rm", "--force", "k3")
    deadline = time.monotonic() + 60
    while daemon.cli("inspect", "k3").returncode == 0:
        assert time.monotonic() < deadline, daemon.log()
        time.sleep(0.2)
    assert not Path(info["workspace"]["path"]).exists()
    assert not daemon.leftovers(), daemon.leftovers()


def _fork_servers(daemon_pid: int) -> list[psutil.Process]:
    return [c for c in psutil.Process(daemon_pid).children()
            if "supervisor.zygote" in " ".join(c.cmdline())]


def test_keepers_come_from_the_fork_server_which_dies_with_the_daemon(
        daemon: Daemon, project: Path) -> None:
    assert daemon.proc is not None
    daemon.create("k4", "--template", "default", "--project", str(project))
    info = daemon.wait_state("k4", ("running",))
    servers = _fork_servers(daemon.proc.pid)
    assert len(servers) == 1, daemon.log()
    keeper = psutil.Process(info["session"]["pid"]).parent()
    assert keeper is not None
    assert keeper.ppid() == servers[0].pid  # forked by the server, not a new interpreter
    assert "supervisor.keeper" in " ".join(keeper.cmdline())  # re-exec'd into the lean loop
    daemon.stop(signal.SIGKILL)
    servers[0].wait(10)  # gone with the daemon (psutil raises TimeoutExpired otherwise)
    assert keeper.is_running()  # the agent is not
    daemon.start()
    daemon.wait_state("k4", ("running",))
    assert daemon.cli("exec", "k4", "--", "true").returncode == 0
    # A fork server that died is replaced: the next create still works.
    assert daemon.proc is not None
    for s in _fork_servers(daemon.proc.pid):
        os.kill(s.pid, signal.SIGKILL)  # started by our daemon
    daemon.create("k5", "--template", "default", "--project", str(project))
    daemon.wait_state("k5", ("running",))
    assert len(_fork_servers(daemon.proc.pid)) == 1
    assert daemon.cli("exec", "k5", "--", "true").returncode == 0
