"""Helpers for the sandbox integration tests: build a spec in a temp dir, run
real sandboxes, always release them (even when the test fails)."""

from __future__ import annotations

import os
import secrets
import select
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sandbox import cgroups, lifecycle, netns, process
from sandbox.spec import FsRule, Limits, Network, SandboxSpec, Workspace

PROJECT_UID = 1000  # the project's owner on disk (not the sandbox's uid)
TIMEOUT = 60.0


def random_uid() -> int:
    return 200000 + secrets.randbelow(65535 - 1000)


def subnet() -> tuple[str, str]:
    """A random /30 in 198.18.0.0/15."""
    n = secrets.randbelow(1 << 15) * 4
    base = (198 << 24) | (18 << 16) | n

    def a(i: int) -> str:
        return ".".join(str((base + i) >> s & 255) for s in (24, 16, 8, 0))

    return f"{a(2)}/30", f"{a(1)}/30"


def make_project(root: Path) -> Path:
    proj = root / "project"
    (proj / "src").mkdir(parents=True)
    (proj / "README").write_text("project readme\n")
    (proj / "src" / "main.py").write_text("print('hi')\n")
    (proj / "secrets").mkdir()
    (proj / "secrets" / "token").write_text("TOPSECRET-project\n")
    (proj / ".env").write_text("API_KEY=TOPSECRET-env\n")
    for p in [proj, *proj.rglob("*")]:
        os.lchown(p, PROJECT_UID, PROJECT_UID)
    return proj


def make_spec(tmp_path: Path, uniq: str, *, net: bool = False, command: tuple[str, ...] = (),
              **kw: Any) -> SandboxSpec:
    uid = random_uid()
    ws = kw.pop("workspace", None)
    if ws is None:
        ws = Workspace(mode="overlay", project=str(make_project(tmp_path)))
    network = None
    if net:
        address, gateway = subnet()
        network = Network(netns_path=str(tmp_path / "netns"),
                          veth_host=netns.veth_name(uniq, "sb"), address=address,
                          gateway=gateway)
    return SandboxSpec(name=f"{uniq}-sb", uid=uid, gid=uid, state_dir=str(tmp_path / "state"),
                       run_dir=str(tmp_path / "run"), cgroup=f"{uniq}-sb",
                       command=command or ("/bin/true",), workspace=ws,
                       home=kw.pop("home", str(tmp_path / "state" / "home")), network=network,
                       limits=kw.pop("limits", Limits(pids=256, memory_bytes=512 << 20)), **kw)


@dataclass
class Run:
    code: int
    out: str


def _wait(pid: int, timeout: float = TIMEOUT) -> int:
    deadline = time.monotonic() + timeout
    while True:
        got, status = os.waitpid(pid, os.WNOHANG)
        if got:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise TimeoutError(f"process {pid} did not finish in {timeout}s")
        time.sleep(0.01)


def _collect(fd: int, pid: int, timeout: float = TIMEOUT) -> tuple[int, str]:
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r, _, _ = select.select([fd], [], [], 0.2)
        if r:
            b = os.read(fd, 65536)
            if not b:
                break
            chunks.append(b)
    os.close(fd)
    return _wait(pid, max(1.0, deadline - time.monotonic())), b"".join(chunks).decode(
        errors="replace")


class Box:
    """A prepared sandbox: start it, enter it, release it."""

    def __init__(self, spec: SandboxSpec) -> None:
        self.spec = spec
        self.cg = cgroups.detect()
        self.started: process.Started | None = None

    def prepare(self) -> None:
        lifecycle.prepare(self.spec, self.cg)

    def run(self, script: str, **spec_changes: Any) -> Run:
        """Start the sandbox with `sh -c script`, wait, return its exit code and output."""
        spec = replace(self.spec, command=("/bin/sh", "-c", script), **spec_changes)
        r, w = os.pipe()
        null = os.open("/dev/null", os.O_RDONLY)
        try:
            st = process.start(spec, stdin=null, stdout=w, stderr=w, ctty=False,
                               cgroups=self.cg)
        finally:
            os.close(w)
            os.close(null)
        code, out = _collect(r, st.init_pid)
        return Run(code, out)

    def start(self, *command: str) -> process.Started:
        spec = replace(self.spec, command=command or ("/bin/sleep", "1000"))
        null = os.open("/dev/null", os.O_RDWR)
        try:
            self.started = process.start(spec, stdin=null, stdout=null, stderr=null,
                                         ctty=False, cgroups=self.cg)
        finally:
            os.close(null)
        return self.started

    def exec(self, script: str, cwd: str = "/workspace") -> Run:
        assert self.started is not None
        r, w = os.pipe()
        null = os.open("/dev/null", os.O_RDONLY)
        try:
            pid = process.enter(self.spec, self.started.init_pid, ["/bin/sh", "-c", script],
                                env=process.workload_env(self.spec), cwd=cwd, stdin=null,
                                stdout=w, stderr=w)
        finally:
            os.close(w)
            os.close(null)
        code, out = _collect(r, pid)
        return Run(code, out)

    def stop(self) -> None:
        if self.started is not None:
            lifecycle.stop(self.started, timeout=5)
            self.started = None

    def release(self, remove_workspace: bool = True) -> None:
        try:
            self.stop()
        finally:
            lifecycle.release(self.spec, self.cg, remove_workspace=remove_workspace)


@contextmanager
def box(spec: SandboxSpec) -> Iterator[Box]:
    b = Box(spec)
    try:
        b.prepare()
        yield b
    finally:
        b.release()


def hidden(path: str) -> FsRule:
    return FsRule(path=path, mode="hidden")
