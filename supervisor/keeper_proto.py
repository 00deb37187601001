"""The keeper's wire protocol: typed frames over its unix socket.

A frame is one type byte, a 4-byte big-endian length and the payload. Typed
frames (not exit codes or ad-hoc text) so both sides can evolve and a partial
read is never mistaken for a message.

client → keeper: HELLO (subscribe; answered by BACKLOG then OUTPUT frames),
INPUT (bytes for the PTY), RESIZE (JSON {"cols", "rows"}), STATUS (answered by
STATE), SIGNAL (JSON {"signal": n}, sent to the sandbox's init).
keeper → client: BACKLOG (the scrollback ring at subscribe time), OUTPUT,
STATE (JSON), EXIT (JSON {"status": n}; the session is over).
"""

from __future__ import annotations

import struct

HELLO = b"H"
INPUT = b"I"
RESIZE = b"R"
STATUS = b"S"
SIGNAL = b"K"
BACKLOG = b"B"
OUTPUT = b"O"
STATE = b"T"
EXIT = b"X"

HEADER = struct.Struct(">cI")
#: Largest frame either side accepts; a peer sending more is cut off.
MAX_FRAME = 4 * 1024 * 1024


def frame(kind: bytes, payload: bytes = b"") -> bytes:
    return HEADER.pack(kind, len(payload)) + payload


class FrameReader:
    """Incremental frame parser: feed() bytes, iterate complete frames."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        self._buf += data
        out: list[tuple[bytes, bytes]] = []
        while len(self._buf) >= HEADER.size:
            kind, size = HEADER.unpack_from(self._buf)
            if size > MAX_FRAME:
                raise ValueError(f"keeper frame of {size} bytes exceeds {MAX_FRAME}")
            if len(self._buf) < HEADER.size + size:
                break
            out.append((kind, bytes(self._buf[HEADER.size : HEADER.size + size])))
            del self._buf[: HEADER.size + size]
        return out
