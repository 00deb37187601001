"""The control API: HTTP+JSON on a unix socket, served by aiohttp.

One API for the CLI, the tests and (later) a web page. Permissions come from
the socket itself (mode 0660 root:corral, or 0600 when the group is missing):
whoever can connect is treated as root on the host, i.e. user "root" with the
owner role on every agent. Sandboxes never see the socket (it lives under
run_dir, which no sandbox mounts), so nothing here checks where a caller comes
from.

Errors leave as `{"error": message, "hint": hint}` with a status code chosen
from the sandbox.errors class; only this module maps errors to HTTP, only the
CLI formats them for people.

Streams: `logs?follow=1` is a chunked byte stream, `events?follow=1` is JSON
lines. Interactive traffic uses WebSockets: `attach` (session output as
binary frames, keystrokes back as binary, resize as text JSON) and `exec`
(1-byte stream prefix on binary frames, control messages as text JSON).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import inspect
import json
import logging
import os
import signal
import socket
import stat
import weakref
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import WSMsgType, web

from sandbox.errors import (
    Conflict,
    CorralError,
    HostSetupError,
    KernelError,
    NotFound,
    PermissionDenied,
    TemplateError,
)

log = logging.getLogger(__name__)

#: The local CLI caller: root on the host, always allowed (CONTRACT.md, SSH roles).
LOCAL_USER = "root"

#: Stream prefixes on exec WebSocket binary frames.
STDIN, STDOUT, STDERR = 0, 1, 2

#: Upper bounds on what a client may ask for; the manager clamps again.
MAX_TERM_SIZE = 1000
MAX_ARGV_BYTES = 256 * 1024

MANAGER_KEY: web.AppKey[Any] = web.AppKey("manager", object)
SOCKETS_KEY: web.AppKey[weakref.WeakSet[web.WebSocketResponse]] = web.AppKey(
    "websockets", weakref.WeakSet
)
STREAMS_KEY: web.AppKey[set[asyncio.Task[Any]]] = web.AppKey("streams", set)


# -- errors ---------------------------------------------------------------------------


class BadRequest(CorralError):
    """The request itself is malformed (bad JSON, wrong types): status 400."""


def status_for(exc: CorralError) -> int:
    """The HTTP status of a CorralError; plain CorralError means bad input (400)."""
    if isinstance(exc, NotFound):
        return 404
    if isinstance(exc, Conflict):
        return 409
    if isinstance(exc, PermissionDenied):
        return 403
    if isinstance(exc, TemplateError | BadRequest):
        return 400
    if isinstance(exc, HostSetupError | KernelError):
        return 500
    # sandbox.spec.check_name and friends raise the base class for bad input.
    return 400 if type(exc) is CorralError else 500


def error_body(exc: CorralError) -> dict[str, str]:
    """`{"error", "hint"}`: the message without the hint, so clients can lay them out."""
    message = str(exc.args[0]) if exc.args else type(exc).__name__
    return {"error": message, "hint": exc.hint}


def _error_response(status: int, message: str, hint: str = "") -> web.Response:
    return web.json_response({"error": message, "hint": hint}, status=status)


@web.middleware
async def error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except CorralError as exc:
        status = status_for(exc)
        if status >= 500:
            log.error("%s %s failed: %s", request.method, request.path, exc)
        return web.json_response(error_body(exc), status=status)
    except web.HTTPException as exc:
        # aiohttp's own 404/405 for unknown routes: answer in the same JSON shape.
        if exc.status >= 400:
            return _error_response(
                exc.status, f"{request.method} {request.path}: {exc.reason}",
                "see CONTRACT.md for the API routes",
            )
        raise
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception as exc:
        log.exception("%s %s crashed", request.method, request.path)
        return _error_response(500, f"internal error: {exc}", "see the daemon's log")


# -- small helpers --------------------------------------------------------------------


async def _call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call a Manager method whether the lead made it sync or async."""
    result = fn(*args, **kwargs)
    if inspect.isawaitable(result):
        result = await result
    return result


