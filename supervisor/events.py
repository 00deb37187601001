"""The event bus: every event is stored, streamed to live followers and,
where configured, posted to webhooks.

Followers get a bounded queue each; one that falls behind loses events (it is
told so with a `stream.lagged` event) rather than growing the daemon's memory.
Webhook delivery is best effort, off the event loop's critical path, bounded
in queue length and time.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import json
import logging
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any, Protocol

log = logging.getLogger(__name__)

FOLLOWER_QUEUE = 1000
WEBHOOK_QUEUE = 1000


class EventSink(Protocol):
    def add_event(self, kind: str, agent: str | None = None,
                  data: dict[str, Any] | None = None) -> Any: ...


def event_dict(ev: Any) -> dict[str, Any]:
    return {"id": ev.id, "ts": ev.ts, "kind": ev.kind, "agent": ev.agent, "data": ev.data}


class EventBus:
    def __init__(self, store: EventSink, webhooks: Sequence[tuple[str, Sequence[str]]] = ()):
        self.store = store
        self.webhooks = list(webhooks)
        self._followers: list[tuple[str | None, asyncio.Queue[dict[str, Any]]]] = []
        self._hooks: asyncio.Queue[tuple[str, dict[str, Any]]] | None = None
        self._hook_task: asyncio.Task[None] | None = None
        self.listeners: list[Callable[[dict[str, Any]], None]] = []

    def emit(self, kind: str, agent: str | None = None, **data: Any) -> dict[str, Any]:
        ev = event_dict(self.store.add_event(kind, agent, data))
        for want, q in list(self._followers):
            if want is not None and want != agent:
                continue
            if q.full():
                with contextlib.suppress(asyncio.QueueEmpty):
                    q.get_nowait()
                q.put_nowait({"kind": "stream.lagged", "agent": agent, "data": {}})
            q.put_nowait(ev)
        for fn in self.listeners:
            try:
                fn(ev)
            except Exception:
                log.exception("event listener failed")
        self._notify(ev)
        return ev

    def follow(self, agent: str | None) -> asyncio.Queue[dict[str, Any]]:
        q: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=FOLLOWER_QUEUE)
        self._followers.append((agent, q))
        return q

    def unfollow(self, q: asyncio.Queue[dict[str, Any]]) -> None:
        self._followers = [(a, x) for a, x in self._followers if x is not q]

    # --- webhooks ---
    def _notify(self, ev: dict[str, Any]) -> None:
        for url, globs in self.webhooks:
            if any(fnmatch.fnmatchcase(ev["kind"], g) for g in globs):
                if self._hooks is None:
                    self._hooks = asyncio.Queue(maxsize=WEBHOOK_QUEUE)
                    self._hook_task = asyncio.get_running_loop().create_task(
                        self._deliver(), name="webhooks")
                if not self._hooks.full():
                    self._hooks.put_nowait((url, ev))

    async def _deliver(self) -> None:
        assert self._hooks is not None  # noqa: S101 - created with the task
        while True:
            url, ev = await self._hooks.get()
            try:
                await asyncio.to_thread(_post, url, ev)
            except Exception as e:  # a webhook must never hurt the daemon
                log.warning("webhook %s failed: %s", url, e)

    async def close(self) -> None:
        if self._hook_task is not None:
            self._hook_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._hook_task


def _post(url: str, ev: dict[str, Any]) -> None:
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"webhook URL {url!r} must be http(s)")
    req = urllib.request.Request(url, data=json.dumps(ev).encode(),  # noqa: S310 - scheme checked
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5):  # noqa: S310 - scheme checked
        pass
