"""Resource bombs inside one agent stay inside it, and are reported as events."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.e2e.conftest import Daemon

pytestmark = pytest.mark.root

FORK_BOMB = ("import os,time\n"
             "n=0\n"
             "end=time.time()+8\n"
             "while time.time()<end:\n"
             "    try:\n"
             "        if os.fork()==0:\n"
             "            time.sleep(10); os._exit(0)\n"
             "        n+=1\n"
             "    except OSError: break\n"
             "print('forked', n)\n")


def _wait_event(d: Daemon, agent: str, kind: str, timeout: float = 30) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for e in d.json("events", "--agent", agent):
            if e["kind"] == kind:
                return e  # type: ignore[no-any-return]
        time.sleep(0.5)
    raise AssertionError(f"no {kind} event for {agent}:\n{d.log()}")


def test_fork_bomb_stops_at_pids_limit(daemon: Daemon, project: Path) -> None:
    daemon.create("fb", "--template", "default", "--project", str(project),
                  "--set", "resources.pids=40")
    info = daemon.wait_state("fb", ("running",))
    assert info["limits"]["pids"] == 40
    cp = daemon.cli("exec", "fb", "--", "python3", "-c", FORK_BOMB, timeout=120)
    forked = int(cp.stdout.split()[-1])
    assert 0 < forked < 40
    _wait_event(daemon, "fb", "agent.pids_limit")
    # the daemon is fine and so is a second agent
    assert daemon.json("status")["agents"]["running"] >= 1


def test_memory_bomb_is_oom_killed_inside_only(daemon: Daemon, project: Path) -> None:
    daemon.create("mb", "--template", "default", "--project", str(project),
                  "--set", "resources.memory=256M")
    daemon.wait_state("mb", ("running",))
    # positive control: a modest allocation works
    ok = daemon.cli("exec", "mb", "--", "python3", "-c", "b=bytearray(16<<20); print('ok')")
    assert ok.returncode == 0
    cp = daemon.cli("exec", "mb", "--", "python3", "-c", "b=bytearray(1024<<20)", timeout=120)
    assert cp.returncode == 137
    e = _wait_event(daemon, "mb", "agent.oom")
    assert e["agent"] == "mb"
    # the agent's session and the daemon survive
    assert daemon.json("inspect", "mb")["state"] == "running"
    assert daemon.cli("exec", "mb", "--", "true").returncode == 0
