"""The control API's client side: HTTP over the daemon's unix socket.

Two flavours: `Client` is synchronous (http.client over AF_UNIX, one
connection per call: the CLI makes a handful of calls and should not pay for
an event loop), `AsyncClient` uses aiohttp's UnixConnector and is what the
interactive commands (attach, exec: WebSockets) and async tests use.

Both turn the API's `{"error", "hint"}` answers back into sandbox.errors
classes, and a missing or dead socket into `DaemonNotRunning`, so callers only
ever catch CorralError.
"""

from __future__ import annotations

import errno
import http.client
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode

if TYPE_CHECKING:
    import aiohttp

from sandbox.errors import Conflict, CorralError, NotFound, PermissionDenied, TemplateError

DEFAULT_SOCKET = "/run/corral/corral.sock"

#: Long enough for `create` and `stop --timeout` to finish; follow streams have none.
DEFAULT_TIMEOUT = 600.0


class DaemonNotRunning(CorralError):
    """Nothing answers on the API socket."""


class ApiError(CorralError):
    """An error answer from the daemon that maps to no narrower class."""

    def __init__(self, message: str, hint: str = "", status: int = 500) -> None:
        super().__init__(message, hint)
        self.status = status


def error_from(status: int, body: Any) -> CorralError:
    """Rebuild the daemon's error from an HTTP status and `{"error", "hint"}` body."""
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        message, hint = body["error"], str(body.get("hint") or "")
    else:
        message, hint = f"the daemon answered HTTP {status}", "see the daemon's log"
    if status == 404:
        return NotFound(message, hint)
    if status == 409:
        return Conflict(message, hint)
    if status == 403:
        return PermissionDenied(message, hint)
    if status == 400 and message.split(":", 1)[0].endswith((".yaml", ".yml")):
        return TemplateError(message, hint)
    return ApiError(message, hint, status)


def not_running(path: str, exc: OSError) -> CorralError:
    """The error for a socket nobody answers on (or that we may not use)."""
    if isinstance(exc, PermissionError) or exc.errno == errno.EACCES:
        return PermissionDenied(
            f"permission denied on the API socket {path}",
            hint="run as root or as a member of the corral group",
        )
    return DaemonNotRunning(
        f"daemon not running (nothing answers on {path})",
        hint="start it with `sudo corral daemon` or `sudo scripts/up`, "
        "or point --socket / CORRAL_SOCKET at its socket",
    )


def agent_path(name: str, *rest: str) -> str:
    """`/v1/agents/NAME/...` with every segment quoted (names are checked, but still)."""
    return "/".join(["/v1/agents", *(quote(p, safe="") for p in (name, *rest))])


