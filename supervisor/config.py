"""The daemon's configuration file (CONTRACT.md "Daemon configuration").

YAML read with the same safe loader as templates (safeyaml: size/depth caps,
duplicate keys refused, locations kept), validated into a frozen `Config`.
Every key has a default, so no file is needed; errors name the file, the line
and the key path and raise HostSetupError, because a daemon with a bad config
must refuse to start rather than guess.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from sandbox.errors import HostSetupError
from supervisor import safeyaml
from supervisor.safeyaml import Raw, RawMap, RawScalar, RawSeq, YamlError
from supervisor.units import parse_duration

#: The repository checkout this module runs from; its templates/ ship with corral.
REPO = str(Path(__file__).resolve().parent.parent)
DEFAULT_TEMPLATE_DIRS = ("/etc/corral/templates", str(Path(REPO) / "templates"))
CONFIG_ENV = "CORRAL_CONFIG"
DEFAULT_SUBNET = ipaddress.IPv4Network("10.213.0.0/16")


@dataclass(frozen=True)
class PortRange:
    """An inclusive range of integers ("20000-29999")."""

    lo: int
    hi: int

    def __contains__(self, v: object) -> bool:
        return isinstance(v, int) and self.lo <= v <= self.hi

    def __len__(self) -> int:
        return self.hi - self.lo + 1

    def __str__(self) -> str:
        return f"{self.lo}-{self.hi}"


@dataclass(frozen=True)
class SshConfig:
    """Where the SSH server listens."""

    host: str = "0.0.0.0"  # noqa: S104 (team members connect from other machines)
    port: int = 2222


@dataclass(frozen=True)
class NetworkConfig:
    """Agent addressing: `subnet` is carved into one /30 per agent (host side .1, agent .2)."""

    subnet: ipaddress.IPv4Network = DEFAULT_SUBNET
    ipv6: bool = False  # give agents IPv6 addresses too

    @property
    def slots(self) -> int:
        """How many /30s (agents) the subnet holds."""
        return int(self.subnet.num_addresses // 4)

    def slot(self, index: int) -> ipaddress.IPv4Network:
        """The /30 of subnet lease `index` (0-based)."""
        if not 0 <= index < self.slots:
            raise ValueError(f"subnet slot {index} outside {self.subnet}")
        base = int(self.subnet.network_address) + 4 * index
        return ipaddress.IPv4Network((base, 30))


@dataclass(frozen=True)
class Notification:
    """A webhook that receives events whose kind matches one of `events` (fnmatch globs)."""

    webhook: str  # http(s) URL, POSTed one JSON event at a time
    events: tuple[str, ...] = ("*",)


@dataclass(frozen=True)
class Config:
    """Everything the daemon reads from its config file."""

    state_dir: str = "/var/lib/corral"  # store, workspaces, host key, audit log
    run_dir: str = "/run/corral"  # API socket, keeper sockets
    api_socket: str = "/run/corral/corral.sock"  # default: run_dir/corral.sock
    ssh: SshConfig = field(default_factory=SshConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    ports: PortRange = PortRange(20000, 29999)  # host ports leased to published services
    uids: PortRange = PortRange(200000, 265535)  # host uids leased to agents (one each)
    templates: tuple[str, ...] = DEFAULT_TEMPLATE_DIRS  # template dirs; earlier ones win
    notifications: tuple[Notification, ...] = ()
    cgroup_parent: str | None = None  # cgroup for agents; None: below the daemon's own
    upstream_dns: tuple[str, ...] = ()  # resolvers for allow-listed names; () = resolv.conf
    stop_timeout: float = 10.0  # seconds between SIGTERM and SIGKILL on stop
    source: str | None = None  # the file this was read from (None: defaults only)

    @property
    def store_path(self) -> str:
        return str(Path(self.state_dir) / "state.db")


_KEYS = (
    "state_dir", "run_dir", "api_socket", "ssh", "network", "ports", "uids", "templates",
    "notifications", "cgroup_parent", "upstream_dns", "stop_timeout",
)  # fmt: skip


def load_config(path: str | None = None) -> Config:
    """Read `path` (or $CORRAL_CONFIG); with neither, the defaults."""
    if path is None:
        path = os.environ.get(CONFIG_ENV) or None
    if path is None:
        return Config()
    try:
        with open(path, "rb") as f:
            data = f.read(safeyaml.MAX_BYTES + 1)
    except OSError as e:
        raise HostSetupError(
            f"config file {path}: cannot read: {e.strerror}",
            hint=f"create it, or point --config / ${CONFIG_ENV} at a readable file",
        ) from None
    try:
        raw = safeyaml.parse(data, path)
    except YamlError as e:
        raise HostSetupError(str(e), hint="fix the config file's YAML") from None
    return config_from_raw(raw, path)


def config_from_dict(d: dict[str, Any], origin: str = "<config>") -> Config:
    """A Config from plain data (tests, programmatic use)."""
    return config_from_raw(safeyaml.from_plain(d, origin), origin)


def config_from_raw(raw: Raw | None, origin: str) -> Config:
    if raw is None or (isinstance(raw, RawScalar) and raw.value is None):
        return Config(source=origin)
    top = _mapping(raw, "", _KEYS)
    base = Path(origin).resolve().parent if Path(origin).is_file() else Path.cwd()
    state_dir = _opt(top, "state_dir", _abs_dir, Config.state_dir)
    run_dir = _opt(top, "run_dir", _abs_dir, Config.run_dir)
    ssh = SshConfig()
    if (r := _present(top, "ssh")) is not None:
        m = _mapping(r, "ssh", ("listen",))
        if (lr := _present(m, "listen")) is not None:
            ssh = _listen(lr, "ssh.listen")
    net = NetworkConfig()
    if (r := _present(top, "network")) is not None:
        m = _mapping(r, "network", ("subnet", "ipv6"))
        net = NetworkConfig(
            subnet=_opt(m, "subnet", _subnet, net.subnet, "network"),
            ipv6=_opt(m, "ipv6", _bool, False, "network"),
        )
    return Config(
        state_dir=state_dir,
        run_dir=run_dir,
        api_socket=_opt(top, "api_socket", _abs_dir, str(Path(run_dir) / "corral.sock")),
        ssh=ssh,
        network=net,
        ports=_range_section(top, "ports", Config.ports, 1024, 65535),
        uids=_range_section(top, "uids", Config.uids, 1000, 2**32 - 2),
        templates=_opt(top, "templates", lambda r, p: _dirs(r, p, base), DEFAULT_TEMPLATE_DIRS),
        notifications=_opt(top, "notifications", _notifications, ()),
        cgroup_parent=_opt(top, "cgroup_parent", _cgroup, None),
        upstream_dns=_opt(top, "upstream_dns", _dns, ()),
        stop_timeout=_opt(top, "stop_timeout", _timeout, 10.0),
        source=origin,
    )


# ---------------------------------------------------------------------------
# Field checks: each takes (raw, key.path) and raises HostSetupError


def _fail(raw: Raw, path: str, reason: str) -> HostSetupError:
    return HostSetupError(f"{raw.loc}: {path}: {reason}", hint="fix the daemon's config file")


def _present(m: RawMap, key: str) -> Raw | None:
    v = m.items.get(key)
    return None if isinstance(v, RawScalar) and v.value is None else v


def _opt(m: RawMap, key: str, fn: Any, default: Any, prefix: str = "") -> Any:
    v = _present(m, key)
    return default if v is None else fn(v, f"{prefix}.{key}" if prefix else key)


def _mapping(raw: Raw, path: str, allowed: Sequence[str]) -> RawMap:
    if not isinstance(raw, RawMap):
        raise _fail(raw, path or "(top)", "must be a mapping")
    for key, v in raw.items.items():
        if key not in allowed:
            near = difflib.get_close_matches(key, allowed, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise _fail(v, f"{path}.{key}" if path else key, f"unknown key{hint}")
    return raw


def _str(raw: Raw, path: str) -> str:
    if not isinstance(raw, RawScalar) or not isinstance(raw.value, str) or not raw.value:
        raise _fail(raw, path, "must be a non-empty string")
    if any(c in raw.value for c in "\0\n"):
        raise _fail(raw, path, "must not contain NUL or newlines")
    return raw.value


def _abs_dir(raw: Raw, path: str) -> str:
    text = _str(raw, path)
    if not text.startswith("/"):
        raise _fail(raw, path, f"{text!r} must be an absolute path")
    if any(part == ".." for part in text.split("/")):
        raise _fail(raw, path, f"{text!r} must not contain '..'")
    return os.path.normpath(text)


def _bool(raw: Raw, path: str) -> bool:
    if not isinstance(raw, RawScalar) or not isinstance(raw.value, bool):
        raise _fail(raw, path, "must be true or false")
    return raw.value


def _listen(raw: Raw, path: str) -> SshConfig:
    v = raw.value if isinstance(raw, RawScalar) else None
    if isinstance(v, int) and not isinstance(v, bool):
        host, port_text = SshConfig.host, str(v)
    elif isinstance(v, str) and v.startswith("["):
        host, _, port_text = v[1:].partition("]:")
    elif isinstance(v, str) and ":" in v:
        host, _, port_text = v.rpartition(":")
    else:
        raise _fail(raw, path, f"must be HOST:PORT like 0.0.0.0:2222, got {v!r}")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise _fail(raw, path, f"{host!r} is not an IP address") from None
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise _fail(raw, path, "port must be 1-65535")
    return SshConfig(host=host, port=int(port_text))


def _subnet(raw: Raw, path: str) -> ipaddress.IPv4Network:
    text = _str(raw, path)
    try:
        net = ipaddress.IPv4Network(text, strict=True)
    except ValueError as e:
        raise _fail(raw, path, f"{text!r} is not an IPv4 network: {e}") from None
    # Each agent takes a /30; fewer than two would make the daemon useless.
    if net.prefixlen > 29:
        raise _fail(raw, path, f"{text} is too small: use /29 or larger (one /30 per agent)")
    return net


def _range_section(top: RawMap, key: str, default: PortRange, lo: int, hi: int) -> PortRange:
    r = _present(top, key)
    if r is None:
        return default
    m = _mapping(r, key, ("range",))
    rr = _present(m, "range")
    if rr is None:
        return default
    path = f"{key}.range"
    text = rr.value if isinstance(rr, RawScalar) else None
    if not isinstance(text, str) or text.count("-") != 1:
        raise _fail(rr, path, f'must be "LOW-HIGH" like "{default}"')
    a, b = (s.strip() for s in text.split("-"))
    if not (a.isdigit() and b.isdigit()):
        raise _fail(rr, path, f'must be "LOW-HIGH" like "{default}"')
    ra, rb = int(a), int(b)
    if not lo <= ra <= rb <= hi:
        raise _fail(rr, path, f"must satisfy {lo} <= LOW <= HIGH <= {hi}, got {text}")
    return PortRange(ra, rb)


def _dirs(raw: Raw, path: str, base: Path) -> tuple[str, ...]:
    if isinstance(raw, RawScalar) and isinstance(raw.value, str):
        raw = RawSeq(raw.loc, [raw])
    if not isinstance(raw, RawSeq):
        raise _fail(raw, path, "must be a list of directories")
    out = []
    for i, item in enumerate(raw.items):
        text = _str(item, f"{path}[{i}]")
        # Relative directories are relative to the config file, not the cwd.
        out.append(os.path.normpath(str(base / text)) if not text.startswith("/") else text)
    return tuple(out)


def _notifications(raw: Raw, path: str) -> tuple[Notification, ...]:
    if not isinstance(raw, RawSeq):
        raise _fail(raw, path, "must be a list of {webhook: URL, events: [GLOB...]}")
    out = []
    for i, item in enumerate(raw.items):
        ipath = f"{path}[{i}]"
        m = _mapping(item, ipath, ("webhook", "events"))
        w = _present(m, "webhook")
        if w is None:
            raise _fail(item, f"{ipath}.webhook", "is required")
        url = _str(w, f"{ipath}.webhook")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise _fail(w, f"{ipath}.webhook", f"{url!r} must be an http(s) URL")
        events: tuple[str, ...] = ("*",)
        if (e := _present(m, "events")) is not None:
            if not isinstance(e, RawSeq) or not e.items:
                raise _fail(
                    e, f"{ipath}.events", 'must be a non-empty list of globs like "agent.*"'
                )
            events = tuple(_str(x, f"{ipath}.events[{j}]") for j, x in enumerate(e.items))
        out.append(Notification(webhook=url, events=events))
    return tuple(out)


def _cgroup(raw: Raw, path: str) -> str:
    text = _str(raw, path)
    if not text.startswith("/") or any(p in (".", "..") for p in text.split("/")):
        raise _fail(raw, path, f"{text!r} must be an absolute cgroup path without '..'")
    return os.path.normpath(text)


def _dns(raw: Raw, path: str) -> tuple[str, ...]:
    if not isinstance(raw, RawSeq):
        raise _fail(raw, path, "must be a list of IP addresses")
    out = []
    for i, item in enumerate(raw.items):
        text = _str(item, f"{path}[{i}]")
        try:
            out.append(str(ipaddress.ip_address(text)))
        except ValueError:
            raise _fail(item, f"{path}[{i}]", f"{text!r} is not an IP address") from None
    return tuple(out)


def _timeout(raw: Raw, path: str) -> float:
    v = raw.value if isinstance(raw, RawScalar) else None
    try:
        d = parse_duration(v)  # type: ignore[arg-type]
    except ValueError as e:
        raise _fail(raw, path, str(e)) from None
    if not 0 < d <= 3600:
        raise _fail(raw, path, "must be between 0 and 1h")
    return d
