#!/usr/bin/env python3
"""SSH benchmark (issue 4): corral's SSH server against OpenSSH's own sshd and
tmux, in the same run.

1. Login latency: `ssh -p PORT NAME@127.0.0.1 true` against the daemon vs
   `ssh -p PORT2 root@127.0.0.1 true` against a throwaway OpenSSH sshd on a
   loopback port, interleaved, p50/p95 and the ratio (target ≤ 1.5 at p50).
   The sshd binary comes from Debian's openssh-server package, downloaded and
   unpacked into a temp dir (not installed: installing it would start a system
   sshd); it runs in a private mount namespace where /etc/passwd gains its
   privilege-separation user, so the host is not touched.
2. Session output throughput to 1 and 5 attached clients: the session prints
   a fixed amount of output; time until every client has read all of it,
   corral (clients: `ssh -tt`) vs tmux (clients: `tmux attach`), each client
   on its own pty (target ≥ tmux's). The agent gets every CPU (tmux's shell
   is not under a quota either). The command is typed by one more client
   (corral: an `ssh -tt` fed through stdin; tmux: `send-keys`), which is gone
   before the output starts: the command sleeps LEAD seconds first, which
   are not counted.

Run as root: `sudo .venv/bin/python scripts/bench_ssh.py [--runs 30] [--mbytes 20]`.
Everything it creates (daemon, agent, sshd, tmux server, temp dirs) is removed
at the end, also on failure.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import pty
import select
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sandbox.cgroups.v1 import shares  # noqa: E402
from tests.e2e.conftest import Daemon, _hard_cleanup, free_port, make_daemon  # noqa: E402

#: The timed command sleeps this long first (subtracted from its time), so the
#: client that typed it is gone before its output starts (see _corral_fanout).
LEAD = 0.5
SSH_OPTS = ["-F", "/dev/null", "-o", "StrictHostKeyChecking=no", "-o",
            "UserKnownHostsFile=/dev/null", "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
            "-o", "LogLevel=ERROR"]


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


@contextlib.contextmanager
def throwaway_sshd(tmp: Path, key: Path) -> Iterator[int]:
    deb_dir = tmp / "deb"
    deb_dir.mkdir()
    subprocess.run(["apt-get", "download", "-q", "openssh-server"], cwd=deb_dir, check=True,
                   capture_output=True)
    deb = next(deb_dir.glob("openssh-server_*.deb"))
    root = tmp / "sshd-root"
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    port = free_port()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / "hostkey")],
                   check=True)
    (tmp / "authorized_keys").write_text(Path(f"{key}.pub").read_text())
    cfg = tmp / "sshd_config"
    cfg.write_text(f"Port {port}\nListenAddress 127.0.0.1\nHostKey {tmp}/hostkey\n"
                   f"AuthorizedKeysFile {tmp}/authorized_keys\nPermitRootLogin prohibit-password\n"
                   f"PidFile {tmp}/sshd.pid\nUsePAM no\nStrictModes no\n"
                   "PasswordAuthentication no\nKbdInteractiveAuthentication no\n")
    passwd = tmp / "passwd"
    passwd.write_text(Path("/etc/passwd").read_text()
                      + "sshd:x:65534:65534::/run/sshd:/usr/sbin/nologin\n")
    script = (f"mount --bind {passwd} /etc/passwd && mount -t tmpfs tmpfs /run && "
              f"mkdir -m 0755 /run/sshd && exec {root}/usr/sbin/sshd -D -e -f {cfg}")
    proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                            stdout=subprocess.DEVNULL, stderr=(tmp / "sshd.log").open("wb"))
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            r = subprocess.run(["ssh", "-p", str(port), *SSH_OPTS, "-i", str(key),
                                "root@127.0.0.1", "true"], capture_output=True, timeout=30)
            if r.returncode == 0:
                break
            time.sleep(0.3)
        else:
            raise RuntimeError(f"throwaway sshd did not answer: {(tmp / 'sshd.log').read_text()}")
        yield port
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        if proc.poll() is None:
            proc.kill()


def login_latency(d: Daemon, key: Path, sshd_port: int, runs: int) -> list[str]:
    corral_t: list[float] = []
    sshd_t: list[float] = []
    for _ in range(runs):
        for port, user, out in ((d.ssh_port, "bench", corral_t), (sshd_port, "root", sshd_t)):
            t = time.perf_counter()
            subprocess.run(["ssh", "-p", str(port), *SSH_OPTS, "-i", str(key),
                            f"{user}@127.0.0.1", "true"], check=True, capture_output=True,
                           timeout=60)
            out.append((time.perf_counter() - t) * 1000)
    rows = ["| ssh … true | p50 ms | p95 ms |", "|---|---:|---:|",
            f"| corral | {pct(corral_t, 50):.0f} | {pct(corral_t, 95):.0f} |",
            f"| OpenSSH sshd | {pct(sshd_t, 50):.0f} | {pct(sshd_t, 95):.0f} |",
            f"| ratio corral / sshd | {pct(corral_t, 50) / pct(sshd_t, 50):.2f} | |"]
    return rows


class PtyClient:
    """A client command on its own pty; counts what it reads until a marker."""

    def __init__(self, argv: list[str]) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:
            os.execvp(argv[0], argv)  # noqa: S606 - fixed argv, no shell
        self.buf = bytearray()

    def drain(self, marker: bytes, deadline: float) -> bool:
        while time.monotonic() < deadline:
            r, _, _ = select.select([self.fd], [], [], 0.2)
            if r:
                try:
                    data = os.read(self.fd, 1 << 16)
                except OSError:
                    return False
                self.buf += data
                if marker in self.buf[-4096:]:
                    return True
                if len(self.buf) > 8192:
                    del self.buf[:-4096]
        return False

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)
        os.close(self.fd)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--mbytes", type=int, default=20)
    ap.add_argument("--skip-login", action="store_true",
                    help="only the fan-out part (no throwaway sshd); docs are not rewritten")
    ap.add_argument("--clients", default="1,5", help="comma-separated client counts")
    ap.add_argument("--fanout-runs", type=int, default=5,
                    help="fan-out runs per client count (corral and tmux interleaved)")
    ap.add_argument("--tmux-cgroups", action="store_true",
                    help="run tmux's server in nested cgroups like an agent's (cpu, cpuacct, "
                         "memory, pids, freezer; cgroup v1), so both shells pay the same "
                         "scheduling and accounting")
    ap.add_argument("--profile", type=Path, default=None,
                    help="py-spy the daemon and the keeper during corral's fan-out into DIR")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_ssh: needs root", file=sys.stderr)
        return 1
    tmp = Path(tempfile.mkdtemp(prefix="corral-bench-ssh-"))
    uniq = "b" + os.urandom(3).hex()[:5]
    d = make_daemon(tmp, uniq)
    tmux_sock = f"corral-bench-{uniq}"
    out = [f"# SSH benchmark — {platform.node()}, {platform.platform()}, {os.cpu_count()} CPUs, "
           f"load {os.getloadavg()[0]:.1f}\n",
           f"Command: `sudo .venv/bin/python scripts/bench_ssh.py --runs {args.runs} "
           f"--mbytes {args.mbytes} --fanout-runs {args.fanout_runs}"
           f"{' --tmux-cgroups' if args.tmux_cgroups else ''}`\n"]
    stack = contextlib.ExitStack()
    try:
        d.start()
        proj = tmp / "project"
        proj.mkdir()
        # The agent may use every CPU, as tmux's shell can: the default
        # template's 1-CPU quota would slow the flooding command itself.
        d.create("bench", "--template", "default", "--project", str(proj),
                 "--set", f"resources.cpus={os.cpu_count()}")
        d.wait_state("bench", ("running",))
        key = tmp / "key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                       check=True)
        d.cli("user", "add", "bencher", "--key", f"{key}.pub", check=True)
        d.cli("grant", "bench", "bencher", "--role", "collaborator", check=True)
        if not args.skip_login:
            with throwaway_sshd(tmp, key) as sshd_port:
                out += login_latency(d, key, sshd_port, args.runs)
        out.append("")
        out += [f"| session output, {args.mbytes} MB, to N clients (median of "
                f"{args.fanout_runs}) | corral s | tmux s | corral / tmux "
                "| per run pair, median [quartiles] "
                "| MB read per client, corral / tmux | server CPU s, corral / tmux "
                "| client CPU s, corral / tmux |",
                "|---|---:|---:|---:|---:|---:|---:|---:|"]
        tmux_server = ["tmux", "-L", tmux_sock, "new-session", "-d", "-x", "120", "-y", "40",
                       "bash --norc"]
        if args.tmux_cgroups:
            # tmux's server (and so its shell) starts in agent-like cgroups
            enter = "; ".join(f"echo $$ > {c}/cgroup.procs" for c in
                              stack.enter_context(_agent_like_cgroups(f"corral-bench-{uniq}")))
            tmux_server = ["bash", "-c", f"{enter}; exec {shlex.join(tmux_server)}"]
        subprocess.run(tmux_server, check=True)
        ssh_client = ["ssh", "-tt", "-p", str(d.ssh_port), *SSH_OPTS, "-i", str(key),
                      "bench@127.0.0.1"]
        tmux_client = ["tmux", "-L", tmux_sock, "attach"]

        def tmux_send(text: str) -> None:
            keys = ["Enter"] if text == "\r" else ["-l", text]
            subprocess.run(["tmux", "-L", tmux_sock, "send-keys", *keys], check=True)

        for n in (int(x) for x in args.clients.split(",")):
            corral: list[Result] = []
            tmux: list[Result] = []
            corral_pids = [d.proc.pid] if d.proc else []
            corral_pids += [k] if (k := _keeper_pid(d)) else []
            tmux_pids = [int(x) for x in subprocess.run(
                ["tmux", "-L", tmux_sock, "display-message", "-p", "#{pid}"],
                capture_output=True, text=True).stdout.split()]
            cpu: dict[str, list[float]] = {"corral": [], "tmux": [], "corral-clients": [],
                                           "tmux-clients": []}
            for run in range(args.fanout_runs):
                # interleaved, so a change in machine load hits both alike
                with _profiled(args.profile if run == 0 else None, d, f"c{n}"), \
                        _cpu(corral_pids, cpu["corral"]), _child_cpu(cpu["corral-clients"]):
                    corral.append(_corral_fanout(ssh_client, n, args.mbytes, f"c{n}r{run}"))
                with _cpu(tmux_pids, cpu["tmux"]), _child_cpu(cpu["tmux-clients"]):
                    tmux.append(_timed(lambda n=n, run=run: _fanout_with(  # type: ignore[misc]
                        [tmux_client] * n, tmux_send, args.mbytes, f"t{n}r{run}")))
            out.append(_fanout_row(n, corral, tmux, cpu))
    finally:
        subprocess.run(["tmux", "-L", tmux_sock, "kill-server"], capture_output=True)
        stack.close()
        if d.proc is not None:
            with contextlib.suppress(Exception):
                d.cli("rm", "--force", "bench", timeout=60)
            d.stop()
        d.created.append("bench")
        _hard_cleanup(d)
        shutil.rmtree(tmp, ignore_errors=True)
    text = "\n".join(out) + "\n"
    print(text)
    if not args.skip_login:
        (REPO / "docs" / "bench-ssh.md").write_text(text)
    return 0


@contextlib.contextmanager
def _agent_like_cgroups(name: str) -> Iterator[list[Path]]:
    """NAME/agents/tmux beneath this process's own cgroup in each v1 controller
    an agent's sandbox uses, with the default template's 1 GiB memory limit
    and an agent's CPU weight; removed at the end (after tmux's server has gone)."""
    own: dict[str, str] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, ctrls, path = line.split(":", 2)
        for c in ctrls.split(","):
            own[c] = path
    made: list[Path] = []
    try:
        for c in ("cpu", "cpuacct", "memory", "pids", "freezer"):
            mnt = Path("/sys/fs/cgroup", c)
            if c not in own or not mnt.is_dir():
                continue
            leaf = mnt / own[c].lstrip("/") / name / "agents" / "tmux"
            for p in (leaf.parent.parent, leaf.parent, leaf):
                if not p.exists():
                    p.mkdir()
                    made.append(p)
            if c == "memory":
                (leaf / "memory.limit_in_bytes").write_text(str(1 << 30))
            if c == "cpu":
                # weighted as corral weighs an agent with every CPU; the top
                # as corral's base, which weighs the agent and its keeper (here
                # tmux's server, in the agent's cgroup) together
                for p in (leaf.parent, leaf):
                    (p / "cpu.shares").write_text(str(shares(None)))
                (leaf.parent.parent / "cpu.shares").write_text(str(2 * shares(None)))
        if not made:
            raise RuntimeError("--tmux-cgroups: no cgroup v1 controllers here")
        yield [p for p in made if p.name == "tmux"]
    finally:
        for p in reversed(made):
            for _ in range(50):
                try:
                    p.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)   # tmux's last processes are still exiting


@contextlib.contextmanager
def _profiled(out_dir: Path | None, d: Daemon, tag: str) -> Iterator[None]:
    """py-spy record the daemon and the agent's keeper (a development aid)."""
    if out_dir is None or d.proc is None:
        yield
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    pids = {"daemon": d.proc.pid}
    keeper = _keeper_pid(d)
    if keeper:
        pids["keeper"] = keeper
    spy = str(Path(sys.executable).parent / "py-spy")
    spies = [subprocess.Popen([spy, "record", "-r", "200", "-f", "raw", "-p", str(pid),
                               "-o", str(out_dir / f"{tag}-{name}.txt")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for name, pid in pids.items()]
    try:
        yield
    finally:
        for s in spies:
            s.send_signal(signal.SIGINT)
            s.wait(30)


def _keeper_pid(d: Daemon) -> int | None:
    """The keeper of this daemon's agent: the one holding a file under its state_dir."""
    for proc in Path("/proc").iterdir():
        try:
            if b"supervisor.keeper" not in (proc / "cmdline").read_bytes():
                continue
            if any(str(fd.readlink()).startswith(d.state_dir) for fd in (proc / "fd").iterdir()):
                return int(proc.name)
        except OSError:
            continue
    return None


#: One fan-out run: (seconds, fewest bytes any client read), or why there is none.
Result = tuple[float, int] | str


def _timed(fn: Callable[[], tuple[float, int]]) -> Result:
    """The run's result, or why there is none (corral drops a client that
    cannot keep up instead of slowing the agent: THREATS.md)."""
    try:
        return fn()
    except RuntimeError as e:
        return str(e)


def _corral_fanout(ssh_client: list[str], n: int, mbytes: int, tag: str) -> Result:
    # corral: the command is typed through one more collaborator's stdin. That
    # client leaves during the command's LEAD sleep, as tmux's send-keys does,
    # so only the n measured clients are attached while the output flows.
    feeder = subprocess.Popen(ssh_client, stdin=subprocess.PIPE,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert feeder.stdin is not None
    fin = feeder.stdin

    def send(text: str) -> None:
        fin.write(text.encode())
        fin.flush()
        if text == "\r":
            threading.Timer(LEAD / 2, feeder.kill).start()

    try:
        return _timed(lambda: _fanout_with([ssh_client] * n, send, mbytes, tag))
    finally:
        feeder.kill()
        feeder.wait()


@contextlib.contextmanager
def _cpu(pids: list[int], out: list[float]) -> Iterator[None]:
    """CPU seconds the server processes (daemon + keeper, or tmux's server) use."""
    def total() -> float:
        t = 0
        for pid in pids:
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{pid}/stat").read_text()
                fields = stat[stat.rindex(")") + 2:].split()
                t += int(fields[11]) + int(fields[12])
        return t / os.sysconf("SC_CLK_TCK")
    before = total()
    yield
    out.append(total() - before)


@contextlib.contextmanager
def _child_cpu(out: list[float]) -> Iterator[None]:
    """CPU seconds of the bench's children: the clients (ssh -tt / tmux attach), the
    feeder ssh and the grep readers."""
    def total() -> float:
        t = os.times()
        return t.children_user + t.children_system
    before = total()
    yield
    out.append(total() - before)


def _fanout_row(n: int, corral: list[Result], tmux: list[Result],
                cpu: dict[str, list[float]]) -> str:
    def summary(rs: list[Result]) -> tuple[float | None, str, str]:
        ok = [r for r in rs if not isinstance(r, str)]
        fails = [r for r in rs if isinstance(r, str)]
        if not ok:
            return None, f"n/a ({fails[0]})", "-"
        t = statistics.median(x[0] for x in ok)
        note = f" ({len(fails)} of {len(rs)} runs failed: {fails[0]})" if fails else ""
        mb = min(x[1] for x in ok) / 1e6
        return t, f"{t:.2f}{note}", f"{mb:.1f}"

    tc, sc, mc = summary(corral)
    tt, st, mt = summary(tmux)
    ratio = f"{tc / tt:.2f}" if tc is not None and tt else "-"
    # Each corral run against the tmux run right after it: robust to the
    # machine's speed drifting during the benchmark, which moves both alike.
    pairs = sorted(c[0] / t[0] for c, t in zip(corral, tmux, strict=True)
                   if not isinstance(c, str) and not isinstance(t, str) and t[0] > 0)
    paired = (f"{statistics.median(pairs):.2f} [{pairs[len(pairs) // 4]:.2f}-"
              f"{pairs[(3 * len(pairs)) // 4]:.2f}]" if pairs else "-")
    cc, ct, kc, kt = (statistics.median(cpu[k])
                      for k in ("corral", "tmux", "corral-clients", "tmux-clients"))
    return (f"| {n} | {sc} | {st} | {ratio} | {paired} | {mc} / {mt} | {cc:.2f} / {ct:.2f} "
            f"| {kc:.2f} / {kt:.2f} |")


def _fanout_with(clients_argv: list[list[str]], send: Callable[[str], None], mbytes: int,
                 tag: str) -> tuple[float, int]:
    """Time until every client has shown the marker that ends the output, and
    the fewest bytes a client showed up to it.

    The reader is the same for both servers and as fast as a reader gets: one
    `grep -abo -m1 -F MARKER` per client on its pty (C, large reads, stops at
    the marker; -b gives the byte offset, i.e. the bytes read before it), so
    the bench's own reading costs neither server time."""
    clients = [PtyClient(a) for a in clients_argv]
    greps: list[subprocess.Popen[bytes]] = []
    try:
        time.sleep(2)
        for c in clients:
            c.drain(b"\x00never", time.monotonic() + 0.5)
        marker = f"END{tag}{os.getpid()}"
        cmd = (f"sleep {LEAD}; head -c {mbytes * 1024 * 1024} /dev/zero | tr '\\0' 'x' "
               f"| fold -w 100; echo END''{tag}{os.getpid()}")
        greps = [subprocess.Popen(["grep", "-abo", "-m1", "-F", marker], stdin=c.fd,
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
                 for c in clients]
        t = time.perf_counter()
        send(cmd)
        send("\r")
        deadline = time.monotonic() + 600
        counts = []
        for g in greps:
            try:
                out, _ = g.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"{tag}: a client never saw the end") from None
            if g.returncode != 0:
                # EOF/EIO before the marker: the server dropped the client.
                raise RuntimeError(f"{tag}: a client was disconnected")
            counts.append(int(out.split(b":", 1)[0]))
        return time.perf_counter() - t - LEAD, min(counts)
    finally:
        for g in greps:
            if g.poll() is None:
                g.kill()
                g.wait()
        for c in clients:
            c.close()


if __name__ == "__main__":
    sys.exit(main())
