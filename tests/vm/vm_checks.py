"""Checks that run INSIDE the scripts/vm-test VM: systemd as PID 1, cgroup v2.

Not collected by a plain `pytest` run (the file name does not match test_*.py):
scripts/vm/in-vm runs it explicitly inside the VM, where it drives corral
exactly as a user on a systemd host would (systemctl, the corral CLI, ssh).
The checks run in file order and share one daemon; each names what it proves.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pty
import select
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.vm

CGROOT = Path("/sys/fs/cgroup")
UNIT = "/etc/systemd/system/corral.service"


def run(*argv: str, check: bool = True,
        timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run argv, capture text output; on failure the assertion shows both streams."""
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if check and p.returncode != 0:
        pytest.fail(f"{' '.join(argv)} -> rc {p.returncode}\n"
                    f"stdout: {p.stdout}\nstderr: {p.stderr}")
    return p


@pytest.fixture(autouse=True, scope="session")
def _inside_the_vm() -> None:
    """These checks reconfigure systemd units: refuse to run anywhere but the VM."""
    if Path("/etc/hostname").read_text().strip() != "corral-vm":
        pytest.fail("tests/vm/ runs only inside the scripts/vm-test VM (run scripts/vm-test)")


def test_systemd_is_pid1() -> None:
    assert Path("/proc/1/comm").read_text().strip() == "systemd"
    state = run("systemctl", "is-system-running", check=False).stdout.strip()
    # "degraded" would mean a unit failed at boot: name it.
    failed = run("systemctl", "--failed", "--no-legend", "--plain", check=False).stdout
    assert state in ("running", "starting"), f"system {state}; failed units:\n{failed}"


def test_cgroup2_unified_with_controllers() -> None:
    mounts = [line.split() for line in Path("/proc/self/mounts").read_text().splitlines()]
    fstype = {m[1]: m[2] for m in mounts}
    assert fstype.get("/sys/fs/cgroup") == "cgroup2", "not the unified hierarchy"
    assert not any(m[2] == "cgroup" for m in mounts), "a cgroup v1 hierarchy is mounted"
    controllers = set((CGROOT / "cgroup.controllers").read_text().split())
    assert {"cpu", "memory", "pids"} <= controllers, controllers


def test_unit_installed_and_verifies() -> None:
    text = Path(UNIT).read_text()
    assert "@REPO@" not in text, "scripts/install did not substitute the repo path"
    assert "ExecStart=/opt/corral/.venv/bin/corral daemon" in text
    p = run("systemd-analyze", "verify", UNIT, check=False)
    # verify prints warnings for every unit it loads; only ours matter.
    ours = [ln for ln in (p.stdout + p.stderr).splitlines() if "corral" in ln]
    assert p.returncode == 0, p.stdout + p.stderr
    assert not ours, p.stdout + p.stderr


def test_unit_properties() -> None:
    props = dict(
        line.split("=", 1)
        for line in run(
            "systemctl", "show", "corral", "-p",
            "Type,Delegate,KillMode,Restart,OOMScoreAdjust,TasksMax,NotifyAccess",
        ).stdout.splitlines()
    )
    assert props == {
        "Type": "notify", "Delegate": "yes", "KillMode": "process",
        "Restart": "on-failure", "OOMScoreAdjust": "-500",
        "TasksMax": "infinity", "NotifyAccess": "main",
    }, props


def test_tmpfiles_entry() -> None:
    st = os.stat("/run/corral")
    assert grp.getgrgid(st.st_gid).gr_name == "corral"
    assert st.st_mode & 0o777 == 0o750


# --- corral under systemd ----------------------------------------------------

CORRAL = "/usr/local/bin/corral"  # scripts/install's symlink, as users call it
SERVICE_CG = "/system.slice/corral.service"
# Agents live in their own delegated unit, so the daemon's unit can restart.
AGENTS_CG = "/system.slice/corral-agents.service"
AGENT = "vmlim"
PROJECT = Path("/srv/vm-project")
# Small limits so the kernel's enforcement shows quickly even under TCG.
MEMORY = 64 * 1024 * 1024
PIDS = 64
CPUS = 0.2


