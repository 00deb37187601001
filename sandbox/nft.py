"""nftables egress policy: one table per daemon, one chain and a few sets per agent.

Mechanism: the rules live in the host's network namespace, on the host side of
each agent's veth, where the agent (no capabilities, its own netns) cannot touch
them. Every change is one nft transaction (`nft -f -`), so a reload of an
agent's allow-list replaces its rules atomically: there is no instant where the
agent is unfiltered or half-filtered.

Layout of table ``inet corral_<scope>`` (scope is a short id chosen by the
daemon so that two daemons, or tests, never share a table):

- ``forward`` (filter hook): ``iifname vmap @fwd_map`` sends each agent's
  traffic to its chain ``a_<agent>``; that chain always ends in accept or
  drop. Traffic *into* an agent veth is accepted only as a reply
  (established/related) or when a host-side DNAT published the port; new
  flows into an agent are dropped (so agents cannot reach each other, and
  nothing outside can open connections to them).
- ``input`` (filter hook): ``iifname vmap @in_map`` sends traffic from an
  agent to the host to ``i_<agent>``: only DNS (udp/tcp 53) to the agent's own
  gateway address (where the daemon's resolver listens) and replies to
  connections the host opened are accepted; everything else addressed to the
  host -- the daemon's SSH and API ports, published ports, any service on any
  host address -- is dropped.
- ``postrouting`` (nat hook): agent addresses leaving through anything but an
  agent veth are masqueraded.
- per agent: static sets ``s4_/s4p_/s6_/s6p_<agent>`` (address or CIDR, and
  address . port, from the template), learned sets ``l4_/l4p_/l6_/l6p_<agent>``
  (filled by the DNS resolver with a timeout equal to the record's TTL),
  dynamic ``dn4_/dn4x_/dn6_/dn6x_<agent>`` sets that remember recently denied
  destinations for ``recent_denied()``, and named counters ``ok_`` (allowed),
  ``d_`` (denied) and ``dns_`` (queries to the resolver).

Reload semantics: each ``apply_agent`` stamps accepted flows with a fresh
conntrack mark (a random "generation"). Packets of a flow whose mark is the
current generation are accepted without a set lookup, so a long connection
survives the expiry of the DNS-learned entry that let it start; after a reload
the mark no longer matches and every packet of an old flow is judged again by
the new allow-list, so removing a destination cuts its live connections too.
(corral owns the conntrack mark of flows coming out of its veths; a host that
uses ct marks for its own policy routing on those flows would conflict.)

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
works only where the host admin enabled IPv6 forwarding (logged as a warning).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import secrets
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sandbox.errors import CorralError, HostSetupError, KernelError
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
#: How long a denied destination is remembered for recent_denied().
DENIED_MEMORY = "10m"
#: At most this many remembered denied destinations per agent and set.
DENIED_SIZE = 256

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


def _aid(agent: str) -> str:
    """The agent's id in nft names: names never contain '_', so '-' -> '_' is injective."""
    return check_name(agent, "agent name").replace("-", "_")


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


# --- plans (pure: text for `nft -f -`) -----------------------------------------


