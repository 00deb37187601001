"""sandbox.nft without root: allow-entry parsing and the generated nft transactions."""

from __future__ import annotations

from pathlib import Path

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


def _rules(chain: str) -> list[str]:
    text = nft.plan_table("s")
    prefix = f"add rule inet corral_s {chain} "
    return [ln[len(prefix) :] for ln in text.splitlines() if ln.startswith(prefix)]


def test_table_rules_are_default_deny() -> None:
    fwd = _rules("from_agent")
    # the first rules send to deny: other agents, invalid, spoofed, IPv6 when off
    assert fwd[0] == "oifname @agent_ifs goto deny"
    assert "meta nfproto ipv4 iifname . ip saddr != @srcs goto deny" in fwd
    assert "meta nfproto ipv6 iifname != @v6_ifs goto deny" in fwd
    assert fwd[-1] == "goto deny"  # whatever is not accepted ends there
    assert all(r.endswith(("accept", "goto deny")) for r in fwd)
    # every accept is keyed by the agent's own veth (iifname) in its lookup
    assert all("iifname" in r for r in fwd if r.endswith("accept"))
    i = fwd.index("iifname @all_ifs ct mark set iifname map @gen_map iifname @c_ok accept")
    assert any("169.254.0.0/16" in r for r in fwd[:i])  # metadata stays blocked even then
    assert _rules("agent_in") == [
        "ct state established,related accept",
        "meta l4proto { tcp, udp } th dport 53 iifname . ip daddr @gws socket wildcard 0 "
        "iifname @c_dns accept",
        "iifname @v6_ifs icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert, "
        "nd-router-solicit } ip6 hoplimit 255 accept",
        "goto deny",
    ]
    deny = _rules("deny")
    assert deny[0] == "iifname @c_deny"
    assert deny[-1].startswith("reject")
    assert _rules("forward")[0] == "iifname @agent_ifs goto from_agent"
    assert _rules("input") == ["iifname @agent_ifs goto agent_in"]
    # rules are rewritten whole on every ensure: flushed, then added
    text = nft.plan_table("s")
    assert text.index("flush chain inet corral_s forward") < text.index(
        "add rule inet corral_s forward"
    )


def test_new_agent_is_only_elements() -> None:
    text = nft.plan_agent(
        "s",
        "web-1",
        "cv123",
        "198.19.0.2/30",
        "198.19.0.1/30",
        nft.parse_allow(["198.18.0.10:5432", "pypi.org", "198.18.1.0/24"]),
        generation=0x1234,
    )
    lines = text.splitlines()
    assert all(ln.startswith("add element inet corral_s ") for ln in lines if ln)
    t = "add element inet corral_s"
    assert f'{t} agent_ifs {{ "cv123" comment "web-1" }}' in lines
    assert f'{t} srcs {{ "cv123" . 198.19.0.2 }}' in lines
    assert f'{t} gws {{ "cv123" . 198.19.0.1 }}' in lines
    assert f'{t} gen_map {{ "cv123" : 0x80001234 }}' in lines
    assert f'{t} gens {{ 0x80001234 . "cv123" }}' in lines
    assert f'{t} s4p {{ "cv123" . 198.18.0.10/32 . 5432 }}' in lines
    assert f'{t} s4 {{ "cv123" . 198.18.1.0/24 }}' in lines
    assert "v6_ifs" not in text
    assert "all_ifs" not in text
    assert "pypi" not in text  # domains are the resolver's job
    v6 = nft.plan_agent("s", "a", "v", "198.19.0.2", "198.19.0.1", [], ipv6=True, allow_all=True)
    assert f'{t} v6_ifs {{ "v" }}' in v6
    assert f'{t} all_ifs {{ "v" }}' in v6


STATE = nft.TableState(
    elements={
        "agent_ifs": ['"cv1"', '"cv2"'],
        "agent_addrs": ["198.19.0.2", "198.19.0.6"],
        "srcs": ['"cv1" . 198.19.0.2', '"cv2" . 198.19.0.6'],
        "gws": ['"cv1" . 198.19.0.1', '"cv2" . 198.19.0.5'],
        "gens": ['4660 . "cv1"', '7 . "cv2"'],
        "c_ok": ['"cv1"', '"cv2"'],
        "s4": ['"cv1" . 198.18.0.0/24', '"cv2" . 198.18.0.0/24'],
        "l4p": ['"cv1" . 198.18.5.5 . 443'],
        "dn4": ['"cv1" . 198.18.9.9 . tcp . 22'],
    },
    owners={"cv1": "web-1", "cv2": "web-2"},
    gens={"cv1": 4660, "cv2": 7},
)


