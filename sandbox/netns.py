"""netns: one network namespace and veth pair per sandbox, configured over rtnetlink.

The namespace is created by a short-lived thread that unshare(CLONE_NEWNET)s
itself and bind-mounts /proc/thread-self/ns/net onto `Network.netns_path`, which
keeps the namespace alive after the thread is gone. The same thread then
configures the inside through a netlink socket opened in the thread's current
namespace. We avoid helper processes (pyroute2's netns.create() and
IPRoute(netns=...) fork one each, 6-8 ms apiece) and, since then, pyroute2
itself: the handful of rtnetlink requests we need are built with `struct`
below (_Rtnl), sent in batches, one round trip for all of the inside's setup.
pyroute2 cost ~1 ms of Python per request and ~220 ms of imports at daemon
start.

The veth pair is created from inside the namespace with its peer placed straight
into the host namespace (IFLA_NET_NS_FD), so nothing has to be moved or renamed.
Inside: lo and eth0 up, the sandbox address on eth0, a default route via the
host side, and (unless the spec asks for IPv6) no IPv6 on either end of the veth,
not even link-local. Nothing else: forwarding, NAT and the egress policy belong to a later
layer.

Teardown drops the namespace (umount + unlink): the kernel then reaps the veth
pair in its cleanup work, which is far cheaper in bulk than deleting each veth
synchronously (17-33 ms apiece here).
"""

from __future__ import annotations

import errno
import hashlib
import ipaddress
import logging
import os
import re
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from sandbox import kernel
from sandbox.errors import Conflict, CorralError, KernelError, NotFound
from sandbox.spec import Network, check_abs_path

log = logging.getLogger(__name__)

#: Interface names are limited to IFNAMSIZ-1 = 15 bytes by the kernel.
IFNAMSIZ = 15
_IFNAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}$")

#: lo is ifindex 1 in every network namespace (LOOPBACK_IFINDEX in the kernel).
LOOPBACK_IFINDEX = 1

#: Inside the namespace the sandbox's interface is always called this.
INSIDE_IFNAME = "eth0"

#: How long release() lets the kernel reap the veth before deleting it by hand.
REAP_TIMEOUT = 2.0

T = TypeVar("T")


def veth_name(scope: str, name: str) -> str:
    """Host-side veth name for sandbox `name` of daemon `scope`: "cv" + 13 hex digits.

    Deterministic (reconcile finds it again after a crash), 15 bytes (the kernel's
    limit), and distinct per (scope, name): 52 bits of SHA-256, so two daemons on
    one host (different scopes) never collide on an agent name they share.
    """
    digest = hashlib.sha256(f"{scope}\0{name}".encode()).hexdigest()
    return "cv" + digest[: IFNAMSIZ - 2]


# --- validation --------------------------------------------------------------

Iface = ipaddress.IPv4Interface | ipaddress.IPv6Interface


def _check_ifname(name: str) -> str:
    if not isinstance(name, str) or not _IFNAME_RE.match(name) or len(name.encode()) > IFNAMSIZ:
        raise CorralError(f"invalid interface name {name!r}",
                          hint="1-15 bytes of letters, digits, '_', '.', '-'")
    return name


def _check_iface(value: str, what: str) -> Iface:
    try:
        iface = ipaddress.ip_interface(value)
    except ValueError as e:
        raise CorralError(f"invalid {what} {value!r}: {e}",
                          hint="write it with its prefix, e.g. 10.213.0.2/30") from e
    if "/" not in value:
        raise CorralError(f"{what} {value!r} needs a prefix length, e.g. /30")
    return iface


