"""End-to-end fixtures: a real daemon started as users start it (a process with
a config file), driven only through the `corral` CLI and SSH.

Every daemon gets its own state_dir, run_dir, API socket, SSH port, subnet
(from 198.18.0.0/15), port range and uid range, so tests never collide with
each other or with a daemon a developer runs. Teardown removes agents through
the CLI, stops the daemon, then checks for and removes anything left behind
that carries the daemon's scope (keepers by cgroup, cgroups, nft table,
netns files, mounts, veths).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = str(Path(__file__).resolve().parents[2])
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

REPO = Path(__file__).resolve().parents[2]
CORRAL = str(REPO / ".venv" / "bin" / "corral")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scope_bases(scope: str) -> list[Path]:
    """The cgroup dirs a daemon of `scope` started by this process roots its agents in."""
    from sandbox.cgroups import cgroup_mounts
    from sandbox.cgroups.base import read_proc_cgroup
    own = read_proc_cgroup("self")
    v2, v1 = cgroup_mounts()
    out = []
    for ctrl, mnt in v1.items():
        if ctrl in own:
            out.append(Path(mnt + own[ctrl].rstrip("/"), f"corral-{scope}"))
    if v2 is not None and "" in own:
        out.append(Path(v2 + own[""].rstrip("/"), f"corral-{scope}"))
    return [p for p in out if p.is_dir()]


def _subdirs(base: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, _ in os.walk(base):
        found.extend(Path(dirpath, d) for d in dirnames)
    return sorted(found, key=lambda p: -len(str(p)))


def scope_of(state_dir: str) -> str:
    return hashlib.sha256(os.path.realpath(state_dir).encode()).hexdigest()[:6]


@dataclass
class Daemon:
    config_path: str
    state_dir: str
    run_dir: str
    socket: str
    ssh_port: int
    subnet: str
    ports: tuple[int, int]
    proc: subprocess.Popen[bytes] | None = None
    log_path: str = ""
    created: list[str] = field(default_factory=list)
    env_extra: dict[str, str] = field(default_factory=dict)

    @property
    def scope(self) -> str:
        return scope_of(self.state_dir)

    def cli(self, *args: str, input: bytes | None = None, timeout: float = 120,
            check: bool = False) -> subprocess.CompletedProcess[str]:
        cp = subprocess.run([CORRAL, "--socket", self.socket, *args], input=input.decode()
                            if input is not None else None, capture_output=True, text=True,
                            timeout=timeout)
        if check and cp.returncode != 0:
            raise AssertionError(f"corral {' '.join(args)} failed ({cp.returncode}):\n"
                                 f"{cp.stdout}\n{cp.stderr}\n--- daemon log ---\n{self.log()}")
        return cp

    def json(self, *args: str, timeout: float = 120) -> Any:
        cp = self.cli("--json", *args, timeout=timeout, check=True)
        return json.loads(cp.stdout)

    def log(self) -> str:
        try:
            return Path(self.log_path).read_text()[-6000:]
        except OSError:
            return ""

    def start(self, extra_env: dict[str, str] | None = None, wait: bool = True) -> None:
        env = dict(os.environ)
        env.update(self.env_extra)
        env.update(extra_env or {})
        env["CORRAL_LOG_LEVEL"] = "DEBUG"
        logf = open(self.log_path, "ab")  # noqa: SIM115 - the daemon owns it
        self.proc = subprocess.Popen([CORRAL, "daemon", "--config", self.config_path],
                                     stdout=logf, stderr=logf, env=env,
                                     start_new_session=True)
        logf.close()
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.log()}")
            if os.path.exists(self.socket):
                cp = self.cli("status", timeout=20)
                if cp.returncode == 0:
                    return
            time.sleep(0.1)
        raise AssertionError(f"daemon not ready in {timeout}s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        if self.proc is None:
            return None
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(10)
        self.proc = None
        return code

    def wait_state(self, name: str, states: tuple[str, ...], timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            cp = self.cli("--json", "inspect", name)
            if cp.returncode == 0:
                last = json.loads(cp.stdout)
                if last["state"] in states:
                    return last
            time.sleep(0.2)
        raise AssertionError(f"{name} never reached {states}: {last}\n{self.log()}")

    def create(self, name: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        self.created.append(name)
        return self.cli("create", name, *args, check=check)

    # --- leak checks -----------------------------------------------------------
    def leftovers(self) -> dict[str, list[str]]:
        """Everything of this daemon's scope that still exists on the host."""
        out: dict[str, list[str]] = {}
        mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
                  if self.run_dir in line.split()[4] or self.state_dir in line.split()[4]]
        if mounts:
            out["mounts"] = mounts
        cgs = [str(sub) for base in scope_bases(self.scope) for sub in _subdirs(base)
               if sub.parent != base]
        if cgs:
            out["cgroups"] = cgs
        nft = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
        if f"corral_{self.scope}" in nft:
            # the table itself may stay while the daemon lives; agent chains may not
            chains = subprocess.run(["nft", "list", "table", "inet", f"corral_{self.scope}"],
                                    capture_output=True, text=True).stdout
            agent_chains = [ln.strip() for ln in chains.splitlines()
                            if ln.strip().startswith("chain a_")]
            if agent_chains:
                out["nft"] = agent_chains
        netns_dir = Path(self.run_dir, "netns")
        if netns_dir.is_dir() and any(netns_dir.iterdir()):
            out["netns"] = [str(p) for p in netns_dir.iterdir()]
        return out


