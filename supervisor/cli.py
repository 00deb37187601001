"""The `corral` command line (click): CONTRACT.md's CLI section, over the control API.

Exit codes: 0 success, 1 operational error (one line `corral: error: ...` on
stderr, also when the daemon is not running), 2 usage error (click's own).
`--json` works before the command (global) and after the name of every
command that prints; `--socket` / CORRAL_SOCKET pick the daemon.

Only this module formats errors for people: everything below raises
sandbox.errors classes, and CorralGroup turns them into the one-line message.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import select
import sys
import termios
import time
import tty
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, NoReturn, TypeVar

import click

from sandbox.errors import CorralError
from sandbox.spec import check_name
from supervisor import table
from supervisor.client import DEFAULT_SOCKET, Client, agent_path, with_query

F = TypeVar("F", bound=Callable[..., Any])


# -- errors and output ----------------------------------------------------------------


def one_line(exc: CorralError) -> str:
    """`<what went wrong> (hint: <what to do>)`, newlines folded so it stays one line."""
    message = str(exc.args[0]) if exc.args else type(exc).__name__
    text = f"{message} (hint: {exc.hint})" if exc.hint else message
    return "; ".join(part.strip() for part in text.splitlines() if part.strip())


class OperationalError(click.ClickException):
    """Exit 1 with `corral: error: ...` on stderr."""

    exit_code = 1

    def show(self, file: Any = None) -> None:
        click.echo(f"corral: error: {self.format_message()}", err=True)


def _lost_connection_errors() -> tuple[type[BaseException], ...]:
    """Errors meaning the daemon went away; aiohttp's only if it was loaded
    (only attach/exec need it: it costs most of the CLI's start-up time, so it
    is imported on demand)."""
    errors: tuple[type[BaseException], ...] = (http.client.HTTPException, ConnectionResetError)
    aiohttp = sys.modules.get("aiohttp")
    return (*errors, aiohttp.ClientError) if aiohttp is not None else errors


class CorralGroup(click.Group):
    """The root group: turns every CorralError raised below it into exit 1 + one line."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CorralError as exc:
            raise OperationalError(one_line(exc)) from None
        except _lost_connection_errors() as exc:
            # The daemon went away in the middle of an answer or a stream.
            raise OperationalError(one_line(CorralError(
                f"lost the connection to the daemon: {exc or type(exc).__name__}",
                hint="see `corral status` and the daemon's log",
            ))) from None


@dataclass
class Options:
    socket: str
    json: bool

    def client(self) -> Client:
        return Client(self.socket)


def _opts(ctx: click.Context) -> Options:
    obj = ctx.find_object(Options)
    assert obj is not None  # noqa: S101 - the root group always sets it
    return obj


def json_option(f: F) -> F:
    """`--json` after the command's name, same meaning as the global one."""
    return click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")(f)


def _want_json(ctx: click.Context, as_json: bool) -> bool:
    return as_json or _opts(ctx).json


