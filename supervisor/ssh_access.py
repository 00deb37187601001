"""Who is on the SSH server, with which role, and how a role change reaches them.

One `Access` per authenticated connection: the agent (the SSH user name), the
team member whose key signed the login, and the role — mutable, because a
revoke, downgrade or hand-off must reach live connections within a second
(THREATS.md). `AccessRegistry` holds the live ones and re-checks them when the
manager fires `on_access_change`. `SshContext` is what every SSH module shares.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

log = logging.getLogger(__name__)

#: CONTRACT.md's agent name pattern; anything else is refused before it reaches the manager.
AGENT_NAME = re.compile(r"^[a-z][a-z0-9-]{0,30}$")

WRITE_ROLES = frozenset({"collaborator", "owner"})


class SessionClientLike(Protocol):
    """What the SSH server uses of supervisor.session.SessionClient."""

    snapshot: bytes

    async def read(self) -> bytes: ...
    def write(self, data: bytes) -> None: ...
    def resize(self, cols: int, rows: int) -> None: ...
    def close(self) -> None: ...


class ExecProcessLike(Protocol):
    """What the SSH server uses of supervisor.execproc.ExecProcess.

    Optionally also `exit_signal: int | None`, set once wait() returned: the
    signal that killed the command. With it the channel ends with exit-signal
    (RFC 4254 6.10) instead of exit-status 128+N; without it, with the status.
    """

    async def write_stdin(self, data: bytes) -> None: ...
    def close_stdin(self) -> None: ...
    async def read_stdout(self) -> bytes: ...
    async def read_stderr(self) -> bytes: ...
    def resize(self, cols: int, rows: int) -> None: ...
    def signal(self, sig: int) -> None: ...
    async def wait(self) -> int: ...


class ManagerLike(Protocol):
    """The slice of supervisor.agents.Manager the SSH server calls."""

    on_access_change: list[Callable[[str, str], None]]

    def user_for_key(self, fingerprint: str) -> str | None: ...
    def role(self, agent: str, user: str) -> str | None: ...
    def audit(self, kind: str, agent: str | None, **data: object) -> None: ...
    async def attach(self, name: str, user: str, role: str,
                     size: tuple[int, int] | None = None) -> Any: ...
    async def exec(self, name: str, argv: list[str], *, user: str,
                   tty: tuple[str, int, int] | None, env: dict[str, str]) -> Any: ...
    async def open_tcp(self, name: str, port: int) -> tuple[asyncio.StreamReader,
                                                            asyncio.StreamWriter]: ...
    def workspace_view(self, name: str) -> str: ...


@dataclass(frozen=True)
class SshLimits:
    """Bounds that keep one client from hurting the daemon or other clients."""

    #: channels (sessions + forwards) open at once on one connection
    max_channels: int = 10
    #: channel opens refused on one connection before it is disconnected
    max_refused_channels: int = 1000
    #: public keys one connection may try (offered or signed) before it is cut
    max_auth_tries: int = 20
    #: seconds an unauthenticated connection may take to log in
    login_grace: float = 20.0
    #: unauthenticated connections at once, server-wide; more are dropped on accept
    max_preauth: int = 64
    #: terminal size bounds; pty-req beyond them is refused, window-change is clamped
    max_cols: int = 1000
    max_rows: int = 500
    #: TERM and other environment values longer than this are refused
    max_env_value: int = 256
    #: environment variables one channel may set
    max_env_count: int = 32
    #: longest exec command accepted
    max_command: int = 64 * 1024
    #: seconds a session's output may wait for the SSH client to drain before it is dropped
    drain_timeout: float = 30.0
    #: a recording stops growing past this size (a marker notes the cut)
    max_recording_bytes: int = 256 * 1024 * 1024


class Closable(Protocol):
    def close(self) -> None: ...


@dataclass(eq=False)
class Access:
    """One authenticated connection: whose key, which agent, which role (live)."""

    agent: str
    user: str
    fingerprint: str
    addr: str
    role: str
    #: closes the whole SSH connection (set by the server once authenticated)
    disconnect: Callable[[], None] = lambda: None
    #: channels that only writers may hold (exec, forwards): closed on downgrade
    writer_channels: set[Closable] = field(default_factory=set)

    @property
    def can_write(self) -> bool:
        return self.role in WRITE_ROLES


class AccessRegistry:
    """Live connections by (agent, user); re-checks them when access changes."""

    def __init__(self, manager: ManagerLike, loop: asyncio.AbstractEventLoop) -> None:
        self._manager = manager
        self._loop = loop
        self._live: set[Access] = set()

    def add(self, access: Access) -> None:
        self._live.add(access)

    def discard(self, access: Access) -> None:
        self._live.discard(access)

    def live(self) -> list[Access]:
        return list(self._live)

    def on_access_change(self, agent: str, user: str) -> None:
        """The manager's callback; may be called from another thread."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            self.recheck(agent, user)
        else:
            self._loop.call_soon_threadsafe(self.recheck, agent, user)

    def recheck(self, agent: str, user: str) -> None:
        """Apply the manager's current answer to every live connection of (agent, user)."""
        for access in [a for a in self._live if a.agent == agent and a.user == user]:
            try:
                role = self._manager.role(agent, user)
            except Exception:
                # Fail closed: if we cannot tell, the connection goes.
                log.exception("role lookup failed for %s on %s; disconnecting", user, agent)
                role = None
            if role is None:
                log.info("[agent=%s user=%s] access revoked: closing connection", agent, user)
                self._live.discard(access)
                access.role = "none"
                for chan in list(access.writer_channels):
                    chan.close()
                access.disconnect()
                continue
            was_writer = access.can_write
            access.role = role
            if was_writer and not access.can_write:
                log.info("[agent=%s user=%s] downgraded to %s: closing exec/forward channels",
                         agent, user, role)
                for chan in list(access.writer_channels):
                    chan.close()


class TaskSet:
    """The one place SSH background tasks are created: named, referenced, cancellable."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task %s failed", task.get_name(), exc_info=task.exception())

    def cancel_all(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    async def wait(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


@dataclass
class SshContext:
    """What every SSH module shares: the manager, limits, live connections, tasks."""

    manager: ManagerLike
    limits: SshLimits
    recordings_dir: str
    registry: AccessRegistry
    tasks: TaskSet
    #: unauthenticated connections right now (the pre-auth cap counts these)
    preauth: int = 0