def _manager(request: web.Request) -> Any:
    return request.app[MANAGER_KEY]


async def _body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        data = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"request body is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object")
    return data


def _str(data: dict[str, Any], key: str, *, required: bool = True) -> str | None:
    value = data.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or (required and not value):
        raise BadRequest(f"{key!r} must be a non-empty string")
    return value


def _flag(request: web.Request, key: str) -> bool:
    return request.query.get(key, "").lower() in ("1", "true", "yes")


def _int_query(request: web.Request, key: str) -> int | None:
    raw = request.query.get(key)
    if raw in (None, ""):
        return None
    try:
        return int(raw)
    except ValueError as exc:
        raise BadRequest(f"query parameter {key!r} must be an integer") from exc


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda o: json.dumps(o, default=str))


# -- plain JSON routes ----------------------------------------------------------------


async def get_status(request: web.Request) -> web.Response:
    return _json(await _call(_manager(request).status))


async def list_templates(request: web.Request) -> web.Response:
    return _json(await _call(_manager(request).list_templates))


async def show_template(request: web.Request) -> web.Response:
    return _json(await _call(_manager(request).show_template, request.match_info["name"]))


async def validate_template(request: web.Request) -> web.Response:
    path = _str(await _body(request), "path")
    return _json(await _call(_manager(request).validate_template, path))


async def create_agent(request: web.Request) -> web.Response:
    data = await _body(request)
    name = _str(data, "name")
    template = _str(data, "template")
    project = _str(data, "project", required=False)
    sets = data.get("set", [])
    if not isinstance(sets, list) or not all(isinstance(s, str) for s in sets):
        raise BadRequest("'set' must be a list of KEY=VALUE strings")
    start = data.get("start", True)
    if not isinstance(start, bool):
        raise BadRequest("'start' must be true or false")
    result = await _call(_manager(request).create, name, template, project, sets, start)
    return _json(result, status=201)


async def list_agents(request: web.Request) -> web.Response:
    return _json(await _call(_manager(request).ps, all=_flag(request, "all")))


async def inspect_agent(request: web.Request) -> web.Response:
    return _json(await _call(_manager(request).inspect, request.match_info["name"]))


async def start_agent(request: web.Request) -> web.Response:
    return _json(await _call(_manager(request).start, request.match_info["name"]))


async def stop_agent(request: web.Request) -> web.Response:
    timeout = (await _body(request)).get("timeout")
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout < 0
    ):
        raise BadRequest("'timeout' must be a non-negative number of seconds")
    name = request.match_info["name"]
    return _json(await _call(_manager(request).stop, name, timeout))


async def restart_agent(request: web.Request) -> web.Response:
    return _json(await _call(_manager(request).restart, request.match_info["name"]))


async def reload_agent(request: web.Request) -> web.Response:
    return _json(await _call(_manager(request).reload, request.match_info["name"]))


