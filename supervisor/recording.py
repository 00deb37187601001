"""Session recording as asciicast v2 (https://docs.asciinema.org/manual/asciicast/v2/).

One file per attached SSH session: a JSON header line
``{"version": 2, "width", "height", "timestamp", "env"}`` then one JSON array
per event, ``[seconds_since_start, "o"|"i"|"r", data]``. Output is decoded as
UTF-8 incrementally, so a multi-byte character split across two reads is not
garbled. A recording is bounded (`max_bytes`): past it a marker is written and
the rest is not recorded, so a flooding agent cannot fill the disk through us.
Writes go through a buffered file and are flushed at most once a second (and on
close), so recording costs the event loop a memcpy, not a syscall per chunk.
Output is coalesced: chunks arriving within COALESCE seconds of the first
pending one become one "o" event stamped with that first chunk's time (the
player shows them together, as a terminal refreshing at 20 Hz would), so a
flood costs one decode and one JSON encoding per 50 ms, not per chunk.
"""

from __future__ import annotations

import codecs
import datetime as dt
import json
import logging
import os
import re
import time
from collections import OrderedDict
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)

_SAFE = re.compile(r"[^A-Za-z0-9_.-]")
FLUSH_INTERVAL = 1.0
#: Output chunks within this many seconds (or up to COALESCE_BYTES) form one event.
COALESCE = 0.05
COALESCE_BYTES = 256 * 1024


#: JSON escapes for the control bytes terminal output is made of; a chunk with
#: any other control byte (or non-ASCII) takes json.dumps.
_ESCAPES = ((b"\\", b"\\\\"), (b'"', b'\\"'), (b"\n", b"\\n"), (b"\r", b"\\r"),
            (b"\t", b"\\t"), (b"\x1b", b"\\u001b"), (b"\x08", b"\\b"),
            (b"\x07", b"\\u0007"))
_NOT_CONTROL = bytes(range(0x20, 0x80))
#: Recently quoted chunks: every client attached to a session records the same
#: chunk objects (the hub hands each the keeper's frames), so one is quoted once.
_QUOTED: OrderedDict[bytes, bytes | None] = OrderedDict()
_QUOTED_KEEP = 16


def _quote_ascii(data: bytes) -> bytes | None:
    """The inside of `data`'s JSON string literal, or None when it is not plain ASCII.

    The same text json.dumps gives, at a few bulk bytes.replace passes instead
    of a per-character encoder (json.dumps, ~150 MB/s, was the daemon's
    largest cost with five clients attached to a flood)."""
    if not data.isascii():
        return None
    for raw, esc in _ESCAPES:
        if raw in data:
            data = data.replace(raw, esc)
    if data.translate(None, _NOT_CONTROL):
        return None      # a control byte we have no short escape for
    return data


def _quote_chunk(chunk: bytes) -> bytes | None:
    if len(chunk) < 4096:
        return _quote_ascii(chunk)   # small: cheaper to redo than to cache
    try:
        _QUOTED.move_to_end(chunk)
        return _QUOTED[chunk]
    except KeyError:
        pass
    quoted = _QUOTED[chunk] = _quote_ascii(chunk)
    while len(_QUOTED) > _QUOTED_KEEP:
        _QUOTED.popitem(last=False)
    return quoted


def _quote_all(chunks: list[bytes]) -> list[bytes] | None:
    out: list[bytes] = []
    for chunk in chunks:
        q = _quote_chunk(chunk)
        if q is None:
            return None
        out.append(q)
    return out


