"""The relay's first-frame handling: FirstFrameReader, check_request, routing and the handoff codec.

Input: [cfg][stream...]. The stream is read the way the relay shell reads a new connection:
never more than `want()` bytes at a time, in pieces no larger than the chunk size cfg picks.
cfg also picks whether a licence key is configured, how many replicas share the port, and whether
the relay is open or honours only the tickets of one rendezvous server.

Invariants: the reader raises only FrameError, and only when the header declares more than
FIRST_FRAME_MAX; it never consumes a byte past the first frame and returns exactly that
frame's payload; check_request returns a Decision for anything; an accepted uuid is non-empty
and short, routes to a replica in range, and survives the socket-handoff codec (encode, then
decode, gives it back); a relay that is not open accepts only a ticket its server signed for
that uuid and relay (a seed carries one; the fuzzer cannot forge another); a refusal carries
one complete RelayResponse frame. decode_handoff on
arbitrary bytes raises only ValueError and never yields a uuid that encode_handoff would refuse.
"""

from __future__ import annotations

from fuzz._common import Reader, entry, instrumented

with instrumented():
    from nacl.signing import SigningKey

    from agent.proto import rendezvous_pb2 as pb
    from agent.servers.relay_core import (
        FIRST_FRAME_MAX,
        MAX_UUID_LEN,
        Accept,
        Drop,
        FirstFrameReader,
        Health,
        Refuse,
        check_request,
        decode_handoff,
        encode_handoff,
        owner_index,
    )
    from agent.wire import messages, signing
    from agent.wire.frames import FrameDecoder, FrameError, encode_frame

CHUNKS = (1, 2, 3, 5, 64, 4096, 1 << 20, 1 << 20)
KEY = "OeVuKk5nlHiXp+APNn0Y3pC1Iwpwn44JGqrQCsWqmBw="
SERVER_KEY = SigningKey(bytes(32))
"""The rendezvous server the ticketed relay trusts; one seed carries its ticket."""
SERVER_PK = bytes(SERVER_KEY.verify_key)
NOW = 1_800_000_000.0


def TestOneInput(data: bytes) -> None:
    r = Reader(data)
    cfg = r.byte()
    stream = r.rest()
    chunk = CHUNKS[cfg & 7]
    key = KEY if cfg & 8 else ""
    replicas = 1 + ((cfg >> 4) & 7)
    open_relay = bool(cfg & 128)

    reader = FirstFrameReader()
    pos = 0
    payload: bytes | None = None
    try:
        while payload is None and pos < len(stream):
            want = reader.want()
            assert want > 0
            piece = stream[pos : pos + min(want, chunk)]
            pos += len(piece)
            payload = reader.feed(piece)
    except FrameError:
        head = (stream[0] & 3) + 1
        assert pos == head, f"refused after {pos} bytes, the header is {head}"
        assert int.from_bytes(stream[:head], "little") >> 2 > FIRST_FRAME_MAX
        return
    if payload is None:
        assert pos == len(stream)
        return
    assert reader.want() == 0
    assert FrameDecoder(FIRST_FRAME_MAX).feed(stream[:pos]) == [payload], "consumed more or less than one frame"

    decision = check_request(payload, key, server_keys=(SERVER_PK,), open_relay=open_relay, now=NOW)
    if isinstance(decision, Accept):
        uuid = decision.uuid
        assert uuid and len(uuid) <= MAX_UUID_LEN
        if not open_relay:
            sub = messages.parse(payload)[1]
            signing.check_ticket((SERVER_PK,), bytes(sub.ticket), uuid, sub.relay_server, NOW)  # raises if forged
        assert 0 <= owner_index(uuid, replicas) < replicas
        assert decode_handoff(encode_handoff(uuid, "203.0.113.9:40000")) == (uuid, "203.0.113.9:40000")
    elif isinstance(decision, Refuse):
        assert key or not open_relay
        (frame,) = FrameDecoder().feed(decision.reply)
        kind, msg = messages.parse(frame)
        assert kind == "relay_response" and msg.refuse_reason
    elif isinstance(decision, Health):  # the rendezvous server asking for our load: only a HealthCheck
        assert messages.parse(payload)[0] == "hc"
    else:
        assert isinstance(decision, Drop) and decision.reason

    try:
        uuid, peer = decode_handoff(stream)
    except ValueError:
        return
    assert uuid and len(uuid) <= MAX_UUID_LEN
    encode_handoff(uuid, peer)


def seeds() -> list[bytes]:
    def rr(**kw: object) -> bytes:
        return encode_frame(messages.build(request_relay=pb.RequestRelay(**kw)))  # type: ignore[arg-type]

    uuid = "5a1e0c1e-0000-4000-8000-000000000001"
    ticket = signing.make_ticket(SERVER_KEY, uuid, "r:21117", int(NOW * 1000))
    frames = [
        rr(uuid=uuid, licence_key=KEY, id="123456789", relay_server="r:21117", ticket=ticket),
        rr(uuid=uuid, relay_server="r:21117", ticket=ticket[:-1] + b"\0"),
        rr(uuid="u", licence_key="wrong"),
        rr(uuid=""),
        rr(uuid="x" * 65),
        encode_frame(messages.build(register_peer=pb.RegisterPeer(id="123456789"))),
        encode_frame(b""),
        bytes.fromhex("fdff0100"),
    ]
    out = [bytes((cfg,)) + f + b"EARLY DATA" for f in frames for cfg in (0, 8, 0x19, 0x2E, 0x80, 0x88)]
    out.append(bytes((0,)) + encode_handoff("5a1e0c1e-0000-4000-8000-000000000001", "[2001:db8::1]:5"))
    return out


main = entry("relay", TestOneInput, seeds)

if __name__ == "__main__":
    main()