def plan_table(scope: str) -> str:
    """The idempotent base of a scope's table: shared sets, maps and base chains.

    `add` of an existing object is a no-op, so running this on every daemon
    start keeps agents' rules while repairing anything missing.
    """
    t = f"inet {table_name(scope)}"
    return "\n".join(
        [
            f"add table {t}",
            # the host-side veths of this scope's agents, and their addresses
            f"add set {t} agent_ifs {{ type ifname; }}",
            f"add set {t} agent_addrs {{ type ipv4_addr; }}",
            f"add set {t} agent_addrs6 {{ type ipv6_addr; }}",
            # uplinks whose forwarding corral turned on (see module docstring)
            f"add set {t} guarded {{ type ifname; }}",
            f"add map {t} fwd_map {{ type ifname : verdict; }}",
            f"add map {t} in_map {{ type ifname : verdict; }}",
            f"add chain {t} forward {{ type filter hook forward priority filter; policy accept; }}",
            f"add chain {t} input {{ type filter hook input priority filter; policy accept; }}",
            f"add chain {t} postrouting "
            "{ type nat hook postrouting priority srcnat; policy accept; }",
            # base chains are rebuilt whole so a repaired table has them exactly once
            f"flush chain {t} forward",
            f"add rule {t} forward iifname vmap @fwd_map",
            f"add rule {t} forward oifname @agent_ifs ct state established,related accept",
            # a port the host published by DNAT is an intended way in
            f"add rule {t} forward oifname @agent_ifs ct status dnat accept",
            f"add rule {t} forward oifname @agent_ifs drop",
            f"add rule {t} forward iifname @guarded drop",
            f"flush chain {t} input",
            f"add rule {t} input iifname vmap @in_map",
            f"flush chain {t} postrouting",
            f"add rule {t} postrouting ip saddr @agent_addrs oifname != @agent_ifs masquerade",
            f"add rule {t} postrouting ip6 saddr @agent_addrs6 oifname != @agent_ifs masquerade",
            "",
        ]
    )


def _agent_objects(t: str, a: str) -> list[str]:
    """Declarations of one agent's sets and counters (idempotent `add`)."""
    dn = f"flags dynamic,timeout; timeout {DENIED_MEMORY}; size {DENIED_SIZE};"
    return [
        f"add counter {t} ok_{a}",
        f"add counter {t} d_{a}",
        f"add counter {t} dns_{a}",
        f"add set {t} s4_{a} {{ type ipv4_addr; flags interval; }}",
        f"add set {t} s4p_{a} {{ type ipv4_addr . inet_service; flags interval; }}",
        f"add set {t} s6_{a} {{ type ipv6_addr; flags interval; }}",
        f"add set {t} s6p_{a} {{ type ipv6_addr . inet_service; flags interval; }}",
        f"add set {t} l4_{a} {{ type ipv4_addr; flags timeout; }}",
        f"add set {t} l4p_{a} {{ type ipv4_addr . inet_service; flags timeout; }}",
        f"add set {t} l6_{a} {{ type ipv6_addr; flags timeout; }}",
        f"add set {t} l6p_{a} {{ type ipv6_addr . inet_service; flags timeout; }}",
        f"add set {t} dn4_{a} {{ type ipv4_addr . inet_proto . inet_service; {dn} }}",
        f"add set {t} dn4x_{a} {{ type ipv4_addr . inet_proto; {dn} }}",
        f"add set {t} dn6_{a} {{ type ipv6_addr . inet_proto . inet_service; {dn} }}",
        f"add set {t} dn6x_{a} {{ type ipv6_addr . inet_proto; {dn} }}",
    ]


