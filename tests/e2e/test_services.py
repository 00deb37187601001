"""Per-agent services through the CLI against a real daemon: published ports,
health, restarts with backoff, give-up, adoption after a daemon restart,
port squatters, service logs, and a real PostgreSQL per agent."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Daemon

pytestmark = pytest.mark.root

PG_BIN = "/usr/lib/postgresql/15/bin"


# ---------------------------------------------------------------------------
# helpers

def poll(what: str, fn: Callable[[], Any], timeout: float = 60, daemon: Daemon | None = None
         ) -> Any:
    """fn() until it returns something truthy; fail loudly with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})\n"
                         f"{daemon.log() if daemon else ''}")


def services(daemon: Daemon, name: str) -> dict[str, Any]:
    svcs: dict[str, Any] = daemon.json("inspect", name)["services"]
    return svcs


def wait_healthy(daemon: Daemon, name: str, *svcs: str, timeout: float = 90) -> dict[str, Any]:
    def ok() -> dict[str, Any] | None:
        s = services(daemon, name)
        return s if all(s[n]["health"] == "healthy" and s[n]["state"] == "running"
                        for n in svcs) else None
    got: dict[str, Any] = poll(f"{name}: {svcs} healthy", ok, timeout, daemon)
    return got


def events(daemon: Daemon, name: str, kind: str | None = None) -> list[dict[str, Any]]:
    evs: list[dict[str, Any]] = daemon.json("events", "--agent", name)
    return [e for e in evs if kind is None or e["kind"] == kind]


def http_get(host: str, port: int, path: str) -> bytes:
    with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=10) as r:
        body: bytes = r.read()
    return body


def try_get(host: str, port: int, path: str) -> bytes | None:
    try:
        return http_get(host, port, path)
    except (OSError, urllib.error.URLError):
        return None


def write_template(daemon: Daemon, name: str, body: str) -> None:
    tdir = Path(daemon.config_path).parent / "templates"
    tdir.mkdir(exist_ok=True)
    (tdir / f"{name}.yaml").write_text(f"name: {name}\n" + body)


@contextlib.contextmanager
def squat(port: int) -> Iterator[socket.socket]:
    """An unrelated listener on the host holding `port` on every address."""
    s = socket.socket()
    try:
        s.bind(("0.0.0.0", port))
        s.listen(4)
        yield s
    finally:
        s.close()


def first_free(lo: int, hi: int) -> int:
    for p in range(lo, hi + 1):
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", p))
            except OSError:
                continue
        if not Path("/run/corral-ports", str(p)).exists():
            return p
    raise AssertionError(f"no free port in {lo}-{hi}")


# ---------------------------------------------------------------------------
# published ports, env, logs

