"""Frame codec: golden vectors, chunking, limits and hostile headers."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.wire.frames import MAX_PAYLOAD, FrameDecoder, FrameError, encode_frame, encode_header
from tests.conftest import load_vectors

VECTORS = load_vectors("frame_codec_vectors.json")


def _payload(v: dict) -> bytes:
    if "payload_hex" in v:
        return bytes.fromhex(v["payload_hex"])
    return bytes.fromhex(v["payload_fill_byte"]) * v["payload_len"]


@pytest.mark.parametrize("v", [v for v in VECTORS if "header_hex" in v], ids=lambda v: v["name"])
def test_vector_header(v: dict) -> None:
    assert encode_header(v["payload_len"]).hex() == v["header_hex"]
    if "framed_hex" in v:
        assert encode_frame(_payload(v)).hex() == v["framed_hex"]


@pytest.mark.parametrize("v", [v for v in VECTORS if "header_hex" in v], ids=lambda v: v["name"])
def test_vector_decodes(v: dict) -> None:
    payload = _payload(v)
    dec = FrameDecoder(max_frame=MAX_PAYLOAD)
    assert dec.feed(bytes.fromhex(v["header_hex"]) + payload) == [payload]
    assert dec.buffered == 0


@pytest.mark.parametrize("v", [v for v in VECTORS if "stream_hex" in v], ids=lambda v: v["name"])
def test_vector_decode_only(v: dict) -> None:
    dec = FrameDecoder()
    assert [p.hex() for p in dec.feed(bytes.fromhex(v["stream_hex"]))] == v["payloads_hex"]


def test_every_vector_kind_is_covered() -> None:
    assert sum("stream_hex" in v for v in VECTORS) >= 2
    assert {len(v["header_hex"]) // 2 for v in VECTORS if "header_hex" in v} == {1, 2, 3, 4}


def test_overflow_is_refused() -> None:
    with pytest.raises(FrameError):
        encode_header(MAX_PAYLOAD + 1)
    with pytest.raises(FrameError):
        encode_header(-1)


def test_oversized_header_refused_before_body() -> None:
    dec = FrameDecoder(max_frame=1000)
    with pytest.raises(FrameError, match="exceeds"):
        dec.feed(encode_header(1001))  # header alone, no body buffered yet


def test_max_frame_bounds() -> None:
    with pytest.raises(ValueError):
        FrameDecoder(max_frame=-1)
    with pytest.raises(ValueError):
        FrameDecoder(max_frame=MAX_PAYLOAD + 1)


def test_truncated_frame_waits() -> None:
    dec = FrameDecoder()
    framed = encode_frame(b"x" * 300)
    assert dec.feed(framed[:1]) == []
    assert dec.feed(framed[1:-1]) == []
    assert dec.buffered == len(framed) - 1
    assert dec.feed(framed[-1:]) == [b"x" * 300]


def test_take_rest_returns_unframed_tail() -> None:
    dec = FrameDecoder(max_frame=16)
    # the tail would be a hostile header if decoded: limit=1 stops after the first frame
    assert dec.feed(encode_frame(b"hello") + b"raw bytes", limit=1) == [b"hello"]
    assert dec.take_rest() == b"raw bytes"
    assert dec.buffered == 0


@given(
    st.lists(st.binary(max_size=20000), max_size=8),
    st.lists(st.integers(min_value=1, max_value=5000), min_size=1, max_size=50),
)
def test_any_chunking_roundtrips(payloads: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(encode_frame(p) for p in payloads)
    dec = FrameDecoder()
    out: list[bytes] = []
    pos = 0
    i = 0
    while pos < len(stream):
        step = cuts[i % len(cuts)]
        out += dec.feed(stream[pos : pos + step])
        pos += step
        i += 1
    assert out == payloads
    assert dec.buffered == 0


@given(st.binary(max_size=4096))
def test_garbage_never_crashes_or_overbuffers(data: bytes) -> None:
    dec = FrameDecoder(max_frame=512)
    try:
        frames = dec.feed(data)
    except FrameError:
        return
    assert all(len(f) <= 512 for f in frames)
    assert dec.buffered <= 4 + 512
