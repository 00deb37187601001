"""Hostile clients against the SSH server, through an asyncssh client and raw sockets.

Channel floods, absurd pty/window/env requests, half-open logins, a stalled
reader under a flood of output, and role changes on a live sftp session. Each
refusal has a positive control on the same connection or server.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from supervisor.ssh import SshLimits, SshServerHandle, start_ssh_server
from tests.integration.test_ssh_standin import LoopThread, StandinManager, keygen

AGENT = "demo"


@dataclass
class Env:
    tmp: Path
    lt: LoopThread
    mgr: StandinManager
    handle: SshServerHandle
    keys: dict[str, Path]

    async def connect(self, user: str) -> asyncssh.SSHClientConnection:
        return await asyncssh.connect("127.0.0.1", self.handle.port, username=AGENT,
                                      client_keys=[str(self.keys[user])], known_hosts=None,
                                      agent_path=None, config=None)

    def run(self, coro: Any, timeout: float = 120) -> Any:
        return self.lt.run(coro, timeout=timeout)


def _start(tmp_path: Path, limits: SshLimits) -> Env:
    lt = LoopThread()
    ws = tmp_path / "ws"
    ws.mkdir()
    mgr = StandinManager(str(ws))
    keys = {}
    for user, role in (("alice", "collaborator"), ("bob", "owner"), ("carol", "viewer")):
        keys[user] = tmp_path / f"{user}_key"
        mgr.keys[keygen(keys[user])] = user
        mgr.roles[(AGENT, user)] = role
    handle = lt.run(start_ssh_server(mgr, "127.0.0.1", 0, str(tmp_path / "host_key"),
                                     str(tmp_path / "rec"), limits=limits))
    return Env(tmp_path, lt, mgr, handle, keys)


def _stop(env: Env) -> None:
    async def close() -> None:
        env.handle.close()
        await env.handle.wait_closed()
    with contextlib.suppress(Exception):
        env.lt.run(close())
    env.lt.call(env.mgr.stop)
    env.lt.stop()


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = _start(tmp_path, SshLimits())
    try:
        yield e
    finally:
        _stop(e)


@pytest.fixture
def make_env(tmp_path: Path) -> Iterator[Callable[[SshLimits], Env]]:
    made: list[Env] = []

    def make(limits: SshLimits) -> Env:
        sub = tmp_path / f"env{len(made)}"
        sub.mkdir()
        made.append(_start(sub, limits))
        return made[-1]
    try:
        yield make
    finally:
        for e in made:
            _stop(e)


def test_channel_flood_is_capped_per_connection(env: Env) -> None:
    async def flood() -> dict[str, Any]:
        out: dict[str, Any] = {}
        async with await env.connect("alice") as conn:
            opened = []
            for _ in range(10):
                chan, _session = await conn.create_session(asyncssh.SSHClientSession)
                opened.append(chan)
            try:
                await conn.create_session(asyncssh.SSHClientSession)
                out["eleventh"] = "opened"
            except asyncssh.ChannelOpenError:
                out["eleventh"] = "refused"
            # closing one frees a slot (positive control on the same connection)
            opened[0].close()
            await opened[0].wait_closed()
            out["freed"] = False
            for _ in range(50):
                try:
                    await conn.create_session(asyncssh.SSHClientSession)
                    out["freed"] = True
                    break
                except asyncssh.ChannelOpenError:
                    await asyncio.sleep(0.1)
            # 10 000 opens, in flight 1 000 at a time
            results: list[Any] = []
            for _ in range(10):
                results += await asyncio.gather(
                    *(conn.create_session(asyncssh.SSHClientSession) for _ in range(1000)),
                    return_exceptions=True)
            out["flood_opened"] = sum(isinstance(r, tuple) for r in results)
            out["flood_refused"] = sum(isinstance(r, asyncssh.ChannelOpenError)
                                       for r in results)
            await asyncio.wait_for(conn.wait_closed(), 30)
            out["closed"] = conn.is_closed()
        async with await env.connect("bob") as other:
            r = await other.run("echo other", check=False, encoding=None)
            out["other"] = r.stdout
        return out

    out = env.run(flood(), timeout=240)
    assert out["eleventh"] == "refused"
    assert out["freed"]
    assert out["flood_opened"] == 0
    assert out["flood_refused"] >= 1000
    assert out["closed"]          # the flooding connection was cut ...
    assert out["other"] == b"other\n"   # ... and the server still serves others


def test_absurd_pty_and_term_refused_window_change_clamped(env: Env) -> None:
    async def go() -> tuple[list[str], list[tuple[int, int]]]:
        errors = []
        async with await env.connect("alice") as conn:
            for kw in ({"term_type": "xterm", "term_size": (100_000, 100_000)},
                       {"term_type": "x" * 10_000, "term_size": (80, 24)},
                       {"term_type": "xterm\x1b]0;pwn\x07", "term_size": (80, 24)}):
                try:
                    p = await conn.create_process(encoding=None, **kw)
                    p.close()
                except asyncssh.ChannelOpenError as exc:
                    errors.append(exc.reason)
            # positive control: a sane pty works, and an absurd resize is clamped
            p = await conn.create_process(term_type="xterm", term_size=(120, 40),
                                          encoding=None)
            before = len(env.mgr.resizes)
            p.stdin.write(b"echo READY_$((40+2))\r")
            out = b""
            while b"READY_42" not in out:
                out += await asyncio.wait_for(p.stdout.read(65536), 20)
            p.change_terminal_size(4_000_000, 4_000_000)
            p.change_terminal_size(0, 0)
            for _ in range(100):
                if len(env.mgr.resizes) >= before + 2:
                    break
                await asyncio.sleep(0.1)
            p.close()
        return errors, env.mgr.resizes[before:]

    errors, resizes = env.run(go())
    assert len(errors) == 3
    assert all("PTY" in e for e in errors)
    assert resizes
    assert all(1 <= c <= 1000 and 1 <= r <= 500 for c, r in resizes)
    assert (1000, 500) in resizes


def test_only_allowlisted_env_reaches_the_sandbox(env: Env) -> None:
    async def go() -> bytes:
        big = {f"LC_X{i}": "C" for i in range(200)}
        async with await env.connect("alice") as conn:
            r = await conn.run("env", env={"LANG": "C.UTF-8", "EVIL": "1",
                                           "LD_PRELOAD": "/tmp/x.so", "LC_TIME": "C",
                                           "LC_HUGE": "y" * 100_000, **big},
                               check=False, encoding=None)
            return bytes(r.stdout)

    out = env.run(go()).decode()
    lines = set(out.splitlines())
    assert "LANG=C.UTF-8" in lines
    assert "LC_TIME=C" in lines
    assert not any(x.startswith(("EVIL=", "LD_PRELOAD=", "LC_HUGE=")) for x in lines)
    assert sum(x.startswith("LC_X") for x in lines) < 32


def _read_to_eof(sock: socket.socket, timeout: float) -> tuple[bytes, bool]:
    """(bytes received, whether the peer closed) within timeout."""
    sock.settimeout(timeout)
    got = b""
    try:
        while chunk := sock.recv(4096):
            got += chunk
    except TimeoutError:
        return got, False
    except OSError:
        pass
    return got, True


def _login_works(env: Env) -> bytes:
    async def login() -> bytes:
        for _ in range(50):
            try:
                async with await env.connect("alice") as conn:
                    r = await conn.run("echo ok", check=False, encoding=None)
                    return bytes(r.stdout)
            except (OSError, asyncssh.Error):
                await asyncio.sleep(0.2)
        return b""
    return bytes(env.run(login()))


def test_preauth_connection_cap(make_env: Callable[[SshLimits], Env]) -> None:
    env = make_env(SshLimits(max_preauth=3, login_grace=60))
    port = env.handle.port
    idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(3)]
    try:
        for s in idle:
            s.settimeout(20)
            assert s.recv(256).startswith(b"SSH-2.0-")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as extra:
            _, closed = _read_to_eof(extra, 20)
            assert closed                      # the fourth half-open login is dropped
        for s in idle:
            assert not _read_to_eof(s, 0.2)[1]  # while the first three still wait
    finally:
        for s in idle:
            s.close()
    # positive control: once they are gone, a real login works
    assert _login_works(env) == b"ok\n"


def test_login_grace_timeout(make_env: Callable[[SshLimits], Env]) -> None:
    env = make_env(SshLimits(login_grace=1.0))
    with socket.create_connection(("127.0.0.1", env.handle.port), timeout=10) as s:
        got, closed = _read_to_eof(s, 60)
        assert got.startswith(b"SSH-2.0-")
        assert closed
    assert _login_works(env) == b"ok\n"


def test_stalled_reader_is_dropped_others_keep_up(make_env: Callable[[SshLimits], Env]) -> None:
    tight = make_env(SshLimits(drain_timeout=5.0))
    # The hub's own drop is switched off here: this is about the SSH side, which
    # must drop a stalled client by itself (drain timeout) and keep serving others.
    tight.mgr.queue_limit = 1 << 30
    async def go() -> tuple[bool, bool]:
        stalled_conn = await tight.connect("carol")
        stalled = await stalled_conn.create_process(term_type="xterm", term_size=(80, 24),
                                                    encoding=None)
        # carol never reads again; asyncssh's client stops its window when its buffer fills
        async with await tight.connect("alice") as conn:
            p = await conn.create_process(term_type="xterm", term_size=(80, 24),
                                          encoding=None)
            # ~8 MB over ~10 s, paced so a reading client keeps up, and longer
            # than the drain timeout so the stalled one is cut while it runs
            p.stdin.write(b"for i in $(seq 80); do head -c 100000 /dev/zero | tr '\\0' x; "
                          b"sleep 0.12; done; echo; echo FLOOD_DONE_$((40+2))\r")
            seen = b""
            deadline = time.monotonic() + 120
            while b"FLOOD_DONE_42" not in seen[-4096:] and time.monotonic() < deadline:
                chunk = await asyncio.wait_for(p.stdout.read(1 << 20), 60)
                if not chunk:
                    break
                seen = seen[-8192:] + chunk
            done = b"FLOOD_DONE_42" in seen
            p.close()
        # the stalled viewer has been dropped: its channel closes
        dropped = False
        for _ in range(300):
            if stalled.channel.get_exit_status() is not None or stalled_conn.is_closed():
                dropped = True
                break
            if any(k == "session.detach" and d.get("user") == "carol"
                   for k, _, d in tight.mgr.events):
                dropped = True
                break
            await asyncio.sleep(0.1)
        stalled_conn.close()
        return done, dropped

    done, dropped = tight.run(go(), timeout=300)
    assert done
    assert dropped


def test_downgrade_and_revoke_reach_a_live_sftp_session(env: Env) -> None:
    ws = env.tmp / "ws"

    async def go() -> tuple[bytes, str, bytes, bool]:
        async with await env.connect("alice") as conn, conn.start_sftp_client() as sftp:
            async with sftp.open("a.txt", "wb") as f:
                await f.write(b"first")
            held = await sftp.open("b.txt", "wb")
            env.mgr.set_role(AGENT, "alice", "viewer")
            denied = ""
            try:
                await held.write(b"after-downgrade")
            except asyncssh.SFTPError as exc:
                denied = type(exc).__name__
            try:
                async with sftp.open("c.txt", "wb") as f:
                    await f.write(b"x")
            except asyncssh.SFTPError as exc:
                denied += "," + type(exc).__name__
            async with sftp.open("a.txt", "rb") as f:
                still_reads = await f.read()
            env.mgr.set_role(AGENT, "alice", None)
            closed = False
            for _ in range(50):
                if conn.is_closed():
                    closed = True
                    break
                await asyncio.sleep(0.1)
            return (ws / "a.txt").read_bytes(), denied, still_reads, closed

    first, denied, still_reads, closed = env.run(go())
    assert first == b"first"
    assert denied == "SFTPPermissionDenied,SFTPPermissionDenied"
    assert still_reads == b"first"
    assert (ws / "b.txt").read_bytes() == b""
    assert not (ws / "c.txt").exists()
    assert closed


def test_sftp_sessions_release_their_fds(env: Env) -> None:
    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    async def sessions(n: int, cut: bool) -> None:
        for i in range(n):
            conn = await env.connect("alice")
            sftp = await conn.start_sftp_client()
            f = await sftp.open(f"f{i}.txt", "wb")    # a handle left open on purpose
            await f.write(b"x")
            if cut:
                conn.abort()                           # the client vanishes mid-session
            else:
                sftp.exit()
                conn.close()
            await conn.wait_closed()

    env.run(sessions(1, False))        # warm-up: asyncssh's lazily created fds
    before = fds()
    env.run(sessions(5, False))
    env.run(sessions(5, True))
    for _ in range(100):
        if fds() <= before:
            break
        time.sleep(0.1)
    assert fds() <= before
    # positive control: the sessions really opened and wrote files
    assert sorted(p.name for p in (env.tmp / "ws").glob("f*.txt")) == [
        f"f{i}.txt" for i in range(5)]


def test_sftp_on_a_stopped_agent_fails_cleanly(env: Env) -> None:
    def gone(name: str) -> str:
        raise RuntimeError(f"agent {name!r} is stopped")
    env.mgr.workspace_view = gone  # type: ignore[method-assign]

    async def go() -> tuple[str, bytes]:
        async with await env.connect("alice") as conn:
            err = ""
            try:
                async with conn.start_sftp_client():
                    pass
            except (asyncssh.Error, OSError) as exc:
                err = type(exc).__name__
            r = await conn.run("echo alive", check=False, encoding=None)   # same connection
            return err, bytes(r.stdout)

    err, out = env.run(go())
    assert err
    assert out == b"alive\n"


def test_key_spraying_is_cut_off(env: Env) -> None:
    good = asyncssh.read_private_key(str(env.keys["alice"]))

    async def attempt(n_wrong: int) -> str:
        wrong = [asyncssh.generate_private_key("ssh-ed25519") for _ in range(n_wrong)]
        try:
            async with asyncssh.connect("127.0.0.1", env.handle.port, username=AGENT,
                                        client_keys=[*wrong, good], known_hosts=None,
                                        agent_path=None, config=None) as conn:
                r = await conn.run("echo in", check=False, encoding=None)
                return bytes(r.stdout).decode()
        except (asyncssh.Error, OSError) as exc:
            return type(exc).__name__

    assert env.run(attempt(3)) == "in\n"          # a few wrong keys first: still fine
    assert env.run(attempt(40)) != "in\n"         # 40 wrong keys: cut before the good one
    for _ in range(200):     # the failed connection is audited once it is gone
        if any(k == "ssh.login_failed" for k, _, _ in env.mgr.events):
            break
        time.sleep(0.1)
    assert any(k == "ssh.login_failed" for k, _, _ in env.mgr.events)


def test_downgrade_closes_live_forwards(env: Env) -> None:
    async def go() -> tuple[bytes, bytes, bool]:
        async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            while data := await r.read(1024):
                w.write(data)
                await w.drain()
            w.close()
        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            async with await env.connect("bob") as conn:
                r, w = await conn.open_connection("localhost", port, encoding=None)
                w.write(b"ping")
                first = await asyncio.wait_for(r.read(1024), 20)     # positive control
                env.mgr.set_role(AGENT, "bob", "viewer")
                after = b""
                with contextlib.suppress(asyncssh.Error, OSError):
                    w.write(b"again")
                    after = await asyncio.wait_for(r.read(1024), 20)  # EOF: channel closed
                refused = False
                try:
                    await conn.open_connection("localhost", port)
                except asyncssh.ChannelOpenError:
                    refused = True
                return first, after, refused
        finally:
            server.close()
            await server.wait_closed()

    first, after, refused = env.run(go())
    assert first == b"ping"
    assert after == b""
    assert refused
