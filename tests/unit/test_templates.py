"""Templates: safe YAML, every field's validation error with FILE:LINE: key.path, the shipped files."""
# ruff: noqa: E501  (tables of one case per line read better than wrapped ones)

from __future__ import annotations

import dataclasses
import json
import os
import textwrap
from pathlib import Path

import pytest

from sandbox.errors import TemplateError
from sandbox.spec import FsRule
from supervisor import safeyaml
from supervisor.templates import (
    AllowEntry,
    TemplateRegistry,
    load_file,
    parse_allow_entry,
    template_from_dict,
    template_to_dict,
)
from supervisor.units import parse_duration, parse_size
from tests.conftest import REPO

SHIPPED = os.path.join(REPO, "templates")


def write(d: Path, name: str, text: str) -> str:
    p = d / name
    p.write_text(textwrap.dedent(text))
    return str(p)


def error_of(tmp_path: Path, text: str, name: str = "t.yaml") -> tuple[str, str]:
    path = write(tmp_path, name, text)
    with pytest.raises(TemplateError) as ei:
        load_file(path)
    return path, str(ei.value)


# ---------------------------------------------------------------------------
# shipped templates


def test_shipped_templates_all_validate() -> None:
    reg = TemplateRegistry([SHIPPED])
    templates, errors = reg.scan()
    assert errors == []
    names = {t.name for t in templates}
    assert {"default", "python-dev", "node-web", "backend-postgres"} <= names
    for t in templates:
        assert t.description, f"{t.name} has no description"
        assert t.source is not None
        assert Path(t.source).stem == t.name
        # the stored form round-trips exactly
        again = template_from_dict(json.loads(json.dumps(template_to_dict(t))))
        assert again == dataclasses.replace(t, source=None)


def test_shipped_default_is_sane() -> None:
    t = TemplateRegistry([SHIPPED]).get("default")
    assert t.agent.command == ("bash", "-l")
    assert t.resources.memory == 1 << 30
    assert t.resources.cpus == 1.0
    assert t.resources.pids == 512
    assert t.resources.swap == 0
    assert t.network.egress == "deny"
    assert t.network.allow == ()
    assert t.workspace.mode == "overlay"
    assert t.workspace.path == "/workspace"


def test_shipped_services() -> None:
    reg = TemplateRegistry([SHIPPED])
    web = reg.get("python-dev").service("web")
    assert web.port == 8000
    assert web.health is not None
    assert web.health.http == "/"
    assert web.port_env == "CORRAL_PORT_WEB"
    dev = reg.get("node-web").service("dev")
    assert dev.port == 3000
    assert dev.health is not None
    assert dev.health.kind == "http"
    pg = reg.get("backend-postgres")
    db = pg.service("db")
    assert db.health is not None
    assert db.health.tcp == 5432
    assert db.setup is not None
    assert "/usr/lib/postgresql/15/bin/initdb" in db.setup[-1]
    assert db.command[0] == "/usr/lib/postgresql/15/bin/postgres"
    assert pg.service("api").depends_on == ("db",)
    assert [s.name for s in pg.start_order()] == ["db", "api"]


# ---------------------------------------------------------------------------
# a minimal template and the full contract example


def test_minimal_template_gets_defaults(tmp_path: Path) -> None:
    t = load_file(write(tmp_path, "m.yaml", "name: m\n"))
    assert t.name == "m"
    assert t.description == ""
    assert t.agent.command == ("bash", "-l")
    assert t.workspace.mode == "overlay"
    assert t.resources.memory is None
    assert t.resources.swap == 0
    assert t.network.egress == "deny"
    assert t.services == ()