def with_query(path: str, params: dict[str, Any] | None) -> str:
    if not params:
        return path
    clean = {k: ("1" if v is True else v) for k, v in params.items() if v not in (None, False)}
    return f"{path}?{urlencode(clean)}" if clean else path


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float | None) -> None:
        super().__init__("corral", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class Client:
    """Synchronous client: every method is one HTTP call to the daemon."""

    def __init__(self, socket_path: str = DEFAULT_SOCKET, timeout: float | None = DEFAULT_TIMEOUT):
        self.socket_path = socket_path
        self.timeout = timeout

    # -- transport --

    def _open(
        self, method: str, path: str, body: Any = None, timeout: float | None = DEFAULT_TIMEOUT
    ) -> tuple[_UnixHTTPConnection, http.client.HTTPResponse]:
        conn = _UnixHTTPConnection(self.socket_path, timeout)
        payload = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        try:
            conn.request(method, path, body=payload, headers=headers)
            response = conn.getresponse()
        except (FileNotFoundError, ConnectionRefusedError, PermissionError) as exc:
            conn.close()
            raise not_running(self.socket_path, exc) from None
        except OSError as exc:
            conn.close()
            if exc.errno in (errno.ENOENT, errno.ECONNREFUSED, errno.ENOTSOCK):
                raise not_running(self.socket_path, exc) from None
            raise CorralError(f"talking to the daemon failed: {exc}") from exc
        if response.status >= 400:
            try:
                raw = response.read()
            finally:
                conn.close()
            try:
                decoded: Any = json.loads(raw)
            except ValueError:
                decoded = None
            raise error_from(response.status, decoded)
        return conn, response

    def raw(self, method: str, path: str, body: Any = None) -> bytes:
        """One call; the answer's body as bytes."""
        conn, response = self._open(method, path, body, self.timeout)
        try:
            return response.read()
        finally:
            conn.close()

    def call(self, method: str, path: str, body: Any = None) -> Any:
        """One call; the answer decoded from JSON."""
        raw = self.raw(method, path, body)
        return json.loads(raw) if raw else None

    def stream(self, path: str) -> Iterator[bytes]:
        """A GET whose body arrives in chunks, as they come (follow streams)."""
        conn, response = self._open("GET", path, None, None)
        try:
            while chunk := response.read1(65536):
                yield chunk
        finally:
            conn.close()

    def json_lines(self, path: str) -> Iterator[Any]:
        """A GET whose body is JSON lines, one decoded object at a time."""
        buffer = b""
        for chunk in self.stream(path):
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                if line.strip():
                    yield json.loads(line)

    # -- the API --

    def status(self) -> Any:
        return self.call("GET", "/v1/status")

    def templates(self) -> Any:
        return self.call("GET", "/v1/templates")

    def template(self, name: str) -> Any:
        return self.call("GET", "/v1/templates/" + quote(name, safe=""))

    def validate_template(self, path: str) -> Any:
        return self.call("POST", "/v1/templates/validate", {"path": str(Path(path).absolute())})

    def create(
        self, name: str, template: str, project: str | None, sets: list[str], start: bool = True
    ) -> Any:
        body = {"name": name, "template": template, "project": project, "set": sets,
                "start": start}
        return self.call("POST", "/v1/agents", body)

    def ps(self, all: bool = False) -> Any:
        return self.call("GET", with_query("/v1/agents", {"all": all}))

    def inspect(self, name: str) -> Any:
        return self.call("GET", agent_path(name))

    def start(self, name: str) -> Any:
        return self.call("POST", agent_path(name, "start"), {})

    def stop(self, name: str, timeout: float | None = None) -> Any:
        return self.call("POST", agent_path(name, "stop"), {"timeout": timeout})

    def restart(self, name: str) -> Any:
        return self.call("POST", agent_path(name, "restart"), {})

    def reload(self, name: str) -> Any:
        return self.call("POST", agent_path(name, "reload"), {})

    def remove(self, name: str, force: bool = False, keep_workspace: bool = False) -> Any:
        query = {"force": force, "keep_workspace": keep_workspace}
        return self.call("DELETE", with_query(agent_path(name), query))

    def logs(self, name: str, service: str | None = None, tail: int | None = None) -> bytes:
        return self.raw("GET", with_query(agent_path(name, "logs"),
                                          {"service": service, "tail": tail}))

    def follow_logs(
        self, name: str, service: str | None = None, tail: int | None = None
    ) -> Iterator[bytes]:
        query = {"service": service, "tail": tail, "follow": True}
        return self.stream(with_query(agent_path(name, "logs"), query))

    def events(self, agent: str | None = None, since: str | None = None) -> Any:
        return self.call("GET", with_query("/v1/events", {"agent": agent, "since": since}))

    def follow_events(self, agent: str | None = None, since: str | None = None) -> Iterator[Any]:
        query = {"agent": agent, "since": since, "follow": True}
        return self.json_lines(with_query("/v1/events", query))

    def diff(self, name: str, fmt: str = "unified") -> Any:
        path = with_query(agent_path(name, "diff"), {"format": fmt})
        if fmt == "json":
            return self.call("GET", path)
        return self.raw("GET", path).decode("utf-8", "replace")

    def commit(self, name: str, branch: str, message: str | None = None) -> Any:
        return self.call("POST", agent_path(name, "commit"),
                         {"branch": branch, "message": message})

    def users(self) -> Any:
        return self.call("GET", "/v1/users")

    def add_user(self, name: str, keys: list[str]) -> Any:
        return self.call("POST", "/v1/users", {"name": name, "keys": keys})

    def remove_user(self, name: str) -> Any:
        return self.call("DELETE", "/v1/users/" + quote(name, safe=""))

    def grant(self, agent: str, user: str, role: str) -> Any:
        return self.call("POST", agent_path(agent, "grants"), {"user": user, "role": role})

    def revoke(self, agent: str, user: str) -> Any:
        return self.call("DELETE", agent_path(agent, "grants", user))

    def handoff(self, agent: str, user: str) -> Any:
        return self.call("POST", agent_path(agent, "handoff"), {"user": user})


class AsyncClient:
    """aiohttp over the unix socket; use as `async with AsyncClient(path) as c:`."""

    def __init__(self, socket_path: str = DEFAULT_SOCKET) -> None:
        # Imported here, not at module level: the plain CLI commands use the
        # sync Client, and aiohttp is most of the CLI's start-up time.
        import aiohttp

        self._aiohttp = aiohttp
        self.socket_path = socket_path
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            aiohttp = self._aiohttp
            self._session = aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=self.socket_path),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=30),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        """One call; the answer decoded from JSON (or bytes if it is not JSON)."""
        try:
            async with self.session.request(method, "http://corral" + path, json=body) as r:
                raw = await r.read()
                if r.status >= 400:
                    try:
                        decoded: Any = json.loads(raw)
                    except ValueError:
                        decoded = None
                    raise error_from(r.status, decoded)
                if r.content_type == "application/json":
                    return json.loads(raw)
                return raw
        except self._aiohttp.ClientConnectorError as exc:
            raise not_running(self.socket_path, exc.os_error) from None

    async def ws_connect(self, path: str) -> aiohttp.ClientWebSocketResponse:
        """Open one of the API's WebSockets (attach, exec)."""
        try:
            return await self.session.ws_connect(
                "http://corral" + path, max_msg_size=4 * 1024 * 1024, autoping=True
            )
        except self._aiohttp.ClientConnectorError as exc:
            raise not_running(self.socket_path, exc.os_error) from None
        except self._aiohttp.WSServerHandshakeError as exc:
            raise ApiError(f"the daemon refused the connection: HTTP {exc.status}",
                           "see the daemon's log", exc.status) from None


def ws_error(text: str) -> CorralError | None:
    """The error carried by a server's text frame on attach/exec, if it is one."""
    try:
        body = json.loads(text)
    except ValueError:
        return None
    if isinstance(body, dict) and "error" in body:
        status = body.get("status")
        return error_from(status if isinstance(status, int) else 500, body)
    return None
