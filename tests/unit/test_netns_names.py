"""netns's pure parts: veth names and input validation (no root, nothing created)."""

from __future__ import annotations

import ipaddress
import socket
import struct
import subprocess
import sys
from pathlib import Path

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


# --- rtnetlink: pyroute2 builds what the hand-built codec sent ----------------
#
# The reference: the struct-built requests netns.py sent before pyroute2 became
# its codec again (commit 1801775), known good against the kernel. Kept here,
# not in the product, to prove pyroute2's encodings byte for byte. One request
# is new since: RTM_GETLINK asks for the link without its counters (EXT_MASK).

_HDR = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid
_IFINFO = struct.Struct("=BxHiII")  # ifinfomsg: family, type, index, flags, change
_IFADDR = struct.Struct("=BBBBI")  # ifaddrmsg: family, prefixlen, flags, scope, index
_RTM = struct.Struct("=BBBBBBBBI")  # rtmsg
REQUEST, ACK, REPLACE, EXCL, CREATE = 0x1, 0x4, 0x100, 0x200, 0x400
NEWLINK, DELLINK, GETLINK, NEWADDR, NEWROUTE = 16, 17, 18, 20, 24
SEQ = 42


def _ref_attr(kind: int, payload: bytes) -> bytes:
    return struct.pack("=HH", 4 + len(payload), kind) + payload + b"\0" * (-len(payload) % 4)


def _ref_msg(kind: int, flags: int, body: bytes) -> bytes:
    return _HDR.pack(_HDR.size + len(body), kind, flags, SEQ, 0) + body


def _fam(iface: netns.Iface) -> int:
    return socket.AF_INET if iface.version == 4 else socket.AF_INET6


def _ref_link_up(index: int) -> bytes:
    return _ref_msg(NEWLINK, REQUEST | ACK, _IFINFO.pack(0, 0, index, 1, 1))


def _ref_link_del(index: int) -> bytes:
    return _ref_msg(DELLINK, REQUEST | ACK, _IFINFO.pack(0, 0, index, 0, 0))


def _ref_get_link(name: str) -> bytes:  # no ack: the answer is the link or an error
    return _ref_msg(GETLINK, REQUEST,
                    _IFINFO.pack(0, 0, 0, 0, 0) + _ref_attr(3, name.encode() + b"\0")
                    + _ref_attr(29, struct.pack("=I", 1 << 3)))  # EXT_MASK: SKIP_STATS


def _ref_addr_add(index: int, iface: netns.Iface) -> bytes:
    ip = iface.ip.packed
    return _ref_msg(NEWADDR, REQUEST | ACK | CREATE | EXCL,
                    _IFADDR.pack(_fam(iface), iface.network.prefixlen, 0, 0, index)
                    + _ref_attr(2, ip) + _ref_attr(1, ip))  # IFA_LOCAL, IFA_ADDRESS


def _ref_default_route(index: int, gw: netns.Iface) -> bytes:
    # table main, proto boot, scope universe, type unicast; RTA_GATEWAY, RTA_OIF
    return _ref_msg(NEWROUTE, REQUEST | ACK | CREATE | REPLACE,
                    _RTM.pack(_fam(gw), 0, 0, 0, 254, 3, 0, 1, 0)
                    + _ref_attr(5, gw.ip.packed) + _ref_attr(4, struct.pack("=I", index)))


def _ref_veth_add(ifname: str, peer: str, fd: int, kind: bytes) -> bytes:
    peer_msg = (_IFINFO.pack(0, 0, 0, 0, 0) + _ref_attr(3, peer.encode() + b"\0")
                + _ref_attr(28, struct.pack("=I", fd)))  # IFLA_NET_NS_FD
    info = _ref_attr(1, kind) + _ref_attr(2, _ref_attr(1, peer_msg))  # KIND, DATA{PEER}
    return _ref_msg(NEWLINK, REQUEST | ACK | CREATE | EXCL,
                    _IFINFO.pack(0, 0, 0, 0, 0) + _ref_attr(3, ifname.encode() + b"\0")
                    + _ref_attr(18, info))  # IFLA_LINKINFO


def _encoded(msg: object) -> bytes:
    """What _Rtnl sends for a request: pyroute2's encoding with our sequence number."""
    with netns._Rtnl() as nl:
        nl.seq = SEQ - 1
        seq, data = nl._encode(msg)
    assert seq == SEQ
    return data


