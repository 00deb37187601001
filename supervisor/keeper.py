"""The keeper: one small process per agent that outlives the daemon.

It holds the PTY master of the agent's session, owns the sandbox's PID 1 (so it
alone can waitpid() it and learn the exit status), keeps a bounded scrollback
ring and a rotated session log, and serves its unix socket to the daemon
(which may come and go: containerd's shims and podman's conmon do the same).

It is deliberately plain: selectors, no asyncio, no pyroute2, no pyte — every
keeper is resident for the agent's whole life, so its memory is multiplied by
the number of agents.

Run as ``python -m supervisor.keeper --spec FILE --socket PATH --log PATH
--status PATH [--cgroup-parent P]``. It prints one JSON line on stdout when the
sandbox runs ({"init_pid", "init_start"}) or an error line and exits 1.
"""

from __future__ import annotations

# Only what the serving loop needs is imported at module level: the keeper
# re-executes itself into that loop once the sandbox runs (see serve_main), and
# every module imported here is resident in each of N keepers. argparse, pty,
# pathlib and the sandbox package are imported where they are used, in the
# short-lived start phase only.
import contextlib
import errno
import fcntl
import json
import os
import selectors
import signal
import socket
import struct
import sys
import termios
import time
from collections import deque

from supervisor import keeper_proto as kp

#: Scrollback kept in memory for newly subscribing clients (the daemon rebuilds
#: its screen model from it after a restart).
RING_BYTES = 512 * 1024
#: The session log rotates at this size (one previous file is kept).
LOG_BYTES = 8 * 1024 * 1024
#: A client that does not read this much pending output is dropped, so a
#: stalled daemon connection never blocks the agent.
CLIENT_BACKLOG = 4 * 1024 * 1024
#: Output is paced to the daemon like a terminal paces a program: while a
#: subscriber has more than PACE_HIGH bytes pending, the PTY is not read (the
#: agent blocks in write()), so a flood moves at the speed of its readers
#: instead of filling buffers until someone is dropped. A subscriber that
#: sends nothing for PACE_STALL seconds no longer paces: it is dropped at
#: CLIENT_BACKLOG, so a hung daemon never stops the agent for longer than that.
PACE_HIGH = 1024 * 1024
PACE_STALL = 10.0
#: One OUTPUT frame carries up to this much: the PTY is read until it is empty
#: or this much is gathered, so a flood costs one frame per READ_BATCH, not one
#: per (4 KiB) PTY read, at every hop after the keeper.
READ_BATCH = 256 * 1024
#: While output flows (the previous PTY read was less than FLOW_GAP ago), what
#: is read is held up to HOLD seconds, or until HOLD_BYTES gather, and sent as
#: one frame: a program printing line by line made a frame per ~1 KiB read,
#: and every frame costs a wakeup and a packet at each hop to every client. An
#: isolated write (a keystroke's echo) still goes out at once.
FLOW_GAP = 0.005
HOLD = 0.002
HOLD_BYTES = 64 * 1024
#: While output flows, the PTY rests this long after each read: the kernel
#: moves a writer's output into the PTY's 4 KiB read buffer from a worker, so an
#: eager reader gets ~1 KiB per read (a wakeup and a syscall each, for it and
#: the writer); after a short rest a read takes a full buffer, as tmux's do.
FLOW_REST = 0.0005
#: termios c_iflag bit (linux/termbits.h; the termios module has it, typeshed not).
IUTF8 = 0o040000
#: Keystrokes buffered for a PTY that is not reading (agent busy).
INPUT_BACKLOG = 1024 * 1024


