"""seccomp: the few syscalls a sandbox's processes must not make, even unprivileged.

Mechanism: a classic-BPF seccomp filter (SECCOMP_MODE_FILTER), installed after
no_new_privs and inherited by every descendant. The kernel lets an
unprivileged process create user namespaces (and, inside one, mount
namespaces and mounts); THREATS.md wants none nested in a sandbox, so:

* unshare() and clone() with CLONE_NEWUSER fail with EPERM;
* clone3() fails with ENOSYS — its flags sit in a struct BPF cannot read, and
  glibc falls back to clone() on ENOSYS, so fork/posix_spawn keep working;
* ioctl(TIOCSTI) and ioctl(TIOCLINUX) fail with EPERM: no typing into, or
  poking at, a terminal shared with the person attached to the session;
* on x86_64, x32-ABI syscall numbers (an alias table a filter written for
  the 64-bit numbers would miss) fail with ENOSYS; other architectures' ABIs
  are refused (SECCOMP_RET_KILL_PROCESS) — one cannot reach i386 numbers
  this way either.

Everything else is allowed: this is a narrow deny list on top of namespaces,
capabilities and no_new_privs, not a full profile.
"""

from __future__ import annotations

import ctypes
import errno
import platform
import struct

from sandbox import kernel

# linux/filter.h, linux/seccomp.h, linux/audit.h
BPF_LD, BPF_W, BPF_ABS, BPF_JMP, BPF_JEQ, BPF_JSET, BPF_JGE, BPF_K, BPF_RET = (
    0x00, 0x00, 0x20, 0x05, 0x10, 0x40, 0x30, 0x00, 0x06)
SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_MODE_FILTER = 2
PR_SET_SECCOMP = 22

AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
#: (unshare, clone, clone3, ioctl) syscall numbers
NR = {"x86_64": (272, 56, 435, 16), "aarch64": (97, 220, 435, 29)}
X32_SYSCALL_BIT = 0x40000000

TIOCSTI = 0x5412
TIOCLINUX = 0x541C

# offsets in struct seccomp_data {int nr; u32 arch; u64 ip; u64 args[6];}
_NR, _ARCH, _ARG0, _ARG1 = 0, 4, 16, 24

Insn = tuple[int, int, int, int]  # code, jt, jf, k


def _stmt(code: int, k: int) -> Insn:
    return (code, 0, 0, k)


def _jump(code: int, k: int, jt: int, jf: int) -> Insn:
    return (code, jt, jf, k)


def program(machine: str | None = None) -> list[Insn]:
    """The filter for `machine` (default: this one), as BPF instructions (pure)."""
    machine = machine or platform.machine()
    arch = AUDIT_ARCH[machine]
    nr_unshare, nr_clone, nr_clone3, nr_ioctl = NR[machine]
    eperm = SECCOMP_RET_ERRNO | errno.EPERM
    enosys = SECCOMP_RET_ERRNO | errno.ENOSYS
    ld = BPF_LD | BPF_W | BPF_ABS
    jeq = BPF_JMP | BPF_JEQ | BPF_K
    prog: list[Insn] = [
        _stmt(ld, _ARCH),
        _jump(jeq, arch, 1, 0),
        _stmt(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS),
        _stmt(ld, _NR),
    ]
    if machine == "x86_64":
        prog += [_jump(BPF_JMP | BPF_JGE | BPF_K, X32_SYSCALL_BIT, 0, 1),
                 _stmt(BPF_RET | BPF_K, enosys)]
    # The flags argument is an int/unsigned long: its low 32 bits hold every
    # CLONE_* flag we test (CLONE_NEWUSER = 0x10000000). Little-endian: the
    # low word sits at the argument's offset.
    prog += [
        _jump(jeq, nr_clone3, 0, 1), _stmt(BPF_RET | BPF_K, enosys),
        _jump(jeq, nr_unshare, 1, 0), _jump(jeq, nr_clone, 0, 3),
        _stmt(ld, _ARG0),
        _jump(BPF_JMP | BPF_JSET | BPF_K, kernel.CLONE_NEWUSER, 0, 6),
        _stmt(BPF_RET | BPF_K, eperm),
        _jump(jeq, nr_ioctl, 0, 4),
        _stmt(ld, _ARG1),
        _jump(jeq, TIOCSTI, 1, 0), _jump(jeq, TIOCLINUX, 0, 1),
        _stmt(BPF_RET | BPF_K, eperm),
        _stmt(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    ]
    return prog


def install() -> None:
    """Install the filter on the calling thread (needs no_new_privs first)."""
    insns = program()
    raw = b"".join(struct.pack("HBBI", *i) for i in insns)
    buf = ctypes.create_string_buffer(raw, len(raw))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(len(insns), ctypes.addressof(buf))
    kernel.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog))
