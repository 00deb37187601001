"""A command running inside an agent's sandbox, seen from the daemon's loop.

`sandbox.process.enter()` forks a host-side waiter whose exit status is the
command's; this wraps its pipes (or PTY master) and that pid for asyncio:
non-blocking fds watched with add_reader, and a pidfd for the exit, so no
thread and no SIGCHLD handler is needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import signal
import struct
import termios


class _FdReader:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=64)
        self._loop = asyncio.get_running_loop()
        self._eof = False
        os.set_blocking(fd, False)
        self._loop.add_reader(fd, self._ready)

    def _ready(self) -> None:
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._loop.remove_reader(self.fd)
            self._eof = True
        self._queue.put_nowait(data)
        if self._queue.full():
            # Backpressure: stop reading until the consumer catches up, so
            # a chatty command never grows the daemon's memory.
            self._loop.remove_reader(self.fd)

    async def read(self) -> bytes:
        data = await self._queue.get()
        if not self._eof and self._queue.qsize() < 32:
            with contextlib.suppress(ValueError, OSError):
                self._loop.add_reader(self.fd, self._ready)
        if not data:
            # Keep answering EOF to later callers.
            self._queue.put_nowait(b"")
        return data

    def close(self) -> None:
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(self.fd)
        with contextlib.suppress(OSError):
            os.close(self.fd)


class ExecProcess:
    """See the interface in supervisor.session's sibling docs: stdin, stdout, stderr, wait."""

    def __init__(self, pid: int, stdin: int, stdout: int, stderr: int | None, tty: bool) -> None:
        self.pid = pid
        self.tty = tty
        self._stdin: int | None = stdin
        os.set_blocking(stdin, False) if not tty else None
        self._out = _FdReader(stdout)
        self._err = _FdReader(stderr) if stderr is not None else None
        self._loop = asyncio.get_running_loop()
        self._exit: asyncio.Future[int] = self._loop.create_future()
        #: the signal that ended the command, if one did (set on exit)
        self.exit_signal: int | None = None
        self._pidfd = os.pidfd_open(pid)
        self._loop.add_reader(self._pidfd, self._reap)

    def _reap(self) -> None:
        try:
            _, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            status = 255 << 8
        code = os.waitstatus_to_exitcode(status)
        if code < 0:
            # The waiter dies the way the command did (sandbox.init.mirror):
            # SSH clients get exit-signal, everyone else 128+N.
            self.exit_signal = -code
            code = 128 - code
        self._loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        if not self._exit.done():
            self._exit.set_result(code)

    async def write_stdin(self, data: bytes) -> None:
        fd = self._stdin
        view = memoryview(data)
        while fd is not None and view:
            try:
                n = os.write(fd, view)
                view = view[n:]
            except BlockingIOError:
                await asyncio.sleep(0.01)
            except OSError:
                return

    def close_stdin(self) -> None:
        if self.tty:
            # A PTY has no half-close: send the terminal's EOF character.
            if self._stdin is not None:
                with contextlib.suppress(OSError):
                    os.write(self._stdin, b"\x04")
            return
        if self._stdin is not None:
            with contextlib.suppress(OSError):
                os.close(self._stdin)
            self._stdin = None

    async def read_stdout(self) -> bytes:
        return await self._out.read()

    async def read_stderr(self) -> bytes:
        if self._err is None:
            return b""
        return await self._err.read()

    def resize(self, cols: int, rows: int) -> None:
        if self.tty:
            cols, rows = max(1, min(cols, 1000)), max(1, min(rows, 500))
            with contextlib.suppress(OSError):
                fcntl.ioctl(self._out.fd, termios.TIOCSWINSZ,
                            struct.pack("HHHH", rows, cols, 0, 0))

    def signal(self, sig: int) -> None:
        # The waiter relays signals to the command inside.
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)

    async def wait(self) -> int:
        return await asyncio.shield(self._exit)

    def close(self) -> None:
        if not self._exit.done():
            self.signal(signal.SIGKILL)
        self._out.close()
        if self._err is not None:
            self._err.close()
        if self._stdin is not None and not self.tty:
            with contextlib.suppress(OSError):
                os.close(self._stdin)
        self._stdin = None
