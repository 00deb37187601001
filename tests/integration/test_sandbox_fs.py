"""THREATS.md, filesystem: real sandboxes, checked from inside and from the host."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sandbox.spec import FsRule
from tests.integration.sandbox_kit import box, hidden, make_spec

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("need_root")]


def test_workspace_writes_land_in_upper_never_in_project(tmp_path: Path, uniq: str) -> None:
    spec = make_spec(tmp_path, uniq)
    proj = Path(spec.workspace.project or "")
    with box(spec) as b:
        r = b.run("cat README && echo changed >> README && echo new > added.txt "
                  "&& rm src/main.py && id -u && stat -c %u README")
        assert r.code == 0, r.out
        # positive control: the project's content is visible and editable
        assert "project readme" in r.out
        assert f"{spec.uid}\n{spec.uid}" in r.out  # the owner's file appears as the agent's
        upper = Path(spec.state_dir) / "upper"
        assert (upper / "README").read_text() == "project readme\nchanged\n"
        assert (upper / "added.txt").read_text() == "new\n"
        # the project is untouched
        assert (proj / "README").read_text() == "project readme\n"
        assert (proj / "src" / "main.py").exists()
        assert not (proj / "added.txt").exists()
        assert (proj / "README").stat().st_uid == 1000
        # a second start sees the agent's earlier changes (persistent upper)
        r2 = b.run("cat README; ls src")
        assert "changed" in r2.out
        assert "main.py" not in r2.out


def test_hidden_paths_give_no_content_by_any_spelling(tmp_path: Path, uniq: str) -> None:
    data = tmp_path / "data"
    (data / "private").mkdir(parents=True)
    (data / "private" / "key").write_text("TOPSECRET-data\n")
    (data / "public.txt").write_text("public data\n")
    spec = make_spec(tmp_path, uniq, rules=(
        hidden("/workspace/secrets"), hidden("/workspace/.env"), hidden("/workspace/later"),
        FsRule("/data", "ro", str(data)), hidden("/data/private"), hidden("/data/notyet"),
        hidden("/home/agent/.ssh"),
    ))
    proj = Path(spec.workspace.project or "")
    with box(spec) as b:
        b.start()
        # Created on the host *after* the sandbox started: must stay invisible.
        (proj / "later").mkdir()
        (proj / "later" / "x").write_text("TOPSECRET-later\n")
        (data / "notyet").mkdir()
        (data / "notyet" / "y").write_text("TOPSECRET-notyet\n")
        r = b.exec(
            "cat README /data/public.txt;"  # positive controls
            "for p in /workspace/secrets/token /workspace/.env /workspace/later/x "
            "/data/private/key /data/notyet/y; do cat $p; "
            "cat /proc/self/root$p; done;"
            "cd /workspace/secrets && cat /proc/$$/cwd/token; cd /workspace;"
            "ls -la /workspace/secrets /data/private /data/notyet /workspace/later;"
            "ln /workspace/.env /tmp/hl; cat /tmp/hl;"
            "mv /workspace/secrets /workspace/moved; cat /workspace/moved/token;"
            "mkdir -p /tmp/t && mv /data /tmp/t/d; cat /tmp/t/d/private/key;"
            "grep -r TOPSECRET /workspace /data /home/agent /proc/self/root/workspace;"
            "echo done")
        assert "project readme" in r.out, r.out
        assert "public data" in r.out, r.out
        assert "done" in r.out
        assert "TOPSECRET" not in r.out, r.out
    # the host side is untouched: nothing was written into the ro source
    assert sorted(p.name for p in data.iterdir()) == ["notyet", "private", "public.txt"]


def test_readonly_paths_resist_every_write(tmp_path: Path, uniq: str) -> None:
    data = tmp_path / "ro"
    data.mkdir()
    (data / "f").write_text("original\n")
    (data / "d").mkdir()
    rw = tmp_path / "rw"
    rw.mkdir()
    os.chmod(rw, 0o777)  # noqa: S103 - the agent writes here on purpose
    # even world-writable on the host: read-only inside
    os.chmod(data, 0o777)  # noqa: S103
    os.chmod(data / "f", 0o666)  # noqa: S103
    spec = make_spec(tmp_path, uniq, rules=(FsRule("/ro", "ro", str(data)),
                                            FsRule("/rw", "rw", str(rw))))
    with box(spec) as b:
        attempts = [
            "echo x > /ro/f", "echo x >> /ro/f", "truncate -s 0 /ro/f", "chmod 777 /ro/f",
            "mv /ro/f /ro/g", "rm -f /ro/f", "touch /ro/new", "mkdir /ro/nd", "rmdir /ro/d",
            "ln -s x /ro/l", "python3 -c \"import os; os.setxattr('/ro/f', 'user.x', b'1')\"",
            "mount -o remount,rw /ro", "umount /ro", "umount -l /ro",
            "mount -t tmpfs none /ro", "mount --bind /tmp /ro",
            "echo x > /usr/bin/corral-test", "echo x > /etc/passwd", "touch /newfile",
        ]
        script = "".join(f"if {a} 2>/dev/null; then echo 'BROKE: {a}'; fi;" for a in attempts)
        # positive control: the rw rule is writable and lands on the host
        script += "echo ok > /rw/out && cat /ro/f && echo finished"
        r = b.run(script)
        assert "BROKE" not in r.out, r.out
        assert "original" in r.out, r.out
        assert "finished" in r.out, r.out
    assert (data / "f").read_text() == "original\n"
    assert sorted(p.name for p in data.iterdir()) == ["d", "f"]
    assert (rw / "out").read_text() == "ok\n"


def test_only_allowed_devices_and_nosuid_nodev_where_writable(tmp_path: Path,
                                                              uniq: str) -> None:
    spec = make_spec(tmp_path, uniq)
    with box(spec) as b:
        r = b.run("ls -A /dev; echo ---; cat /proc/self/mountinfo; echo ---;"
                  "mknod /tmp/n c 1 3 && echo MKNOD; head -c 4 /dev/zero | od -An -tx1;"
                  "echo hi > /dev/null && echo nullok; python3 -c 'import os; "
                  "f=os.open(\"/dev/ptmx\", os.O_RDWR); print(\"pty\", os.ptsname(f) "
                  "if hasattr(os, \"ptsname\") else os.ttyname(f))' 2>&1 || true")
        assert r.code == 0, r.out
        devs, mountinfo, rest = r.out.split("---\n")
        assert set(devs.split()) == {"null", "zero", "full", "random", "urandom", "tty",
                                     "ptmx", "pts", "shm", "fd", "stdin", "stdout", "stderr"}
        assert "MKNOD" not in rest
        assert "00 00 00 00" in rest
        assert "nullok" in rest
        for line in mountinfo.splitlines():
            fields = line.split()
            mnt, opts = fields[4], fields[5].split(",")
            fstype = line.split(" - ")[1].split()[0]
            if "rw" not in opts or fstype == "devpts" or mnt in {
                    f"/dev/{d}" for d in ("null", "zero", "full", "random", "urandom", "tty")}:
                continue
            assert "nosuid" in opts, line
            assert "nodev" in opts, line


def test_proc_and_host_secrets_not_reachable(tmp_path: Path, uniq: str) -> None:
    spec = make_spec(tmp_path, uniq)
    with box(spec) as b:
        attempts = ["echo 1 > /proc/sysrq-trigger", "echo x > /proc/sys/kernel/core_pattern",
                    "echo x > /proc/sys/kernel/hostname",
                    "[ $(head -c 1 /proc/kcore | wc -c) -gt 0 ]",
                    "[ $(timeout 1 head -c 1 /proc/kmsg | wc -c) -gt 0 ]",
                    "cat /etc/shadow | grep root",
                    "ls /var/lib/corral", "ls /run", "ls /root", "ls /sys/kernel",
                    "ls /home | grep -v agent"]
        script = "".join(f"if {a} 2>/dev/null; then echo 'BROKE: {a}'; fi;" for a in attempts)
        script += ("cat /proc/sys/kernel/ostype; grep -c root /etc/passwd; hostname;"
                   "cat /proc/sys/kernel/hostname")
        r = b.run(script)
        assert "BROKE" not in r.out, r.out
        assert "Linux" in r.out  # positive control: /proc/sys readable
        assert r.out.count(spec.name) == 2, r.out
    assert Path("/proc/sys/kernel/core_pattern").read_text() != "x\n"


def test_host_sources_behind_absolute_symlinks(tmp_path: Path, uniq: str) -> None:
    """Sources are resolved on the host: an absolute symlink in a source path
    must not be resolved against the sandbox's staging root."""
    real = tmp_path / "real-data"
    real.mkdir()
    (real / "f").write_text("through the link\n")
    link = tmp_path / "link"
    link.symlink_to(real)  # absolute target
    home_real = tmp_path / "home-real"
    home_real.mkdir()
    (tmp_path / "home-link").symlink_to(home_real)
    spec = make_spec(tmp_path, uniq, rules=(FsRule("/data", "ro", str(link)),),
                     home=str(tmp_path / "home-link"))
    os.chown(home_real, spec.uid, spec.gid)
    with box(spec) as b:
        r = b.run("cat /data/f; echo mine > ~/x; ls -la /data | grep -c ' -> '")
        assert r.code == 1, r.out  # grep found no symlink: /data is the directory itself
        assert r.out.splitlines() == ["through the link", "0"]
    assert (home_real / "x").read_text() == "mine\n"