def check_network(net: Network) -> tuple[Iface, Iface]:
    """Validate `net`; return (address, gateway) as interfaces on the same subnet."""
    check_abs_path(net.netns_path, "netns path")
    _check_ifname(net.veth_host)
    addr = _check_iface(net.address, "address")
    gw = _check_iface(net.gateway, "gateway")
    if addr.version != gw.version:
        raise CorralError(f"address {net.address} and gateway {net.gateway} mix IPv4 and IPv6")
    if addr.network != gw.network:
        raise CorralError(f"address {net.address} and gateway {net.gateway} are not in the "
                          "same subnet", hint="use the two hosts of one /30 (or /31)")
    if addr.ip == gw.ip:
        raise CorralError(f"address and gateway are the same ({addr.ip})")
    hosts = {addr.network.network_address, addr.network.broadcast_address}
    if addr.network.prefixlen < addr.max_prefixlen - 1:
        for iface, what in ((addr, "address"), (gw, "gateway")):
            if iface.ip in hosts:
                raise CorralError(f"{what} {iface} is the subnet's network or broadcast "
                                  "address")
    return addr, gw


# --- the namespace file ------------------------------------------------------

def _nsfs_dev() -> int:
    return Path("/proc/self/ns/net").stat().st_dev


def _is_ns_mounted(path: str) -> bool:
    """Is `path` a mounted namespace file? (nsfs has one superblock, so its st_dev
    tells a bind-mounted namespace from the empty file underneath.)"""
    try:
        return Path(path).stat().st_dev == _nsfs_dev()
    except FileNotFoundError:
        return False


def _in_thread(fn: Callable[[], T]) -> T:
    """Run `fn` in a fresh thread (so its setns/unshare never leak into the caller)."""
    result: list[T] = []
    error: list[BaseException] = []

    def body() -> None:
        try:
            result.append(fn())
        except BaseException as e:
            error.append(e)

    th = threading.Thread(target=body, name="corral-netns", daemon=True)
    th.start()
    th.join()
    if error:
        raise error[0]
    return result[0]


class _Netns:
    """Enter a namespace in the current (dedicated) thread, and always come back."""

    def __init__(self, path: str, create: bool) -> None:
        self.path = path
        self.create = create
        self.host_fd = -1

    def __enter__(self) -> int:
        self.host_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            if self.create:
                self._create()
            else:
                fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    kernel.setns(fd, kernel.CLONE_NEWNET)
                finally:
                    os.close(fd)
        except BaseException:
            os.close(self.host_fd)
            raise
        return self.host_fd

    def _create(self) -> None:
        kernel.unshare(kernel.CLONE_NEWNET)
        p = Path(self.path)
        p.parent.mkdir(parents=True, exist_ok=True)
        # An empty regular file is the mount point, as with `ip netns add`.
        fd = os.open(self.path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o444)
        os.close(fd)
        kernel.mount("/proc/thread-self/ns/net", self.path, None, kernel.MS_BIND)
        log.debug("netns %s created", self.path)

    def __exit__(self, *exc: object) -> None:
        try:
            kernel.setns(self.host_fd, kernel.CLONE_NEWNET)
        finally:
            os.close(self.host_fd)


# --- rtnetlink ---------------------------------------------------------------
#
# Constants from linux/netlink.h, linux/rtnetlink.h, linux/if_link.h, linux/veth.h.

NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE = 0x100, 0x200, 0x400
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK, RTM_NEWADDR, RTM_NEWROUTE = 16, 17, 18, 20, 24
IFLA_IFNAME, IFLA_LINK, IFLA_LINKINFO, IFLA_NET_NS_FD = 3, 5, 18, 28
IFLA_INFO_KIND, IFLA_INFO_DATA, VETH_INFO_PEER = 1, 2, 1
IFA_ADDRESS, IFA_LOCAL = 1, 2
RTA_OIF, RTA_GATEWAY = 4, 5
RT_TABLE_MAIN, RTPROT_BOOT, RT_SCOPE_UNIVERSE, RTN_UNICAST = 254, 3, 0, 1
IFF_UP = 0x1
#: Seconds to wait for the kernel's answer to a request.
NETLINK_TIMEOUT = 10.0

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
_RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst/src len, tos, table, proto, scope, type, flags
_RTATTR = struct.Struct("=HH")  # len, type


def _attr(kind: int, payload: bytes) -> bytes:
    head = _RTATTR.pack(_RTATTR.size + len(payload), kind)
    return head + payload + b"\0" * (-len(payload) % 4)


