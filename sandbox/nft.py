"""nftables egress policy: one table per daemon, agents as elements of shared sets.

Mechanism: the rules live in the host's network namespace, on the host side of
each agent's veth, where the agent (no capabilities, its own netns) cannot touch
them. Every change is one nft transaction (one libnftables command buffer,
in process; see "running nft" below), so a reload of an agent's allow-list
replaces its elements atomically: there is no instant where the agent is
unfiltered or half-filtered.

Layout of table ``inet corral_<scope>`` (scope is a short id chosen by the
daemon so that two daemons, or tests, never share a table). The rules are
fixed; an agent is only *elements*, keyed by its veth name, in the table's
sets (see SETS). Adding the 200th agent therefore costs what adding the first
does: per-agent chains and sets made every nft call read back thousands of
objects (measured with 200 agents: 130-180 ms per change and 1.8 s for `nft
list tables`; with shared sets, through a forked `nft`, a DNS-learned element
cost ~20 ms and a whole apply_agent ~120 ms, most of it reading the table
back). Now, in process and reading back only `agent_ifs` for a new agent, an
apply_agent costs ~2-3 ms and a learned element ~1 ms (100 agents).

- ``forward`` (filter hook): traffic from an agent veth (``@agent_ifs``) goes
  to ``from_agent``, which ends in accept or ``deny``. Traffic *into* an
  agent veth is accepted only as a reply (established/related) or when a
  host-side DNAT published the port; new flows into an agent are dropped (so
  agents cannot reach each other, nor anything outside open connections to
  them).
- ``input`` (filter hook): traffic from an agent to the host goes to
  ``agent_in``: only DNS (udp/tcp 53) to the agent's own gateway address,
  to a socket bound to exactly that address (the daemon's resolver), and
  replies to connections the host opened are accepted; everything else
  addressed to the host -- the daemon's SSH and API ports, published ports,
  any service on any host address -- is denied.
- ``deny``: counts (``@c_deny``), remembers the destination (``@dn4`` ...,
  for ``recent_denied()``) and rejects with admin-prohibited.
- ``postrouting`` (nat hook): agent addresses leaving through anything but an
  agent veth are masqueraded.
- sets: ``s4/s4p/s6/s6p`` (the template's addresses, networks, address .
  port), ``l4/l4p/l6/l6p`` (filled by the DNS resolver with a timeout equal to
  the record's TTL), per-veth counters ``c_ok/c_deny/c_dns``, and the agent's
  own address (``srcs``, anti-spoofing), gateway (``gws``) and options.

Reload semantics: each ``apply_agent`` stamps accepted flows with a fresh
conntrack mark (a random "generation"). Packets of a flow whose mark is the
current generation are accepted without a set lookup, so a long connection
survives the expiry of the DNS-learned entry that let it start; after a reload
the mark no longer matches and every packet of an old flow is judged again by
the new allow-list, so removing a destination cuts its live connections too.
The mark's top bit (FLOW_MARK) says "a corral table accepted this flow": the
uplink guard (below) lets replies of such flows through, so two daemons
guarding the same uplink never cut off each other's agents. (corral owns the
conntrack mark of flows coming out of its veths; a host that uses ct marks for
its own policy routing on those flows would conflict.)

Forwarding, and why not the global switch: IPv4 forwarding is decided per
*input* interface (``IN_DEV_FORWARD(in_dev)`` in ip_route_input_slow), so we
turn on ``net.ipv4.conf.<veth>.forwarding`` for each agent veth (outbound
path) and ``net.ipv4.conf.<uplink>.forwarding`` for the uplink(s) replies come
back on (return path). Never ``net.ipv4.ip_forward``, which would turn every
interface into a router. Enabling forwarding on an uplink would however let
the uplink forward to *any* interface, so when an uplink's forwarding was off
before corral turned it on, the uplink goes into the ``guarded`` set and the
forward chain drops whatever arrives on it and does not go to an agent veth:
the host forwards exactly what it forwarded before, plus agent traffic.
``drop_table`` turns a guarded uplink's forwarding back off unless another
corral table still guards it. IPv6 forwarding has no per-interface switch
(``net.ipv6.conf.all.forwarding`` is global and also changes router
advertisement handling on every interface), so corral never turns it on: an
agent with ``ipv6=True`` is filtered exactly like IPv4, and its IPv6 egress
works only where the host admin enabled IPv6 forwarding (logged as a warning),
and is not masqueraded (it needs routable addresses).
"""

from __future__ import annotations

import ctypes
import ipaddress
import json
import logging
import os
import re
import secrets
import subprocess
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sandbox.errors import CorralError, HostSetupError, KernelError, NotFound
from sandbox.spec import Network, check_name

log = logging.getLogger(__name__)

#: Scope ids become part of the table name; keep them short and plain.
SCOPE_RE = re.compile(r"^[a-z0-9][a-z0-9_]{0,23}$")
#: Interface names: at most 15 bytes (IFNAMSIZ - 1), no quoting surprises in nft.
IFNAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
#: DNS names in allow entries: letters, digits, '-', '.', optional leading '*.'.
DOMAIN_RE = re.compile(
    r"^(\*\.)?([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?\.)*[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$"
)

#: DNS-learned entries live at least this long (seconds): a client that got an
#: answer with TTL 0 still needs a moment to connect.
MIN_LEARNED_TTL = 5
#: ... and at most this long, whatever the record says.
MAX_LEARNED_TTL = 3600
#: Set in the conntrack mark of every flow a corral table accepted (the low 31
#: bits are the agent's generation).
FLOW_MARK = 0x80000000
#: How long a denied destination is remembered for recent_denied().
DENIED_MEMORY = "10m"
#: At most this many remembered denied destinations per set (shared by the
#: scope's agents: one agent scanning can crowd out the others' samples, never
#: their counters or the denial itself).
DENIED_SIZE = 65536

