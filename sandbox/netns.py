"""netns: one network namespace and veth pair per sandbox, configured with pyroute2.

The namespace is created by a short-lived thread that unshare(CLONE_NEWNET)s
itself and bind-mounts /proc/thread-self/ns/net onto `Network.netns_path`, which
keeps the namespace alive after the thread is gone. The same thread then
configures the inside with a plain IPRoute() (a netlink socket opened in the
thread's current namespace). We avoid pyroute2's netns.create() and
IPRoute(netns=...) because each forks a helper process (6-8 ms apiece, DESIGN.md:
~50 ms per agent against ~15 ms this way).

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
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

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


# --- netlink helpers ---------------------------------------------------------

def _link(ipr: Any, ifname: str) -> Any | None:
    """The link message for `ifname`, or None (one RTM_GETLINK by name, not a dump)."""
    try:
        return ipr.link("get", ifname=ifname)[0]
    except NetlinkError as e:
        if e.code == errno.ENODEV:
            return None
        raise _nl(f"get link {ifname}", e) from e


def _add_addr(ipr: Any, index: int, iface: Iface) -> None:
    try:
        ipr.addr("add", index=index, address=str(iface.ip), prefixlen=iface.network.prefixlen)
    except NetlinkError as e:
        if e.code != errno.EEXIST:
            raise


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


def _nl(what: str, e: NetlinkError) -> KernelError:
    return KernelError(f"{what} failed: {os.strerror(e.code)}", errno=e.code)


# --- the mechanism -----------------------------------------------------------

def prepare(net: Network) -> None:
    """Create (or finish creating) the sandbox's namespace and veth pair; idempotent.

    All netlink work runs in a dedicated thread: setns/unshare stay out of the
    caller's thread, and pyroute2's private event loop never meets the caller's
    (the supervisor may call this from an asyncio worker thread).
    """
    addr, gw = check_network(net)
    _in_thread(lambda: _prepare(net, addr, gw))
    log.debug("netns %s ready: %s on %s, gateway %s", net.netns_path, net.address,
              net.veth_host, net.gateway)


def _prepare(net: Network, addr: Iface, gw: Iface) -> None:
    mounted = _is_ns_mounted(net.netns_path)
    # A netlink socket stays bound to the namespace it was opened in, so this one
    # keeps talking to the host after the thread has moved into the sandbox's.
    with IPRoute() as host_ipr:
        host = _link(host_ipr, net.veth_host)
        if host is not None and not mounted:
            raise Conflict(f"interface {net.veth_host} exists but {net.netns_path} is not "
                           "its namespace", hint="another sandbox or program owns it; "
                           "release that first or choose another name")
        try:
            with _Netns(net.netns_path, create=not mounted) as host_fd:
                _configure_inside(net, addr, gw, host, host_fd)
            # Back in the host namespace (_Netns.__exit__): the host side.
            host = _link(host_ipr, net.veth_host)
            if host is None:
                raise KernelError(f"veth {net.veth_host} vanished while preparing "
                                  f"{net.netns_path}")
            if not net.ipv6:
                _sysctl(f"net/ipv6/conf/{net.veth_host}/disable_ipv6", "1")
            _add_addr(host_ipr, host["index"], gw)
            host_ipr.link("set", index=host["index"], state="up")
        except BaseException:
            if not mounted:  # we made it: do not leave half a namespace behind
                _release(net)
            raise


def _configure_inside(net: Network, addr: Iface, gw: Iface, host: Any | None,
                      host_fd: int) -> None:
    """Runs with the thread inside the sandbox's namespace."""
    with IPRoute() as ipr:
        eth0 = _link(ipr, INSIDE_IFNAME)
        if host is not None:
            # Our pair is eth0 here and veth_host there, each the other's peer.
            if eth0 is None or eth0.get("IFLA_LINK") != host["index"] \
                    or host.get("IFLA_LINK") != eth0["index"]:
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
            try:
                ipr.link("add", ifname=INSIDE_IFNAME, kind="veth",
                         peer={"ifname": net.veth_host, "net_ns_fd": host_fd})
            except NetlinkError as e:
                raise _nl(f"veth {INSIDE_IFNAME}/{net.veth_host}", e) from e
            eth0 = _link(ipr, INSIDE_IFNAME)
            if eth0 is None:
                raise KernelError(f"{INSIDE_IFNAME} vanished in {net.netns_path}")
        idx = eth0["index"]
        ipr.link("set", index=LOOPBACK_IFINDEX, state="up")
        _add_addr(ipr, idx, addr)
        ipr.link("set", index=idx, state="up")
        default = "0.0.0.0/0" if addr.version == 4 else "::/0"
        ipr.route("replace", dst=default, gateway=str(gw.ip), oif=idx)


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
        with IPRoute() as ipr:
            for idx in ipr.link_lookup(ifname=net.veth_host):
                try:
                    ipr.link("del", index=idx)
                except NetlinkError as e:
                    if e.code != errno.ENODEV:
                        raise _nl(f"delete {net.veth_host}", e) from e
        log.info("deleted %s by hand: its namespace was still pinned", net.veth_host)


def exists(net: Network) -> bool:
    """Is the namespace there (its file a mounted namespace)?"""
    return _is_ns_mounted(net.netns_path)


def open_netns(net: Network) -> int:
    """An O_CLOEXEC fd on the namespace, for setns(fd, CLONE_NEWNET); caller closes it."""
    if not _is_ns_mounted(net.netns_path):
        raise NotFound(f"network namespace {net.netns_path} does not exist")
    return os.open(net.netns_path, os.O_RDONLY | os.O_CLOEXEC)
