"""RustDesk's TCP frame codec (hbb_common BytesCodec), sans-IO.

A frame is a 1-4 byte little-endian header followed by the payload. The low two
bits of the first header byte give the header length minus one; the rest of the
header value is the payload length. The decoder is incremental so that a socket
shell can feed it whatever chunks the kernel hands over, and it refuses an
oversized frame as soon as the header is known, before buffering any of it.
"""

from __future__ import annotations

MAX_PAYLOAD = 0x3FFFFFFF
"""Largest payload the 4-byte header can describe (about 1 GiB)."""

DEFAULT_MAX_FRAME = 1 << 20
"""Default cap for a decoder: rendezvous messages are tiny, session frames <= 64 KiB."""


class FrameError(ValueError):
    """A stream broke the frame codec's rules; the connection must be dropped."""


def encode_header(length: int) -> bytes:
    """Smallest header for a payload of `length` bytes."""
    if length < 0 or length > MAX_PAYLOAD:
        raise FrameError(f"payload of {length} bytes cannot be framed (max {MAX_PAYLOAD})")
    if length <= 0x3F:
        return bytes((length << 2,))
    if length <= 0x3FFF:
        return ((length << 2) | 1).to_bytes(2, "little")
    if length <= 0x3FFFFF:
        return ((length << 2) | 2).to_bytes(3, "little")
    return ((length << 2) | 3).to_bytes(4, "little")


def encode_frame(payload: bytes) -> bytes:
    """Header + payload as one bytes object."""
    return encode_header(len(payload)) + payload


class FrameDecoder:
    """Incremental decoder: `feed(chunk)` returns every complete payload so far.

    `max_frame` bounds the declared payload length; a larger declaration raises
    FrameError at once, so a hostile header never makes us buffer its body.
    Non-minimal headers are accepted, as upstream does.
    """

    __slots__ = ("_buf", "max_frame")

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        if not 0 <= max_frame <= MAX_PAYLOAD:
            raise ValueError(f"max_frame must be within 0..{MAX_PAYLOAD}")
        self.max_frame = max_frame
        self._buf = bytearray()

    @property
    def buffered(self) -> int:
        """Bytes held that do not yet form a complete frame."""
        return len(self._buf)

    def take_rest(self) -> bytes:
        """Remove and return whatever is buffered (used when a stream switches to raw mode)."""
        rest = bytes(self._buf)
        self._buf.clear()
        return rest

    def feed(self, chunk: bytes, limit: int | None = None) -> list[bytes]:
        """Buffer `chunk`; return complete payloads, at most `limit` of them.

        With a limit, bytes after the last returned frame stay buffered undecoded,
        so a relay can stop at the first frame and hand the rest on raw.
        """
        buf = self._buf
        buf += chunk
        out: list[bytes] = []
        pos = 0
        n = len(buf)
        with memoryview(buf) as view:  # one copy per payload; released before the buffer shrinks
            while pos < n and (limit is None or len(out) < limit):
                head_len = (buf[pos] & 3) + 1
                if n - pos < head_len:
                    break
                length = int.from_bytes(view[pos : pos + head_len], "little") >> 2
                if length > self.max_frame:
                    raise FrameError(f"frame of {length} bytes exceeds the limit of {self.max_frame}")
                end = pos + head_len + length
                if end > n:
                    break
                out.append(bytes(view[pos + head_len : end]))
                pos = end
        if pos:
            del buf[:pos]
        return out
