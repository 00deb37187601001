"""The flood cut (supervisor.screen_flood) never changes the screen: a model fed
with cuts ends exactly like one that parsed every byte, over random streams
of plain lines, colours, wide characters, cursor movement, scroll regions,
the alternate screen, and escapes and UTF-8 split across chunks."""

from __future__ import annotations

import random

import pytest

from supervisor.screen import ScreenModel
from supervisor.screen_flood import MIN_CUT, FloodCutter

SPICE = [
    b"\x1b[2J", b"\x1b[H", b"\x1b[5;10H", b"\x1b[K", b"\x1b[?1049h", b"\x1b[?1049l",
    b"\x1b[3;10r", b"\x1b[r", b"\x1b[?69h", b"\x1b[?69l", b"\x1b]0;title\x07", b"\x1b(0qq\x1b(B",
    b"\x1b[4h", b"\x1b[4l", b"\x1b[?7l", b"\x1b[?7h", b"\x1bM", b"\x1b[2S", b"\x0e", b"\x0f",
    b"\xc2\x9b31m", b"\x1b[1;31;42m", b"\x1b[38;2;1;2;3m",
]


def _stream(rng: random.Random, lines: int) -> bytes:
    out = []
    for i in range(lines):
        r = rng.random()
        if r < 0.03:
            out.append(rng.choice(SPICE))
        text = b"%d " % i + rng.choice([b"x", "é".encode(), "漢".encode(), b"ab"]) * rng.randint(
            0, 70)
        if r > 0.8:
            end = rng.choice([b"\x1b[0m", b"", b"\x1b[m"])
            text = b"\x1b[3%dm" % rng.randint(0, 7) + text + end
        out.append(text + rng.choice([b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r", b""]))
    return b"".join(out)


def _feed(model: ScreenModel, data: bytes, rng: random.Random) -> None:
    at = 0
    while at < len(data):
        n = rng.choice([1, 7, 4096, MIN_CUT, 3 * MIN_CUT, 200_000])
        model.feed(data[at:at + n])
        at += n
        if rng.random() < 0.2:
            model.text()   # a parse piece ends here, as at a repaint


class _NoCut(FloodCutter):
    def cut(self, data: bytes, rows: int) -> bytes:
        return data


@pytest.mark.parametrize("seed", range(40))
def test_cut_leaves_the_screen_exactly_as_a_full_parse(seed: int) -> None:
    rng = random.Random(seed)
    cols, rows = rng.choice([(80, 24), (120, 40), (20, 5), (200, 3)])
    data = _stream(rng, rng.choice([3000, 20000]))
    cut, full = ScreenModel(cols, rows, backend="vterm"), ScreenModel(cols, rows, backend="vterm")
    full._impl.flood = _NoCut()   # type: ignore[union-attr]
    chunking = rng.random()
    _feed(cut, data, random.Random(chunking))
    _feed(full, data, random.Random(chunking))
    assert cut.text() == full.text()
    assert cut.render() == full.render()


def test_a_plain_flood_is_mostly_not_parsed() -> None:
    """Positive control for the test above: cuts do happen, and save most of a flood."""
    model = ScreenModel(80, 24, backend="vterm")
    flood = b"".join(b"\x1b[32mline %d\x1b[0m %s\r\n" % (i, b"y" * 60) for i in range(100_000))
    for at in range(0, len(flood), 65536):
        model.feed(flood[at:at + 65536])
    cutter = model._impl.flood   # type: ignore[union-attr]
    assert cutter.skipped > 0.8 * len(flood)
    assert model.text()[-2].startswith("line 99999 ")


def test_no_cut_inside_a_scroll_region_or_after_an_open_escape() -> None:
    lines = b"".join(b"%d\r\n" % i for i in range(20_000))
    c = FloodCutter()
    c.cut(b"\x1b[2;10r", 24)
    assert c.region
    assert c.cut(lines, 24) == lines          # a region is set: parsed whole
    c.cut(b"\x1b[r", 24)
    assert not c.region
    c.cut(b"\x1b[?1049", 24)                 # a CSI still open at the chunk's end
    assert not c.clean
    c.cut(b"h\x1b[0m", 24)
    assert c.clean
    assert len(c.cut(lines, 24)) < len(lines)   # the last chunk ended cleanly
    c.cut(b"\x1b[?1049", 24)
    assert c.cut(lines, 24) == lines          # digits: still the CSI's parameters
    c.cut("漢".encode()[:2], 24)              # half a UTF-8 character
    assert c.cut(lines, 24) == lines


def _pieces_match(*pieces: bytes, rows: int = 24) -> ScreenModel:
    """Feed each piece to a cutting and a full model, parsing in between (as
    a repaint or a resize would); the screens must be the same."""
    cut, full = ScreenModel(80, rows, backend="vterm"), ScreenModel(80, rows, backend="vterm")
    full._impl.flood = _NoCut()   # type: ignore[union-attr]
    for piece in pieces:
        cut.feed(piece)
        full.feed(piece)
        cut.text()
        full.text()
    assert cut.text() == full.text()
    assert cut.render() == full.render()
    return cut


FLOOD = (b"x" * 30 + b"\r\n") * 2000


def test_cut_starts_in_column_0_whatever_the_last_piece_left() -> None:
    m = _pieces_match(b"abc", FLOOD + b"y\n" * 60)
    assert m._impl.flood.skipped > 0   # type: ignore[union-attr]
    _pieces_match(b"abc", FLOOD + b"y\n" * 40 + b"\r\n" * 9)


def test_no_cut_after_half_a_utf8_character() -> None:
    _pieces_match(b"ok\r\n", FLOOD + b"\xe6\x97\r\n" + b"\xa5" + b"y\n" * 60)


@pytest.mark.parametrize("pieces", [
    [b"\x1b[2;10r\x1b[?69l\x1b[12;1H", b"ab\r\n" + FLOOD],     # DECLRMM off keeps DECSTBM
    [b"\x1b[2;10r\x1b[!p\x1b[12;1H", b"ab\r\n" + FLOOD],       # DECSTR keeps it in libvterm
    [b"ab\x1b[2;1", b"0r\x1b[12;1H", FLOOD],                   # set across two pieces
    [b"ab\x1b[2", b";10r\x1b[12;1H", FLOOD],
    [b"ab\x1b", b"[2;10r\x1b[12;1H", FLOOD],
])
def test_a_scroll_region_is_seen_however_it_arrives(pieces: list[bytes]) -> None:
    m = _pieces_match(*pieces)
    assert m._impl.flood.region   # type: ignore[union-attr]