class Ring:
    """A bounded byte ring: appends, and hands back the newest RING_BYTES."""

    def __init__(self, cap: int = RING_BYTES) -> None:
        self.cap = cap
        self._chunks: deque[bytes] = deque()
        self._size = 0

    def append(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        while self._size - len(self._chunks[0]) >= self.cap:
            self._size -= len(self._chunks.popleft())

    def get(self) -> bytes:
        data = b"".join(self._chunks)
        return data[-self.cap :]


class SessionLog:
    """Append-only session log with one rotation, so it never grows unbounded."""

    def __init__(self, path: str, cap: int = LOG_BYTES) -> None:
        self.path = path
        self.cap = cap
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self._size = os.fstat(self._fd).st_size

    def write(self, data: bytes) -> None:
        if self._size + len(data) > self.cap:
            os.close(self._fd)
            os.replace(self.path, self.path + ".1")  # noqa: PTH105 - no pathlib resident
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                               0o600)
            self._size = 0
        with contextlib.suppress(OSError):
            os.write(self._fd, data)
            self._size += len(data)


class Client:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = kp.FrameReader()
        self.out = bytearray()
        self.subscribed = False
        #: last time this client took bytes from us (pacing ignores a stalled one)
        self.progress = time.monotonic()

    def paces(self, now: float) -> bool:
        """Should the PTY wait for this client? (Behind, but still reading.)"""
        return (self.subscribed and len(self.out) > PACE_HIGH
                and now - self.progress < PACE_STALL)


