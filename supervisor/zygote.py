"""The keeper fork server: keepers start by fork(), not by a new interpreter.

A keeper's own work on create is small (a PTY, a clone, a few mounts: ~25 ms),
but a fresh `python -m supervisor.keeper` spends ~80 ms importing the sandbox
package (ctypes, prctl, cgroupspy, dataclasses, ...) before it can begin. So
the daemon keeps one pre-imported helper process — the zygote, named after
Android's — that forks a keeper on request; the child runs `keeper.main`
exactly as the command line would, then re-executes itself into the lean
serving loop as before, so keepers stay as small as ever.

Why a separate process and not a fork of the daemon itself: the daemon has
threads (asyncio's executor, sqlite) and ~80 MB of state; a fork of it is
neither safe nor cheap. The zygote is single-threaded and small.

Protocol (a SOCK_SEQPACKET socketpair, one message per datagram): the daemon
sends {"id", "argv"} with two descriptors attached (SCM_RIGHTS): the keeper's
stdout (a pipe the daemon reads the ready line from) and its stderr (the
keeper's error log). The zygote answers {"id", "pid"} or {"id", "error"}.

Lifetime: the zygote dies with the daemon (PR_SET_PDEATHSIG, and EOF on its
socket), so it never lingers in corral.service's cgroup across a restart
(KillMode=process kills only the main process). Keepers are its children
while it lives and are re-parented like any orphan when it goes, exactly as
keepers spawned by the daemon are when the daemon goes; the zygote ignores
SIGCHLD so they never become zombies, and each child restores the default
before it runs anything.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import gc
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence

from sandbox.errors import CorralError

log = logging.getLogger(__name__)

#: A request or answer never comes near this (an argv of paths and a JSON map).
MAX_MESSAGE = 64 * 1024
PR_SET_PDEATHSIG = 1


# ---------------------------------------------------------------- the server
def _preload() -> None:
    """Import everything the keeper's start phase needs, once, before forking."""
    import argparse  # noqa: F401
    import pty  # noqa: F401
    from pathlib import Path  # noqa: F401

    import supervisor.keeper  # noqa: F401
    from sandbox import process  # noqa: F401
    from sandbox.cgroups import detect  # noqa: F401
    from sandbox.errors import CorralError  # noqa: F401
    from sandbox.spec import SandboxSpec  # noqa: F401


def _die_with_parent() -> None:
    import ctypes

    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _run_keeper(sock: socket.socket, argv: list[str], out_fd: int, err_fd: int) -> None:
    """In the forked child: become the keeper, as `python -m supervisor.keeper` would."""
    rc = 1
    try:
        sock.close()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDONLY)
        for src, dst in ((devnull, 0), (out_fd, 1), (err_fd, 2)):
            os.dup2(src, dst)
        for fd in (devnull, out_fd, err_fd):
            if fd > 2:
                os.close(fd)
        # Python's own stdio objects wrap fds 0-2 already; start them afresh.
        sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115 - the process's stdout
        sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115 - the process's stderr
        from supervisor import keeper

        rc = keeper.main(argv)
    except SystemExit as e:  # argparse errors
        rc = e.code if isinstance(e.code, int) else 1
    except BaseException:  # report anything, then leave without the zygote's cleanup
        import traceback

        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(rc)


def _handle(sock: socket.socket) -> bool:
    """Serve one request; False once the daemon has gone."""
    fds = array.array("i")
    try:
        data, ancdata, _flags, _addr = sock.recvmsg(MAX_MESSAGE,
                                                    socket.CMSG_SPACE(2 * fds.itemsize))
    except InterruptedError:
        return True
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    if not data:
        return False
    req_id = None
    try:
        req = json.loads(data)
        req_id = req["id"]
        argv = [str(a) for a in req["argv"]]
        if len(fds) != 2:
            raise ValueError(f"expected 2 descriptors, got {len(fds)}")
        pid = os.fork()
        if pid == 0:
            _run_keeper(sock, argv, fds[0], fds[1])
        answer: dict[str, object] = {"id": req_id, "pid": pid}
    except (ValueError, KeyError, TypeError, OSError) as e:
        answer = {"id": req_id, "error": str(e)}
    finally:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
    sock.send(json.dumps(answer).encode())
    return True


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    sock = socket.socket(fileno=int(args[0]))
    daemon = os.getppid()
    _die_with_parent()
    if os.getppid() != daemon:  # the daemon died before the line above took effect
        return 0
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # keepers never become zombies
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a ^C at the daemon's terminal is the daemon's
    _preload()
    # Keep the preloaded heap shared with the children: a collection in a
    # child would touch (and so copy) every object; frozen objects are skipped.
    gc.freeze()
    try:
        sock.send(b'{"ready": true}')
        while _handle(sock):
            pass
    except (BrokenPipeError, ConnectionResetError):
        pass  # the daemon went away (stopped or killed) while we were busy: so do we
    return 0


