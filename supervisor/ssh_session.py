"""One SSH session channel: the shared terminal (shell), a command (exec), or sftp.

- shell: attach to the agent's shared session (`Manager.attach`), paint the
  snapshot, then pump output to the client and keystrokes back. The pump
  takes more from the hub only once the client has consumed all but
  FLIGHT_MAX of what it was sent (and asyncssh's buffer is under
  WRITE_HIGH), waiting at most `drain_timeout` seconds before dropping it; a
  client that falls behind thus lags in the hub, which skips it ahead with a
  repaint of the current screen (supervisor.session). Keystrokes and
  resizes of a viewer are dropped here as well as in the hub. Every attach is
  recorded (asciicast v2) and audited (session.attach / session.detach).
  When the session ends, the channel gets its exit status, or exit-signal
  when a signal ended it.
- exec: collaborator/owner only; `/bin/sh -c COMMAND` in the sandbox with
  stdin, stdout, stderr, EOF and the exit status carried through (exit-signal
  when the process reports the signal that killed it as `exit_signal`).
- sftp: `supervisor.ssh_sftp.WorkspaceSFTPServer` on the agent's workspace.

Client environment: only TERM (from pty-req), LANG and LC_* are stored at all
(`SessionChannel` refuses other env requests at the protocol level, bounded in
count and size), so nothing else can reach the sandbox.

Terminal size policy: pty-req beyond `max_cols` x `max_rows` is refused;
window-change is clamped to 1..max. Which client's size the shared session
takes is the hub's policy (the most recent writer's).
"""

from __future__ import annotations

import asyncio
import logging
import re
import signal as signal_mod
import socket
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import asyncssh
from asyncssh.channel import SSHChannel
from asyncssh.packet import SSHPacket
from asyncssh.sftp import run_sftp_server
from asyncssh.stream import SSHServerStreamSession

from supervisor.recording import AsciicastRecorder, open_recording
from supervisor.ssh_access import Access, ExecProcessLike, SessionClientLike, SshContext, SshLimits
from supervisor.ssh_sftp import WorkspaceSFTPServer

log = logging.getLogger(__name__)

_ENV_NAME = re.compile(rb"^(TERM|LANG|LC_[A-Z]{1,20})$")
_PRINTABLE = re.compile(rb"^[\x20-\x7e]*$")
_TERM = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
SFTP_VERSION = 3
CHUNK = 64 * 1024

# asyncssh's own defaults for a server channel (connection.py _DEFAULT_WINDOW /
# _DEFAULT_MAX_PKTSIZE), repeated because we construct the channel ourselves.
WINDOW = 2 * 1024 * 1024
MAX_PKTSIZE = 32768
#: The channel's write buffer high-/low-water marks (asyncssh's default is 64
#: KiB): one hub read (256 KiB) fits, so a session pump waits for the client
#: about once per read instead of on every chunk.
WRITE_HIGH = 512 * 1024
WRITE_LOW = 128 * 1024
#: Session output the client has been sent but not yet consumed (its window
#: credit has not come back) beyond which the pump waits before taking more
#: from the hub, polling every FLIGHT_POLL. So a client that falls behind lags
#: in the hub, where it is skipped ahead with a repaint (supervisor.session),
#: instead of chewing through megabytes of stale output in its own buffers.
FLIGHT_MAX = 128 * 1024
FLIGHT_POLL = 0.01
FLIGHT_PATIENCE = 0.1
#: A limit grown for a client that went quiet (see _client_caught_up) halves
#: back toward FLIGHT_MAX every FLIGHT_DECAY after it last grew.
FLIGHT_DECAY = 5.0

#: What a session ended with: an exit status, or the signal that killed it.
Outcome = int | signal_mod.Signals


def signal_outcome(status: int, sig: object) -> Outcome:
    """`sig` (a signal number or None, as reported) if it names a signal, else `status`."""
    if isinstance(sig, int) and not isinstance(sig, bool):
        try:
            return signal_mod.Signals(sig)
        except ValueError:
            pass
    return status


def env_allowed(key: bytes, value: bytes, count: int, limits: SshLimits) -> bool:
    """May this env request be stored? Allow-listed names, bounded, printable values."""
    return (count < limits.max_env_count and bool(_ENV_NAME.match(key))
            and len(value) <= limits.max_env_value and bool(_PRINTABLE.match(value)))


def term_allowed(term: str, limits: SshLimits) -> bool:
    return 0 < len(term) <= limits.max_env_value and bool(_TERM.match(term))


