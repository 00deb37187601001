"""SFTP (and `scp -s`) onto an agent's workspace, chrooted by the kernel.

The workspace is a tree the agent controls, so every path a client names is
resolved by openat2(2) with RESOLVE_IN_ROOT on a directory fd of the workspace
root: ".." and absolute symlinks (even ones the agent planted, like
``etc -> /etc``) are clamped to the root by the kernel itself, atomically, and
magic links (/proc/self/root…) are refused (RESOLVE_NO_MAGICLINKS). Operations
on a last component that must not follow it (lstat, unlink, rmdir, mkdir,
rename, readlink, symlink) resolve the parent that way and then use the *at()
call with follow_symlinks=False. Nothing here ever passes a client path to a
plain path-based syscall. (A consequence: an absolute symlink the agent made,
``/workspace/x``, is read relative to the workspace root, so it does not
resolve over SFTP; relative links work as inside the sandbox.)

Viewers get read-only access: each write operation checks the connection's
live role (`Access.can_write`), so a downgrade takes effect on the next request,
including writes on handles opened before it. New files, directories and
symlinks are given the owner of the workspace root, so the agent (its own uid)
can edit what a collaborator uploaded.

The operations are local-disk syscalls run on the event loop; each is bounded
(reads are capped at MAX_READ, open handles at MAX_HANDLES) and files that are
not regular (a FIFO planted to hang us) are refused after a non-blocking open.
"""

from __future__ import annotations

import logging
import os
import posixpath
import stat
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncssh
from asyncssh import (
    FXF_APPEND,
    FXF_CREAT,
    FXF_EXCL,
    FXF_READ,
    FXF_TRUNC,
    FXF_WRITE,
    SFTPAttrs,
    SFTPName,
)

from sandbox import kernel
from sandbox.errors import KernelError
from supervisor.ssh_access import Access

log = logging.getLogger(__name__)

RESOLVE = kernel.RESOLVE_IN_ROOT | kernel.RESOLVE_NO_MAGICLINKS
MAX_READ = 1024 * 1024
MAX_HANDLES = 256
O_PATH: int = getattr(os, "O_PATH", 0o10000000)


class _Handle:
    """An open file: its fd and whether it was opened for writing."""

    def __init__(self, fd: int, writable: bool) -> None:
        self.fd = fd
        self.writable = writable


def _handle(file_obj: object) -> _Handle:
    if not isinstance(file_obj, _Handle):
        raise asyncssh.SFTPInvalidHandle("bad handle")
    return file_obj


def _rel(path: bytes) -> bytes:
    """Client path → path relative to the root, normalised lexically ("" → ".").

    The lexical normalisation is only cosmetic; containment comes from
    RESOLVE_IN_ROOT, which clamps whatever survives it.
    """
    if b"\0" in path:
        raise asyncssh.SFTPInvalidFilename("NUL in path")
    norm = posixpath.normpath(posixpath.join(b"/", path)).lstrip(b"/")
    return norm or b"."


def _split(path: bytes) -> tuple[bytes, bytes]:
    """(parent relative to root, last component); the root itself has no last component."""
    rel = _rel(path)
    if rel == b".":
        raise asyncssh.SFTPPermissionDenied("operation not permitted on the workspace root")
    parent, name = posixpath.split(rel)
    return parent or b".", name


