"""One encrypted session over a connected transport socket: handshake, then a byte stream.

The sans-IO part is `StreamCodec`: plaintext chunks become sealed frames, sealed
frames become plaintext or an authenticated end-of-stream (an empty sealed
frame). A transport that ends without that frame was cut or truncated, and the
local side sees a reset rather than a clean close, so a truncation can never be
mistaken for a complete transfer.

The asyncio part drives a handshake machine over the socket; what runs on the channel after it
is a peer link (agent/link/link.py), many streams in one session.
"""

from __future__ import annotations

import asyncio
import socket
import time
from dataclasses import dataclass, field
from typing import Protocol

from agent.wire import messages
from agent.wire.data_channel import TAG_BYTES, DataChannel
from agent.wire.frames import FrameDecoder, FrameError, encode_frame
from agent.wire.secure_channel import ChannelError, SecureChannel

FRAME = 256 * 1024
"""A sealed frame after the handshake, at most: per-frame costs (the AEAD call, the record and
multiplexer headers, a loop turn) are paid once per 256 KiB (bench/link_pair_bench.py: 64 KiB
frames cost ~15% more CPU per byte)."""
CHUNK = FRAME - TAG_BYTES
"""Plaintext per frame (the data channel's tag is the larger of the two channels' MACs)."""
MAX_SESSION_FRAME = FRAME + 64
HANDSHAKE_MAX_FRAME = 8 * 1024
KEEPALIVE = encode_frame(b"")
"""An empty frame (one byte, 0x00): RustDesk's frame-codec heartbeat, skipped by the codec. It carries
nothing, so it needs no seal: an injected or dropped one can neither add nor remove a byte."""
KEEPALIVE_INTERVAL = 10.0
"""Seconds of silence after which a link pings its peer (agent/link/link.py). The relay (like hbbr)
tears a pair down after 30 s without a byte either way, and NAT/firewall TCP state ages too: an idle
ssh session must not die of it. 10 s also lets the kernel notice a dead path on a send
(see netutil.tune_transport)."""


class SessionError(Exception):
    """The session failed; the message is one line fit for the user."""


class StreamCodec:
    """Sans-IO: seal/open the stream over a SecureChannel; `None` from `decode` is the peer's EOF."""

    def __init__(self, channel: SecureChannel | DataChannel, decoder: FrameDecoder | None = None) -> None:
        self.channel = channel
        self.decoder = decoder or FrameDecoder(MAX_SESSION_FRAME)
        self.decoder.max_frame = MAX_SESSION_FRAME
        self.peer_eof = False
        self.sent_eof = False
        self.keepalives = 0
        """Empty frames received (skipped: they carry nothing)."""

    def encode(self, data: bytes | memoryview) -> list[bytes]:
        if self.sent_eof:
            raise SessionError("stream already closed for sending")
        if len(data) <= CHUNK and isinstance(data, bytes):  # a link record: one frame, no slice copy
            return [encode_frame(self.channel.seal(data))] if data else []
        return [encode_frame(self.channel.seal(bytes(data[i : i + CHUNK]))) for i in range(0, len(data), CHUNK)]

    def encode_eof(self) -> bytes:
        self.sent_eof = True
        return encode_frame(self.channel.seal(b""))

    def decode(self, chunk: bytes) -> list[bytes | None]:
        """Plaintext pieces in order; `None` marks the authenticated end of the peer's stream."""
        try:
            payloads = self.decoder.feed(chunk)
        except FrameError as exc:
            raise SessionError(f"peer sent a bad frame: {exc}") from None
        out: list[bytes | None] = []
        for payload in payloads:
            if not payload:
                self.keepalives += 1
                continue
            if self.peer_eof:
                raise SessionError("peer sent data after closing its stream")
            try:
                data = self.channel.open(payload)
            except ChannelError as exc:
                raise SessionError(f"session integrity failure: {exc}") from None
            if data:
                out.append(data)
            else:
                self.peer_eof = True
                out.append(None)
        return out


class HandshakeMachine(Protocol):
    """What agent.wire.handshake's Initiator and Responder offer the shell."""

    @property
    def done(self) -> bool: ...

    @property
    def channel(self) -> SecureChannel | None: ...

    def start(self) -> list[bytes]: ...

    def receive(self, payload: bytes) -> list[bytes]: ...


async def run_handshake(sock: socket.socket, machine: HandshakeMachine, timeout: float) -> StreamCodec:
    """Drive `machine` over `sock` (non-blocking) until it has a channel; bytes that follow stay buffered."""
    loop = asyncio.get_running_loop()
    decoder = FrameDecoder(HANDSHAKE_MAX_FRAME)
    try:
        async with asyncio.timeout(timeout):
            for out in machine.start():
                await loop.sock_sendall(sock, encode_frame(out))
            while not machine.done:
                chunk = await loop.sock_recv(sock, 65536)
                if not chunk:
                    raise SessionError("peer closed the connection during the handshake")
                try:
                    payloads = decoder.feed(chunk, limit=1)
                except FrameError as exc:
                    raise SessionError(f"bad handshake frame: {exc}") from None
                while payloads:
                    try:
                        replies = machine.receive(payloads[0])
                    except Exception:
                        _raise_if_relay_refusal(payloads[0])
                        raise
                    for out in replies:
                        await loop.sock_sendall(sock, encode_frame(out))
                    payloads = [] if machine.done else decoder.feed(b"", limit=1)
    except TimeoutError:
        raise SessionError(f"handshake timed out after {timeout:.0f}s") from None
    except OSError as exc:
        raise SessionError(f"connection failed during the handshake: {exc.strerror or exc}") from None
    channel = machine.channel
    assert channel is not None
    return StreamCodec(DataChannel.after(channel), decoder)


def _raise_if_relay_refusal(payload: bytes) -> None:
    """A relay that refuses us answers RelayResponse{refuse_reason} where the peer's first message belongs."""
    try:
        kind, msg = messages.parse(payload)
    except messages.MessageError:
        return
    if kind == "relay_response" and msg.refuse_reason:
        raise SessionError(f"relay refused: {msg.refuse_reason[:200]}")


@dataclass
class PumpStats:
    bytes_out: int = 0
    """Plaintext bytes sent to the peer."""
    bytes_in: int = 0
    """Plaintext bytes received from the peer."""
    started: float = field(default_factory=time.monotonic)
    error: str = ""
