#!/usr/bin/env python3
"""corral's benchmark harness: `scripts/bench [SECTION...] [--runs N]`.

Each section is a function registered in SECTIONS; later issues add theirs.
Results are printed as a markdown table (paste into BENCHMARKS.md).

Section `sandbox`: create -> run `true` inside -> release, for the full
sandbox (netns + veth + cgroup with limits + overlay workspace with an
idmapped lower + mount tree + pid namespace + privilege drop), side by side
in the same run with `bwrap --unshare-all ...` and `unshare -fmpuin
--mount-proc true`, runs interleaved so machine noise hits all three alike.
"create" is prepare + start until the workload has exec'd (start returns
then); "release" is waiting for the workload's exit, then full teardown.
Then the same again with 100 sandboxes already running. Needs root.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sandbox import cgroups, lifecycle, netns, process  # noqa: E402
from sandbox.spec import Limits, Network, SandboxSpec, Workspace  # noqa: E402

BWRAP = ["bwrap", "--unshare-all", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
         "true"]
UNSHARE = ["unshare", "-fmpuin", "--mount-proc", "true"]


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    k = (len(xs) - 1) * p
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def ms(x: float) -> str:
    return f"{x * 1000:.1f}"


class Bench:
    """State for the sandbox section: a temp tree, a project, unique names."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.tag = "b" + secrets.token_hex(3)
        self.cg = cgroups.detect()
        self.project = base / "project"
        (self.project / "src").mkdir(parents=True)
        for i in range(20):
            (self.project / "src" / f"f{i}.py").write_text(f"x = {i}\n")
        for p in [self.project, *self.project.rglob("*")]:
            os.lchown(p, 1000, 1000)
        self.n = 0

    def spec(self, command: tuple[str, ...] = ("/bin/true",)) -> SandboxSpec:
        self.n += 1
        name = f"{self.tag}-{self.n}"
        d = self.base / name
        k = secrets.randbelow(1 << 13) * 4 + self.n * 4 % (1 << 15)
        b = (198 << 24) | (18 << 16) | (k % (1 << 15))

        def a(i: int) -> str:
            return ".".join(str((b + i) >> s & 255) for s in (24, 16, 8, 0))

        uid = 200000 + (secrets.randbelow(60000))
        return SandboxSpec(
            name=name, uid=uid, gid=uid, state_dir=str(d / "state"), run_dir=str(d / "run"),
            cgroup=name, command=command, home=str(d / "state" / "home"),
            workspace=Workspace(mode="overlay", project=str(self.project)),
            limits=Limits(memory_bytes=512 << 20, pids=256, cpus=1.0),
            network=Network(netns_path=str(d / "netns"), veth_host=netns.veth_name(self.tag, name),
                            address=f"{a(2)}/30", gateway=f"{a(1)}/30"))

    def cycle(self) -> tuple[float, float]:
        """One full sandbox: (create-until-running, release incl. waiting for exit)."""
        spec = self.spec()
        null = os.open("/dev/null", os.O_RDWR)
        try:
            t0 = time.perf_counter()
            lifecycle.prepare(spec, self.cg)
            st = lifecycle.start(spec, self.cg, stdin=null, stdout=null, stderr=null)
            t1 = time.perf_counter()
            _, status = os.waitpid(st.init_pid, 0)
            lifecycle.release(spec, self.cg, remove_workspace=True)
            t2 = time.perf_counter()
        finally:
            os.close(null)
        if status != 0:
            raise RuntimeError(f"sandbox workload failed: status {status}")
        shutil.rmtree(Path(spec.state_dir).parent, ignore_errors=True)
        return t1 - t0, t2 - t1

    @contextmanager
    def background(self, count: int) -> Iterator[None]:
        """`count` sandboxes running `sleep` meanwhile (all released afterwards)."""
        running: list[tuple[SandboxSpec, int]] = []
        null = os.open("/dev/null", os.O_RDWR)
        try:
            for _ in range(count):
                spec = self.spec(("/bin/sleep", "100000"))
                lifecycle.prepare(spec, self.cg)
                st = lifecycle.start(spec, self.cg, stdin=null, stdout=null, stderr=null)
                running.append((spec, st.init_pid))
            yield
        finally:
            os.close(null)
            for spec, pid in running:
                try:
                    lifecycle.release(spec, self.cg, remove_workspace=True)
                finally:
                    try:
                        os.waitpid(pid, 0)
                    except ChildProcessError:
                        pass


