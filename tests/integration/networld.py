"""The test's own "outside world": network namespaces, veths and servers.

Everything here lives in namespaces the test creates, with addresses from
198.18.0.0/15 (RFC 2544 benchmarking space) picked so they overlap nothing
already routed on the host; the host namespace only routes between them.

- `World`: a netns with a veth to the host, three addresses (w1, w2, w3) in a
  /24 of 198.18.0.0/16 (host side .254), and one server process (this file
  run as a script) with HTTP on 80 and 8080, TCP echo on 7 and 9000, UDP
  echo on 7 and 9000, and an authoritative DNS server for `corral.test` on
  53 (udp+tcp) that logs every query it receives.
- `Agent`: a netns with eth0 = a /30 of 198.19.0.0/16 and a default route via
  the host side of its veth, IPv6 disabled (as corral's netns does it).

Every resource is named with the test's unique prefix and removed in
`close()`, which the fixtures call from `finally`; processes are killed by PID.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
REPO = HERE.parents[2]
PY = str(REPO / ".venv" / "bin" / "python")

WORLD_SPACE = ipaddress.ip_network("198.18.0.0/16")
AGENT_SPACE = ipaddress.ip_network("198.19.0.0/16")


def sh(*argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({res.returncode}): {res.stderr.strip()}")
    return res


def wait_for(pred: Callable[[], bool], timeout: float = 30, what: str = "condition") -> None:
    """Poll `pred` until true (never a bare sleep-and-hope); fail loudly on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _routed() -> list[ipaddress.IPv4Network]:
    """Every IPv4 prefix the host has a route or address for (all tables)."""
    out = []
    for r in json.loads(sh("ip", "-j", "-4", "route", "show", "table", "all").stdout or "[]"):
        dst = r.get("dst", "")
        if dst and dst != "default":
            with contextlib.suppress(ValueError):
                out.append(ipaddress.ip_network(dst, strict=False))
    for link in json.loads(sh("ip", "-j", "-4", "addr").stdout or "[]"):
        for a in link.get("addr_info", []):
            out.append(ipaddress.ip_network(f"{a['local']}/{a['prefixlen']}", strict=False))
    return out


def free_subnet(space: ipaddress.IPv4Network, prefixlen: int) -> ipaddress.IPv4Network:
    """A random /prefixlen of `space` that overlaps nothing routed on the host."""
    used = _routed()
    subs = list(space.subnets(new_prefix=prefixlen))
    rng = random.SystemRandom()
    for _ in range(200):
        cand = rng.choice(subs[1:-1])
        if not any(cand.overlaps(u) for u in used):
            return cand
    raise RuntimeError(f"no free /{prefixlen} in {space}")