def _attrs(data: bytes) -> dict[int, bytes]:
    """Top-level attributes of a message body (later duplicates win)."""
    out: dict[int, bytes] = {}
    off = 0
    while off + _RTATTR.size <= len(data):
        length, kind = _RTATTR.unpack_from(data, off)
        if length < _RTATTR.size:
            break
        out[kind & 0x3FFF] = data[off + _RTATTR.size: off + length]
        off += (length + 3) & ~3
    return out


@dataclass(frozen=True)
class Link:
    index: int
    peer: int | None  # IFLA_LINK: a veth's peer ifindex (in the peer's namespace)


class _Rtnl:
    """A NETLINK_ROUTE socket in the namespace of the thread that opened it.

    `batch` sends several requests in one datagram (the kernel handles them
    in order and acks each): one round trip for a whole configuration step.
    """

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                  socket.NETLINK_ROUTE)
        # the kernel answers at once; a missing answer is a bug, not a wait
        self.sock.settimeout(NETLINK_TIMEOUT)
        self.sock.bind((0, 0))
        self.seq = 0

    def __enter__(self) -> _Rtnl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def _msg(self, kind: int, flags: int, body: bytes) -> tuple[int, bytes]:
        self.seq += 1
        return self.seq, _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind,
                                        NLM_F_REQUEST | flags, self.seq, 0) + body

    def batch(self, requests: list[tuple[int, int, bytes]]) -> list[int]:
        """Send (type, flags, body) requests, each with an ack; their errnos (0: ok)."""
        seqs, data = [], b""
        for kind, flags, body in requests:
            seq, msg = self._msg(kind, flags | NLM_F_ACK, body)
            seqs.append(seq)
            data += msg
        self._send(data)
        errs: dict[int, int] = {}
        while len(errs) < len(seqs):
            for kind, seq, payload in self._recv():
                if kind == NLMSG_ERROR and seq in seqs:
                    errs[seq] = -struct.unpack_from("=i", payload)[0]
        return [errs[s] for s in seqs]

    def _send(self, data: bytes) -> None:
        try:
            self.sock.send(data)
        except OSError as e:
            raise KernelError(f"netlink send failed: {e}", errno=e.errno or 0) from e

    def _recv(self) -> list[tuple[int, int, bytes]]:
        try:
            buf = self.sock.recv(65536)
        except OSError as e:  # TimeoutError included
            raise KernelError(f"netlink receive failed: {e}", errno=e.errno or 0) from e
        out = []
        off = 0
        while off + _NLMSGHDR.size <= len(buf):
            length, kind, _, seq, _ = _NLMSGHDR.unpack_from(buf, off)
            if length < _NLMSGHDR.size:
                break
            out.append((kind, seq, buf[off + _NLMSGHDR.size: off + length]))
            off += (length + 3) & ~3
        return out

    def get_link(self, ifname: str) -> Link | None:
        """The link called `ifname`, or None (one RTM_GETLINK by name, not a dump)."""
        seq, msg = self._msg(RTM_GETLINK, 0,
                             _IFINFOMSG.pack(0, 0, 0, 0, 0) + _attr(IFLA_IFNAME, _cstr(ifname)))
        self._send(msg)
        while True:
            for kind, rseq, payload in self._recv():
                if rseq != seq:
                    continue
                if kind == NLMSG_ERROR:
                    err = -struct.unpack_from("=i", payload)[0]
                    if err == errno.ENODEV:
                        return None
                    raise _nl(f"get link {ifname}", err)
                if kind == RTM_NEWLINK:
                    _, _, index, _, _ = _IFINFOMSG.unpack_from(payload)
                    peer = _attrs(payload[_IFINFOMSG.size:]).get(IFLA_LINK)
                    return Link(index, struct.unpack("=I", peer[:4])[0] if peer else None)


def _cstr(text: str) -> bytes:
    return text.encode() + b"\0"


def _link_up(index: int) -> tuple[int, int, bytes]:
    return RTM_NEWLINK, 0, _IFINFOMSG.pack(0, 0, index, IFF_UP, IFF_UP)