def cpu_now() -> float:
    """CPU seconds used by this process and its reaped children (load-independent)."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def timed(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def measure(b: Bench, runs: int) -> dict[str, list[float]]:
    res: dict[str, list[float]] = {k: [] for k in ("create", "release", "cycle", "bwrap",
                                                    "unshare", "cpu_cycle", "cpu_bwrap")}
    for _ in range(3):  # warm caches (page cache, pyroute2 imports)
        b.cycle()
        timed(BWRAP)
        timed(UNSHARE)
    for _ in range(runs):
        c0 = cpu_now()
        c, r = b.cycle()
        c1 = cpu_now()
        res["create"].append(c)
        res["release"].append(r)
        res["cycle"].append(c + r)
        res["cpu_cycle"].append(c1 - c0)
        res["bwrap"].append(timed(BWRAP))
        res["cpu_bwrap"].append(cpu_now() - c1)
        res["unshare"].append(timed(UNSHARE))
    return res


def report(title: str, res: dict[str, list[float]]) -> list[str]:
    bw = statistics.median(res["bwrap"])
    out = [f"### {title}", "",
           "| measure | p50 ms | p95 ms | p50 / bwrap whole run |",
           "|---|---:|---:|---:|"]
    labels = {"create": "corral create → workload running", "release": "corral release",
              "cycle": "corral full cycle (create → true → release)",
              "bwrap": "bwrap --unshare-all … true (whole run)",
              "unshare": "unshare -fmpuin --mount-proc true (whole run)"}
    for k, label in labels.items():
        xs = res[k]
        out.append(f"| {label} | {ms(pct(xs, .5))} | {ms(pct(xs, .95))} | "
                   f"{pct(xs, .5) / bw:.2f}x |")
    out.append("")
    out.append(f"CPU time (user+sys, this process and its children) per run, p50: corral "
               f"full cycle {ms(pct(res['cpu_cycle'], .5))} ms, bwrap "
               f"{ms(pct(res['cpu_bwrap'], .5))} ms.")
    out.append("")
    return out


def breakdown(b: Bench, runs: int) -> list[str]:
    """p50 wall time of each lifecycle step, to see where a cycle goes."""
    steps: dict[str, list[float]] = {}

    cpus: dict[str, list[float]] = {}

    def timed_step(name: str, fn: Callable[..., object], *a: object, **kw: object) -> object:
        c0, t0 = cpu_now(), time.perf_counter()
        r = fn(*a, **kw)
        steps.setdefault(name, []).append(time.perf_counter() - t0)
        cpus.setdefault(name, []).append(cpu_now() - c0)
        return r

    null = os.open("/dev/null", os.O_RDWR)
    try:
        for _ in range(runs):
            spec = b.spec()
            for st in lifecycle.STEPS:
                timed_step(f"prepare: {st.name}", st.prepare, spec, b.cg)
            started = timed_step("start (fork init, cgroup move, mounts, spawn workload)",
                                 process.start, spec, stdin=null, stdout=null, stderr=null,
                                 ctty=False, cgroups=b.cg)
            assert isinstance(started, process.Started)
            timed_step("workload `true` runs and init exits", os.waitpid, started.init_pid, 0)
            for st in reversed(lifecycle.STEPS):
                timed_step(f"release: {st.name}", st.release, spec, b.cg, True)
            shutil.rmtree(Path(spec.state_dir).parent, ignore_errors=True)
    finally:
        os.close(null)
    out = ["### where a cycle goes (p50 per step; init's CPU is counted when it is reaped)",
           "", "| step | wall p50 ms | CPU p50 ms |", "|---|---:|---:|"]
    out += [f"| {k} | {ms(pct(v, .5))} | {ms(pct(cpus[k], .5))} |" for k, v in steps.items()]
    return [*out, ""]


def section_sandbox(args: argparse.Namespace) -> list[str]:
    base = Path(tempfile.mkdtemp(prefix="corral-bench-"))
    try:
        b = Bench(base)
        lines = [f"## sandbox ({args.runs} runs each, interleaved; "
                 f"cgroup driver {b.cg.version})", ""]
        res0 = measure(b, args.runs)
        lines += report("no other sandboxes", res0)
        lines += breakdown(b, max(10, args.runs // 2))
        print("\n".join(lines), flush=True)
        with b.background(args.existing):
            res1 = measure(b, args.runs)
        more = report(f"with {args.existing} sandboxes already running", res1)
        growth = statistics.median(res1["cycle"]) / statistics.median(res0["cycle"])
        more.append(f"Full cycle p50 with {args.existing} running / without: {growth:.2f}x")
        more.append("")
        print("\n".join(more), flush=True)
        return lines + more
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _standalone(script: str, *extra: str) -> Callable[[argparse.Namespace], list[str]]:
    """A section that lives in its own script (it writes its docs/bench-*.md)."""

    def run(args: argparse.Namespace) -> list[str]:
        argv = [sys.executable, str(REPO / "scripts" / script), *extra]
        if script != "bench_workspace.py":
            argv += ["--runs", str(min(args.runs, 30))]
        print(f"## {script} ({' '.join(argv[1:])})\n", flush=True)
        subprocess.run(argv, check=True)
        return []

    return run


SECTIONS: dict[str, Callable[[argparse.Namespace], list[str]]] = {
    "sandbox": section_sandbox,
    "daemon": _standalone("bench_daemon.py"),
    "services": _standalone("bench_services.py"),
    "workspace": _standalone("bench_workspace.py"),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("sections", nargs="*", help=f"some of: {', '.join(SECTIONS)} (default all)")
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--existing", type=int, default=100,
                    help="sandboxes running in the background for the scale measurement")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("scripts/bench: needs root (namespaces, cgroups, netns)", file=sys.stderr)
        return 1
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        ap.error(f"unknown section(s) {unknown}; have {list(SECTIONS)}")
    print(f"# corral benchmarks — {platform.node()}, {platform.platform()}, "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}\n", flush=True)
    for name in args.sections or list(SECTIONS):
        SECTIONS[name](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
