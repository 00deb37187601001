"""Template registry: lookup by name, extends (deep merge, cycles), --set overrides."""
# ruff: noqa: E501  (tables of one case per line read better than wrapped ones)

from __future__ import annotations

import logging
import textwrap
from pathlib import Path

import pytest

from sandbox.errors import NotFound, TemplateError
from supervisor.templates import AllowEntry, TemplateRegistry, load_file

BASE = """\
name: base
description: the parent
agent:
  command: [bash, -l]
  env: {EDITOR: vi, PAGER: less}
resources:
  memory: 1G
  cpus: 1
  pids: 256
network:
  allow: ["pypi.org:443", "198.18.0.1"]
services:
  web:
    command: [python3, -m, http.server, "8000"]
    port: 8000
    health: {http: /, interval: 2s}
env: {A: "1", B: "2"}
"""


def write(d: Path, name: str, text: str) -> str:
    p = d / name
    p.write_text(textwrap.dedent(text))
    return str(p)


@pytest.fixture
def reg(tmp_path: Path) -> TemplateRegistry:
    write(tmp_path, "base.yaml", BASE)
    return TemplateRegistry([str(tmp_path)])


def test_get_and_not_found(reg: TemplateRegistry) -> None:
    t = reg.get("base")
    assert t.name == "base"
    assert t.resources.pids == 256
    with pytest.raises(NotFound, match="no template named 'nope'"):
        reg.get("nope")


def test_extends_deep_merges(tmp_path: Path, reg: TemplateRegistry) -> None:
    write(
        tmp_path,
        "child.yaml",
        """\
        name: child
        extends: base
        agent:
          env: {EDITOR: nano}
        resources:
          memory: 2G
        network:
          allow: ["files.pythonhosted.org:443"]
        services:
          web:
            port: 9000
        env: {B: "3", C: "4"}
        """,
    )
    t = reg.get("child")
    assert t.name == "child"
    assert t.extends == "base"
    assert t.description == ""  # not inherited: it describes the parent
    # mappings merge
    assert dict(t.agent.env) == {"EDITOR": "nano", "PAGER": "less"}
    assert t.agent.command == ("bash", "-l")
    assert t.resources.memory == 2 << 30
    assert t.resources.cpus == 1.0
    assert t.resources.pids == 256
    assert dict(t.env) == {"A": "1", "B": "3", "C": "4"}
    web = t.service("web")
    assert web.port == 9000
    assert web.command == ("python3", "-m", "http.server", "8000")
    assert web.health is not None
    assert web.health.http == "/"
    # lists replace
    assert t.network.allow == (AllowEntry("domain", "files.pythonhosted.org", 443),)
    # the parent is unchanged
    assert reg.get("base").resources.memory == 1 << 30


def test_extends_chain_and_errors_point_at_the_right_file(
    tmp_path: Path, reg: TemplateRegistry
) -> None:
    write(tmp_path, "mid.yaml", "name: mid\nextends: base\nresources:\n  pids: 128\n")
    leaf = write(tmp_path, "leaf.yaml", "name: leaf\nextends: mid\nresources:\n  cpus: 0.5\n")
    t = reg.get("leaf")
    assert (t.resources.pids, t.resources.cpus, t.resources.memory) == (128, 0.5, 1 << 30)
    assert t.source == leaf
    # an error in the parent is reported at the parent's file and line
    mid = write(tmp_path, "mid.yaml", "name: mid\nextends: base\nresources:\n  pids: 0\n")
    with pytest.raises(TemplateError) as ei:
        reg.get("leaf")
    assert str(ei.value).startswith(f"{mid}:4: resources.pids: must be 1-4194304")


def test_extends_cycle_refused(tmp_path: Path) -> None:
    a = write(tmp_path, "a.yaml", "name: a\nextends: b\n")
    write(tmp_path, "b.yaml", "name: b\nextends: a\n")
    reg = TemplateRegistry([str(tmp_path)])
    with pytest.raises(TemplateError) as ei:
        reg.get("a")
    assert "extends: cycle: a -> b -> a" in str(ei.value)
    # and to itself
    write(tmp_path, "c.yaml", "name: c\nextends: c\n")
    with pytest.raises(TemplateError, match="extends: cycle: c -> c"):
        reg.get("c")
    # a cycle is listed as an error, not a crash
    templates, errors = reg.scan()
    assert templates == []
    assert len(errors) == 3
    assert any(str(e).startswith(f"{a}:2: extends: cycle") for e in errors)


def test_extends_missing_parent(tmp_path: Path) -> None:
    p = write(tmp_path, "o.yaml", "name: o\n\nextends: ghost\n")
    with pytest.raises(TemplateError) as ei:
        TemplateRegistry([str(tmp_path)]).get("o")
    assert str(ei.value).startswith(f"{p}:3: extends: no template named 'ghost'")
    # load_file without a registry cannot resolve it either
    with pytest.raises(TemplateError, match="no template named 'ghost'"):
        load_file(p)


