"""Egress policy against a real outside world built inside the test (see networld.py).

Each "blocked" probe has a positive control: the same probe succeeding where
the policy allows it, or the same target answering the host directly.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sandbox import nft
from tests.integration import networld
from tests.integration.networld import PY, Agent, World, host_tcp, listeners, sh

pytestmark = pytest.mark.root


@dataclass
class Env:
    scope: str
    world: World
    subnet: str
    a0: Agent
    a1: Agent
    tmp: Path

    def apply(self, ag: Agent, allow: list[str], **kw: bool) -> None:
        nft.apply_agent(
            self.scope, ag.agent, ag.veth, ag.addr, ag.gateway, nft.parse_allow(allow), **kw
        )


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    """One world, two agents and one nft table for the module (they take a second to build)."""
    if os.geteuid() != 0:
        pytest.fail("this test needs root: run it through `sudo scripts/test`")
    uniq = "t" + secrets.token_hex(3)[:5]
    tmp = tmp_path_factory.mktemp(uniq)
    with networld.world(uniq, tmp) as w, networld.agents(uniq, 2) as (subnet, (a0, a1)):
        try:
            nft.ensure_table(uniq, uplinks=[w.veth])
            yield Env(uniq, w, str(subnet), a0, a1, tmp)
        finally:
            nft.drop_table(uniq)


@pytest.fixture
def e(env: Env, need_root: None) -> Iterator[Env]:
    """Per test: start with no agent rules; remove whatever the test applied."""
    try:
        yield env
    finally:
        for ag in (env.a0, env.a1):
            nft.remove_agent(env.scope, ag.agent)


def test_allowed_address_and_port_work_everything_else_fails(e: Env) -> None:
    w, ag = e.world, e.a0
    e.apply(ag, [f"{w.w1}:80", f"{w.w1}:7", w.w2])
    before = nft.counters(e.scope, "agent-0")

    # positive controls: exactly what is allowed gets through, by every protocol
    assert ag.http(f"http://{w.w1}/") == f"world {w.w1}:80 host={w.w1}\n"
    assert ag.tcp(w.w1, 7)
    assert ag.udp(w.w1, 7)
    assert ag.tcp(w.w2, 9000)  # address entry without port: every port
    assert ag.udp(w.w2, 9000)
    assert ag.ping(w.w2)
    assert ag.raw_icmp(w.w2)

    # the same servers answer the host directly, so a failure below is the policy
    assert host_tcp(w.w1, 9000)
    assert host_tcp(w.w3, 7)
    assert sh("curl", "-s", "--max-time", "5", f"http://{w.w1}:8080/").returncode == 0
    assert sh("ping", "-n", "-c", "1", "-W", "3", w.w3).returncode == 0

    assert ag.http(f"http://{w.w1}:8080/") is None  # other port, same address
    assert not ag.tcp(w.w1, 9000)
    assert not ag.udp(w.w1, 9000)
    assert ag.http(f"http://{w.w3}/") is None  # other address, allowed port
    assert not ag.tcp(w.w3, 7)
    assert not ag.udp(w.w3, 7)
    assert not ag.ping(w.w1)  # a port-qualified entry allows no ICMP
    assert not ag.ping(w.w3)
    assert not ag.raw_icmp(w.w3)
    assert not ag.raw_icmp(w.w1, proto=253)  # raw packet of an unknown protocol

    after = nft.counters(e.scope, "agent-0")
    assert after["denied_packets"] > before["denied_packets"]
    assert after["allowed_packets"] > before["allowed_packets"]
    denied = {(d.addr, d.proto, d.port) for d in nft.recent_denied(e.scope, "agent-0")}
    assert (w.w1, "tcp", 8080) in denied
    assert (w.w1, "udp", 9000) in denied
    assert (w.w3, "icmp", None) in denied
    assert (w.w1, "253", None) in denied
    assert not any(d[0] == w.w2 for d in denied)


def test_spoofed_source_addresses_are_dropped(e: Env) -> None:
    """A hand-made packet from another source never leaves, even to an allowed port."""
    w, ag = e.world, e.a0
    assert Path("/proc/sys/net/ipv4/conf/all/rp_filter").read_text().strip() == "0"
    sh("sysctl", "-qw", f"net.ipv4.conf.{ag.veth}.rp_filter=0")  # only the policy stands
    e.apply(ag, [f"{w.w1}:53"])
    tag = secrets.token_hex(4)
    spoof = [PY, str(networld.HERE), "spoof"]
    # positive control: the same hand-made packet with the agent's own source
    assert ag.run(*spoof, ag.addr, ag.addr, w.w1, f"real{tag}.corral.test").returncode == 0
    assert f"real{tag}.corral.test A" in w.queries()
    before = nft.counters(e.scope, "agent-0")["denied_packets"]
    for fake in (e.a1.addr, "198.19.255.77"):
        ag.run(*spoof, fake, ag.addr, w.w1, f"fake{tag}.corral.test")
    assert not any(f"fake{tag}" in q for q in w.queries())
    assert nft.counters(e.scope, "agent-0")["denied_packets"] >= before + 6


def test_cidr_entries_and_unlisted_agent_gets_nothing(e: Env) -> None:
    w = e.world
    e.apply(e.a0, [f"{w.net}:8080"])
    assert ag_ok(e.a0.http(f"http://{w.w3}:8080/"), w.w3)
    assert ag_ok(e.a0.http(f"http://{w.w1}:8080/"), w.w1)
    assert e.a0.http(f"http://{w.w1}/") is None
    # agent-b has a veth and a route but no rules: its veth does not forward
    assert e.a1.http(f"http://{w.w1}:8080/") is None


def ag_ok(body: str | None, addr: str) -> bool:
    return body is not None and body.startswith(f"world {addr}:")


def test_host_services_unreachable_from_agent(e: Env) -> None:
    w, ag = e.world, e.a0
    e.apply(ag, [f"{w.w1}:80"])
    binds = [f"{e.a0.gateway}:2222", f"{e.a1.gateway}:2222", f"{w.host_ip}:2222"]
    with listeners(None, e.tmp, binds):
        # positive controls: the host reaches its own services; so does the world
        assert host_tcp(e.a0.gateway, 2222)
        assert host_tcp(w.host_ip, 2222)
        assert w.run(PY, str(networld.HERE), "udp", w.host_ip, "2222", "3").returncode == 0
        assert ag.http(f"http://{w.w1}/") is not None
        # the agent reaches none of them, by TCP, UDP or ICMP
        for host in (e.a0.gateway, e.a1.gateway, w.host_ip):
            assert not ag.tcp(host, 2222), host
            assert not ag.udp(host, 2222), host
        assert not ag.ping(ag.gateway)
        # a port published on the host side is no way in either, even if "allowed"
        e.apply(ag, [f"{w.host_ip}:2222", f"{ag.gateway}:2222"])
        assert not ag.tcp(w.host_ip, 2222)
        assert not ag.tcp(ag.gateway, 2222)
    denied = {(d.addr, d.port) for d in nft.recent_denied(e.scope, "agent-0")}
    assert (w.host_ip, 2222) in denied


def test_agents_cannot_reach_each_other(e: Env) -> None:
    a0, a1 = e.a0, e.a1
    # even an allow-list naming the whole agent subnet does not open it
    e.apply(a0, [e.subnet, e.world.w1])
    e.apply(a1, [e.subnet, e.world.w1])
    with listeners(a1, e.tmp, [f"{a1.addr}:7000"]), listeners(a0, e.tmp, [f"{a0.addr}:7000"]):
        assert host_tcp(a1.addr, 7000)  # positive control: the host can
        assert host_tcp(a0.addr, 7000)
        assert a0.tcp(e.world.w1, 7)  # and both agents have working egress
        assert a1.tcp(e.world.w1, 7)
        assert not a0.tcp(a1.addr, 7000)
        assert not a1.tcp(a0.addr, 7000)
        assert not a0.udp(a1.addr, 7000)
        assert not a0.ping(a1.addr)
    # nothing from outside can open a connection to an agent either
    w = e.world
    w.ip("route", "add", e.subnet, "via", w.host_ip)
    try:
        with listeners(a0, e.tmp, [f"{a0.addr}:7001"]):
            assert w.run(PY, str(networld.HERE), "udp", a0.addr, "7001", "3").returncode == 1
            assert (
                w.run(
                    PY,
                    "-c",
                    f"import socket; socket.create_connection(({a0.addr!r}, 7001), timeout=3)",
                ).returncode
                != 0
            )
    finally:
        w.ip("route", "del", e.subnet, "via", w.host_ip)


def test_reload_changes_a_live_agent(e: Env, tmp_path: Path) -> None:
    w, ag = e.world, e.a0
    ifindex = _ifindex(ag.veth)
    e.apply(ag, [f"{w.w1}:7", f"{w.w1}:80"])
    assert ag.http(f"http://{w.w1}/") is not None
    assert ag.http(f"http://{w.w3}:8080/") is None

    # re-applying the same list keeps live connections (positive control) ...
    flag = tmp_path / "same"
    hold = ag.popen(PY, str(networld.HERE), "hold", w.w1, "7", str(flag), stdout=subprocess.PIPE)
    assert hold.stdout is not None
    assert hold.stdout.readline() == b"first ok\n"
    e.apply(ag, [f"{w.w1}:7", f"{w.w1}:80"])
    flag.touch()
    assert hold.wait(timeout=60) == 0

    # ... and a new list cuts them, and takes effect for new ones
    flag = tmp_path / "changed"
    hold = ag.popen(PY, str(networld.HERE), "hold", w.w1, "7", str(flag), stdout=subprocess.PIPE)
    assert hold.stdout is not None
    assert hold.stdout.readline() == b"first ok\n"
    e.apply(ag, [f"{w.net}:8080"])
    flag.touch()
    assert hold.wait(timeout=60) == 1
    assert ag.http(f"http://{w.w1}/") is None
    assert ag_ok(ag.http(f"http://{w.w3}:8080/"), w.w3)
    assert _ifindex(ag.veth) == ifindex  # the same agent, not a recreated one


def test_nft_binary_fallback_sees_and_does_the_same(
    e: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """libnftables in process and the `nft` binary read the same table and make
    the same changes (the binary is the fallback where the library is missing)."""
    w, ag = e.world, e.a0
    monkeypatch.delenv("CORRAL_NFT_BINARY", raising=False)
    monkeypatch.setattr(nft, "_lib_state", [])  # load the library afresh
    e.apply(ag, [f"{w.w1}:7", w.w2])
    in_process = nft.read_state(e.scope)
    assert nft._libnft() is not None  # the in-process path is what ran above
    monkeypatch.setattr(nft, "_lib_state", [None])
    assert nft.read_state(e.scope) == in_process
    assert in_process.veth_of("agent-0") == ag.veth
    # a reload through the binary: w2 goes, w1:7 stays
    e.apply(ag, [f"{w.w1}:7"])
    assert nft.agents(e.scope)["agent-0"] == ag.veth
    assert ag.tcp(w.w1, 7)
    assert not ag.tcp(w.w2, 9000)
    monkeypatch.undo()
    assert nft.read_state(e.scope).of("s4", ag.veth) == []


def _ifindex(ifname: str) -> int:
    return int(Path(f"/sys/class/net/{ifname}/ifindex").read_text())


def test_ipv6_is_off_and_dropped(e: Env) -> None:
    ag = e.a0
    e.apply(ag, [e.world.w1])
    addrs = json.loads(ag.run("ip", "-j", "-6", "addr", check=True).stdout or "[]")
    assert not [a for link in addrs for a in link.get("addr_info", [])]
    assert ag.run("ip", "-6", "route", "show", "default", check=True).stdout.strip() == ""
    # force IPv6 on inside anyway: the host side still drops it
    ag.run("sysctl", "-qw", "net.ipv6.conf.eth0.disable_ipv6=0", check=True)
    try:
        v6 = "2001:2:0:%x::" % (int(ag.addr.split(".")[-2]) * 256 + int(ag.addr.split(".")[-1]))
        sh("sysctl", "-qw", f"net.ipv6.conf.{ag.veth}.disable_ipv6=0")
        sh("ip", "addr", "add", f"{v6}1/64", "dev", ag.veth, "nodad")
        ag.ip("addr", "add", f"{v6}2/64", "dev", "eth0", "nodad")
        # a static neighbour entry, so the packets really leave the agent (its
        # neighbour solicitations to the host are dropped too)
        mac = Path(f"/sys/class/net/{ag.veth}/address").read_text().strip()
        ag.ip("-6", "neigh", "add", f"{v6}1", "lladdr", mac, "dev", "eth0")
        with listeners(None, e.tmp, [f"[{v6}1]:2222"]):
            assert host_tcp(f"{v6}1", 2222)  # positive control
            before = nft.counters(e.scope, "agent-0")["denied_packets"]
            assert not ag.tcp(f"{v6}1", 2222)
            assert ag.run("ping", "-6", "-n", "-c", "1", "-W", "2", f"{v6}1").returncode != 0
            assert nft.counters(e.scope, "agent-0")["denied_packets"] > before
        denied = {(d.addr, d.proto) for d in nft.recent_denied(e.scope, "agent-0")}
        assert (f"{v6}1", "tcp") in denied
    finally:
        ag.run("sysctl", "-qw", "net.ipv6.conf.eth0.disable_ipv6=1")


def test_forwarding_is_scoped_and_teardown_leaves_nothing(
    need_root: None, uniq: str, tmp_path: Path
) -> None:
    scope = uniq
    with networld.world(uniq, tmp_path) as w, networld.agents(uniq, 1) as (_, (ag,)):
        up = Path(f"/proc/sys/net/ipv4/conf/{w.veth}/forwarding")
        assert up.read_text().strip() == "0"
        try:
            nft.ensure_table(scope, uplinks=[w.veth])
            nft.ensure_table(scope, uplinks=[w.veth])  # idempotent
            nft.apply_agent(scope, "agent-x", ag.veth, ag.addr, ag.gateway, nft.parse_allow([w.w1]))
            assert ag.tcp(w.w1, 7)
            assert up.read_text().strip() == "1"
            assert Path(f"/proc/sys/net/ipv4/conf/{ag.veth}/forwarding").read_text() == "1\n"
            assert nft.agents(scope) == {"agent-x": ag.veth}

            # a second daemon (scope) guarding the same uplink does not cut this
            # one's agents off; dropping it leaves the uplink forwarding for us
            try:
                nft.ensure_table(f"{scope}b", uplinks=[w.veth])
                assert w.veth in nft._elements(f"corral_{scope}b", "guarded")
                assert ag.tcp(w.w1, 7)
            finally:
                nft.drop_table(f"{scope}b")
            assert up.read_text().strip() == "1"
            assert ag.tcp(w.w1, 7)

            nft.remove_agent(scope, "agent-x")
            nft.remove_agent(scope, "agent-x")  # idempotent
            assert Path(f"/proc/sys/net/ipv4/conf/{ag.veth}/forwarding").read_text() == "0\n"
            assert not ag.tcp(w.w1, 7)
            listing = sh("nft", "list", "table", "inet", f"corral_{scope}").stdout
            assert "agent-x" not in listing
            assert ag.veth not in listing
        finally:
            nft.drop_table(scope)
        assert f"corral_{scope}" not in sh("nft", "list", "tables").stdout
        assert up.read_text().strip() == "0"  # the uplink is back as it was
    assert f"corral_{scope}" not in sh("nft", "list", "tables").stdout
    assert not any(uniq in ln for ln in sh("ip", "netns", "list").stdout.splitlines())
    assert uniq not in sh("ip", "-br", "link").stdout


def test_uplink_guard_keeps_other_forwarding_off(
    need_root: None, uniq: str, tmp_path: Path
) -> None:
    """Turning on the uplink's forwarding must not make the host a router for anything else."""
    scope = uniq
    with networld.world(uniq, tmp_path) as w, networld.agents(uniq, 1) as (_, (by,)):
        # `by` plays an unrelated host network (no corral rules for it)
        # the return path of that unrelated network forwards already
        sh("sysctl", "-qw", f"net.ipv4.conf.{by.veth}.forwarding=1")
        with listeners(by, tmp_path, [f"{by.addr}:7002"]):
            w.ip("route", "add", str(by.net), "via", w.host_ip)
            probe = [
                PY,
                "-c",
                f"import socket; socket.create_connection(({by.addr!r}, 7002), timeout=3)",
            ]
            assert w.run(*probe).returncode != 0  # before corral: not forwarded
            try:
                nft.ensure_table(scope, uplinks=[w.veth])
                assert w.run(*probe).returncode != 0  # forwarding on, the guard holds
                # positive control: without the guard element the same probe goes through
                sh(
                    "nft",
                    "delete",
                    "element",
                    "inet",
                    f"corral_{scope}",
                    "guarded",
                    f'{{ "{w.veth}" }}',
                )
                assert w.run(*probe).returncode == 0
            finally:
                nft.drop_table(scope)
                sh("sysctl", "-qw", f"net.ipv4.conf.{w.veth}.forwarding=0")


