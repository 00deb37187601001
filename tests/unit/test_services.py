"""Pure parts of supervisor.services and supervisor.ports: backoff schedule,
give-up window, exit codes, log rotation, host-wide port claims."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import pytest

from supervisor import ports, services


def test_backoff_doubles_up_to_the_cap() -> None:
    delays = [services.BACKOFF_START]
    for _ in range(12):
        delays.append(services.next_backoff(delays[-1]))
    assert delays[:4] == [services.BACKOFF_START * k for k in (1, 2, 4, 8)]
    assert max(delays) == services.BACKOFF_CAP
    assert delays == sorted(delays)


def test_give_up_counts_only_failures_in_the_window() -> None:
    w, n = services.GIVE_UP_WINDOW, services.GIVE_UP_FAILURES
    fails: list[float] = []
    gave_up = False
    for i in range(n):
        fails, gave_up = services.record_failure(fails, 1000.0 + i)
        assert gave_up == (i == n - 1)
    # the same number of failures spread wider than the window never gives up
    fails = []
    for i in range(3 * n):
        fails, gave_up = services.record_failure(fails, 1000.0 + i * (w / (n - 1) + 1))
        assert not gave_up
    assert len(fails) < n


def test_exit_codes_read_like_a_shell() -> None:
    pid = os.fork()
    if pid == 0:
        os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert services._exit_code(status) == 3
    pid = os.fork()
    if pid == 0:
        os.kill(os.getpid(), signal.SIGKILL)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert services._exit_code(status) == 128 + signal.SIGKILL


def test_rotate_copies_and_truncates_past_the_cap(tmp_path: Path) -> None:
    log = tmp_path / "web.log"
    # a writer that keeps its O_APPEND descriptor across the rotation, like a service
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, b"x" * 100)
        services._rotate(str(log), 1000)
        assert not Path(f"{log}.1").exists()  # under the cap: untouched
        os.write(fd, b"y" * 2000)
        services._rotate(str(log), 1000)
        assert Path(f"{log}.1").read_bytes() == b"x" * 100 + b"y" * 2000
        assert log.stat().st_size == 0
        os.write(fd, b"after\n")
        assert log.read_bytes() == b"after\n"  # appended at the new end, no hole
    finally:
        os.close(fd)
    services._rotate(str(tmp_path / "missing.log"), 10)  # no error for a missing log


def test_same_process_checks_start_time() -> None:
    import psutil
    me = psutil.Process()
    assert services._same_process(me.pid, me.create_time())
    assert not services._same_process(me.pid, me.create_time() - 10)
    assert not services._same_process(None, None)
    assert not services._same_process("12", 1.0)


@pytest.fixture
def claims_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "claims"
    monkeypatch.setattr(ports, "CLAIMS_DIR", str(d))
    return d


def test_claims_are_exclusive_and_idempotent(claims_dir: Path) -> None:
    assert ports.claim(40001, "s1 a web")
    assert ports.claim(40001, "s1 a web")  # the same owner again: fine
    assert not ports.claim(40001, "s2 b web")  # another daemon's agent: refused
    assert ports.claimed_by(40001) == "s1 a web"
    ports.unclaim(40001, "s2 b web")  # not the owner: nothing happens
    assert ports.claimed_by(40001) == "s1 a web"
    ports.unclaim(40001, "s1 a web")
    assert ports.claimed_by(40001) is None
    assert not (claims_dir / "40001").exists()


def test_claimer_skips_claimed_and_busy_ports(claims_dir: Path) -> None:
    accept = ports.claimer("s1 a db")
    assert ports.claim(40002, "s9 other svc")
    assert not accept(40002)  # claimed by someone else
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        assert not ports.bind_free(port)
        assert not accept(port)  # in use by an unrelated listener
        assert ports.claimed_by(port) is None
    # positive control: a free, unclaimed port is accepted and claimed
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    assert accept(free)
    assert ports.claimed_by(free) == "s1 a db"