def corral(*args: str, check: bool = True,
           timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return run(CORRAL, *args, check=check, timeout=timeout)


def cj(*args: str) -> Any:
    return json.loads(corral("--json", *args).stdout)


def systemctl(*args: str, timeout: float = 300) -> None:
    """systemctl ARGS corral...; on failure the message carries the unit's status and journal."""
    p = run("systemctl", *args, check=False, timeout=timeout)
    if p.returncode != 0:
        status = run("systemctl", "status", "--no-pager", "corral", check=False).stdout
        journal = run("journalctl", "-u", "corral", "-n", "40", "--no-pager", check=False).stdout
        pytest.fail(f"systemctl {' '.join(args)} -> rc {p.returncode}: {p.stderr}\n"
                    f"{status}\n--- journal ---\n{journal}")


def main_pid() -> int:
    return int(run("systemctl", "show", "-p", "MainPID", "--value", "corral").stdout)


def unit_prop(name: str) -> str:
    return run("systemctl", "show", "-p", name, "--value", "corral").stdout.strip()


def cgroup_of(pid: int) -> str:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:]
    raise AssertionError(f"pid {pid} has no cgroup v2 line")


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def wait_for(what: str, pred: Any, timeout: float = 120) -> Any:
    """Poll pred() until it returns something truthy; fail naming `what`."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = pred()
        except (OSError, subprocess.SubprocessError, ValueError, KeyError) as e:
            last = e
        else:
            if last:
                return last
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what} (last: {last!r})")


def inspect(name: str = AGENT) -> dict[str, Any]:
    info: dict[str, Any] = cj("inspect", name)
    return info


def ensure_daemon() -> None:
    """Start corral if an earlier check left it down, so each check fails for its own
    reason (a unit that cannot start fails here with systemd's message)."""
    if unit_prop("ActiveState") != "active":
        run("systemctl", "reset-failed", "corral", check=False)
        systemctl("start", "corral")


def running_agent() -> dict[str, Any]:
    ensure_daemon()

    def ready() -> dict[str, Any] | None:
        info = inspect()
        return info if info["state"] == "running" and info["session"]["pid"] else None

    info: dict[str, Any] = wait_for(f"{AGENT} running", ready)
    return info


def kv(path: Path) -> dict[str, int]:
    return {k: int(v) for k, v in (ln.split() for ln in path.read_text().splitlines())}


def agent_cg() -> Path:
    ensure_daemon()
    return Path(inspect()["cgroup"])


def daemon_healthy(expect_pid: int | None = None) -> None:
    assert unit_prop("ActiveState") == "active"
    if expect_pid is not None:
        assert main_pid() == expect_pid, "the daemon was restarted"
    assert cj("status")["cgroup_driver"] == "v2"


def test_systemctl_start_returns_when_ready() -> None:
    systemctl("start", "corral")
    # Type=notify: start returns only after READY=1, so the CLI works at once.
    st = corral("--json", "status", timeout=60)
    assert st.returncode == 0, st.stderr
    assert unit_prop("ActiveState") == "active"
    assert "serving" in unit_prop("StatusText")


def test_status_names_cgroup_v2() -> None:
    st = cj("status")
    assert st["cgroup_driver"] == "v2", st
    assert "v2" in corral("status").stdout


def in_supervisor_leaf(pid: int) -> bool:
    """The daemon stays in its own unit's cgroup, which never holds agents."""
    return cgroup_of(pid) == SERVICE_CG


def test_daemon_runs_in_its_supervisor_leaf() -> None:
    # The daemon's unit is a plain leaf (systemd can always start it again);
    # the agents' unit holds no process at its top (no-internal-processes rule).
    assert in_supervisor_leaf(main_pid()), cgroup_of(main_pid())
    assert (CGROOT / AGENTS_CG.lstrip("/") / "cgroup.procs").read_text() == ""


def test_create_agent_with_limits() -> None:
    PROJECT.mkdir(parents=True, exist_ok=True)
    (PROJECT / "README.md").write_text("vm-test project\n")
    corral("create", AGENT, "--template", "default", "--project", str(PROJECT),
           "--set", f"resources.memory={MEMORY}", "--set", f"resources.pids={PIDS}",
           "--set", f"resources.cpus={CPUS}")
    info = running_agent()
    assert info["limits"]["memory_bytes"] == MEMORY
    assert info["limits"]["pids"] == PIDS


def test_agent_cgroup_has_the_limits() -> None:
    cg = agent_cg()
    assert str(cg).startswith(f"/sys/fs/cgroup{AGENTS_CG}/"), cg
    assert int((cg / "memory.max").read_text()) == MEMORY
    assert (cg / "memory.swap.max").read_text().strip() == "0"
    assert int((cg / "pids.max").read_text()) == PIDS
    quota, period = (cg / "cpu.max").read_text().split()
    assert int(quota) == int(CPUS * int(period)), (quota, period)
    # weight follows the CPUs allowed (100 per CPU); corral's cgroups above it
    # weigh the machine's CPUs, and its base the sum of its subtrees (here the
    # agents and the keepers: the daemon runs in its own unit)
    machine = 100 * len(os.sched_getaffinity(0))
    assert int((cg / "cpu.weight").read_text()) == round(100 * CPUS)
    assert int((cg.parent / "cpu.weight").read_text()) == machine
    base = cg.parent.parent
    subs = {c.name: int((c / "cpu.weight").read_text()) for c in base.iterdir() if c.is_dir()}
    assert subs == {"agents": machine, "keepers": machine}, subs
    assert int((base / "cpu.weight").read_text()) == min(10000, sum(subs.values())), subs


def test_corral_cgroups_only_inside_its_delegated_subtree() -> None:
    info = inspect()
    inside = f"{AGENTS_CG}/"
    for pid in (info["session"]["pid"], info["session"]["keeper_pid"]):
        assert cgroup_of(pid).startswith(inside), (pid, cgroup_of(pid))
    strays = []
    for d, dirs, _ in os.walk(CGROOT):
        rel = d[len(str(CGROOT)):]
        if rel in (SERVICE_CG, AGENTS_CG) or rel.startswith(AGENTS_CG + "/"):
            dirs.clear()
            continue
        if "corral" in rel.split("/")[-1] or AGENT in rel:
            strays.append(rel)
    assert not strays, f"corral cgroups outside {AGENTS_CG}: {strays}"


def test_memory_max_oom_kills_inside_the_agent_only() -> None:
    cg = agent_cg()
    before = kv(cg / "memory.events")["oom_kill"]
    pid = main_pid()
    session = inspect()["session"]["pid"]
    p = corral("exec", AGENT, "--", "python3", "-c",
               "b = bytearray(256 * 1024 * 1024); print('survived')", check=False)
    assert p.returncode != 0, (p.returncode, p.stdout)
    assert "survived" not in p.stdout
    assert kv(cg / "memory.events")["oom_kill"] > before
    # Positive control: a small allocation in the same agent is fine.
    ok = corral("exec", AGENT, "--", "python3", "-c",
                "b = bytearray(8 * 1024 * 1024); print('small ok')")
    assert "small ok" in ok.stdout
    daemon_healthy(pid)
    assert alive(session)
    assert inspect()["state"] == "running"


def test_our_helpers_in_the_agent_cgroup_are_not_oom_victims() -> None:
    """init and `exec`'s waiter are forks of big Python processes (the daemon
    is ~80 MB, above this agent's 64 MB limit) living in the agent's cgroup:
    the OOM killer must not pick them (the sandbox, or the command's exit
    status, would be lost), only the agent's own process."""
    info = inspect()
    init = info["session"]["pid"]
    assert Path(f"/proc/{init}/oom_score_adj").read_text().strip() == "-1000"
    cg = agent_cg()
    sleeper = subprocess.Popen([CORRAL, "exec", AGENT, "--", "sleep", "37"])
    try:
        def find() -> int | None:
            for pid in (cg / "cgroup.procs").read_text().split():
                with contextlib.suppress(OSError):
                    if Path(f"/proc/{pid}/cmdline").read_bytes() == b"sleep\x0037\x00":
                        return int(pid)
            return None
        sleep_pid = wait_for("the exec'd sleep", find, timeout=60)
        waiter = int(Path(f"/proc/{sleep_pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        assert Path(f"/proc/{waiter}/oom_score_adj").read_text().strip() == "-1000"
        assert Path(f"/proc/{sleep_pid}/oom_score_adj").read_text().strip() == "0"
    finally:
        sleeper.kill()
        sleeper.wait(30)
    before = kv(cg / "memory.events")["oom_kill"]
    p = corral("exec", AGENT, "--", "sh", "-c",
               "python3 -c 'b = []\nwhile True: b.append(b\"x\" * (4 << 20))'; echo rc=$?")
    assert "rc=137" in p.stdout, p.stdout  # the bomb got SIGKILL, its shell and waiter did not
    assert kv(cg / "memory.events")["oom_kill"] > before
    assert alive(init)


FORKER = """
import os, time
kids = []
err = None
try:
    while len(kids) < 1000:
        pid = os.fork()
        if pid == 0:
            time.sleep(60)
            os._exit(0)
        kids.append(pid)
except OSError as e:
    err = e.errno
for k in kids:
    os.kill(k, 9)
for k in kids:
    os.waitpid(k, 0)
print("forked", len(kids), "errno", err)
"""


def test_pids_max_stops_a_fork_bomb() -> None:
    cg = agent_cg()
    before = kv(cg / "pids.events")["max"]
    pid = main_pid()
    p = corral("exec", AGENT, "--", "python3", "-c", FORKER)
    words = p.stdout.split()
    forked, errno_ = int(words[1]), words[3]
    assert forked < PIDS, p.stdout
    assert errno_ == "11", p.stdout  # EAGAIN from the pids controller
    assert kv(cg / "pids.events")["max"] > before
    daemon_healthy(pid)


def test_cpu_max_throttles() -> None:
    cg = agent_cg()
    before = kv(cg / "cpu.stat")["nr_throttled"]
    corral("exec", AGENT, "--", "python3", "-c",
           "import time\nt = time.monotonic()\nwhile time.monotonic() - t < 3: pass")
    stat = kv(cg / "cpu.stat")
    assert stat["nr_throttled"] > before, stat
    assert stat["throttled_usec"] > 0, stat


def test_ssh_exec_and_attach() -> None:
    key = Path("/root/.ssh/vmtest")
    key.parent.mkdir(mode=0o700, exist_ok=True)
    if not key.exists():
        run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key))
    corral("user", "add", "vmuser", "--key", f"{key}.pub")
    corral("grant", AGENT, "vmuser", "--role", "collaborator")
    ssh = ["ssh", "-p", "2222", "-i", str(key), "-o", "BatchMode=yes",
           "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
           "-o", "LogLevel=ERROR", f"{AGENT}@localhost"]
    p = run(*ssh, "echo via-ssh-$((6*7))", timeout=120)
    assert "via-ssh-42" in p.stdout
    # Attach: a real terminal on the agent's session; what we type runs there.
    pid, fd = pty.fork()
    if pid == 0:
        os.execvp("ssh", ["ssh", "-tt", *ssh[1:]])  # noqa: S606 - fixed argv, no shell
    try:
        out = b""
        os.write(fd, b"echo attached-$((6*7))\r")
        deadline = time.monotonic() + 120
        while b"attached-42" not in out and time.monotonic() < deadline:
            r, _, _ = select.select([fd], [], [], 1)
            if r:
                try:
                    out += os.read(fd, 4096)
                except OSError:
                    break
        assert b"attached-42" in out, out[-2000:]
    finally:
        os.kill(pid, signal.SIGTERM)
        os.waitpid(pid, 0)
        os.close(fd)
    assert alive(inspect()["session"]["pid"]), "detaching must leave the agent running"


def test_restart_keeps_agents_and_sessions() -> None:
    info = running_agent()
    old = main_pid()
    systemctl("restart", "corral")
    new = main_pid()
    assert new != old
    assert unit_prop("ActiveState") == "active"
    after = running_agent()
    assert after["session"]["pid"] == info["session"]["pid"]
    assert after["session"]["keeper_pid"] == info["session"]["keeper_pid"]
    assert in_supervisor_leaf(new), cgroup_of(new)
    assert "again" in corral("exec", AGENT, "--", "echo", "again").stdout


def test_stop_leaves_agents_running() -> None:
    info = running_agent()
    systemctl("stop", "corral")
    assert unit_prop("ActiveState") in ("inactive", "failed")
    # KillMode=process: only the daemon got SIGTERM; the keeper and the
    # session go on (the documented policy: agents outlive the daemon).
    assert alive(info["session"]["pid"])
    assert alive(info["session"]["keeper_pid"])
    down = corral("status", check=False)
    assert down.returncode == 1, down
    assert down.stderr.startswith("corral: error:"), down
    systemctl("start", "corral")
    after = running_agent()
    assert after["session"]["pid"] == info["session"]["pid"]


def test_sigkill_crash_is_restarted_with_nothing_lost() -> None:
    info = running_agent()
    old = main_pid()
    restarts = int(unit_prop("NRestarts"))
    # A crash of the daemon alone: --kill-whom=main (plain `systemctl kill`
    # signals every process in the unit's cgroup, agents included).
    systemctl("kill", "-s", "KILL", "--kill-whom=main", "corral")
    wait_for("systemd to restart corral",
             lambda: unit_prop("ActiveState") == "active" and main_pid() not in (0, old),
             timeout=240)
    assert int(unit_prop("NRestarts")) == restarts + 1
    after = running_agent()
    assert after["session"]["pid"] == info["session"]["pid"]
    assert cj("status")["cgroup_driver"] == "v2"


def test_rm_releases_the_cgroup() -> None:
    cg = agent_cg()
    corral("rm", "--force", AGENT)
    wait_for("the agent cgroup to go", lambda: not cg.exists())
    daemon_healthy()


def test_daemon_journal_has_no_tracebacks() -> None:
    journal = run("journalctl", "-u", "corral", "--no-pager", "-o", "cat").stdout
    assert "Traceback" not in journal, journal[-4000:]