def test_load_file_outside_dirs_resolves_extends(tmp_path: Path, reg: TemplateRegistry) -> None:
    other = tmp_path / "elsewhere"
    other.mkdir()
    p = write(other, "mine.yaml", "name: mine\nextends: base\nresources: {memory: 512M}\n")
    t = load_file(p, reg)
    assert t.resources.memory == 512 << 20
    assert t.resources.pids == 256
    assert t.source == p


def test_sets_override(reg: TemplateRegistry) -> None:
    t = reg.get(
        "base",
        [
            "resources.memory=2G",
            "resources.cpus=0.5",
            "services.web.port=8001",
            "agent.command=[zsh, -l]",
            "network.allow=[]",
            "env.NEW=hello world",
            "services.db.command=[postgres]",
            "workspace.mode=bind",
            "description=",
        ],
    )
    assert t.resources.memory == 2 << 30
    assert t.resources.cpus == 0.5
    assert t.service("web").port == 8001
    assert t.agent.command == ("zsh", "-l")
    assert t.network.allow == ()
    assert dict(t.env)["NEW"] == "hello world"
    assert t.service("db").command == ("postgres",)
    assert t.workspace.mode == "bind"
    assert t.description == ""
    # the file itself is unchanged for the next caller
    assert reg.get("base").resources.memory == 1 << 30


@pytest.mark.parametrize(
    ("item", "expect"),
    [
        ("resources.memory=lots", "--set resources.memory: resources.memory: expected a size"),
        ("resources.memroy=1G", "--set resources.memroy: resources.memroy: unknown key (did you mean 'memory'?)"),
        ("services.web.port=99999", "--set services.web.port: services.web.port: must be 1-65535"),
        ("services.web.port=[1]", "--set services.web.port: services.web.port: must be an integer"),
        ("resources", "--set resources: expected KEY=VALUE"),
        ("=1", "--set =1: expected KEY=VALUE"),
        ("resources..memory=1", "--set resources..memory: resources..memory: empty component"),
        ("name=other", "--set name: name: cannot be overridden"),
        ("extends=x", "--set extends: extends: cannot be overridden"),
        ("resources.memory.x=1", "--set resources.memory.x: resources.memory: is a '1G' value, not a mapping"),
        ("agent.command.9=x", "--set agent.command.9: agent.command.9: no list item '9'"),
        ("env.A=[unclosed", "--set env.A: invalid YAML"),
        ("env.A=!!python/object:os.system x", "--set env.A: YAML tag"),
        ("filesystem=[{path: /a/../b}]", "--set filesystem: filesystem[0].path: '/a/../b' must not contain '..'"),
    ],
)  # fmt: skip
def test_set_errors(reg: TemplateRegistry, item: str, expect: str) -> None:
    with pytest.raises(TemplateError) as ei:
        reg.get("base", [item])
    assert str(ei.value).startswith(expect), str(ei.value)


def test_set_list_item(reg: TemplateRegistry) -> None:
    t = reg.get("base", ["agent.command.0=sh"])
    assert t.agent.command == ("sh", "-l")


def test_registry_rereads_and_finds_by_name(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    d = tmp_path / "t"
    d.mkdir()
    reg = TemplateRegistry([str(d)])
    assert reg.list() == []
    write(d, "whatever.yaml", "name: real-name\ndescription: one\n")
    with caplog.at_level(logging.WARNING, logger="supervisor.templates"):
        assert [t.name for t in reg.list()] == ["real-name"]
    assert "its name should be real-name.yaml" in caplog.text
    assert reg.get("real-name").description == "one"
    write(d, "whatever.yaml", "name: real-name\ndescription: two\n")
    assert reg.get("real-name").description == "two"  # re-read on every call


def test_earlier_dir_wins_and_broken_files_do_not_hide_others(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    repo = tmp_path / "repo"
    etc.mkdir()
    repo.mkdir()
    write(etc, "default.yaml", "name: default\ndescription: site override\n")
    write(repo, "default.yaml", "name: default\ndescription: shipped\n")
    write(repo, "other.yaml", "name: other\n")
    bad = write(repo, "bad.yaml", "name: bad\nresources: {pids: 0}\n")
    write(repo, "notes.txt", "not a template")
    reg = TemplateRegistry([str(etc), str(repo), str(tmp_path / "missing")])
    templates, errors = reg.scan()
    assert [t.name for t in templates] == ["default", "other"]
    assert reg.get("default").description == "site override"
    assert len(errors) == 1
    assert str(errors[0]).startswith(f"{bad}:2: resources.pids")
    with pytest.raises(TemplateError):
        reg.get("bad")


def test_stored_form_is_validated_too(reg: TemplateRegistry) -> None:
    from supervisor.templates import template_from_dict, template_to_dict

    d = template_to_dict(reg.get("base"))
    d["resources"]["pids"] = 0
    with pytest.raises(
        TemplateError, match=r"^<stored template>: resources\.pids: must be 1-4194304"
    ):
        template_from_dict(d)
    with pytest.raises(TemplateError, match="keys must be strings"):
        template_from_dict({"name": "x", "env": {1: "a"}})
