"""The ctypes seam: the few syscalls Python 3.11 lacks, and nothing else.

mount, umount2, pivot_root, unshare, setns, openat2, open_tree, move_mount and
mount_setattr. Every failure raises KernelError whose text names the call and
its arguments, e.g. ``mount('/srv/data', '/newroot/data', MS_BIND|MS_RDONLY)
failed: EPERM``, so a log line is enough to reproduce it by hand.
"""

from __future__ import annotations

import ctypes
import errno as errno_mod
import os

from sandbox.errors import KernelError

# "libc.so.6" by name: ctypes.util.find_library runs `ldconfig -p` in a
# subprocess, which every keeper start would pay for.
_libc = ctypes.CDLL("libc.so.6", use_errno=True)

# --- clone/unshare flags (linux/sched.h) ---
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

# --- mount flags (linux/mount.h) ---
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_MOVE = 8192
MS_REC = 16384
MS_SILENT = 32768
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_STRICTATIME = 1 << 24

MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8

_MS_NAMES = {
    MS_RDONLY: "MS_RDONLY",
    MS_NOSUID: "MS_NOSUID",
    MS_NODEV: "MS_NODEV",
    MS_NOEXEC: "MS_NOEXEC",
    MS_REMOUNT: "MS_REMOUNT",
    MS_BIND: "MS_BIND",
    MS_MOVE: "MS_MOVE",
    MS_REC: "MS_REC",
    MS_SILENT: "MS_SILENT",
    MS_PRIVATE: "MS_PRIVATE",
    MS_SLAVE: "MS_SLAVE",
    MS_STRICTATIME: "MS_STRICTATIME",
}

# --- openat2 (linux/openat2.h) ---
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10

# --- new mount API (linux/mount.h) ---
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
MOVE_MOUNT_F_EMPTY_PATH = 0x00000004
MOUNT_ATTR_RDONLY = 0x00000001
MOUNT_ATTR_NOSUID = 0x00000002
MOUNT_ATTR_NODEV = 0x00000004
MOUNT_ATTR_IDMAP = 0x00100000

# Syscall numbers for the calls glibc 2.36 does not wrap (x86_64 / aarch64 use
# the same numbers for these since they were added after the unified table).
_SYS = {
    "x86_64": {"pivot_root": 155, "setns": 308, "openat2": 437, "open_tree": 428,
               "move_mount": 429, "mount_setattr": 442},
    "aarch64": {"pivot_root": 41, "setns": 268, "openat2": 437, "open_tree": 428,
                "move_mount": 429, "mount_setattr": 442},
}[os.uname().machine]


def _flag_names(flags: int) -> str:
    names = [n for bit, n in _MS_NAMES.items() if flags & bit]
    rest = flags & ~sum(b for b in _MS_NAMES if flags & b)
    if rest:
        names.append(hex(rest))
    return "|".join(names) or "0"


def _fail(call: str, hint: str = "") -> KernelError:
    err = ctypes.get_errno()
    name = errno_mod.errorcode.get(err, str(err))
    return KernelError(f"{call} failed: {name} ({os.strerror(err)})", errno=err, hint=hint)


def _b(s: str | bytes | None) -> bytes | None:
    if s is None:
        return None
    return s if isinstance(s, bytes) else os.fsencode(s)


def mount(source: str | None, target: str, fstype: str | None, flags: int = 0,
          data: str | None = None) -> None:
    """mount(2)."""
    if _libc.mount(_b(source), _b(target), _b(fstype), ctypes.c_ulong(flags), _b(data)) != 0:
        raise _fail(f"mount({source!r}, {target!r}, {fstype!r}, {_flag_names(flags)}, {data!r})")


def umount2(target: str, flags: int = 0) -> None:
    """umount2(2)."""
    if _libc.umount2(_b(target), ctypes.c_int(flags)) != 0:
        raise _fail(f"umount2({target!r}, {flags})")


def pivot_root(new_root: str, put_old: str) -> None:
    """pivot_root(2) (no glibc wrapper)."""
    if _libc.syscall(_SYS["pivot_root"], _b(new_root), _b(put_old)) != 0:
        raise _fail(f"pivot_root({new_root!r}, {put_old!r})")


def unshare(flags: int) -> None:
    """unshare(2); os.unshare only arrives in Python 3.12."""
    if _libc.unshare(ctypes.c_int(flags)) != 0:
        raise _fail(f"unshare({hex(flags)})")


def setns(fd: int, nstype: int = 0) -> None:
    """setns(2): join the namespace `fd` refers to."""
    if _libc.setns(ctypes.c_int(fd), ctypes.c_int(nstype)) != 0:
        raise _fail(f"setns({fd}, {hex(nstype)})")


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


