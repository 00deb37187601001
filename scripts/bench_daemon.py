#!/usr/bin/env python3
"""Benchmark: the daemon's create latency, memory with many agents, restart time.

Starts its own daemon (own temp config, state_dir, run_dir, API socket, SSH
port, a 198.19.x.0/23 subnet, port and uid ranges, unique agent names) and
measures, in one run:

1. create: `POST /v1/agents` with template `default` over a small git project
   until the answer comes back (the daemon answers once the agent is running:
   keeper spawned, sandbox started, session hub connected) — through a tiny
   unix-socket HTTP client, so the CLI's interpreter start is not counted —
   and the same through `corral create` for reference. Each run removes its
   agent again (`rm --force`), so all runs see the same daemon state.
2. memory with N idle agents (default 100): the daemon's and every keeper's
   RSS, USS and PSS (psutil.memory_full_info).
3. restart: SIGKILL the daemon with the N agents running, start it again and
   poll until the API answers, every agent is `running` and each has a new
   `agent.reconciled` event; timed from the new daemon's spawn.

Cleanup runs even on failure: every agent through `corral rm --force`, then
the daemon (SIGTERM), then an exact sweep of whatever is left with this
daemon's scope (the e2e tests' hard cleanup: keepers by cgroup, cgroups, nft
table, mounts, veths, port claims, run dir).

Results are printed and written to docs/bench-daemon.md. Needs root.
Usage: sudo .venv/bin/python scripts/bench_daemon.py [--runs 30] [--agents 100]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# The e2e tests' exact, scope-based sweep of what a daemon leaves behind.
from tests.e2e.conftest import Daemon as E2EDaemon  # noqa: E402
from tests.e2e.conftest import _hard_cleanup, free_port  # noqa: E402

CORRAL = str(REPO / ".venv" / "bin" / "corral")


def say(*args: object) -> None:
    print(*args, flush=True)


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    k = (len(xs) - 1) * p
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def mb(n: float) -> str:
    return f"{n / 2**20:.1f}"


class _UnixConn(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("corral", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self._path)
        self.sock = s


class Api:
    """The smallest client of the daemon's HTTP+JSON API: one connection per call."""

    def __init__(self, path: str) -> None:
        self.path = path

    def call(self, method: str, url: str, body: Any = None, timeout: float = 300) -> Any:
        conn = _UnixConn(self.path, timeout)
        try:
            payload = None if body is None else json.dumps(body).encode()
            conn.request(method, url, payload,
                         {"Content-Type": "application/json"} if payload else {})
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        if resp.status >= 300:
            raise RuntimeError(f"{method} {url}: HTTP {resp.status}: {data[:400]!r}")
        return json.loads(data) if data else None