def _static_elements(allow: Sequence[AllowEntry]) -> dict[str, list[str]]:
    """Address entries sorted into the four static sets (suffix -> elements).

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
    old_veth: str | None = None,
    stale: Sequence[str] = (),
) -> str:
    """One transaction that creates or atomically replaces an agent's policy.

    Learned (DNS) sets are kept across a replace: the resolver prunes the
    entries of names the new allow-list no longer permits. `old_veth` is the
    veth the agent was hooked to before (if another); `stale` names agents
    whose hook on `veth` is left over and must go.
    """
    t = f"inet {table_name(scope)}"
    a = _aid(agent)
    veth = _ifname(veth)
    ip4 = _ip(agent_ip, "agent address")
    gw = _ip(gateway_ip, "gateway address")
    if ip4.version != 4 or gw.version != 4:
        raise CorralError(f"agent {agent}: agent and gateway addresses must be IPv4")
    if not 1 <= generation <= 0xFFFFFFFF:
        raise CorralError(f"generation {generation} out of range")
    mark = f"0x{generation:08x}"
    ok = f'ct mark set {mark} counter name "ok_{a}" accept'
    lines = [*_agent_objects(t, a)]
    for suffix, elems in _static_elements(allow).items():
        lines.append(f"flush set {t} {suffix}_{a}")
        if elems:
            lines.append(f"add element {t} {suffix}_{a} {{ {', '.join(elems)} }}")

    # deny: count, remember the destination, reject. The `update` statements
    # sit in their own rules because a full set makes `update` stop its rule.
    lines += [
        f"add chain {t} d_{a}",
        f"flush chain {t} d_{a}",
        f'add rule {t} d_{a} counter name "d_{a}"',
        f"add rule {t} d_{a} meta nfproto ipv4 meta l4proto {{ tcp, udp }} "
        f"update @dn4_{a} {{ ip daddr . meta l4proto . th dport }}",
        f"add rule {t} d_{a} meta nfproto ipv4 meta l4proto != {{ tcp, udp }} "
        f"update @dn4x_{a} {{ ip daddr . meta l4proto }}",
        f"add rule {t} d_{a} meta nfproto ipv6 meta l4proto {{ tcp, udp }} "
        f"update @dn6_{a} {{ ip6 daddr . meta l4proto . th dport }}",
        f"add rule {t} d_{a} meta nfproto ipv6 meta l4proto != {{ tcp, udp }} "
        f"update @dn6x_{a} {{ ip6 daddr . meta l4proto }}",
        # reject rather than drop: the agent's tools fail at once with "administratively
        # prohibited" (EHOSTUNREACH) instead of hanging until a timeout
        f"add rule {t} d_{a} reject with icmpx admin-prohibited",
    ]

    # forward: traffic the agent sends through the host
    c = f"a_{a}"
    lines += [
        f"add chain {t} {c}",
        f"flush chain {t} {c}",
        # never to another agent (or back into an agent veth at all)
        f"add rule {t} {c} oifname @agent_ifs goto d_{a}",
        f"add rule {t} {c} ct state invalid goto d_{a}",
        # no spoofed sources: replies would land at whoever owns that address
        f"add rule {t} {c} meta nfproto ipv4 ip saddr != {ip4} goto d_{a}",
    ]
    if not ipv6:
        lines.append(f"add rule {t} {c} meta nfproto ipv6 goto d_{a}")
    lines += [
        # a flow accepted under this generation keeps going without lookups
        f'add rule {t} {c} ct mark {mark} counter name "ok_{a}" accept',
        f"add rule {t} {c} ip daddr @s4_{a} {ok}",
        f"add rule {t} {c} meta l4proto {{ tcp, udp }} ip daddr . th dport @s4p_{a} {ok}",
        f"add rule {t} {c} ip daddr @l4_{a} {ok}",
        f"add rule {t} {c} meta l4proto {{ tcp, udp }} ip daddr . th dport @l4p_{a} {ok}",
    ]
    if ipv6:
        lines += [
            f"add rule {t} {c} ip6 daddr @s6_{a} {ok}",
            f"add rule {t} {c} meta l4proto {{ tcp, udp }} ip6 daddr . th dport @s6p_{a} {ok}",
            f"add rule {t} {c} ip6 daddr @l6_{a} {ok}",
            f"add rule {t} {c} meta l4proto {{ tcp, udp }} ip6 daddr . th dport @l6p_{a} {ok}",
        ]
    if allow_all:
        lines += [
            f"add rule {t} {c} ip daddr {_ALLOW_ALL_BLOCK4} goto d_{a}",
            f"add rule {t} {c} ip6 daddr {_ALLOW_ALL_BLOCK6} goto d_{a}",
            f"add rule {t} {c} {ok}",
        ]
    lines.append(f"add rule {t} {c} goto d_{a}")

    # input: traffic the agent sends to the host itself
    i = f"i_{a}"
    lines += [
        f"add chain {t} {i}",
        f"flush chain {t} {i}",
        # replies to connections the host opened (e.g. the daemon forwarding a port)
        f"add rule {t} {i} ct state established,related accept",
        # DNS to the gateway, and only to a socket bound to that very address (the
        # daemon's resolver): a host service listening on 0.0.0.0:53 (dnsmasq, say)
        # must never answer agents, e.g. while the daemon is down
        f"add rule {t} {i} ip daddr {gw} meta l4proto {{ tcp, udp }} th dport 53 "
        f'socket wildcard 0 counter name "dns_{a}" accept',
    ]
    if ipv6:
        # neighbour discovery with the host side of the veth
        lines.append(
            f"add rule {t} {i} icmpv6 type {{ nd-neighbor-solicit, nd-neighbor-advert, "
            "nd-router-solicit }} ip6 hoplimit 255 accept"
        )
    lines.append(f"add rule {t} {i} goto d_{a}")

    # hook the chains to the veth (replacing a previous veth of this agent)
    if old_veth and old_veth != veth:
        lines += _unhook(t, _ifname(old_veth), a)
    for other in stale:
        lines += _unhook(t, veth, _aid(other))
    lines += [
        f'add element {t} agent_ifs {{ "{veth}" }}',
        f"add element {t} agent_addrs {{ {ip4} }}",
        # `add` of an existing key with another verdict fails: remove, then add
        f'add element {t} fwd_map {{ "{veth}" : goto {c} }}',
        f'delete element {t} fwd_map {{ "{veth}" }}',
        f'add element {t} fwd_map {{ "{veth}" : goto {c} }}',
        f'add element {t} in_map {{ "{veth}" : goto {i} }}',
        f'delete element {t} in_map {{ "{veth}" }}',
        f'add element {t} in_map {{ "{veth}" : goto {i} }}',
        "",
    ]
    return "\n".join(lines)


def _unhook(t: str, veth: str, a: str) -> list[str]:
    """Remove `veth` (hooked to agent id `a`) from the shared sets and maps.

    add-then-delete never fails, whether or not the element was there; the
    add must carry the same verdict as an existing element or nft refuses it.
    """
    out = [
        f'add element {t} agent_ifs {{ "{veth}" }}',
        f'delete element {t} agent_ifs {{ "{veth}" }}',
    ]
    for m, c in (("fwd_map", f"a_{a}"), ("in_map", f"i_{a}")):
        out += [
            f'add element {t} {m} {{ "{veth}" : goto {c} }}',
            f'delete element {t} {m} {{ "{veth}" }}',
        ]
    return out


def plan_remove_agent(scope: str, agent: str, veth: str | None, agent_ip: str | None) -> str:
    """Unhook the agent's veth, then delete its chains, sets and counters."""
    t = f"inet {table_name(scope)}"
    a = _aid(agent)
    lines = []
    if veth:
        lines += _unhook(t, _ifname(veth), a)
    if agent_ip:
        ip4 = _ip(agent_ip, "agent address")
        lines += [
            f"add element {t} agent_addrs {{ {ip4} }}",
            f"delete element {t} agent_addrs {{ {ip4} }}",
        ]
    # create-then-delete makes removal idempotent in one transaction; chains
    # first (they reference the sets and counters), the deny chain last
    # (the others jump to it).
    objects = _agent_objects(t, a)
    lines += objects
    for c in (f"a_{a}", f"i_{a}", f"d_{a}"):
        lines += [f"add chain {t} {c}", f"flush chain {t} {c}"]
    for c in (f"a_{a}", f"i_{a}", f"d_{a}"):
        lines.append(f"delete chain {t} {c}")
    for decl in objects:
        kind, name = decl.split()[1], decl.split()[4]
        lines.append(f"delete {kind} {t} {name}")
    lines.append("")
    return "\n".join(lines)


