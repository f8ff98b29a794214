"""The first message each way on a link stream, sans-IO: which target the opener wants, and whether
the far end connected it.

A stream's first DATA frame from its opener is the open request, whole: `u16 length, target`
(UTF-8, HOST:PORT, or empty for the echo `punchthrough-ops ping` uses). The other end answers with
the stream's first DATA frame the other way: `u8 status, u16 length, reason`. Status 0 is open (the
bytes that follow are the stream's), anything else refused with a one-line reason. Both fit one
frame, so a reader never waits for the rest of one; anything else is a protocol error that resets
the stream (not the link: the peer is authenticated, its stream state is what broke).
"""

from __future__ import annotations

import struct

MAX_TARGET = 1024
"""Bytes of a target (handshake.MAX_TARGET_LEN's order; a HOST:PORT is far shorter)."""
MAX_REASON = 300
OPEN = 0
REFUSED = 1
_LEN = struct.Struct("!H")
_STATUS = struct.Struct("!BH")


class OpenError(ValueError):
    """The first message of a stream does not parse; str() says why (one line)."""


def encode_request(target: str) -> bytes:
    raw = target.encode()
    if len(raw) > MAX_TARGET:
        raise OpenError(f"target of {len(raw)} bytes (at most {MAX_TARGET})")
    return _LEN.pack(len(raw)) + raw


def parse_request(frame: bytes) -> str:
    if len(frame) < _LEN.size:
        raise OpenError(f"open request of {len(frame)} bytes")
    (n,) = _LEN.unpack_from(frame)
    if n > MAX_TARGET or len(frame) != _LEN.size + n:
        raise OpenError(f"open request of {len(frame)} bytes says its target has {n}")
    try:
        return frame[_LEN.size :].decode()
    except UnicodeDecodeError:
        raise OpenError("open request's target is not UTF-8") from None


def encode_status(reason: str | None) -> bytes:
    """None: open. A reason: refused (cut to MAX_REASON bytes on a character boundary)."""
    if reason is None:
        return _STATUS.pack(OPEN, 0)
    raw = reason.encode()[:MAX_REASON].decode("utf-8", "ignore").encode()
    return _STATUS.pack(REFUSED, len(raw)) + raw


def parse_status(frame: bytes) -> str | None:
    """None if the far end opened the stream, else its reason."""
    if len(frame) < _STATUS.size:
        raise OpenError(f"stream status of {len(frame)} bytes")
    code, n = _STATUS.unpack_from(frame)
    if n > MAX_REASON or len(frame) != _STATUS.size + n:
        raise OpenError(f"stream status of {len(frame)} bytes says its reason has {n}")
    reason = frame[_STATUS.size :].decode("utf-8", "replace")
    if code == OPEN:
        if n:
            raise OpenError("an open status with a reason")
        return None
    return reason or "refused"
