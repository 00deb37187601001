"""The sandbox spec: frozen dataclasses describing one sandbox, nothing more.

A spec is built by the supervisor from a template (or by a test by hand) and
handed to every mechanism module (`mounts`, `overlay`, `cgroups`, `netns`,
`process`). It round-trips through JSON so the keeper process can receive it.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from sandbox.errors import CorralError

#: Agent (and template) names: they reach paths, interface names and mount
#: options, so anything outside this pattern is refused up front.
NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,30}$")

FsMode = Literal["ro", "rw", "hidden"]
WorkspaceMode = Literal["overlay", "bind", "none"]


def check_name(name: str, what: str = "name") -> str:
    """Return `name` if it matches NAME_RE, else raise CorralError."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise CorralError(
            f"invalid {what} {name!r}",
            hint="use 1-31 characters: a lowercase letter, then lowercase letters, digits or '-'",
        )
    return name


def check_abs_path(path: str, what: str = "path") -> str:
    """Refuse paths that are relative, contain '..', NUL, newlines, commas or colons.

    Commas and colons would be interpreted by mount option strings (overlayfs
    lowerdir=a:b,upperdir=...), newlines corrupt /proc/self/mountinfo parsing.
    """
    if not path.startswith("/"):
        raise CorralError(f"{what} {path!r} must be absolute")
    bad = [c for c in ("\0", "\n", ",", ":") if c in path]
    if bad:
        raise CorralError(f"{what} {path!r} contains a forbidden character {bad[0]!r}")
    if any(part == ".." for part in path.split("/")):
        raise CorralError(f"{what} {path!r} must not contain '..'")
    return path


@dataclass(frozen=True)
class FsRule:
    """One extra filesystem rule; rules apply in order and the last for a path wins."""

    path: str  # absolute path inside the sandbox
    mode: FsMode  # ro | rw | hidden
    source: str | None = None  # host path to bind (ro/rw); None for hidden or same path


@dataclass(frozen=True)
class Workspace:
    """How the project appears inside the sandbox."""

    mode: WorkspaceMode = "overlay"
    project: str | None = None  # host directory of the project (lower layer)
    inside: str = "/workspace"  # where it appears inside
    upper: str | None = None  # overlay upper dir (host), under the agent's state dir
    work: str | None = None  # overlay work dir (host), same filesystem as upper
    #: uid owning the project's files on disk; with an idmapped lower layer
    #: they appear owned by the agent's uid inside (see DESIGN.md).
    project_uid: int | None = None


@dataclass(frozen=True)
class Limits:
    """cgroup limits; None means unlimited."""

    memory_bytes: int | None = None  # memory.max / memory.limit_in_bytes
    swap_bytes: int | None = 0  # memory.swap.max; 0 = no swap unless set
    cpus: float | None = None  # CPU bandwidth in cores (cpu.max quota/period)
    pids: int | None = None  # pids.max


@dataclass(frozen=True)
class Network:
    """The sandbox's network namespace and veth pair."""

    netns_path: str  # bind-mount file that keeps the namespace alive
    veth_host: str  # host-side interface name (<= 15 bytes)
    address: str  # agent's address with prefix on eth0, e.g. "10.213.0.2/30"
    gateway: str  # host side of the veth, e.g. "10.213.0.1/30"
    ipv6: bool = False


@dataclass(frozen=True)
class SandboxSpec:
    """Everything needed to build, enter and release one sandbox."""

    name: str  # agent name; also the hostname
    uid: int  # the sandbox's own host uid (workload runs as uid=gid=this)
    gid: int
    state_dir: str  # per-sandbox host dir (home, upper, logs live below)
    run_dir: str  # per-sandbox runtime dir (new root staging, sockets)
    cgroup: str  # cgroup path relative to the driver's base
    command: tuple[str, ...] = ("/bin/bash", "-l")
    env: tuple[tuple[str, str], ...] = ()
    workspace: Workspace = field(default_factory=Workspace)
    rules: tuple[FsRule, ...] = ()
    limits: Limits = field(default_factory=Limits)
    network: Network | None = None
    rootfs: str | None = None  # None: the host's system dirs read-only
    home: str | None = None  # host dir mounted at /home/agent
    term: str | None = None  # TERM of `command` (its terminal), unless env sets one

    @property
    def hostname(self) -> str:
        return self.name

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SandboxSpec:
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SandboxSpec:
        d = dict(d)
        d["command"] = tuple(d.get("command", ()))
        d["env"] = tuple((str(k), str(v)) for k, v in d.get("env", ()))
        d["workspace"] = Workspace(**d.get("workspace", {}))
        d["rules"] = tuple(FsRule(**r) for r in d.get("rules", ()))
        d["limits"] = Limits(**d.get("limits", {}))
        net = d.get("network")
        d["network"] = Network(**net) if net else None
        return cls(**d)
