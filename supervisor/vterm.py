"""libvterm through ctypes: the terminal emulator under the session screen model.

libvterm (Debian's libvterm0, 0.1.4 on Debian 12; scripts/install installs it)
parses a terminal's output in C at tens of MB/s and keeps the screen's cells,
so the daemon can feed it every byte a session prints as it arrives. This
module binds only what supervisor/screen.py needs; the layouts below are
copied from the 0.1.4 vterm.h, and their sizes and bit positions were checked
with gcc against that header (VTermScreenCell: 40 bytes; attrs at offset 28,
fg 32, bg 36). The -dev package is not needed at run time.

libvterm (0.1.4 up to at least 0.3.3) stores a CSI's parameters in 16 slots
and counts them without a bound: a 17th parameter writes past them and
crashes the process, and any program in a session can print one. CsiGuard
truncates such sequences before libvterm sees them. libvterm 0.1.4 also
crashes on a UTF-8-encoded C1 control (U+0080..U+009F) followed by a character
while insert mode is on; C1Guard removes those code points (terminals in UTF-8
mode such as VTE ignore them too).

No Python runs per byte: the only callbacks are the screen's settermprop (a
few per escape sequence that changes cursor visibility or the alternate
screen) and the output callback, which drops the terminal's replies.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import re
import struct
from typing import NamedTuple

from sandbox.errors import HostSetupError

SONAME = "libvterm.so.0"
HINT = "install the Debian package libvterm0 (scripts/install does)"

# VTermProp (vterm.h): the two terminal properties the model tracks.
PROP_CURSORVISIBLE = 1
PROP_ALTSCREEN = 3

# VTermAttr, for vterm_state_get_penattr.
ATTR_BOLD = 1
ATTR_UNDERLINE = 2
ATTR_ITALIC = 3
ATTR_BLINK = 4
ATTR_REVERSE = 5
ATTR_STRIKE = 6
ATTR_FOREGROUND = 8
ATTR_BACKGROUND = 9
ATTR_CONCEAL = 10  # 0.2

# VTermAttrMask: every attribute a repaint draws. FONT (10-19) is left out, so
# alternative fonts neither split runs nor get drawn.
RUN_MASK = 0x3FF & ~(1 << 6)   # 1 << 9: CONCEAL (0.2), ignored by 0.1

# VTermColor.type bits.
COLOR_INDEXED = 0x01
COLOR_DEFAULT = 0x06  # DEFAULT_FG | DEFAULT_BG

#: A cell's chars[0] behind a double-width character.
WIDE_TAIL = 0xFFFFFFFF


#: A CSI may carry this many parameters (libvterm's CSI_ARGS_MAX), so at most
#: one separator less.
CSI_ARGS_MAX = 16
_MAX_SEPS = CSI_ARGS_MAX - 1
# What keeps libvterm's parser collecting a CSI's parameters: digits, ";" and
# ":", the leader bytes, and C0 controls (it executes them in passing), except
# CAN and SUB, which cancel the sequence, and ESC, which starts another.
_PARAM = rb"[\x00-\x17\x19\x1c-\x1f\x30-\x3f\x7f]"
_LONG_CSI = re.compile(rb"\x1b\[(" + _PARAM + rb"{%d,})" % CSI_ARGS_MAX)
_OPEN_CSI = re.compile(rb"\x1b\[(" + _PARAM + rb"*)\Z")
_PARAMS = re.compile(_PARAM + rb"*")


def _seps(params: bytes) -> int:
    return params.count(b";") + params.count(b":")


def _truncate(params: bytes, seps: int) -> bytes:
    """`params` up to (not including) its separator number seps + 1."""
    n = 0
    for i, c in enumerate(params):
        if c in b";:":
            if n == seps:
                return params[:i]
            n += 1
    return params


#: UTF-8-encoded C1 controls (U+0080..U+009F)
C1 = re.compile(rb"\xc2[\x80-\x9f]")


class C1Guard:
    """Removes UTF-8-encoded C1 controls, also when one is split across chunks."""

    def __init__(self) -> None:
        self._carry = b""

    def filter(self, data: bytes) -> bytes:
        if self._carry:
            data, self._carry = self._carry + data, b""
        if data[-1:] == b"\xc2":
            data, self._carry = data[:-1], b"\xc2"
        if b"\xc2" in data:
            data = C1.sub(b"", data)
        return data


class CsiGuard:
    """Cuts every CSI down to CSI_ARGS_MAX parameters (the excess is dropped,
    as later libvterm fixes do), across the chunks a stream arrives in."""

    def __init__(self) -> None:
        #: separators so far of a CSI still open at the end of the last chunk
        self._open: int | None = None
        #: the last chunk ended in ESC (a "[" next opens a CSI)
        self._esc = False

    def filter(self, data: bytes) -> bytes:
        start = 0
        if self._esc and data[:1] == b"[":
            self._open, start = 0, 1
        self._esc = False
        if self._open is not None:
            # The open CSI's parameters continue at the start of this chunk.
            m = _PARAMS.match(data, start)   # always matches (maybe empty)
            end = m.end() if m else start
            params = data[start:end]
            seps = self._open + _seps(params)
            if seps > _MAX_SEPS:
                params = _truncate(params, _MAX_SEPS - self._open)
                data = data[:start] + params + data[end:]
                seps = _MAX_SEPS
            if start + len(params) == len(data):
                self._open = seps
                return data
            self._open = None
        if _LONG_CSI.search(data):
            data = _LONG_CSI.sub(self._cut, data)
        esc = data.rfind(b"\x1b")
        if esc >= 0:
            if esc == len(data) - 1:
                self._esc = True
            elif m := _OPEN_CSI.match(data, esc):
                self._open = _seps(m.group(1))
        return data

    @staticmethod
    def _cut(m: re.Match[bytes]) -> bytes:
        params = m.group(1)
        if _seps(params) <= _MAX_SEPS:
            return m.group()
        return b"\x1b[" + _truncate(params, _MAX_SEPS)


class Pos(ctypes.Structure):
    _fields_ = (("row", ctypes.c_int), ("col", ctypes.c_int))


class Rect(ctypes.Structure):
    _fields_ = (("start_row", ctypes.c_int), ("end_row", ctypes.c_int),
                ("start_col", ctypes.c_int), ("end_col", ctypes.c_int))


class ScreenCell(ctypes.Structure):
    """VTermScreenCell; attrs is the bitfield struct read as one uint32 (see Attrs)."""

    _fields_ = (("chars", ctypes.c_uint32 * 6), ("width", ctypes.c_byte),
                ("attrs", ctypes.c_uint32), ("fg", ctypes.c_uint8 * 4),
                ("bg", ctypes.c_uint8 * 4))


class Value(ctypes.Union):
    """VTermValue: only .boolean and .color are read (the string member is a pointer)."""

    _fields_ = (("boolean", ctypes.c_int), ("color", ctypes.c_uint8 * 4),
                ("_pad", ctypes.c_void_p * 2))


# VTermScreenCallbacks: damage, moverect, movecursor, settermprop, bell, resize,
# sb_pushline, sb_popline. 0.3 appends sb_clear; the spare NULL slots keep a
# newer library from reading past the struct.
_CALLBACK_SLOTS = 12
_SETTERMPROP_SLOT = 3

_SetTermProp = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
_Output = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)


def _drop(_s: int | None, _n: int, _user: int | None) -> None:
    """Replies the terminal would send to the program (DA, DSR, ...) are
    dropped: the attached clients' own terminals answer. A callback, unlike
    vterm's output buffer, keeps nothing."""


