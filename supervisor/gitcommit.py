"""Turn an agent's overlay workspace into one git commit on a branch of the project.

Mechanism: git plumbing against a temporary index (GIT_INDEX_FILE in a private
temp dir), so the user's working tree, index, HEAD and current branch are never
touched:

    read-tree BASE → update-index -z --index-info (the workspace's changes)
    → write-tree → commit-tree (parent: tip of B, else BASE) → update-ref B NEW OLD

The tree is always BASE's tree plus every change in the upper dir, i.e. the
full current state of the workspace, so running commit again after more work
adds a commit on B whose tree is the workspace as it is now (a file the agent
added and later removed disappears too). update-ref is given the old value of
B, so a concurrent update of B makes it fail instead of being overwritten.

File contents come from the upper dir, which the agent controls: every file is
opened with sandbox.workspace_diff.open_regular (openat2 RESOLVE_BENEATH, no
symlinks, O_PATH + fstat before reading) and its bytes streamed into one
`git fast-import` (blobs only), so git never resolves a path in the upper dir
the agent could have swapped. Symlinks
become mode-120000 blobs of their target text (never followed).

git runs as the owner of the repository (not root), so objects and refs it
writes stay owned by the user and git's safe.directory check is satisfied.
"""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sandbox import workspace_diff as wd
from sandbox.errors import Conflict, CorralError

log = logging.getLogger(__name__)

_TIMEOUT = 600


