"""plan_mounts is pure: the exact mount plan for a spec, checked without root."""

from __future__ import annotations

import pytest

from sandbox import kernel
from sandbox.errors import CorralError
from sandbox.mounts import ETC_HIDDEN, PROC_MASKED, PROC_READONLY, WRITABLE, MountOp, plan_mounts
from sandbox.spec import FsRule, SandboxSpec, Workspace


def spec(**kw: object) -> SandboxSpec:
    base: dict[str, object] = dict(name="web-1", uid=200001, gid=200001, state_dir="/s",
                                   run_dir="/r", cgroup="web-1", home="/s/home",
                                   workspace=Workspace(mode="overlay", project="/p"))
    base.update(kw)
    return SandboxSpec(**base)  # type: ignore[arg-type]


def targets(ops: list[MountOp]) -> list[str]:
    return [o.target for o in ops]


def by_target(ops: list[MountOp], target: str) -> list[MountOp]:
    return [o for o in ops if o.target == target]


def test_default_plan_order_and_contents() -> None:
    ops = plan_mounts(spec())
    assert ops[0] == MountOp("tmpfs", "/", data="mode=0755,size=1m,nr_inodes=4096",
                             flags=WRITABLE)
    assert ops[-1] == MountOp("remount_ro", "/")
    # the agent's passwd/group entries come last (its uid is known only then)
    assert ops[-3:-1] == [MountOp("userdb", "/etc/passwd", source="/etc/passwd"),
                          MountOp("userdb", "/etc/group", source="/etc/group")]
    t = targets(ops)
    # parents before children, always
    for i, a in enumerate(t):
        for b in t[i + 1:]:
            assert not (a.startswith(b + "/") and b != "/"), (a, b)
    # host system dirs read-only, /etc filtered
    for d in ("/usr", "/bin", "/lib", "/lib64", "/sbin"):
        (op,) = by_target(ops, d)
        assert op.kind == "sysdir"
        assert op.ro
    (etc,) = by_target(ops, "/etc")
    assert etc.ro
    assert etc.source == "/etc"
    for p in ETC_HIDDEN:
        assert MountOp("mask", p) in ops
    assert "/etc/shadow" in ETC_HIDDEN
    # proc: masks and read-only entries, after the proc mount
    proc_i = t.index("/proc")
    assert ops[proc_i].kind == "proc"
    for p in PROC_MASKED:
        assert t.index(p) > proc_i
    for p in PROC_READONLY:
        assert MountOp("readonly", p) in ops
    # dev: only the allowed nodes
    devs = {o.target for o in ops if o.kind == "devbind"}
    assert devs == {f"/dev/{d}" for d in ("null", "zero", "full", "random", "urandom", "tty")}
    (pts,) = by_target(ops, "/dev/pts")
    assert pts.kind == "devpts"
    assert "newinstance" in (pts.data or "")
    assert "ptmxmode=0666" in (pts.data or "")
    # private /tmp and home, nosuid+nodev wherever the agent can write
    (tmp,) = by_target(ops, "/tmp")
    assert tmp.kind == "tmpfs"
    assert "size=" in (tmp.data or "")
    (home,) = by_target(ops, "/home/agent")
    assert home == MountOp("bind", "/home/agent", source="/s/home", flags=WRITABLE)
    for o in ops:
        if o.kind in ("tmpfs", "bind", "workspace") and not o.ro:
            assert o.flags & kernel.MS_NOSUID, o
            assert o.flags & kernel.MS_NODEV, o
    # nothing of the host's private places
    tops = {"/" + x.split("/")[1] for x in t if x != "/"}
    assert tops == {"/bin", "/dev", "/etc", "/home", "/lib", "/lib32", "/lib64", "/libx32",
                    "/proc", "/sbin", "/tmp", "/usr", "/workspace"}
    assert [x for x in t if x.startswith("/home")] == ["/home/agent"]


def test_workspace_modes() -> None:
    (ws,) = by_target(plan_mounts(spec()), "/workspace")
    assert ws.kind == "workspace"
    assert ws.source == "/p"
    (ws,) = by_target(plan_mounts(spec(workspace=Workspace(mode="bind", project="/p",
                                                           inside="/code"))), "/code")
    assert ws == MountOp("bind", "/code", source="/p", flags=WRITABLE)
    ops = plan_mounts(spec(workspace=Workspace(mode="none", project="/p")))
    assert by_target(ops, "/workspace") == []


