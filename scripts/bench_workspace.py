#!/usr/bin/env python3
"""Benchmark: workspace creation (overlay vs git worktree vs cp -a) and diff cost.

Generates a project of N files (default 100 000) in a temp dir, makes it a git
repository, then in the same run measures:

- overlay: mkdir upper/work + mount -t overlay, inside a private mount
  namespace of a forked child (nothing is mounted on the host);
- `git worktree add` of the project's HEAD;
- `cp -a` of the project;
- sandbox.workspace_diff: changes() + render_unified() + render_stat() for 10
  changed files, on the big project and on a 10-file one (the cost should
  follow what changed, not the project's size); `git status` in the worktree
  copy after the same 10 edits, for comparison.

Results are printed and written to docs/bench-workspace.md. Needs root.
Usage: sudo .venv/bin/python scripts/bench_workspace.py [--files N] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sandbox import kernel  # noqa: E402
from sandbox import workspace_diff as wd  # noqa: E402

GIT_ENV = {**os.environ, "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "b@example.invalid",
           "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "b@example.invalid"}


def say(*args: object) -> None:
    """Print at once (the run is long); a (measurement, time) row as "measurement: time"."""
    print(*(": ".join(a) if isinstance(a, tuple) else a for a in args), flush=True)


def git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "safe.directory=*", *args], cwd=cwd, env=GIT_ENV, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def make_project(root: Path, nfiles: int) -> Path:
    """A repo of `nfiles` small text files, 100 per directory, committed and packed.

    The commit is built with one `git fast-import` (a pack, in seconds) rather
    than `git add` + `gc` (minutes for 100k files on 2 busy cores); the files are
    written to the work tree and `git reset` builds the index from the commit.
    """
    p = root / f"project-{nfiles}"
    p.mkdir()
    git(p, "init", "-q", "-b", "main")
    git(p, "config", "gc.auto", "0")  # no background repack under `cp -a`'s feet
    per_dir = 100
    stream = [b"commit refs/heads/main\n",
              b"committer bench <b@example.invalid> 1700000000 +0000\n",
              b"data 9\ngenerated\n"]
    for i in range(nfiles):
        d = p / f"pkg{i // per_dir // 100:03d}" / f"mod{i // per_dir % 100:02d}"
        if i % per_dir == 0:
            d.mkdir(parents=True)
        f = d / f"file{i % per_dir:03d}.py"
        data = "".join(f"value_{i}_{k} = {k}\n" for k in range(20)).encode()
        f.write_bytes(data)
        rel = str(f.relative_to(p)).encode()
        stream.append(b"M 100644 inline %s\ndata %d\n%s\n" % (rel, len(data), data))
    subprocess.run(["git", "fast-import", "--quiet"], cwd=p, input=b"".join(stream),
                   check=True, env=GIT_ENV)
    git(p, "reset", "-q")
    return p


def edited_files(project: Path, n: int = 10) -> list[str]:
    files = sorted(str(f.relative_to(project)) for f in project.rglob("*.py"))
    step = max(1, len(files) // n)
    return files[::step][:n]


def in_private_ns(fn: Callable[[], float]) -> float:
    """Run fn in a forked child inside a new private mount namespace; its float result."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            os.close(r)
            kernel.unshare(kernel.CLONE_NEWNS)
            kernel.mount(None, "/", None, kernel.MS_REC | kernel.MS_PRIVATE)
            os.write(w, repr(fn()).encode())
            code = 0
        except BaseException as e:  # report, never fall back into the parent's code
            os.write(w, f"error {e!r}".encode())
        finally:
            os._exit(code)
    os.close(w)
    out = b""
    while chunk := os.read(r, 4096):
        out += chunk
    os.close(r)
    _, status = os.waitpid(pid, 0)
    if status != 0:
        raise RuntimeError(out.decode())
    return float(out)


def overlay_create(project: Path, root: Path, tag: str) -> float:
    """Seconds for mkdir upper/work + mount the overlay (measured inside the child)."""
    ws = root / f"ws-{tag}"

    def child() -> float:
        t0 = time.perf_counter()
        (ws / "upper").mkdir(parents=True)
        (ws / "work").mkdir()
        (ws / "merged").mkdir()
        kernel.mount("overlay", str(ws / "merged"), "overlay", 0,
                     f"lowerdir={project},upperdir={ws / 'upper'},workdir={ws / 'work'}")
        return time.perf_counter() - t0

    try:
        return in_private_ns(child)
    finally:
        shutil.rmtree(ws, ignore_errors=True)


