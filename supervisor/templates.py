"""Templates: YAML files → validated, frozen `Template` objects (CONTRACT.md "Templates").

The pipeline, in order:

1. ``safeyaml.parse`` turns a file into a Raw tree that remembers FILE:LINE of
   every node (safe loader only, size/depth/alias caps, duplicate keys refused);
2. ``extends`` is resolved by *name* among the registry's directories (the
   parent is itself resolved first; cycles are refused), and the child is
   deep-merged on top: mappings merge, lists and scalars replace;
3. ``--set KEY=VALUE`` overrides are applied to the merged Raw tree, each value
   parsed as a YAML scalar/flow and located at ``--set KEY``;
4. `_Validator` walks the tree once and builds the dataclasses, refusing
   unknown keys (with a "did you mean"), wrong types and out-of-range values.

Every error is a TemplateError whose text is ``LOCATION: key.path: reason``,
where LOCATION is ``FILE:LINE`` or ``--set key.path``. Nothing here has side
effects, so an invalid template can never create anything.
"""

from __future__ import annotations

import builtins
import copy
import difflib
import hashlib
import ipaddress
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

from sandbox.errors import CorralError, NotFound, TemplateError
from sandbox.spec import NAME_RE, FsRule, Limits, check_abs_path
from supervisor import safeyaml
from supervisor.safeyaml import Raw, RawMap, RawScalar, RawSeq, YamlError
from supervisor.units import format_duration, parse_duration, parse_size

log = logging.getLogger(__name__)

RestartPolicy = Literal["on-failure", "always", "never"]
Egress = Literal["deny", "allow"]
AllowKind = Literal["ip", "cidr", "domain", "wildcard"]

#: Environment variable names (also secret names).
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_LABEL_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")

MAX_EXTENDS_DEPTH = 10
MAX_RULES = 256
MAX_ALLOW = 1024
MAX_SERVICES = 32
MAX_ARGS = 1024
MAX_ARG_LEN = 64 * 1024
MIN_MEMORY = 1 << 20  # below a MiB nothing (not even bash) starts
MAX_MEMORY = 1 << 50
MAX_PIDS = 4_194_304  # the kernel's PID_MAX_LIMIT
MAX_DURATION = 3600.0
#: Host paths no rule may bind (nor a parent of): the store, keys, sockets. The
#: daemon adds its configured state_dir and run_dir (TemplateRegistry(protected=)).
PROTECTED_SOURCES = ("/var/lib/corral", "/run/corral")
# Paths whose content the sandbox builds itself; a rule or workspace there
# would shadow /proc, /sys or /dev and undo their hardening.
_RESERVED_PREFIXES = ("/proc", "/sys", "/dev")


# ---------------------------------------------------------------------------
# The typed template


@dataclass(frozen=True)
class AgentConfig:
    """The agent's session: the AI assistant's command, or a shell, on the PTY."""

    command: tuple[str, ...] = ("bash", "-l")  # argv of the session; PATH-resolved inside
    env: tuple[tuple[str, str], ...] = ()  # extra env for the session (after template env)


@dataclass(frozen=True)
class WorkspaceConfig:
    """How the project appears inside the sandbox."""

    mode: Literal["overlay", "bind", "none"] = "overlay"  # overlay: copy-on-write over project
    path: str = "/workspace"  # absolute path inside the sandbox


@dataclass(frozen=True)
class Resources:
    """cgroup limits; None means unlimited."""

    memory: int | None = None  # hard memory limit in bytes
    swap: int = 0  # swap allowed on top of memory, bytes; 0 unless set
    cpus: float | None = None  # CPU bandwidth in cores (1.5 = one and a half CPUs)
    pids: int | None = None  # maximum number of tasks (processes + threads)

    def to_limits(self) -> Limits:
        """The sandbox spec's view of these limits."""
        return Limits(
            memory_bytes=self.memory, swap_bytes=self.swap, cpus=self.cpus, pids=self.pids
        )


@dataclass(frozen=True)
class AllowEntry:
    """One egress allow-list entry: an address, a network, a host name or *.suffix."""

    kind: AllowKind  # ip | cidr | domain | wildcard
    value: str  # "198.18.0.10", "10.0.0.0/8", "pypi.org", or the suffix "example.com" of *.
    port: int | None = None  # None: any port

    def __str__(self) -> str:
        host = f"*.{self.value}" if self.kind == "wildcard" else self.value
        if self.port is None:
            return host
        if ":" in host:  # IPv6 address or network: bracket it so the port is unambiguous
            return f"[{host}]:{self.port}"
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class NetworkPolicy:
    """Egress policy, enforced on the host side of the agent's veth."""

    egress: Egress = "deny"  # deny: only `allow` entries (and the daemon's DNS) are reachable
    allow: tuple[AllowEntry, ...] = ()  # destinations reachable when egress is deny
    ipv6: bool = False  # give the agent an IPv6 address too


@dataclass(frozen=True)
class Health:
    """How a service's health is checked; exactly one of http, tcp, command is set."""

    http: str | None = None  # GET this path on the service's port; 2xx/3xx = healthy
    tcp: int | None = None  # a TCP connect to this port inside the sandbox succeeds
    command: tuple[str, ...] | None = None  # run inside the sandbox; exit 0 = healthy
    interval: float = 2.0  # seconds between checks
    timeout: float = 1.0  # seconds one check may take
    retries: int = 3  # consecutive failures before the service is unhealthy
    start_period: float = 0.0  # seconds after start during which failures do not count

    @property
    def kind(self) -> str:
        return "http" if self.http is not None else "tcp" if self.tcp is not None else "command"


