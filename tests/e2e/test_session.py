"""The agent's persistent session: local attach (a real terminal via tmux), logs,
detach and re-attach, read-only viewers, and survival across daemon restarts."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import CORRAL, Daemon

pytestmark = pytest.mark.root


class Tmux:
    """A private tmux server (its own socket name) driving real terminals."""

    def __init__(self, name: str) -> None:
        self.name = name

    def run(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.name, *args], capture_output=True,
                              text=True, timeout=30).stdout

    def new(self, window: str, cmd: str) -> None:
        subprocess.run(["tmux", "-L", self.name, "new-session", "-d", "-s", window, "-x", "100",
                        "-y", "30", cmd], check=True, timeout=30)

    def keys(self, window: str, *keys: str) -> None:
        self.run("send-keys", "-t", window, *keys)

    def screen(self, window: str) -> str:
        return self.run("capture-pane", "-p", "-t", window)

    def wait_for(self, window: str, text: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        screen = ""
        while time.monotonic() < deadline:
            screen = self.screen(window)
            if text in screen:
                return screen
            time.sleep(0.1)
        raise AssertionError(f"{text!r} never appeared; screen:\n{screen}")

    def alive(self, window: str) -> bool:
        return window in self.run("list-sessions", "-F", "#{session_name}")

    def kill(self) -> None:
        subprocess.run(["tmux", "-L", self.name, "kill-server"], capture_output=True, timeout=30)


@pytest.fixture
def tmux(uniq: str) -> Iterator[Tmux]:
    t = Tmux(f"corral-{uniq}")
    try:
        yield t
    finally:
        t.kill()


def _attach_cmd(d: Daemon, name: str, *extra: str) -> str:
    return f"{CORRAL} --socket {d.socket} attach {name} {' '.join(extra)}; sleep 30"


def test_attach_type_detach_reattach(daemon: Daemon, project: Path, tmux: Tmux,
                                     uniq: str) -> None:
    daemon.create("s1", "--template", "default", "--project", str(project))
    daemon.wait_state("s1", ("running",))
    tmux.new("a", _attach_cmd(daemon, "s1"))
    time.sleep(1)
    tmux.keys("a", f"echo marker-{uniq}-$((6*7))", "Enter")
    tmux.wait_for("a", f"marker-{uniq}-42")
    # the session's terminal is an xterm, and its line editing knows UTF-8
    tmux.keys("a", f"stty -a | grep -q ' iutf8' && echo \"$TERM-{uniq}-$((6*8))\"", "Enter")
    tmux.wait_for("a", f"xterm-256color-{uniq}-48")
    # the client sees itself among the session's clients
    info = daemon.json("inspect", "s1")
    assert "root" in info["session"]["clients"]
    # Ctrl-] detaches; the agent keeps running
    tmux.keys("a", "C-]")
    deadline = time.monotonic() + 20
    while "root" in daemon.json("inspect", "s1")["session"]["clients"]:
        assert time.monotonic() < deadline, "detach did not end the attachment"
        time.sleep(0.2)
    assert daemon.json("inspect", "s1")["state"] == "running"
    # a new attach shows the current screen (not an empty one)
    tmux.new("b", _attach_cmd(daemon, "s1"))
    tmux.wait_for("b", f"marker-{uniq}-42")
    # and the output is in the session log
    logs = daemon.cli("logs", "s1", check=True).stdout
    assert f"marker-{uniq}-42" in logs


def test_read_only_attach_drops_keystrokes(daemon: Daemon, project: Path, tmux: Tmux,
                                           uniq: str) -> None:
    daemon.create("s2", "--template", "default", "--project", str(project))
    daemon.wait_state("s2", ("running",))
    tmux.new("w", _attach_cmd(daemon, "s2"))
    tmux.new("r", _attach_cmd(daemon, "s2", "--read-only"))
    time.sleep(1)
    tmux.keys("r", f"touch /tmp/viewer-{uniq}", "Enter")
    # positive control: the writer's keystrokes do arrive, and the viewer sees them
    tmux.keys("w", f"touch /tmp/writer-{uniq}; echo done-{uniq}", "Enter")
    tmux.wait_for("w", f"done-{uniq}")
    tmux.wait_for("r", f"done-{uniq}")
    ok = daemon.cli("exec", "s2", "--", "test", "-e", f"/tmp/writer-{uniq}")
    assert ok.returncode == 0
    blocked = daemon.cli("exec", "s2", "--", "test", "-e", f"/tmp/viewer-{uniq}")
    assert blocked.returncode == 1


def test_session_survives_daemon_restart_with_screen(daemon: Daemon, project: Path, tmux: Tmux,
                                                    uniq: str) -> None:
    daemon.create("s3", "--template", "default", "--project", str(project))
    daemon.wait_state("s3", ("running",))
    tmux.new("a", _attach_cmd(daemon, "s3"))
    time.sleep(1)
    tmux.keys("a", f"echo before-{uniq}", "Enter")
    tmux.wait_for("a", f"before-{uniq}")
    daemon.stop(signal.SIGKILL)
    daemon.start()
    daemon.wait_state("s3", ("running",))
    tmux.new("b", _attach_cmd(daemon, "s3"))
    tmux.wait_for("b", f"before-{uniq}")
    tmux.keys("b", f"echo after-{uniq}", "Enter")
    tmux.wait_for("b", f"after-{uniq}")


def test_exec_tty(daemon: Daemon, project: Path, tmux: Tmux, uniq: str) -> None:
    daemon.create("s4", "--template", "default", "--project", str(project))
    daemon.wait_state("s4", ("running",))
    tmux.new("x", f"{CORRAL} --socket {daemon.socket} exec s4 --tty -- sh -c "
                  f"'test -t 0 && echo tty-yes-{uniq}; stty size; tty'; sleep 30")
    screen = tmux.wait_for("x", f"tty-yes-{uniq}")
    assert "30 100" in screen or "29 100" in screen
    # the terminal comes from the sandbox's own devpts, so it has a name inside
    tmux.wait_for("x", "/dev/pts/")


def test_session_exit_marks_agent_stopped(daemon: Daemon, project: Path, tmux: Tmux) -> None:
    daemon.create("s5", "--template", "default", "--project", str(project))
    daemon.wait_state("s5", ("running",))
    tmux.new("a", _attach_cmd(daemon, "s5"))
    time.sleep(1)
    tmux.keys("a", "exit 3", "Enter")
    info = daemon.wait_state("s5", ("failed", "stopped"))
    assert info["state"] == "failed"
    assert "status 3" in info["reason"]
    assert not daemon.leftovers(), daemon.leftovers()


def test_services_start_before_the_session(daemon: Daemon, project: Path) -> None:
    tdir = Path(daemon.config_path).parent / "templates"
    (tdir / "svcfirst.yaml").write_text(
        "name: svcfirst\n"
        "description: the session checks the service is already up\n"
        "extends: default\n"
        "agent:\n"
        "  command: [\"sh\", \"-c\", \"python3 -c 'import socket; "
        "socket.create_connection((\\\"127.0.0.1\\\", 8000), timeout=2); "
        "print(\\\"SERVICE-UP-FIRST\\\")'; exec sh\"]\n"
        "services:\n"
        "  web:\n"
        "    command: [python3, -m, http.server, \"8000\"]\n"
        "    port: 8000\n"
        "    health: {tcp: 8000, interval: 1s, timeout: 2s, retries: 30}\n")
    daemon.create("sf", "--template", "svcfirst", "--project", str(project))
    daemon.wait_state("sf", ("running",))
    deadline = time.monotonic() + 30
    while "SERVICE-UP-FIRST" not in daemon.cli("logs", "sf").stdout:
        assert time.monotonic() < deadline, daemon.cli("logs", "sf").stdout
        time.sleep(0.3)


def test_flooding_the_terminal_does_not_hurt_the_agent(daemon: Daemon, project: Path,
                                                       tmux: Tmux, uniq: str) -> None:
    """THREATS.md: an agent flooding its terminal never blocks it or the
    daemon, and never grows the daemon's memory without bound."""
    daemon.create("fl", "--template", "default", "--project", str(project))
    info = daemon.wait_state("fl", ("running",))
    tmux.new("a", _attach_cmd(daemon, "fl"))
    time.sleep(1)
    tmux.keys("a", "head -c 60000000 /dev/zero | tr '\\0' x | fold -w 200; "
                   f"echo FLOOD''DONE-{uniq}", "Enter")
    deadline = time.monotonic() + 180
    while f"FLOODDONE-{uniq}" not in daemon.cli("logs", "fl", "--tail", "3").stdout:
        assert time.monotonic() < deadline, "the flood never finished"
        time.sleep(1)
    after = daemon.json("inspect", "fl")
    assert after["state"] == "running"
    assert after["session"]["pid"] == info["session"]["pid"]
    # a newcomer still gets the current screen, and the daemon stayed small
    tmux.new("b", _attach_cmd(daemon, "fl"))
    tmux.wait_for("b", f"FLOODDONE-{uniq}")
    rss = int(Path(f"/proc/{daemon.json('status')['pid']}/status").read_text()
              .split("VmRSS:")[1].split()[0])
    assert rss < 400 * 1024, f"daemon RSS {rss} kB after the flood"
