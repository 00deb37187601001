"""Team access over SSH against the real daemon, with the real OpenSSH client."""

from __future__ import annotations

import contextlib
import http.server
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import Daemon, free_port
from tests.e2e.test_session import Tmux

pytestmark = pytest.mark.root


class Team:
    def __init__(self, d: Daemon, tmp: Path) -> None:
        self.d = d
        self.tmp = tmp

    def key(self, user: str) -> Path:
        key = self.tmp / f"{user}_key"
        if not key.exists():
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                           check=True)
        return key

    def add(self, user: str, agent: str, role: str) -> None:
        self.d.cli("user", "add", user, "--key", f"{self.key(user)}.pub", check=True)
        self.d.cli("grant", agent, user, "--role", role, check=True)

    def opts(self, user: str) -> list[str]:
        return ["-F", "/dev/null", "-o", "StrictHostKeyChecking=no",
                "-o", f"UserKnownHostsFile={self.tmp}/known_hosts", "-o", "IdentitiesOnly=yes",
                "-o", "BatchMode=yes", "-o", "LogLevel=ERROR", "-i", str(self.key(user))]

    def ssh(self, user: str, agent: str, *cmd: str, tty: bool = False,
            timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(["ssh", "-p", str(self.d.ssh_port), *self.opts(user),
                               *(["-tt"] if tty else []), f"{agent}@127.0.0.1", *cmd],
                              capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def ssh_cmdline(self, user: str, agent: str) -> str:
        return " ".join(["ssh", "-p", str(self.d.ssh_port), *self.opts(user),
                         f"{agent}@127.0.0.1"])

    def sftp(self, user: str, agent: str, batch: str) -> subprocess.CompletedProcess[bytes]:
        bf = self.tmp / f"batch-{user}"
        bf.write_text(batch)
        return subprocess.run(["sftp", "-P", str(self.d.ssh_port), *self.opts(user), "-b",
                               str(bf), f"{agent}@127.0.0.1"], capture_output=True, timeout=60,
                              cwd=self.tmp)


@pytest.fixture
def team(daemon: Daemon, project: Path, tmp_path: Path) -> Team:
    daemon.create("web", "--template", "default", "--project", str(project))
    daemon.wait_state("web", ("running",))
    return Team(daemon, tmp_path)


@pytest.fixture
def tmux(uniq: str) -> Iterator[Tmux]:
    t = Tmux(f"corral-ssh-{uniq}")
    try:
        yield t
    finally:
        t.kill()


def test_exec_with_and_without_tty(team: Team) -> None:
    team.add("alice", "web", "collaborator")
    r = team.ssh("alice", "web", "echo out; echo err >&2; hostname; exit 3")
    assert r.returncode == 3
    assert r.stdout == b"out\nweb\n"
    assert r.stderr == b"err\n"
    r = team.ssh("alice", "web", "test -t 0 && echo ISTTY", tty=True)
    assert b"ISTTY" in r.stdout
    # without -t there is no terminal
    r = team.ssh("alice", "web", "test -t 0 || echo NOTTY")
    assert b"NOTTY" in r.stdout


def test_unregistered_and_ungranted_keys_refused(team: Team) -> None:
    team.key("mallory")
    r = team.ssh("mallory", "web", "true")
    assert r.returncode == 255
    # registered, but granted nothing on this agent
    team.d.cli("user", "add", "bob", "--key", f"{team.key('bob')}.pub", check=True)
    r = team.ssh("bob", "web", "true")
    assert r.returncode == 255
    # positive control
    team.d.cli("grant", "web", "bob", "--role", "collaborator", check=True)
    assert team.ssh("bob", "web", "true").returncode == 0
    events = team.d.json("events", "--agent", "web")
    assert any(e["kind"] == "ssh.login_failed" for e in events)
    assert any(e["kind"] == "ssh.login" for e in events)


def test_viewer_cannot_exec_but_collaborator_can(team: Team) -> None:
    team.add("val", "web", "viewer")
    team.add("cole", "web", "collaborator")
    assert team.ssh("val", "web", "touch /workspace/v").returncode != 0
    assert team.ssh("cole", "web", "touch /workspace/c").returncode == 0
    names = team.d.json("diff", "web")
    paths = {c["path"] for c in names}
    assert "c" in paths
    assert "v" not in paths


def test_sftp_read_write_and_viewer_read_only(team: Team, tmp_path: Path) -> None:
    team.add("alice", "web", "collaborator")
    team.add("val", "web", "viewer")
    (tmp_path / "up.txt").write_text("uploaded\n")
    r = team.sftp("alice", "web", "put up.txt up.txt\nget README.md readme.txt\n")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "readme.txt").read_text() == "hello from the project\n"
    out = team.d.cli("exec", "web", "--", "cat", "/workspace/up.txt", check=True).stdout
    assert out == "uploaded\n"
    r = team.sftp("val", "web", "put up.txt viewer.txt\n")
    assert r.returncode != 0
    assert team.d.cli("exec", "web", "--", "test", "-e", "/workspace/viewer.txt").returncode == 1
    # a symlink the agent planted does not lead sftp out of the workspace
    team.d.cli("exec", "web", "--", "ln", "-s", "/etc", "/workspace/etc-link", check=True)
    r = team.sftp("alice", "web", "get etc-link/passwd stolen\n")
    assert not (tmp_path / "stolen").exists() or "root:" not in (tmp_path / "stolen").read_text()


def test_shared_session_viewer_and_revoke(team: Team, tmux: Tmux, uniq: str) -> None:
    team.add("alice", "web", "collaborator")
    team.add("val", "web", "viewer")
    tmux.new("a", team.ssh_cmdline("alice", "web"))
    tmux.new("v", team.ssh_cmdline("val", "web"))
    time.sleep(2)
    tmux.keys("v", f"touch /tmp/viewer-{uniq}", "Enter")
    tmux.keys("a", f"echo HELLO-{uniq}-$((6*7))", "Enter")
    tmux.wait_for("a", f"HELLO-{uniq}-42")
    tmux.wait_for("v", f"HELLO-{uniq}-42")
    assert team.d.cli("exec", "web", "--", "test", "-e", f"/tmp/viewer-{uniq}").returncode == 1
    # a late joiner sees the current screen
    tmux.new("late", team.ssh_cmdline("alice", "web"))
    tmux.wait_for("late", f"HELLO-{uniq}-42")
    # revoking ends the live connection
    team.d.cli("revoke", "web", "alice", check=True)
    deadline = time.monotonic() + 10
    while tmux.alive("a") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not tmux.alive("a")
    assert tmux.alive("v")
    recs = list(Path(team.d.state_dir, "recordings").rglob("*.cast"))
    assert recs
    assert recs[0].read_text().startswith('{"version": 2')


def _listening(port: int) -> bool:
    # Asked of the kernel, not by connecting: a probe connection would be forwarded.
    out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True,
                         check=False).stdout
    return bool(out.strip())


