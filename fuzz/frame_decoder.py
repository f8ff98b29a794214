"""FrameDecoder fed arbitrary bytes in arbitrary chunks, checked against a one-shot reference parse.

Input: [cfg][take_rest_after][n][n chunk sizes][stream...]. cfg picks max_frame and whether
feeds are limited (then drained with feed(b"", limit), as the handshake shell does).
Invariants: only FrameError escapes, and exactly when the reference meets a header over the
limit; every payload delivered is the reference's next payload; what stays buffered is the
undecoded tail; take_rest() returns exactly that tail.
"""

from __future__ import annotations

from fuzz._common import Reader, entry, instrumented, load_vectors

with instrumented():
    from agent.wire.frames import DEFAULT_MAX_FRAME, FrameDecoder, FrameError, encode_frame, encode_header

MAX_FRAMES = (DEFAULT_MAX_FRAME, 0, 1, 63, 64, 0x3FFF, 0x4000, 300)
LIMITS = (None, 1, 2, None)


def reference(stream: bytes, max_frame: int) -> tuple[list[tuple[int, bytes]], int | None]:
    """(end offset, payload) of every complete frame, and where an oversized header ends (None: none)."""
    frames: list[tuple[int, bytes]] = []
    pos, n = 0, len(stream)
    while pos < n:
        head = (stream[pos] & 3) + 1
        if n - pos < head:
            break
        length = int.from_bytes(stream[pos : pos + head], "little") >> 2
        if length > max_frame:
            return frames, pos + head
        end = pos + head + length
        if end > n:
            break
        frames.append((end, stream[pos + head : end]))
        pos = end
    return frames, None


def TestOneInput(data: bytes) -> None:
    r = Reader(data)
    cfg = r.byte()
    take_rest_after = r.byte()
    chunks = [max(1, r.byte()) for _ in range(r.byte() & 15)]
    stream = r.rest()
    max_frame = MAX_FRAMES[cfg & 7]
    limit = LIMITS[(cfg >> 3) & 3]

    frames, bad_at = reference(stream, max_frame)
    dec = FrameDecoder(max_frame)
    got: list[bytes] = []
    fed = 0
    feeds = 0
    while fed < len(stream):
        step = chunks[feeds] if feeds < len(chunks) else len(stream) - fed
        chunk = stream[fed : fed + step]
        fed += len(chunk)
        feeds += 1
        try:
            out = dec.feed(chunk, limit)
            assert limit is None or len(out) <= limit
            while limit is not None and out:
                got += out
                out = dec.feed(b"", limit)
                assert len(out) <= limit
            got += out
        except FrameError:
            assert bad_at is not None and bad_at <= fed, f"FrameError without an oversized header by byte {fed}"
            assert got == [p for _, p in frames[: len(got)]], "frames before the error differ from the reference"
            return
        assert bad_at is None or bad_at > fed, f"oversized header ending at {bad_at} not refused by byte {fed}"
        done = [(end, p) for end, p in frames if end <= fed]
        assert got == [p for _, p in done], "delivered frames differ from the reference"
        last_end = done[-1][0] if done else 0
        assert dec.buffered == fed - last_end
        if take_rest_after and feeds == take_rest_after:
            assert dec.take_rest() == stream[last_end:fed]
            assert dec.buffered == 0
            return
    for p in got[:4]:
        assert FrameDecoder(len(p)).feed(encode_frame(p)) == [p]
        assert len(encode_header(len(p))) == 1 + (len(p) > 0x3F) + (len(p) > 0x3FFF) + (len(p) > 0x3FFFFF)


def seeds() -> list[bytes]:
    out = []
    framed = []
    for v in load_vectors("frame_codec_vectors.json"):
        if "framed_hex" in v or "stream_hex" in v:
            framed.append(bytes.fromhex(v.get("framed_hex") or v["stream_hex"]))
        else:  # a big frame: its header and the start of the body
            framed.append(bytes.fromhex(v["header_hex"]) + bytes.fromhex(v["payload_fill_byte"]) * 70)
    for i, f in enumerate(framed):
        out.append(bytes((i & 0x1F, 0, 0)) + f)
        out.append(bytes((8, 2, 3, 1, 2, 3)) + f + f)
    out.append(bytes((0, 0, 0)) + b"".join(framed))
    return out


main = entry("frame_decoder", TestOneInput, seeds)

if __name__ == "__main__":
    main()
