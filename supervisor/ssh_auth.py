"""One SSH connection: public-key login bound to the key that signed, and channel admission.

Login: the SSH user name is the agent's name. A key is acceptable when the
manager knows its fingerprint (`user_for_key`) and that user has a role on the
agent (`role`). Password, keyboard-interactive, host-based and GSS logins are
switched off in `start_ssh_server`; here only public keys are answered.

Binding the role to the key that actually signed: asyncssh calls
`validate_public_key` both for a key merely *offered* (no signature; the
client asks "would you accept this?") and, again, for the key whose signature
it is about to verify. For the signed request, our (synchronous) callback,
asyncssh's signature check and `auth_completed` run back to back with no await
in between (asyncssh connection.py: `validate_public_key` → `key.verify` →
`send_userauth_success` → `auth_completed`), so the candidate recorded by the
last `validate_public_key` call *is* the signing key when `auth_completed`
runs. `auth_completed` still looks the role up again, so it is the role at
signature time, not at offer time.

Admission after login: at most `max_channels` channels at once per connection;
session channels go to `AgentSession`, direct-tcpip to the agent's loopback
only (`ssh_forward`); remote forwarding, unix-socket forwarding, agent and X11
forwarding are refused (asyncssh's defaults for the first ones, and
`agent_forwarding=False, x11_forwarding=False` in `start_ssh_server`).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from typing import Any

import asyncssh

from supervisor.ssh_access import AGENT_NAME, Access, SshContext
from supervisor.ssh_forward import forward_allowed, open_forward
from supervisor.ssh_session import AgentSession, SessionChannel

log = logging.getLogger(__name__)


class CorralSSHServer(asyncssh.SSHServer):
    """asyncssh server callbacks for one connection."""

    def __init__(self, ctx: SshContext) -> None:
        self._ctx = ctx
        self._conn: asyncssh.SSHServerConnection | None = None
        self._addr = "?"
        self._agent = ""
        self._preauth = False
        self._candidate: tuple[str, str, str] | None = None   # (fingerprint, user, role)
        self._last_fp: str | None = None
        self._last_user: str | None = None
        self.access: Access | None = None
        self._channels = 0
        self._chan_seq = 0
        self._refused_channels = 0
        self._key_tries = 0

    # --- connection lifetime ---------------------------------------------------

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._conn = conn
        peer = conn.get_extra_info("peername") or ("?", 0)
        self._addr = f"{peer[0]}:{peer[1]}"
        if self._ctx.preauth >= self._ctx.limits.max_preauth:
            # Too many half-open logins: drop this one before any key exchange work.
            log.warning("pre-auth connection cap (%d) reached: dropping %s",
                        self._ctx.limits.max_preauth, self._addr)
            conn.abort()
            return
        self._ctx.preauth += 1
        self._preauth = True

    def _leave_preauth(self) -> None:
        if self._preauth:
            self._preauth = False
            self._ctx.preauth -= 1

    def connection_lost(self, exc: Exception | None) -> None:
        self._leave_preauth()
        if self.access is not None:
            self._ctx.registry.discard(self.access)
            log.info("[agent=%s user=%s] connection from %s closed", self.access.agent,
                     self.access.user, self._addr)
        elif self._agent:
            # Never authenticated: one audit record per failed connection, not per key
            # tried. A user name that is no agent name is not used as one.
            valid = bool(AGENT_NAME.match(self._agent))
            self._audit("ssh.login_failed", self._agent if valid else None,
                        user=self._last_user, key=self._last_fp, addr=self._addr,
                        **({} if valid else {"ssh_user": self._agent[:64]}))

    def _audit(self, kind: str, agent: str | None, **data: object) -> None:
        try:
            self._ctx.manager.audit(kind, agent, **data)
        except Exception:
            log.exception("audit %s failed", kind)

    # --- authentication -----------------------------------------------------

    def begin_auth(self, username: str) -> bool:
        self._agent = username
        return True  # authentication is always required

    def password_auth_supported(self) -> bool:
        return False

    def kbdint_auth_supported(self) -> bool:
        return False

    def host_based_auth_supported(self) -> bool:
        return False

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        # Synchronous on purpose: see the module docstring (no await between
        # this call, the signature check and auth_completed).
        self._candidate = None
        self._key_tries += 1
        if self._key_tries > self._ctx.limits.max_auth_tries:
            # Like OpenSSH's MaxAuthTries: every try costs a store lookup.
            if self._key_tries == self._ctx.limits.max_auth_tries + 1 and self._conn:
                log.info("too many keys tried from %s: disconnecting", self._addr)
                self._conn.close()
            return False
        if not AGENT_NAME.match(username):
            return False
        fingerprint = key.get_fingerprint("sha256")
        self._last_fp = fingerprint
        try:
            user = self._ctx.manager.user_for_key(fingerprint)
            role = self._ctx.manager.role(username, user) if user else None
        except Exception:
            log.exception("key lookup failed; refusing")
            return False
        if user:
            self._last_user = user
        if not user or not role:
            return False
        self._candidate = (fingerprint, user, role)
        return True

    def auth_completed(self) -> None:
        candidate, self._candidate = self._candidate, None
        conn = self._conn
        if conn is None:
            return
        agent = self._agent
        role = None
        if candidate is not None:
            fingerprint, user, _ = candidate
            try:
                role = self._ctx.manager.role(agent, user)
            except Exception:
                log.exception("role lookup failed")
        if candidate is None or role is None:
            # Cannot happen with public-key-only auth; refuse loudly if it does.
            log.error("auth completed for %s without a verified key: closing", self._addr)
            conn.close()
            return
        self._leave_preauth()
        self.access = Access(agent=agent, user=user, fingerprint=fingerprint,
                             addr=self._addr, role=role, disconnect=conn.close)
        self._ctx.registry.add(self.access)
        self._audit("ssh.login", agent, user=user, key=fingerprint, addr=self._addr, role=role)
        log.info("[agent=%s user=%s] login from %s as %s (key %s)", agent, user, self._addr,
                 role, fingerprint)

    # --- channels -------------------------------------------------------------

    def _admit(self) -> bool:
        if self.access is None or self.access.role not in ("viewer", "collaborator", "owner"):
            return False
        if self._channels >= self._ctx.limits.max_channels:
            if not self._refused_channels:   # logged once per connection, not per flood item
                log.info("[agent=%s user=%s] channel limit (%d) reached",
                         self.access.agent, self.access.user, self._ctx.limits.max_channels)
            self._refused_channels += 1
            if self._refused_channels > self._ctx.limits.max_refused_channels and self._conn:
                # Each refusal still costs a packet round trip of crypto: a client
                # that keeps flooding is disconnected rather than served forever.
                log.warning("[agent=%s user=%s] %d channel opens refused: disconnecting %s",
                            self.access.agent, self.access.user, self._refused_channels,
                            self._addr)
                self._conn.close()
            return False
        return True

    def _channel_closed(self) -> None:
        self._channels -= 1

    def session_requested(self) -> Any:
        if not self._admit():
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_RESOURCE_SHORTAGE,
                                            "too many channels")
        if self._conn is None or self.access is None:
            return False
        self._channels += 1
        self._chan_seq += 1
        chan = SessionChannel(self._conn, self._ctx.limits)
        return chan, AgentSession(self._ctx, self.access, self._chan_seq, self._channel_closed)

    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str,
                             orig_port: int) -> Awaitable[Any]:
        if not self._admit():
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_RESOURCE_SHORTAGE,
                                            "too many channels")
        if self.access is None:
            return False  # type: ignore[return-value]
        if not forward_allowed(dest_host, dest_port):
            log.info("[agent=%s user=%s] forward to %s:%d refused", self.access.agent,
                     self.access.user, dest_host[:64], dest_port)
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
                                            "only localhost inside the agent can be reached")
        if not self.access.can_write:
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
                                            "forwarding needs the collaborator or owner role")
        self._channels += 1
        return self._open_forward(self.access, dest_host, dest_port)

    async def _open_forward(self, access: Access, dest_host: str, dest_port: int) -> Any:
        try:
            bridge = await open_forward(self._ctx, access, dest_host, dest_port)
        except BaseException:
            self._channels -= 1
            raise
        bridge.on_closed = self._channel_closed
        return bridge

    def server_requested(self, listen_host: str, listen_port: int) -> bool:
        log.info("remote forwarding (-R) refused for %s", self._addr)
        return False

    def unix_connection_requested(self, dest_path: str) -> bool:
        return False

    def unix_server_requested(self, listen_path: str) -> bool:
        return False
