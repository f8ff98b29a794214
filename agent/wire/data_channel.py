"""The channel a session's data runs on after the handshake: AEGIS-256, counter nonces (sans-IO).

Why not the handshake's secretbox: a link's throughput is CPU-bound in the agent, and the AEAD is
a large share of it. Measured here (bench/crypto_bench.py, one core, 256 KiB records):
XSalsa20-Poly1305 ~1.0-1.3 GB/s, AEGIS-256 ~3.9-4.5 GB/s through PyNaCl (AES-NI). AEGIS-256
has a 256-bit key, a 256-bit nonce and a 256-bit tag; AES-GCM would need another dependency
(and brings a 96-bit nonce and a 128-bit tag). Without AES-NI libsodium falls back to a portable AEGIS (slower than
secretbox, still correct): these machines and every x86-64/ARMv8 server since ~2012 have it.

The switch is at the end of the handshake, the same point on both sides (A after reading B's
AuthResult, B after sending it): every frame after it (SELECT/RESUME, link records, the
authenticated end) is sealed here. Keys: one per direction, HMAC-SHA256 of the handshake's
direction key (already bound to the transcript) under a domain of its own, so the handshake's
secretbox key and this one are never the same key. Nonce: the frame's counter, u64 little-endian,
then zeros, counted per direction from 1, as SecureChannel does: a replayed, reordered, dropped or
truncated frame fails like a tampered one, and the first failure kills the channel.
"""

from __future__ import annotations

import hashlib
import hmac

from nacl.bindings import (
    crypto_aead_aegis256_ABYTES,
    crypto_aead_aegis256_decrypt,
    crypto_aead_aegis256_encrypt,
    crypto_aead_aegis256_NPUBBYTES,
)

from agent.wire.secure_channel import CounterChannel, SecureChannel

TAG_BYTES = crypto_aead_aegis256_ABYTES
_NONCE_TAIL = bytes(crypto_aead_aegis256_NPUBBYTES - 8)
_DOMAIN = b"punchthrough-data-aegis256-v1"


def data_key(handshake_key: bytes) -> bytes:
    """The data channel's key for one direction, from the handshake channel's key for it."""
    return hmac.new(handshake_key, _DOMAIN, hashlib.sha256).digest()


class DataChannel(CounterChannel):
    """Seal outgoing payloads, open incoming ones: `ciphertext || tag` per frame (the shell frames)."""

    __slots__ = ()
    TAG = TAG_BYTES
    TAG_WORD = "tag"

    def __init__(self, send_key: bytes, recv_key: bytes) -> None:
        if len(send_key) != 32 or len(recv_key) != 32:
            raise ValueError("data channel keys are 32 bytes")
        if send_key == recv_key:
            raise ValueError("one key per direction: the same key both ways would repeat nonces")
        super().__init__(send_key, recv_key)

    @classmethod
    def after(cls, handshake: SecureChannel) -> DataChannel:
        """The data channel that follows `handshake` (a per-direction channel, as sessions make)."""
        send_key, recv_key = handshake.keys
        if send_key == recv_key:
            raise ValueError("the handshake channel uses one key both ways (RustDesk's mode)")
        return cls(data_key(send_key), data_key(recv_key))

    def _seal_with(self, data: bytes, counter: int) -> bytes:
        return crypto_aead_aegis256_encrypt(data, None, counter.to_bytes(8, "little") + _NONCE_TAIL, self._send_key)

    def _open_with(self, payload: bytes, counter: int) -> bytes:
        return crypto_aead_aegis256_decrypt(payload, None, counter.to_bytes(8, "little") + _NONCE_TAIL, self._recv_key)
