"""Domain allow-lists: the daemon's resolver (supervisor.egress) with real nft rules.

The world's DNS server logs every query it receives, so "never left the host"
is checked where it matters: at the server an attacker would control.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from sandbox import nft
from supervisor.egress import Resolver
from tests.integration import networld
from tests.integration.networld import Agent, World, host_tcp, listeners, sh

pytestmark = pytest.mark.root
T = TypeVar("T")

ALLOW0 = ["ok.corral.test:80", "*.svc.corral.test", "*.bad.corral.test", "ttl0.corral.test"]


class LoopThread:
    """An asyncio loop in a thread, so sync probes can run while the resolver serves."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="resolver", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.loop.close()


@dataclass
class Env:
    scope: str
    world: World
    subnet: str
    a0: Agent
    a1: Agent
    tmp: Path
    loop: LoopThread
    resolver: Resolver
    events: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)

    def queries(self) -> list[str]:
        return self.world.queries()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    if os.geteuid() != 0:
        pytest.fail("this test needs root: run it through `sudo scripts/test`")
    uniq = "t" + secrets.token_hex(3)[:5]
    tmp = tmp_path_factory.mktemp(uniq)
    with networld.agents(uniq, 2) as (subnet, (a0, a1)):
        zone = {
            "a.svc": "",
            "b.svc": "",  # filled below with world addresses
            "loop.bad": "127.0.0.1",
            "ll.bad": "169.254.169.254",
            "zero.bad": "0.0.0.0",
            "mc.bad": "224.0.0.1",
            "gw.bad": a0.gateway,
            "peer.bad": a1.addr,
        }
        w = World(uniq, tmp)
        zone.update({"a.svc": w.w3, "b.svc": w.w2, "ttl0": w.w1})
        resolv = [Path(f"/etc/netns/{ag.name}") for ag in (a0, a1)]
        loop = LoopThread()
        events: list[tuple[str, str, dict[str, Any]]] = []
        resolver = Resolver(
            uniq, [(w.w1, 53)], str(subnet), lambda k, a, d: events.append((k, a, d))
        )
        try:
            w.start(zone)
            # the agents' resolv.conf: `ip netns exec` bind-mounts /etc/netns/NAME/*
            for ag, d in zip((a0, a1), resolv, strict=True):
                d.mkdir(parents=True)
                (d / "resolv.conf").write_text(f"nameserver {ag.gateway}\noptions attempts:2\n")
            nft.ensure_table(uniq, uplinks=[w.veth])
            for ag, allow in ((a0, ALLOW0), (a1, [])):
                entries = nft.parse_allow(allow)
                nft.apply_agent(uniq, ag.agent, ag.veth, ag.addr, ag.gateway, entries)
                loop.run(resolver.add_agent(ag.agent, ag.gateway, entries))
            yield Env(uniq, w, str(subnet), a0, a1, tmp, loop, resolver, events)
        finally:
            try:
                loop.run(resolver.close())
            finally:
                loop.close()
                nft.drop_table(uniq)
                w.close()
                for d in resolv:
                    shutil.rmtree(d, ignore_errors=True)
                with contextlib.suppress(OSError):
                    Path("/etc/netns").rmdir()  # only if empty: others' entries stay


@pytest.fixture
def e(env: Env, need_root: None) -> Env:
    return env


def learned(e: Env, ag: Agent, kind: str) -> list[dict[str, Any]]:
    """`ag`'s elements of the learned set `kind` ("l4", "l4p"): {"key": [...], "timeout": ...}."""
    out = sh("nft", "-j", "list", "set", "inet", f"corral_{e.scope}", kind).stdout
    res = []
    for it in json.loads(out)["nftables"]:
        for el in it.get("set", {}).get("elem", []):
            elem = el["elem"] if isinstance(el, dict) and "elem" in el else {"val": el}
            parts = elem["val"]["concat"]
            if parts[0] == ag.veth:
                res.append({**elem, "key": parts[1:]})
    return res


