"""The local end of `corral attach` and `corral exec`: this terminal <-> a WebSocket.

attach puts the local terminal in raw mode (every key, Ctrl-C included, goes
to the agent), forwards window-size changes (SIGWINCH) and detaches on
`Ctrl-]` (0x1d, telnet's escape key), leaving the agent running. exec relays
stdin/stdout/stderr over the API's stream-prefixed frames and returns the
command's exit code; with --tty it uses the same raw mode and resize.

The terminal is restored on every exit path: RawMode is a context manager and
the relay loops never leave it through anything but its `__exit__`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import termios
import threading
import tty
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any, BinaryIO

import aiohttp

from sandbox.errors import CorralError
from supervisor.client import ws_error

log = logging.getLogger(__name__)

#: `Ctrl-]`: detaches a local attach (the agent keeps running).
DETACH_KEY = b"\x1d"

#: Stream prefixes of exec frames (see supervisor.api).
STDIN, STDOUT, STDERR = 0, 1, 2

_CHUNK = 65536


class RawMode:
    """Raw mode on a terminal for the duration of a `with`; a no-op on non-ttys."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._saved: list[Any] | None = None

    def __enter__(self) -> RawMode:
        if os.isatty(self.fd):
            self._saved = termios.tcgetattr(self.fd)
            tty.setraw(self.fd, termios.TCSANOW)
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._saved is not None:
            # TCSADRAIN: let what we already wrote reach the screen in raw mode first.
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)
            self._saved = None


def terminal_size(*fds: int) -> tuple[int, int] | None:
    """(cols, rows) of the first of `fds` that is a terminal."""
    for fd in fds:
        with contextlib.suppress(OSError):
            size = os.get_terminal_size(fd)
            # A fresh PTY reports 0x0 until someone sets a size: that is "unknown".
            if size.columns and size.lines:
                return size.columns, size.lines
    return None


class InputReader:
    """Local input as an async stream of chunks; b"" at end of input.

    Terminals and pipes are watched with the event loop (add_reader). Regular
    files and file objects without a descriptor (click's test runner) cannot
    be polled, so a daemon thread reads those; a small queue bounds how far it
    runs ahead of the WebSocket.
    """

    def __init__(self, source: int | BinaryIO) -> None:
        self._source = source
        self._queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=16)
        self._loop = asyncio.get_running_loop()
        self._fd: int | None = None
        self._eof = False
        self._paused = False

    def __enter__(self) -> InputReader:
        if isinstance(self._source, int):
            try:
                self._loop.add_reader(self._source, self._on_readable)
                self._fd = self._source
                return self
            except (PermissionError, ValueError, OSError):
                pass  # a regular file: epoll refuses it, fall back to a thread
        threading.Thread(target=self._pump, name="corral-stdin", daemon=True).start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop_watching()

    def _stop_watching(self) -> None:
        if self._fd is not None:
            self._loop.remove_reader(self._fd)
            self._fd = None

    def _on_readable(self) -> None:
        if self._fd is None:
            return
        try:
            data = os.read(self._fd, _CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""  # EIO: the terminal went away
        self._queue.put_nowait(data)
        if not data:
            self._stop_watching()
        elif self._queue.full():
            # The reader is level-triggered: stop watching until the consumer
            # catches up, or the loop would spin on a readable descriptor.
            self._loop.remove_reader(self._fd)
            self._paused = True

    def _read_blocking(self) -> bytes:
        source = self._source
        if isinstance(source, int):
            return os.read(source, _CHUNK)
        read1 = getattr(source, "read1", None)
        return bytes(read1(_CHUNK) if read1 is not None else source.read(_CHUNK))

    def _pump(self) -> None:
        while True:
            try:
                data = self._read_blocking()
            except (OSError, ValueError):
                data = b""
            try:
                asyncio.run_coroutine_threadsafe(self._queue.put(data), self._loop).result()
            except (RuntimeError, asyncio.CancelledError, Exception):
                return  # the loop is gone: nobody wants more input
            if not data:
                return

    async def read(self) -> bytes:
        if self._eof:
            return b""
        data = await self._queue.get()
        if self._paused and self._fd is not None:
            self._paused = False
            self._loop.add_reader(self._fd, self._on_readable)
        if not data:
            self._eof = True
        return data


@contextlib.contextmanager
def on_resize(callback: Callable[[int, int], None], *fds: int) -> Iterator[None]:
    """Call `callback(cols, rows)` on SIGWINCH while inside the `with`."""
    loop = asyncio.get_running_loop()

    def handler() -> None:
        size = terminal_size(*fds)
        if size is not None:
            callback(*size)

    try:
        loop.add_signal_handler(signal.SIGWINCH, handler)
    except (ValueError, RuntimeError):
        # Not the main thread: no signals here, the size just stays fixed.
        yield
        return
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGWINCH)


def fd_writer(fd: int) -> Callable[[bytes], None]:
    """A blocking writer for a descriptor (the local terminal)."""

    def write(data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]

    return write


def stream_writer(stream: BinaryIO) -> Callable[[bytes], None]:
    def write(data: bytes) -> None:
        stream.write(data)
        stream.flush()

    return write