def clamp_ttl(ttl: int) -> int:
    """The lifetime of a DNS-learned set element for a record with this TTL."""
    return max(MIN_LEARNED_TTL, min(MAX_LEARNED_TTL, int(ttl)))


def plan_learned(scope: str, agent: str, items: Iterable[tuple[str, int | None, int]]) -> str:
    """Add (or refresh the timeout of) DNS-learned (address, port|None, ttl) elements.

    An `add` of an existing element leaves its old timeout, so each element is
    added, deleted and added again with the new timeout in one transaction.
    """
    t = f"inet {table_name(scope)}"
    a = _aid(agent)
    lines = []
    for addr, port, ttl in items:
        ip = _ip(addr, "learned address")
        fam = "4" if ip.version == 4 else "6"
        s = f"l{fam}{'p' if port is not None else ''}_{a}"
        if port is not None and not 1 <= port <= 65535:
            raise CorralError(f"invalid port {port}")
        el = f"{ip}" if port is None else f"{ip} . {port}"
        lines += [
            f"add element {t} {s} {{ {el} }}",
            f"delete element {t} {s} {{ {el} }}",
            f"add element {t} {s} {{ {el} timeout {clamp_ttl(ttl)}s }}",
        ]
    lines.append("")
    return "\n".join(lines)