def test_contract_example_validates(tmp_path: Path) -> None:
    src = tmp_path / "srv"
    src.mkdir()
    path = write(
        tmp_path,
        "python-dev.yaml",
        f"""\
        name: python-dev
        description: Python project with a web server
        agent:
          command: ["bash", "-l"]
          env: {{EDITOR: vi}}
        workspace:
          mode: overlay
          path: /workspace
        resources:
          memory: 2G
          cpus: 1
          pids: 512
        filesystem:
          - {{path: /data, source: {src}, mode: ro}}
          - {{path: /home/me/.ssh, mode: hidden}}
          - {{path: /workspace/secrets, mode: hidden}}
        network:
          egress: deny
          allow: ["api.anthropic.com:443", "pypi.org", "198.18.0.10:5432"]
        services:
          web:
            command: ["python", "-m", "http.server", "8000"]
            port: 8000
            health: {{http: "/", interval: 2s, timeout: 1s}}
            restart: on-failure
            depends_on: []
        env: {{PYTHONUNBUFFERED: "1"}}
        secrets: {{ANTHROPIC_API_KEY: {{file: /etc/corral/secrets/anthropic}}}}
        """,
    )
    t = load_file(path)
    assert t.resources.memory == 2 << 30
    assert t.filesystem == (
        FsRule("/data", "ro", str(src)),
        FsRule("/home/me/.ssh", "hidden"),
        FsRule("/workspace/secrets", "hidden"),
    )
    assert t.network.allow == (
        AllowEntry("domain", "api.anthropic.com", 443),
        AllowEntry("domain", "pypi.org", None),
        AllowEntry("ip", "198.18.0.10", 5432),
    )
    web = t.service("web")
    assert web.health is not None
    assert (web.health.interval, web.health.timeout) == (2.0, 1.0)
    assert t.env == (("PYTHONUNBUFFERED", "1"),)
    assert t.secrets[0].file == "/etc/corral/secrets/anthropic"
    assert t.agent.env == (("EDITOR", "vi"),)


def test_last_rule_for_a_path_wins(tmp_path: Path) -> None:
    t = load_file(
        write(
            tmp_path,
            "r.yaml",
            """\
            name: r
            filesystem:
              - {path: /opt/a, mode: hidden}
              - {path: /opt/b, mode: hidden}
              - {path: /opt/a, mode: ro}
            """,
        )
    )
    assert t.filesystem == (FsRule("/opt/b", "hidden"), FsRule("/opt/a", "ro"))


# ---------------------------------------------------------------------------
# errors: each names FILE:LINE: key.path


