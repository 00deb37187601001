"""A stand-in Manager for the API and CLI tests: plain dicts, real processes for exec.

It implements the Manager methods supervisor.api calls (see the lead's
supervisor/agents.py), so the real aiohttp server from make_app() and the real
CLI can be driven end to end over a real unix socket without namespaces.
`running_api()` serves it from a thread with its own event loop, because
click's CliRunner is synchronous.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from sandbox.errors import (
    Conflict,
    CorralError,
    HostSetupError,
    NotFound,
    PermissionDenied,
    TemplateError,
)
from sandbox.spec import check_name
from supervisor.api import serve


class FakeSession:
    """A SessionClient stand-in: snapshot, an output queue, recorded input."""

    def __init__(self, manager: FakeManager, user: str, role: str) -> None:
        self.manager = manager
        self.user = user
        self.role = role
        self.snapshot = b"\x1b[H\x1b[2JSNAPSHOT"
        self.output: asyncio.Queue[bytes] = asyncio.Queue()
        self.closed = False

    async def read(self) -> bytes:
        return await self.output.get()

    def write(self, data: bytes) -> None:
        # The fake records everything it is given, whatever the role, so the
        # tests see whether the API layer itself dropped a viewer's input.
        self.manager.typed.append((self.role, data))
        self.output.put_nowait(b"echo:" + data)

    def resize(self, cols: int, rows: int) -> None:
        self.manager.resizes.append((cols, rows))

    def close(self) -> None:
        self.closed = True
        self.manager.closed_sessions += 1


class FakeExec:
    """An ExecProcess stand-in around a real host process (pipes, or a real PTY)."""

    def __init__(self, proc: asyncio.subprocess.Process, master: int | None) -> None:
        self.proc = proc
        self.master = master
        self.resizes: list[tuple[int, int]] = []

    @classmethod
    async def spawn(cls, argv: list[str], tty: tuple[str, int, int] | None,
                    env: dict[str, str]) -> FakeExec:
        full_env = {"PATH": "/usr/bin:/bin", **env}
        if tty is None:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, env=full_env,
            )
            return cls(proc, None)
        master, slave = os.openpty()
        full_env["TERM"] = tty[0]
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=slave, stdout=slave, stderr=slave, env=full_env, start_new_session=True,
        )
        os.close(slave)
        os.set_blocking(master, False)
        return cls(proc, master)

    async def write_stdin(self, data: bytes) -> None:
        if self.master is not None:
            os.write(self.master, data)
            return
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        with contextlib.suppress(ConnectionError):
            await self.proc.stdin.drain()

    def close_stdin(self) -> None:
        if self.master is None and self.proc.stdin is not None:
            self.proc.stdin.close()

    async def _read_master(self) -> bytes:
        assert self.master is not None
        loop = asyncio.get_running_loop()
        while True:
            try:
                return os.read(self.master, 65536)
            except BlockingIOError:
                ready = loop.create_future()
                loop.add_reader(self.master, ready.set_result, None)
                try:
                    await ready
                finally:
                    loop.remove_reader(self.master)
            except OSError:
                return b""  # EIO: the slave side is closed

    async def read_stdout(self) -> bytes:
        if self.master is not None:
            return await self._read_master()
        assert self.proc.stdout is not None
        return await self.proc.stdout.read(65536)

    async def read_stderr(self) -> bytes:
        if self.master is not None:
            return b""
        assert self.proc.stderr is not None
        return await self.proc.stderr.read(65536)

    def resize(self, cols: int, rows: int) -> None:
        self.resizes.append((cols, rows))

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(sig)

    async def wait(self) -> int:
        code = await self.proc.wait()
        if self.master is not None:
            os.close(self.master)
            self.master = None
        return 128 - code if code < 0 else code


class FakeManager:
    """Manager methods over dicts; records what the API handed it."""

    def __init__(self) -> None:
        self.agents: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple[Any, ...]] = []
        self.typed: list[tuple[str, bytes]] = []
        self.resizes: list[tuple[int, int]] = []
        self.sessions: list[FakeSession] = []
        self.closed_sessions = 0
        self.execs: list[FakeExec] = []
        self.run_as: list[str | None] = []
        self.users: dict[str, list[str]] = {}
        self.grants: dict[tuple[str, str], str] = {}
        self.event_log: list[dict[str, Any]] = [
            {"id": 1, "ts": "2026-01-01T00:00:00+00:00", "kind": "agent.created",
             "agent": "web", "data": {"template": "default"}},
            {"id": 2, "ts": "2026-01-01T00:00:05+00:00", "kind": "agent.running",
             "agent": "web", "data": {}},
        ]
        self.follow_extra = [
            {"id": 3, "ts": "2026-01-01T00:01:00+00:00", "kind": "attach", "agent": "web",
             "data": {"user": "root"}},
            {"id": 4, "ts": "2026-01-01T00:02:00+00:00", "kind": "detach", "agent": "web",
             "data": {"user": "root"}},
        ]
        self.follow_forever = False
        self.following = 0
        self.add("web", state="running")
        self.add("old", state="stopped")

    def add(self, name: str, state: str = "running", template: str = "default") -> None:
        self.agents[name] = {
            "name": name, "state": state, "template": template, "ip": "10.213.0.2",
            "ports": {"web": 20001} if state == "running" else {},
            "created": "2026-01-01T00:00:00+00:00",
            "usage": {"cpu_percent": 1.5, "memory_bytes": 50 * 1024 * 1024, "pids": 4},
            "clients": ["root"] if state == "running" else [],
        }

    def _get(self, name: str) -> dict[str, Any]:
        if name not in self.agents:
            raise NotFound(f"no agent named {name!r}", hint="see `corral ps --all`")
        return self.agents[name]

    # -- read-only --

    def status(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for agent in self.agents.values():
            counts[agent["state"]] = counts.get(agent["state"], 0) + 1
        return {"version": "0.1.0", "cgroup_driver": "v1", "agents": counts}

    def list_templates(self) -> list[dict[str, Any]]:
        return [{"name": "default", "description": "a shell", "path": "/t/default.yaml"}]

    def show_template(self, name: str) -> dict[str, Any]:
        if name != "default":
            raise NotFound(f"no template named {name!r}")
        return {"name": "default", "agent": {"command": ["bash", "-l"]}}

    def validate_template(self, path: str) -> dict[str, Any]:
        with open(path) as f:
            text = f.read()
        if "bad" in text:
            raise TemplateError(f"{path}:3: services.web.port: must be 1-65535")
        return {"name": "good", "path": path}

    def ps(self, all: bool = False) -> list[dict[str, Any]]:
        return [a for a in self.agents.values() if all or a["state"] != "stopped"]

    def inspect(self, name: str) -> dict[str, Any]:
        agent = dict(self._get(name))
        agent.update(reason="", cgroup="/corral/" + name, limits={"memory": 1 << 30},
                     services={}, workspace={"mode": "overlay", "path": "/x"},
                     session={"pid": 1234, "clients": agent["clients"]})
        return agent

    # -- lifecycle --

    async def create(self, name: str, template: str, project: str | None, sets: list[str],
                     start: bool) -> dict[str, Any]:
        check_name(name, "agent name")
        self.calls.append(("create", name, template, project, tuple(sets), start))
        if name in self.agents:
            raise Conflict(f"agent {name!r} exists already")
        if template == "broken":
            raise HostSetupError("overlayfs is missing", hint="modprobe overlay")
        if template == "crash":
            raise RuntimeError("boom")
        if template != "default":
            raise NotFound(f"no template named {template!r}")
        self.add(name, state="running" if start else "stopped", template=template)
        return {"name": name, "state": self.agents[name]["state"]}

    async def start(self, name: str) -> dict[str, Any]:
        self._get(name)["state"] = "running"
        return {"name": name, "state": "running"}

    async def stop(self, name: str, timeout: float | None = None) -> dict[str, Any]:
        self.calls.append(("stop", name, timeout))
        self._get(name)["state"] = "stopped"
        return {"name": name, "state": "stopped"}

    async def restart(self, name: str) -> dict[str, Any]:
        self._get(name)["state"] = "running"
        return {"name": name, "state": "running"}

    async def remove(self, name: str, force: bool = False, keep_workspace: bool = False) -> None:
        self.calls.append(("remove", name, force, keep_workspace))
        agent = self._get(name)
        if agent["state"] == "running" and not force:
            raise Conflict(f"agent {name!r} is running", hint="stop it first or use --force")
        del self.agents[name]

    # -- interactive --

    async def exec(self, name: str, argv: list[str], *, user: str,
                   tty: tuple[str, int, int] | None, env: dict[str, str],
                   run_as: str | None = None) -> FakeExec:
        self._get(name)
        self.calls.append(("exec", name, tuple(argv), user, tty))
        self.run_as.append(run_as)
        proc = await FakeExec.spawn(argv, tty, env)
        self.execs.append(proc)
        return proc

    async def attach(self, name: str, user: str, role: str,
                     size: tuple[int, int] | None = None) -> FakeSession:
        self._get(name)
        self.calls.append(("attach", name, user, role, size))
        session = FakeSession(self, user, role)
        self.sessions.append(session)
        return session

    def end_sessions(self) -> None:
        for session in self.sessions:
            session.output.put_nowait(b"")

    # -- logs, events --

    def logs(self, name: str, service: str | None, tail: int | None) -> bytes:
        self._get(name)
        if service not in (None, "web"):
            raise NotFound(f"agent {name!r} has no service {service!r}")
        lines = [f"{service or 'session'} line {i}\n".encode() for i in range(1, 6)]
        return b"".join(lines[-tail:] if tail else lines)

    async def follow_logs(self, name: str, service: str | None) -> AsyncIterator[bytes]:
        self._get(name)
        for chunk in (b"more 1\n", b"more 2\n"):
            await asyncio.sleep(0)
            yield chunk

    def events(self, agent: str | None, since: str | None) -> list[dict[str, Any]]:
        return [e for e in self.event_log
                if (agent is None or e["agent"] == agent) and (since is None or e["ts"] > since)]

    async def follow_events(self, agent: str | None) -> AsyncIterator[dict[str, Any]]:
        for event in self.follow_extra:
            await asyncio.sleep(0)
            if agent is None or event["agent"] == agent:
                yield event
        if self.follow_forever:
            self.following += 1
            try:
                await asyncio.Event().wait()
            finally:
                self.following -= 1

    # -- workspace --

    def diff(self, name: str, fmt: str) -> str | list[dict[str, Any]]:
        self._get(name)
        if fmt == "json":
            return [{"path": "a.txt", "kind": "added", "type": "file"}]
        if fmt == "stat":
            return " a.txt | 1 +\n 1 file changed\n"
        return "--- /dev/null\n+++ b/a.txt\n@@ -0,0 +1 @@\n+hello\n"

    def commit(self, name: str, branch: str, message: str | None) -> dict[str, Any]:
        self._get(name)
        self.calls.append(("commit", name, branch, message))
        return {"commit": "0123abc", "branch": branch}

    # -- users --

    def add_user(self, name: str, keys: list[str]) -> dict[str, Any]:
        check_name(name, "user name")
        self.users[name] = keys
        return {"name": name}

    def remove_user(self, name: str) -> None:
        if name not in self.users:
            raise NotFound(f"no user named {name!r}")
        del self.users[name]

    def list_users(self) -> list[dict[str, Any]]:
        return [{"name": n, "keys": k} for n, k in self.users.items()]

    def grant(self, agent: str, user: str, role: str) -> dict[str, Any]:
        self._get(agent)
        if user not in self.users:
            raise NotFound(f"no user named {user!r}")
        self.grants[(agent, user)] = role
        return {"agent": agent, "user": user, "role": role}

    def revoke(self, agent: str, user: str) -> None:
        if self.grants.pop((agent, user), None) is None:
            raise NotFound(f"{user!r} has no access to {agent!r}")

    def handoff(self, agent: str, user: str) -> dict[str, Any]:
        if agent == "locked":
            raise PermissionDenied("only the owner may hand off")
        self.grant(agent, user, "owner")
        return {"agent": agent, "owner": user}


# -- hosting ---------------------------------------------------------------------------


@contextlib.contextmanager
def short_tmpdir() -> Iterator[str]:
    """A short directory under /tmp: AF_UNIX paths must stay under 108 bytes."""
    path = tempfile.mkdtemp(prefix="crl-", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class ApiThread:
    """The real API server for a FakeManager, on its own loop in a thread."""

    def __init__(self, manager: FakeManager, path: str, group: str = "corral-test-nogroup"):
        self.manager = manager
        self.path = path
        self.group = group
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="api-test", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._main())
        self.loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        try:
            server = await serve(self.manager, self.path, group=self.group)
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await server.cleanup()
            for proc in self.manager.execs:
                if proc.proc.returncode is None:
                    proc.signal(signal.SIGKILL)
                    await proc.proc.wait()

    def call(self, fn: Any) -> None:
        """Run `fn()` on the server's loop (to touch the manager safely)."""
        self.loop.call_soon_threadsafe(fn)

    def __enter__(self) -> ApiThread:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("API server did not start")
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc: object) -> None:
        if self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
        if self._thread.is_alive():
            raise RuntimeError("API server thread did not stop")


def test_fake_manager_reports_errors_like_the_real_one() -> None:
    """The stand-in raises the sandbox.errors classes the API maps (sanity of the fake)."""
    manager = FakeManager()
    with pytest.raises(NotFound, match="nope"):
        manager.inspect("nope")
    with pytest.raises(CorralError, match="invalid agent name") as info:
        asyncio.run(manager.create("Bad!", "default", None, [], True))
    assert type(info.value) is CorralError
    assert manager.inspect("web")["state"] == "running"
