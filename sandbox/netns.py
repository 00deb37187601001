"""netns: one network namespace and veth pair per sandbox, configured over rtnetlink.

The namespace is created by a short-lived thread that unshare(CLONE_NEWNET)s
itself and bind-mounts /proc/thread-self/ns/net onto `Network.netns_path`, which
keeps the namespace alive after the thread is gone. The same thread then
configures the inside through a netlink socket opened in the thread's current
namespace.

pyroute2 is the rtnetlink codec: each request is one of its message classes
(ifinfmsg, ifaddrmsg, rtmsg), encoded by it, and the kernel's answers are
decoded by its marshal. The transport is ours (_Rtnl): a plain socket per
namespace and several requests per datagram, one round trip per setup step.
No IPRoute object and no helper process (pyroute2's netns.create() and
IPRoute(netns=...) fork one each, 6-8 ms apiece): setup costs ~3 ms of kernel
work plus ~2-4 ms of pyroute2 encoding and decoding per sandbox. pyroute2 is
imported on first use (~0.3 s, all of pyroute2/__init__), not with this module,
so the daemon's start does not pay it; the daemon calls warm_up() once ready.

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
import functools
import hashlib
import ipaddress
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

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
P = ParamSpec("P")


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
# pyroute2 is the codec: every request is one of its message classes
# (ifinfmsg, ifaddrmsg, rtmsg), filled and encoded by it, and every answer is
# decoded by its rtnetlink marshal. What stays ours is the transport: a plain
# NETLINK_ROUTE socket per namespace, opened by the thread that is in it, and
# several requests per datagram. pyroute2 is imported on first use, inside the
# functions below: any pyroute2 import runs pyroute2/__init__ (~0.3 s), which
# the daemon's start and restart (no netns work) should not pay; warm_up()
# lets the daemon import it once it is ready.
#
# The few numbers that are not pyroute2's to say: linux/rtnetlink.h.

#: RT_TABLE_MAIN: the table a default route goes to.
RT_TABLE_MAIN = 254
#: RTEXT_FILTER_SKIP_STATS: a link without its counters (a smaller answer to decode).
RTEXT_FILTER_SKIP_STATS = 1 << 3
#: Seconds to wait for the kernel's answer to a request.
NETLINK_TIMEOUT = 10.0


#: Serializes the first import of pyroute2: two threads importing it at once
#: (the daemon's warm-up and a create, or two creates) fail with CPython's
#: _DeadlockError, as pyroute2's modules import each other.
_PYROUTE2_LOCK = threading.Lock()
_pyroute2_loaded = False


def warm_up() -> None:
    """Import pyroute2's rtnetlink codec now, so the first prepare() does not pay it."""
    global _pyroute2_loaded
    if _pyroute2_loaded:
        return
    with _PYROUTE2_LOCK:
        if not _pyroute2_loaded:
            # the marshal imports the message classes, and pyroute2/__init__ all the rest
            import pyroute2.netlink.rtnl.marshal  # noqa: F401
            _pyroute2_loaded = True


def _uses_pyroute2(fn: Callable[P, T]) -> Callable[P, T]:
    """For functions that import from pyroute2: load it first, one thread at a time."""
    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        warm_up()
        return fn(*args, **kwargs)
    return wrapper


@dataclass(frozen=True)
class Link:
    index: int
    peer: int | None  # IFLA_LINK: a veth's peer ifindex (in the peer's namespace)


@dataclass(frozen=True)
class _Reply:
    """One decoded answer: its type, sequence number and pyroute2 message."""

    kind: int
    seq: int
    msg: Any

    @property
    def errno(self) -> int:
        """For an NLMSG_ERROR: the errno (0 is an ack)."""
        return -int(self.msg["error"])


@_uses_pyroute2
def _marshal() -> Any:
    """pyroute2's rtnetlink decoder (one per socket: it keeps per-sequence state)."""
    from pyroute2.netlink.rtnl.marshal import MarshalRtnl
    return MarshalRtnl()


