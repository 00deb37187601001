"""The DNS side of egress: a resolver per agent that answers only allowed names.

Mechanism: for each agent the daemon listens on the agent's gateway address,
port 53 (UDP and TCP) -- the only host port the agent's nft input chain lets
through (sandbox/nft.py). A query for a name the agent's allow-list permits
(exact name, or any name below a ``*.suffix``) is re-asked upstream as a fresh
query (new id, lowercase name, nothing of the agent's bytes beyond the name),
and each A/AAAA answer is added to the agent's nft "learned" set with the
record's TTL (bounded) before the answer is returned, so the agent can connect
as soon as it has the address and not before. Everything else is answered
REFUSED without being forwarded, so an unallowed name never resolves and data
encoded in it (DNS tunnelling) never leaves the host. Answers pointing at
loopback, link-local, multicast, unspecified or reserved space, the agents'
subnet or a gateway are refused as a whole (DNS rebinding).

The wire format is handled here with struct (RFC 1035 plus EDNS0's OPT
record); no DNS library is needed. Responses to the agent are rebuilt from
scratch: its question echoed as it sent it, then only the CNAME chain and the
A/AAAA records of the asked name, uncompressed, with TTLs capped to the
learned entries' lifetime. Authority and additional sections are dropped.

Security events (denied names, rebinding attempts) go to ``on_event(kind,
agent, data)``, at most one per agent and kind every EVENT_INTERVAL seconds,
with the number suppressed in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import secrets
import socket
import struct
import time
from collections import Counter, deque
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from sandbox import nft
from sandbox.errors import CorralError
from sandbox.nft import AllowEntry

log = logging.getLogger(__name__)

# --- DNS constants (RFC 1035, 3596, 6891) ---
T_A, T_CNAME, T_AAAA, T_OPT = 1, 5, 28, 41
C_IN = 1
NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 2, 3, 4, 5
F_QR, F_AA, F_TC, F_RD, F_RA = 0x8000, 0x0400, 0x0200, 0x0100, 0x0080

#: Plain DNS over UDP without EDNS: answers larger than this are truncated
#: (TC) and the client retries over TCP.
UDP_LIMIT = 512
#: What we advertise upstream in our own queries.
EDNS_SIZE = 1232
#: Per upstream attempt.
UPSTREAM_TIMEOUT = 2.0
#: A learned entry outlives the TTL we hand to the agent by this much, so a
#: client connecting right at expiry of its cache still gets through.
LEARNED_GRACE = 10
#: At most this many queries in flight per agent; more are dropped (a flood
#: must not make the daemon grow without bound).
MAX_INFLIGHT = 64
#: At most this many TCP connections per agent, each idle at most this long.
MAX_TCP = 16
TCP_IDLE = 10.0
#: How many refused names are remembered per agent.
RECENT = 50
#: Minimum seconds between two events of one kind for one agent.
EVENT_INTERVAL = 10.0

Decision = Literal["forward", "nodata", "refuse"]
OnEvent = Callable[[str, str, dict[str, Any]], None]


class DnsError(ValueError):
    """A malformed DNS message."""


# --- wire format -------------------------------------------------------------


@dataclass(frozen=True)
class Question:
    name: str  # lowercase, no trailing dot ("" for the root)
    qtype: int
    qclass: int
    wire: bytes  # the question section exactly as received (case kept: DNS 0x20)


@dataclass(frozen=True)
class Record:
    name: str  # owner, lowercase
    rtype: int
    rclass: int
    ttl: int
    rdata: bytes
    target: str | None = None  # CNAME target, decompressed


@dataclass(frozen=True)
class Message:
    id: int
    flags: int
    question: Question
    answers: tuple[Record, ...] = ()

    @property
    def rcode(self) -> int:
        return self.flags & 0xF


def read_name(buf: bytes, pos: int) -> tuple[str, int]:
    """Read a (possibly compressed) name at `pos`; return (lowercase name, position after it).

    Pointers must point backwards, which also makes loops impossible.
    """
    labels: list[str] = []
    end = -1
    total = 0
    while True:
        if pos >= len(buf):
            raise DnsError("name runs past the end")
        n = buf[pos]
        if n & 0xC0 == 0xC0:
            if pos + 1 >= len(buf):
                raise DnsError("truncated pointer")
            ptr = ((n & 0x3F) << 8) | buf[pos + 1]
            if ptr >= pos:
                raise DnsError("forward compression pointer")
            if end < 0:
                end = pos + 2
            pos = ptr
            continue
        if n & 0xC0:
            raise DnsError("unknown label type")
        pos += 1
        if n == 0:
            break
        label = buf[pos : pos + n]
        if len(label) != n:
            raise DnsError("label runs past the end")
        total += n + 1
        if total > 255:
            raise DnsError("name longer than 255 bytes")
        try:
            text = label.decode("ascii").lower()
        except UnicodeDecodeError as e:
            raise DnsError("non-ASCII label") from e
        if "." in text or not text.isprintable():
            raise DnsError("label with a dot or an unprintable byte")
        labels.append(text)
        pos += n
    return ".".join(labels), (end if end >= 0 else pos)


def encode_name(name: str) -> bytes:
    out = b""
    for label in name.rstrip(".").split(".") if name.strip(".") else []:
        raw = label.encode("ascii")
        if not 1 <= len(raw) <= 63:
            raise DnsError(f"bad label in {name!r}")
        out += bytes([len(raw)]) + raw
    if len(out) + 1 > 255:
        raise DnsError("name longer than 255 bytes")
    return out + b"\0"


def parse_message(buf: bytes) -> Message:
    """Header, the single question, and the answer section of a DNS message."""
    if len(buf) < 12:
        raise DnsError("shorter than a header")
    mid, flags, qd, an, _ns, _ar = struct.unpack("!HHHHHH", buf[:12])
    if qd != 1:
        raise DnsError(f"{qd} questions")
    # the question: compression is never needed there, so refuse it
    pos = 12
    while True:
        if pos >= len(buf):
            raise DnsError("question runs past the end")
        n = buf[pos]
        if n & 0xC0:
            raise DnsError("compressed question")
        pos += 1 + n
        if n == 0:
            break
    if pos + 4 > len(buf):
        raise DnsError("truncated question")
    name, _ = read_name(buf, 12)
    qtype, qclass = struct.unpack("!HH", buf[pos : pos + 4])
    question = Question(name, qtype, qclass, buf[12 : pos + 4])
    pos += 4
    answers = []
    for _ in range(an):
        owner, pos = read_name(buf, pos)
        if pos + 10 > len(buf):
            raise DnsError("truncated record")
        rtype, rclass, ttl, rdlen = struct.unpack("!HHIH", buf[pos : pos + 10])
        pos += 10
        rdata = buf[pos : pos + rdlen]
        if len(rdata) != rdlen:
            raise DnsError("truncated rdata")
        target = read_name(buf, pos)[0] if rtype == T_CNAME else None
        pos += rdlen
        answers.append(Record(owner, rtype, rclass, ttl & 0x7FFFFFFF, rdata, target))
    return Message(mid, flags, question, tuple(answers))


def build_query(qid: int, name: str, qtype: int) -> bytes:
    """A fresh recursive query with an EDNS0 OPT record (payload EDNS_SIZE)."""
    hdr = struct.pack("!HHHHHH", qid, F_RD, 1, 0, 0, 1)
    opt = b"\0" + struct.pack("!HHIH", T_OPT, EDNS_SIZE, 0, 0)
    return hdr + encode_name(name) + struct.pack("!HH", qtype, C_IN) + opt


def build_response(
    query: Message,
    rcode: int,
    answers: Sequence[Record] = (),
    *,
    ttl_cap: int = nft.MAX_LEARNED_TTL,
    limit: int | None = None,
) -> bytes:
    """The answer to `query`: its question echoed, `answers` uncompressed.

    With `limit` (UDP), an answer that does not fit is sent empty with TC set.
    """
    flags = F_QR | F_RA | (query.flags & F_RD) | (rcode & 0xF)
    body = b""
    for r in answers:
        rdata = encode_name(r.target) if r.rtype == T_CNAME and r.target is not None else r.rdata
        body += encode_name(r.name) + struct.pack(
            "!HHIH", r.rtype, r.rclass, min(r.ttl, ttl_cap), len(rdata)
        )
        body += rdata
    out = struct.pack("!HHHHHH", query.id, flags, 1, len(answers), 0, 0)
    out += query.question.wire + body
    if limit is not None and len(out) > limit:
        out = struct.pack("!HHHHHH", query.id, flags | F_TC, 1, 0, 0, 0) + query.question.wire
    return out


def error_response(buf: bytes, rcode: int) -> bytes | None:
    """A bare error for a message we could not parse (None if not even a header)."""
    if len(buf) < 12:
        return None
    mid, flags = struct.unpack("!HH", buf[:4])
    if flags & F_QR:
        return None  # never answer a response
    return struct.pack("!HHHHHH", mid, F_QR | F_RA | (flags & F_RD) | rcode, 0, 0, 0, 0)


# --- policy (pure) ------------------------------------------------------------


def permitted(name: str, allow: Iterable[AllowEntry]) -> list[AllowEntry]:
    """The domain entries that allow `name`."""
    return [e for e in allow if e.domain is not None and e.matches(name)]


def decide(q: Question, allow: Sequence[AllowEntry], ipv6: bool, allow_all: bool) -> Decision:
    """What to do with a question: forward it upstream, answer empty, or refuse."""
    if q.qclass != C_IN or not q.name:
        return "refuse"
    if not allow_all and not permitted(q.name, allow):
        return "refuse"
    if q.qtype == T_A or q.qtype == T_CNAME:
        return "forward"
    if q.qtype == T_AAAA:
        return "forward" if ipv6 else "nodata"
    # other types (TXT, MX, HTTPS, ANY...) of an allowed name: empty, never
    # forwarded, so nothing but addresses is looked up on the agent's behalf
    return "nodata"


_V4_BAD = [ipaddress.ip_network(n) for n in ("0.0.0.0/8", "240.0.0.0/4")]


def forbidden_address(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
    agent_subnets: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network],
    gateways: Iterable[str] = (),
) -> str | None:
    """Why an answer address must not be handed to an agent (None if it may)."""
    if isinstance(ip, ipaddress.IPv6Address):
        mapped = ip.ipv4_mapped or ip.sixtofour
        if mapped is not None:
            why = forbidden_address(mapped, agent_subnets, gateways)
            return f"embedded IPv4: {why}" if why else None
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if ip.is_unspecified:
        return "unspecified"
    if isinstance(ip, ipaddress.IPv4Address) and any(ip in n for n in _V4_BAD):
        return "reserved"
    if str(ip) in set(gateways):
        return "an agent gateway"
    if any(ip.version == n.version and ip in n for n in agent_subnets):
        return "the agents' subnet"
    return None


def address_chain(name: str, answers: Sequence[Record]) -> list[Record]:
    """The CNAME chain from `name` and the A/AAAA records at its end, in order.

    Records about other names (which a resolver should not send) are dropped.
    """
    chain = {name}
    keep: list[Record] = []
    changed = True
    while changed:
        changed = False
        for r in answers:
            if r in keep or r.rclass != C_IN or r.name not in chain:
                continue
            if r.rtype == T_CNAME and r.target is not None:
                chain.add(r.target)
                keep.append(r)
                changed = True
            elif (r.rtype == T_A and len(r.rdata) == 4) or (
                r.rtype == T_AAAA and len(r.rdata) == 16
            ):
                keep.append(r)
                changed = True
    return keep


def record_ip(r: Record) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(r.rdata)


def learned_for(
    name: str, ip: str, allow: Sequence[AllowEntry], allow_all: bool = False
) -> set[tuple[str, int | None]]:
    """The nft elements an answer (name -> ip) opens: (ip, None) or one (ip, port) per entry."""
    if allow_all:
        return set()
    entries = permitted(name, allow)
    if any(e.port is None for e in entries):
        return {(ip, None)}
    return {(ip, e.port) for e in entries}


class RateLimiter:
    """At most one event per key per `interval` seconds; counts the suppressed ones."""

    def __init__(
        self, interval: float = EVENT_INTERVAL, clock: Callable[[], float] = time.monotonic
    ):
        self.interval = interval
        self.clock = clock
        self._last: dict[Any, float] = {}
        self._suppressed: Counter[Any] = Counter()

    def check(self, key: Any) -> tuple[bool, int]:
        """(emit now?, how many were suppressed since the last emitted one)."""
        now = self.clock()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._suppressed[key] += 1
            return False, 0
        self._last[key] = now
        return True, self._suppressed.pop(key, 0)


# --- the resolver --------------------------------------------------------------


@dataclass
class _AgentDns:
    name: str
    veth: str  # its host-side veth: the key of its elements in the nft sets
    gateway: str
    allow: list[AllowEntry]
    ipv6: bool
    allow_all: bool
    udp: asyncio.DatagramTransport | None = None
    tcp: asyncio.Server | None = None
    writers: set[asyncio.StreamWriter] = field(default_factory=set)
    inflight: int = 0
    #: (ip, port|None) -> (name it was learned for, monotonic expiry)
    learned: dict[tuple[str, int | None], tuple[str, float]] = field(default_factory=dict)
    stats: Counter[str] = field(default_factory=Counter)
    #: the last refused names (name, qtype, wall-clock time), for `inspect`
    refused: deque[tuple[str, int, float]] = field(default_factory=lambda: deque(maxlen=RECENT))


def _to_entries(allow: Iterable[AllowEntry | str]) -> list[AllowEntry]:
    return [a if isinstance(a, AllowEntry) else nft.parse_allow_entry(a) for a in allow]


def _bind(family: int, kind: int, addr: str, port: int) -> socket.socket:
    s = socket.socket(family, kind)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # IP_FREEBIND: bind even if the gateway address is not (yet) configured
        s.setsockopt(socket.SOL_IP, 15, 1)
        s.bind((addr, port))
        s.setblocking(False)
    except OSError:
        s.close()
        raise
    return s


class Resolver:
    """DNS for the agents of one daemon scope (see the module docstring).

    `upstream`: (address, port) of the recursive servers to forward to, tried
    in order. `agent_subnet`: the daemon's agent address space (answers in it
    are refused). `port` is 53 except in tests. `nft_script` applies an nft
    transaction (sandbox.nft.run_script; tests may record instead).
    """

    def __init__(
        self,
        scope: str,
        upstream: Sequence[tuple[str, int]],
        agent_subnet: str | Sequence[str],
        on_event: OnEvent | None = None,
        *,
        port: int = 53,
        nft_script: Callable[[str], None] = nft.run_script,
    ) -> None:
        nft.table_name(scope)  # validates
        if not upstream:
            raise CorralError("the resolver needs at least one upstream server")
        self.scope = scope
        self.upstream = list(upstream)
        subnets = [agent_subnet] if isinstance(agent_subnet, str) else list(agent_subnet)
        self.agent_subnets = [ipaddress.ip_network(s) for s in subnets]
        self.on_event = on_event
        self.port = port
        self.nft_script = nft_script
        self.agents: dict[str, _AgentDns] = {}
        self._limiter = RateLimiter()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._nft_lock = asyncio.Lock()

    # --- lifecycle ---

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> None:
        """Every background task goes through here: named, referenced, reaped."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def add_agent(
        self,
        agent: str,
        gateway_ip: str,
        allow_entries: Iterable[AllowEntry | str],
        *,
        ipv6: bool = False,
        allow_all: bool = False,
        veth: str | None = None,
    ) -> None:
        """Start answering `agent`'s queries on gateway_ip:53 (UDP and TCP).

        `veth` is the agent's host-side veth; by default it is looked up in the
        scope's nft table, so call nft.apply_agent first.
        """
        if agent in self.agents:
            await self.remove_agent(agent)
        gw = str(ipaddress.ip_interface(gateway_ip).ip)
        if veth is None:
            veth = await asyncio.to_thread(nft.veth_of, self.scope, agent)
        st = _AgentDns(agent, veth, gw, _to_entries(allow_entries), ipv6, allow_all)
        loop = asyncio.get_running_loop()
        fam = socket.AF_INET6 if ":" in gw else socket.AF_INET
        usock = _bind(fam, socket.SOCK_DGRAM, gw, self.port)
        tsock = _bind(fam, socket.SOCK_STREAM, gw, self.port)
        try:
            st.udp, _ = await loop.create_datagram_endpoint(lambda: _UdpProto(self, st), sock=usock)
            tsock.listen(16)
            st.tcp = await asyncio.start_server(lambda r, w: self._tcp_client(st, r, w), sock=tsock)
        except BaseException:
            if st.udp is not None:
                st.udp.close()
            usock.close()
            tsock.close()
            raise
        self.agents[agent] = st
        log.info("[agent=%s] resolver listening on %s:%d", agent, gw, self.port)

    async def update_agent(
        self,
        agent: str,
        allow_entries: Iterable[AllowEntry | str],
        *,
        ipv6: bool | None = None,
        allow_all: bool | None = None,
    ) -> None:
        """Change a running agent's allow-list; learned addresses it no longer permits go."""
        st = self.agents[agent]
        st.allow = _to_entries(allow_entries)
        if ipv6 is not None:
            st.ipv6 = ipv6
        if allow_all is not None:
            st.allow_all = allow_all
        now = time.monotonic()
        stale = []
        for key, (name, expiry) in list(st.learned.items()):
            if expiry < now:
                del st.learned[key]
            elif key not in learned_for(name, key[0], st.allow, st.allow_all):
                stale.append(key)
                del st.learned[key]
        if stale:
            script = nft.plan_forget(self.scope, st.veth, stale)
            async with self._nft_lock:
                await asyncio.to_thread(self.nft_script, script)
            log.info("[agent=%s] forgot %d learned destinations", agent, len(stale))

    async def remove_agent(self, agent: str) -> None:
        """Stop answering for `agent` (its nft sets go with nft.remove_agent)."""
        st = self.agents.pop(agent, None)
        if st is None:
            return
        if st.udp is not None:
            st.udp.close()
        if st.tcp is not None:
            st.tcp.close()
            # open TCP connections must not outlive the agent
            for w in list(st.writers):
                w.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(st.tcp.wait_closed(), 5)

    async def close(self) -> None:
        for agent in list(self.agents):
            await self.remove_agent(agent)
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def stats(self, agent: str) -> dict[str, int]:
        """Queries seen, forwarded, refused, rebinding answers blocked, ... for `agent`."""
        return dict(self.agents[agent].stats)

    def recent_refused(self, agent: str) -> list[dict[str, Any]]:
        """The names `agent` was recently refused, newest first."""
        return [
            {"name": n, "qtype": t, "time": ts} for n, t, ts in reversed(self.agents[agent].refused)
        ]

    # --- events ---

    def _event(self, kind: str, agent: str, data: dict[str, Any]) -> None:
        emit, suppressed = self._limiter.check((agent, kind))
        if not emit or self.on_event is None:
            return
        if suppressed:
            data = {**data, "suppressed": suppressed}
        try:
            self.on_event(kind, agent, data)
        except Exception:
            log.exception("on_event(%s) failed", kind)

    # --- serving ---

    def _udp_query(self, st: _AgentDns, data: bytes, addr: Any) -> None:
        if st.inflight >= MAX_INFLIGHT:
            st.stats["dropped"] += 1
            return
        st.inflight += 1

        async def run() -> None:
            try:
                out = await self.answer(st, data, limit=UDP_LIMIT)
                if out is not None and st.udp is not None and not st.udp.is_closing():
                    st.udp.sendto(out, addr)
            except Exception:
                log.exception("[agent=%s] answering a query failed", st.name)
            finally:
                st.inflight -= 1

        self._spawn(run(), f"dns-udp-{st.name}")

    async def _tcp_client(
        self, st: _AgentDns, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if len(st.writers) >= MAX_TCP:
            writer.close()
            return
        st.writers.add(writer)
        try:
            while True:
                head = await asyncio.wait_for(reader.readexactly(2), TCP_IDLE)
                (n,) = struct.unpack("!H", head)
                data = await asyncio.wait_for(reader.readexactly(n), TCP_IDLE)
                out = await self.answer(st, data)
                if out is None:
                    break
                writer.write(struct.pack("!H", len(out)) + out)
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            st.writers.discard(writer)
            writer.close()

    async def answer(self, st: _AgentDns, data: bytes, limit: int | None = None) -> bytes | None:
        """The whole policy for one query from agent `st`; None means no answer."""
        st.stats["queries"] += 1
        try:
            q = parse_message(data)
        except DnsError as e:
            st.stats["malformed"] += 1
            log.debug("[agent=%s] malformed query: %s", st.name, e)
            return error_response(data, FORMERR)
        if q.flags & F_QR:
            return None
        if (q.flags >> 11) & 0xF != 0:
            return build_response(q, NOTIMP)
        decision = decide(q.question, st.allow, st.ipv6, st.allow_all)
        if decision == "refuse":
            st.stats["refused"] += 1
            st.refused.append((q.question.name[:253], q.question.qtype, time.time()))
            # debug only: an agent can send these as fast as it likes (the
            # event below is the rate-limited report)
            log.debug(
                "[agent=%s] refused %s type %d", st.name, q.question.name[:100], q.question.qtype
            )
            self._event(
                "egress.dns_denied",
                st.name,
                {"name": q.question.name[:253], "qtype": q.question.qtype},
            )
            return build_response(q, REFUSED)
        if decision == "nodata":
            st.stats["nodata"] += 1
            return build_response(q, NOERROR)
        st.stats["forwarded"] += 1
        try:
            resp = await self.ask_upstream(q.question.name, q.question.qtype)
        except (OSError, TimeoutError, DnsError) as e:
            st.stats["upstream_failed"] += 1
            if self._limiter.check(("log", "upstream"))[0]:
                log.warning(
                    "upstream DNS failed (for %s of agent %s): %s", q.question.name, st.name, e
                )
            return build_response(q, SERVFAIL)
        if resp.rcode not in (NOERROR, NXDOMAIN):
            return build_response(q, SERVFAIL)
        records = address_chain(q.question.name, resp.answers)
        gateways = [a.gateway for a in self.agents.values()]
        for r in records:
            if r.rtype in (T_A, T_AAAA):
                why = forbidden_address(record_ip(r), self.agent_subnets, gateways)
                if why:
                    st.stats["rebinding_blocked"] += 1
                    log.warning(
                        "[agent=%s] %s resolved to %s (%s): refused",
                        st.name,
                        q.question.name,
                        record_ip(r),
                        why,
                    )
                    self._event(
                        "egress.dns_rebinding",
                        st.name,
                        {"name": q.question.name, "address": str(record_ip(r)), "reason": why},
                    )
                    return build_response(q, REFUSED)
        try:
            await self._learn(st, q.question.name, records)
        except CorralError as e:
            # without the nft element the agent could not connect anyway: say so
            st.stats["learn_failed"] += 1
            log.error("[agent=%s] could not open %s in nft: %s", st.name, q.question.name, e)
            return build_response(q, SERVFAIL)
        return build_response(q, resp.rcode, records, limit=limit)

    async def _learn(self, st: _AgentDns, name: str, records: Sequence[Record]) -> None:
        """Open the answers in the agent's nft sets before the agent sees them."""
        items: list[tuple[str, int | None, int]] = []
        now = time.monotonic()
        for r in records:
            if r.rtype not in (T_A, T_AAAA) or (r.rtype == T_AAAA and not st.ipv6):
                continue
            ip = str(record_ip(r))
            needed = nft.clamp_ttl(r.ttl)
            ttl = needed + LEARNED_GRACE
            for key in learned_for(name, ip, st.allow, st.allow_all):
                known = st.learned.get(key)
                if known is not None and known[1] >= now + needed:
                    # still open for longer than the agent will cache this answer:
                    # no nft call (a burst of lookups costs one, not one each)
                    continue
                items.append((key[0], key[1], ttl))
                st.learned[key] = (name, now + ttl)
        if not items:
            return
        script = nft.plan_learned(self.scope, st.veth, items)
        async with self._nft_lock:
            await asyncio.to_thread(self.nft_script, script)
        st.stats["learned"] += len(items)

    async def ask_upstream(self, name: str, qtype: int) -> Message:
        """Ask the upstream servers in turn (UDP, then TCP if truncated)."""
        last: Exception = TimeoutError("no upstream answered")
        for server in self.upstream:
            try:
                return await self._ask_one(server, name, qtype)
            except (OSError, TimeoutError, DnsError) as e:
                last = e
        raise last

    async def _ask_one(self, server: tuple[str, int], name: str, qtype: int) -> Message:
        qid = secrets.randbelow(0x10000)
        query = build_query(qid, name, qtype)
        loop = asyncio.get_running_loop()
        fam = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
        with socket.socket(fam, socket.SOCK_DGRAM) as s:
            s.setblocking(False)
            # connected: the kernel drops datagrams from anyone but the server
            await loop.sock_connect(s, server)
            await loop.sock_sendall(s, query)
            deadline = loop.time() + UPSTREAM_TIMEOUT
            while True:
                left = deadline - loop.time()
                if left <= 0:
                    raise TimeoutError(f"{server[0]}:{server[1]} did not answer")
                data = await asyncio.wait_for(loop.sock_recv(s, 65535), left)
                try:
                    resp = parse_message(data)
                except DnsError:
                    continue
                if self._matches(resp, qid, name, qtype):
                    break
        if resp.flags & F_TC:
            resp = await self._ask_tcp(server, name, qtype)
        return resp

    async def _ask_tcp(self, server: tuple[str, int], name: str, qtype: int) -> Message:
        qid = secrets.randbelow(0x10000)
        query = build_query(qid, name, qtype)

        async def exchange() -> Message:
            reader, writer = await asyncio.open_connection(*server)
            try:
                writer.write(struct.pack("!H", len(query)) + query)
                await writer.drain()
                (n,) = struct.unpack("!H", await reader.readexactly(2))
                return parse_message(await reader.readexactly(n))
            finally:
                writer.close()

        try:
            resp = await asyncio.wait_for(exchange(), UPSTREAM_TIMEOUT * 2)
        except asyncio.IncompleteReadError as e:
            raise DnsError("upstream closed the TCP connection") from e
        if not self._matches(resp, qid, name, qtype):
            raise DnsError("upstream answered another question")
        return resp

    @staticmethod
    def _matches(resp: Message, qid: int, name: str, qtype: int) -> bool:
        q = resp.question
        return resp.id == qid and bool(resp.flags & F_QR) and q.name == name and q.qtype == qtype


class _UdpProto(asyncio.DatagramProtocol):
    def __init__(self, resolver: Resolver, st: _AgentDns) -> None:
        self.resolver = resolver
        self.st = st

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.resolver._udp_query(self.st, data, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("[agent=%s] udp error: %s", self.st.name, exc)