class Keeper:
    def __init__(self, master: int, init_pid: int, init_start: float, log: SessionLog,
                 listener: socket.socket, status_path: str) -> None:
        self.master = master
        self.init_pid = init_pid
        self.init_start = init_start
        self.log = log
        self.ring = Ring()
        self.listener = listener
        self.status_path = status_path
        self.sel = selectors.DefaultSelector()
        self.clients: dict[int, Client] = {}
        self.pty_in = bytearray()
        self.exit_status: int | None = None
        #: the signal that ended the session's init, if one did (SSH exit-signal)
        self.exit_signal: int | None = None
        self.pidfd = os.pidfd_open(init_pid)
        self.size = (80, 24)
        self.pty_open = True
        self.pty_paused = False
        #: the PTY is not read until then (FLOW_REST); 0: not resting
        self._rest_until = 0.0
        #: bytes the last _read_pty read
        self._read_size = 0
        self._pty_mask = 0
        self._held: list[bytes] = []
        self._held_size = 0
        self._held_until = 0.0
        self._last_read = 0.0

    # --- the loop ---
    def run(self) -> int:
        os.set_blocking(self.master, False)
        self.listener.setblocking(False)
        self._update_pty_interest()
        self.sel.register(self.listener, selectors.EVENT_READ, "listen")
        self.sel.register(self.pidfd, selectors.EVENT_READ, "pidfd")
        while True:
            # While paced, wake up now and then to notice a subscriber that stalled.
            timeout = 0.5 if self.pty_paused else 5.0
            if self._held:
                timeout = max(0.0, self._held_until - time.monotonic())
            if self._rest_until:
                timeout = min(timeout, max(0.0, self._rest_until - time.monotonic()))
            for key, events in self.sel.select(timeout=timeout):
                tag = key.data
                if tag == "pty":
                    if events & selectors.EVENT_READ and not self._read_pty():
                        self.pty_open = False
                        self._update_pty_interest()
                    elif events & selectors.EVENT_WRITE:
                        self._flush_pty()
                elif tag == "listen":
                    self._accept()
                elif tag == "pidfd":
                    self._reap()
                elif isinstance(tag, Client):
                    self._client_event(tag, events)
            if self._rest_until and time.monotonic() >= self._rest_until:
                self._rest_until = 0.0
                self._update_pty_interest()
            if self._held and (time.monotonic() >= self._held_until or not self.pty_open):
                self._send_held()
            self._pace()
            if self.exit_status is not None:
                # Drain what the session printed last, then tell everyone.
                # (until it is empty: a process that outlived the session may
                # keep the PTY open without printing)
                while self.pty_open and self._read_pty() and self._read_size:
                    pass
                self._send_held()
                self._finish()
                return 0

    def _pace(self) -> None:
        """Read the PTY only while no (live) subscriber is too far behind."""
        now = time.monotonic()
        paused = any(c.paces(now) for c in self.clients.values())
        if paused != self.pty_paused:
            self.pty_paused = paused
            self._update_pty_interest()

    def _read_pty(self) -> bool:
        """Read what the PTY holds (up to READ_BATCH); pass it on as one frame,
        or hold it briefly while output flows (HOLD). False once the session
        side is closed."""
        chunks: list[bytes] = []
        size = 0
        open_ = True
        while size < READ_BATCH:
            try:
                data = os.read(self.master, 65536)
            except BlockingIOError:
                break
            except OSError as e:
                # EIO: every slave is closed (the session exited).
                if e.errno != errno.EIO:
                    raise
                data = b""
            if not data:
                open_ = False
                break
            chunks.append(data)
            size += len(data)
        self._read_size = size
        if chunks:
            now = time.monotonic()
            flowing = now - self._last_read < FLOW_GAP
            self._last_read = now
            if flowing and open_ and FLOW_REST:
                self._rest_until = now + FLOW_REST
                self._update_pty_interest()
            if not self._held:
                self._held_until = now + HOLD
            self._held += chunks
            self._held_size += size
            if not flowing or self._held_size >= HOLD_BYTES:
                self._send_held()
        return open_

    def _send_held(self) -> None:
        """Pass held output on: scrollback, session log, one OUTPUT frame."""
        if not self._held:
            return
        data = self._held[0] if len(self._held) == 1 else b"".join(self._held)
        self._held = []
        self._held_size = 0
        self.ring.append(data)
        self.log.write(data)
        self._broadcast(kp.frame(kp.OUTPUT, data))

    def _flush_pty(self) -> None:
        try:
            n = os.write(self.master, self.pty_in)
            del self.pty_in[:n]
        except BlockingIOError:
            pass
        except OSError:
            self.pty_in.clear()
        self._update_pty_interest()

    def _update_pty_interest(self) -> None:
        mask = ((selectors.EVENT_READ
                 if self.pty_open and not self.pty_paused and not self._rest_until else 0)
                | (selectors.EVENT_WRITE if self.pty_in and self.pty_open else 0))
        if mask == self._pty_mask:
            return
        if self._pty_mask == 0:
            self.sel.register(self.master, mask, "pty")
        elif mask == 0:
            self.sel.unregister(self.master)
        else:
            self.sel.modify(self.master, mask, "pty")
        self._pty_mask = mask

    def _accept(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except BlockingIOError:
            return
        self.adopt_client(sock)

    def adopt_client(self, sock: socket.socket, subscribed: bool = False) -> None:
        """Serve a connected client (also one the start phase already greeted)."""
        sock.setblocking(False)
        client = Client(sock)
        client.subscribed = subscribed
        self.clients[sock.fileno()] = client
        self.sel.register(sock, selectors.EVENT_READ, client)

    def _client_event(self, c: Client, events: int) -> None:
        if events & selectors.EVENT_WRITE:
            self._flush_client(c)
        if events & selectors.EVENT_READ:
            try:
                data = c.sock.recv(65536)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._drop(c)
                return
            try:
                frames = c.reader.feed(data)
            except ValueError:
                self._drop(c)
                return
            for kind, payload in frames:
                self._handle(c, kind, payload)

    def _handle(self, c: Client, kind: bytes, payload: bytes) -> None:
        if kind == kp.HELLO:
            c.subscribed = True
            self._send(c, kp.frame(kp.BACKLOG, self.ring.get()))
        elif kind == kp.INPUT:
            if len(self.pty_in) + len(payload) <= INPUT_BACKLOG:
                self.pty_in += payload
                self._flush_pty()
        elif kind == kp.RESIZE:
            try:
                d = json.loads(payload)
                cols, rows = int(d["cols"]), int(d["rows"])
            except (ValueError, KeyError, TypeError):
                return
            cols, rows = max(1, min(cols, 1000)), max(1, min(rows, 500))
            self.size = (cols, rows)
            with contextlib.suppress(OSError):
                fcntl.ioctl(self.master, termios.TIOCSWINSZ,
                            struct.pack("HHHH", rows, cols, 0, 0))
        elif kind == kp.STATUS:
            self._send(c, kp.frame(kp.STATE, json.dumps(self._state()).encode()))
        elif kind == kp.SIGNAL:
            try:
                sig = int(json.loads(payload)["signal"])
            except (ValueError, KeyError, TypeError):
                return
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self.pidfd, sig)

    def _state(self) -> dict[str, object]:
        return {"keeper_pid": os.getpid(), "init_pid": self.init_pid,
                "init_start": self.init_start, "cols": self.size[0], "rows": self.size[1],
                "exit_status": self.exit_status, "clients": len(self.clients)}

    def _broadcast(self, data: bytes) -> None:
        for c in list(self.clients.values()):
            if c.subscribed:
                self._send(c, data)

    def _send(self, c: Client, data: bytes) -> None:
        if len(c.out) + len(data) > CLIENT_BACKLOG:
            self._drop(c)
            return
        c.out += data
        self._flush_client(c)

    def _flush_client(self, c: Client) -> None:
        try:
            n = c.sock.send(c.out)
            del c.out[:n]
            if n:
                c.progress = time.monotonic()
        except BlockingIOError:
            pass
        except OSError:
            self._drop(c)
            return
        mask = selectors.EVENT_READ | (selectors.EVENT_WRITE if c.out else 0)
        with contextlib.suppress(KeyError, ValueError):
            self.sel.modify(c.sock, mask, c)

    def _drop(self, c: Client) -> None:
        self.clients.pop(c.sock.fileno(), None)
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(c.sock)
        c.sock.close()

    def _reap(self) -> None:
        try:
            pid, status = os.waitpid(self.init_pid, os.WNOHANG)
        except ChildProcessError:
            pid, status = self.init_pid, 255 << 8
        if pid == 0:
            return
        self.exit_status = os.waitstatus_to_exitcode(status)
        if self.exit_status < 0:
            self.exit_signal = -self.exit_status
            self.exit_status = 128 - self.exit_status
        elif 128 < self.exit_status < 128 + signal.NSIG:
            # The sandbox's init is PID 1 of its namespace and cannot die of a
            # signal it sends itself, so it reports its workload's death by
            # signal N as exit code 128+N (sandbox.init.exit_code); read it back.
            self.exit_signal = self.exit_status - 128

    def _finish(self) -> None:
        result = {"exit_status": self.exit_status, "ended": time.time()}
        write_json_atomic(self.status_path, result)
        self._broadcast(kp.frame(kp.EXIT, json.dumps(
            {"status": self.exit_status, "signal": self.exit_signal}).encode()))
        # Give subscribers a moment to read the last frames, bounded.
        deadline = time.monotonic() + 1.0
        while any(c.out for c in self.clients.values()) and time.monotonic() < deadline:
            for key, events in self.sel.select(timeout=0.1):
                if isinstance(key.data, Client):
                    self._client_event(key.data, events)
        for c in list(self.clients.values()):
            self._drop(c)


