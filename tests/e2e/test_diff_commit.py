"""`corral diff` and `corral commit` through the CLI on a real agent's overlay."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest

from tests.e2e.conftest import Daemon

pytestmark = pytest.mark.root


def _checkout_hash(p: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p.rglob("*")):
        if f.is_file() and ".git/objects" not in str(f) and ".git/logs" not in str(f) \
                and "refs/heads/agent" not in str(f):
            h.update(str(f).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def test_diff_and_commit(daemon: Daemon, project: Path) -> None:
    before = _checkout_hash(project)
    head = subprocess.run(["git", "-C", str(project), "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    daemon.create("dc1", "--template", "default", "--project", str(project))
    daemon.wait_state("dc1", ("running",))
    daemon.cli("exec", "dc1", "--", "sh", "-c",
               "cd /workspace && echo changed >> README.md && rm app.py && "
               "mkdir -p src && echo 'x = 1' > src/new.py && ln -s README.md link && "
               "ln -s /etc/shadow leak", check=True)
    kinds = {c["path"]: c["kind"] for c in daemon.json("diff", "dc1")}
    assert kinds["README.md"] == "modified"
    assert kinds["app.py"] == "deleted"
    assert kinds["src/new.py"] == "added"
    assert kinds["link"] == "added"
    text = daemon.cli("diff", "dc1", check=True).stdout
    assert "+changed" in text
    assert "root:" not in text
    stat = daemon.cli("diff", "dc1", "--stat", check=True).stdout
    assert "README.md" in stat
    out = daemon.json("commit", "dc1", "--branch", "agent/dc1", "-m", "agent work")
    sha = out["commit"]
    show = subprocess.run(["git", "-C", str(project), "show", "--stat", "--format=%B", sha],
                          capture_output=True, text=True, check=True).stdout
    assert "agent work" in show
    assert "Corral-Agent: dc1" in show
    parent = subprocess.run(["git", "-C", str(project), "rev-parse", f"{sha}^"],
                            capture_output=True, text=True, check=True).stdout.strip()
    assert parent == head
    names = subprocess.run(["git", "-C", str(project), "diff", "--name-status", head, sha],
                           capture_output=True, text=True, check=True).stdout
    assert "D\tapp.py" in names
    assert "A\tsrc/new.py" in names
    blob = subprocess.run(["git", "-C", str(project), "cat-file", "-p", f"{sha}:leak"],
                          capture_output=True, text=True, check=True).stdout
    assert blob == "/etc/shadow"  # the link itself, not what it points at
    # the user's checkout is untouched: same files, same HEAD, same branch
    assert _checkout_hash(project) == before
    branch = subprocess.run(["git", "-C", str(project), "branch", "--show-current"],
                            capture_output=True, text=True, check=True).stdout.strip()
    assert branch == "main"
    # more work, another commit on the same branch
    daemon.cli("exec", "dc1", "--", "sh", "-c", "echo more > /workspace/more.txt", check=True)
    sha2 = daemon.json("commit", "dc1", "--branch", "agent/dc1")["commit"]
    parent2 = subprocess.run(["git", "-C", str(project), "rev-parse", f"{sha2}^"],
                             capture_output=True, text=True, check=True).stdout.strip()
    assert parent2 == sha


def test_non_git_project_diff_and_keep_workspace(daemon: Daemon, tmp_path: Path) -> None:
    proj = tmp_path / "plain"
    proj.mkdir()
    (proj / "a.txt").write_text("a\n")
    daemon.create("dc2", "--template", "default", "--project", str(proj))
    info = daemon.wait_state("dc2", ("running",))
    daemon.cli("exec", "dc2", "--", "sh", "-c", "echo b > /workspace/b.txt", check=True)
    assert [c["path"] for c in daemon.json("diff", "dc2")] == ["b.txt"]
    cp = daemon.cli("commit", "dc2", "--branch", "x")
    assert cp.returncode == 1
    assert "git" in cp.stderr
    daemon.cli("rm", "--force", "--keep-workspace", "dc2", check=True)
    assert Path(info["workspace"]["path"], "b.txt").read_text() == "b\n"
    assert json.loads(daemon.cli("--json", "ps", "--all", check=True).stdout) == []
