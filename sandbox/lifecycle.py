# ruff: noqa: PTH103, PTH112, PTH118
# (paths here are strings handed straight to syscalls: os.* on purpose)
# (paths here are strings handed straight to syscalls: os.* on purpose)
"""lifecycle: the whole sandbox, top to bottom, as one flat ordered list of steps.

Each step has a host-side `prepare` (idempotent: finishes a half-done step)
and a `release` (idempotent: removes only what exists, so it is safe after a
crash at any point). `prepare` runs the steps in order, `release` in reverse.
What happens inside the child (namespaces, mounts, privilege drop) is the
`enter` side and lives in sandbox.process.

    dirs       state_dir, run_dir (+ staging root), home
    overlay    upper/work dirs of the workspace
    cgroup     the sandbox's cgroup with its limits
    netns      network namespace + veth pair
    procs      init + workload: created by start() (sandbox.process.start),
               killed (the whole cgroup) first thing on release
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

from sandbox import kernel, overlay, process
from sandbox.cgroups import CgroupDriver
from sandbox.errors import KernelError, NotFound
from sandbox.spec import SandboxSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Step:
    name: str
    prepare: Callable[[SandboxSpec, CgroupDriver], None]
    release: Callable[[SandboxSpec, CgroupDriver, bool], None]


# --- dirs ---------------------------------------------------------------------

def _dirs_prepare(spec: SandboxSpec, cg: CgroupDriver) -> None:
    os.makedirs(spec.state_dir, mode=0o700, exist_ok=True)
    os.makedirs(os.path.join(spec.run_dir, "root"), mode=0o700, exist_ok=True)
    if spec.home and not os.path.isdir(spec.home):
        os.makedirs(spec.home, mode=0o700, exist_ok=True)
        os.chown(spec.home, spec.uid, spec.gid)


def _dirs_release(spec: SandboxSpec, cg: CgroupDriver, remove_workspace: bool) -> None:
    _unmount_below(spec.run_dir)
    shutil.rmtree(spec.run_dir, ignore_errors=True)
    if remove_workspace:
        _unmount_below(spec.state_dir)
        shutil.rmtree(spec.state_dir, ignore_errors=True)


def _unmount_below(top: str) -> None:
    """Lazily unmount anything the host still has mounted under `top`.

    Sandbox mounts live in the sandbox's own namespace and vanish with it; a
    host-side leftover only appears after an unusual crash, but release must
    not leave one (and rmtree must not descend into one).
    """
    top = os.path.realpath(top)
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4].replace("\\040", " ") for line in f]
    for p in sorted(points, key=len, reverse=True):
        if p == top or p.startswith(top + "/"):
            try:
                kernel.umount2(p, kernel.MNT_DETACH)
                log.info("unmounted leftover %s", p)
            except KernelError as e:
                log.warning("leftover mount %s: %s", p, e)


# --- overlay ------------------------------------------------------------------

def _overlay_prepare(spec: SandboxSpec, cg: CgroupDriver) -> None:
    overlay.prepare(spec)


def _overlay_release(spec: SandboxSpec, cg: CgroupDriver, remove_workspace: bool) -> None:
    if spec.workspace.mode == "overlay":
        overlay.release(spec, remove_workspace=remove_workspace)


# --- cgroup -------------------------------------------------------------------

def _cgroup_prepare(spec: SandboxSpec, cg: CgroupDriver) -> None:
    cg.prepare(spec.cgroup, spec.limits)


def _cgroup_release(spec: SandboxSpec, cg: CgroupDriver, remove_workspace: bool) -> None:
    # kill first: a cgroup with processes cannot be removed, and killing the
    # cgroup (not a pid) reaches everything, forks included.
    if cg.exists(spec.cgroup):
        cg.kill(spec.cgroup)
        cg.release(spec.cgroup)


# --- netns --------------------------------------------------------------------

def _netns_prepare(spec: SandboxSpec, cg: CgroupDriver) -> None:
    if spec.network is not None:
        from sandbox import netns

        netns.prepare(spec.network)


def _netns_release(spec: SandboxSpec, cg: CgroupDriver, remove_workspace: bool) -> None:
    if spec.network is not None:
        from sandbox import netns

        netns.release(spec.network)


# --- processes --------------------------------------------------------------

def _procs_prepare(spec: SandboxSpec, cg: CgroupDriver) -> None:
    """Nothing: start() creates them."""


def _procs_release(spec: SandboxSpec, cg: CgroupDriver, remove_workspace: bool) -> None:
    # Released first: a live process pins the netns (the kernel could not reap
    # the veth) and the cgroup; killing the cgroup reaches forks too.
    if cg.exists(spec.cgroup):
        cg.kill(spec.cgroup)


STEPS: tuple[Step, ...] = (
    Step("dirs", _dirs_prepare, _dirs_release),
    Step("overlay", _overlay_prepare, _overlay_release),
    Step("cgroup", _cgroup_prepare, _cgroup_release),
    Step("netns", _netns_prepare, _netns_release),
    Step("procs", _procs_prepare, _procs_release),
)


def prepare(spec: SandboxSpec, cg: CgroupDriver) -> None:
    """Host side, in order; on failure, what was prepared is released again."""
    done: list[Step] = []
    try:
        for step in STEPS:
            log.debug("sandbox %s: prepare %s", spec.name, step.name)
            step.prepare(spec, cg)
            done.append(step)
    except BaseException:
        for step in reversed(done):
            try:
                step.release(spec, cg, False)
            except Exception:
                log.exception("sandbox %s: release %s after failed prepare", spec.name,
                              step.name)
        raise


def start(spec: SandboxSpec, cg: CgroupDriver, *, stdin: int, stdout: int, stderr: int,
          ctty: bool = False) -> process.Started:
    """Start init + workload (see sandbox.process.start)."""
    return process.start(spec, stdin=stdin, stdout=stdout, stderr=stderr, ctty=ctty,
                         cgroups=cg)


def stop(started: process.Started, timeout: float = 5.0) -> int | None:
    """SIGTERM init (it forwards to the workload), reap it; SIGKILL after `timeout`.

    Only for the process that called start (init is its child). Returns init's
    exit status, or None if it was already reaped.
    """
    try:
        if process.proc_start_time(started.init_pid) != started.start_time:
            return None
        os.kill(started.init_pid, signal.SIGTERM)
    except (ProcessLookupError, NotFound):
        pass
    deadline = time.monotonic() + timeout
    while True:
        try:
            pid, status = os.waitpid(started.init_pid, os.WNOHANG)
        except ChildProcessError:
            return None
        if pid:
            return status
        if time.monotonic() > deadline:
            try:
                os.kill(started.init_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            deadline = float("inf")
        time.sleep(0.005)


def release(spec: SandboxSpec, cg: CgroupDriver, *, remove_workspace: bool = False) -> None:
    """Tear everything down, in reverse; every step runs even if one fails."""
    errors: list[BaseException] = []
    for step in reversed(STEPS):
        try:
            step.release(spec, cg, remove_workspace)
        except Exception as e:
            log.warning("sandbox %s: release %s: %s", spec.name, step.name, e)
            errors.append(e)
    if errors:
        raise errors[0]
