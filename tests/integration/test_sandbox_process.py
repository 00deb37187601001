"""THREATS.md, processes: privileges, visibility, fds, cwd, hostname, enter, errors."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from sandbox import process
from sandbox.errors import HostSetupError, KernelError, NotFound
from sandbox.spec import FsRule
from tests.integration.sandbox_kit import Box, box, make_spec

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("need_root")]

STATUS = "grep -E '^(Cap|NoNewPrivs|Uid|Gid|Groups)' /proc/self/status"


def _check_status(out: str, uid: int) -> None:
    lines = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(lines[cap].strip(), 16) == 0, out
    assert lines["NoNewPrivs"].strip() == "1", out
    assert lines["Uid"].split() == [str(uid)] * 4, out
    assert lines["Groups"].strip() == "", out


def test_workload_has_no_privileges_own_identity(tmp_path: Path, uniq: str) -> None:
    spec = make_spec(tmp_path, uniq)
    with box(spec) as b:
        r = b.run(f"{STATUS}; echo cwd=$(pwd); echo host=$(hostname); echo me=$(id -un);"
                  "echo init=$(cat /proc/1/cmdline | tr '\\0' ' '); env | sort")
        assert r.code == 0, r.out
        _check_status(r.out, spec.uid)
        assert "cwd=/workspace" in r.out
        assert f"host={spec.name}" in r.out
        assert "me=agent" in r.out  # the agent's uid has a name in /etc/passwd
        assert "init=corral-init" in r.out  # not the caller's command line
        env = dict(line.split("=", 1) for line in r.out.splitlines()
                   if "=" in line and not line.startswith(("cwd", "host", "me=", "init=")))
        assert env["HOME"] == "/home/agent"
        assert env["CORRAL_AGENT"] == spec.name
        assert set(env) <= {"HOME", "PATH", "USER", "LOGNAME", "CORRAL_AGENT", "PWD"}, env
        # positive control for the capability check: the test itself has them
        with open("/proc/self/status") as f:
            assert any(line.startswith("CapEff:") and int(line.split()[1], 16) != 0
                       for line in f)


def _workload_pids(b: Box, exclude: set[int]) -> list[int]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        pids = [p for p in b.cg.procs(b.spec.cgroup) if p not in exclude]
        if pids:
            return pids
        time.sleep(0.02)
    raise AssertionError("no workload process appeared")


def test_only_own_processes_visible_and_no_leaked_fds(tmp_path: Path, uniq: str) -> None:
    spec = make_spec(tmp_path, uniq)
    leak = os.open("/etc/hostname", os.O_RDONLY)  # inheritable, not CLOEXEC
    os.set_inheritable(leak, True)
    try:
        with box(spec) as b:
            r = b.run("ls /proc | grep -E '^[0-9]+$' | sort -n | tr '\\n' ' '; echo;"
                      "kill -0 1 && echo init-visible; ls /proc/1/fd 2>&1 | grep -c denied")
            pids_line, *rest = r.out.splitlines()
            pids = [int(p) for p in pids_line.split()]
            # init (1), sh, ls, grep, sort, tr: nothing of the host
            assert pids[0] == 1, r.out
            assert max(pids) < 20, r.out
            assert "init-visible" in rest  # positive control: own processes are there
            assert rest[-1] == "1"  # init's fds are not the agent's to look at
            # from the host: the workload (start and enter) holds exactly 0, 1, 2
            st = b.start("/bin/sleep", "1000")
            (sleeper,) = _workload_pids(b, {st.init_pid})
            assert sorted(os.listdir(f"/proc/{sleeper}/fd")) == ["0", "1", "2"]
            assert os.readlink(f"/proc/{sleeper}/cwd") == "/workspace"
            null = os.open("/dev/null", os.O_RDWR)
            try:
                helper = process.enter(spec, st.init_pid, ["/bin/sleep", "1000"],
                                       env={}, cwd="/tmp", stdin=null, stdout=null,
                                       stderr=null)
            finally:
                os.close(null)
            try:
                entered = [p for p in _workload_pids(b, {st.init_pid, sleeper, helper})
                           if p != helper]
                deadline = time.monotonic() + 30
                while not entered and time.monotonic() < deadline:
                    entered = [p for p in _workload_pids(b, {st.init_pid, sleeper, helper})]
                (e,) = entered
                assert sorted(os.listdir(f"/proc/{e}/fd")) == ["0", "1", "2"]
                assert os.readlink(f"/proc/{e}/cwd") == "/tmp"
                # positive control: the leak is real in an ordinary child of the test
                assert str(leak) in os.listdir("/proc/self/fd")
            finally:
                os.kill(helper, signal.SIGKILL)
                os.waitpid(helper, 0)
    finally:
        os.close(leak)


def test_enter_joins_the_sandbox_with_the_same_drop(tmp_path: Path, uniq: str) -> None:
    spec = make_spec(tmp_path, uniq)
    with box(spec) as b:
        st = b.start()
        r = b.exec(f"{STATUS}; hostname; pwd; ls /proc | grep -cE '^[0-9]+$'; "
                   "echo made > /workspace/by-exec; ls /proc/self/fd | tr '\\n' ' '")
        assert r.code == 0, r.out
        _check_status(r.out, spec.uid)
        assert spec.name in r.out
        assert "/workspace" in r.out
        assert (Path(spec.state_dir) / "upper" / "by-exec").read_text() == "made\n"
        # exit codes and signals come back through the helper
        assert b.exec("exit 7").code == 7
        assert b.exec("kill -TERM $$").code == -signal.SIGTERM
        # the helper (and so the command) is in the sandbox's cgroup
        r, w = os.pipe()
        pid = process.enter(spec, st.init_pid, ["/bin/sleep", "30"], env={}, cwd="/",
                            stdin=r, stdout=w, stderr=w)
        try:
            deadline = time.monotonic() + 30
            while pid not in b.cg.procs(spec.cgroup) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert pid in b.cg.procs(spec.cgroup)
            assert os.getpid() not in b.cg.procs(spec.cgroup)
        finally:
            os.kill(pid, signal.SIGTERM)
            _, status = os.waitpid(pid, 0)
            os.close(r)
            os.close(w)
        assert os.waitstatus_to_exitcode(status) == -signal.SIGTERM
        with pytest.raises(KernelError, match="chdir"):
            b.exec("true", cwd="/nonexistent")
        with pytest.raises(NotFound):
            process.enter(spec, os.getpid(), ["true"], env={}, cwd="/", stdin=0, stdout=1,
                          stderr=2)


def test_start_errors_are_typed_and_name_the_step(tmp_path: Path, uniq: str) -> None:
    spec = make_spec(tmp_path, uniq)
    with box(spec) as b:
        with pytest.raises(KernelError, match="execve") as ei:
            b.start("/no/such/binary")
        assert "ENOENT" in str(ei.value)
        assert b.cg.procs(spec.cgroup) == []  # init was reaped, nothing left behind
        b.started = None
        # a mount failure (before the cgroup move completes) is reported as such
        with pytest.raises(HostSetupError, match="does not exist") as hi:
            b.run("true", rules=(FsRule("/data", "ro", "/nonexistent/source"),))
        assert "step: mounts" in str(hi.value)
        assert b.cg.procs(spec.cgroup) == []
        # positive control: the same sandbox starts fine with a real command
        assert b.run("echo fine").out == "fine\n"


def test_init_forwards_sigterm_and_reaps(tmp_path: Path, uniq: str) -> None:
    spec = make_spec(tmp_path, uniq)
    with box(spec) as b:
        st = b.start("/bin/sh", "-c", "trap 'exit 42' TERM; sleep 100 & sleep 100 & "
                     "while :; do sleep 0.1; done")
        deadline = time.monotonic() + 30
        while len(b.cg.procs(spec.cgroup)) < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(st.init_pid, signal.SIGTERM)
        _, status = os.waitpid(st.init_pid, 0)
        b.started = None
        assert os.waitstatus_to_exitcode(status) == 42
        deadline = time.monotonic() + 30
        while b.cg.procs(spec.cgroup) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert b.cg.procs(spec.cgroup) == []  # the orphans died with the pid namespace


def test_netns_has_only_lo_and_eth0(tmp_path: Path, uniq: str) -> None:
    spec = make_spec(tmp_path, uniq, net=True)
    assert spec.network is not None
    with box(spec) as b:
        r = b.run("tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | sort | tr '\\n' ' ';"
                  "echo; ip -o -4 addr show dev eth0; ip route")
        assert r.code == 0, r.out
        assert r.out.splitlines()[0].split() == ["eth0", "lo"], r.out
        assert spec.network.address in r.out  # positive control: our address is there
        assert Path(f"/sys/class/net/{spec.network.veth_host}").exists()


CLONE_NEWUSER_PY = (
    "import ctypes, os\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "r = libc.syscall(56, 0x10000000 | 17, 0, 0, 0, 0)\n"  # clone(CLONE_NEWUSER|SIGCHLD)
    "if r == 0: os._exit(0)\n"
    "print('clone', r, ctypes.get_errno())\n"
    "r = libc.syscall(56, 17, 0, 0, 0, 0)\n"  # positive control: a plain fork-like clone
    "if r == 0: os._exit(0)\n"
    "os.waitpid(r, 0); print('plain clone ok', r > 0)\n"
)


def test_no_nested_user_namespaces(tmp_path: Path, uniq: str) -> None:
    spec = make_spec(tmp_path, uniq)
    with box(spec) as b:
        r = b.run("unshare -U true && echo BROKE-unshare; unshare -Urm true && echo BROKE-m;"
                  f"python3 -c \"{CLONE_NEWUSER_PY}\"; grep Seccomp: /proc/self/status")
        assert "BROKE" not in r.out, r.out
        assert "clone -1 1\n" in r.out, r.out  # EPERM
        assert "plain clone ok True" in r.out, r.out
        assert "Seccomp:\t2" in r.out
    # positive control: the same command works outside a sandbox
    import subprocess

    assert subprocess.run(["unshare", "-U", "true"], check=False).returncode == 0


def test_no_terminal_injection(tmp_path: Path, uniq: str) -> None:
    spec = make_spec(tmp_path, uniq)
    with box(spec) as b:
        st = b.start()
        master, slave = os.openpty()
        try:
            pid = process.enter(
                spec, st.init_pid,
                ["/usr/bin/python3", "-c",
                 "import fcntl, termios, struct\n"
                 "print('winsz', len(fcntl.ioctl(0, termios.TIOCGWINSZ, b'0' * 8)))\n"
                 "for name in ('TIOCSTI', 'TIOCLINUX'):\n"
                 "    try:\n"
                 "        fcntl.ioctl(0, getattr(termios, name, 0x541C), b'x')\n"
                 "        print('BROKE', name)\n"
                 "    except OSError as e:\n"
                 "        print(name, e.errno)\n"],
                env={"PATH": "/usr/bin:/bin"}, cwd="/", stdin=slave, stdout=slave,
                stderr=slave, ctty=True)
            os.close(slave)
            slave = -1
            out = b""
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # EIO: the last slave user is gone
                    break
                if not chunk:
                    break
                out += chunk
            _, status = os.waitpid(pid, 0)
        finally:
            os.close(master)
            if slave >= 0:
                os.close(slave)
        text = out.decode()
        assert os.waitstatus_to_exitcode(status) == 0, text
        assert "winsz 8" in text  # positive control: an ordinary tty ioctl works
        assert "BROKE" not in text
        assert "TIOCSTI 1" in text, text
        assert "TIOCLINUX 1" in text, text


def test_enter_from_worker_threads_of_an_asyncio_daemon(tmp_path: Path, uniq: str) -> None:
    """The daemon calls enter from executor threads while its loop runs."""
    import asyncio

    spec = make_spec(tmp_path, uniq)
    with box(spec) as b:
        b.start()

        async def main() -> list[str]:
            loop = asyncio.get_running_loop()
            runs = await asyncio.gather(*[
                loop.run_in_executor(None, b.exec, f"echo run-{i} $(id -u) $(hostname)")
                for i in range(6)])
            return [r.out for r in runs]

        outs = asyncio.run(main())
        assert outs == [f"run-{i} {spec.uid} {spec.name}\n" for i in range(6)]
