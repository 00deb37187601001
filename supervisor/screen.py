"""The terminal-state model of a session: pyte screen in, ANSI repaint out.

A newly attached client must see the current screen, not a raw replay of old
bytes (which garbles full-screen programs). We feed the session's output into a
pyte screen and, on attach, render that screen back as a compact ANSI repaint.

Feeding pyte is the expensive part (pure Python, about 165 KB/s here, and it
runs on the daemon's event loop), so output is queued raw and parsed in small
slices once the session has been quiet for a moment (`parse_some`, driven by
the hub), or when a snapshot is needed. If more than FLOOD_AT bytes wait,
older queued output is discarded and the screen rebuilt from the newest TAIL
bytes — the final screen of a flood is decided by its last bytes — so a
snapshot never parses more than FLOOD_AT bytes (~0.4 s) and the daemon's CPU
stays bounded whatever the agent prints.
"""

from __future__ import annotations

import pyte
import pyte.graphics

#: Beyond this much unparsed output, only the newest TAIL bytes are parsed.
FLOOD_AT = 64 * 1024
TAIL = 16 * 1024

_FG = {v: k for k, v in {**pyte.graphics.FG_ANSI, **pyte.graphics.FG_AIXTERM}.items()}
_BG = {v: k for k, v in {**pyte.graphics.BG_ANSI, **pyte.graphics.BG_AIXTERM}.items()}


def _color(value: str, table: dict[str, int], truecolor: int) -> str | None:
    if value == "default":
        return None
    if value in table:
        return str(table[value])
    if len(value) == 6:
        try:
            r, g, b = (int(value[i : i + 2], 16) for i in (0, 2, 4))
        except ValueError:
            return None
        return f"{truecolor};2;{r};{g};{b}"
    return None


def _sgr(ch: pyte.screens.Char) -> str:
    parts = ["0"]
    if ch.bold:
        parts.append("1")
    if ch.italics:
        parts.append("3")
    if ch.underscore:
        parts.append("4")
    if ch.blink:
        parts.append("5")
    if ch.reverse:
        parts.append("7")
    if ch.strikethrough:
        parts.append("9")
    fg = _color(ch.fg, _FG, 38)
    if fg:
        parts.append(fg)
    bg = _color(ch.bg, _BG, 48)
    if bg:
        parts.append(bg)
    return "\x1b[" + ";".join(parts) + "m"


class ScreenModel:
    def __init__(self, cols: int = 80, rows: int = 24) -> None:
        self.screen = pyte.Screen(cols, rows)
        self.stream = pyte.ByteStream(self.screen)
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._reset = False

    @property
    def size(self) -> tuple[int, int]:
        return self.screen.columns, self.screen.lines

    def feed(self, data: bytes) -> None:
        """Queue output; parsing waits for a snapshot, so a flood costs only
        appends here (the hub must keep up with the keeper, or it is dropped)."""
        self._pending.append(data)
        self._pending_size += len(data)
        if self._pending_size >= FLOOD_AT:
            # Keep only the newest TAIL bytes; the screen is rebuilt from them.
            tail = b"".join(self._pending)[-TAIL:]
            self._pending = [tail]
            self._pending_size = len(tail)
            self._reset = True

    @property
    def pending(self) -> int:
        return self._pending_size

    def parse_some(self, limit: int) -> bool:
        """Parse up to `limit` queued bytes; True if more wait."""
        if not self._pending:
            return False
        data = b"".join(self._pending)
        head, rest = data[:limit], data[limit:]
        self._pending = [rest] if rest else []
        self._pending_size = len(rest)
        if self._reset:
            self.screen.reset()
            self._reset = False
        self.stream.feed(head)
        return bool(rest)

    def _flush(self) -> None:
        if not self._pending:
            return
        data = b"".join(self._pending)
        self._pending.clear()
        self._pending_size = 0
        if self._reset:
            # After a flood: start from a clean screen, parse only the tail.
            self.screen.reset()
            self._reset = False
        self.stream.feed(data)

    def resize(self, cols: int, rows: int) -> None:
        self._flush()
        self.screen.resize(rows, cols)

    def render(self) -> bytes:
        """ANSI bytes that repaint the current screen on a fresh terminal."""
        self._flush()
        s = self.screen
        out = ["\x1b[0m\x1b[H\x1b[2J"]
        for y in range(s.lines):
            row = s.buffer[y]
            # Trailing default blanks need no painting.
            last = -1
            for x in range(s.columns):
                ch = row[x]
                if ch.data not in (" ", "") or _sgr(ch) != "\x1b[0m":
                    last = x
            if last < 0:
                continue
            out.append(f"\x1b[{y + 1};1H")
            cur = ""
            for x in range(last + 1):
                ch = row[x]
                sgr = _sgr(ch)
                if sgr != cur:
                    out.append(sgr)
                    cur = sgr
                out.append(ch.data)
            out.append("\x1b[0m")
        out.append(f"\x1b[{s.cursor.y + 1};{s.cursor.x + 1}H")
        out.append("\x1b[?25l" if s.cursor.hidden else "\x1b[?25h")
        return "".join(out).encode("utf-8", "replace")

    def text(self) -> list[str]:
        """The screen as plain lines (for tests and `inspect`)."""
        self._flush()
        return list(self.screen.display)