class _Sender:
    """Fire-and-forget sends from sync callbacks (resize, signals), with a reference kept."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self._tasks: set[asyncio.Task[None]] = set()

    def text(self, obj: dict[str, Any]) -> None:
        task = asyncio.get_running_loop().create_task(self._send(json.dumps(obj)),
                                                      name="corral-ws-control")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, text: str) -> None:
        with contextlib.suppress(Exception):
            await self.ws.send_str(text)


async def _first_frame(ws: aiohttp.ClientWebSocketResponse) -> aiohttp.WSMessage:
    msg = await ws.receive()
    if msg.type == aiohttp.WSMsgType.TEXT:
        error = ws_error(msg.data)
        if error is not None:
            raise error
    if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
        raise CorralError("the daemon closed the connection", hint="see the daemon's log")
    return msg


async def _cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task


# -- attach ---------------------------------------------------------------------------


async def attach_relay(
    ws: aiohttp.ClientWebSocketResponse,
    keys: InputReader,
    write: Callable[[bytes], None],
    *,
    read_only: bool = False,
) -> str:
    """Relay an attach WebSocket after its snapshot: "detached" (Ctrl-]) or "ended"."""

    async def from_server() -> str:
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.BINARY:
                write(msg.data)
            elif msg.type == aiohttp.WSMsgType.TEXT:
                error = ws_error(msg.data)
                if error is not None:
                    raise error
            elif msg.type == aiohttp.WSMsgType.ERROR:
                break
        return "ended"

    async def from_user() -> str:
        while data := await keys.read():
            index = data.find(DETACH_KEY)
            typed = data if index < 0 else data[:index]
            if typed and not read_only:
                await ws.send_bytes(typed)
            if index >= 0:
                return "detached"
        # Local input ended (stdin was not a terminal): keep showing output.
        await asyncio.Event().wait()
        return "ended"

    server = asyncio.create_task(from_server(), name="attach-output")
    user = asyncio.create_task(from_user(), name="attach-input")
    try:
        done, _ = await asyncio.wait({server, user}, return_when=asyncio.FIRST_COMPLETED)
        return done.pop().result()
    finally:
        await _cancel(server)
        await _cancel(user)
        await ws.close()


async def attach_terminal(
    ws: aiohttp.ClientWebSocketResponse,
    *,
    read_only: bool = False,
    stdin_fd: int = 0,
    stdout_fd: int = 1,
) -> str:
    """The whole local attach on an open attach WebSocket; the terminal is always restored."""
    try:
        snapshot = await _first_frame(ws)
    except BaseException:
        await ws.close()
        raise
    write = fd_writer(stdout_fd)
    sender = _Sender(ws)

    def resized(cols: int, rows: int) -> None:
        if not read_only:
            sender.text({"resize": [cols, rows]})

    with RawMode(stdin_fd), InputReader(stdin_fd) as keys, on_resize(resized, stdout_fd, stdin_fd):
        if snapshot.type == aiohttp.WSMsgType.BINARY:
            write(snapshot.data)
        return await attach_relay(ws, keys, write, read_only=read_only)


# -- exec -----------------------------------------------------------------------------


async def exec_relay(
    ws: aiohttp.ClientWebSocketResponse,
    request: dict[str, Any],
    stdin: InputReader,
    stdout: Callable[[bytes], None],
    stderr: Callable[[bytes], None],
) -> int:
    """Send the exec request, relay stdio both ways, return the command's exit code."""
    await ws.send_str(json.dumps(request))

    async def from_user() -> None:
        with contextlib.suppress(ConnectionError, aiohttp.ClientError, RuntimeError):
            while data := await stdin.read():
                await ws.send_bytes(bytes([STDIN]) + data)
            await ws.send_str(json.dumps({"eof": True}))

    user = asyncio.create_task(from_user(), name="exec-stdin")
    code: int | None = None
    try:
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.BINARY and msg.data:
                (stdout if msg.data[0] == STDOUT else stderr)(msg.data[1:])
            elif msg.type == aiohttp.WSMsgType.TEXT:
                error = ws_error(msg.data)
                if error is not None:
                    raise error
                message = json.loads(msg.data)
                if isinstance(message, dict) and isinstance(message.get("exit"), int):
                    code = message["exit"]
            elif msg.type == aiohttp.WSMsgType.ERROR:
                break
    finally:
        await _cancel(user)
        await ws.close()
    if code is None:
        raise CorralError(
            "the connection to the daemon ended before the command did",
            hint="see `corral events` and the daemon's log",
        )
    return code


async def exec_terminal(
    ws: aiohttp.ClientWebSocketResponse,
    request: dict[str, Any],
    *,
    stdin: int | BinaryIO,
    stdout: Callable[[bytes], None],
    stderr: Callable[[bytes], None],
    tty_fd: int | None = None,
) -> int:
    """exec with local plumbing: raw mode and resize with a tty, signal forwarding without."""
    sender = _Sender(ws)
    loop = asyncio.get_running_loop()
    forwarded: list[signal.Signals] = []
    if tty_fd is None:
        # Without a tty, Ctrl-C and friends reach this process: pass them on.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            with contextlib.suppress(ValueError, RuntimeError):
                loop.add_signal_handler(sig, sender.text, {"signal": int(sig)})
                forwarded.append(sig)
    try:
        with contextlib.ExitStack() as stack:
            if tty_fd is not None:
                stack.enter_context(RawMode(tty_fd))
                stack.enter_context(
                    on_resize(lambda c, r: sender.text({"resize": [c, r]}), tty_fd)
                )
            keys = stack.enter_context(InputReader(stdin))
            return await exec_relay(ws, request, keys, stdout, stderr)
    finally:
        for sig in forwarded:
            loop.remove_signal_handler(sig)