def _addr_add(index: int, iface: Iface) -> tuple[int, int, bytes]:
    fam = socket.AF_INET if iface.version == 4 else socket.AF_INET6
    ip = iface.ip.packed
    return (RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL,
            _IFADDRMSG.pack(fam, iface.network.prefixlen, 0, RT_SCOPE_UNIVERSE, index)
            + _attr(IFA_LOCAL, ip) + _attr(IFA_ADDRESS, ip))


def _default_route(index: int, gw: Iface) -> tuple[int, int, bytes]:
    fam = socket.AF_INET if gw.version == 4 else socket.AF_INET6
    return (RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE,
            _RTMSG.pack(fam, 0, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT, RT_SCOPE_UNIVERSE,
                        RTN_UNICAST, 0)
            + _attr(RTA_GATEWAY, gw.ip.packed) + _attr(RTA_OIF, struct.pack("=I", index)))


def _veth_add(ifname: str, peer: str, peer_ns_fd: int) -> tuple[int, int, bytes]:
    peer_msg = (_IFINFOMSG.pack(0, 0, 0, 0, 0) + _attr(IFLA_IFNAME, _cstr(peer))
                + _attr(IFLA_NET_NS_FD, struct.pack("=I", peer_ns_fd)))
    info = _attr(IFLA_INFO_KIND, b"veth") + _attr(IFLA_INFO_DATA, _attr(VETH_INFO_PEER, peer_msg))
    return (RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL,
            _IFINFOMSG.pack(0, 0, 0, 0, 0) + _attr(IFLA_IFNAME, _cstr(ifname))
            + _attr(IFLA_LINKINFO, info))


def _check(what: str, errs: list[int], ok: tuple[int, ...] = ()) -> None:
    for err in errs:
        if err and err not in ok:
            raise _nl(what, err)


def _sysctl(key: str, value: str) -> None:
    """Write a net sysctl. /proc/sys/net belongs to the opening thread's namespace."""
    path = Path("/proc/sys") / key
    if not path.parent.exists():  # kernel without IPv6: nothing to disable
        return
    try:
        path.write_text(value)
    except OSError as e:
        raise KernelError(f"write {value!r} to {path} failed: {e.strerror}",
                          errno=e.errno or 0) from e


def _nl(what: str, err: int) -> KernelError:
    return KernelError(f"{what} failed: {os.strerror(err)}", errno=err)


# --- the mechanism -----------------------------------------------------------

def prepare(net: Network) -> None:
    """Create (or finish creating) the sandbox's namespace and veth pair; idempotent.

    All netlink work runs in a dedicated thread, so setns/unshare stay out of
    the caller's thread (the supervisor calls this from an asyncio worker).
    """
    addr, gw = check_network(net)
    _in_thread(lambda: _prepare(net, addr, gw))
    log.debug("netns %s ready: %s on %s, gateway %s", net.netns_path, net.address,
              net.veth_host, net.gateway)


def _prepare(net: Network, addr: Iface, gw: Iface) -> None:
    mounted = _is_ns_mounted(net.netns_path)
    # A netlink socket stays bound to the namespace it was opened in, so this one
    # keeps talking to the host after the thread has moved into the sandbox's.
    with _Rtnl() as host_nl:
        host = host_nl.get_link(net.veth_host)
        if host is not None and not mounted:
            raise Conflict(f"interface {net.veth_host} exists but {net.netns_path} is not "
                           "its namespace", hint="another sandbox or program owns it; "
                           "release that first or choose another name")
        try:
            with _Netns(net.netns_path, create=not mounted) as host_fd:
                _configure_inside(net, addr, gw, host, host_fd)
            # Back in the host namespace (_Netns.__exit__): the host side.
            host = host_nl.get_link(net.veth_host)
            if host is None:
                raise KernelError(f"veth {net.veth_host} vanished while preparing "
                                  f"{net.netns_path}")
            if not net.ipv6:
                _sysctl(f"net/ipv6/conf/{net.veth_host}/disable_ipv6", "1")
            errs = host_nl.batch([_addr_add(host.index, gw), _link_up(host.index)])
            _check(f"configure {net.veth_host}", errs, ok=(errno.EEXIST,))
        except BaseException:
            if not mounted:  # we made it: do not leave half a namespace behind
                _release(net)
            raise


