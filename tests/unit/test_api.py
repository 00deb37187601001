"""The control API over a real unix socket: status codes, streams, WebSockets, socket mode."""

from __future__ import annotations

import asyncio
import grp
import json
import os
import socket
import stat
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import aiohttp
import pytest

from sandbox.errors import Conflict, CorralError, NotFound
from supervisor.api import serve
from supervisor.client import AsyncClient, Client, DaemonNotRunning
from tests.unit.test_api_fake import FakeManager, short_tmpdir


@pytest.fixture
def sock_dir() -> Iterator[str]:
    with short_tmpdir() as path:
        yield path


def run_with_api(
    sock_dir: str, body: Callable[[FakeManager, AsyncClient], Awaitable[Any]],
    group: str = "corral-test-nogroup",
) -> Any:
    """Serve a FakeManager on a socket in sock_dir and run `body` against it."""
    manager = FakeManager()
    path = os.path.join(sock_dir, "api.sock")

    async def main() -> Any:
        server = await serve(manager, path, group=group)
        try:
            async with AsyncClient(path) as client:
                return await asyncio.wait_for(body(manager, client), 60)
        finally:
            await server.cleanup()

    return asyncio.run(main())


async def _raw(client: AsyncClient, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    async with client.session.request(method, "http://corral" + path, json=body) as r:
        return r.status, await r.json(content_type=None)


# -- status codes ----------------------------------------------------------------------


def test_errors_map_to_status_codes_and_json(sock_dir: str) -> None:
    async def body(manager: FakeManager, client: AsyncClient) -> None:
        assert await _raw(client, "GET", "/v1/status") == (200, manager.status())
        status, answer = await _raw(client, "GET", "/v1/agents/nope")
        assert status == 404
        assert answer == {"error": "no agent named 'nope'", "hint": "see `corral ps --all`"}
        new = {"name": "web", "template": "default", "project": "/p", "set": [], "start": True}
        assert (await _raw(client, "POST", "/v1/agents", new))[0] == 409
        bad = dict(new, name="Bad!")
        status, answer = await _raw(client, "POST", "/v1/agents", bad)
        assert status == 400
        assert "invalid agent name" in answer["error"]
        assert answer["hint"]
        status, answer = await _raw(client, "POST", "/v1/agents", dict(new, name="x", set="a"))
        assert status == 400
        assert "'set'" in answer["error"]
        status, answer = await _raw(client, "POST", "/v1/agents",
                                    dict(new, name="x", template="broken"))
        assert (status, answer["hint"]) == (500, "modprobe overlay")
        status, answer = await _raw(client, "POST", "/v1/agents",
                                    dict(new, name="x", template="crash"))
        assert status == 500
        assert "boom" in answer["error"]
        status, answer = await _raw(client, "POST", "/v1/agents/locked/handoff", {"user": "a"})
        assert status == 403
        status, answer = await _raw(client, "GET", "/v1/nothing-here")
        assert status == 404
        assert "error" in answer
        async with client.session.post("http://corral/v1/agents", data=b"{not json",
                                       headers={"Content-Type": "application/json"}) as r:
            assert r.status == 400
            assert "not JSON" in (await r.json())["error"]
        # The positive control: a good request creates the agent.
        assert (await _raw(client, "POST", "/v1/agents", dict(new, name="fresh")))[0] == 201
        assert "fresh" in manager.agents

    run_with_api(sock_dir, body)


def test_client_rebuilds_error_classes(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "api.sock")

    async def body(manager: FakeManager, client: AsyncClient) -> None:
        sync = Client(path)
        # The sync client blocks: run it off the loop that serves it.
        with pytest.raises(NotFound, match="nope"):
            await asyncio.to_thread(sync.inspect, "nope")
        with pytest.raises(Conflict):
            await asyncio.to_thread(sync.create, "web", "default", "/p", [])
        with pytest.raises(CorralError) as info:
            await asyncio.to_thread(sync.create, "x", "broken", "/p", [])
        assert info.value.hint == "modprobe overlay"
        assert (await asyncio.to_thread(sync.inspect, "web"))["name"] == "web"

    run_with_api(sock_dir, body)


def test_client_says_daemon_not_running(sock_dir: str) -> None:
    missing = os.path.join(sock_dir, "missing.sock")
    with pytest.raises(DaemonNotRunning, match="daemon not running") as info:
        Client(missing).status()
    assert "corral daemon" in info.value.hint
    # A socket file nobody listens on (a daemon that died) says the same.
    stale = os.path.join(sock_dir, "stale.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(stale)
    s.close()
    with pytest.raises(DaemonNotRunning):
        Client(stale).status()

    async def async_case() -> None:
        async with AsyncClient(missing) as client:
            await client.call("GET", "/v1/status")

    with pytest.raises(DaemonNotRunning):
        asyncio.run(async_case())


# -- the socket ------------------------------------------------------------------------


def test_socket_is_root_only_without_the_group(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "api.sock")

    async def body(manager: FakeManager, client: AsyncClient) -> None:
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert (st.st_uid, st.st_gid) == (0, 0)

    run_with_api(sock_dir, body, group="corral-test-nogroup")


def test_socket_is_group_accessible_with_the_group(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "api.sock")
    # An existing, harmless group stands in for "corral" (never created here).
    group = next(g for g in ("daemon", "nogroup", "users") if _has_group(g))
    gid = grp.getgrnam(group).gr_gid

    async def body(manager: FakeManager, client: AsyncClient) -> None:
        st = os.stat(path)
        assert stat.S_IMODE(st.st_mode) == 0o660
        assert (st.st_uid, st.st_gid) == (0, gid)

    run_with_api(sock_dir, body, group=group)


def _has_group(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def test_stale_socket_is_replaced_but_a_live_one_is_not(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "api.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()

    async def main() -> None:
        first = await serve(FakeManager(), path, group="corral-test-nogroup")
        try:
            assert (await asyncio.to_thread(Client(path).status))["cgroup_driver"] == "v1"
            with pytest.raises(Conflict, match="another corral daemon"):
                await serve(FakeManager(), path, group="corral-test-nogroup")
            # The refused second server left the first one's socket in place.
            assert (await asyncio.to_thread(Client(path).status))["version"] == "0.1.0"
        finally:
            await first.cleanup()
        assert not os.path.exists(path)

    asyncio.run(main())


# -- streams ---------------------------------------------------------------------------


def test_event_and_log_streams(sock_dir: str) -> None:
    async def body(manager: FakeManager, client: AsyncClient) -> None:
        async with client.session.get("http://corral/v1/events?follow=1&agent=web") as r:
            assert r.status == 200
            lines = [json.loads(line) async for line in r.content if line.strip()]
        assert [e["kind"] for e in lines] == ["attach", "detach"]
        async with client.session.get(
            "http://corral/v1/events?follow=1&since=2026-01-01T00:00:01%2B00:00"
        ) as r:
            lines = [json.loads(line) async for line in r.content if line.strip()]
        assert [e["id"] for e in lines] == [2, 3, 4]
        async with client.session.get("http://corral/v1/agents/web/logs?follow=1&tail=1") as r:
            assert await r.read() == b"session line 5\nmore 1\nmore 2\n"
        status, answer = await _raw(client, "GET", "/v1/agents/web/logs?follow=1&service=db")
        assert status == 404
        assert "no service" in answer["error"]

    run_with_api(sock_dir, body)


# -- attach ----------------------------------------------------------------------------


async def _next_binary(ws: aiohttp.ClientWebSocketResponse) -> bytes:
    msg = await ws.receive(timeout=30)
    assert msg.type == aiohttp.WSMsgType.BINARY, msg
    return bytes(msg.data)


async def _until(predicate: Callable[[], bool]) -> None:
    for _ in range(3000):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


def test_attach_snapshot_first_then_input_and_resize(sock_dir: str) -> None:
    async def body(manager: FakeManager, client: AsyncClient) -> None:
        ws = await client.ws_connect("/v1/agents/web/attach?cols=100&rows=30")
        assert await _next_binary(ws) == b"\x1b[H\x1b[2JSNAPSHOT"
        assert manager.calls[-1] == ("attach", "web", "root", "owner", (100, 30))
        await ws.send_bytes(b"ls\r")
        assert await _next_binary(ws) == b"echo:ls\r"
        assert manager.typed == [("owner", b"ls\r")]
        await ws.send_str(json.dumps({"resize": [120, 40]}))
        await _until(lambda: manager.resizes == [(120, 40)])
        # The session ends: the server closes the WebSocket and the client is released.
        manager.end_sessions()
        msg = await ws.receive(timeout=30)
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        await _until(lambda: manager.closed_sessions == 1)

    run_with_api(sock_dir, body)


def test_attach_read_only_drops_input_and_resize(sock_dir: str) -> None:
    async def body(manager: FakeManager, client: AsyncClient) -> None:
        ws = await client.ws_connect("/v1/agents/web/attach?read_only=1")
        assert await _next_binary(ws) == b"\x1b[H\x1b[2JSNAPSHOT"
        assert manager.calls[-1] == ("attach", "web", "root", "viewer", None)
        await ws.send_bytes(b"rm -rf /\r")
        await ws.send_str(json.dumps({"resize": [10, 10]}))
        # Output still reaches the viewer...
        manager.sessions[0].output.put_nowait(b"hello viewer")
        assert await _next_binary(ws) == b"hello viewer"
        await ws.close()
        await _until(lambda: manager.closed_sessions == 1)
        # ...but none of its input or resizes reached the session.
        assert manager.typed == []
        assert manager.resizes == []

    run_with_api(sock_dir, body)


def test_attach_to_a_missing_agent_sends_an_error_frame(sock_dir: str) -> None:
    async def body(manager: FakeManager, client: AsyncClient) -> None:
        ws = await client.ws_connect("/v1/agents/nope/attach")
        msg = await ws.receive(timeout=30)
        assert msg.type == aiohttp.WSMsgType.TEXT
        assert json.loads(msg.data)["status"] == 404
        await ws.close()

    run_with_api(sock_dir, body)


# -- exec ------------------------------------------------------------------------------


ExecResult = tuple[bytes, bytes, int | None, aiohttp.ClientWebSocketResponse]


async def _exec(client: AsyncClient, request: dict[str, Any], stdin: bytes = b"",
                eof: bool = True) -> ExecResult:
    ws = await client.ws_connect("/v1/agents/web/exec")
    await ws.send_str(json.dumps(request))
    if stdin:
        await ws.send_bytes(b"\x00" + stdin)
    if eof:
        await ws.send_str(json.dumps({"eof": True}))
    out, err, code = b"", b"", None
    async for msg in ws:
        if msg.type == aiohttp.WSMsgType.BINARY:
            if msg.data[0] == 1:
                out += msg.data[1:]
            else:
                err += msg.data[1:]
        elif msg.type == aiohttp.WSMsgType.TEXT:
            code = json.loads(msg.data)["exit"]
    return out, err, code, ws


def test_exec_relays_stdio_and_exit_code(sock_dir: str) -> None:
    async def body(manager: FakeManager, client: AsyncClient) -> None:
        script = "read line; echo out:$line; echo err >&2; exit 7"
        out, err, code, _ = await _exec(
            client, {"argv": ["sh", "-c", script], "tty": False, "env": {}, "user": None},
            stdin=b"typed\n",
        )
        assert (out, err, code) == (b"out:typed\n", b"err\n", 7)
        assert manager.calls[-1] == ("exec", "web", ("sh", "-c", script), "root", None)
        assert manager.run_as[-1] is None
        # --user is the identity inside; the caller (the event's user) stays root
        await _exec(client, {"argv": ["true"], "tty": False, "env": {}, "user": "agent"})
        assert manager.calls[-1][3] == "root"
        assert manager.run_as[-1] == "agent"

    run_with_api(sock_dir, body)


def test_exec_with_a_tty_and_a_signal(sock_dir: str) -> None:
    async def body(manager: FakeManager, client: AsyncClient) -> None:
        request = {"argv": ["sh", "-c", "test -t 0 && echo tty-ok"], "tty": True,
                   "term": "xterm", "cols": 90, "rows": 20, "env": {}, "user": "agent"}
        out, _, code, _ = await _exec(client, request, eof=False)
        assert b"tty-ok" in out
        assert code == 0
        assert manager.calls[-1][3:] == ("root", ("xterm", 90, 20))
        assert manager.run_as[-1] == "agent"
        # A signal from the client reaches the command: exit code 128+N.
        ws = await client.ws_connect("/v1/agents/web/exec")
        await ws.send_str(json.dumps({"argv": ["sleep", "60"], "tty": False}))
        await _until(lambda: len(manager.execs) == 2)
        await ws.send_str(json.dumps({"signal": 15}))
        msg = await ws.receive(timeout=30)
        assert json.loads(msg.data) == {"exit": 128 + 15}

    run_with_api(sock_dir, body)


def test_exec_bad_request_and_missing_agent(sock_dir: str) -> None:
    async def body(manager: FakeManager, client: AsyncClient) -> None:
        ws = await client.ws_connect("/v1/agents/web/exec")
        await ws.send_str(json.dumps({"argv": "ls"}))
        msg = await ws.receive(timeout=30)
        assert json.loads(msg.data)["status"] == 400
        ws = await client.ws_connect("/v1/agents/nope/exec")
        await ws.send_str(json.dumps({"argv": ["true"]}))
        msg = await ws.receive(timeout=30)
        assert json.loads(msg.data)["status"] == 404
        assert manager.execs == []

    run_with_api(sock_dir, body)


def test_exec_client_going_away_kills_the_command(sock_dir: str) -> None:
    async def body(manager: FakeManager, client: AsyncClient) -> None:
        ws = await client.ws_connect("/v1/agents/web/exec")
        await ws.send_str(json.dumps({"argv": ["sleep", "60"]}))
        await _until(lambda: len(manager.execs) == 1)
        await ws.close()
        await _until(lambda: manager.execs[0].proc.returncode is not None)
        assert manager.execs[0].proc.returncode == -9

    run_with_api(sock_dir, body)


def test_socket_permission_problems_are_named() -> None:
    from supervisor.client import not_running

    error = not_running("/run/x.sock", PermissionError(13, "Permission denied"))
    assert "permission denied on the API socket /run/x.sock" in str(error)
    assert "corral group" in error.hint
    assert isinstance(not_running("/run/x.sock", FileNotFoundError(2, "x")), DaemonNotRunning)


def test_shutdown_ends_follow_streams_and_websockets(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "api.sock")
    manager = FakeManager()
    manager.follow_forever = True

    async def main() -> None:
        server = await serve(manager, path, group="corral-test-nogroup")
        async with AsyncClient(path) as client:
            ws = await client.ws_connect("/v1/agents/web/attach")
            assert (await ws.receive(timeout=30)).type == aiohttp.WSMsgType.BINARY
            async with client.session.get("http://corral/v1/events?follow=1") as r:
                assert json.loads(await r.content.readline())["kind"] == "attach"
                assert json.loads(await r.content.readline())["kind"] == "detach"
                await _until(lambda: manager.following == 1)
                await asyncio.wait_for(server.cleanup(), 30)
                # The follower's generator was closed and the socket removed.
                assert manager.following == 0
                assert not os.path.exists(path)
                with pytest.raises(aiohttp.ClientPayloadError):
                    await r.content.read()
            msg = await ws.receive(timeout=30)
            assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
            await ws.close()
        assert manager.closed_sessions == 1

    asyncio.run(asyncio.wait_for(main(), 60))
