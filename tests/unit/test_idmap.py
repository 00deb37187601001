"""id_map is pure: the uid_map text for an idmapped lower layer."""

from __future__ import annotations

import itertools

from sandbox.idmap import _MAX_ID, id_map


def parse(text: str) -> list[tuple[int, int, int]]:
    return [tuple(int(x) for x in line.split()) for line in text.splitlines()]  # type: ignore[misc]


def shown(text: str, disk: int) -> int | None:
    """What on-disk id `disk` looks like through a mount with this map."""
    for first, lower, count in parse(text):
        if first <= disk < first + count:
            return lower + (disk - first)
    return None


def test_owner_appears_as_the_agent_everyone_else_as_themselves() -> None:
    text = id_map(1000, 200005)
    assert shown(text, 1000) == 200005
    for other in (0, 1, 999, 1001, 65534, 200004, 200006, _MAX_ID - 1):
        assert shown(text, other) == other
    assert shown(text, 200005) is None  # the agent's own id on disk has nowhere to go


def test_ranges_do_not_overlap_on_either_side() -> None:
    for disk, sh in ((1000, 200005), (200005, 1000), (0, 5), (5, 0)):
        lines = parse(id_map(disk, sh))
        assert len(lines) <= 340  # the kernel's limit
        for side in (0, 1):
            spans = sorted((line[side], line[side] + line[2]) for line in lines)
            for (_, end), (start, _) in itertools.pairwise(spans):
                assert end <= start


def test_same_id_is_identity() -> None:
    assert parse(id_map(1000, 1000)) == [(0, 0, _MAX_ID)]
