"""What an agent changed in its overlay workspace: read the upper dir safely, diff it.

Mechanism: the agent's workspace is an overlay (lower = the project, upper = the
agent's writes) mounted only inside the agent's own mount namespace, so the
daemon never has a merged view. It walks the UPPER directory directly and
compares each entry with the same path in the lower one, following the
overlayfs conventions (Documentation/filesystems/overlayfs.rst):

- a whiteout (char device 0:0, or a fifo / zero-size file carrying the
  ``<prefix>whiteout`` xattr) deletes the lower entry of that name;
- an opaque directory (``<prefix>opaque`` = "y") hides everything the lower
  directory had: lower entries missing from it are deleted;
- a directory renamed without redirect_dir shows as a whole new (opaque) copy
  plus a whiteout at the old name — i.e. delete + add, which is what we report.

The cost grows with the upper dir (what changed), never with the project.

The upper dir is written by the untrusted agent: symlinks pointing out of the
tree, fifos, sockets, device nodes, names with newlines or invalid UTF-8, hard
links, deep trees. Hence the fd discipline used everywhere here:

- directories are opened one component at a time relative to their parent's
  fd with openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | ...) and O_NOFOLLOW,
  so a symlink swapped in for a directory is refused by the kernel, not
  followed (no check-then-open race);
- regular files are first opened O_PATH (no side effect, never blocks, even for
  a fifo or a device), checked with fstat, and only then re-opened for reading
  through /proc/self/fd — the very inode that was checked;
- symlinks are only ever readlink()ed; "other" files are never opened;
- names stay raw bytes end to end so odd names round-trip.

The daemon mounts overlays with redirect_dir=off and metacopy=off; an upper
dir that carries redirect/metacopy xattrs is refused with a clear error rather
than diffed wrongly.
"""

from __future__ import annotations

import base64
import difflib
import errno
import hashlib
import logging
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from sandbox import kernel
from sandbox.errors import CorralError, KernelError

log = logging.getLogger(__name__)

Kind = Literal["added", "modified", "deleted"]
Type = Literal["file", "dir", "symlink", "other"]

#: xattr namespace overlayfs uses when mounted by root without `userxattr`.
TRUSTED_PREFIX = b"trusted.overlay."
#: ... and with `userxattr` (unprivileged overlays).
USER_PREFIX = b"user.overlay."

#: Directories nested deeper than this are reported but not descended: every
#: level holds two fds (upper and lower), and an agent can nest without limit.
MAX_DEPTH = 128
#: Files larger than this are compared but not rendered as text.
MAX_TEXT_BYTES = 8 << 20
#: git's rule for "binary": a NUL byte within the first 8000 bytes.
_BINARY_SNIFF = 8000

_RESOLVE = (kernel.RESOLVE_BENEATH | kernel.RESOLVE_NO_SYMLINKS
            | kernel.RESOLVE_NO_MAGICLINKS | kernel.RESOLVE_NO_XDEV)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK
_PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW
_CHUNK = 1 << 16
#: errnos meaning "this entry is gone or is not what it was" (the agent is live).
_GONE = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EXDEV, errno.EAGAIN})


@dataclass(frozen=True)
class Change:
    """One changed path of the workspace, relative to its root.

    A type change (file → dir, …) is two Changes on the same path: the
    deleted old entry, then the added new one (as git shows it).
    """

    #: Relative path, raw bytes so names with newlines / invalid UTF-8 round-trip.
    path: bytes
    kind: Kind
    type: Type
    #: Full st_mode (S_IFMT | permission bits) before / after; None when absent.
    old_mode: int | None
    new_mode: int | None
    #: Size in bytes of the new entry (None when deleted).
    size: int | None = None


def git_mode(mode: int | None) -> int | None:
    """The mode git would record: 100644/100755, 120000, 040000; raw for others."""
    if mode is None:
        return None
    if stat.S_ISREG(mode):
        return 0o100755 if mode & 0o111 else 0o100644
    if stat.S_ISLNK(mode):
        return 0o120000
    if stat.S_ISDIR(mode):
        return 0o040000
    return mode


def _type_of(mode: int) -> Type:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "other"


# --------------------------------------------------------------------------
# Safe primitives (all relative to an fd we hold; nothing is ever followed)


