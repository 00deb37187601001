"""Terminal modes in a repaint (supervisor/screen_modes.py): after a client is
painted, the program's further output must land on its terminal as it does on
the session's, and its keys must be sent in the modes the program asked for.

libvterm stands in for the client's terminal: a fresh model fed the repaint
(test_screen._replay), compared cell by cell, cursor and pen included."""

from __future__ import annotations

import random

import pytest

from supervisor.screen import ScreenModel
from supervisor.screen_modes import ModeTracker
from tests.unit.test_screen import _assert_same as _same
from tests.unit.test_screen import _replay as _client

pytestmark = pytest.mark.filterwarnings("error")


def _model(cols: int = 40, rows: int = 12) -> ScreenModel:
    m = ScreenModel(cols, rows, backend="vterm")
    assert m.term is not None
    return m


def _both(a: ScreenModel, b: ScreenModel, data: bytes) -> None:
    a.feed(data)
    b.feed(data)


def test_a_plain_session_restores_nothing() -> None:
    m = _model()
    m.feed(b"agent$ ls\r\nfile\r\nagent$ ")
    r = m.render()
    assert r.startswith(b"\x1b[?1049l")   # no mode was touched: nothing to reset either
    assert r.endswith(b"\x1b[3;8H\x1b[?25h")


@pytest.mark.parametrize(("size", "head", "tail", "row", "expect"), [
    # the program scrolls its region; the client must scroll the same rows
    ((40, 12), b"top\x1b[12;1Hbottom\x1b[3;6r\x1b[6;1Hin region",
     b"\r\nmore\r\nand more\r\nand more still", 11, "bottom"),
    # origin mode: rows count from the region's top
    ((40, 12), b"\x1b[4;8r\x1b[?6h\x1b[1;1Hfirst row of region",
     b"\x1b[2;3Hrelative\x1b[9;1Hclamped", 3, "first row of region"),
    # insert mode
    ((40, 12), b"abcdef\x1b[4h\x1b[1;1H", b"XY", 0, "XYabcdef"),
    # autowrap off: the last column is overwritten
    ((20, 5), b"\x1b[?7l\x1b[2;1H", b"0123456789abcdefghijKLMN", 1, "0123456789abcdefghiN"),
], ids=["region", "origin", "insert", "no-autowrap"])
def test_mode_is_restored(size: tuple[int, int], head: bytes, tail: bytes, row: int,
                          expect: str) -> None:
    m = _model(*size)
    m.feed(head)
    c = _client(m)
    _both(m, c, tail)
    _same(m, c)
    assert m.text()[row].startswith(expect)


def test_key_modes_are_set_and_unset() -> None:
    m = _model()
    m.feed(b"\x1b[?1h\x1b=\x1b[?2004h\x1b[?1000;1006h\x1b[?1004h")
    r = m.render()
    for seq in (b"\x1b[?1h", b"\x1b=", b"\x1b[?2004h", b"\x1b[?1000h", b"\x1b[?1006h",
                b"\x1b[?1004h"):
        assert seq in r, seq
    # a client that skipped while they were on gets them switched off
    m.feed(b"\x1b[?1l\x1b>\x1b[?2004l\x1b[?1000;1006l\x1b[?1004l")
    r = m.render()
    for seq in (b"\x1b[?1l", b"\x1b>", b"\x1b[?2004l", b"\x1b[?1000l", b"\x1b[?1006l",
                b"\x1b[?1004l"):
        assert seq in r, seq


def test_sequences_split_across_pieces() -> None:
    t = ModeTracker()
    for piece in (b"text\x1b", b"[?20", b"04h more \x1b[", b"5;", b"9r", b"\x1b"):
        t.feed(piece)
    t.feed(b"=")
    assert t.dec[2004]
    assert t.region == (4, 9)
    assert t.keypad
    # an unrelated sequence cut in two is no mode
    t.feed(b"\x1b[3")
    t.feed(b"1mred")
    assert t.ansi == {4: False, 20: False}


