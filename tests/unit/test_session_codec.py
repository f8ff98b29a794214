"""StreamCodec: sealed frames, authenticated EOF, and every way a peer can cheat."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.session.stream import CHUNK, FRAME, MAX_SESSION_FRAME, SessionError, StreamCodec
from agent.wire.frames import encode_frame
from agent.wire.secure_channel import SecureChannel


def pair() -> tuple[StreamCodec, StreamCodec]:
    key = os.urandom(32)
    return StreamCodec(SecureChannel(key)), StreamCodec(SecureChannel(key))


def test_roundtrip_and_eof() -> None:
    a, b = pair()
    wire = b"".join(a.encode(b"hello")) + b"".join(a.encode(b"x" * (CHUNK * 2 + 5))) + a.encode_eof()
    got = b.decode(wire)
    assert got[-1] is None and b.peer_eof
    assert b"".join(p for p in got if p is not None) == b"hello" + b"x" * (CHUNK * 2 + 5)


def test_large_write_is_split_into_bounded_frames() -> None:
    a, _ = pair()
    frames = a.encode(b"y" * (CHUNK * 3))
    assert len(frames) == 3
    assert all(len(f) <= FRAME + 4 for f in frames)


@given(st.binary(min_size=1, max_size=3000), st.integers(min_value=1, max_value=97))
def test_any_chunking(data: bytes, step: int) -> None:
    a, b = pair()
    wire = b"".join(a.encode(data)) + a.encode_eof()
    out: list[bytes | None] = []
    for i in range(0, len(wire), step):
        out += b.decode(wire[i : i + step])
    assert out[-1] is None
    assert b"".join(p for p in out if p is not None) == data


def test_tampered_frame_refused() -> None:
    a, b = pair()
    frame = bytearray(a.encode(b"secret")[0])
    frame[-1] ^= 1
    with pytest.raises(SessionError, match="integrity"):
        b.decode(bytes(frame))


def test_replayed_and_reordered_frames_refused() -> None:
    a, b = pair()
    f1, f2 = a.encode(b"one")[0], a.encode(b"two")[0]
    assert b.decode(f1) == [b"one"]
    with pytest.raises(SessionError):
        b.decode(f1)  # replay
    a2, b2 = pair()
    g1, g2 = a2.encode(b"one")[0], a2.encode(b"two")[0]
    with pytest.raises(SessionError):
        b2.decode(g2 + g1)  # reorder
    del f2


def test_data_after_eof_refused() -> None:
    a, b = pair()
    eof = a.encode_eof()
    a.sent_eof = False  # a cheating peer keeps writing after its EOF
    with pytest.raises(SessionError, match="after closing"):
        b.decode(eof + a.encode(b"more")[0])


def test_send_after_eof_is_a_local_error() -> None:
    a, _ = pair()
    a.encode_eof()
    with pytest.raises(SessionError):
        a.encode(b"late")


def test_oversized_frame_header_refused() -> None:
    _, b = pair()
    with pytest.raises(SessionError, match="bad frame"):
        b.decode(encode_frame(b"\x00" * (MAX_SESSION_FRAME + 1)))


def test_plaintext_injection_refused() -> None:
    _, b = pair()
    with pytest.raises(SessionError):
        b.decode(encode_frame(b"GET / HTTP/1.1\r\n\r\n"))


def test_keepalives_are_skipped_anywhere_and_deliver_nothing() -> None:
    from agent.session.stream import KEEPALIVE

    a, b = pair()
    assert KEEPALIVE == b"\x00"
    stream = KEEPALIVE + b"".join(a.encode(b"one")) + KEEPALIVE * 3 + b"".join(a.encode(b"two")) + a.encode_eof()
    assert b.decode(stream + KEEPALIVE) == [b"one", b"two", None]  # even after the EOF: it is not data
    assert b.keepalives == 5
    # a keepalive consumes no nonce: what follows it still opens (and a dropped one changes nothing)
    c, d = pair()
    frames = [*c.encode(b"x"), *c.encode(b"y")]
    assert d.decode(frames[0] + KEEPALIVE + frames[1]) == [b"x", b"y"]