def _hard_cleanup(d: Daemon) -> None:
    """Remove whatever a failed test left behind, exactly by this daemon's scope."""
    scope = d.scope
    # keepers and sandboxes: every process in our cgroups
    bases = scope_bases(scope)
    for base in bases:
        for sub in [base, *_subdirs(base)]:
            with contextlib.suppress(OSError):
                for pid in (sub / "cgroup.procs").read_text().split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
    time.sleep(0.3)
    for base in bases:
        for sub in _subdirs(base):
            with contextlib.suppress(OSError):
                sub.rmdir()
        with contextlib.suppress(OSError):
            base.rmdir()
    # through nft.drop_table: it also turns a guarded uplink's forwarding back off
    from sandbox import nft
    with contextlib.suppress(Exception):
        nft.drop_table(scope)
    for line in reversed(Path("/proc/self/mountinfo").read_text().splitlines()):
        mnt = line.split()[4]
        if mnt.startswith((d.run_dir, d.state_dir)):
            subprocess.run(["umount", "-l", mnt], capture_output=True)
    # veths of this scope: names derive from the scope, check through the netns module
    try:
        sys.path.insert(0, str(REPO))
        from sandbox.netns import veth_name
        for name in d.created:
            v = veth_name(scope, name)
            if Path("/sys/class/net", v).exists():
                subprocess.run(["ip", "link", "del", v], capture_output=True)
    except Exception:
        pass
    claims = Path("/run/corral-ports")
    if claims.is_dir():
        for f in claims.iterdir():
            with contextlib.suppress(OSError):
                if f.read_text().startswith(scope + " "):
                    f.unlink()
    shutil.rmtree(d.run_dir, ignore_errors=True)


_SUBNETS_GIVEN: set[object] = set()


def make_daemon(tmp_path: Path, uniq: str, extra: str = "") -> Daemon:
    state = tmp_path / "state"
    run = Path(f"/tmp/crt-{uniq}")
    run.mkdir(mode=0o755)
    tdir = tmp_path / "templates"
    tdir.mkdir(exist_ok=True)
    ssh_port = free_port()
    # A /24 nothing on the host routes yet; remembered, so two daemons of one
    # test run (whose agents may not exist yet) never get the same one.
    import ipaddress

    from tests.integration.networld import free_subnet
    while True:
        cand = free_subnet(ipaddress.ip_network("198.19.0.0/16"), 24)
        if cand not in _SUBNETS_GIVEN:
            _SUBNETS_GIVEN.add(cand)
            break
    subnet = str(cand)
    plo = random.randrange(30000, 39000, 100)
    ulo = random.randrange(300000, 900000, 1000)
    cfg = tmp_path / "corral.yaml"
    cfg.write_text(
        f"state_dir: {state}\n"
        f"run_dir: {run}\n"
        f"api_socket: {run}/corral.sock\n"
        f"ssh: {{listen: \"127.0.0.1:{ssh_port}\"}}\n"
        f"network: {{subnet: {subnet}}}\n"
        f"ports: {{range: \"{plo}-{plo + 99}\"}}\n"
        f"uids: {{range: \"{ulo}-{ulo + 999}\"}}\n"
        f"templates: [{tdir}, {REPO / 'templates'}]\n"
        f"stop_timeout: 5\n" + extra)
    return Daemon(str(cfg), str(state), str(run), f"{run}/corral.sock", ssh_port, subnet,
                  (plo, plo + 99), log_path=str(tmp_path / "daemon.log"))


@pytest.fixture
def daemon_factory(tmp_path: Path, uniq: str, need_root: None) -> Iterator[Any]:
    made: list[Daemon] = []

    def factory(sub: str = "d1", start: bool = True, extra: str = "") -> Daemon:
        base = tmp_path / sub
        base.mkdir()
        d = make_daemon(base, f"{uniq}{sub}", extra)
        made.append(d)
        if start:
            d.start()
        return d

    try:
        yield factory
    finally:
        for d in made:
            if d.proc is None and d.created:
                with contextlib.suppress(Exception):
                    d.start()
            if d.proc is not None:
                for name in d.created:
                    with contextlib.suppress(Exception):
                        d.cli("rm", "--force", name, timeout=60)
                d.stop()
            _hard_cleanup(d)


@pytest.fixture
def daemon(daemon_factory: Any) -> Daemon:
    d: Daemon = daemon_factory()
    return d


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A small git project, owned by root, with one commit."""
    p = tmp_path / "project"
    p.mkdir()
    (p / "README.md").write_text("hello from the project\n")
    (p / "app.py").write_text("print('hi')\n")
    subprocess.run(["git", "init", "-q", "-b", "main", str(p)], check=True)
    subprocess.run(["git", "-C", str(p), "add", "-A"], check=True)
    subprocess.run(["git", "-C", str(p), "-c", "user.email=t@example.invalid", "-c",
                    "user.name=t", "commit", "-qm", "init"], check=True)
    return p