def test_two_agents_same_inside_port_each_answer_on_own_host_port(daemon: Daemon,
                                                                 project: Path) -> None:
    daemon.create("wa", "--template", "python-dev", "--project", str(project))
    daemon.create("wb", "--template", "python-dev", "--project", str(project))
    sa = wait_healthy(daemon, "wa", "web")["web"]
    sb = wait_healthy(daemon, "wb", "web")["web"]
    assert sa["port"] == sb["port"] == 8000
    ha, hb = sa["host_port"], sb["host_port"]
    assert ha != hb
    lo, hi = daemon.ports
    assert lo <= ha <= hi
    assert lo <= hb <= hi
    # ps shows the same published ports
    ps = {a["name"]: a for a in daemon.json("ps")}
    assert ps["wa"]["ports"] == {"web": ha}
    assert ps["wb"]["ports"] == {"web": hb}
    # each agent sees its own host port in the environment
    env_a = daemon.cli("exec", "wa", "--", "sh", "-c", "echo $CORRAL_PORT_WEB", check=True)
    assert env_a.stdout.strip() == str(ha)
    # each host port reaches its own agent: a file only that agent has
    daemon.cli("exec", "wa", "--", "sh", "-c", "echo agent-a > /workspace/who.txt", check=True)
    daemon.cli("exec", "wb", "--", "sh", "-c", "echo agent-b > /workspace/who.txt", check=True)
    assert http_get("127.0.0.1", ha, "/who.txt") == b"agent-a\n"
    assert http_get("127.0.0.1", hb, "/who.txt") == b"agent-b\n"
    # and from the host's other addresses (the host end of an agent's veth)
    gw = daemon.json("inspect", "wa")["gateway"]
    assert gw.startswith("198.19.")
    assert http_get(gw, ha, "/who.txt") == b"agent-a\n"
    assert http_get(gw, hb, "/who.txt") == b"agent-b\n"
    # bulk data crosses the published port intact
    daemon.cli("exec", "wa", "--", "sh", "-c", "head -c 3000000 /dev/urandom > /workspace/blob",
               check=True)
    upper = Path(daemon.json("inspect", "wa")["workspace"]["path"])
    assert http_get("127.0.0.1", ha, "/blob") == (upper / "blob").read_bytes()
    # the service's output (http.server's request log) is kept per service
    logs = daemon.cli("logs", "wa", "--service", "web", check=True).stdout
    assert "GET /who.txt" in logs
    assert "GET /who.txt" in daemon.cli("logs", "wb", "--service", "web", check=True).stdout
    # and followed live with -f
    from tests.e2e.conftest import CORRAL
    follow = subprocess.Popen([CORRAL, "--socket", daemon.socket, "logs", "wa", "--service",
                               "web", "-f"], stdout=subprocess.PIPE, text=True)
    try:
        assert follow.stdout is not None
        os.set_blocking(follow.stdout.fileno(), False)
        seen = ""

        def followed() -> bool:
            nonlocal seen
            with contextlib.suppress(OSError, TypeError):
                seen += follow.stdout.read() or ""  # type: ignore[union-attr]
            if "GET /followed.txt" in seen:
                return True
            try_get("127.0.0.1", ha, "/followed.txt")  # a 404 is logged too
            return False
        poll("logs -f shows a new request", followed, 60, daemon)
    finally:
        follow.kill()
        follow.communicate(timeout=10)
    tail = daemon.cli("logs", "wa", "--service", "web", "--tail", "1", check=True).stdout
    assert len(tail.splitlines()) == 1
    # an unknown service is an error, not an empty log
    cp = daemon.cli("logs", "wa", "--service", "nope")
    assert cp.returncode == 1
    assert cp.stderr.startswith("corral: error:")


def test_squatted_port_is_skipped_and_claims_go_with_the_agent(daemon: Daemon,
                                                               project: Path) -> None:
    lo, hi = daemon.ports
    taken = first_free(lo, hi)
    with squat(taken) as squatter:
        daemon.create("sq", "--template", "python-dev", "--project", str(project))
        web = wait_healthy(daemon, "sq", "web")["web"]
        assert web["host_port"] != taken
        assert lo <= web["host_port"] <= hi
        # positive control: the squatter still owns its port and gets the connection
        with socket.create_connection(("127.0.0.1", taken), timeout=5):
            conn, _ = squatter.accept()
            conn.close()
        assert http_get("127.0.0.1", web["host_port"], "/README.md") == \
            b"hello from the project\n"
    claim = Path("/run/corral-ports", str(web["host_port"]))
    assert claim.read_text().split() == [daemon.scope, "sq", "web"]
    # a stopped agent keeps its port (its URLs stay stable)
    daemon.cli("stop", "sq", check=True)
    assert services(daemon, "sq")["web"]["host_port"] == web["host_port"]
    assert try_get("127.0.0.1", web["host_port"], "/README.md") is None
    daemon.cli("start", "sq", check=True)
    again = wait_healthy(daemon, "sq", "web")["web"]
    assert again["host_port"] == web["host_port"]
    # removal releases the lease and the host-wide claim
    daemon.cli("rm", "--force", "sq", check=True)
    assert not claim.exists()