def test_policy_on_a_sandbox_netns(need_root: None, uniq: str, tmp_path: Path) -> None:
    """The same policy on a namespace made by sandbox.netns, as the daemon makes them."""
    from sandbox import netns
    from sandbox.spec import Network

    scope = uniq
    with networld.world(uniq, tmp_path) as w:
        sub = networld.free_subnet(networld.AGENT_SPACE, 30)
        gw, addr = str(sub.network_address + 1), str(sub.network_address + 2)
        Path("/run/netns").mkdir(exist_ok=True)
        net = Network(
            netns_path=f"/run/netns/{uniq}-sbx",
            veth_host=netns.veth_name(scope, "sbx-1"),
            address=f"{addr}/30",
            gateway=f"{gw}/30",
        )
        try:
            netns.prepare(net)
            ag = Agent.adopt(f"{uniq}-sbx", net.veth_host, addr, gw, "sbx-1")
            nft.ensure_table(scope, uplinks=[w.veth])
            assert not ag.tcp(w.w1, 7)  # prepared but no policy yet: the veth forwards nothing
            nft.apply_network(scope, "sbx-1", net, nft.parse_allow([f"{w.w1}:7"]))
            assert ag.tcp(w.w1, 7)
            assert not ag.tcp(w.w1, 9000)
            assert not ag.tcp(w.w2, 7)
            with listeners(None, tmp_path, [f"{gw}:2222"]):
                assert host_tcp(gw, 2222)
                assert not ag.tcp(gw, 2222)
            v6 = json.loads(ag.run("ip", "-j", "-6", "addr", "show", "dev", "eth0").stdout or "[]")
            assert not [a for link in v6 for a in link.get("addr_info", [])]
            nft.remove_agent(scope, "sbx-1")
            assert not ag.tcp(w.w1, 7)
            # without rules the veth routes nothing at all (not even one-way)
            fwd = Path(f"/proc/sys/net/ipv4/conf/{net.veth_host}/forwarding")
            assert fwd.read_text().strip() == "0"
        finally:
            nft.drop_table(scope)
            netns.release(net)
        assert not Path(net.netns_path).exists()
        assert f"corral_{scope}" not in sh("nft", "list", "tables").stdout