def _get(port: int) -> bytes:
    """An HTTP request through the forward; b"" when the channel was refused."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            return s.recv(100)
    except OSError:
        return b""


class _Outside(http.server.BaseHTTPRequestHandler):
    """The host's server: one fixed page, no files, no log lines."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"the host, not the agent\n")

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def forward(team: Team, user: str, dest: str) -> Iterator[int]:
    """`ssh -N -L PORT:DEST`, yielded once ssh listens, that is once it has logged in."""
    lport = free_port()
    proc = subprocess.Popen(["ssh", "-p", str(team.d.ssh_port), *team.opts(user), "-N",
                             "-o", "ExitOnForwardFailure=yes", "-L", f"{lport}:{dest}",
                             "web@127.0.0.1"])
    try:
        deadline = time.monotonic() + 30
        while not _listening(lport):
            assert proc.poll() is None, f"ssh -L as {user} exited with {proc.returncode}"
            assert time.monotonic() < deadline, f"ssh -L as {user} never listened"
            time.sleep(0.1)
        yield lport
    finally:
        # Debian 12's ssh (9.2) can lose a SIGTERM that lands while it handles a
        # refused channel (its poll emulation races with the handler), so SIGKILL
        # follows a bounded wait.
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def test_local_forward_reaches_inside_netns(team: Team) -> None:
    team.add("alice", "web", "collaborator")
    team.add("val", "web", "viewer")
    # a server inside the sandbox, on its loopback only
    team.d.cli("exec", "web", "--", "sh", "-c",
               "nohup python3 -m http.server 8000 --bind 127.0.0.1 >/tmp/http.log 2>&1 &",
               check=True)
    # a server on the host's loopback, which the agent's localhost is not
    outside = http.server.HTTPServer(("127.0.0.1", 0), _Outside)
    threading.Thread(target=outside.serve_forever, daemon=True).start()
    try:
        with forward(team, "alice", "localhost:8000") as lport:
            body = b""
            deadline = time.monotonic() + 30
            while not body.startswith(b"HTTP/") and time.monotonic() < deadline:
                body = _get(lport)  # the server inside may still be starting
                time.sleep(0.3)
            assert body.startswith(b"HTTP/1.0 200")
        # the host's server is up (positive control), and not reachable through the agent
        assert _get(outside.server_port).startswith(b"HTTP/1.0 200")
        with forward(team, "alice", f"localhost:{outside.server_port}") as lport:
            assert _get(lport) == b""
        # a viewer logs in, but may not forward
        with forward(team, "val", "localhost:8000") as vport:
            assert _get(vport) == b""
    finally:
        outside.shutdown()
        outside.server_close()