def _dump(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


def _emit(ctx: click.Context, as_json: bool, obj: Any, text: str | Callable[[], str]) -> None:
    if _want_json(ctx, as_json):
        _dump(obj)
    else:
        click.echo(text() if callable(text) else text)


def _agent(name: str) -> str:
    # Checked here too so a bad name never becomes part of a URL.
    return check_name(name, "agent name")


def _state(result: Any) -> str:
    if isinstance(result, dict):
        state = result.get("state")
        if state:
            return str(state)
    return "ok"


def _bin_stdout() -> BinaryIO:
    # Text written through click.echo must come out first.
    sys.stdout.flush()
    return sys.stdout.buffer


def _write_out(data: bytes) -> None:
    out = _bin_stdout()
    out.write(data)
    out.flush()


@contextlib.contextmanager
def _until_interrupted(ctx: click.Context) -> Iterator[None]:
    """Follow streams end with Ctrl-C: exit 130 quietly, as shells expect."""
    try:
        yield
    except KeyboardInterrupt:
        ctx.exit(130)


# -- the root -------------------------------------------------------------------------


@click.group(cls=CorralGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--socket", "socket_path", envvar="CORRAL_SOCKET", default=DEFAULT_SOCKET,
    show_default=True, help="The daemon's API socket (env CORRAL_SOCKET).",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.version_option(package_name="corral", prog_name="corral")
@click.pass_context
def cli(ctx: click.Context, socket_path: str, as_json: bool) -> None:
    """corral: isolated, persistent sandboxes for AI coding agents."""
    ctx.obj = Options(socket=socket_path, json=as_json)


@cli.command()
@click.option("--config", "config", envvar="CORRAL_CONFIG", type=click.Path(dir_okay=False),
              help="YAML config file (env CORRAL_CONFIG).")
@click.pass_context
def daemon(ctx: click.Context, config: str | None) -> None:
    """Run the supervisor in the foreground."""
    # Imported lazily: the daemon pulls in the whole supervisor, the CLI should start fast.
    from supervisor import daemon as daemon_module

    ctx.exit(daemon_module.run(config))


@cli.command()
@json_option
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Daemon version, cgroup driver (v1/v2), agent counts."""
    result = _opts(ctx).client().status()
    _emit(ctx, as_json, result, lambda: _status_text(result))


def _status_text(status: dict[str, Any]) -> str:
    rest = dict(status)
    lines = [f"corral {rest.pop('version', '?')}",
             f"cgroup driver: {rest.pop('cgroup_driver', '?')}"]
    agents = rest.pop("agents", {})
    if isinstance(agents, dict):
        counts = ", ".join(f"{state} {n}" for state, n in agents.items()) or "none"
        lines.append(f"agents: {counts}")
    if rest:
        lines.append(table.tree(rest))
    return "\n".join(lines)


# -- templates ------------------------------------------------------------------------


@cli.group()
def template() -> None:
    """List, show and check templates."""


@template.command("list")
@json_option
@click.pass_context
def template_list(ctx: click.Context, as_json: bool) -> None:
    """List the templates the daemon finds."""
    result = _opts(ctx).client().templates()
    _emit(ctx, as_json, result, lambda: table.table(
        ("NAME", "DESCRIPTION", "PATH"),
        ([str(t.get("name", "?")), str(t.get("description") or "-"), str(t.get("path") or "-")]
         for t in result),
    ))


@template.command("show")
@click.argument("name")
@json_option
@click.pass_context
def template_show(ctx: click.Context, name: str, as_json: bool) -> None:
    """Print a template, resolved (extends applied, defaults filled in)."""
    import yaml  # only here: ~15 ms of start-up every other command would pay

    result = _opts(ctx).client().template(check_name(name, "template name"))
    _emit(ctx, as_json, result,
          lambda: yaml.safe_dump(result, sort_keys=False, default_flow_style=False).rstrip())


@template.command("validate")
@click.argument("file")
@json_option
@click.pass_context
def template_validate(ctx: click.Context, file: str, as_json: bool) -> None:
    """Check a template file (exit 1 with file:line: reason)."""
    if not Path(file).is_file():
        raise CorralError(f"{file}: no such file")
    result = _opts(ctx).client().validate_template(file)
    name = result.get("name") if isinstance(result, dict) else None
    _emit(ctx, as_json, result, f"{file}: ok" + (f" (template {name})" if name else ""))


# -- lifecycle ------------------------------------------------------------------------


def _check_set(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> list[str]:
    for value in values:
        key = value.split("=", 1)[0]
        if "=" not in value or not key:
            raise click.BadParameter(f"{value!r} is not KEY=VALUE (e.g. resources.memory=1G)")
    return list(values)


@cli.command()
@click.argument("name")
@click.option("--template", "-t", "template_name", required=True, help="Template name.")
@click.option("--project", type=click.Path(exists=True, file_okay=False),
              help="Project directory (default: the current directory).")
@click.option("--set", "sets", multiple=True, callback=_check_set, metavar="KEY=VALUE",
              help="Override a template key (dotted path); repeatable.")
@click.option("--no-start", is_flag=True, help="Create only; do not start.")
@json_option
@click.pass_context
def create(ctx: click.Context, name: str, template_name: str, project: str | None,
           sets: list[str], no_start: bool, as_json: bool) -> None:
    """Create an agent (and start it unless --no-start)."""
    project_dir = str(Path(project or Path.cwd()).absolute())
    result = _opts(ctx).client().create(
        _agent(name), check_name(template_name, "template name"), project_dir, sets,
        start=not no_start,
    )
    _emit(ctx, as_json, result, f"{name}: {_state(result)}")


@cli.command()
@click.argument("name")
@json_option
@click.pass_context
def start(ctx: click.Context, name: str, as_json: bool) -> None:
    """Start a stopped agent."""
    result = _opts(ctx).client().start(_agent(name))
    _emit(ctx, as_json, result, f"{name}: {_state(result)}")


@cli.command()
@click.argument("name")
@click.option("--timeout", type=click.FloatRange(min=0), help="Seconds before SIGKILL.")
@json_option
@click.pass_context
def stop(ctx: click.Context, name: str, timeout: float | None, as_json: bool) -> None:
    """Stop an agent (SIGTERM, then SIGKILL after the timeout)."""
    result = _opts(ctx).client().stop(_agent(name), timeout)
    _emit(ctx, as_json, result, f"{name}: {_state(result)}")


@cli.command()
@click.argument("name")
@json_option
@click.pass_context
def restart(ctx: click.Context, name: str, as_json: bool) -> None:
    """Stop and start an agent, with its template re-read (limits, network, services)."""
    result = _opts(ctx).client().restart(_agent(name))
    _emit(ctx, as_json, result, f"{name}: {_state(result)}")


@cli.command()
@click.argument("name")
@json_option
@click.pass_context
def reload(ctx: click.Context, name: str, as_json: bool) -> None:
    """Apply the template's current network allow-list to a running agent, live."""
    result = _opts(ctx).client().reload(_agent(name))
    _emit(ctx, as_json, result, f"{name}: reloaded ({_state(result)})")


@cli.command()
@click.argument("name")
@click.option("--force", is_flag=True, help="Stop it first if it is running.")
@click.option("--keep-workspace", is_flag=True, help="Keep the agent's workspace changes.")
@json_option
@click.pass_context
def rm(ctx: click.Context, name: str, force: bool, keep_workspace: bool, as_json: bool) -> None:
    """Remove an agent."""
    result = _opts(ctx).client().remove(_agent(name), force=force, keep_workspace=keep_workspace)
    _emit(ctx, as_json, result, f"{name}: removed")


@cli.command()
@click.option("--all", "-a", "show_all", is_flag=True, help="Include stopped and failed agents.")
@json_option
@click.pass_context
def ps(ctx: click.Context, show_all: bool, as_json: bool) -> None:
    """List agents."""
    result = _opts(ctx).client().ps(show_all)
    _emit(ctx, as_json, result, lambda: table.ps_table(result))


@cli.command()
@click.argument("name")
@json_option
@click.pass_context
def inspect(ctx: click.Context, name: str, as_json: bool) -> None:
    """Everything about one agent."""
    result = _opts(ctx).client().inspect(_agent(name))
    _emit(ctx, as_json, result, lambda: table.tree(result))


# -- interactive ----------------------------------------------------------------------


def _stdin_source() -> int | BinaryIO:
    """The real descriptor 0 when stdin is the process's own, else the stream object."""
    stream = sys.stdin.buffer
    try:
        return stream.fileno()
    except (OSError, ValueError):
        return stream  # e.g. click's test runner: a BytesIO


@cli.command("exec", context_settings={"ignore_unknown_options": True})
@click.argument("name")
# Long options only: short ones would capture the command's own flags
# (`corral exec web ls -t` must reach ls), since click parses interspersed options.
@click.option("--user", help="Run as this user inside: 'agent' (the default and the only "
              "one: a sandbox has no root and no second user).")
@click.option("--tty", "want_tty", is_flag=True,
              help="Give the command a terminal (interactive programs).")
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_context
def exec_cmd(ctx: click.Context, name: str, user: str | None, want_tty: bool,
             argv: tuple[str, ...]) -> None:
    """Run a command inside the sandbox; its exit code becomes corral's.

    Put `--` before the command when it has options: corral exec NAME -- ls -la
    """
    from supervisor import termattach
    from supervisor.client import AsyncClient

    path = agent_path(_agent(name), "exec")
    stdin = _stdin_source()
    tty_fd = stdin if want_tty and isinstance(stdin, int) and os.isatty(stdin) else None
    size = termattach.terminal_size(1, 0) or (80, 24)
    request = {
        "argv": list(argv), "tty": want_tty, "term": os.environ.get("TERM") or "xterm-256color",
        "cols": size[0], "rows": size[1], "env": {}, "user": user,
    }
    stderr = sys.stderr.buffer

    async def run() -> int:
        async with AsyncClient(_opts(ctx).socket) as client:
            ws = await client.ws_connect(path)
            return await termattach.exec_terminal(
                ws, request, stdin=stdin, stdout=termattach.stream_writer(_bin_stdout()),
                stderr=termattach.stream_writer(stderr), tty_fd=tty_fd,
            )

    import asyncio  # only here: it costs ~40 ms of every command's start-up
    ctx.exit(asyncio.run(run()))


@cli.command()
@click.argument("name")
@click.option("--read-only", is_flag=True, help="Watch only: keystrokes are not sent.")
@click.pass_context
def attach(ctx: click.Context, name: str, read_only: bool) -> None:
    """Attach this terminal to the agent's session; detach with Ctrl-]."""
    from supervisor import termattach
    from supervisor.client import AsyncClient

    size = termattach.terminal_size(1, 0)
    query: dict[str, Any] = {"read_only": read_only}
    if size is not None:
        query.update(cols=size[0], rows=size[1])
    path = with_query(agent_path(_agent(name), "attach"), query)

    async def run() -> str:
        async with AsyncClient(_opts(ctx).socket) as client:
            ws = await client.ws_connect(path)
            mode = "read-only; " if read_only else ""
            click.echo(f"[attached to {name}: {mode}detach with Ctrl-]]", err=True)
            return await termattach.attach_terminal(ws, read_only=read_only)

    import asyncio  # only here: it costs ~40 ms of every command's start-up
    reason = asyncio.run(run())
    if reason == "detached":
        click.echo(f"\r\n[detached from {name}; it keeps running]", err=True)
    else:
        click.echo(f"\r\n[the session of {name} ended]", err=True)


@cli.command()
@click.argument("name")
@click.option("--service", "-s", help="A service's output instead of the session's.")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new output.")
@click.option("--tail", "-n", type=click.IntRange(min=0), help="Only the last N lines.")
@json_option
@click.pass_context
def logs(ctx: click.Context, name: str, service: str | None, follow: bool, tail: int | None,
         as_json: bool) -> None:
    """Session or service output."""
    client, agent = _opts(ctx).client(), _agent(name)
    as_json = _want_json(ctx, as_json)
    if not follow:
        data = client.logs(agent, service, tail)
        if as_json:
            _dump({"agent": agent, "service": service,
                   "output": data.decode("utf-8", "replace")})
        else:
            _write_out(data)
        return
    with _until_interrupted(ctx):
        for chunk in client.follow_logs(agent, service, tail):
            if as_json:
                click.echo(json.dumps({"output": chunk.decode("utf-8", "replace")}))
            else:
                _write_out(chunk)


@cli.command()
@click.option("--follow", "-f", is_flag=True, help="Keep printing new events.")
@click.option("--agent", help="Only this agent's events.")
@click.option("--since", help="Only events after this ISO time.")
@json_option
@click.pass_context
def events(ctx: click.Context, follow: bool, agent: str | None, since: str | None,
           as_json: bool) -> None:
    """The event stream: lifecycle, health, security, attach/detach."""
    client = _opts(ctx).client()
    as_json = _want_json(ctx, as_json)
    if agent is not None:
        _agent(agent)
    if since is not None and table.parse_time(since) is None:
        raise click.BadParameter(f"{since!r} is not an ISO time", param_hint="--since")
    if not follow:
        result = client.events(agent, since)
        if as_json:
            _dump(result)
        else:
            for event in result:
                click.echo(table.event_line(event))
        return
    with _until_interrupted(ctx):
        for event in client.follow_events(agent, since):
            click.echo(json.dumps(event, default=str) if as_json else table.event_line(event))


# -- workspace ------------------------------------------------------------------------


@cli.command()
@click.argument("name")
@click.option("--stat", is_flag=True, help="A summary per file.")
@json_option
@click.pass_context
def diff(ctx: click.Context, name: str, stat: bool, as_json: bool) -> None:
    """What the agent changed in its workspace relative to the project."""
    client, agent = _opts(ctx).client(), _agent(name)
    if _want_json(ctx, as_json):
        _dump(client.diff(agent, "json"))
        return
    text = client.diff(agent, "stat" if stat else "unified")
    click.echo(text, nl=bool(text) and not text.endswith("\n"))


@cli.command()
@click.argument("name")
@click.option("--branch", "-b", required=True, help="Branch of the project's repository.")
@click.option("--message", "-m", help="Commit message.")
@json_option
@click.pass_context
def commit(ctx: click.Context, name: str, branch: str, message: str | None,
           as_json: bool) -> None:
    """Record the agent's changes as one commit on BRANCH (the working tree is untouched)."""
    result = _opts(ctx).client().commit(_agent(name), branch, message)
    sha = result.get("commit", "?") if isinstance(result, dict) else "?"
    _emit(ctx, as_json, result, f"{name}: committed {sha} on branch {branch}")


# -- users and access -----------------------------------------------------------------


@cli.group()
def user() -> None:
    """Team members and their SSH public keys."""


def _read_keys(path: str) -> list[str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CorralError(f"cannot read {path}: {exc}") from None
    keys = [line.strip() for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]
    if not keys:
        raise CorralError(f"{path}: no public key in it",
                          hint="pass a file like ~/.ssh/id_ed25519.pub")
    return keys


@user.command("add")
@click.argument("name")
@click.option("--key", "key_file", required=True, help="SSH public key file (one key a line).")
@json_option
@click.pass_context
def user_add(ctx: click.Context, name: str, key_file: str, as_json: bool) -> None:
    """Add a team member (or more keys to one)."""
    keys = _read_keys(key_file)
    result = _opts(ctx).client().add_user(name, keys)
    _emit(ctx, as_json, result, f"{name}: added with {len(keys)} key(s)")


@user.command("rm")
@click.argument("name")
@json_option
@click.pass_context
def user_rm(ctx: click.Context, name: str, as_json: bool) -> None:
    """Remove a team member and their grants."""
    result = _opts(ctx).client().remove_user(name)
    _emit(ctx, as_json, result, f"{name}: removed")


@user.command("list")
@json_option
@click.pass_context
def user_list(ctx: click.Context, as_json: bool) -> None:
    """List team members."""
    result = _opts(ctx).client().users()
    _emit(ctx, as_json, result, lambda: _users_text(result))


def _users_text(users: Any) -> str:
    rows = []
    for entry in users or []:
        if not isinstance(entry, dict):
            rows.append([str(entry), "-", "-"])
            continue
        keys = entry.get("keys")
        grants = entry.get("grants")
        rows.append([
            str(entry.get("name", "?")),
            str(len(keys)) if isinstance(keys, list) else str(keys or "-"),
            ",".join(f"{a}:{r}" for a, r in grants.items()) if isinstance(grants, dict)
            else "-",
        ])
    return table.table(("NAME", "KEYS", "GRANTS"), rows)


@cli.command()
@click.argument("name")
@click.argument("user_name", metavar="USER")
@click.option("--role", required=True, type=click.Choice(["viewer", "collaborator", "owner"]))
@json_option
@click.pass_context
def grant(ctx: click.Context, name: str, user_name: str, role: str, as_json: bool) -> None:
    """Give USER a role on agent NAME."""
    result = _opts(ctx).client().grant(_agent(name), user_name, role)
    _emit(ctx, as_json, result, f"{name}: {user_name} is {role}")


@cli.command()
@click.argument("name")
@click.argument("user_name", metavar="USER")
@json_option
@click.pass_context
def revoke(ctx: click.Context, name: str, user_name: str, as_json: bool) -> None:
    """Take USER's access to agent NAME away (live connections end too)."""
    result = _opts(ctx).client().revoke(_agent(name), user_name)
    _emit(ctx, as_json, result, f"{name}: {user_name} has no access")


@cli.command()
@click.argument("name")
@click.argument("user_name", metavar="USER")
@json_option
@click.pass_context
def handoff(ctx: click.Context, name: str, user_name: str, as_json: bool) -> None:
    """Give the agent's control (owner role) to USER."""
    result = _opts(ctx).client().handoff(_agent(name), user_name)
    _emit(ctx, as_json, result, f"{name}: {user_name} is now the owner")


# -- top ------------------------------------------------------------------------------


def top_frame(agents: list[dict[str, Any]], now: datetime | None = None) -> str:
    now = now or datetime.now(UTC)
    running = sum(1 for a in agents if a.get("state") in ("running", "degraded"))
    header = (f"corral top - {now:%H:%M:%S} - {len(agents)} agents, {running} running"
              "   (q to quit)")
    # The ps table keeps CONTRACT.md's columns; who waits for a person goes up here.
    waiting = [str(a.get("name")) for a in agents if a.get("needs_input")]
    if waiting:
        header += "\nneeds input: " + ", ".join(waiting)
    return header + "\n\n" + table.ps_table(agents, now)


@cli.command()
@click.option("--once", is_flag=True, help="Print one frame and exit.")
@click.option("--interval", type=click.FloatRange(min=0.2), default=2.0, show_default=True,
              help="Seconds between refreshes.")
@json_option
@click.pass_context
def top(ctx: click.Context, once: bool, interval: float, as_json: bool) -> None:
    """Live, refreshing view of all agents (q to quit)."""
    client = _opts(ctx).client()
    if once or _want_json(ctx, as_json):
        agents = client.ps(True)
        _emit(ctx, as_json, agents, lambda: top_frame(agents))
        return
    with _until_interrupted(ctx), _cbreak(0) as interactive:
        while True:
            frame = top_frame(client.ps(True))
            # Home + clear, then the frame; \r\n because the terminal is in cbreak mode.
            click.echo("\x1b[H\x1b[2J" + frame.replace("\n", "\r\n"), nl=False)
            if _wait_for_quit(interactive, interval):
                click.echo()
                return


@contextlib.contextmanager
def _cbreak(fd: int) -> Iterator[bool]:
    """Single keys without Enter (for `q`); restores the terminal. Yields whether it is one."""
    if not os.isatty(fd):
        yield False
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd, termios.TCSANOW)
        yield True
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _wait_for_quit(interactive: bool, interval: float) -> bool:
    if not interactive:
        time.sleep(interval)
        return False
    deadline = time.monotonic() + interval
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([0], [], [], left)
        if ready and os.read(0, 64).lower().startswith(b"q"):
            return True
    return False


def main() -> NoReturn:
    """Console entry point (`corral`)."""
    cli.main(prog_name="corral")
    sys.exit(0)  # click exits on its own; this satisfies NoReturn
