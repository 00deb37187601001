"""idmap: an idmapped (detached) copy of a directory tree.

Mechanism: a throw-away user namespace whose uid/gid maps say "on-disk id A is
seen as id B", then open_tree(OPEN_TREE_CLONE) + mount_setattr(MOUNT_ATTR_IDMAP,
userns_fd) + move_mount. The mount shows the owner's files as owned by the
sandbox's uid, so the agent can edit them through the overlay (overlayfs
accepts idmapped lower layers since Linux 5.19; the upper stays plain).

A user namespace needs a process to exist in; we clone a child straight into
a new one (CLONE_NEWUSER), write its maps from here (we hold CAP_SETUID and
CAP_SETGID in the parent namespace, so any mapping is allowed), keep a
descriptor of the namespace and let the child go.
"""

from __future__ import annotations

import os
import signal

from sandbox import kernel
from sandbox.errors import KernelError

_MAX_ID = 4294967295  # ids are u32; (u32)-1 is "no id" and never mapped


def id_map(disk: int, shown: int) -> str:
    """The user namespace map text for an idmapped mount: on-disk id `disk` is
    shown as `shown`; every other id as itself.

    An idmapped mount reads the namespace's map "inside -> outside" as
    "on disk -> as seen", so each line is `disk shown count`. Identity is kept
    for the other ids (root-owned files stay root's, not "nobody"), except
    `shown` on disk, which has nowhere left to go and appears as the overflow id.
    """
    if disk == shown:
        return f"0 0 {_MAX_ID}\n"
    lines = [(disk, shown, 1)]
    start = 0
    for c in sorted({disk, shown}):
        if c > start:
            lines.append((start, start, c - start))
        start = c + 1
    if start < _MAX_ID:
        lines.append((start, start, _MAX_ID - start))
    return "".join(f"{a} {b} {n}\n" for a, b, n in lines)


def make_userns(uid_disk: int, uid_shown: int, gid_disk: int, gid_shown: int,
                proc: str = "/proc") -> int:
    """An fd of a new user namespace whose maps show uid/gid `*_disk` as `*_shown`.

    Must run where `proc` shows our own pid namespace (the host side, before
    the sandbox's init exists). Safe in a multithreaded caller: the helper is
    a clone(CLONE_VM) child parked in pause(), not a fork of the interpreter.
    """
    pid, stack = kernel.clone_paused(kernel.CLONE_NEWUSER)
    try:
        for name, text in (("uid_map", id_map(uid_disk, uid_shown)),
                           ("setgroups", "deny"),
                           ("gid_map", id_map(gid_disk, gid_shown))):
            with open(f"{proc}/{pid}/{name}", "w") as f:
                f.write(text)
        return os.open(f"{proc}/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise KernelError(f"writing the id maps of user namespace helper {pid} failed: {e}",
                          errno=e.errno or 0) from e
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        del stack


def idmapped_tree(path: str, target: str, userns_fd: int) -> None:
    """Attach an idmapped, read-only clone of the mount tree at `path` onto `target`."""
    fd = kernel.open_tree(-100, path, kernel.OPEN_TREE_CLONE | kernel.OPEN_TREE_CLOEXEC)
    try:
        kernel.mount_setattr(fd, "", kernel.AT_EMPTY_PATH,
                             kernel.MOUNT_ATTR_IDMAP | kernel.MOUNT_ATTR_RDONLY
                             | kernel.MOUNT_ATTR_NOSUID | kernel.MOUNT_ATTR_NODEV,
                             userns_fd=userns_fd)
        kernel.move_mount(fd, "", -100, target, kernel.MOVE_MOUNT_F_EMPTY_PATH)
    finally:
        os.close(fd)
