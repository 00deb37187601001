# ruff: noqa: PTH116, PTH208
# (/proc paths read many times a second across agents: plain os calls on purpose)
"""needs-input: is an agent's session quiet and blocked reading its terminal?

People run several agents at once and want to know which one is waiting for
them (a prompt, a confirmation, a shell). The flag is set when both hold:

- the session has printed nothing for QUIET_SECONDS (the keeper appends every
  output chunk to the session log, so its mtime is the last output), and
- the terminal's foreground process group is asleep waiting for terminal
  input: at least one of its processes sleeps in read(2)/readv(2) on a
  terminal, or in a poll/select/epoll wait with a terminal on stdin (what
  readline, vi, node and Python's input() do), and none of them is running.

Everything is read from /proc as the host sees it (host pids; tpgid in
/proc/PID/stat is translated into our pid namespace by the kernel), starting
from the sandbox's init and walking its descendants (bounded). A process that
sleeps for any other reason (a `sleep`, a compile waiting on its children, a
network call with nothing on a terminal) does not count. This is a heuristic,
like tmux's activity/silence monitors: an agent polling its terminal while
waiting for a slow network answer and printing nothing counts as waiting.
"""

from __future__ import annotations

import contextlib
import os
import stat
import time

#: No output for this long before an agent can be said to wait for input.
QUIET_SECONDS = 2.0
#: Processes looked at per agent (the walk stops there).
MAX_PROCS = 256

#: Syscalls that wait on descriptors, by machine: (reads, polls).
_SYSCALLS: dict[str, tuple[frozenset[int], frozenset[int]]] = {
    # read, readv; poll, select, epoll_wait, pselect6, ppoll, epoll_pwait, epoll_pwait2
    "x86_64": (frozenset({0, 19}), frozenset({7, 23, 232, 270, 271, 281, 441})),
    # read, readv; pselect6, ppoll, epoll_pwait, epoll_pwait2
    "aarch64": (frozenset({63, 65}), frozenset({72, 73, 22, 441})),
}
_READS, _POLLS = _SYSCALLS.get(os.uname().machine, (frozenset(), frozenset()))
#: Character-device majors of terminals: /dev/tty (5), Unix98 pty slaves (136-143), VTs (4).
_TTY_MAJORS = frozenset({4, 5, *range(136, 144)})


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, pgrp, tpgid) from /proc/PID/stat, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    # comm may contain spaces and parentheses: split after the last ')'.
    fields = raw[raw.rfind(b")") + 2:].split()
    try:
        return fields[0].decode(), int(fields[2]), int(fields[5])
    except (IndexError, ValueError):
        return None


def _children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(c) for c in f.read().split())
    return out


def _is_tty(pid: int, fd: int) -> bool:
    try:
        st = os.stat(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return False
    return stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) in _TTY_MAJORS


def _waits_on_terminal(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/syscall") as f:
            words = f.read().split()
    except OSError:
        return False
    if not words or not words[0].isdigit():
        return False  # "running", or not in a syscall
    nr = int(words[0])
    if nr in _READS and len(words) > 1:
        with contextlib.suppress(ValueError):
            return _is_tty(pid, int(words[1], 16))
        return False
    return nr in _POLLS and _is_tty(pid, 0)


def descendants(root: int, limit: int = MAX_PROCS) -> list[int]:
    """`root`'s descendants (not root itself), breadth first, at most `limit`."""
    out: list[int] = []
    todo = _children(root)
    while todo and len(out) < limit:
        pid = todo.pop(0)
        out.append(pid)
        todo.extend(_children(pid))
    return out


def blocked_on_terminal(init_pid: int) -> bool:
    """Is the foreground process group of the session below init waiting for input?"""
    procs = descendants(init_pid)
    tpgid = 0
    for pid in procs:
        st = _stat(pid)
        if st is not None and st[2] > 0:
            tpgid = st[2]
            break
    if tpgid <= 0:
        return False
    waiting = False
    for pid in procs:
        st = _stat(pid)
        if st is None or st[1] != tpgid:
            continue
        if st[0] in ("R", "D"):
            return False  # someone in the foreground is working
        waiting = waiting or _waits_on_terminal(pid)
    return waiting


def needs_input(init_pid: int, session_log: str, now: float | None = None,
                quiet: float = QUIET_SECONDS) -> bool:
    try:
        last_output = os.stat(session_log).st_mtime
    except OSError:
        last_output = 0.0
    if (now if now is not None else time.time()) - last_output < quiet:
        return False
    return blocked_on_terminal(init_pid)
