"""diff and commit of real overlay workspaces, edited through a real overlay.

Each test builds a real git project, an upper and a work dir in tmp_path, and
performs the agent's edits THROUGH an overlay mounted in a private mount
namespace of a child process (unshare -m), so nothing is mounted on the host
and nothing needs unmounting: the mount dies with the child.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox import workspace_diff as wd
from sandbox.errors import Conflict, CorralError
from supervisor import gitcommit

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]

TRAILERS = {"Corral-Agent": "web-1", "Corral-Template": "python-dev"}


def git(cwd: Path, *args: str, input: bytes | None = None) -> bytes:
    env = {**os.environ, "GIT_AUTHOR_NAME": "T", "GIT_AUTHOR_EMAIL": "t@example.invalid",
           "GIT_COMMITTER_NAME": "T", "GIT_COMMITTER_EMAIL": "t@example.invalid"}
    return subprocess.run(["git", "-c", "safe.directory=*", *args], cwd=cwd, input=input,
                          env=env, capture_output=True, check=True, timeout=60).stdout


class Workspace:
    def __init__(self, root: Path, project: Path | None) -> None:
        self.project = project
        self.upper = root / "upper"
        self.work = root / "work"
        self.merged = root / "merged"
        self.empty = root / "empty-lower"
        for d in (self.upper, self.work, self.merged, self.empty):
            d.mkdir()

    def run(self, script: str) -> None:
        """Run `script` (sh) in the merged view, inside a private mount namespace."""
        lower = self.project or self.empty
        opts = f"lowerdir={lower},upperdir={self.upper},workdir={self.work}"
        cmd = (f"mount -t overlay overlay -o {opts} {self.merged} && cd {self.merged} && "
               f"{script}")
        cp = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-ec", cmd],
                            capture_output=True, timeout=60, check=False)
        assert cp.returncode == 0, cp.stderr.decode()
        # Positive check that nothing leaked onto the host: the mount point is empty here.
        assert list(self.merged.iterdir()) == []

    @property
    def lower(self) -> str | None:
        return str(self.project) if self.project else None


def make_project(root: Path) -> Path:
    p = root / "project"
    p.mkdir()
    git(p, "init", "-q", "-b", "main")
    (p / ".gitignore").write_text("node_modules/\n*.log\n")
    (p / "README.md").write_text("hello\nworld\n")
    (p / "app.py").write_text("".join(f"line {i}\n" for i in range(30)))
    (p / "run.sh").write_text("#!/bin/sh\necho run\n")
    (p / "gone.txt").write_text("to be deleted\n")
    (p / "pkg").mkdir()
    (p / "pkg" / "a.py").write_text("A = 1\n")
    (p / "pkg" / "b.py").write_text("B = 2\n")
    (p / "pkg" / "sub").mkdir()
    (p / "pkg" / "sub" / "c.py").write_text("C = 3\n")
    (p / "olddir").mkdir()
    (p / "olddir" / "x.txt").write_text("x\n")
    git(p, "add", "-A")
    git(p, "commit", "-q", "-m", "initial")
    # An untracked ignored file, as a real checkout has (.env, node_modules …).
    (p / "debug.log").write_text("noise\n")
    return p


def snapshot(project: Path) -> dict[str, str]:
    """Hash of every file of the checkout plus .git/index and HEAD (and the refs)."""
    out: dict[str, str] = {}
    for dirpath, dirs, files in os.walk(project):
        rel = os.path.relpath(dirpath, project)
        if rel == ".git" or rel.startswith(".git/"):
            if rel not in (".git",):
                continue
            dirs[:] = []
            files = [f for f in files if f in ("index", "HEAD")]
        for f in files:
            fp = Path(dirpath) / f
            out[os.path.join(rel, f)] = hashlib.sha256(
                fp.readlink().as_posix().encode() if fp.is_symlink() else fp.read_bytes()
            ).hexdigest()
    out["HEAD->"] = git(project, "symbolic-ref", "HEAD").decode()
    out["main"] = git(project, "rev-parse", "refs/heads/main").decode()
    return out


@pytest.fixture
def ws(tmp_path: Path, need_root: None) -> Workspace:
    return Workspace(tmp_path, make_project(tmp_path))


AGENT_EDITS = r"""
printf 'hello\nthere\nworld\n' > README.md
sed -i 's/line 15/LINE FIFTEEN/' app.py
echo 'new file' > added.txt
rm gone.txt
mv pkg/b.py pkg/b_renamed.py
mv olddir newdir
mkdir olddir && echo 'fresh' > olddir/y.txt
chmod +x run.sh
ln -s README.md link-to-readme
head -c 3000 /dev/urandom > blob.bin && printf '\0' >> blob.bin
mkdir -p node_modules/dep && echo 'ignored' > node_modules/dep/index.js
echo 'also ignored' > trace.log
"""


def by_path(chs: list[wd.Change]) -> dict[bytes, list[tuple[str, str]]]:
    out: dict[bytes, list[tuple[str, str]]] = {}
    for c in chs:
        out.setdefault(c.path, []).append((c.kind, c.type))
    return out


def test_diff_of_real_edits(ws: Workspace) -> None:
    before = snapshot(ws.project)  # type: ignore[arg-type]
    ws.run(AGENT_EDITS)
    chs = wd.changes(str(ws.upper), ws.lower)
    got = by_path(chs)
    assert got[b"README.md"] == [("modified", "file")]
    assert got[b"app.py"] == [("modified", "file")]
    assert got[b"added.txt"] == [("added", "file")]
    assert got[b"gone.txt"] == [("deleted", "file")]
    assert got[b"pkg/b.py"] == [("deleted", "file")]
    assert got[b"pkg/b_renamed.py"] == [("added", "file")]
    # dir rename without redirect_dir: copy-up of the new dir + whiteout of the old;
    # olddir recreated as an opaque dir, so its old content is deleted.
    assert got[b"newdir/x.txt"] == [("added", "file")]
    assert got[b"olddir/x.txt"] == [("deleted", "file")]
    assert got[b"olddir/y.txt"] == [("added", "file")]
    assert got[b"run.sh"] == [("modified", "file")]
    assert got[b"link-to-readme"] == [("added", "symlink")]
    assert got[b"blob.bin"] == [("added", "file")]
    # Untouched files are not reported, neither are untouched dirs copied up.
    for p in (b"pkg/a.py", b"pkg/sub/c.py", b".gitignore", b"pkg", b"debug.log"):
        assert p not in got
    run_sh = next(c for c in chs if c.path == b"run.sh")
    assert wd.git_mode(run_sh.old_mode) == 0o100644
    assert wd.git_mode(run_sh.new_mode) == 0o100755

    text = wd.render_unified(chs, str(ws.upper), ws.lower)
    assert "diff --git a/README.md b/README.md\n" in text
    assert "+there\n" in text
    assert "-line 15\n+LINE FIFTEEN\n" in text
    assert "old mode 100644\nnew mode 100755\n" in text
    assert "Binary files /dev/null and b/blob.bin differ\n" in text
    assert "new file mode 120000\n" in text
    assert "+README.md\n\\ No newline at end of file\n" in text
    assert "deleted file mode 100644\n" in text
    # Our diff applies cleanly with git itself on a fresh checkout of the base.
    check = ws.project.parent / "apply-check"  # type: ignore[union-attr]
    git(ws.project.parent, "clone", "-q", str(ws.project), str(check))  # type: ignore[union-attr,arg-type]
    nonbin = "".join(
        wd.render_unified([c for c in chs if c.path != b"blob.bin" and not
                           c.path.startswith(b"node_modules") and c.path != b"trace.log"],
                          str(ws.upper), ws.lower))
    git(check, "apply", "--check", "-", input=nonbin.encode())

    st = wd.render_stat(chs, str(ws.upper), ws.lower)
    assert " README.md " in st
    assert "| 1 +" in st
    assert "blob.bin" in st
    assert "Bin 0 ->" in st
    assert "files changed" in st

    js = wd.to_json(chs)
    json.dumps(js)
    assert {"path": "gone.txt", "kind": "deleted", "type": "file"}.items() <= next(
        j for j in js if j["path"] == "gone.txt").items()
    assert snapshot(ws.project) == before  # type: ignore[arg-type]


def test_commit_and_recommit(ws: Workspace) -> None:
    project = ws.project
    assert project is not None
    before = snapshot(project)
    base = gitcommit.base_commit(str(project))
    assert base == git(project, "rev-parse", "HEAD").decode().strip()
    ws.run(AGENT_EDITS)

    sha = gitcommit.commit(str(project), str(ws.upper), base, "agent/web-1", "Agent work",
                           TRAILERS)
    assert git(project, "rev-parse", "refs/heads/agent/web-1").decode().strip() == sha
    msg = git(project, "log", "-1", "--format=%B", sha).decode()
    assert msg.startswith("Agent work\n")
    assert "Corral-Agent: web-1\n" in msg
    assert "Corral-Template: python-dev\n" in msg
    assert git(project, "rev-parse", f"{sha}^").decode().strip() == base

    names = git(project, "diff", "--name-status", "--no-renames", base, sha).decode()
    lines = set(names.splitlines())
    assert {"M\tREADME.md", "M\tapp.py", "A\tadded.txt", "D\tgone.txt", "D\tpkg/b.py",
            "A\tpkg/b_renamed.py", "A\tnewdir/x.txt", "D\tolddir/x.txt", "A\tolddir/y.txt",
            "M\trun.sh", "A\tlink-to-readme", "A\tblob.bin"} == lines
    # Ignored files stay out; the mode change and the symlink are what git sees.
    tree = git(project, "ls-tree", "-r", sha).decode()
    assert "node_modules" not in tree
    assert "trace.log" not in tree
    assert "100755 blob" in next(ln for ln in tree.splitlines() if ln.endswith("\trun.sh"))
    link = next(ln for ln in tree.splitlines() if ln.endswith("\tlink-to-readme"))
    assert link.startswith("120000 blob")
    assert git(project, "cat-file", "-p", link.split()[2]) == b"README.md"
    assert git(project, "show", f"{sha}:README.md") == b"hello\nthere\nworld\n"
    assert git(project, "show", f"{sha}:blob.bin") == (ws.upper / "blob.bin").read_bytes()
    assert snapshot(project) == before  # working tree, index, HEAD untouched

    # More work, then commit again: a new commit on the branch with the full state.
    ws.run("echo more >> added.txt && rm link-to-readme && echo n > second.txt")
    sha2 = gitcommit.commit(str(project), str(ws.upper), base, "agent/web-1", "More",
                            TRAILERS)
    assert sha2 != sha
    assert git(project, "rev-parse", f"{sha2}^").decode().strip() == sha
    assert git(project, "show", f"{sha2}:added.txt") == b"new file\nmore\n"
    tree2 = git(project, "ls-tree", "-r", "--name-only", sha2).decode().splitlines()
    assert "link-to-readme" not in tree2
    assert "second.txt" in tree2
    # Nothing new: no new commit.
    assert gitcommit.commit(str(project), str(ws.upper), base, "agent/web-1", "Again",
                            TRAILERS) == sha2
    # include_ignored brings node_modules in (on a fresh branch).
    sha3 = gitcommit.commit(str(project), str(ws.upper), base, "agent/with-ignored", "All",
                            TRAILERS, include_ignored=True)
    tree3 = git(project, "ls-tree", "-r", "--name-only", sha3).decode().splitlines()
    assert "node_modules/dep/index.js" in tree3
    assert "trace.log" in tree3
    assert snapshot(project) == before


def test_commit_refuses_foreign_branch_and_bad_names(ws: Workspace) -> None:
    project = ws.project
    assert project is not None
    base = gitcommit.base_commit(str(project))
    assert base is not None
    ws.run("echo x > new.txt")
    # A branch with someone else's commit on top of base.
    git(project, "branch", "theirs", base)
    env_tree = git(project, "write-tree").decode().strip()
    other = git(project, "commit-tree", env_tree, "-p", base, "-m", "human work").decode().strip()
    git(project, "update-ref", "refs/heads/theirs", other)
    with pytest.raises(Conflict):
        gitcommit.commit(str(project), str(ws.upper), base, "theirs", "m", TRAILERS)
    assert git(project, "rev-parse", "refs/heads/theirs").decode().strip() == other
    # The user's current branch is never moved.
    before = snapshot(project)
    with pytest.raises(Conflict, match="checked out"):
        gitcommit.commit(str(project), str(ws.upper), base, "main", "m", TRAILERS)
    assert snapshot(project) == before
    for bad in ("a..b", "-x", "x y", "x\ny", "", "a/.lock/b", "refs~1"):
        with pytest.raises(CorralError, match="invalid branch"):
            gitcommit.commit(str(project), str(ws.upper), base, bad, "m", TRAILERS)
    # Positive control: a fresh branch works.
    sha = gitcommit.commit(str(project), str(ws.upper), base, "agent/ok", "m", TRAILERS)
    assert git(project, "show", f"{sha}:new.txt") == b"x\n"


def test_hostile_upper(ws: Workspace) -> None:
    project = ws.project
    assert project is not None
    before = snapshot(project)
    secret = b"TOP-SECRET-" + os.urandom(8).hex().encode()
    secret_file = project.parent / "secret"
    secret_file.write_bytes(secret)
    secret_file.chmod(0o600)
    ws.run(f"""
