"""The daemon's state store: one SQLite file (stdlib sqlite3, WAL, synchronous API).

What lives here: agents and their intent (desired state, last completed
lifecycle step), leases (uids, subnet slots, host ports), team members with
their SSH keys and per-agent grants, and the event log.

Why it is shaped this way:

- Every write runs in ``BEGIN IMMEDIATE`` (`Store.tx`): the write lock is taken
  up front, so two connections (two daemons on one file by mistake, or a test
  with two Store objects) serialise instead of failing with SQLITE_BUSY when a
  read lock is upgraded, and a lease's "find the lowest free value, insert it"
  is atomic.
- A store that is corrupted, unreadable or unwritable makes `Store.open` raise
  HostSetupError. It never deletes, truncates or recreates an existing file:
  the agents it describes keep running and their state is the person's to
  recover (THREATS.md "The daemon itself").
- Names are checked with sandbox.spec.check_name before they reach SQL (which
  is parameterised anyway) so the store never holds a name that another
  module could not safely turn into a path or an interface name.
- One connection per Store, shared across threads behind a lock: the daemon
  calls it from the event loop and from worker threads.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

from sandbox.errors import Conflict, CorralError, HostSetupError, NotFound
from sandbox.spec import check_name

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
#: The event table keeps at most this many rows (the newest).
MAX_EVENTS = 100_000
BUSY_TIMEOUT_MS = 30_000  # generous: tests share 2 CPUs with other suites

LeaseKind = Literal["uid", "subnet", "port"]
LEASE_KINDS = ("uid", "subnet", "port")
ROLES = ("viewer", "collaborator", "owner")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS agents (
    name          TEXT PRIMARY KEY,
    template      TEXT NOT NULL,
    template_json TEXT NOT NULL DEFAULT '{}',
    project       TEXT,
    state         TEXT NOT NULL DEFAULT 'creating',
    reason        TEXT NOT NULL DEFAULT '',
    desired       TEXT NOT NULL DEFAULT 'running',
    step          TEXT NOT NULL DEFAULT '',
    spec_json     TEXT,
    uid           INTEGER,
    subnet_index  INTEGER,
    keeper_pid    INTEGER,
    keeper_start  REAL,
    init_pid      INTEGER,
    exit_status   INTEGER,
    base_commit   TEXT,
    created       TEXT NOT NULL,
    started       TEXT,
    extra_json    TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS leases (
    kind    TEXT NOT NULL CHECK (kind IN ('uid', 'subnet', 'port')),
    value   INTEGER NOT NULL,
    agent   TEXT NOT NULL,
    purpose TEXT NOT NULL DEFAULT '',
    created TEXT NOT NULL,
    PRIMARY KEY (kind, value),
    UNIQUE (agent, kind, purpose)
);
CREATE TABLE IF NOT EXISTS users (
    name    TEXT PRIMARY KEY,
    created TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS user_keys (
    fingerprint TEXT PRIMARY KEY,
    user        TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    key         TEXT NOT NULL,
    created     TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS user_keys_user ON user_keys(user);
CREATE TABLE IF NOT EXISTS grants (
    agent TEXT NOT NULL REFERENCES agents(name) ON DELETE CASCADE,
    user  TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    role  TEXT NOT NULL CHECK (role IN ('viewer', 'collaborator', 'owner')),
    PRIMARY KEY (agent, user)
);
CREATE TABLE IF NOT EXISTS events (
    id    INTEGER PRIMARY KEY AUTOINCREMENT,
    ts    TEXT NOT NULL,
    kind  TEXT NOT NULL,
    agent TEXT,
    data  TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS events_agent ON events(agent, id);
CREATE INDEX IF NOT EXISTS events_ts ON events(ts);
"""

_OUR_TABLES = {"meta", "agents", "leases", "users", "user_keys", "grants", "events"}


def now_iso() -> str:
    """UTC now as ISO 8601 with microseconds (fixed width, so it sorts as text)."""
    return datetime.now(UTC).isoformat(timespec="microseconds")


