"""The data channel after the handshake (AEGIS-256): keys, counters, and every way a frame can be wrong."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.bindings import crypto_aead_aegis256_encrypt

from agent.wire.data_channel import TAG_BYTES, DataChannel, data_key
from agent.wire.secure_channel import ChannelError, SecureChannel

A_TO_B = hashlib.sha256(b"a->b").digest()
B_TO_A = hashlib.sha256(b"b->a").digest()


def pair() -> tuple[DataChannel, DataChannel]:
    """A's and B's data channels, as run_handshake derives them from the handshake's channels."""
    return DataChannel.after(SecureChannel(A_TO_B, B_TO_A)), DataChannel.after(SecureChannel(B_TO_A, A_TO_B))


def test_round_trip_both_ways_with_separate_counters() -> None:
    a, b = pair()
    assert b.open(a.seal(b"one")) == b"one"
    assert b.open(a.seal(b"")) == b""
    assert a.open(b.seal(b"back")) == b"back"
    assert (a.send_counter, a.recv_counter, b.send_counter, b.recv_counter) == (2, 1, 1, 2)


def test_the_frame_is_aegis256_under_the_derived_key_and_the_counter_nonce() -> None:
    """Pinned construction: key = HMAC-SHA256(handshake key, domain), nonce = u64 LE counter + zeros."""
    a, _ = pair()
    key = hmac.new(A_TO_B, b"punchthrough-data-aegis256-v1", hashlib.sha256).digest()
    assert data_key(A_TO_B) == key
    a.seal(b"first")
    nonce = (2).to_bytes(8, "little") + bytes(24)
    assert a.seal(b"second") == crypto_aead_aegis256_encrypt(b"second", None, nonce, key)
    assert len(a.seal(b"x")) == 1 + TAG_BYTES


def test_data_keys_are_not_the_handshake_keys_and_differ_per_direction() -> None:
    a, b = pair()
    sealed = a.seal(b"same")
    assert sealed != b.seal(b"same")  # one key per direction: equal counters, different frames
    with pytest.raises(ChannelError):  # the handshake's own key does not open a data frame
        SecureChannel(B_TO_A, A_TO_B).open(sealed)


def test_the_same_key_both_ways_is_refused() -> None:
    with pytest.raises(ValueError, match="one key per direction"):
        DataChannel(A_TO_B, A_TO_B)
    with pytest.raises(ValueError, match="RustDesk's mode"):
        DataChannel.after(SecureChannel(A_TO_B))
    with pytest.raises(ValueError, match="32 bytes"):
        DataChannel(b"short", B_TO_A)


def expect_dead(ch: DataChannel, payload: bytes, why: str) -> None:
    with pytest.raises(ChannelError, match=why):
        ch.open(payload)
    assert ch.dead is not None
    with pytest.raises(ChannelError, match="closed"):  # the first failure kills the channel
        ch.open(payload)


def test_replayed_frame_kills_the_channel() -> None:
    a, b = pair()
    frame = a.seal(b"pay 10")
    b.open(frame)
    expect_dead(b, frame, "frame 2 .* failed authentication")


def test_reordered_frames_kill_the_channel() -> None:
    a, b = pair()
    first, second = a.seal(b"1"), a.seal(b"2")
    expect_dead(b, second, "failed authentication")
    del first


def test_dropped_frame_kills_the_channel() -> None:
    a, b = pair()
    a.seal(b"lost")
    expect_dead(b, a.seal(b"next"), "failed authentication")


@pytest.mark.parametrize("cut", [0, 1, TAG_BYTES - 1])
def test_truncated_frame_kills_the_channel(cut: int) -> None:
    a, b = pair()
    expect_dead(b, a.seal(b"x" * 40)[:cut], f"shorter than the {TAG_BYTES}-byte tag")


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=300), st.integers(min_value=0), st.integers(min_value=0, max_value=7))
def test_any_flipped_bit_kills_the_channel(data: bytes, where: int, bit: int) -> None:
    a, b = pair()
    frame = bytearray(a.seal(data))
    frame[where % len(frame)] ^= 1 << bit
    expect_dead(b, bytes(frame), "failed authentication")


def test_a_frame_sealed_for_the_other_direction_is_refused() -> None:
    """A relay reflecting A's frames back to A gains nothing."""
    a, _ = pair()
    expect_dead(a, a.seal(b"echo"), "failed authentication")
