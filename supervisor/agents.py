"""Agents: the lifecycle state machine, reconcile, and the Manager the API and
SSH server call.

Every lifecycle step is idempotent and recorded in the store before the next
one starts, so a daemon killed at any point finishes (or undoes) the work on
its next start: `reconcile()` walks every stored agent and drives it towards
its recorded intent (`desired`). Agents themselves live in keepers that do not
depend on the daemon; a running agent is re-adopted only after its keeper's
identity is checked by cgroup membership and process start time, never by a
stored PID alone.

States (CONTRACT.md): creating → starting → running ⇄ degraded → stopping →
stopped, and failed with a reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import pty
import shutil
import signal
import socket
import stat
import struct
import sys
import termios
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from sandbox import kernel, lifecycle, process
from sandbox.cgroups import CgroupDriver
from sandbox.errors import Conflict, CorralError, NotFound
from sandbox.spec import FsRule, Network, SandboxSpec, Workspace, check_name
from supervisor import __version__
from supervisor.config import Config
from supervisor.events import EventBus
from supervisor.execproc import ExecProcess
from supervisor.keeper import utf8_line_editing
from supervisor.layout import AgentPaths, addresses, agent_paths, subnet_slots, veth
from supervisor.session import SessionClient, SessionHub
from supervisor.store import Store
from supervisor.templates import (
    Template,
    TemplateRegistry,
    load_file,
    template_from_dict,
    template_to_dict,
)

log = logging.getLogger(__name__)

ROLES = ("viewer", "collaborator", "owner")
#: Steps a test may pause the daemon at (CORRAL_TEST_PAUSE_AT=step) to kill it there.
STEPS = ("recorded", "leased", "prepared", "keeper", "running", "stopping", "released",
         "removing")


#: The directory holding the `supervisor` and `sandbox` packages (for the keeper's PYTHONPATH).
PKG_ROOT = str(Path(__file__).resolve().parent.parent)
#: The session's terminal type, unless the template's env sets TERM.
SESSION_TERM = "xterm-256color"


def _check_run_as(name: str, spec: SandboxSpec, run_as: str | None) -> None:
    """A sandbox has exactly one identity: the agent's uid, named `agent`.

    There is no root to become (no user namespace: uid 0 inside would be the
    host's root) and no second uid to switch to, so anything else is refused
    with the reason rather than silently run as the agent.
    """
    if run_as in (None, "", "agent", str(spec.uid)):
        return
    raise CorralError(f"agent {name!r} has no user {run_as!r}",
                      hint=f"its sandbox has one user, 'agent' (uid {spec.uid}); "
                           "nothing runs as root inside")


async def _read_line(fd: int) -> bytes:
    """One line from a pipe (a keeper's ready line), or b"" at EOF; closes fd."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", 0))
    try:
        return await reader.readline()
    finally:
        transport.close()


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class Runtime:
    """What the daemon holds in memory for one agent (rebuilt on restart)."""

    name: str
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    hub: SessionHub | None = None
    stopping: bool = False
    cpu_sample: tuple[float, int] | None = None
    services: Any = None  # supervisor.services.ServiceSet once started


class Manager:
    def __init__(self, config: Config, store: Store, registry: TemplateRegistry,
                 cg: CgroupDriver, own_cgroups: dict[str, str], scope: str,
                 bus: EventBus) -> None:
        self.config = config
        self.store = store
        self.registry = registry
        self.cg = cg
        self.own_cgroups = own_cgroups
        self.scope = scope
        self.bus = bus
        self.cgroup_parent = config.cgroup_parent or f"corral-{scope}"
        self.runtimes: dict[str, Runtime] = {}
        self.on_access_change: list[Callable[[str, str], None]] = []
        self.network: Any = None  # supervisor.netpolicy.NetPolicy, set by the daemon
        self.started = time.time()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.zygote: Any = None  # supervisor.zygote.Zygote, the keeper fork server
        self.closing = False  # set by close(): hubs ending now are not agents ending

    # ------------------------------------------------------------------ helpers
    def spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        """Every background task goes through here: named, referenced, logged."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.error("task %s failed", name, exc_info=t.exception())

        task.add_done_callback(done)
        return task

    def rt(self, name: str) -> Runtime:
        if name not in self.runtimes:
            self.runtimes[name] = Runtime(name)
        return self.runtimes[name]

    def paths(self, name: str) -> AgentPaths:
        return agent_paths(self.config.state_dir, self.config.run_dir, name)

    def row(self, name: str) -> Any:
        check_name(name, "agent name")
        row = self.store.get_agent(name)
        if row is None:
            raise NotFound(f"no agent named {name!r}", hint="`corral ps --all` lists agents")
        return row

    def spec_of(self, row: Any) -> SandboxSpec:
        return SandboxSpec.from_json(row.spec_json)

    def template_of(self, row: Any) -> Template:
        return template_from_dict(json.loads(row.template_json))

    def emit(self, kind: str, agent: str | None = None, **data: Any) -> None:
        self.bus.emit(kind, agent, **data)

    async def pause_point(self, step: str) -> None:
        """Test hook: CORRAL_TEST_PAUSE_AT=step parks the daemon here forever."""
        want = os.environ.get("CORRAL_TEST_PAUSE_AT")
        if want and want == step:
            Path(self.config.state_dir, "paused-at").write_text(step)
            log.warning("test hook: paused at step %s", step)
            await asyncio.sleep(3600)

    def set_state(self, name: str, state: str, reason: str = "", **fields: Any) -> None:
        self.store.update_agent(name, state=state, reason=reason, **fields)
        self.emit(f"agent.{state}", name, reason=reason) if state in (
            "running", "stopped", "failed", "degraded") else None

    # ------------------------------------------------------------------ status
    def status(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for row in self.store.list_agents():
            counts[row.state] = counts.get(row.state, 0) + 1
        return {
            "version": __version__,
            "cgroup_driver": self.cg.version,
            "agents": counts,
            "agents_total": sum(counts.values()),
            "state_dir": self.config.state_dir,
            "scope": self.scope,
            "ssh": f"{self.config.ssh.host}:{self.config.ssh.port}",
            "uptime": round(time.time() - self.started, 1),
            "pid": os.getpid(),
        }

    # ------------------------------------------------------------------ templates
    def list_templates(self) -> list[dict[str, Any]]:
        return [{"name": t.name, "description": t.description, "source": t.source}
                for t in self.registry.list()]

    def show_template(self, name: str) -> dict[str, Any]:
        return template_to_dict(self.registry.get(name))

    def validate_template(self, path: str) -> dict[str, Any]:
        return template_to_dict(load_file(path, self.registry))

    # ------------------------------------------------------------------ create
    def _project(self, project: str | None, tpl: Template) -> str | None:
        if tpl.workspace.mode == "none" and not project:
            return None
        if not project:
            raise CorralError("a project directory is needed for this template's workspace",
                              hint="pass --project DIR")
        real = os.path.realpath(project)
        if not Path(real).is_dir():
            raise NotFound(f"project directory {project!r} does not exist")
        bad = [c for c in ("\0", "\n", ",", ":") if c in real]
        if bad:
            raise CorralError(f"project path {real!r} contains {bad[0]!r}",
                              hint="overlayfs options cannot carry it; move the project")
        return real

    def build_spec(self, name: str, tpl: Template, uid: int, subnet_index: int,
                   project: str | None, host_ports: dict[str, int]) -> SandboxSpec:
        p = self.paths(name)
        addr = addresses(str(self.config.network.subnet), subnet_index)
        env = dict(tpl.env)
        env.update(dict(tpl.agent.env))
        env["CORRAL_AGENT"] = name
        for svc in tpl.services:
            if svc.name in host_ports:
                env[svc.port_env] = str(host_ports[svc.name])
        for sec in tpl.secrets:
            try:
                env[sec.name] = Path(sec.file).read_text().strip()
            except OSError as e:
                raise CorralError(f"secret {sec.name}: cannot read {sec.file}: {e}") from e
        project_uid = Path(project).stat().st_uid if project else None
        ws = Workspace(mode=tpl.workspace.mode if project else "none", project=project,
                       inside=tpl.workspace.path, upper=p.upper, work=p.work,
                       project_uid=project_uid)
        net = Network(netns_path=f"{self.config.run_dir}/netns/{name}",
                      veth_host=veth(self.scope, name), address=addr.agent,
                      gateway=addr.gateway, ipv6=tpl.network.ipv6)
        # The agent's only resolver is the daemon's, on its gateway; these files
        # are written at start (`_write_etc`) and bound read-only over the host's.
        rules: tuple[FsRule, ...] = (
            *tpl.filesystem,
            FsRule("/etc/resolv.conf", "ro", f"{p.run}/etc/resolv.conf"),
            FsRule("/etc/hosts", "ro", f"{p.run}/etc/hosts"))
        command = tuple(tpl.agent.command)
        if tpl.services:
            # Services start before the session (CONTRACT.md): the session's
            # command waits at this gate until the daemon opens it, and then
            # execs, keeping its pid. The gate dir is the host's, read-only.
            rules = (*rules, FsRule(GATE_DIR, "ro", f"{p.run}/gate"))
            command = ("/bin/sh", "-c", GATE_SCRIPT, "corral-session", *command)
        return SandboxSpec(
            name=name, uid=uid, gid=uid, state_dir=p.state, run_dir=p.run,
            cgroup=f"agents/{name}", command=command,
            env=tuple(sorted(env.items())), workspace=ws, rules=rules,
            limits=tpl.resources.to_limits(), network=net, home=p.home,
            # The session is one terminal shown on many clients' terminals: an
            # xterm (what they all understand, and what the screen model
            # emulates) unless the template's env says otherwise. Without
            # TERM, vi, less and readline fall back to a dumb terminal: no
            # alternate screen, no bracketed paste.
            term=SESSION_TERM)

    async def create(self, name: str, template: str, project: str | None, sets: list[str],
                     start: bool) -> dict[str, Any]:
        check_name(name, "agent name")
        tpl = self.registry.get(template, sets)  # TemplateError: nothing is created
        proj = self._project(project, tpl)
        rt = self.rt(name)
        async with rt.lock:
            if self.store.get_agent(name) is not None:
                raise Conflict(f"agent {name!r} already exists",
                               hint="pick another name or `corral rm` it first")
            base_commit = None
            if proj:
                from supervisor.gitcommit import base_commit as git_base
                base_commit = await asyncio.to_thread(git_base, proj)
            self.store.add_agent(
                name=name, template=tpl.name, template_json=json.dumps(template_to_dict(tpl)),
                project=proj, state="creating", reason="",
                desired="running" if start else "stopped", step="recorded",
                base_commit=base_commit, created=now_iso(),
                extra_json=json.dumps({"sets": list(sets)}))
            self.emit("agent.created", name, template=tpl.name, project=proj)
            await self.pause_point("recorded")
            await self._finish_create(name)
        if start:
            # Not start(): its inspect() answer would be thrown away, and
            # inspect() costs nft calls (network counters) on the create path.
            await self._start(name)
        return self.inspect(name, network=False)

    async def _finish_create(self, name: str) -> None:
        """Lease, build the spec, prepare host-side state. Idempotent."""
        row = self.row(name)
        tpl = self.template_of(row)
        uid_lo, uid_hi = self.config.uids.lo, self.config.uids.hi
        uid = self.store.lease("uid", name, uid_lo, uid_hi)
        idx = self.store.lease("subnet", name, 0, subnet_slots(str(self.config.network.subnet)) - 1)
        host_ports = await self._lease_ports(name, tpl)
        spec = self.build_spec(name, tpl, uid, idx, row.project, host_ports)
        self.store.update_agent(name, uid=uid, subnet_index=idx, spec_json=spec.to_json(),
                                step="leased")
        await self.pause_point("leased")
        p = self.paths(name)
        Path(p.state).mkdir(parents=True, exist_ok=True, mode=0o700)
        Path(p.spec_file).write_text(spec.to_json())
        Path(p.spec_file).chmod(0o600)
        self.store.update_agent(name, state="stopped", step="prepared")
        await self.pause_point("prepared")

    async def _lease_ports(self, name: str, tpl: Template) -> dict[str, int]:
        lo, hi = self.config.ports.lo, self.config.ports.hi
        out: dict[str, int] = {}
        from supervisor.ports import claim, claimer
        for svc in tpl.services:
            if svc.port is None:
                continue
            # The claim is taken inside the lease transaction, so two daemons
            # sharing the host never lease the same port.
            owner = f"{self.scope} {name} {svc.name}"
            out[svc.name] = self.store.lease("port", name, lo, hi, purpose=svc.name,
                                             acceptable=claimer(owner))
            claim(out[svc.name], owner)  # an existing lease: make sure it is claimed
        return out

    # ------------------------------------------------------------------ start
    async def start(self, name: str) -> dict[str, Any]:
        await self._start(name)
        return self.inspect(name, network=False)

    async def _start(self, name: str) -> None:
        rt = self.rt(name)
        async with rt.lock:
            row = self.row(name)
            if row.state in ("running", "degraded", "starting") and rt.hub and not rt.hub.ended:
                return
            if row.state == "creating":
                await self._finish_create(name)
            self.store.update_agent(name, desired="running")
            try:
                await self._start_locked(name)
            except CorralError as e:
                self.set_state(name, "failed", str(e))
                await self._release_runtime(name)
                raise

    async def _start_locked(self, name: str) -> None:
        row = self.row(name)
        spec = self.spec_of(row)
        p = self.paths(name)
        self.set_state(name, "starting")
        for d in (p.state, p.home, p.run, str(Path(spec.network.netns_path).parent)
                  if spec.network else p.run):
            Path(d).mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chown(p.home, spec.uid, spec.gid)
        _write_etc(p.run, spec)
        gate = Path(p.run, "gate")
        gate.mkdir(mode=0o755, exist_ok=True)
        (gate / "go").unlink(missing_ok=True)
        # Traversable (not listable) by the agent's uid: its home lives below.
        Path(p.state).chmod(0o711)
        t0 = time.monotonic()
        # The keeper's own cgroup (a v1 prepare costs milliseconds per
        # hierarchy) is made alongside the sandbox, off the keeper's start.
        await asyncio.gather(asyncio.to_thread(lifecycle.prepare, spec, self.cg),
                             asyncio.to_thread(self._prepare_keeper_cgroup, name))
        t1 = time.monotonic()
        if self.network is not None and spec.network is not None:
            await self.network.add_agent(name, spec, self.template_of(row))
        t2 = time.monotonic()
        self.store.update_agent(name, step="prepared")
        await self.pause_point("keeper")
        await self._spawn_keeper(name, spec)
        log.debug("[agent=%s] start: prepare %.1f ms, network %.1f ms, keeper %.1f ms", name,
                  (t1 - t0) * 1e3, (t2 - t1) * 1e3, (time.monotonic() - t2) * 1e3)
        self.store.update_agent(name, step="running", started=now_iso(), exit_status=None)
        await self.pause_point("running")
        tpl = self.template_of(row)
        if tpl.services:
            from supervisor.services import ServiceSet
            rt = self.rt(name)
            rt.services = ServiceSet(self, name, spec, tpl)
            await rt.services.start()
            await rt.services.wait_ready()
        _open_gate(p.run)
        self.set_state(name, "running")
        if self.rt(name).services is not None:
            self.rt(name).services.sync_agent_state()  # a service may be unhealthy already

    async def _spawn_keeper(self, name: str, spec: SandboxSpec) -> None:
        p = self.paths(name)
        Path(p.run).mkdir(parents=True, exist_ok=True, mode=0o700)
        Path(p.spec_file).write_text(spec.to_json())
        with contextlib.suppress(FileNotFoundError):
            Path(p.exit_file).unlink()
        argv = ["--spec", p.spec_file, "--socket", p.keeper_socket, "--log", p.session_log,
                "--status", p.exit_file, "--cgroup-parent", self.cgroup_parent,
                "--cgroup-own", json.dumps(self.own_cgroups)]
        pid, ready = await self._fork_keeper(argv, p.keeper_err)
        # The keeper lives in its own cgroup so reconcile can prove its
        # identity by membership, and so it survives the daemon's cgroup.
        with contextlib.suppress(CorralError, OSError):
            self.cg.add(f"keepers/{name}", pid)
        log.debug("[agent=%s] keeper %d spawned", name, pid)
        try:
            line = await asyncio.wait_for(ready, 30)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            raise CorralError(f"keeper for {name} did not start within 30 s",
                              hint=f"see {p.keeper_err}") from None
        try:
            info = json.loads(line or b"{}")
        except ValueError:
            info = {}
        if "init_pid" not in info:
            msg = info.get("error") or _tail(p.keeper_err) or "keeper exited"
            raise CorralError(f"sandbox for {name} failed to start: {msg}",
                              hint=info.get("hint", ""))
        kstart = psutil.Process(pid).create_time()
        self.store.update_agent(name, keeper_pid=pid, keeper_start=kstart,
                                init_pid=info["init_pid"])
        log.debug("[agent=%s] keeper ready: init %d", name, info["init_pid"])
        await self._connect_hub(name)

    def _prepare_keeper_cgroup(self, name: str) -> None:
        with contextlib.suppress(CorralError, OSError):
            from sandbox.spec import Limits
            self.cg.prepare(f"keepers/{name}", Limits(swap_bytes=None))

    def _keeper_server(self) -> Any:
        """The keeper fork server (supervisor.zygote), created on first use."""
        if self.zygote is None:
            from supervisor.zygote import Zygote
            # -S (both for the server and a fallback keeper): no site processing
            # (.pth files, site-packages scan); PYTHONPATH names everything the
            # keeper imports, this package's root first (an editable install
            # finds it through a .pth).
            self.zygote = Zygote({"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                                  "PYTHONPATH": os.pathsep.join([PKG_ROOT, *sys.path])})
        return self.zygote

    async def _fork_keeper(self, argv: list[str],
                           err_path: str) -> tuple[int, Awaitable[bytes]]:
        """Start a keeper with `argv`; returns its pid and its ready line (awaitable).

        Through the fork server when it works (no interpreter start or imports
        on the create path), else as a new `python -S -m supervisor.keeper`.
        Either way the keeper is in a session of its own, stdin is /dev/null,
        stdout is a pipe to us (the ready line), stderr appends to err_path.
        """
        zygote = self._keeper_server()
        rfd, wfd = os.pipe2(os.O_CLOEXEC)
        err = os.open(err_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            from supervisor.zygote import ZygoteError
            try:
                pid = await zygote.spawn(argv, wfd, err)
            except ZygoteError as e:
                log.warning("keeper fork server unavailable (%s): starting a keeper process", e)
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-S", "-m", "supervisor.keeper", *argv,
                    stdin=asyncio.subprocess.DEVNULL, stdout=wfd, stderr=err,
                    start_new_session=True, cwd="/", env=zygote.env)
                pid = proc.pid
                self.spawn(proc.wait(), f"keeper-reap-{pid}")
        except BaseException:
            os.close(rfd)
            raise
        finally:
            os.close(wfd)
            os.close(err)
        return pid, _read_line(rfd)

    async def _connect_hub(self, name: str) -> None:
        rt = self.rt(name)
        p = self.paths(name)

        def on_exit(status: int | None) -> None:
            if rt.stopping or self.closing:
                return  # we let go of it (stop, or the daemon's own shutdown)
            row = self.store.get_agent(name)
            if status is None and row is not None and self._keeper_alive(row):
                # Our connection broke (e.g. the keeper dropped us as too slow)
                # but the agent lives on: reconnect, do not declare it dead.
                self.spawn(self._reconnect_hub(name), f"hub-reconnect-{name}")
                return
            self.spawn(self._agent_exited(name, status), f"agent-exited-{name}")

        def on_client(what: str, client: SessionClient) -> None:
            self.emit(f"session.{what}", name, user=client.user, role=client.role)

        hub = SessionHub(name, p.keeper_socket, on_exit=on_exit, on_client=on_client)
        await hub.connect()
        rt.hub = hub

    async def _reconnect_hub(self, name: str) -> None:
        rt = self.rt(name)
        old = rt.hub
        rt.hub = None
        if old is not None:
            await old.close()
        for _ in range(50):
            try:
                await self._connect_hub(name)
                self.emit("session.reconnected", name)
                return
            except (OSError, TimeoutError):
                await asyncio.sleep(0.2)
        row = self.store.get_agent(name)
        if row is not None and not self._keeper_alive(row):
            await self._agent_exited(name, None)

    async def _agent_exited(self, name: str, status: int | None) -> None:
        """The session ended by itself (or the keeper died) while we watched."""
        rt = self.rt(name)
        async with rt.lock:
            if rt.stopping:
                return
            if status is None:
                status = self._read_exit(name)
            await self._stop_services(name)
            await self._release_runtime(name)
            if status == 0:
                self.set_state(name, "stopped", "session exited", exit_status=0)
            else:
                self.set_state(name, "failed", f"session exited with status {status}",
                               exit_status=status)
            self.store.update_agent(name, desired="stopped")

    def _read_exit(self, name: str) -> int | None:
        try:
            return int(json.loads(Path(self.paths(name).exit_file).read_text())["exit_status"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    # ------------------------------------------------------------------ stop
    async def stop(self, name: str, timeout: float | None = None) -> dict[str, Any]:
        rt = self.rt(name)
        async with rt.lock:
            self.row(name)
            self.store.update_agent(name, desired="stopped")
            await self._stop_locked(name, timeout)
        return self.inspect(name, network=False)

    async def _stop_locked(self, name: str, timeout: float | None) -> None:
        row = self.row(name)
        if row.state in ("stopped", "failed", "creating") and not self._keeper_alive(row):
            await self._release_runtime(name)
            return
        rt = self.rt(name)
        rt.stopping = True
        try:
            self.set_state(name, "stopping")
            await self.pause_point("stopping")
            await self._stop_services(name)
            t = self.config.stop_timeout if timeout is None else timeout
            hub = rt.hub
            if hub is not None and not hub.ended:
                # A hangup first: interactive shells ignore SIGTERM but end on
                # SIGHUP, as when a terminal closes; then SIGTERM for the rest.
                hub.signal(signal.SIGHUP)
                hub.signal(signal.SIGTERM)
                await _wait_for(lambda: hub.ended, t)
            elif self._keeper_alive(row) and row.init_pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(row.init_pid, signal.SIGTERM)
                await _wait_for(lambda: not self._keeper_alive(self.row(name)), t)
            spec = self.spec_of(row)
            # Whatever is left (timeout, stray processes): cgroup kill.
            with contextlib.suppress(CorralError, OSError):
                await asyncio.to_thread(self.cg.kill, spec.cgroup)
            await _wait_for(lambda: not self._keeper_alive(self.row(name)), 5)
            if self._keeper_alive(self.row(name)):
                with contextlib.suppress(ProcessLookupError, TypeError):
                    os.kill(self.row(name).keeper_pid, signal.SIGKILL)
            status = self._read_exit(name)
            await self.pause_point("released")
            await self._release_runtime(name)
            self.set_state(name, "stopped", "stopped", exit_status=status)
        finally:
            rt.stopping = False

    async def _stop_services(self, name: str) -> None:
        rt = self.rt(name)
        if rt.services is not None:
            with contextlib.suppress(Exception):
                await rt.services.stop()
            rt.services = None

    async def _release_runtime(self, name: str) -> None:
        """Tear down what only a running agent has; keep workspace and leases."""
        rt = self.rt(name)
        if rt.hub is not None:
            await rt.hub.close()
            rt.hub = None
        row = self.store.get_agent(name)
        if row is None or not row.spec_json:
            return
        spec = self.spec_of(row)
        if self.network is not None:
            with contextlib.suppress(Exception):
                await self.network.remove_agent(name, spec)
        await asyncio.to_thread(lifecycle.release, spec, self.cg)
        with contextlib.suppress(CorralError, OSError):
            await asyncio.to_thread(self.cg.release, f"keepers/{name}")
        with contextlib.suppress(FileNotFoundError):
            Path(self.paths(name).keeper_socket).unlink()
        self.store.update_agent(name, keeper_pid=None, keeper_start=None, init_pid=None)

    async def restart(self, name: str) -> dict[str, Any]:
        """Stop, re-read the agent's template (its file may have changed: a new
        allow-list, limits, services), then start with it. Leases, workspace and
        home stay. An invalid template keeps the old one, with an event."""
        await self.stop(name)
        rt = self.rt(name)
        async with rt.lock:
            self._refresh_template(name)
        return await self.start(name)

    def _refresh_template(self, name: str) -> Template:
        row = self.row(name)
        sets = list(row.extra.get("sets", []))
        try:
            tpl = self.registry.get(row.template, sets)
        except CorralError as e:
            self.emit("agent.template_kept", name, error=str(e))
            return self.template_of(row)
        old_spec = self.spec_of(row)
        host_ports = {lease.purpose: lease.value for lease in self.store.leases(name, "port")}
        spec = self.build_spec(name, tpl, old_spec.uid, row.subnet_index, row.project,
                               host_ports)
        self.store.update_agent(name, template_json=json.dumps(template_to_dict(tpl)),
                                spec_json=spec.to_json())
        self.emit("agent.template_refreshed", name, template=tpl.name)
        return tpl

    async def reload(self, name: str) -> dict[str, Any]:
        """Apply the template's current network policy to a running agent, live."""
        rt = self.rt(name)
        async with rt.lock:
            row = self.row(name)
            if row.state not in ("running", "degraded"):
                raise Conflict(f"agent {name!r} is {row.state}",
                               hint="reload changes a running agent; `corral start` it")
            sets = list(row.extra.get("sets", []))
            tpl = self.registry.get(row.template, sets)  # TemplateError: nothing changes
            old = self.template_of(row)
            merged = replace(old, network=tpl.network)
            self.store.update_agent(name, template_json=json.dumps(template_to_dict(merged)))
            if self.network is not None:
                await self.network.reload(name, merged, self.spec_of(row))
            self.emit("agent.reloaded", name, allow=[str(e) for e in tpl.network.allow],
                      egress=tpl.network.egress)
        return self.inspect(name)

    # ------------------------------------------------------------------ remove
    async def remove(self, name: str, force: bool = False, keep_workspace: bool = False) -> None:
        rt = self.rt(name)
        async with rt.lock:
            row = self.row(name)
            if row.state in ("running", "degraded", "starting") and not force:
                raise Conflict(f"agent {name!r} is {row.state}",
                               hint="stop it first, or use `corral rm --force`")
            self.store.update_agent(name, desired="removed")
            if row.state not in ("stopped", "failed") or self._keeper_alive(row):
                await self._stop_locked(name, None)
            await self.pause_point("removing")
            await self._remove_locked(name, keep_workspace)
        self.runtimes.pop(name, None)

    async def _remove_locked(self, name: str, keep_workspace: bool) -> None:
        row = self.row(name)
        if row.spec_json:
            spec = self.spec_of(row)
            await asyncio.to_thread(lifecycle.release, spec, self.cg)
        p = self.paths(name)
        if keep_workspace:
            # Keep the upper dir (the agent's work); drop the rest.
            for sub in ("work", "home", "services"):
                await asyncio.to_thread(shutil.rmtree, f"{p.state}/{sub}", True)
        else:
            await asyncio.to_thread(_rmtree_nofollow, p.state)
        await asyncio.to_thread(shutil.rmtree, p.run, True)
        from supervisor.ports import unclaim
        for lease in self.store.leases(name, "port"):
            unclaim(lease.value, f"{self.scope} {name} {lease.purpose}")
        self.store.release_leases(name)
        for user in list(self.store.grants(name)):
            self.store.revoke(name, user)
        self.store.delete_agent(name)
        self.emit("agent.removed", name, kept_workspace=keep_workspace)

    # ------------------------------------------------------------------ reconcile
    def _keeper_alive(self, row: Any) -> bool:
        """Is the keeper recorded for this agent still that very process?"""
        if not row.keeper_pid:
            return False
        try:
            proc = psutil.Process(row.keeper_pid)
            if row.keeper_start and abs(proc.create_time() - row.keeper_start) > 0.05:
                return False
            if proc.status() == psutil.STATUS_ZOMBIE:
                return False
        except psutil.Error:
            return False
        try:
            return self.cg.contains(f"keepers/{row.name}", row.keeper_pid)
        except (CorralError, OSError):
            return False

    async def reconcile(self) -> None:
        """Drive every stored agent to its recorded intent after a (re)start."""
        rows = self.store.list_agents()
        await asyncio.gather(*(self._reconcile_one(r.name) for r in rows))
        # Warm the keeper fork server now, so the first create does not wait for its imports.
        from supervisor.zygote import ZygoteError
        try:
            self._keeper_server().start()
        except ZygoteError as e:
            log.warning("%s: keepers will start as new processes", e)

    async def _reconcile_one(self, name: str) -> None:
        rt = self.rt(name)
        async with rt.lock:
            row = self.store.get_agent(name)
            if row is None:
                return
            try:
                await self._reconcile_locked(row)
            except Exception as e:
                log.exception("[agent=%s] reconcile failed", name)
                self.set_state(name, "failed", f"reconcile: {e}")

    async def _reconcile_locked(self, row: Any) -> None:
        name = row.name
        if row.desired == "removed":
            if self._keeper_alive(row):
                await self._stop_locked(name, None)
            await self._remove_locked(name, False)
            self.emit("agent.reconciled", name, action="removed")
            return
        if row.state == "creating" or row.step in ("recorded", "leased"):
            await self._finish_create(name)
            row = self.row(name)
        alive = self._keeper_alive(row)
        if alive:
            try:
                await self._connect_hub(name)
            except (OSError, TimeoutError) as e:
                log.warning("[agent=%s] keeper alive but unreachable: %s", name, e)
                alive = False
        if alive:
            if row.desired == "stopped":
                await self._stop_locked(name, None)
                self.emit("agent.reconciled", name, action="stopped")
                return
            tpl = self.template_of(row)
            if self.network is not None and row.spec_json:
                await self.network.adopt_agent(name, self.spec_of(row), tpl)
            if tpl.services:
                from supervisor.services import ServiceSet
                rt = self.rt(name)
                rt.services = ServiceSet(self, name, self.spec_of(row), tpl)
                await rt.services.adopt()
            _open_gate(self.paths(name).run)
            if row.state != "running":
                self.set_state(name, "running")
            if self.rt(name).services is not None:
                self.rt(name).services.sync_agent_state()
            self.emit("agent.reconciled", name, action="adopted")
            return
        # The keeper is gone (or never started): clean up what it left.
        if row.state == "starting" and row.desired == "running":
            # Killed in the middle of a start: start again from a clean slate.
            await self._release_runtime(name)
            try:
                await self._start_locked(name)
            except CorralError as e:
                self.set_state(name, "failed", str(e))
                await self._release_runtime(name)
            self.emit("agent.reconciled", name, action="started")
            return
        was_running = row.state in ("running", "degraded", "starting", "stopping")
        status = self._read_exit(name)
        await self._release_runtime(name)
        if was_running and row.state != "stopping":
            if status == 0:
                self.set_state(name, "stopped", "session exited while the daemon was down",
                               exit_status=0)
            else:
                self.set_state(name, "failed",
                               f"agent died while the daemon was down (status {status})",
                               exit_status=status)
            self.store.update_agent(name, desired="stopped")
        elif row.state == "stopping":
            self.set_state(name, "stopped", "stopped", exit_status=status)
        elif row.desired == "running" and row.state == "stopped" and row.step == "prepared":
            # Crashed between create and start: finish the start.
            try:
                await self._start_locked(name)
            except CorralError as e:
                self.set_state(name, "failed", str(e))
                await self._release_runtime(name)
        self.emit("agent.reconciled", name, action="cleaned", exit_status=status)

    async def monitor(self, interval: float = 2.0) -> None:
        """Resource events: an OOM kill or a full pid table inside an agent is
        reported (once per change), so people learn why their agent misbehaves;
        and `agent.needs_input` once each time a session starts waiting for
        someone to type."""
        seen: dict[str, tuple[int, int]] = {}
        waiting: set[str] = set()
        while True:
            await asyncio.sleep(interval)
            for row in self.store.list_agents():
                if row.state not in ("running", "degraded") or not row.spec_json:
                    seen.pop(row.name, None)
                    waiting.discard(row.name)
                    continue
                if await asyncio.to_thread(self._needs_input, row):
                    if row.name not in waiting:
                        waiting.add(row.name)
                        self.emit("agent.needs_input", row.name)
                else:
                    waiting.discard(row.name)
                try:
                    u = await asyncio.to_thread(self.cg.usage, self.spec_of(row).cgroup)
                except (CorralError, OSError):
                    continue
                old_oom, old_denied = seen.get(row.name, (0, 0))
                if u.oom_kills > old_oom:
                    self.emit("agent.oom", row.name, oom_kills=u.oom_kills,
                              memory_max=u.memory_max)
                if u.pids_denied > old_denied:
                    self.emit("agent.pids_limit", row.name, forks_refused=u.pids_denied,
                              pids_max=u.pids_max)
                seen[row.name] = (u.oom_kills, u.pids_denied)

    async def close(self) -> None:
        """Daemon shutdown: agents keep running (their keepers do not need us)."""
        self.closing = True
        for rt in self.runtimes.values():
            if rt.services is not None:
                with contextlib.suppress(Exception):
                    await rt.services.detach()
            if rt.hub is not None:
                await rt.hub.close()
        for t in list(self._tasks):
            t.cancel()
        if self.zygote is not None:
            self.zygote.close()

    # ------------------------------------------------------------------ views
    def _usage(self, name: str, spec: SandboxSpec | None, running: bool) -> dict[str, Any]:
        out: dict[str, Any] = {"cpu_percent": 0.0, "memory_bytes": 0, "pids": 0}
        if spec is None or not running:
            return out
        try:
            u = self.cg.usage(spec.cgroup)
        except (CorralError, OSError):
            return out
        rt = self.rt(name)
        nowt = time.monotonic()
        if rt.cpu_sample is not None:
            t0, c0 = rt.cpu_sample
            if nowt > t0:
                out["cpu_percent"] = round(max(0.0, (u.cpu_usec - c0) / 1e6 / (nowt - t0) * 100),
                                           1)
        rt.cpu_sample = (nowt, u.cpu_usec)
        out["memory_bytes"] = u.memory_bytes
        out["pids"] = u.pids
        out["oom_kills"] = getattr(u, "oom_kills", 0)
        return out

    def _summary(self, row: Any) -> dict[str, Any]:
        spec = self.spec_of(row) if row.spec_json else None
        rt = self.runtimes.get(row.name)
        running = row.state in ("running", "degraded", "starting")
        ports = {lease.purpose: lease.value for lease in self.store.leases(row.name, "port")}
        clients = rt.hub.users() if rt and rt.hub else []
        uptime = None
        if running and row.started:
            with contextlib.suppress(ValueError):
                uptime = round(time.time() - datetime.fromisoformat(row.started).timestamp())
        return {
            "name": row.name,
            "state": row.state,
            "template": row.template,
            "ip": spec.network.address.split("/")[0] if spec and spec.network else None,
            "ports": ports,
            "created": row.created,
            "started": row.started if running else None,
            "uptime": uptime,
            "usage": self._usage(row.name, spec, running),
            "clients": clients,
            "needs_input": self._needs_input(row),
        }

    def _needs_input(self, row: Any) -> bool:
        """The DESIGN's needs-input flag (see supervisor.activity)."""
        if row.state not in ("running", "degraded") or not row.init_pid:
            return False
        from supervisor.activity import needs_input
        return needs_input(row.init_pid, self.paths(row.name).session_log)

    def ps(self, all: bool = False) -> list[dict[str, Any]]:
        rows = self.store.list_agents()
        if not all:
            rows = [r for r in rows if r.state not in ("stopped",)]
        return [self._summary(r) for r in rows]

    def inspect(self, name: str, network: bool = True) -> dict[str, Any]:
        row = self.row(name)
        out = self._summary(row)
        spec = self.spec_of(row) if row.spec_json else None
        rt = self.runtimes.get(name)
        services: dict[str, Any] = {}
        if rt is not None and rt.services is not None:
            services = rt.services.describe()
        else:
            tpl = self.template_of(row)
            ports = out["ports"]
            for svc in tpl.services:
                services[svc.name] = {"state": "stopped", "health": "unknown", "port": svc.port,
                                      "host_port": ports.get(svc.name), "restarts": 0}
        out.update({
            "reason": row.reason or "",
            "desired": row.desired,
            "gateway": spec.network.gateway.split("/")[0] if spec and spec.network else None,
            "cgroup": self.cg.path(spec.cgroup) if spec else None,
            "limits": {
                "memory_bytes": spec.limits.memory_bytes, "swap_bytes": spec.limits.swap_bytes,
                "cpus": spec.limits.cpus, "pids": spec.limits.pids,
            } if spec else {},
            "services": services,
            "workspace": {
                "mode": spec.workspace.mode if spec else None,
                "path": spec.workspace.upper if spec else None,
                "project": row.project,
                "base_commit": row.base_commit,
                "inside": spec.workspace.inside if spec else None,
            },
            "session": {
                "pid": row.init_pid if out["state"] in ("running", "degraded") else None,
                "keeper_pid": row.keeper_pid,
                "clients": out["clients"],
                "exit_status": row.exit_status,
            },
            "uid": row.uid,
        })
        if network and self.network is not None and out["state"] in ("running", "degraded"):
            with contextlib.suppress(Exception):
                out["network"] = self.network.describe(name)
        return out

    # ------------------------------------------------------------------ sessions
    def _running(self, name: str) -> tuple[Any, SandboxSpec, Runtime]:
        row = self.row(name)
        rt = self.rt(name)
        if row.state not in ("running", "degraded") or not row.init_pid:
            raise Conflict(f"agent {name!r} is {row.state}", hint=f"`corral start {name}`")
        return row, self.spec_of(row), rt

    async def attach(self, name: str, user: str, role: str,
                     size: tuple[int, int] | None = None) -> SessionClient:
        _, _, rt = self._running(name)
        if rt.hub is None or rt.hub.ended:
            raise Conflict(f"agent {name!r} has no live session")
        return rt.hub.attach(user, role, size)

    async def exec(self, name: str, argv: list[str], *, user: str,
                   tty: tuple[str, int, int] | None, env: dict[str, str],
                   run_as: str | None = None) -> ExecProcess:
        """Run argv inside the sandbox; `user` is who asked (for the event),
        `run_as` the identity inside (only the agent's own: see _check_run_as)."""
        row, spec, _ = self._running(name)
        if not argv:
            raise CorralError("exec needs a command")
        _check_run_as(name, spec, run_as)
        extra = dict(env)
        if tty:
            extra["TERM"] = tty[0]
        full_env = process.workload_env(spec, extra)
        if tty:
            master, slave = _sandbox_pty(row.init_pid, spec.uid)
            fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", tty[2], tty[1], 0, 0))
            try:
                utf8_line_editing(slave)
                pid = process.enter(spec, row.init_pid, argv, env=full_env,
                                    cwd=spec.workspace.inside if spec.workspace.mode != "none"
                                    else "/home/agent",
                                    stdin=slave, stdout=slave, stderr=slave, ctty=True)
            finally:
                os.close(slave)
            self.emit("agent.exec", name, user=user, argv=argv[:8], tty=True)
            return ExecProcess(pid, master, master, None, tty=True)
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            pid = process.enter(spec, row.init_pid, argv, env=full_env,
                                cwd=spec.workspace.inside if spec.workspace.mode != "none"
                                else "/home/agent",
                                stdin=in_r, stdout=out_w, stderr=err_w, ctty=False)
        except BaseException:
            for fd in (in_w, out_r, err_r):
                os.close(fd)
            raise
        finally:
            for fd in (in_r, out_w, err_w):
                os.close(fd)
        self.emit("agent.exec", name, user=user, argv=argv[:8], tty=False)
        return ExecProcess(pid, in_w, out_r, err_r, tty=False)

    async def open_tcp(self, name: str, port: int
                       ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        _, spec, _ = self._running(name)
        if spec.network is None:
            raise Conflict(f"agent {name!r} has no network namespace")
        if not 1 <= port <= 65535:
            raise CorralError(f"port {port} out of range")
        sock = await asyncio.to_thread(_socket_in_netns, spec.network.netns_path)
        try:
            sock.setblocking(False)
            await asyncio.wait_for(
                asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port)), 10)
        except BaseException:
            sock.close()
            raise
        return await asyncio.open_connection(sock=sock)

    def workspace_view(self, name: str) -> str:
        row, spec, _ = self._running(name)
        inside = spec.workspace.inside if spec.workspace.mode != "none" else "/home/agent"
        return f"/proc/{row.init_pid}/root{inside}"

    # ------------------------------------------------------------------ logs/events
    def logs(self, name: str, service: str | None, tail: int | None) -> bytes:
        self.row(name)
        path = self._log_path(name, service)
        data = b""
        for f in (path + ".1", path):
            with contextlib.suppress(OSError):
                data += Path(f).read_bytes()
        if tail is not None:
            lines = data.splitlines(keepends=True)
            data = b"".join(lines[-tail:]) if tail > 0 else b""
        return data

    def _log_path(self, name: str, service: str | None) -> str:
        p = self.paths(name)
        if service is None:
            return p.session_log
        check_name(service, "service name")
        tpl = self.template_of(self.row(name))
        tpl.service(service)
        return f"{p.services_dir}/{service}.log"

    async def follow_logs(self, name: str, service: str | None) -> AsyncIterator[bytes]:
        self.row(name)
        path = self._log_path(name, service)
        pos = 0
        with contextlib.suppress(OSError):
            pos = Path(path).stat().st_size
        while True:
            try:
                size = Path(path).stat().st_size
            except OSError:
                size = 0
            if size < pos:  # rotated
                pos = 0
            if size > pos:
                with Path(path).open("rb") as f:
                    f.seek(pos)
                    chunk = f.read(min(size - pos, 1 << 20))
                pos += len(chunk)
                yield chunk
            else:
                await asyncio.sleep(0.2)

    def events(self, agent: str | None, since: str | None) -> list[dict[str, Any]]:
        from supervisor.events import event_dict
        if agent:
            check_name(agent, "agent name")
        return [event_dict(e)
                for e in self.store.events(agent=agent, since_iso=since, limit=10000)]

    async def follow_events(self, agent: str | None) -> AsyncIterator[dict[str, Any]]:
        q = self.bus.follow(agent)
        try:
            while True:
                yield await q.get()
        finally:
            self.bus.unfollow(q)

    def audit(self, kind: str, agent: str | None, **data: Any) -> None:
        self.emit(kind, agent, **data)

    # ------------------------------------------------------------------ diff/commit
    def diff(self, name: str, fmt: str) -> str | list[dict[str, Any]]:
        from sandbox import workspace_diff as wd
        row = self.row(name)
        spec = self.spec_of(row)
        if spec.workspace.mode != "overlay" or not spec.workspace.upper:
            raise Conflict(f"agent {name!r} has a {spec.workspace.mode} workspace",
                           hint="diff needs an overlay workspace")
        upper, lower = spec.workspace.upper, spec.workspace.project
        if not Path(upper).is_dir():
            changes: list[Any] = []
        else:
            changes = wd.changes(upper, lower)
        if fmt == "json":
            return wd.to_json(changes)
        if fmt == "stat":
            return wd.render_stat(changes, upper, lower)
        return wd.render_unified(changes, upper, lower)

    def commit(self, name: str, branch: str, message: str | None) -> dict[str, Any]:
        from supervisor import gitcommit
        row = self.row(name)
        spec = self.spec_of(row)
        if spec.workspace.mode != "overlay" or not spec.workspace.project:
            raise Conflict(f"agent {name!r} has no overlay workspace over a project")
        if not row.base_commit:
            raise CorralError(f"the project of {name!r} is not a git repository",
                              hint="`corral diff` still works")
        msg = message or f"Work of agent {name}"
        sha = gitcommit.commit(spec.workspace.project, spec.workspace.upper or "", row.base_commit,
                               branch, msg, {"Corral-Agent": name, "Corral-Template":
                                             row.template})
        self.emit("agent.commit", name, branch=branch, commit=sha)
        return {"commit": sha, "branch": branch}

    # ------------------------------------------------------------------ users
    def add_user(self, name: str, keys: list[str]) -> dict[str, Any]:
        check_name(name, "user name")
        self.store.add_user(name, keys)
        self.emit("user.added", None, user=name)
        return {"name": name}

    def remove_user(self, name: str) -> None:
        self.store.remove_user(name)
        self.emit("user.removed", None, user=name)
        self._access_changed(None, name)

    def list_users(self) -> list[dict[str, Any]]:
        return [u if isinstance(u, dict) else _asdict(u) for u in self.store.list_users()]

    def grant(self, agent: str, user: str, role: str) -> dict[str, Any]:
        self.row(agent)
        if role not in ROLES:
            raise CorralError(f"role must be one of {', '.join(ROLES)}")
        self.store.grant(agent, user, role)
        self.emit("access.granted", agent, user=user, role=role)
        self._access_changed(agent, user)
        return {"agent": agent, "user": user, "role": role}

    def revoke(self, agent: str, user: str) -> None:
        self.row(agent)
        self.store.revoke(agent, user)
        self.emit("access.revoked", agent, user=user)
        self._access_changed(agent, user)

    def handoff(self, agent: str, user: str) -> dict[str, Any]:
        self.row(agent)
        before = dict(self.store.grants(agent))
        self.store.handoff(agent, user)
        self.emit("session.handoff", agent, user=user,
                  previous=[u for u, r in before.items() if r == "owner"])
        for u in set(before) | {user}:
            self._access_changed(agent, u)
        return {"agent": agent, "owner": user}

    def role(self, agent: str, user: str) -> str | None:
        role: str | None = self.store.role(agent, user)
        return role

    def user_for_key(self, fingerprint: str) -> str | None:
        user: str | None = self.store.user_for_key_fingerprint(fingerprint)
        return user

    def _access_changed(self, agent: str | None, user: str) -> None:
        agents = [agent] if agent else list(self.runtimes)
        for a in agents:
            rt = self.runtimes.get(a)
            if rt is not None and rt.hub is not None and user != "root":
                rt.hub.set_role(user, self.store.role(a, user))
        for cb in list(self.on_access_change):
            for a in agents:
                try:
                    cb(a, user)
                except Exception:
                    log.exception("access-change callback failed")