@dataclass(frozen=True)
class AgentRow:
    """One agent as stored: its template, intent, progress and runtime identity."""

    name: str
    template: str  # template name
    template_json: str  # the resolved template (templates.template_to_dict) as JSON
    project: str | None  # host project directory (None: no project)
    state: str  # creating | starting | running | degraded | stopping | stopped | failed
    reason: str  # why failed/degraded ('' otherwise)
    desired: str  # what the person asked for: running | stopped (| removed while removing)
    step: str  # last completed lifecycle step, for reconcile after a crash
    spec_json: str | None  # sandbox.spec.SandboxSpec JSON once leases are taken
    uid: int | None  # leased host uid
    subnet_index: int | None  # leased /30 slot
    keeper_pid: int | None
    keeper_start: float | None  # the keeper's process start time (PID reuse guard)
    init_pid: int | None  # the sandbox's PID 1 as seen from the host
    exit_status: int | None
    base_commit: str | None  # project HEAD when the agent was created
    created: str  # ISO time
    started: str | None  # ISO time of the last start
    extra_json: str  # free-form JSON for later fields

    @property
    def extra(self) -> dict[str, Any]:
        value = json.loads(self.extra_json or "{}")
        return value if isinstance(value, dict) else {}


AGENT_COLUMNS = tuple(f.name for f in fields(AgentRow))


@dataclass(frozen=True)
class Lease:
    """A value of a kind (uid, subnet slot, host port) held by an agent for a purpose."""

    kind: str
    value: int
    agent: str
    purpose: str  # '' or e.g. the service name for ports


@dataclass(frozen=True)
class UserKey:
    fingerprint: str  # "SHA256:..." as asyncssh's get_fingerprint("sha256") gives it
    key: str  # the public key in OpenSSH format


@dataclass(frozen=True)
class User:
    name: str
    created: str
    keys: tuple[UserKey, ...]


@dataclass(frozen=True)
class Event:
    id: int
    ts: str  # ISO time, UTC
    kind: str  # e.g. agent.created, service.unhealthy
    agent: str | None
    data: dict[str, Any]