def openat2(dirfd: int, path: str | bytes, flags: int, resolve: int, mode: int = 0) -> int:
    """openat2(2): open `path` relative to `dirfd` with RESOLVE_* restrictions.

    Used wherever the daemon touches a tree the agent controls (diff, commit,
    sftp): RESOLVE_BENEATH / RESOLVE_IN_ROOT make the kernel refuse any path
    (symlink, "..", magic link) that would leave the tree, atomically — no
    check-then-open race.
    """
    how = _OpenHow(flags | os.O_CLOEXEC, mode, resolve)
    fd = _libc.syscall(_SYS["openat2"], ctypes.c_int(dirfd), _b(path), ctypes.byref(how),
                       ctypes.c_size_t(ctypes.sizeof(how)))
    if fd < 0:
        raise _fail(f"openat2({dirfd}, {path!r}, {oct(flags)}, resolve={hex(resolve)})")
    return int(fd)


def open_tree(dirfd: int, path: str, flags: int) -> int:
    """open_tree(2): a detached copy of a mount (OPEN_TREE_CLONE), as an fd."""
    fd = _libc.syscall(_SYS["open_tree"], ctypes.c_int(dirfd), _b(path), ctypes.c_uint(flags))
    if fd < 0:
        raise _fail(f"open_tree({dirfd}, {path!r}, {hex(flags)})")
    return int(fd)


def move_mount(from_dirfd: int, from_path: str, to_dirfd: int, to_path: str, flags: int) -> None:
    """move_mount(2): attach a detached mount (from open_tree) somewhere."""
    r = _libc.syscall(_SYS["move_mount"], ctypes.c_int(from_dirfd), _b(from_path),
                      ctypes.c_int(to_dirfd), _b(to_path), ctypes.c_uint(flags))
    if r != 0:
        raise _fail(f"move_mount({from_dirfd}, {from_path!r}, {to_dirfd}, {to_path!r}, "
                    f"{hex(flags)})")


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def mount_setattr(dirfd: int, path: str, flags: int, attr_set: int, attr_clr: int = 0,
                  userns_fd: int = 0) -> None:
    """mount_setattr(2); with MOUNT_ATTR_IDMAP this makes an idmapped mount."""
    attr = _MountAttr(attr_set, attr_clr, 0, userns_fd)
    r = _libc.syscall(_SYS["mount_setattr"], ctypes.c_int(dirfd), _b(path),
                      ctypes.c_uint(flags), ctypes.byref(attr),
                      ctypes.c_size_t(ctypes.sizeof(attr)))
    if r != 0:
        raise _fail(f"mount_setattr({dirfd}, {path!r}, {hex(flags)}, set={hex(attr_set)})",
                    hint="idmapped mounts need Linux >= 5.12 (overlayfs layers: >= 5.19)")


def sethostname(name: str) -> None:
    """sethostname(2) (Python has no wrapper); call inside the new UTS namespace."""
    raw = name.encode()
    if _libc.sethostname(raw, ctypes.c_size_t(len(raw))) != 0:
        raise _fail(f"sethostname({name!r})")


# --- prctl (linux/prctl.h): the two calls python-prctl does not offer ---
PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    """prctl(2), raw."""
    r = _libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg2), ctypes.c_ulong(arg3),
                    ctypes.c_ulong(arg4), ctypes.c_ulong(arg5))
    if r < 0:
        raise _fail(f"prctl({option}, {arg2}, {arg3})")
    return int(r)


def cap_last_cap() -> int:
    """Highest capability number this kernel knows (may exceed libcap's list)."""
    with open("/proc/sys/kernel/cap_last_cap") as f:
        return int(f.read())


# --- a parked child in new namespaces, without forking the interpreter ---
SIGCHLD = 17
CLONE_VM = 0x00000100
_STACK_SIZE = 64 * 1024


def clone_paused(flags: int) -> tuple[int, object]:
    """clone(2) a child that only runs libc's pause(), in namespaces `flags`.

    Used to own a fresh user namespace long enough to write its id maps and
    open /proc/<pid>/ns/user. CLONE_VM shares our address space, so unlike
    fork() nothing is copied (a large Python process forks in tens of ms); the
    child touches nothing but its own small stack. Returns (pid, stack): keep
    the stack object alive until the child is reaped; end the child with
    SIGKILL.
    """
    stack = ctypes.create_string_buffer(_STACK_SIZE)
    top = ctypes.c_void_p((ctypes.addressof(stack) + _STACK_SIZE) & ~0xF)
    fn = ctypes.cast(_libc.pause, ctypes.c_void_p)
    _libc.clone.restype = ctypes.c_int
    _libc.clone.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
    pid = _libc.clone(fn, top, ctypes.c_int(flags | CLONE_VM | SIGCHLD), None)
    if pid < 0:
        raise _fail(f"clone({hex(flags)})")
    return int(pid), stack