def test_two_daemons_sharing_a_port_range_never_share_a_port(daemon_factory: Any,
                                                              project: Path) -> None:
    d1 = daemon_factory("p1")
    d2 = daemon_factory("p2", start=False)
    # the second daemon is configured with exactly the first one's port range
    cfg = Path(d2.config_path)
    lo2, hi2 = d2.ports
    lo1, hi1 = d1.ports
    cfg.write_text(cfg.read_text().replace(f'"{lo2}-{hi2}"', f'"{lo1}-{hi1}"'))
    d2.ports = d1.ports
    d2.start()
    d1.create("sh1", "--template", "python-dev", "--project", str(project))
    d2.create("sh2", "--template", "python-dev", "--project", str(project))
    p1 = wait_healthy(d1, "sh1", "web")["web"]["host_port"]
    p2 = wait_healthy(d2, "sh2", "web")["web"]["host_port"]
    assert lo1 <= p1 <= hi1
    assert lo1 <= p2 <= hi1
    assert p1 != p2
    assert Path("/run/corral-ports", str(p1)).read_text().split() == [d1.scope, "sh1", "web"]
    assert Path("/run/corral-ports", str(p2)).read_text().split() == [d2.scope, "sh2", "web"]
    d1.cli("exec", "sh1", "--", "sh", "-c", "echo one > /workspace/who.txt", check=True)
    d2.cli("exec", "sh2", "--", "sh", "-c", "echo two > /workspace/who.txt", check=True)
    assert http_get("127.0.0.1", p1, "/who.txt") == b"one\n"
    assert http_get("127.0.0.1", p2, "/who.txt") == b"two\n"


# ---------------------------------------------------------------------------
# restarts, backoff, give-up, degraded

def test_killed_service_comes_back_with_growing_backoff(daemon: Daemon, project: Path) -> None:
    daemon.create("kb", "--template", "python-dev", "--project", str(project))
    web = wait_healthy(daemon, "kb", "web")["web"]
    pids = [web["pid"]]
    assert web["restarts"] == 0

    def wait_new_pid(restarts: int) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            s = services(daemon, "kb")["web"]
            return s if s["restarts"] == restarts and s["state"] == "running" \
                and s["pid"] not in pids else None
        got: dict[str, Any] = poll(f"restart #{restarts}", check, 60, daemon)
        pids.append(got["pid"])
        return got

    # killed from inside the sandbox
    daemon.cli("exec", "kb", "--", "sh", "-c", "kill $(pgrep -f '[h]ttp.server')", check=True)
    wait_new_pid(1)
    # killed from the host, by its host pid, twice more before it settles
    os.kill(pids[-1], signal.SIGKILL)
    wait_new_pid(2)
    os.kill(pids[-1], signal.SIGKILL)
    wait_new_pid(3)
    backoffs = [e["data"]["backoff"] for e in events(daemon, "kb", "service.restarting")]
    assert len(backoffs) == 3
    assert backoffs[0] > 0
    assert backoffs[0] < backoffs[1] < backoffs[2]
    # it serves again on the same host port
    wait_healthy(daemon, "kb", "web")
    body = poll("web answers again", lambda: try_get("127.0.0.1", web["host_port"],
                                                     "/README.md"), 30, daemon)
    assert body == b"hello from the project\n"
    exited = events(daemon, "kb", "service.exited")
    assert [e["data"]["status"] for e in exited] == [143, 137, 137]