def write_json_atomic(path: str, data: object) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # noqa: PTH105 - no pathlib in the resident keeper


def utf8_line_editing(fd: int) -> None:
    """IUTF8 on a terminal: the kernel's own line editing (a program reading
    lines, like `cat` or `read`) erases a whole UTF-8 character, as tmux sets
    it for its panes."""
    try:
        attrs = termios.tcgetattr(fd)
        attrs[0] |= IUTF8
        termios.tcsetattr(fd, termios.TCSANOW, attrs)
    except termios.error:
        pass   # a terminal without it still works


def _listen(path: str) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # noqa: PTH108 - no pathlib in the resident keeper
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    sock.listen(16)
    return sock


def main(argv: list[str] | None = None) -> int:
    import argparse
    import pty
    from pathlib import Path

    ap = argparse.ArgumentParser(prog="corral-keeper")
    ap.add_argument("--spec", required=True)
    ap.add_argument("--socket", required=True)
    ap.add_argument("--log", required=True)
    ap.add_argument("--status", required=True)
    ap.add_argument("--cgroup-parent", default=None)
    ap.add_argument("--cgroup-own", default=None, help="the daemon's /proc/self/cgroup map (JSON)")
    ap.add_argument("--cols", type=int, default=80)
    ap.add_argument("--rows", type=int, default=24)
    args = ap.parse_args(argv)

    # The daemon runs protected from the OOM killer (OOMScoreAdjust=-500);
    # agents must not inherit that: back to the default for us and our children.
    with contextlib.suppress(OSError):
        Path("/proc/self/oom_score_adj").write_text("0")
    # The daemon's death must not take us along: ignore the signals a closing
    # terminal or process group would deliver.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    os.chdir("/")

    from sandbox import process
    from sandbox.cgroups import detect
    from sandbox.errors import CorralError
    from sandbox.spec import SandboxSpec

    spec = SandboxSpec.from_json(Path(args.spec).read_text())
    with contextlib.suppress(FileNotFoundError):
        Path(args.status).unlink()
    master, slave = pty.openpty()
    os.set_inheritable(master, False)
    fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", args.rows, args.cols, 0, 0))
    utf8_line_editing(slave)
    listener = _listen(args.socket)
    try:
        own = json.loads(args.cgroup_own) if args.cgroup_own else None
        cg = detect(args.cgroup_parent, own=own)
        started = process.start(spec, stdin=slave, stdout=slave, stderr=slave, ctty=True,
                                cgroups=cg)
    except CorralError as e:
        print(json.dumps({"error": str(e), "hint": e.hint}), flush=True)
        return 1
    os.close(slave)
    print(json.dumps({"init_pid": started.init_pid, "init_start": started.start_time,
                      "keeper_pid": os.getpid()}), flush=True)
    # Our stdout is a pipe to the daemon that may go away: detach from it.
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1):
        os.dup2(devnull, fd)
    os.close(devnull)
    state = ServeState(master, listener.fileno(), started.init_pid, started.start_time,
                       args.log, args.status, args.cols, args.rows)
    state.greeted = _greet_first_client(listener, state)
    _reexec(state)
    # Only reached if the exec failed: serve from this (bigger) process.
    return serve(listener, state)


