"""Session recording as asciicast v2 (https://docs.asciinema.org/manual/asciicast/v2/).

One file per attached SSH session: a JSON header line
``{"version": 2, "width", "height", "timestamp", "env"}`` then one JSON array
per event, ``[seconds_since_start, "o"|"i"|"r", data]``. Output is decoded as
UTF-8 incrementally, so a multi-byte character split across two reads is not
garbled. A recording is bounded (`max_bytes`): past it a marker is written and
the rest is not recorded, so a flooding agent cannot fill the disk through us.
Writes go through a buffered file and are flushed at most once a second (and on
close), so recording costs the event loop a memcpy, not a syscall per chunk.
"""

from __future__ import annotations

import codecs
import datetime as dt
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)

_SAFE = re.compile(r"[^A-Za-z0-9_.-]")
FLUSH_INTERVAL = 1.0


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
        self._file: IO[str] | None = None
        Path(path).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # O_EXCL: never append to (or through a symlink into) an existing file.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                     0o600)
        self._file = os.fdopen(fd, "w", encoding="utf-8", buffering=64 * 1024)
        header: dict[str, object] = {
            "version": 2,
            "width": max(1, int(width)),
            "height": max(1, int(height)),
            "timestamp": int(time.time()),
            "env": env or {},
        }
        if title:
            header["title"] = title
        self._emit(json.dumps(header))

    @property
    def bytes_written(self) -> int:
        return self._written

    def _elapsed(self) -> float:
        return round(time.monotonic() - self._start, 6)

    def _emit(self, line: str) -> None:
        if self._file is None:
            return
        try:
            self._file.write(line + "\n")
            self._written += len(line) + 1
            now = time.monotonic()
            if now - self._last_flush >= FLUSH_INTERVAL:
                self._file.flush()
                self._last_flush = now
        except OSError as exc:
            # A full disk must not take the session down with it: stop recording.
            log.warning("recording %s stopped: %s", self.path, exc)
            self._close_file()

    def _event(self, kind: str, data: str) -> None:
        if self._cut or self._file is None or not data:
            return
        line = json.dumps([self._elapsed(), kind, data], ensure_ascii=False)
        if self._written + len(line) + 1 > self._max:
            self._cut = True
            self._emit(json.dumps([self._elapsed(), "o",
                                   "\r\n[corral: recording size limit reached]\r\n"]))
            return
        self._emit(line)

    def output(self, data: bytes) -> None:
        """Terminal output ("o" event)."""
        self._event("o", self._decoder.decode(data))

    def input(self, data: bytes) -> None:
        """Keystrokes ("i" event); decoded leniently, one event per chunk."""
        self._event("i", data.decode("utf-8", errors="replace"))

    def resize(self, cols: int, rows: int) -> None:
        """Terminal resize ("r" event, "COLSxROWS")."""
        self._event("r", f"{int(cols)}x{int(rows)}")

    def _close_file(self) -> None:
        f, self._file = self._file, None
        if f is not None:
            try:
                f.close()
            except OSError as exc:
                log.warning("closing recording %s: %s", self.path, exc)

    def close(self) -> None:
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
