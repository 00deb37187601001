"""The daemon's network policy: nft rules plus the DNS resolver, per agent.

Glue between the agent lifecycle and the two mechanisms: `sandbox.nft` (the
default-deny rules on the host side of each veth) and `supervisor.egress` (the
resolver that turns domain allow-lists into addresses). The nft table outlives
the daemon on purpose: while the daemon is down or restarting, running agents
stay exactly as confined as before (only new DNS answers wait for it).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sandbox import nft
from sandbox.errors import CorralError
from sandbox.spec import SandboxSpec
from supervisor.config import Config
from supervisor.egress import Resolver
from supervisor.templates import Template

if TYPE_CHECKING:
    from supervisor.agents import Manager

log = logging.getLogger(__name__)


def upstream_servers(configured: tuple[str, ...],
                     resolv_conf: str = "/etc/resolv.conf") -> list[tuple[str, int]]:
    """The recursive servers the resolver asks: the config's, else resolv.conf's."""
    out: list[tuple[str, int]] = []
    for item in configured:
        host, _, port = item.rpartition(":") if item.count(":") == 1 else (item, "", "")
        out.append((host or item, int(port) if port else 53))
    if out:
        return out
    with contextlib.suppress(OSError):
        for line in Path(resolv_conf).read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver":
                with contextlib.suppress(ValueError):
                    ipaddress.ip_address(parts[1])
                    out.append((parts[1], 53))
    return out or [("127.0.0.1", 53)]


class NetPolicy:
    def __init__(self, config: Config, scope: str, mgr: Manager) -> None:
        self.config = config
        self.scope = scope
        self.mgr = mgr
        self.resolver: Resolver | None = None
        self.existing: dict[str, str] = {}

    async def start(self) -> None:
        uplinks: list[str] = []
        try:
            uplinks = await asyncio.to_thread(nft.default_uplinks)
        except CorralError as e:
            log.warning("no default route found (%s): agents get no egress at all", e)
        await asyncio.to_thread(nft.ensure_table, self.scope, uplinks)
        # What the table already holds (agents that ran through a daemon
        # restart): re-adopting them needs the resolver, not a rule reload.
        self.existing = await asyncio.to_thread(nft.agents, self.scope)
        self.resolver = Resolver(
            self.scope, upstream_servers(self.config.upstream_dns),
            str(self.config.network.subnet), on_event=self._on_event)

    def _on_event(self, kind: str, agent: str, data: dict[str, Any]) -> None:
        self.mgr.emit(kind, agent, **data)

    @staticmethod
    def _entries(tpl: Template) -> tuple[list[nft.AllowEntry], bool]:
        entries = nft.parse_allow([str(e) for e in tpl.network.allow])
        return entries, tpl.network.egress == "allow"

    async def add_agent(self, name: str, spec: SandboxSpec, tpl: Template) -> None:
        """Rules first (atomically replacing any old ones), then the resolver."""
        net = spec.network
        if net is None:
            return
        entries, allow_all = self._entries(tpl)
        await asyncio.to_thread(nft.apply_network, self.scope, name, net, entries, allow_all)
        if self.resolver is not None:
            await self.resolver.add_agent(name, net.gateway, entries, ipv6=net.ipv6,
                                          allow_all=allow_all, veth=net.veth_host)

    async def adopt_agent(self, name: str, spec: SandboxSpec, tpl: Template) -> None:
        """After a daemon restart: keep the rules the table still has for this
        agent (they never stopped applying), restart its resolver."""
        net = spec.network
        if net is None:
            return
        if self.existing.get(name) != net.veth_host:
            await self.add_agent(name, spec, tpl)
            return
        entries, allow_all = self._entries(tpl)
        if self.resolver is not None:
            await self.resolver.add_agent(name, net.gateway, entries, ipv6=net.ipv6,
                                          allow_all=allow_all, veth=net.veth_host)

    async def reload(self, name: str, tpl: Template, spec: SandboxSpec) -> None:
        """A new allow-list for a running agent, without recreating it."""
        net = spec.network
        if net is None:
            return
        entries, allow_all = self._entries(tpl)
        await asyncio.to_thread(nft.apply_network, self.scope, name, net, entries, allow_all)
        if self.resolver is not None and name in self.resolver.agents:
            await self.resolver.update_agent(name, entries, ipv6=net.ipv6, allow_all=allow_all)

    async def remove_agent(self, name: str, spec: SandboxSpec) -> None:
        if self.resolver is not None:
            await self.resolver.remove_agent(name)
        await asyncio.to_thread(nft.remove_agent, self.scope, name)

    def describe(self, name: str) -> dict[str, Any]:
        out: dict[str, Any] = {"counters": nft.counters(self.scope, name),
                               "denied": [asdict(d) for d in nft.recent_denied(self.scope, name)
                                          ][:20]}
        if self.resolver is not None and name in self.resolver.agents:
            out["dns"] = self.resolver.stats(name)
        return out

    async def close(self) -> None:
        # The table stays: running agents remain confined while we are away.
        if self.resolver is not None:
            await self.resolver.close()