class _Rtnl:
    """A NETLINK_ROUTE socket in the namespace of the thread that opened it.

    `batch` sends several requests in one datagram (the kernel handles them
    in order and acks each): one round trip for a whole configuration step.
    """

    def __init__(self) -> None:
        self.marshal = _marshal()
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

    def _encode(self, msg: Any) -> tuple[int, bytes]:
        self.seq += 1
        msg["header"]["sequence_number"] = self.seq
        msg.encode()
        return self.seq, bytes(msg.data)

    def batch(self, requests: list[Any]) -> list[int]:
        """Send requests (each asks for an ack) in one datagram; their errnos (0: ok)."""
        seqs, data = [], b""
        for request in requests:
            seq, encoded = self._encode(request)
            seqs.append(seq)
            data += encoded
        self._send(data)
        from pyroute2.netlink import NLMSG_ERROR
        errs: dict[int, int] = {}
        while len(errs) < len(seqs):
            for reply in self._recv():
                if reply.kind == NLMSG_ERROR and reply.seq in seqs:
                    errs[reply.seq] = reply.errno
        return [errs[s] for s in seqs]

    def _send(self, data: bytes) -> None:
        try:
            self.sock.send(data)
        except OSError as e:
            raise KernelError(f"netlink send failed: {e}", errno=e.errno or 0) from e

    def _recv(self) -> list[_Reply]:
        try:
            buf = self.sock.recv(65536)
        except OSError as e:  # TimeoutError included
            raise KernelError(f"netlink receive failed: {e}", errno=e.errno or 0) from e
        return _decode(self.marshal, buf)

    def get_link(self, ifname: str) -> Link | None:
        """The link called `ifname`, or None (one RTM_GETLINK by name, not a dump)."""
        from pyroute2.netlink import NLMSG_ERROR
        from pyroute2.netlink.rtnl import RTM_NEWLINK
        seq, request = self._encode(_get_link(ifname))
        self._send(request)
        while True:
            for reply in self._recv():
                if reply.seq != seq:
                    continue
                if reply.kind == NLMSG_ERROR:
                    if reply.errno == errno.ENODEV:
                        return None
                    raise _nl(f"get link {ifname}", reply.errno)
                if reply.kind == RTM_NEWLINK:
                    return _link(reply.msg)


def _decode(marshal: Any, buf: bytes) -> list[_Reply]:
    """The messages of one datagram, decoded by pyroute2."""
    return [_Reply(m["header"]["type"], m["header"]["sequence_number"], m)
            for m in marshal.parse(buf)]


def _link(msg: Any) -> Link:
    """A Link from a decoded RTM_NEWLINK (pyroute2 ifinfmsg)."""
    peer = msg.get_attr("IFLA_LINK")
    return Link(int(msg["index"]), None if peer is None else int(peer))


@_uses_pyroute2
def _request(msg: Any, kind: int, nlm_flags: int, ack: bool = True, **fields: Any) -> Any:
    """Fill a pyroute2 message's header and fixed fields (attributes: msg["attrs"])."""
    from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST
    msg["header"]["type"] = kind
    msg["header"]["flags"] = NLM_F_REQUEST | (NLM_F_ACK if ack else 0) | nlm_flags
    for key, value in fields.items():
        msg[key] = value
    return msg


@_uses_pyroute2
def _get_link(ifname: str) -> Any:
    """RTM_GETLINK by name; the answer is the link (RTM_NEWLINK) or an error, no ack."""
    from pyroute2.netlink.rtnl import RTM_GETLINK
    from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
    msg = _request(ifinfmsg(), RTM_GETLINK, 0, ack=False)
    msg["attrs"] = [("IFLA_IFNAME", ifname), ("IFLA_EXT_MASK", RTEXT_FILTER_SKIP_STATS)]
    return msg


@_uses_pyroute2
def _link_up(index: int) -> Any:
    from pyroute2.netlink.rtnl import RTM_NEWLINK
    from pyroute2.netlink.rtnl.ifinfmsg import IFF_UP, ifinfmsg
    return _request(ifinfmsg(), RTM_NEWLINK, 0, index=index, flags=IFF_UP, change=IFF_UP)


