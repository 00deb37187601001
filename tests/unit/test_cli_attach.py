"""Local attach on a real PTY: raw mode, Ctrl-] detach, read-only, resize, terminal restored."""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
import struct
import termios
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest

from sandbox.errors import NotFound
from supervisor.api import serve
from supervisor.client import AsyncClient
from supervisor.termattach import RawMode, attach_terminal, terminal_size
from tests.unit.test_api_fake import FakeManager, short_tmpdir


@pytest.fixture
def pty_pair() -> Iterator[tuple[int, int]]:
    """(master, slave): the slave plays the user's terminal, the test types on the master."""
    master, slave = os.openpty()
    os.set_blocking(master, False)
    try:
        yield master, slave
    finally:
        os.close(master)
        os.close(slave)


async def read_until(master: int, needle: bytes, timeout: float = 30) -> bytes:
    loop = asyncio.get_running_loop()
    seen = b""
    deadline = loop.time() + timeout
    while needle not in seen:
        if loop.time() > deadline:
            raise AssertionError(f"{needle!r} never appeared; got {seen!r}")
        try:
            seen += os.read(master, 4096)
        except BlockingIOError:
            await asyncio.sleep(0.01)
    return seen


async def until(predicate: Callable[[], bool]) -> None:
    for _ in range(3000):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


def is_raw(fd: int) -> bool:
    return not termios.tcgetattr(fd)[3] & (termios.ICANON | termios.ECHO)


def with_api(body: Callable[[FakeManager, AsyncClient], Awaitable[Any]]) -> Any:
    manager = FakeManager()

    async def main() -> Any:
        with short_tmpdir() as tmp:
            path = os.path.join(tmp, "api.sock")
            server = await serve(manager, path, group="corral-test-nogroup")
            try:
                async with AsyncClient(path) as client:
                    return await asyncio.wait_for(body(manager, client), 60)
            finally:
                await server.cleanup()

    return asyncio.run(main())


def test_attach_types_detaches_and_restores_the_terminal(pty_pair: tuple[int, int]) -> None:
    master, slave = pty_pair
    before = termios.tcgetattr(slave)
    assert not is_raw(slave)

    async def body(manager: FakeManager, client: AsyncClient) -> None:
        ws = await client.ws_connect("/v1/agents/web/attach")
        task = asyncio.create_task(attach_terminal(ws, stdin_fd=slave, stdout_fd=slave))
        await read_until(master, b"SNAPSHOT")
        assert is_raw(slave)
        os.write(master, b"ls\x03")  # Ctrl-C is just a key in raw mode
        await read_until(master, b"echo:ls\x03")
        assert manager.typed == [("owner", b"ls\x03")]
        os.write(master, b"x\x1dy")  # what precedes Ctrl-] is sent, what follows is not
        assert await asyncio.wait_for(task, 30) == "detached"
        assert manager.typed == [("owner", b"ls\x03"), ("owner", b"x")]
        await until(lambda: manager.closed_sessions == 1)
        assert manager.agents["web"]["state"] == "running"  # detaching leaves it running

    with_api(body)
    assert termios.tcgetattr(slave) == before


def test_attach_read_only_sends_nothing(pty_pair: tuple[int, int]) -> None:
    master, slave = pty_pair
    before = termios.tcgetattr(slave)

    async def body(manager: FakeManager, client: AsyncClient) -> None:
        ws = await client.ws_connect("/v1/agents/web/attach?read_only=1")
        task = asyncio.create_task(
            attach_terminal(ws, read_only=True, stdin_fd=slave, stdout_fd=slave))
        await read_until(master, b"SNAPSHOT")
        os.write(master, b"rm -rf /\r")
        manager.sessions[0].output.put_nowait(b"agent output")
        await read_until(master, b"agent output")
        os.write(master, b"\x1d")
        assert await asyncio.wait_for(task, 30) == "detached"
        assert manager.typed == []
        assert manager.calls[-1][3] == "viewer"

    with_api(body)
    assert termios.tcgetattr(slave) == before