def test_ipv6_enabled_agent_is_filtered_like_ipv4(
    need_root: None, uniq: str, tmp_path: Path
) -> None:
    """IPv6 on: allowed [addr]:port works, the rest is denied, and off means off.

    IPv6 forwarding has no per-interface switch, so this test does not use the
    host as the router: a namespace of its own ("r6") routes between the agent
    and the world, with IPv6 forwarding on, and holds the nft table.
    """
    r6, a6, w6 = f"{uniq}-r6", f"{uniq}-a6", f"{uniq}-w6"
    wv6, gw6 = "2001:2:0:b::1", "2001:2:0:a::1"
    created: list[str] = []
    procs: list[subprocess.Popen[bytes]] = []

    def in_r6(code: str) -> None:
        prog = f"import sys; sys.path.insert(0, {str(networld.REPO)!r})\nfrom sandbox import nft\n"
        r = sh("ip", "netns", "exec", r6, PY, "-c", prog + code, check=False)
        assert r.returncode == 0, r.stderr

    try:
        for ns in (r6, a6, w6):
            sh("ip", "netns", "add", ns)
            created.append(ns)
        sh("ip", "-n", r6, "link", "add", "va", "type", "veth", "peer", "name", "eth0", "netns", a6)
        sh("ip", "-n", r6, "link", "add", "vw", "type", "veth", "peer", "name", "eth0", "netns", w6)
        for ns, cmds in (
            (
                r6,
                [
                    ["addr", "add", "198.19.0.1/30", "dev", "va"],
                    ["addr", "add", f"{gw6}/64", "dev", "va", "nodad"],
                    ["addr", "add", "2001:2:0:b::ff/64", "dev", "vw", "nodad"],
                    ["link", "set", "va", "up"],
                    ["link", "set", "vw", "up"],
                    ["link", "set", "lo", "up"],
                ],
            ),
            (
                a6,
                [
                    ["addr", "add", "198.19.0.2/30", "dev", "eth0"],
                    ["addr", "add", "2001:2:0:a::2/64", "dev", "eth0", "nodad"],
                    ["link", "set", "eth0", "up"],
                    ["link", "set", "lo", "up"],
                    ["route", "add", "default", "via", "198.19.0.1"],
                    ["-6", "route", "add", "default", "via", gw6],
                ],
            ),
            (
                w6,
                [
                    ["addr", "add", f"{wv6}/64", "dev", "eth0", "nodad"],
                    ["link", "set", "eth0", "up"],
                    ["link", "set", "lo", "up"],
                    ["-6", "route", "add", "2001:2:0:a::/64", "via", "2001:2:0:b::ff"],
                ],
            ),
        ):
            for c in cmds:
                sh("ip", "-n", ns, *c)
        sh("ip", "netns", "exec", r6, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
        ready = tmp_path / "w6.ready"
        procs.append(
            subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    w6,
                    PY,
                    str(networld.HERE),
                    "listen",
                    str(ready),
                    f"[{wv6}]:7",
                    f"[{wv6}]:9000",
                ],
                stdout=subprocess.DEVNULL,
            )
        )
        networld.wait_for(ready.exists, 60, "the IPv6 world's listeners")
        ag = Agent.adopt(a6, "va", "198.19.0.2", "198.19.0.1", "v6a")
        # positive control: the router reaches both ports itself
        for port in (7, 9000):
            r = sh(
                "ip",
                "netns",
                "exec",
                r6,
                PY,
                "-c",
                f"import socket; socket.create_connection(({wv6!r}, {port}), timeout=5)",
                check=False,
            )
            assert r.returncode == 0, r.stderr

        in_r6(
            f"nft.ensure_table({uniq!r}, ['vw'])\n"
            f"nft.apply_agent({uniq!r}, 'v6a', 'va', '198.19.0.2', '198.19.0.1', "
            f"nft.parse_allow(['[{wv6}]:7']), ipv6=True)"
        )
        assert ag.tcp(wv6, 7)
        assert not ag.tcp(wv6, 9000)
        assert ag.run("ping", "-6", "-n", "-c", "1", "-W", "3", wv6).returncode != 0
        # the same list with IPv6 off: nothing over IPv6 at all
        in_r6(
            f"nft.apply_agent({uniq!r}, 'v6a', 'va', '198.19.0.2', '198.19.0.1', "
            f"nft.parse_allow(['[{wv6}]:7']), ipv6=False)"
        )
        assert not ag.tcp(wv6, 7)
        in_r6(
            f"d = nft.recent_denied({uniq!r}, 'v6a')\n"
            f"assert any(x.addr == {wv6!r} and x.port == 7 for x in d), d\n"
            f"assert any(x.addr == {wv6!r} and x.port == 9000 for x in d), d"
        )
    finally:
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, 9)
            p.wait(timeout=10)
        for ns in created:
            sh("ip", "netns", "del", ns, check=False)
    assert not any(uniq in ln for ln in sh("ip", "netns", "list").stdout.splitlines())
