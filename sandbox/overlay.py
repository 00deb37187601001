# ruff: noqa: PTH101, PTH102, PTH103, PTH112, PTH116, PTH118
# (paths here are strings handed straight to syscalls: os.* on purpose)
# (paths here are strings handed straight to syscalls: os.* on purpose)
"""overlay: the copy-on-write workspace (mount side; `workspace_diff` reads it).

Mechanism: overlayfs with the project directory as the lower layer and
per-agent upper/work directories under the agent's state dir. The overlay is
mounted *inside* the sandbox's mount namespace only (DESIGN.md: host mounts
are copied into every new namespace, so the host keeps none). The project is
never written: overlayfs only ever writes the upper dir.

Ownership: the agent runs as its own uid, the project's files belong to the
project owner. When the kernel allows it, the lower layer is an idmapped
mount (owner uid -> agent uid, see sandbox.idmap) so the agent can edit the
owner's files (copy-up lands in the upper dir owned by the agent). When it
does not (an old kernel, or a filesystem without idmap support), we say so in
the log and fall back to running the workload as the project owner's uid —
still unprivileged, still no capabilities, but sharing that uid.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass

from sandbox import idmap
from sandbox.errors import HostSetupError, KernelError
from sandbox.spec import SandboxSpec, Workspace

log = logging.getLogger(__name__)


def upper_dir(spec: SandboxSpec) -> str:
    return spec.workspace.upper or os.path.join(spec.state_dir, "upper")


def work_dir(spec: SandboxSpec) -> str:
    return spec.workspace.work or os.path.join(spec.state_dir, "work")


def project_owner(ws: Workspace) -> tuple[int, int]:
    """(uid, gid) owning the project (workspace.project_uid wins for the uid)."""
    if not ws.project:
        raise HostSetupError("workspace has no project directory")
    st = os.stat(ws.project)
    return (ws.project_uid if ws.project_uid is not None else st.st_uid), st.st_gid


def prepare(spec: SandboxSpec) -> None:
    """Create the upper and work dirs (idempotent), owned by the sandbox's uid."""
    if spec.workspace.mode != "overlay":
        return
    if not spec.workspace.project or not os.path.isdir(spec.workspace.project):
        raise HostSetupError(f"project directory {spec.workspace.project!r} does not exist",
                             hint="create the project directory or fix workspace.project")
    for d in (upper_dir(spec), work_dir(spec)):
        os.makedirs(d, mode=0o755, exist_ok=True)
    # The upper root gives /workspace its owner: the agent must be able to
    # create files at the top. workdir must belong to root (overlayfs checks).
    os.chown(upper_dir(spec), spec.uid, spec.gid)


def release(spec: SandboxSpec, *, remove_workspace: bool = False) -> None:
    """Remove the work dir (scratch of overlayfs); the upper too if asked."""
    import shutil

    dirs = [work_dir(spec)] + ([upper_dir(spec)] if remove_workspace else [])
    for d in dirs:
        if os.path.lexists(d):
            # overlayfs leaves a d--------- "work" subdir; rmtree copes as root.
            shutil.rmtree(d, ignore_errors=False)


def mount_options(lowers: list[str], upper: str, work: str) -> str:
    """overlayfs options. Paths were checked (no ',' ':' by spec.check_abs_path).

    redirect_dir/metacopy off: the upper dir stays a plain tree that
    workspace_diff and `commit` can read without overlay's private xattrs
    pointing into the lower layer; index off: no hard-link bookkeeping needed.
    """
    for p in [*lowers, upper, work]:
        if any(c in p for c in ",:\n\0"):
            raise KernelError(f"overlay path {p!r} contains a forbidden character")
    return (f"lowerdir={':'.join(lowers)},upperdir={upper},workdir={work},"
            "redirect_dir=off,metacopy=off,index=off")


@dataclass(frozen=True)
class Mounted:
    uid: int  # uid the workload runs as
    gid: int
    idmapped: bool


