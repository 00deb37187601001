"""The shared session of one agent: the daemon's side of the keeper's PTY.

One `SessionHub` per running agent holds one connection to the agent's keeper,
keeps the screen model, and fans the session's output out to every attached
client (local `corral attach`, SSH).

Fan-out is tmux's skip-and-repaint: the hub reads the keeper as fast as the
agent prints and feeds every byte to the screen model, and a client never
holds the agent or the other clients back. A client that keeps up gets the raw
output. One that falls behind (it still holds more than SKIP_AT bytes of what
it had been given one keeper read ago, because its reader is waiting for the
client's side to catch up) has its queue discarded and stops receiving
output; once it is waiting for more, it gets one repaint of the current screen
and raw output again from there. Repaints happen on a shared tick
(REPAINT_EVERY, longer if rendering is slow), so a flood costs one render per
tick however many clients lag, or as soon as output has been quiet for
REPAINT_QUIET. Like tmux, a client that lagged has
the current screen but not every intermediate line in its own terminal's
scrollback; the session log keeps all of it. Memory per client is bounded by
SKIP_AT plus one keeper read (SOCKET_READ, and the output is shared between
clients); a client that takes nothing at all for STALL_DROP seconds while it
lags has stopped reading and is dropped.

Window size policy: the most recent writer's size wins. A client's size is
applied when it resizes or types; viewers never change it. Sizes are clamped to
1..1000 columns and 1..500 rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from supervisor import keeper_proto as kp
from supervisor.screen import ScreenModel

log = logging.getLogger(__name__)

#: Output queued for one client beyond which it has fallen behind (skip mode).
#: At least one keeper frame (256 KiB) always fits in an empty queue.
SKIP_AT = 64 * 1024
#: How often lagging clients are repainted (tmux: 100 ms); stretched to
#: REPAINT_COST times the last render's duration when rendering is slow.
REPAINT_EVERY = 0.1
REPAINT_COST = 5
#: Once output has stopped for this long, lagging clients are repainted without
#: waiting for the tick, so the end of a flood shows at once. (At most one such
#: repaint per quiet spell, and only for a client that has caught up. 20 ms
#: made the end of a 10 MB flood reach one client ~10 ms later: BENCHMARKS.md.)
REPAINT_QUIET = 0.01
#: A lagging client that has taken nothing for this long has stopped reading.
STALL_DROP = 30.0
#: One read() hands back at most this much, so a reader's own buffers stay bounded.
READ_MAX = 256 * 1024
#: Bytes asked of the keeper socket per read (its frames carry up to 256 KiB).
SOCKET_READ = 1024 * 1024
#: The screen model is parsed once output has been quiet this long, PARSE_SLICE
#: bytes per turn of the loop (only the pyte fallback defers parsing; libvterm
#: parses as it is fed).
PARSE_QUIET = 0.2
PARSE_SLICE = 4096
WRITER_ROLES = ("collaborator", "owner")


def clamp_size(cols: int, rows: int) -> tuple[int, int]:
    return max(1, min(int(cols), 1000)), max(1, min(int(rows), 500))


class SessionClient:
    """One attached client: snapshot, read, write, resize, close."""

    def __init__(self, hub: SessionHub, user: str, role: str, size: tuple[int, int] | None):
        self.hub = hub
        self.user = user
        self.role = role
        self.size = clamp_size(*size) if size else None
        self.snapshot = b""
        self._chunks: deque[bytes] = deque()
        self._queued = 0
        #: bytes queued at the last _check_behind and not taken since
        self._stale = 0
        self._event = asyncio.Event()
        self.closed = False
        self.dropped_reason = ""
        #: skip mode: output is discarded until the next repaint (module doc)
        self.lagging = False
        #: a repaint waiting to be read (set by the hub's tick)
        self._repaint: bytes | None = None
        #: whether a reader is waiting in read() for output
        self.waiting = False
        #: how many times this client fell behind, and bytes it did not get raw
        self.skips = 0
        self.skipped_bytes = 0
        #: when this client last took output (monotonic)
        self.last_take = time.monotonic()

    @property
    def can_write(self) -> bool:
        return self.role in WRITER_ROLES

    def _push(self, data: bytes) -> None:
        if self.closed:
            return
        if self.lagging:
            self.skipped_bytes += len(data)
            if not self.waiting and time.monotonic() - self.last_take > STALL_DROP:
                self.hub._detach(self, "slow")
            return
        self._chunks.append(data)
        self._queued += len(data)
        self._event.set()

    def _check_behind(self) -> None:
        """Before the hub reads more output: has this client fallen behind?
        Behind means it still holds more than SKIP_AT of what it had been
        given by the previous check: it had a whole keeper read's time to take
        it. (So one read's several frames, up to SOCKET_READ, never count
        against a client that takes everything it is given.)"""
        stale, self._stale = self._stale, self._queued
        if stale > SKIP_AT and not self.lagging:
            # What it has not taken yet is superseded by the repaint.
            self.skipped_bytes += self._queued
            self._chunks.clear()
            self._queued = 0
            self._stale = 0
            self.lagging = True
            self.skips += 1
            self.hub._lagging(self)

    def _give_repaint(self, screen: bytes) -> None:
        self.lagging = False
        self._repaint = screen
        self._event.set()

    async def read(self) -> bytes:
        """Queued output, at most READ_MAX bytes; b"" once the client is closed."""
        if not await self._wait():
            return b""
        if self._repaint is not None:
            data, self._repaint = self._repaint, None
            self._taken(0)   # not from the queue
            return data
        if self._queued <= READ_MAX:
            data = b"".join(self._chunks)
            self._chunks.clear()
        else:
            data = self._take(READ_MAX)
        self._taken(len(data))
        return data

    async def read_chunks(self) -> list[bytes]:
        """Queued output as the hub's own chunk objects (the same ones every
        client gets, so per-chunk work like recording can be shared), about
        READ_MAX bytes; [] once the client is closed."""
        if not await self._wait():
            return []
        if self._repaint is not None:
            out = [self._repaint]
            self._repaint = None
            self._taken(0)
            return out
        out = []
        size = 0
        while self._chunks and size < READ_MAX:
            out.append(self._chunks.popleft())
            size += len(out[-1])
        self._taken(size)
        return out

    async def _wait(self) -> bool:
        while not self._chunks and self._repaint is None:
            if self.closed:
                return False
            self._event.clear()
            self.waiting = True
            if self.lagging:
                self.hub._lagging_waits()
            try:
                await self._event.wait()
            finally:
                self.waiting = False
        return True

    def _taken(self, size: int) -> None:
        self.last_take = time.monotonic()
        self._queued -= size
        self._stale = max(0, self._stale - size)   # the oldest bytes go first

    def _take(self, limit: int) -> bytes:
        parts: list[bytes] = []
        size = 0
        while self._chunks and size < limit:
            chunk = self._chunks.popleft()
            if size + len(chunk) > limit:
                cut = limit - size
                self._chunks.appendleft(chunk[cut:])
                chunk = chunk[:cut]
            parts.append(chunk)
            size += len(chunk)
        return b"".join(parts)

    def write(self, data: bytes) -> None:
        if self.closed or not self.can_write or not data:
            return
        if self.size and self.size != self.hub.size:
            self.hub.resize(*self.size)
        self.hub.send_input(data)

    def resize(self, cols: int, rows: int) -> None:
        if self.closed:
            return
        self.size = clamp_size(cols, rows)
        if self.can_write:
            self.hub.resize(*self.size)

    def close(self) -> None:
        self.hub._detach(self, "closed")

    def _end(self, reason: str) -> None:
        self.closed = True
        self.dropped_reason = reason
        self._event.set()


class SessionHub:
    """Connection to one keeper, screen model, and the attached clients."""

    def __init__(self, agent: str, socket_path: str,
                 on_exit: Callable[[int | None], None] | None = None,
                 on_client: Callable[[str, SessionClient], None] | None = None) -> None:
        self.agent = agent
        self.socket_path = socket_path
        self.on_exit = on_exit
        self.on_client = on_client
        self.screen = ScreenModel()
        self.clients: list[SessionClient] = []
        self.size = (80, 24)
        self.exit_status: int | None = None
        #: the signal that ended the session, if one did (SSH clients get exit-signal)
        self.exit_signal: int | None = None
        self.ended = False
        #: the current screen's repaint, while no output or resize changed it
        self._render: bytes | None = None
        self._repaint_timer: asyncio.TimerHandle | None = None
        self._quiet_timer: asyncio.Handle | None = None
        #: repaints rendered for lagging clients (one per tick, shared)
        self.repaints = 0
        self._last_output = 0.0
        self._parse_timer: asyncio.Handle | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._state_waiters: list[asyncio.Future[dict[str, Any]]] = []

    async def connect(self, timeout: float = 10.0) -> None:
        reader, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(self.socket_path), timeout)
        self._writer = writer
        writer.write(kp.frame(kp.HELLO) + kp.frame(kp.STATUS))
        self._task = asyncio.get_running_loop().create_task(
            self._pump(reader), name=f"session-hub-{self.agent}")
        await asyncio.wait_for(self._ready.wait(), timeout)

    async def _pump(self, reader: asyncio.StreamReader) -> None:
        frames = kp.FrameReader()
        status: int | None = None
        output: list[bytes] = []
        try:
            while True:
                for c in list(self.clients):
                    c._check_behind()
                data = await reader.read(SOCKET_READ)
                if not data:
                    break
                # One read's output is parsed as one piece (a flood's head is
                # then cut in one go: supervisor.screen_flood), before anything
                # else that reads or resizes the screen.
                for kind, payload in frames.feed(data):
                    if kind == kp.OUTPUT:
                        output.append(payload)
                        for c in list(self.clients):
                            c._push(payload)
                        continue
                    self._parse(output)
                    if kind == kp.BACKLOG:
                        self.screen.feed(payload)
                        self._render = None
                    elif kind == kp.STATE:
                        st = json.loads(payload)
                        if not self._ready.is_set():
                            cols, rows = st.get("cols", 80), st.get("rows", 24)
                            self.size = (cols, rows)
                            self.screen.resize(cols, rows)
                            self._render = None
                            self._ready.set()
                        for fut in self._state_waiters:
                            if not fut.done():
                                fut.set_result(st)
                        self._state_waiters.clear()
                    elif kind == kp.EXIT:
                        ex = json.loads(payload)
                        status = ex.get("status")
                        sig = ex.get("signal")
                        self.exit_signal = sig if isinstance(sig, int) else None
                self._parse(output)
                # Let the clients' readers take this read's output before the
                # next read (read() returns at once while the socket has more).
                await asyncio.sleep(0)
        except (OSError, ValueError) as e:
            log.warning("[agent=%s] keeper connection broke: %s", self.agent, e)
        finally:
            self._parse(output)   # what clients were sent, even if a frame broke
            self.ended = True
            self.exit_status = status
            if self._parse_timer is not None:
                self._parse_timer.cancel()
                self._parse_timer = None
            for timer in (self._repaint_timer, self._quiet_timer):
                if timer is not None:
                    timer.cancel()
            self._repaint_timer = self._quiet_timer = None
            for c in list(self.clients):
                if c.lagging:   # it still gets the screen the session ended with
                    c._give_repaint(self.render())
            for c in list(self.clients):
                self._detach(c, "session ended")
            for fut in self._state_waiters:
                if not fut.done():
                    fut.set_exception(ConnectionError("keeper went away"))
            self._ready.set()
            if self.on_exit:
                self.on_exit(status)

    def _parse(self, output: list[bytes]) -> None:
        if output:
            self.screen.feed(output[0] if len(output) == 1 else b"".join(output))
            output.clear()
            self._render = None
            self._output_seen()

    def _output_seen(self) -> None:
        loop = asyncio.get_running_loop()
        self._last_output = loop.time()
        if self._parse_timer is None:
            self._parse_timer = loop.call_later(PARSE_QUIET, self._parse_tick)

    def _parse_tick(self) -> None:
        """Parse the screen model a slice at a time while the session is quiet."""
        loop = asyncio.get_running_loop()
        self._parse_timer = None
        if self.ended:
            return
        quiet_at = self._last_output + PARSE_QUIET
        if loop.time() < quiet_at:
            self._parse_timer = loop.call_at(quiet_at, self._parse_tick)
        elif self.screen.parse_some(PARSE_SLICE):
            self._parse_timer = loop.call_soon(self._parse_tick)

    def render(self) -> bytes:
        """The current screen as a repaint, rendered at most once per change."""
        if self._render is None:
            self._render = self.screen.render()
        return self._render

    def _lagging(self, client: SessionClient) -> None:
        """A client fell behind: make sure the repaint tick runs."""
        if self._repaint_timer is None and not self.ended:
            self._repaint_timer = asyncio.get_running_loop().call_later(
                REPAINT_EVERY, self._repaint_tick)

    def _repaint_tick(self) -> None:
        """The shared tick: repaint the lagging clients that are ready; the
        others wait for a later tick, unless they stopped reading (STALL_DROP)."""
        self._repaint_timer = None
        now = time.monotonic()
        for c in list(self.clients):
            if c.lagging and not c.waiting and now - c.last_take > STALL_DROP:
                self._detach(c, "slow")
        cost, behind = self._repaint_ready()
        if behind and not self.ended:
            self._repaint_timer = asyncio.get_running_loop().call_later(
                max(REPAINT_EVERY, REPAINT_COST * cost), self._repaint_tick)

    def _repaint_ready(self) -> tuple[float, bool]:
        """Repaint every lagging client whose reader is waiting (it has caught
        up with what it was sent), with one render. The render's cost in
        seconds, and whether lagging clients that are not ready remain."""
        lagging = [c for c in self.clients if c.lagging]
        ready = [c for c in lagging if c.waiting]
        cost = 0.0
        if ready:
            t0 = time.monotonic()
            fresh = self._render is None
            screen = self.render()
            cost = time.monotonic() - t0
            if fresh:
                self.repaints += 1
            for c in ready:
                c._give_repaint(screen)
        return cost, len(ready) < len(lagging)

    def _quiet(self) -> bool:
        return asyncio.get_running_loop().time() - self._last_output >= REPAINT_QUIET

    def _lagging_waits(self) -> None:
        """A lagging client is ready; with output stopped, repaint it now."""
        if self._quiet_timer is None and not self.ended:
            self._quiet_timer = asyncio.get_running_loop().call_soon(self._quiet_check)

    def _quiet_check(self) -> None:
        self._quiet_timer = None
        if self.ended:
            return
        if self._quiet():
            self._repaint_ready()
        elif any(c.lagging for c in self.clients):
            self._quiet_timer = asyncio.get_running_loop().call_at(
                self._last_output + REPAINT_QUIET, self._quiet_check)

    def _send(self, data: bytes) -> None:
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(data)

    def send_input(self, data: bytes) -> None:
        self._send(kp.frame(kp.INPUT, data))

    def resize(self, cols: int, rows: int) -> None:
        cols, rows = clamp_size(cols, rows)
        if (cols, rows) == self.size:
            return
        self.size = (cols, rows)
        self.screen.resize(cols, rows)
        self._render = None
        self._send(kp.frame(kp.RESIZE, json.dumps({"cols": cols, "rows": rows}).encode()))

    def signal(self, sig: int) -> None:
        self._send(kp.frame(kp.SIGNAL, json.dumps({"signal": sig}).encode()))

    async def state(self, timeout: float = 5.0) -> dict[str, Any]:
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._state_waiters.append(fut)
        self._send(kp.frame(kp.STATUS))
        return await asyncio.wait_for(fut, timeout)

    def attach(self, user: str, role: str, size: tuple[int, int] | None = None) -> SessionClient:
        client = SessionClient(self, user, role, size)
        if self.ended:
            client._end("session ended")
            return client
        if client.can_write and client.size:
            self.resize(*client.size)
        client.snapshot = self.render()
        self.clients.append(client)
        if self.on_client:
            self.on_client("attach", client)
        return client

    def _detach(self, client: SessionClient, reason: str) -> None:
        if client in self.clients:
            self.clients.remove(client)
            if self.on_client:
                self.on_client("detach", client)
        if reason == "slow":
            log.info("[agent=%s] dropped slow client %s", self.agent, client.user)
        client._end(reason)

    def set_role(self, user: str, role: str | None) -> None:
        """Apply a grant change to live clients: None ends their attachment."""
        for c in list(self.clients):
            if c.user == user:
                if role is None:
                    self._detach(c, "revoked")
                else:
                    c.role = role

    def users(self) -> list[str]:
        return sorted({c.user for c in self.clients})

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