def clamp_size(cols: int, rows: int, limits: SshLimits) -> tuple[int, int]:
    """A window size within 1..max; 0 (client did not say) becomes 80x24."""
    cols = cols or 80
    rows = rows or 24
    return max(1, min(cols, limits.max_cols)), max(1, min(rows, limits.max_rows))


def pty_size_allowed(cols: int, rows: int, limits: SshLimits) -> bool:
    return 0 <= cols <= limits.max_cols and 0 <= rows <= limits.max_rows


class SessionChannel(asyncssh.SSHServerChannel[bytes]):
    """A server channel that stores only allow-listed, bounded env requests.

    asyncssh keeps every env request in a dict without limit; a client could
    grow it without bound, and any name would reach `get_environment()`.
    """

    def __init__(self, conn: asyncssh.SSHServerConnection, limits: SshLimits) -> None:
        super().__init__(conn, asyncio.get_running_loop(), True, False, False, 0, 0,
                         None, "strict", WINDOW, MAX_PKTSIZE)
        self._limits = limits

    def _process_env_request(self, packet: SSHPacket) -> bool:
        key = packet.get_string()
        value = packet.get_string()
        packet.check_end()
        env: dict[bytes, bytes] = self._env
        if not env_allowed(key, value, len(env), self._limits):
            self.logger.debug1("  Env refused: %r", key[:64])
            return False
        env[key] = value
        return True


class _ExitOnClose(asyncssh.SSHWriter[bytes]):
    """The sftp server's writer: closing it ends the channel with exit status 0."""

    def close(self) -> None:
        chan = self.channel
        if isinstance(chan, asyncssh.SSHServerChannel):
            chan.exit(0)
        else:
            chan.close()


EXEC_HANGUP_GRACE = 5.0


class _Cork:
    """TCP_CORK around one burst of channel writes.

    asyncssh sends every packet with its own send() on a TCP_NODELAY socket,
    and puts an SSH_MSG_IGNORE packet before each data packet: one 256 KiB
    write became 16 segments, half of them 36-byte ones that each woke the
    client. Corked, the kernel sends full segments; uncorking flushes at once.
    """

    def __init__(self, sock: object) -> None:
        fileno = getattr(sock, "fileno", None)
        family = getattr(sock, "family", None)
        self._sock = sock if callable(fileno) and family in (socket.AF_INET,
                                                             socket.AF_INET6) else None

    def _set(self, on: bool) -> None:
        setsockopt = getattr(self._sock, "setsockopt", None)
        if setsockopt is None:
            return
        try:
            setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1 if on else 0)
        except OSError:
            self._sock = None   # not worth a second try on this connection

    def __enter__(self) -> None:
        self._set(True)

    def __exit__(self, *exc: object) -> None:
        self._set(False)


def _close_proc(proc: ExecProcessLike) -> None:
    close = getattr(proc, "close", None)   # the real ExecProcess frees its fds here
    if callable(close):
        close()


async def _reap(proc: ExecProcessLike) -> None:
    try:
        await asyncio.wait_for(proc.wait(), EXEC_HANGUP_GRACE)
    except TimeoutError:
        proc.signal(signal_mod.SIGKILL)
    finally:
        _close_proc(proc)


