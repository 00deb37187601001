"""A real stand-in for the Manager, for the SSH server's tests (not a mock).

Sessions are a real PTY running a real `bash --norc`, with a pyte screen for
late joiners; exec runs real processes (pipes, or a PTY made the controlling
terminal with `setsid -c`); open_tcp connects to a real TCP server on
127.0.0.1; workspace_view is a temp dir. The server under test runs on its own
event loop in a thread, so the tests can drive the real OpenSSH client with
blocking subprocess calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import pty
import signal
import struct
import subprocess
import termios
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pyte

WRITERS = ("collaborator", "owner")


class StandinClient:
    def __init__(self, hub: StandinHub, user: str, role: str) -> None:
        self.hub = hub
        self.user = user
        self.role = role
        self.snapshot = hub.render()
        self._q: asyncio.Queue[bytes] = asyncio.Queue()
        self._queued = 0
        self.closed = False

    def push(self, data: bytes) -> None:
        if self.closed:
            return
        if self._queued + len(data) > self.hub.manager.queue_limit:  # the hub drops slow clients
            self.close()
            return
        self._queued += len(data)
        self._q.put_nowait(data)

    async def read(self) -> bytes:
        if self.closed and self._q.empty():
            return b""
        data = await self._q.get()
        self._queued -= len(data)
        return data

    def _live_role(self) -> str | None:
        return self.hub.manager.roles.get((self.hub.agent, self.user))

    def write(self, data: bytes) -> None:
        if self._live_role() in WRITERS:
            self.hub.manager.typed.append((self.user, data))
            os.write(self.hub.master, data)

    def resize(self, cols: int, rows: int) -> None:
        if self._live_role() in WRITERS:
            self.hub.resize(cols, rows)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.hub.clients.discard(self)
            self._q.put_nowait(b"")


class StandinHub:
    """A real bash on a real PTY, fanned out to clients; pyte keeps the screen."""

    def __init__(self, manager: StandinManager, agent: str, cwd: str) -> None:
        self.manager = manager
        self.agent = agent
        self.clients: set[StandinClient] = set()
        self.size = (100, 30)
        # Only a bounded tail is kept and replayed into a fresh pyte screen on
        # render: cheap under a flood, exact enough for a test's late joiner.
        self.tail = bytearray()
        self.master, slave = pty.openpty()
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "TERM": "xterm",
               "PS1": "agent$ ", "HOME": cwd}
        self.proc = subprocess.Popen(
            ["setsid", "-c", "bash", "--norc", "--noprofile", "-i"],
            stdin=slave, stdout=slave, stderr=slave, cwd=cwd, env=env, close_fds=True)
        os.close(slave)
        os.set_blocking(self.master, False)
        asyncio.get_running_loop().add_reader(self.master, self._readable)

    def render(self) -> bytes:
        screen = pyte.Screen(*self.size)
        pyte.ByteStream(screen).feed(bytes(self.tail))
        lines = [line.rstrip() for line in screen.display]
        body = "\r\n".join(lines).encode()
        y, x = screen.cursor.y + 1, screen.cursor.x + 1
        return b"\x1b[H\x1b[2J" + body + f"\x1b[{y};{x}H".encode()

    def resize(self, cols: int, rows: int) -> None:
        self.manager.resizes.append((cols, rows))
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        self.size = (cols, rows)

    def _readable(self) -> None:
        try:
            data = os.read(self.master, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.end()
            return
        self.tail += data
        del self.tail[:-16384]
        for c in list(self.clients):
            c.push(data)

    def end(self) -> None:
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(self.master)
        for c in list(self.clients):
            c.close()

    def stop(self) -> None:
        self.end()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        os.close(self.master)


class _FdReader:
    """Non-blocking reads of one fd (pipe or PTY master) on the loop; EIO is EOF."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        os.set_blocking(fd, False)
        self.eof = False

    async def read(self) -> bytes:
        loop = asyncio.get_running_loop()
        while not self.eof:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                fut: asyncio.Future[None] = loop.create_future()
                loop.add_reader(self.fd, _wake, fut)
                try:
                    await fut
                finally:
                    loop.remove_reader(self.fd)
                continue
            except OSError:
                data = b""
            if not data:
                self.eof = True
                return b""
            return data
        return b""


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class StandinExec:
    def __init__(self, argv: list[str], env: dict[str, str], cwd: str,
                 tty: tuple[str, int, int] | None) -> None:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env}
        self.tty = tty is not None
        self.exit_signal: int | None = None
        if tty:
            master, slave = pty.openpty()
            fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", tty[2], tty[1], 0, 0))
            self.proc = subprocess.Popen(["setsid", "-c", *argv], stdin=slave, stdout=slave,
                                         stderr=slave, env=env, cwd=cwd)
            os.close(slave)
            self._in: int | None = os.dup(master)
            self._out = _FdReader(master)
            self._err: _FdReader | None = None
        else:
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, env=env, cwd=cwd)
            assert self.proc.stdin
            assert self.proc.stdout
            assert self.proc.stderr
            self._in = os.dup(self.proc.stdin.fileno())
            self.proc.stdin.close()
            self._out = _FdReader(os.dup(self.proc.stdout.fileno()))
            self.proc.stdout.close()
            self._err = _FdReader(os.dup(self.proc.stderr.fileno()))
            self.proc.stderr.close()

    async def write_stdin(self, data: bytes) -> None:
        if self._in is not None:
            await asyncio.to_thread(os.write, self._in, data)

    def close_stdin(self) -> None:
        if self._in is not None and not self.tty:
            os.close(self._in)
            self._in = None

    async def read_stdout(self) -> bytes:
        return await self._out.read()

    async def read_stderr(self) -> bytes:
        if self._err is None:
            return b""
        return await self._err.read()

    def resize(self, cols: int, rows: int) -> None:
        if self.tty and self._in is not None:
            fcntl.ioctl(self._in, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    async def wait(self) -> int:
        code = await asyncio.to_thread(self.proc.wait)
        for fd in (self._in, self._out.fd, self._err.fd if self._err else None):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._in = None
        if code < 0:
            self.exit_signal = -code   # what the SSH server reports as exit-signal
        return 128 - code if code < 0 else code


class StandinManager:
    """What the SSH server calls, backed by real processes; roles settable by the test."""

    def __init__(self, workspace: str) -> None:
        self.workspace = workspace
        #: per-client backlog before the hub drops a client (the real hub: 2 MiB)
        self.queue_limit = 2 << 20
        self.keys: dict[str, str] = {}          # fingerprint -> user
        self.roles: dict[tuple[str, str], str] = {}
        self.on_access_change: list[Callable[[str, str], None]] = []
        self.events: list[tuple[str, str | None, dict[str, object]]] = []
        self.typed: list[tuple[str, bytes]] = []
        self.hubs: dict[str, StandinHub] = {}
        self.execs: list[StandinExec] = []
        self.tcp_opens: list[int] = []
        self.resizes: list[tuple[int, int]] = []

    # what the SSH server calls
    def user_for_key(self, fingerprint: str) -> str | None:
        return self.keys.get(fingerprint)

    def role(self, agent: str, user: str) -> str | None:
        return self.roles.get((agent, user))

    def audit(self, kind: str, agent: str | None, **data: object) -> None:
        self.events.append((kind, agent, data))

    async def attach(self, name: str, user: str, role: str,
                     size: tuple[int, int] | None = None) -> StandinClient:
        hub = self.hubs.get(name)
        if hub is None:
            hub = self.hubs[name] = StandinHub(self, name, self.workspace)
        client = StandinClient(hub, user, role)
        hub.clients.add(client)
        return client

    async def exec(self, name: str, argv: list[str], *, user: str,
                   tty: tuple[str, int, int] | None, env: dict[str, str]) -> StandinExec:
        proc = StandinExec(argv, env, self.workspace, tty)
        self.execs.append(proc)
        return proc

    async def open_tcp(self, name: str, port: int) -> tuple[asyncio.StreamReader,
                                                            asyncio.StreamWriter]:
        self.tcp_opens.append(port)
        return await asyncio.open_connection("127.0.0.1", port)

    def workspace_view(self, name: str) -> str:
        return self.workspace

    # what the test calls
    def set_role(self, agent: str, user: str, role: str | None) -> None:
        if role is None:
            self.roles.pop((agent, user), None)
        else:
            self.roles[(agent, user)] = role
        for hub in self.hubs.values():
            for c in list(hub.clients):
                if c.user == user and role is None:
                    c.close()
        for cb in list(self.on_access_change):
            cb(agent, user)

    def stop(self) -> None:
        for hub in self.hubs.values():
            hub.stop()
        for e in self.execs:
            if e.proc.poll() is None:
                e.proc.kill()
            e.proc.wait(10)


class LoopThread:
    """An event loop in a thread; `run(coro)` runs a coroutine there and waits."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="ssh-test-loop",
                                       daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        async def _call() -> Any:
            return fn(*args)
        return self.run(_call())

    def stop(self) -> None:
        async def _drain() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            self.run(_drain(), timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def keygen(path: Path) -> str:
    """A fresh ed25519 key pair at path; returns OpenSSH's SHA256 fingerprint."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name,
                    "-f", str(path)], check=True)
    out = subprocess.run(["ssh-keygen", "-l", "-f", f"{path}.pub"], check=True,
                         capture_output=True, text=True).stdout
    return out.split()[1]


def kill_group(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
