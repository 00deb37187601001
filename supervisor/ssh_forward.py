"""Local forwarding (`ssh -L`) into an agent's network namespace.

A direct-tcpip channel to localhost/127.0.0.1:PORT becomes a connection the
manager opens *inside* the agent's netns (`Manager.open_tcp`); any other
destination is refused, so the SSH server is never a proxy onto the host's own
network. Data flows both ways with backpressure on each side: when the agent
side's write buffer passes a high-water mark the SSH channel stops reading (its
window closes), and when the SSH channel is paused the agent side is not read,
so a bridge holds at most a few buffers, whatever the peers do.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import asyncssh

from supervisor.ssh_access import Access, SshContext

log = logging.getLogger(__name__)

LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1", "ip6-localhost"})
HIGH_WATER = 256 * 1024
CHUNK = 64 * 1024


def forward_allowed(dest_host: str, dest_port: int) -> bool:
    """Only the agent's own loopback, on a real port."""
    return dest_host.lower() in LOCAL_HOSTS and 1 <= dest_port <= 65535


class TcpBridge(asyncssh.SSHTCPSession[bytes]):
    """One forwarded connection: SSH channel ⇄ a stream inside the agent."""

    def __init__(self, ctx: SshContext, access: Access, port: int,
                 reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._ctx = ctx
        self._access = access
        self._port = port
        self._reader = reader
        self._writer = writer
        self._chan: asyncssh.SSHTCPChannel[bytes] | None = None
        self._can_send = asyncio.Event()
        self._can_send.set()
        self._pump: asyncio.Task[None] | None = None
        self._draining = False
        #: set by the connection to release its channel slot
        self.on_closed: Callable[[], None] = lambda: None

    # asyncssh session callbacks

    def connection_made(self, chan: asyncssh.SSHTCPChannel[bytes]) -> None:
        self._chan = chan
        self._access.writer_channels.add(self)
        self._pump = self._ctx.tasks.spawn(
            self._agent_to_client(), f"ssh-fwd-{self._access.agent}-{self._port}")

    def data_received(self, data: bytes, datatype: int | None) -> None:
        if not self._access.can_write:
            self.close()
            return
        self._writer.write(data)
        transport = self._writer.transport
        if transport.get_write_buffer_size() > HIGH_WATER and not self._draining:
            # Close the SSH window until the agent side has taken the data.
            if self._chan is not None:
                self._chan.pause_reading()
            self._draining = True
            self._ctx.tasks.spawn(self._drain(), f"ssh-fwd-drain-{self._port}")

    async def _drain(self) -> None:
        try:
            await self._writer.drain()
        except (ConnectionError, OSError):
            self.close()
            return
        finally:
            self._draining = False
        if self._chan is not None:
            self._chan.resume_reading()

    def eof_received(self) -> bool:
        try:
            if self._writer.can_write_eof():
                self._writer.write_eof()
        except (OSError, RuntimeError):
            pass
        return True  # keep the channel half-open: the agent side may still answer

    def pause_writing(self) -> None:
        self._can_send.clear()

    def resume_writing(self) -> None:
        self._can_send.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self._access.writer_channels.discard(self)
        self.on_closed()
        self.on_closed = lambda: None
        if self._pump is not None:
            self._pump.cancel()
        self._writer.close()

    # ours

    async def _agent_to_client(self) -> None:
        try:
            while True:
                await self._can_send.wait()
                data = await self._reader.read(CHUNK)
                if not data:
                    break
                if self._chan is None:
                    break
                self._chan.write(data)
            if self._chan is not None:
                self._chan.write_eof()
        except (ConnectionError, OSError, asyncssh.Error, BrokenPipeError):
            self.close()

    def close(self) -> None:
        """Tear down both sides (also used on downgrade/revoke)."""
        self._access.writer_channels.discard(self)
        if self._chan is not None:
            self._chan.close()
        self._writer.close()


async def open_forward(ctx: SshContext, access: Access, dest_host: str,
                       dest_port: int) -> TcpBridge:
    """Open the agent-side connection first, so failure refuses the channel cleanly."""
    if not access.can_write:
        raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
                                        "forwarding needs the collaborator or owner role")
    try:
        reader, writer = await ctx.manager.open_tcp(access.agent, dest_port)
    except Exception as exc:
        log.info("[agent=%s user=%s] forward to port %d failed: %s",
                 access.agent, access.user, dest_port, exc)
        raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED,
                                        f"cannot connect to port {dest_port} in the agent") \
            from None
    log.debug("[agent=%s user=%s] forwarding to port %d", access.agent, access.user, dest_port)
    return TcpBridge(ctx, access, dest_port, reader, writer)