def recording_path(recordings_dir: str, agent: str, user: str, when: dt.datetime) -> str:
    """recordings_dir/<agent>/<UTC timestamp>-<user>.cast (names made path-safe)."""
    stamp = when.astimezone(dt.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    return str(Path(recordings_dir) / _SAFE.sub("_", agent)
               / f"{stamp}-{_SAFE.sub('_', user)}.cast")


class AsciicastRecorder:
    """Write one asciicast v2 file; every method is cheap and never raises on I/O errors."""

    def __init__(self, path: str, width: int, height: int, env: dict[str, str] | None = None,
                 *, max_bytes: int = 256 * 1024 * 1024, title: str | None = None) -> None:
        self.path = path
        self._max = max_bytes
        self._written = 0
        self._cut = False
        self._start = time.monotonic()
        self._last_flush = self._start
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._file: IO[bytes] | None = None
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._pending_at = 0.0
        Path(path).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # O_EXCL: never append to (or through a symlink into) an existing file.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                     0o600)
        self._file = os.fdopen(fd, "wb", buffering=64 * 1024)
        header: dict[str, object] = {
            "version": 2,
            "width": max(1, int(width)),
            "height": max(1, int(height)),
            "timestamp": int(time.time()),
            "env": env or {},
        }
        if title:
            header["title"] = title
        self._emit(json.dumps(header).encode())

    @property
    def bytes_written(self) -> int:
        return self._written

    def _elapsed(self, at: float | None = None) -> float:
        return round((time.monotonic() if at is None else at) - self._start, 6)

    def _emit(self, line: bytes) -> None:
        if self._file is None:
            return
        try:
            self._file.write(line + b"\n")
            self._written += len(line) + 1
            now = time.monotonic()
            if now - self._last_flush >= FLUSH_INTERVAL:
                self._file.flush()
                self._last_flush = now
        except OSError as exc:
            # A full disk must not take the session down with it: stop recording.
            log.warning("recording %s stopped: %s", self.path, exc)
            self._close_file()

    def _event(self, kind: str, data: str, at: float | None = None) -> None:
        if self._cut or self._file is None or not data:
            return
        self._emit_checked(json.dumps([self._elapsed(at), kind, data],
                                      ensure_ascii=False).encode())

    def _emit_checked(self, line: bytes) -> None:
        """Write an event line, or the cut marker if it would pass max_bytes."""
        if self._written + len(line) + 1 > self._max:
            self._cut = True
            self._emit(json.dumps([self._elapsed(), "o",
                                   "\r\n[corral: recording size limit reached]\r\n"]).encode())
            return
        self._emit(line)

    def output(self, data: bytes) -> None:
        """Terminal output ("o" event), coalesced (see the module doc)."""
        if self._cut or self._file is None or not data:
            return
        now = time.monotonic()
        if self._pending and (now - self._pending_at >= COALESCE
                              or self._pending_size >= COALESCE_BYTES):
            self._flush_output()
        if not self._pending:
            self._pending_at = now
        self._pending.append(data)
        self._pending_size += len(data)

    def _flush_output(self) -> None:
        if not self._pending:
            return
        chunks = self._pending
        self._pending = []
        self._pending_size = 0
        if self._cut or self._file is None:
            return
        quoted = None if self._decoder.getstate()[0] else _quote_all(chunks)
        if quoted is None:
            # Non-ASCII or unusual control bytes: the exact (slower) path.
            self._event("o", self._decoder.decode(b"".join(chunks)), self._pending_at)
            return
        self._emit_checked(b"".join((f'[{self._elapsed(self._pending_at)}, "o", "'.encode(),
                                     *quoted, b'"]')))

    def input(self, data: bytes) -> None:
        """Keystrokes ("i" event); decoded leniently, one event per chunk."""
        self._flush_output()
        self._event("i", data.decode("utf-8", errors="replace"))

    def resize(self, cols: int, rows: int) -> None:
        """Terminal resize ("r" event, "COLSxROWS")."""
        self._flush_output()
        self._event("r", f"{int(cols)}x{int(rows)}")

    def _close_file(self) -> None:
        f, self._file = self._file, None
        if f is not None:
            try:
                f.close()
            except OSError as exc:
                log.warning("closing recording %s: %s", self.path, exc)

    def close(self) -> None:
        self._flush_output()
        tail = self._decoder.decode(b"", final=True)
        if tail:
            self._event("o", tail)
        self._close_file()


def open_recording(recordings_dir: str, agent: str, user: str, width: int, height: int,
                   env: dict[str, str] | None = None, *,
                   max_bytes: int = 256 * 1024 * 1024) -> AsciicastRecorder:
    """Create a new recording file for one attach; a name collision gets a numeric suffix."""
    now = dt.datetime.now(dt.UTC)
    base = recording_path(recordings_dir, agent, user, now)
    Path(base).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    for n in range(100):
        path = base if n == 0 else base.replace(".cast", f"-{n}.cast")
        try:
            return AsciicastRecorder(path, width, height, env, max_bytes=max_bytes,
                                     title=f"{agent} ({user})")
        except FileExistsError:
            continue
    raise FileExistsError(f"no free recording name near {base}")
