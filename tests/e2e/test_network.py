"""Egress policy through the real daemon: an agent reaches exactly what its
template allows. The "outside world" is a network namespace this test builds
(tests/integration/networld.py), addresses from 198.18.0.0/15 only."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Daemon
from tests.integration import networld

pytestmark = pytest.mark.root

PROBE = ("import socket,sys\n"
         "try:\n"
         "    s=socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=4)\n"
         "    s.sendall(b'ping\\n'); print('OPEN', s.recv(20))\n"
         "except OSError as e: print('FAIL', e); sys.exit(3)\n")


@pytest.fixture
def world(uniq: str, tmp_path: Path) -> Iterator[networld.World]:
    with networld.world(uniq, tmp_path) as w:
        # The world is not behind the host's default route (the uplink the daemon
        # opens for replies), so let replies come back on the test's own veth.
        Path(f"/proc/sys/net/ipv4/conf/{w.veth}/forwarding").write_text("1")
        yield w


@pytest.fixture
def netd(daemon_factory: Any, world: networld.World) -> Daemon:
    d: Daemon = daemon_factory("net", extra=f"upstream_dns: [\"{world.w1}\"]\n")
    tdir = Path(d.config_path).parent / "templates"
    (tdir / "netpol.yaml").write_text(
        "name: netpol\n"
        "description: egress test\n"
        "extends: default\n"
        "network:\n"
        "  egress: deny\n"
        f"  allow: [\"ok.corral.test:80\", \"{world.w3}:7\"]\n")
    return d


def _tcp(d: Daemon, agent: str, host: str, port: int) -> bool:
    cp = d.cli("exec", agent, "--", "python3", "-c", PROBE, host, str(port), timeout=60)
    return cp.returncode == 0 and "OPEN" in cp.stdout


def test_egress_allow_lists(netd: Daemon, world: networld.World, project: Path,
                            uniq: str) -> None:
    d = netd
    d.create("n1", "--template", "netpol", "--project", str(project))
    info = d.wait_state("n1", ("running",))
    gw = info["gateway"]
    # the resolver answers allowed names (through resolv.conf and explicitly)
    cp = d.cli("exec", "n1", "--", "getent", "hosts", "ok.corral.test")
    assert cp.returncode == 0, cp.stderr
    assert world.w1 in cp.stdout
    # allowed name:port works (positive control) ...
    body = d.cli("exec", "n1", "--", "curl", "-s", "-m", "5", "http://ok.corral.test/")
    assert body.returncode == 0, body.stderr
    # ... other ports of the same address do not
    assert not _tcp(d, "n1", world.w1, 9000)
    # allowed address:port works, its other ports do not
    assert _tcp(d, "n1", world.w3, 7)
    assert not _tcp(d, "n1", world.w3, 9000)
    # a disallowed address behind an allowed name (forged Host / --resolve) fails
    cp = d.cli("exec", "n1", "--", "curl", "-s", "-m", "5", "--resolve",
               f"ok.corral.test:80:{world.w2}", "http://ok.corral.test/")
    assert cp.returncode != 0
    # unallowed names do not resolve and never reach the world's DNS server
    secret = f"{uniq}deadbeef"
    cp = d.cli("exec", "n1", "--", "dig", "+short", "+tries=1", "+time=3", f"@{gw}",
               f"{secret}.tunnel.corral.test")
    assert world.w1 not in cp.stdout.split()
    cp = d.cli("exec", "n1", "--", "getent", "hosts", "other.corral.test")
    assert cp.returncode != 0
    # direct DNS to the world's server is dropped
    cp = d.cli("exec", "n1", "--", "dig", "+short", "+tries=1", "+time=2", f"@{world.w1}",
               f"{secret}.direct.corral.test")
    assert "no servers could be reached" in cp.stdout
    assert not any(secret in q for q in world.queries()), world.queries()
    assert any("ok.corral.test" in q for q in world.queries())
    # the host is protected: the daemon's SSH port through the gateway is closed
    assert not _tcp(d, "n1", gw, d.ssh_port)
    assert not _tcp(d, "n1", world.host_ip, d.ssh_port)
    # drops are counted and shown by inspect
    net = d.json("inspect", "n1")["network"]
    assert net["counters"]["denied_packets"] > 0


def test_agents_cannot_reach_each_other(netd: Daemon, project: Path) -> None:
    d = netd
    d.create("n2", "--template", "netpol", "--project", str(project))
    d.create("n3", "--template", "netpol", "--project", str(project))
    d.wait_state("n2", ("running",))
    i3 = d.wait_state("n3", ("running",))
    d.cli("exec", "n3", "--", "sh", "-c",
          "nohup python3 -m http.server 8000 >/dev/null 2>&1 &", check=True)
    # positive control: n3's server answers inside n3
    ok = False
    for _ in range(50):
        if _tcp(d, "n3", "127.0.0.1", 8000):
            ok = True
            break
    assert ok
    assert not _tcp(d, "n2", i3["ip"], 8000)


def test_no_ipv6_inside_by_default(netd: Daemon, project: Path) -> None:
    d = netd
    d.create("n4", "--template", "netpol", "--project", str(project))
    d.wait_state("n4", ("running",))
    out = d.cli("exec", "n4", "--", "sh", "-c", "cat /proc/net/if_inet6 2>/dev/null; true",
                check=True).stdout
    assert "eth0" not in out


def test_reload_changes_allow_list_live(netd: Daemon, world: networld.World,
                                        project: Path) -> None:
    d = netd
    d.create("n5", "--template", "netpol", "--project", str(project))
    before = d.wait_state("n5", ("running",))
    assert _tcp(d, "n5", world.w3, 7)
    assert not _tcp(d, "n5", world.w3, 9000)
    tfile = Path(d.config_path).parent / "templates" / "netpol.yaml"
    tfile.write_text(tfile.read_text().replace(f"{world.w3}:7", f"{world.w3}:9000"))
    d.cli("reload", "n5", check=True)
    assert _tcp(d, "n5", world.w3, 9000)
    assert not _tcp(d, "n5", world.w3, 7)
    after = d.json("inspect", "n5")
    assert after["session"]["pid"] == before["session"]["pid"]
    # restart re-reads the whole template: a new pids limit applies
    tfile.write_text(tfile.read_text() + "resources:\n  pids: 77\n")
    d.cli("restart", "n5", check=True)
    assert d.wait_state("n5", ("running",))["limits"]["pids"] == 77
    assert _tcp(d, "n5", world.w3, 9000)