class WorkspaceSFTPServer(asyncssh.SFTPServer):
    """An asyncssh SFTPServer whose every path goes through openat2(RESOLVE_IN_ROOT)."""

    def __init__(self, chan: asyncssh.SSHServerChannel[bytes], root: str, access: Access) -> None:
        super().__init__(chan)
        self._access = access
        self._handles: set[_Handle] = set()
        # O_NOFOLLOW: the root's last component is not followed if it were a symlink.
        self._root = os.open(root, O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        st = os.fstat(self._root)
        self._owner = (st.st_uid, st.st_gid)

    # --- helpers -------------------------------------------------------------

    def _need_write(self) -> None:
        if not self._access.can_write:
            raise asyncssh.SFTPPermissionDenied(
                f"read-only: role {self._access.role} cannot change files")

    def _open(self, rel: bytes, flags: int, mode: int = 0) -> int:
        if not flags & os.O_CREAT:
            mode = 0  # openat2 rejects a mode without O_CREAT (EINVAL)
        try:
            return kernel.openat2(self._root, rel, flags, RESOLVE, mode)
        except KernelError as exc:
            raise OSError(exc.errno, os.strerror(exc.errno)) from None

    def _parent(self, path: bytes) -> tuple[int, bytes]:
        parent, name = _split(path)
        return self._open(parent, O_PATH | os.O_DIRECTORY), name

    def _give_to_owner(self, name: bytes, dirfd: int) -> None:
        """New entries belong to the workspace's owner (the agent), not to the daemon."""
        if os.geteuid() == 0 and self._owner != (0, 0):
            os.chown(name, *self._owner, dir_fd=dirfd, follow_symlinks=False)

    def _apply_attrs(self, fd: int, attrs: SFTPAttrs) -> None:
        """chmod/utime through the fd's /proc link (O_PATH fds reject fchmod); no chown."""
        link = f"/proc/self/fd/{fd}"
        if attrs.permissions is not None:
            # setuid/setgid bits never come from a client.
            os.chmod(link, stat.S_IMODE(attrs.permissions) & 0o1777)  # noqa: PTH101
        if attrs.atime is not None or attrs.mtime is not None:
            st = os.stat(link)  # noqa: PTH116
            atime = attrs.atime if attrs.atime is not None else st.st_atime
            mtime = attrs.mtime if attrs.mtime is not None else st.st_mtime
            os.utime(link, (atime, mtime))

    # --- files ---------------------------------------------------------------

    def open(self, path: bytes, pflags: int, attrs: SFTPAttrs) -> _Handle:
        writes = pflags & (FXF_WRITE | FXF_APPEND | FXF_CREAT | FXF_TRUNC)
        if writes:
            self._need_write()
        if len(self._handles) >= MAX_HANDLES:
            raise asyncssh.SFTPFailure("too many open files")
        if pflags & FXF_WRITE and pflags & FXF_READ:
            flags = os.O_RDWR
        elif pflags & FXF_WRITE:
            flags = os.O_WRONLY
        else:
            flags = os.O_RDONLY
        for bit, oflag in ((FXF_APPEND, os.O_APPEND), (FXF_CREAT, os.O_CREAT),
                           (FXF_TRUNC, os.O_TRUNC), (FXF_EXCL, os.O_EXCL)):
            if pflags & bit:
                flags |= oflag
        perms = 0o644 if attrs.permissions is None else stat.S_IMODE(attrs.permissions) & 0o777
        # O_NONBLOCK: opening a FIFO the agent planted must not hang the daemon.
        fd = self._open(_rel(path), flags | os.O_NONBLOCK | os.O_NOCTTY, perms)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise asyncssh.SFTPPermissionDenied("not a regular file")
            os.set_blocking(fd, True)
            if flags & os.O_CREAT and st.st_uid == os.geteuid():
                self._give_fd_to_owner(fd)
        except BaseException:
            os.close(fd)
            raise
        handle = _Handle(fd, bool(writes))
        self._handles.add(handle)
        return handle

    def _give_fd_to_owner(self, fd: int) -> None:
        if os.geteuid() == 0 and self._owner != (0, 0):
            os.fchown(fd, *self._owner)

    def open56(self, *args: Any) -> object:
        raise asyncssh.SFTPOpUnsupported("SFTP v5+ open is not supported")

    def close(self, file_obj: object) -> None:
        file_obj = _handle(file_obj)
        self._handles.discard(file_obj)
        os.close(file_obj.fd)

    def read(self, file_obj: object, offset: int, size: int) -> bytes:
        file_obj = _handle(file_obj)
        return os.pread(file_obj.fd, min(size, MAX_READ), offset)

    def write(self, file_obj: object, offset: int, data: bytes) -> int:
        file_obj = _handle(file_obj)
        self._need_write()
        if not file_obj.writable:
            raise asyncssh.SFTPPermissionDenied("file not opened for writing")
        return os.pwrite(file_obj.fd, data, offset)

    def fstat(self, file_obj: object) -> os.stat_result:
        file_obj = _handle(file_obj)
        return os.fstat(file_obj.fd)

    def fsetstat(self, file_obj: object, attrs: SFTPAttrs) -> None:
        file_obj = _handle(file_obj)
        self._need_write()
        if attrs.size is not None:
            os.ftruncate(file_obj.fd, attrs.size)
        self._apply_attrs(file_obj.fd, attrs)

    def fstatvfs(self, file_obj: object) -> os.statvfs_result:
        file_obj = _handle(file_obj)
        return os.fstatvfs(file_obj.fd)

    def fsync(self, file_obj: object) -> None:
        file_obj = _handle(file_obj)
        os.fsync(file_obj.fd)

    # --- paths ---------------------------------------------------------------

    def _with_fd(self, path: bytes, flags: int, fn: Callable[[int], Any]) -> Any:
        fd = self._open(_rel(path), flags)
        try:
            return fn(fd)
        finally:
            os.close(fd)

    def stat(self, path: bytes) -> os.stat_result:
        result: os.stat_result = self._with_fd(path, O_PATH, os.fstat)
        return result

    def lstat(self, path: bytes) -> os.stat_result:
        result: os.stat_result = self._with_fd(path, O_PATH | os.O_NOFOLLOW, os.fstat)
        return result

    def setstat(self, path: bytes, attrs: SFTPAttrs) -> None:
        self._need_write()
        if attrs.size is not None:
            def trunc(fd: int) -> None:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise asyncssh.SFTPPermissionDenied("not a regular file")
                os.ftruncate(fd, size)
            size = attrs.size
            self._with_fd(path, os.O_WRONLY | os.O_NONBLOCK | os.O_NOCTTY, trunc)
        self._with_fd(path, O_PATH, lambda fd: self._apply_attrs(fd, attrs))

    def lsetstat(self, path: bytes, attrs: SFTPAttrs) -> None:
        self._need_write()
        if attrs.size is not None:
            raise asyncssh.SFTPOpUnsupported("cannot truncate without following links")
        def apply(fd: int) -> None:
            if stat.S_ISLNK(os.fstat(fd).st_mode):
                raise asyncssh.SFTPOpUnsupported("cannot change a symlink's attributes")
            self._apply_attrs(fd, attrs)
        self._with_fd(path, O_PATH | os.O_NOFOLLOW, apply)

    def statvfs(self, path: bytes) -> os.statvfs_result:
        return self._with_fd(path, O_PATH, lambda fd: os.statvfs(f"/proc/self/fd/{fd}"))  # type: ignore[no-any-return]

    async def scandir(self, path: bytes) -> AsyncIterator[SFTPName]:
        fd = self._open(_rel(path), os.O_RDONLY | os.O_DIRECTORY)
        try:
            here = os.fstat(fd)
            yield SFTPName(b".", attrs=SFTPAttrs.from_local(here))
            # ".." of the root is the root itself: never stat outside it.
            yield SFTPName(b"..", attrs=SFTPAttrs.from_local(here))
            with os.scandir(fd) as entries:
                names = [(os.fsencode(e.name), e.stat(follow_symlinks=False)) for e in entries]
        finally:
            os.close(fd)
        for name, st in names:
            yield SFTPName(name, attrs=SFTPAttrs.from_local(st))

    def realpath(self, path: bytes) -> bytes:
        rel = _rel(path)
        return b"/" if rel == b"." else b"/" + rel

    def readlink(self, path: bytes) -> bytes:
        pfd, name = self._parent(path)
        try:
            return os.readlink(name, dir_fd=pfd)
        finally:
            os.close(pfd)

    # --- changes -------------------------------------------------------------

    def remove(self, path: bytes) -> None:
        self._need_write()
        pfd, name = self._parent(path)
        try:
            os.unlink(name, dir_fd=pfd)
        finally:
            os.close(pfd)

    def mkdir(self, path: bytes, attrs: SFTPAttrs) -> None:
        self._need_write()
        mode = 0o755 if attrs.permissions is None else stat.S_IMODE(attrs.permissions) & 0o1777
        pfd, name = self._parent(path)
        try:
            os.mkdir(name, mode, dir_fd=pfd)
            self._give_to_owner(name, pfd)
        finally:
            os.close(pfd)

    def rmdir(self, path: bytes) -> None:
        self._need_write()
        pfd, name = self._parent(path)
        try:
            os.rmdir(name, dir_fd=pfd)
        finally:
            os.close(pfd)

    def _rename(self, oldpath: bytes, newpath: bytes, replace: bool) -> None:
        self._need_write()
        ofd, oname = self._parent(oldpath)
        try:
            nfd, nname = self._parent(newpath)
            try:
                if not replace:
                    try:
                        os.stat(nname, dir_fd=nfd, follow_symlinks=False)
                    except FileNotFoundError:
                        pass
                    else:
                        raise asyncssh.SFTPFileAlreadyExists("target exists")
                os.rename(oname, nname, src_dir_fd=ofd, dst_dir_fd=nfd)
            finally:
                os.close(nfd)
        finally:
            os.close(ofd)

    def rename(self, oldpath: bytes, newpath: bytes) -> None:
        self._rename(oldpath, newpath, replace=False)

    def posix_rename(self, oldpath: bytes, newpath: bytes) -> None:
        self._rename(oldpath, newpath, replace=True)

    def symlink(self, oldpath: bytes, newpath: bytes) -> None:
        # The target is stored verbatim: it is only text, and every later
        # resolution through this server is clamped to the root anyway.
        self._need_write()
        pfd, name = self._parent(newpath)
        try:
            os.symlink(oldpath, name, dir_fd=pfd)
            self._give_to_owner(name, pfd)
        finally:
            os.close(pfd)

    def link(self, oldpath: bytes, newpath: bytes) -> None:
        raise asyncssh.SFTPOpUnsupported("hard links are not supported")

    def exit(self) -> None:
        for handle in list(self._handles):
            self._handles.discard(handle)
            os.close(handle.fd)
        if self._root >= 0:
            os.close(self._root)
            self._root = -1
