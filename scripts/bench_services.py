#!/usr/bin/env python3
"""Benchmark: time from `corral create` to every service healthy (python-dev).

Starts its own daemon (the e2e tests' make_daemon: own temp config, state_dir,
run_dir, API socket, a 198.19.x.0/24 subnet, port and uid ranges, unique agent
names) and, for each run, creates an agent from the shipped `python-dev`
template (its `web` service: `python3 -m http.server` on port 8000, http
health check) over a small git project, then polls the agent over the API
socket (GET /v1/agents/NAME every 10 ms, no CLI start-up in the loop) until
every service reports `healthy`, and finally checks that the published host
port answers. Reported per run:

- create: the `corral create` command line returning (the agent is running,
  its services launched, not yet known healthy);
- healthy: from the same start until every service is healthy;
- served: until a GET through the published host port returned 200.

Each run removes its agent (`corral rm --force`) so all runs see the same
daemon. Cleanup runs even on failure (agents, daemon, then the e2e tests'
exact scope-based sweep). Needs root.

Usage: sudo .venv/bin/python scripts/bench_services.py [--runs 10] [--no-write]
Results are printed and written to docs/bench-services.md.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import platform
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.e2e.conftest import _hard_cleanup, make_daemon  # noqa: E402

TEMPLATE = "python-dev"


def say(*args: object) -> None:
    print(*args, flush=True)


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    k = (len(xs) - 1) * p
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


class _UnixConn(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("corral", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self._path)
        self.sock = s


def api_get(sock: str, url: str) -> Any:
    conn = _UnixConn(sock, 30)
    try:
        conn.request("GET", url)
        resp = conn.getresponse()
        data = resp.read()
    finally:
        conn.close()
    if resp.status >= 300:
        raise RuntimeError(f"GET {url}: HTTP {resp.status}: {data[:300]!r}")
    return json.loads(data)


def make_project(base: Path) -> Path:
    p = base / "project"
    p.mkdir()
    (p / "index.html").write_text("<h1>bench</h1>\n")
    subprocess.run(["git", "init", "-q", "-b", "main", str(p)], check=True)
    subprocess.run(["git", "-C", str(p), "add", "-A"], check=True)
    subprocess.run(["git", "-C", str(p), "-c", "user.email=b@example.invalid", "-c",
                    "user.name=b", "commit", "-qm", "init"], check=True)
    return p


def one_run(d: Any, name: str, project: Path, timeout: float = 120) -> dict[str, float]:
    t0 = time.monotonic()
    d.create(name, "--template", TEMPLATE, "--project", str(project))
    t_create = time.monotonic() - t0
    info: dict[str, Any] = {}
    while True:
        info = api_get(d.socket, f"/v1/agents/{name}")
        svcs = info["services"]
        if svcs and all(s["health"] == "healthy" for s in svcs.values()):
            break
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"{name}: services not healthy in {timeout}s: {svcs}")
        time.sleep(0.01)
    t_healthy = time.monotonic() - t0
    port = info["services"]["web"]["host_port"]
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"{name}: host port {port} never answered")
        time.sleep(0.01)
    t_served = time.monotonic() - t0
    return {"create": t_create, "healthy": t_healthy, "served": t_served,
            "after_create": t_healthy - t_create}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--no-write", action="store_true", help="do not write docs/bench-services.md")
    args = ap.parse_args()

    uniq = "bs" + secrets.token_hex(3)
    base = Path(tempfile.mkdtemp(prefix=f"corral-{uniq}-"))
    d = make_daemon(base, uniq)
    project = make_project(base)
    results: list[dict[str, float]] = []
    try:
        d.start()
        # one warm-up run (page cache, Python bytecode) that is not counted
        say("warm-up ...")
        one_run(d, f"{uniq}-w", project)
        d.cli("rm", "--force", f"{uniq}-w", check=True)
        for i in range(args.runs):
            name = f"{uniq}-{i}"
            r = one_run(d, name, project)
            results.append(r)
            say(f"run {i + 1:2d}: create {r['create'] * 1e3:7.0f} ms   healthy "
                f"{r['healthy'] * 1e3:7.0f} ms   served {r['served'] * 1e3:7.0f} ms")
            d.cli("rm", "--force", name, check=True)
    finally:
        for name in list(d.created):
            with contextlib.suppress(Exception):
                d.cli("rm", "--force", name, timeout=60)
        d.stop()
        _hard_cleanup(d)
        subprocess.run(["rm", "-rf", str(base)], check=False)

    rows = []
    for key in ("create", "healthy", "served", "after_create"):
        xs = [r[key] * 1e3 for r in results]
        rows.append((key, pct(xs, 0.5), pct(xs, 0.95), min(xs), max(xs)))
    say("")
    load = Path("/proc/loadavg").read_text().split()[:3]
    say(f"{'phase':12s} {'p50 ms':>8s} {'p95 ms':>8s} {'min':>8s} {'max':>8s}")
    for key, p50, p95, mn, mx in rows:
        say(f"{key:12s} {p50:8.0f} {p95:8.0f} {mn:8.0f} {mx:8.0f}")

    if not args.no_write:
        cpus = len(__import__("os").sched_getaffinity(0))
        lines = [
            "# Benchmark: create → services healthy",
            "",
            f"Measured {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')} on {platform.node()}"
            f" ({cpus} CPUs, kernel {platform.release()}), {args.runs} runs after one warm-up,",
            f"template `{TEMPLATE}` (service `web`: `python3 -m http.server 8000`, http health"
            " check, interval 2s, start_period 5s — polled every 200 ms during the start"
            " period).",
            "",
            "Command: `sudo .venv/bin/python scripts/bench_services.py --runs "
            f"{args.runs}`",
            "",
            "Times from just before `corral create` (the CLI process) until:",
            "",
            "- **create**: `corral create` returned (agent running, services launched);",
            "- **healthy**: `GET /v1/agents/NAME` (polled every 10 ms on the API socket) shows"
            " every service `healthy`;",
            "- **served**: a GET through the published host port (127.0.0.1:HOSTPORT) got 200;",
            "- **after_create**: healthy minus create, the services' own share.",
            "",
            f"Load average at the end: {' '.join(load)} (other test suites shared the"
            " machine; the CLI's own start-up alone took ~1 s under that load).",
            "",
            "| phase | p50 ms | p95 ms | min ms | max ms |",
            "|---|---:|---:|---:|---:|",
            *(f"| {k} | {p50:.0f} | {p95:.0f} | {mn:.0f} | {mx:.0f} |"
              for k, p50, p95, mn, mx in rows),
            "",
            "Where the time goes: `corral create` includes the CLI's interpreter start, the"
            " sandbox (netns, nft, cgroup, keeper, init) and launching the service through"
            " `sandbox.process.enter`; the rest is the service's own start-up"
            " (Python's http.server import) and the next health poll.",
            "",
        ]
        out = REPO / "docs" / "bench-services.md"
        out.write_text("\n".join(lines))
        say(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
