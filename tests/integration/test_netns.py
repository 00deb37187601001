"""Network namespaces for real: prepare gives exactly lo + eth0 with the right address and
default route, the host side is up with the gateway, the gateway answers ping (positive
control); conflicts are refused; release leaves no namespace file and no veth behind."""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import secrets
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox import kernel, netns
from sandbox.errors import Conflict, KernelError, NotFound
from sandbox.spec import Network

pytestmark = [pytest.mark.root]


def subnet() -> tuple[str, str]:
    """A random /30 in 198.18.0.0/15 (other helpers' tests run concurrently)."""
    n = secrets.randbelow(1 << 15) * 4
    base = (198 << 24) | (18 << 16) | n
    a = lambda i: ".".join(str((base + i) >> s & 255) for s in (24, 16, 8, 0))  # noqa: E731
    return f"{a(2)}/30", f"{a(1)}/30"


def make_net(tmp_path: Path, uniq: str, name: str) -> Network:
    address, gateway = subnet()
    return Network(netns_path=str(tmp_path / "netns" / name),
                   veth_host=netns.veth_name(uniq, name), address=address, gateway=gateway)


@pytest.fixture
def nets(need_root: None, tmp_path: Path, uniq: str) -> Iterator[list[Network]]:
    """Networks made by the test; every one released whatever happens."""
    made: list[Network] = []
    try:
        yield made
    finally:
        for n in made:
            netns.release(n)


def inside(net: Network, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["nsenter", f"--net={net.netns_path}", *argv], capture_output=True,
                          text=True, timeout=60, check=False)


def host_links() -> set[str]:
    return set(os.listdir("/sys/class/net"))


