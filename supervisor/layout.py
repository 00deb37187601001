"""Where one agent's things live on the host, derived from the daemon config.

Every path and name here is derived from a name that already matched
NAME_RE, so nothing an agent's creator types reaches a path unchecked.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
from dataclasses import dataclass

from sandbox import netns
from sandbox.spec import check_name


def scope_of(state_dir: str) -> str:
    """A short id for one daemon (its state_dir), so two daemons never collide
    in veth names, nft tables, cgroups or netns files."""
    return hashlib.sha256(os.path.realpath(state_dir).encode()).hexdigest()[:6]


@dataclass(frozen=True)
class AgentPaths:
    name: str
    state: str  # state_dir/agents/NAME
    run: str  # run_dir/agents/NAME

    @property
    def upper(self) -> str:
        return f"{self.state}/upper"

    @property
    def work(self) -> str:
        return f"{self.state}/work"

    @property
    def home(self) -> str:
        return f"{self.state}/home"

    @property
    def session_log(self) -> str:
        return f"{self.state}/session.log"

    @property
    def exit_file(self) -> str:
        return f"{self.state}/exit.json"

    @property
    def spec_file(self) -> str:
        return f"{self.state}/spec.json"

    @property
    def keeper_err(self) -> str:
        return f"{self.state}/keeper.err"

    @property
    def services_dir(self) -> str:
        return f"{self.state}/services"

    @property
    def keeper_socket(self) -> str:
        return f"{self.run}/keeper.sock"


def agent_paths(state_dir: str, run_dir: str, name: str) -> AgentPaths:
    check_name(name, "agent name")
    return AgentPaths(name, f"{state_dir}/agents/{name}", f"{run_dir}/agents/{name}")


@dataclass(frozen=True)
class Addresses:
    gateway: str  # host side, with prefix
    agent: str  # inside, with prefix

    @property
    def agent_ip(self) -> str:
        return self.agent.split("/")[0]

    @property
    def gateway_ip(self) -> str:
        return self.gateway.split("/")[0]


def subnet_slots(subnet: str) -> int:
    """How many /30 agent networks the configured subnet holds."""
    net = ipaddress.ip_network(subnet, strict=False)
    return max(0, net.num_addresses // 4)


def addresses(subnet: str, index: int) -> Addresses:
    net = ipaddress.ip_network(subnet, strict=False)
    base = int(net.network_address) + 4 * index
    if base + 3 > int(net.broadcast_address):
        raise ValueError(f"agent network #{index} lies outside {subnet}")
    gw = ipaddress.ip_address(base + 1)
    ag = ipaddress.ip_address(base + 2)
    return Addresses(f"{gw}/30", f"{ag}/30")


def veth(scope: str, name: str) -> str:
    return netns.veth_name(scope, name)