def test_reload_replaces_policy_but_keeps_learned() -> None:
    text = nft.plan_agent(
        "s",
        "web-1",
        "cv1",
        "198.19.0.2",
        "198.19.0.1",
        nft.parse_allow(["198.18.7.7"]),
        generation=9,
        state=STATE,
    )
    lines = text.splitlines()
    t = "inet corral_s"
    for gone in (
        's4 { "cv1" . 198.18.0.0/24 }',
        'gens { 4660 . "cv1" }',
        'gen_map { "cv1" }',
        'srcs { "cv1" . 198.19.0.2 }',
        "agent_addrs { 198.19.0.2 }",
    ):
        assert f"delete element {t} {gone}" in lines
    # deletions come before the additions, in one transaction
    assert lines.index(f'delete element {t} gen_map {{ "cv1" }}') < lines.index(
        f'add element {t} gen_map {{ "cv1" : 0x80000009 }}'
    )
    assert "l4p" not in text  # learned destinations stay (the resolver prunes them)
    assert "dn4" not in text
    assert "cv2" not in text  # the neighbour is untouched


def test_agent_moving_to_another_veth_or_taking_one_over() -> None:
    moved = nft.plan_agent("s", "web-1", "cv9", "198.19.0.2", "198.19.0.1", [], state=STATE)
    assert 'delete element inet corral_s l4p { "cv1" . 198.18.5.5 . 443 }' in moved
    assert 'delete element inet corral_s agent_ifs { "cv1" }' in moved
    taken = nft.plan_agent("s", "web-3", "cv2", "198.19.0.6", "198.19.0.5", [], state=STATE)
    assert 'delete element inet corral_s agent_ifs { "cv2" }' in taken
    assert 'add element inet corral_s agent_ifs { "cv2" comment "web-3" }' in taken
    assert taken.count('delete element inet corral_s gen_map { "cv2" }') == 1


def test_remove_plan_deletes_everything_of_the_agent() -> None:
    text = nft.plan_remove_agent("s", "web-1", STATE)
    lines = text.splitlines()
    t = "inet corral_s"
    for gone in (
        'agent_ifs { "cv1" }',
        'c_ok { "cv1" }',
        's4 { "cv1" . 198.18.0.0/24 }',
        'l4p { "cv1" . 198.18.5.5 . 443 }',
        'dn4 { "cv1" . 198.18.9.9 . tcp . 22 }',
        "agent_addrs { 198.19.0.2 }",
        'gen_map { "cv1" }',
    ):
        assert f"delete element {t} {gone}" in lines
    # elements that may expire meanwhile are re-added first, so the delete cannot fail
    i = lines.index(f'delete element {t} l4p {{ "cv1" . 198.18.5.5 . 443 }}')
    assert lines[i - 1] == f'add element {t} l4p {{ "cv1" . 198.18.5.5 . 443 }}'
    assert "cv2" not in text
    assert nft.plan_remove_agent("s", "nobody", STATE) == ""


def test_parse_state_from_nft_json() -> None:
    items = [
        {
            "set": {
                "name": "agent_ifs",
                "type": "ifname",
                "elem": [{"elem": {"val": "cv1", "comment": "web-1"}}],
            }
        },
        {
            "set": {
                "name": "s4",
                "type": ["ifname", "ipv4_addr"],
                "elem": [
                    {"concat": ["cv1", {"prefix": {"addr": "198.18.0.0", "len": 24}}]},
                    {"concat": ["cv1", "198.18.1.1"]},
                ],
            }
        },
        {
            "set": {
                "name": "l4p",
                "type": ["ifname", "ipv4_addr", "inet_service"],
                "elem": [
                    {
                        "elem": {
                            "val": {"concat": ["cv1", "1.2.3.4", 443]},
                            "timeout": 60,
                            "expires": 50,
                        }
                    }
                ],
            }
        },
        {"set": {"name": "gens", "type": ["mark", "ifname"], "elem": [{"concat": [9, "cv1"]}]}},
        {"map": {"name": "gen_map", "type": "ifname", "map": "mark", "elem": [["cv1", 9]]}},
        {"chain": {"name": "forward"}},
    ]
    st = nft.parse_state(items)
    assert st.owners == {"cv1": "web-1"}
    assert st.gens == {"cv1": 9}
    assert st.of("s4", "cv1") == ['"cv1" . 198.18.0.0/24', '"cv1" . 198.18.1.1']
    assert st.of("l4p", "cv1") == ['"cv1" . 1.2.3.4 . 443']
    assert st.of("gens", "cv1") == ['9 . "cv1"']
    assert st.of("s4", "cv2") == []
    assert st.veth_of("web-1") == "cv1"


