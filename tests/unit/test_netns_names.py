"""netns's pure parts: veth names and input validation (no root, nothing created)."""

from __future__ import annotations

import ipaddress
import socket
import struct

import pytest

from sandbox import netns
from sandbox.errors import CorralError
from sandbox.spec import Network


def test_veth_name_is_short_deterministic_and_distinct() -> None:
    a = netns.veth_name("scope1", "web-1")
    assert a == netns.veth_name("scope1", "web-1")
    assert a.startswith("cv")
    assert len(a.encode()) <= 15
    names = {netns.veth_name(s, f"agent-{i}") for s in ("s1", "s2") for i in range(5000)}
    assert len(names) == 10000
    assert all(len(n.encode()) <= 15 for n in names)
    # The scope/name boundary matters: ("ab", "c") is not ("a", "bc").
    assert netns.veth_name("ab", "c") != netns.veth_name("a", "bc")


def net(**kw: str) -> Network:
    d = {"netns_path": "/run/corral/netns/a", "veth_host": "cv0123456789abc",
         "address": "198.18.0.2/30", "gateway": "198.18.0.1/30"}
    d.update(kw)
    return Network(**d)


def test_valid_network_passes() -> None:
    addr, gw = netns.check_network(net())
    assert str(addr) == "198.18.0.2/30"
    assert str(gw) == "198.18.0.1/30"
    netns.check_network(net(address="198.18.0.0/31", gateway="198.18.0.1/31"))


@pytest.mark.parametrize(("field", "value", "message"), [
    ("veth_host", "x" * 16, "interface name"),
    ("veth_host", "a/b", "interface name"),
    ("veth_host", "", "interface name"),
    ("netns_path", "relative/ns", "absolute"),
    ("netns_path", "/run/../etc/ns", r"\.\."),
    ("address", "198.18.0.2", "prefix"),
    ("address", "not-an-ip/30", "invalid address"),
    ("address", "198.18.0.6/30", "same subnet"),
    ("address", "198.18.0.1/30", "same"),
    ("address", "198.18.0.3/30", "broadcast"),
    ("gateway", "198.18.0.0/30", "network or broadcast"),
    ("gateway", "fd00::1/126", "mix"),
])
def test_invalid_network_is_refused(field: str, value: str, message: str) -> None:
    with pytest.raises(CorralError, match=message):
        netns.check_network(net(**{field: value}))


def test_rtnetlink_messages_encode_what_the_kernel_expects() -> None:
    """The hand-built requests: header, 4-byte aligned attributes, nested peer."""
    kind, flags, body = netns._veth_add("eth0", "cv0123456789abc", 7)
    assert kind == netns.RTM_NEWLINK
    assert flags == netns.NLM_F_CREATE | netns.NLM_F_EXCL
    attrs = netns._attrs(body[netns._IFINFOMSG.size:])
    assert attrs[netns.IFLA_IFNAME] == b"eth0\0"
    info = netns._attrs(attrs[netns.IFLA_LINKINFO])
    assert info[netns.IFLA_INFO_KIND] == b"veth"
    peer = netns._attrs(info[netns.IFLA_INFO_DATA])[netns.VETH_INFO_PEER]
    peer_attrs = netns._attrs(peer[netns._IFINFOMSG.size:])
    assert peer_attrs[netns.IFLA_IFNAME] == b"cv0123456789abc\0"
    assert struct.unpack("=I", peer_attrs[netns.IFLA_NET_NS_FD]) == (7,)
    assert len(body) % 4 == 0

    _, _, addr = netns._addr_add(3, ipaddress.ip_interface("198.18.0.2/30"))
    family, prefixlen, _, _, index = netns._IFADDRMSG.unpack_from(addr)
    assert family == socket.AF_INET
    assert (prefixlen, index) == (30, 3)
    assert netns._attrs(addr[netns._IFADDRMSG.size:])[netns.IFA_LOCAL] == bytes([198, 18, 0, 2])

    _, rflags, route = netns._default_route(3, ipaddress.ip_interface("198.18.0.1/30"))
    assert rflags & netns.NLM_F_REPLACE
    rattrs = netns._attrs(route[netns._RTMSG.size:])
    assert rattrs[netns.RTA_GATEWAY] == bytes([198, 18, 0, 1])
    assert struct.unpack("=I", rattrs[netns.RTA_OIF]) == (3,)