def plan_forget(scope: str, agent: str, items: Iterable[tuple[str, int | None]]) -> str:
    """Remove DNS-learned elements (idempotent: add-then-delete)."""
    t = f"inet {table_name(scope)}"
    a = _aid(agent)
    lines = []
    for addr, port in items:
        ip = _ip(addr, "learned address")
        s = f"l{'4' if ip.version == 4 else '6'}{'p' if port is not None else ''}_{a}"
        el = f"{ip}" if port is None else f"{ip} . {port}"
        lines += [
            f"add element {t} {s} {{ {el} timeout 1s }}",
            f"delete element {t} {s} {{ {el} }}",
        ]
    lines.append("")
    return "\n".join(lines)


# --- running nft ---------------------------------------------------------------


def _nft(args: Sequence[str], stdin: str | None = None) -> str:
    try:
        res = subprocess.run(
            ["nft", *args], input=stdin, capture_output=True, text=True, timeout=60, check=False
        )
    except FileNotFoundError as e:
        raise HostSetupError("nft not found", hint="install the nftables package") from e
    if res.returncode != 0:
        what = "nft " + " ".join(args)
        detail = res.stderr.strip()
        log.debug("%s failed: %s\ninput:\n%s", what, detail, stdin)
        raise KernelError(f"{what} failed: {detail}", hint="is the nf_tables module available?")
    return res.stdout


def run_script(script: str) -> None:
    """Apply one nft transaction (all or nothing)."""
    log.debug("nft -f -:\n%s", script)
    _nft(["-f", "-"], script)


def _json(args: Sequence[str]) -> list[dict[str, Any]]:
    out = _nft(["-j", *args])
    data = json.loads(out) if out.strip() else {"nftables": []}
    items: list[dict[str, Any]] = data.get("nftables", [])
    return items


def table_exists(scope: str) -> bool:
    t = table_name(scope)
    return any(it.get("table", {}).get("name") == t for it in _json(["list", "tables", "inet"]))


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


def _set_elements(scope: str, name: str) -> list[Any]:
    for it in _json(["list", "set", "inet", table_name(scope), name]):
        if "set" in it:
            elems: list[Any] = it["set"].get("elem", [])
            return elems
    return []


def _map_elements(scope: str, name: str) -> list[Any]:
    for it in _json(["list", "map", "inet", table_name(scope), name]):
        if "map" in it:
            elems: list[Any] = it["map"].get("elem", [])
            return elems
    return []


def _guarded_elsewhere(scope: str, ifname: str) -> bool:
    """Does another corral table guard `ifname` (i.e. it was off before any corral)?"""
    mine = table_name(scope)
    for it in _json(["list", "tables", "inet"]):
        name = it.get("table", {}).get("name", "")
        if name.startswith("corral_") and name != mine:
            try:
                elems = _set_elements(name[len("corral_") :], "guarded")
            except CorralError:
                continue
            if ifname in elems:
                return True
    return False