_drop_output = _Output(_drop)


class Attrs(NamedTuple):
    """Bit positions in VTermScreenCellAttrs, which 0.2 changed by adding
    `conceal` before `strike` (0.1.4: strike is bit 6)."""

    bold: int = 1 << 0
    underline_shift: int = 1  # 2 bits: 1 single, 2 double, 3 curly
    italic: int = 1 << 3
    blink: int = 1 << 4
    reverse: int = 1 << 5
    conceal: int = 0
    strike: int = 1 << 6


ATTRS_0_1 = Attrs()
ATTRS_0_2 = Attrs(conceal=1 << 6, strike=1 << 7)


class _Props:
    """What the settermprop callback records; apart from VTerm so that the
    callback does not hold the VTerm (no cycle: vterm_free runs on last reference)."""

    def __init__(self) -> None:
        self.cursor_visible = True
        self.altscreen = False

    def settermprop(self, prop: int, val: int | None, _user: int | None) -> int:
        if val and prop in (PROP_CURSORVISIBLE, PROP_ALTSCREEN):
            on = bool(ctypes.c_int.from_address(val).value)
            if prop == PROP_CURSORVISIBLE:
                self.cursor_visible = on
            else:
                self.altscreen = on
        # 0 would make libvterm refuse the change (vterm_state_set_termprop).
        return 1


