# ruff: noqa: PTH103, PTH112, PTH118
# (paths here are strings handed straight to syscalls: os.* on purpose)
# (paths here are strings handed straight to syscalls: os.* on purpose)
"""process: start a sandbox's PID 1, and enter a running sandbox.

Mechanism. `start` unshares CLONE_NEWPID in the *calling thread* (it only
affects that thread's future children), forks — the child is PID 1 of the new
pid namespace and a direct child of the caller, who waitpid()s it — and
setns()es the thread back to its own pid namespace. The child joins the netns,
unshares mount/uts/ipc namespaces, sets the hostname and builds the mount
tree (sandbox.mounts) while the parent puts it in the sandbox's cgroup; it
waits on a sync pipe for that before it unshares its cgroup namespace and
starts the workload, then becomes the reaper (sandbox.init). The workload
runs with every privilege dropped (bounding set, ambient, uid/gid,
effective/permitted/inheritable, no_new_privs).

Errors in the children travel back over a pipe as a typed JSON message (the
youki way, not an exit code) and are raised in the caller as KernelError or
HostSetupError naming the failing step. The pipe is close-on-exec, so EOF
without a message means the workload's execve succeeded: `start` returns
when the agent's command is running.

`enter` joins all of init's namespaces and its cgroup from a forked helper
(setns(CLONE_NEWNS) needs a single-threaded process, and setns(CLONE_NEWPID)
only applies to children), which forks the command, drops the same
privileges in it and mirrors its exit status, so the caller can waitpid() the
helper like the command itself.
"""

from __future__ import annotations

import errno as errno_mod
import fcntl
import gc
import json
import logging
import os
import signal
import termios
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import NoReturn

import prctl

from sandbox import init, kernel, mounts, overlay, seccomp
from sandbox.cgroups import CgroupDriver
from sandbox.cgroups import cgroup_mounts as _cgroup_mounts
from sandbox.cgroups.base import read_proc_cgroup
from sandbox.errors import CorralError, HostSetupError, KernelError, NotFound
from sandbox.spec import SandboxSpec

log = logging.getLogger(__name__)

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
HOME = "/home/agent"
#: "Never pick this task" for the OOM killer (see protect_from_oom).
OOM_SCORE_ADJ_MIN = -1000

#: Namespaces `enter` joins, in order: the mount namespace last, because
#: joining it changes our root and so how /proc paths resolve.
ENTER_NS = (("ipc", kernel.CLONE_NEWIPC), ("uts", kernel.CLONE_NEWUTS),
            ("net", kernel.CLONE_NEWNET), ("cgroup", kernel.CLONE_NEWCGROUP),
            ("pid", kernel.CLONE_NEWPID), ("mnt", kernel.CLONE_NEWNS))


@dataclass(frozen=True)
class Started:
    """A running sandbox's init, identified by pid *and* start time (pid reuse)."""

    init_pid: int
    start_time: int  # field 22 of /proc/<pid>/stat, clock ticks after boot


def proc_start_time(pid: int) -> int:
    """Start time of `pid` in clock ticks; raises NotFound if it does not exist."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            raw = f.read()
    except FileNotFoundError as e:
        raise NotFound(f"process {pid} does not exist") from e
    # comm (field 2) may contain spaces and ')': split after the last ')'.
    return int(raw.rsplit(")", 1)[1].split()[19])


def workload_env(spec: SandboxSpec, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The clean environment of everything run inside: nothing of the caller's leaks."""
    env = {"PATH": DEFAULT_PATH, "HOME": HOME, "USER": "agent", "LOGNAME": "agent",
           "CORRAL_AGENT": spec.name}
    env.update(dict(spec.env))
    if extra:
        env.update(extra)
    return env


# --------------------------------------------------------------------------- messages

def _report(fd: int, step: str, exc: BaseException) -> None:
    """Child side: send one typed error message (best effort, never raises)."""
    if isinstance(exc, CorralError):
        msg = {"cls": type(exc).__name__, "msg": exc.args[0] if exc.args else str(exc),
               "hint": exc.hint, "errno": getattr(exc, "errno", 0)}
    elif isinstance(exc, OSError):
        name = errno_mod.errorcode.get(exc.errno or 0, str(exc.errno))
        what = f"{exc.strerror}" + (f": {exc.filename!r}" if exc.filename else "")
        msg = {"cls": "KernelError", "msg": f"{step} failed: {name} ({what})",
               "hint": "", "errno": exc.errno or 0}
    else:
        msg = {"cls": "KernelError", "msg": f"{step} failed: {type(exc).__name__}: {exc}",
               "hint": "", "errno": 0}
    msg["step"] = step
    try:
        os.write(fd, json.dumps(msg).encode())
    except OSError:
        pass