async def remove_agent(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    await _call(
        _manager(request).remove, name,
        force=_flag(request, "force"), keep_workspace=_flag(request, "keep_workspace"),
    )
    return _json({"removed": name})


async def diff_agent(request: web.Request) -> web.Response:
    fmt = request.query.get("format", "unified")
    if fmt not in ("unified", "stat", "json"):
        raise BadRequest("format must be one of unified, stat, json")
    result = await _call(_manager(request).diff, request.match_info["name"], fmt)
    if fmt == "json":
        return _json(result)
    return web.Response(text=str(result), content_type="text/plain")


async def commit_agent(request: web.Request) -> web.Response:
    data = await _body(request)
    branch = _str(data, "branch")
    message = _str(data, "message", required=False)
    result = await _call(_manager(request).commit, request.match_info["name"], branch, message)
    return _json(result)


async def list_users(request: web.Request) -> web.Response:
    return _json(await _call(_manager(request).list_users))


async def add_user(request: web.Request) -> web.Response:
    data = await _body(request)
    name = _str(data, "name")
    keys = data.get("keys", [])
    if not isinstance(keys, list) or not keys or not all(isinstance(k, str) for k in keys):
        raise BadRequest("'keys' must be a non-empty list of SSH public key lines")
    result = await _call(_manager(request).add_user, name, keys)
    return _json(result if result is not None else {"user": name}, status=201)


async def remove_user(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    await _call(_manager(request).remove_user, name)
    return _json({"removed": name})


async def grant(request: web.Request) -> web.Response:
    data = await _body(request)
    user, role = _str(data, "user"), _str(data, "role")
    if role not in ("viewer", "collaborator", "owner"):
        raise BadRequest(f"unknown role {role!r}", hint="use viewer, collaborator or owner")
    agent = request.match_info["name"]
    result = await _call(_manager(request).grant, agent, user, role)
    return _json(result if result is not None else {"agent": agent, "user": user, "role": role})


async def revoke(request: web.Request) -> web.Response:
    agent, user = request.match_info["name"], request.match_info["user"]
    result = await _call(_manager(request).revoke, agent, user)
    return _json(result if result is not None else {"agent": agent, "user": user, "role": None})


async def handoff(request: web.Request) -> web.Response:
    user = _str(await _body(request), "user")
    agent = request.match_info["name"]
    result = await _call(_manager(request).handoff, agent, user)
    return _json(result if result is not None else {"agent": agent, "owner": user})


# -- streams --------------------------------------------------------------------------


async def _stream(request: web.Request, content_type: str) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": content_type})
    response.enable_chunked_encoding()
    await response.prepare(request)
    return response


def _track(request: web.Request) -> None:
    """Remember the handler task so shutdown can end endless follow streams."""
    task = asyncio.current_task()
    if task is not None:
        streams = request.app[STREAMS_KEY]
        streams.add(task)
        task.add_done_callback(streams.discard)


async def agent_logs(request: web.Request) -> web.StreamResponse:
    manager, name = _manager(request), request.match_info["name"]
    service = request.query.get("service") or None
    tail = _int_query(request, "tail")
    # The backlog is read before the response starts, so a missing agent or
    # service is reported as a JSON error rather than as a stream cut short.
    data = await _call(manager.logs, name, service, tail)
    if not _flag(request, "follow"):
        return web.Response(body=data, content_type="application/octet-stream")
    follow = manager.follow_logs(name, service)
    if inspect.isawaitable(follow):
        follow = await follow
    response = await _stream(request, "application/octet-stream")
    _track(request)
    try:
        await response.write(data)
        async for chunk in follow:
            await response.write(chunk)
    except ConnectionResetError:
        return response  # the client went away
    finally:
        await _aclose(follow)
    await response.write_eof()
    return response


async def _aclose(iterator: Any) -> None:
    close = getattr(iterator, "aclose", None)
    if close is not None:
        with contextlib.suppress(Exception):
            await close()


async def events(request: web.Request) -> web.StreamResponse:
    manager = _manager(request)
    agent = request.query.get("agent") or None
    since = request.query.get("since") or None
    if not _flag(request, "follow"):
        return _json(await _call(manager.events, agent, since))
    follow = manager.follow_events(agent)
    if inspect.isawaitable(follow):
        follow = await follow
    # `events -f` without --since shows only what happens from now on (like
    # `docker events`); with --since the backlog comes first.
    backlog = await _call(manager.events, agent, since) if since else []
    response = await _stream(request, "application/x-ndjson")
    _track(request)
    try:
        for event in backlog:
            await response.write(_line(event))
        async for event in follow:
            await response.write(_line(event))
    except ConnectionResetError:
        return response  # the client went away
    finally:
        await _aclose(follow)
    await response.write_eof()
    return response


def _line(obj: Any) -> bytes:
    return (json.dumps(obj, default=str) + "\n").encode()


# -- WebSockets -----------------------------------------------------------------------


async def _open_ws(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(max_msg_size=4 * 1024 * 1024)
    await ws.prepare(request)
    request.app[SOCKETS_KEY].add(ws)
    return ws


async def _ws_error(ws: web.WebSocketResponse, exc: Exception) -> None:
    """WebSocket handshakes carry no error body, so errors travel as a text frame."""
    if isinstance(exc, CorralError):
        body: dict[str, Any] = {**error_body(exc), "status": status_for(exc)}
    else:
        log.exception("websocket handler crashed")
        body = {"error": f"internal error: {exc}", "hint": "see the daemon's log", "status": 500}
    with contextlib.suppress(Exception):
        await ws.send_str(json.dumps(body))
        await ws.close(code=4000 + int(body["status"]))


def _size(value: Any) -> tuple[int, int] | None:
    """A `[cols, rows]` pair from a client, clamped; None if malformed."""
    if (
        isinstance(value, list | tuple)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        return (max(1, min(MAX_TERM_SIZE, value[0])), max(1, min(MAX_TERM_SIZE, value[1])))
    return None


async def attach(request: web.Request) -> web.WebSocketResponse:
    """Local attach: snapshot first, then output; keystrokes and resizes back."""
    manager, name = _manager(request), request.match_info["name"]
    read_only = _flag(request, "read_only")
    role = "viewer" if read_only else "owner"
    cols, rows = _int_query(request, "cols"), _int_query(request, "rows")
    size = _size([cols, rows]) if cols and rows else None
    ws = await _open_ws(request)
    try:
        client = await _call(manager.attach, name, LOCAL_USER, role, size)
    except Exception as exc:
        await _ws_error(ws, exc)
        return ws
    log.info("attach agent=%s role=%s", name, role)

    async def pump() -> None:
        # Session output to the client; b"" means the session ended or the hub
        # dropped this client (too slow, revoked).
        with contextlib.suppress(ConnectionResetError):
            while chunk := await client.read():
                await ws.send_bytes(chunk)
        await ws.close()

    pump_task = asyncio.create_task(pump(), name=f"attach-pump-{name}")
    try:
        await ws.send_bytes(client.snapshot)
        async for msg in ws:
            if msg.type == WSMsgType.BINARY:
                if not read_only:
                    client.write(msg.data)
            elif msg.type == WSMsgType.TEXT:
                _attach_control(client, msg.data, read_only)
            elif msg.type == WSMsgType.ERROR:
                break
    except ConnectionResetError:
        pass
    finally:
        pump_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await pump_task
        client.close()
        await ws.close()
        log.info("detach agent=%s role=%s", name, role)
    return ws


def _attach_control(client: Any, text: str, read_only: bool) -> None:
    try:
        message = json.loads(text)
    except json.JSONDecodeError:
        return
    if not isinstance(message, dict) or read_only:
        return
    size = _size(message.get("resize"))
    if size is not None:
        client.resize(*size)


def _exec_request(text: str) -> dict[str, Any]:
    """Validate the first exec frame: {"argv", "tty", "term", "cols", "rows", "env", "user"}.

    "user" is who to run as inside the sandbox (`corral exec --user`); the
    caller, for the audit event, is the socket's user (root).
    """
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadRequest(f"exec request is not JSON: {exc}") from exc
    if not isinstance(spec, dict):
        raise BadRequest("exec request must be a JSON object")
    argv = spec.get("argv")
    if (
        not isinstance(argv, list)
        or not argv
        or not all(isinstance(a, str) and "\0" not in a for a in argv)
        or sum(len(a) for a in argv) > MAX_ARGV_BYTES
    ):
        raise BadRequest("'argv' must be a non-empty list of strings")
    env = spec.get("env") or {}
    if not isinstance(env, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in env.items()
    ):
        raise BadRequest("'env' must map strings to strings")
    user = spec.get("user")
    if user is not None and not isinstance(user, str):
        raise BadRequest("'user' must be a string or null")
    tty: tuple[str, int, int] | None = None
    if spec.get("tty"):
        term = spec.get("term") or "xterm-256color"
        if not isinstance(term, str) or len(term) > 64:
            raise BadRequest("'term' must be a short string")
        size = _size([spec.get("cols") or 80, spec.get("rows") or 24]) or (80, 24)
        tty = (term, size[0], size[1])
    return {"argv": argv, "env": env, "run_as": user, "tty": tty}


async def exec_(request: web.Request) -> web.WebSocketResponse:
    """Run a command in the sandbox; stdio multiplexed on one WebSocket."""
    manager, name = _manager(request), request.match_info["name"]
    ws = await _open_ws(request)
    try:
        first = await ws.receive(timeout=30)
        if first.type != WSMsgType.TEXT:
            raise BadRequest("the first exec frame must be the JSON request")
        spec = _exec_request(first.data)
        proc = await _call(
            manager.exec, name, spec["argv"], user=LOCAL_USER, tty=spec["tty"], env=spec["env"],
            run_as=spec["run_as"],
        )
    except Exception as exc:
        await _ws_error(ws, exc)
        return ws
    log.info("exec agent=%s argv=%r tty=%s", name, spec["argv"], spec["tty"] is not None)

    async def pump(read: Callable[[], Awaitable[bytes]], prefix: int) -> None:
        while chunk := await read():
            with contextlib.suppress(ConnectionResetError):
                await ws.send_bytes(bytes([prefix]) + chunk)

    async def finish() -> None:
        # Every byte of output goes out before the exit code does.
        await asyncio.gather(pump(proc.read_stdout, STDOUT), pump(proc.read_stderr, STDERR))
        code = await proc.wait()
        with contextlib.suppress(ConnectionResetError):
            await ws.send_str(json.dumps({"exit": code}))
        await ws.close()

    finish_task = asyncio.create_task(finish(), name=f"exec-{name}")
    try:
        async for msg in ws:
            if msg.type == WSMsgType.BINARY:
                if msg.data[:1] == bytes([STDIN]) and len(msg.data) > 1:
                    await proc.write_stdin(msg.data[1:])
            elif msg.type == WSMsgType.TEXT:
                _exec_control(proc, msg.data)
            elif msg.type == WSMsgType.ERROR:
                break
    except ConnectionResetError:
        pass
    finally:
        if not finish_task.done():
            # The client went away before the command ended: do not leave it behind.
            with contextlib.suppress(Exception):
                proc.signal(signal.SIGKILL)
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(finish_task, timeout=10)
        if not finish_task.done():
            finish_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await finish_task
        await ws.close()
    return ws


def _exec_control(proc: Any, text: str) -> None:
    try:
        message = json.loads(text)
    except json.JSONDecodeError:
        return
    if not isinstance(message, dict):
        return
    if message.get("eof"):
        proc.close_stdin()
    size = _size(message.get("resize"))
    if size is not None:
        proc.resize(*size)
    sig = message.get("signal")
    if isinstance(sig, int) and not isinstance(sig, bool) and 1 <= sig < signal.NSIG:
        proc.signal(sig)


# -- the application ------------------------------------------------------------------


async def _on_shutdown(app: web.Application) -> None:
    sockets: weakref.WeakSet[web.WebSocketResponse] = app[SOCKETS_KEY]
    for ws in list(sockets):
        with contextlib.suppress(Exception):
            await ws.close(code=1001, message=b"daemon shutting down")
    streams: set[asyncio.Task[Any]] = app[STREAMS_KEY]
    for task in list(streams):
        task.cancel()


def make_app(manager: Any) -> web.Application:
    """The aiohttp application serving `manager` (see supervisor.agents.Manager)."""
    app = web.Application(middlewares=[error_middleware], client_max_size=1024 * 1024)
    app[MANAGER_KEY] = manager
    app[SOCKETS_KEY] = weakref.WeakSet()
    app[STREAMS_KEY] = set()
    app.on_shutdown.append(_on_shutdown)
    agent = "/v1/agents/{name}"
    app.router.add_get("/v1/status", get_status)
    app.router.add_get("/v1/templates", list_templates)
    app.router.add_post("/v1/templates/validate", validate_template)
    app.router.add_get("/v1/templates/{name}", show_template)
    app.router.add_post("/v1/agents", create_agent)
    app.router.add_get("/v1/agents", list_agents)
    app.router.add_get(agent, inspect_agent)
    app.router.add_delete(agent, remove_agent)
    app.router.add_post(agent + "/start", start_agent)
    app.router.add_post(agent + "/stop", stop_agent)
    app.router.add_post(agent + "/restart", restart_agent)
    app.router.add_post(agent + "/reload", reload_agent)
    app.router.add_get(agent + "/logs", agent_logs)
    app.router.add_get(agent + "/diff", diff_agent)
    app.router.add_post(agent + "/commit", commit_agent)
    app.router.add_post(agent + "/grants", grant)
    app.router.add_delete(agent + "/grants/{user}", revoke)
    app.router.add_post(agent + "/handoff", handoff)
    app.router.add_get(agent + "/attach", attach)
    app.router.add_get(agent + "/exec", exec_)
    app.router.add_get("/v1/events", events)
    app.router.add_get("/v1/users", list_users)
    app.router.add_post("/v1/users", add_user)
    app.router.add_delete("/v1/users/{name}", remove_user)
    return app


# -- the socket -----------------------------------------------------------------------


class ApiServer:
    """A running API: `await server.cleanup()` stops it and removes the socket."""

    def __init__(self, runner: web.AppRunner, path: str, inode: int) -> None:
        self.runner = runner
        self.path = path
        self.app = runner.app
        self._inode = inode

    async def cleanup(self) -> None:
        await self.runner.cleanup()
        _unlink_if_ours(self.path, self._inode)

    close = cleanup


def _unlink_if_ours(path: str, inode: int) -> None:
    # Only remove the socket if it is still ours: a newer daemon may have
    # replaced it after this one was told to stop.
    with contextlib.suppress(OSError):
        if os.lstat(path).st_ino == inode:
            Path(path).unlink()


def _socket_owner(group: str) -> tuple[int, int]:
    """(gid, mode) for the socket: root:group 0660, or root-only 0600 without the group."""
    try:
        return grp.getgrnam(group).gr_gid, 0o660
    except KeyError:
        log.warning(
            "group %r does not exist: the API socket is root-only (0600); "
            "create the group (groupadd %s) to let its members use corral",
            group, group,
        )
        return 0, 0o600


def _remove_stale(path: str) -> None:
    """Unlink a socket left by a dead daemon; refuse if a live one answers on it."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise HostSetupError(
            f"{path} exists and is not a socket", hint="remove it or set api_socket elsewhere"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise
    else:
        raise Conflict(
            f"another corral daemon is listening on {path}",
            hint="stop it first, or give this daemon its own run_dir/api_socket",
        )
    finally:
        probe.close()
    Path(path).unlink(missing_ok=True)


def _bind(path: str, gid: int, mode: int) -> socket.socket:
    Path(path).absolute().parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # bind() creates the file with mode 0777 & ~umask. A umask of 0177
        # makes it 0600 from the first instant, so there is no window in
        # which anyone but root could connect; chown/chmod then widen it.
        old = os.umask(0o177)
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        os.chown(path, 0 if os.geteuid() == 0 else -1, gid if os.geteuid() == 0 else -1)
        Path(path).chmod(mode)
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def serve(manager: Any, socket_path: str, group: str = "corral") -> ApiServer:
    """Serve the API for `manager` on `socket_path` (mode 0660 root:`group`)."""
    if len(os.fsencode(socket_path)) >= 108:
        raise HostSetupError(
            f"socket path too long for AF_UNIX: {socket_path}", hint="use a shorter run_dir"
        )
    _remove_stale(socket_path)
    gid, mode = _socket_owner(group)
    sock = _bind(socket_path, gid, mode)
    runner = web.AppRunner(
        make_app(manager), handle_signals=False, access_log=None, shutdown_timeout=2.0
    )
    await runner.setup()
    try:
        site = web.SockSite(runner, sock)
        await site.start()
    except BaseException:
        await runner.cleanup()
        sock.close()
        raise
    log.info("API listening on %s (mode %o, gid %d)", socket_path, mode, gid)
    return ApiServer(runner, socket_path, os.lstat(socket_path).st_ino)
