"""StreamCodec decoding arbitrary bytes on a channel that a real handshake set up.

The channel keys and counters are those of a real run of both handshake machines (fixed
keys, so every run is the same). Input: [cfg][records: op, len u16, bytes]. The records
build what B receives from the wire: A's honest frames (op 0) and EOF (5) interleaved with
raw junk (1), well-framed junk (2), replays of A's earlier frames (3), frames sealed in
B's own direction (4), truncation (6) and bit flips (7). cfg picks the read size, whether
the input is all raw junk instead, and whether the first bytes reach the codec through the
handshake shell's decoder (fed with a limit, so they sit buffered and unchecked).

Invariants: decode raises only SessionError; everything delivered is a prefix of what A
honestly sent; an end of stream is delivered only after all of it; raw junk delivers nothing;
the decoder never buffers more than one maximal frame plus one read.
"""

from __future__ import annotations

from fuzz._common import Reader, entry, instrumented, record

with instrumented():
    from nacl.public import PrivateKey
    from nacl.signing import SigningKey

    from agent.session.stream import HANDSHAKE_MAX_FRAME, MAX_SESSION_FRAME, SessionError, StreamCodec
    from agent.wire.frames import FrameDecoder, encode_frame
    from agent.wire.handshake import Initiator, Policy, Responder, exchange
    from agent.wire.secure_channel import SecureChannel

A_ID, B_ID, TARGET = "987654321", "123456789", "127.0.0.1:22"
A_SIGN, B_SIGN = SigningKey(bytes(range(32))), SigningKey(bytes(range(1, 33)))
SESSION_KEY = bytes(range(2, 34))
READS = (1, 2, 3, 7, 17, 64, 1000, 1 << 30)


def _handshake() -> tuple[bytes, bytes, int]:
    """Run both machines; return the A->B key, the B->A key and the counter both sides stand at."""
    a = Initiator(
        A_ID,
        A_SIGN,
        B_ID,
        bytes(B_SIGN.verify_key),
        target=TARGET,
        ephemeral_key=PrivateKey(bytes(range(3, 35))),
        session_key=SESSION_KEY,
    )
    b = Responder(
        B_ID,
        B_SIGN,
        Policy(pinned_keys={A_ID: bytes(A_SIGN.verify_key)}, allowed_targets=frozenset({TARGET})),
        ephemeral_key=PrivateKey(bytes(range(4, 36))),
    )
    run = exchange(a, b)
    assert a.done and b.done and run.refused is None
    a_to_b, b_to_a = run.keys(SESSION_KEY)
    n = a.channel.send_counter
    assert n == a.channel.recv_counter == b.channel.send_counter == b.channel.recv_counter
    probe = SecureChannel(a_to_b, b_to_a, send_counter=n, recv_counter=n)
    assert b.channel.open(probe.seal(b"probe")) == b"probe" and probe.open(b.channel.seal(b"back")) == b"back"
    return a_to_b, b_to_a, n


A_TO_B, B_TO_A, COUNTER = _handshake()


def codecs() -> tuple[StreamCodec, StreamCodec, StreamCodec]:
    """(A's codec, B's codec, B's sending codec for reflected frames)."""

    def channel(send: bytes, recv: bytes) -> SecureChannel:
        return SecureChannel(send, recv, send_counter=COUNTER, recv_counter=COUNTER)

    return (
        StreamCodec(channel(A_TO_B, B_TO_A)),
        StreamCodec(channel(B_TO_A, A_TO_B)),
        StreamCodec(channel(B_TO_A, A_TO_B)),
    )


def TestOneInput(data: bytes) -> None:
    r = Reader(data)
    cfg = r.byte()
    read = READS[cfg & 7]
    raw = bool(cfg & 8)
    a, b, b_out = codecs()
    sent = bytearray()
    honest: list[bytes] = []
    wire = bytearray()
    if raw:
        wire += r.rest()
    while r:
        op = r.byte() & 7
        arg = r.take(r.u16())
        if op == 0 and not a.sent_eof:
            frames = a.encode(arg)
            honest += frames
            sent += arg
            wire += b"".join(frames)
        elif op == 1:
            wire += arg
        elif op == 2:
            wire += encode_frame(arg)
        elif op == 3 and honest and arg:
            wire += honest[arg[0] % len(honest)]
        elif op == 4:
            wire += b"".join(b_out.encode(arg))
        elif op == 5 and not a.sent_eof:
            frame = a.encode_eof()
            honest.append(frame)
            wire += frame
        elif op == 6:
            del wire[max(0, len(wire) - (arg[0] if arg else 1)) :]
        elif op == 7 and wire:
            at = int.from_bytes(arg[:2], "little") % len(wire)
            wire[at] ^= arg[2] if len(arg) > 2 and arg[2] else 1

    pos = 0
    if cfg & 16:  # the handshake shell read the first bytes with a limit: they arrive already buffered
        dec = FrameDecoder(HANDSHAKE_MAX_FRAME)
        pos = min(len(wire), (cfg >> 5) * 7)
        assert dec.feed(bytes(wire[:pos]), limit=0) == []
        b = StreamCodec(b.channel, dec)
    got = bytearray()
    ended = False
    try:
        for piece in b.decode(b""):
            got, ended = deliver(got, ended, piece)
        while pos < len(wire):
            chunk = bytes(wire[pos : pos + read])
            pos += len(chunk)
            for piece in b.decode(chunk):
                got, ended = deliver(got, ended, piece)
            assert b.decoder.buffered <= MAX_SESSION_FRAME + 4 + len(chunk)
    except SessionError as exc:
        assert str(exc)
    if raw:
        assert not got and not ended, "raw junk was delivered as session data"
    assert sent.startswith(got), "the codec delivered bytes A never sent"
    if ended:
        assert got == sent, "end of stream delivered before all of A's data"


def deliver(got: bytearray, ended: bool, piece: bytes | None) -> tuple[bytearray, bool]:
    assert not ended, "data delivered after the end of stream"
    if piece is None:
        return got, True
    assert piece, "an empty piece of data"
    got += piece
    return got, ended


def seeds() -> list[bytes]:
    def rec(op: int, arg: bytes = b"") -> bytes:
        return record(bytes((op,)), arg)

    hello = rec(0, b"hello") + rec(0, bytes(300)) + rec(5)
    return [
        bytes((0,)) + hello,
        bytes((3,)) + hello,
        bytes((0x36,)) + hello,
        bytes((4,)) + rec(0, b"a") + rec(3, b"\0") + rec(0, b"b") + rec(5),
        bytes((2,)) + rec(0, b"a") + rec(4, b"reflected") + rec(5),
        bytes((5,)) + rec(0, b"a") + rec(2, bytes(20)) + rec(5),
        bytes((1,)) + rec(0, b"abc") + rec(5) + rec(0, b"more") + rec(6, b"\x05"),
        bytes((6,)) + rec(0, b"abc" * 20) + rec(7, b"\x05\x00\x80") + rec(5),
        bytes((7,)) + rec(0, b"x") + rec(5) + rec(1, b"\x04trailing"),
        bytes((8,)) + bytes.fromhex("0c") + bytes(40),
    ]


main = entry("session", TestOneInput, seeds)

if __name__ == "__main__":
    main()
