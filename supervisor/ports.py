"""Host ports for agents' services: host-wide claims and the forwarding proxy.

Leases live in the daemon's store (so they survive restarts and stay stable
while an agent is stopped). Two daemons sharing a host must never hand out the
same port, so every lease is also claimed in a host-wide directory
(/run/corral-ports, independent of any daemon's run_dir): one file per port,
created with O_EXCL, naming the daemon scope, agent and service. A port that
anything else on the host is already listening on is skipped (bind test).

Publishing is a TCP proxy on the host's addresses (0.0.0.0 and the loopback
alike) to the agent's address: unlike a DNAT rule it works for clients on the
host's own loopback without route_localnet, and it needs no help from the
agent, which cannot bind host ports from its own netns. The event loop only
accepts (a reader callback on the listening socket); each connection is then
carried by two threads that move bytes with splice(2) through a pipe, so the
payload never enters Python: an asyncio stream proxy reached 28 % of a direct
connection's throughput here, the splice pump is close to direct (see
docs/bench-services.md). Dev servers see a handful of connections, so two
threads per connection are cheap; MAX_CONNS bounds them.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import socket
import threading
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


MAX_CONNS = 256  # per published port; more are refused (closed at once)
SPLICE_CHUNK = 1 << 20


class Publisher:
    """host_port → (agent_ip, port) TCP forwarding for one service."""

    def __init__(self, host_port: int, target_ip: str, target_port: int, label: str) -> None:
        self.host_port = host_port
        self.target = (target_ip, target_port)
        self.label = label
        self._lsock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()  # both ends of every live connection
        self._closed = False

    async def start(self) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("0.0.0.0", self.host_port))  # noqa: S104 - published on every address
            s.listen(128)
            s.setblocking(False)
        except OSError as e:
            s.close()
            if e.errno == errno.EADDRINUSE:
                log.warning("[%s] host port %d is in use", self.label, self.host_port)
            raise
        self._lsock = s
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(s.fileno(), self._accept)

    def _accept(self) -> None:
        lsock = self._lsock
        if lsock is None:
            return
        while True:
            try:
                conn, _ = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.warning("[%s] accept: %s", self.label, e)
                return
            with self._lock:
                full = len(self._conns) >= 2 * MAX_CONNS
            if full or self._closed:
                conn.close()
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True,
                             name=f"pub-{self.label}").start()

    def _serve(self, client: socket.socket) -> None:
        """One connection, in its own thread: connect to the agent, then pump both ways."""
        upstream: socket.socket | None = None
        try:
            client.setblocking(True)
            upstream = socket.create_connection(self.target, timeout=5)
            upstream.settimeout(None)
            for sk in (client, upstream):
                # a proxy must not add Nagle delays to small request/response traffic
                sk.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                if self._closed:
                    return
                self._conns.update((client, upstream))
            back = threading.Thread(target=_pump, args=(upstream, client), daemon=True,
                                    name=f"pub-{self.label}-back")
            back.start()
            _pump(client, upstream)
            back.join()
        except OSError:
            pass  # the agent's service is not listening (yet): the client sees a close
        finally:
            with self._lock:
                self._conns.discard(client)
                if upstream is not None:
                    self._conns.discard(upstream)
            client.close()
            if upstream is not None:
                upstream.close()

    async def close(self) -> None:
        self._closed = True
        if self._lsock is not None:
            if self._loop is not None:
                self._loop.remove_reader(self._lsock.fileno())
            self._lsock.close()
            self._lsock = None
        with self._lock:
            conns = list(self._conns)
        for sk in conns:
            # wakes the pump threads blocked in splice(); they close their sockets
            with contextlib.suppress(OSError):
                sk.shutdown(socket.SHUT_RDWR)


def _pump(src: socket.socket, dst: socket.socket) -> None:
    """Move bytes src → dst until EOF with splice(2) through a pipe (no copy to Python)."""
    r, w = os.pipe2(os.O_CLOEXEC)
    with contextlib.suppress(OSError):
        # a bigger pipe moves more per splice (the kernel caps it at pipe-max-size)
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, SPLICE_CHUNK)
    clean = False
    try:
        while True:
            n = os.splice(src.fileno(), w, SPLICE_CHUNK)
            if n == 0:
                clean = True
                break
            while n:
                n -= os.splice(r, dst.fileno(), n)
    except OSError:
        pass
    finally:
        os.close(r)
        os.close(w)
        with contextlib.suppress(OSError):
            if clean:
                dst.shutdown(socket.SHUT_WR)  # pass the half-close on
            else:
                # a reset on one side ends both directions
                src.shutdown(socket.SHUT_RDWR)
                dst.shutdown(socket.SHUT_RDWR)
