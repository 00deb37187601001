"""The real SessionHub's fan-out policy against a keeper stand-in on a real unix socket.

A flood is paced to a client that keeps reading (it is never dropped, and gets
every byte), while a client that stops reading holds the flood back at most
PACE_GRACE and is then dropped at its bounded queue; the session's end carries
the exit signal.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from pathlib import Path

import pytest

from supervisor import keeper_proto as kp
from supervisor import session as sess
from supervisor.session import SessionClient, SessionHub

FLOOD = 24 * 1024 * 1024
CHUNK = 64 * 1024


class FakeKeeper:
    """Answers HELLO/STATUS like the keeper, then floods OUTPUT frames as fast
    as the socket takes them (so the hub's reading pace is the flood's pace)."""

    def __init__(self, path: str, exit_signal: int | None = None) -> None:
        self.path = path
        self.exit_signal = exit_signal
        self.sent = 0
        self.flood_started = asyncio.Event()
        self.flood_done = asyncio.Event()
        self._go = asyncio.Event()
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_unix_server(self._serve, self.path)

    def flood(self) -> None:
        self._go.set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        frames = kp.FrameReader()
        while not any(k == kp.STATUS for k, _ in frames.feed(await reader.read(4096))):
            pass
        writer.write(kp.frame(kp.BACKLOG, b"") + kp.frame(kp.STATE, json.dumps(
            {"cols": 80, "rows": 24}).encode()))
        await self._go.wait()
        line = (b"x" * 99 + b"\n") * (CHUNK // 100)
        self.flood_started.set()
        while self.sent < FLOOD:
            writer.write(kp.frame(kp.OUTPUT, line))
            self.sent += len(line)
            await writer.drain()
        self.flood_done.set()
        writer.write(kp.frame(kp.EXIT, json.dumps(
            {"status": 128 + (self.exit_signal or 0), "signal": self.exit_signal}).encode()))
        await writer.drain()
        writer.close()


async def _read_all(client: SessionClient) -> int:
    got = 0
    while data := await client.read():
        got += len(data)
    return got


@pytest.mark.timeout(120)
def test_stalled_client_dropped_fast_client_paced_and_complete(tmp_path: Path) -> None:
    async def go() -> None:
        k = FakeKeeper(str(tmp_path / "k.sock"), exit_signal=9)
        await k.start()
        hub = SessionHub("demo", k.path)
        await hub.connect()
        try:
            fast = hub.attach("alice", "collaborator")
            stalled = hub.attach("carol", "viewer")   # never reads
            reader = asyncio.get_running_loop().create_task(_read_all(fast))
            k.flood()
            await k.flood_started.wait()
            t0 = time.monotonic()
            await asyncio.wait_for(k.flood_done.wait(), 60)
            flood_s = time.monotonic() - t0
            got = await asyncio.wait_for(reader, 30)
            # the reading client got every byte and was not dropped
            assert got == k.sent >= FLOOD
            assert fast.dropped_reason == "session ended"
            # the stalled one was dropped as slow, its queue never past the bound
            assert stalled.closed
            assert stalled.dropped_reason == "slow"
            # and it held the flood back once, for about PACE_STALL (it took
            # nothing at all), not PACE_GRACE (the allowance of a slow reader)
            assert flood_s < sess.PACE_GRACE + 10
            assert 0 < hub.paced_for < sess.PACE_GRACE
            # the session's end carries the signal for SSH's exit-signal
            assert hub.exit_signal == 9
            assert hub.exit_status == 137
        finally:
            await hub.close()
            assert k.server is not None
            k.server.close()

    asyncio.run(go())


def test_slow_but_reading_client_paces_instead_of_drop(tmp_path: Path) -> None:
    """A client reading well above (PACE_HIGH - PACE_LOW) / PACE_GRACE but
    slower than the flood is never dropped: the flood waits for it."""
    async def go() -> None:
        k = FakeKeeper(str(tmp_path / "k.sock"))
        await k.start()
        hub = SessionHub("demo", k.path)
        await hub.connect()
        try:
            slow = hub.attach("alice", "collaborator")
            max_queued = 0

            async def sip() -> int:
                nonlocal max_queued
                got = 0
                while True:
                    max_queued = max(max_queued, slow._queued)
                    data = await slow.read()
                    if not data:
                        return got
                    got += len(data)
                    await asyncio.sleep(0.02)   # at most 256 KiB per 20 ms: ~12 MB/s

            reader = asyncio.get_running_loop().create_task(sip())
            k.flood()
            got = await asyncio.wait_for(reader, 90)
            assert got == k.sent >= FLOOD
            assert slow.dropped_reason == "session ended"
            assert max_queued <= sess.CLIENT_QUEUE_BYTES
        finally:
            await hub.close()
            assert k.server is not None
            k.server.close()

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