def ip_json(net: Network | None, *argv: str) -> list[dict[str, object]]:
    cmd = ["ip", "-j", *argv]
    r = inside(net, *cmd) if net else subprocess.run(cmd, capture_output=True, text=True,
                                                     timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def test_prepare_builds_exactly_lo_and_eth0(nets: list[Network], tmp_path: Path,
                                            uniq: str) -> None:
    net = make_net(tmp_path, uniq, "a")
    nets.append(net)
    assert not netns.exists(net)
    netns.prepare(net)
    assert netns.exists(net)

    links = ip_json(net, "-d", "link")
    assert sorted(str(x["ifname"]) for x in links) == ["eth0", "lo"]
    # pyroute2 names the kind "veth\0" (C string), iproute2 "veth": the same to the kernel.
    kinds = {str(x["ifname"]): x.get("linkinfo", {})  # type: ignore[attr-defined]
             .get("info_kind") for x in links}
    assert kinds == {"eth0": "veth", "lo": None}
    addrs = {str(x["ifname"]): x for x in ip_json(net, "-4", "addr")}
    assert all("UP" in x["flags"] for x in addrs.values())  # type: ignore[operator]
    eth0 = addrs["eth0"]["addr_info"]
    assert [(i["local"], i["prefixlen"]) for i in eth0] == [  # type: ignore[union-attr,index]
        (net.address.split("/")[0], 30)]
    routes = ip_json(net, "-4", "route")
    default = [r for r in routes if r["dst"] == "default"]
    assert [(r["gateway"], r["dev"]) for r in default] == [(net.gateway.split("/")[0], "eth0")]
    # Nothing else: only the default route and the /30 itself.
    assert len(routes) == 2

    # Host side: up, with the gateway address.
    assert net.veth_host in host_links()
    host = ip_json(None, "-4", "addr", "show", "dev", net.veth_host)[0]
    assert "UP" in host["flags"]  # type: ignore[operator]
    assert [(i["local"], i["prefixlen"]) for i in host["addr_info"]] == [  # type: ignore
        (net.gateway.split("/")[0], 30)]

    # No IPv6 on either end of the veth (not even link-local) unless asked for; lo keeps ::1.
    v6 = {str(x["ifname"]): x["addr_info"] for x in ip_json(net, "-6", "addr")}
    assert v6.get("eth0", []) == []
    assert [i["local"] for i in v6["lo"]] == ["::1"]  # type: ignore[attr-defined]
    host6 = ip_json(None, "-6", "addr", "show", "dev", net.veth_host)
    assert all(x["addr_info"] == [] for x in host6)

    # Positive control: the gateway answers from inside.
    r = inside(net, "ping", "-c", "1", "-W", "10", net.gateway.split("/")[0])
    assert r.returncode == 0, r.stdout + r.stderr

    # Idempotent: a second prepare changes nothing.
    netns.prepare(net)
    assert sorted(str(x["ifname"]) for x in ip_json(net, "link")) == ["eth0", "lo"]
    assert len(ip_json(net, "-4", "route")) == 2


def test_release_leaves_nothing(nets: list[Network], tmp_path: Path, uniq: str) -> None:
    net = make_net(tmp_path, uniq, "b")
    nets.append(net)
    netns.prepare(net)
    assert net.veth_host in host_links()
    netns.release(net)
    assert not Path(net.netns_path).exists()
    assert net.veth_host not in host_links()
    assert net.veth_host not in {str(x["ifname"]) for x in ip_json(None, "link")}
    assert net.netns_path not in Path("/proc/self/mountinfo").read_text()
    assert not netns.exists(net)
    netns.release(net)  # idempotent
    with pytest.raises(NotFound):
        netns.open_netns(net)


def test_release_when_something_still_pins_the_namespace(nets: list[Network],
                                                         tmp_path: Path, uniq: str) -> None:
    net = make_net(tmp_path, uniq, "c")
    nets.append(net)
    netns.prepare(net)
    pin = subprocess.Popen(["nsenter", f"--net={net.netns_path}", "sleep", "120"])
    try:
        # Wait until the process is inside (its netns differs from ours).
        deadline = time.monotonic() + 60
        while os.readlink(f"/proc/{pin.pid}/ns/net") == os.readlink("/proc/self/ns/net"):
            assert time.monotonic() < deadline, "nsenter never entered the namespace"
            time.sleep(0.01)
        netns.release(net)
        assert not Path(net.netns_path).exists()
        assert net.veth_host not in host_links()  # deleted by hand: the ns was pinned
    finally:
        pin.kill()
        pin.wait()


def test_open_netns_gives_a_setns_fd(nets: list[Network], tmp_path: Path, uniq: str) -> None:
    net = make_net(tmp_path, uniq, "d")
    nets.append(net)
    netns.prepare(net)
    fd = netns.open_netns(net)
    seen: list[list[str]] = []

    def body() -> None:
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            kernel.setns(fd, kernel.CLONE_NEWNET)
            # if_nameindex asks the kernel through a socket made in this thread's netns.
            seen.append(sorted(n for _, n in socket.if_nameindex()))
        finally:
            kernel.setns(own, kernel.CLONE_NEWNET)
            os.close(own)

    try:
        th = threading.Thread(target=body)
        th.start()
        th.join()
    finally:
        os.close(fd)
    assert seen[0] == ["eth0", "lo"]


def test_conflicting_veth_is_refused(nets: list[Network], tmp_path: Path, uniq: str) -> None:
    first = make_net(tmp_path, uniq, "e")
    nets.append(first)
    netns.prepare(first)
    # Same host-side name, another namespace: refused, and nothing of it is left.
    other = Network(netns_path=str(tmp_path / "netns" / "other"), veth_host=first.veth_host,
                    address=first.address, gateway=first.gateway)
    nets.append(other)
    with pytest.raises(Conflict, match=first.veth_host):
        netns.prepare(other)
    assert not Path(other.netns_path).exists()
    # The first one is untouched and still works (positive control).
    r = inside(first, "ping", "-c", "1", "-W", "10", first.gateway.split("/")[0])
    assert r.returncode == 0, r.stdout + r.stderr
    # A namespace whose eth0 is not paired with our veth name is refused too.
    third = make_net(tmp_path, uniq, "f")
    nets.append(third)
    netns.prepare(third)
    swapped = Network(netns_path=third.netns_path, veth_host=first.veth_host,
                      address=third.address, gateway=third.gateway)
    with pytest.raises(Conflict):
        netns.prepare(swapped)
    assert netns.exists(third)
    assert netns.exists(first)


def test_prepare_recovers_a_stale_file(nets: list[Network], tmp_path: Path,
                                       uniq: str) -> None:
    """After a crash the netns file may be a plain empty file: prepare mounts over it."""
    net = make_net(tmp_path, uniq, "g")
    nets.append(net)
    Path(net.netns_path).parent.mkdir(parents=True, exist_ok=True)
    Path(net.netns_path).touch()
    assert not netns.exists(net)
    netns.prepare(net)
    assert netns.exists(net)
    r = inside(net, "ping", "-c", "1", "-W", "10", net.gateway.split("/")[0])
    assert r.returncode == 0, r.stdout + r.stderr


def test_kernel_answers_are_decoded_into_links_and_errors(nets: list[Network], tmp_path: Path,
                                                         uniq: str) -> None:
    """The real kernel's answers through pyroute2's decoder, in the sandbox's namespace:
    a link with its veth peer, a missing name, and refusals as KernelError with errno."""
    net = make_net(tmp_path, uniq, "h")
    nets.append(net)
    netns.prepare(net)
    host_index = socket.if_nametoindex(net.veth_host)

    def probe() -> tuple[netns.Link | None, netns.Link | None, list[int], KernelError]:
        with netns._Netns(net.netns_path, create=False), netns._Rtnl() as nl:
            eth0 = nl.get_link("eth0")
            missing = nl.get_link("nosuch0")
            # 2**31-1: no such interface; the address already exists (EEXIST)
            assert eth0 is not None
            errs = nl.batch([netns._link_up(2**31 - 1),
                             netns._addr_add(eth0.index, ipaddress.ip_interface(net.address))])
            with pytest.raises(KernelError) as caught:
                netns._check("configure", errs[:1])
            return eth0, missing, errs, caught.value

    eth0, missing, errs, error = netns._in_thread(probe)
    assert eth0 is not None
    assert eth0.peer == host_index
    assert missing is None
    assert errs == [errno.ENODEV, errno.EEXIST]
    assert error.errno == errno.ENODEV
    assert "No such device" in str(error)