class BenchDaemon:
    """A daemon of our own, in a temp tree; `.e2e` is what the hard cleanup needs."""

    def __init__(self, base: Path, uniq: str, log_level: str) -> None:
        self.base = base
        self.uniq = uniq
        self.log_level = log_level
        state = base / "state"
        # run_dir holds unix sockets (108-byte path limit): keep it short.
        run = Path(f"/tmp/cbd-{uniq}")
        run.mkdir(mode=0o755)
        tdir = base / "templates"
        tdir.mkdir()
        # /23: 128 agent /30s, room for 100 agents plus the create runs.
        third = 2 * secrets.randbelow(128)
        self.subnet = f"198.19.{third}.0/23"
        plo = 30000 + 100 * secrets.randbelow(90)
        ulo = 300000 + 1000 * secrets.randbelow(600)
        self.config = base / "corral.yaml"
        ssh_port = free_port()
        self.config.write_text(
            f"state_dir: {state}\nrun_dir: {run}\napi_socket: {run}/corral.sock\n"
            f"ssh: {{listen: \"127.0.0.1:{ssh_port}\"}}\n"
            f"network: {{subnet: {self.subnet}}}\n"
            f"ports: {{range: \"{plo}-{plo + 99}\"}}\n"
            f"uids: {{range: \"{ulo}-{ulo + 999}\"}}\n"
            f"templates: [{tdir}, {REPO / 'templates'}]\nstop_timeout: 5\n")
        self.e2e = E2EDaemon(str(self.config), str(state), str(run), f"{run}/corral.sock",
                             ssh_port, self.subnet, (plo, plo + 99),
                             log_path=str(base / "daemon.log"))
        self.api = Api(self.e2e.socket)
        self.proc: subprocess.Popen[bytes] | None = None

    def spawn(self) -> None:
        env = dict(os.environ, CORRAL_LOG_LEVEL=self.log_level)
        with open(self.e2e.log_path, "ab") as logf:
            self.proc = subprocess.Popen([CORRAL, "daemon", "--config", str(self.config)],
                                         stdout=logf, stderr=logf, env=env,
                                         start_new_session=True)

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(OSError, RuntimeError, http.client.HTTPException):
                self.api.call("GET", "/v1/status", timeout=10)
                return
            time.sleep(0.01)
        raise RuntimeError(f"daemon not ready in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        try:
            return Path(self.e2e.log_path).read_text()[-4000:]
        except OSError:
            return ""

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([CORRAL, "--socket", self.e2e.socket, *args], capture_output=True,
                              text=True, timeout=300)

    def create(self, name: str, project: str) -> None:
        self.e2e.created.append(name)
        self.api.call("POST", "/v1/agents", {"name": name, "template": "default",
                                             "project": project, "set": [], "start": True})

    def remove(self, name: str) -> None:
        self.api.call("DELETE", f"/v1/agents/{name}?force=1")

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def cleanup(self) -> None:
        """Agents through the CLI, then the daemon, then the scope sweep."""
        with contextlib.suppress(Exception):
            if self.proc is None or self.proc.poll() is not None:
                self.spawn()
                self.wait_ready(60)
        names = set(self.e2e.created)
        with contextlib.suppress(Exception):
            names |= {a["name"] for a in self.api.call("GET", "/v1/agents?all=1")}
        def rm(name: str) -> None:
            with contextlib.suppress(Exception):
                self.cli("rm", "--force", name)

        # A few at a time: each `corral` process pays the CLI's start-up.
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(rm, sorted(names)))
        with contextlib.suppress(Exception):
            self.stop()
        self.e2e.created = sorted(names)
        _hard_cleanup(self.e2e)


def make_project(base: Path) -> str:
    p = base / "project"
    p.mkdir()
    (p / "README.md").write_text("bench project\n")
    git = ["git", "-c", "user.email=b@example.invalid", "-c", "user.name=bench"]
    subprocess.run([*git, "init", "-q", "-b", "main", str(p)], check=True)
    subprocess.run([*git, "-C", str(p), "add", "-A"], check=True)
    subprocess.run([*git, "-C", str(p), "commit", "-qm", "init"], check=True)
    return str(p)


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_create(d: BenchDaemon, project: str, runs: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"api": [], "cli": []}
    # One warm-up each: first-use costs (imports, nft table, cgroup parents).
    for i in range(runs + 1):
        for how in ("api", "cli"):
            name = f"{d.uniq}-{how[0]}{i}"
            if how == "api":
                t = timed(lambda n=name: d.create(n, project))  # type: ignore[misc]
            else:
                d.e2e.created.append(name)

                def via_cli(n: str = name) -> None:
                    cp = d.cli("create", n, "--template", "default", "--project", project)
                    if cp.returncode != 0:
                        raise RuntimeError(f"corral create failed: {cp.stderr}")
                t = timed(via_cli)
            d.remove(name)
            if i > 0:
                out[how].append(t)
    return out


def agent_pids(d: BenchDaemon) -> list[int]:
    pids = []
    for a in d.api.call("GET", "/v1/agents?all=1"):
        info = d.api.call("GET", f"/v1/agents/{a['name']}")
        if info["session"]["keeper_pid"]:
            pids.append(int(info["session"]["keeper_pid"]))
    return pids


