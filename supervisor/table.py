"""Text rendering for the CLI: the ps/top table, events as lines, nested dicts.

Pure functions from the API's JSON to strings, so they are tested without a
daemon. Missing keys render as "-": the daemon may add keys, and an older one
may lack some, without breaking the table.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

PS_COLUMNS = ("NAME", "STATE", "TEMPLATE", "UPTIME", "CPU", "MEMORY", "PIDS", "PORTS", "USERS")

#: States in which an agent's uptime means something.
_UP_STATES = ("running", "degraded", "starting")


def table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Left-aligned columns separated by two spaces; the last column is not padded."""
    rows = [list(headers), *[list(r) for r in rows]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(headers))]
    lines = []
    for row in rows:
        cells = [c.ljust(w) for c, w in zip(row[:-1], widths[:-1], strict=True)]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    return "\n".join(lines)


def human_bytes(n: Any) -> str:
    if not isinstance(n, int | float) or isinstance(n, bool):
        return "-"
    value = float(n)
    for unit in ("B", "K", "M", "G", "T"):
        if value < 1024 or unit == "T":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return "-"  # unreachable


def human_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes}m"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def parse_time(value: Any) -> datetime | None:
    """An ISO time (or UNIX seconds) from the API, as an aware datetime."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return datetime.fromtimestamp(value, UTC)
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def uptime(agent: dict[str, Any], now: datetime | None = None) -> str:
    if agent.get("state") not in _UP_STATES:
        return "-"
    started = parse_time(agent.get("started") or agent.get("created"))
    if started is None:
        return "-"
    return human_duration(((now or datetime.now(UTC)) - started).total_seconds())


def _clients(value: Any) -> str:
    names = []
    for client in value or []:
        if isinstance(client, dict):
            names.append(str(client.get("user") or client.get("name") or "?"))
        else:
            names.append(str(client))
    return ",".join(dict.fromkeys(names)) or "-"


def _ports(value: Any) -> str:
    if isinstance(value, dict) and value:
        return ",".join(f"{k}:{v}" for k, v in value.items())
    return "-"


def ps_row(agent: dict[str, Any], now: datetime | None = None) -> list[str]:
    usage = agent.get("usage") or {}
    cpu = usage.get("cpu_percent")
    pids = usage.get("pids")
    return [
        str(agent.get("name", "?")),
        str(agent.get("state", "?")),
        str(agent.get("template") or "-"),
        uptime(agent, now),
        f"{cpu:.1f}%" if isinstance(cpu, int | float) else "-",
        human_bytes(usage.get("memory_bytes")),
        str(pids) if isinstance(pids, int) else "-",
        _ports(agent.get("ports")),
        _clients(agent.get("clients")),
    ]


def ps_table(agents: list[dict[str, Any]], now: datetime | None = None) -> str:
    return table(PS_COLUMNS, (ps_row(a, now) for a in agents))


def event_line(event: Any) -> str:
    """One event as `TIME KIND AGENT key=value ...`."""
    if not isinstance(event, dict):
        return str(event)
    rest = dict(event)
    when = next((rest.pop(k) for k in ("time", "ts", "at", "created") if k in rest), "-")
    kind = next((rest.pop(k) for k in ("kind", "type", "event") if k in rest), "-")
    agent = rest.pop("agent", None) or "-"
    rest.pop("id", None)
    data = rest.pop("data", None)
    if isinstance(data, dict):
        rest.update(data)
    fields = " ".join(f"{k}={_scalar(v)}" for k, v in rest.items() if v is not None)
    return " ".join(str(p) for p in (when, kind, agent, fields) if p != "")


def _scalar(value: Any) -> str:
    if isinstance(value, str):
        return value if value and " " not in value else json.dumps(value)
    return json.dumps(value, default=str)


def tree(value: Any, indent: int = 0) -> str:
    """A nested dict/list as indented `key: value` lines (inspect, status)."""
    pad = "  " * indent
    lines: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, dict | list) and item:
                lines.append(f"{pad}{key}:")
                lines.append(tree(item, indent + 1))
            else:
                lines.append(f"{pad}{key}: {_leaf(item)}")
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, dict | list) and item:
                lines.append(f"{pad}-")
                lines.append(tree(item, indent + 1))
            else:
                lines.append(f"{pad}- {_leaf(item)}")
    else:
        lines.append(pad + _leaf(value))
    return "\n".join(lines)


def _leaf(value: Any) -> str:
    if value is None or value == {} or value == []:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)
