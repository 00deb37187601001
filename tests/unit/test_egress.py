"""supervisor.egress without root: DNS wire format, policy, and a resolver on loopback.

The resolver tests bind 127.0.0.x on an unprivileged port, ask a fake upstream
server on loopback, and record the nft transactions instead of applying them
(the real nft path is covered by tests/integration/test_network_policy_dns.py).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from sandbox import nft
from sandbox.errors import KernelError
from supervisor import egress
from supervisor.egress import (
    T_A,
    T_AAAA,
    T_CNAME,
    DnsError,
    Question,
    RateLimiter,
    Record,
    Resolver,
    address_chain,
    build_query,
    build_response,
    decide,
    forbidden_address,
    learned_for,
    parse_message,
    read_name,
)

# --- wire format ----------------------------------------------------------------


def test_read_name_with_compression() -> None:
    buf = b"\x00" * 12 + b"\x03www\x07Example\x04TEST\x00" + b"\x03api\xc0\x10"
    assert read_name(buf, 12) == ("www.example.test", 30)
    assert read_name(buf, 30) == ("api.example.test", 36)


@pytest.mark.parametrize(
    "buf",
    [
        b"\x00" * 12 + b"\xc0\x0c",  # points at itself
        b"\x00" * 12 + b"\xc0\x20",  # forward pointer
        b"\x00" * 12 + b"\x05ab",  # label past the end
        b"\x00" * 12 + b"\x03a.b\x00",  # dot inside a label
        b"\x00" * 12 + b"\x02\xff\xfe\x00",  # not ASCII
        b"\x00" * 12 + b"\x40",  # label type 01
        b"\x00" * 12 + (b"\x3f" + b"a" * 63) * 5 + b"\x00",  # > 255 bytes
    ],
)
def test_read_name_refuses_malformed(buf: bytes) -> None:
    with pytest.raises(DnsError):
        read_name(buf, 12)


def test_query_roundtrip_and_response_echoes_question_case() -> None:
    q = build_query(0x1234, "ok.corral.test", T_A)
    msg = parse_message(q)
    assert (msg.id, msg.question.name, msg.question.qtype) == (0x1234, "ok.corral.test", T_A)
    # the agent's own spelling (DNS 0x20) is echoed back byte for byte
    client = parse_message(
        struct.pack("!HHHHHH", 7, 0x0100, 1, 0, 0, 0)
        + b"\x02oK\x06CoRRal\x04test\x00\x00\x01\x00\x01"
    )
    assert client.question.name == "ok.corral.test"
    rr = Record("ok.corral.test", T_A, 1, 99999, bytes([198, 18, 0, 1]))
    out = parse_message(build_response(client, 0, [rr], ttl_cap=3600))
    assert out.id == 7
    assert out.flags & egress.F_QR
    assert out.flags & egress.F_RD
    assert out.question.wire == client.question.wire
    assert out.answers == (Record("ok.corral.test", T_A, 1, 3600, bytes([198, 18, 0, 1])),)


def test_response_over_the_udp_limit_is_truncated() -> None:
    client = parse_message(build_query(1, "big.test", T_A))
    rrs = [Record("big.test", T_A, 1, 60, bytes([198, 18, 0, i])) for i in range(60)]
    small = build_response(client, 0, rrs[:3], limit=512)
    assert len(parse_message(small).answers) == 3
    big = parse_message(build_response(client, 0, rrs, limit=512))
    assert big.flags & egress.F_TC
    assert big.answers == ()


def test_malformed_queries() -> None:
    with pytest.raises(DnsError):
        parse_message(b"\x00\x01")
    two = struct.pack("!HHHHHH", 1, 0, 2, 0, 0, 0)
    with pytest.raises(DnsError):
        parse_message(two)
    compressed_q = struct.pack("!HHHHHH", 1, 0, 1, 0, 0, 0) + b"\xc0\x0c\x00\x01\x00\x01"
    with pytest.raises(DnsError):
        parse_message(compressed_q)
    assert egress.error_response(two, egress.FORMERR) is not None
    assert egress.error_response(b"\x00", egress.FORMERR) is None


# --- policy -----------------------------------------------------------------------

ALLOW = nft.parse_allow(
    ["ok.test:443", "ok.test:80", "*.svc.test", "10.0.0.1", "both.test", "both.test:22"]
)


def q(name: str, qtype: int = T_A, qclass: int = 1) -> Question:
    return Question(name, qtype, qclass, b"")


@pytest.mark.parametrize(
    ("question", "ipv6", "allow_all", "expected"),
    [
        (q("ok.test"), False, False, "forward"),
        (q("a.b.svc.test"), False, False, "forward"),
        (q("svc.test"), False, False, "refuse"),
        (q("other.test"), False, False, "refuse"),
        (q("10.0.0.1"), False, False, "refuse"),  # an address entry is not a name
        (q("ok.test", T_AAAA), False, False, "nodata"),
        (q("ok.test", T_AAAA), True, False, "forward"),
        (q("ok.test", T_CNAME), False, False, "forward"),
        (q("ok.test", 16), False, False, "nodata"),  # TXT
        (q("ok.test", 255), False, False, "nodata"),  # ANY
        (q("ok.test", T_A, 3), False, False, "refuse"),  # CHAOS class
        (q("anything.test"), False, True, "forward"),
        (q(""), False, True, "refuse"),
    ],
)
def test_decide(question: Question, ipv6: bool, allow_all: bool, expected: str) -> None:
    assert decide(question, ALLOW, ipv6, allow_all) == expected


SUBNET = [ipaddress.ip_network("10.213.0.0/16")]


@pytest.mark.parametrize(
    ("addr", "why"),
    [
        ("127.0.0.1", "loopback"),
        ("169.254.169.254", "link-local"),
        ("224.0.0.1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("0.1.2.3", "reserved"),
        ("255.255.255.255", "reserved"),
        ("10.213.4.6", "the agents' subnet"),
        ("::1", "loopback"),
        ("fe80::1", "link-local"),
        ("ff02::1", "multicast"),
        ("::", "unspecified"),
        ("::ffff:127.0.0.1", "embedded IPv4: loopback"),
        ("2002:a9fe:a9fe::1", "embedded IPv4: link-local"),
        ("198.18.0.1", None),
        ("10.1.2.3", None),  # private but not corral's: a template may want it
        ("2001:db8::1", None),
    ],
)
def test_forbidden_address(addr: str, why: str | None) -> None:
    assert forbidden_address(ipaddress.ip_address(addr), SUBNET) == why


def test_gateway_is_forbidden_even_outside_the_subnet() -> None:
    ip = ipaddress.ip_address("192.0.2.1")
    assert forbidden_address(ip, SUBNET, ["192.0.2.1"]) == "an agent gateway"


def test_address_chain_follows_cnames_and_drops_strangers() -> None:
    a = [
        Record("www.ok.test", T_CNAME, 1, 60, b"", target="edge.cdn.test"),
        Record("edge.cdn.test", T_A, 1, 60, bytes([198, 18, 0, 1])),
        Record("unrelated.test", T_A, 1, 60, bytes([127, 0, 0, 1])),
        Record("edge.cdn.test", T_A, 3, 60, bytes([198, 18, 0, 2])),  # wrong class
        Record("edge.cdn.test", T_A, 1, 60, b"\x01\x02"),  # wrong length
    ]
    assert address_chain("www.ok.test", a) == a[:2]
    # order of records in the message does not matter
    assert address_chain("www.ok.test", [a[1], a[0]]) == [a[0], a[1]]


def test_learned_for() -> None:
    assert learned_for("ok.test", "1.2.3.4", ALLOW) == {("1.2.3.4", 443), ("1.2.3.4", 80)}
    assert learned_for("x.svc.test", "1.2.3.4", ALLOW) == {("1.2.3.4", None)}
    assert learned_for("both.test", "1.2.3.4", ALLOW) == {("1.2.3.4", None)}
    assert learned_for("nope.test", "1.2.3.4", ALLOW) == set()
    assert learned_for("nope.test", "1.2.3.4", ALLOW, allow_all=True) == set()


def test_rate_limiter() -> None:
    now = [0.0]
    rl = RateLimiter(10, clock=lambda: now[0])
    assert rl.check("k") == (True, 0)
    assert rl.check("k") == (False, 0)
    assert rl.check("k") == (False, 0)
    assert rl.check("other") == (True, 0)
    now[0] = 10.5
    assert rl.check("k") == (True, 2)
    assert rl.check("k") == (False, 0)


# --- the resolver on loopback --------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _rr(name: str, rtype: int, ttl: int, rdata: bytes) -> bytes:
    """A raw record; owner "@" is a compression pointer to the question's name."""
    if name == "@":
        enc = b"\xc0\x0c"
    else:
        enc = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return enc + struct.pack("!HHIH", rtype, 1, ttl, len(rdata)) + rdata