def default_uplinks() -> list[str]:
    """The interfaces of the main table's IPv4 default routes (where agent traffic leaves)."""
    res = subprocess.run(
        ["ip", "-j", "-4", "route", "show", "default"],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    if res.returncode != 0:
        raise HostSetupError(f"ip route show default failed: {res.stderr.strip()}")
    routes = json.loads(res.stdout or "[]")
    return sorted({r["dev"] for r in routes if "dev" in r})


def ensure_table(scope: str, uplinks: Sequence[str] = ()) -> None:
    """Create (or repair) the scope's table and enable the return path on `uplinks`.

    Idempotent; agents' chains and sets already in the table are kept.
    """
    run_script(plan_table(scope))
    t = f"inet {table_name(scope)}"
    guarded = set(_set_elements(scope, "guarded"))
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
    sets here (domains are the resolver's job). Call `ensure_table` first.
    """
    veth = _ifname(veth)
    if veth == "lo" or not (Path("/sys/class/net") / veth).exists():
        raise CorralError(f"agent {agent}: {veth!r} is not an existing agent veth")
    held = agents(scope)
    stale = [other for other, v in held.items() if v == veth and other != agent]
    gen = secrets.randbelow(0xFFFFFFFE) + 1
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
            old_veth=held.get(agent),
            stale=stale,
        )
    )
    # rules first, then forwarding: the veth never forwards unfiltered
    _write_forwarding(veth, True)
    old = held.get(agent)
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
    """Agents with rules in the scope's table: agent id (as in nft names) -> veth.

    The id equals the agent name with '-' written as '_'; `agent_names` maps back.
    """
    out: dict[str, str] = {}
    if not table_exists(scope):
        return out
    for el in _map_elements(scope, "fwd_map"):
        key, verdict = el[0], el[1]
        target = (verdict.get("goto") or verdict.get("jump") or {}).get("target", "")
        if isinstance(key, str) and target.startswith("a_"):
            out[target[2:].replace("_", "-")] = key
    return out


def remove_agent(scope: str, agent: str) -> None:
    """Remove every rule, set and counter of `agent` (idempotent)."""
    if not table_exists(scope):
        return
    veth = agents(scope).get(agent)
    agent_ip = None
    if veth is not None:
        # the agent's address appears in its anti-spoofing rule
        for it in _json(["list", "chain", "inet", table_name(scope), f"a_{_aid(agent)}"]):
            rule = it.get("rule")
            if not rule:
                continue
            for ex in rule.get("expr", []):
                m = ex.get("match")
                if m and m.get("op") == "!=" and isinstance(m.get("right"), str):
                    left = m.get("left", {}).get("payload", {})
                    if left.get("protocol") == "ip" and left.get("field") == "saddr":
                        agent_ip = m["right"]
    if veth is not None and (Path("/sys/class/net") / veth).exists():
        # forwarding off first: a veth without rules must not route anything
        _write_forwarding(veth, False)
    run_script(plan_remove_agent(scope, agent, veth, agent_ip))


def drop_table(scope: str) -> None:
    """Delete the scope's whole table; turn guarded uplinks' forwarding back off."""
    if not table_exists(scope):
        return
    guarded = [g for g in _set_elements(scope, "guarded") if isinstance(g, str)]
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
    run_script(plan_learned(scope, agent, [(ip, port, ttl)]))


def forget_learned(scope: str, agent: str, items: Iterable[tuple[str, int | None]]) -> None:
    run_script(plan_forget(scope, agent, items))


def counters(scope: str, agent: str) -> dict[str, int]:
    """Packets and bytes allowed, denied and sent to the resolver by `agent`."""
    a = _aid(agent)
    out: dict[str, int] = {}
    for kind, label in (("ok", "allowed"), ("d", "denied"), ("dns", "dns")):
        for it in _json(["list", "counter", "inet", table_name(scope), f"{kind}_{a}"]):
            if "counter" in it:
                out[f"{label}_packets"] = int(it["counter"]["packets"])
                out[f"{label}_bytes"] = int(it["counter"]["bytes"])
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
    a = _aid(agent)
    out: list[Denied] = []
    for s in (f"dn4_{a}", f"dn4x_{a}", f"dn6_{a}", f"dn6x_{a}"):
        for el in _set_elements(scope, s):
            expires = 0
            if isinstance(el, dict) and "elem" in el:
                expires = int(el["elem"].get("expires", 0))
                el = el["elem"]["val"]
            parts = el["concat"] if isinstance(el, dict) else [el]
            proto = parts[1] if len(parts) > 1 else "?"
            if isinstance(proto, int):
                proto = _PROTO_NAMES.get(proto, str(proto))
            port = int(parts[2]) if len(parts) > 2 else None
            out.append(Denied(addr=str(parts[0]), proto=str(proto), port=port, expires=expires))
    out.sort(key=lambda d: -d.expires)
    return out