def test_failing_services_are_given_up_and_the_agent_is_degraded(daemon: Daemon,
                                                                 project: Path) -> None:
    write_template(daemon, "sick", """\
extends: default
services:
  ok:
    command: ["python3", "-m", "http.server", "8000", "--bind", "0.0.0.0"]
    port: 8000
    health: {http: "/", interval: 1s, timeout: 5s, retries: 5, start_period: 20s}
  hang:
    command: ["sh", "-c", "echo hang-service-says-hello; exec sleep 100000"]
    port: 9000
    health: {tcp: 9000, interval: 200ms, timeout: 500ms, retries: 2}
  crash:
    command: ["sh", "-c", "echo crash-service-says-boom $GREETING port=$CORRAL_PORT_OK >&2; exit 3"]
    env: {GREETING: hi-from-service-env}
""")
    daemon.create("sk", "--template", "sick", "--project", str(project))

    def given_up() -> set[str]:
        names = {e["data"]["service"] for e in events(daemon, "sk", "service.given_up")}
        return names if names >= {"hang", "crash"} else set()
    poll("both failing services given up", given_up, 120, daemon)
    by_svc = {e["data"]["service"]: e["data"] for e in events(daemon, "sk", "service.given_up")}
    assert "crash-service-says-boom" in by_svc["crash"]["log"]
    assert "status 3" in by_svc["crash"]["reason"]
    assert "hang-service-says-hello" in by_svc["hang"]["log"]
    assert "unhealthy" in by_svc["hang"]["reason"]
    # the never-healthy one was restarted for being unhealthy, with a growing backoff
    hang_restarts = [e["data"]["backoff"] for e in events(daemon, "sk", "service.restarting")
                     if e["data"]["service"] == "hang"]
    assert len(hang_restarts) == 4
    assert hang_restarts == sorted(hang_restarts)
    assert hang_restarts[0] < hang_restarts[-1]
    health = [e["data"]["health"] for e in events(daemon, "sk", "service.health")
              if e["data"]["service"] == "hang"]
    assert "unhealthy" in health
    assert "healthy" not in health

    info = poll("agent degraded", lambda: (lambda i: i if i["state"] == "degraded" and
                                           "crash" in i["reason"] and "hang" in i["reason"]
                                           else None)(daemon.json("inspect", "sk")), 30, daemon)
    svcs = info["services"]
    assert svcs["hang"]["state"] == "failed"
    assert svcs["crash"]["state"] == "failed"
    assert svcs["crash"]["restarts"] == 4
    # services see their own env and every service's host port
    assert "hi-from-service-env" in by_svc["crash"]["log"]
    assert f"port={svcs['ok']['host_port']}" in by_svc["crash"]["log"]
    # positive control: the healthy service in the same agent is untouched
    assert svcs["ok"]["state"] == "running"
    assert svcs["ok"]["health"] == "healthy"
    assert svcs["ok"]["restarts"] == 0
    assert "ok" not in info["reason"]
    for key in ("state", "health", "port", "host_port", "restarts"):
        assert key in svcs["ok"]
    assert svcs["crash"]["host_port"] is None  # no port, nothing published
    assert [e["kind"] for e in events(daemon, "sk", "agent.degraded")]


# ---------------------------------------------------------------------------
# daemon restart

def test_ports_and_services_survive_a_daemon_restart(daemon: Daemon, project: Path) -> None:
    daemon.create("dr", "--template", "python-dev", "--project", str(project))
    before = wait_healthy(daemon, "dr", "web")["web"]
    hp = before["host_port"]
    assert http_get("127.0.0.1", hp, "/README.md") == b"hello from the project\n"
    started_before = len(events(daemon, "dr", "service.started"))
    daemon.stop(signal.SIGKILL)
    # the service itself does not need the daemon
    assert Path(f"/proc/{before['pid']}").exists()
    daemon.start()
    after = wait_healthy(daemon, "dr", "web")["web"]
    assert after["host_port"] == hp
    assert after["pid"] == before["pid"]  # adopted, not restarted
    assert after["restarts"] == 0
    assert len(events(daemon, "dr", "service.started")) == started_before
    assert [e["data"]["pid"] for e in events(daemon, "dr", "service.adopted")] == [before["pid"]]
    body = poll("web answers through the new daemon",
                lambda: try_get("127.0.0.1", hp, "/README.md"), 30, daemon)
    assert body == b"hello from the project\n"
    # and the adopted service is still supervised: killed, it comes back
    os.kill(before["pid"], signal.SIGKILL)
    back = poll("adopted service restarted", lambda: (lambda s: s if s["restarts"] == 1 and
                                                      s["health"] == "healthy" else None)(
        services(daemon, "dr")["web"]), 60, daemon)
    assert back["pid"] != before["pid"]
    assert back["host_port"] == hp


