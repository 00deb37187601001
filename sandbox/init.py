"""init: PID 1 of a sandbox's pid namespace (and the `enter` helper's waiter).

PID 1 has two duties the kernel gives no one else: it inherits every orphan
(so it must reap zombies, or the sandbox fills with them), and signals from
outside reach it only if it has a handler (pid_namespaces(7)), so the
keeper's SIGTERM must be caught and passed on to the main child. When the main
child exits, init exits with its status (128+N for signal N); the kernel then
SIGKILLs whatever is left in the namespace.

The handlers are installed *before* forking the main child, so a signal sent
right after `start` returns is not lost; a signal arriving before the child
exists is remembered and delivered once it does.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from typing import NoReturn

import prctl

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT,
             signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH)

_main_pid = 0
_pending: list[int] = []


def _forward(sig: int, _frame: object) -> None:
    if _main_pid > 0:
        try:
            os.kill(_main_pid, sig)
        except ProcessLookupError:
            pass
    else:
        _pending.append(sig)


def install_forwarding() -> None:
    for sig in FORWARDED:
        signal.signal(sig, _forward)


def reset_forwarding() -> None:
    """In the forked child: back to default dispositions before anything else."""
    global _main_pid
    _main_pid = -1
    for sig in FORWARDED:
        signal.signal(sig, signal.SIG_DFL)


def _set_main(pid: int) -> None:
    global _main_pid
    _main_pid = pid
    for sig in _pending:
        _forward(sig, None)
    _pending.clear()


def exit_code(status: int) -> int:
    """A wait status as a shell would report it: N, or 128+signal."""
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def _quiet_stdio() -> None:
    # init must not keep the session's terminal (or pipes) open: the keeper
    # sees EOF/hangup when the workload is done, not when init is.
    fd = os.open("/dev/null", os.O_RDWR)
    for i in (0, 1, 2):
        os.dup2(fd, i)
    if fd > 2:
        os.close(fd)


def run(main_pid: int, drop: Callable[[], None] | None = None) -> NoReturn:
    """Reap everything; exit with `main_pid`'s status when it exits."""
    _set_main(main_pid)
    try:
        _quiet_stdio()
    except OSError:
        pass
    # Inside, PID 1's command line would be the keeper's (host paths, options).
    try:
        prctl.set_name("corral-init")
        prctl.set_proctitle("corral-init")
    except (OSError, ValueError):
        pass
    if drop is not None:
        # init needs no privilege after setup: it only waits and forwards
        # signals to its (same-uid) child.
        drop()
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            os._exit(0)
        if pid == main_pid:
            os._exit(exit_code(status))


def mirror(child: int, drop: Callable[[], None] | None = None) -> NoReturn:
    """Wait for `child`; die the same way (exit code, or the same signal)."""
    _set_main(child)
    if drop is not None:
        drop()
    while True:
        try:
            pid, status = os.waitpid(child, 0)
        except ChildProcessError:
            os._exit(127)
        if pid == child:
            break
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        # SIGKILL/SIGSTOP take no handler (signal() raises EINVAL) and are
        # already default: without this guard a SIGKILLed service's mirror
        # exited 127 instead of dying by SIGKILL too.
        try:
            signal.signal(sig, signal.SIG_DFL)
        except (OSError, ValueError):
            pass
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig])
        try:
            os.kill(os.getpid(), sig)
        except OSError:
            pass
    os._exit(exit_code(status))