class AgentSession(SSHServerStreamSession[bytes]):
    """Session channel handler for one agent connection."""

    def __init__(self, ctx: SshContext, access: Access, chan_id: int,
                 on_closed: Callable[[], None]) -> None:
        super().__init__(self._run, self._make_sftp, SFTP_VERSION, False)
        self._ctx = ctx
        self._access = access
        self._limits = ctx.limits
        self._on_closed = on_closed
        self._tag = f"[agent={access.agent} user={access.user} chan={chan_id}]"
        self._term: str | None = None
        self._size: tuple[int, int] | None = None
        self._kind = ""
        self._task: asyncio.Task[Any] | None = None
        self._on_resize: Callable[[int, int], None] | None = None
        self._proc: ExecProcessLike | None = None
        #: the client's largest send window seen, and how much of it may be
        #: unconsumed before the pump waits (see _client_caught_up)
        self._window_max = 0
        self._flight_limit = FLIGHT_MAX
        #: when _flight_limit last grew or shrank
        self._flight_changed_at = 0.0

    # --- requests (asyncssh asks; we answer yes/no) -------------------------

    def pty_requested(self, term_type: str, term_size: tuple[int, int, int, int],
                      term_modes: Mapping[int, int]) -> bool:
        cols, rows = term_size[0], term_size[1]
        if not term_allowed(term_type, self._limits):
            log.info("%s pty-req refused: bad TERM %r", self._tag, term_type[:64])
            return False
        if not pty_size_allowed(cols, rows, self._limits):
            log.info("%s pty-req refused: size %dx%d", self._tag, cols, rows)
            return False
        self._term = term_type
        self._size = clamp_size(cols, rows, self._limits)
        return True

    def shell_requested(self) -> bool:
        self._kind = "shell"
        return True

    def exec_requested(self, command: str) -> bool:
        if not self._access.can_write:
            log.info("%s exec refused: role %s", self._tag, self._access.role)
            return False
        if len(command) > self._limits.max_command or "\0" in command:
            log.info("%s exec refused: command too long or has NUL", self._tag)
            return False
        self._kind = "exec"
        return True

    def subsystem_requested(self, subsystem: str) -> bool:
        if subsystem != "sftp":
            return False
        self._kind = "sftp"
        return True

    def _make_sftp(self, chan: SSHChannel[bytes]) -> WorkspaceSFTPServer:
        root = self._ctx.manager.workspace_view(self._access.agent)
        log.info("%s sftp on %s (%s)", self._tag, root,
                 "read-write" if self._access.can_write else "read-only")
        if not isinstance(chan, asyncssh.SSHServerChannel):
            raise TypeError("sftp needs a server channel")
        return WorkspaceSFTPServer(chan, root, self._access)

    # --- events during the session -----------------------------------------

    def terminal_size_changed(self, width: int, height: int, pixwidth: int,
                              pixheight: int) -> None:
        # Handled here rather than raised into the reader (asyncssh's default).
        # A viewer's size is passed on too: the hub keeps it but applies only
        # writers' sizes (its policy: the most recent writer's size wins).
        if self._on_resize is not None:
            self._on_resize(*clamp_size(width, height, self._limits))

    def signal_received(self, signal: str) -> None:
        if self._proc is None or not self._access.can_write:
            return
        sig = getattr(signal_mod, "SIG" + signal, None)
        if isinstance(sig, signal_mod.Signals):
            self._proc.signal(int(sig))

    def break_received(self, msec: int) -> bool:
        return False

    def soft_eof_received(self) -> None:
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._access.writer_channels.discard(self)
        if self._task is not None:
            self._task.cancel()
        self._on_closed()

    def close(self) -> None:
        """Used on downgrade/revoke for exec channels."""
        if self._chan is not None:
            self._chan.close()

    # --- the work -----------------------------------------------------------

    def session_started(self) -> None:
        if self._kind != "sftp":
            super().session_started()
            return
        # asyncssh's sftp path closes the channel without an exit status, which
        # `scp -s` reports as a failure; end it with exit-status 0 instead.
        chan = self._chan
        if not isinstance(chan, asyncssh.SSHServerChannel) or self._conn is None:
            return
        try:
            server = self._make_sftp(chan)
        except Exception as exc:
            # e.g. the agent is not running: say so, end the channel, keep the connection
            log.info("%s sftp refused: %s", self._tag, exc)
            chan.write_stderr(f"corral: {exc}\r\n".encode())
            chan.exit(1)
            return
        reader = asyncssh.SSHReader[bytes](self, chan)
        writer = _ExitOnClose(self, chan)
        self._ctx.tasks.spawn(self._serve_sftp(server, reader, writer), f"ssh-sftp{self._tag}")

    async def _serve_sftp(self, server: WorkspaceSFTPServer, reader: asyncssh.SSHReader[bytes],
                          writer: asyncssh.SSHWriter[bytes]) -> None:
        # Not cancelled on connection loss: the handler sees EOF and cleans up itself.
        try:
            await run_sftp_server(server, reader, writer, SFTP_VERSION)
        finally:
            server.exit()   # idempotent: the workspace fd is closed however the session ended

    async def _run(self, stdin: asyncssh.SSHReader[bytes], stdout: asyncssh.SSHWriter[bytes],
                   stderr: asyncssh.SSHWriter[bytes]) -> None:
        self._task = asyncio.current_task()
        chan = self._chan
        if not isinstance(chan, asyncssh.SSHServerChannel):
            return
        status: Outcome = 0
        try:
            if self._kind == "exec":
                status = await self._run_exec(chan.get_command() or "", stdin, stdout, stderr)
            else:
                chan.set_write_buffer_limits(WRITE_HIGH, WRITE_LOW)
                status = await self._run_shell(stdin, stdout, stderr)
        except asyncio.CancelledError:
            return
        except (BrokenPipeError, ConnectionError, asyncssh.Error) as exc:
            log.info("%s channel ended: %s", self._tag, exc)
            return
        except Exception as exc:
            log.warning("%s session failed: %s", self._tag, exc)
            status = 1
            try:
                stderr.write(f"corral: {exc}\r\n".encode())
            except (OSError, asyncssh.Error):
                pass
        try:
            if isinstance(status, signal_mod.Signals):
                # "KILL", not "SIGKILL": RFC 4254 6.10 names signals without the prefix.
                chan.exit_with_signal(status.name.removeprefix("SIG"), False,
                                      f"killed by signal {int(status)} ({status.name})")
            else:
                chan.exit(max(0, min(status, 255)))
        except (OSError, asyncssh.Error):
            pass

    async def _send(self, stdout: asyncssh.SSHWriter[bytes], data: bytes) -> None:
        stdout.write(data)
        # Only wait when asyncssh has paused us (send buffer above its high-water
        # mark); a client that does not take the data within drain_timeout is dropped.
        if self._write_paused:
            await asyncio.wait_for(stdout.drain(), timeout=self._limits.drain_timeout)

    async def _run_shell(self, stdin: asyncssh.SSHReader[bytes], stdout: asyncssh.SSHWriter[bytes],
                         stderr: asyncssh.SSHWriter[bytes]) -> Outcome:
        access, mgr = self._access, self._ctx.manager
        client: SessionClientLike = await mgr.attach(access.agent, access.user, access.role,
                                                     self._size)
        cols, rows = self._size or (80, 24)
        rec: AsciicastRecorder | None = None
        try:
            rec = open_recording(self._ctx.recordings_dir, access.agent, access.user, cols, rows,
                                 {"TERM": self._term or "", "SHELL": "/bin/sh"},
                                 max_bytes=self._limits.max_recording_bytes)
        except OSError as exc:
            log.warning("%s cannot record session: %s", self._tag, exc)
        mgr.audit("session.attach", access.agent, user=access.user, role=access.role,
                  addr=access.addr, recording=rec.path if rec else None)
        log.info("%s attached as %s", self._tag, access.role)

        def resize(c: int, r: int) -> None:
            client.resize(c, r)
            if rec is not None:
                rec.resize(c, r)

        self._on_resize = resize
        feeder = self._ctx.tasks.spawn(self._shell_input(stdin, client), f"ssh-in{self._tag}")
        window = getattr(self._chan, "_send_window", 0)   # nothing sent yet: the whole window
        self._window_max = window if isinstance(window, int) else 0
        try:
            if client.snapshot:
                if rec is not None:
                    rec.output(client.snapshot)
                await self._send(stdout, client.snapshot)
            read_chunks = getattr(client, "read_chunks", None)
            cork = _Cork(self._chan.get_extra_info("socket") if self._chan else None)
            while True:
                chunks: list[bytes] = (await read_chunks() if read_chunks is not None
                                       else [await client.read()])
                if not chunks or not chunks[0]:
                    break
                if rec is not None:
                    for data in chunks:
                        rec.output(data)
                # One write: asyncssh sends each write as its own packets (plus
                # an SSH_MSG_IGNORE each), so small chunks must not go one by one.
                with cork:
                    stdout.write(chunks[0] if len(chunks) == 1 else b"".join(chunks))
                # Wait only when asyncssh has paused us (buffer above WRITE_HIGH); a
                # client that does not take the data within drain_timeout is dropped.
                if self._write_paused:
                    await asyncio.wait_for(stdout.drain(), timeout=self._limits.drain_timeout)
                await asyncio.wait_for(self._client_caught_up(), timeout=self._limits.drain_timeout)
            # Say why the view ended (session exited, dropped as slow, revoked).
            reason = getattr(client, "dropped_reason", "")
            if reason and reason != "closed":
                stdout.write(f"\r\n[corral: {reason}]\r\n".encode())
            if reason == "session ended":
                return self._session_outcome(client)
        except TimeoutError:
            log.info("%s client stopped reading: dropped", self._tag)
        finally:
            self._on_resize = None
            feeder.cancel()
            client.close()
            if rec is not None:
                rec.close()
            mgr.audit("session.detach", access.agent, user=access.user, addr=access.addr)
            log.info("%s detached", self._tag)
        return 0

    async def _client_caught_up(self) -> None:
        """Wait until the client has consumed all but `_flight_limit` of what it was sent.

        In flight is the client's initial window (the largest seen) minus what
        is left of it, plus asyncssh's own buffer. OpenSSH returns credit every
        96 KiB it writes out; a client that returns it in larger lumps
        (asyncssh's: at half its window) sends none while we wait, so after
        FLIGHT_PATIENCE without credit this client's limit grows by FLIGHT_MAX.
        It halves back toward FLIGHT_MAX every FLIGHT_DECAY after that, also
        while output flows: an OpenSSH client that paused once (a phone put
        away) lags in the hub again instead of holding stale output in its
        buffers; a client that credits in lumps pays one FLIGHT_PATIENCE wait
        per FLIGHT_DECAY to grow it again (~2 %). asyncssh has no public
        accessor for the send window; without it this never waits."""
        chan = self._chan
        waited = 0.0
        last = -1
        loop = asyncio.get_running_loop()
        while chan is not None:
            window = getattr(chan, "_send_window", None)
            if not isinstance(window, int):
                return
            self._window_max = max(self._window_max, window)
            in_flight = self._window_max - window + chan.get_write_buffer_size()
            now = loop.time()
            if (self._flight_limit > FLIGHT_MAX
                    and now - self._flight_changed_at >= FLIGHT_DECAY):
                self._flight_limit = max(FLIGHT_MAX, self._flight_limit // 2)
                self._flight_changed_at = now
            if in_flight <= self._flight_limit:
                return
            if window > last >= 0:
                waited = 0.0   # credit came back: it is consuming, keep waiting
            elif waited >= FLIGHT_PATIENCE:
                self._flight_limit = in_flight + FLIGHT_MAX
                self._flight_changed_at = loop.time()
                return
            last = window
            await asyncio.sleep(FLIGHT_POLL)
            waited += FLIGHT_POLL

    @staticmethod
    def _session_outcome(client: SessionClientLike) -> Outcome:
        """The ended session's exit status or signal, as its hub heard from the keeper."""
        hub = getattr(client, "hub", None)
        status = getattr(hub, "exit_status", None)
        return signal_outcome(status if isinstance(status, int) else 0,
                              getattr(hub, "exit_signal", None))

    async def _shell_input(self, stdin: asyncssh.SSHReader[bytes],
                           client: SessionClientLike) -> None:
        try:
            while True:
                data = await stdin.read(CHUNK)
                if not data:
                    return  # EOF: keep watching, stop typing
                if self._access.can_write:
                    client.write(data)
        except (OSError, asyncssh.Error):
            return

    def _exec_env(self) -> dict[str, str]:
        if self._chan is None:
            return {}
        env = {k: v for k, v in self._chan.get_environment().items()
               if _ENV_NAME.match(k.encode())}
        if self._term:
            env["TERM"] = self._term
        return env

    async def _run_exec(self, command: str, stdin: asyncssh.SSHReader[bytes],
                        stdout: asyncssh.SSHWriter[bytes],
                        stderr: asyncssh.SSHWriter[bytes]) -> Outcome:
        access, mgr = self._access, self._ctx.manager
        tty = (self._term, *self._size) if self._term and self._size else None
        mgr.audit("ssh.exec", access.agent, user=access.user, addr=access.addr,
                  command=command[:200], tty=tty is not None)
        proc: ExecProcessLike = await mgr.exec(access.agent, ["/bin/sh", "-c", command],
                                               user=access.user, tty=tty, env=self._exec_env())
        self._proc = proc
        self._access.writer_channels.add(self)
        self._on_resize = proc.resize
        feeder = self._ctx.tasks.spawn(self._exec_input(stdin, proc), f"ssh-exec-in{self._tag}")
        done = False
        try:
            await asyncio.gather(self._copy(proc.read_stdout, stdout),
                                 self._copy(proc.read_stderr, stderr))
            code = await proc.wait()
            done = True
            return signal_outcome(code, getattr(proc, "exit_signal", None))
        finally:
            feeder.cancel()
            self._on_resize = None
            if not done:
                # The client went away (or lost the right) first: hang the command up,
                # and free it for good if it ignores that.
                proc.signal(signal_mod.SIGHUP)
                self._ctx.tasks.spawn(_reap(proc), f"ssh-exec-reap{self._tag}")
            else:
                _close_proc(proc)

    async def _copy(self, read: Callable[[], Awaitable[bytes]],
                    out: asyncssh.SSHWriter[bytes]) -> None:
        while True:
            data = await read()
            if not data:
                return
            out.write(data)
            await out.drain()  # backpressure reaches the command's pipe, no timeout needed

    async def _exec_input(self, stdin: asyncssh.SSHReader[bytes], proc: ExecProcessLike) -> None:
        try:
            while True:
                data = await stdin.read(CHUNK)
                if not data or not self._access.can_write:
                    break
                await proc.write_stdin(data)
        except (OSError, asyncssh.Error):
            pass
        finally:
            proc.close_stdin()
