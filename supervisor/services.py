"""Per-agent services: started inside the sandbox, health-checked, restarted.

Each service of the template runs inside the agent's sandbox through
`sandbox.process.enter` (same namespaces, cgroup and privilege drop as the
session), in `depends_on` order, each waiting for what it depends on to be
healthy. Its port is published on the agent's leased host port (ports.py).

`process.enter` returns the pid of a small "mirror" process on the host side
that waits for the real command (a session leader inside the sandbox's pid
namespace) and exits the same way; the daemon waits on the mirror (a pidfd, so
it also works for adopted, non-child mirrors) and signals the real command
directly: a SIGKILL to the mirror alone would orphan the service.

Health checks (http / tcp / command) follow the template's interval, timeout,
retries and start period; during the start period the check polls faster so a
service is seen healthy soon after it is. Every change is an event, and an
unhealthy service makes the agent `degraded`. Like a Kubernetes liveness
probe, a service that stays unhealthy for `retries` checks is restarted
(unless its policy is `never`). Restarts follow the policy with exponential
backoff (BACKOFF_START doubling up to BACKOFF_CAP, reset after a run of
BACKOFF_RESET seconds); a service failing GIVE_UP_FAILURES times within
GIVE_UP_WINDOW is given up, with an event carrying the last lines of its log.

Service processes do not depend on the daemon: after a daemon restart they are
re-adopted from their recorded pid and start time.

Logs: each service writes straight into state_dir/services/NAME.log (so its
output is kept while the daemon is down); the file is bounded by copy-and-
truncate into NAME.log.1 once it passes LOG_CAP (O_APPEND writers carry on at
the new end).
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

BACKOFF_START = 0.5  # seconds before the first restart
BACKOFF_CAP = 30.0  # the backoff doubles up to this
BACKOFF_RESET = 30.0  # a run at least this long starts the backoff over
GIVE_UP_FAILURES = 5  # this many failures ...
GIVE_UP_WINDOW = 120.0  # ... within this many seconds: given up
FAST_POLL = 0.2  # health poll period during the start period
LOG_CAP = 4 * 1024 * 1024  # bytes per log file; one rotated file (.1) is kept
LOG_CHECK = 5.0  # seconds between log size checks
STOP_TIMEOUT = 10.0  # SIGTERM, then SIGKILL after this many seconds
LOG_TAIL_LINES = 10  # lines of log carried by failure events


@dataclass
class SvcState:
    """What the daemon knows of one running service (rebuilt on adoption)."""

    svc: Service
    host_port: int | None = None
    pid: int | None = None  # the host-side mirror process (what we wait on)
    pid_start: float | None = None  # its start time, to recognise it after a restart
    child: int | None = None  # the service itself (host pid; leader of its session)
    state: str = "stopped"  # starting | running | backoff | failed | stopped
    health: str = "unknown"  # unknown | starting | healthy | unhealthy
    restarts: int = 0
    failures: list[float] = field(default_factory=list)  # monotonic times of failures
    backoff: float = BACKOFF_START
    last_exit: int | None = None
    reason: str = ""
    publisher: Publisher | None = None
    healthy_event: asyncio.Event = field(default_factory=asyncio.Event)
    started_at: float = 0.0  # wall clock of the current run's start
    consecutive_fail: int = 0
    generation: int = 0  # bumped on every launch: stale health results are dropped
    unhealthy_kill: bool = False  # the current run was stopped for being unhealthy


class ServiceSet:
    """The services of one running agent."""

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
        if spec.network is None:
            raise CorralError(f"agent {agent}: services need the agent's network namespace")
        self.ip = spec.network.address.split("/")[0]

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Start every service in dependency order; on failure stop what started."""
        Path(self.dir).mkdir(parents=True, exist_ok=True, mode=0o700)
        self._watch_logs()
        try:
            for st in self.states.values():
                for dep in st.svc.depends_on:
                    await self._wait_healthy(self.states[dep], st)
                await self._publish(st)
                await self._setup_once(st)
                await self._launch(st)
                self._watch(st)
        except BaseException:
            await self.stop()
            raise

    async def wait_ready(self, budget: float = 120.0) -> bool:
        """Wait (bounded) until every service is healthy, or one has failed.

        The session starts after this, so it finds its services up; a service
        that is not healthy in time leaves the agent `degraded`, not stuck.
        """
        deadline = time.monotonic() + budget
        while time.monotonic() < deadline:
            if all(st.healthy_event.is_set() for st in self.states.values()):
                return True
            if any(st.state == "failed" for st in self.states.values()):
                return False
            await asyncio.sleep(0.05)
        return False

    async def adopt(self) -> None:
        """After a daemon restart: re-watch the services that are still running."""
        Path(self.dir).mkdir(parents=True, exist_ok=True, mode=0o700)
        self._watch_logs()
        for st in self.states.values():
            await self._publish(st)
            rec = self._read_record(st)
            if rec and _same_process(rec.get("pid"), rec.get("start")):
                st.pid, st.pid_start, st.child = rec["pid"], rec["start"], rec.get("child")
                st.state = "running"
                st.restarts = int(rec.get("restarts", 0))
                st.health = "unknown" if st.svc.health else "healthy"
                st.started_at = float(rec.get("started_at", 0.0))
                if st.svc.health is None:
                    st.healthy_event.set()
                self.mgr.emit("service.adopted", self.agent, service=st.svc.name, pid=st.child)
            else:
                if st.svc.setup:
                    await self._setup_once(st)
                await self._launch(st)
            self._watch(st)

    def _task(self, coro: Any, name: str) -> None:
        """A background task owned by this set (cancelled by stop/detach)."""
        self.tasks = [t for t in self.tasks if not t.done()]
        self.tasks.append(self.mgr.spawn(coro, name))

    def _watch(self, st: SvcState) -> None:
        label = f"{self.agent}-{st.svc.name}"
        self._task(self._supervise(st), f"svc-{label}")
        self._task(self._health_loop(st), f"health-{label}")

    def _watch_logs(self) -> None:
        self._task(self._log_loop(), f"svc-logs-{self.agent}")

    async def stop(self) -> None:
        """Reverse start order: SIGTERM, then SIGKILL after a timeout."""
        self.closing = True
        for t in self.tasks:
            t.cancel()
        for st in reversed(list(self.states.values())):
            was = st.pid is not None
            await self._terminate(st)
            st.state = "stopped"
            st.health = "unknown"
            if st.publisher is not None:
                await st.publisher.close()
                st.publisher = None
            if was:
                self.mgr.emit("service.stopped", self.agent, service=st.svc.name)

    async def detach(self) -> None:
        """Daemon shutdown: stop watching, leave the services running."""
        self.closing = True
        for t in self.tasks:
            t.cancel()
        for st in self.states.values():
            if st.publisher is not None:
                await st.publisher.close()
                st.publisher = None

    def describe(self) -> dict[str, Any]:
        return {name: {"state": st.state, "health": st.health, "port": st.svc.port,
                       "host_port": st.host_port, "restarts": st.restarts,
                       "pid": st.child, "reason": st.reason, "last_exit": st.last_exit,
                       "backoff": st.backoff}
                for name, st in self.states.items()}

    def sync_agent_state(self) -> None:
        """Bring the agent's running/degraded state in line with the services."""
        self._agent_health()

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

    def _write_record(self, st: SvcState) -> None:
        Path(self._record_path(st)).write_text(json.dumps(
            {"pid": st.pid, "start": st.pid_start, "child": st.child, "restarts": st.restarts,
             "started_at": st.started_at}))

    def _env(self, st: SvcState) -> dict[str, str]:
        return process.workload_env(self.spec, dict(st.svc.env))

    def _cwd(self) -> str:
        return self.spec.workspace.inside if self.spec.workspace.mode != "none" else "/home/agent"

    async def _publish(self, st: SvcState) -> None:
        if st.svc.port is None or st.host_port is None or st.publisher is not None:
            return
        owner = f"{self.mgr.scope} {self.agent} {st.svc.name}"
        if not claim(st.host_port, owner):
            st.reason = f"host port {st.host_port} is claimed by another corral daemon"
            self.mgr.emit("service.publish_failed", self.agent, service=st.svc.name,
                          port=st.host_port, error=st.reason)
            return
        pub = Publisher(st.host_port, self.ip, st.svc.port, f"{self.agent}/{st.svc.name}")
        try:
            await pub.start()
        except OSError as e:
            st.reason = f"cannot publish host port {st.host_port}: {e.strerror or e}"
            self.mgr.emit("service.publish_failed", self.agent, service=st.svc.name,
                          port=st.host_port, error=str(e))
            return
        st.publisher = pub

    def _open_log(self, st: SvcState) -> int:
        _rotate(self._log_path(st), LOG_CAP)
        return os.open(self._log_path(st), os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                       0o600)

    def _spawn(self, argv: tuple[str, ...], st: SvcState, keep_output: bool = True) -> int:
        """Blocking (fork + exec handshake): call through asyncio.to_thread."""
        row = self.mgr.row(self.agent)
        out = self._open_log(st) if keep_output else os.open(os.devnull, os.O_WRONLY |
                                                              os.O_CLOEXEC)
        devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return process.enter(self.spec, row.init_pid, list(argv), env=self._env(st),
                                 cwd=self._cwd(), stdin=devnull, stdout=out, stderr=out,
                                 ctty=False)
        finally:
            os.close(out)
            os.close(devnull)

    async def _setup_once(self, st: SvcState) -> None:
        if not st.svc.setup:
            return
        marker = f"{self.dir}/{st.svc.name}.setup-done"
        if Path(marker).exists():
            return
        st.state = "starting"
        pid = await asyncio.to_thread(self._spawn, st.svc.setup, st)
        code = await _wait_pid(pid)
        if code != 0:
            st.state, st.reason = "failed", f"setup exited with status {code}"
            self.mgr.emit("service.setup_failed", self.agent, service=st.svc.name, status=code,
                          log=self._log_tail(st))
            raise CorralError(f"service {st.svc.name}: setup failed with status {code}",
                              hint=f"corral logs {self.agent} --service {st.svc.name}")
        Path(marker).write_text(str(time.time()))

    async def _launch(self, st: SvcState) -> None:
        st.generation += 1
        st.unhealthy_kill = False
        pid = await asyncio.to_thread(self._spawn, st.svc.command, st)
        st.pid = pid
        st.child = None
        with contextlib.suppress(psutil.Error):
            mirror = psutil.Process(pid)
            st.pid_start = mirror.create_time()
            kids = mirror.children()
            st.child = kids[0].pid if kids else None
        st.state = "running"
        st.reason = ""
        st.health = "starting" if st.svc.health else "healthy"
        st.started_at = time.time()
        st.consecutive_fail = 0
        if st.svc.health is None:
            st.healthy_event.set()
        else:
            st.healthy_event.clear()
        self._write_record(st)
        self.mgr.emit("service.started", self.agent, service=st.svc.name, pid=st.child,
                      restarts=st.restarts)

    async def _wait_healthy(self, dep: SvcState, st: SvcState) -> None:
        h = dep.svc.health
        budget = 60.0
        if h is not None:
            budget = h.start_period + (h.retries + 1) * (h.interval + h.timeout) + 30
        waiter = asyncio.ensure_future(dep.healthy_event.wait())
        try:
            # Give up early when the dependency has itself been given up.
            deadline = time.monotonic() + budget
            while not waiter.done():
                if dep.state == "failed":
                    raise CorralError(f"service {st.svc.name}: dependency {dep.svc.name} "
                                      f"failed: {dep.reason}", hint=f"corral logs {self.agent}"
                                      f" --service {dep.svc.name}")
                if time.monotonic() > deadline:
                    raise CorralError(f"service {st.svc.name}: dependency {dep.svc.name} never"
                                      " became healthy", hint=f"corral logs {self.agent} "
                                      f"--service {dep.svc.name}")
                await asyncio.wait([waiter], timeout=0.5)
        finally:
            waiter.cancel()

    def _group(self, leader: int | None) -> list[int]:
        """The agent's processes in the session group led by `leader` (never anyone else's)."""
        if leader is None:
            return []
        try:
            pids = self.mgr.cg.procs(self.spec.cgroup)
        except (CorralError, OSError):
            return []
        out = []
        for pid in pids:
            with contextlib.suppress(OSError):
                if os.getpgid(pid) == leader:
                    out.append(pid)
        return out

    def _kill_group(self, st: SvcState, sig: int) -> None:
        for pid in self._group(st.child):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    async def _terminate(self, st: SvcState) -> None:
        if st.pid is None:
            return
        pid = st.pid
        st.pid = None
        target = st.child if st.child is not None else pid
        with contextlib.suppress(ProcessLookupError):
            os.kill(target, signal.SIGTERM)
        try:
            await asyncio.wait_for(_wait_pid(pid), STOP_TIMEOUT)
        except TimeoutError:
            self._kill_group(st, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(_wait_pid(pid), 5)
        # Whatever the service left behind in its session (npm's node, ...).
        self._kill_group(st, signal.SIGKILL)
        st.child = None
        with contextlib.suppress(FileNotFoundError):
            Path(self._record_path(st)).unlink()

    def _log_tail(self, st: SvcState, n: int = LOG_TAIL_LINES) -> str:
        try:
            with Path(self._log_path(st)).open("rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 8192))
                data = f.read()
        except OSError:
            return ""
        return "\n".join(data.decode(errors="replace").splitlines()[-n:])

    async def _log_loop(self) -> None:
        while not self.closing:
            await asyncio.sleep(LOG_CHECK)
            for st in self.states.values():
                await asyncio.to_thread(_rotate, self._log_path(st), LOG_CAP)

    # ------------------------------------------------------------------ supervision
    async def _supervise(self, st: SvcState) -> None:
        while not self.closing:
            pid = st.pid
            if pid is None:
                return
            code = await _wait_pid(pid)
            if self.closing or st.pid != pid:
                return
            uptime = time.time() - st.started_at
            self._kill_group(st, signal.SIGKILL)
            st.pid = st.child = None
            st.last_exit = code
            forced = st.unhealthy_kill
            st.healthy_event.clear()
            self.mgr.emit("service.exited", self.agent, service=st.svc.name, status=code,
                          unhealthy=forced)
            policy = st.svc.restart
            if policy == "never" or (policy == "on-failure" and code == 0 and not forced):
                st.state = "stopped" if code == 0 else "failed"
                st.reason = f"exited with status {code}"
                st.health = "unknown"
                self._agent_health()
                return
            if uptime >= BACKOFF_RESET:
                st.backoff = BACKOFF_START
            st.failures, give_up = record_failure(st.failures, time.monotonic())
            if give_up:
                st.state = "failed"
                why = "unhealthy" if forced else f"last status {code}"
                st.reason = (f"gave up after {len(st.failures)} failures in "
                             f"{int(GIVE_UP_WINDOW)} s ({why})")
                self._set_health(st, "unhealthy" if st.svc.health else "unknown")
                self.mgr.emit("service.given_up", self.agent, service=st.svc.name,
                              reason=st.reason, status=code, log=self._log_tail(st))
                self._agent_health()
                return
            st.state = "backoff"
            st.reason = "unhealthy" if forced else f"exited with status {code}"
            if st.svc.health is not None and st.health != "unhealthy":
                self._set_health(st, "unhealthy")
            self._agent_health()
            delay, st.backoff = st.backoff, next_backoff(st.backoff)
            self.mgr.emit("service.restarting", self.agent, service=st.svc.name,
                          backoff=delay, restarts=st.restarts + 1, status=code)
            await asyncio.sleep(delay)
            if self.closing:
                return
            st.restarts += 1
            try:
                await self._launch(st)
            except CorralError as e:
                st.state, st.reason = "failed", str(e)
                self.mgr.emit("service.given_up", self.agent, service=st.svc.name,
                              reason=st.reason, status=None, log=self._log_tail(st))
                self._agent_health()
                return

    async def _health_loop(self, st: SvcState) -> None:
        h = st.svc.health
        if h is None:
            return
        while not self.closing:
            in_grace = time.time() - st.started_at < h.start_period
            fast = st.health == "starting" and in_grace
            await asyncio.sleep(min(h.interval, FAST_POLL) if fast else h.interval)
            if st.state != "running" or st.pid is None:
                continue
            gen = st.generation
            ok = await self._check(st)
            if self.closing or st.state != "running" or gen != st.generation:
                continue  # restarted (or stopped) while the check ran
            in_grace = time.time() - st.started_at < h.start_period
            if ok:
                st.consecutive_fail = 0
                if st.health != "healthy":
                    self._set_health(st, "healthy")
                st.healthy_event.set()
                continue
            if in_grace:
                continue
            st.consecutive_fail += 1
            if st.consecutive_fail < h.retries:
                continue
            if st.health != "unhealthy":
                self._set_health(st, "unhealthy")
                st.healthy_event.clear()
            if st.svc.restart != "never" and not st.unhealthy_kill:
                # Alive but failing its checks: restart it (a failure for the
                # backoff and give-up count), SIGKILL if SIGTERM is ignored.
                st.unhealthy_kill = True
                log.info("[agent=%s svc=%s] unhealthy after %d checks: restarting", self.agent,
                         st.svc.name, st.consecutive_fail)
                self._task(self._kill_unhealthy(st, gen), f"svc-kill-{self.agent}-{st.svc.name}")

    async def _kill_unhealthy(self, st: SvcState, gen: int) -> None:
        # The mirror forwards SIGTERM too, should the service's own pid be unknown.
        target = st.child if st.child is not None else st.pid
        if target is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(target, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        while time.monotonic() < deadline:
            if st.generation != gen or st.pid is None or self.closing:
                return
            await asyncio.sleep(0.2)
        if st.generation == gen and st.pid is not None and not self.closing:
            self._kill_group(st, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                os.kill(st.pid, signal.SIGKILL)

    def _set_health(self, st: SvcState, health: str) -> None:
        old = st.health
        if old == health:
            return
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
        reason = f"unhealthy: {', '.join(bad)}"
        if bad and (row.state == "running" or row.reason != reason):
            self.mgr.set_state(self.agent, "degraded", reason)
        elif not bad and row.state == "degraded":
            self.mgr.set_state(self.agent, "running")

    async def _check(self, st: SvcState) -> bool:
        h = st.svc.health
        if h is None:
            return True
        try:
            if h.http is not None:
                return await asyncio.wait_for(_http_ok(self.ip, st.svc.port or 80, h.http),
                                              h.timeout)
            if h.tcp is not None:
                _, w = await asyncio.wait_for(asyncio.open_connection(self.ip, h.tcp), h.timeout)
                w.close()
                return True
            if h.command:
                pid = await asyncio.to_thread(self._spawn, h.command, st, False)
                try:
                    return await asyncio.wait_for(_wait_pid(pid), h.timeout) == 0
                except TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                    return False
        except (OSError, TimeoutError, CorralError):
            return False
        return False


def next_backoff(current: float) -> float:
    """The delay after `current`: doubled, capped at BACKOFF_CAP."""
    return min(current * 2, BACKOFF_CAP)


def record_failure(failures: list[float], now: float) -> tuple[list[float], bool]:
    """Add a failure at `now` (monotonic); True when the service should be given up.

    Only failures within the last GIVE_UP_WINDOW seconds count, so a service
    that fails now and then is restarted forever, one that crash-loops is not.
    """
    recent = [t for t in failures if now - t < GIVE_UP_WINDOW] + [now]
    return recent, len(recent) >= GIVE_UP_FAILURES


def _rotate(path: str, cap: int) -> None:
    """Copy-and-truncate `path` into `path.1` once it is larger than `cap`.

    Writers hold the file open with O_APPEND, so after the truncation they go
    on writing at the (new) end instead of leaving a hole.
    """
    try:
        if Path(path).stat().st_size <= cap:
            return
        with Path(path).open("rb") as src, Path(path + ".1").open("wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        os.truncate(path, 0)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("cannot rotate %s: %s", path, e)


def _same_process(pid: Any, start: Any) -> bool:
    """Is `pid` still the process that started at `start` (and not a zombie)?"""
    if not isinstance(pid, int) or not isinstance(start, int | float):
        return False
    try:
        p = psutil.Process(pid)
        return abs(p.create_time() - start) < 0.05 and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
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
    return _exit_code(status)


def _exit_code(status: int) -> int:
    """A wait status as a shell reports it: N, or 128+signal."""
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code
