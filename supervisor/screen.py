"""The terminal-state model of a session: terminal output in, ANSI repaint out.

A newly attached client, or one that fell behind and skipped output, must see
the current screen, not a raw replay of old bytes (which garbles full-screen
programs). The hub feeds every byte the session prints into a terminal
emulator and, when a client needs it, renders that screen back as a compact
ANSI repaint.

The emulator is libvterm (supervisor/vterm.py): it parses in C, 10-16 MB/s at
80x24 (most of it moving the screen up a line at a time), and keeps the
alternate screen that vi and top draw on. Output is parsed in pieces of up to
PARSE_AT bytes, and when the screen is looked at, so the head of a flood of
text that scrolls away unseen can be skipped exactly (supervisor.screen_flood);
a plain flood then costs a few percent of a full parse. A repaint reads the
screen back run by run (cells that share attributes), not cell by cell, so it
costs a few ctypes calls per row.

If libvterm is missing, the model falls back to pyte (pure Python, about 165
KB/s here, and no alternate screen) with one warning. pyte output is queued
raw and parsed in small slices once the session has been quiet (`parse_some`,
driven by the hub), or when a snapshot is needed; beyond FLOOD_AT queued bytes
only the newest TAIL are kept and the screen is rebuilt from them, so a
snapshot never parses more than FLOOD_AT bytes (~0.4 s). CORRAL_SCREEN_BACKEND
(vterm, pyte) or the `backend` argument picks one explicitly.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import unicodedata
from typing import Any

from sandbox.errors import HostSetupError
from supervisor import vterm
from supervisor.screen_flood import FloodCutter
from supervisor.screen_modes import ModeTracker

log = logging.getLogger(__name__)

BACKEND_ENV = "CORRAL_SCREEN_BACKEND"
BACKENDS = ("vterm", "pyte")

#: pyte fallback: beyond this much unparsed output, only the newest TAIL bytes are parsed.
FLOOD_AT = 64 * 1024
TAIL = 16 * 1024
#: libvterm: output waits until this much is fed (or the screen is looked at,
#: or the hub's quiet timer asks), so a flood's head is cut in large pieces.
PARSE_AT = 256 * 1024
#: ... or this many pieces wait (tiny feeds cost more as objects than as bytes).
PARSE_PIECES = 64

RESET = b"\x1b[0m"
#: Switching screens (DECSET 1049, 1047; libvterm 0.1.4 ignores 47).
_ALTSCREEN = re.compile(rb"\x1b\[\?(?:1049|1047)([hl])")


class ScreenModel:
    """The screen of one session; libvterm, or pyte if libvterm is missing."""

    def __init__(self, cols: int = 80, rows: int = 24, backend: str | None = None) -> None:
        choice = backend or os.environ.get(BACKEND_ENV) or "auto"
        if choice not in (*BACKENDS, "auto"):
            raise ValueError(f"screen backend {choice!r} (from the argument or {BACKEND_ENV}): "
                             f"expected one of {', '.join(BACKENDS)}")
        self._impl: VTermScreen | PyteScreen
        self.modes = ModeTracker()
        cols, rows = max(1, cols), max(1, rows)
        if choice == "pyte":
            self._impl = PyteScreen(cols, rows)
            return
        try:
            self._impl = VTermScreen(cols, rows, self.modes)
        except HostSetupError as e:
            if choice == "vterm":
                raise
            _warn_fallback(e)
            self._impl = PyteScreen(cols, rows)

    @property
    def backend(self) -> str:
        return self._impl.backend

    @property
    def term(self) -> vterm.VTerm | None:
        """The libvterm terminal (None on the pyte fallback), for tests and inspection."""
        return self._impl.term if isinstance(self._impl, VTermScreen) else None

    @property
    def size(self) -> tuple[int, int]:
        return self._impl.size

    def feed(self, data: bytes) -> None:
        """Everything the session prints, in order."""
        if isinstance(self._impl, PyteScreen):
            self.modes.feed(data)   # (libvterm's model feeds them what it parses)
        self._impl.feed(data)

    @property
    def pending(self) -> int:
        """Bytes fed but not parsed yet."""
        return self._impl.pending

    def parse_some(self, limit: int) -> bool:
        """Parse up to `limit` queued bytes (libvterm: all of them); True if more wait."""
        return self._impl.parse_some(limit)

    def resize(self, cols: int, rows: int) -> None:
        self._impl.resize(max(1, cols), max(1, rows))

    def render(self) -> bytes:
        """ANSI bytes that repaint the current screen on a client's terminal,
        whatever it was left in: the paint's own modes, reset SGR, home,
        clear, the rows' text with their attributes (trailing default blanks
        left out), the cursor's visibility, then the program's terminal modes
        (supervisor.screen_modes) and the cursor's position."""
        body = self._impl.render()
        return b"".join((self.modes.paint_state(), body,
                         self.modes.restore(self._impl.size[1], self._impl.cursor())))

    def text(self) -> list[str]:
        """The screen as plain lines, each as wide as the screen (for tests and `inspect`)."""
        return self._impl.text()