def test_allowed_name_resolves_and_only_its_port_opens(e: Env) -> None:
    w, ag = e.world, e.a0
    assert ag.dig("ok.corral.test", ag.gateway) == [w.w1]
    # through the agent's system resolver, as a program would do it
    body = ag.http("http://ok.corral.test/")
    assert body == f"world {w.w1}:80 host=ok.corral.test\n"
    assert not ag.tcp(w.w1, 7)  # the entry is port-qualified: only :80 opened
    vals = [el["key"] for el in learned(e, ag, "l4p")]
    assert [w.w1, 80] in vals
    # over TCP as well
    assert ag.dig("ok.corral.test", ag.gateway, "+tcp") == [w.w1]


def test_wildcard_entry_learns_address_with_all_ports(e: Env) -> None:
    w, ag = e.world, e.a0
    # w3 is not allowed by address: before the name is resolved it is closed
    assert ag.http(f"http://{w.w3}/") is None
    assert ag.dig("a.svc.corral.test", ag.gateway) == [w.w3]
    assert ag.http("http://a.svc.corral.test/") is not None
    assert ag.tcp(w.w3, 7)
    assert ag.dig("svc.corral.test", ag.gateway) is None  # "*.x" is not x itself


def test_unallowed_names_never_leave_the_host(e: Env) -> None:
    ag = e.a0
    secret = secrets.token_hex(20)
    before = len(e.queries())
    stats0 = e.resolver.stats(ag.agent)
    assert ag.dig("other.corral.test", ag.gateway) is None
    assert ag.dig(f"{secret}.tunnel.corral.test", ag.gateway) is None
    assert ag.dig(f"{secret}.tunnel.corral.test", ag.gateway, "+tcp") is None
    assert ag.dig("example.com", ag.gateway) is None
    # an allowed name, but not an address type: answered empty, not forwarded
    assert ag.dig("ok.corral.test", ag.gateway, qtype="TXT") == []
    assert ag.dig("ok.corral.test", ag.gateway, qtype="AAAA") == []  # IPv6 is off
    assert ag.run("getent", "hosts", "other.corral.test").returncode != 0
    logged = e.queries()[before:]
    assert logged == [], logged
    assert not any(secret in q for q in e.queries())
    # positive control: an allowed name does reach the world's server
    assert ag.dig("ok.corral.test", ag.gateway) == [e.world.w1]
    assert set(e.queries()[before:]) == {"ok.corral.test A"}  # (a retry may repeat it)
    stats = e.resolver.stats(ag.agent)
    assert stats["refused"] >= stats0.get("refused", 0) + 4
    denied = [ev for ev in e.events if ev[0] == "egress.dns_denied" and ev[1] == ag.agent]
    assert denied  # reported (rate-limited: maybe only the first)


def test_direct_dns_to_any_other_server_is_dropped(e: Env) -> None:
    w, ag = e.world, e.a0
    before = len(e.queries())
    assert ag.dig("ok.corral.test", w.w1) is None
    assert ag.dig("ok.corral.test", w.w1, "+tcp") is None
    assert ag.dig("ok.corral.test", e.a1.gateway) is None  # another agent's resolver
    assert e.queries()[before:] == []
    # positive control: the host asks the same server and gets its answer
    r = sh("dig", "+time=3", "+tries=2", f"@{w.w1}", "ok.corral.test", "+short")
    assert r.stdout.split() == [w.w1]
    assert set(e.queries()[before:]) == {"ok.corral.test A"}  # (a retry may repeat it)


def test_forged_host_header_or_resolve_to_other_address_fails(e: Env) -> None:
    w, ag = e.world, e.a0
    assert ag.dig("ok.corral.test", ag.gateway) == [w.w1]
    # positive controls: the name, and --resolve to its real address
    assert ag.http("http://ok.corral.test/") is not None
    assert ag.http("http://ok.corral.test/", "--resolve", f"ok.corral.test:80:{w.w1}")
    # the allowed name pinned on a disallowed address, or in a Host header
    assert ag.http("http://ok.corral.test/", "--resolve", f"ok.corral.test:80:{w.w2}") is None
    assert ag.http(f"http://{w.w2}/", "-H", "Host: ok.corral.test") is None
    # (TLS SNI is the same case: the policy looks at addresses, never at names)