def mem(pid: int) -> dict[str, float]:
    mi = psutil.Process(pid).memory_full_info()
    return {"rss": mi.rss, "uss": getattr(mi, "uss", 0), "pss": getattr(mi, "pss", 0)}


def bench_memory(d: BenchDaemon, names: list[str]) -> dict[str, Any]:
    assert d.proc is not None
    keepers = agent_pids(d)
    if len(keepers) != len(names):
        raise RuntimeError(f"{len(keepers)} keepers for {len(names)} agents")
    ks = [mem(p) for p in keepers]
    return {"daemon": mem(d.proc.pid), "keepers": ks}


def reconciled_counts(d: BenchDaemon) -> dict[str, int]:
    counts: dict[str, int] = {}
    for ev in d.api.call("GET", "/v1/events"):
        if ev["kind"] == "agent.reconciled" and ev["agent"]:
            counts[ev["agent"]] = counts.get(ev["agent"], 0) + 1
    return counts


def bench_restart(d: BenchDaemon, names: list[str]) -> dict[str, float]:
    """SIGKILL, spawn again; seconds until the API answers and until all are re-adopted."""
    before = reconciled_counts(d)
    assert d.proc is not None
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait(30)
    d.proc = None
    t0 = time.perf_counter()
    d.spawn()
    d.wait_ready()
    t_api = time.perf_counter() - t0
    deadline = time.monotonic() + 120
    want = set(names)
    while time.monotonic() < deadline:
        agents = {a["name"]: a["state"] for a in d.api.call("GET", "/v1/agents?all=1")}
        if all(agents.get(n) == "running" for n in want):
            counts = reconciled_counts(d)
            if all(counts.get(n, 0) > before.get(n, 0) for n in want):
                return {"api": t_api, "all": time.perf_counter() - t0}
        time.sleep(0.02)
    raise RuntimeError(f"agents not all re-adopted in 120 s:\n{d.log()}")


def machine() -> str:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memt = psutil.virtual_memory().total
    return (f"{os.cpu_count()} cores ({cpu}), {memt / 2**30:.1f} GiB RAM, "
            f"Linux {platform.release()}, Python {platform.python_version()}")