@dataclass(frozen=True)
class Service:
    """A long-running process started with the agent (dev server, database, ...)."""

    name: str  # NAME_RE; CORRAL_PORT_<NAME> (upper-cased, '-' → '_') carries its host port
    command: tuple[str, ...]  # argv, run inside the sandbox
    port: int | None = None  # port inside; a host port is leased and published
    health: Health | None = None  # None: running = healthy
    restart: RestartPolicy = "on-failure"  # on-failure | always | never
    depends_on: tuple[str, ...] = ()  # services that must be healthy before this starts
    setup: tuple[str, ...] | None = None  # run once per workspace before the first start
    env: tuple[tuple[str, str], ...] = ()  # extra env for this service only

    @property
    def port_env(self) -> str:
        """The environment variable naming this service's host port."""
        return "CORRAL_PORT_" + self.name.upper().replace("-", "_")


@dataclass(frozen=True)
class Secret:
    """A secret exposed to the sandbox as an environment variable, read from a host file."""

    name: str  # environment variable name
    file: str  # absolute host path, read by the daemon at start


@dataclass(frozen=True)
class Template:
    """A resolved, validated template (extends merged, overrides applied)."""

    name: str  # NAME_RE, like agent names
    description: str = ""  # one line for `template list`
    extends: str | None = None  # the parent's name (already merged in; informational)
    agent: AgentConfig = field(default_factory=AgentConfig)
    workspace: WorkspaceConfig = field(default_factory=WorkspaceConfig)
    resources: Resources = field(default_factory=Resources)
    filesystem: tuple[FsRule, ...] = ()  # extra paths, in order; one rule per path (last wins)
    network: NetworkPolicy = field(default_factory=NetworkPolicy)
    services: tuple[Service, ...] = ()  # in file order; see start_order()
    env: tuple[tuple[str, str], ...] = ()  # env for the session and every service
    secrets: tuple[Secret, ...] = ()
    source: str | None = None  # file the template was read from (None: stored/constructed)

    def service(self, name: str) -> Service:
        for s in self.services:
            if s.name == name:
                return s
        raise NotFound(f"template {self.name!r} has no service {name!r}")

    def start_order(self) -> list[Service]:
        """Services ordered so that each comes after everything it depends on."""
        by_name = {s.name: s for s in self.services}
        done: dict[str, Service] = {}

        def visit(s: Service) -> None:
            if s.name in done:
                return
            for dep in s.depends_on:
                visit(by_name[dep])
            done[s.name] = s

        for s in self.services:
            visit(s)
        return list(done.values())


# ---------------------------------------------------------------------------
# Parsing helpers


def parse_allow_entry(text: str) -> AllowEntry:
    """Parse "host[:port]", "IP[:port]", "[IPv6]:port", "CIDR[:port]" or "*.suffix[:port]".

    Stricter than the enforcement layer's parser (sandbox.nft), and checked
    against it too: a template that validates can always be enforced.
    """
    entry = _parse_allow_entry(text)
    from sandbox import nft

    try:
        nft.parse_allow_entry(text)
    except CorralError as exc:
        raise ValueError(str(exc)) from None
    return entry


def _parse_allow_entry(text: str) -> AllowEntry:
    if not isinstance(text, str) or not text or text != text.strip():
        raise ValueError(f"expected host[:port], IP/CIDR[:port] or *.suffix[:port], got {text!r}")
    host, port = text, None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"{text!r}: missing ']'")
        host, rest = text[1:end], text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"{text!r}: expected ':PORT' after ']'")
            port = _parse_port_text(rest[1:], text)
    elif text.count(":") == 1:
        host, p = text.split(":")
        port = _parse_port_text(p, text)
    # More than one ':' without brackets: a bare IPv6 address/network, no port.
    if "/" in host:
        try:
            net = ipaddress.ip_network(host, strict=False)
        except ValueError:
            raise ValueError(f"{text!r}: {host!r} is not a valid network") from None
        return AllowEntry("cidr", str(net), port)
    try:
        return AllowEntry("ip", str(ipaddress.ip_address(host)), port)
    except ValueError:
        pass
    kind: AllowKind = "domain"
    name = host.lower()
    if name.startswith("*."):
        kind, name = "wildcard", name[2:]
    labels = name.split(".")
    if (
        not name
        or len(name) > 253
        or not all(_LABEL_RE.fullmatch(lab) for lab in labels)
        or labels[-1].isdigit()
    ):
        raise ValueError(f"{text!r}: {host!r} is not an IP address, network or host name")
    return AllowEntry(kind, name, port)


def _parse_port_text(p: str, whole: str) -> int:
    if not p.isdigit() or not 1 <= int(p) <= 65535:
        raise ValueError(f"{whole!r}: port must be 1-65535")
    return int(p)


# ---------------------------------------------------------------------------
# Validation: Raw tree → Template

T = TypeVar("T")


def _fail(raw: Raw, path: str, reason: str) -> TemplateError:
    return TemplateError(f"{raw.loc}: {path}: {reason}" if path else f"{raw.loc}: {reason}")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _present(m: RawMap, key: str) -> Raw | None:
    """The value of `key`, treating an explicit null like an absent key (null = default)."""
    v = m.items.get(key)
    if isinstance(v, RawScalar) and v.value is None:
        return None
    return v