class ServeState:
    """What the serving loop needs, handed across the re-exec as a JSON list.

    A plain class: `typing` (NamedTuple) or `dataclasses` would cost the
    resident keeper an import each.
    """

    FIELDS = ("master", "listener", "init_pid", "init_start", "log", "status", "cols", "rows",
              "greeted")

    def __init__(self, master: int, listener: int, init_pid: int, init_start: float, log: str,
                 status: str, cols: int, rows: int,
                 greeted: list[list[int]] | None = None) -> None:
        self.master, self.listener = int(master), int(listener)
        self.init_pid, self.init_start = int(init_pid), float(init_start)
        self.log, self.status = str(log), str(status)
        self.cols, self.rows = int(cols), int(rows)
        #: Connected clients the start phase already subscribed (see _greet_first_client).
        self.greeted = [[int(fd), int(sub)] for fd, sub in greeted or ()]

    def to_json(self) -> str:
        return json.dumps([getattr(self, f) for f in self.FIELDS])


#: How long the start phase waits for the daemon's first connection.
GREET_WAIT = 0.5


def _greet_first_client(listener: socket.socket, st: ServeState) -> list[list[int]]:
    """Answer the daemon's first HELLO and STATUS before the re-exec.

    The daemon connects as soon as it reads our ready line and counts the agent
    as started once STATE comes back; answering here keeps the re-exec off that
    path. Only those two frames are handled, and only when they are next on the
    socket (MSG_PEEK), so nothing else a client sends is consumed: the serving
    loop reads it. BACKLOG is empty — the PTY is not read before the re-exec,
    its output waits in the kernel and reaches the subscriber as OUTPUT.
    Returns [fd, subscribed] of the accepted client (none if nobody connected
    in time: the serving loop then answers from the listen backlog as usual).
    """
    sel = selectors.DefaultSelector()
    try:
        sel.register(listener, selectors.EVENT_READ)
        if not sel.select(GREET_WAIT):
            return []
    finally:
        sel.close()
    try:
        sock, _ = listener.accept()
    except OSError:
        return []
    seen: set[bytes] = set()
    try:
        sock.settimeout(GREET_WAIT)
        while seen != {kp.HELLO, kp.STATUS}:
            head = sock.recv(kp.HEADER.size, socket.MSG_PEEK)
            if len(head) < kp.HEADER.size:
                break  # a partial header: let the serving loop have it
            kind, length = kp.HEADER.unpack(head)
            if kind not in (kp.HELLO, kp.STATUS) or length or kind in seen:
                break
            sock.recv(kp.HEADER.size)
            seen.add(kind)
            if kind == kp.HELLO:
                sock.sendall(kp.frame(kp.BACKLOG, b""))
            else:
                state = {"keeper_pid": os.getpid(), "init_pid": st.init_pid,
                         "init_start": st.init_start, "cols": st.cols, "rows": st.rows,
                         "exit_status": None, "clients": 1}
                sock.sendall(kp.frame(kp.STATE, json.dumps(state).encode()))
    except OSError:
        pass
    # Handed over either way (a client the loop reads from as usual), subscribed if it said HELLO.
    return [[sock.detach(), int(kp.HELLO in seen)]]


