"""Daemon config: defaults, the CONTRACT example, and errors naming file, line and key."""
# ruff: noqa: E501  (tables of one case per line read better than wrapped ones)

from __future__ import annotations

import ipaddress
import os
import textwrap
from pathlib import Path

import pytest

from sandbox.errors import HostSetupError
from supervisor.config import (
    DEFAULT_TEMPLATE_DIRS,
    REPO,
    Config,
    NetworkConfig,
    Notification,
    PortRange,
    SshConfig,
    config_from_dict,
    load_config,
)


def write(d: Path, text: str, name: str = "corral.yaml") -> str:
    p = d / name
    p.write_text(textwrap.dedent(text))
    return str(p)


def test_defaults_without_a_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CORRAL_CONFIG", raising=False)
    c = load_config(None)
    assert c == Config()
    assert c.state_dir == "/var/lib/corral"
    assert c.run_dir == "/run/corral"
    assert c.api_socket == "/run/corral/corral.sock"
    assert c.ssh == SshConfig("0.0.0.0", 2222)
    assert c.network.subnet == ipaddress.IPv4Network("10.213.0.0/16")
    assert c.network.ipv6 is False
    assert c.ports == PortRange(20000, 29999)
    assert c.uids == PortRange(200000, 265535)
    assert c.templates == ("/etc/corral/templates", os.path.join(REPO, "templates"))
    assert os.path.isfile(os.path.join(c.templates[1], "default.yaml"))
    assert c.notifications == ()
    assert c.cgroup_parent is None
    assert c.upstream_dns == ()
    assert c.stop_timeout == 10.0
    assert c.store_path == "/var/lib/corral/state.db"