class _Validator:
    """One pass over a Raw tree; every method names the key path it checks."""

    def __init__(self, check_host: bool, protected: Sequence[str] = ()) -> None:
        # Host checks (symlinked sources, host CPU count) run when a template
        # is read from a file, not when a stored copy is read back.
        self.check_host = check_host
        self.protected = tuple(os.path.normpath(p) for p in (*PROTECTED_SOURCES, *protected))

    # -- generic shapes ----------------------------------------------------

    def mapping(self, raw: Raw, path: str, allowed: Sequence[str]) -> RawMap:
        if not isinstance(raw, RawMap):
            raise _fail(raw, path, f"must be a mapping, got {_shown(raw)}")
        for key in raw.items:
            if key not in allowed:
                near = difflib.get_close_matches(key, allowed, n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                choices = ", ".join(allowed)
                raise _fail(
                    raw.items[key], _join(path, key), f"unknown key{hint}; known keys: {choices}"
                )
        return raw

    def str_(self, raw: Raw, path: str, *, max_len: int = 4096) -> str:
        if not isinstance(raw, RawScalar) or not isinstance(raw.value, str):
            raise _fail(raw, path, f"must be a string, got {_shown(raw)}")
        if "\0" in raw.value:
            raise _fail(raw, path, "must not contain NUL")
        if len(raw.value) > max_len:
            raise _fail(raw, path, f"is longer than {max_len} characters")
        return raw.value

    def int_(self, raw: Raw, path: str, lo: int, hi: int) -> int:
        v = raw.value if isinstance(raw, RawScalar) else None
        if isinstance(v, str) and v.strip().isdigit():
            v = int(v)  # "8000" from --set or quoted YAML is fine
        if not isinstance(v, int) or isinstance(v, bool):
            raise _fail(raw, path, f"must be an integer {lo}-{hi}, got {_shown(raw)}")
        if not lo <= v <= hi:
            raise _fail(raw, path, f"must be {lo}-{hi}, got {v}")
        return v

    def bool_(self, raw: Raw, path: str) -> bool:
        if not isinstance(raw, RawScalar) or not isinstance(raw.value, bool):
            raise _fail(raw, path, f"must be true or false, got {_shown(raw)}")
        return raw.value

    def choice(self, raw: Raw, path: str, choices: Sequence[str]) -> str:
        if not isinstance(raw, RawScalar) or raw.value not in choices:
            extra = ""
            if isinstance(raw, RawScalar) and isinstance(raw.value, bool):
                extra = " (YAML reads yes/no/on/off as booleans: quote the value)"
            raise _fail(
                raw, path, f"must be one of {' | '.join(choices)}, got {_shown(raw)}{extra}"
            )
        return str(raw.value)

    def argv(self, raw: Raw, path: str) -> tuple[str, ...]:
        if not isinstance(raw, RawSeq):
            raise _fail(
                raw, path, f'must be a list of strings like ["bash", "-l"], got {_shown(raw)}'
            )
        if not raw.items:
            raise _fail(raw, path, "must not be empty")
        if len(raw.items) > MAX_ARGS:
            raise _fail(raw, path, f"has more than {MAX_ARGS} arguments")
        args = []
        for i, item in enumerate(raw.items):
            if (
                isinstance(item, RawScalar)
                and isinstance(item.value, int | float)
                and not isinstance(item.value, bool)
            ):
                args.append(str(item.value))  # ["http.server", 8000] is meant as text
                continue
            args.append(self.str_(item, f"{path}[{i}]", max_len=MAX_ARG_LEN))
        if not args[0]:
            raise _fail(raw, path, "the program name must not be empty")
        return tuple(args)

    def env(self, raw: Raw, path: str) -> tuple[tuple[str, str], ...]:
        if not isinstance(raw, RawMap):
            raise _fail(raw, path, f"must be a mapping of NAME: value, got {_shown(raw)}")
        out = []
        for key, val in raw.items.items():
            kpath = _join(path, key)
            self.env_name(val, kpath, key)
            if (
                isinstance(val, RawScalar)
                and isinstance(val.value, int | float)
                and not isinstance(val.value, bool)
            ):
                out.append((key, str(val.value)))
                continue
            if isinstance(val, RawScalar) and isinstance(val.value, bool | None):
                raise _fail(val, kpath, f"must be a string, got {_shown(val)} (quote it)")
            out.append((key, self.str_(val, kpath, max_len=MAX_ARG_LEN)))
        return tuple(out)

    def env_name(self, raw: Raw, path: str, name: str) -> None:
        if not ENV_NAME_RE.fullmatch(name):
            raise _fail(raw, path, "is not a valid environment variable name")
        # The daemon sets CORRAL_AGENT and CORRAL_PORT_*; a template must not spoof them.
        if name.upper().startswith("CORRAL_"):
            raise _fail(raw, path, "CORRAL_* variables are set by corral and cannot be overridden")

    def abs_path(self, raw: Raw, path: str, *, reserved_ok: bool = False) -> str:
        text = self.str_(raw, path)
        try:
            check_abs_path(text, "")
        except CorralError as e:
            raise _fail(raw, path, str(e).strip()) from None
        norm = os.path.normpath(text)
        if not reserved_ok and any(
            norm == p or norm.startswith(p + "/") for p in _RESERVED_PREFIXES
        ):
            raise _fail(raw, path, f"{text!r} is inside /proc, /sys or /dev, which corral builds")
        return norm

    def size(self, raw: Raw, path: str, lo: int, hi: int) -> int:
        v = raw.value if isinstance(raw, RawScalar) else None
        try:
            n = parse_size(v)  # type: ignore[arg-type]
        except ValueError as e:
            raise _fail(raw, path, str(e)) from None
        if not lo <= n <= hi:
            raise _fail(raw, path, f"must be between {lo} and {hi} bytes, got {n}")
        return n

    def duration(self, raw: Raw, path: str, lo: float, hi: float) -> float:
        v = raw.value if isinstance(raw, RawScalar) else None
        try:
            d = parse_duration(v)  # type: ignore[arg-type]
        except ValueError as e:
            raise _fail(raw, path, str(e)) from None
        if not lo <= d <= hi:
            raise _fail(
                raw, path, f"must be between {format_duration(lo)} and {format_duration(hi)}"
            )
        return d

    def opt(self, m: RawMap, key: str, path: str, fn: Callable[[Raw, str], T], default: T) -> T:
        v = _present(m, key)
        return default if v is None else fn(v, _join(path, key))

    # -- sections -----------------------------------------------------------

    def template(self, raw: Raw, source: str | None) -> Template:
        top = self.mapping(
            raw,
            "",
            (
                "name", "description", "extends", "agent", "workspace", "resources",
                "filesystem", "network", "services", "env", "secrets",
            ),
        )  # fmt: skip
        name_raw = _present(top, "name")
        if name_raw is None:
            raise _fail(top, "name", "is required")
        name = self.str_(name_raw, "name")
        if not NAME_RE.fullmatch(name):
            raise _fail(
                name_raw, "name", f"{name!r} must match {NAME_RE.pattern} (like agent names)"
            )
        extends = self.opt(top, "extends", "", self.template_name, None)
        workspace = self.opt(top, "workspace", "", self.workspace, WorkspaceConfig())
        fs_raw = _present(top, "filesystem")
        rules = self.filesystem(fs_raw, "filesystem", workspace) if fs_raw is not None else ()
        return Template(
            name=name,
            description=self.opt(top, "description", "", self.str_, ""),
            extends=extends,
            agent=self.opt(top, "agent", "", self.agent, AgentConfig()),
            workspace=workspace,
            resources=self.opt(top, "resources", "", self.resources, Resources()),
            filesystem=rules,
            network=self.opt(top, "network", "", self.network, NetworkPolicy()),
            services=self.opt(top, "services", "", self.services, ()),
            env=self.opt(top, "env", "", self.env, ()),
            secrets=self.opt(top, "secrets", "", self.secrets, ()),
            source=source,
        )

    def template_name(self, raw: Raw, path: str) -> str:
        name = self.str_(raw, path)
        if not NAME_RE.fullmatch(name):
            raise _fail(raw, path, f"{name!r} is not a template name")
        return name

    def agent(self, raw: Raw, path: str) -> AgentConfig:
        m = self.mapping(raw, path, ("command", "env"))
        return AgentConfig(
            command=self.opt(m, "command", path, self.argv, AgentConfig.command),
            env=self.opt(m, "env", path, self.env, ()),
        )

    def workspace(self, raw: Raw, path: str) -> WorkspaceConfig:
        m = self.mapping(raw, path, ("mode", "path"))
        mode = self.opt(
            m, "mode", path, lambda r, p: self.choice(r, p, ("overlay", "bind", "none")), "overlay"
        )
        inside = self.opt(m, "path", path, self.abs_path, "/workspace")
        if inside == "/":
            raise _fail(m.items["path"], _join(path, "path"), "must not be '/'")
        return WorkspaceConfig(mode=mode, path=inside)  # type: ignore[arg-type]

    def resources(self, raw: Raw, path: str) -> Resources:
        m = self.mapping(raw, path, ("memory", "cpus", "pids", "swap"))
        return Resources(
            memory=self.opt(
                m, "memory", path, lambda r, p: self.size(r, p, MIN_MEMORY, MAX_MEMORY), None
            ),
            swap=self.opt(m, "swap", path, lambda r, p: self.size(r, p, 0, MAX_MEMORY), 0),
            cpus=self.opt(m, "cpus", path, self.cpus, None),
            pids=self.opt(m, "pids", path, lambda r, p: self.int_(r, p, 1, MAX_PIDS), None),
        )

    def cpus(self, raw: Raw, path: str) -> float:
        v = raw.value if isinstance(raw, RawScalar) else None
        if isinstance(v, str):
            try:
                v = float(v)
            except ValueError:
                pass
        if not isinstance(v, int | float) or isinstance(v, bool) or v != v:
            raise _fail(raw, path, f"must be a number of CPUs like 1.5, got {_shown(raw)}")
        # cgroups can't enforce less than 1 ms of CPU per 100 ms period.
        if v < 0.01:
            raise _fail(raw, path, f"must be at least 0.01, got {v}")
        host = os.cpu_count() or 1
        limit = float(host) if self.check_host else 4096.0
        if v > limit:
            raise _fail(raw, path, f"must be at most {limit:g} (the host's CPUs), got {v}")
        return float(v)

    def filesystem(self, raw: Raw, path: str, ws: WorkspaceConfig) -> tuple[FsRule, ...]:
        if not isinstance(raw, RawSeq):
            raise _fail(raw, path, f"must be a list of {{path, source, mode}}, got {_shown(raw)}")
        if len(raw.items) > MAX_RULES:
            raise _fail(raw, path, f"has more than {MAX_RULES} rules")
        rules: dict[str, FsRule] = {}  # insertion-ordered; a later rule for a path replaces
        hidden: list[tuple[str, int]] = []
        for i, item in enumerate(raw.items):
            ipath = f"{path}[{i}]"
            m = self.mapping(item, ipath, ("path", "source", "mode"))
            p_raw = _present(m, "path")
            if p_raw is None:
                raise _fail(item, _join(ipath, "path"), "is required")
            inside = self.abs_path(p_raw, _join(ipath, "path"))
            if inside == "/":
                raise _fail(p_raw, _join(ipath, "path"), "must not be '/'")
            mode = self.opt(
                m, "mode", ipath, lambda r, p: self.choice(r, p, ("ro", "rw", "hidden")), "ro"
            )
            source = None
            s_raw = _present(m, "source")
            if s_raw is not None:
                if mode == "hidden":
                    raise _fail(s_raw, _join(ipath, "source"), "a hidden path takes no source")
                source = self.abs_path(s_raw, _join(ipath, "source"), reserved_ok=True)
            if mode != "hidden":
                self.not_protected(
                    source or inside, s_raw or p_raw, _join(ipath, "source" if s_raw else "path")
                )
            if self.check_host and mode != "hidden":
                self.no_symlink(
                    source or inside, s_raw or p_raw, _join(ipath, "source" if s_raw else "path")
                )
            # A rule on the workspace or above it would replace the project.
            if ws.mode != "none" and _within(inside, ws.path):
                raise _fail(
                    p_raw, _join(ipath, "path"),
                    f"{inside} would cover the workspace at {ws.path}; use a path inside it",
                )  # fmt: skip
            for h, j in hidden:
                if h != inside and _within(h, inside):
                    raise _fail(
                        p_raw, _join(ipath, "path"),
                        f"{inside} is inside the hidden path {h} of {path}[{j}]; "
                        "rules cannot re-expose part of a hidden path",
                    )  # fmt: skip
            if mode == "hidden":
                hidden.append((inside, i))
            rules.pop(inside, None)
            rules[inside] = FsRule(path=inside, mode=mode, source=source)  # type: ignore[arg-type]
        return tuple(rules.values())

    def not_protected(self, host_path: str, raw: Raw, path: str) -> None:
        """Refuse binding corral's own state or runtime dirs (or a parent of them) inside."""
        for p in self.protected:
            if _within(p, host_path) or _within(host_path, p):
                raise _fail(
                    raw, path, f"{host_path} would expose corral's own files ({p}) to the agent"
                )

    def no_symlink(self, host_path: str, raw: Raw, path: str) -> None:
        """Refuse a bind source that is (or goes through) a symlink: binds follow them."""
        if not os.path.lexists(host_path):
            return
        real = os.path.realpath(host_path)
        if real != host_path:
            raise _fail(
                raw, path,
                f"{host_path} is a symlink or goes through one (it resolves to {real}); "
                "name the real path",
            )  # fmt: skip

    def network(self, raw: Raw, path: str) -> NetworkPolicy:
        m = self.mapping(raw, path, ("egress", "allow", "ipv6"))
        return NetworkPolicy(
            egress=cast(
                Egress,
                self.opt(
                    m, "egress", path, lambda r, p: self.choice(r, p, ("deny", "allow")), "deny"
                ),
            ),
            allow=self.opt(m, "allow", path, self.allow, ()),
            ipv6=self.opt(m, "ipv6", path, self.bool_, False),
        )

    def allow(self, raw: Raw, path: str) -> tuple[AllowEntry, ...]:
        if not isinstance(raw, RawSeq):
            raise _fail(raw, path, f'must be a list like ["pypi.org:443"], got {_shown(raw)}')
        if len(raw.items) > MAX_ALLOW:
            raise _fail(raw, path, f"has more than {MAX_ALLOW} entries")
        out: list[AllowEntry] = []
        for i, item in enumerate(raw.items):
            text = self.str_(item, f"{path}[{i}]", max_len=300)
            try:
                entry = parse_allow_entry(text)
            except ValueError as e:
                raise _fail(item, f"{path}[{i}]", str(e)) from None
            if entry not in out:
                out.append(entry)
        return tuple(out)

    def services(self, raw: Raw, path: str) -> tuple[Service, ...]:
        if not isinstance(raw, RawMap):
            raise _fail(
                raw, path, f"must be a mapping of service name to service, got {_shown(raw)}"
            )
        if len(raw.items) > MAX_SERVICES:
            raise _fail(raw, path, f"has more than {MAX_SERVICES} services")
        out = []
        for name, item in raw.items.items():
            spath = _join(path, name)
            if not NAME_RE.fullmatch(name):
                raise _fail(item, spath, f"service name {name!r} must match {NAME_RE.pattern}")
            out.append(self.service(name, item, spath))
        names = {s.name for s in out}
        for s in out:
            for dep in s.depends_on:
                if dep not in names:
                    dep_raw = _get_path(raw, (s.name, "depends_on"))
                    raise _fail(
                        dep_raw, _join(path, f"{s.name}.depends_on"), f"no service named {dep!r}"
                    )
        self.no_cycles(raw, path, out)
        return tuple(out)

    def no_cycles(self, raw: RawMap, path: str, services: list[Service]) -> None:
        deps = {s.name: s.depends_on for s in services}
        state: dict[str, int] = {}  # 1 = on the stack, 2 = done

        def visit(n: str, chain: builtins.list[str]) -> None:
            if state.get(n) == 2:
                return
            if state.get(n) == 1:
                cycle = [*chain[chain.index(n) :], n]
                raise _fail(
                    _get_path(raw, (n, "depends_on")), _join(path, f"{n}.depends_on"),
                    f"dependency cycle: {' -> '.join(cycle)}",
                )  # fmt: skip
            state[n] = 1
            for d in deps[n]:
                visit(d, [*chain, n])
            state[n] = 2

        for s in services:
            visit(s.name, [])

    def service(self, name: str, raw: Raw, path: str) -> Service:
        m = self.mapping(
            raw, path, ("command", "port", "health", "restart", "depends_on", "setup", "env")
        )
        c_raw = _present(m, "command")
        if c_raw is None:
            raise _fail(raw, _join(path, "command"), "is required")
        port = self.opt(m, "port", path, lambda r, p: self.int_(r, p, 1, 65535), None)
        health = self.opt(m, "health", path, lambda r, p: self.health(r, p, port), None)
        restart = self.opt(
            m,
            "restart",
            path,
            lambda r, p: self.choice(r, p, ("on-failure", "always", "never")),
            "on-failure",
        )
        return Service(
            name=name,
            command=self.argv(c_raw, _join(path, "command")),
            port=port,
            health=health,
            restart=restart,  # type: ignore[arg-type]
            depends_on=self.opt(
                m, "depends_on", path, lambda r, p: self.depends_on(r, p, name), ()
            ),
            setup=self.opt(m, "setup", path, self.argv, None),
            env=self.opt(m, "env", path, self.env, ()),
        )

    def depends_on(self, raw: Raw, path: str, me: str) -> tuple[str, ...]:
        if isinstance(raw, RawScalar) and isinstance(raw.value, str):
            raw = RawSeq(raw.loc, [raw])  # depends_on: db
        if not isinstance(raw, RawSeq):
            raise _fail(raw, path, f"must be a list of service names, got {_shown(raw)}")
        out: list[str] = []
        for i, item in enumerate(raw.items):
            dep = self.str_(item, f"{path}[{i}]")
            if dep == me:
                raise _fail(item, f"{path}[{i}]", "a service cannot depend on itself")
            if dep not in out:
                out.append(dep)
        return tuple(out)

    def health(self, raw: Raw, path: str, port: int | None) -> Health:
        m = self.mapping(
            raw, path, ("http", "tcp", "command", "interval", "timeout", "retries", "start_period")
        )
        kinds = [k for k in ("http", "tcp", "command") if _present(m, k) is not None]
        if len(kinds) != 1:
            raise _fail(raw, path, "needs exactly one of http, tcp or command")
        http = tcp = command = None
        if kinds[0] == "http":
            h_raw = m.items["http"]
            http = self.str_(h_raw, _join(path, "http"), max_len=2048)
            if not http.startswith("/") or any(c in http for c in "\r\n "):
                raise _fail(
                    h_raw, _join(path, "http"), f"must be a URL path like '/', got {http!r}"
                )
            if port is None:
                raise _fail(h_raw, _join(path, "http"), "an http check needs the service's port")
        elif kinds[0] == "tcp":
            tcp = self.int_(m.items["tcp"], _join(path, "tcp"), 1, 65535)
        else:
            command = self.argv(m.items["command"], _join(path, "command"))
        return Health(
            http=http,
            tcp=tcp,
            command=command,
            interval=self.opt(
                m, "interval", path, lambda r, p: self.duration(r, p, 0.1, MAX_DURATION), 2.0
            ),
            timeout=self.opt(
                m, "timeout", path, lambda r, p: self.duration(r, p, 0.1, MAX_DURATION), 1.0
            ),
            retries=self.opt(m, "retries", path, lambda r, p: self.int_(r, p, 1, 100), 3),
            start_period=self.opt(
                m, "start_period", path, lambda r, p: self.duration(r, p, 0.0, MAX_DURATION), 0.0
            ),
        )

    def secrets(self, raw: Raw, path: str) -> tuple[Secret, ...]:
        if not isinstance(raw, RawMap):
            raise _fail(raw, path, f"must be a mapping of NAME: {{file: PATH}}, got {_shown(raw)}")
        out = []
        for name, item in raw.items.items():
            spath = _join(path, name)
            self.env_name(item, spath, name)
            m = self.mapping(item, spath, ("file",))
            f_raw = _present(m, "file")
            if f_raw is None:
                raise _fail(item, _join(spath, "file"), "is required")
            out.append(
                Secret(name=name, file=self.abs_path(f_raw, _join(spath, "file"), reserved_ok=True))
            )
        return tuple(out)


def _within(parent: str, child: str) -> bool:
    """True if `child` is `parent` or below it (normalised absolute paths)."""
    return child == parent or child.startswith(parent.rstrip("/") + "/")


def _get_path(raw: RawMap, keys: Sequence[str]) -> Raw:
    cur: Raw = raw
    for k in keys:
        if isinstance(cur, RawMap) and k in cur.items:
            cur = cur.items[k]
    return cur


def _shown(raw: Raw) -> str:
    if isinstance(raw, RawMap):
        return "a mapping"
    if isinstance(raw, RawSeq):
        return "a list"
    v = raw.value if isinstance(raw, RawScalar) else None
    if v is None:
        return "null"
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


# ---------------------------------------------------------------------------
# Files, extends, overrides


# path → (content digest, parsed tree). Files are read on every call; only the
# parse is skipped when the bytes are identical (content, not mtime, decides:
# file timestamps are too coarse to see two quick edits). Cached trees are
# never mutated: merging builds new maps and --set works on a deep copy.
_PARSED: dict[str, tuple[bytes, RawMap]] = {}
_PARSED_MAX = 1024


def _parse_file(path: str) -> RawMap:
    try:
        with open(path, "rb") as f:
            data = f.read(safeyaml.MAX_BYTES + 1)
    except OSError as e:
        raise TemplateError(f"{path}: cannot read: {e.strerror}") from None
    digest = hashlib.sha256(data).digest()
    hit = _PARSED.get(path)
    if hit is not None and hit[0] == digest:
        return hit[1]
    raw = _parse_bytes(data, path)
    if len(_PARSED) >= _PARSED_MAX:
        _PARSED.clear()
    _PARSED[path] = (digest, raw)
    return raw


def _parse_bytes(data: bytes, path: str) -> RawMap:
    try:
        raw = safeyaml.parse(data, path)
    except YamlError as e:
        raise TemplateError(str(e)) from None
    if raw is None:
        raise TemplateError(f"{path}:1: the template is empty")
    if not isinstance(raw, RawMap):
        raise TemplateError(f"{raw.loc}: a template must be a mapping (name: ..., agent: ...)")
    return raw


def _raw_name(raw: RawMap) -> str | None:
    v = raw.items.get("name")
    return v.value if isinstance(v, RawScalar) and isinstance(v.value, str) else None


def apply_sets(raw: RawMap, sets: Sequence[str]) -> RawMap:
    """Apply ``KEY=VALUE`` overrides (dotted key path, YAML scalar/flow value) to a copy."""
    out = copy.deepcopy(raw)  # the caller's tree (maybe a parent's) stays untouched
    for item in sets:
        key, sep, text = item.partition("=")
        key = key.strip()
        loc = f"--set {key or item}"
        if not sep or not key:
            raise TemplateError(f"{loc}: expected KEY=VALUE, like resources.memory=2G")
        parts = key.split(".")
        if any(not p for p in parts):
            raise TemplateError(f"{loc}: {key}: empty component in the key path")
        if parts[0] in ("name", "extends"):
            raise TemplateError(f"{loc}: {key}: cannot be overridden")
        try:
            value = safeyaml.parse(text, loc, loc=loc)
        except YamlError as e:
            raise TemplateError(str(e)) from None
        if value is None:  # `--set key=` → explicit null, i.e. back to the default
            value = RawScalar(loc, None)
        cur: Raw = out
        for depth, part in enumerate(parts[:-1]):
            sub = _child(cur, part, loc, ".".join(parts[: depth + 1]))
            if sub is None:
                sub = RawMap(loc)
                _set_child(cur, part, sub, loc, key)
            cur = sub
        _set_child(cur, parts[-1], value, loc, key)
    return out


def _child(cur: Raw, part: str, loc: str, path: str) -> Raw | None:
    if isinstance(cur, RawMap):
        v = cur.items.get(part)
        if isinstance(v, RawScalar) and v.value is None:
            return None
        if v is not None and not isinstance(v, RawMap | RawSeq):
            raise TemplateError(f"{loc}: {path}: is a {_shown(v)} value, not a mapping")
        return v
    if isinstance(cur, RawSeq):
        if not part.isdigit() or int(part) >= len(cur.items):
            raise TemplateError(f"{loc}: {path}: no list item {part!r}")
        return cur.items[int(part)]
    raise TemplateError(f"{loc}: {path}: not a mapping")


def _set_child(cur: Raw, part: str, value: Raw, loc: str, key: str) -> None:
    if isinstance(cur, RawMap):
        cur.items[part] = value
    elif isinstance(cur, RawSeq):
        if not part.isdigit() or int(part) >= len(cur.items):
            raise TemplateError(f"{loc}: {key}: no list item {part!r}")
        cur.items[int(part)] = value
    else:
        raise TemplateError(f"{loc}: {key}: not a mapping")


class TemplateRegistry:
    """Templates found by their ``name:`` among directories, re-read on every call.

    Earlier directories win when two define the same name, so
    /etc/corral/templates can override a shipped template.
    """

    def __init__(self, dirs: Sequence[str], protected: Sequence[str] = ()) -> None:
        self.dirs = list(dirs)
        #: host dirs no filesystem rule may expose, besides PROTECTED_SOURCES
        #: (the daemon passes its state_dir and run_dir)
        self.protected = tuple(protected)

    def _files(self) -> builtins.list[str]:
        out: builtins.list[str] = []
        for d in self.dirs:
            try:
                names = sorted(p.name for p in Path(d).iterdir())
            except FileNotFoundError:
                continue
            except OSError as e:
                log.warning("template directory %s unreadable: %s", d, e.strerror)
                continue
            out.extend(
                str(Path(d) / n)
                for n in names
                if n.endswith((".yaml", ".yml")) and not n.startswith(".")
            )
        return out

    def _index(self) -> tuple[dict[str, tuple[str, RawMap]], list[TemplateError]]:
        """name → (file, raw) for every parseable file; errors for the rest."""
        index: dict[str, tuple[str, RawMap]] = {}
        errors: builtins.list[TemplateError] = []
        for path in self._files():
            try:
                raw = _parse_file(path)
            except TemplateError as e:
                errors.append(e)
                continue
            name = _raw_name(raw)
            if name is None:
                errors.append(TemplateError(f"{raw.loc}: name: is required"))
                continue
            stem = Path(path).stem
            if stem != name:
                log.warning(
                    "template file %s defines %r; its name should be %s.yaml", path, name, name
                )
            if name in index:
                log.warning("template %r in %s is shadowed by %s", name, path, index[name][0])
                continue
            index[name] = (path, raw)
        return index, errors

    def scan(self) -> tuple[builtins.list[Template], builtins.list[TemplateError]]:
        """Every valid template, sorted by name, and the errors of the invalid ones."""
        index, errors = self._index()
        out = []
        for name in sorted(index):
            try:
                out.append(self._resolve(name, index, ()))
            except TemplateError as e:
                errors.append(e)
        return out, errors

    def list(self) -> builtins.list[Template]:
        templates, errors = self.scan()
        for e in errors:
            log.warning("invalid template: %s", e)
        return templates

    def get(self, name: str, sets: Sequence[str] = ()) -> Template:
        index, _ = self._index()
        if name not in index:
            raise NotFound(
                f"no template named {name!r}",
                hint=f"templates are looked up by their name: in {', '.join(self.dirs)}",
            )
        return self._resolve(name, index, sets)

    def _resolve(
        self, name: str, index: dict[str, tuple[str, RawMap]], sets: Sequence[str]
    ) -> Template:
        path, raw = index[name]
        merged = self._merged(raw, index, [name])
        return _validate(apply_sets(merged, sets) if sets else merged, path, True, self.protected)

    def _merged(
        self, raw: RawMap, index: dict[str, tuple[str, RawMap]], chain: builtins.list[str]
    ) -> RawMap:
        """`raw` with its extends chain merged underneath it."""
        ext = raw.items.get("extends")
        if ext is None or (isinstance(ext, RawScalar) and ext.value is None):
            return raw
        if not isinstance(ext, RawScalar) or not isinstance(ext.value, str):
            raise TemplateError(f"{ext.loc}: extends: must be a template name, got {_shown(ext)}")
        parent_name = ext.value
        if not NAME_RE.fullmatch(parent_name):
            raise TemplateError(f"{ext.loc}: extends: {parent_name!r} is not a template name")
        if parent_name in chain:
            cycle = " -> ".join([*chain, parent_name])
            raise TemplateError(f"{ext.loc}: extends: cycle: {cycle}")
        if len(chain) > MAX_EXTENDS_DEPTH:
            raise TemplateError(f"{ext.loc}: extends: more than {MAX_EXTENDS_DEPTH} levels")
        if parent_name not in index:
            raise TemplateError(
                f"{ext.loc}: extends: no template named {parent_name!r} in {', '.join(self.dirs)}"
            )
        parent = self._merged(index[parent_name][1], index, [*chain, parent_name])
        # The parent's name/description must not leak into the child.
        base = RawMap(
            parent.loc, {k: v for k, v in parent.items.items() if k not in ("name", "description")}
        )
        out = safeyaml.deep_merge(base, raw)
        return out if isinstance(out, RawMap) else raw

    def load_file(self, path: str, sets: Sequence[str] = ()) -> Template:
        """A template from one file (maybe outside the directories); extends resolved here."""
        raw = _parse_file(path)
        index, _ = self._index()
        name = _raw_name(raw)
        chain = [name] if name else []
        index = dict(index)
        if name:
            index[name] = (path, raw)
        merged = self._merged(raw, index, chain)
        return _validate(apply_sets(merged, sets) if sets else merged, path, True, self.protected)


def _validate(
    raw: RawMap, source: str | None, check_host: bool, protected: Sequence[str] = ()
) -> Template:
    return _Validator(check_host, protected).template(raw, source)


def load_file(path: str, registry: TemplateRegistry | None = None) -> Template:
    """Validate one file (``corral template validate FILE``); extends needs a registry."""
    return (registry or TemplateRegistry([])).load_file(path)


# ---------------------------------------------------------------------------
# JSON form


def template_to_dict(t: Template) -> dict[str, Any]:
    """The resolved template as JSON-able data, in the template schema's own shape."""
    d: dict[str, Any] = {
        "name": t.name,
        "description": t.description,
        "extends": t.extends,
        "agent": {"command": list(t.agent.command), "env": dict(t.agent.env)},
        "workspace": {"mode": t.workspace.mode, "path": t.workspace.path},
        "resources": {
            "memory": t.resources.memory,
            "swap": t.resources.swap,
            "cpus": t.resources.cpus,
            "pids": t.resources.pids,
        },
        "filesystem": [
            {"path": r.path, "mode": r.mode, **({"source": r.source} if r.source else {})}
            for r in t.filesystem
        ],
        "network": {
            "egress": t.network.egress,
            "allow": [str(a) for a in t.network.allow],
            "ipv6": t.network.ipv6,
        },
        "services": {s.name: _service_to_dict(s) for s in t.services},
        "env": dict(t.env),
        "secrets": {s.name: {"file": s.file} for s in t.secrets},
    }
    return d


def _service_to_dict(s: Service) -> dict[str, Any]:
    d: dict[str, Any] = {
        "command": list(s.command),
        "port": s.port,
        "restart": s.restart,
        "depends_on": list(s.depends_on),
        "setup": list(s.setup) if s.setup else None,
        "env": dict(s.env),
        "health": None,
    }
    if s.health:
        h = s.health
        hd: dict[str, Any] = {}
        if h.http is not None:
            hd["http"] = h.http
        elif h.tcp is not None:
            hd["tcp"] = h.tcp
        else:
            hd["command"] = list(h.command or ())
        hd.update(
            interval=h.interval, timeout=h.timeout, retries=h.retries, start_period=h.start_period
        )
        d["health"] = hd
    return d


def template_from_dict(d: dict[str, Any]) -> Template:
    """The inverse of template_to_dict (host checks are not repeated for a stored template)."""
    try:
        raw = safeyaml.from_plain(d, "<stored template>")
    except YamlError as e:
        raise TemplateError(str(e)) from None
    if not isinstance(raw, RawMap):
        raise TemplateError("<stored template>: not a mapping")
    return _validate(raw, None, False)


__all__ = [
    "AgentConfig",
    "AllowEntry",
    "Health",
    "NetworkPolicy",
    "Resources",
    "Secret",
    "Service",
    "Template",
    "TemplateRegistry",
    "WorkspaceConfig",
    "load_file",
    "parse_allow_entry",
    "parse_duration",
    "parse_size",
    "template_from_dict",
    "template_to_dict",
]