@pytest.mark.parametrize(
    ("body", "line", "expect"),
    [
        # ports and numbers out of range
        (
            "services:\n  web:\n    command: [x]\n    port: 70000\n",
            5,
            "services.web.port: must be 1-65535",
        ),
        (
            "services:\n  web:\n    command: [x]\n    port: 0\n",
            5,
            "services.web.port: must be 1-65535",
        ),
        (
            "services:\n  web:\n    command: [x]\n    port: true\n",
            5,
            "services.web.port: must be an integer",
        ),
        ("resources:\n  pids: 0\n", 3, "resources.pids: must be 1-4194304"),
        ("resources:\n  pids: 99999999\n", 3, "resources.pids: must be 1-4194304"),
        ("resources:\n  pids: -1\n", 3, "resources.pids: must be 1-4194304"),
        ("resources:\n  memory: lots\n", 3, "resources.memory: expected a size"),
        ("resources:\n  memory: 100\n", 3, "resources.memory: must be between"),
        ("resources:\n  memory: 99P\n", 3, "resources.memory: must be between"),
        ("resources:\n  memory: -1G\n", 3, "resources.memory: expected a size"),
        ("resources:\n  swap: yes\n", 3, "resources.swap: expected a size"),
        ("resources:\n  cpus: 0\n", 3, "resources.cpus: must be at least 0.01"),
        ("resources:\n  cpus: 100000\n", 3, "resources.cpus: must be at most"),
        ("resources:\n  cpus: many\n", 3, "resources.cpus: must be a number"),
        ("resources:\n  cpus: .nan\n", 3, "resources.cpus: must be a number"),
        # unknown keys, with a suggestion
        ("resources:\n  memroy: 1G\n", 3, "resources.memroy: unknown key (did you mean 'memory'?)"),
        ("agent:\n  comand: [x]\n", 3, "agent.comand: unknown key (did you mean 'command'?)"),
        ("servics: {}\n", 2, "servics: unknown key (did you mean 'services'?)"),
        (
            "services:\n  w:\n    command: [x]\n    helth: {tcp: 1}\n",
            5,
            "services.w.helth: unknown key",
        ),
        # workspace
        ("workspace:\n  mode: copy\n", 3, "workspace.mode: must be one of overlay | bind | none"),
        ("workspace:\n  path: workspace\n", 3, "workspace.path: 'workspace' must be absolute"),
        ("workspace:\n  path: /\n", 3, "workspace.path: must not be '/'"),
        ("workspace:\n  path: /proc/x\n", 3, "workspace.path: '/proc/x' is inside /proc"),
        # filesystem paths
        (
            "filesystem:\n  - {path: /a/../etc, mode: ro}\n",
            3,
            "filesystem[0].path: '/a/../etc' must not contain '..'",
        ),
        (
            "filesystem:\n  - {path: '/a,b', mode: hidden}\n",
            3,
            "filesystem[0].path: '/a,b' contains a forbidden character ','",
        ),
        (
            "filesystem:\n  - {path: '/a:b', mode: hidden}\n",
            3,
            "filesystem[0].path: '/a:b' contains a forbidden character ':'",
        ),
        (
            'filesystem:\n  - {path: "/a\\nb", mode: hidden}\n',
            3,
            "filesystem[0].path: '/a\\nb' contains a forbidden character",
        ),
        (
            'filesystem:\n  - {path: "/a\\0b", mode: hidden}\n',
            3,
            "filesystem[0].path: must not contain NUL",
        ),
        (
            "filesystem:\n  - {path: data, mode: ro}\n",
            3,
            "filesystem[0].path: 'data' must be absolute",
        ),
        ("filesystem:\n  - {mode: ro}\n", 3, "filesystem[0].path: is required"),
        (
            "filesystem:\n  - {path: /x, mode: rwx}\n",
            3,
            "filesystem[0].mode: must be one of ro | rw | hidden",
        ),
        (
            "filesystem:\n  - {path: /x, source: /tmp, mode: hidden}\n",
            3,
            "filesystem[0].source: a hidden path takes no source",
        ),
        (
            "filesystem:\n  - {path: /x, source: '/a/../b', mode: ro}\n",
            3,
            "filesystem[0].source: '/a/../b' must not contain '..'",
        ),
        ("filesystem:\n  - {path: /, mode: hidden}\n", 3, "filesystem[0].path: must not be '/'"),
        (
            "filesystem:\n  - {path: /dev/sda, mode: rw}\n",
            3,
            "filesystem[0].path: '/dev/sda' is inside /proc, /sys or /dev",
        ),
        (
            "filesystem:\n  - {path: /workspace, mode: hidden}\n",
            3,
            "would cover the workspace at /workspace",
        ),
        (
            "filesystem:\n  - {path: /opt/h, mode: hidden}\n  - {path: /opt/h/x, mode: ro}\n",
            4,
            "filesystem[1].path: /opt/h/x is inside the hidden path /opt/h",
        ),
        ("filesystem: {path: /x}\n", 2, "filesystem: must be a list"),
        (
            "filesystem:\n  - {path: /x, source: /run, mode: ro}\n",
            3,
            "filesystem[0].source: /run would expose corral's own files (/run/corral)",
        ),
        (
            "filesystem:\n  - {path: /x, source: /, mode: rw}\n",
            3,
            "filesystem[0].source: / would expose corral's own files",
        ),
        (
            "filesystem:\n  - {path: /var/lib/corral/agents}\n",
            3,
            "filesystem[0].path: /var/lib/corral/agents would expose corral's own files (/var/lib/corral)",
        ),
        # network
        ("network:\n  egress: maybe\n", 3, "network.egress: must be one of deny | allow"),
        ("network:\n  egress: no\n", 3, "quote the value"),
        ("network:\n  ipv6: 'yes'\n", 3, "network.ipv6: must be true or false"),
        ("network:\n  allow: pypi.org\n", 3, "network.allow: must be a list"),
        (
            "network:\n  allow:\n    - ok.org\n    - 'bad host!'\n",
            5,
            "network.allow[1]: 'bad host!'",
        ),
        (
            "network:\n  allow: ['1.2.3.4:99999']\n",
            3,
            "network.allow[0]: '1.2.3.4:99999': port must be 1-65535",
        ),
        ("network:\n  allow: ['10.0.0.0/33']\n", 3, "is not a valid network"),
        ("network:\n  allow: ['1.2.3']\n", 3, "is not an IP address, network or host name"),
        # services and health
        ("services:\n  web:\n    port: 80\n", 3, "services.web.command: is required"),
        ("services:\n  Web:\n    command: [x]\n", 3, "services.Web: service name 'Web' must match"),
        (
            "services:\n  w:\n    command: python -m x\n",
            4,
            "services.w.command: must be a list of strings",
        ),
        ("services:\n  w:\n    command: []\n", 4, "services.w.command: must not be empty"),
        (
            "services:\n  w:\n    command: [x]\n    health: {tcp: 1, http: /}\n",
            5,
            "services.w.health: needs exactly one of",
        ),
        (
            "services:\n  w:\n    command: [x]\n    health: {interval: 1s}\n",
            5,
            "services.w.health: needs exactly one of",
        ),
        (
            "services:\n  w:\n    command: [x]\n    health: {http: /}\n",
            5,
            "services.w.health.http: an http check needs the service's port",
        ),
        (
            "services:\n  w:\n    command: [x]\n    port: 80\n    health: {http: x}\n",
            6,
            "services.w.health.http: must be a URL path",
        ),
        (
            "services:\n  w:\n    command: [x]\n    health: {tcp: 1, interval: fast}\n",
            5,
            "services.w.health.interval: expected a duration",
        ),
        (
            "services:\n  w:\n    command: [x]\n    health: {tcp: 1, interval: 0s}\n",
            5,
            "services.w.health.interval: must be between",
        ),
        (
            "services:\n  w:\n    command: [x]\n    health: {tcp: 1, timeout: 2h}\n",
            5,
            "services.w.health.timeout: must be between",
        ),
        (
            "services:\n  w:\n    command: [x]\n    health: {tcp: 1, retries: 0}\n",
            5,
            "services.w.health.retries: must be 1-100",
        ),
        (
            "services:\n  w:\n    command: [x]\n    health: {tcp: 65536}\n",
            5,
            "services.w.health.tcp: must be 1-65535",
        ),
        (
            "services:\n  w:\n    command: [x]\n    restart: no\n",
            5,
            "services.w.restart: must be one of on-failure | always | never",
        ),
        (
            "services:\n  w:\n    command: [x]\n    depends_on: [db]\n",
            5,
            "services.w.depends_on: no service named 'db'",
        ),
        (
            "services:\n  w:\n    command: [x]\n    depends_on: [w]\n",
            5,
            "services.w.depends_on[0]: a service cannot depend on itself",
        ),
        (
            "services:\n  a:\n    command: [x]\n    depends_on: [b]\n  b:\n    command: [x]\n    depends_on: [a]\n",
            5,
            "dependency cycle: a -> b -> a",
        ),
        (
            "services:\n  w:\n    command: [x]\n    setup: 'initdb'\n",
            5,
            "services.w.setup: must be a list of strings",
        ),
        # env and secrets
        ("env:\n  1BAD: x\n", 3, "env.1BAD: is not a valid environment variable name"),
        ("env:\n  CORRAL_AGENT: x\n", 3, "env.CORRAL_AGENT: CORRAL_* variables are set by corral"),
        ("env:\n  DEBUG: true\n", 3, "env.DEBUG: must be a string, got True (quote it)"),
        ("env: [A, B]\n", 2, "env: must be a mapping"),
        ("agent:\n  env:\n    X: [1]\n", 4, "agent.env.X: must be a string"),
        ("secrets:\n  KEY: {file: relative}\n", 3, "secrets.KEY.file: 'relative' must be absolute"),
        ("secrets:\n  KEY: {}\n", 3, "secrets.KEY.file: is required"),
        (
            "secrets:\n  bad-name: {file: /x}\n",
            3,
            "secrets.bad-name: is not a valid environment variable name",
        ),
        # agent
        ("agent:\n  command: bash -l\n", 3, "agent.command: must be a list of strings"),
        ("agent:\n  command: ['']\n", 3, "agent.command: the program name must not be empty"),
        ("agent: []\n", 2, "agent: must be a mapping"),
        # top level
        ("extends: Bad\n", 2, "extends: 'Bad' is not a template name"),
    ],
)
def test_field_errors_name_file_line_and_key(
    tmp_path: Path, body: str, line: int, expect: str
) -> None:
    path = write(tmp_path, "t.yaml", "name: t\n" + body)
    with pytest.raises(TemplateError) as ei:
        # Use a registry with no dirs so `extends` isn't what fails first.
        TemplateRegistry([]).load_file(path) if "extends" not in body else load_file(path)
    msg = str(ei.value)
    assert msg.startswith(f"{path}:{line}: "), msg
    assert expect in msg, msg


