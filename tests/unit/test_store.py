"""The SQLite store: schema, transactions, leases across connections, grants, events, corruption."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import asyncssh
import pytest

from sandbox.errors import Conflict, CorralError, HostSetupError, NotFound
from supervisor.store import SCHEMA_VERSION, Lease, Store


@pytest.fixture
def db(tmp_path: Path) -> str:
    return str(tmp_path / "state" / "state.db")


@pytest.fixture
def store(db: str) -> Iterator[Store]:
    s = Store.open(db)
    try:
        yield s
    finally:
        s.close()


def pubkey() -> str:
    return asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode()


def add(store: Store, name: str = "web-1", **kw: object) -> None:
    store.add_agent(name=name, template="default", **kw)


# ---------------------------------------------------------------- schema


def test_open_creates_schema_in_wal_mode(db: str, store: Store) -> None:
    assert Path(db).is_file()
    raw = sqlite3.connect(db)
    try:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"meta", "agents", "leases", "users", "user_keys", "grants", "events"} <= tables
        version = raw.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0]
        assert int(version) == SCHEMA_VERSION
    finally:
        raw.close()


def test_reopen_keeps_data(db: str) -> None:
    s = Store.open(db)
    add(s, "keep-me", project="/srv/p")
    s.close()
    s = Store.open(db)
    try:
        row = s.get_agent("keep-me")
        assert row is not None
        assert row.project == "/srv/p"
    finally:
        s.close()


# ---------------------------------------------------------------- agents


def test_agent_crud(store: Store) -> None:
    row = store.add_agent(
        name="web-1", template="python-dev", template_json={"name": "python-dev"}, project="/p"
    )
    assert row.state == "creating"
    assert row.desired == "running"
    assert row.template_json == '{"name": "python-dev"}'
    assert row.created  # defaulted
    with pytest.raises(Conflict):
        add(store, "web-1")
    store.update_agent(
        "web-1", state="running", keeper_pid=123, keeper_start=4567.25, step="running",
        extra_json={"a": 1},
    )  # fmt: skip
    row2 = store.get_agent("web-1")
    assert row2 is not None
    assert (row2.state, row2.keeper_pid, row2.keeper_start, row2.step) == (
        "running", 123, 4567.25, "running",
    )  # fmt: skip
    assert row2.extra == {"a": 1}
    add(store, "api")
    assert [r.name for r in store.list_agents()] == ["api", "web-1"]
    store.delete_agent("web-1")
    assert store.get_agent("web-1") is None
    with pytest.raises(NotFound):
        store.delete_agent("web-1")
    with pytest.raises(NotFound):
        store.update_agent("web-1", state="stopped")


def test_unknown_fields_refused(store: Store) -> None:
    with pytest.raises(CorralError, match="unknown agent field"):
        store.add_agent(name="x", template="t", colour="red")
    add(store, "x")
    with pytest.raises(CorralError, match="unknown agent field"):
        store.update_agent("x", **{"state = 'x'; --": 1})
    with pytest.raises(CorralError, match="cannot be renamed"):
        store.update_agent("x", name="y")
    row = store.get_agent("x")
    assert row is not None
    assert row.state == "creating"


@pytest.mark.parametrize(
    "name", ["", "Web", "../etc", "a b", "a;drop table agents", "x" * 40, "-a", "1a", "a\n"]
)
def test_bad_names_never_reach_sql(store: Store, name: str) -> None:
    with pytest.raises(CorralError, match="invalid agent name"):
        store.add_agent(name=name, template="t")
    with pytest.raises(CorralError, match="invalid"):
        store.lease("uid", name, 1, 10)
    with pytest.raises(CorralError, match="invalid"):
        store.add_user(name, [pubkey()])
    assert store.list_agents() == []
    assert store.leases() == []
    assert store.list_users() == []


# ---------------------------------------------------------------- transactions


def test_transaction_rolls_back_on_error(store: Store) -> None:
    add(store, "before")

    class Boom(Exception):
        pass

    def work() -> None:
        with store.tx():
            add(store, "inside")
            store.lease("uid", "inside", 100, 200)
            store.update_agent("before", state="running")
            raise Boom

    with pytest.raises(Boom):
        work()
    assert store.get_agent("inside") is None
    assert store.leases() == []
    row = store.get_agent("before")
    assert row is not None
    assert row.state == "creating"
    # the store is usable afterwards (positive control)
    with store.tx():
        add(store, "after")
    assert store.get_agent("after") is not None


def test_failed_statement_rolls_back_the_whole_method(store: Store, db: str) -> None:
    add(store, "a1")
    store.add_user("alice", [pubkey()])
    store.add_user("bob", [pubkey()])
    store.add_user("carol", [pubkey()])
    store.grant("a1", "alice", "owner")
    store.grant("a1", "carol", "viewer")
    # Make the second statement of handoff() fail, after the first has run.
    raw = sqlite3.connect(db)
    raw.execute(
        "CREATE TRIGGER boom BEFORE UPDATE OF role ON grants WHEN NEW.user = 'carol' "
        "BEGIN SELECT RAISE(ABORT, 'boom'); END"
    )
    raw.commit()
    raw.close()
    with pytest.raises(sqlite3.IntegrityError, match="boom"):
        store.handoff("a1", "carol")
    # alice's demotion was rolled back with the failed promotion
    assert store.grants("a1") == {"alice": "owner", "carol": "viewer"}
    # positive control: handoff to someone else works and is complete
    store.handoff("a1", "bob")
    assert store.grants("a1") == {"alice": "collaborator", "bob": "owner", "carol": "viewer"}


# ---------------------------------------------------------------- leases


def test_lease_lowest_free_and_idempotent(store: Store) -> None:
    add(store, "a")
    add(store, "b")
    assert store.lease("uid", "a", 1000, 1002) == 1000
    assert store.lease("uid", "a", 1000, 1002) == 1000  # same (agent, kind, purpose)
    assert store.lease("uid", "b", 1000, 1002) == 1001
    assert store.lease("port", "a", 5000, 5010, purpose="web") == 5000
    assert store.lease("port", "a", 5000, 5010, purpose="db") == 5001
    assert store.lease("port", "a", 5000, 5010, purpose="web") == 5000
    # acceptable() skips values in use elsewhere on the host
    assert store.lease("port", "b", 5000, 5010, "x", acceptable=lambda v: v % 2 == 1) == 5003
    assert store.leases("a", "port") == [
        Lease("port", 5000, "a", "web"),
        Lease("port", 5001, "a", "db"),
    ]
    assert store.release_leases("a", "port") == 2
    assert store.lease("port", "b", 5000, 5010, "y") == 5000  # freed values are reused
    assert store.release_lease("b", "port", "y")
    assert not store.release_lease("b", "port", "y")
    with pytest.raises(CorralError, match="unknown lease kind"):
        store.lease("gpu", "a", 0, 1)


def test_lease_exhaustion(store: Store) -> None:
    for n in ("a", "b", "c"):
        add(store, n)
    store.lease("subnet", "a", 0, 1)
    store.lease("subnet", "b", 0, 1)
    with pytest.raises(Conflict, match="no free subnet left in 0-1"):
        store.lease("subnet", "c", 0, 1)
    assert store.leases(kind="subnet") == [Lease("subnet", 0, "a", ""), Lease("subnet", 1, "b", "")]


def test_delete_agent_releases_its_leases(store: Store) -> None:
    add(store, "a")
    add(store, "b")
    store.lease("uid", "a", 1, 10)
    store.lease("uid", "b", 1, 10)
    store.delete_agent("a")
    assert store.leases() == [Lease("uid", 2, "b", "")]


def test_leases_unique_across_two_store_objects(db: str) -> None:
    s1, s2 = Store.open(db), Store.open(db)
    try:
        names = [f"ag-{i}" for i in range(40)]
        for n in names:
            s1.add_agent(name=n, template="t")
        got: dict[str, int] = {}
        lock = threading.Lock()
        errors: list[BaseException] = []

        def worker(store: Store, mine: list[str]) -> None:
            try:
                for n in mine:
                    v = store.lease("uid", n, 200000, 265535)
                    w = store.lease("port", n, 20000, 20100, purpose="web")
                    with lock:
                        got[n] = v
                        got[n + "/port"] = w
            except BaseException as e:  # reported below
                errors.append(e)

        threads = [
            threading.Thread(target=worker, args=(s1 if i % 2 else s2, names[i::4]))
            for i in range(4)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors, errors
        uids = [got[n] for n in names]
        ports = [got[n + "/port"] for n in names]
        assert sorted(uids) == list(range(200000, 200040))
        assert sorted(ports) == list(range(20000, 20040))
        # idempotent across connections: the other Store returns the same lease
        for n in names[:5]:
            assert s2.lease("uid", n, 200000, 265535) == got[n]
            assert s1.lease("uid", n, 200000, 265535) == got[n]
        assert len(s1.leases(kind="uid")) == 40
    finally:
        s1.close()
        s2.close()


# ---------------------------------------------------------------- users and grants


def test_users_keys_and_fingerprints(store: Store) -> None:
    key = pubkey()
    fpr = asyncssh.import_public_key(key).get_fingerprint("sha256")
    user = store.add_user("alice", [key])
    assert user.name == "alice"
    assert [k.fingerprint for k in user.keys] == [fpr]
    assert store.user_for_key_fingerprint(fpr) == "alice"
    assert store.user_for_key_fingerprint(fpr.removeprefix("SHA256:")) == "alice"
    assert store.user_for_key_fingerprint("SHA256:nope") is None
    # adding again is idempotent; a second key is added
    key2 = pubkey()
    store.add_user("alice", [key, key2 + "\n# comment\n"])
    assert len(store.list_users()[0].keys) == 2
    # a key cannot belong to two people
    with pytest.raises(Conflict, match="already belongs to user 'alice'"):
        store.add_user("bob", [key])
    assert [u.name for u in store.list_users()] == ["alice"]


@pytest.mark.parametrize(
    "bad",
    [
        "ssh-ed25519 AAAAnotbase64!!",
        "hello",
        "",
        asyncssh.generate_private_key("ssh-ed25519").export_private_key().decode(),
    ],
)
def test_bad_keys_refused(store: Store, bad: str) -> None:
    with pytest.raises(CorralError):
        store.add_user("mallory", [bad])
    assert store.list_users() == []


def test_grants_roles_and_removal(store: Store) -> None:
    add(store, "a1")
    store.add_user("alice", [pubkey()])
    store.add_user("bob", [pubkey()])
    with pytest.raises(NotFound, match="no agent"):
        store.grant("nope", "alice", "viewer")
    with pytest.raises(NotFound, match="no user"):
        store.grant("a1", "nobody", "viewer")
    with pytest.raises(CorralError, match="invalid role"):
        store.grant("a1", "alice", "admin")
    store.grant("a1", "alice", "owner")
    store.grant("a1", "bob", "viewer")
    assert store.role("a1", "bob") == "viewer"
    store.grant("a1", "bob", "collaborator")  # replaces
    assert store.grants("a1") == {"alice": "owner", "bob": "collaborator"}
    store.revoke("a1", "bob")
    assert store.role("a1", "bob") is None
    with pytest.raises(NotFound):
        store.revoke("a1", "bob")
    # handoff to someone without a role yet
    store.handoff("a1", "bob")
    assert store.grants("a1") == {"alice": "collaborator", "bob": "owner"}
    # removing a user removes their grants and keys
    store.remove_user("bob")
    assert store.grants("a1") == {"alice": "collaborator"}
    with pytest.raises(NotFound):
        store.remove_user("bob")
    # removing the agent removes its grants
    store.delete_agent("a1")
    add(store, "a1")
    assert store.grants("a1") == {}


# ---------------------------------------------------------------- events


def test_events_since_after_limit(store: Store) -> None:
    add(store, "a1")
    e1 = store.add_event("agent.created", "a1", {"template": "default"})
    e2 = store.add_event("daemon.started")
    e3 = store.add_event("agent.started", "a1", {})
    assert e1.id < e2.id < e3.id
    assert e1.data == {"template": "default"}
    assert [e.id for e in store.events()] == [e1.id, e2.id, e3.id]
    assert [e.kind for e in store.events(agent="a1")] == ["agent.created", "agent.started"]
    assert [e.id for e in store.events(after_id=e1.id)] == [e2.id, e3.id]
    assert [e.id for e in store.events(limit=2)] == [e2.id, e3.id]
    assert store.events(since_iso="2999-01-01T00:00:00Z") == []
    assert len(store.events(since_iso="2000-01-01")) == 3
    # inclusive; events of the same instant as e2 (possible) come along
    since = store.events(since_iso=e2.ts)
    assert [e.id for e in since][-2:] == [e2.id, e3.id]
    assert all(e.ts >= e2.ts for e in since)
    assert store.events(since_iso=e3.ts)[-1].id == e3.id
    # the same instant written with a timezone offset
    assert len(store.events(since_iso="2000-01-01T02:00:00+02:00")) == 3
    with pytest.raises(CorralError, match="invalid time"):
        store.events(since_iso="yesterday")


def test_events_are_capped(db: str) -> None:
    s = Store.open(db, max_events=5)
    try:
        ids = [s.add_event("tick", data={"i": i}).id for i in range(12)]
        kept = s.events()
        assert [e.id for e in kept] == ids[-5:]
        assert [e.data["i"] for e in kept] == list(range(7, 12))
    finally:
        s.close()


# ---------------------------------------------------------------- damaged stores


def _snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_garbage_file_refused_and_untouched(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    db.write_bytes(b"this is not a database, it is a fish\n" * 200)
    before = _snapshot(tmp_path)
    with pytest.raises(HostSetupError, match="corrupted or unreadable") as ei:
        Store.open(str(db))
    assert "nothing was changed" in ei.value.hint
    assert _snapshot(tmp_path) == before  # not deleted, not recreated, no side files


def test_damaged_pages_refused_and_untouched(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    s = Store.open(str(db))
    for i in range(300):
        s.add_agent(name=f"a{i}", template="t", extra_json={"pad": "x" * 200})
    s.close()  # checkpoints the WAL into the main file
    data = bytearray(db.read_bytes())
    assert len(data) > 8 * 4096
    for off in range(2 * 4096, len(data) - 4096, 4096):
        data[off : off + 64] = b"\xa5" * 64  # trash every page header after the first two
    db.write_bytes(bytes(data))
    before = _snapshot(tmp_path)
    with pytest.raises(HostSetupError, match="corrupted"):
        Store.open(str(db))
    assert _snapshot(tmp_path) == before


def test_foreign_sqlite_database_refused(tmp_path: Path) -> None:
    db = tmp_path / "other.db"
    raw = sqlite3.connect(db)
    raw.execute("CREATE TABLE photos (id INTEGER)")
    raw.commit()
    raw.close()
    before = _snapshot(tmp_path)
    with pytest.raises(HostSetupError, match="not a corral store"):
        Store.open(str(db))
    assert _snapshot(tmp_path) == before


def test_newer_schema_refused(db: str) -> None:
    Store.open(db).close()
    raw = sqlite3.connect(db)
    raw.execute(
        "UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),)
    )
    raw.commit()
    raw.close()
    with pytest.raises(HostSetupError, match="newer than this corral"):
        Store.open(db)


def test_directory_or_bad_parent_refused(tmp_path: Path) -> None:
    (tmp_path / "isdir.db").mkdir()
    with pytest.raises(HostSetupError, match="not a regular file"):
        Store.open(str(tmp_path / "isdir.db"))
    (tmp_path / "afile").write_text("x")
    with pytest.raises(HostSetupError, match="cannot create"):
        Store.open(str(tmp_path / "afile" / "state.db"))
    assert (tmp_path / "afile").read_text() == "x"