def test_same_host_key_after_daemon_restart(team: Team) -> None:
    team.add("alice", "web", "collaborator")
    assert team.ssh("alice", "web", "true").returncode == 0
    team.d.stop()
    team.d.start()
    team.d.wait_state("web", ("running",))
    # StrictHostKeyChecking against the recorded known_hosts: a new key would fail
    r = subprocess.run(["ssh", "-p", str(team.d.ssh_port), *team.opts("alice"),
                        "-o", "StrictHostKeyChecking=yes", "web@127.0.0.1", "true"],
                       capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_late_joiner_sees_a_full_screen_program(team: Team, tmux: Tmux, uniq: str) -> None:
    team.add("alice", "web", "collaborator")
    team.add("cole", "web", "collaborator")
    team.d.cli("exec", "web", "--", "sh", "-c",
               f"printf 'line one {uniq}\\nline two\\n' > /workspace/notes.txt", check=True)
    tmux.new("a", team.ssh_cmdline("alice", "web"))
    time.sleep(2)
    tmux.keys("a", f"echo before-vi-{uniq}-$((6*7))", "Enter")
    tmux.wait_for("a", f"before-vi-{uniq}-42")
    tmux.keys("a", "vi /workspace/notes.txt", "Enter")
    tmux.wait_for("a", f"line one {uniq}")
    # the editor's screen (text at the top, "~" filler lines, status line)
    # is repainted for a newcomer from the screen model, not replayed
    tmux.new("late", team.ssh_cmdline("cole", "web"))
    screen = tmux.wait_for("late", f"line one {uniq}")
    lines = screen.splitlines()
    assert lines[0].startswith(f"line one {uniq}"), screen
    assert sum(1 for ln in lines if ln.strip() == "~") >= 5, screen
    # and both keep typing into the same editor
    tmux.keys("late", "Go", f"added-{uniq}", "Escape")
    tmux.wait_for("a", f"added-{uniq}")
    tmux.keys("a", ":q!", "Enter")
    # Leaving vi shows the newcomer the shell's screen as it was when vi
    # started (painted under the editor's), not a blank one.
    tmux.wait_for("late", f"before-vi-{uniq}-42")


def test_late_joiner_gets_the_programs_terminal_modes(team: Team, tmux: Tmux,
                                                      uniq: str) -> None:
    """bash asks for bracketed paste at its prompt; a client that attaches
    later must be in that mode too, or a pasted line runs at once."""
    team.add("alice", "web", "collaborator")
    team.add("cole", "web", "collaborator")
    tmux.new("a", team.ssh_cmdline("alice", "web"))
    time.sleep(2)
    tmux.keys("a", f"echo ready-{uniq}-$((6*7))", "Enter")
    tmux.wait_for("a", f"ready-{uniq}-42")
    tmux.new("late", team.ssh_cmdline("cole", "web"))
    tmux.wait_for("late", f"ready-{uniq}-42")
    # tmux brackets a paste (-p) only for a pane whose program asked for it:
    # here the program is our repaint, standing in for bash
    tmux.run("set-buffer", "-b", f"p{uniq}", f"echo pasted-{uniq}-$((6*8))\n")
    tmux.run("paste-buffer", "-p", "-b", f"p{uniq}", "-t", "late")
    tmux.wait_for("a", f"echo pasted-{uniq}-$((6*8))")
    time.sleep(1.5)
    assert f"pasted-{uniq}-48" not in tmux.screen("a"), "the paste ran without Enter"
    # positive control: Enter runs it
    tmux.keys("late", "Enter")
    tmux.wait_for("a", f"pasted-{uniq}-48")


def test_session_killed_by_a_signal_ends_with_exit_signal(team: Team, tmux: Tmux,
                                                          uniq: str) -> None:
    """RFC 4254 6.10: when the session's process dies of a signal, attached
    clients get exit-signal (not only exit-status 128+N). OpenSSH's client
    logs the request and, having no exit status, exits 255."""
    team.add("alice", "web", "collaborator")
    log = team.tmp / f"ssh-{uniq}.log"
    cmd = team.ssh_cmdline("alice", "web").replace("LogLevel=ERROR", "LogLevel=DEBUG")
    tmux.new("a", f"{cmd} 2>{log}; echo SSH-RC=$? >>{log}; sleep 60")
    time.sleep(2)
    tmux.keys("a", f"echo READY-{uniq}-$((6*7))", "Enter")
    tmux.wait_for("a", f"READY-{uniq}-42")
    tmux.keys("a", "kill -KILL $$", "Enter")
    deadline = time.monotonic() + 30
    while "SSH-RC=" not in (text := log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "rtype exit-signal" in text, text
    assert "rtype exit-status" not in text, text
    assert "SSH-RC=255" in text, text


def test_exec_killed_by_a_signal_ends_with_exit_signal(team: Team) -> None:
    """`ssh NAME@host CMD` whose command dies of a signal: exit-signal, as for
    the shell session; a command that exits 143 itself still gets 143."""
    team.add("alice", "web", "collaborator")
    opts = [o.replace("LogLevel=ERROR", "LogLevel=DEBUG") for o in team.opts("alice")]
    r = subprocess.run(["ssh", "-p", str(team.d.ssh_port), *opts, "web@127.0.0.1",
                        "kill -TERM $$"], capture_output=True, timeout=60,
                       stdin=subprocess.DEVNULL)
    text = r.stderr.decode(errors="replace")
    assert "rtype exit-signal" in text, text
    assert "rtype exit-status" not in text, text
    assert r.returncode == 255
    assert team.ssh("alice", "web", "exit 143").returncode == 143  # positive control
