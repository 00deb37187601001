"""The keeper fork server (supervisor.zygote) on its own: a real server
process, real forks, real descriptors passed over SCM_RIGHTS."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from pathlib import Path

import psutil
import pytest

from supervisor.agents import PKG_ROOT
from supervisor.zygote import Zygote

ENV = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
       "PYTHONPATH": os.pathsep.join([PKG_ROOT, *sys.path])}


def _wait_gone(pid: int, timeout: float = 5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.02)
    return False


async def _spawn(z: Zygote, argv: list[str], err_path: Path) -> tuple[int, bytes]:
    r, w = os.pipe()
    err = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        pid = await z.spawn(argv, w, err)
    finally:
        os.close(w)
        os.close(err)
    with os.fdopen(r, "rb") as f:
        out = await asyncio.to_thread(f.read)
    return pid, out


def test_child_runs_keeper_main_with_its_own_stdio(tmp_path: Path) -> None:
    """A keeper whose arguments are wrong fails exactly as `python -m
    supervisor.keeper` would: usage on its stderr (our file), nothing on its
    stdout (our pipe: EOF, which the daemon reads as "keeper exited"), and it
    is a child of the server in a session of its own."""

    async def go() -> tuple[int, bytes, int]:
        z = Zygote(ENV)
        try:
            pid, out = await _spawn(z, ["--no-such-option"], tmp_path / "err")
            assert z.proc is not None
            return pid, out, z.proc.pid
        finally:
            z.close()

    pid, out, server = asyncio.run(go())
    assert out == b""
    assert "usage: corral-keeper" in (tmp_path / "err").read_text()
    assert pid != server
    assert _wait_gone(pid)


def test_server_restarts_after_it_died_and_dies_with_its_parent(tmp_path: Path) -> None:
    async def go() -> None:
        z = Zygote(ENV)
        try:
            await _spawn(z, ["--help"], tmp_path / "err1")
            assert z.proc is not None
            first = z.proc.pid
            os.kill(first, signal.SIGKILL)  # our own child
            z.proc.wait(5)
            # The next spawn notices the dead server and starts a new one.
            _, out = await _spawn(z, ["--help"], tmp_path / "err2")
            assert b"usage: corral-keeper" in out  # --help prints to stdout, our pipe
            assert z.proc is not None
            assert z.proc.pid != first
        finally:
            z.close()
        assert z.proc is None

    asyncio.run(go())


def test_malformed_request_is_refused_not_fatal(tmp_path: Path) -> None:
    async def go() -> None:
        z = Zygote(ENV)
        try:
            await _spawn(z, ["--help"], tmp_path / "err")
            assert z.sock is not None
            loop = asyncio.get_running_loop()
            z.sock.send(b'{"id": 99, "argv": []}')  # no descriptors attached
            answer = await asyncio.wait_for(loop.sock_recv(z.sock, 4096), 5)
            assert b"expected 2 descriptors" in answer
            z.sock.send(b"not json")
            answer = await asyncio.wait_for(loop.sock_recv(z.sock, 4096), 5)
            assert b"error" in answer
            # Still serving.
            _, out = await _spawn(z, ["--help"], tmp_path / "err")
            assert b"usage: corral-keeper" in out
        finally:
            z.close()

    asyncio.run(go())


@pytest.mark.parametrize("how", ["exit", "kill"])
def test_server_never_outlives_the_daemon(tmp_path: Path, how: str) -> None:
    """The daemon (here: a child Python process holding a Zygote) goes away
    without closing it: the server follows (PR_SET_PDEATHSIG / EOF), so it
    never lingers in corral.service's cgroup."""
    script = tmp_path / "owner.py"
    script.write_text(
        "import asyncio, os, sys, time\n"
        "from supervisor.zygote import Zygote\n"
        f"z = Zygote({ENV!r})\n"
        "async def go():\n"
        "    r, w = os.pipe()\n"
        "    await z.spawn(['--help'], w, w)\n"
        "    print(z.proc.pid, flush=True)\n"
        "asyncio.run(go())\n"
        f"{'os._exit(0)' if how == 'exit' else 'time.sleep(60)'}\n")
    import subprocess

    owner = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                             env={**os.environ, "PYTHONPATH": PKG_ROOT})
    server = 0
    try:
        assert owner.stdout is not None
        server = int(owner.stdout.readline())
        assert psutil.pid_exists(server)
        if how == "kill":
            owner.kill()
        owner.wait(10)
        assert _wait_gone(server), f"fork server {server} outlived its daemon"
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait(5)
        if server and not _wait_gone(server, 0.1):  # a failed run leaves nothing behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(server, signal.SIGKILL)  # our owner's child, by its pid
        if owner.stdout is not None:
            owner.stdout.close()


def test_a_request_without_an_answer_fails_the_start_without_a_second_try(
        tmp_path: Path) -> None:
    """Once the server has the request a keeper may exist: no retry, no
    fallback (two keepers for one agent), a CorralError instead."""
    from sandbox.errors import CorralError
    from supervisor.zygote import ZygoteError

    async def go() -> None:
        z = Zygote(ENV)
        z.answer_timeout = 0.5
        try:
            await _spawn(z, ["--help"], tmp_path / "err")  # it runs
            assert z.proc is not None
            hung = z.proc.pid
            os.kill(hung, signal.SIGSTOP)  # our own child: it takes requests, answers none
            with pytest.raises(CorralError) as err:
                await _spawn(z, ["--help"], tmp_path / "err")
            assert not isinstance(err.value, ZygoteError)  # not "try another way"
            assert "during a request" in str(err.value)
            assert _wait_gone(hung)  # the hung server was replaced, not left behind
            _, out = await _spawn(z, ["--help"], tmp_path / "err")  # a new one serves
            assert b"usage: corral-keeper" in out
        finally:
            z.close()

    asyncio.run(go())


def test_daemon_closing_while_the_server_imports_is_a_quiet_exit(tmp_path: Path) -> None:
    """The daemon stops (closes its end) while the server is still importing:
    the server leaves by itself, exit 0, no traceback in the daemon's journal."""
    import subprocess

    script = tmp_path / "owner.py"
    script.write_text(
        "import sys\n"
        "from supervisor.zygote import Zygote\n"
        f"z = Zygote({ENV!r})\n"
        "z.start()\n"
        "z.sock.close()  # before its hello: it is importing\n"
        "print(z.proc.pid, flush=True)\n"
        "sys.exit(z.proc.wait(60))\n")
    owner = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": PKG_ROOT}, timeout=90)
    assert owner.stdout.strip().isdigit()
    assert owner.returncode == 0, owner.stderr  # the server's exit status
    assert "Traceback" not in owner.stderr  # the server writes to the daemon's stderr
