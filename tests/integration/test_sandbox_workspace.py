"""Workspace modes (overlay, bind, none), the idmap fallback, rules inside the
workspace, and a template-provided rootfs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from sandbox import overlay
from sandbox.spec import FsRule, Workspace
from tests.integration.sandbox_kit import PROJECT_UID, box, hidden, make_project, make_spec

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("need_root")]


def test_bind_workspace_writes_the_project_directly(tmp_path: Path, uniq: str) -> None:
    proj = make_project(tmp_path)
    os.chown(proj, 0, 0)
    os.chmod(proj, 0o777)  # noqa: S103 - the agent's uid must be able to write here
    spec = make_spec(tmp_path, uniq, workspace=Workspace(mode="bind", project=str(proj),
                                                          inside="/code"))
    with box(spec) as b:
        r = b.run("pwd; echo direct > /code/direct.txt; ls /workspace 2>&1 | grep -c 'No such'")
        assert r.code == 0, r.out
        assert r.out.splitlines() == ["/code", "1"]
        assert (proj / "direct.txt").read_text() == "direct\n"  # straight into the project
        assert not (Path(spec.state_dir) / "upper").exists()


def test_no_workspace_starts_in_home(tmp_path: Path, uniq: str) -> None:
    spec = make_spec(tmp_path, uniq, workspace=Workspace(mode="none"))
    with box(spec) as b:
        r = b.run("pwd; ls -d /workspace 2>/dev/null | wc -l; echo x > ~/note; id -u")
        assert r.out.splitlines() == ["/home/agent", "0", str(spec.uid)], r.out
        assert (Path(spec.home or "") / "note").read_text() == "x\n"  # home persists on host
        assert (Path(spec.home or "") / "note").stat().st_uid == spec.uid


def test_idmap_fallback_runs_as_the_project_owner(tmp_path: Path, uniq: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """When the kernel refuses an idmapped lower layer, the workload runs as
    the owner's uid (still no capabilities) and can edit the project's files."""
    monkeypatch.setattr(overlay, "workspace_userns", lambda spec: None)
    spec = make_spec(tmp_path, uniq)
    proj = Path(spec.workspace.project or "")
    with box(spec) as b:
        r = b.run("id -u; echo edit >> README; grep CapEff /proc/self/status")
        assert r.code == 0, r.out
        assert r.out.splitlines()[0] == str(PROJECT_UID)
        assert "CapEff:\t0000000000000000" in r.out
        upper = Path(spec.state_dir) / "upper"
        assert (upper / "README").read_text() == "project readme\nedit\n"
        assert (upper / "README").stat().st_uid == PROJECT_UID
        assert (proj / "README").read_text() == "project readme\n"


def test_rules_inside_the_workspace(tmp_path: Path, uniq: str) -> None:
    vendor = tmp_path / "vendor"
    vendor.mkdir()
    (vendor / "lib.txt").write_text("vendored\n")
    spec = make_spec(tmp_path, uniq, rules=(
        FsRule("/workspace/vendor", "ro", str(vendor)),  # does not exist in the project
        FsRule("/workspace/src", "ro", str(vendor)),  # replaces a project directory
        hidden("/workspace/vendor/lib.txt"),
    ))
    proj = Path(spec.workspace.project or "")
    with box(spec) as b:
        r = b.run("echo $(ls src); cat vendor/lib.txt; echo; echo x > vendor/new || echo ro-ok;"
                  "echo y > src/main.py || echo ro-ok2; echo z > README && echo rw-ok")
        assert r.out.splitlines()[0] == "lib.txt", r.out  # src shows the vendor dir instead
        assert "vendored" not in r.out, r.out  # hidden inside a ro rule inside the workspace
        assert "ro-ok\n" in r.out
        assert "ro-ok2" in r.out
        assert "rw-ok" in r.out  # positive control: the rest of the workspace is writable
        upper = Path(spec.state_dir) / "upper"
        # the mountpoints came from the mask layer: nothing in the upper dir or project
        assert sorted(p.name for p in upper.iterdir()) == ["README"]
        assert not (proj / "vendor").exists()
    assert sorted(p.name for p in vendor.iterdir()) == ["lib.txt"]


def test_template_rootfs(tmp_path: Path, uniq: str) -> None:
    """A minimal rootfs (busybox and its libraries): used instead of the host's
    system dirs, read-only, and never modified (mountpoints come from a mask)."""
    rootfs = tmp_path / "rootfs"
    for f in ("/usr/bin/busybox", "/lib/x86_64-linux-gnu/libc.so.6",
              "/lib/x86_64-linux-gnu/libresolv.so.2", "/lib64/ld-linux-x86-64.so.2"):
        dst = rootfs / f.lstrip("/")
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, dst)
    (rootfs / "bin").mkdir()
    for tool in ("sh", "ls", "cat", "id", "touch"):
        (rootfs / "bin" / tool).symlink_to("/usr/bin/busybox")
    before = sorted(str(p.relative_to(rootfs)) for p in rootfs.rglob("*"))
    spec = make_spec(tmp_path, uniq, rootfs=str(rootfs))
    with box(spec) as b:
        r = b.run("ls /; echo ---; cat /workspace/README; id -u; ls /etc 2>&1;"
                  "touch /newfile 2>&1 || echo ro-root")
        assert r.code == 0, r.out
        top, rest = r.out.split("---\n")
        assert set(top.split()) == {"bin", "dev", "home", "lib", "lib64", "proc", "tmp", "usr",
                                    "workspace"}
        assert "project readme" in rest
        assert str(spec.uid) in rest
        assert "ro-root" in rest
    assert sorted(str(p.relative_to(rootfs)) for p in rootfs.rglob("*")) == before