def workspace_userns(spec: SandboxSpec) -> int | None:
    """Host side, before init exists: a user namespace fd for the idmapped lower.

    None when no mapping is needed (the project already belongs to the
    sandbox's uid) or the kernel refuses user namespaces (then the workload
    falls back to the owner's uid, see mount_workspace).
    """
    ws = spec.workspace
    if ws.mode != "overlay" or not ws.project:
        return None
    owner_uid, owner_gid = project_owner(ws)
    if (owner_uid, owner_gid) == (spec.uid, spec.gid):
        return None
    try:
        return idmap.make_userns(owner_uid, spec.uid, owner_gid, spec.gid)
    except KernelError as e:
        log.warning("no user namespace for an idmapped workspace of %s: %s", spec.name, e)
        return None


def mount_workspace(spec: SandboxSpec, target: str, *, host_root: str, scratch: str,
                    mountpoints: list[tuple[str, bool]], userns_fd: int | None) -> Mounted:
    """Mount the workspace overlay at `target` (inside the mount namespace being built).

    `host_root` is where the host's tree is reachable (/oldroot after the first
    pivot); `scratch` a private directory on the staging tmpfs; `mountpoints`
    relative paths (is_dir) that later mounts need inside the workspace: they
    go into an extra top lower layer ("mask"), so they exist without touching
    the project or showing up in the upper dir (and so in `diff`).
    `userns_fd` comes from workspace_userns (None: no idmapping possible).
    """
    from sandbox import kernel

    ws = spec.workspace
    if not ws.project:
        raise HostSetupError("workspace has no project directory")
    project = host_root + ws.project
    upper, work = host_root + upper_dir(spec), host_root + work_dir(spec)
    owner_uid, owner_gid = project_owner(Workspace(**{**ws.__dict__, "project": project}))
    uid, gid, mapped = spec.uid, spec.gid, False
    lower = project
    if (owner_uid, owner_gid) != (spec.uid, spec.gid):
        lower = f"{scratch}/lower"
        os.mkdir(lower, 0o755)
        try:
            if userns_fd is None:
                raise KernelError("no user namespace for the id mapping")
            idmap.idmapped_tree(project, lower, userns_fd)
            mapped = True
        except KernelError as e:
            log.warning("idmapped lower layer refused (%s): running %s as the project "
                        "owner's uid %d instead", e, spec.name, owner_uid)
            lower, uid, gid = project, owner_uid, owner_gid
            os.chown(upper, uid, gid)
    else:
        mapped = False

    lowers = [lower]
    if mountpoints:
        mask = f"{scratch}/mask"
        os.mkdir(mask, 0o755)
        for rel, is_dir in mountpoints:
            _mask_entry(mask, lower, rel, is_dir, uid, gid)
        lowers.insert(0, mask)
    kernel.mount("overlay", target, "overlay", kernel.MS_NOSUID | kernel.MS_NODEV,
                 mount_options(lowers, upper, work))
    return Mounted(uid=uid, gid=gid, idmapped=mapped)


def _mask_entry(mask: str, lower: str, rel: str, is_dir: bool, uid: int, gid: int) -> None:
    """Create mask/rel, its parents copying owner and mode from the lower layer.

    The topmost layer holding a directory gives the merged directory its
    attributes, so a mask parent must look exactly like the project's.
    """
    parts = [p for p in rel.split("/") if p]
    cur_m, cur_l = mask, lower
    for i, part in enumerate(parts):
        cur_m, cur_l = f"{cur_m}/{part}", f"{cur_l}/{part}"
        last = i == len(parts) - 1
        try:
            st: os.stat_result | None = os.lstat(cur_l)
        except FileNotFoundError:
            st = None
        if last:
            as_dir = is_dir if st is None else stat.S_ISDIR(st.st_mode)
            if not os.path.lexists(cur_m):
                if as_dir:
                    os.mkdir(cur_m, 0o755)
                else:
                    os.close(os.open(cur_m, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644))
        else:
            if not os.path.lexists(cur_m):
                os.mkdir(cur_m, 0o755)
            if st is not None and stat.S_ISDIR(st.st_mode):
                os.chown(cur_m, st.st_uid, st.st_gid)
                os.chmod(cur_m, stat.S_IMODE(st.st_mode))
            else:  # only in the mask: the agent's own directory
                os.chown(cur_m, uid, gid)
