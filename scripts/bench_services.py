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
daemon.

Then, with one agent from a test template whose service streams or echoes
bytes (a small Python server on port 9000 inside), the published port is
compared with a direct connection from the host to the agent's address:
throughput (one connection reading --mbytes MB, best of 3), connection
latency (connect until the first byte of the answer, median of 50) and
round-trip latency (1-byte ping-pong on one connection, median of 2000).

Cleanup runs even on failure (agents, daemon, then the e2e tests' exact
scope-based sweep). Needs root.

Usage: sudo .venv/bin/python scripts/bench_services.py [--runs 10] [--mbytes 512] [--no-write]
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
import statistics
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
NET_SERVER = r"""
import socketserver
class H(socketserver.StreamRequestHandler):
    def handle(self):
        cmd = self.rfile.readline().split()
        if cmd and cmd[0] == b"S":
            n, buf = int(cmd[1]), bytes(1 << 16)
            while n > 0:
                k = min(n, len(buf))
                self.wfile.write(buf[:k])
                n -= k
        elif cmd and cmd[0] == b"E":
            while b := self.rfile.read(1):
                self.wfile.write(b)
socketserver.ThreadingTCPServer.allow_reuse_address = True
socketserver.ThreadingTCPServer(("0.0.0.0", 9000), H).serve_forever()
"""


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


def _connect(addr: tuple[str, int]) -> socket.socket:
    s = socket.create_connection(addr, timeout=30)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def throughput(addr: tuple[str, int], nbytes: int) -> float:
    """MB/s reading `nbytes` from one connection."""
    buf = bytearray(1 << 18)
    with _connect(addr) as s:
        t0 = time.monotonic()
        s.sendall(b"S %d\n" % nbytes)
        got = 0
        while got < nbytes:
            k = s.recv_into(buf)
            if not k:
                raise RuntimeError(f"stream from {addr} ended after {got} bytes")
            got += k
        return nbytes / (time.monotonic() - t0) / 1e6


def connect_latency(addr: tuple[str, int]) -> float:
    """Seconds from connect() to the first byte of the answer, on a new connection."""
    t0 = time.monotonic()
    with _connect(addr) as s:
        s.sendall(b"S 1\n")
        if not s.recv(1):
            raise RuntimeError(f"no answer from {addr}")
    return time.monotonic() - t0


def rtt(addr: tuple[str, int], n: int) -> float:
    """Median seconds of a 1-byte round trip on one connection."""
    out = []
    with _connect(addr) as s:
        s.sendall(b"E\n")
        for _ in range(n):
            t0 = time.monotonic()
            s.sendall(b"x")
            if not s.recv(1):
                raise RuntimeError(f"echo from {addr} ended")
            out.append(time.monotonic() - t0)
    return statistics.median(out)


def net_bench(d: Any, project: Path, uniq: str, mbytes: int) -> dict[str, tuple[float, float]]:
    """{metric: (published, direct)} for one agent of the streaming template."""
    tdir = Path(d.config_path).parent / "templates"
    tdir.mkdir(exist_ok=True)
    (tdir / "benchnet.yaml").write_text(
        "name: benchnet\nextends: default\nservices:\n  net:\n"
        f"    command: {json.dumps(['python3', '-c', NET_SERVER])}\n"
        "    port: 9000\n    health: {tcp: 9000, interval: 200ms}\n")
    name = f"{uniq}-net"
    d.create(name, "--template", "benchnet", "--project", str(project))
    t0 = time.monotonic()
    while True:
        info = api_get(d.socket, f"/v1/agents/{name}")
        if info["services"]["net"]["health"] == "healthy":
            break
        if time.monotonic() - t0 > 120:
            raise RuntimeError(f"benchnet service never healthy: {info['services']}")
        time.sleep(0.05)
    pub = ("127.0.0.1", int(info["services"]["net"]["host_port"]))
    direct = (info["ip"], 9000)
    res: dict[str, tuple[float, float]] = {}
    n = mbytes * 1_000_000
    res["throughput_mb_s"] = (max(throughput(pub, n) for _ in range(3)),
                              max(throughput(direct, n) for _ in range(3)))
    res["connect_ms"] = (statistics.median(connect_latency(pub) for _ in range(50)) * 1e3,
                         statistics.median(connect_latency(direct) for _ in range(50)) * 1e3)
    res["rtt_us"] = (rtt(pub, 2000) * 1e6, rtt(direct, 2000) * 1e6)
    d.cli("rm", "--force", name, check=True)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--mbytes", type=int, default=512, help="MB per throughput run")
    ap.add_argument("--no-write", action="store_true", help="do not write docs/bench-services.md")
    args = ap.parse_args()

    uniq = "bs" + secrets.token_hex(3)
    base = Path(tempfile.mkdtemp(prefix=f"corral-{uniq}-"))
    d = make_daemon(base, uniq)
    project = make_project(base)
    results: list[dict[str, float]] = []
    net: dict[str, tuple[float, float]] = {}
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
        say("published port vs direct ...")
        net = net_bench(d, project, uniq, args.mbytes)
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

    say("")
    say(f"{'metric':16s} {'published':>10s} {'direct':>10s} {'ratio':>7s}")
    for key, (p, q) in net.items():
        say(f"{key:16s} {p:10.1f} {q:10.1f} {p / q:7.2f}")

    if not args.no_write:
        cpus = len(__import__("os").sched_getaffinity(0))
        lines = [
            "# Benchmark: per-agent services",
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
            "## Published port vs direct",
            "",
            "One agent whose service (a small Python server on port 9000 inside) streams or"
            " echoes bytes; the client on the host connects either to the published port"
            " (127.0.0.1:HOSTPORT, the daemon's asyncio proxy) or straight to the agent's"
            f" address. Throughput: one connection reading {args.mbytes} MB, best of 3."
            " Connect: connect() until the first byte of an answer, median of 50."
            " RTT: 1-byte ping-pong on one connection, median of 2000.",
            "",
            "| metric | published | direct | published/direct |",
            "|---|---:|---:|---:|",
            *(f"| {k} | {p:.1f} | {q:.1f} | {p / q:.2f} |" for k, (p, q) in net.items()),
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
