"""The needs-input flag through the real daemon: a shell at its prompt is
waiting for someone; the same shell running a command is not."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Daemon
from tests.e2e.test_session import Tmux, _attach_cmd

pytestmark = pytest.mark.root


@pytest.fixture
def term(uniq: str) -> Iterator[Tmux]:
    t = Tmux(f"corral-ni-{uniq}")
    try:
        yield t
    finally:
        t.kill()


def _wait_flag(d: Daemon, name: str, want: bool, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    info = d.json("inspect", name)
    while info["needs_input"] != want:
        assert time.monotonic() < deadline, f"needs_input never became {want}: {info}"
        time.sleep(0.3)
        info = d.json("inspect", name)
    return info


def test_prompt_needs_input_a_running_command_does_not(daemon: Daemon, project: Path,
                                                       term: Tmux, uniq: str) -> None:
    daemon.create("ni1", "--template", "default", "--project", str(project))
    daemon.wait_state("ni1", ("running",))
    _wait_flag(daemon, "ni1", True)  # the shell sits at its prompt
    assert any(a["name"] == "ni1" and a["needs_input"] for a in daemon.json("ps"))
    assert "needs input: ni1" in daemon.cli("top", "--once", check=True).stdout
    # the event comes from the daemon's monitor (every 2 s), so it may trail the flag
    deadline = time.monotonic() + 15
    while True:
        events = daemon.json("events", "--agent", "ni1")
        if any(e["kind"] == "agent.needs_input" for e in events):
            break
        assert time.monotonic() < deadline, events
        time.sleep(0.3)
    term.new("a", _attach_cmd(daemon, "ni1"))
    time.sleep(1)
    term.keys("a", f"echo started-{uniq}; sleep 40", "Enter")
    term.wait_for("a", f"started-{uniq}")
    _wait_flag(daemon, "ni1", False, timeout=10)  # busy with sleep, quiet or not
    time.sleep(3)  # quiet now, still not waiting for input
    assert daemon.json("inspect", "ni1")["needs_input"] is False
    assert "needs input" not in daemon.cli("top", "--once", check=True).stdout