#: Destinations never reachable in egress "allow everything" mode: the
#: host-ish ranges (cloud metadata lives at 169.254.169.254).
_ALLOW_ALL_BLOCK4 = "{ 0.0.0.0/8, 127.0.0.0/8, 169.254.0.0/16, 224.0.0.0/3 }"
_ALLOW_ALL_BLOCK6 = "{ ::/127, ::ffff:0:0/96, fe80::/10, ff00::/8 }"


@dataclass(frozen=True)
class AllowEntry:
    """One parsed ``network.allow`` entry.

    Either an address entry (``net`` is an IPv4/IPv6 network in CIDR form, a
    single address being a /32 or /128) or a domain entry (``domain`` is a
    lowercase name without trailing dot; ``wildcard`` means ``*.domain``:
    any name strictly below it, not the domain itself). ``port`` restricts
    TCP and UDP to that destination port; None allows every port and protocol.
    """

    text: str  # the entry as written, for messages
    net: str | None = None
    domain: str | None = None
    wildcard: bool = False
    port: int | None = None

    @property
    def is_address(self) -> bool:
        return self.net is not None

    @property
    def family(self) -> Literal[4, 6] | None:
        if self.net is None:
            return None
        return 4 if ipaddress.ip_network(self.net).version == 4 else 6

    def matches(self, name: str) -> bool:
        """True if DNS name `name` (any case, optional trailing dot) is allowed by this entry."""
        if self.domain is None:
            return False
        name = name.rstrip(".").lower()
        if self.wildcard:
            return name.endswith("." + self.domain)
        return name == self.domain