def _read_all(fd: int) -> bytes:
    chunks: list[bytes] = []
    while True:
        b = os.read(fd, 65536)
        if not b:
            return b"".join(chunks)
        chunks.append(b)


def _raise_message(raw: bytes, where: str) -> NoReturn:
    try:
        m = json.loads(raw)
    except ValueError:
        raise KernelError(f"{where}: garbled error message {raw[:200]!r}") from None
    text = f"{where}: {m.get('msg')} (step: {m.get('step')})"
    if m.get("cls") == "HostSetupError":
        raise HostSetupError(text, hint=m.get("hint", ""))
    raise KernelError(text, errno=int(m.get("errno") or 0), hint=m.get("hint", ""))


# --------------------------------------------------------------------------- child helpers

class _Step:
    """The name of what a child is doing, for its error message."""

    name = "start"


def _arrange_fds(fds: Sequence[int]) -> None:
    """Make fds[i] become fd i, close everything else (only these are inherited)."""
    base = max([*fds, 2]) + 1
    tmp = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, base) for fd in fds]
    for i, t in enumerate(tmp):
        os.dup2(t, i, inheritable=i <= 2)
    os.closerange(len(fds), 1 << 20)  # close_range(2) under the hood


def drop_privileges(uid: int, gid: int) -> None:
    """Become uid/gid with no capability in any set, no_new_privs and the seccomp filter."""
    if uid == 0 or gid == 0:
        raise HostSetupError("refusing to run a sandbox workload as uid/gid 0")
    # The bounding set must go while we still hold CAP_SETPCAP; walk the
    # kernel's own list (it can know caps libcap does not).
    for cap in range(kernel.cap_last_cap() + 1):
        kernel.prctl(kernel.PR_CAPBSET_DROP, cap)
    kernel.prctl(kernel.PR_CAP_AMBIENT, kernel.PR_CAP_AMBIENT_CLEAR_ALL)
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)  # clears permitted/effective (no keepcaps)
    prctl.cap_effective.limit()
    prctl.cap_inheritable.limit()
    prctl.cap_permitted.limit()
    prctl.set_no_new_privs(1)
    seccomp.install()  # no nested user namespaces, no TIOCSTI (sandbox.seccomp)


#: Signals whose disposition the workload must get back at default: Python
#: ignores SIGPIPE/SIGXFSZ and handles SIGINT; init forwards the rest; execve
#: keeps "ignored" (subprocess's restore_signals=True does the same).
RESET_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGTERM, signal.SIGHUP,
                 signal.SIGQUIT, signal.SIGCHLD, signal.SIGUSR1, signal.SIGUSR2,
                 signal.SIGWINCH)


def _exec_workload(argv: Sequence[str], env: Mapping[str, str], cwd: str, uid: int, gid: int,
                   ctty: bool, errfd: int) -> NoReturn:
    """Forked child: become the agent's process and exec `argv` (never returns).

    The path for a controlling terminal (TIOCSCTTY must be called by the new
    session's leader, which posix_spawn cannot do).
    """
    step = "workload setup"
    try:
        for sig in RESET_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        step = "setsid"
        os.setsid()
        if ctty:
            step = "ioctl(0, TIOCSCTTY)"
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        step = "drop privileges"
        drop_privileges(uid, gid)
        os.umask(0o022)
        step = f"chdir({cwd!r})"
        os.chdir(cwd)
        step = f"execve({argv[0]!r})"
        os.execvpe(argv[0], list(argv), dict(env))  # noqa: S606 - no shell on purpose
    except BaseException as e:
        _report(errfd, step, e)
    os._exit(127)


