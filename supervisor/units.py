"""Human units in templates and config: sizes ("2G", "512M", bytes) and durations ("2s", "500ms").

Both parsers raise ValueError with a short reason; callers (templates, config)
prefix it with the file, line and key path.
"""

from __future__ import annotations

import math
import re

# Binary multiples, as cgroups and `free -h` count them: 1K = 1024 bytes.
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(?:i?b)?\s*$", re.IGNORECASE)

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")


def parse_size(s: str | int) -> int:
    """Bytes from an int or a string like "2G", "512M", "1.5GiB", "4096"."""
    # bool is an int subclass: `memory: yes` must not silently become 1 byte.
    if isinstance(s, bool):
        raise ValueError(f"expected a size like 512M or 2G, got {s!r}")
    if isinstance(s, int):
        if s < 0:
            raise ValueError(f"size must not be negative, got {s}")
        return s
    if not isinstance(s, str):
        raise ValueError(f"expected a size like 512M or 2G, got {s!r}")
    m = _SIZE_RE.match(s)
    if not m:
        raise ValueError(f"expected a size like 512M or 2G, got {s!r}")
    number, unit = m.group(1), m.group(2).lower()
    value = float(number) * _SIZE_UNITS[unit]
    if not math.isfinite(value):
        raise ValueError(f"size {s!r} is too large")
    return int(value)


def parse_duration(s: str | int | float) -> float:
    """Seconds from a number of seconds or a string like "2s", "500ms", "1m", "1h"."""
    if isinstance(s, bool):
        raise ValueError(f"expected a duration like 2s or 500ms, got {s!r}")
    if isinstance(s, int | float):
        if not math.isfinite(s) or s < 0:
            raise ValueError(f"duration must be a non-negative number, got {s!r}")
        return float(s)
    if not isinstance(s, str):
        raise ValueError(f"expected a duration like 2s or 500ms, got {s!r}")
    m = _DURATION_RE.match(s)
    if not m:
        raise ValueError(f"expected a duration like 2s or 500ms, got {s!r}")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2) or "s"]


def format_size(n: int) -> str:
    """The shortest exact spelling of a byte count ("1G", "1536M", "1000")."""
    for unit in ("P", "T", "G", "M", "K"):
        mult = _SIZE_UNITS[unit.lower()]
        if n and n % mult == 0:
            return f"{n // mult}{unit}"
    return str(n)


def format_duration(seconds: float) -> str:
    """A compact spelling of a duration ("2s", "500ms")."""
    if seconds and seconds < 1:
        return f"{round(seconds * 1000)}ms"
    if seconds == int(seconds):
        return f"{int(seconds)}s"
    return f"{seconds}s"
