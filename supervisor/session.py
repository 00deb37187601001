"""The shared session of one agent: the daemon's side of the keeper's PTY.

One `SessionHub` per running agent holds one connection to the agent's keeper,
keeps the screen model, and fans the session's output out to every attached
client (local `corral attach`, SSH). Fan-out follows DESIGN.md's measurement:
each client has a bounded queue; a client whose queue overflows is dropped
instead of slowing the agent or the other clients.

Window size policy: the most recent writer's size wins. A client's size is
applied when it resizes or types; viewers never change it. Sizes are clamped to
1..1000 columns and 1..500 rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from typing import Any

from supervisor import keeper_proto as kp
from supervisor.screen import ScreenModel

log = logging.getLogger(__name__)

#: Pending output per client before it is considered stalled and dropped.
CLIENT_QUEUE_BYTES = 2 * 1024 * 1024
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
        self._chunks: list[bytes] = []
        self._queued = 0
        self._event = asyncio.Event()
        self.closed = False
        self.dropped_reason = ""

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

    async def read(self) -> bytes:
        while not self._chunks:
            if self.closed:
                return b""
            self._event.clear()
            await self._event.wait()
        data = b"".join(self._chunks)
        self._chunks.clear()
        self._queued = 0
        return data

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
        self.ended = False
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
                data = await reader.read(65536)
                if not data:
                    break
                for kind, payload in frames.feed(data):
                    if kind == kp.BACKLOG:
                        self.screen.feed(payload)
                    elif kind == kp.OUTPUT:
                        self.screen.feed(payload)
                        for c in list(self.clients):
                            c._push(payload)
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
                        status = json.loads(payload).get("status")
        except (OSError, ValueError) as e:
            log.warning("[agent=%s] keeper connection broke: %s", self.agent, e)
        finally:
            self.ended = True
            self.exit_status = status
            for c in list(self.clients):
                self._detach(c, "session ended")
            for fut in self._state_waiters:
                if not fut.done():
                    fut.set_exception(ConnectionError("keeper went away"))
            self._ready.set()
            if self.on_exit:
                self.on_exit(status)

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