class Library(NamedTuple):
    lib: ctypes.CDLL
    attrs: Attrs


def _declare(lib: ctypes.CDLL) -> None:
    vp, i, sz = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
    sigs: dict[str, tuple[object, list[object]]] = {
        "vterm_new": (vp, [i, i]),
        "vterm_free": (None, [vp]),
        "vterm_set_size": (None, [vp, i, i]),
        "vterm_set_utf8": (None, [vp, i]),
        "vterm_input_write": (sz, [vp, ctypes.c_char_p, sz]),
        "vterm_output_set_callback": (None, [vp, _Output, vp]),
        "vterm_obtain_screen": (vp, [vp]),
        "vterm_obtain_state": (vp, [vp]),
        "vterm_screen_set_callbacks": (None, [vp, vp, vp]),
        "vterm_screen_enable_altscreen": (None, [vp, i]),
        "vterm_screen_reset": (None, [vp, i]),
        "vterm_screen_get_cell": (i, [vp, Pos, ctypes.POINTER(ScreenCell)]),
        "vterm_screen_get_text": (sz, [vp, ctypes.c_char_p, sz, Rect]),
        "vterm_screen_get_attrs_extent": (i, [vp, ctypes.POINTER(Rect), Pos, i]),
        "vterm_screen_is_eol": (i, [vp, Pos]),
        "vterm_state_get_cursorpos": (None, [vp, ctypes.POINTER(Pos)]),
        "vterm_state_get_penattr": (i, [vp, i, ctypes.POINTER(Value)]),
    }
    for name, (restype, argtypes) in sigs.items():
        fn = getattr(lib, name)
        fn.restype = restype
        fn.argtypes = argtypes


_loaded: Library | HostSetupError | None = None


def load() -> Library:
    """libvterm, loaded once; HostSetupError (cached too) if it is missing."""
    global _loaded
    if _loaded is None:
        _loaded = _load()
    if isinstance(_loaded, HostSetupError):
        raise _loaded
    return _loaded


def _load() -> Library | HostSetupError:
    errors = []
    # The soname first: find_library runs ldconfig, which is slow.
    for name in (SONAME, ctypes.util.find_library("vterm")):
        if not name:
            continue
        try:
            lib = ctypes.CDLL(name)
            _declare(lib)
        except (OSError, AttributeError) as e:
            errors.append(str(e))
            continue
        # 0.2 added OSC 52 selection support along with the `conceal` attribute.
        attrs = ATTRS_0_2 if hasattr(lib, "vterm_state_set_selection_callbacks") else ATTRS_0_1
        return Library(lib, attrs)
    return HostSetupError(f"libvterm could not be loaded ({'; '.join(errors)})", hint=HINT)


class Cell(NamedTuple):
    text: str    # the character and any combining ones; "" if erased or behind a wide char
    width: int   # 2 for a double-width character, 0 for the cell behind it
    attrs: int   # VTermScreenCellAttrs as an int (bit positions: VTerm.attr_bits)
    fg: bytes    # VTermColor: type, then r, g, b or the palette index
    bg: bytes


_CELL = struct.Struct("<6Ib3xI4s4s")
_ATTRS_AT = ScreenCell.attrs.offset
_CELL_RAW = struct.Struct("<6Ib3x12s")   # chars, width, then attrs+fg+bg raw