def _parse_port(text: str, entry: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise CorralError(f"allow entry {entry!r}: port {text!r} must be 1-65535")
    return int(text)


def parse_allow_entry(text: str) -> AllowEntry:
    """Parse "host[:port]" where host is an IP, a CIDR, "[v6]" / "[v6/len]", a name or "*.name"."""
    if not isinstance(text, str) or not text or text != text.strip():
        raise CorralError(f"allow entry {text!r}: empty or surrounded by spaces")
    host, port = text, None
    if text.startswith("["):
        # [2001:db8::1]:443 or [2001:db8::/32]
        close = text.find("]")
        if close < 0:
            raise CorralError(f"allow entry {text!r}: missing ']'")
        host, rest = text[1:close], text[close + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise CorralError(f"allow entry {text!r}: expected ':port' after ']'")
            port = _parse_port(rest[1:], text)
    elif text.count(":") == 1:
        host, p = text.split(":")
        port = _parse_port(p, text)
    # more than one ':' without brackets: a bare IPv6 address or network
    try:
        net = ipaddress.ip_network(host, strict=True)
    except ValueError:
        net = None
        try:
            loose = ipaddress.ip_network(host, strict=False)
        except ValueError:
            loose = None
        if loose is not None:
            raise CorralError(
                f"allow entry {text!r}: host bits set in network, write {loose.with_prefixlen}"
            ) from None
    if net is not None:
        return AllowEntry(text=text, net=net.with_prefixlen, port=port)
    name = host.lower().rstrip(".")
    if len(name) > 253 or not DOMAIN_RE.match(name):
        raise CorralError(
            f"allow entry {text!r}: not an address, network or domain name",
            hint="use e.g. 'pypi.org', '*.example.com', 'api.example.com:443', "
            "'198.18.0.10:5432' or '198.18.0.0/24'",
        )
    if name.startswith("*."):
        return AllowEntry(text=text, domain=name[2:], wildcard=True, port=port)
    return AllowEntry(text=text, domain=name, port=port)


def parse_allow(entries: Iterable[str]) -> list[AllowEntry]:
    """Parse a template's whole allow list (see parse_allow_entry)."""
    return [parse_allow_entry(e) for e in entries]


# --- names -------------------------------------------------------------------


def table_name(scope: str) -> str:
    if not isinstance(scope, str) or not SCOPE_RE.match(scope):
        raise CorralError(
            f"invalid nft scope {scope!r}",
            hint="use 1-24 characters: [a-z0-9_], not starting with _",
        )
    return f"corral_{scope}"


def _ifname(name: str) -> str:
    if not isinstance(name, str) or not IFNAME_RE.match(name):
        raise CorralError(f"invalid interface name {name!r}", hint="1-15 of [A-Za-z0-9_.-]")
    return name


def _ip(addr: str, what: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """Accept "10.0.0.2" or "10.0.0.2/30" (an interface address); return the address."""
    try:
        return ipaddress.ip_interface(addr).ip
    except ValueError as e:
        raise CorralError(f"invalid {what} {addr!r}") from e


# --- the table's layout ------------------------------------------------------------

_DENIED = f"flags dynamic,timeout; timeout {DENIED_MEMORY}; size {DENIED_SIZE};"

#: Every set of a scope's table, shared by its agents and keyed by the agent's
#: veth name: adding an agent adds elements, never rules, so the ruleset (and
#: what nft must read back before each change) stays small however many agents
#: there are.
SETS: dict[str, str] = {
    # the hooked veths; each element's comment is the agent's name
    "agent_ifs": "type ifname;",
    "agent_addrs": "type ipv4_addr;",  # for masquerade
    "guarded": "type ifname;",  # uplinks whose forwarding corral turned on
    "srcs": "type ifname . ipv4_addr;",  # the only source address per veth
    "gws": "type ifname . ipv4_addr;",  # the resolver's address per veth
    "v6_ifs": "type ifname;",  # agents with IPv6 on
    "all_ifs": "type ifname;",  # agents with egress "allow" (everything)
    "gens": "type mark . ifname;",  # current generation per veth (see module doc)
    # per-agent counters: a lookup in a set with `counter` counts per element
    "c_ok": "type ifname; counter;",
    "c_deny": "type ifname; counter;",
    "c_dns": "type ifname; counter;",
    # the template's address entries
    "s4": "type ifname . ipv4_addr; flags interval;",
    "s4p": "type ifname . ipv4_addr . inet_service; flags interval;",
    "s6": "type ifname . ipv6_addr; flags interval;",
    "s6p": "type ifname . ipv6_addr . inet_service; flags interval;",
    # learned from DNS answers, each with the record's (bounded) TTL
    "l4": "type ifname . ipv4_addr; flags timeout;",
    "l4p": "type ifname . ipv4_addr . inet_service; flags timeout;",
    "l6": "type ifname . ipv6_addr; flags timeout;",
    "l6p": "type ifname . ipv6_addr . inet_service; flags timeout;",
    # recently denied destinations, for recent_denied()
    "dn4": f"type ifname . ipv4_addr . inet_proto . inet_service; {_DENIED}",
    "dn4x": f"type ifname . ipv4_addr . inet_proto; {_DENIED}",
    "dn6": f"type ifname . ipv6_addr . inet_proto . inet_service; {_DENIED}",
    "dn6x": f"type ifname . ipv6_addr . inet_proto; {_DENIED}",
}
MAPS: dict[str, str] = {"gen_map": "type ifname : mark;"}
#: What a reload replaces; the learned, denied and counter sets survive it.
_RELOADED = ("agent_addrs", "srcs", "gws", "v6_ifs", "all_ifs", "gens", "s4", "s4p", "s6", "s6p")
_LEARNED = ("l4", "l4p", "l6", "l6p")
_DENIED_SETS = ("dn4", "dn4x", "dn6", "dn6x")

_OK = "ct mark set iifname map @gen_map iifname @c_ok accept"

#: (chain, rules) of the shared regular chains, then the base chains.
_CHAINS: list[tuple[str, str | None, list[str]]] = [
    (
        "deny",
        None,
        [
            "iifname @c_deny",
            # the `update`s sit in their own rules: a full set stops its rule
            "meta l4proto { tcp, udp } "
            "update @dn4 { iifname . ip daddr . meta l4proto . th dport }",
            "meta nfproto ipv4 meta l4proto != { tcp, udp } "
            "update @dn4x { iifname . ip daddr . meta l4proto }",
            "meta l4proto { tcp, udp } "
            "update @dn6 { iifname . ip6 daddr . meta l4proto . th dport }",
            "meta nfproto ipv6 meta l4proto != { tcp, udp } "
            "update @dn6x { iifname . ip6 daddr . meta l4proto }",
            # reject rather than drop: the agent's tools fail at once with
            # "administratively prohibited" instead of hanging until a timeout
            "reject with icmpx admin-prohibited",
        ],
    ),
    (
        "from_agent",
        None,
        [
            # never to another agent (nor back into any agent veth)
            "oifname @agent_ifs goto deny",
            "ct state invalid goto deny",
            # no spoofed sources: replies would land at whoever owns that address
            "meta nfproto ipv4 iifname . ip saddr != @srcs goto deny",
            "meta nfproto ipv6 iifname != @v6_ifs goto deny",
            # a flow accepted under the agent's current generation goes on without lookups
            "ct mark . iifname @gens iifname @c_ok accept",
            f"iifname . ip daddr @s4 {_OK}",
            f"meta l4proto {{ tcp, udp }} iifname . ip daddr . th dport @s4p {_OK}",
            f"iifname . ip daddr @l4 {_OK}",
            f"meta l4proto {{ tcp, udp }} iifname . ip daddr . th dport @l4p {_OK}",
            f"iifname . ip6 daddr @s6 {_OK}",
            f"meta l4proto {{ tcp, udp }} iifname . ip6 daddr . th dport @s6p {_OK}",
            f"iifname . ip6 daddr @l6 {_OK}",
            f"meta l4proto {{ tcp, udp }} iifname . ip6 daddr . th dport @l6p {_OK}",
            # egress "allow": everything but the host-ish ranges (cloud metadata
            # lives at 169.254.169.254)
            "iifname @all_ifs ip daddr { 0.0.0.0/8, 127.0.0.0/8, 169.254.0.0/16, 224.0.0.0/3 } "
            "goto deny",
            "iifname @all_ifs ip6 daddr { ::/127, ::ffff:0:0/96, fe80::/10, ff00::/8 } goto deny",
            f"iifname @all_ifs {_OK}",
            "goto deny",
        ],
    ),
    (
        "agent_in",
        None,
        [
            # replies to connections the host opened (e.g. the daemon forwarding a port)
            "ct state established,related accept",
            # DNS to the agent's gateway, and only to a socket bound to that very
            # address (the daemon's resolver): a host service on 0.0.0.0:53
            # (dnsmasq, say) must never answer agents, e.g. while the daemon is down
            "meta l4proto { tcp, udp } th dport 53 iifname . ip daddr @gws socket wildcard 0 "
            "iifname @c_dns accept",
            # neighbour discovery with the host side of the veth, for IPv6 agents
            "iifname @v6_ifs icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert, "
            "nd-router-solicit } ip6 hoplimit 255 accept",
            "goto deny",
        ],
    ),
    (
        "forward",
        "type filter hook forward priority filter; policy accept;",
        [
            "iifname @agent_ifs goto from_agent",
            "oifname @agent_ifs ct state established,related accept",
            # a port the host published by DNAT is an intended way in
            "oifname @agent_ifs ct status dnat accept",
            "oifname @agent_ifs drop",
            # a guarded uplink forwards to agents only (see module docstring); replies
            # to flows any corral table accepted carry FLOW_MARK, so another daemon's
            # agents behind the same uplink are not cut off by this table's guard
            f"iifname @guarded ct mark and 0x{FLOW_MARK:08x} == 0 drop",
        ],
    ),
    (
        "input",
        "type filter hook input priority filter; policy accept;",
        ["iifname @agent_ifs goto agent_in"],
    ),
    (
        "postrouting",
        "type nat hook postrouting priority srcnat; policy accept;",
        ["ip saddr @agent_addrs oifname != @agent_ifs masquerade"],
    ),
]


# --- plans (pure: text for `nft -f -`) -----------------------------------------


def plan_table(scope: str) -> str:
    """The idempotent table: sets, maps and chains, the chains' rules rewritten whole.

    `add` of an existing object is a no-op, so running this on every daemon
    start keeps agents' elements while repairing anything missing; the rules
    are flushed and re-added in the same transaction.
    """
    t = f"inet {table_name(scope)}"
    lines = [f"add table {t}"]
    lines += [f"add set {t} {name} {{ {decl} }}" for name, decl in SETS.items()]
    lines += [f"add map {t} {name} {{ {decl} }}" for name, decl in MAPS.items()]
    for chain, hook, _ in _CHAINS:
        lines.append(f"add chain {t} {chain}" + (f" {{ {hook} }}" if hook else ""))
    for chain, _, rules in _CHAINS:
        lines.append(f"flush chain {t} {chain}")
        lines += [f"add rule {t} {chain} {r}" for r in rules]
    lines.append("")
    return "\n".join(lines)


def _static_elements(allow: Sequence[AllowEntry]) -> dict[str, list[str]]:
    """Address entries sorted into the four static sets (name -> elements sans ifname).

    Overlapping networks with the same port are collapsed first: an interval
    set refuses overlapping elements.
    """
    groups: dict[tuple[int, int | None], list[Any]] = {}
    for e in allow:
        if e.net is not None:
            groups.setdefault((e.family or 4, e.port), []).append(ipaddress.ip_network(e.net))
    out: dict[str, list[str]] = {"s4": [], "s4p": [], "s6": [], "s6p": []}
    for (fam, port), nets in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
        key = ("s4" if fam == 4 else "s6") + ("p" if port is not None else "")
        for n in ipaddress.collapse_addresses(nets):
            el = n.with_prefixlen
            out[key].append(el if port is None else f"{el} . {port}")
    return out


@dataclass
class TableState:
    """What the table holds now: set name -> element texts (nft syntax), per veth.

    Read back from `nft -j list table` (see read_state) so that corral needs no
    memory of its own to replace or remove an agent's elements, e.g. after a
    daemon restart.
    """

    elements: dict[str, list[str]] = field(default_factory=dict)  # set -> element texts
    owners: dict[str, str] = field(default_factory=dict)  # veth -> agent name
    gens: dict[str, int] = field(default_factory=dict)  # veth -> generation

    def of(self, name: str, veth: str) -> list[str]:
        """Elements of set `name` that belong to `veth`."""
        q = f'"{veth}"'
        out = []
        for el in self.elements.get(name, []):
            fields = el.split(" . ")
            if q in fields[:2]:  # ifname is first, or second in gens (mark . ifname)
                out.append(el)
        return out

    def veth_of(self, agent: str) -> str | None:
        for veth, owner in self.owners.items():
            if owner == agent:
                return veth
        return None


def _unhook(t: str, state: TableState, veth: str, sets: Iterable[str]) -> list[str]:
    """Delete `veth`'s elements from `sets` (as read in `state`)."""
    out = []
    for name in sets:
        for el in state.of(name, veth):
            if name in _LEARNED or name in _DENIED_SETS:
                # these may expire between reading and deleting: add first (a no-op
                # if it is still there) so the delete cannot fail the transaction
                out.append(f"add element {t} {name} {{ {el} }}")
            out.append(f"delete element {t} {name} {{ {el} }}")
    if veth in state.gens:
        out.append(f'delete element {t} gen_map {{ "{veth}" }}')
    return out


def _all_elements_of(t: str, state: TableState, veth: str) -> list[str]:
    lines = _unhook(t, state, veth, [*SETS])
    # agent_addrs holds bare addresses: find the agent's through srcs
    for el in state.of("srcs", veth):
        ip = el.split(" . ")[1]
        if ip in state.elements.get("agent_addrs", []):
            lines.append(f"delete element {t} agent_addrs {{ {ip} }}")
    return lines


def plan_agent(
    scope: str,
    agent: str,
    veth: str,
    agent_ip: str,
    gateway_ip: str,
    allow: Sequence[AllowEntry],
    *,
    ipv6: bool = False,
    allow_all: bool = False,
    generation: int = 1,
    state: TableState | None = None,
) -> str:
    """One transaction that creates or atomically replaces an agent's policy.

    `state` is the table as it is (read_state); the agent's previous elements
    are replaced. Learned (DNS) elements and counters are kept across a reload
    on the same veth: the resolver prunes names the new list no longer permits.
    """
    t = f"inet {table_name(scope)}"
    check_name(agent, "agent name")
    veth = _ifname(veth)
    ip4 = _ip(agent_ip, "agent address")
    gw = _ip(gateway_ip, "gateway address")
    if ip4.version != 4 or gw.version != 4:
        raise CorralError(f"agent {agent}: agent and gateway addresses must be IPv4")
    if not 1 <= generation < FLOW_MARK:
        raise CorralError(f"generation {generation} out of range")
    mark = f"0x{FLOW_MARK | generation:08x}"
    state = state or TableState()
    lines: list[str] = []
    # the agent on another veth before, or another agent on this veth: all of it goes
    old = state.veth_of(agent)
    if old is not None and old != veth:
        lines += _all_elements_of(t, state, old)
    owner = state.owners.get(veth)
    if owner is not None and owner != agent:
        lines += _all_elements_of(t, state, veth)
        state = TableState()  # nothing of this veth is left to replace
    # this agent's previous policy on this veth
    lines += _unhook(t, state, veth, _RELOADED)
    for ip in {el.split(" . ")[1] for el in state.of("srcs", veth)}:
        if ip in state.elements.get("agent_addrs", []):
            lines.append(f"delete element {t} agent_addrs {{ {ip} }}")

    q = f'"{veth}"'
    lines += [
        f"add element {t} agent_ifs {{ {q} comment {json.dumps(agent)} }}",
        f"add element {t} agent_addrs {{ {ip4} }}",
        f"add element {t} srcs {{ {q} . {ip4} }}",
        f"add element {t} gws {{ {q} . {gw} }}",
        f"add element {t} gen_map {{ {q} : {mark} }}",
        f"add element {t} gens {{ {mark} . {q} }}",
        f"add element {t} c_ok {{ {q} }}",
        f"add element {t} c_deny {{ {q} }}",
        f"add element {t} c_dns {{ {q} }}",
    ]
    if ipv6:
        lines.append(f"add element {t} v6_ifs {{ {q} }}")
    if allow_all:
        lines.append(f"add element {t} all_ifs {{ {q} }}")
    for name, elems in _static_elements(allow).items():
        if elems:
            lines.append(f"add element {t} {name} {{ {', '.join(f'{q} . {e}' for e in elems)} }}")
    lines.append("")
    return "\n".join(lines)


def plan_remove_agent(scope: str, agent: str, state: TableState) -> str:
    """Unhook the agent's veth and delete every element of it (learned ones too)."""
    t = f"inet {table_name(scope)}"
    check_name(agent, "agent name")
    veth = state.veth_of(agent)
    if veth is None:
        return ""
    return "\n".join([*_all_elements_of(t, state, veth), ""])


def clamp_ttl(ttl: int) -> int:
    """The lifetime of a DNS-learned set element for a record with this TTL."""
    return max(MIN_LEARNED_TTL, min(MAX_LEARNED_TTL, int(ttl)))


def _learned_element(veth: str, addr: str, port: int | None) -> tuple[str, str]:
    ip = _ip(addr, "learned address")
    if port is not None and not 1 <= port <= 65535:
        raise CorralError(f"invalid port {port}")
    name = f"l{'4' if ip.version == 4 else '6'}{'p' if port is not None else ''}"
    el = f'"{_ifname(veth)}" . {ip}' + ("" if port is None else f" . {port}")
    return name, el


def plan_learned(scope: str, veth: str, items: Iterable[tuple[str, int | None, int]]) -> str:
    """Add (or refresh the timeout of) DNS-learned (address, port|None, ttl) elements.

    An `add` of an existing element leaves its old timeout, so each element is
    added, deleted and added again with the new timeout in one transaction.
    """
    t = f"inet {table_name(scope)}"
    lines = []
    for addr, port, ttl in items:
        name, el = _learned_element(veth, addr, port)
        lines += [
            f"add element {t} {name} {{ {el} }}",
            f"delete element {t} {name} {{ {el} }}",
            f"add element {t} {name} {{ {el} timeout {clamp_ttl(ttl)}s }}",
        ]
    lines.append("")
    return "\n".join(lines)


def plan_forget(scope: str, veth: str, items: Iterable[tuple[str, int | None]]) -> str:
    """Remove DNS-learned elements (idempotent: add-then-delete)."""
    t = f"inet {table_name(scope)}"
    lines = []
    for addr, port in items:
        name, el = _learned_element(veth, addr, port)
        lines += [
            f"add element {t} {name} {{ {el} timeout 1s }}",
            f"delete element {t} {name} {{ {el} }}",
        ]
    lines.append("")
    return "\n".join(lines)


# --- reading the table back ------------------------------------------------------


def _render(v: Any, types: Sequence[str], i: int = 0) -> str:
    """One JSON element value back in nft syntax; `types` are the set's field types."""
    if isinstance(v, dict):
        if "elem" in v:
            return _render(v["elem"]["val"], types, i)
        if "concat" in v:
            return " . ".join(_render(x, types, n) for n, x in enumerate(v["concat"]))
        if "prefix" in v:
            return f"{v['prefix']['addr']}/{v['prefix']['len']}"
        if "range" in v:
            return f"{_render(v['range'][0], types, i)}-{_render(v['range'][1], types, i)}"
        raise KernelError(f"unexpected nft element {v!r}")
    if i < len(types) and types[i] == "ifname":
        return json.dumps(str(v))
    return str(v)


def parse_state(items: Iterable[dict[str, Any]]) -> TableState:
    """A TableState from the objects of `nft -j list table` (pure, for tests too)."""
    st = TableState()
    for it in items:
        obj = it.get("set") or it.get("map")
        if not obj:
            continue
        types = obj["type"] if isinstance(obj["type"], list) else [obj["type"]]
        name = obj["name"]
        for el in obj.get("elem", []):
            if "map" in it:
                key, val = el
                if name == "gen_map" and isinstance(val, int):
                    st.gens[str(key)] = val
                continue
            st.elements.setdefault(name, []).append(_render(el, types))
            if name == "agent_ifs" and isinstance(el, dict) and "elem" in el:
                st.owners[str(el["elem"]["val"])] = str(el["elem"].get("comment", ""))
            elif name == "agent_ifs":
                st.owners[str(el)] = ""
    return st


# --- running nft ---------------------------------------------------------------
#
# In process through libnftables (what the `nft` binary itself links to): a
# fork of the ~80 MB daemon per nft call cost 4-8 ms, a libnftables call on a
# fresh context well under 1 ms. The `nft` binary stays as the fallback where
# the library cannot be loaded.

#: nft_ctx_output_set_flags: NFT_CTX_OUTPUT_JSON (libnftables.h).
_OUTPUT_JSON = 1 << 4


class _LibNft:
    """libnftables through ctypes: one fresh context per command, calls serialized.

    A fresh context per command (50 us) carries no cache from one command to
    the next, so nothing we read can be stale (set elements time out and the
    packet path adds to the denied sets without bumping the ruleset
    generation). The lock: the library initialises globals on first use and a
    context is not thread-safe; the daemon calls in from worker threads.
    """

    def __init__(self, lib: ctypes.CDLL) -> None:
        vp, cp = ctypes.c_void_p, ctypes.c_char_p
        for fn, res, args in (
            ("nft_ctx_new", vp, [ctypes.c_uint32]),
            ("nft_ctx_free", None, [vp]),
            ("nft_ctx_buffer_output", ctypes.c_int, [vp]),
            ("nft_ctx_buffer_error", ctypes.c_int, [vp]),
            ("nft_ctx_get_output_buffer", cp, [vp]),
            ("nft_ctx_get_error_buffer", cp, [vp]),
            ("nft_ctx_output_set_flags", None, [vp, ctypes.c_uint]),
            ("nft_run_cmd_from_buffer", ctypes.c_int, [vp, cp]),
        ):
            f = getattr(lib, fn)
            f.restype, f.argtypes = res, args
        self.lib = lib
        self.lock = threading.Lock()

    def run(self, cmd: str, json_out: bool) -> tuple[bool, str, str]:
        lib = self.lib
        with self.lock:
            ctx = lib.nft_ctx_new(0)
            if not ctx:
                raise KernelError("nft_ctx_new failed (out of memory?)")
            try:
                lib.nft_ctx_buffer_output(ctx)
                lib.nft_ctx_buffer_error(ctx)
                lib.nft_ctx_output_set_flags(ctx, _OUTPUT_JSON if json_out else 0)
                rc = lib.nft_run_cmd_from_buffer(ctx, cmd.encode())
                out = lib.nft_ctx_get_output_buffer(ctx) or b""
                err = lib.nft_ctx_get_error_buffer(ctx) or b""
            finally:
                lib.nft_ctx_free(ctx)
        return rc == 0, out.decode(errors="replace"), err.decode(errors="replace")


def _load_lib() -> _LibNft | None:
    if os.environ.get("CORRAL_NFT_BINARY") == "1":  # force the fallback (tests, debugging)
        return None
    try:
        return _LibNft(ctypes.CDLL("libnftables.so.1", use_errno=True))
    except (OSError, AttributeError) as e:
        log.warning("libnftables.so.1 not usable (%s): running the nft binary instead "
                    "(slower; install the libnftables1 package)", e)
        return None


_lib_state: list[_LibNft | None] = []


def _libnft() -> _LibNft | None:
    if not _lib_state:
        _lib_state.append(_load_lib())
    return _lib_state[0]


def _run_binary(cmd: str, json_out: bool) -> tuple[bool, str, str]:
    # `nft -f -` prints nothing for list commands: those go as arguments (their
    # words are table, set and chain names we validated: no shell, no quoting)
    listing = cmd.startswith("list ") and "\n" not in cmd.strip()
    args = ["nft", *(["-j"] if json_out else []), *(cmd.split() if listing else ["-f", "-"])]
    try:
        res = subprocess.run(args, input=None if listing else cmd, capture_output=True,
                             text=True, timeout=60, check=False)
    except FileNotFoundError as e:
        raise HostSetupError("nft not found", hint="install the nftables package") from e
    return res.returncode == 0, res.stdout, res.stderr


def _nft(cmd: str, json_out: bool = False) -> str:
    """Run nft command(s) `cmd` (one transaction); its output, or raise on error."""
    lib = _libnft()
    ok, out, err = lib.run(cmd, json_out) if lib else _run_binary(cmd, json_out)
    if not ok:
        what = "nft " + (cmd.strip().splitlines() or [""])[0][:200]
        detail = err.strip()
        log.debug("%s failed: %s\ninput:\n%s", what, detail, cmd)
        if "No such file or directory" in detail:
            raise NotFound(f"{what} failed: {detail}")
        raise KernelError(f"{what} failed: {detail}", hint="is the nf_tables module available?")
    return out


def run_script(script: str) -> None:
    """Apply one nft transaction (all or nothing)."""
    if not script.strip():
        return
    log.debug("nft -f -:\n%s", script)
    _nft(script)


def _json(cmd: str) -> list[dict[str, Any]]:
    out = _nft(cmd, json_out=True)
    data = json.loads(out) if out.strip() else {"nftables": []}
    items: list[dict[str, Any]] = data.get("nftables", [])
    return items


def _set_json(table: str, name: str, kind: str = "set") -> list[dict[str, Any]]:
    """One set (or map) of `table` as JSON objects; [] if the table or set does not exist."""
    try:
        return _json(f"list {kind} inet {table} {name}")
    except NotFound:
        return []


def table_exists(scope: str) -> bool:
    # listing one small set is far cheaper than `list tables` on a busy host
    return bool(_set_json(table_name(scope), "guarded"))


def read_state(scope: str) -> TableState:
    """The scope's table as it is now (empty if there is none)."""
    try:
        return parse_state(_json(f"list table inet {table_name(scope)}"))
    except NotFound:
        return TableState()


def _state_for(scope: str, agent: str, veth: str) -> TableState:
    """What plan_agent needs to know of the table to (re)place `agent` on `veth`.

    The common case, a new agent on a new veth, needs only the hooked veths
    (agent_ifs: one element per agent): an agent's elements are added and
    removed in one transaction together with its agent_ifs element, so a veth
    absent from agent_ifs has nothing to replace. Anything else (a reload, an
    agent moving veths, a veth taken over) reads the whole table.
    """
    table = table_name(scope)
    items = _set_json(table, "agent_ifs")
    hooked = parse_state(items)
    if agent not in hooked.owners.values() and veth not in hooked.owners:
        return hooked
    if hooked.owners.get(veth) == agent and hooked.veth_of(agent) == veth:
        # a reload in place: only the sets it replaces (the learned and denied
        # ones, the bulk of the table, stay as they are)
        for name in _RELOADED:
            items += _set_json(table, name)
        items += _set_json(table, "gen_map", kind="map")
        return parse_state(items)
    return read_state(scope)


def _sysctl_path(family: str, ifname: str, key: str) -> Path:
    return Path("/proc/sys/net") / family / "conf" / _ifname(ifname) / key


def _read_forwarding(ifname: str) -> bool:
    try:
        return _sysctl_path("ipv4", ifname, "forwarding").read_text().strip() == "1"
    except FileNotFoundError as e:
        raise CorralError(f"interface {ifname!r} does not exist") from e


def _write_forwarding(ifname: str, on: bool) -> None:
    p = _sysctl_path("ipv4", ifname, "forwarding")
    try:
        p.write_text("1\n" if on else "0\n")
    except OSError as e:
        raise KernelError(f"writing {p} failed: {e}", errno=e.errno or 0) from e


def _elements(table: str, name: str) -> list[Any]:
    for it in _set_json(table, name):
        if "set" in it:
            elems: list[Any] = it["set"].get("elem", [])
            return elems
    return []


def _guarded_elsewhere(scope: str, ifname: str) -> bool:
    """Does another corral table guard `ifname` (i.e. it was off before any corral)?"""
    mine = table_name(scope)
    out = _nft("list tables inet")
    for line in out.splitlines():
        name = line.split()[-1] if line.startswith("table ") else ""
        if name.startswith("corral_") and name != mine and ifname in _elements(name, "guarded"):
            return True
    return False


#: /proc/net/route flags (linux/route.h).
_RTF_UP, _RTF_REJECT = 0x1, 0x200


def default_uplinks(proc_route: str = "/proc/net/route") -> list[str]:
    """The interfaces of the main table's IPv4 default routes (where agent traffic leaves).

    Read from /proc/net/route (the main table, as `ip -4 route show default`
    shows it) rather than by running `ip`: a fork of the daemon at every start.
    """
    try:
        lines = Path(proc_route).read_text().splitlines()[1:]
    except OSError as e:
        raise HostSetupError(f"cannot read {proc_route}: {e.strerror}") from e
    out = set()
    for line in lines:
        f = line.split()
        if len(f) < 8 or f[0] == "*":
            continue
        flags = int(f[3], 16)
        if f[1] == "00000000" and f[7] == "00000000" and flags & _RTF_UP \
                and not flags & _RTF_REJECT:
            out.add(f[0])
    return sorted(out)


def ensure_table(scope: str, uplinks: Sequence[str] = ()) -> None:
    """Create (or repair) the scope's table and enable the return path on `uplinks`.

    Idempotent; agents' elements already in the table are kept.
    """
    run_script(plan_table(scope))
    t = f"inet {table_name(scope)}"
    guarded = set(_elements(table_name(scope), "guarded"))
    for up in uplinks:
        _ifname(up)
        if up in guarded:
            _write_forwarding(up, True)
            continue
        if not _read_forwarding(up) or _guarded_elsewhere(scope, up):
            # guard first, then open: never a moment of unguarded forwarding
            run_script(f'add element {t} guarded {{ "{up}" }}\n')
            log.info("enabling IPv4 forwarding on uplink %s (guarded by %s)", up, t)
            _write_forwarding(up, True)


def apply_agent(
    scope: str,
    agent: str,
    veth: str,
    agent_ip: str,
    gateway_ip: str,
    allow: Sequence[AllowEntry],
    ipv6: bool = False,
    allow_all: bool = False,
) -> None:
    """Create or atomically replace `agent`'s policy, then enable forwarding on its veth.

    `allow` may contain domain entries; only address entries go into the
    sets here (domains are the resolver's job). Call `ensure_table` first, and
    call this before any process runs in the agent's namespace.
    """
    veth = _ifname(veth)
    if veth == "lo" or not (Path("/sys/class/net") / veth).exists():
        raise CorralError(f"agent {agent}: {veth!r} is not an existing agent veth")
    state = _state_for(scope, agent, veth)
    gen = secrets.randbelow(FLOW_MARK - 1) + 1
    run_script(
        plan_agent(
            scope,
            agent,
            veth,
            agent_ip,
            gateway_ip,
            allow,
            ipv6=ipv6,
            allow_all=allow_all,
            generation=gen,
            state=state,
        )
    )
    # rules first, then forwarding: the veth never forwards unfiltered
    _write_forwarding(veth, True)
    old = state.veth_of(agent)
    if old and old != veth and (Path("/sys/class/net") / old).exists():
        _write_forwarding(old, False)
    if ipv6:
        try:
            v6fwd = Path("/proc/sys/net/ipv6/conf/all/forwarding").read_text().strip()
        except OSError:
            v6fwd = "0"
        if v6fwd != "1":
            log.warning(
                "agent %s has ipv6 enabled but the host does not forward IPv6 "
                "(net.ipv6.conf.all.forwarding=0): its IPv6 egress will not work",
                agent,
            )


def apply_network(
    scope: str, agent: str, net: Network, allow: Sequence[AllowEntry], allow_all: bool = False
) -> None:
    """apply_agent for a sandbox.spec.Network."""
    apply_agent(
        scope,
        agent,
        net.veth_host,
        net.address,
        net.gateway,
        allow,
        ipv6=net.ipv6,
        allow_all=allow_all,
    )


def agents(scope: str) -> dict[str, str]:
    """Agents with a policy in the scope's table: agent name -> veth."""
    out: dict[str, str] = {}
    for el in _elements(table_name(scope), "agent_ifs"):
        if isinstance(el, dict) and "elem" in el:
            out[str(el["elem"].get("comment", ""))] = str(el["elem"]["val"])
    return out


def veth_of(scope: str, agent: str) -> str:
    veth = agents(scope).get(agent)
    if veth is None:
        raise NotFound(f"agent {agent} has no network policy in {table_name(scope)}")
    return veth


def remove_agent(scope: str, agent: str) -> None:
    """Remove every element of `agent` and stop its veth forwarding (idempotent)."""
    state = read_state(scope)
    veth = state.veth_of(agent)
    if veth is None:
        return
    if (Path("/sys/class/net") / veth).exists():
        # forwarding off first: a veth without rules must not route anything
        _write_forwarding(veth, False)
    run_script(plan_remove_agent(scope, agent, state))


def drop_table(scope: str) -> None:
    """Delete the scope's whole table; turn guarded uplinks' forwarding back off."""
    if not table_exists(scope):
        return
    guarded = [g for g in _elements(table_name(scope), "guarded") if isinstance(g, str)]
    run_script(f"delete table inet {table_name(scope)}\n")
    for up in guarded:
        if _guarded_elsewhere(scope, up):
            continue
        try:
            _write_forwarding(up, False)
            log.info("IPv4 forwarding on uplink %s turned back off", up)
        except CorralError:
            pass  # the uplink is gone


def add_learned(scope: str, agent: str, ip: str, port: int | None, ttl: int) -> None:
    """Allow `ip` (optionally only `port`) for `agent` for clamp_ttl(ttl) seconds."""
    run_script(plan_learned(scope, veth_of(scope, agent), [(ip, port, ttl)]))


def forget_learned(scope: str, agent: str, items: Iterable[tuple[str, int | None]]) -> None:
    run_script(plan_forget(scope, veth_of(scope, agent), items))


def counters(scope: str, agent: str) -> dict[str, int]:
    """Packets and bytes allowed, denied and sent to the resolver by `agent`.

    Empty if the agent has no policy in the table.
    """
    veth = agents(scope).get(agent)
    out: dict[str, int] = {}
    if veth is None:
        return out
    for name, label in (("c_ok", "allowed"), ("c_deny", "denied"), ("c_dns", "dns")):
        for el in _elements(table_name(scope), name):
            if isinstance(el, dict) and el.get("elem", {}).get("val") == veth:
                c = el["elem"].get("counter", {})
                out[f"{label}_packets"] = int(c.get("packets", 0))
                out[f"{label}_bytes"] = int(c.get("bytes", 0))
    return out


_PROTO_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 58: "ipv6-icmp", 132: "sctp"}


@dataclass(frozen=True)
class Denied:
    """A destination the agent recently tried and was refused."""

    addr: str
    proto: str  # "tcp", "udp", "icmp", ...
    port: int | None
    expires: int  # seconds until it is forgotten


def recent_denied(scope: str, agent: str) -> list[Denied]:
    """Destinations `agent` was denied in the last DENIED_MEMORY, newest first."""
    veth = agents(scope).get(agent)
    out: list[Denied] = []
    if veth is None:
        return out
    for name in _DENIED_SETS:
        for el in _elements(table_name(scope), name):
            expires = 0
            if isinstance(el, dict) and "elem" in el:
                expires = int(el["elem"].get("expires", 0))
                el = el["elem"]["val"]
            parts = el["concat"] if isinstance(el, dict) else [el]
            if parts[0] != veth:
                continue
            proto = parts[2] if len(parts) > 2 else "?"
            if isinstance(proto, int):
                proto = _PROTO_NAMES.get(proto, str(proto))
            port = int(parts[3]) if len(parts) > 3 else None
            out.append(Denied(addr=str(parts[1]), proto=str(proto), port=port, expires=expires))
    out.sort(key=lambda d: -d.expires)
    return out
