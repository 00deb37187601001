"""Safe YAML with locations: text → a tree of Raw nodes that remember FILE:LINE.

Templates and the daemon config are written by people and (for templates) may
come from anyone with write access to a template directory, so loading is
deliberately narrow:

- only the safe loader's event parser and composer run (a SafeLoader
  subclass); nothing is ever *constructed* by PyYAML beyond plain scalars, so
  tags such as ``!!python/object`` are refused, not interpreted;
- the document is capped in size and nesting depth *before* composing (the
  composer is recursive, a 100k-deep ``[[[[`` would blow Python's stack);
- aliases are expanded against a node budget, which defeats "billion laughs"
  style alias bombs while leaving ordinary anchors usable;
- duplicate keys are refused (PyYAML silently keeps the last one);
- every node keeps the location it came from so validation errors can say
  ``templates/x.yaml:12: services.web.port: must be 1-65535``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

#: Documents larger than this are refused before parsing.
MAX_BYTES = 256 * 1024
#: Maximum nesting of mappings and sequences.
MAX_DEPTH = 20
#: Maximum number of nodes after alias expansion (alias-bomb guard).
MAX_NODES = 20_000

_YAML = "tag:yaml.org,2002:"
# The only tags a document may carry (explicitly or by implicit resolution).
# Timestamps are kept as their text: nothing in our schemas is a date.
_SCALAR_TAGS = {f"{_YAML}{t}" for t in ("str", "int", "float", "bool", "null", "timestamp")}
_MAP_TAG = f"{_YAML}map"
_SEQ_TAG = f"{_YAML}seq"


class YamlError(Exception):
    """A YAML document is unsafe or malformed; the text starts with its location."""


# libyaml's parser when PyYAML was built with it: ~10x faster than the pure
# Python scanner, and templates are parsed on every `create`.
_SafeBase: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Loader(_SafeBase):  # type: ignore[valid-type,misc]
    """The safe loader, used only for parsing and composing (never constructing objects)."""


@dataclass
class Raw:
    """A YAML node: its value and where it came from (``file:line`` or ``--set key``)."""

    loc: str


@dataclass
class RawScalar(Raw):
    value: Any  # str | int | float | bool | None


@dataclass
class RawSeq(Raw):
    items: list[Raw] = field(default_factory=list)


@dataclass
class RawMap(Raw):
    items: dict[str, Raw] = field(default_factory=dict)


def _loc(origin: str, mark: Any) -> str:
    return f"{origin}:{mark.line + 1}" if mark is not None else origin


def _prescan(text: str, origin: str, fixed: str | None) -> None:
    """Check nesting depth on the (iterative) event stream before the recursive composer runs."""
    depth = 0
    try:
        for ev in yaml.parse(text, Loader=_Loader):
            if isinstance(ev, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_DEPTH:
                    where = fixed or _loc(origin, ev.start_mark)
                    raise YamlError(f"{where}: nested deeper than {MAX_DEPTH} levels")
            elif isinstance(ev, yaml.CollectionEndEvent):
                depth -= 1
    except yaml.MarkedYAMLError as e:
        where = fixed or _loc(origin, e.problem_mark)
        raise YamlError(f"{where}: invalid YAML: {e.problem}") from None
    except yaml.YAMLError as e:
        raise YamlError(f"{fixed or origin}: invalid YAML: {e}") from None


def parse(text: str | bytes, origin: str, *, loc: str | None = None) -> Raw | None:
    """Parse one YAML document into a Raw tree; None for an empty document.

    `origin` names the source in locations (a file path, or ``--set key``);
    `loc`, when given, is used as every node's location (for one-line inputs
    such as ``--set`` values where a line number means nothing).
    """
    if isinstance(text, bytes):
        if len(text) > MAX_BYTES:
            raise YamlError(f"{origin}: document is larger than {MAX_BYTES // 1024} KiB")
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise YamlError(f"{origin}: not valid UTF-8 (byte {e.start})") from None
    if len(text.encode("utf-8", "surrogatepass")) > MAX_BYTES:
        raise YamlError(f"{origin}: document is larger than {MAX_BYTES // 1024} KiB")
    _prescan(text, origin, loc)
    try:
        node = yaml.compose(text, Loader=_Loader)
    except yaml.MarkedYAMLError as e:
        where = loc or _loc(origin, e.problem_mark)
        raise YamlError(f"{where}: invalid YAML: {e.problem}") from None
    except yaml.YAMLError as e:
        raise YamlError(f"{loc or origin}: invalid YAML: {e}") from None
    if node is None:
        return None
    return _Builder(origin, loc).build(node, None, 0)


class _Builder:
    """Turns composed yaml.Node objects into Raw nodes, enforcing tags, keys and the node budget."""

    def __init__(self, origin: str, loc: str | None) -> None:
        self.origin = origin
        self.fixed_loc = loc
        self.count = 0
        # Plain scalars (int, float, bool, null, str) only: tags were checked above.
        self.scalars = yaml.SafeLoader("")

    def loc(self, node: yaml.Node) -> str:
        return self.fixed_loc or _loc(self.origin, node.start_mark)

    def build(self, node: yaml.Node, loc: str | None, depth: int) -> Raw:
        self.count += 1
        if depth > MAX_DEPTH:
            # Aliases can nest deeper than the text does (each anchor wrapping
            # the previous one): check again on the expanded tree.
            raise YamlError(f"{self.loc(node)}: nested deeper than {MAX_DEPTH} levels")
        if self.count > MAX_NODES:
            # Only alias expansion can get here within MAX_BYTES: refuse the bomb.
            raise YamlError(
                f"{self.loc(node)}: document expands to more than {MAX_NODES} nodes (alias bomb?)"
            )
        here = loc or self.loc(node)
        if isinstance(node, yaml.ScalarNode):
            if node.tag not in _SCALAR_TAGS:
                raise YamlError(f"{here}: YAML tag {node.tag!r} is not allowed")
            if node.tag == f"{_YAML}timestamp":
                return RawScalar(here, node.value)
            return RawScalar(here, self.scalars.construct_object(node, deep=True))
        if isinstance(node, yaml.SequenceNode):
            if node.tag != _SEQ_TAG:
                raise YamlError(f"{here}: YAML tag {node.tag!r} is not allowed")
            return RawSeq(here, [self.build(item, None, depth + 1) for item in node.value])
        if isinstance(node, yaml.MappingNode):
            if node.tag != _MAP_TAG:
                raise YamlError(f"{here}: YAML tag {node.tag!r} is not allowed")
            out = RawMap(here)
            for knode, vnode in node.value:
                kloc = self.loc(knode)
                if knode.tag == f"{_YAML}merge":
                    raise YamlError(f"{kloc}: merge keys ('<<') are not supported")
                key = self.build(knode, None, depth + 1)
                if not isinstance(key, RawScalar) or not isinstance(key.value, str):
                    shown = key.value if isinstance(key, RawScalar) else "a collection"
                    raise YamlError(f"{kloc}: keys must be strings, got {shown!r}")
                if key.value in out.items:
                    raise YamlError(f"{kloc}: duplicate key {key.value!r}")
                # A mapping value is located at its key: that is the line a
                # person looks at for `port: 70000` or a block under `allow:`.
                out.items[key.value] = self.build(vnode, kloc, depth + 1)
            return out
        raise YamlError(f"{here}: unsupported YAML node")


def from_plain(value: Any, loc: str) -> Raw:
    """A Raw tree from plain JSON-like data (every node at `loc`)."""
    if isinstance(value, dict):
        out = RawMap(loc)
        for k, v in value.items():
            if not isinstance(k, str):
                raise YamlError(f"{loc}: keys must be strings, got {k!r}")
            out.items[k] = from_plain(v, loc)
        return out
    if isinstance(value, list | tuple):
        return RawSeq(loc, [from_plain(v, loc) for v in value])
    return RawScalar(loc, value)


def to_plain(raw: Raw) -> Any:
    """Plain Python data from a Raw tree (locations dropped)."""
    if isinstance(raw, RawMap):
        return {k: to_plain(v) for k, v in raw.items.items()}
    if isinstance(raw, RawSeq):
        return [to_plain(v) for v in raw.items]
    return raw.value if isinstance(raw, RawScalar) else None


def deep_merge(base: Raw, over: Raw) -> Raw:
    """`over` on top of `base`: mappings merge key by key, lists and scalars replace."""
    if isinstance(base, RawMap) and isinstance(over, RawMap):
        out = RawMap(over.loc, dict(base.items))
        for k, v in over.items.items():
            out.items[k] = deep_merge(base.items[k], v) if k in base.items else v
        return out
    return over
