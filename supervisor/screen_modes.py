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

#: DEC private modes (CSI ? n h/l) kept as plain flags, with their power-on
#: values: cursor keys (1), origin (6), autowrap (7), focus (1004), bracketed
#: paste (2004). Cursor visibility and the alternate screen are the screen
#: model's own.
DEC_DEFAULTS: dict[int, bool] = {1: False, 6: False, 7: True, 1004: False, 2004: False}
#: Mouse reporting is one mode of a group, as terminals keep it (xterm,
#: libvterm): setting one replaces the last, resetting any turns it off.
MOUSE_TRACKING = (9, 1000, 1002, 1003)
#: ... and one coordinate encoding: setting one replaces the last, resetting
#: one turns it off only if it is the one in force.
MOUSE_ENCODING = (1005, 1006, 1015)
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
        #: the modes the session ever set or reset (("dec"|"ansi", n), "mouse",
        #: "encoding", "keypad", "region"): only those can differ from a client
        #: terminal's own power-on values, so only those are restored
        self.seen: set[object] = set()
        self.reset()

    def reset(self) -> None:
        """Power-on values (RIS)."""
        self.dec = dict(DEC_DEFAULTS)
        self.ansi = dict(ANSI_DEFAULTS)
        self.mouse: int | None = None   # the tracking mode in force
        self.encoding: int | None = None   # the mouse encoding in force
        self.keypad = False  # application keypad (DECKPAM)
        #: DECSTBM's top row (0-based) and bottom row (1-based, None: the
        #: screen's last), as libvterm keeps them; None: the whole screen
        self.region: tuple[int, int | None] | None = None

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
        if final is None:
            # DECSTR: libvterm (0.1.4), the reference for the screen, keeps
            # every mode that decides where output lands; the keys go back
            # to normal, as on xterm.
            self.dec[1] = False
            self.keypad = False
            return
        if final == b"r":
            if not private:
                self._set_region(params)
                self.seen.add("region")
            return   # CSI ? ... r is XTRESTORE: not tracked
        on = final == b"h"
        for p in params.split(b";"):
            if not p.isdigit():
                continue
            n = int(p)
            if not private:
                if n in self.ansi:
                    self.ansi[n] = on
                    self.seen.add(("ansi", n))
            elif n in self.dec:
                self.dec[n] = on
                self.seen.add(("dec", n))
            elif n in MOUSE_TRACKING:
                self.mouse = n if on else None
                self.seen.add("mouse")
            elif n in MOUSE_ENCODING:
                if on:
                    self.encoding = n
                elif self.encoding == n:
                    self.encoding = None
                self.seen.add("encoding")

    def _set_region(self, params: bytes) -> None:
        # As libvterm: a missing top is 1, a missing bottom the last row, and
        # a region whose top is not above its bottom is the whole screen.
        parts = params.split(b";")
        top = max(0, (int(parts[0]) if parts[0].isdigit() else 1) - 1)
        bottom = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None
        if bottom is not None and top >= bottom:
            top, bottom = 0, None
        self.region = None if top == 0 and bottom is None else (top, bottom)

    def paint_state(self) -> bytes:
        """The state a paint needs, where the session may have changed it:
        replace mode, absolute cursor addressing, the whole screen as scroll
        region (DECSTBM homes the cursor; the paint moves it anyway)."""
        seen = self.seen
        return b"".join(seq for key, seq in ((("ansi", 4), b"\x1b[4l"),
                                            (("dec", 6), b"\x1b[?6l"),
                                            ("region", b"\x1b[r")) if key in seen)

    def restore(self, rows: int, cursor: tuple[int, int]) -> bytes:
        """Bytes that set the modes the session used on a client's terminal
        after a paint, and put the cursor back at `cursor` (row, column;
        0-based) if setting them moved it."""
        seen = self.seen
        # origin mode too when it is off: a screen switch in the paint
        # (DECRC on xterm) may have brought back a saved one
        out = [b"\x1b[?%d%s" % (n, b"h" if on else b"l") for n, on in self.dec.items()
               if n != 6 and ("dec", n) in seen]
        out += [b"\x1b[%d%s" % (n, b"h" if on else b"l") for n, on in self.ansi.items()
                if ("ansi", n) in seen]
        if "mouse" in seen:
            out.append(b"\x1b[?%dh" % self.mouse if self.mouse else b"\x1b[?1000l")
        if "encoding" in seen:
            out += [b"\x1b[?%dl" % n for n in MOUSE_ENCODING if n != self.encoding]
            if self.encoding:
                out.append(b"\x1b[?%dh" % self.encoding)
        if "keypad" in seen:
            out.append(b"\x1b=" if self.keypad else b"\x1b>")
        y, x = cursor
        top = 0
        moved = False
        if self.region is not None:
            top, bottom = self.region
            bottom = rows if bottom is None else min(bottom, rows)
            if top < bottom - 1:
                out.append(b"\x1b[%d;%dr" % (top + 1, bottom))
                moved = True
            else:
                top = 0   # the terminal ignores a region it cannot have
        if self.dec[6]:
            # Origin mode: rows count from the region's top (DECOM homes the cursor).
            out.append(b"\x1b[?6h")
            y -= top
            moved = True
        elif ("dec", 6) in seen:
            out.append(b"\x1b[?6l")
            moved = True
        if moved:
            out.append(b"\x1b[%d;%dH" % (y + 1, x + 1))
        return b"".join(out)