def test_contract_example(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        state_dir: /var/lib/corral        # store, workspaces, host key, audit log
        run_dir: /run/corral              # API socket, keeper sockets
        api_socket: /run/corral/corral.sock
        ssh: {listen: "0.0.0.0:2222"}
        network: {subnet: 10.213.0.0/16, ipv6: false}
        ports: {range: "20000-29999"}
        uids: {range: "200000-265535"}
        templates: [/etc/corral/templates, /opt/corral/templates]
        notifications: [{webhook: "https://hooks.example.com/x", events: ["agent.*"]}]
        """,
    )
    c = load_config(path)
    assert c.source == path
    assert c.templates == ("/etc/corral/templates", "/opt/corral/templates")
    assert c.notifications == (Notification("https://hooks.example.com/x", ("agent.*",)),)
    assert c == Config(templates=c.templates, notifications=c.notifications, source=path)


def test_second_daemon_config_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(
        tmp_path,
        f"""\
        state_dir: {tmp_path}/state
        run_dir: {tmp_path}/run
        ssh: {{listen: "127.0.0.1:2299"}}
        network: {{subnet: 198.18.8.0/24}}
        ports: {{range: "30000-30099"}}
        uids: {{range: "300000-300099"}}
        templates: [tpl]
        cgroup_parent: /corral-test
        upstream_dns: [198.18.0.53]
        stop_timeout: 500ms
        """,
    )
    monkeypatch.setenv("CORRAL_CONFIG", path)
    c = load_config(None)
    assert c.state_dir == f"{tmp_path}/state"
    assert c.api_socket == f"{tmp_path}/run/corral.sock"  # follows run_dir
    assert c.ssh == SshConfig("127.0.0.1", 2299)
    assert c.network.subnet == ipaddress.IPv4Network("198.18.8.0/24")
    assert c.network.slots == 64
    assert str(c.network.slot(1)) == "198.18.8.4/30"
    assert 30050 in c.ports
    assert 30100 not in c.ports
    assert len(c.uids) == 100
    assert c.templates == (str(tmp_path / "tpl"),)  # relative to the config file
    assert c.cgroup_parent == "/corral-test"
    assert c.upstream_dns == ("198.18.0.53",)
    assert c.stop_timeout == 0.5


def test_empty_file_is_defaults(tmp_path: Path) -> None:
    c = load_config(write(tmp_path, "# nothing\n"))
    assert c.state_dir == Config().state_dir
    assert c.templates == DEFAULT_TEMPLATE_DIRS


def test_listen_forms() -> None:
    assert config_from_dict({"ssh": {"listen": "[::1]:22"}}).ssh == SshConfig("::1", 22)
    assert config_from_dict({"ssh": {"listen": 2223}}).ssh == SshConfig("0.0.0.0", 2223)
    assert config_from_dict({"ssh": {"listen": "localhost:2224"}}).ssh.port == 2224


def test_network_slots() -> None:
    n = NetworkConfig()
    assert str(n.slot(0)) == "10.213.0.0/30"
    with pytest.raises(ValueError, match="outside"):
        n.slot(n.slots)


@pytest.mark.parametrize(
    ("body", "line", "expect"),
    [
        ("state_dri: /x\n", 1, "state_dri: unknown key (did you mean 'state_dir'?)"),
        ("state_dir: var/lib\n", 1, "state_dir: 'var/lib' must be an absolute path"),
        ("state_dir: /a/../b\n", 1, "state_dir: '/a/../b' must not contain '..'"),
        ("run_dir: 5\n", 1, "run_dir: must be a non-empty string"),
        ("ssh: {listen: 2222x}\n", 1, "ssh.listen: must be HOST:PORT"),
        ("ssh: {listen: '0.0.0.0:99999'}\n", 1, "ssh.listen: port must be 1-65535"),
        ("ssh: {listen: 'example.com:22'}\n", 1, "ssh.listen: 'example.com' is not an IP address"),
        ("ssh: {port: 22}\n", 1, "ssh.port: unknown key"),
        ("network:\n  subnet: 10.213.0.0/31\n", 2, "network.subnet: 10.213.0.0/31 is too small"),
        ("network:\n  subnet: 10.213.0.1/16\n", 2, "network.subnet: '10.213.0.1/16' is not an IPv4 network"),
        ("network:\n  subnet: fd00::/64\n", 2, "is not an IPv4 network"),
        ("network:\n  ipv6: maybe\n", 2, "network.ipv6: must be true or false"),
        ("ports: {range: '20000'}\n", 1, "ports.range: must be \"LOW-HIGH\""),
        ("ports: {range: '30000-20000'}\n", 1, "ports.range: must satisfy 1024 <= LOW <= HIGH <= 65535"),
        ("ports: {range: '80-90'}\n", 1, "ports.range: must satisfy"),
        ("uids: {range: '0-100'}\n", 1, "uids.range: must satisfy 1000 <= LOW"),
        ("templates: 5\n", 1, "templates: must be a list of directories"),
        ("notifications: [{events: ['*']}]\n", 1, "notifications[0].webhook: is required"),
        ("notifications: [{webhook: 'ftp://x'}]\n", 1, "notifications[0].webhook: 'ftp://x' must be an http(s) URL"),
        ("notifications: [{webhook: 'http://x', events: []}]\n", 1, "notifications[0].events: must be a non-empty list"),
        ("notifications: [{webhook: 'http://x', evnts: []}]\n", 1, "notifications[0].evnts: unknown key (did you mean 'events'?)"),
        ("cgroup_parent: ../x\n", 1, "cgroup_parent: '../x' must be an absolute cgroup path"),
        ("upstream_dns: [dns.google]\n", 1, "upstream_dns[0]: 'dns.google' is not an IP address"),
        ("stop_timeout: forever\n", 1, "stop_timeout: expected a duration"),
        ("stop_timeout: 0\n", 1, "stop_timeout: must be between 0 and 1h"),
        ("- a\n", 1, "(top): must be a mapping"),
        ("state_dir: /a\nstate_dir: /b\n", 2, "duplicate key 'state_dir'"),
        ("state_dir: !!python/object:os.system x\n", 1, "is not allowed"),
    ],
)  # fmt: skip
def test_errors(tmp_path: Path, body: str, line: int, expect: str) -> None:
    path = write(tmp_path, body)
    with pytest.raises(HostSetupError) as ei:
        load_config(path)
    msg = str(ei.value)
    assert msg.startswith(f"{path}:{line}: "), msg
    assert expect in msg, msg
    assert ei.value.hint


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(HostSetupError, match="cannot read") as ei:
        load_config(str(tmp_path / "nope.yaml"))
    assert "CORRAL_CONFIG" in ei.value.hint
