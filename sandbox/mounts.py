# ruff: noqa: PTH101, PTH102, PTH103, PTH112, PTH114, PTH115, PTH116, PTH120, PTH211
# (paths here are strings handed straight to syscalls: os.* on purpose)
# (paths here are strings handed straight to syscalls: os.* on purpose)
"""mounts: the sandbox's filesystem view — plan it (pure), then apply it.

Mechanism (bubblewrap's, in Python): inside a fresh mount namespace, make
everything private, mount a tmpfs staging root, pivot_root into it with the
host's tree parked at /oldroot, build the sandbox tree at /newroot from
/oldroot/<host path> sources, then pivot_root into /newroot and detach the
old root. Building the tree *after* the first pivot means an absolute symlink
met while creating mountpoints resolves inside the staging root, never on the
host's real tree.

`plan_mounts(spec)` turns a SandboxSpec into an ordered list of MountOp. It is
pure (unit-tested without root). The ordering rules:

* every entry (system dir, /etc, /proc, /dev, /tmp, /home/agent, the
  workspace, the template's rules) is keyed by its path inside the sandbox;
  for the same path the *last* entry wins (template rules come last);
* entries are then applied parents first (sorted by path components), so a
  rule for /data/secret lands inside the mount for /data whatever the order
  the template wrote them in;
* a read-only bind that must receive a mountpoint that does not exist in its
  source (a hidden path created later, a rule target) is marked with those
  `children`: at apply time it becomes a read-only overlay whose private
  (tmpfs) upper layer holds the missing mountpoints — the host source is never
  written and a file created there later stays covered.

`apply_mounts(ops, ...)` only executes the list, logging each op at debug level.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

from sandbox import kernel, overlay
from sandbox.errors import HostSetupError, KernelError
from sandbox.spec import SandboxSpec, check_abs_path

log = logging.getLogger(__name__)

OpKind = Literal[
    "tmpfs",  # mount a tmpfs at target (data = options)
    "sysdir",  # host system dir: same symlink if the host's is one, else ro bind; skip if absent
    "bind",  # bind source (host) at target, ro or rw, recursive
    "devbind",  # bind one host device node (file) at target
    "proc",  # fresh procfs for the sandbox's pid namespace
    "devpts",  # new devpts instance
    "symlink",  # create symlink target -> source
    "hide",  # cover target with an empty, unreadable file/dir (created if missing)
    "mask",  # like hide, but only if target exists (proc/etc masks)
    "readonly",  # bind target onto itself read-only (e.g. /proc/sys)
    "workspace",  # the overlay workspace (see sandbox.overlay)
    "userdb",  # host passwd/group + an entry for the agent's uid, bound read-only
    "remount_ro",  # make an existing mount (the root tmpfs) read-only
]

#: Flags for every mount the agent can write to: no setuid binaries, no device nodes.
WRITABLE = kernel.MS_NOSUID | kernel.MS_NODEV

#: Host system directories shown read-only when the template gives no rootfs.
#: On merged-/usr hosts /bin, /lib... are symlinks and are recreated as such.
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")

#: Host /etc entries that never reach a sandbox: password hashes, sudo policy,
#: SSH host keys (an agent could impersonate the host), TLS private keys and
#: corral's own configuration and secrets.
ETC_HIDDEN = (
    "/etc/shadow", "/etc/shadow-", "/etc/gshadow", "/etc/gshadow-",
    "/etc/sudoers", "/etc/sudoers.d", "/etc/security/opasswd",
    "/etc/ssh/ssh_host_rsa_key", "/etc/ssh/ssh_host_ecdsa_key",
    "/etc/ssh/ssh_host_ed25519_key", "/etc/ssh/ssh_host_dsa_key",
    "/etc/ssl/private", "/etc/corral", "/etc/machine-id",
)

#: /proc entries masked like runc's defaults: kernel memory, keys, timers.
PROC_MASKED = (
    "/proc/kcore", "/proc/kmsg", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
    "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/proc/acpi", "/proc/asound",
)
#: /proc entries that stay readable but must not change host settings
#: (sysrq, core_pattern, hostname of other namespaces, irq affinity...).
PROC_READONLY = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")

DEVICES = ("null", "zero", "full", "random", "urandom", "tty")

TMP_SIZE = "1g"  # private /tmp cap; its pages are charged to the sandbox's memory cgroup too
SHM_SIZE = "256m"


@dataclass(frozen=True)
class MountOp:
    """One step of building the sandbox tree; paths in `target` are inside the sandbox."""

    kind: OpKind
    target: str
    source: str | None = None  # host path (bind, sysdir, devbind) or link text (symlink)
    ro: bool = False
    flags: int = 0  # extra MS_* flags (nosuid, nodev, noexec)
    data: str | None = None  # mount options
    #: Descendant mountpoints this (read-only) mount must provide even when its
    #: source lacks them; see the module docstring.
    children: tuple[str, ...] = ()


def _parts(path: str) -> tuple[str, ...]:
    return tuple(p for p in path.split("/") if p)


def _norm(path: str) -> str:
    return "/" + "/".join(_parts(path))


def _under(path: str, top: str) -> bool:
    p, t = _parts(path), _parts(top)
    return len(p) > len(t) and p[: len(t)] == t


def plan_mounts(spec: SandboxSpec) -> list[MountOp]:
    """The ordered list of mount operations for `spec` (pure: touches nothing)."""
    # Entries keyed by sandbox path; a later entry for the same path replaces
    # the earlier one (dict keeps first insertion order, we re-sort anyway).
    entries: dict[str, list[MountOp]] = {}

    def put(path: str, *ops: MountOp) -> None:
        path = _norm(path)
        entries.pop(path, None)
        entries[path] = list(ops)

    if spec.rootfs:
        put("/", MountOp("bind", "/", source=spec.rootfs, ro=True, flags=WRITABLE))
    else:
        put("/", MountOp("tmpfs", "/", data="mode=0755,size=1m,nr_inodes=4096", flags=WRITABLE))
        for d in SYSTEM_DIRS:
            put(d, MountOp("sysdir", d, source=d, ro=True, flags=WRITABLE))
        put("/etc", MountOp("bind", "/etc", source="/etc", ro=True, flags=WRITABLE),
            *(MountOp("mask", p) for p in ETC_HIDDEN))

    put("/proc",
        MountOp("proc", "/proc", flags=WRITABLE | kernel.MS_NOEXEC),
        *(MountOp("mask", p) for p in PROC_MASKED),
        *(MountOp("readonly", p) for p in PROC_READONLY))

    put("/dev",
        MountOp("tmpfs", "/dev", data="mode=0755,size=64k,nr_inodes=256",
                flags=WRITABLE | kernel.MS_NOEXEC),
        *(MountOp("devbind", f"/dev/{d}", source=f"/dev/{d}",
                  flags=kernel.MS_NOSUID | kernel.MS_NOEXEC) for d in DEVICES),
        # A private devpts instance: the agent's ptys are invisible to the host
        # and other agents; ptmxmode=0666 so the unprivileged agent can open ptmx.
        MountOp("devpts", "/dev/pts", data="newinstance,ptmxmode=0666,mode=0620,gid=5",
                flags=kernel.MS_NOSUID | kernel.MS_NOEXEC),
        MountOp("symlink", "/dev/ptmx", source="pts/ptmx"),
        MountOp("symlink", "/dev/fd", source="/proc/self/fd"),
        MountOp("symlink", "/dev/stdin", source="/proc/self/fd/0"),
        MountOp("symlink", "/dev/stdout", source="/proc/self/fd/1"),
        MountOp("symlink", "/dev/stderr", source="/proc/self/fd/2"),
        MountOp("tmpfs", "/dev/shm", data=f"mode=1777,size={SHM_SIZE}",
                flags=WRITABLE | kernel.MS_NOEXEC))

    put("/tmp", MountOp("tmpfs", "/tmp", data=f"mode=1777,size={TMP_SIZE}", flags=WRITABLE))

    if spec.home:
        put("/home/agent", MountOp("bind", "/home/agent", source=spec.home, flags=WRITABLE))
    else:
        put("/home/agent", MountOp("tmpfs", "/home/agent",
                                   data=f"mode=0700,uid={spec.uid},gid={spec.gid},size=256m",
                                   flags=WRITABLE))

    ws = spec.workspace
    inside = _norm(check_abs_path(ws.inside, "workspace path"))
    if ws.mode == "overlay" and ws.project:
        put(inside, MountOp("workspace", inside, source=check_abs_path(ws.project, "project"),
                            flags=WRITABLE))
    elif ws.mode == "bind" and ws.project:
        put(inside, MountOp("bind", inside, source=check_abs_path(ws.project, "project"),
                            flags=WRITABLE))

    for rule in spec.rules:
        path = _norm(check_abs_path(rule.path, "filesystem rule path"))
        if rule.mode == "hidden":
            put(path, MountOp("hide", path))
        else:
            src = check_abs_path(rule.source or rule.path, "filesystem rule source")
            put(path, MountOp("bind", path, source=src, ro=rule.mode == "ro", flags=WRITABLE))

    # Parents first; stable, so the ops of one entry keep their order.
    ordered = sorted(entries.items(), key=lambda kv: _parts(kv[0]))
    heads = [p for p, _ in ordered]

    ops: list[MountOp] = []
    for path, group in ordered:
        head = group[0]
        if head.kind in ("bind", "workspace") and (head.ro or head.kind == "workspace"):
            # Entries nested directly under this one need mountpoints in it.
            kids = tuple(q for q in heads if _under(q, path)
                         and not any(_under(q, m) and _under(m, path) for m in heads))
            if kids:
                head = MountOp(head.kind, head.target, head.source, head.ro, head.flags,
                               head.data, kids)
        ops.append(head)
        ops.extend(group[1:])
    if not spec.rootfs and "/etc" in entries and entries["/etc"][0].source == "/etc":
        # Last: the workload's uid is only known once the workspace is mounted
        # (idmap fallback). Tools (ssh, git, the shell prompt) want a name.
        ops.append(MountOp("userdb", "/etc/passwd", source="/etc/passwd"))
        ops.append(MountOp("userdb", "/etc/group", source="/etc/group"))
    ops.append(MountOp("remount_ro", "/"))
    return ops


# --------------------------------------------------------------------------- apply

STAGE_NEW = "/newroot"
STAGE_OLD = "/oldroot"
SCRATCH = "/scratch"  # on the staging tmpfs: empty file, overlay uppers, idmapped lowers


@dataclass
class Applied:
    """What apply_mounts found out while building the tree."""

    #: uid/gid the workload must run as (the project owner's when the
    #: workspace could not be idmapped; see sandbox.overlay).
    uid: int
    gid: int
    idmapped: bool = False
    mounted: list[str] = field(default_factory=list)


def _need(value: str | None) -> str:
    if value is None:  # plan_mounts always sets it for these kinds
        raise ValueError("mount op without a source")
    return value


def _host(path: str) -> str:
    return STAGE_OLD + _norm(path) if _norm(path) != "/" else STAGE_OLD


def _new(path: str) -> str:
    return STAGE_NEW + _norm(path) if _norm(path) != "/" else STAGE_NEW


def _mkdirs(path: str) -> None:
    try:
        os.makedirs(path, mode=0o755, exist_ok=True)
    except OSError as e:
        raise KernelError(f"mkdir({path!r}) failed: {errno.errorcode.get(e.errno or 0)} "
                          f"({e.strerror})", errno=e.errno or 0) from e


def _make_mountpoint(path: str, as_dir: bool) -> None:
    if os.path.lexists(path):
        return
    _mkdirs(os.path.dirname(path))
    if as_dir:
        _mkdirs(path)
    else:
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))
        except OSError as e:
            raise KernelError(f"create({path!r}) failed: {e.strerror}", errno=e.errno or 0) from e


def _lock_ro(target: str, flags: int) -> None:
    """Make `target` and every mount below it read-only (+ nosuid/nodev as asked)."""
    attr = kernel.MOUNT_ATTR_RDONLY
    if flags & kernel.MS_NOSUID:
        attr |= kernel.MOUNT_ATTR_NOSUID
    if flags & kernel.MS_NODEV:
        attr |= kernel.MOUNT_ATTR_NODEV
    kernel.mount_setattr(-100, target, kernel.AT_RECURSIVE, attr)


def _source_is_dir(op: MountOp) -> bool:
    if op.kind in ("hide", "tmpfs", "proc", "devpts", "workspace"):
        return True
    if op.kind in ("bind", "sysdir", "devbind") and op.source:
        return os.path.isdir(_host(op.source))
    return True


class _Applier:
    def __init__(self, ops: list[MountOp], uid: int, gid: int, spec: SandboxSpec | None,
                 userns_fd: int | None):
        self.userns_fd = userns_fd
        self.ops = ops
        self.by_target = {_norm(o.target): o for o in ops}
        self.spec = spec
        self.result = Applied(uid=uid, gid=gid)
        self.n = 0
        self.empty_file = SCRATCH + "/empty"

    def scratch(self, what: str) -> str:
        self.n += 1
        d = f"{SCRATCH}/{what}{self.n}"
        _mkdirs(d)
        return d

    def mount(self, src: str | None, dst: str, fstype: str | None, flags: int,
              data: str | None = None) -> None:
        kernel.mount(src, dst, fstype, flags, data)
        self.result.mounted.append(dst)

    def missing_children(self, op: MountOp, src_root: str) -> list[MountOp]:
        out = []
        for kid in op.children:
            rel = _norm(kid)[len(_norm(op.target)):] if _norm(op.target) != "/" else _norm(kid)
            if not os.path.lexists(src_root + rel):
                out.append(self.by_target[_norm(kid)])
        return out

    def run(self, op: MountOp) -> None:
        log.debug("mount op %s", op)
        tgt = _new(op.target)
        k = op.kind
        if k == "tmpfs":
            _make_mountpoint(tgt, True)
            self.mount("tmpfs", tgt, "tmpfs", op.flags, op.data)
        elif k == "sysdir":
            src = _host(_need(op.source))
            if os.path.islink(src):
                os.symlink(os.readlink(src), tgt)
            elif os.path.isdir(src):
                self.bind(op, src, tgt)
        elif k == "bind":
            src = _host(_need(op.source))
            if not os.path.lexists(src):
                raise HostSetupError(f"bind source {op.source!r} (for {op.target}) does not exist",
                                     hint="create it on the host or fix the template rule")
            self.bind(op, src, tgt)
        elif k == "devbind":
            _make_mountpoint(tgt, False)
            self.mount(_host(_need(op.source)), tgt, None, kernel.MS_BIND)
            self.mount(None, tgt, None, kernel.MS_BIND | kernel.MS_REMOUNT | op.flags)
        elif k == "proc":
            _make_mountpoint(tgt, True)
            self.mount("proc", tgt, "proc", op.flags)
        elif k == "devpts":
            _make_mountpoint(tgt, True)
            self.mount("devpts", tgt, "devpts", op.flags, op.data)
        elif k == "symlink":
            if not os.path.lexists(tgt):
                os.symlink(_need(op.source), tgt)
        elif k in ("hide", "mask"):
            self.hide(tgt, must=k == "hide")
        elif k == "readonly":
            if os.path.lexists(tgt):
                self.mount(tgt, tgt, None, kernel.MS_BIND | kernel.MS_REC)
                self.mount(None, tgt, None, kernel.MS_BIND | kernel.MS_REMOUNT | kernel.MS_RDONLY
                           | kernel.MS_NOSUID | kernel.MS_NODEV | kernel.MS_NOEXEC)
        elif k == "workspace":
            if self.spec is None:
                raise HostSetupError("a workspace mount needs the sandbox spec")
            _make_mountpoint(tgt, True)
            kids = [(_norm(c)[len(_norm(op.target)):].lstrip("/"),
                     _source_is_dir(self.by_target[_norm(c)])) for c in op.children]
            got = overlay.mount_workspace(self.spec, tgt, host_root=STAGE_OLD,
                                          scratch=self.scratch("ws"), mountpoints=kids,
                                          userns_fd=self.userns_fd)
            self.result.mounted.append(tgt)
            self.result.uid, self.result.gid = got.uid, got.gid
            self.result.idmapped = got.idmapped
        elif k == "userdb":
            self.userdb(op, tgt)
        elif k == "remount_ro":
            kernel.mount(None, tgt, None, kernel.MS_REMOUNT | kernel.MS_BIND | kernel.MS_RDONLY
                         | kernel.MS_NOSUID | kernel.MS_NODEV)
        else:  # pragma: no cover - OpKind is closed
            raise ValueError(k)

    def bind(self, op: MountOp, src: str, tgt: str) -> None:
        is_dir = os.path.isdir(src)
        _make_mountpoint(tgt, is_dir)
        missing = self.missing_children(op, src) if is_dir and op.ro else []
        if missing:
            # Read-only overlay: the host source is the lower layer, the missing
            # mountpoints live in a private tmpfs upper (see module docstring).
            # The mask dir is the top of two lower layers and there is no upper:
            # a lower-only overlay is read-only by construction.
            mask = self.scratch("mask")
            st = os.stat(src)
            os.chown(mask, st.st_uid, st.st_gid)
            os.chmod(mask, stat.S_IMODE(st.st_mode))
            for kid in missing:
                rel = _norm(kid.target)[len(_norm(op.target)):] if op.target != "/" \
                    else _norm(kid.target)
                _make_mountpoint(mask + rel, _source_is_dir(kid))
            # Sub-mounts of the source are not part of an overlay's lower layer;
            # sources of ro rules are plain directories, so nothing is lost.
            self.mount("overlay", tgt, "overlay", op.flags | kernel.MS_RDONLY,
                       f"lowerdir={mask}:{src}")
            return
        self.mount(src, tgt, None, kernel.MS_BIND | kernel.MS_REC)
        if op.ro:
            _lock_ro(tgt, op.flags)
        elif op.flags:
            kernel.mount_setattr(-100, tgt, kernel.AT_RECURSIVE,
                                 (kernel.MOUNT_ATTR_NOSUID if op.flags & kernel.MS_NOSUID else 0)
                                 | (kernel.MOUNT_ATTR_NODEV if op.flags & kernel.MS_NODEV else 0))

    def userdb(self, op: MountOp, tgt: str) -> None:
        src = _host(_need(op.source))
        if not os.path.isfile(src) or os.path.islink(tgt):  # noqa: PTH113
            return
        with open(src) as f:
            text = f.read()
        ident = self.result.uid if op.target == "/etc/passwd" else self.result.gid
        if any(line.split(":")[2:3] == [str(ident)] for line in text.splitlines()):
            return  # the id has a name already (the idmap fallback's owner uid)
        if op.target == "/etc/passwd":
            entry = (f"agent:x:{self.result.uid}:{self.result.gid}:corral agent:"
                     "/home/agent:/bin/bash")
        else:
            entry = f"agent:x:{self.result.gid}:"
        if any(line.startswith("agent:") for line in text.splitlines()):
            entry = "corral-" + entry
        path = f"{self.scratch('db')}/{op.target.rsplit('/', 1)[1]}"
        with open(path, "w") as f:
            f.write(text.rstrip("\n") + "\n" + entry + "\n")
        os.chmod(path, 0o644)
        self.mount(path, tgt, None, kernel.MS_BIND)
        self.mount(None, tgt, None, kernel.MS_BIND | kernel.MS_REMOUNT | kernel.MS_RDONLY
                   | kernel.MS_NOSUID | kernel.MS_NODEV | kernel.MS_NOEXEC)

    def hide(self, tgt: str, must: bool) -> None:
        if not os.path.lexists(tgt):
            if not must:
                return
            # Invisible even if created later: a mountpoint now, covered. Under a
            # read-only bind or the workspace the plan made it exist already
            # (mask layer); under a writable bind (home, an rw rule) this leaves
            # an empty directory in that host directory, which the agent could
            # have created itself anyway.
            _make_mountpoint(tgt, True)
        if os.path.islink(tgt):
            raise HostSetupError(f"hidden path {tgt[len(STAGE_NEW):]!r} is a symlink",
                                 hint="hide the path the link points to instead")
        if os.path.isdir(tgt):
            self.mount("tmpfs", tgt, "tmpfs",
                       kernel.MS_RDONLY | kernel.MS_NOSUID | kernel.MS_NODEV | kernel.MS_NOEXEC,
                       "mode=000,size=4k,nr_inodes=1")
        else:
            self.mount(self.empty_file, tgt, None, kernel.MS_BIND)
            self.mount(None, tgt, None, kernel.MS_BIND | kernel.MS_REMOUNT | kernel.MS_RDONLY
                       | kernel.MS_NOSUID | kernel.MS_NODEV | kernel.MS_NOEXEC)


def apply_mounts(ops: Iterable[MountOp], staging: str, *, uid: int, gid: int,
                 spec: SandboxSpec | None = None, userns_fd: int | None = None,
                 before_pivot: Callable[[], None] | None = None) -> Applied:
    """Build the tree described by `ops` and pivot_root into it.

    Must run in a fresh mount namespace (and, for /proc, the sandbox's pid
    namespace). `staging` is an existing empty host directory (the run dir's
    `root`); the tmpfs mounted on it is private to the namespace. `userns_fd`
    (from overlay.workspace_userns) idmaps the workspace's lower layer.
    """
    ops = list(ops)
    # Nothing we do may propagate back to the host's namespace.
    kernel.mount(None, "/", None, kernel.MS_REC | kernel.MS_PRIVATE)
    kernel.mount("tmpfs", staging, "tmpfs", kernel.MS_NOSUID | kernel.MS_NODEV,
                 "mode=0755,size=16m")
    for d in ("newroot", "oldroot", "scratch"):
        os.mkdir(f"{staging}/{d}", 0o755)
    kernel.pivot_root(staging, f"{staging}/oldroot")
    os.chdir("/")
    empty = SCRATCH + "/empty"
    os.close(os.open(empty, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o000))

    ap = _Applier(ops, uid, gid, spec, userns_fd)
    for op in ops:
        try:
            ap.run(op)
        except OSError as e:
            raise KernelError(f"mount op {op.kind} {op.target}: {e}", errno=e.errno or 0) from e
    if before_pivot is not None:
        before_pivot()

    # Detach the host's tree, then make /newroot the root (bubblewrap's
    # pivot_root(".", ".") trick: the old root ends up stacked under the new
    # one and is lazily unmounted).
    kernel.mount(None, STAGE_OLD, None, kernel.MS_REC | kernel.MS_PRIVATE)
    kernel.umount2(STAGE_OLD, kernel.MNT_DETACH)
    oldfd = os.open("/", os.O_DIRECTORY | os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.chdir(STAGE_NEW)
        kernel.pivot_root(".", ".")
        os.fchdir(oldfd)
        kernel.umount2(".", kernel.MNT_DETACH)
    finally:
        os.close(oldfd)
    os.chdir("/")
    return ap.result