def test_session_end_and_resize(pty_pair: tuple[int, int]) -> None:
    master, slave = pty_pair
    before = termios.tcgetattr(slave)

    async def body(manager: FakeManager, client: AsyncClient) -> None:
        ws = await client.ws_connect("/v1/agents/web/attach")
        task = asyncio.create_task(attach_terminal(ws, stdin_fd=slave, stdout_fd=slave))
        await read_until(master, b"SNAPSHOT")
        # The window changes: the kernel's size plus SIGWINCH, as a terminal emulator does.
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 111, 0, 0))
        assert terminal_size(slave) == (111, 33)
        os.kill(os.getpid(), signal.SIGWINCH)
        await until(lambda: manager.resizes == [(111, 33)])
        manager.end_sessions()
        assert await asyncio.wait_for(task, 30) == "ended"

    with_api(body)
    assert termios.tcgetattr(slave) == before


def test_terminal_restored_when_cancelled_and_no_raw_mode_on_errors(
    pty_pair: tuple[int, int],
) -> None:
    master, slave = pty_pair
    before = termios.tcgetattr(slave)

    async def body(manager: FakeManager, client: AsyncClient) -> None:
        ws = await client.ws_connect("/v1/agents/web/attach")
        task = asyncio.create_task(attach_terminal(ws, stdin_fd=slave, stdout_fd=slave))
        await read_until(master, b"SNAPSHOT")
        assert is_raw(slave)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert termios.tcgetattr(slave) == before
        ws = await client.ws_connect("/v1/agents/nope/attach")
        with pytest.raises(NotFound, match="nope"):
            await attach_terminal(ws, stdin_fd=slave, stdout_fd=slave)
        assert termios.tcgetattr(slave) == before

    with_api(body)


def test_raw_mode_is_a_no_op_off_a_terminal() -> None:
    r, w = os.pipe()
    try:
        with RawMode(r):
            pass
        assert terminal_size(r) is None
    finally:
        os.close(r)
        os.close(w)


def test_exec_tty_uses_raw_mode_and_forwards_resize(pty_pair: tuple[int, int]) -> None:
    from supervisor.termattach import exec_terminal, fd_writer

    master, slave = pty_pair
    before = termios.tcgetattr(slave)
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 20, 70, 0, 0))

    async def body(manager: FakeManager, client: AsyncClient) -> None:
        ws = await client.ws_connect("/v1/agents/web/exec")
        request = {"argv": ["sh", "-c", "stty -echo; read line; echo got:$line; exit 5"],
                   "tty": True, "term": "xterm", "cols": 70, "rows": 20}
        write = fd_writer(slave)
        task = asyncio.create_task(
            exec_terminal(ws, request, stdin=slave, stdout=write, stderr=write, tty_fd=slave))
        await until(lambda: len(manager.execs) == 1)
        assert is_raw(slave)
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 25, 90, 0, 0))
        os.kill(os.getpid(), signal.SIGWINCH)
        await until(lambda: manager.execs[0].resizes == [(90, 25)])
        os.write(master, b"hello\r")
        assert await asyncio.wait_for(task, 30) == 5
        await read_until(master, b"got:hello")

    with_api(body)
    assert termios.tcgetattr(slave) == before


def test_top_is_live_and_quits_on_q(pty_pair: tuple[int, int]) -> None:
    """The real `corral` entry point in a real terminal: frames refresh until `q`."""
    import subprocess
    import sys

    from tests.unit.test_api_fake import ApiThread

    master, slave = pty_pair
    with short_tmpdir() as tmp, ApiThread(FakeManager(), os.path.join(tmp, "api.sock")) as api:
        proc = subprocess.Popen(
            [sys.executable, "-c", "from supervisor.cli import main; main()",
             "--socket", api.path, "top", "--interval", "0.2"],
            stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
            cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
        )
        try:
            async def watch() -> bytes:
                first = await read_until(master, b"(q to quit)")
                # A second frame proves it refreshes on its own.
                rest = await read_until(master, b"\x1b[2J")
                await read_until(master, b"(q to quit)")
                os.write(master, b"q")
                return first + rest

            seen = asyncio.run(watch())
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert b"NAME" in seen
    assert b"web" in seen
    assert b"old" in seen
    # cbreak mode was undone when top quit.
    assert termios.tcgetattr(slave)[3] & termios.ICANON