def _launch(argv: Sequence[str], env: Mapping[str, str], cwd: str, uid: int, gid: int,
            ctty: bool, errfd: int) -> tuple[int, bool]:
    """Start the workload from init (or the enter helper); returns (pid, dropped).

    Without a terminal: drop our own privileges, then posix_spawn (vfork +
    exec: no copy of this large Python process, which costs tens of ms to
    fork on a busy host) — exec errors come back as OSError right here. With
    a terminal: fork, and the child drops privileges itself. `dropped` says
    whether the caller already runs unprivileged.
    """
    if ctty:
        init.install_forwarding()
        pid = os.fork()
        if pid == 0:
            init.reset_forwarding()
            _exec_workload(argv, env, cwd, uid, gid, ctty, errfd)
        return pid, False
    drop_privileges(uid, gid)
    os.umask(0o022)
    try:
        os.chdir(cwd)
    except OSError as e:
        raise _oserror(f"chdir({cwd!r})", e) from e
    init.install_forwarding()
    try:
        pid = os.posix_spawnp(argv[0], list(argv), dict(env), setsid=True,
                              setsigdef=RESET_SIGNALS, setsigmask=())
    except OSError as e:
        raise _oserror(f"execve({argv[0]!r})", e) from e
    return pid, True


def _oserror(call: str, e: OSError) -> KernelError:
    name = errno_mod.errorcode.get(e.errno or 0, str(e.errno))
    return KernelError(f"{call} failed: {name} ({e.strerror})", errno=e.errno or 0)


def _init_main(spec: SandboxSpec, ops: list[mounts.MountOp], staging: str, ctty: bool,
               net_fd: int | None, userns_fd: int | None) -> NoReturn:
    """PID 1 of the new pid namespace: fds are 0-2 stdio, 3 errors, 4 sync, then
    `net_fd` and `userns_fd` if given."""
    step = "join netns"
    try:
        # The parent moves us into the sandbox's cgroup meanwhile (a v1
        # migration costs milliseconds per hierarchy); we only wait for it
        # before the cgroup namespace (rooted where we are) and the workload.
        if net_fd is not None:
            kernel.setns(net_fd, kernel.CLONE_NEWNET)
            os.close(net_fd)
        step = "unshare"
        kernel.unshare(kernel.CLONE_NEWNS | kernel.CLONE_NEWUTS | kernel.CLONE_NEWIPC)
        step = "sethostname"
        kernel.sethostname(spec.hostname)
        step = "mounts"
        applied = mounts.apply_mounts(ops, staging, uid=spec.uid, gid=spec.gid, spec=spec,
                                      userns_fd=userns_fd)
        if userns_fd is not None:
            os.close(userns_fd)
        cwd = spec.workspace.inside if (spec.workspace.mode != "none"
                                        and os.path.isdir(spec.workspace.inside)) else HOME
        step = "wait for cgroup"
        if os.read(4, 2) != b"go":  # parent gone or gave up
            os._exit(1)
        os.close(4)
        step = "unshare cgroup namespace"
        kernel.unshare(kernel.CLONE_NEWCGROUP)
        step = f"start workload {spec.command[0]!r}"
        env = workload_env(spec)
        if spec.term:
            env.setdefault("TERM", spec.term)
        main, dropped = _launch(spec.command, env, cwd, applied.uid,
                                applied.gid, ctty, 3)
        os.close(3)
        init.run(main, drop=None if dropped else
                 (lambda: drop_privileges(applied.uid, applied.gid)))
    except BaseException as e:
        _report(3, step, e)
    os._exit(1)


# --------------------------------------------------------------------------- start

