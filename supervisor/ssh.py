"""The daemon's SSH server (asyncssh): team members reach agents with plain OpenSSH.

`start_ssh_server` wires the pieces, one module per protocol concept:

- `ssh_auth`    — login by public key, role bound to the key that signed; channel admission
- `ssh_session` — shell (the shared terminal), exec, the sftp subsystem; env allow-list
- `ssh_forward` — `ssh -L` into the agent's network namespace
- `ssh_sftp`    — SFTP chrooted by openat2(RESOLVE_IN_ROOT) on the workspace
- `ssh_access`  — live (agent, user, role) per connection; revocation within a second
- `recording`   — asciicast v2 of every attached session

The host key is an ed25519 key generated once at `host_key_path` (0600) and
reused, so clients see the same fingerprint across restarts. Key exchange
offers curve25519 first: OpenSSH's default post-quantum exchange costs ~200 ms
of CPU per login on a small host (DESIGN.md).
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import asyncssh

from sandbox.errors import HostSetupError
from supervisor.ssh_access import AccessRegistry, ManagerLike, SshContext, SshLimits, TaskSet
from supervisor.ssh_auth import CorralSSHServer

__all__ = ["SshLimits", "SshServerHandle", "load_or_create_host_key", "start_ssh_server"]

log = logging.getLogger(__name__)

KEX_ALGS = [
    "curve25519-sha256",
    "curve25519-sha256@libssh.org",
    "ecdh-sha2-nistp256",
    "diffie-hellman-group14-sha256",
]
# Ciphers: AES (hardware-accelerated, one C call per packet in `cryptography`)
# and no chacha20-poly1305, which OpenSSH's client would otherwise pick first:
# asyncssh builds three cipher objects per chacha packet, and it sends two
# packets per 32 KiB of session output, so with several clients attached
# chacha was the daemon's largest cost (scripts/bench_ssh.py). AES-CTR stays
# for clients without GCM (paramiko); with it, MACs are encrypt-then-MAC SHA-2.
ENCRYPTION_ALGS = [
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "aes128-ctr",
    "aes192-ctr",
    "aes256-ctr",
]
MAC_ALGS = [
    "hmac-sha2-256-etm@openssh.com",
    "hmac-sha2-512-etm@openssh.com",
    "hmac-sha2-256",
    "hmac-sha2-512",
]


def load_or_create_host_key(path: str) -> asyncssh.SSHKey:
    """Read the ed25519 host key at `path`, generating it (mode 0600) the first time."""
    if Path(path).exists():
        try:
            if Path(path).stat().st_mode & 0o077:
                log.warning("SSH host key %s was readable by others: mode set to 0600", path)
                Path(path).chmod(0o600)
            return asyncssh.read_private_key(path)
        except (OSError, asyncssh.KeyImportError) as exc:
            raise HostSetupError(
                f"cannot read the SSH host key {path}: {exc}",
                hint="restore the file, or move it away to generate a new key "
                     "(clients will then warn about a changed host key)") from exc
    Path(path).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = asyncssh.generate_private_key("ssh-ed25519", comment="corral host key")
    tmp = f"{path}.tmp{os.getpid()}"
    # Written under a temporary name and renamed: a crash never leaves half a key.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW,
                 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(key.export_private_key())
            f.flush()
            os.fsync(f.fileno())
        Path(tmp).replace(path)
    except BaseException:
        try:
            Path(tmp).unlink()
        except FileNotFoundError:
            pass
        raise
    log.info("generated SSH host key %s (%s)", path, key.get_fingerprint("sha256"))
    return key


def _make_private_dir(path: str) -> None:
    Path(path).mkdir(mode=0o700, parents=True, exist_ok=True)


class SshServerHandle:
    """The running server: its port, and how to stop it (live connections included)."""

    def __init__(self, acceptor: asyncssh.SSHAcceptor, ctx: SshContext,
                 manager: ManagerLike) -> None:
        self._acceptor = acceptor
        self._ctx = ctx
        self._manager = manager
        self.port: int = acceptor.get_port()
        self.fingerprint = ""

    def close(self) -> None:
        try:
            self._manager.on_access_change.remove(self._ctx.registry.on_access_change)
        except ValueError:
            pass
        self._acceptor.close()
        for access in self._ctx.registry.live():
            access.disconnect()
        self._ctx.tasks.cancel_all()

    async def wait_closed(self) -> None:
        await self._acceptor.wait_closed()
        await self._ctx.tasks.wait()


async def start_ssh_server(manager: ManagerLike, host: str, port: int, host_key_path: str,
                           recordings_dir: str, *,
                           limits: SshLimits = SshLimits()) -> SshServerHandle:  # noqa: B008
    """Listen on host:port; returns once the socket is bound (port 0 → an ephemeral port)."""
    key = load_or_create_host_key(host_key_path)
    _make_private_dir(recordings_dir)
    ctx = SshContext(manager=manager, limits=limits, recordings_dir=recordings_dir,
                     registry=AccessRegistry(manager, asyncio.get_running_loop()),
                     tasks=TaskSet())
    acceptor = await asyncssh.create_server(
        lambda: CorralSSHServer(ctx), host, port,
        server_host_keys=[key],
        kex_algs=KEX_ALGS, encryption_algs=ENCRYPTION_ALGS, mac_algs=MAC_ALGS,
        # public keys only; everything else off at the protocol level
        public_key_auth=True, password_auth=False, kbdint_auth=False,
        host_based_auth=False, gss_host=None,
        agent_forwarding=False, x11_forwarding=False,
        allow_pty=True, line_editor=False,     # raw bytes to the shared terminal
        encoding=None,
        login_timeout=limits.login_grace,
        keepalive_interval=30, keepalive_count_max=4,
        server_version="corral",
        reuse_address=True,
    )
    manager.on_access_change.append(ctx.registry.on_access_change)
    handle = SshServerHandle(acceptor, ctx, manager)
    handle.fingerprint = key.get_fingerprint("sha256")
    log.info("SSH server on %s:%d (host key %s)", host, handle.port, handle.fingerprint)
    return handle
