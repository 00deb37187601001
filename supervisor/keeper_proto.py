"""The keeper's wire protocol: typed frames over its unix socket.

A frame is one type byte, a 4-byte big-endian length and the payload. Typed
frames (not exit codes or ad-hoc text) so both sides can evolve and a partial
read is never mistaken for a message.

client → keeper: HELLO (subscribe; answered by BACKLOG then OUTPUT frames),
INPUT (bytes for the PTY), RESIZE (JSON {"cols", "rows"}), STATUS (answered by
STATE), SIGNAL (JSON {"signal": n}, sent to the sandbox's init).
keeper → client: BACKLOG (the scrollback ring at subscribe time), OUTPUT,
STATE (JSON), EXIT (JSON {"status": n, "signal": n or null}; the session is
over; "signal" is set when a signal ended it, and then status is 128+signal).
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
    """Incremental frame parser: feed() bytes, iterate complete frames.

    Frames are cut out by offset and the consumed prefix removed once per
    feed, so a read holding many frames costs one copy per payload, not one
    buffer shift per frame."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        if not self._buf and len(data) >= HEADER.size:
            buf: bytes | bytearray = data   # the common case: no partial frame waiting
        else:
            self._buf += data
            buf = self._buf
        out: list[tuple[bytes, bytes]] = []
        pos, end = 0, len(buf)
        while end - pos >= HEADER.size:
            kind, size = HEADER.unpack_from(buf, pos)
            if size > MAX_FRAME:
                raise ValueError(f"keeper frame of {size} bytes exceeds {MAX_FRAME}")
            start = pos + HEADER.size
            if end - start < size:
                break
            out.append((kind, bytes(buf[start : start + size])))
            pos = start + size
        if buf is self._buf:
            del self._buf[:pos]
        else:
            self._buf += buf[pos:]
        return out
