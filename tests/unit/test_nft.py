"""sandbox.nft without root: allow-entry parsing and the generated nft transactions."""

from __future__ import annotations

import pytest

from sandbox import nft
from sandbox.errors import CorralError
from sandbox.nft import AllowEntry, parse_allow_entry


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "api.anthropic.com:443",
            AllowEntry("api.anthropic.com:443", domain="api.anthropic.com", port=443),
        ),
        ("pypi.org", AllowEntry("pypi.org", domain="pypi.org")),
        ("PyPI.org.", AllowEntry("PyPI.org.", domain="pypi.org")),
        ("*.example.test", AllowEntry("*.example.test", domain="example.test", wildcard=True)),
        (
            "*.example.test:8443",
            AllowEntry("*.example.test:8443", domain="example.test", wildcard=True, port=8443),
        ),
        ("198.18.0.10:5432", AllowEntry("198.18.0.10:5432", net="198.18.0.10/32", port=5432)),
        ("198.18.0.10", AllowEntry("198.18.0.10", net="198.18.0.10/32")),
        ("198.18.0.0/24", AllowEntry("198.18.0.0/24", net="198.18.0.0/24")),
        ("198.18.0.0/24:80", AllowEntry("198.18.0.0/24:80", net="198.18.0.0/24", port=80)),
        ("2001:db8::1", AllowEntry("2001:db8::1", net="2001:db8::1/128")),
        ("2001:db8::/32", AllowEntry("2001:db8::/32", net="2001:db8::/32")),
        ("[2001:db8::1]:443", AllowEntry("[2001:db8::1]:443", net="2001:db8::1/128", port=443)),
        ("[2001:db8::/32]", AllowEntry("[2001:db8::/32]", net="2001:db8::/32")),
    ],
)
def test_parse_allow_entry(text: str, expected: AllowEntry) -> None:
    assert parse_allow_entry(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        " pypi.org",
        "pypi.org ",
        "pypi.org:0",
        "pypi.org:65536",
        "pypi.org:http",
        "pypi.org:",
        "198.18.0.1/24",
        "198.18.0.0/33",
        "*",
        "*.",
        "a..b",
        "-a.com",
        "a_b c.com",
        "[2001:db8::1",
        "[2001:db8::1]443",
        "exa\nmple.com",
        "x" * 64 + ".com",
        "a.com:80:90",
        "http://a.com",
        "a.com/path",
        "*.*.com",
        "a.*.com",
    ],
)
def test_parse_allow_entry_refuses(text: str) -> None:
    with pytest.raises(CorralError):
        parse_allow_entry(text)


def test_domain_matching() -> None:
    exact = parse_allow_entry("pypi.org")
    wild = parse_allow_entry("*.example.test")
    assert exact.matches("pypi.org")
    assert exact.matches("PYPI.ORG.")
    assert not exact.matches("files.pypi.org")
    assert not exact.matches("evilpypi.org")
    assert wild.matches("a.example.test")
    assert wild.matches("a.b.example.test")
    assert not wild.matches("example.test")
    assert not wild.matches("evilexample.test")
    assert not wild.matches("example.test.evil.com")
    assert not parse_allow_entry("198.18.0.1").matches("198.18.0.1")


def test_names_are_validated() -> None:
    with pytest.raises(CorralError):
        nft.table_name("Bad-Scope")
    with pytest.raises(CorralError):
        nft.table_name("a" * 25)
    assert nft.table_name("t3fa9c") == "corral_t3fa9c"
    for veth in ("", "a" * 16, 'a"b', "a b", "a;b", "a}b"):
        with pytest.raises(CorralError):
            nft.plan_agent("s", "web-1", veth, "198.19.0.2", "198.19.0.1", [])
    for agent in ("Web", "1web", "web_1", "a" * 32):
        with pytest.raises(CorralError):
            nft.plan_agent("s", agent, "veth0", "198.19.0.2", "198.19.0.1", [])
    with pytest.raises(CorralError):
        nft.plan_agent("s", "web", "veth0", "not-an-ip", "198.19.0.1", [])


def test_overlapping_networks_are_collapsed_per_port() -> None:
    allow = nft.parse_allow(
        [
            "198.18.0.0/24",
            "198.18.0.7",
            "198.18.1.0/24",
            "198.18.0.0/25:443",
            "198.18.0.9:443",
            "198.18.0.9:80",
            "pypi.org",
            "2001:db8::/32",
            "2001:db8::1",
        ]
    )
    els = nft._static_elements(allow)
    assert els["s4"] == ["198.18.0.0/23"]
    assert els["s4p"] == ["198.18.0.9/32 . 80", "198.18.0.0/25 . 443"]
    assert els["s6"] == ["2001:db8::/32"]
    assert els["s6p"] == []


def _agent_rules(text: str, chain: str) -> list[str]:
    prefix = f"add rule inet corral_s {chain} "
    return [ln[len(prefix) :] for ln in text.splitlines() if ln.startswith(prefix)]


