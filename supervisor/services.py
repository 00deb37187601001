"""Per-agent services: started inside the sandbox, health-checked, restarted.

Each service of the template runs inside the agent's sandbox through
`sandbox.process.enter` (same namespaces, cgroup and privilege drop as the
session), in `depends_on` order, each waiting for what it depends on to be
healthy. Its port is published on the agent's leased host port. Health checks
(http / tcp / command) follow the template's interval, timeout, retries and
start period; each change is an event, and an unhealthy service makes the
agent `degraded`. Restarts follow the policy with exponential backoff (capped);
a service failing `GIVE_UP_FAILURES` times within `GIVE_UP_WINDOW` is given up,
with an event carrying the last lines of its log.

Service processes do not depend on the daemon: after a daemon restart they are
re-adopted from their recorded pid and start time (pidfd watch, no waitpid).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from sandbox import process
from sandbox.errors import CorralError
from sandbox.spec import SandboxSpec
from supervisor.ports import Publisher, claim
from supervisor.templates import Service, Template

if TYPE_CHECKING:
    from supervisor.agents import Manager

log = logging.getLogger(__name__)

BACKOFF_START = 0.5
BACKOFF_CAP = 30.0
GIVE_UP_FAILURES = 5
GIVE_UP_WINDOW = 120.0
LOG_CAP = 4 * 1024 * 1024
STOP_TIMEOUT = 10.0


@dataclass
class SvcState:
    svc: Service
    host_port: int | None = None
    pid: int | None = None
    pid_start: float | None = None
    state: str = "stopped"  # starting | running | backoff | failed | stopped
    health: str = "unknown"  # unknown | starting | healthy | unhealthy
    restarts: int = 0
    failures: list[float] = field(default_factory=list)
    backoff: float = BACKOFF_START
    last_exit: int | None = None
    reason: str = ""
    publisher: Publisher | None = None
    healthy_event: asyncio.Event = field(default_factory=asyncio.Event)
    started_at: float = 0.0
    consecutive_fail: int = 0


class ServiceSet:
    def __init__(self, mgr: Manager, agent: str, spec: SandboxSpec, tpl: Template) -> None:
        self.mgr = mgr
        self.agent = agent
        self.spec = spec
        self.tpl = tpl
        self.dir = f"{spec.state_dir}/services"
        ports = {lease.purpose: lease.value for lease in mgr.store.leases(agent, "port")}
        self.states = {s.name: SvcState(s, ports.get(s.name)) for s in tpl.start_order()}
        self.tasks: list[asyncio.Task[Any]] = []
        self.closing = False
        assert spec.network is not None  # noqa: S101 - services need a netns
        self.ip = spec.network.address.split("/")[0]

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        Path(self.dir).mkdir(parents=True, exist_ok=True, mode=0o700)
        for st in self.states.values():
            for dep in st.svc.depends_on:
                await self._wait_healthy(self.states[dep], st)
            await self._publish(st)
            await self._setup_once(st)
            await self._launch(st)
            self._watch(st)

    async def adopt(self) -> None:
        """After a daemon restart: re-watch the services that are still running."""
        Path(self.dir).mkdir(parents=True, exist_ok=True, mode=0o700)
        for st in self.states.values():
            await self._publish(st)
            rec = self._read_record(st)
            alive = False
            if rec:
                with contextlib.suppress(psutil.Error):
                    p = psutil.Process(rec["pid"])
                    alive = abs(p.create_time() - rec["start"]) < 0.05 and \
                        p.status() != psutil.STATUS_ZOMBIE
            if alive and rec:
                st.pid, st.pid_start, st.state = rec["pid"], rec["start"], "running"
                st.restarts = rec.get("restarts", 0)
                st.started_at = time.time() - 3600  # past any start period
            else:
                await self._launch(st)
            self._watch(st)

    def _watch(self, st: SvcState) -> None:
        label = f"{self.agent}-{st.svc.name}"
        self.tasks.append(self.mgr.spawn(self._supervise(st), f"svc-{label}"))
        self.tasks.append(self.mgr.spawn(self._health_loop(st), f"health-{label}"))

    async def stop(self) -> None:
        """Reverse start order: SIGTERM, then SIGKILL after a timeout."""
        self.closing = True
        for t in self.tasks:
            t.cancel()
        for st in reversed(list(self.states.values())):
            await self._terminate(st)
            st.state = "stopped"
            st.health = "unknown"
            if st.publisher is not None:
                await st.publisher.close()
                st.publisher = None

    async def detach(self) -> None:
        """Daemon shutdown: stop watching, leave the services running."""
        self.closing = True
        for t in self.tasks:
            t.cancel()
        for st in self.states.values():
            if st.publisher is not None:
                await st.publisher.close()

    def describe(self) -> dict[str, Any]:
        return {name: {"state": st.state, "health": st.health, "port": st.svc.port,
                       "host_port": st.host_port, "restarts": st.restarts,
                       "pid": st.pid, "reason": st.reason, "last_exit": st.last_exit}
                for name, st in self.states.items()}

    # ------------------------------------------------------------------ pieces
    def _log_path(self, st: SvcState) -> str:
        return f"{self.dir}/{st.svc.name}.log"

    def _record_path(self, st: SvcState) -> str:
        return f"{self.dir}/{st.svc.name}.json"

    def _read_record(self, st: SvcState) -> dict[str, Any] | None:
        try:
            rec: dict[str, Any] = json.loads(Path(self._record_path(st)).read_text())
            return rec
        except (OSError, ValueError):
            return None

    def _env(self, st: SvcState) -> dict[str, str]:
        return process.workload_env(self.spec, dict(st.svc.env))

    def _cwd(self) -> str:
        return self.spec.workspace.inside if self.spec.workspace.mode != "none" else "/home/agent"

    async def _publish(self, st: SvcState) -> None:
        if st.svc.port is None or st.host_port is None or st.publisher is not None:
            return
        claim(st.host_port, f"{self.mgr.scope} {self.agent} {st.svc.name}")
        pub = Publisher(st.host_port, self.ip, st.svc.port, f"{self.agent}/{st.svc.name}")
        try:
            await pub.start()
        except OSError as e:
            st.reason = f"cannot publish host port {st.host_port}: {e}"
            self.mgr.emit("service.publish_failed", self.agent, service=st.svc.name,
                          port=st.host_port, error=str(e))
            return
        st.publisher = pub

    def _open_log(self, st: SvcState) -> int:
        path = self._log_path(st)
        with contextlib.suppress(OSError):
            if Path(path).stat().st_size > LOG_CAP:
                Path(path).replace(path + ".1")
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)

    def _spawn(self, argv: tuple[str, ...], st: SvcState) -> int:
        row = self.mgr.row(self.agent)
        logfd = self._open_log(st)
        devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return process.enter(self.spec, row.init_pid, list(argv), env=self._env(st),
                                 cwd=self._cwd(), stdin=devnull, stdout=logfd, stderr=logfd,
                                 ctty=False)
        finally:
            os.close(logfd)
            os.close(devnull)

    async def _setup_once(self, st: SvcState) -> None:
        if not st.svc.setup:
            return
        marker = f"{self.dir}/{st.svc.name}.setup-done"
        if Path(marker).exists():
            return
        pid = self._spawn(st.svc.setup, st)
        code = await _wait_pid(pid)
        if code != 0:
            st.state, st.reason = "failed", f"setup exited with status {code}"
            self.mgr.emit("service.setup_failed", self.agent, service=st.svc.name, status=code,
                          log=self._log_tail(st))
            raise CorralError(f"service {st.svc.name}: setup failed with status {code}",
                              hint=f"corral logs {self.agent} --service {st.svc.name}")
        Path(marker).write_text(str(time.time()))

    async def _launch(self, st: SvcState) -> None:
        pid = self._spawn(st.svc.command, st)
        st.pid = pid
        with contextlib.suppress(psutil.Error):
            st.pid_start = psutil.Process(pid).create_time()
        st.state = "running"
        st.health = "starting" if st.svc.health else "healthy"
        st.started_at = time.time()
        st.consecutive_fail = 0
        if st.svc.health is None:
            st.healthy_event.set()
        else:
            st.healthy_event.clear()
        Path(self._record_path(st)).write_text(json.dumps(
            {"pid": pid, "start": st.pid_start, "restarts": st.restarts}))
        self.mgr.emit("service.started", self.agent, service=st.svc.name, pid=pid)

    async def _wait_healthy(self, dep: SvcState, st: SvcState) -> None:
        h = dep.svc.health
        budget = 60.0
        if h is not None:
            budget = h.start_period + (h.retries + 1) * (h.interval + h.timeout) + 30
        try:
            await asyncio.wait_for(dep.healthy_event.wait(), budget)
        except TimeoutError:
            raise CorralError(f"service {st.svc.name}: dependency {dep.svc.name} never became "
                              "healthy", hint=f"corral logs {self.agent} --service "
                              f"{dep.svc.name}") from None

    async def _terminate(self, st: SvcState) -> None:
        if st.pid is None:
            return
        pid = st.pid
        st.pid = None
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(_wait_pid(pid), STOP_TIMEOUT)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(_wait_pid(pid), 5)
        with contextlib.suppress(FileNotFoundError):
            Path(self._record_path(st)).unlink()

    def _log_tail(self, st: SvcState, n: int = 10) -> str:
        try:
            data = Path(self._log_path(st)).read_bytes()[-4096:]
        except OSError:
            return ""
        return "\n".join(data.decode(errors="replace").splitlines()[-n:])

    # ------------------------------------------------------------------ supervision
    async def _supervise(self, st: SvcState) -> None:
        while not self.closing:
            if st.pid is None:
                return
            code = await _wait_pid(st.pid)
            if self.closing:
                return
            st.pid = None
            st.last_exit = code
            st.health = "unhealthy" if st.svc.health else "unknown"
            st.healthy_event.clear()
            self.mgr.emit("service.exited", self.agent, service=st.svc.name, status=code)
            policy = st.svc.restart
            if policy == "never" or (policy == "on-failure" and code == 0):
                st.state = "stopped"
                self._agent_health()
                return
            nowt = time.monotonic()
            st.failures = [t for t in st.failures if nowt - t < GIVE_UP_WINDOW] + [nowt]
            if len(st.failures) >= GIVE_UP_FAILURES:
                st.state = "failed"
                st.reason = (f"gave up after {len(st.failures)} failures in "
                             f"{int(GIVE_UP_WINDOW)} s (last status {code})")
                self.mgr.emit("service.given_up", self.agent, service=st.svc.name,
                              reason=st.reason, log=self._log_tail(st))
                self._agent_health()
                return
            st.state = "backoff"
            self._agent_health()
            delay = st.backoff
            st.backoff = min(st.backoff * 2, BACKOFF_CAP)
            self.mgr.emit("service.restarting", self.agent, service=st.svc.name,
                          backoff=delay, restarts=st.restarts + 1)
            await asyncio.sleep(delay)
            if self.closing:
                return
            st.restarts += 1
            try:
                await self._launch(st)
            except CorralError as e:
                st.state, st.reason = "failed", str(e)
                self._agent_health()
                return

    async def _health_loop(self, st: SvcState) -> None:
        h = st.svc.health
        if h is None:
            return
        while not self.closing:
            await asyncio.sleep(h.interval)
            if st.state != "running":
                continue
            ok = await self._check(st)
            in_grace = time.time() - st.started_at < h.start_period
            if ok:
                st.consecutive_fail = 0
                if st.health != "healthy":
                    self._set_health(st, "healthy")
                    # A healthy run resets the backoff.
                    st.backoff = BACKOFF_START
                st.healthy_event.set()
            elif not in_grace:
                st.consecutive_fail += 1
                if st.consecutive_fail >= h.retries and st.health != "unhealthy":
                    self._set_health(st, "unhealthy")
                    st.healthy_event.clear()
                    if st.svc.restart != "never" and st.pid is not None and \
                            st.consecutive_fail >= h.retries * 3:
                        # Persistently unhealthy but alive: restart it.
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(st.pid, signal.SIGKILL)

    def _set_health(self, st: SvcState, health: str) -> None:
        old = st.health
        st.health = health
        self.mgr.emit("service.health", self.agent, service=st.svc.name, health=health,
                      previous=old)
        self._agent_health()

    def _agent_health(self) -> None:
        if self.closing:
            return
        bad = [n for n, s in self.states.items()
               if s.health == "unhealthy" or s.state in ("failed", "backoff")]
        row = self.mgr.store.get_agent(self.agent)
        if row is None or row.state not in ("running", "degraded"):
            return
        if bad and row.state == "running":
            self.mgr.set_state(self.agent, "degraded", f"unhealthy: {', '.join(bad)}")
        elif not bad and row.state == "degraded":
            self.mgr.set_state(self.agent, "running")

    async def _check(self, st: SvcState) -> bool:
        h = st.svc.health
        assert h is not None  # noqa: S101 - only called with a health config
        try:
            if h.http is not None:
                return await asyncio.wait_for(_http_ok(self.ip, st.svc.port or 80, h.http),
                                              h.timeout)
            if h.tcp is not None:
                _, w = await asyncio.wait_for(asyncio.open_connection(self.ip, h.tcp), h.timeout)
                w.close()
                return True
            if h.command:
                pid = self._spawn(h.command, st)
                try:
                    return await asyncio.wait_for(_wait_pid(pid), h.timeout) == 0
                except TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                    return False
        except (OSError, TimeoutError, CorralError):
            return False
        return False


async def _http_ok(ip: str, port: int, path: str) -> bool:
    reader, writer = await asyncio.open_connection(ip, port)
    try:
        writer.write(f"GET {path} HTTP/1.0\r\nHost: localhost\r\nUser-Agent: corral-health\r\n"
                     "\r\n".encode())
        await writer.drain()
        line = await reader.readline()
        parts = line.split()
        return len(parts) >= 2 and parts[1].isdigit() and int(parts[1]) < 500
    finally:
        writer.close()


def _alive(pid: int) -> bool:
    try:
        p = psutil.Process(pid)
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


async def _wait_pid(pid: int) -> int:
    """Exit code of `pid`: waitpid when it is our child, else watch a pidfd."""
    loop = asyncio.get_running_loop()
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return 255
    fut: asyncio.Future[None] = loop.create_future()
    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    loop.add_reader(fd, ready)
    try:
        await fut
    finally:
        loop.remove_reader(fd)
        os.close(fd)
    try:
        _, status = os.waitpid(pid, 0)
    except ChildProcessError:
        return 255  # not our child (adopted): the status is unknown
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code