def open_root(path: str) -> int:
    """Open a tree's root directory (a path the daemon chose, not the agent)."""
    try:
        return os.open(path, _DIR_FLAGS | os.O_CLOEXEC)
    except OSError as e:
        raise CorralError(f"cannot open workspace directory {path!r}: {e.strerror}") from e


def _openat2(dirfd: int, path: bytes, flags: int) -> int:
    """openat2 with our resolve flags; retried on EAGAIN, which RESOLVE_BENEATH
    returns when a concurrent rename might have let ".." escape (openat2(2))."""
    for _ in range(20):
        try:
            return kernel.openat2(dirfd, path, flags, _RESOLVE)
        except KernelError as e:
            if e.errno != errno.EAGAIN:
                raise
    return kernel.openat2(dirfd, path, flags, _RESOLVE)


def _open_dir(dirfd: int, name: bytes) -> int | None:
    """The child directory `name` of `dirfd`, or None if it is gone or not a dir."""
    try:
        return _openat2(dirfd, name, _DIR_FLAGS)
    except KernelError as e:
        # Vanished, or swapped for a symlink / non-dir by the live agent: skip it.
        # Anything else (EMFILE, EIO …) must not silently shorten the diff.
        if e.errno not in _GONE:
            raise
        log.debug("not descending into %r: %s", name, e)
        return None


def _lstat(dirfd: int, name: bytes) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _xattrs(dirfd: int, name: bytes, prefix: bytes) -> dict[bytes, bytes]:
    """The overlay xattrs of `name` (lgetxattr: a symlink's own, never its target's)."""
    path = b"/proc/self/fd/%d/%s" % (dirfd, name)
    out: dict[bytes, bytes] = {}
    try:
        for key in os.listxattr(path, follow_symlinks=False):
            raw = os.fsencode(key)
            if raw.startswith(prefix):
                out[raw[len(prefix):]] = os.getxattr(path, key, follow_symlinks=False)
    except OSError as e:
        if e.errno not in (errno.ENOENT, errno.ENOTSUP, errno.EPERM, errno.EACCES):
            raise
    return out


def open_regular(rootfd: int, path: bytes) -> int | None:
    """An fd open for reading on the regular file `path` beneath `rootfd`, or None.

    O_PATH first: opening a fifo, socket or device that way has no effect and
    cannot block; fstat on that fd then tells us what the inode really is, and
    only a regular file is re-opened for reading, via /proc/self/fd (the same
    inode, not a fresh path lookup the agent could race).
    """
    try:
        pfd = _openat2(rootfd, path, _PATH_FLAGS)
    except CorralError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(pfd).st_mode):
            return None
        return os.open(f"/proc/self/fd/{pfd}", os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY
                       | os.O_CLOEXEC)
    except OSError:
        return None
    finally:
        os.close(pfd)


def read_link(rootfd: int, path: bytes) -> bytes | None:
    """The target of the symlink `path` beneath `rootfd` (never followed), or None."""
    parent, _, name = path.rpartition(b"/")
    try:
        pfd = _openat2(rootfd, parent or b".", _DIR_FLAGS)
    except CorralError:
        return None
    try:
        return os.readlink(name, dir_fd=pfd)
    except OSError:
        return None
    finally:
        os.close(pfd)


