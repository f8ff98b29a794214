"""The session's secretbox channel (RustDesk hbb_common `tcp.rs` Encrypt), sans-IO.

XSalsa20-Poly1305 with a 24-byte nonce whose first 8 bytes are a little-endian
u64 counter. Each direction counts its own frames and increments *before* use,
so the first frame each way uses 1. A payload on the wire is MAC (16) || data.

Because the nonce is implicit, a replayed, reordered, dropped or truncated frame
fails authentication just like a tampered one. Unlike upstream, frames of <= 1
byte are not passed through: every frame is authenticated. The first failure
kills the channel (its receive counter no longer matches the peer's, and a
stream that carried a forgery is not worth trusting), so nothing unauthenticated
is ever delivered.

RustDesk uses one key for both directions, so A's frame n and B's frame n share
key *and* nonce: their keystreams and Poly1305 one-time keys repeat, which leaks
the XOR of the plaintexts to anyone on the path (a relay) and lets them forge.
`SecureChannel(key)` keeps that single-key mode (it is what the golden vectors
and RustDesk speak); sessions made by `agent.wire.handshake` pass a separate key per
direction instead, with the same framing and nonces.
"""

from __future__ import annotations

from nacl.bindings import crypto_secretbox_easy, crypto_secretbox_open_easy
from nacl.exceptions import CryptoError

KEY_BYTES = 32
MAC_BYTES = 16
NONCE_BYTES = 24
_MAX_COUNTER = (1 << 64) - 1
_NONCE_TAIL = bytes(NONCE_BYTES - 8)


class ChannelError(ValueError):
    """A frame failed authentication (or the channel is already dead); drop the connection."""


def nonce_for(counter: int) -> bytes:
    """RustDesk's counter nonce: LE u64 in bytes 0..8, zeros after."""
    return counter.to_bytes(8, "little") + _NONCE_TAIL


class CounterChannel:
    """What both session channels share: a counter per direction, incremented before use (the
    first frame each way is 1) and the nonce the AEAD is given; the first failure kills the channel.
    Subclasses say how a frame is sealed and opened under a counter."""

    __slots__ = ("_dead", "_recv", "_recv_key", "_send", "_send_key")
    TAG = MAC_BYTES
    """Bytes every sealed frame has at least (its MAC or tag)."""
    TAG_WORD = "MAC"

    def __init__(self, send_key: bytes, recv_key: bytes, send_counter: int = 0, recv_counter: int = 0) -> None:
        if not 0 <= send_counter <= _MAX_COUNTER or not 0 <= recv_counter <= _MAX_COUNTER:
            raise ValueError("counters are u64")
        self._send_key = bytes(send_key)
        self._recv_key = bytes(recv_key)
        self._send = send_counter
        self._recv = recv_counter
        self._dead: str | None = None

    def _seal_with(self, data: bytes, counter: int) -> bytes:
        raise NotImplementedError

    def _open_with(self, payload: bytes, counter: int) -> bytes:
        """The plaintext, or CryptoError."""
        raise NotImplementedError

    @property
    def keys(self) -> tuple[bytes, bytes]:
        """(send key, receive key): what the data channel after a handshake is derived from."""
        return self._send_key, self._recv_key

    @property
    def send_counter(self) -> int:
        """Counter of the last frame sealed (0 before the first)."""
        return self._send

    @property
    def recv_counter(self) -> int:
        """Counter of the last frame opened (0 before the first)."""
        return self._recv

    @property
    def dead(self) -> str | None:
        """Why the channel refuses further use, or None while it is healthy."""
        return self._dead

    def seal(self, data: bytes) -> bytes:
        """Encrypt one payload with the next send counter."""
        if self._dead is not None:
            raise ChannelError(f"channel is closed: {self._dead}")
        if self._send >= _MAX_COUNTER:
            self._dead = "send counter exhausted"
            raise ChannelError("send counter exhausted; the session must be rekeyed")
        self._send += 1
        return self._seal_with(data, self._send)

    def open(self, payload: bytes) -> bytes:
        """Authenticate and decrypt the next payload from the peer, or raise ChannelError."""
        if self._dead is not None:
            raise ChannelError(f"channel is closed: {self._dead}")
        n = len(payload)
        if n < self.TAG:
            self._dead = f"frame of {n} bytes is shorter than the {self.TAG}-byte {self.TAG_WORD}"
            raise ChannelError(self._dead)
        if self._recv >= _MAX_COUNTER:
            self._dead = "receive counter exhausted"
            raise ChannelError(self._dead)
        counter = self._recv + 1
        try:
            data = self._open_with(payload, counter)
        except CryptoError:
            self._dead = (
                f"frame {counter} ({n} bytes) failed authentication (tampered, replayed, reordered or truncated)"
            )
            raise ChannelError(self._dead) from None
        self._recv = counter
        return data


class SecureChannel(CounterChannel):
    """Seal outgoing payloads and open incoming ones (MAC || ciphertext); the shell does the framing.

    `encode_frame(channel.seal(data))` on the way out, `channel.open(payload)` for
    each payload from `FrameDecoder.feed`.
    """

    __slots__ = ()

    def __init__(
        self, send_key: bytes, recv_key: bytes | None = None, *, send_counter: int = 0, recv_counter: int = 0
    ) -> None:
        """`recv_key=None` means RustDesk's single shared key (see the module docstring)."""
        for key in (send_key, recv_key):
            if key is not None and len(key) != KEY_BYTES:
                raise ValueError(f"secretbox key must be {KEY_BYTES} bytes, got {len(key)}")
        super().__init__(send_key, send_key if recv_key is None else recv_key, send_counter, recv_counter)

    def _seal_with(self, data: bytes, counter: int) -> bytes:
        return crypto_secretbox_easy(data, nonce_for(counter), self._send_key)

    def _open_with(self, payload: bytes, counter: int) -> bytes:
        return crypto_secretbox_open_easy(payload, nonce_for(counter), self._recv_key)


