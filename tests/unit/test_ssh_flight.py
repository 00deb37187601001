"""How much session output a client may have in flight (sent, its SSH window
credit not back) before the pump waits: AgentSession._client_caught_up, with
a stand-in for asyncssh's channel (its send window and write buffer)."""

from __future__ import annotations

import asyncio

import pytest

from supervisor import ssh_session
from supervisor.ssh_session import FLIGHT_MAX, AgentSession

WINDOW = 2 * 1024 * 1024   # OpenSSH's initial window


class Chan:
    """The two things the pump reads of asyncssh's channel."""

    def __init__(self) -> None:
        self._send_window = WINDOW

    def get_write_buffer_size(self) -> int:
        return 0


def _session(chan: Chan) -> AgentSession:
    s = AgentSession.__new__(AgentSession)
    s._chan = chan   # type: ignore[assignment]
    s._window_max = 0
    s._flight_limit = FLIGHT_MAX
    s._flight_changed_at = 0.0
    return s


def _in_flight(chan: Chan, n: int) -> None:
    chan._send_window = WINDOW - n


async def _grown(n: int) -> tuple[Chan, AgentSession]:
    """A session whose client went quiet with `n` in flight: after
    FLIGHT_PATIENCE the pump goes on, with a larger allowance."""
    chan = Chan()
    s = _session(chan)
    assert await _returns(s, 0.05)
    _in_flight(chan, n)
    assert await _returns(s, 1.0)
    assert s._flight_limit == n + FLIGHT_MAX
    return chan, s


async def _returns(s: AgentSession, within: float) -> bool:
    try:
        await asyncio.wait_for(s._client_caught_up(), within)
    except TimeoutError:
        return False
    return True


def test_a_limit_grown_for_a_quiet_client_shrinks_back(monkeypatch: pytest.MonkeyPatch
                                                       ) -> None:
    monkeypatch.setattr(ssh_session, "FLIGHT_DECAY", 0.3)

    async def main() -> None:
        chan, s = await _grown(600 * 1024)
        assert await _returns(s, 0.05)   # within the grown limit: no wait
        # it credits again, steadily but with the flood keeping ~500 KiB in
        # flight: the allowance halves every FLIGHT_DECAY all the same
        _in_flight(chan, 500 * 1024)
        assert await _returns(s, 0.05)
        assert s._flight_limit > FLIGHT_MAX
        await asyncio.sleep(0.35)
        _in_flight(chan, 300 * 1024)
        assert await _returns(s, 0.05)
        assert s._flight_limit == (600 * 1024 + FLIGHT_MAX) // 2
        for _ in range(4):
            await asyncio.sleep(0.35)
            _in_flight(chan, 64 * 1024)
            assert await _returns(s, 0.05)
        assert s._flight_limit == FLIGHT_MAX
        # so 600 KiB in flight makes it wait again (positive control of the bound)
        _in_flight(chan, 600 * 1024)
        assert not await _returns(s, 0.05)

    asyncio.run(main())


def test_a_client_crediting_in_lumps_grows_it_again(monkeypatch: pytest.MonkeyPatch
                                                    ) -> None:
    monkeypatch.setattr(ssh_session, "FLIGHT_DECAY", 0.3)

    async def main() -> None:
        chan, s = await _grown(900 * 1024)
        grown = s._flight_limit
        # credit comes back half a window at a time; after the allowance has
        # halved, the next lump waits FLIGHT_PATIENCE once and grows it again
        await asyncio.sleep(0.35)
        _in_flight(chan, 16 * 1024)
        assert await _returns(s, 0.05)
        assert s._flight_limit < grown
        _in_flight(chan, 900 * 1024)
        assert await _returns(s, 1.0)
        assert s._flight_limit == grown

    asyncio.run(main())