def _read_fd(fd: int, limit: int) -> bytes:
    chunks: list[bytes] = []
    total = 0
    while total < limit:
        chunk = os.read(fd, min(_CHUNK, limit - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


def _same_content(ufd: int, lfd: int) -> bool:
    while True:
        a = os.read(ufd, _CHUNK)
        b = os.read(lfd, _CHUNK)
        if a != b:
            return False
        if not a:
            return True


def _files_equal(udir: int, ldir: int, name: bytes, ust: os.stat_result,
                 lst: os.stat_result) -> bool:
    if ust.st_size != lst.st_size:
        return False
    ufd = open_regular(udir, name)
    lfd = open_regular(ldir, name)
    try:
        if ufd is None or lfd is None:
            return False
        return _same_content(ufd, lfd)
    finally:
        for fd in (ufd, lfd):
            if fd is not None:
                os.close(fd)


# --------------------------------------------------------------------------
# The walk


class _Walker:
    def __init__(self, prefix: bytes, include_git_dir: bool) -> None:
        self.prefix = prefix
        self.include_git_dir = include_git_dir
        self.out: list[Change] = []

    def skip(self, name: bytes) -> bool:
        # The project's own repository metadata is not "work": an agent that runs
        # `git commit` inside its workspace dirties .git in the upper dir.
        return not self.include_git_dir and name.lower() == b".git"

    def is_whiteout(self, dirfd: int, name: bytes, st: os.stat_result) -> bool:
        if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
            return True
        # The alternative form (Linux 6.7+, made by image tools, not by overlayfs
        # itself): a fifo or empty file carrying the overlay "whiteout" xattr.
        return ((stat.S_ISFIFO(st.st_mode) or (stat.S_ISREG(st.st_mode) and st.st_size == 0))
                and b"whiteout" in _xattrs(dirfd, name, self.prefix))

    def check_supported(self, dirfd: int, name: bytes) -> dict[bytes, bytes]:
        xa = _xattrs(dirfd, name, self.prefix)
        if b"redirect" in xa or b"metacopy" in xa:
            raise CorralError(
                f"workspace entry {name!r} uses overlay redirect/metacopy, which diff "
                "does not understand",
                hint="mount workspace overlays with redirect_dir=off,metacopy=off")
        return xa

    # Entries that exist only in the lower tree (deleted): report them all.
    def deleted_tree(self, ldir: int, rel: bytes, depth: int) -> None:
        for name in _names(ldir):
            if self.skip(name):
                continue
            st = _lstat(ldir, name)
            if st is None:
                continue
            self.deleted(ldir, rel + name, name, st, depth)

    def deleted(self, ldir: int, path: bytes, name: bytes, st: os.stat_result,
                depth: int) -> None:
        if stat.S_ISDIR(st.st_mode) and depth < MAX_DEPTH:
            sub = _open_dir(ldir, name)
            if sub is not None:
                try:
                    self.deleted_tree(sub, path + b"/", depth + 1)
                finally:
                    os.close(sub)
        self.out.append(Change(path, "deleted", _type_of(st.st_mode), st.st_mode, None))

    def added(self, path: bytes, st: os.stat_result) -> None:
        self.out.append(Change(path, "added", _type_of(st.st_mode), None, st.st_mode,
                               st.st_size))

    def walk(self, udir: int, ldir: int | None, rel: bytes, opaque: bool, depth: int) -> None:
        """Compare upper dir `udir` with lower dir `ldir` (None: nothing below)."""
        names = _names(udir)
        seen: set[bytes] = set()
        for name in names:
            if self.skip(name):
                continue
            seen.add(name)
            ust = _lstat(udir, name)
            if ust is None:
                continue
            lst = _lstat(ldir, name) if ldir is not None else None
            path = rel + name
            if self.is_whiteout(udir, name, ust):
                if lst is not None and ldir is not None:
                    self.deleted(ldir, path, name, lst, depth)
                continue
            self.entry(udir, ldir, name, path, ust, lst, depth)
        if opaque and ldir is not None:
            # An opaque dir hides the whole lower dir: what it lacks was deleted.
            for name in _names(ldir):
                if name in seen or self.skip(name):
                    continue
                lst = _lstat(ldir, name)
                if lst is not None:
                    self.deleted(ldir, rel + name, name, lst, depth)

    def entry(self, udir: int, ldir: int | None, name: bytes, path: bytes,
              ust: os.stat_result, lst: os.stat_result | None, depth: int) -> None:
        utype = _type_of(ust.st_mode)
        xa = self.check_supported(udir, name) if utype in ("dir", "file") else {}
        if ldir is None or lst is None:
            if utype == "dir":
                self.directory(udir, None, name, path, ust, None, xa, depth)
            else:
                self.added(path, ust)
            return
        if _type_of(lst.st_mode) != utype:
            # A type change: the old entry goes, the new one arrives.
            self.deleted(ldir, path, name, lst, depth)
            if utype == "dir":
                self.directory(udir, None, name, path, ust, None, xa, depth)
            else:
                self.added(path, ust)
            return
        if utype == "dir":
            self.directory(udir, ldir, name, path, ust, lst, xa, depth)
        elif utype == "file":
            if (git_mode(ust.st_mode) != git_mode(lst.st_mode)
                    or not _files_equal(udir, ldir, name, ust, lst)):
                self.out.append(Change(path, "modified", "file", lst.st_mode, ust.st_mode,
                                       ust.st_size))
        elif utype == "symlink":
            if _readlink_at(udir, name) != _readlink_at(ldir, name):
                self.out.append(Change(path, "modified", "symlink", lst.st_mode, ust.st_mode,
                                       ust.st_size))
        elif (ust.st_mode, ust.st_rdev) != (lst.st_mode, lst.st_rdev):
            # Same "other" type on both sides (fifo over fifo …): never opened,
            # reported when its type bits or device number changed.
            self.out.append(Change(path, "modified", "other", lst.st_mode, ust.st_mode))

    def directory(self, udir: int, ldir: int | None, name: bytes, path: bytes,
                  ust: os.stat_result, lst: os.stat_result | None, xa: dict[bytes, bytes],
                  depth: int) -> None:
        if lst is None:
            self.added(path, ust)
        elif stat.S_IMODE(ust.st_mode) != stat.S_IMODE(lst.st_mode):
            self.out.append(Change(path, "modified", "dir", lst.st_mode, ust.st_mode))
        if depth + 1 >= MAX_DEPTH:
            log.warning("workspace: not descending into %r: deeper than %d levels",
                        path, MAX_DEPTH)
            return
        sub = _open_dir(udir, name)
        if sub is None:
            return
        lsub = _open_dir(ldir, name) if (ldir is not None and lst is not None) else None
        try:
            self.walk(sub, lsub, path + b"/", xa.get(b"opaque") == b"y", depth + 1)
        finally:
            os.close(sub)
            if lsub is not None:
                os.close(lsub)


def _names(dirfd: int) -> list[bytes]:
    """The names in a directory fd, as raw bytes, sorted (scandir dups the fd)."""
    with os.scandir(dirfd) as it:
        return sorted(os.fsencode(e.name) for e in it)


def _readlink_at(dirfd: int, name: bytes) -> bytes | None:
    try:
        return os.readlink(name, dir_fd=dirfd)
    except OSError:
        return None


def changes(upper: str, lower: str | None, *, userxattr: bool = False,
            include_git_dir: bool = False) -> list[Change]:
    """Every change the upper dir makes to the lower one, sorted by path.

    `lower` None means a workspace without a project (everything is added).
    `userxattr`: the overlay was mounted with -o userxattr (user.overlay.*).
    `include_git_dir`: also report changes beneath `.git` directories.
    """
    w = _Walker(USER_PREFIX if userxattr else TRUSTED_PREFIX, include_git_dir)
    ufd = open_root(upper)
    lfd = open_root(lower) if lower is not None else None
    try:
        w.walk(ufd, lfd, b"", False, 0)
    finally:
        os.close(ufd)
        if lfd is not None:
            os.close(lfd)
    order = {"deleted": 0, "added": 1, "modified": 1}
    return sorted(w.out, key=lambda c: (c.path, order[c.kind]))


# --------------------------------------------------------------------------
# Rendering


def quote_path(path: bytes) -> str:
    """A path as git prints it: C-quoted when it has control, quote or non-ASCII bytes."""
    special = {0x07: "\\a", 0x08: "\\b", 0x09: "\\t", 0x0A: "\\n", 0x0B: "\\v", 0x0C: "\\f",
               0x0D: "\\r", 0x22: '\\"', 0x5C: "\\\\"}
    if not any(b < 0x20 or b >= 0x7F or b in (0x22, 0x5C) for b in path):
        return path.decode("ascii")
    out = []
    for b in path:
        if b in special:
            out.append(special[b])
        elif b < 0x20 or b >= 0x7F:
            out.append(f"\\{b:03o}")
        else:
            out.append(chr(b))
    return '"' + "".join(out) + '"'


def _ab(prefix: bytes, path: bytes) -> str:
    return quote_path(prefix + path)


@dataclass
class _Side:
    """One side's content of a file, as much as rendering needs."""

    data: bytes | None  # None: absent, not a regular file, or unreadable
    too_large: bool = False

    @property
    def binary(self) -> bool:
        return self.data is not None and b"\0" in self.data[:_BINARY_SNIFF]


def _content(rootfd: int | None, path: bytes, ctype: Type) -> _Side:
    if rootfd is None:
        return _Side(None)
    if ctype == "symlink":
        return _Side(read_link(rootfd, path))
    if ctype != "file":
        return _Side(None)
    fd = open_regular(rootfd, path)
    if fd is None:
        return _Side(None)
    try:
        data = _read_fd(fd, MAX_TEXT_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_TEXT_BYTES:
        return _Side(data[:_BINARY_SNIFF], too_large=True)
    return _Side(data)


def _blob_id(data: bytes | None) -> str:
    if data is None:
        return "0000000"
    # Same id git gives the blob, so `index` lines look familiar (short form).
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()[:7]


def _lines(data: bytes) -> list[str]:
    # Split on "\n" only (str.splitlines also splits on \r, \f, \x1c …, git does not).
    text = data.decode("utf-8", "replace")
    parts = text.split("\n")
    out = [p + "\n" for p in parts[:-1]]
    if parts[-1]:
        out.append(parts[-1])
    return out


def _hunks(old: list[str], new: list[str]) -> Iterator[str]:
    """Unified-diff hunks with git's "\\ No newline at end of file" markers."""

    def line(mark: str, text: str) -> str:
        if text.endswith("\n"):
            return mark + text
        return mark + text + "\n\\ No newline at end of file\n"

    sm = difflib.SequenceMatcher(None, old, new, autojunk=False)
    for group in sm.get_grouped_opcodes(3):
        i1, i2, j1, j2 = group[0][1], group[-1][2], group[0][3], group[-1][4]

        def rng(start: int, count: int) -> str:
            if count == 1:
                return str(start + 1)
            return f"{start + 1 if count else start},{count}"

        yield f"@@ -{rng(i1, i2 - i1)} +{rng(j1, j2 - j1)} @@\n"
        for tag, a1, a2, b1, b2 in group:
            if tag == "equal":
                for t in old[a1:a2]:
                    yield line(" ", t)
                continue
            for t in old[a1:a2]:
                yield line("-", t)
            for t in new[b1:b2]:
                yield line("+", t)


@dataclass
class _FileDiff:
    header: list[str]
    body: list[str]
    added: int = 0
    removed: int = 0
    binary: bool = False
    old_size: int = 0
    new_size: int = 0


def _file_diff(c: Change, ufd: int | None, lfd: int | None) -> _FileDiff | None:
    if c.type == "dir":
        return None  # git tracks no directories
    a, b = _ab(b"a/", c.path), _ab(b"b/", c.path)
    header = [f"diff --git {a} {b}\n"]
    old = _content(lfd, c.path, c.type) if c.kind != "added" else _Side(None)
    new = _content(ufd, c.path, c.type) if c.kind != "deleted" else _Side(None)
    om, nm = git_mode(c.old_mode), git_mode(c.new_mode)
    if c.kind == "added":
        header.append(f"new file mode {nm:06o}\n")
    elif c.kind == "deleted":
        header.append(f"deleted file mode {om:06o}\n")
    elif om != nm:
        header += [f"old mode {om:06o}\n", f"new mode {nm:06o}\n"]
    fd = _FileDiff(header, [])
    if c.type == "other":
        fd.header.append(f"# {quote_path(c.path)}: special file "
                         f"({stat.filemode(c.new_mode or c.old_mode or 0)}), not read\n")
        return fd
    if old.data == new.data and c.kind == "modified":
        return fd  # mode-only change
    fd.old_size = len(old.data or b"")
    fd.new_size = len(new.data or b"")
    idx = f"index {_blob_id(old.data)}..{_blob_id(new.data)}"
    header.append(idx + (f" {nm:06o}\n" if c.kind == "modified" and om == nm else "\n"))
    if old.binary or new.binary or old.too_large or new.too_large:
        fd.binary = True
        src = "/dev/null" if c.kind == "added" else a
        dst = "/dev/null" if c.kind == "deleted" else b
        fd.body.append(f"Binary files {src} and {dst} differ\n")
        return fd
    fd.body.append(f"--- {'/dev/null' if c.kind == 'added' else a}\n")
    fd.body.append(f"+++ {'/dev/null' if c.kind == 'deleted' else b}\n")
    for ln in _hunks(_lines(old.data or b""), _lines(new.data or b"")):
        fd.body.append(ln)
        if ln.startswith("+"):
            fd.added += 1
        elif ln.startswith("-"):
            fd.removed += 1
    return fd


def _diffs(chs: list[Change], upper: str, lower: str | None) -> list[tuple[Change, _FileDiff]]:
    ufd = open_root(upper)
    lfd = open_root(lower) if lower is not None else None
    try:
        out = []
        for c in chs:
            d = _file_diff(c, ufd, lfd)
            if d is not None:
                out.append((c, d))
        return out
    finally:
        os.close(ufd)
        if lfd is not None:
            os.close(lfd)


def render_unified(chs: list[Change], upper: str, lower: str | None) -> str:
    """The changes as a git-style unified diff (binary files and special files noted)."""
    parts: list[str] = []
    for _c, d in _diffs(chs, upper, lower):
        parts += d.header
        parts += d.body
    return "".join(parts)


def render_stat(chs: list[Change], upper: str, lower: str | None, width: int = 80) -> str:
    """A summary like `git diff --stat`."""
    rows = _diffs(chs, upper, lower)
    if not rows:
        return ""
    names = [quote_path(c.path) for c, _ in rows]
    counts = [d.added + d.removed for _, d in rows]
    name_w = max(len(n) for n in names)
    num_w = max(len(str(n)) for n in counts)
    bar_w = max(10, width - name_w - num_w - 6)
    top = max(counts) or 1
    lines = []
    for name, (_c, d), n in zip(names, rows, counts, strict=True):
        if d.binary:
            lines.append(f" {name.ljust(name_w)} | {'Bin'.rjust(num_w)} "
                         f"{d.old_size} -> {d.new_size} bytes\n")
            continue
        plus, minus = d.added, d.removed
        if top > bar_w:
            plus = (plus * bar_w + top - 1) // top if plus else 0
            minus = (minus * bar_w + top - 1) // top if minus else 0
        lines.append(f" {name.ljust(name_w)} | {str(n).rjust(num_w)} {'+' * plus}{'-' * minus}"
                     .rstrip() + "\n")
    ins = sum(d.added for _, d in rows)
    dels = sum(d.removed for _, d in rows)
    summary = f" {len(rows)} file{'s' if len(rows) != 1 else ''} changed"
    if ins or not dels:
        summary += f", {ins} insertion{'s' if ins != 1 else ''}(+)"
    if dels or not ins:
        summary += f", {dels} deletion{'s' if dels != 1 else ''}(-)"
    return "".join(lines) + summary + "\n"


def path_to_str(path: bytes) -> str:
    """A display form of a raw path (invalid UTF-8 bytes become \\xNN)."""
    return path.decode("utf-8", "backslashreplace")


def to_json(chs: list[Change]) -> list[dict[str, object]]:
    """CONTRACT.md's `diff --json` items; a path that is not UTF-8 also gets "path_b64".

    "path" is for people (invalid bytes shown as \\xNN); "path_b64", present
    exactly when the raw path is not UTF-8, gives the bytes back (from_json_path)."""
    out: list[dict[str, object]] = []
    for c in chs:
        om, nm = git_mode(c.old_mode), git_mode(c.new_mode)
        # Modes as git prints them ("100644"), None when absent.
        item: dict[str, object] = {"path": path_to_str(c.path), "kind": c.kind, "type": c.type,
                                   "old_mode": None if om is None else f"{om:06o}",
                                   "new_mode": None if nm is None else f"{nm:06o}"}
        try:
            c.path.decode("utf-8")
        except UnicodeDecodeError:
            item["path_b64"] = base64.b64encode(c.path).decode("ascii")
        out.append(item)
    return out


def from_json_path(item: dict[str, object]) -> bytes:
    """The raw path of a to_json() item (inverse of the escaping)."""
    b64 = item.get("path_b64")
    if isinstance(b64, str):
        return base64.b64decode(b64)
    return str(item["path"]).encode("utf-8")
