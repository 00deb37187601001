"""Pure SSH policy: env/TERM/size rules, forward targets, sftp paths, host key, revocation."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from sandbox.errors import HostSetupError
from supervisor.ssh import load_or_create_host_key
from supervisor.ssh_access import Access, AccessRegistry, SshLimits
from supervisor.ssh_forward import forward_allowed
from supervisor.ssh_session import clamp_size, env_allowed, pty_size_allowed, term_allowed
from supervisor.ssh_sftp import _rel, _split

LIM = SshLimits()


@pytest.mark.parametrize(("key", "value", "ok"), [
    (b"LANG", b"C.UTF-8", True),
    (b"LC_ALL", b"C", True),
    (b"LC_TIME", b"en_GB.UTF-8", True),
    (b"TERM", b"xterm-256color", True),
    (b"LD_PRELOAD", b"/tmp/x.so", False),
    (b"PATH", b"/tmp", False),
    (b"LANGUAGE", b"en", False),
    (b"LC_", b"C", False),
    (b"lc_all", b"C", False),
    (b"LANG", b"x" * 257, False),
    (b"LANG", b"C\nEVIL=1", False),
    (b"LANG", b"\x1b]0;t\x07", False),
])
def test_env_allowlist(key: bytes, value: bytes, ok: bool) -> None:
    assert env_allowed(key, value, 0, LIM) is ok


def test_env_count_is_bounded() -> None:
    assert env_allowed(b"LANG", b"C", LIM.max_env_count - 1, LIM)
    assert not env_allowed(b"LANG", b"C", LIM.max_env_count, LIM)


@pytest.mark.parametrize(("term", "ok"), [
    ("xterm-256color", True), ("screen.xterm", True), ("vt100", True),
    ("", False), ("x" * 300, False), ("xterm\x1b]0;x\x07", False), ("../../bin/sh", False),
    ("xterm 256", False),
])
def test_term_rule(term: str, ok: bool) -> None:
    assert term_allowed(term, LIM) is ok


def test_sizes() -> None:
    assert clamp_size(0, 0, LIM) == (80, 24)
    assert clamp_size(10**9, 10**9, LIM) == (LIM.max_cols, LIM.max_rows)
    assert clamp_size(120, 40, LIM) == (120, 40)
    assert pty_size_allowed(0, 0, LIM)
    assert pty_size_allowed(LIM.max_cols, LIM.max_rows, LIM)
    assert not pty_size_allowed(LIM.max_cols + 1, 24, LIM)
    assert not pty_size_allowed(80, 2**32 - 1, LIM)


@pytest.mark.parametrize(("host", "port", "ok"), [
    ("localhost", 8000, True), ("127.0.0.1", 8000, True), ("LOCALHOST", 1, True),
    ("::1", 65535, True), ("127.0.0.2", 8000, False), ("10.0.0.1", 80, False),
    ("example.com", 443, False), ("localhost.evil.com", 80, False), ("localhost", 0, False),
    ("localhost", 70000, False), ("", 80, False),
])
def test_forward_targets(host: str, port: int, ok: bool) -> None:
    assert forward_allowed(host, port) is ok


@pytest.mark.parametrize(("path", "rel"), [
    (b"", b"."), (b"/", b"."), (b".", b"."), (b"a/b", b"a/b"), (b"/a/../b", b"b"),
    (b"../../etc/passwd", b"etc/passwd"), (b"/../..//x/./y", b"x/y"),
])
def test_sftp_paths_are_lexically_clamped(path: bytes, rel: bytes) -> None:
    assert _rel(path) == rel


def test_sftp_split_refuses_the_root_itself() -> None:
    import asyncssh
    assert _split(b"/a/b") == (b"a", b"b")
    assert _split(b"x") == (b".", b"x")
    with pytest.raises(asyncssh.SFTPPermissionDenied):
        _split(b"/..")
    with pytest.raises(asyncssh.SFTPInvalidFilename):
        _rel(b"a\0b")


def test_host_key_created_once_private_and_stable(tmp_path: Path) -> None:
    path = tmp_path / "state" / "ssh_host_ed25519_key"
    first = load_or_create_host_key(str(path))
    assert path.stat().st_mode & 0o777 == 0o600
    assert first.algorithm == b"ssh-ed25519"
    again = load_or_create_host_key(str(path))
    assert again.get_fingerprint("sha256") == first.get_fingerprint("sha256")
    assert [p.name for p in path.parent.iterdir()] == [path.name]   # no temp file left
    path.write_text("garbage")
    with pytest.raises(HostSetupError) as err:
        load_or_create_host_key(str(path))
    assert err.value.hint


class _Roles:
    """A tiny real role table (what Manager.role answers)."""

    def __init__(self) -> None:
        self.table: dict[tuple[str, str], str] = {}
        self.on_access_change: list[Callable[[str, str], None]] = []

    def role(self, agent: str, user: str) -> str | None:
        return self.table.get((agent, user))


class _Chan:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


def test_registry_applies_revoke_and_downgrade() -> None:
    loop = asyncio.new_event_loop()
    try:
        roles = _Roles()
        reg = AccessRegistry(roles, loop)  # type: ignore[arg-type]
        disconnected: list[str] = []
        accs = {}
        for user in ("alice", "bob", "carol"):
            roles.table[("demo", user)] = "collaborator"
            accs[user] = Access("demo", user, "SHA256:x", "127.0.0.1:1", "collaborator",
                                disconnect=lambda u=user: disconnected.append(u))
            reg.add(accs[user])
        fwd = _Chan()
        accs["bob"].writer_channels.add(fwd)
        # bob downgraded: stays connected, loses writer channels and write access
        roles.table[("demo", "bob")] = "viewer"
        reg.recheck("demo", "bob")
        assert not accs["bob"].can_write
        assert fwd.closed
        assert disconnected == []
        # alice revoked: disconnected, gone from the registry
        del roles.table[("demo", "alice")]
        reg.recheck("demo", "alice")
        assert disconnected == ["alice"]
        assert accs["alice"] not in reg.live()
        # carol unaffected (a change for another agent does nothing)
        reg.recheck("other", "carol")
        assert accs["carol"].can_write
        assert accs["carol"] in reg.live()
        # a callback from another thread is marshalled onto the loop
        del roles.table[("demo", "carol")]
        import threading
        t = threading.Thread(target=reg.on_access_change, args=("demo", "carol"))
        t.start()
        t.join()
        assert "carol" not in disconnected
        loop.run_until_complete(asyncio.sleep(0))
        assert disconnected == ["alice", "carol"]
    finally:
        loop.close()