def test_learned_elements_refresh_their_timeout() -> None:
    text = nft.plan_learned(
        "s", "cv1", [("198.18.0.1", None, 1), ("198.18.0.2", 443, 10**6), ("2001:db8::1", 80, 60)]
    )
    lines = text.splitlines()
    t = "add element inet corral_s"
    assert lines[:3] == [
        f'{t} l4 {{ "cv1" . 198.18.0.1 }}',
        'delete element inet corral_s l4 { "cv1" . 198.18.0.1 }',
        f'{t} l4 {{ "cv1" . 198.18.0.1 timeout 5s }}',
    ]
    assert f'{t} l4p {{ "cv1" . 198.18.0.2 . 443 timeout 3600s }}' in lines
    assert f'{t} l6p {{ "cv1" . 2001:db8::1 . 80 timeout 60s }}' in lines
    with pytest.raises(CorralError):
        nft.plan_learned("s", "cv1", [("nonsense", None, 5)])
    with pytest.raises(CorralError):
        nft.plan_learned("s", "bad veth", [("198.18.0.1", None, 5)])
    forget = nft.plan_forget("s", "cv1", [("198.18.0.2", 443)])
    assert 'delete element inet corral_s l4p { "cv1" . 198.18.0.2 . 443 }' in forget


def test_clamp_ttl() -> None:
    assert nft.clamp_ttl(0) == nft.MIN_LEARNED_TTL
    assert nft.clamp_ttl(300) == 300
    assert nft.clamp_ttl(86400) == nft.MAX_LEARNED_TTL


def test_default_uplinks_from_proc_net_route(tmp_path: Path) -> None:
    route = tmp_path / "route"
    route.write_text(
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
        "eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n"
        "wlan0\t00000000\t010300C0\t0003\t0\t0\t600\t00000000\t0\t0\t0\n"
        "eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"  # not default
        "eth1\t00000000\t010400C0\t0002\t0\t0\t0\t00000000\t0\t0\t0\n"  # not up
        "*\t00000000\t00000000\t0201\t0\t0\t0\t00000000\t0\t0\t0\n"  # unreachable
        "eth2\t00000000\t00000000\t0201\t0\t0\t0\t00000000\t0\t0\t0\n"  # reject
    )
    assert nft.default_uplinks(str(route)) == ["eth0", "wlan0"]
    with pytest.raises(CorralError, match="cannot read"):
        nft.default_uplinks(str(tmp_path / "missing"))


def test_state_for_reads_only_what_the_change_needs(monkeypatch: pytest.MonkeyPatch) -> None:
    """A new agent on a new veth reads agent_ifs only; a reload in place reads the
    reloaded sets (not the big learned/denied ones); a move or takeover reads it all."""
    hooked = [{"set": {"name": "agent_ifs", "type": "ifname",
                       "elem": [{"elem": {"val": "cv1", "comment": "web-1"}}]}}]
    listed: list[str] = []

    def set_json(table: str, name: str, kind: str = "set") -> list[dict[str, object]]:
        listed.append(name)
        return hooked if name == "agent_ifs" else []

    full = nft.TableState(owners={"cv1": "web-1"}, gens={"cv1": 5})
    monkeypatch.setattr(nft, "_set_json", set_json)
    monkeypatch.setattr(nft, "read_state", lambda scope: full)

    fresh = nft._state_for("s", "web-2", "cv2")
    assert listed == ["agent_ifs"]
    assert fresh.owners == {"cv1": "web-1"}
    assert "agent_ifs" in nft.plan_agent("s", "web-2", "cv2", "198.19.0.6", "198.19.0.5", [],
                                         state=fresh)

    listed.clear()
    nft._state_for("s", "web-1", "cv1")
    assert listed == ["agent_ifs", *nft._RELOADED, "gen_map"]
    assert not set(listed) & {"l4", "l4p", "dn4", "c_ok"}

    assert nft._state_for("s", "web-1", "cv9") is full  # the agent moves to another veth
    assert nft._state_for("s", "web-3", "cv1") is full  # another agent takes cv1 over
