"""SandboxSpec: JSON round-trip (the keeper receives it this way) and validation helpers."""

from __future__ import annotations

import pytest

from sandbox.errors import CorralError
from sandbox.spec import (
    FsRule,
    Limits,
    Network,
    SandboxSpec,
    Workspace,
    check_abs_path,
    check_name,
)


def full_spec() -> SandboxSpec:
    return SandboxSpec(
        name="web-1", uid=200123, gid=200124, state_dir="/var/lib/corral/agents/web-1",
        run_dir="/run/corral/web-1", cgroup="agents/web-1",
        command=("claude", "--flag"), env=(("A", "1"), ("TERM", "xterm")),
        workspace=Workspace(mode="overlay", project="/srv/proj", inside="/workspace",
                            upper="/s/upper", work="/s/work", project_uid=1000),
        rules=(FsRule("/data", "ro", "/srv/data"), FsRule("/x", "hidden")),
        limits=Limits(memory_bytes=1 << 30, swap_bytes=0, cpus=1.5, pids=512),
        network=Network(netns_path="/run/corral/netns/web-1", veth_host="cv0123456789abc",
                        address="198.18.0.2/30", gateway="198.18.0.1/30"),
        rootfs=None, home="/var/lib/corral/agents/web-1/home")


def test_round_trip_is_exact() -> None:
    s = full_spec()
    back = SandboxSpec.from_json(s.to_json())
    assert back == s
    assert isinstance(back.command, tuple)
    assert isinstance(back.rules[0], FsRule)
    assert back.hostname == "web-1"


def test_round_trip_of_the_minimal_spec_keeps_defaults() -> None:
    s = SandboxSpec(name="a", uid=200001, gid=200001, state_dir="/s", run_dir="/r", cgroup="a")
    back = SandboxSpec.from_json(s.to_json())
    assert back == s
    assert back.network is None
    assert back.workspace.mode == "overlay"
    assert back.limits.swap_bytes == 0


@pytest.mark.parametrize("name", ["web-1", "a", "x" * 31])
def test_good_names(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", "1abc", "Web", "a_b", "a.b", "a/b", "x" * 32, "a\n"])
def test_bad_names(name: str) -> None:
    with pytest.raises(CorralError):
        check_name(name)


@pytest.mark.parametrize("path", ["relative", "/a/../b", "/a,b", "/a:b", "/a\nb", "/a\0b"])
def test_bad_paths(path: str) -> None:
    with pytest.raises(CorralError):
        check_abs_path(path)


def test_good_path() -> None:
    assert check_abs_path("/srv/data.v2/x-y") == "/srv/data.v2/x-y"