_warned = False


def _warn_fallback(e: HostSetupError) -> None:
    global _warned
    if not _warned:
        _warned = True
        log.warning("%s; screen models use pyte instead: slower, no alternate screen, and "
                    "rebuilt from the last %d KiB after a flood", e, TAIL // 1024)


# -- libvterm ----------------------------------------------------------------


def _color(c: bytes, base: int, bright: int, ext: int) -> str | None:
    """SGR parameters for a VTermColor (None: the default colour)."""
    kind = c[0]
    if kind & vterm.COLOR_DEFAULT:
        return None
    if kind & vterm.COLOR_INDEXED:
        i = c[1]
        if i < 8:
            return str(base + i)
        if i < 16:
            return str(bright + i - 8)
        return f"{ext};5;{i}"
    return f"{ext};2;{c[1]};{c[2]};{c[3]}"


def _sgr(attrs: int, fg: bytes, bg: bytes, bits: vterm.Attrs) -> bytes:
    """One SGR sequence that sets exactly these attributes, starting from 0."""
    parts = ["0"]
    underline = (attrs >> bits.underline_shift) & 3
    if underline == 2:
        # Double underline before bold: some old terminals read 21 as "bold off".
        parts.append("21")
    if attrs & bits.bold:
        parts.append("1")
    if attrs & bits.italic:
        parts.append("3")
    if underline == 1:
        parts.append("4")
    elif underline == 3:
        parts.append("4:3")
    if attrs & bits.blink:
        parts.append("5")
    if attrs & bits.reverse:
        parts.append("7")
    if bits.conceal and attrs & bits.conceal:
        parts.append("8")
    if attrs & bits.strike:
        parts.append("9")
    colors = [c for c in (_color(fg, 30, 90, 38), _color(bg, 40, 100, 48)) if c]
    seq = ";".join(parts + colors)
    if seq.count(";") + seq.count(":") >= vterm.CSI_ARGS_MAX:
        # Two truecolours and many attributes: libvterm (vim's and neovim's
        # terminals too) takes 16 parameters at most, so split.
        return b"\x1b[" + ";".join(parts).encode() + b"m\x1b[" + ";".join(colors).encode() + b"m"
    return b"\x1b[" + seq.encode() + b"m"


# Characters that are one cell wide for libvterm (and every wcwidth), and
# not combining: Latin, Greek, Cyrillic, general punctuation, arrows and math,
# box drawing and blocks, Braille. Anything else takes the cell-by-cell path.
_NOT_NARROW = re.compile("[^\x20-\x7e\xa0-\u02ff\u0370-\u0482\u048a-\u04ff\u2010-\u2027"
                         "\u2030-\u205e\u2190-\u22ff\u2500-\u259f\u2800-\u28ff]")


class VTermScreen:
    backend = "vterm"

    def __init__(self, cols: int, rows: int, modes: ModeTracker) -> None:
        self._term = vterm.VTerm(cols, rows)
        self.flood = FloodCutter()
        self.modes = modes
        self._pending: list[bytes] = []
        self.pending = 0
        # raw cell attributes (VTerm.run) -> SGR; bounded, truecolor has many
        self._sgr: dict[bytes, bytes] = {}
        #: while the alternate screen is up: a paint of the main screen as it
        #: was when the program switched (None: not known)
        self._main: bytes | None = None

    @property
    def term(self) -> vterm.VTerm:
        """The terminal, with everything fed so far parsed."""
        if self._pending:
            data = b"".join(self._pending)
            self._pending.clear()
            self.pending = 0
            t = self._term
            # Where the program last switched to the alternate screen: the
            # main screen is painted from there, once (see render).
            last = None
            for m in _ALTSCREEN.finditer(data):
                last = m
            if last is not None and last.group(1) == b"h":
                self._write(data[:last.start()])
                if not t.altscreen:
                    self._main = self._paint()
                data = data[last.start():]
            self._write(data)
            if not t.altscreen:
                self._main = None
        return self._term

    def _write(self, data: bytes) -> None:
        # The head of a flood that scrolls away unseen is not parsed, nor
        # scanned for modes: it is text and colours only (screen_flood).
        data = self.flood.cut(data, self._term.size[1])
        self.modes.feed(data)
        self._term.write(data)

    def cursor(self) -> tuple[int, int]:
        return self.term.cursor()

    @property
    def size(self) -> tuple[int, int]:
        return self._term.size

    def feed(self, data: bytes) -> None:
        # Parsed in pieces of PARSE_AT, or when the screen is looked at, so
        # the flood cut sees many small reads as one.
        self._pending.append(data)
        self.pending += len(data)
        if self.pending >= PARSE_AT or len(self._pending) >= PARSE_PIECES:
            _ = self.term

    def parse_some(self, limit: int) -> bool:
        _ = self.term
        return False

    def resize(self, cols: int, rows: int) -> None:
        self.term.resize(cols, rows)
        self._main = None   # painted for the old size

    def _sgr_of(self, raw: bytes) -> bytes:
        sgr = self._sgr.get(raw)
        if sgr is None:
            if len(self._sgr) >= 4096:
                self._sgr.clear()
            attrs = int.from_bytes(raw[:4], "little")
            sgr = self._sgr[raw] = _sgr(attrs, raw[4:8], raw[8:12], self.term.attr_bits)
        return sgr

    def render(self) -> bytes:
        t = self.term
        if t.altscreen:
            # The client's terminal goes to the screen the program is on.
            # Leaving the alternate screen brings back the client's own main
            # screen, so that one is painted first: as the session's was when
            # the program switched (libvterm cannot show us the session's
            # main screen while the alternate one is up), or cleared if that
            # is not known (resized since, or the switch came cut in two).
            main = self._main or RESET + b"\x1b[H\x1b[2J"
            return self._paint(main + b"\x1b[?1049h" + RESET + b"\x1b[H\x1b[2J")
        return self._paint(b"\x1b[?1049l" + RESET + b"\x1b[H\x1b[2J")

    def _paint(self, head: bytes = b"\x1b[?1049l" + RESET + b"\x1b[H\x1b[2J") -> bytes:
        """`head`, then the screen the terminal shows now, cell by cell."""
        t = self._term
        cols, rows = t.size
        out = [head]
        cur = RESET
        # Where the cursor is. The next row's start is reached with CR LF, as
        # tmux does (line-oriented readers of a client's output, like grep,
        # see lines), anything else with CUP; rows are painted top down, so
        # the LFs never scroll.
        cy = cx = 0
        for row in range(rows):
            runs = self._runs(row, cols)
            # Trailing default blanks need no painting.
            while runs and runs[-1][2] == RESET and not runs[-1][3].rstrip(b" "):
                runs.pop()
            if runs and runs[-1][2] == RESET:
                col, end, sgr, text, covered = runs[-1]
                stripped = text.rstrip(b" ")
                runs[-1] = (col, end, sgr, stripped, covered - (len(text) - len(stripped)))
            for col, end, sgr, text, covered in runs:
                if sgr == RESET and not text:
                    continue   # a gap: the next run moves the cursor past it
                if row > cy and col == 0:
                    out.append(b"\r\n" * (row - cy))
                elif (row, col) != (cy, cx):
                    out.append(b"\x1b[%d;%dH" % (row + 1, col + 1))
                if sgr != cur:
                    out.append(sgr)
                    cur = sgr
                if sgr != RESET and covered != end:
                    # Erased cells in colour: ECH paints them with the pen, as
                    # the program most likely did, without moving the cursor.
                    out.append(b"\x1b[%dX" % (end - col))
                out.append(text)
                cy, cx = row, covered
        attrs, fg, bg = t.pen()
        pen = _sgr(attrs, fg, bg, t.attr_bits)
        if pen != cur:
            # Raw output after the repaint continues in the program's colours.
            out.append(pen)
        y, x = t.cursor()
        out.append(b"\x1b[%d;%dH" % (y + 1, x + 1))
        out.append(b"\x1b[?25h" if t.cursor_visible else b"\x1b[?25l")
        return b"".join(out)

    def _runs(self, row: int, cols: int) -> list[tuple[int, int, bytes, bytes, int]]:
        """A row as runs of cells that look alike: (start, end, SGR, UTF-8 text,
        the column after the text). Erased cells inside a run's text are
        spaces; trailing ones are left to the caller."""
        t = self.term
        line = t.text(row, 0, cols)
        # The common case: a row of characters one cell wide each (ASCII, box
        # drawing, ...) is read once and sliced into runs; is_eol checks that
        # no cell behind a wide character was skipped.
        if line.isascii():
            chars: bytes | str = line
        else:
            chars = line.decode("utf-8", "replace")
            if _NOT_NARROW.search(chars):
                chars = ""
        if chars and t.is_eol(row, len(chars)):
            runs = []
            col = 0
            while col < cols:
                end, raw, _tail = t.run(row, col)
                piece = chars[col:end]
                text = piece if isinstance(piece, bytes) else piece.encode()
                runs.append((col, end, self._sgr_of(raw), text, col + len(piece)))
                col = end
            return runs
        return self._runs_by_cell(t.row_cells(row))

    def _runs_by_cell(self, cells: list[tuple[str, int, bytes]]
                      ) -> list[tuple[int, int, bytes, bytes, int]]:
        # Wide and combining characters, and libvterm's leftovers when a
        # program overwrote half of a wide character: libvterm keeps the other
        # half (a lone second cell, or a wide character one cell wide); both
        # are drawn blank, as xterm shows them.
        runs = []
        cols = len(cells)
        col = 0
        while col < cols:
            raw = cells[col][2]
            parts: list[str] = []
            blanks = 0
            x = covered = col
            while x < cols and cells[x][2] == raw:
                text, width, _ = cells[x]
                if text and width == 1 and unicodedata.east_asian_width(text[0]) in "WF":
                    text = ""   # a wide character whose second cell was overwritten
                elif width == 2 and text < "\u1100":
                    width = 1   # narrow (nothing below U+1100 is wide), before a lone second cell
                if not text:
                    blanks += 1
                    x += 1
                    continue
                parts.append(" " * blanks + text)
                blanks = 0
                covered = x + width
                x += width   # a wide character's second cell goes with it
            end = min(x, cols)
            runs.append((col, end, self._sgr_of(raw), "".join(parts).encode("utf-8", "replace"),
                         covered))
            col = end
        return runs

    def text(self) -> list[str]:
        t = self.term
        cols, rows = t.size
        lines = []
        for row in range(rows):
            line = t.text(row, 0, cols).decode("utf-8", "replace")
            # Pad to the screen's width: find where the trailing erased cells start.
            lo, hi = 0, cols
            while lo < hi:
                mid = (lo + hi) // 2
                if t.is_eol(row, mid):
                    hi = mid
                else:
                    lo = mid + 1
            lines.append(line + " " * (cols - lo))
        return lines


# -- pyte fallback -------------------------------------------------------------


@functools.cache
def _pyte_colors() -> tuple[dict[str, int], dict[str, int]]:
    import pyte.graphics as g

    fg = {v: k for k, v in {**g.FG_ANSI, **g.FG_AIXTERM}.items()}
    bg = {v: k for k, v in {**g.BG_ANSI, **g.BG_AIXTERM}.items()}
    return fg, bg


def _pyte_color(value: str, table: dict[str, int], truecolor: int) -> str | None:
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


def _pyte_sgr(ch: Any) -> str:
    fg_table, bg_table = _pyte_colors()
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
    fg = _pyte_color(ch.fg, fg_table, 38)
    if fg:
        parts.append(fg)
    bg = _pyte_color(ch.bg, bg_table, 48)
    if bg:
        parts.append(bg)
    return "\x1b[" + ";".join(parts) + "m"


class PyteScreen:
    backend = "pyte"
    term = None

    def __init__(self, cols: int, rows: int) -> None:
        # Imported here: pyte takes ~65 ms to import and is rarely needed.
        import pyte

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
        appends here."""
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
        while self.parse_some(self._pending_size):
            pass

    def resize(self, cols: int, rows: int) -> None:
        self._flush()
        self.screen.resize(rows, cols)

    def cursor(self) -> tuple[int, int]:
        self._flush()
        return self.screen.cursor.y, self.screen.cursor.x

    def render(self) -> bytes:
        self._flush()
        s = self.screen
        out = ["\x1b[0m\x1b[H\x1b[2J"]
        for y in range(s.lines):
            row = s.buffer[y]
            # Trailing default blanks need no painting.
            last = -1
            for x in range(s.columns):
                ch = row[x]
                if ch.data not in (" ", "") or _pyte_sgr(ch) != "\x1b[0m":
                    last = x
            if last < 0:
                continue
            out.append(f"\x1b[{y + 1};1H")
            cur = ""
            for x in range(last + 1):
                ch = row[x]
                sgr = _pyte_sgr(ch)
                if sgr != cur:
                    out.append(sgr)
                    cur = sgr
                out.append(ch.data)
            out.append("\x1b[0m")
        out.append(f"\x1b[{s.cursor.y + 1};{s.cursor.x + 1}H")
        out.append("\x1b[?25l" if s.cursor.hidden else "\x1b[?25h")
        return "".join(out).encode("utf-8", "replace")

    def text(self) -> list[str]:
        self._flush()
        return list(self.screen.display)