# ---------------------------------------------------------------------------
# PostgreSQL per agent

def psql(port: int, password: str | None, sql: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PGCONNECT_TIMEOUT"] = "10"
    if password is not None:
        env["PGPASSWORD"] = password
    return subprocess.run(["psql", "-X", "-w", "-h", "127.0.0.1", "-p", str(port), "-U",
                           "postgres", "-d", "postgres", "-tAc", sql],
                          capture_output=True, text=True, env=env, timeout=60)


def test_postgres_per_agent_private_and_persistent(daemon: Daemon, project: Path) -> None:
    assert Path(PG_BIN, "postgres").exists(), "PostgreSQL 15 server binaries are required"
    daemon.create("pga", "--template", "backend-postgres", "--project", str(project))
    daemon.create("pgb", "--template", "backend-postgres", "--project", str(project))
    a = wait_healthy(daemon, "pga", "db", "api", timeout=180)
    b = wait_healthy(daemon, "pgb", "db", "api", timeout=180)
    pa, pb = a["db"]["host_port"], b["db"]["host_port"]
    assert pa != pb
    assert a["db"]["port"] == b["db"]["port"] == 5432
    pw_a = daemon.cli("exec", "pga", "--", "cat", "/home/agent/.pgpassword", check=True).stdout
    pw_b = daemon.cli("exec", "pgb", "--", "cat", "/home/agent/.pgpassword", check=True).stdout
    assert len(pw_a) >= 32
    assert pw_a != pw_b

    for port, pw, sql in ((pa, pw_a, "INSERT INTO who VALUES ('alpha')"),
                          (pb, pw_b, "INSERT INTO who VALUES ('beta')")):
        cp = psql(port, pw, "CREATE TABLE who (name text); " + sql)
        assert cp.returncode == 0, cp.stderr
    # each host port leads to that agent's own database
    assert psql(pa, pw_a, "SELECT name FROM who").stdout.split() == ["alpha"]
    assert psql(pb, pw_b, "SELECT name FROM who").stdout.split() == ["beta"]
    # through the published port a password is needed, and only the right one works
    assert psql(pa, None, "SELECT 1").returncode != 0
    assert psql(pb, pw_a, "SELECT 1").returncode != 0
    # inside, an agent reaches its own database but not the other agent's address
    ip_b = daemon.json("inspect", "pgb")["ip"]
    own = daemon.cli("exec", "pga", "--", "pg_isready", "-h", "127.0.0.1", "-p", "5432",
                     "-t", "5")
    assert own.returncode == 0, own.stdout + own.stderr
    other = daemon.cli("exec", "pga", "--", "pg_isready", "-h", ip_b, "-p", "5432", "-t", "3")
    assert other.returncode != 0
    # the api service found its database through the environment (DATABASE_URL)
    url = daemon.cli("exec", "pga", "--", "sh", "-c", "psql \"$DATABASE_URL\" -tAc "
                     "'SELECT name FROM who'", check=True)
    assert url.stdout.split() == ["alpha"]

    # data survives a restart of the agent; setup (initdb) does not run again
    daemon.cli("restart", "pga", check=True)
    wait_healthy(daemon, "pga", "db", "api", timeout=180)
    assert daemon.json("inspect", "pga")["services"]["db"]["host_port"] == pa
    got = poll("db answers after restart",
               lambda: (lambda cp: cp.stdout.split() if cp.returncode == 0 else None)(
                   psql(pa, pw_a, "SELECT name FROM who")), 60, daemon)
    assert got == ["alpha"]
    logs = daemon.cli("logs", "pga", "--service", "db", check=True).stdout
    assert logs.count("Success. You can now start the database server") <= 1
    assert logs.count("creating directory /home/agent/pgdata") == 1
    # start order db → api, stop order the reverse
    started = [e["data"]["service"] for e in events(daemon, "pga", "service.started")]
    stopped = [e["data"]["service"] for e in events(daemon, "pga", "service.stopped")]
    assert started == ["db", "api", "db", "api"]
    assert stopped == ["api", "db"]
