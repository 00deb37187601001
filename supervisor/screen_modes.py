"""Terminal modes a repaint restores: what a session's screen cells do not show.

A client that attaches, or skips ahead, gets the screen painted and then raw
output from there on. Raw output assumes the terminal is in the modes the
program asked for, and so does the client's keyboard:
- cursor keys and keypad in application mode (vi's arrows as ESC O A);
- bracketed paste: a pasted block reaches a shell or an agent's prompt as one
  paste, not line by line, each line a command;
- mouse and focus reporting, for the TUIs that use them;
- insert mode and autowrap, and the scroll region with origin mode, which
  decide where the program's next bytes land.
libvterm keeps most of these inside but does not hand them out (0.1.4), so,
as tmux keeps them per pane, ModeTracker watches the output for the few
sequences that set them, and `restore` sets them on a client's terminal after
the paint. It sees every byte, also a flood's head that the screen model cuts
(supervisor.screen_flood): finding ESC is a memchr, so a flood costs little.

`paint_state` goes before a paint: whatever a client's terminal was left in by
output it received before skipping, the paint lands where it should.

Only modes the session ever touched are set: the others are at their power-on
values on both sides, and a plain shell's repaint stays as short as before.
"""

from __future__ import annotations

import re

#: DEC private modes (CSI ? n h/l) kept, with their power-on values: cursor
#: keys (1), origin (6), autowrap (7), mouse (9, 1000-1006, 1015), focus
#: (1004), bracketed paste (2004). Cursor visibility and the alternate screen
#: are the screen model's own.
DEC_DEFAULTS: dict[int, bool] = {1: False, 6: False, 7: True, 9: False, 1000: False,
                                 1002: False, 1003: False, 1004: False, 1005: False,
                                 1006: False, 1015: False, 2004: False}
#: ANSI modes (CSI n h/l): insert (4), automatic newline (20).
ANSI_DEFAULTS: dict[int, bool] = {4: False, 20: False}

# CSI [?] params h|l|r, DECSTR (CSI ! p), RIS (ESC c), DECKPAM/DECKPNM (ESC = / >).
_SEQ = re.compile(rb"\x1b(?:\[(\??)([0-9;]*)([hlr])|\[!p|([c=>]))")
# What may still become one of those: kept for the next piece of output.
_OPEN = re.compile(rb"\x1b(?:\[(?:\??[0-9;]*|!))?\Z")
#: Longest open sequence kept; a longer run of parameters is not a mode we track.
OPEN_MAX = 64


class ModeTracker:
    """The tracked modes of one session's terminal, from its output."""

    def __init__(self) -> None:
        self._tail = b""
        #: the modes the session ever set or reset (("dec"|"ansi", n), "keypad",
        #: "region"): only those can differ from a client terminal's own
        #: power-on values, so only those are restored
        self.seen: set[object] = set()
        self.reset()

    def reset(self) -> None:
        """Power-on values (RIS, DECSTR)."""
        self.dec = dict(DEC_DEFAULTS)
        self.ansi = dict(ANSI_DEFAULTS)
        self.keypad = False  # application keypad (DECKPAM)
        #: DECSTBM's top and bottom rows, 1-based as sent; None: the whole screen
        self.region: tuple[int, int] | None = None

    def feed(self, data: bytes) -> None:
        """Everything the session prints, in order, in pieces of any size."""
        if self._tail:
            data = self._tail + data
            self._tail = b""
        if b"\x1b" not in data:
            return
        for m in _SEQ.finditer(data):
            self._apply(m)
        # An escape sequence cut by the piece's end is finished by the next one.
        esc = data.rfind(b"\x1b", max(0, len(data) - OPEN_MAX))
        if esc >= 0 and _OPEN.match(data, esc):
            self._tail = data[esc:]

    def _apply(self, m: re.Match[bytes]) -> None:
        private, params, final, esc = m.groups()
        if esc is not None:
            if esc == b"c":
                self.reset()
            else:
                self.keypad = esc == b"="
                self.seen.add("keypad")
            return
        if final is None:   # DECSTR
            self.reset()
            return
        if final == b"r":
            if not private:
                self._set_region(params)
                self.seen.add("region")
            return   # CSI ? ... r is XTRESTORE: not tracked
        kind = "dec" if private else "ansi"
        table = self.dec if private else self.ansi
        on = final == b"h"
        for p in params.split(b";"):
            if p.isdigit() and int(p) in table:
                table[int(p)] = on
                self.seen.add((kind, int(p)))

    def _set_region(self, params: bytes) -> None:
        parts = params.split(b";")
        top = int(parts[0]) if parts[0].isdigit() else 1
        bottom = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        # "CSI r", "CSI 1;0 r" and the like: the whole screen (bounds are
        # checked against the screen at restore time).
        self.region = None if top <= 1 and bottom == 0 else (max(1, top), bottom)

    def paint_state(self) -> bytes:
        """The state a paint needs, where the session may have changed it:
        replace mode, absolute cursor addressing, the whole screen as scroll
        region (DECSTBM homes the cursor; the paint moves it anyway)."""
        seen = self.seen
        return b"".join(seq for key, seq in ((("ansi", 4), b"\x1b[4l"),
                                            (("dec", 6), b"\x1b[?6l"),
                                            ("region", b"\x1b[r")) if key in seen)

    def resize(self) -> None:
        """A new size resets the scroll region (xterm, libvterm)."""
        self.region = None

    def restore(self, rows: int, cursor: tuple[int, int]) -> bytes:
        """Bytes that set the modes the session used on a client's terminal
        after a paint, and put the cursor back at `cursor` (row, column;
        0-based) if setting them moved it."""
        seen = self.seen
        out = [b"\x1b[?%d%s" % (n, b"h" if on else b"l") for n, on in self.dec.items()
               if n != 6 and ("dec", n) in seen]
        out += [b"\x1b[%d%s" % (n, b"h" if on else b"l") for n, on in self.ansi.items()
                if ("ansi", n) in seen]
        if "keypad" in seen:
            out.append(b"\x1b=" if self.keypad else b"\x1b>")
        y, x = cursor
        top = 1
        moved = False
        if self.region is not None:
            top, bottom = self.region
            bottom = min(bottom or rows, rows)
            if top < bottom:
                out.append(b"\x1b[%d;%dr" % (top, bottom))
                moved = True
            else:
                top = 1   # the terminal ignores a region it cannot have
        if self.dec[6]:
            # Origin mode: rows count from the region's top (DECOM homes the cursor).
            out.append(b"\x1b[?6h")
            y -= top - 1
            moved = True
        if moved:
            out.append(b"\x1b[%d;%dH" % (y + 1, x + 1))
        return b"".join(out)