def _reexec(state: ServeState) -> None:
    """Replace this process by a lean interpreter that only serves (same PID).

    Everything the start phase imported (the sandbox package, ctypes, prctl,
    cgroupspy, dataclasses, typing, logging, argparse, ...) would otherwise stay
    resident for the agent's whole life, in every keeper. exec() keeps the PID,
    so the sandbox's init stays our child (waitpid, pidfd) and the daemon's
    recorded keeper identity (pid, start time, cgroup) stays true; the PTY
    master and the listening socket are inherited by number, and a client that
    connects meanwhile waits in the listen backlog. `-S` skips site (and the
    editable-install finder); PYTHONPATH, set by the daemon, finds this package.
    """
    fds = (state.master, state.listener, *(fd for fd, _ in state.greeted))
    try:
        for fd in fds:
            os.set_inheritable(fd, True)
        # -S drops site-packages and .pth files (an editable install's finder
        # among them): name this package's root on PYTHONPATH explicitly.
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # noqa: PTH100, PTH120
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        os.execve(sys.executable, [sys.executable, "-S", "-c",  # noqa: S606 - fixed argv
                                   "import sys; from supervisor.keeper import serve_main; "
                                   "sys.exit(serve_main(sys.argv[1]))", state.to_json()], env)
    except OSError as e:
        print(f"corral-keeper: re-exec failed ({e}); serving from the start process",
              file=sys.stderr, flush=True)
        for fd in fds:
            with contextlib.suppress(OSError):
                os.set_inheritable(fd, False)


def serve(listener: socket.socket, st: ServeState) -> int:
    keeper = Keeper(st.master, st.init_pid, st.init_start, SessionLog(st.log), listener,
                    st.status)
    keeper.size = (st.cols, st.rows)
    for fd, subscribed in st.greeted:
        keeper.adopt_client(socket.socket(fileno=fd), bool(subscribed))
    return keeper.run()


def serve_main(state_json: str) -> int:
    """Entry point of the re-executed keeper: serve the inherited PTY and socket."""
    st = ServeState(*json.loads(state_json))
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    for fd in (st.master, st.listener, *(fd for fd, _ in st.greeted)):
        os.set_inheritable(fd, False)
    return serve(socket.socket(fileno=st.listener), st)


if __name__ == "__main__":
    sys.exit(main())
