"""The asciicast v2 writer: header, events, UTF-8 split across chunks, size cap, names."""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path

import pytest

from supervisor.recording import COALESCE, AsciicastRecorder, open_recording, recording_path


def _read(path: str) -> tuple[dict[str, object], list[list[object]]]:
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return json.loads(lines[0]), [json.loads(x) for x in lines[1:]]


def test_header_and_events(tmp_path: Path) -> None:
    rec = open_recording(str(tmp_path), "web-1", "alice", 120, 40, {"TERM": "xterm"})
    rec.output(b"hello \x1b[1mworld\x1b[0m\r\n")
    rec.input(b"ls\r")
    rec.resize(100, 30)
    rec.output("é".encode()[:1])          # a character split across two reads ...
    rec.output("é".encode()[1:] + b"!")   # ... is recorded whole
    rec.close()
    header, events = _read(rec.path)
    assert header["version"] == 2
    assert header["width"] == 120
    assert header["height"] == 40
    assert header["env"] == {"TERM": "xterm"}
    assert isinstance(header["timestamp"], int)
    kinds = [e[1] for e in events]
    assert kinds == ["o", "i", "r", "o"]
    assert events[0][2] == "hello \x1b[1mworld\x1b[0m\r\n"
    assert events[2][2] == "100x30"
    assert events[3][2] == "é!"
    times = [e[0] for e in events]
    assert times == sorted(times)
    assert all(isinstance(t, float | int) and t >= 0 for t in times)
    assert Path(rec.path).stat().st_mode & 0o777 == 0o600
    assert Path(rec.path).parent == tmp_path / "web-1"


def test_size_cap_writes_marker_and_stops(tmp_path: Path) -> None:
    path = str(tmp_path / "a" / "cap.cast")
    rec = AsciicastRecorder(path, 80, 24, max_bytes=2000)
    for _ in range(100):
        rec.output(b"x" * 100)
    rec.close()
    data = Path(path).read_text()
    assert len(data) < 2000 + 200
    _, events = _read(path)
    assert "recording size limit" in str(events[-1][2])
    assert sum("x" * 100 in str(e[2]) for e in events) < 20


def test_never_overwrites_and_names_are_safe(tmp_path: Path) -> None:
    when = dt.datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=dt.UTC)
    p = recording_path(str(tmp_path), "../evil", "a/b", when)
    assert Path(p).parent.parent == tmp_path
    assert Path(p).name == "20260102T030405.000006Z-a_b.cast"
    r1 = AsciicastRecorder(p, 80, 24)
    r1.close()
    with pytest.raises(FileExistsError):
        AsciicastRecorder(p, 80, 24)
    # open_recording finds a fresh name even when the first is taken
    a = open_recording(str(tmp_path), "x", "u", 80, 24)
    b = open_recording(str(tmp_path), "x", "u", 80, 24)
    assert a.path != b.path
    a.close()
    b.close()


def test_invalid_bytes_do_not_break_json(tmp_path: Path) -> None:
    rec = open_recording(str(tmp_path), "x", "u", 0, 0)
    rec.output(b"\xff\xfe ok \x00")
    rec.close()
    header, events = _read(rec.path)
    assert header["width"] == 1
    assert "ok" in str(events[0][2])


def test_output_is_coalesced_by_time(tmp_path: Path) -> None:
    """A flood of small chunks becomes few events; a pause starts a new one."""
    rec = open_recording(str(tmp_path), "x", "u", 80, 24)
    for _ in range(1000):
        rec.output(b"ab")
    time.sleep(COALESCE * 2)
    rec.output(b"later")
    rec.input(b"k")          # input flushes pending output first: order is kept
    rec.output(b"after")
    rec.close()
    _, events = _read(rec.path)
    assert [e[1] for e in events] == ["o", "o", "i", "o"]
    assert events[0][2] == "ab" * 1000
    assert events[1][2] == "later"
    assert events[3][2] == "after"
    assert float(str(events[1][0])) - float(str(events[0][0])) >= COALESCE