class Netns:
    """A named netns plus a veth pair: `veth` on the host, `eth0` inside."""

    def __init__(self, name: str, veth: str) -> None:
        assert len(veth) <= 15
        self.name = name
        self.veth = veth
        self.procs: list[subprocess.Popen[bytes]] = []
        self.created = False

    def create(self) -> None:
        sh("ip", "netns", "add", self.name)
        self.created = True
        sh(
            "ip",
            "link",
            "add",
            self.veth,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            self.name,
        )
        self.ip("link", "set", "lo", "up")

    def ip(self, *args: str) -> subprocess.CompletedProcess[str]:
        return sh("ip", "-n", self.name, *args)

    def run(
        self, *argv: str, timeout: float = 30, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside the namespace (as root, which the policy must not care about)."""
        return sh("ip", "netns", "exec", self.name, *argv, timeout=timeout, check=check)

    def popen(self, *argv: str, **kw: Any) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(["ip", "netns", "exec", self.name, *argv], **kw)
        self.procs.append(p)
        return p

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=10)
            for f in (p.stdin, p.stdout, p.stderr):
                if f is not None:
                    f.close()
        self.procs.clear()
        # the veth dies with the namespace; delete it first anyway in case the
        # namespace was never populated
        sh("ip", "link", "del", self.veth, check=False)
        if self.created:
            sh("ip", "netns", "del", self.name, check=False)
            self.created = False


@contextlib.contextmanager
def listeners(ns: Netns | None, tmp: Path, binds: Sequence[str]) -> Iterator[None]:
    """TCP+UDP echo listeners on `binds` ("addr:port"), in `ns` or (None) on the host."""
    ready = tmp / f"listen-{random.getrandbits(32):08x}.ready"
    argv = [PY, str(HERE), "listen", str(ready), *binds]
    if ns is None:
        p = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    else:
        p = ns.popen(*argv, stdout=subprocess.DEVNULL)
    try:
        wait_for(lambda: ready.exists() or p.poll() is not None, 60, f"listeners on {binds}")
        assert p.poll() is None, f"listener on {binds} died"
        yield
    finally:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=10)


def host_tcp(host: str, port: int, timeout: float = 5) -> bool:
    """Connect and echo from the host namespace (the positive control for host-side targets)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(b"ping")
            return s.recv(10) == b"ping"
    except OSError:
        return False


def host_udp(host: str, port: int, timeout: float = 5) -> bool:
    """UDP echo from the host namespace."""
    return _udp(host, port, timeout) == 0


class World(Netns):
    """The outside world: addresses w1..w3, servers, and a logging DNS server."""

    def __init__(self, uniq: str, tmp: Path) -> None:
        super().__init__(f"{uniq}-world", f"{uniq}w")
        self.tmp = tmp
        self.net = free_subnet(WORLD_SPACE, 24)
        hosts = list(self.net.hosts())
        self.host_ip = str(hosts[-1])  # .254 on the host side
        self.w1, self.w2, self.w3 = (str(h) for h in hosts[:3])
        self.dns_log = tmp / f"{uniq}-dns.log"
        self.ready = tmp / f"{uniq}-world.ready"
        self.agent_addrs: list[str] = []  # names under corral.test that must never be answered

    def start(self, zone_extra: dict[str, str] | None = None) -> None:
        self.create()
        sh("ip", "addr", "add", f"{self.host_ip}/24", "dev", self.veth)
        sh("ip", "link", "set", self.veth, "up")
        for a in (self.w1, self.w2, self.w3):
            self.ip("addr", "add", f"{a}/24", "dev", "eth0")
        self.ip("link", "set", "eth0", "up")
        zone = {"ok": self.w1, "other": self.w2, "third": self.w3, **(zone_extra or {})}
        self.dns_log.write_text("")
        with (self.tmp / "world.err").open("wb") as err:
            self.popen(
                PY,
                str(HERE),
                "serve",
                str(self.ready),
                str(self.dns_log),
                json.dumps(zone),
                ",".join((self.w1, self.w2, self.w3)),
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        wait_for(self.ready.exists, 60, "the world's servers to listen")

    def queries(self) -> list[str]:
        """Every DNS question the world's server received: "name TYPE" lines."""
        return [ln for ln in self.dns_log.read_text().splitlines() if ln]


class Agent(Netns):
    """An agent-like netns: eth0 = .2 of a /30, default route via the host side (.1)."""

    def __init__(self, uniq: str, idx: int, net: ipaddress.IPv4Network) -> None:
        super().__init__(f"{uniq}-ag{idx}", f"{uniq}a{idx}")
        assert net.prefixlen == 30
        self.agent = f"agent-{idx}"  # the corral agent name the tests give it
        self.gateway = str(net.network_address + 1)
        self.addr = str(net.network_address + 2)
        self.net = net

    @classmethod
    def adopt(cls, ns_name: str, veth: str, addr: str, gateway: str, agent: str) -> Agent:
        """Probes for a namespace someone else made (sandbox.netns), visible to `ip netns`."""
        self = cls.__new__(cls)
        Netns.__init__(self, ns_name, veth)
        self.addr, self.gateway, self.agent = addr, gateway, agent
        self.net = ipaddress.ip_network(f"{addr}/30", strict=False)
        return self

    def start(self) -> None:
        self.create()
        # IPv6 off inside, as corral's netns leaves it by default
        self.run("sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", check=True)
        self.run("sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1", check=True)
        sh("ip", "addr", "add", f"{self.gateway}/30", "dev", self.veth)
        sh("ip", "link", "set", self.veth, "up")
        self.ip("addr", "add", f"{self.addr}/30", "dev", "eth0")
        self.ip("link", "set", "eth0", "up")
        self.ip("route", "add", "default", "via", self.gateway)

    # --- probes run inside the agent (each returns True when it got through) ---

    def tcp(self, host: str, port: int, timeout: float = 5) -> bool:
        code = (
            "import socket,sys\n"
            f"s=socket.create_connection(({host!r},{port}),timeout={timeout})\n"
            "s.sendall(b'ping\\n'); s.shutdown(socket.SHUT_WR)\n"
            "print(s.recv(100).decode())\n"
        )
        return self.run(PY, "-c", code, timeout=timeout + 30).returncode == 0

    def http(self, url: str, *extra: str, timeout: float = 5) -> str | None:
        r = self.run(
            "curl",
            "-sS",
            "--max-time",
            str(timeout),
            "--noproxy",
            "*",
            *extra,
            url,
            timeout=timeout + 30,
        )
        return r.stdout if r.returncode == 0 else None

    def udp(self, host: str, port: int, timeout: float = 5) -> bool:
        r = self.run(PY, str(HERE), "udp", host, str(port), str(timeout), timeout=timeout + 30)
        return r.returncode == 0

    def ping(self, host: str) -> bool:
        return self.run("ping", "-n", "-c", "1", "-W", "3", host).returncode == 0

    def raw_icmp(self, host: str, proto: int = 1) -> bool:
        """Send an ICMP echo over a raw socket (IP protocol `proto`); True if a reply came."""
        return self.run(PY, str(HERE), "raw", host, str(proto), timeout=40).returncode == 0

    def dig(self, name: str, server: str, *extra: str, qtype: str = "A") -> list[str] | None:
        """Resolve via `server`; the answer's addresses, or None on REFUSED/NXDOMAIN/timeout."""
        r = self.run(
            "dig",
            "+time=3",
            "+tries=2",
            f"@{server}",
            name,
            qtype,
            *extra,
            "+noall",
            "+answer",
            "+comments",
            timeout=40,
        )
        if r.returncode != 0 or "status: NOERROR" not in r.stdout:
            return None
        return [
            ln.split()[-1]
            for ln in r.stdout.splitlines()
            if ln and not ln.startswith(";") and ln.split()[3:4] == [qtype]
        ]


@contextlib.contextmanager
def world(uniq: str, tmp: Path, zone_extra: dict[str, str] | None = None) -> Iterator[World]:
    w = World(uniq, tmp)
    try:
        w.start(zone_extra)
        yield w
    finally:
        w.close()


@contextlib.contextmanager
def agents(uniq: str, count: int = 1) -> Iterator[tuple[ipaddress.IPv4Network, list[Agent]]]:
    """`count` agents with /30s carved from one free /24 (the "daemon's agent subnet")."""
    subnet = free_subnet(AGENT_SPACE, 24)
    subs = list(subnet.subnets(new_prefix=30))
    made: list[Agent] = []
    try:
        for i in range(count):
            ag = Agent(uniq, i, subs[i + 1])
            made.append(ag)
            ag.start()
        yield subnet, made
    finally:
        for ag in made:
            ag.close()


# ----------------------------------------------------------------------------
# The server process run inside the world namespace (stdlib only).
# ----------------------------------------------------------------------------

QTYPES = {1: "A", 28: "AAAA", 5: "CNAME", 16: "TXT", 15: "MX", 2: "NS", 6: "SOA", 65: "HTTPS"}


def _dns_answer(query: bytes, zone: dict[str, str], log: Any) -> bytes | None:
    if len(query) < 12:
        return None
    qid, flags, qd = struct.unpack("!HHH", query[:6])
    if qd != 1:
        return None
    pos, labels = 12, []
    while True:
        n = query[pos]
        pos += 1
        if n == 0:
            break
        labels.append(query[pos : pos + n].decode("ascii", "replace"))
        pos += n
    qtype, _qclass = struct.unpack("!HH", query[pos : pos + 4])
    question = query[12 : pos + 4]
    name = ".".join(labels).lower()
    log.write(f"{name} {QTYPES.get(qtype, qtype)}\n")
    log.flush()
    rcode, answers = 0, b""
    if name.endswith(".corral.test") or name == "corral.test":
        key = name[: -len(".corral.test")]
        addr = zone.get(key)
        if addr is None:
            rcode = 3  # NXDOMAIN
        elif qtype == 1 and ":" not in addr:
            ttl = 0 if key.startswith("ttl0") else 30
            answers = struct.pack("!HHHIH", 0xC00C, 1, 1, ttl, 4) + socket.inet_aton(addr)
        elif qtype == 28 and ":" in addr:
            answers = struct.pack("!HHHIH", 0xC00C, 28, 1, 30, 16) + socket.inet_pton(
                socket.AF_INET6, addr
            )
    else:
        rcode = 5  # REFUSED: not our zone
    an = 1 if answers else 0
    hdr = struct.pack("!HHHHHH", qid, 0x8400 | (flags & 0x0100) | rcode, 1, an, 0, 0)
    return hdr + question + answers


async def _serve(ready: Path, dns_log: Path, zone: dict[str, str], addrs: list[str]) -> None:
    log = dns_log.open("a")
    loop = asyncio.get_running_loop()

    async def http(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
            host = ""
            for ln in head.decode("latin-1").split("\r\n"):
                if ln.lower().startswith("host:"):
                    host = ln.split(":", 1)[1].strip()
            local = w.get_extra_info("sockname")
            body = f"world {local[0]}:{local[1]} host={host}\n".encode()
            w.write(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            await w.drain()
        finally:
            w.close()

    async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
        finally:
            w.close()

    class Udp(asyncio.DatagramProtocol):
        def connection_made(self, transport: Any) -> None:
            self.t = transport

        def datagram_received(self, data: bytes, addr: Any) -> None:
            self.t.sendto(data, addr)

    class Dns(asyncio.DatagramProtocol):
        def connection_made(self, transport: Any) -> None:
            self.t = transport

        def datagram_received(self, data: bytes, addr: Any) -> None:
            out = _dns_answer(data, zone, log)
            if out is not None:
                self.t.sendto(out, addr)

    async def dns_tcp(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while True:
                (n,) = struct.unpack("!H", await r.readexactly(2))
                out = _dns_answer(await r.readexactly(n), zone, log)
                if out is None:
                    return
                w.write(struct.pack("!H", len(out)) + out)
                await w.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            w.close()

    servers = [
        await asyncio.start_server(http, "0.0.0.0", 80),
        await asyncio.start_server(http, "0.0.0.0", 8080),
        await asyncio.start_server(echo, "0.0.0.0", 7),
        await asyncio.start_server(echo, "0.0.0.0", 9000),
        await asyncio.start_server(dns_tcp, "0.0.0.0", 53),
    ]
    # UDP per address: a wildcard socket would answer from the primary address,
    # which is not the flow the client (and conntrack) expects
    for addr in addrs:
        for port in (7, 9000):
            await loop.create_datagram_endpoint(Udp, local_addr=(addr, port))
        await loop.create_datagram_endpoint(Dns, local_addr=(addr, 53))
    _touch(ready)
    await asyncio.gather(*(s.serve_forever() for s in servers))


def _touch(path: Path) -> None:
    path.write_text("ok")


def _udp(host: str, port: int, timeout: float) -> int:
    """UDP echo probe: 0 if an echo came back (3 tries), 1 if not.

    The socket is connected so an ICMP error (a reject) ends the probe at once.
    """
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout / 3)
        s.connect((host, port))
        for _ in range(3):
            try:
                s.send(b"hello")
                d = s.recv(100)
            except TimeoutError:
                continue
            except OSError:
                return 1
            return 0 if d == b"hello" else 2
        return 1


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def _spoof(src: str, real: str, dst: str, name: str) -> int:
    """Send a DNS query for `name` to dst:53 in a hand-made IP packet with source `src`.

    The reply (if any) can only come back to `real`, where a socket waits for
    it: 0 if an answer arrived, 1 if not.
    """
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx,
        socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as raw,
    ):
        rx.bind((real, 0))
        rx.settimeout(1)
        sport = rx.getsockname()[1]
        qname = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
        dns = struct.pack("!HHHHHH", 0x5151, 0x0100, 1, 0, 0, 0) + qname + b"\0\1\0\1"
        udp = struct.pack("!HHHH", sport, 53, 8 + len(dns), 0) + dns  # checksum 0: none
        hdr = struct.pack(
            "!BBHHHBBH4s4s",
            0x45,
            0,
            20 + len(udp),
            0,
            0,
            64,
            17,
            0,
            socket.inet_aton(src),
            socket.inet_aton(dst),
        )  # the kernel fills in the IP checksum (IP_HDRINCL)
        for _ in range(3):
            raw.sendto(hdr + udp, (dst, 0))
            try:
                rx.recv(512)
                return 0
            except TimeoutError:
                continue
    return 1


def _raw(host: str, proto: int) -> int:
    """Raw-socket probe: an ICMP echo (proto 1) or a bare packet of another protocol."""
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, proto)
    s.settimeout(1.0)
    ident = os.getpid() & 0xFFFF
    body = struct.pack("!BBHHH", 8, 0, 0, ident, 1) + b"corral-raw"
    pkt = body[:2] + struct.pack("!H", _checksum(body)) + body[4:]
    for _ in range(4):
        s.sendto(pkt, (host, 0))
        if proto != 1:
            continue
        try:
            while True:
                data, src = s.recvfrom(2048)
                ihl = (data[0] & 0xF) * 4
                typ, _, _, rid = struct.unpack("!BBHH", data[ihl : ihl + 6])
                if src[0] == host and typ == 0 and rid == ident:
                    return 0
        except TimeoutError:
            continue
    return 1


async def _listen(ready: Path, binds: Sequence[str]) -> None:
    """TCP and UDP echo on each addr:port, UDP only for "udp/addr:port"."""

    async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
        finally:
            w.close()

    class Udp(asyncio.DatagramProtocol):
        def connection_made(self, transport: Any) -> None:
            self.t = transport

        def datagram_received(self, data: bytes, addr: Any) -> None:
            self.t.sendto(data, addr)

    loop = asyncio.get_running_loop()
    servers = []
    for b in binds:
        udp_only = b.startswith("udp/")
        host, port = b.removeprefix("udp/").rsplit(":", 1)
        host = host.strip("[]")
        if not udp_only:
            servers.append(await asyncio.start_server(echo, host, int(port)))
        us = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
        # SO_REUSEADDR: a wildcard decoy must coexist with specific binds on its port
        us.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        us.bind((host, int(port)))
        await loop.create_datagram_endpoint(Udp, sock=us)
    _touch(ready)
    await asyncio.gather(*(s.serve_forever() for s in servers), asyncio.Event().wait())


def _hold(host: str, port: int, flag: Path) -> int:
    """Echo once over a TCP connection, wait for `flag`, echo again on the same connection.

    Prints "first ok"; exits 0 if the second echo came back, 1 if it did not.
    """
    s = socket.create_connection((host, port), timeout=5)
    s.sendall(b"one")
    assert s.recv(10) == b"one"
    print("first ok", flush=True)
    deadline = time.monotonic() + 120
    while not flag.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    s.settimeout(3)
    try:
        s.sendall(b"two")
        return 0 if s.recv(10) == b"two" else 1
    except OSError:
        return 1


def _sink(port: int) -> None:
    """Accept TCP connections on `port` and discard what they send (throughput target)."""
    import threading

    srv = socket.create_server(("0.0.0.0", port), backlog=64, reuse_port=False)

    def drain(c: socket.socket) -> None:
        buf = bytearray(1 << 20)
        with c:
            while c.recv_into(buf):
                pass

    while True:
        c, _ = srv.accept()
        threading.Thread(target=drain, args=(c,), daemon=True).start()


def _blast(host: str, port: int, megabytes: int, connects: int) -> None:
    """Print {"mbps": ..., "connect_ms": ...}: one bulk transfer, then `connects` connects."""
    chunk = b"\0" * (1 << 20)
    t0 = time.perf_counter()
    with socket.create_connection((host, port), timeout=30) as s:
        for _ in range(megabytes):
            s.sendall(chunk)
    secs = time.perf_counter() - t0
    lat = []
    for _ in range(connects):
        t = time.perf_counter()
        socket.create_connection((host, port), timeout=30).close()
        lat.append(time.perf_counter() - t)
    lat.sort()
    print(
        json.dumps(
            {
                "mbps": round(megabytes * 8 / secs, 1),
                "connect_ms_median": round(lat[len(lat) // 2] * 1000, 3),
            }
        )
    )


def _bench(agents_loaded: int, rounds: int = 3) -> dict[str, Any]:
    """Policy cost: setup time per agent with N agents loaded; throughput and connect
    latency agent -> world with the policy against the same path with no rules.

    Two agents side by side: one hooked into the policy (masqueraded), one not
    (plain routing, a route back from the world). Their transfers alternate and
    the best of `rounds` counts for each, so a busy host skews both alike.
    """
    import secrets
    import shutil
    import statistics

    sys.path.insert(0, str(REPO))
    from sandbox import nft

    uniq = "b" + secrets.token_hex(3)[:5]
    tmp = Path("/tmp") / f"corral-bench-{uniq}"
    tmp.mkdir()
    out: dict[str, Any] = {"agents_loaded": agents_loaded, "rounds": rounds}
    dummies: list[str] = []
    try:
        with world(uniq, tmp) as w, agents(uniq, 2) as (_, (pol, raw)):
            w.popen(PY, str(HERE), "sink", "9001")
            wait_for(lambda: host_tcp_ok(w.w1, 9001), 30, "the sink")

            def blast(ag: Agent) -> dict[str, Any]:
                r = ag.run(PY, str(HERE), "blast", w.w1, "9001", "500", "300", timeout=300)
                assert r.returncode == 0, r.stderr
                res: dict[str, Any] = json.loads(r.stdout)
                return res

            # the unfiltered path: forwarding on its veth and the uplink (on before
            # the table exists, so the uplink is not guarded), a route back
            for dev in (raw.veth, w.veth):
                sh("sysctl", "-qw", f"net.ipv4.conf.{dev}.forwarding=1")
            w.ip("route", "add", str(raw.net), "via", w.host_ip)
            try:
                nft.ensure_table(uniq, uplinks=[w.veth])
                # N other agents' rules loaded (on unconnected interfaces)
                for i in range(agents_loaded):
                    d = f"{uniq}d{i}"
                    # (this kernel has no dummy driver: a veth pair per fake agent)
                    sh("ip", "link", "add", d, "type", "veth", "peer", "name", f"{uniq}e{i}")
                    dummies.append(d)
                times = []
                for i, d in enumerate(dummies):
                    allow = nft.parse_allow([f"198.18.{i % 250}.0/24:443", "198.18.255.1"])
                    t = time.perf_counter()
                    nft.apply_agent(
                        uniq,
                        f"a{i}",
                        d,
                        f"198.19.{i // 60}.{(i % 60) * 4 + 2}",
                        f"198.19.{i // 60}.{(i % 60) * 4 + 1}",
                        allow,
                    )
                    times.append(time.perf_counter() - t)
                allow = nft.parse_allow([f"{w.w1}:9001"])
                t = time.perf_counter()
                nft.apply_agent(uniq, pol.agent, pol.veth, pol.addr, pol.gateway, allow)
                out["apply_agent_ms_with_n_loaded"] = round((time.perf_counter() - t) * 1000, 1)
                if times:
                    out["apply_agent_ms_median_while_loading"] = round(
                        statistics.median(times) * 1000, 1
                    )
                t = time.perf_counter()
                nft.add_learned(uniq, pol.agent, "198.18.255.7", 443, 60)
                out["add_learned_ms"] = round((time.perf_counter() - t) * 1000, 1)
                blast(pol)  # warm up both paths
                blast(raw)
                runs: dict[str, list[dict[str, Any]]] = {"policy": [], "no_rules": []}
                for _ in range(rounds):
                    runs["no_rules"].append(blast(raw))
                    runs["policy"].append(blast(pol))
                for k, v in runs.items():
                    out[k] = {
                        "mbps_best": max(r["mbps"] for r in v),
                        "connect_ms_median_best": min(r["connect_ms_median"] for r in v),
                    }
                t = time.perf_counter()
                nft.remove_agent(uniq, pol.agent)
                out["remove_agent_ms"] = round((time.perf_counter() - t) * 1000, 1)
            finally:
                nft.drop_table(uniq)
                w.ip("route", "del", str(raw.net), "via", w.host_ip)
    finally:
        for d in dummies:
            sh("ip", "link", "del", d, check=False)
        shutil.rmtree(tmp, ignore_errors=True)
    out["throughput_ratio"] = round(out["policy"]["mbps_best"] / out["no_rules"]["mbps_best"], 3)
    return out


def host_tcp_ok(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=2).close()
        return True
    except OSError:
        return False


def main(argv: Sequence[str]) -> int:
    if argv[0] == "serve":
        asyncio.run(_serve(Path(argv[1]), Path(argv[2]), json.loads(argv[3]), argv[4].split(",")))
        return 0
    if argv[0] == "listen":
        asyncio.run(_listen(Path(argv[1]), argv[2:]))
        return 0
    if argv[0] == "udp":
        return _udp(argv[1], int(argv[2]), float(argv[3]))
    if argv[0] == "hold":
        return _hold(argv[1], int(argv[2]), Path(argv[3]))
    if argv[0] == "sink":
        _sink(int(argv[1]))
        return 0
    if argv[0] == "blast":
        _blast(argv[1], int(argv[2]), int(argv[3]), int(argv[4]))
        return 0
    if argv[0] == "bench":
        # as root: python tests/integration/networld.py bench [AGENTS_LOADED]
        print(json.dumps(_bench(int(argv[1]) if len(argv) > 1 else 200), indent=2))
        return 0
    if argv[0] == "spoof":
        return _spoof(argv[1], argv[2], argv[3], argv[4])
    if argv[0] == "raw":
        return _raw(argv[1], int(argv[2]))
    raise SystemExit(f"unknown command {argv[0]!r}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
