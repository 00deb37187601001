"""Skip the part of a flood of text that cannot change the screen.

A session that prints megabytes of log lines would cost the screen model a
full parse of every byte (libvterm: ~12 MB/s at 80x24, most of it moving the
screen up a line at a time), though almost all of it scrolls away unseen. So
before a chunk of output is parsed, `FloodCutter.cut` drops its head when
that provably leaves the final screen the same:

- The head is *plain*: printable text, TAB, CR, LF, UTF-8 and SGR (colour)
  sequences. Plain text moves the cursor and writes cells; it changes no mode.
- The cut is just after a CR LF, so the cursor is in column 0 at the cut in
  both the real stream and the cut one, and the pen is the same because the
  head's SGR sequences (from its last reset on) are replayed.
- After the cut come at least 2 x rows + 1 more LFs, still in plain text.
  Whatever row each stream's cursor is on, at most rows - 1 LFs take it to
  the bottom line; every LF after that scrolls, and rows + 1 scrolls replace
  every line on screen with lines written after the cut by the same bytes.
  From there on the two streams' states are identical.
- That argument needs the whole screen to scroll: while a scroll region
  (DECSTBM) or left/right margins (DECLRMM) may be set, nothing is cut. So is
  it when the parser may be inside an escape sequence or a UTF-8 character
  at the chunk's start: the previous chunk must have ended cleanly.
"""

from __future__ import annotations

import re

from supervisor.vterm import C1

#: Below this many bytes a chunk is parsed as it is: cutting would save little.
MIN_CUT = 16 * 1024

# Plain bytes (module doc); of the others, ESC is plain when it starts an SGR.
_PLAIN_BYTES = bytes([0x09, 0x0A, 0x0D, *range(0x20, 0x7F), *range(0x80, 0x100)])
_NOT_SGR = re.compile(rb"\x1b(?!\[[0-9;:]*m)")
_SGR = re.compile(rb"\x1b\[[0-9;:]*m")
# A chunk ends cleanly when its last escape sequence is complete: CSI, a string
# (OSC, DCS, SOS, PM, APC) ended by BEL or ST, or a two-byte escape (whose
# final byte is not one that opens a CSI or a string).
_COMPLETE = re.compile(
    rb"\x1b(?:\[[\x30-\x3f]*[\x20-\x2f]*[\x40-\x7e]"
    rb"|[\]PX^_][^\x07\x1b]*\x07|[\x20-\x2f]*[\x30-\x4f\x51-\x57\x59\x5a\x5c\x60-\x7e])"
    rb"[^\x1b]*\Z")
# What sets or clears a scroll region (DECSTBM), left/right margin mode
# (DECLRMM, also among other private modes), or both (RIS). DECSTR is not
# here: libvterm's soft reset keeps the region.
_REGION = re.compile(
    rb"\x1b\[([0-9;]*)r|\x1b\[\?(?:[0-9;]*;)?69(?:;[0-9;]*)?([hl])|\x1bc")
#: An escape sequence still open at a piece's end is kept (at most this much)
#: and scanned with the next piece, so a region set across two is seen.
TAIL_KEEP = 64


def _utf8_complete(data: bytes) -> bool:
    """Does `data` end on a UTF-8 character boundary?"""
    tail = data[-4:]
    for i in range(len(tail) - 1, -1, -1):
        b = tail[i]
        if b < 0x80:
            return True
        if b >= 0xC0:
            need = 2 if b < 0xE0 else 3 if b < 0xF0 else 4
            return len(tail) - i >= need
    return True


def _plain_end(data: bytes) -> int:
    """Where the plain text at the start of `data` ends (scanning at C speed:
    translate() leaves only the bytes that need a closer look)."""
    end = len(data)
    for b in set(data.translate(None, _PLAIN_BYTES)):
        if b == 0x1B:
            m = _NOT_SGR.search(data, 0, end)
            if m:
                end = m.start()
        elif (i := data.find(b, 0, end)) >= 0:
            end = i
    if b"\xc2" in data and (m := C1.search(data, 0, end)):
        end = m.start()
    return end


class FloodCutter:
    """Per-terminal state for `cut`: is the parser at rest, is a region set."""

    def __init__(self) -> None:
        self.clean = True
        self.stbm = False
        self.lrmm = False
        #: the open escape sequence at the end of the last piece (TAIL_KEEP)
        self._tail = b""
        #: bytes not parsed thanks to cuts (for tests and benchmarks)
        self.skipped = 0

    @property
    def region(self) -> bool:
        """May a scroll region or left/right margins be set?"""
        return self.stbm or self.lrmm

    def cut(self, data: bytes, rows: int) -> bytes:
        """What to parse instead of `data`: the same, or a replay of its pen
        plus its tail (module doc)."""
        out = data
        if len(data) >= MIN_CUT and self.clean and not self.region:
            out = self._cut(data, rows)
        self._track(data, rows)
        return out

    def _cut(self, data: bytes, rows: int) -> bytes:
        plain_end = _plain_end(data)
        need = 2 * rows + 1
        # The LF that ends the head: the (need + 1)-th last one of the plain part.
        at = plain_end
        for _ in range(need + 1):
            at = data.rfind(b"\n", 0, at)
            if at < 0:
                return data
        # ... preceded by CR; else the nearest earlier CR LF
        if at == 0 or data[at - 1] != 0x0D:
            at = data.rfind(b"\r\n", 0, at)
            if at < 0:
                return data
            at += 1
        # libvterm keeps a half-decoded UTF-8 character across C0 controls:
        # the head must end on a character boundary.
        if not _utf8_complete(data[:at - 1]):
            return data
        cut = at + 1
        # The pen at the cut: the head's SGRs from its last plain reset on.
        reset = max(0, data.rfind(b"\x1b[0m", 0, cut), data.rfind(b"\x1b[m", 0, cut))
        pen = b"".join(_SGR.findall(data, reset, cut))
        self.skipped += cut - len(pen) - 1
        # CR: the cut stream's cursor is where the previous piece left it,
        # maybe mid-line; the full stream's is in column 0 after the CR LF.
        return b"\r" + pen + data[cut:]

    def _track(self, data: bytes, rows: int) -> None:
        scan = self._tail + data if self._tail else data
        esc = scan.rfind(b"\x1b")
        if esc < 0:
            self.clean = self.clean and _utf8_complete(data)
            return
        self.clean = bool(_COMPLETE.match(scan, esc)) and _utf8_complete(data)
        self._tail = b"" if self.clean else scan[esc:]
        if len(self._tail) > TAIL_KEEP:
            # Too long to be a region being set, but it might hide one: assume so.
            self._tail, self.stbm = b"", True
        for m in _REGION.finditer(scan):
            if m.group(2) is not None:
                self.lrmm = m.group(2) == b"h"
            elif m.group(1) is not None:
                self.stbm = m.group(1) not in (b"", b";", b"1", b"0", b"1;%d" % rows,
                                               b";%d" % rows, b"0;%d" % rows)
            else:
                self.stbm = self.lrmm = False