ln -s {secret_file} leak
ln -s /etc/shadow shadow
mkfifo pipe
mknod chardev c 1 3
printf 'nl\\n' > "$(printf 'new\\nline')"
printf 'bad\\n' > "$(printf 'bad\\377\\376name')"
mkdir -p pkg/deep && ln -s /etc pkg/deep/etc
ln README.md hardlink
python3 -c "import socket; s=socket.socket(socket.AF_UNIX); s.bind('sock')"
echo refused-by-git > 'git~1'
mkdir -p sub/.GIT && echo x > sub/.GIT/config
""")
    chs = wd.changes(str(ws.upper), ws.lower)
    got = by_path(chs)
    assert got[b"leak"] == [("added", "symlink")]
    assert got[b"pipe"] == [("added", "other")]
    assert got[b"chardev"] == [("added", "other")]
    assert got[b"sock"] == [("added", "other")]
    assert got[b"new\nline"] == [("added", "file")]
    assert got[b"bad\xff\xfename"] == [("added", "file")]
    assert got[b"pkg/deep/etc"] == [("added", "symlink")]

    text = wd.render_unified(chs, str(ws.upper), ws.lower)
    stat_text = wd.render_stat(chs, str(ws.upper), ws.lower)
    shadow = Path("/etc/shadow").read_bytes()
    for out in (text, stat_text, json.dumps(wd.to_json(chs))):
        assert secret.decode() not in out
        assert shadow.decode(errors="replace") not in out or not shadow
    assert f"+{secret_file}\n\\ No newline at end of file" in text  # the target, as text
    assert 'diff --git "a/new\\nline" "b/new\\nline"' in text
    assert '"b/bad\\377\\376name"' in text
    assert "special file (prw" in text
    js = wd.to_json(chs)
    odd = next(j for j in js if j["path"] == "bad\\xff\\xfename")
    assert wd.from_json_path(odd) == b"bad\xff\xfename"

    base = gitcommit.base_commit(str(project))
    assert base is not None
    sha = gitcommit.commit(str(project), str(ws.upper), base, "agent/hostile", "m", TRAILERS)
    tree = git(project, "ls-tree", "-r", "-z", sha).split(b"\0")
    entries = {e.split(b"\t", 1)[1]: e.split(b"\t", 1)[0].split() for e in tree if e}
    assert entries[b"leak"][0] == b"120000"
    assert git(project, "cat-file", "-p", entries[b"leak"][2].decode()) == str(
        secret_file).encode()
    assert entries[b"new\nline"][0] == b"100644"
    assert entries[b"bad\xff\xfename"][0] == b"100644"
    assert b"git~1" not in entries  # git refuses this name (NTFS alias of .git); skipped
    assert b"sub/.GIT/config" not in entries
    assert b"pipe" not in entries
    assert b"chardev" not in entries
    assert b"sock" not in entries
    # No blob anywhere in the repo holds the secret or shadow's content.
    objs = git(project, "cat-file", "--batch-all-objects", "--batch")
    assert secret not in objs
    assert snapshot(project) == before


def test_whiteout_over_dir_and_type_changes(ws: Workspace) -> None:
    project = ws.project
    assert project is not None
    ws.run("rm -rf pkg && echo 'now a file' > pkg && rm README.md && mkdir README.md && "
           "echo inner > README.md/inner.txt")
    chs = wd.changes(str(ws.upper), ws.lower)
    got = by_path(chs)
    assert got[b"pkg"] == [("deleted", "dir"), ("added", "file")]
    assert got[b"pkg/sub/c.py"] == [("deleted", "file")]
    assert got[b"README.md"] == [("deleted", "file"), ("added", "dir")]
    assert got[b"README.md/inner.txt"] == [("added", "file")]
    base = gitcommit.base_commit(str(project))
    assert base is not None
    sha = gitcommit.commit(str(project), str(ws.upper), base, "agent/types", "m", TRAILERS)
    names = git(project, "ls-tree", "-r", "--name-only", sha).decode().splitlines()
    assert "pkg" in names
    assert "pkg/a.py" not in names
    assert "pkg/sub/c.py" not in names
    assert "README.md/inner.txt" in names


def test_non_git_project(tmp_path: Path, need_root: None) -> None:
    project = tmp_path / "plain"
    project.mkdir()
    (project / "f.txt").write_text("one\n")
    w = Workspace(tmp_path, project)
    w.run("echo two >> f.txt && echo new > g.txt")
    chs = wd.changes(str(w.upper), w.lower)
    assert by_path(chs) == {b"f.txt": [("modified", "file")], b"g.txt": [("added", "file")]}
    assert "+two\n" in wd.render_unified(chs, str(w.upper), w.lower)
    assert gitcommit.base_commit(str(project)) is None
    with pytest.raises(CorralError, match="not a git repository"):
        gitcommit.commit(str(project), str(w.upper), "HEAD", "b", "m", TRAILERS)


def test_workspace_without_project(tmp_path: Path, need_root: None) -> None:
    w = Workspace(tmp_path, None)
    w.run("mkdir d && echo hi > d/f && ln -s d l")
    chs = wd.changes(str(w.upper), None)
    assert by_path(chs) == {b"d": [("added", "dir")], b"d/f": [("added", "file")],
                            b"l": [("added", "symlink")]}
    assert "+hi\n" in wd.render_unified(chs, str(w.upper), None)


@pytest.fixture
def open_tmp(uniq: str) -> Iterator[Path]:
    """A temp dir other users can traverse (pytest's tmp_path is root-only)."""
    d = Path(tempfile.mkdtemp(prefix=f"corral-{uniq}-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d)


def test_repo_owned_by_another_user_and_subdir_project(open_tmp: Path,
                                                       need_root: None) -> None:
    """git runs as the repo's owner: new objects stay the user's; a subdir project works."""
    tmp_path = open_tmp
    top = tmp_path / "repo"
    top.mkdir()
    git(top, "init", "-q", "-b", "main")
    (top / "sub").mkdir()
    (top / "sub" / "a.txt").write_text("a\n")
    (top / "other.txt").write_text("o\n")
    git(top, "add", "-A")
    git(top, "commit", "-q", "-m", "init")
    subprocess.run(["chown", "-R", "4242:4242", str(top)], check=True)
    project = top / "sub"
    w = Workspace(tmp_path, project)
    w.run("echo b > b.txt && chmod 600 b.txt && echo aa > a.txt")
    base = gitcommit.base_commit(str(project))
    assert base is not None
    sha = gitcommit.commit(str(project), str(w.upper), base, "agent/sub", "m", TRAILERS)
    assert git(top, "show", f"{sha}:sub/b.txt") == b"b\n"
    assert git(top, "show", f"{sha}:sub/a.txt") == b"aa\n"
    assert git(top, "show", f"{sha}:other.txt") == b"o\n"
    for dirpath, _dirs, files in os.walk(top / ".git"):
        for f in [*files, "."]:
            st = os.lstat(os.path.join(dirpath, f))
            assert st.st_uid == 4242, os.path.join(dirpath, f)


def test_deep_tree_does_not_crash(ws: Workspace) -> None:
    ws.run("i=0; while [ $i -lt 300 ]; do mkdir d && cd d; i=$((i+1)); done; echo deep > f")
    chs = wd.changes(str(ws.upper), ws.lower)
    assert len([c for c in chs if c.type == "dir"]) == wd.MAX_DEPTH
    assert stat.S_ISDIR(chs[0].new_mode or 0)


def test_diff_while_agent_swaps_dirs_for_symlinks(ws: Workspace, tmp_path: Path) -> None:
    """The agent races the daemon: a directory keeps turning into a symlink to outside.

    Whatever the interleaving, the diff never lists or reads what is outside.
    """
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "OUTSIDE-FILE").write_text("OUTSIDE-CONTENT\n")
    lower = ws.project
    assert lower is not None
    opts = f"lowerdir={lower},upperdir={ws.upper},workdir={ws.work}"
    loop = (f"mount -t overlay overlay -o {opts} {ws.merged} && cd {ws.merged} && "
            f"touch started && while true; do rm -rf d; mkdir d; echo in > d/f; "
            f"rm -rf d; ln -s {outside} d; rm -f pkg/l; ln -s {outside}/OUTSIDE-FILE pkg/l; "
            f"rm -f pkg/l; echo mine > pkg/l; done")
    proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", loop],
                            start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            if (ws.upper / "started").exists():
                break
            assert proc.poll() is None
            subprocess.run(["sleep", "0.05"], check=True)
        assert (ws.upper / "started").exists()
        seen_d = set()
        for _ in range(150):
            chs = wd.changes(str(ws.upper), ws.lower)
            text = wd.render_unified(chs, str(ws.upper), ws.lower)
            for c in chs:
                assert b"OUTSIDE-FILE" not in c.path
                if c.path == b"d":
                    seen_d.add(c.type)
            assert "OUTSIDE-CONTENT" not in text
        # Positive control: the walk did see both faces of d during the race.
        assert seen_d <= {"dir", "symlink"}
        assert seen_d
    finally:
        os.killpg(proc.pid, 9)
        proc.wait(timeout=30)
