"""Secretbox channel: golden frames, counters, and every way a frame can be wrong."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.wire.frames import FrameDecoder, encode_frame
from agent.wire.secure_channel import MAC_BYTES, ChannelError, SecureChannel, nonce_for
from tests.conftest import load_vectors

V = load_vectors("handshake_vectors.json")
KEY = hashlib.sha256(b"rustdesk-vector-" + V["session_key_tag"].encode()).digest()
FRAMES = V["secretbox_frames"]


def pair(key: bytes = KEY) -> tuple[SecureChannel, SecureChannel]:
    return SecureChannel(key), SecureChannel(key)


def test_vector_key() -> None:
    assert KEY.hex() == V["session_key_hex"]


def test_vector_frames_seal() -> None:
    ch = SecureChannel(KEY)
    for f in FRAMES:
        assert nonce_for(f["counter"]).hex() == f["nonce_hex"]
        sealed = ch.seal(bytes.fromhex(f["plaintext_hex"]))
        assert sealed.hex() == f["ciphertext_hex"]
        assert encode_frame(sealed).hex() == f["framed_hex"]
        assert ch.send_counter == f["counter"]


def test_vector_frames_open_from_stream() -> None:
    ch = SecureChannel(KEY)
    stream = b"".join(bytes.fromhex(f["framed_hex"]) for f in FRAMES)
    payloads = FrameDecoder().feed(stream)
    assert [ch.open(p).hex() for p in payloads] == [f["plaintext_hex"] for f in FRAMES]
    assert ch.recv_counter == 2


def test_round_trip_and_separate_counters() -> None:
    a, b = pair()
    assert b.open(a.seal(b"one")) == b"one"
    assert b.open(a.seal(b"")) == b""
    assert a.open(b.seal(b"back")) == b"back"
    assert (a.send_counter, a.recv_counter, b.send_counter, b.recv_counter) == (2, 1, 1, 2)


def test_single_key_mode_repeats_nonces_across_directions() -> None:
    """Why sessions use one key per direction: RustDesk's mode gives equal keystreams."""
    a, b = pair()
    x, y = a.seal(b"secret-A"), b.seal(b"public-B")
    leaked = bytes(p ^ q for p, q in zip(x[MAC_BYTES:], y[MAC_BYTES:], strict=True))
    assert leaked == bytes(p ^ q for p, q in zip(b"secret-A", b"public-B", strict=True))


def test_direction_keys() -> None:
    k1, k2 = hashlib.sha256(b"1").digest(), hashlib.sha256(b"2").digest()
    a, b = SecureChannel(k1, k2), SecureChannel(k2, k1)
    assert b.open(a.seal(b"x")) == b"x"
    assert a.open(b.seal(b"y")) == b"y"
    assert SecureChannel(k1, k2).seal(b"same") != SecureChannel(k2, k1).seal(b"same")


def test_large_frame() -> None:
    a, b = pair()
    data = bytes(range(256)) * 256
    assert b.open(a.seal(data)) == data


def expect_dead(ch: SecureChannel, payload: bytes, match: str) -> None:
    with pytest.raises(ChannelError, match=match):
        ch.open(payload)
    assert ch.dead is not None
    assert ch.recv_counter == 0
    with pytest.raises(ChannelError, match="closed"):
        ch.open(payload)
    with pytest.raises(ChannelError, match="closed"):
        ch.seal(b"anything")


@pytest.mark.parametrize("n", [0, 1, 15])
def test_short_frames_are_never_passed_through(n: int) -> None:
    """RustDesk delivers frames of <= 1 byte undecrypted; we authenticate every frame."""
    expect_dead(SecureChannel(KEY), b"\x00" * n, "shorter than the 16-byte MAC")


def test_tampered() -> None:
    a, b = pair()
    sealed = bytearray(a.seal(b"hello world"))
    sealed[-1] ^= 1
    expect_dead(b, bytes(sealed), "failed authentication")


def test_truncated() -> None:
    a, b = pair()
    expect_dead(b, a.seal(b"hello world")[:-1], "failed authentication")


def test_replayed() -> None:
    a, b = pair()
    first = a.seal(b"pay 10")
    assert b.open(first) == b"pay 10"
    with pytest.raises(ChannelError, match="frame 2"):
        b.open(first)
    assert b.recv_counter == 1


def test_reordered() -> None:
    a, b = pair()
    one, two = a.seal(b"1"), a.seal(b"2")
    expect_dead(b, two, "frame 1")
    del one


def test_dropped_frame_breaks_the_stream() -> None:
    a, b = pair()
    a.seal(b"lost")
    expect_dead(b, a.seal(b"next"), "failed authentication")


def test_wrong_key() -> None:
    a = SecureChannel(KEY)
    expect_dead(SecureChannel(bytes(32)), a.seal(b"x"), "failed authentication")


def test_own_frames_do_not_open_with_direction_keys() -> None:
    k1, k2 = hashlib.sha256(b"1").digest(), hashlib.sha256(b"2").digest()
    a = SecureChannel(k1, k2)
    expect_dead(a, a.seal(b"reflected"), "failed authentication")


def test_bad_construction() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        SecureChannel(b"short")
    with pytest.raises(ValueError, match="32 bytes"):
        SecureChannel(KEY, b"short")
    with pytest.raises(ValueError, match="u64"):
        SecureChannel(KEY, send_counter=-1)


def test_counter_exhaustion() -> None:
    top = (1 << 64) - 1
    a = SecureChannel(KEY, send_counter=top - 1)
    b = SecureChannel(KEY, recv_counter=top - 1)
    assert b.open(a.seal(b"last")) == b"last"
    with pytest.raises(ChannelError, match="exhausted"):
        a.seal(b"one too many")
    with pytest.raises(ChannelError, match="exhausted"):
        b.open(b"\x00" * 32)


@settings(max_examples=200)
@given(st.binary(max_size=200))
def test_garbage_never_opens(junk: bytes) -> None:
    ch = SecureChannel(KEY)
    with pytest.raises(ChannelError):
        ch.open(junk)
    assert ch.recv_counter == 0


@settings(max_examples=200)
@given(st.binary(max_size=100), st.data())
def test_any_single_change_is_caught(data: bytes, draw: st.DataObject) -> None:
    a, b = pair()
    sealed = a.seal(data)
    kind = draw.draw(st.sampled_from(["flip", "cut", "extend"]))
    if kind == "flip":
        i = draw.draw(st.integers(0, len(sealed) - 1))
        bit = draw.draw(st.integers(0, 7))
        bad = sealed[:i] + bytes([sealed[i] ^ (1 << bit)]) + sealed[i + 1 :]
    elif kind == "cut":
        bad = sealed[: draw.draw(st.integers(0, len(sealed) - 1))]
    else:
        bad = sealed + draw.draw(st.binary(min_size=1, max_size=8))
    with pytest.raises(ChannelError):
        b.open(bad)
    assert b.recv_counter == 0
