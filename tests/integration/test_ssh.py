"""The SSH server driven by the real OpenSSH client (ssh, sftp, scp -s) and tmux.

The manager is the real-process stand-in of test_ssh_standin.py: a real bash
on a PTY, real exec processes, a real TCP server, a temp-dir workspace.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from supervisor.ssh import SshServerHandle, start_ssh_server
from tests.integration.test_ssh_standin import LoopThread, StandinManager, keygen

AGENT = "demo"
USERS = {"alice": "collaborator", "bob": "owner", "carol": "viewer"}


def wait_until(pred: Callable[[], Any], timeout: float = 20, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or pred}")
        time.sleep(0.1)


@dataclass
class SshEnv:
    tmp: Path
    lt: LoopThread
    mgr: StandinManager
    handle: SshServerHandle
    keys: dict[str, Path]
    fps: dict[str, str]
    known_hosts: Path
    tmux_sock: str
    procs: list[subprocess.Popen[Any]] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.handle.port

    def opts(self, user: str, *, key: Path | None = None) -> list[str]:
        return ["-F", "/dev/null", "-o", "StrictHostKeyChecking=no",
                "-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "IdentitiesOnly=yes",
                "-o", "BatchMode=yes", "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=20",
                "-i", str(key or self.keys[user])]

    def ssh_argv(self, user: str, *cmd: str, opts: tuple[str, ...] = (),
                 agent: str = AGENT) -> list[str]:
        return ["ssh", "-p", str(self.port), *self.opts(user), *opts, f"{agent}@127.0.0.1",
                *cmd]

    def ssh(self, user: str, *cmd: str, opts: tuple[str, ...] = (), input: bytes | None = None,
            agent: str = AGENT, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(self.ssh_argv(user, *cmd, opts=opts, agent=agent), input=input,
                              capture_output=True, timeout=timeout, env=_client_env(),
                              check=False)

    def popen(self, argv: list[str], **kw: Any) -> subprocess.Popen[Any]:
        p = subprocess.Popen(argv, env=_client_env(), start_new_session=True, **kw)
        self.procs.append(p)
        return p

    # tmux: interactive clients in real terminals
    def tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.tmux_sock, "-f", "/dev/null", *args],
                              capture_output=True, text=True, check=True, timeout=20,
                              env=_client_env()).stdout

    def attach_in_tmux(self, name: str, user: str) -> None:
        cmd = " ".join(self.ssh_argv(user))
        self.tmux("new-session", "-d", "-s", name, "-x", "100", "-y", "30", cmd)

    def screen(self, name: str) -> str:
        try:
            return self.tmux("capture-pane", "-p", "-t", name)
        except subprocess.CalledProcessError:
            return ""

    def type(self, name: str, text: str) -> None:
        self.tmux("send-keys", "-t", name, "-l", text)
        self.tmux("send-keys", "-t", name, "Enter")

    def events(self, kind: str) -> list[dict[str, object]]:
        return [dict(d, agent=a) for k, a, d in list(self.mgr.events) if k == kind]


def _client_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("SSH_AUTH_SOCK", "TMUX")}
    env.setdefault("TERM", "xterm")
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def ssh_env(tmp_path: Path, uniq: str) -> Iterator[SshEnv]:
    lt = LoopThread()
    ws = tmp_path / "ws"
    ws.mkdir()
    mgr = StandinManager(str(ws))
    keys: dict[str, Path] = {}
    fps: dict[str, str] = {}
    for user in [*USERS, "mallory", "eve"]:
        keys[user] = tmp_path / f"{user}_key"
        fps[user] = keygen(keys[user])
    for user, role in USERS.items():
        mgr.keys[fps[user]] = user
        mgr.roles[(AGENT, user)] = role
    mgr.keys[fps["mallory"]] = "mallory"          # registered, but no grant on demo
    handle = lt.run(start_ssh_server(mgr, "127.0.0.1", 0, str(tmp_path / "host_key"),
                                     str(tmp_path / "rec")))
    env = SshEnv(tmp_path, lt, mgr, handle, keys, fps, tmp_path / "known_hosts",
                 f"{uniq}-ssh")
    try:
        yield env
    finally:
        subprocess.run(["tmux", "-L", env.tmux_sock, "kill-server"], capture_output=True,
                       check=False)
        for p in env.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, 9)
            p.wait(10)

        async def _close() -> None:
            env.handle.close()
            await env.handle.wait_closed()
        with contextlib.suppress(Exception):
            lt.run(_close())
        lt.call(mgr.stop)
        lt.stop()


# --- authentication ----------------------------------------------------------


def test_registered_key_logs_in_unregistered_refused(ssh_env: SshEnv) -> None:
    ok = ssh_env.ssh("alice", "echo", "in")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == b"in\n"
    bad = ssh_env.ssh("eve", "echo", "in")
    assert bad.returncode == 255
    assert b"Permission denied (publickey)" in bad.stderr
    logins = ssh_env.events("ssh.login")
    assert any(e["user"] == "alice" and e["key"] == ssh_env.fps["alice"] for e in logins)
    failed = wait_until(lambda: ssh_env.events("ssh.login_failed"), what="login_failed audit")
    assert failed[-1]["key"] == ssh_env.fps["eve"]
    assert str(failed[-1]["addr"]).startswith("127.0.0.1:")


def test_key_of_user_without_grant_refused(ssh_env: SshEnv) -> None:
    r = ssh_env.ssh("mallory", "true")
    assert r.returncode == 255
    assert b"Permission denied" in r.stderr
    # positive control: the same user on an agent where they have a role
    ssh_env.mgr.roles[("other", "mallory")] = "collaborator"
    r = ssh_env.ssh("mallory", "true", agent="other")
    assert r.returncode == 0, r.stderr


def test_password_and_keyboard_interactive_refused(ssh_env: SshEnv) -> None:
    argv = ["ssh", "-p", str(ssh_env.port), "-F", "/dev/null",
            "-o", "StrictHostKeyChecking=no", "-o", f"UserKnownHostsFile={ssh_env.known_hosts}",
            "-o", "PubkeyAuthentication=no", "-o", "BatchMode=yes",
            "-o", "PreferredAuthentications=password,keyboard-interactive",
            f"{AGENT}@127.0.0.1", "true"]
    r = subprocess.run(argv, capture_output=True, timeout=60, env=_client_env(), check=False)
    assert r.returncode == 255
    # the server offers public keys only
    assert b"Permission denied (publickey)." in r.stderr


def test_role_comes_from_the_signing_key_not_an_offered_one(ssh_env: SshEnv) -> None:
    # alice's public key is offered (no private key to sign with), then carol's signs.
    pub_only = ssh_env.tmp / "alice_pub_only"
    shutil.copy(f"{ssh_env.keys['alice']}.pub", f"{pub_only}.pub")
    argv = ["ssh", "-p", str(ssh_env.port), *ssh_env.opts("alice", key=pub_only),
            "-i", str(ssh_env.keys["carol"]), f"{AGENT}@127.0.0.1", "echo", "EXEC_RAN"]
    r = subprocess.run(argv, capture_output=True, timeout=60, env=_client_env(), check=False)
    # logged in as carol (viewer): exec refused
    assert b"EXEC_RAN" not in r.stdout
    assert r.returncode != 0
    logins = ssh_env.events("ssh.login")
    assert logins
    assert logins[-1]["user"] == "carol"
    assert logins[-1]["key"] == ssh_env.fps["carol"]
    assert not ssh_env.mgr.execs
    # positive control: alice's own signed key execs
    r = ssh_env.ssh("alice", "echo", "EXEC_RAN")
    assert r.stdout == b"EXEC_RAN\n"


def test_host_key_is_persistent(ssh_env: SshEnv) -> None:
    first = ssh_env.handle.fingerprint
    assert ssh_env.ssh("alice", "true").returncode == 0
    assert (ssh_env.tmp / "host_key").stat().st_mode & 0o777 == 0o600

    async def restart() -> SshServerHandle:
        ssh_env.handle.close()
        await ssh_env.handle.wait_closed()
        return await start_ssh_server(ssh_env.mgr, "127.0.0.1", 0,
                                      str(ssh_env.tmp / "host_key"), str(ssh_env.tmp / "rec"))
    ssh_env.handle = ssh_env.lt.run(restart())
    assert ssh_env.handle.fingerprint == first
    # the known_hosts entry from the first server must match the restarted one
    kh = ssh_env.known_hosts.read_text()
    ssh_env.known_hosts.write_text(kh.replace(f"[127.0.0.1]:{_port_of(kh)}",
                                              f"[127.0.0.1]:{ssh_env.port}"))
    argv = ssh_env.ssh_argv("alice", "true", opts=("-o", "StrictHostKeyChecking=yes"))
    r = subprocess.run(argv, capture_output=True, timeout=60, env=_client_env(),
                       check=False)
    assert r.returncode == 0, r.stderr


def _port_of(known_hosts: str) -> str:
    return known_hosts.split("]:", 1)[1].split()[0]


# --- shared session ------------------------------------------------------------


def test_shared_session_viewer_dropped_late_joiner_sees_screen(ssh_env: SshEnv) -> None:
    e = ssh_env
    e.attach_in_tmux("alice", "alice")
    e.attach_in_tmux("carol", "carol")
    wait_until(lambda: "agent$" in e.screen("alice"), what="alice sees the prompt")
    wait_until(lambda: "agent$" in e.screen("carol"), what="carol sees the prompt")
    # the viewer types first ...
    e.type("carol", "echo VIEWER_$((6*7))")
    # ... then the collaborator (positive control); output is computed, not echoed input
    e.type("alice", "echo COLLAB_$((6*7))")
    wait_until(lambda: "COLLAB_42" in e.screen("alice"), what="collaborator's command ran")
    wait_until(lambda: "COLLAB_42" in e.screen("carol"), what="viewer sees the same output")
    for name in ("alice", "carol"):
        assert "VIEWER_42" not in e.screen(name)
        assert "VIEWER_" not in e.screen(name)
    assert not [d for u, d in e.mgr.typed if u == "carol"]
    # a late joiner sees the current screen at once, before anything new is printed
    e.attach_in_tmux("bob", "bob")
    wait_until(lambda: "COLLAB_42" in e.screen("bob"), what="late joiner sees current screen")
    # the owner types too; everyone sees it
    e.type("bob", "echo OWNER_$((5*5))")
    for name in ("alice", "bob", "carol"):
        wait_until(lambda n=name: "OWNER_25" in e.screen(n), what=f"{name} sees bob's output")
    # hand-off on a live connection: the viewer becomes owner and can type at once
    e.lt.call(e.mgr.set_role, AGENT, "carol", "owner")
    e.type("carol", "echo HANDED_$((3*3))")
    wait_until(lambda: "HANDED_9" in e.screen("alice"), what="upgraded viewer's typing arrives")
    # recordings: valid asciicast v2 with the session's output
    e.tmux("kill-session", "-t", "alice")
    wait_until(lambda: len(e.events("session.detach")) >= 1, what="detach audited")
    casts = sorted((e.tmp / "rec" / AGENT).glob("*-alice.cast"))
    assert len(casts) == 1
    lines = casts[0].read_text().splitlines()
    header = json.loads(lines[0])
    assert header["version"] == 2
    assert header["width"] == 100
    assert header["height"] == 30
    assert isinstance(header["timestamp"], int)
    events = [json.loads(x) for x in lines[1:]]
    assert all(isinstance(t, float | int) and k in ("o", "i", "r") for t, k, _ in events)
    assert [t for t, _, _ in events] == sorted(t for t, _, _ in events)
    assert "COLLAB_42" in "".join(d for _, k, d in events if k == "o")
    attaches = {str(x["user"]) for x in e.events("session.attach")}
    assert attaches == {"alice", "carol", "bob"}


def test_revoke_closes_live_connection_downgrade_drops_input(ssh_env: SshEnv) -> None:
    e = ssh_env
    e.attach_in_tmux("alice", "alice")
    e.attach_in_tmux("bob", "bob")
    wait_until(lambda: "agent$" in e.screen("bob"), what="bob attached")
    wait_until(lambda: "agent$" in e.screen("alice"), what="alice attached")
    sleeper = e.popen(e.ssh_argv("alice", "sleep", "120"), stdout=subprocess.DEVNULL,
                      stderr=subprocess.DEVNULL)
    wait_until(lambda: len(e.mgr.execs) == 1, what="exec started")
    # downgrade bob: his typing stops reaching the shell, alice's still does
    e.lt.call(e.mgr.set_role, AGENT, "bob", "viewer")
    e.type("bob", "echo DOWN_$((2*21))")
    e.type("alice", "echo STILL_$((2*21))")
    wait_until(lambda: "STILL_42" in e.screen("bob"), what="positive control output")
    assert "DOWN_42" not in e.screen("alice")
    assert "DOWN_" not in e.screen("bob")
    # revoke alice: both her connections close
    assert sleeper.poll() is None
    e.lt.call(e.mgr.set_role, AGENT, "alice", None)
    wait_until(lambda: sleeper.poll() is not None, timeout=5, what="exec connection closed")
    wait_until(lambda: "alice" not in e.tmux("list-sessions", "-F", "#{session_name}"),
               timeout=5, what="interactive connection closed")
    assert e.mgr.execs[0].proc.poll() is not None or wait_until(
        lambda: e.mgr.execs[0].proc.poll() is not None, what="exec got SIGHUP")
    # and she cannot come back
    assert e.ssh("alice", "true").returncode == 255


# --- exec ------------------------------------------------------------------------


def test_exec_streams_and_exit_status(ssh_env: SshEnv) -> None:
    r = ssh_env.ssh("alice", "echo out; echo err >&2; exit 3")
    assert r.returncode == 3
    assert r.stdout == b"out\n"
    assert r.stderr == b"err\n"
    data = os.urandom(300_000)
    r = ssh_env.ssh("alice", "sha256sum", input=data)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == hashlib.sha256(data).hexdigest().encode()
    r = ssh_env.ssh("alice", "wc -c", input=data)
    assert r.stdout.strip() == b"300000"
    # killed by a signal: exit-signal (RFC 4254 6.10), which OpenSSH's client
    # logs and, having no exit status, turns into 255 ...
    r = ssh_env.ssh("bob", "kill -TERM $$", opts=("-v",))
    assert b"rtype exit-signal" in r.stderr, r.stderr
    assert r.returncode == 255
    # ... while a plain exit with the same number stays an exit status
    r = ssh_env.ssh("bob", "exit 143", opts=("-v",))
    assert b"rtype exit-signal" not in r.stderr, r.stderr
    assert r.returncode == 143


def test_exec_with_tty_and_env_allowlist(ssh_env: SshEnv) -> None:
    r = ssh_env.ssh("alice", 'tty; echo "T=$TERM L=$LANG C=$LC_TIME F=$FOO"; exit 5',
                    opts=("-tt", "-o", "SetEnv=LANG=C.UTF-8 LC_TIME=C FOO=bar"))
    assert r.returncode == 5, r.stderr
    out = r.stdout.decode()
    assert "/dev/pts/" in out
    assert "L=C.UTF-8 C=C F=\r" in out
    assert "T=xterm" in out
    r = ssh_env.ssh("alice", "test -t 0 && echo TTY || echo NOTTY", opts=("-T",))
    assert r.stdout == b"NOTTY\n"


def test_viewer_cannot_exec(ssh_env: SshEnv) -> None:
    r = ssh_env.ssh("carol", "touch", str(ssh_env.tmp / "ws" / "pwned"))
    assert r.returncode != 0
    assert not (ssh_env.tmp / "ws" / "pwned").exists()
    assert not ssh_env.mgr.execs
    r = ssh_env.ssh("alice", "touch", str(ssh_env.tmp / "ws" / "fine"))
    assert r.returncode == 0
    assert (ssh_env.tmp / "ws" / "fine").exists()


# --- forwarding --------------------------------------------------------------------


@pytest.fixture
def agent_tcp(ssh_env: SshEnv) -> Iterator[int]:
    """A real TCP server on 127.0.0.1 standing for a dev server inside the agent."""
    import asyncio

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        line = await r.readline()
        w.write(b"agent says " + line)
        await w.drain()
        w.close()

    async def start() -> asyncio.Server:
        return await asyncio.start_server(handle, "127.0.0.1", 0)
    server = ssh_env.lt.run(start())
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        async def stop() -> None:
            server.close()
            await server.wait_closed()
        ssh_env.lt.run(stop())


def _through(port: int) -> bytes:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"hi\n")
            chunks = []
            while True:
                data = s.recv(4096)
                if not data:
                    break
                chunks.append(data)
            return b"".join(chunks)
    except OSError:
        return b""


def _forward(e: SshEnv, user: str, spec: str) -> tuple[subprocess.Popen[Any], int]:
    lport = _free_port()
    p = e.popen(["ssh", "-p", str(e.port), *e.opts(user), "-N", "-o", "ExitOnForwardFailure=yes",
                 "-L", f"{lport}:{spec}", f"{AGENT}@127.0.0.1"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(lambda: _listening(lport) or p.poll() is not None, what="ssh -L listening")
    return p, lport


def _listening(port: int) -> bool:
    # Asked of the kernel, not by connecting: a probe connection would be forwarded.
    out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True,
                         check=False).stdout
    return bool(out.strip())


def test_local_forward_for_collaborator_not_viewer(ssh_env: SshEnv, agent_tcp: int) -> None:
    _, lport = _forward(ssh_env, "alice", f"localhost:{agent_tcp}")
    assert _through(lport) == b"agent says hi\n"
    _, lport = _forward(ssh_env, "carol", f"localhost:{agent_tcp}")
    assert _through(lport) == b""
    assert ssh_env.mgr.tcp_opens == [agent_tcp]


def test_forward_to_other_hosts_refused(ssh_env: SshEnv, agent_tcp: int) -> None:
    # 127.0.0.2 is the host's loopback too: only the agent's localhost is reachable
    _, lport = _forward(ssh_env, "alice", f"127.0.0.2:{agent_tcp}")
    assert _through(lport) == b""
    _, lport = _forward(ssh_env, "alice", f"127.0.0.1:{agent_tcp}")
    assert _through(lport) == b"agent says hi\n"
    assert ssh_env.mgr.tcp_opens == [agent_tcp]


def test_remote_forward_refused(ssh_env: SshEnv) -> None:
    r = ssh_env.ssh("alice", opts=("-N", "-o", "ExitOnForwardFailure=yes",
                                   "-R", "0:localhost:22"))
    assert r.returncode == 255
    assert b"forwarding failed" in r.stderr


# --- files ----------------------------------------------------------------------


def _sftp(e: SshEnv, user: str, batch: str) -> subprocess.CompletedProcess[bytes]:
    bf = e.tmp / f"batch-{user}-{time.monotonic_ns()}"
    bf.write_text(batch)
    return subprocess.run(["sftp", "-P", str(e.port), *e.opts(user), "-b", str(bf),
                           f"{AGENT}@127.0.0.1"], capture_output=True, timeout=60,
                          env=_client_env(), cwd=e.tmp, check=False)


def test_sftp_read_write_and_viewer_read_only(ssh_env: SshEnv) -> None:
    e = ssh_env
    ws = e.tmp / "ws"
    (ws / "readme.txt").write_text("hello workspace\n")
    (e.tmp / "upload.txt").write_text("uploaded\n")
    r = _sftp(e, "alice", "get readme.txt got.txt\nmkdir newdir\nput upload.txt newdir/up.txt\n"
                          "rename newdir/up.txt newdir/moved.txt\nls -la newdir\n")
    assert r.returncode == 0, r.stderr
    assert (e.tmp / "got.txt").read_text() == "hello workspace\n"
    assert (ws / "newdir" / "moved.txt").read_text() == "uploaded\n"
    # viewer: reading works (positive control), every write is refused
    r = _sftp(e, "carol", "get readme.txt carol.txt\n")
    assert r.returncode == 0, r.stderr
    assert (e.tmp / "carol.txt").read_text() == "hello workspace\n"
    for cmd in ("put upload.txt viewer.txt", "mkdir viewerdir", "rm readme.txt",
                "rename readme.txt x.txt", "chmod 777 readme.txt", "rmdir newdir",
                "symlink readme.txt viewer-link"):
        r = _sftp(e, "carol", cmd + "\n")
        assert r.returncode != 0, cmd
        assert b"ermission denied" in r.stderr, (cmd, r.stderr)
    assert sorted(p.name for p in ws.iterdir()) == ["newdir", "readme.txt"]
    assert (ws / "readme.txt").stat().st_mode & 0o777 != 0o777
    # scp -s (the sftp protocol) works the same way
    r = subprocess.run(["scp", "-s", "-P", str(e.port), *e.opts("alice"), str(e.tmp / "upload.txt"),
                        f"{AGENT}@127.0.0.1:/scp.txt"], capture_output=True, timeout=60,
                       env=_client_env(), check=False)
    assert r.returncode == 0, r.stderr
    assert (ws / "scp.txt").read_text() == "uploaded\n"
    r = subprocess.run(["scp", "-s", "-P", str(e.port), *e.opts("carol"), str(e.tmp / "upload.txt"),
                        f"{AGENT}@127.0.0.1:/scp2.txt"], capture_output=True, timeout=60,
                       env=_client_env(), check=False)
    assert r.returncode != 0
    assert not (ws / "scp2.txt").exists()


def test_sftp_symlinks_and_dotdot_do_not_escape(ssh_env: SshEnv, uniq: str) -> None:
    e = ssh_env
    ws = e.tmp / "ws"
    (ws / "normal.txt").write_text("inside\n")
    (ws / "etc").symlink_to("/etc")
    (ws / "abs").symlink_to("/etc/passwd")
    (ws / "rel").symlink_to("../../../../../../../../etc/passwd")
    (ws / "sub").mkdir()
    (ws / "sub" / "up").symlink_to("../../..")
    (e.tmp / "upload.txt").write_text("evil\n")
    r = _sftp(e, "alice", "get normal.txt n.txt\n")
    assert r.returncode == 0, r.stderr
    assert (e.tmp / "n.txt").read_text() == "inside\n"
    for path in ("etc/passwd", "abs", "rel", "../../../../etc/passwd", "/../../etc/passwd",
                 "sub/up/etc/passwd", "sub/up/sub/up/passwd"):
        r = _sftp(e, "alice", f"get {path} leak.txt\n")
        assert r.returncode != 0, path
        assert not (e.tmp / "leak.txt").exists(), path
    # writes through the planted links land nowhere outside
    for path in (f"etc/{uniq}", f"../../{uniq}", f"sub/up/etc/{uniq}"):
        _sftp(e, "alice", f"put upload.txt {path}\n")
        assert not Path(f"/etc/{uniq}").exists()
        assert not (e.tmp.parent / uniq).exists()
    # listing a link to / shows the workspace, not the host
    r = _sftp(e, "alice", "ls sub/up\n")
    assert b"normal.txt" in r.stdout
    assert b"passwd" not in r.stdout