def render(args: argparse.Namespace, create: dict[str, list[float]], memres: dict[str, Any],
           restarts: list[dict[str, float]], setup_s: float) -> str:
    def row(label: str, xs: list[float]) -> str:
        return (f"| {label} | {len(xs)} | {statistics.median(xs) * 1e3:.0f} | "
                f"{pct(xs, 0.95) * 1e3:.0f} | {min(xs) * 1e3:.0f} | {max(xs) * 1e3:.0f} |")

    def krow(key: str) -> str:
        v = [k[key] for k in memres["keepers"]]
        return (f"| keeper {key.upper()} (each) | {mb(statistics.median(v))} | "
                f"{mb(max(v))} | {mb(sum(v))} |")

    lines = [
        "# Daemon benchmarks",
        "",
        f"Date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}  ",
        f"Machine: {machine()}  ",
        f"Command: `sudo .venv/bin/python scripts/bench_daemon.py --runs {args.runs} "
        f"--agents {args.agents}`  ",
        "Daemon log level: " + args.log_level + "; other work may share the machine "
        "(numbers are wall-clock).",
        "",
        "## create --template default until the session runs (target p50 ≤ 100 ms)",
        "",
        "Each run creates one agent over a one-commit git project on an otherwise idle "
        "daemon and removes it again. `api` is the `POST /v1/agents` round trip (it "
        "answers once the agent is running); `cli` is `corral create` end to end, "
        "including the CLI's interpreter start.",
        "",
        "| path | runs | p50 ms | p95 ms | min ms | max ms |",
        "|---|---|---|---|---|---|",
        row("api", create["api"]),
        row("cli", create["cli"]),
        "",
    ]
    if not memres:
        return "\n".join(lines)
    dm = memres["daemon"]
    lines += [
        f"## memory with {args.agents} idle agents (targets: daemon ≤ 120 MB, keeper ≤ 12 MB)",
        "",
        f"Creating the {args.agents} agents one after another took {setup_s:.1f} s.",
        "USS is memory only that process has; PSS shares the interpreter's pages "
        "fairly between all processes that map them (what N keepers really cost is "
        "about N x PSS).",
        "",
        "| process | RSS MB | USS MB | PSS MB |",
        "|---|---|---|---|",
        f"| daemon | {mb(dm['rss'])} | {mb(dm['uss'])} | {mb(dm['pss'])} |",
        "",
        "| keepers | median MB | max MB | total MB |",
        "|---|---|---|---|",
        krow("rss"),
        krow("uss"),
        krow("pss"),
        "",
        f"## daemon restart with {args.agents} running agents (target ≤ 2 s)",
        "",
        "SIGKILL, then a new `corral daemon` process; time from its spawn until the API "
        "answers, and until every agent is `running` with a new `agent.reconciled` event.",
        "",
        "| run | API answers s | all re-adopted s |",
        "|---|---|---|",
        *[f"| {i + 1} | {r['api']:.2f} | {r['all']:.2f} |" for i, r in enumerate(restarts)],
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--agents", type=int, default=100)
    ap.add_argument("--restarts", type=int, default=3)
    ap.add_argument("--log-level", default="INFO")
    ap.add_argument("--out", default=str(REPO / "docs" / "bench-daemon.md"))
    ap.add_argument("--keep-log", metavar="FILE", help="copy the daemon's log here at the end")
    ap.add_argument("--pause", action="store_true",
                    help="wait for Enter before cleanup (to profile by hand)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        say("bench_daemon needs root")
        return 2
    uniq = "b" + secrets.token_hex(3)
    base = Path(tempfile.mkdtemp(prefix=f"corral-bench-{uniq}-"))
    d = BenchDaemon(base, uniq, args.log_level)
    try:
        project = make_project(base)
        d.spawn()
        d.wait_ready()
        say(f"daemon pid {d.proc.pid if d.proc else '?'}, subnet {d.subnet}, log "
            f"{d.e2e.log_path}")
        create = bench_create(d, project, args.runs)
        for how, xs in create.items():
            say(f"create ({how}): p50 {statistics.median(xs) * 1e3:.0f} ms, "
                f"p95 {pct(xs, 0.95) * 1e3:.0f} ms over {len(xs)} runs")
        memres: dict[str, Any] = {}
        restarts: list[dict[str, float]] = []
        setup_s = 0.0
        if args.agents:
            names = [f"{uniq}-m{i}" for i in range(args.agents)]
            t0 = time.perf_counter()
            for n in names:
                d.create(n, project)
            setup_s = time.perf_counter() - t0
            say(f"{args.agents} agents created in {setup_s:.1f} s")
            time.sleep(2)  # idle: let start-up garbage settle
            memres = bench_memory(d, names)
            ks, dm = memres["keepers"], memres["daemon"]
            say(f"daemon RSS {mb(dm['rss'])} MB USS {mb(dm['uss'])} MB; "
                f"keeper RSS median {mb(statistics.median(k['rss'] for k in ks))} MB, "
                f"USS {mb(statistics.median(k['uss'] for k in ks))} MB, "
                f"PSS {mb(statistics.median(k['pss'] for k in ks))} MB")
            if args.pause:
                input("paused; Enter to go on ")
            for _ in range(args.restarts):
                r = bench_restart(d, names)
                say(f"restart: API after {r['api']:.2f} s, all re-adopted after {r['all']:.2f} s")
                restarts.append(r)
        text = render(args, create, memres, restarts, setup_s)
        Path(args.out).write_text(text)
        say(f"wrote {args.out}")
        return 0
    finally:
        say("cleaning up ...")
        d.cleanup()
        if args.keep_log:
            shutil.copy(d.e2e.log_path, args.keep_log)
        shutil.rmtree(base, ignore_errors=True)
        left = d.e2e.leftovers()
        if left:
            say(f"LEFT BEHIND: {left}")


if __name__ == "__main__":
    sys.exit(main())