def _color_key(c: bytes) -> bytes:
    # An indexed colour leaves stale bytes after the index: drop them, so equal
    # colours compare equal.
    return c[:2] + b"\0\0" if c[0] & COLOR_INDEXED else c


class VTerm:
    """One libvterm terminal with its screen (alternate screen enabled).

    Rows and columns count from 0. Not thread-safe, like the rest of the hub.
    """

    _vt: int | None = None   # until vterm_new succeeded (__del__ may run before)

    def __init__(self, cols: int, rows: int) -> None:
        lib, self.attr_bits = load()
        self._lib = lib
        self._props = _Props()
        self._vt = lib.vterm_new(rows, cols)
        if not self._vt:
            raise MemoryError("vterm_new failed")
        self._cols, self._rows = cols, rows
        lib.vterm_set_utf8(self._vt, 1)
        lib.vterm_output_set_callback(self._vt, _drop_output, None)
        self._screen = lib.vterm_obtain_screen(self._vt)
        self._state = lib.vterm_obtain_state(self._vt)
        # libvterm keeps pointers to the callbacks struct and the function:
        # both live as long as this object.
        self._on_prop = _SetTermProp(self._props.settermprop)
        self._callbacks = (ctypes.c_void_p * _CALLBACK_SLOTS)()
        self._callbacks[_SETTERMPROP_SLOT] = ctypes.cast(self._on_prop, ctypes.c_void_p).value
        lib.vterm_screen_set_callbacks(self._screen, self._callbacks, None)
        lib.vterm_screen_enable_altscreen(self._screen, 1)
        lib.vterm_screen_reset(self._screen, 1)
        # Reused by the calls below rather than allocated per call.
        self._write = lib.vterm_input_write
        self._guard = CsiGuard()
        self._c1 = C1Guard()
        self._get_cell = lib.vterm_screen_get_cell
        self._get_text = lib.vterm_screen_get_text
        self._extent = lib.vterm_screen_get_attrs_extent
        self._cell = ScreenCell()
        self._cell_ref = ctypes.byref(self._cell)
        self._pos = Pos()
        self._rect = Rect()
        self._rect_ref = ctypes.byref(self._rect)
        self._text_buf = ctypes.create_string_buffer(0)
        self._size_buffers()

    @property
    def cursor_visible(self) -> bool:
        return self._props.cursor_visible

    @property
    def altscreen(self) -> bool:
        """True while the program draws on the alternate screen (vi, top, less)."""
        return self._props.altscreen

    def _size_buffers(self) -> None:
        # Room for a whole row: 6 code points per cell, up to 6 bytes each
        # (libvterm's UTF-8 goes up to 0x7FFFFFFF).
        self._text_buf = ctypes.create_string_buffer(self._cols * 36 + 16)

    def __del__(self) -> None:
        # The only place the terminal is freed, so no method can use it after.
        if self._vt:
            self._lib.vterm_free(self._vt)
            self._vt = None

    @property
    def size(self) -> tuple[int, int]:
        return self._cols, self._rows

    def write(self, data: bytes) -> None:
        """Parse terminal output (synchronously, in C)."""
        data = self._guard.filter(self._c1.filter(data))
        self._write(self._vt, data, len(data))

    def resize(self, cols: int, rows: int) -> None:
        self._lib.vterm_set_size(self._vt, rows, cols)
        self._cols, self._rows = cols, rows
        self._size_buffers()

    def cursor(self) -> tuple[int, int]:
        """(row, col) of the cursor."""
        pos = Pos()
        self._lib.vterm_state_get_cursorpos(self._state, ctypes.byref(pos))
        return pos.row, pos.col

    def run(self, row: int, col: int) -> tuple[int, bytes, bool]:
        """The run of cells from `col` that look alike: its end (exclusive), its
        attributes as 12 raw bytes (attrs, fg, bg: equal bytes, equal looks),
        and whether `col` is the cell behind a wide character.

        libvterm does not give that cell the wide character's pen (it keeps
        whatever it had), so it can end a run or start one: a caller skips it.
        """
        # One method and reused structs: a repaint calls this for every run.
        pos, r, cell = self._pos, self._rect, self._cell
        pos.row, pos.col = row, col
        r.start_col, r.end_col = col, -1   # bounds: not left of col, up to the margin
        self._extent(self._screen, self._rect_ref, pos, RUN_MASK)
        self._get_cell(self._screen, pos, self._cell_ref)
        # libvterm reports the run's last column.
        return r.end_col + 1, bytes(cell)[_ATTRS_AT:], cell.chars[0] == WIDE_TAIL

    def row_cells(self, row: int) -> list[tuple[str, int, bytes]]:
        """Every cell of a row as (text, width, raw attributes as in run());
        width 0 for the cell behind a wide character, text "" if erased."""
        cells = []
        pos, cell, ref, get = self._pos, self._cell, self._cell_ref, self._get_cell
        screen = self._screen
        unpack = _CELL_RAW.unpack
        pos.row = row
        for col in range(self._cols):
            pos.col = col
            get(screen, pos, ref)
            c0, c1, c2, c3, c4, c5, width, raw = unpack(bytes(cell))
            if c0 == WIDE_TAIL:
                cells.append(("", 0, raw))
            elif c1 == 0:
                cells.append((chr(c0) if c0 else "", width, raw))
            else:
                # get_cell copies chars up to the first 0; later slots are stale.
                chars = []
                for c in (c0, c1, c2, c3, c4, c5):
                    if c == 0:
                        break
                    chars.append(chr(c))
                cells.append(("".join(chars), width, raw))
        return cells

    def text(self, row: int, start: int, end: int) -> bytes:
        """UTF-8 of the cells [start, end) of a row. Erased cells inside become
        spaces, trailing ones are left out; the cell behind a wide character
        gives nothing and combining characters follow their base."""
        buf = self._text_buf
        n = self._get_text(self._screen, buf, len(buf), Rect(row, row + 1, start, end))
        return ctypes.string_at(buf, min(n, len(buf)))

    def cell(self, row: int, col: int) -> Cell:
        self._get_cell(self._screen, Pos(row, col), self._cell_ref)
        *chars, width, attrs, fg, bg = _CELL.unpack(bytes(self._cell))
        if chars[0] == WIDE_TAIL:
            return Cell("", 0, attrs, _color_key(fg), _color_key(bg))
        text = []
        # get_cell copies chars up to the first 0; later slots are stale.
        for c in chars:
            if c == 0:
                break
            text.append(chr(c))
        return Cell("".join(text), width, attrs, _color_key(fg), _color_key(bg))

    def is_eol(self, row: int, col: int) -> bool:
        """True if the cells from `col` to the end of the row are all erased."""
        return bool(self._lib.vterm_screen_is_eol(self._screen, Pos(row, col)))

    def pen(self) -> tuple[int, bytes, bytes]:
        """The pen the next character is drawn with, as (attrs, fg, bg) like a Cell."""
        b = self.attr_bits
        val = Value()
        ref = ctypes.byref(val)
        get = self._lib.vterm_state_get_penattr
        attrs = 0
        flags = [(ATTR_BOLD, b.bold), (ATTR_ITALIC, b.italic), (ATTR_BLINK, b.blink),
                 (ATTR_REVERSE, b.reverse), (ATTR_STRIKE, b.strike)]
        if b.conceal:
            flags.append((ATTR_CONCEAL, b.conceal))
        for attr, bit in flags:
            val.boolean = 0
            get(self._state, attr, ref)
            if val.boolean:
                attrs |= bit
        val.boolean = 0
        get(self._state, ATTR_UNDERLINE, ref)
        attrs |= (val.boolean & 3) << b.underline_shift
        get(self._state, ATTR_FOREGROUND, ref)
        fg = bytes(val.color)
        get(self._state, ATTR_BACKGROUND, ref)
        bg = bytes(val.color)
        return attrs, _color_key(fg), _color_key(bg)