class FakeUpstream:
    """A recursive server on loopback: a zone of name -> list of raw answer RRs."""

    def __init__(self, zone: dict[str, list[bytes]], truncate_udp: bool = False) -> None:
        self.zone = zone
        self.truncate_udp = truncate_udp
        self.seen: list[tuple[str, str, int]] = []  # (transport, name, qtype)

    def respond(self, data: bytes, transport: str) -> bytes:
        m = parse_message(data)
        self.seen.append((transport, m.question.name, m.question.qtype))
        hdr_q = data[12 : 12 + len(m.question.wire)]
        answers = [rr for rr in self.zone.get(m.question.name, []) if rr]
        rcode = 0 if m.question.name in self.zone else 3
        flags = 0x8180 | rcode
        if transport == "udp" and self.truncate_udp:
            return struct.pack("!HHHHHH", m.id, flags | 0x0200, 1, 0, 0, 0) + hdr_q
        extra = b"".join(answers)
        return struct.pack("!HHHHHH", m.id, flags, 1, len(answers), 0, 0) + hdr_q + extra

    async def start(self, port: int) -> None:
        loop = asyncio.get_running_loop()
        up = self

        class P(asyncio.DatagramProtocol):
            def connection_made(self, transport: Any) -> None:
                self.t = transport

            def datagram_received(self, data: bytes, addr: Any) -> None:
                self.t.sendto(up.respond(data, "udp"), addr)

        async def tcp(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            (n,) = struct.unpack("!H", await r.readexactly(2))
            out = up.respond(await r.readexactly(n), "tcp")
            w.write(struct.pack("!H", len(out)) + out)
            await w.drain()
            w.close()

        self.udp, _ = await loop.create_datagram_endpoint(P, local_addr=("127.0.0.1", port))
        self.tcp = await asyncio.start_server(tcp, "127.0.0.1", port)

    async def stop(self) -> None:
        self.udp.close()
        self.tcp.close()
        await self.tcp.wait_closed()


async def ask(
    server: str, port: int, name: str, qtype: int = T_A, tcp: bool = False, raw: bytes | None = None
) -> egress.Message | None:
    data = raw if raw is not None else build_query(0x4242, name, qtype)
    loop = asyncio.get_running_loop()
    if tcp:
        r, w = await asyncio.open_connection(server, port)
        w.write(struct.pack("!H", len(data)) + data)
        await w.drain()
        (n,) = struct.unpack("!H", await r.readexactly(2))
        out = await r.readexactly(n)
        w.close()
        await w.wait_closed()
        return parse_message(out)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setblocking(False)
        await loop.sock_connect(s, (server, port))
        await loop.sock_sendall(s, data)
        try:
            out = await asyncio.wait_for(loop.sock_recv(s, 4096), 5)
        except (TimeoutError, ConnectionRefusedError):
            return None
        if raw is not None:
            # a bare header (FORMERR) has no question: return just id and flags
            mid, flags = struct.unpack("!HH", out[:4])
            return egress.Message(mid, flags, Question("", 0, 0, b""))
        return parse_message(out)


A1 = bytes([198, 18, 0, 1])
ZONE = {
    "ok.test": [_rr("@", T_A, 300, A1)],
    "x.svc.test": [
        _rr("x.svc.test", T_CNAME, 60, b"\x04edge\x03cdn\x04test\x00"),
        _rr("edge.cdn.test", T_A, 30, bytes([198, 18, 0, 2])),
    ],
    "evil.svc.test": [_rr("evil.svc.test", T_A, 60, bytes([127, 0, 0, 1]))],
    "peer.svc.test": [_rr("peer.svc.test", T_A, 60, bytes([10, 213, 0, 6]))],
}


def run_resolver(
    body: Callable[[Resolver, FakeUpstream, int, list[str], list[Any]], Awaitable[None]],
    truncate_udp: bool = False,
    allow: list[str] | None = None,
) -> None:
    async def main() -> None:
        up_port, port = _free_port(), _free_port()
        up = FakeUpstream(ZONE, truncate_udp)
        await up.start(up_port)
        scripts: list[str] = []
        events: list[Any] = []
        r = Resolver(
            "s",
            [("127.0.0.1", up_port)],
            "10.213.0.0/16",
            lambda k, a, d: events.append((k, a, d)),
            port=port,
            nft_script=scripts.append,
        )
        try:
            await r.add_agent(
                "web-1",
                "127.0.0.2",
                allow if allow is not None else ["ok.test:443", "*.svc.test"],
                veth="cvweb1",
            )
            await body(r, up, port, scripts, events)
        finally:
            await r.close()
            await up.stop()

    asyncio.run(main())


def test_resolver_answers_allowed_names_and_learns_them() -> None:
    async def body(
        r: Resolver, up: FakeUpstream, port: int, scripts: list[str], events: list[Any]
    ) -> None:
        m = await ask("127.0.0.2", port, "OK.test")
        assert m is not None
        assert m.rcode == 0
        assert [(a.name, a.rdata, a.ttl) for a in m.answers] == [("ok.test", A1, 300)]
        assert scripts == [nft.plan_learned("s", "cvweb1", [("198.18.0.1", 443, 310)])]
        assert up.seen == [("udp", "ok.test", T_A)]  # lowercased, fresh query
        # asked again at once: the element is open long enough, no second nft call
        await ask("127.0.0.2", port, "ok.test")
        assert len(scripts) == 1
        m = await ask("127.0.0.2", port, "x.svc.test", tcp=True)
        assert m is not None
        assert [a.rtype for a in m.answers] == [T_CNAME, T_A]
        assert "198.18.0.2 timeout 40s" in scripts[-1]
        assert r.stats("web-1")["forwarded"] == 3
        m = await ask("127.0.0.2", port, "missing.svc.test")  # NXDOMAIN passes through
        assert m is not None
        assert m.rcode == 3
        assert events == []

    run_resolver(body)


def test_resolver_refuses_without_forwarding() -> None:
    async def body(
        r: Resolver, up: FakeUpstream, port: int, scripts: list[str], events: list[Any]
    ) -> None:
        for name in ("other.test", "deadbeef.tunnel.test", "svc.test", "ok.test.evil"):
            m = await ask("127.0.0.2", port, name)
            assert m is not None
            assert m.rcode == egress.REFUSED
        m = await ask("127.0.0.2", port, "ok.test", qtype=16)
        assert m is not None
        assert (m.rcode, m.answers) == (0, ())
        assert up.seen == []
        assert scripts == []
        assert r.stats("web-1")["refused"] == 4
        assert [x["name"] for x in r.recent_refused("web-1")] == [
            "ok.test.evil",
            "svc.test",
            "deadbeef.tunnel.test",
            "other.test",
        ]
        # rate-limited: one event for the burst
        assert [e[0] for e in events] == ["egress.dns_denied"]
        # garbage gets FORMERR, responses get nothing
        bad = struct.pack("!HHHHHH", 9, 0, 1, 0, 0, 0) + b"\xc0\x0c\x00\x01\x00\x01"
        m = await ask("127.0.0.2", port, "", raw=bad)
        assert m is None or m.rcode == egress.FORMERR

    run_resolver(body)


def test_resolver_refuses_rebinding_answers() -> None:
    async def body(
        r: Resolver, up: FakeUpstream, port: int, scripts: list[str], events: list[Any]
    ) -> None:
        for name in ("evil.svc.test", "peer.svc.test"):
            m = await ask("127.0.0.2", port, name)
            assert m is not None
            assert m.rcode == egress.REFUSED
            assert m.answers == ()
        assert scripts == []
        assert events[0][0] == "egress.dns_rebinding"
        assert events[0][2]["address"] == "127.0.0.1"
        assert r.stats("web-1")["rebinding_blocked"] == 2

    run_resolver(body)


def test_resolver_falls_back_to_tcp_when_truncated() -> None:
    async def body(
        r: Resolver, up: FakeUpstream, port: int, scripts: list[str], events: list[Any]
    ) -> None:
        m = await ask("127.0.0.2", port, "ok.test")
        assert m is not None
        assert m.answers[0].rdata == A1
        assert [s[0] for s in up.seen] == ["udp", "tcp"]

    run_resolver(body, truncate_udp=True)


def test_resolver_update_forgets_and_remove_stops() -> None:
    async def body(
        r: Resolver, up: FakeUpstream, port: int, scripts: list[str], events: list[Any]
    ) -> None:
        await ask("127.0.0.2", port, "ok.test")
        await ask("127.0.0.2", port, "x.svc.test")
        await r.update_agent("web-1", ["ok.test:443"])
        assert scripts[-1] == nft.plan_forget("s", "cvweb1", [("198.18.0.2", None)])
        m = await ask("127.0.0.2", port, "x.svc.test")
        assert m is not None
        assert m.rcode == egress.REFUSED
        await r.remove_agent("web-1")
        assert await ask("127.0.0.2", port, "ok.test") is None

    run_resolver(body)


def test_upstream_down_is_servfail() -> None:
    async def main() -> None:
        port = _free_port()
        r = Resolver(
            "s",
            [("127.0.0.1", _free_port())],
            "10.213.0.0/16",
            port=port,
            nft_script=lambda s: None,
        )
        try:
            await r.add_agent("web-1", "127.0.0.2", ["ok.test"], veth="cvweb1")
            m = await ask("127.0.0.2", port, "ok.test")
            assert m is not None
            assert m.rcode == egress.SERVFAIL
        finally:
            await r.close()

    asyncio.run(main())


def test_nft_failure_is_servfail_not_a_silent_answer() -> None:
    """If the answer cannot be opened in nft, the agent must not get an address it can't use."""

    def broken(script: str) -> None:
        raise KernelError("nft -f - failed: simulated")

    async def main() -> None:
        up_port, port = _free_port(), _free_port()
        up = FakeUpstream(ZONE)
        await up.start(up_port)
        r = Resolver("s", [("127.0.0.1", up_port)], "10.213.0.0/16", port=port, nft_script=broken)
        try:
            await r.add_agent("web-1", "127.0.0.2", ["ok.test"], veth="cvweb1")
            m = await ask("127.0.0.2", port, "ok.test")
            assert m is not None
            assert (m.rcode, m.answers) == (egress.SERVFAIL, ())
            assert r.stats("web-1")["learn_failed"] == 1
        finally:
            await r.close()
            await up.stop()

    asyncio.run(main())
