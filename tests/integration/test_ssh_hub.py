"""The real SessionHub's fan-out policy against a keeper stand-in on a real unix socket.

tmux's skip-and-repaint: a flood runs at the agent's pace whatever the clients
do. A client that takes everything gets every byte; one that falls behind is
skipped ahead and ends with exactly the hub's screen (its own terminal model,
fed only what it received, matches); one that stops reading holds a bounded
queue and is dropped; the session's end carries the exit signal.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from supervisor import keeper_proto as kp
from supervisor import session as sess
from supervisor.screen import ScreenModel
from supervisor.session import SessionClient, SessionHub

FLOOD = 24 * 1024 * 1024
CHUNK = 64 * 1024
#: the most a client's queue may hold: the skip bound plus one keeper read
QUEUE_BOUND = sess.SKIP_AT + sess.SOCKET_READ + CHUNK


class FakeKeeper:
    """Answers HELLO/STATUS like the keeper, then floods OUTPUT frames of
    numbered lines as fast as the socket takes them (or `pace` seconds apart),
    then a last line naming the end, then EXIT."""

    def __init__(self, path: str, exit_signal: int | None = None, pace: float = 0.0,
                 total: int = FLOOD, linger: float = 0.3) -> None:
        self.path = path
        self.exit_signal = exit_signal
        self.pace = pace
        self.total = total
        self.linger = linger
        self.sent = 0
        self.flood_started = asyncio.Event()
        self.flood_done = asyncio.Event()
        #: ends the linger before EXIT early; closed: the connection is closed
        self.release = asyncio.Event()
        self.closed = asyncio.Event()
        self._go = asyncio.Event()
        self.server: asyncio.Server | None = None

    @contextlib.asynccontextmanager
    async def hub(self) -> AsyncIterator[SessionHub]:
        """A hub connected to this keeper; hub, connection and server are
        closed afterwards, also when the test fails."""
        self.server = await asyncio.start_unix_server(self._serve, self.path)
        hub = SessionHub("demo", self.path)
        try:
            await hub.connect()
            yield hub
        finally:
            self.release.set()
            if self.flood_started.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.closed.wait(), 10)
            await hub.close()
            self.server.close()

    def flood(self) -> None:
        self._go.set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        frames = kp.FrameReader()
        while not any(k == kp.STATUS for k, _ in frames.feed(await reader.read(4096))):
            pass
        writer.write(kp.frame(kp.BACKLOG, b"") + kp.frame(kp.STATE, json.dumps(
            {"cols": 80, "rows": 24}).encode()))
        await self._go.wait()
        self.flood_started.set()
        n = 0
        while self.sent < self.total:
            lines = []
            for _ in range(CHUNK // 80):
                n += 1
                lines.append(b"\x1b[1mline %08d\x1b[0m " % n + b"x" * 50 + b"\r\n")
            data = b"".join(lines)
            writer.write(kp.frame(kp.OUTPUT, data))
            self.sent += len(data)
            await writer.drain()
            if self.pace:
                await asyncio.sleep(self.pace)
        end = b"THE-END %d\r\n" % n
        writer.write(kp.frame(kp.OUTPUT, end))
        self.sent += len(end)
        self.flood_done.set()
        await writer.drain()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.release.wait(), self.linger)
        with contextlib.suppress(ConnectionError):
            writer.write(kp.frame(kp.EXIT, json.dumps(
                {"status": 128 + (self.exit_signal or 0), "signal": self.exit_signal}).encode()))
            await writer.drain()
        writer.close()
        self.closed.set()


async def _read_all(client: SessionClient, delay: float = 0.0,
                    model: ScreenModel | None = None) -> int:
    got = 0
    while data := await client.read():
        got += len(data)
        if model is not None:
            model.feed(data)
        if delay:
            await asyncio.sleep(delay)
    return got


@pytest.mark.timeout(120)
def test_fast_client_gets_every_byte_lagging_one_skips_to_the_same_screen(
        tmp_path: Path) -> None:
    async def go() -> None:
        k = FakeKeeper(str(tmp_path / "k.sock"), exit_signal=9)
        async with k.hub() as hub:
            fast = hub.attach("alice", "collaborator")
            slow = hub.attach("bob", "viewer")
            slow_view = ScreenModel(80, 24)
            slow_view.feed(slow.snapshot)
            loop = asyncio.get_running_loop()
            fast_reader = loop.create_task(_read_all(fast))
            # ~1.3 MB/s: paced to it, the flood would take about 20 s
            slow_reader = loop.create_task(_read_all(slow, 0.2, slow_view))
            k.flood()
            await k.flood_started.wait()
            t0 = time.monotonic()
            await asyncio.wait_for(k.flood_done.wait(), 60)
            flood_s = time.monotonic() - t0
            got_fast = await asyncio.wait_for(fast_reader, 30)
            got_slow = await asyncio.wait_for(slow_reader, 30)
            # the client that keeps up got every byte, raw, and was never skipped
            assert got_fast == k.sent >= FLOOD
            assert fast.skips == 0
            # the lagging one did not hold the flood back (paced to its reader,
            # the flood would have taken ~20 s) and got a fraction of it
            assert flood_s < 10, flood_s
            assert slow.skips >= 1
            assert got_slow < k.sent // 4
            assert slow._queued == 0   # repaints never count against the queue
            # and its terminal, fed only what it was sent, shows the hub's screen
            assert slow_view.text() == hub.screen.text()
            assert any("THE-END" in line for line in slow_view.text())
            assert fast.dropped_reason == slow.dropped_reason == "session ended"
            # the session's end carries the signal for SSH's exit-signal
            assert hub.exit_signal == 9
            assert hub.exit_status == 137

    asyncio.run(go())


@pytest.mark.timeout(120)
def test_stalled_client_holds_a_bounded_queue_and_is_dropped(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sess, "STALL_DROP", 1.0)

    async def go() -> None:
        # ~3 s of flood, longer than STALL_DROP
        k = FakeKeeper(str(tmp_path / "k.sock"), pace=3.0 / (FLOOD // CHUNK))
        async with k.hub() as hub:
            stalled = hub.attach("carol", "viewer")   # never reads
            reader = hub.attach("alice", "owner")
            got = asyncio.get_running_loop().create_task(_read_all(reader))
            max_queued = 0

            async def probe() -> None:
                nonlocal max_queued
                while not stalled.closed:
                    max_queued = max(max_queued, stalled._queued)
                    await asyncio.sleep(0.005)

            prober = asyncio.get_running_loop().create_task(probe())
            k.flood()
            await asyncio.wait_for(k.flood_done.wait(), 60)
            assert await asyncio.wait_for(got, 30) == k.sent
            await asyncio.wait_for(prober, 5)
            assert stalled.dropped_reason == "slow"
            assert 0 < max_queued <= QUEUE_BOUND
            assert reader.skips == 0

    asyncio.run(go())


def test_exit_without_signal(tmp_path: Path) -> None:
    async def go() -> None:
        path = str(tmp_path / "k.sock")

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read(4096)
            writer.write(kp.frame(kp.STATE, b'{"cols": 80, "rows": 24}')
                         + kp.frame(kp.EXIT, b'{"status": 3}'))
            await writer.drain()
            writer.close()

        server = await asyncio.start_unix_server(serve, path)
        hub = SessionHub("demo", path)
        try:
            await hub.connect()
            for _ in range(100):
                if hub.ended:
                    break
                await asyncio.sleep(0.05)
            assert hub.ended
            assert (hub.exit_status, hub.exit_signal) == (3, None)
        finally:
            await hub.close()
            server.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    asyncio.run(go())


@pytest.mark.timeout(60)
def test_stalled_client_dropped_after_the_output_stopped(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tick drops a lagging client that stopped reading even when no more
    output comes to notice it with."""
    monkeypatch.setattr(sess, "STALL_DROP", 0.5)

    async def go() -> None:
        k = FakeKeeper(str(tmp_path / "k.sock"), total=4 * 1024 * 1024, linger=30)
        async with k.hub() as hub:
            stalled = hub.attach("carol", "viewer")   # never reads
            k.flood()
            await asyncio.wait_for(k.flood_done.wait(), 30)
            for _ in range(200):
                if stalled.closed:
                    break
                await asyncio.sleep(0.05)
            assert stalled.dropped_reason == "slow"
            assert not hub.ended           # the session goes on: this was the tick
            assert hub._repaint_timer is None   # and it stopped once nobody lagged

    asyncio.run(go())