def test_agent_chain_is_default_deny() -> None:
    text = nft.plan_agent(
        "s",
        "web-1",
        "cv123",
        "198.19.0.2/30",
        "198.19.0.1/30",
        nft.parse_allow(["198.18.0.10:5432", "pypi.org"]),
        generation=0x1234,
    )
    fwd = _agent_rules(text, "a_web_1")
    # the first rules send to deny: other agents, invalid, spoofed, IPv6
    assert fwd[0] == "oifname @agent_ifs goto d_web_1"
    assert "meta nfproto ipv4 ip saddr != 198.19.0.2 goto d_web_1" in fwd
    assert "meta nfproto ipv6 goto d_web_1" in fwd
    assert fwd[-1] == "goto d_web_1"  # and whatever is not accepted ends there
    assert all("accept" in r or "goto d_web_1" in r for r in fwd)
    assert all("0x00001234" in r for r in fwd if "accept" in r)
    inp = _agent_rules(text, "i_web_1")
    assert inp == [
        "ct state established,related accept",
        "ip daddr 198.19.0.1 meta l4proto { tcp, udp } th dport 53 socket wildcard 0 "
        'counter name "dns_web_1" accept',
        "goto d_web_1",
    ]
    deny = _agent_rules(text, "d_web_1")
    assert deny[0] == 'counter name "d_web_1"'
    assert deny[-1].startswith("reject")
    assert "add element inet corral_s s4p_web_1 { 198.18.0.10/32 . 5432 }" in text
    # domains are not addresses: nothing of pypi.org in the static sets
    assert "pypi" not in text
    assert 'add element inet corral_s fwd_map { "cv123" : goto a_web_1 }' in text


def test_ipv6_and_allow_all_variants() -> None:
    v6 = nft.plan_agent("s", "a", "v", "198.19.0.2", "198.19.0.1", [], ipv6=True)
    fwd = _agent_rules(v6, "a_a")
    assert "meta nfproto ipv6 goto d_a" not in fwd
    assert 'ip6 daddr @s6_a ct mark set 0x00000001 counter name "ok_a" accept' in fwd
    assert any("nd-neighbor-solicit" in r for r in _agent_rules(v6, "i_a"))
    everything = nft.plan_agent("s", "a", "v", "198.19.0.2", "198.19.0.1", [], allow_all=True)
    fwd = _agent_rules(everything, "a_a")
    i = fwd.index('ct mark set 0x00000001 counter name "ok_a" accept')
    blocks = [n for n, r in enumerate(fwd) if "169.254.0.0/16" in r]
    assert blocks
    assert blocks[0] < i
    assert fwd[0] == "oifname @agent_ifs goto d_a"  # and other agents too


def test_replacing_a_veth_unhooks_the_old_one() -> None:
    text = nft.plan_agent(
        "s", "a", "new0", "198.19.0.2", "198.19.0.1", [], old_veth="old0", stale=["b"]
    )
    assert 'delete element inet corral_s fwd_map { "old0" }' in text
    assert 'add element inet corral_s fwd_map { "new0" : goto a_b }' in text  # b's stale hook
    # unhooking happens before hooking the new veth
    assert text.index('delete element inet corral_s agent_ifs { "old0" }') < text.index(
        'add element inet corral_s fwd_map { "new0" : goto a_a }'
    )


def test_remove_plan_deletes_everything_of_the_agent() -> None:
    text = nft.plan_remove_agent("s", "web-1", "cv1", "198.19.0.2")
    for obj in (
        "chain inet corral_s a_web_1",
        "chain inet corral_s d_web_1",
        "set inet corral_s l4p_web_1",
        "counter inet corral_s dns_web_1",
        "set inet corral_s dn6x_web_1",
    ):
        assert f"delete {obj}" in text
    # chains before the sets they reference; the deny chain after those that jump to it
    assert text.index("delete chain inet corral_s a_web_1") < text.index(
        "delete chain inet corral_s d_web_1"
    )
    assert text.index("delete chain inet corral_s d_web_1") < text.index(
        "delete set inet corral_s s4_web_1"
    )
    assert 'delete element inet corral_s agent_ifs { "cv1" }' in text


def test_learned_elements_refresh_their_timeout() -> None:
    text = nft.plan_learned(
        "s", "a", [("198.18.0.1", None, 1), ("198.18.0.2", 443, 10**6), ("2001:db8::1", 80, 60)]
    )
    lines = text.splitlines()
    assert lines[:3] == [
        "add element inet corral_s l4_a { 198.18.0.1 }",
        "delete element inet corral_s l4_a { 198.18.0.1 }",
        "add element inet corral_s l4_a { 198.18.0.1 timeout 5s }",
    ]
    assert "add element inet corral_s l4p_a { 198.18.0.2 . 443 timeout 3600s }" in lines
    assert "add element inet corral_s l6p_a { 2001:db8::1 . 80 timeout 60s }" in lines
    with pytest.raises(CorralError):
        nft.plan_learned("s", "a", [("nonsense", None, 5)])
    forget = nft.plan_forget("s", "a", [("198.18.0.2", 443)])
    assert "delete element inet corral_s l4p_a { 198.18.0.2 . 443 }" in forget


def test_clamp_ttl() -> None:
    assert nft.clamp_ttl(0) == nft.MIN_LEARNED_TTL
    assert nft.clamp_ttl(300) == 300
    assert nft.clamp_ttl(86400) == nft.MAX_LEARNED_TTL
