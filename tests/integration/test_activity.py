"""needs-input detection against real processes on real terminals."""

from __future__ import annotations

import fcntl
import os
import pty
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor import activity


def _on_terminal(script: str) -> subprocess.Popen[bytes]:
    """`bash -c script` as a session leader with a fresh pty as its controlling
    terminal (the way a keeper runs an agent's session)."""
    master, slave = pty.openpty()

    def ctty() -> None:
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen(["bash", "-c", script], stdin=slave, stdout=slave, stderr=slave,
                            preexec_fn=ctty)
    os.close(slave)
    proc.master = master  # type: ignore[attr-defined]
    return proc


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        subprocess.run(["pkill", "-KILL", "-s", str(p.pid)], check=False)  # our own session
        p.kill()
        p.wait(5)
        os.close(p.master)  # type: ignore[attr-defined]


def _settle(root: int, want: bool, timeout: float = 5) -> bool:
    """Poll until the answer is `want` (processes need a moment to reach their syscall)."""
    deadline = time.monotonic() + timeout
    got = activity.blocked_on_terminal(root)
    while got != want and time.monotonic() < deadline:
        time.sleep(0.05)
        got = activity.blocked_on_terminal(root)
    return got


PY = sys.executable


@pytest.mark.parametrize("waiter", [
    f"{PY} -c 'input()'",                                                    # read(0)
    f"{PY} -c 'import select,sys; select.select([sys.stdin],[],[])'",       # select
    f"{PY} -c 'import select,sys; p=select.poll(); p.register(0, select.POLLIN); p.poll()'",  # poll
])
def test_reading_the_terminal_is_waiting(procs: list[subprocess.Popen[bytes]],
                                         waiter: str) -> None:
    p = _on_terminal(f"{waiter}; true")
    procs.append(p)
    assert _settle(p.pid, True)


@pytest.mark.parametrize("busy", [
    "sleep 30",                            # asleep, but not on the terminal
    f"{PY} -c 'while True: pass'",         # running
    f"{PY} -c 'input()' < /dev/null; sleep 30",  # read on something else, then sleep
    f"{PY} -c 'import time; time.sleep(30)' & wait",  # background job, shell waits
])
def test_other_sleeps_and_work_are_not(procs: list[subprocess.Popen[bytes]], busy: str) -> None:
    # (the positive control is test_reading_the_terminal_is_waiting: same tree shape)
    p = _on_terminal(f"{busy}; true")
    procs.append(p)
    time.sleep(0.5)
    assert not _settle(p.pid, False)


def test_waiting_on_a_job_is_not_input_then_reading_is(
        procs: list[subprocess.Popen[bytes]]) -> None:
    """A shell with job control waiting for a background job is not waiting
    for input; a process that first sleeps, then reads, flips the answer."""
    p = _on_terminal(f"set -m; {PY} -c 'import time; time.sleep(30)' & wait; true")
    procs.append(p)
    time.sleep(0.5)
    assert not _settle(p.pid, False)
    q = _on_terminal(f"{PY} -c 'import time; time.sleep(0.5); input()'; true")
    procs.append(q)
    assert not activity.blocked_on_terminal(q.pid)  # still sleeping
    assert _settle(q.pid, True)  # now reading


def test_quiet_period_from_the_session_log(tmp_path: Path,
                                           procs: list[subprocess.Popen[bytes]]) -> None:
    p = _on_terminal(f"{PY} -c 'input()'; true")
    procs.append(p)
    assert _settle(p.pid, True)
    log = tmp_path / "session.log"
    log.write_bytes(b"output just now")
    assert not activity.needs_input(p.pid, str(log))  # printed less than QUIET_SECONDS ago
    later = time.time() + activity.QUIET_SECONDS + 0.1
    assert activity.needs_input(p.pid, str(log), now=later)
    lone = subprocess.Popen(["sleep", "30"], stdin=subprocess.DEVNULL)  # no terminal at all
    try:
        assert not activity.needs_input(lone.pid, str(log), now=later)
    finally:
        lone.kill()
        lone.wait(5)