def test_exact_message_format(tmp_path: Path) -> None:
    path, msg = error_of(
        tmp_path,
        """\
        name: x
        services:
          web:
            command: [python, -m, http.server]
            port: 70000
        """,
    )
    assert msg == f"{path}:5: services.web.port: must be 1-65535, got 70000"


@pytest.mark.parametrize(
    ("body", "expect"),
    [
        ("name: Bad_Name\n", ":1: name: 'Bad_Name' must match"),
        ("name: " + "a" * 40 + "\n", ":1: name: "),
        ("description: x\n", ":1: name: is required"),
        ("- name: x\n", ":1: a template must be a mapping"),
        ("", ":1: the template is empty"),
        ("name: x\nname: y\n", ":2: duplicate key 'name'"),
        ("name: x\nenv:\n  A: '1'\n  A: '2'\n", ":4: duplicate key 'A'"),
        ("name: x\nagent: {command: [a, b}\n", ":2: invalid YAML"),
        ("name: x\n  bad: indent\n", ":2: invalid YAML"),
        (
            "name: !!python/object/apply:os.system ['true']\n",
            ":1: YAML tag 'tag:yaml.org,2002:python/object/apply:os.system' is not allowed",
        ),
        ("name: x\nenv: !!python/object:os.environ {}\n", "is not allowed"),
        ("name: !custom x\n", "YAML tag '!custom' is not allowed"),
        ("name: x\nenv: !!set {A: null}\n", "is not allowed"),
        ("name: x\nenv: !!binary aGVsbG8=\n", "is not allowed"),
        ("name: x\n1: y\n", ":2: keys must be strings, got 1"),
        ("name: x\n? [a]\n: y\n", "keys must be strings"),
        ("base: &b {A: '1'}\nname: x\nenv:\n  <<: *b\n", ":4: merge keys ('<<') are not supported"),
        ("name: x\n---\nname: y\n", "invalid YAML"),
    ],
)
def test_yaml_level_errors(tmp_path: Path, body: str, expect: str) -> None:
    path, msg = error_of(tmp_path, body)
    assert msg.startswith(path), msg
    assert expect in msg, msg