def _asdict(obj: Any) -> dict[str, Any]:
    import dataclasses
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    return dict(obj)


async def _wait_for(pred: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        await asyncio.sleep(0.05)
    return pred()


def _tail(path: str, n: int = 400) -> str:
    try:
        data = Path(path).read_bytes()[-n:]
    except OSError:
        return ""
    return data.decode(errors="replace").strip().splitlines()[-1] if data.strip() else ""


TIOCGPTPEER = 0x5441  # linux/asm-generic/ioctls.h (not in the termios module)
TIOCSPTLCK = 0x40045431


def _sandbox_pty(init_pid: int, uid: int) -> tuple[int, int]:
    """A PTY pair from the sandbox's own devpts, so `tty` inside names it.

    The agent controls its /dev, so the path is resolved with RESOLVE_IN_ROOT
    (no symlink can lead out of the sandbox's root) and the result must be the
    ptmx character device (5:2); the slave is opened from the master with
    TIOCGPTPEER, never by a path the agent could swap. Falls back to a host PTY.
    """
    try:
        root = os.open(f"/proc/{init_pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            master = kernel.openat2(root, "dev/pts/ptmx", os.O_RDWR | os.O_NOCTTY,
                                    kernel.RESOLVE_IN_ROOT | kernel.RESOLVE_NO_MAGICLINKS)
        finally:
            os.close(root)
        st = os.fstat(master)
        if not (stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(5, 2)):
            os.close(master)
            raise OSError("dev/pts/ptmx is not the ptmx device")
        fcntl.ioctl(master, TIOCSPTLCK, struct.pack("i", 0))
        slave = fcntl.ioctl(master, TIOCGPTPEER, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
        with contextlib.suppress(OSError):
            os.fchown(slave, uid, -1)
        return master, int(slave)
    except (OSError, CorralError) as e:
        log.debug("sandbox pty unavailable (%s): using a host pty", e)
        master, slave = pty.openpty()
        return master, slave


GATE_DIR = "/.corral"
GATE_SCRIPT = 'while [ ! -e /.corral/go ]; do sleep 0.05; done; exec "$@"'


def _open_gate(run: str) -> None:
    gate = Path(run, "gate")
    if gate.is_dir():
        (gate / "go").touch()


def _write_etc(run: str, spec: SandboxSpec) -> None:
    etc = Path(run, "etc")
    etc.mkdir(parents=True, exist_ok=True, mode=0o755)
    if spec.network is not None:
        gw = spec.network.gateway.split("/")[0]
        ip = spec.network.address.split("/")[0]
        resolv = f"# corral: the daemon's resolver answers allowed names only\nnameserver {gw}\n"
        hosts = f"127.0.0.1 localhost\n{ip} {spec.name}\n::1 localhost ip6-localhost\n"
    else:
        resolv = "# corral: no network\n"
        hosts = f"127.0.0.1 localhost {spec.name}\n"
    for fname, text in (("resolv.conf", resolv), ("hosts", hosts)):
        path = etc / fname
        path.write_text(text)
        path.chmod(0o644)


def _socket_in_netns(netns_path: str) -> socket.socket:
    """A TCP socket created inside the agent's network namespace.

    A socket keeps the namespace it was created in, so this thread joins the
    agent's netns just long enough to call socket(), then returns home —
    setns(CLONE_NEWNET) affects only the calling thread.
    """
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    target = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        kernel.setns(target, kernel.CLONE_NEWNET)
        try:
            return socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        finally:
            kernel.setns(home, kernel.CLONE_NEWNET)
    finally:
        os.close(home)
        os.close(target)


def _rmtree_nofollow(path: str) -> None:
    """Remove an agent's state dir; shutil.rmtree never follows symlinks it finds."""
    if Path(path).is_symlink():
        Path(path).unlink()
        return
    shutil.rmtree(path, ignore_errors=True)


__all__ = ["Manager", "replace"]