@dataclass(frozen=True)
class _Repo:
    top: str          # the work tree's top level
    prefix: bytes     # the project dir relative to `top` ("" or "sub/dir/")
    uid: int
    gid: int

    def env(self, index: str | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
        try:
            env["HOME"] = pwd.getpwuid(self.uid).pw_dir
        except KeyError:
            env.pop("HOME", None)
        env["GIT_TERMINAL_PROMPT"] = "0"
        if index is not None:
            env["GIT_INDEX_FILE"] = index
        return env


def _git(repo: _Repo | None, cwd: str, args: Sequence[str], *, input: bytes | None = None,
         env: dict[str, str] | None = None, check: bool = True,
         pass_fds: Sequence[int] = ()) -> subprocess.CompletedProcess[bytes]:
    kw: dict[str, object] = {}
    if repo is not None and os.geteuid() == 0 and repo.uid != 0:
        kw = {"user": repo.uid, "group": repo.gid, "extra_groups": []}
    cp = subprocess.run(["git", *args], cwd=cwd, input=input, capture_output=True,
                        env=env, timeout=_TIMEOUT, check=False, pass_fds=tuple(pass_fds),
                        **kw)  # type: ignore[call-overload]
    if check and cp.returncode != 0:
        raise CorralError(f"git {' '.join(args[:2])} failed in {cwd}: "
                          f"{cp.stderr.decode(errors='replace').strip()}")
    return cp  # type: ignore[no-any-return]


def _open_repo(project: str) -> _Repo | None:
    """The repository containing `project`, or None when it is not in one."""
    try:
        st = Path(project).stat()
    except OSError as e:
        raise CorralError(f"project directory {project!r}: {e.strerror}") from e
    probe = _Repo(project, b"", st.st_uid, st.st_gid)
    cp = _git(probe, project, ["rev-parse", "--show-toplevel", "--show-prefix"],
              env=probe.env(), check=False)
    if cp.returncode != 0:
        err = cp.stderr.decode(errors="replace").strip()
        if "not a git repository" in err:
            return None
        raise CorralError(f"cannot inspect the git repository of {project}: {err}",
                          hint="git runs as the project's owner (uid "
                          f"{st.st_uid}), who must be able to reach it")
    lines = cp.stdout.split(b"\n")
    top = os.fsdecode(lines[0])
    gst = Path(top).stat()
    return _Repo(top, lines[1], gst.st_uid, gst.st_gid)


def base_commit(project: str) -> str | None:
    """HEAD of the project's repository (None: not a git repo, or no commit yet)."""
    repo = _open_repo(project)
    if repo is None:
        return None
    cp = _git(repo, repo.top, ["rev-parse", "--verify", "-q", "HEAD^{commit}"],
              env=repo.env(), check=False)
    return cp.stdout.decode().strip() or None if cp.returncode == 0 else None


def check_branch(project: str, branch: str) -> None:
    """Raise CorralError unless `branch` is a valid branch name."""
    if (not branch or branch.startswith("-") or "\n" in branch
            or subprocess.run(["git", "check-ref-format", f"refs/heads/{branch}"],
                              capture_output=True, check=False).returncode != 0):
        raise CorralError(f"invalid branch name {branch!r}",
                          hint="use a name git accepts, e.g. agent/feature-x")


def _rev(repo: _Repo, rev: str) -> str | None:
    cp = _git(repo, repo.top, ["rev-parse", "--verify", "-q", rev], env=repo.env(), check=False)
    return cp.stdout.decode().strip() if cp.returncode == 0 else None


def _message(message: str, trailers: dict[str, str]) -> bytes:
    for k, v in trailers.items():
        if not k or any(ch in k for ch in ": \n") or "\n" in v:
            raise CorralError(f"invalid commit trailer {k!r}: {v!r}")
    body = message.strip() or "corral: agent workspace changes"
    if trailers:
        body += "\n\n" + "\n".join(f"{k}: {v}" for k, v in trailers.items())
    return (body + "\n").encode()


def _hash_blobs(repo: _Repo, tmp: str, upper_fd: int,
                items: Sequence[wd.Change]) -> dict[bytes, str]:
    """Write a blob for every file/symlink change; {path: object id}.

    One `git fast-import` fed through a pipe: the bytes come from fds this
    process opened safely, and git never opens a path in the upper dir itself
    (it runs as the repo owner, who may not even be allowed to read the
    agent's files — we read them as root and stream them).
    """
    marks = str(Path(tmp) / "marks")
    paths: dict[int, bytes] = {}
    kw: dict[str, object] = {}
    if os.geteuid() == 0 and repo.uid != 0:
        kw = {"user": repo.uid, "group": repo.gid, "extra_groups": []}
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(  # type: ignore[call-overload]
            ["git", "fast-import", "--quiet", "--done", f"--export-marks={marks}"],
            cwd=repo.top, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err,
            env=repo.env(), **kw)
        try:
            for c in items:
                data = _blob_data(upper_fd, c)
                if data is None:
                    continue
                mark = len(paths) + 1
                paths[mark] = c.path
                proc.stdin.write(b"blob\nmark :%d\ndata %d\n" % (mark, len(data)))
                proc.stdin.write(data)
                proc.stdin.write(b"\n")
            proc.stdin.write(b"done\n")
            proc.stdin.close()
            rc = proc.wait(timeout=_TIMEOUT)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        if rc != 0:
            err.seek(0)
            raise CorralError(f"git fast-import failed: {err.read().decode(errors='replace')}")
    out: dict[bytes, str] = {}
    if paths:
        with open(marks, "rb") as f:
            for line in f:
                mark_s, oid = line.split()
                out[paths[int(mark_s[1:])]] = oid.decode()
    return out


def _blob_data(upper_fd: int, c: wd.Change) -> bytes | None:
    """A change's blob content: a symlink's target text, or a regular file's bytes."""
    if c.type == "symlink":
        return wd.read_link(upper_fd, c.path)
    fd = wd.open_regular(upper_fd, c.path)
    if fd is None:
        log.warning("commit: %r vanished or is no longer a regular file", c.path)
        return None
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _ignored(repo: _Repo, env: dict[str, str], paths: list[bytes]) -> set[bytes]:
    """Which of `paths` (relative to top) the project's ignore rules exclude.

    Run against the temporary index, so files tracked in the base commit are
    never "ignored" (like `git add`, which keeps updating tracked files).
    """
    if not paths:
        return set()
    cp = _git(repo, repo.top, ["check-ignore", "--stdin", "-z"],
              input=b"".join(p + b"\0" for p in paths), env=env, check=False)
    if cp.returncode not in (0, 1):
        raise CorralError(f"git check-ignore failed: {cp.stderr.decode(errors='replace')}")
    return {p for p in cp.stdout.split(b"\0") if p}


def _tree_entries_under(repo: _Repo, env: dict[str, str], tree: str,
                        dirs: list[bytes]) -> list[bytes]:
    """Every path tracked in `tree` beneath the directories `dirs`."""
    out: list[bytes] = []
    for i in range(0, len(dirs), 200):
        args = ["ls-tree", "-r", "-z", "--name-only", "--full-tree", tree, "--"]
        args += [os.fsdecode(d + b"/") for d in dirs[i:i + 200]]
        # Directory names may hold glob characters: match them literally.
        cp = _git(repo, repo.top, args, env={**env, "GIT_LITERAL_PATHSPECS": "1"})
        out += [p for p in cp.stdout.split(b"\0") if p]
    return out


def _identity_env(repo: _Repo, env: dict[str, str], agent: str) -> dict[str, str]:
    """Use the repo's configured identity; fall back to a corral one so commit never fails."""
    env = dict(env)
    for key, var, default in (("user.name", "NAME", f"corral agent {agent}".strip()),
                              ("user.email", "EMAIL", "corral@localhost")):
        cp = _git(repo, repo.top, ["config", key], env=env, check=False)
        if cp.returncode != 0 or not cp.stdout.strip():
            env[f"GIT_AUTHOR_{var}"] = env[f"GIT_COMMITTER_{var}"] = default
    return env


def commit(project: str, upper: str, base: str, branch: str, message: str,
           trailers: dict[str, str], include_ignored: bool = False,
           *, userxattr: bool = False) -> str:
    """Record the workspace as a new commit on `branch`; return its id.

    Parent: the tip of `branch` if it exists, else `base`. The tree: `base`'s
    tree plus every change of the upper dir (the workspace's full state).
    Raises CorralError for a non-git project or bad branch name, Conflict when
    `branch` exists but carries commits that are not this agent's.
    """
    repo = _open_repo(project)
    if repo is None:
        raise CorralError(f"{project} is not a git repository, so there is nothing to commit to",
                          hint="use `corral diff` to see the changes, or `git init` the project")
    check_branch(project, branch)
    base_id = _rev(repo, f"{base}^{{commit}}") if base else None
    if base_id is None:
        raise CorralError(f"base commit {base!r} not found in {repo.top}",
                          hint="the agent's recorded base commit was removed from the repo")
    ref = f"refs/heads/{branch}"
    _check_not_checked_out(repo, ref)
    tip = _rev(repo, f"{ref}^{{commit}}")
    if tip is not None and tip != base_id:
        _check_branch_ours(repo, ref, tip, base_id, trailers)
    parent = tip or base_id

    chs = wd.changes(upper, project, userxattr=userxattr)
    tmp = tempfile.mkdtemp(prefix="corral-commit-")
    try:
        if os.geteuid() == 0:
            os.chown(tmp, repo.uid, repo.gid)
        env = repo.env(index=str(Path(tmp) / "index"))
        _git(repo, repo.top, ["read-tree", base_id], env=env)

        # Deleted directories: drop everything the base tracks beneath them
        # (also what the user had removed from the lower layer only).
        dels = [c for c in chs if c.kind == "deleted"]
        gone_dirs = [repo.prefix + c.path for c in dels if c.type == "dir"]
        removals = {repo.prefix + c.path for c in dels if c.type != "dir"}
        removals.update(_tree_entries_under(repo, env, base_id, gone_dirs) if gone_dirs else [])
        # Files that now exist: added or modified regular files and symlinks.
        wanted = [c for c in chs if c.kind != "deleted" and c.type in ("file", "symlink")]
        others = [c for c in chs if c.kind != "deleted" and c.type == "other"]
        for c in others:
            log.warning("commit: skipping special file %r (%s)", c.path,
                        stat.filemode(c.new_mode or 0))
        if not include_ignored:
            ignored = _ignored(repo, env, [repo.prefix + c.path for c in wanted])
            if ignored:
                log.info("commit: leaving out %d ignored path(s)", len(ignored))
            wanted = [c for c in wanted if repo.prefix + c.path not in ignored]

        upper_fd = wd.open_root(upper)
        try:
            blobs = _hash_blobs(repo, tmp, upper_fd, wanted)
        finally:
            os.close(upper_fd)
        info = [b"0 " + b"0" * 40 + b"\t" + p + b"\0" for p in sorted(removals)]
        for c in wanted:
            oid = blobs.get(c.path)
            if oid is None:
                continue
            mode = wd.git_mode(c.new_mode)
            info.append(b"%o %s\t%s\0" % (mode or 0o100644, oid.encode(), repo.prefix + c.path))
        if info:
            cp = _git(repo, repo.top, ["update-index", "-z", "--index-info"],
                      input=b"".join(info), env=env)
            # git skips (and names) paths it refuses to track, e.g. `.GIT/x`.
            for line in cp.stderr.decode(errors="replace").splitlines():
                log.warning("commit: git: %s", line)
        tree = _git(repo, repo.top, ["write-tree"], env=env).stdout.decode().strip()

        parent_tree = _rev(repo, f"{parent}^{{tree}}")
        if tip is not None and tree == parent_tree:
            log.info("commit: %s already records the workspace; no new commit", ref)
            return tip
        cenv = _identity_env(repo, env, trailers.get("Corral-Agent", ""))
        new = _git(repo, repo.top, ["commit-tree", "--no-gpg-sign", tree, "-p", parent, "-F", "-"],
                   input=_message(message, trailers), env=cenv).stdout.decode().strip()
        cp = _git(repo, repo.top, ["update-ref", "-m", f"corral: commit to {branch}", ref, new,
                                   tip or ""], env=env, check=False)
        if cp.returncode != 0:
            raise Conflict(f"branch {branch} changed while committing: "
                           f"{cp.stderr.decode(errors='replace').strip()}",
                           hint="run the commit again")
        log.info("commit: %s -> %s (%d changes)", ref, new, len(chs))
        return new
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_not_checked_out(repo: _Repo, ref: str) -> None:
    """Refuse a branch checked out in any work tree: moving it would move the user's HEAD."""
    cp = _git(repo, repo.top, ["worktree", "list", "--porcelain", "-z"], env=repo.env())
    if f"branch {ref}".encode() in cp.stdout.split(b"\0"):
        raise Conflict(f"branch {ref.removeprefix('refs/heads/')} is checked out in the "
                       "project; committing to it would change the user's checkout",
                       hint="commit to a branch of its own, e.g. --branch agent/NAME")


def _check_branch_ours(repo: _Repo, ref: str, tip: str, base: str,
                       trailers: dict[str, str]) -> None:
    """Refuse to stack on a branch holding someone else's work.

    The new tree is base + workspace, so committing on top of commits that are
    not this agent's would silently revert them.
    """
    anc = _git(repo, repo.top, ["merge-base", "--is-ancestor", base, tip], env=repo.env(),
               check=False)
    agent = trailers.get("Corral-Agent")
    ours = False
    if anc.returncode == 0 and agent:
        cp = _git(repo, repo.top, ["log", "-1", "--format=%(trailers:key=Corral-Agent,valueonly)",
                                   tip], env=repo.env())
        ours = agent in cp.stdout.decode().split()
    if not ours:
        raise Conflict(f"branch {ref.removeprefix('refs/heads/')} already exists with commits "
                       "that are not this agent's",
                       hint="choose another --branch, or delete/merge that branch first")