def test_unsafe_tag_is_never_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    _path, msg = error_of(
        tmp_path, f"name: x\nagent: !!python/object/apply:os.system ['touch {marker}']\n"
    )
    assert "is not allowed" in msg
    assert not marker.exists()


def test_deep_nesting_refused(tmp_path: Path) -> None:
    depth = safeyaml.MAX_DEPTH + 5
    path, msg = error_of(tmp_path, "name: x\nenv: " + "[" * depth + "]" * depth + "\n")
    assert f"nested deeper than {safeyaml.MAX_DEPTH} levels" in msg
    assert msg.startswith(f"{path}:2: ")


def test_very_deep_nesting_does_not_blow_the_stack(tmp_path: Path) -> None:
    depth = 100_000  # the composer is recursive: this must be refused before it runs
    path, msg = error_of(tmp_path, "name: x\nenv: " + "[" * depth + "]" * depth + "\n")
    # our cap, or libyaml's own nesting limit when PyYAML uses it
    assert "nested deeper than" in msg or "maximum nesting depth" in msg
    assert msg.startswith(f"{path}:2: ")


def test_alias_chains_cannot_nest_deeper(tmp_path: Path) -> None:
    # each anchor wraps the previous one: shallow text, deep expanded tree
    lines = ["name: x", "a0: &a0 [x]"]
    lines += [f"a{i}: &a{i} [*a{i - 1}]" for i in range(1, 100)]  # ~5k nodes: under the budget
    path, msg = error_of(tmp_path, "\n".join(lines) + "\n")
    assert "nested deeper than" in msg
    assert msg.startswith(path)