@_uses_pyroute2
def _link_del(index: int) -> Any:
    from pyroute2.netlink.rtnl import RTM_DELLINK
    from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
    return _request(ifinfmsg(), RTM_DELLINK, 0, index=index)


def _family(iface: Iface) -> int:
    return socket.AF_INET if iface.version == 4 else socket.AF_INET6


@_uses_pyroute2
def _addr_add(index: int, iface: Iface) -> Any:
    from pyroute2.netlink import NLM_F_CREATE, NLM_F_EXCL
    from pyroute2.netlink.rtnl import RTM_NEWADDR, rtscopes
    from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
    msg = _request(ifaddrmsg(), RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL,
                   family=_family(iface), prefixlen=iface.network.prefixlen,
                   scope=rtscopes["RT_SCOPE_UNIVERSE"], index=index)
    ip = str(iface.ip)
    msg["attrs"] = [("IFA_LOCAL", ip), ("IFA_ADDRESS", ip)]
    return msg


@_uses_pyroute2
def _default_route(index: int, gw: Iface) -> Any:
    from pyroute2.netlink import NLM_F_CREATE, NLM_F_REPLACE
    from pyroute2.netlink.rtnl import RTM_NEWROUTE, rtprotos, rtscopes, rtypes
    from pyroute2.netlink.rtnl.rtmsg import rtmsg
    msg = _request(rtmsg(), RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE,
                   family=_family(gw), table=RT_TABLE_MAIN, proto=rtprotos["RTPROT_BOOT"],
                   scope=rtscopes["RT_SCOPE_UNIVERSE"], type=rtypes["RTN_UNICAST"])
    msg["attrs"] = [("RTA_GATEWAY", str(gw.ip)), ("RTA_OIF", index)]
    return msg


@_uses_pyroute2
def _veth_add(ifname: str, peer: str, peer_ns_fd: int) -> Any:
    """A veth pair: `ifname` here, `peer` straight into the namespace of `peer_ns_fd`."""
    from pyroute2.netlink import NLM_F_CREATE, NLM_F_EXCL
    from pyroute2.netlink.rtnl import RTM_NEWLINK
    from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
    msg = _request(ifinfmsg(), RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL)
    peer_msg = {"attrs": [("IFLA_IFNAME", peer), ("IFLA_NET_NS_FD", peer_ns_fd)]}
    msg["attrs"] = [
        ("IFLA_IFNAME", ifname),
        ("IFLA_LINKINFO", {"attrs": [
            ("IFLA_INFO_KIND", "veth"),
            ("IFLA_INFO_DATA", {"attrs": [("VETH_INFO_PEER", peer_msg)]}),
        ]}),
    ]
    return msg


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
                eth0 = _configure_inside(net, addr, gw, host, host_fd, fresh=not mounted)
            # Back in the host namespace (_Netns.__exit__): the host side. eth0's
            # IFLA_LINK is its peer's index here, so no second lookup (each one
            # costs a decode of the whole link).
            index = host.index if host is not None else eth0.peer
            if index is None:
                raise KernelError(f"{INSIDE_IFNAME} in {net.netns_path} has no veth peer")
            if not net.ipv6:
                _sysctl(f"net/ipv6/conf/{net.veth_host}/disable_ipv6", "1")
            errs = host_nl.batch([_addr_add(index, gw), _link_up(index)])
            _check(f"configure {net.veth_host}", errs, ok=(errno.EEXIST,))
        except BaseException:
            if not mounted:  # we made it: do not leave half a namespace behind
                _release(net)
            raise


def _configure_inside(net: Network, addr: Iface, gw: Iface, host: Link | None,
                      host_fd: int, fresh: bool) -> Link:
    """Runs with the thread inside the sandbox's namespace; returns eth0.

    `fresh`: the namespace was just made, so it has only lo (no need to ask).
    """
    with _Rtnl() as nl:
        eth0 = None if fresh else nl.get_link(INSIDE_IFNAME)
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
    return eth0


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
                       nl.batch([_link_del(link.index)]),
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
