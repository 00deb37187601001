"""The daemon: wiring, the single-instance lock, sd_notify and signals.

`run(config_path)` is what `corral daemon` (and systemd's ExecStart) runs: it
loads the config, takes the state_dir lock (one daemon per state_dir), opens
the store (refusing to start on a corrupted one — agents are never touched),
picks the cgroup driver (under systemd with Delegate=yes it first moves itself
into a `supervisor` leaf: cgroup v2's no-internal-processes rule), reconciles
every stored agent, then serves the API and SSH and tells systemd READY=1.

On SIGTERM it stops serving and exits; agents keep running in their keepers
(corral.service has KillMode=process) and are re-adopted on the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from sandbox.cgroups import detect
from sandbox.cgroups.base import read_proc_cgroup
from sandbox.errors import CorralError
from supervisor import __version__
from supervisor.config import Config, load_config
from supervisor.events import EventBus
from supervisor.layout import scope_of
from supervisor.store import Store
from supervisor.templates import TemplateRegistry

log = logging.getLogger("corral.daemon")


def sd_notify(message: str) -> None:
    """Send a message to systemd's notify socket, if we run under Type=notify."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(addr)
        s.sendall(message.encode())


def _lock_state_dir(state_dir: str) -> int:
    Path(state_dir).mkdir(parents=True, exist_ok=True, mode=0o711)
    fd = os.open(f"{state_dir}/daemon.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = Path(f"{state_dir}/daemon.lock").read_text().strip() or "?"
        os.close(fd)
        raise CorralError(f"another corral daemon (pid {pid}) is using {state_dir}",
                          hint="stop it, or give this one its own state_dir") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _vacate_v2_root(root: str) -> None:
    """Move the delegated unit's own processes (its placeholder) into a
    `holder` leaf, so controllers can be enabled below it (cgroup v2's
    no-internal-processes rule). Only ever the processes of that unit."""
    from sandbox.cgroups import cgroup_mounts

    mount, _ = cgroup_mounts()
    if mount is None:
        return
    top = Path(mount, root.lstrip("/"))
    if not top.is_dir():
        raise CorralError(f"cgroup {top} (CORRAL_CGROUP_ROOT) does not exist",
                          hint="is corral-agents.service running? (systemctl start corral)")
    holder = top / "holder"
    for pid in (top / "cgroup.procs").read_text().split():
        holder.mkdir(exist_ok=True)
        with contextlib.suppress(ProcessLookupError, OSError):
            (holder / "cgroup.procs").write_text(pid)


class _Timeline:
    """Where start-up time goes, for the ready log line (restart time matters)."""

    def __init__(self) -> None:
        self.marks: list[tuple[str, float]] = []
        self.last = time.monotonic()

    def mark(self, what: str) -> None:
        now = time.monotonic()
        self.marks.append((what, now - self.last))
        self.last = now

    def __str__(self) -> str:
        return ", ".join(f"{what} {secs * 1e3:.0f} ms" for what, secs in self.marks)


def _process_age() -> float:
    """Seconds since this process was exec'd (interpreter start and imports included)."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        start = int(fields[19]) / os.sysconf("SC_CLK_TCK")
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start)
    except (OSError, ValueError, IndexError):
        return 0.0


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.stop_event = asyncio.Event()
        self.manager: Any = None
        self.api: Any = None
        self.ssh: Any = None
        self.netpolicy: Any = None

    async def run(self) -> int:
        cfg = self.config
        tl = _Timeline()
        tl.marks.append(("exec to run", _process_age()))
        for d in (cfg.state_dir, f"{cfg.state_dir}/agents"):
            Path(d).mkdir(parents=True, exist_ok=True, mode=0o711)
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True, mode=0o755)
        store = Store.open(f"{cfg.state_dir}/state.db")
        scope = scope_of(cfg.state_dir)
        own = read_proc_cgroup("self")
        root = os.environ.get("CORRAL_CGROUP_ROOT")
        if root:
            # Under systemd: agents live in corral-agents.service's delegated
            # subtree, not below our own unit (see systemd/corral-agents.service).
            own = {**own, "": root}
            _vacate_v2_root(root)
        cg = detect(cfg.cgroup_parent or f"corral-{scope}", own=own)
        if cg.version == "v2" and not root:
            cg.enter_leaf("supervisor")
        bus = EventBus(store, [(n.webhook, n.events) for n in cfg.notifications])
        from supervisor.agents import Manager
        registry = TemplateRegistry(cfg.templates, protected=(cfg.state_dir, cfg.run_dir))
        mgr = Manager(cfg, store, registry, cg, own, scope, bus)
        self.manager = mgr
        tl.mark("setup")
        try:
            from supervisor.netpolicy import NetPolicy
            self.netpolicy = NetPolicy(cfg, scope, mgr)
            await self.netpolicy.start()
            mgr.network = self.netpolicy
        except ImportError:
            log.warning("network policy module missing: agents get no egress rules")
        tl.mark("network")
        sd_notify("STATUS=reconciling agents")
        await mgr.reconcile()
        tl.mark("reconcile")
        mgr.spawn(mgr.monitor(), "resource-monitor")
        from supervisor.api import serve
        self.api = await serve(mgr, cfg.api_socket)
        tl.mark("api")
        try:
            from supervisor.ssh import start_ssh_server
            self.ssh = await start_ssh_server(
                mgr, cfg.ssh.host, cfg.ssh.port, f"{cfg.state_dir}/ssh_host_ed25519_key",
                f"{cfg.state_dir}/recordings")
        except ImportError:
            log.warning("ssh module missing: no SSH server")
        tl.mark("ssh")
        bus.emit("daemon.started", None, version=__version__, pid=os.getpid(),
                 cgroup_driver=cg.version)
        n = len(store.list_agents())
        sd_notify(f"READY=1\nSTATUS=serving {n} agents (cgroup {cg.version})\n"
                  f"MAINPID={os.getpid()}")
        log.info("corral %s ready: api %s, ssh %s:%s, cgroup %s, %d agents", __version__,
                 cfg.api_socket, cfg.ssh.host, cfg.ssh.port, cg.version, n)
        log.info("started in %.2f s since exec (%s)", _process_age(), tl)
        mgr.spawn(_warm_up_netns(), "netns-warm-up")
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop_event.set)
        await self.stop_event.wait()
        sd_notify("STOPPING=1\nSTATUS=stopping (agents keep running)")
        bus.emit("daemon.stopping", None, pid=os.getpid())
        await self.shutdown()
        store.close()
        return 0

    async def shutdown(self) -> None:
        if self.ssh is not None:
            self.ssh.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.ssh.wait_closed(), 3)
        if self.api is not None:
            with contextlib.suppress(Exception):
                await self.api.close()
        if self.manager is not None:
            await self.manager.close()
        if self.netpolicy is not None:
            with contextlib.suppress(Exception):
                await self.netpolicy.close()


async def _warm_up_netns() -> None:
    """Import pyroute2 (netns' rtnetlink codec, ~0.3 s) once the daemon is ready.

    Not before: start and restart do no netns work, and an import under the GIL
    slows reconcile. Not lazily in the first create: a user would wait for it.
    """
    from sandbox import netns
    t0 = time.monotonic()
    await asyncio.to_thread(netns.warm_up)
    log.debug("pyroute2 imported for network setup in %.0f ms", (time.monotonic() - t0) * 1e3)


def run(config_path: str | None = None) -> int:
    logging.basicConfig(
        level=os.environ.get("CORRAL_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        config = load_config(config_path)
        lock = _lock_state_dir(config.state_dir)
    except CorralError as e:
        print(f"corral: error: {e}", file=sys.stderr)
        return 1
    try:
        return asyncio.run(Daemon(config).run())
    except CorralError as e:
        print(f"corral: error: {e}", file=sys.stderr)
        return 1
    finally:
        os.close(lock)