# ---------------------------------------------------------------- the client
class ZygoteError(Exception):
    """The fork server is not available; the caller falls back to a plain spawn."""


class Zygote:
    """The daemon's handle on its fork server (started lazily, restarted once if it died)."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = dict(env)
        self.proc: subprocess.Popen[bytes] | None = None
        self.sock: socket.socket | None = None
        self._lock = asyncio.Lock()
        self._next_id = 0
        self._ready = False
        #: A fork takes milliseconds; no answer in this long means the server hangs.
        self.answer_timeout = 10.0

    def start(self) -> None:
        """Start the fork server (if it is not running); it says hello once imported.

        Called from the event loop's thread on purpose: PR_SET_PDEATHSIG fires
        when the *thread* that forked the zygote exits. Does not wait for the
        hello: `spawn` does, so the daemon's own start is not delayed.
        """
        if self.sock is not None:
            return
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-S", "-m", "supervisor.zygote", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, cwd="/",
                env=self.env)
        except OSError as e:
            ours.close()
            raise ZygoteError(f"keeper fork server did not start: {e}") from None
        finally:
            theirs.close()
        ours.setblocking(False)
        self.sock = ours
        self._ready = False

    async def _await_ready(self) -> None:
        assert self.sock is not None  # noqa: S101 - set by start
        loop = asyncio.get_running_loop()
        try:
            hello = await asyncio.wait_for(loop.sock_recv(self.sock, MAX_MESSAGE), 30)
        except (OSError, TimeoutError) as e:
            self.close()
            raise ZygoteError(f"keeper fork server did not start: {e}") from None
        if not hello:
            self.close()
            raise ZygoteError("keeper fork server exited at start")
        self._ready = True
        log.debug("keeper fork server %d ready", self.proc.pid if self.proc else -1)

    async def spawn(self, argv: Sequence[str], stdout_fd: int, stderr_fd: int) -> int:
        """Fork a keeper running `keeper.main(argv)`; returns its pid.

        ZygoteError (the caller may start the keeper another way) only when the
        request certainly forked nothing: the server could not start, refused,
        or was found dead before it took the request (then it is restarted and
        asked once more). Once a request is delivered, a lost answer is a
        CorralError: a keeper may exist, and a second one must not be started.
        """
        loop = asyncio.get_running_loop()
        async with self._lock:
            for attempt in (1, 2):
                try:
                    self.start()
                    if not self._ready:
                        await self._await_ready()
                except ZygoteError:
                    if attempt == 2:
                        raise
                    continue
                assert self.sock is not None  # noqa: S101 - set by start
                self._next_id += 1
                req = json.dumps({"id": self._next_id, "argv": list(argv)}).encode()
                try:
                    self.sock.sendmsg([req], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                               array.array("i", [stdout_fd, stderr_fd]))])
                except OSError as e:  # not delivered (a dead server: EPIPE)
                    self.close()
                    if attempt == 2:
                        raise ZygoteError(f"keeper fork server failed: {e}") from None
                    continue
                try:
                    data = await asyncio.wait_for(loop.sock_recv(self.sock, MAX_MESSAGE),
                                                  self.answer_timeout)
                except (OSError, TimeoutError) as e:
                    data, why = b"", str(e) or type(e).__name__
                else:
                    why = "it exited"
                if not data:
                    self.close()
                    raise CorralError(f"keeper fork server failed during a request ({why})",
                                      hint="see the daemon's log; the next start uses a new one")
                answer = json.loads(data)
                if answer.get("id") != self._next_id or "pid" not in answer:
                    raise ZygoteError(f"keeper fork server refused: {answer.get('error', answer)}")
                return int(answer["pid"])
        raise ZygoteError("unreachable")

    def close(self) -> None:
        # Kill before closing our end: a server still importing must not see
        # the socket close first (and report a broken pipe into the journal).
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(2)
            self.proc = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None


if __name__ == "__main__":
    sys.exit(main())