def start(spec: SandboxSpec, *, stdin: int, stdout: int, stderr: int, ctty: bool,
          cgroups: CgroupDriver) -> Started:
    """Start the sandbox's init (a direct child of the caller); returns once the
    workload has exec'd. Host-side preparation (lifecycle.prepare) must be done."""
    spec = host_paths_resolved(spec)
    ops = mounts.plan_mounts(spec)
    staging = os.path.join(spec.run_dir, "root")
    os.makedirs(staging, mode=0o700, exist_ok=True)
    netfd = -1
    if spec.network is not None:
        try:
            netfd = os.open(spec.network.netns_path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise HostSetupError(f"netns {spec.network.netns_path!r}: {e.strerror}",
                                 hint="run lifecycle.prepare first") from e
    userns = overlay.workspace_userns(spec)
    sync_r, sync_w = os.pipe2(os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    own_pidns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    extra = [fd for fd in (netfd, userns) if fd is not None and fd >= 0]
    child_fds = [stdin, stdout, stderr, err_w, sync_r, *extra]
    net_at = 5 if netfd >= 0 else None
    userns_at = (5 + (net_at is not None)) if userns is not None else None
    pid = -1
    try:
        kernel.unshare(kernel.CLONE_NEWPID)
        try:
            pid = os.fork()
            if pid == 0:
                # A collection would touch every object and so copy most of the
                # parent's heap (copy-on-write); init allocates next to nothing.
                gc.disable()
                try:
                    _arrange_fds(child_fds)
                except BaseException:
                    os._exit(1)
                _init_main(spec, ops, staging, ctty, net_at, userns_at)
        finally:
            if pid != 0:
                kernel.setns(own_pidns, kernel.CLONE_NEWPID)
    finally:
        if pid != 0:
            for fd in (own_pidns, sync_r, err_w, *extra):
                os.close(fd)
            if pid < 0:
                os.close(sync_w)
                os.close(err_r)
    failure: BaseException | None = None
    start_time = 0
    try:
        try:
            cgroups.add(spec.cgroup, pid)
            start_time = proc_start_time(pid)
            os.write(sync_w, b"go")
        except Exception as e:
            # The child may have failed first (and exited, so the move
            # failed): its own message, read below, is the better error.
            failure = e
        finally:
            os.close(sync_w)  # without "go" the child gives up at EOF
        raw = _read_all(err_r)
    except BaseException:
        _kill_reap(pid)
        raise
    finally:
        os.close(err_r)
    if failure is not None and not raw:
        _kill_reap(pid)
        raise failure
    if raw:
        _kill_reap(pid)
        _raise_message(raw, f"starting sandbox {spec.name}")
    protect_from_oom(pid)
    log.debug("sandbox %s: init pid %d running %s", spec.name, pid, spec.command)
    return Started(init_pid=pid, start_time=start_time)


def host_paths_resolved(spec: SandboxSpec) -> SandboxSpec:
    """`spec` with its host paths canonical (symlinks resolved, on the host).

    The mount tree is built after a first pivot_root, with the host's tree at
    /oldroot: an absolute symlink inside a source path would then resolve
    against the staging root, not the host. Resolving here, before the fork,
    keeps every source meaning what it means on the host.
    """
    def rp(p: str | None) -> str | None:
        return os.path.realpath(p) if p else p

    ws = spec.workspace
    return replace(
        spec,
        state_dir=os.path.realpath(spec.state_dir), run_dir=os.path.realpath(spec.run_dir),
        rootfs=rp(spec.rootfs), home=rp(spec.home),
        workspace=replace(ws, project=rp(ws.project), upper=rp(ws.upper), work=rp(ws.work)),
        rules=tuple(replace(r, source=rp(r.source or r.path)) if r.mode != "hidden" else r
                    for r in spec.rules))


def _kill_reap(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


# --------------------------------------------------------------------------- enter

def _ids_of(pid: int) -> tuple[int, int]:
    uid = gid = -1
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Uid:"):
                uid = int(line.split()[1])
            elif line.startswith("Gid:"):
                gid = int(line.split()[1])
    return uid, gid


def _cgroup_procs_files(pid: int) -> list[str]:
    """cgroup.procs files that move a process into `pid`'s cgroups (where they differ
    from ours), one per hierarchy; derived from /proc, so no driver is needed."""
    theirs, ours = read_proc_cgroup(pid), read_proc_cgroup("self")
    v2_mount, v1_mounts = _cgroup_mounts()
    files: list[str] = []
    for ctrl, path in theirs.items():
        if ours.get(ctrl) == path:
            continue
        mnt = v2_mount if ctrl == "" else v1_mounts.get(ctrl)
        if mnt is None:
            continue
        f = os.path.join(mnt, path.lstrip("/"), "cgroup.procs")
        if f not in files:
            files.append(f)
    return files


def enter(spec: SandboxSpec, init_pid: int, argv: Sequence[str], *, env: Mapping[str, str],
          cwd: str, stdin: int, stdout: int, stderr: int, ctty: bool = False) -> int:
    """Run `argv` inside the running sandbox whose init is `init_pid`.

    Returns the pid of a child of the caller whose exit status is the
    command's (signals included). `env` is the complete environment (see
    workload_env). Safe in a multithreaded caller: the child only makes
    syscalls before exec, and logs nothing.
    """
    if not argv:
        raise CorralError("enter: empty command")
    cg = read_proc_cgroup(init_pid)
    if not cg or not any(p.rstrip("/").endswith("/" + spec.cgroup.strip("/"))
                         for p in cg.values()):
        raise NotFound(f"sandbox {spec.name}: process {init_pid} is not its init "
                       f"(not in cgroup {spec.cgroup})")
    uid, gid = _ids_of(init_pid)
    procs = _cgroup_procs_files(init_pid)
    ns_fds: list[tuple[int, int]] = []
    try:
        for name, flag in ENTER_NS:
            ns_fds.append((os.open(f"/proc/{init_pid}/ns/{name}", os.O_RDONLY | os.O_CLOEXEC),
                           flag))
    except OSError as e:
        for fd, _ in ns_fds:
            os.close(fd)
        raise NotFound(f"sandbox {spec.name}: init {init_pid} is gone ({e.strerror})") from e
    procs_fds = [os.open(p, os.O_WRONLY | os.O_CLOEXEC) for p in procs]
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    nsn = len(ns_fds)
    try:
        pid = os.fork()
        if pid == 0:
            try:
                _arrange_fds([stdin, stdout, stderr, err_w, *(fd for fd, _ in ns_fds),
                              *procs_fds])
            except BaseException:
                os._exit(126)
            _enter_child(argv, env, cwd, uid, gid, ctty,
                         [(4 + i, flag) for i, (_, flag) in enumerate(ns_fds)],
                         list(range(4 + nsn, 4 + nsn + len(procs_fds))))
    finally:
        os.close(err_w)
        for fd, _ in ns_fds:
            os.close(fd)
        for fd in procs_fds:
            os.close(fd)
    try:
        raw = _read_all(err_r)
    finally:
        os.close(err_r)
    if raw:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
        _raise_message(raw, f"entering sandbox {spec.name}")
    protect_from_oom(pid)
    return pid


def protect_from_oom(pid: int) -> bool:
    """Take one of our own helpers in the agent's cgroup (init, an enter
    waiter) out of the OOM killer's choice.

    They are forks of a large Python process, so their resident size (the
    shared copy-on-write pages count) can exceed a small agent's memory limit,
    and a memory cgroup's OOM killer picks the largest task: it would kill
    init (the whole sandbox) or the waiter (losing the command's exit status)
    instead of the agent's process that ran out of memory. Called once the
    workload has been started (the err pipe closed on its exec), so the
    workload inherited the default score, not this one. Lowering a score
    takes CAP_SYS_RESOURCE: root has it (systemd's corral.service keeps it),
    a container's root may not — then nothing changes (returns False) and
    the OOM killer chooses by size as before.
    """
    try:
        with open(f"/proc/{pid}/oom_score_adj", "w") as f:
            f.write(str(OOM_SCORE_ADJ_MIN))
    except OSError:
        return False
    return True


def _enter_child(argv: Sequence[str], env: Mapping[str, str], cwd: str, uid: int, gid: int,
                 ctty: bool, ns: list[tuple[int, int]], procs: list[int]) -> NoReturn:
    step = "join cgroup"
    try:
        # Not the daemon's OOM protection (OOMScoreAdjust=-500): agent processes
        # get the default score.
        adj = os.open("/proc/self/oom_score_adj", os.O_WRONLY)
        try:
            os.write(adj, b"0")
        finally:
            os.close(adj)
        for fd in procs:
            os.write(fd, b"0")  # "0" = the writing process, v1 and v2 alike
            os.close(fd)
        for fd, flag in ns:
            step = f"setns({flag:#x})"
            kernel.setns(fd, flag)
            os.close(fd)
        step = f"start {argv[0]!r} in {cwd!r}"
        child, dropped = _launch(argv, env, cwd, uid, gid, ctty, 3)
        os.close(3)
        init.mirror(child, drop=None if dropped else (lambda: drop_privileges(uid, gid)))
    except BaseException as e:
        _report(3, step, e)
    os._exit(127)
