"""The shared session of one agent: the daemon's side of the keeper's PTY.

One `SessionHub` per running agent holds one connection to the agent's keeper,
keeps the screen model, and fans the session's output out to every attached
client (local `corral attach`, SSH). Fan-out follows DESIGN.md's measurement:
each client has a bounded queue; a client whose queue overflows is dropped
instead of slowing the agent or the other clients.

Pacing: a flood moves at the speed of its readers, as it would on a terminal.
While a client has more than PACE_HIGH bytes queued, the hub stops reading
the keeper (which in turn stops reading the PTY, so the agent waits in
write()). A client paces only while it keeps up: one that takes nothing for
PACE_STALL seconds (it stopped reading), or has not come back under PACE_LOW
within PACE_GRACE seconds (it reads slower than (PACE_HIGH - PACE_LOW) /
PACE_GRACE, 768 KB/s), stops pacing, its queue fills, and it is dropped at
CLIENT_QUEUE_BYTES. So a client that stops reading delays the agent and the
other clients by at most PACE_STALL (a quarter second, once) and is then
dropped; a slow reader by at most PACE_GRACE per episode; one that reads at
full speed is never dropped.

Window size policy: the most recent writer's size wins. A client's size is
applied when it resizes or types; viewers never change it. Sizes are clamped to
1..1000 columns and 1..500 rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

from supervisor import keeper_proto as kp
from supervisor.screen import ScreenModel

log = logging.getLogger(__name__)

#: Pending output per client before it is considered stalled and dropped.
CLIENT_QUEUE_BYTES = 2 * 1024 * 1024
#: Pacing (see the module doc): queue levels and how long one client may pace.
PACE_HIGH = 1024 * 1024
PACE_LOW = 256 * 1024
PACE_GRACE = 1.0
#: A client behind that takes nothing at all for this long has stopped
#: reading: it stops pacing at once instead of holding everyone for PACE_GRACE.
PACE_STALL = 0.25
#: One read() hands back at most this much, so a reader's own buffers stay bounded.
READ_MAX = 256 * 1024
#: Bytes asked of the keeper socket per read (its frames carry up to 256 KiB).
SOCKET_READ = 1024 * 1024
#: The screen model is parsed once output has been quiet this long, PARSE_SLICE
#: bytes (~25 ms of pyte) per turn of the loop, so a late joiner's snapshot is
#: cheap and a flood costs no parsing at all while it lasts.
PARSE_QUIET = 0.2
PARSE_SLICE = 4096
WRITER_ROLES = ("collaborator", "owner")


def clamp_size(cols: int, rows: int) -> tuple[int, int]:
    return max(1, min(int(cols), 1000)), max(1, min(int(rows), 500))


class SessionClient:
    """One attached client; see /tmp interfaces: snapshot, read, write, resize, close."""

    def __init__(self, hub: SessionHub, user: str, role: str, size: tuple[int, int] | None):
        self.hub = hub
        self.user = user
        self.role = role
        self.size = clamp_size(*size) if size else None
        self.snapshot = b""
        self._chunks: deque[bytes] = deque()
        self._queued = 0
        self._event = asyncio.Event()
        self.closed = False
        self.dropped_reason = ""
        #: pacing state: since when this client is behind (None: it is not),
        #: and whether it used up its grace (then it no longer paces the hub)
        self.behind_since: float | None = None
        self.unpaced = False
        #: when this client last took output (loop time; 0: never)
        self.last_take = 0.0

    @property
    def can_write(self) -> bool:
        return self.role in WRITER_ROLES

    def _push(self, data: bytes) -> None:
        if self.closed:
            return
        if self._queued + len(data) > CLIENT_QUEUE_BYTES:
            self.hub._detach(self, "slow")
            return
        self._chunks.append(data)
        self._queued += len(data)
        self._event.set()

    def paces(self) -> bool:
        """Must the hub wait for this client before reading more output?"""
        return self._queued > PACE_HIGH and not self.unpaced

    async def read(self) -> bytes:
        """Queued output, at most READ_MAX bytes; b"" once the client is closed."""
        if not await self._wait():
            return b""
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
        out: list[bytes] = []
        size = 0
        while self._chunks and size < READ_MAX:
            out.append(self._chunks.popleft())
            size += len(out[-1])
        self._taken(size)
        return out

    async def _wait(self) -> bool:
        while not self._chunks:
            if self.closed:
                return False
            self._event.clear()
            await self._event.wait()
        return True

    def _taken(self, size: int) -> None:
        self.last_take = asyncio.get_running_loop().time()
        self._queued -= size
        if self._queued <= PACE_LOW:
            self.behind_since = None
            self.unpaced = False
            self.hub._client_drained()

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
        self._drained = asyncio.Event()
        #: seconds the hub held output back for clients that were behind (pacing)
        self.paced_for = 0.0
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
        try:
            while True:
                await self._pace()
                data = await reader.read(SOCKET_READ)
                if not data:
                    break
                for kind, payload in frames.feed(data):
                    if kind == kp.BACKLOG:
                        self.screen.feed(payload)
                    elif kind == kp.OUTPUT:
                        self.screen.feed(payload)
                        for c in list(self.clients):
                            c._push(payload)
                        self._output_seen()
                    elif kind == kp.STATE:
                        st = json.loads(payload)
                        if not self._ready.is_set():
                            cols, rows = st.get("cols", 80), st.get("rows", 24)
                            self.size = (cols, rows)
                            self.screen.resize(cols, rows)
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
        except (OSError, ValueError) as e:
            log.warning("[agent=%s] keeper connection broke: %s", self.agent, e)
        finally:
            self.ended = True
            self.exit_status = status
            if self._parse_timer is not None:
                self._parse_timer.cancel()
                self._parse_timer = None
            for c in list(self.clients):
                self._detach(c, "session ended")
            for fut in self._state_waiters:
                if not fut.done():
                    fut.set_exception(ConnectionError("keeper went away"))
            self._ready.set()
            if self.on_exit:
                self.on_exit(status)

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

    async def _pace(self) -> None:
        """Wait while a client that keeps up is too far behind (module doc)."""
        loop = asyncio.get_running_loop()
        while True:
            behind = [c for c in self.clients if c.paces()]
            if not behind:
                return
            now = loop.time()
            deadlines = []
            for c in behind:
                if c.behind_since is None:
                    c.behind_since = now
                # not keeping up, or not reading at all: no longer holds the session back
                deadline = min(c.behind_since + PACE_GRACE,
                               max(c.last_take, c.behind_since) + PACE_STALL)
                if now >= deadline:
                    c.unpaced = True
                else:
                    deadlines.append(deadline)
            if not deadlines:
                continue
            self._drained.clear()
            t0 = loop.time()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), min(deadlines) - now)
            self.paced_for += loop.time() - t0

    def _client_drained(self) -> None:
        self._drained.set()

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
        client.snapshot = self.screen.render()
        self.clients.append(client)
        if self.on_client:
            self.on_client("attach", client)
        return client

    def _detach(self, client: SessionClient, reason: str) -> None:
        if client in self.clients:
            self.clients.remove(client)
            self._drained.set()   # a pacing client that leaves must not hold the hub
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
