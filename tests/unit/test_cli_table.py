"""Pure text rendering of the CLI: ps rows, sizes, durations, events, trees."""

from __future__ import annotations

from datetime import UTC, datetime

from supervisor import table

NOW = datetime(2026, 1, 1, 2, 0, 0, tzinfo=UTC)


def test_ps_row_fills_every_column_and_tolerates_missing_keys() -> None:
    agent = {
        "name": "web", "state": "running", "template": "python-dev",
        "started": "2026-01-01T01:58:30+00:00", "created": "2025-12-31T00:00:00+00:00",
        "usage": {"cpu_percent": 12.345, "memory_bytes": 3 * 1024**3, "pids": 17},
        "ports": {"web": 20001, "db": 20002},
        "clients": [{"user": "ann", "role": "owner"}, {"user": "bob"}, {"user": "ann"}],
    }
    assert table.ps_row(agent, NOW) == [
        "web", "running", "python-dev", "1m30s", "12.3%", "3.0G", "17", "web:20001,db:20002",
        "ann,bob"]
    assert table.ps_row({"name": "x", "state": "stopped"}, NOW) == [
        "x", "stopped", "-", "-", "-", "-", "-", "-", "-"]
    # Uptime falls back to `created` when the daemon gives no `started`.
    assert table.ps_row({"name": "y", "state": "degraded",
                         "created": "2025-12-30T00:00:00Z"}, NOW)[3] == "2d2h"


def test_table_alignment() -> None:
    text = table.table(("A", "LONGER"), [["long-cell", "x"], ["b", "y"]])
    assert text.splitlines() == ["A          LONGER", "long-cell  x", "b          y"]


def test_sizes_and_durations() -> None:
    assert table.human_bytes(512) == "512B"
    assert table.human_bytes(1536) == "1.5K"
    assert table.human_bytes(None) == "-"
    assert table.human_bytes(True) == "-"
    assert table.human_duration(59) == "59s"
    assert table.human_duration(3600 * 5 + 60 * 7) == "5h7m"
    assert table.parse_time("nonsense") is None
    assert table.parse_time(0) == datetime(1970, 1, 1, tzinfo=UTC)


def test_event_line() -> None:
    event = {"id": 9, "ts": "2026-01-01T00:00:00+00:00", "kind": "service.unhealthy",
             "agent": "web", "data": {"service": "db", "reason": "timed out", "n": 3}}
    assert table.event_line(event) == (
        '2026-01-01T00:00:00+00:00 service.unhealthy web service=db reason="timed out" n=3')
    assert table.event_line({"ts": "t", "kind": "user.added", "agent": None,
                             "data": {"user": "ann"}}) == "t user.added - user=ann"


def test_tree() -> None:
    text = table.tree({"name": "web", "limits": {"pids": 512}, "clients": [], "ok": True,
                       "services": {"db": {"state": "running"}}})
    assert text.splitlines() == [
        "name: web", "limits:", "  pids: 512", "clients: -", "ok: yes", "services:", "  db:",
        "    state: running"]


def test_ps_row_keeps_the_state_column_plain_when_waiting_for_input() -> None:
    # CONTRACT.md's columns stay parseable; `top` names who waits (test_cli)
    assert table.ps_row({"name": "a", "state": "running", "needs_input": True}, NOW)[1] == \
        "running"


def test_top_frame_names_the_agents_waiting_for_input() -> None:
    from supervisor.cli import top_frame

    agents = [{"name": "a", "state": "running", "needs_input": True},
              {"name": "b", "state": "running", "needs_input": False}]
    frame = top_frame(agents, NOW)
    assert "needs input: a\n" in frame
    assert "needs input" not in top_frame(agents[1:], NOW)