def test_huge_document_refused(tmp_path: Path) -> None:
    filler = "".join(f"  K{i}: '{'x' * 60}'\n" for i in range(5000))
    path, msg = error_of(tmp_path, "name: x\nenv:\n" + filler)
    assert os.path.getsize(path) > safeyaml.MAX_BYTES
    assert msg == f"{path}: document is larger than {safeyaml.MAX_BYTES // 1024} KiB"


def test_alias_bomb_refused(tmp_path: Path) -> None:
    lines = ["name: x", 'a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 9):
        prev = f"*a{i - 1}"
        lines.append(f"a{i}: &a{i} [{', '.join([prev] * 9)}]")
    path, msg = error_of(tmp_path, "\n".join(lines) + "\n")
    assert "alias bomb" in msg
    assert msg.startswith(path)


def test_ordinary_anchors_still_work(tmp_path: Path) -> None:
    t = load_file(
        write(
            tmp_path,
            "a.yaml",
            """\
            name: a
            services:
              one:
                command: &cmd [sleep, "1000"]
              two:
                command: *cmd
            """,
        )
    )
    assert t.service("one").command == t.service("two").command == ("sleep", "1000")


def test_invalid_utf8_refused(tmp_path: Path) -> None:
    p = tmp_path / "u.yaml"
    p.write_bytes(b"name: x\ndescription: \xff\xfe\n")
    with pytest.raises(TemplateError, match="not valid UTF-8"):
        load_file(str(p))


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(TemplateError, match="cannot read"):
        load_file(str(tmp_path / "missing.yaml"))


def test_symlinked_source_refused_with_positive_control(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    # positive control: the real directory is fine
    ok = load_file(
        write(tmp_path, "ok.yaml", f"name: ok\nfilesystem:\n  - {{path: /data, source: {real}}}\n")
    )
    assert ok.filesystem == (FsRule("/data", "ro", str(real)),)
    path, msg = error_of(
        tmp_path, f"name: x\nfilesystem:\n  - {{path: /data, source: {link}, mode: ro}}\n"
    )
    assert msg.startswith(f"{path}:3: filesystem[0].source: {link} is a symlink")
    # through a symlinked parent directory, too
    (real / "sub").mkdir()
    path, msg = error_of(
        tmp_path, f"name: x\nfilesystem:\n  - {{path: /data, source: {link}/sub, mode: rw}}\n"
    )
    assert "is a symlink or goes through one" in msg
    # a source that does not exist (yet) is not checked here
    t = load_file(
        write(
            tmp_path,
            "later.yaml",
            f"name: later\nfilesystem:\n  - {{path: /d, source: {tmp_path}/nope}}\n",
        )
    )
    assert t.filesystem[0].source == f"{tmp_path}/nope"


def test_stored_template_skips_host_checks(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    t = load_file(
        write(tmp_path, "s.yaml", f"name: s\nfilesystem:\n  - {{path: /d, source: {real}}}\n")
    )
    d = template_to_dict(t)
    real.rmdir()
    (tmp_path / "real").symlink_to(tmp_path)  # the source became a symlink after creation
    # re-reading the stored copy (daemon restart) must not fail on the host's state
    assert template_from_dict(d).filesystem == t.filesystem


def test_daemon_dirs_are_protected(tmp_path: Path) -> None:
    state = tmp_path / "state"
    (state / "agents").mkdir(parents=True)
    other = tmp_path / "data"
    other.mkdir()
    d = tmp_path / "tpl"
    d.mkdir()
    write(d, "p.yaml", f"name: p\nfilesystem:\n  - {{path: /d, source: {state}/agents}}\n")
    write(d, "q.yaml", f"name: q\nfilesystem:\n  - {{path: /d, source: {other}, mode: rw}}\n")
    reg = TemplateRegistry([str(d)], protected=[str(state)])
    with pytest.raises(TemplateError, match=f"would expose corral's own files \\({state}\\)"):
        reg.get("p")
    assert reg.get("q").filesystem == (FsRule("/d", "rw", str(other)),)  # positive control
    # hiding a protected path is fine
    write(d, "h.yaml", "name: h\nfilesystem:\n  - {path: /run/corral, mode: hidden}\n")
    assert reg.get("h").filesystem == (FsRule("/run/corral", "hidden"),)


def test_rules_inside_the_workspace_are_allowed(tmp_path: Path) -> None:
    t = load_file(
        write(
            tmp_path,
            "w.yaml",
            "name: w\nfilesystem:\n  - {path: /workspace/secrets, mode: hidden}\n"
            "  - {path: /workspacex, mode: hidden}\n",
        )
    )
    assert [r.path for r in t.filesystem] == ["/workspace/secrets", "/workspacex"]
    # with no workspace, /workspace is just a path
    t = load_file(
        write(
            tmp_path,
            "n.yaml",
            "name: n\nworkspace: {mode: none}\nfilesystem:\n  - {path: /workspace, mode: hidden}\n",
        )
    )
    assert t.filesystem == (FsRule("/workspace", "hidden"),)


# ---------------------------------------------------------------------------
# allow entries, units


@pytest.mark.parametrize(
    ("text", "entry"),
    [
        ("pypi.org", AllowEntry("domain", "pypi.org", None)),
        ("PyPI.org:443", AllowEntry("domain", "pypi.org", 443)),
        ("*.githubusercontent.com:443", AllowEntry("wildcard", "githubusercontent.com", 443)),
        ("198.18.0.10", AllowEntry("ip", "198.18.0.10", None)),
        ("198.18.0.10:5432", AllowEntry("ip", "198.18.0.10", 5432)),
        ("198.18.0.0/15", AllowEntry("cidr", "198.18.0.0/15", None)),
        ("198.18.0.0/24:80", AllowEntry("cidr", "198.18.0.0/24", 80)),
        ("2001:db8::1", AllowEntry("ip", "2001:db8::1", None)),
        ("[2001:db8::1]:443", AllowEntry("ip", "2001:db8::1", 443)),
        ("2001:db8::/32", AllowEntry("cidr", "2001:db8::/32", None)),
        ("localhost", AllowEntry("domain", "localhost", None)),
    ],
)
def test_allow_entries(text: str, entry: AllowEntry) -> None:
    got = parse_allow_entry(text)
    assert got == entry
    assert parse_allow_entry(str(got)) == got


@pytest.mark.parametrize(
    "text",
    ["", " pypi.org", "pypi.org:", "pypi.org:0", "pypi.org:http", "-bad.org", "a..b", "*.", "*",
     "x_y.org", "[::1", "[::1]443", "1.2.3.4/40", "a/b", "300.1.1.1", "exa mple.org"],
)  # fmt: skip
def test_bad_allow_entries(text: str) -> None:
    with pytest.raises(ValueError, match=r"."):
        parse_allow_entry(text)


@pytest.mark.parametrize(
    ("text", "n"),
    [("2G", 2 << 30), ("512M", 512 << 20), ("512m", 512 << 20), ("1.5G", 3 << 29), ("1GiB", 1 << 30),
     ("4096", 4096), (4096, 4096), ("1K", 1024), ("1kb", 1024), ("0", 0), ("1T", 1 << 40)],
)  # fmt: skip
def test_parse_size(text: str | int, n: int) -> None:
    assert parse_size(text) == n


@pytest.mark.parametrize("text", ["", "G", "2X", "-1", -1, True, "1.2.3G", "2 G B", None, 1.5])
def test_parse_size_errors(text: object) -> None:
    with pytest.raises(ValueError, match=r"."):
        parse_size(text)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "s"),
    [("2s", 2.0), ("500ms", 0.5), ("1m", 60.0), ("1h", 3600.0), ("1.5s", 1.5), ("3", 3.0), (3, 3.0),
     (0.25, 0.25)],
)  # fmt: skip
def test_parse_duration(text: str | float, s: float) -> None:
    assert parse_duration(text) == s


@pytest.mark.parametrize("text", ["", "s", "2d", "-1s", -1, False, "1 2s", None, float("inf")])
def test_parse_duration_errors(text: object) -> None:
    with pytest.raises(ValueError, match=r"."):
        parse_duration(text)  # type: ignore[arg-type]


def test_allow_entries_the_enforcer_refuses_are_refused_at_validation() -> None:
    """What validates must be enforceable: host bits in a network are refused
    by sandbox.nft, so the template refuses them too (not at start time)."""
    from supervisor.templates import parse_allow_entry

    with pytest.raises(ValueError, match="host bits"):
        parse_allow_entry("10.0.0.1/8")
    assert parse_allow_entry("10.0.0.0/8").kind == "cidr"