def test_answers_pointing_inside_are_refused(e: Env) -> None:
    ag = e.a0
    for name in ("loop", "ll", "zero", "mc", "gw", "peer"):
        fq = f"{name}.bad.corral.test"
        # positive control: the world's server does hand out that address
        r = sh("dig", "+time=3", "+tries=2", f"@{e.world.w1}", fq, "+short")
        assert r.stdout.strip(), fq
        assert ag.dig(fq, ag.gateway) is None, fq
    kinds = {ev[0] for ev in e.events if ev[1] == ag.agent}
    assert "egress.dns_rebinding" in kinds
    assert e.resolver.stats(ag.agent)["rebinding_blocked"] >= 6
    # none of them made it into the agent's sets
    vals = {str(el["key"]) for el in learned(e, ag, "l4")}
    assert not any(x in v for v in vals for x in ("127.0.0.1", "169.254", e.a1.addr))


def test_ttl_is_bounded(e: Env) -> None:
    ag = e.a0
    r = ag.run(
        "dig", "+time=3", "+tries=2", f"@{ag.gateway}", "ttl0.corral.test", "+noall", "+answer"
    )
    assert r.stdout.split()[1] == "0"  # the agent is told TTL 0 ...
    elems = {el["key"][0]: el for el in learned(e, ag, "l4")}
    assert elems[e.world.w1]["timeout"] >= nft.MIN_LEARNED_TTL  # ... the set keeps it >= 5 s


def test_reload_takes_names_away_from_a_live_agent(e: Env) -> None:
    w, ag = e.world, e.a0
    assert ag.dig("b.svc.corral.test", ag.gateway) == [w.w2]
    assert ag.http(f"http://{w.w2}/") is not None
    try:
        allow = nft.parse_allow(["ok.corral.test:80"])
        nft.apply_agent(e.scope, ag.agent, ag.veth, ag.addr, ag.gateway, allow)
        e.loop.run(e.resolver.update_agent(ag.agent, allow))
        assert ag.http(f"http://{w.w2}/") is None  # learned entry pruned
        assert ag.dig("b.svc.corral.test", ag.gateway) is None
        assert ag.dig("ok.corral.test", ag.gateway) == [w.w1]  # still allowed
        assert ag.http("http://ok.corral.test/") is not None
    finally:
        allow = nft.parse_allow(ALLOW0)
        nft.apply_agent(e.scope, ag.agent, ag.veth, ag.addr, ag.gateway, allow)
        e.loop.run(e.resolver.update_agent(ag.agent, allow))


def test_only_the_dns_port_of_the_host_answers(e: Env) -> None:
    ag = e.a0
    with listeners(None, e.tmp, [f"{ag.gateway}:2222"]):
        assert host_tcp(ag.gateway, 2222)  # the host's service is there
        assert ag.dig("ok.corral.test", ag.gateway) == [e.world.w1]  # the resolver answers
        assert not ag.tcp(ag.gateway, 2222)
        assert not ag.udp(ag.gateway, 2222)


def test_agent_with_empty_allow_list_resolves_nothing(e: Env) -> None:
    ag = e.a1
    before = len(e.queries())
    assert ag.dig("ok.corral.test", ag.gateway) is None
    assert ag.http(f"http://{e.world.w1}/") is None
    assert e.queries()[before:] == []


def test_a_wildcard_dns_service_of_the_host_never_answers_agents(e: Env) -> None:
    """With the resolver down, a host service on 0.0.0.0:53 must not stand in for it."""
    ag = e.a1
    e.loop.run(e.resolver.remove_agent(ag.agent))
    try:
        # (UDP only: a TCP wildcard listener cannot share port 53 with the other
        # agent's resolver, which stays up)
        with listeners(None, e.tmp, ["udp/0.0.0.0:53"]):
            # positive control: the decoy answers on the agent's gateway address
            assert networld.host_udp(ag.gateway, 53)
            assert not ag.udp(ag.gateway, 53)
    finally:
        e.loop.run(e.resolver.add_agent(ag.agent, ag.gateway, []))
    # and the resolver is reachable again once it is back
    r = ag.run("dig", "+time=3", "+tries=2", f"@{ag.gateway}", "ok.corral.test")
    assert "status: REFUSED" in r.stdout