def test_last_rule_for_a_path_wins_and_parents_come_first() -> None:
    ops = plan_mounts(spec(rules=(
        FsRule("/data/secret", "hidden"),  # written before its parent: still applied after
        FsRule("/data", "rw", "/srv/one"),
        FsRule("/data", "ro", "/srv/two"),  # same path: the last one wins
        FsRule("/opt/tool", "ro"),
        FsRule("/opt/tool", "hidden"),
    )))
    (data,) = by_target(ops, "/data")
    assert data.kind == "bind"
    assert data.source == "/srv/two"
    assert data.ro
    assert data.children == ("/data/secret",)  # a ro bind must host the hidden mountpoint
    t = targets(ops)
    assert t.index("/data") < t.index("/data/secret")
    assert by_target(ops, "/data/secret") == [MountOp("hide", "/data/secret")]
    assert by_target(ops, "/opt/tool") == [MountOp("hide", "/opt/tool")]


def test_a_rule_replaces_a_default_entry() -> None:
    ops = plan_mounts(spec(rules=(FsRule("/etc", "ro", "/srv/etc"), FsRule("/usr", "hidden"))))
    (etc,) = by_target(ops, "/etc")
    assert etc.source == "/srv/etc"
    assert MountOp("mask", "/etc/shadow") not in ops  # the group went with the default
    assert by_target(ops, "/usr") == [MountOp("hide", "/usr")]


def test_rules_inside_the_workspace_become_its_mountpoints() -> None:
    ops = plan_mounts(spec(rules=(FsRule("/workspace/secrets", "hidden"),
                                  FsRule("/workspace/.env", "hidden"),
                                  FsRule("/workspace/data", "ro", "/srv/d"),
                                  FsRule("/workspace/data/deeper", "hidden"))))
    (ws,) = by_target(ops, "/workspace")
    # only direct children: /workspace/data/deeper lands in the /workspace/data bind
    assert ws.children == ("/workspace/.env", "/workspace/data", "/workspace/secrets")
    (data,) = by_target(ops, "/workspace/data")
    assert data.children == ("/workspace/data/deeper",)
    t = targets(ops)
    assert t.index("/workspace") < t.index("/workspace/data") < t.index("/workspace/data/deeper")


def test_rule_paths_are_normalised_and_checked() -> None:
    ops = plan_mounts(spec(rules=(FsRule("/home/me/.ssh/", "hidden"),
                                  FsRule("//srv//x", "hidden"))))
    assert MountOp("hide", "/home/me/.ssh") in ops
    assert MountOp("hide", "/srv/x") in ops
    for bad in ("relative", "/a/../etc", "/a,b", "/a:b", "/a\nb"):
        with pytest.raises(CorralError):
            plan_mounts(spec(rules=(FsRule(bad, "hidden"),)))
    with pytest.raises(CorralError):
        plan_mounts(spec(rules=(FsRule("/data", "ro", "/srv/x,upperdir=/"),)))


def test_rootfs_replaces_host_system_dirs() -> None:
    ops = plan_mounts(spec(rootfs="/images/alpine", rules=(FsRule("/opt/x", "hidden"),)))
    assert ops[0].kind == "bind"
    assert ops[0].target == "/"
    assert ops[0].source == "/images/alpine"
    assert ops[0].ro
    # every top-level mount needs a mountpoint in the (read-only) rootfs
    assert set(ops[0].children) == {"/dev", "/home/agent", "/opt/x", "/proc", "/tmp",
                                    "/workspace"}
    assert not [o for o in ops if o.kind in ("sysdir", "userdb")]
    assert by_target(ops, "/etc") == []


def test_home_without_a_host_dir_is_a_private_tmpfs() -> None:
    (home,) = by_target(plan_mounts(spec(home=None)), "/home/agent")
    assert home.kind == "tmpfs"
    assert "uid=200001" in (home.data or "")
    assert home.flags & kernel.MS_NOSUID
