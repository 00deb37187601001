"""The `corral` CLI through click's CliRunner against the real API server on a unix socket."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from click.testing import CliRunner, Result

from supervisor.cli import cli, one_line
from tests.unit.test_api_fake import ApiThread, FakeManager, short_tmpdir


class Api:
    def __init__(self, thread: ApiThread) -> None:
        self.thread = thread
        self.manager = thread.manager
        self.path = thread.path

    def run(self, *args: str, input: bytes | str | None = None,
            env: dict[str, str] | None = None) -> Result:
        return CliRunner().invoke(cli, ["--socket", self.path, *args], input=input, env=env)


@pytest.fixture
def api() -> Iterator[Api]:
    with short_tmpdir() as tmp, ApiThread(FakeManager(), os.path.join(tmp, "api.sock")) as t:
        yield Api(t)


def _error_line(result: Result) -> str:
    """The one line on stderr an operational error must give."""
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("corral: error: ")
    return lines[0]


# -- exit codes and the error line -----------------------------------------------------


def test_daemon_not_running_is_exit_1_with_a_hint() -> None:
    with short_tmpdir() as tmp:
        missing = os.path.join(tmp, "none.sock")
        result = CliRunner().invoke(cli, ["--socket", missing, "ps"])
        line = _error_line(result)
        assert "daemon not running" in line
        assert missing in line
        assert "(hint: " in line
        assert result.stdout == ""
        # CORRAL_SOCKET names the socket too; a dead daemon's leftover socket file counts.
        stale = os.path.join(tmp, "stale.sock")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(stale)
        s.close()
        result = CliRunner().invoke(cli, ["status"], env={"CORRAL_SOCKET": stale})
        assert stale in _error_line(result)


def test_corral_socket_env_reaches_a_running_daemon(api: Api) -> None:
    result = CliRunner().invoke(cli, ["--json", "status"], env={"CORRAL_SOCKET": api.path})
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["cgroup_driver"] == "v1"


def test_operational_errors_are_one_line_exit_1(api: Api) -> None:
    line = _error_line(api.run("inspect", "nope"))
    assert line == "corral: error: no agent named 'nope' (hint: see `corral ps --all`)"
    line = _error_line(api.run("create", "web", "--template", "default"))
    assert "exists already" in line
    line = _error_line(api.run("rm", "web"))
    assert "is running (hint: stop it first or use --force)" in line
    line = _error_line(api.run("create", "x", "--template", "broken"))
    assert line == "corral: error: overlayfs is missing (hint: modprobe overlay)"
    line = _error_line(api.run("create", "x", "--template", "crash"))
    assert "internal error: boom" in line
    line = _error_line(api.run("handoff", "locked", "ann"))
    assert "only the owner" in line


def test_usage_errors_exit_2(api: Api) -> None:
    for args in (
        ["no-such-command"],
        ["create", "x"],  # --template is required
        ["grant", "web", "ann", "--role", "king"],
        ["create", "x", "--template", "default", "--set", "novalue"],
        ["stop", "web", "--timeout", "-1"],
        ["exec", "web"],  # no command
        ["events", "--since", "yesterday"],
    ):
        result = api.run(*args)
        assert result.exit_code == 2, (args, result.output)
    assert api.manager.calls == []


def test_bad_agent_names_are_refused_before_any_request(api: Api) -> None:
    for bad in ("Web", "1web", "a" * 32, "../etc", "web/../../x", "we b", "x_y"):
        result = api.run("create", bad, "--template", "default", "--no-start")
        assert "invalid agent name" in _error_line(result), bad
        assert "invalid agent name" in _error_line(api.run("inspect", bad)), bad
    assert api.manager.calls == []
    assert set(api.manager.agents) == {"web", "old"}
    # Positive control: a good name goes through.
    assert api.run("create", "a-1", "--template", "default", "--no-start").exit_code == 0
    assert "a-1" in api.manager.agents


# -- --json before and after -----------------------------------------------------------


@pytest.mark.parametrize("where", ["before", "after"])
def test_json_before_and_after_the_command(api: Api, where: str) -> None:
    def run(*args: str) -> Any:
        argv = ["--json", *args] if where == "before" else [*args, "--json"]
        result = api.run(*argv)
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    assert run("status")["agents"] == {"running": 1, "stopped": 1}
    assert [a["name"] for a in run("ps")] == ["web"]
    assert run("inspect", "web")["session"]["pid"] == 1234
    assert run("template", "list")[0]["name"] == "default"
    assert run("diff", "web") == [{"path": "a.txt", "kind": "added", "type": "file"}]
    assert [e["id"] for e in run("events")] == [1, 2]
    assert run("stop", "web", "--timeout", "5")["state"] == "stopped"
    assert api.manager.calls[-1] == ("stop", "web", 5.0)


def test_status_and_inspect_text(api: Api) -> None:
    result = api.run("status")
    assert result.exit_code == 0
    assert result.stdout.splitlines()[:3] == [
        "corral 0.1.0", "cgroup driver: v1", "agents: running 1, stopped 1"]
    result = api.run("inspect", "web")
    assert result.exit_code == 0
    assert "state: running" in result.stdout
    assert "  pid: 1234" in result.stdout


# -- lifecycle -------------------------------------------------------------------------


def test_create_defaults_to_cwd_and_passes_sets(
    api: Api, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    cwd = tmp_path / "proj"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    result = api.run("create", "alpha", "-t", "default",
                     "--set", "resources.memory=1G", "--set", "env.X=a=b")
    assert result.exit_code == 0, result.output
    assert result.stdout == "alpha: running\n"
    assert api.manager.calls[-1] == (
        "create", "alpha", "default", str(cwd),
        ("resources.memory=1G", "env.X=a=b"), True)
    result = api.run("create", "beta", "--template", "default", "--project", str(tmp_path),
                     "--no-start")
    assert result.exit_code == 0
    assert api.manager.calls[-1][3:] == (str(tmp_path), (), False)
    assert api.manager.agents["beta"]["state"] == "stopped"


def test_lifecycle_commands(api: Api) -> None:
    assert api.run("start", "old").stdout == "old: running\n"
    assert api.run("restart", "old").stdout == "old: running\n"
    assert api.run("stop", "old").stdout == "old: stopped\n"
    result = api.run("rm", "old", "--keep-workspace")
    assert (result.exit_code, result.stdout) == (0, "old: removed\n")
    assert api.manager.calls[-1] == ("remove", "old", False, True)
    assert api.run("rm", "web", "--force").exit_code == 0
    assert api.manager.calls[-1] == ("remove", "web", True, False)
    assert api.manager.agents == {}


def test_ps_table_columns(api: Api) -> None:
    result = api.run("ps")
    assert result.exit_code == 0
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["NAME", "STATE", "TEMPLATE", "UPTIME", "CPU", "MEMORY", "PIDS",
                              "PORTS", "USERS"]
    assert len(rows) == 1
    cells = rows[0].split()
    assert cells[:3] == ["web", "running", "default"]
    assert cells[4:] == ["1.5%", "50.0M", "4", "web:20001", "root"]
    all_rows = api.run("ps", "--all").stdout.splitlines()[1:]
    assert [r.split()[:2] for r in all_rows] == [["web", "running"], ["old", "stopped"]]
    assert all_rows[1].split()[3] == "-"  # no uptime when stopped


def test_top_once_prints_one_frame(api: Api) -> None:
    result = api.run("top", "--once")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0].startswith("corral top")
    assert "2 agents, 1 running" in lines[0]
    assert lines[2].split()[0] == "NAME"
    assert {line.split()[0] for line in lines[3:]} == {"web", "old"}


# -- templates -------------------------------------------------------------------------


def test_template_commands(api: Api, tmp_path: Any) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("name: good\n")
    result = api.run("template", "validate", str(good))
    assert (result.exit_code, result.stdout) == (0, f"{good}: ok (template good)\n")
    bad = tmp_path / "x.yaml"
    bad.write_text("name: x\nbad: 1\n")
    line = _error_line(api.run("template", "validate", str(bad)))
    assert line == f"corral: error: {bad}:3: services.web.port: must be 1-65535"
    assert "no such file" in _error_line(api.run("template", "validate", str(tmp_path / "n")))
    result = api.run("template", "show", "default")
    assert result.exit_code == 0
    assert "name: default" in result.stdout
    assert "no template" in _error_line(api.run("template", "show", "other"))
    result = api.run("template", "list")
    assert result.stdout.split() == ["NAME", "DESCRIPTION", "PATH", "default", "a", "shell",
                                     "/t/default.yaml"]


# -- logs and events -------------------------------------------------------------------


def test_logs(api: Api) -> None:
    result = api.run("logs", "web", "--tail", "2")
    assert (result.exit_code, result.stdout) == (0, "session line 4\nsession line 5\n")
    result = api.run("logs", "web", "--service", "web", "-f", "--tail", "1")
    assert (result.exit_code, result.stdout) == (0, "web line 5\nmore 1\nmore 2\n")
    result = api.run("logs", "web", "--json", "--tail", "1")
    assert json.loads(result.stdout)["output"] == "session line 5\n"
    assert "no service" in _error_line(api.run("logs", "web", "-s", "db"))


def test_events_text_json_and_follow(api: Api) -> None:
    result = api.run("events", "--agent", "web")
    assert result.exit_code == 0
    first = result.stdout.splitlines()[0]
    assert first == "2026-01-01T00:00:00+00:00 agent.created web template=default"
    result = api.run("events", "-f", "--json")
    assert result.exit_code == 0
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [e["kind"] for e in lines] == ["attach", "detach"]
    result = api.run("--json", "events", "-f", "--since", "2026-01-01T00:00:01+00:00")
    assert [json.loads(line)["id"] for line in result.stdout.splitlines()] == [2, 3, 4]
    result = api.run("events", "-f", "--agent", "web")
    assert result.stdout.splitlines()[0].split()[1:] == ["attach", "web", "user=root"]


# -- workspace, users ------------------------------------------------------------------


def test_diff_and_commit(api: Api) -> None:
    assert api.run("diff", "web").stdout.startswith("--- /dev/null\n+++ b/a.txt")
    assert api.run("diff", "web", "--stat").stdout == " a.txt | 1 +\n 1 file changed\n"
    result = api.run("commit", "web", "--branch", "agent/web", "-m", "work")
    assert (result.exit_code, result.stdout) == (0, "web: committed 0123abc on branch agent/web\n")
    assert api.manager.calls[-1] == ("commit", "web", "agent/web", "work")
    assert api.run("commit", "web").exit_code == 2  # --branch is required


def test_users_and_grants(api: Api, tmp_path: Any) -> None:
    key = tmp_path / "id.pub"
    key.write_text("# comment\nssh-ed25519 AAAAC3Nza ann@laptop\n\n")
    result = api.run("user", "add", "ann", "--key", str(key))
    assert (result.exit_code, result.stdout) == (0, "ann: added with 1 key(s)\n")
    assert api.manager.users == {"ann": ["ssh-ed25519 AAAAC3Nza ann@laptop"]}
    empty = tmp_path / "empty.pub"
    empty.write_text("\n")
    assert "no public key" in _error_line(api.run("user", "add", "bob", "--key", str(empty)))
    assert "cannot read" in _error_line(api.run("user", "add", "bob", "--key", str(tmp_path)))
    assert api.run("user", "list").stdout.split() == ["NAME", "KEYS", "GRANTS", "ann", "1", "-"]
    assert json.loads(api.run("user", "list", "--json").stdout)[0]["name"] == "ann"
    assert api.run("grant", "web", "ann", "--role", "viewer").exit_code == 0
    assert api.manager.grants == {("web", "ann"): "viewer"}
    assert api.run("handoff", "web", "ann").stdout == "web: ann is now the owner\n"
    assert api.manager.grants == {("web", "ann"): "owner"}
    assert api.run("revoke", "web", "ann").exit_code == 0
    assert api.manager.grants == {}
    assert "has no access" in _error_line(api.run("revoke", "web", "ann"))
    assert api.run("user", "rm", "ann").exit_code == 0
    assert "no user" in _error_line(api.run("user", "rm", "ann"))


# -- exec over the real WebSocket ------------------------------------------------------


def test_exec_relays_stdout_stderr_and_exit_code(api: Api) -> None:
    result = api.run("exec", "web", "--", "sh", "-c", "echo out; echo err >&2; exit 3")
    assert result.exit_code == 3, (result.output, result.exception)
    assert result.stdout == "out\n"
    assert result.stderr == "err\n"
    assert api.manager.calls[-1] == (
        "exec", "web", ("sh", "-c", "echo out; echo err >&2; exit 3"), "root", None)


def test_exec_relays_stdin_until_eof(api: Api) -> None:
    data = "".join(f"line {i}\n" for i in range(2000))
    result = api.run("exec", "web", "--user", "agent", "--", "cat", input=data)
    assert result.exit_code == 0, (result.output, result.exception)
    assert result.stdout == data
    assert api.manager.calls[-1][3] == "root"  # the caller
    assert api.manager.run_as[-1] == "agent"  # --user: who inside


def test_exec_with_tty_and_errors(api: Api) -> None:
    result = api.run("exec", "web", "--tty", "--", "sh", "-c", "test -t 1 && echo is-a-tty")
    assert result.exit_code == 0, (result.output, result.exception)
    assert "is-a-tty" in result.stdout
    assert api.manager.calls[-1][4][0]  # a TERM was sent
    assert "no agent named 'nope'" in _error_line(api.run("exec", "nope", "--", "true"))


def test_one_line_folds_multiline_errors() -> None:
    from sandbox.errors import TemplateError

    text = one_line(TemplateError("a.yaml:1: x: bad\na.yaml:2: y: bad", hint="fix it"))
    assert text == "a.yaml:1: x: bad; a.yaml:2: y: bad (hint: fix it)"


def test_exec_passes_the_commands_own_options_through(api: Api) -> None:
    result = api.run("exec", "web", "sh", "-c", "echo $0 $1", "-t", "-u")
    assert result.exit_code == 0, (result.output, result.exception)
    assert result.stdout == "-t -u\n"
    assert api.manager.calls[-1][3:] == ("root", None)


def test_exec_relays_binary_data_intact(api: Api) -> None:
    data = os.urandom(2 * 1024 * 1024)
    result = api.run("exec", "web", "--", "cat", input=data)
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert result.stdout_bytes == data