class Store:
    """The state store. Create with `Store.open(path)`."""

    def __init__(self, conn: sqlite3.Connection, path: str, max_events: int = MAX_EVENTS) -> None:
        self._conn = conn
        self.path = path
        self.max_events = max_events
        self._lock = threading.RLock()
        self._depth = 0

    # ------------------------------------------------------------------ open

    @classmethod
    def open(cls, path: str, *, max_events: int = MAX_EVENTS) -> Store:
        """Open (or create) the store at `path`; HostSetupError if it is unusable."""
        p = Path(path)
        hint = (
            f"nothing was changed: fix {path} or its directory (restore a backup, or move "
            "the file aside to start with an empty store); running agents are not touched"
        )
        exists = p.exists()
        if exists and not p.is_file():
            raise HostSetupError(f"state store {path} is not a regular file", hint=hint)
        if not exists:
            try:
                p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            except OSError as e:
                raise HostSetupError(
                    f"state store {path}: cannot create {p.parent}: {e.strerror}",
                    hint="check state_dir in the daemon config",
                ) from None
        # mode=rw for an existing file: SQLite must never create (or recreate) it.
        uri = f"file:{quote(str(p.resolve()))}?mode={'rw' if exists else 'rwc'}"
        try:
            conn = sqlite3.connect(
                uri, uri=True, isolation_level=None, check_same_thread=False, timeout=30
            )
        except sqlite3.Error as e:
            raise HostSetupError(f"state store {path} is unreadable: {e}", hint=hint) from None
        try:
            cls._check(conn, path)
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA foreign_keys = ON")
            # WAL: readers never block the writer. synchronous=NORMAL: in WAL
            # mode a commit survives the process being killed (the threat we
            # reconcile after) and the file is never corrupted; only a power
            # loss may drop the last commits, and then every namespace and
            # process they described is gone too. FULL costs an fsync per
            # commit: 6 ms vs 0.3 ms here, ~10 commits per `corral create`.
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise HostSetupError(
                    f"state store {path}: cannot switch to WAL mode (got {mode})", hint=hint
                )
            conn.execute("PRAGMA synchronous = NORMAL")
            store = cls(conn, path, max_events)
            store._init_schema()
        except HostSetupError:
            conn.close()
            raise
        except sqlite3.Error as e:
            conn.close()
            raise HostSetupError(f"state store {path} is {_diagnose(p, e)}", hint=hint) from None
        log.debug("store %s open (schema %d)", path, SCHEMA_VERSION)
        return store

    @staticmethod
    def _check(conn: sqlite3.Connection, path: str) -> None:
        """quick_check before anything writes: a damaged file is reported, not 'repaired'."""
        try:
            rows = [r[0] for r in conn.execute("PRAGMA quick_check").fetchall()]
        except sqlite3.Error as e:
            raise HostSetupError(
                f"state store {path} is {_diagnose(Path(path), e)}",
                hint=f"nothing was changed: restore {path} from a backup or move it aside; "
                "running agents are not touched",
            ) from None
        if rows != ["ok"]:
            raise HostSetupError(
                f"state store {path} is corrupted: {'; '.join(map(str, rows[:3]))}",
                hint=f"nothing was changed: restore {path} from a backup or move it aside; "
                "running agents are not touched",
            )
        # Still read-only: refuse someone else's database or a newer schema
        # before WAL mode or our schema is written into the file.
        tables = _tables(conn)
        if tables and "meta" not in tables:
            raise HostSetupError(
                f"{path} is an SQLite database but not a corral store "
                f"(tables: {', '.join(sorted(tables))})",
                hint="point state_dir at corral's own directory; nothing was changed",
            )
        if "meta" in tables:
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            version = int(row[0]) if row and str(row[0]).isdigit() else 0
            if version > SCHEMA_VERSION:
                raise HostSetupError(
                    f"state store {path} has schema {version}, newer than this corral "
                    f"({SCHEMA_VERSION})",
                    hint="run the newer corral, or restore a backup made by this version",
                )

    def _init_schema(self) -> None:
        tables = _tables(self._conn)
        if "meta" in tables and tables >= _OUR_TABLES:
            row = self._conn.execute(
                "SELECT value FROM meta WHERE key = 'schema_version'"
            ).fetchone()
            if row and int(row[0]) == SCHEMA_VERSION:
                return
        with self.tx():
            # Statement by statement: executescript() would COMMIT our transaction.
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    self._conn.execute(stmt)
            self._conn.execute(
                "INSERT INTO meta(key, value) VALUES ('schema_version', ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (str(SCHEMA_VERSION),),
            )

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # ------------------------------------------------------------ transactions

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (BEGIN IMMEDIATE); nested calls join the outer one.

        On any exception the whole transaction is rolled back and the exception
        propagates.
        """
        with self._lock:
            if self._depth:
                self._depth += 1
                try:
                    yield self._conn
                finally:
                    self._depth -= 1
                return
            self._conn.execute("BEGIN IMMEDIATE")
            self._depth = 1
            try:
                yield self._conn
            except BaseException:
                self._depth = 0
                self._conn.execute("ROLLBACK")
                raise
            self._depth = 0
            try:
                self._conn.execute("COMMIT")
            except sqlite3.Error:
                # A failed COMMIT leaves the transaction open: roll it back so
                # the connection is usable, then report.
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            cur = self._conn.execute(sql, args)
            cur.row_factory = sqlite3.Row
            return cur.fetchall()

    # ------------------------------------------------------------------ agents

    def add_agent(self, **fields_: Any) -> AgentRow:
        """Insert an agent (name, template and created are required); Conflict if it exists."""
        name = check_name(fields_.get("name", ""), "agent name")
        values = self._agent_values(fields_)
        values.setdefault("created", now_iso())
        if "template" not in values:
            raise CorralError("add_agent needs a template name")
        cols = list(values)
        with self.tx() as c:
            if c.execute("SELECT 1 FROM agents WHERE name = ?", (name,)).fetchone():
                raise Conflict(f"agent {name!r} already exists")
            c.execute(
                f"INSERT INTO agents ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",  # noqa: S608 (columns come from AGENT_COLUMNS)
                [values[k] for k in cols],
            )
        row = self.get_agent(name)
        assert row is not None  # noqa: S101 (just inserted under the lock)
        return row

    def get_agent(self, name: str) -> AgentRow | None:
        check_name(name, "agent name")
        rows = self._query("SELECT * FROM agents WHERE name = ?", (name,))
        return _agent(rows[0]) if rows else None

    def list_agents(self) -> list[AgentRow]:
        return [_agent(r) for r in self._query("SELECT * FROM agents ORDER BY name")]

    def update_agent(self, name: str, /, **fields_: Any) -> None:
        """Set some columns of an agent; NotFound if there is no such agent."""
        check_name(name, "agent name")
        if "name" in fields_:
            raise CorralError("an agent cannot be renamed")
        values = self._agent_values(fields_)
        if not values:
            return
        sets = ", ".join(f"{k} = ?" for k in values)
        with self.tx() as c:
            cur = c.execute(
                f"UPDATE agents SET {sets} WHERE name = ?",  # noqa: S608 (columns from AGENT_COLUMNS)
                [*values.values(), name],
            )
            if cur.rowcount == 0:
                raise NotFound(f"no agent named {name!r}")

    def delete_agent(self, name: str) -> None:
        """Remove an agent with its leases and grants (NotFound if it does not exist)."""
        check_name(name, "agent name")
        with self.tx() as c:
            c.execute("DELETE FROM leases WHERE agent = ?", (name,))
            if c.execute("DELETE FROM agents WHERE name = ?", (name,)).rowcount == 0:
                raise NotFound(f"no agent named {name!r}")

    @staticmethod
    def _agent_values(fields_: dict[str, Any]) -> dict[str, Any]:
        unknown = set(fields_) - set(AGENT_COLUMNS)
        if unknown:
            raise CorralError(f"unknown agent field(s): {', '.join(sorted(unknown))}")
        out = {}
        for k, v in fields_.items():
            # JSON columns accept their decoded form too.
            if k.endswith("_json") and v is not None and not isinstance(v, str):
                v = json.dumps(v, sort_keys=True)
            out[k] = v
        return out

    # ------------------------------------------------------------------ leases

    def lease(
        self,
        kind: str,
        agent: str,
        lo: int,
        hi: int,
        purpose: str = "",
        acceptable: Callable[[int], bool] = lambda v: True,
    ) -> int:
        """The lowest free value in [lo, hi] that `acceptable` accepts, held for (agent, purpose).

        Idempotent: the same (agent, kind, purpose) gets its existing lease
        back. Atomic across connections (BEGIN IMMEDIATE). Conflict if the range
        is exhausted.
        """
        if kind not in LEASE_KINDS:
            raise CorralError(f"unknown lease kind {kind!r}")
        check_name(agent, "agent name")
        if lo > hi:
            raise CorralError(f"empty lease range {lo}-{hi}")
        with self.tx() as c:
            row = c.execute(
                "SELECT value FROM leases WHERE agent = ? AND kind = ? AND purpose = ?",
                (agent, kind, purpose),
            ).fetchone()
            if row:
                return int(row[0])
            used = {
                r[0]
                for r in c.execute(
                    "SELECT value FROM leases WHERE kind = ? AND value BETWEEN ? AND ?",
                    (kind, lo, hi),
                )
            }
            for v in range(lo, hi + 1):
                if v in used or not acceptable(v):
                    continue
                c.execute(
                    "INSERT INTO leases (kind, value, agent, purpose, created) VALUES (?,?,?,?,?)",
                    (kind, v, agent, purpose, now_iso()),
                )
                log.debug("lease %s=%d to %s (%s)", kind, v, agent, purpose or "-")
                return v
        raise Conflict(
            f"no free {kind} left in {lo}-{hi}",
            hint=f"widen the {kind} range in the daemon config or remove unused agents",
        )

    def leases(self, agent: str | None = None, kind: str | None = None) -> list[Lease]:
        sql = "SELECT kind, value, agent, purpose FROM leases WHERE 1=1"
        args: list[Any] = []
        if agent is not None:
            check_name(agent, "agent name")
            sql += " AND agent = ?"
            args.append(agent)
        if kind is not None:
            sql += " AND kind = ?"
            args.append(kind)
        rows = self._query(sql + " ORDER BY kind, value", args)
        return [Lease(r["kind"], r["value"], r["agent"], r["purpose"]) for r in rows]

    def release_leases(self, agent: str, kind: str | None = None) -> int:
        """Drop an agent's leases (of one kind, or all); returns how many."""
        check_name(agent, "agent name")
        with self.tx() as c:
            if kind is None:
                cur = c.execute("DELETE FROM leases WHERE agent = ?", (agent,))
            else:
                cur = c.execute("DELETE FROM leases WHERE agent = ? AND kind = ?", (agent, kind))
            return int(cur.rowcount)

    def release_lease(self, agent: str, kind: str, purpose: str = "") -> bool:
        """Drop one lease (e.g. the port of a service that left the template)."""
        check_name(agent, "agent name")
        with self.tx() as c:
            cur = c.execute(
                "DELETE FROM leases WHERE agent = ? AND kind = ? AND purpose = ?",
                (agent, kind, purpose),
            )
            return bool(cur.rowcount)

    # ------------------------------------------------------------ users, grants

    def add_user(self, name: str, public_keys: Sequence[str]) -> User:
        """Add a team member (or more keys to one); keys are OpenSSH public key lines.

        Each key is parsed (asyncssh.import_public_key) so garbage or a private
        key is refused; a key already belonging to another user is a Conflict.
        """
        check_name(name, "user name")
        keys = _parse_keys(public_keys)
        if not keys:
            raise CorralError(f"no public key given for user {name!r}")
        now = now_iso()
        with self.tx() as c:
            c.execute("INSERT OR IGNORE INTO users (name, created) VALUES (?, ?)", (name, now))
            for fpr, text in keys:
                row = c.execute(
                    "SELECT user FROM user_keys WHERE fingerprint = ?", (fpr,)
                ).fetchone()
                if row and row[0] != name:
                    raise Conflict(f"key {fpr} already belongs to user {row[0]!r}")
                if not row:
                    c.execute(
                        "INSERT INTO user_keys (fingerprint, user, key, created) VALUES (?,?,?,?)",
                        (fpr, name, text, now),
                    )
        return next(u for u in self.list_users() if u.name == name)

    def remove_user(self, name: str) -> None:
        """Remove a user with their keys and grants; NotFound if unknown."""
        check_name(name, "user name")
        with self.tx() as c:
            if c.execute("DELETE FROM users WHERE name = ?", (name,)).rowcount == 0:
                raise NotFound(f"no user named {name!r}")

    def list_users(self) -> list[User]:
        keys: dict[str, list[UserKey]] = {}
        for r in self._query(
            "SELECT user, fingerprint, key FROM user_keys ORDER BY created, fingerprint"
        ):
            keys.setdefault(r["user"], []).append(UserKey(r["fingerprint"], r["key"]))
        return [
            User(r["name"], r["created"], tuple(keys.get(r["name"], ())))
            for r in self._query("SELECT name, created FROM users ORDER BY name")
        ]

    def user_for_key_fingerprint(self, fpr: str) -> str | None:
        """The user owning the key with this SHA256 fingerprint ("SHA256:..." or bare)."""
        if not fpr.startswith("SHA256:"):
            fpr = "SHA256:" + fpr
        rows = self._query("SELECT user FROM user_keys WHERE fingerprint = ?", (fpr,))
        return str(rows[0][0]) if rows else None

    def grant(self, agent: str, user: str, role: str) -> None:
        """Give `user` `role` on `agent` (replacing any previous role)."""
        check_name(agent, "agent name")
        check_name(user, "user name")
        if role not in ROLES:
            raise CorralError(f"invalid role {role!r}", hint="use viewer, collaborator or owner")
        with self.tx() as c:
            self._must_exist(c, agent, user)
            c.execute(
                "INSERT INTO grants (agent, user, role) VALUES (?, ?, ?) "
                "ON CONFLICT(agent, user) DO UPDATE SET role = excluded.role",
                (agent, user, role),
            )

    def revoke(self, agent: str, user: str) -> None:
        """Take away `user`'s role on `agent`; NotFound if there was none."""
        check_name(agent, "agent name")
        check_name(user, "user name")
        with self.tx() as c:
            cur = c.execute("DELETE FROM grants WHERE agent = ? AND user = ?", (agent, user))
            if cur.rowcount == 0:
                raise NotFound(f"user {user!r} has no role on agent {agent!r}")

    def grants(self, agent: str) -> dict[str, str]:
        check_name(agent, "agent name")
        rows = self._query("SELECT user, role FROM grants WHERE agent = ? ORDER BY user", (agent,))
        return {r["user"]: r["role"] for r in rows}

    def role(self, agent: str, user: str) -> str | None:
        check_name(agent, "agent name")
        check_name(user, "user name")
        rows = self._query("SELECT role FROM grants WHERE agent = ? AND user = ?", (agent, user))
        return str(rows[0][0]) if rows else None

    def handoff(self, agent: str, user: str) -> None:
        """Make `user` the owner; previous owners become collaborators (one transaction)."""
        check_name(agent, "agent name")
        check_name(user, "user name")
        with self.tx() as c:
            self._must_exist(c, agent, user)
            c.execute(
                "UPDATE grants SET role = 'collaborator' "
                "WHERE agent = ? AND role = 'owner' AND user != ?",
                (agent, user),
            )
            c.execute(
                "INSERT INTO grants (agent, user, role) VALUES (?, ?, 'owner') "
                "ON CONFLICT(agent, user) DO UPDATE SET role = 'owner'",
                (agent, user),
            )

    @staticmethod
    def _must_exist(c: sqlite3.Connection, agent: str, user: str) -> None:
        if not c.execute("SELECT 1 FROM agents WHERE name = ?", (agent,)).fetchone():
            raise NotFound(f"no agent named {agent!r}")
        if not c.execute("SELECT 1 FROM users WHERE name = ?", (user,)).fetchone():
            raise NotFound(f"no user named {user!r}", hint="add them with `corral user add`")

    # ------------------------------------------------------------------ events

    def add_event(
        self, kind: str, agent: str | None = None, data: dict[str, Any] | None = None
    ) -> Event:
        """Append an event; the table keeps only the newest `max_events` rows."""
        if agent is not None:
            check_name(agent, "agent name")
        payload = data or {}
        ts = now_iso()
        text = json.dumps(payload, sort_keys=True, default=str)
        with self.tx() as c:
            cur = c.execute(
                "INSERT INTO events (ts, kind, agent, data) VALUES (?, ?, ?, ?)",
                (ts, kind, agent, text),
            )
            eid = int(cur.lastrowid or 0)
            # ids only grow (AUTOINCREMENT), so this trims exactly the oldest rows.
            c.execute("DELETE FROM events WHERE id <= ?", (eid - self.max_events,))
        return Event(eid, ts, kind, agent, json.loads(text))

    def events(
        self,
        agent: str | None = None,
        since_iso: str | None = None,
        after_id: int | None = None,
        limit: int | None = None,
    ) -> list[Event]:
        """Events in id order; with `limit`, the newest `limit` of those matching."""
        sql = "SELECT id, ts, kind, agent, data FROM events WHERE 1=1"
        args: list[Any] = []
        if agent is not None:
            check_name(agent, "agent name")
            sql += " AND agent = ?"
            args.append(agent)
        if since_iso is not None:
            sql += " AND ts >= ?"
            args.append(normalize_iso(since_iso))
        if after_id is not None:
            sql += " AND id > ?"
            args.append(int(after_id))
        if limit is not None:
            sql = f"SELECT * FROM ({sql} ORDER BY id DESC LIMIT ?) ORDER BY id"  # noqa: S608 (fixed text)
            args.append(max(0, int(limit)))
        else:
            sql += " ORDER BY id"
        return [
            Event(r["id"], r["ts"], r["kind"], r["agent"], json.loads(r["data"]))
            for r in self._query(sql, args)
        ]


