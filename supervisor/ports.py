"""Host ports for agents' services: host-wide claims and the forwarding proxy.

Leases live in the daemon's store (so they survive restarts and stay stable
while an agent is stopped). Two daemons sharing a host must never hand out the
same port, so every lease is also claimed in a host-wide directory
(/run/corral-ports, independent of any daemon's run_dir): one file per port,
created with O_EXCL, naming the daemon scope, agent and service. A port that
anything else on the host is already listening on is skipped (bind test).

Publishing is a small asyncio TCP proxy on the host's addresses (0.0.0.0 and
the loopback alike) to the agent's address: unlike a DNAT rule it works for
clients on the host's own loopback without route_localnet, and it needs no
help from the agent, which cannot bind host ports from its own netns.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

CLAIMS_DIR = os.environ.get("CORRAL_PORT_CLAIMS", "/run/corral-ports")


def bind_free(port: int) -> bool:
    """True if nothing on the host holds `port` (TCP, any address)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))  # noqa: S104 - probing every address is the point
        except OSError:
            return False
    return True


def claimed_by(port: int) -> str | None:
    try:
        return Path(CLAIMS_DIR, str(port)).read_text().strip()
    except OSError:
        return None


def port_free(port: int) -> bool:
    """Acceptable for a new lease: unclaimed host-wide and not in use."""
    return claimed_by(port) is None and bind_free(port)


def claimer(owner: str) -> Callable[[int], bool]:
    """An `acceptable` test for Store.lease that also claims the port host-wide.

    Claiming inside the lease transaction (O_EXCL) closes the race between two
    daemons that both see a port free: only one of them creates the claim file.
    """
    def accept(port: int) -> bool:
        if claimed_by(port) is not None or not bind_free(port):
            return False
        return claim(port, owner)

    return accept


def claim(port: int, owner: str) -> bool:
    """Claim `port` host-wide for `owner` ("scope agent service"); idempotent."""
    Path(CLAIMS_DIR).mkdir(parents=True, exist_ok=True, mode=0o755)
    if Path(CLAIMS_DIR).is_symlink() or Path(CLAIMS_DIR).stat().st_uid != os.geteuid():
        log.warning("port claims dir %s is not owned by us: not claiming", CLAIMS_DIR)
        return False
    path = Path(CLAIMS_DIR, str(port))
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return claimed_by(port) == owner
    with os.fdopen(fd, "w") as f:
        f.write(owner + "\n")
    return True


def unclaim(port: int, owner: str) -> None:
    if claimed_by(port) == owner:
        with contextlib.suppress(FileNotFoundError):
            Path(CLAIMS_DIR, str(port)).unlink()


class Publisher:
    """host_port → (agent_ip, port) TCP forwarding for one service."""

    def __init__(self, host_port: int, target_ip: str, target_port: int, label: str) -> None:
        self.host_port = host_port
        self.target = (target_ip, target_port)
        self.label = label
        self.server: asyncio.base_events.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        try:
            self.server = await asyncio.start_server(
                self._handle, host="0.0.0.0", port=self.host_port,  # noqa: S104
                reuse_address=True)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                log.warning("[%s] host port %d is in use", self.label, self.host_port)
            raise

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._conns.add(task)
        try:
            try:
                ur, uw = await asyncio.wait_for(asyncio.open_connection(*self.target), 5)
            except (OSError, TimeoutError):
                writer.close()
                return
            for w in (writer, uw):
                sock = w.get_extra_info("socket")
                if sock is not None:
                    # a proxy must not add Nagle delays to small request/response traffic
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                await asyncio.gather(_pipe(reader, uw), _pipe(ur, writer))
            finally:
                uw.close()
                writer.close()
        finally:
            if task is not None:
                self._conns.discard(task)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await self.server.wait_closed()
        for t in list(self._conns):
            t.cancel()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        with contextlib.suppress(Exception):
            if writer.can_write_eof():
                writer.write_eof()
            else:
                writer.close()