def test_mouse_modes_are_one_of_a_group() -> None:
    m = _model()
    # what crossterm (ratatui) sends: SGR encoding (1006) is the one in force
    m.feed(b"\x1b[?1000h\x1b[?1002h\x1b[?1003h\x1b[?1015h\x1b[?1006h")
    r = m.render()
    assert r.index(b"\x1b[?1015l") < r.index(b"\x1b[?1006h")
    assert b"\x1b[?1015h" not in r
    assert b"\x1b[?1003h" in r
    assert b"\x1b[?1000h" not in r
    # resetting any tracking mode turns tracking off; resetting an encoding
    # not in force changes nothing
    m.feed(b"\x1b[?1000l\x1b[?1015l")
    r = m.render()
    assert b"\x1b[?1000l" in r
    assert b"\x1b[?1002h" not in r
    assert b"\x1b[?1003h" not in r
    assert b"\x1b[?1006h" in r


def test_hard_reset_and_soft_reset() -> None:
    m = _model()
    m.feed(b"\x1b[?2004h\x1b[3;9r\x1b[4h\x1bc")
    r = m.render()
    assert b"\x1b[?2004l" in r
    assert b"\x1b[4l" in r
    assert b"\x1b[3;9r" not in r
    # DECSTR: keys back to normal; the screen model keeps the region
    m.feed(b"\x1b[?1h\x1b=\x1b[2;5r\x1b[!p")
    r = m.render()
    assert b"\x1b[?1l" in r
    assert r.endswith(b"\x1b>\x1b[2;5r\x1b[1;1H")


def test_region_survives_a_resize() -> None:
    m = _model(40, 10)
    m.feed(b"".join(b"line%d\r\n" % i for i in range(9)) + b"\x1b[3;6r")
    m.resize(40, 12)
    c = _client(m)
    _both(m, c, b"\x1b[6;1Hz\n\n\nQ")
    _same(m, c)


def test_region_as_the_screen_model_reads_it() -> None:
    for seq in (b"\x1b[3;0r", b"\x1b[5;3r", b"\x1b[3;99r", b"\x1b[0;4r", b"\x1b[;4r"):
        m = _model(20, 6)
        m.feed(b"r1\r\nr2\r\nr3\r\nr4\r\nr5\r\nr6" + seq + b"\x1b[4;1H")
        c = _client(m)
        _both(m, c, b"\n\n\nX\x1bMY")
        _same(m, c)


def _random_stream(rng: random.Random, cols: int, rows: int) -> bytes:
    """Text, line feeds, cursor moves, scroll regions, origin, insert and
    autowrap modes, mixed. Text stops short of the last column, so no cursor
    is left at the right margin waiting to wrap (a state no repaint can set)."""
    out = []
    for _ in range(rng.randint(5, 60)):
        k = rng.random()
        if k < 0.3:
            y, x = rng.randint(1, rows), rng.randint(1, cols - 8)
            out.append(b"\x1b[%d;%dH%s" % (y, x, rng.choice([b"ab", b"word", b"x y z"])))
        elif k < 0.5:
            out.append(rng.choice([b"\r\n", b"\n", b"\r\nline", b"\x1bM", b"\x1bD"]))
        elif k < 0.6:
            top = rng.randint(1, rows - 1)
            out.append(rng.choice([b"\x1b[%d;%dr" % (top, rng.randint(top + 1, rows)),
                                   b"\x1b[r"]))
        elif k < 0.7:
            out.append(rng.choice([b"\x1b[?6h", b"\x1b[?6l"]))
        elif k < 0.8:
            out.append(rng.choice([b"\x1b[4h", b"\x1b[4l"]))
        elif k < 0.85:
            out.append(rng.choice([b"\x1b[?7h", b"\x1b[?7l"]))
        elif k < 0.9:
            out.append(b"\x1b[%dL" % rng.randint(1, 3))
        else:
            out.append(b"\x1b[%d;%dH" % (rng.randint(1, rows), rng.randint(1, cols - 8)))
    return b"".join(out)


@pytest.mark.parametrize("seed", range(40))
def test_output_after_a_repaint_lands_the_same(seed: int) -> None:
    rng = random.Random(seed)
    cols, rows = rng.choice([(40, 12), (20, 6), (80, 24)])
    head = _random_stream(rng, cols, rows)
    tail = _random_stream(rng, cols, rows)
    m = _model(cols, rows)
    m.feed(head)
    c = _client(m)
    _same(m, c)
    _both(m, c, tail)
    _same(m, c)