def _configure_inside(net: Network, addr: Iface, gw: Iface, host: Link | None,
                      host_fd: int) -> None:
    """Runs with the thread inside the sandbox's namespace."""
    with _Rtnl() as nl:
        eth0 = nl.get_link(INSIDE_IFNAME)
        if host is not None:
            # Our pair is eth0 here and veth_host there, each the other's peer.
            if eth0 is None or eth0.peer != host.index or host.peer != eth0.index:
                raise Conflict(f"interface {net.veth_host} is not paired with "
                               f"{INSIDE_IFNAME} in {net.netns_path}",
                               hint="another sandbox or program owns it")
        elif eth0 is not None:
            raise Conflict(f"{net.netns_path} already has an {INSIDE_IFNAME} that is not "
                           f"paired with {net.veth_host}")
        else:
            if not net.ipv6:
                # eth0 must come up without IPv6 (not even link-local, which would
                # reach the host side before any policy exists): new interfaces
                # take "default". lo keeps ::1, which local services may bind.
                _sysctl("net/ipv6/conf/default/disable_ipv6", "1")
            _check(f"veth {INSIDE_IFNAME}/{net.veth_host}",
                   nl.batch([_veth_add(INSIDE_IFNAME, net.veth_host, host_fd)]))
            eth0 = nl.get_link(INSIDE_IFNAME)
            if eth0 is None:
                raise KernelError(f"{INSIDE_IFNAME} vanished in {net.netns_path}")
        # In this order (the kernel handles a batch in order): the route's
        # gateway must be on a connected subnet of an up interface.
        errs = nl.batch([_link_up(LOOPBACK_IFINDEX), _addr_add(eth0.index, addr),
                         _link_up(eth0.index), _default_route(eth0.index, gw)])
        _check(f"configure {INSIDE_IFNAME} in {net.netns_path}", errs, ok=(errno.EEXIST,))


def release(net: Network) -> None:
    """Drop the namespace (umount + unlink) and make sure the veth is gone; idempotent."""
    check_abs_path(net.netns_path, "netns path")
    _check_ifname(net.veth_host)
    _in_thread(lambda: _release(net))
    log.debug("netns %s released", net.netns_path)


def _release(net: Network) -> None:
    path = net.netns_path
    while _is_ns_mounted(path):
        kernel.umount2(path, kernel.MNT_DETACH | kernel.UMOUNT_NOFOLLOW)
    try:
        Path(path).unlink()
    except FileNotFoundError:
        pass
    # Without the namespace the kernel reaps the pair in the background; wait a
    # little, and delete the host side ourselves only if something still pins
    # the namespace (a process left inside it, an open fd).
    sysfs = Path("/sys/class/net") / net.veth_host
    deadline = time.monotonic() + REAP_TIMEOUT
    delay = 0.001
    while sysfs.exists() and time.monotonic() < deadline:
        time.sleep(delay)
        delay = min(delay * 2, 0.05)
    if sysfs.exists():
        with _Rtnl() as nl:
            link = nl.get_link(net.veth_host)
            if link is not None:
                _check(f"delete {net.veth_host}",
                       nl.batch([(RTM_DELLINK, 0, _IFINFOMSG.pack(0, 0, link.index, 0, 0))]),
                       ok=(errno.ENODEV,))
        log.info("deleted %s by hand: its namespace was still pinned", net.veth_host)


def exists(net: Network) -> bool:
    """Is the namespace there (its file a mounted namespace)?"""
    return _is_ns_mounted(net.netns_path)


def open_netns(net: Network) -> int:
    """An O_CLOEXEC fd on the namespace, for setns(fd, CLONE_NEWNET); caller closes it."""
    if not _is_ns_mounted(net.netns_path):
        raise NotFound(f"network namespace {net.netns_path} does not exist")
    return os.open(net.netns_path, os.O_RDONLY | os.O_CLOEXEC)