V4 = (ipaddress.ip_interface("198.18.0.2/30"), ipaddress.ip_interface("198.18.0.1/30"))
V6 = (ipaddress.ip_interface("fd00::2/126"), ipaddress.ip_interface("fd00::1/126"))


@pytest.mark.parametrize(("index", "addr", "gw"), [(3, *V4), (70000, *V6)])
def test_pyroute2_encodes_the_reference_bytes(index: int, addr: netns.Iface,
                                              gw: netns.Iface) -> None:
    assert _encoded(netns._link_up(index)) == _ref_link_up(index)
    assert _encoded(netns._link_del(index)) == _ref_link_del(index)
    assert _encoded(netns._get_link("cv0123456789abc")) == _ref_get_link("cv0123456789abc")
    assert _encoded(netns._addr_add(index, addr)) == _ref_addr_add(index, addr)
    assert _encoded(netns._default_route(index, gw)) == _ref_default_route(index, gw)


def test_pyroute2_encodes_the_veth_pair_with_its_peer_in_the_host() -> None:
    """The one difference from the hand-built request: pyroute2 writes the kind
    as a C string ("veth\\0"); the kernel's IFLA_INFO_KIND is an NLA_STRING, read
    with nla_strscpy, so both forms name the same kind (pyroute2's IPRoute has
    always sent it this way)."""
    got = _encoded(netns._veth_add("eth0", "cv0123456789abc", 7))
    assert got == _ref_veth_add("eth0", "cv0123456789abc", 7, b"veth\0")
    assert got != _ref_veth_add("eth0", "cv0123456789abc", 7, b"veth")
    assert len(got) % 4 == 0


def test_pyroute2_decodes_the_kernels_answers() -> None:
    """An ack, an error (with the failed request quoted) and a link, as the
    kernel sends them, through the decoder _Rtnl uses."""
    marshal = netns._marshal()
    request = _ref_link_up(3)
    ack = _HDR.pack(36, 2, 0x100, SEQ, 0) + struct.pack("=i", 0) + request[:16]  # capped
    error = _HDR.pack(20 + len(request), 2, 0, SEQ + 1, 0) + struct.pack("=i", -17) + request
    link = _ref_msg(NEWLINK, 0, _IFINFO.pack(0, 1, 9, 0x1043, 0)
                    + _ref_attr(3, b"eth0\0") + _ref_attr(5, struct.pack("=I", 12)))
    replies = netns._decode(marshal, ack + error + link)
    assert [(r.kind, r.seq) for r in replies] == [(2, SEQ), (2, SEQ + 1), (NEWLINK, SEQ)]
    assert replies[0].errno == 0
    assert replies[1].errno == 17  # EEXIST: _check lets it pass where that is fine
    assert netns._link(replies[2].msg) == netns.Link(index=9, peer=12)
    lo = _ref_msg(NEWLINK, 0, _IFINFO.pack(0, 772, 1, 0x49, 0) + _ref_attr(3, b"lo\0"))
    assert netns._link(netns._decode(marshal, lo)[0].msg) == netns.Link(index=1, peer=None)


def test_importing_netns_does_not_import_pyroute2() -> None:
    """The daemon's start (and restart) imports netns but does no netns work."""
    code = ("import sys, sandbox.netns, supervisor.daemon, supervisor.agents; "
            "print(sorted(m for m in sys.modules if m.startswith('pyroute2')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "[]"
    netns.warm_up()
    assert "pyroute2.netlink.rtnl.marshal" in sys.modules


def test_first_use_from_many_threads_at_once() -> None:
    """The daemon's warm-up and creates may be the first to need pyroute2 at the
    same time; importing it from two threads at once fails (_DeadlockError)
    unless netns serializes it. A fresh interpreter each time, so it is a first use."""
    code = """
import threading
from sandbox import netns
errors = []
def use(fn):
    try:
        fn()
    except BaseException as e:
        errors.append(repr(e))
# a message builder first, then the warm-up: the order that deadlocks unserialized
jobs = [lambda: netns._link_up(2), netns.warm_up, lambda: netns._get_link("eth0"),
        lambda: netns._veth_add("eth0", "cvx", 3), lambda: netns._Rtnl().sock.close()]
threads = [threading.Thread(target=use, args=(fn,)) for fn in jobs]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(errors)
"""
    for _ in range(3):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True, cwd=Path(__file__).resolve().parents[2])
        assert out.stdout.strip() == "[]", out.stdout
