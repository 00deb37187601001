"""workspace_diff on plain directories (no overlay, no root): walking, rendering, JSON.

The upper/lower pair here are ordinary directories; the overlay conventions
that need root (whiteouts, opaque xattrs) are covered in
tests/integration/test_diff_commit.py.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from sandbox import workspace_diff as wd

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    upper, lower = tmp_path / "upper", tmp_path / "lower"
    upper.mkdir()
    lower.mkdir()
    return upper, lower


def kinds(chs: list[wd.Change]) -> dict[bytes, list[tuple[str, str]]]:
    out: dict[bytes, list[tuple[str, str]]] = {}
    for c in chs:
        out.setdefault(c.path, []).append((c.kind, c.type))
    return out


def test_quote_path_like_git() -> None:
    assert wd.quote_path(b"plain/name.txt") == "plain/name.txt"
    assert wd.quote_path(b"a\nb") == '"a\\nb"'
    assert wd.quote_path(b'q"t\\') == '"q\\"t\\\\"'
    assert wd.quote_path("é".encode()) == '"\\303\\251"'
    assert wd.quote_path(b"\xff\x01") == '"\\377\\001"'


def test_json_round_trips_odd_names() -> None:
    names = [b"ok.txt", "ünï.txt".encode(), b"bad\xff\xfe", b"new\nline", b"tab\tx"]
    chs = [wd.Change(n, "added", "file", None, 0o100644, 1) for n in names]
    items = json.loads(json.dumps(wd.to_json(chs)))
    assert [wd.from_json_path(i) for i in items] == names
    assert "path_b64" in items[2]
    assert "path_b64" not in items[1]
    assert items[0] == {"path": "ok.txt", "kind": "added", "type": "file", "old_mode": None,
                        "new_mode": "100644"}


def test_unchanged_copies_are_not_changes(pair: tuple[Path, Path]) -> None:
    upper, lower = pair
    (lower / "same.txt").write_text("same\n")
    (upper / "same.txt").write_text("same\n")  # a copy-up without a real change
    (lower / "d").mkdir()
    (upper / "d").mkdir()
    (lower / "l").symlink_to("target")
    (upper / "l").symlink_to("target")
    (lower / "m.txt").write_text("abc\n")
    (upper / "m.txt").write_text("abd\n")  # same size, different bytes
    (lower / "p.txt").write_text("x\n")
    (upper / "p.txt").write_text("x\n")
    (upper / "p.txt").chmod(0o600)  # git does not record this, neither do we
    assert kinds(wd.changes(str(upper), str(lower))) == {b"m.txt": [("modified", "file")]}


def test_hostile_entries_are_never_followed_or_opened(pair: tuple[Path, Path],
                                                      tmp_path: Path) -> None:
    upper, lower = pair
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("SECRET-CONTENT\n")
    (lower / "dir").mkdir()
    (lower / "dir" / "kept.txt").write_text("k\n")
    (lower / "fifo-was-file").write_text("old\n")
    # The agent replaced a directory with a symlink to outside, and a file by a fifo.
    (upper / "dir").symlink_to(outside)
    (upper / "leak").symlink_to(outside / "secret")
    os.mkfifo(upper / "fifo-was-file")
    os.mkfifo(upper / "newfifo")
    chs = wd.changes(str(upper), str(lower))
    assert kinds(chs) == {
        b"dir": [("deleted", "dir"), ("added", "symlink")],
        b"dir/kept.txt": [("deleted", "file")],
        b"fifo-was-file": [("deleted", "file"), ("added", "other")],
        b"leak": [("added", "symlink")],
        b"newfifo": [("added", "other")],
    }
    text = wd.render_unified(chs, str(upper), str(lower))
    stat_text = wd.render_stat(chs, str(upper), str(lower))
    for out in (text, stat_text):
        assert "SECRET-CONTENT" not in out
    assert f"+{outside / 'secret'}\n\\ No newline at end of file\n" in text
    assert "special file (prw" in text

    root = wd.open_root(str(upper))
    try:
        # Positive control first: a regular file beneath the root opens.
        (upper / "real.txt").write_text("r\n")
        fd = wd.open_regular(root, b"real.txt")
        assert fd is not None
        os.close(fd)
        for bad in (b"leak", b"newfifo", b"dir/secret", b"../lower/dir/kept.txt"):
            assert wd.open_regular(root, bad) is None
        assert wd.read_link(root, b"leak") == os.fsencode(outside / "secret")
    finally:
        os.close(root)


def test_added_tree_without_lower(pair: tuple[Path, Path]) -> None:
    upper, _lower = pair
    (upper / "a" / "b").mkdir(parents=True)
    (upper / "a" / "b" / "f").write_bytes(b"\x00\x01binary")
    (upper / "x.sh").write_text("#!/bin/sh\n")
    (upper / "x.sh").chmod(0o755)
    chs = wd.changes(str(upper), None)
    assert kinds(chs) == {b"a": [("added", "dir")], b"a/b": [("added", "dir")],
                          b"a/b/f": [("added", "file")], b"x.sh": [("added", "file")]}
    text = wd.render_unified(chs, str(upper), None)
    assert "Binary files /dev/null and b/a/b/f differ\n" in text
    assert "new file mode 100755\n" in text
    stat_text = wd.render_stat(chs, str(upper), None)
    assert " a/b/f | Bin 0 -> 8 bytes\n" in stat_text
    assert stat_text.endswith(" 2 files changed, 1 insertion(+)\n")


def test_git_dir_is_left_out_by_default(pair: tuple[Path, Path]) -> None:
    upper, lower = pair
    (upper / ".git").mkdir()
    (upper / ".git" / "index").write_bytes(b"x")
    (upper / "f").write_text("f\n")
    assert list(kinds(wd.changes(str(upper), str(lower)))) == [b"f"]
    assert b".git/index" in kinds(wd.changes(str(upper), str(lower), include_git_dir=True))


def _random_text(rng: random.Random, n: int) -> list[str]:
    return [f"line {rng.randrange(12)}\n" for _ in range(n)]


def _mutate(rng: random.Random, lines: list[str]) -> list[str]:
    out = list(lines)
    for _ in range(rng.randrange(1, 6)):
        op = rng.choice(("ins", "del", "chg"))
        i = rng.randrange(len(out) + 1)
        if op == "ins":
            out[i:i] = [f"new {rng.randrange(99)}\n" for _ in range(rng.randrange(1, 4))]
        elif op == "del" and out:
            del out[min(i, len(out) - 1)]
        elif out:
            out[min(i, len(out) - 1)] = f"changed {rng.randrange(99)}\n"
    return out


@pytest.mark.parametrize("seed", range(25))
def test_unified_diff_applies_with_git(tmp_path: Path, seed: int) -> None:
    """Oracle: `git apply` of our diff onto the lower tree reproduces the upper one."""
    rng = random.Random(seed)
    upper, lower = tmp_path / "upper", tmp_path / "lower"
    upper.mkdir()
    lower.mkdir()
    for i in range(4):
        old = _random_text(rng, rng.randrange(0, 40))
        new = _mutate(rng, old)
        if rng.random() < 0.3 and old:
            old[-1] = old[-1].rstrip("\n")  # no newline at end of file
        if rng.random() < 0.3 and new:
            new[-1] = new[-1].rstrip("\n")
        (lower / f"f{i}.txt").write_text("".join(old))
        (upper / f"f{i}.txt").write_text("".join(new))
    (upper / "added.txt").write_text("hello\nworld")
    chs = wd.changes(str(upper), str(lower))
    patch = wd.render_unified(chs, str(upper), str(lower))
    target = tmp_path / "target"
    shutil.copytree(lower, target)
    cp = subprocess.run(["git", "apply", "-"], cwd=target, input=patch.encode(),
                        capture_output=True, check=False, timeout=30)
    assert cp.returncode == 0, cp.stderr.decode() + patch
    for f in upper.iterdir():
        assert (target / f.name).read_bytes() == f.read_bytes()