def overlay_edit(project: Path, ws: Path, files: list[str]) -> None:
    """Create a workspace and edit `files` through the overlay (in a private ns)."""

    def child() -> float:
        for d in ("upper", "work", "merged"):
            (ws / d).mkdir(parents=True)
        kernel.mount("overlay", str(ws / "merged"), "overlay", 0,
                     f"lowerdir={project},upperdir={ws / 'upper'},workdir={ws / 'work'}")
        for f in files:
            with (ws / "merged" / f).open("a") as fh:
                fh.write("# edited by the agent\n")
        return 0.0

    in_private_ns(child)


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def median_of(n: int, fn: Callable[[], float]) -> float:
    return statistics.median(fn() for _ in range(n))


def diff_time(project: Path, ws: Path) -> tuple[float, int]:
    def once() -> float:
        t0 = time.perf_counter()
        chs = wd.changes(str(ws / "upper"), str(project))
        wd.render_unified(chs, str(ws / "upper"), str(project))
        wd.render_stat(chs, str(ws / "upper"), str(project))
        return time.perf_counter() - t0

    n = len(wd.changes(str(ws / "upper"), str(project)))
    return median_of(5, once), n


def ms(s: float) -> str:
    return f"{s * 1000:.1f} ms" if s < 10 else f"{s:.1f} s"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--out", default=str(REPO / "docs" / "bench-workspace.md"))
    args = ap.parse_args()
    if os.geteuid() != 0:
        say("bench_workspace: needs root (overlay mounts in a private namespace)")
        return 1
    rows: list[tuple[str, str]] = []
    root = Path(tempfile.mkdtemp(prefix="corral-bench-ws-"))
    try:
        t = timed(lambda: make_project(root, args.files))
        big = root / f"project-{args.files}"
        say(f"generated + committed {args.files} files in {t:.1f} s")
        small = make_project(root, 10)

        ov_big = median_of(11, lambda: overlay_create(big, root, "big"))
        ov_small = median_of(11, lambda: overlay_create(small, root, "small"))
        rows.append((f"overlay create ({args.files} files; median of 11)", ms(ov_big)))
        rows.append(("overlay create (10 files; median of 11)", ms(ov_small)))
        say(rows[-2])
        say(rows[-1])

        wt = root / "worktree"
        t_wt = timed(lambda: git(big, "worktree", "add", "-q", "--detach", str(wt), "HEAD"))
        rows.append((f"git worktree add ({args.files} files)", ms(t_wt)))
        say(rows[-1])
        cp_dst = root / "cp-copy"
        t_cp = timed(lambda: subprocess.run(["cp", "-a", str(big), str(cp_dst)], check=True))
        rows.append((f"cp -a ({args.files} files)", ms(t_cp)))
        say(rows[-1])
        shutil.rmtree(cp_dst)

        files = edited_files(big)
        ws_big = root / "ws-diff-big"
        overlay_edit(big, ws_big, files)
        d_big, n_big = diff_time(big, ws_big)
        rows.append((f"diff: changes+unified+stat, {n_big} changed files, "
                     f"{args.files}-file project (median of 5)", ms(d_big)))
        say(rows[-1])
        ws_small = root / "ws-diff-small"
        overlay_edit(small, ws_small, edited_files(small))
        d_small, n_small = diff_time(small, ws_small)
        rows.append((f"diff: same, {n_small} changed files, 10-file project", ms(d_small)))
        say(rows[-1])
        for f in files:
            with (wt / f).open("a") as fh:
                fh.write("# edited\n")
        t_st = timed(lambda: git(wt, "status", "--porcelain"))
        rows.append((f"for comparison: git status in the worktree ({args.files} files, "
                     "10 edits, warm)", ms(t_st)))
        say(rows[-1])
        # No `git worktree remove`: the whole temp dir (repo included) goes below.
    finally:
        shutil.rmtree(root, ignore_errors=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = ["# Workspace benchmark (scripts/bench_workspace.py)", "",
             f"Host: {platform.node()}, {os.cpu_count()} CPUs, Linux {platform.release()}, "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Page cache warm; "
             "other work may share the machine.", "",
             f"Command: `sudo .venv/bin/python scripts/bench_workspace.py --files {args.files}`",
             "", "| measurement | time |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    lines += ["", "Overlay creation is mkdir of upper/work plus one mount(2) inside a private "
              "mount namespace; it does not depend on the project's size. diff reads only the "
              "upper dir (plus the lower counterparts of what is there), so it follows the "
              "number of changed files, not the project's size.", ""]
    out.write_text("\n".join(lines))
    say(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