def normalize_iso(text: str) -> str:
    """An ISO time in the store's format (UTC, microseconds) so text comparison is correct."""
    try:
        t = datetime.fromisoformat(text.strip())
    except ValueError:
        raise CorralError(
            f"invalid time {text!r}", hint="use ISO 8601, like 2026-01-31T12:00:00Z"
        ) from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)  # a time without zone is taken as UTC, like the store's
    return t.astimezone(UTC).isoformat(timespec="microseconds")


def _diagnose(p: Path, err: sqlite3.Error) -> str:
    """Why SQLite could not use the file, in words a person can act on."""
    try:
        with p.open("rb") as f:
            head = f.read(16)
    except OSError as e:
        return f"unreadable: {e.strerror}"
    if head and head != b"SQLite format 3\0":
        return f"corrupted or unreadable: not an SQLite database ({err})"
    d = p.parent
    try:
        ro_fs = bool(os.statvfs(d).f_flag & os.ST_RDONLY)
    except OSError:
        ro_fs = False
    if ro_fs or not os.access(d, os.W_OK) or not os.access(p, os.W_OK):
        # WAL mode writes -wal and -shm files next to the store.
        return f"unwritable: {d} is read-only or not writable ({err})"
    return f"corrupted or unreadable: {err}"


def _tables(conn: sqlite3.Connection) -> set[str]:
    rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    return {str(r[0]) for r in rows} - {"sqlite_sequence"}


def _agent(r: sqlite3.Row) -> AgentRow:
    return AgentRow(**{k: r[k] for k in AGENT_COLUMNS})


def _parse_keys(entries: Sequence[str]) -> list[tuple[str, str]]:
    """(fingerprint, canonical OpenSSH text) for each key line; CorralError for a bad one."""
    import asyncssh  # only needed here; keeps the store importable without it for tools

    out: list[tuple[str, str]] = []
    for entry in entries:
        for line in entry.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            try:
                key = asyncssh.import_public_key(line)
            except (asyncssh.KeyImportError, ValueError) as e:
                raise CorralError(
                    f"not an SSH public key: {line[:40]!r}… ({e})",
                    hint="give the .pub file, e.g. ~/.ssh/id_ed25519.pub",
                ) from None
            fpr = str(key.get_fingerprint("sha256"))
            text = key.export_public_key("openssh").decode().strip()
            if fpr not in (f for f, _ in out):
                out.append((fpr, text))
    return out
