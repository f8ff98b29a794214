"""The relay's sans-IO core: first frame, pairing table, token buckets (fake time)."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey

from agent.proto import rendezvous_pb2 as pb
from agent.servers.relay_core import (
    FIRST_FRAME_MAX,
    KEY_MISMATCH,
    MAX_UUID_LEN,
    Accept,
    Drop,
    FirstFrameReader,
    Paired,
    PairingTable,
    Refuse,
    Refused,
    Throttle,
    TokenBucket,
    Wait,
    check_request,
    decode_handoff,
    encode_handoff,
    owner_index,
)
from agent.wire import messages, signing
from agent.wire.frames import FrameDecoder, FrameError, encode_frame, encode_header


def rr(uuid: str = "u", key: str = "", **kw: object) -> bytes:
    return messages.build(request_relay=pb.RequestRelay(uuid=uuid, licence_key=key, **kw))  # type: ignore[arg-type]


def read_exactly(reader: FirstFrameReader, stream: bytes) -> tuple[bytes | None, int]:
    """Drive the reader like the shell does; returns (payload, bytes consumed)."""
    pos = 0
    while pos < len(stream):
        want = reader.want()
        out = reader.feed(stream[pos : pos + want])
        pos += min(want, len(stream) - pos)
        if out is not None:
            return out, pos
    return None, pos


# ------------------------------------------------------------------ first frame reader


@pytest.mark.parametrize("length", [0, 1, 63, 64, 300, 4096])
def test_reader_consumes_exactly_one_frame(length: int) -> None:
    payload = bytes(range(256)) * (length // 256) + bytes(length % 256)
    stream = encode_frame(payload) + b"EARLY BYTES FOR THE PARTNER"
    out, used = read_exactly(FirstFrameReader(), stream)
    assert out == payload
    assert stream[used:] == b"EARLY BYTES FOR THE PARTNER"


def test_reader_accepts_non_minimal_headers() -> None:
    payload = b"x" * 10
    for head_len in (2, 3, 4):
        header = ((len(payload) << 2) | (head_len - 1)).to_bytes(head_len, "little")
        out, used = read_exactly(FirstFrameReader(), header + payload + b"rest")
        assert out == payload
        assert used == head_len + len(payload)


@pytest.mark.parametrize("declared", [FIRST_FRAME_MAX + 1, 0x3FFF, 0x3FFFFF, 0x3FFFFFFF])
def test_reader_refuses_oversized_header_before_the_body(declared: int) -> None:
    reader = FirstFrameReader()
    header = encode_header(declared)
    with pytest.raises(FrameError):
        for i in range(len(header)):
            assert reader.want() >= 1
            reader.feed(header[i : i + reader.want()])


def test_reader_rejects_overfeeding() -> None:
    reader = FirstFrameReader()
    with pytest.raises(ValueError):
        reader.feed(b"\x08\x00")  # only 1 byte wanted at first


@given(st.binary(max_size=FIRST_FRAME_MAX), st.binary(max_size=64))
def test_reader_roundtrip_any_payload(payload: bytes, tail: bytes) -> None:
    out, used = read_exactly(FirstFrameReader(), encode_frame(payload) + tail)
    assert out == payload
    assert used == len(encode_frame(payload))


@given(st.binary(max_size=5000))
def test_reader_on_random_bytes_never_reads_past_a_frame(data: bytes) -> None:
    reader = FirstFrameReader()
    try:
        out, used = read_exactly(reader, data)
    except FrameError:
        return
    if out is not None:
        # Whatever it returned is what the reference decoder sees as the first frame.
        assert FrameDecoder(FIRST_FRAME_MAX).feed(data[:used]) == [out]
    else:
        assert used == len(data)


# ------------------------------------------------------------------ first frame decision


def test_an_open_relay_accepts_any_uuid() -> None:
    assert check_request(rr("abc", id="123", conn_type=pb.DEFAULT_CONN), open_relay=True) == Accept("abc")


SERVER = SigningKey(b"r" * 32)
SERVER_PK = bytes(SERVER.verify_key)
NOW = 1_800_000_000.0


def ticketed(uuid: str, relay: str = "r:1", issued: float = NOW, key: SigningKey = SERVER) -> bytes:
    ticket = signing.make_ticket(key, uuid, relay, int(issued * 1000))
    return rr(uuid, relay_server=relay, ticket=ticket)


def refusal(decision: object) -> str:
    assert isinstance(decision, Refuse), decision
    (frame,) = FrameDecoder().feed(decision.reply)
    kind, sub = messages.parse(frame)
    assert kind == "relay_response"
    return str(sub.refuse_reason)


def test_a_ticketed_relay_pairs_only_what_its_server_arranged() -> None:
    keys = (bytes(SigningKey.generate().verify_key), SERVER_PK)  # it may trust several servers
    ok = check_request(ticketed("abc"), server_keys=keys, now=NOW + 1)
    assert ok == Accept("abc", NOW + signing.TICKET_TTL)
    cases = {
        "no ticket": rr("abc"),
        "not signed by a rendezvous server this relay trusts": ticketed("abc", key=SigningKey.generate()),
        "expired": ticketed("abc", issued=NOW - signing.TICKET_TTL - 1),
        "in the future": ticketed("abc", issued=NOW + signing.TICKET_SKEW + 1),
    }
    for why, payload in cases.items():
        assert why in refusal(check_request(payload, server_keys=keys, now=NOW)), why
    # a ticket is for one uuid at one relay (as the server named it)
    stolen = messages.parse(ticketed("abc"))[1].ticket
    for uuid, relay in (("abd", "r:1"), ("abc", "other:2")):
        payload = rr(uuid, relay_server=relay, ticket=stolen)
        assert "not signed" in refusal(check_request(payload, server_keys=keys, now=NOW))
    short = check_request(rr("abc", ticket=b"x" * 10), server_keys=keys, now=NOW)
    assert "a ticket is 72 bytes, got 10" in refusal(short)


def test_a_spent_uuid_is_refused_until_its_ticket_expired() -> None:
    table: PairingTable[str] = PairingTable()
    assert isinstance(table.offer("u", "c1", 0.0), Wait)
    assert isinstance(table.offer("u", "c2", 0.0), Paired)
    table.release("u", spent_until=100.0)
    assert table.offer("u", "c3", 50.0) == Refused("uuid_spent")
    assert isinstance(table.offer("u", "c4", 100.0), Wait)
    table.release("v")  # no ticket (an open relay): reusable at once
    assert isinstance(table.offer("v", "c5", 0.0), Wait)


def test_check_request_key() -> None:
    assert check_request(rr("abc", key="k"), key="k", open_relay=True) == Accept("abc")
    decision = check_request(rr("abc", key="nope"), key="k", open_relay=True)
    assert isinstance(decision, Refuse)
    frames = FrameDecoder().feed(decision.reply)
    kind, sub = messages.parse(frames[0])
    assert kind == "relay_response"
    assert sub.refuse_reason == KEY_MISMATCH
    assert sub.uuid == "abc"
    assert isinstance(check_request(rr("abc"), key="k", open_relay=True), Refuse)
    # No key configured: any licence key is fine (upstream's default).
    assert check_request(rr("abc", key="whatever"), open_relay=True) == Accept("abc")


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "empty"),
        (b"\xff\xff\xff", "malformed"),
        (rr(""), "empty_uuid"),
        (rr("x" * (MAX_UUID_LEN + 1)), "uuid_too_long"),
        (messages.build(punch_hole_request=pb.PunchHoleRequest(id="1")), "unexpected_message"),
        (b"h\r\n", "malformed"),  # upstream's loopback admin console: nothing special here
        (b"\x00" * (FIRST_FRAME_MAX + 1), "oversized"),
    ],
)
def test_check_request_drops(payload: bytes, reason: str) -> None:
    assert check_request(payload, key="k") == Drop(reason)


@given(st.binary(max_size=300))
def test_check_request_never_raises(data: bytes) -> None:
    assert isinstance(check_request(data, key="k"), Accept | Refuse | Drop)


# ------------------------------------------------------------------ owner and handoff message


def test_owner_index_is_stable_and_in_range() -> None:
    for n in (1, 2, 3, 8):
        owners = [owner_index(f"uuid-{i}", n) for i in range(400)]
        assert all(0 <= o < n for o in owners)
        assert owners == [owner_index(f"uuid-{i}", n) for i in range(400)]
        assert len(set(owners)) == n
    assert owner_index("6f1c1a5e-0000-4000-8000-000000000000", 2) == owner_index(
        "6f1c1a5e-0000-4000-8000-000000000000", 2
    )
    with pytest.raises(ValueError):
        owner_index("u", 0)


@given(st.text(min_size=1, max_size=MAX_UUID_LEN), st.text(max_size=80))
def test_handoff_roundtrip(uuid: str, peer: str) -> None:
    u, p = decode_handoff(encode_handoff(uuid, peer))
    assert u == uuid
    assert peer.encode()[:255].decode(errors="replace") == p


@given(st.binary(max_size=600))
def test_handoff_decode_only_value_errors(data: bytes) -> None:
    with contextlib.suppress(ValueError):
        decode_handoff(data)


def test_handoff_rejects_truncation() -> None:
    msg = encode_handoff("abc", "127.0.0.1:5")
    for i in range(len(msg)):
        with pytest.raises(ValueError):
            decode_handoff(msg[:i])
    with pytest.raises(ValueError):
        encode_handoff("", "x")


# ------------------------------------------------------------------ pairing table


def test_first_waits_second_pairs() -> None:
    t: PairingTable[str] = PairingTable(pair_wait=30)
    assert t.offer("u", "A", now=100) == Wait(130)
    assert t.waiting == 1
    assert t.offer("u", "B", now=101) == Paired("A")
    assert (t.waiting, t.active) == (0, 1)


def test_third_party_is_refused_until_release() -> None:
    t: PairingTable[str] = PairingTable()
    t.offer("u", "A", 0)
    t.offer("u", "B", 1)
    assert t.offer("u", "C", 2) == Refused("uuid_in_use")
    t.release("u")
    assert t.offer("u", "C", 3) == Wait(33)


def test_timeout_expires_only_due_waiters() -> None:
    t: PairingTable[str] = PairingTable(pair_wait=10)
    t.offer("a", "A", 0)
    t.offer("b", "B", 5)
    assert t.next_deadline() == 10
    assert t.expire(9.99) == []
    assert t.expire(10) == [("a", "A")]
    assert t.next_deadline() == 15
    assert t.expire(100) == [("b", "B")]
    assert t.next_deadline() is None
    # After expiry the uuid starts over.
    assert t.offer("a", "A2", 101) == Wait(111)


def test_waiting_is_bounded() -> None:
    t: PairingTable[int] = PairingTable(max_waiting=3)
    for i in range(3):
        assert isinstance(t.offer(f"u{i}", i, 0), Wait)
    # Full: the newcomer waits and the oldest waiter is handed back to be closed.
    assert t.offer("u9", 9, 0) == Wait(30.0, ("u0", 0))
    assert t.waiting == 3
    # A partner of a remaining waiter still pairs.
    assert t.offer("u1", 11, 0) == Paired(1)
    assert t.offer("u0", 10, 0) == Wait(30.0)  # u0 was evicted: its partner now waits


def test_pairs_bound() -> None:
    t: PairingTable[int] = PairingTable(max_active=1)
    t.offer("a", 1, 0)
    t.offer("a", 2, 0)
    assert t.offer("b", 3, 0) == Refused("pairs_full")
    t.release("a")
    assert isinstance(t.offer("b", 3, 0), Wait)


def test_cancel_frees_the_slot_only_for_the_right_conn() -> None:
    t: PairingTable[str] = PairingTable(max_waiting=1)
    t.offer("u", "A", 0)
    assert not t.cancel("u", "other")
    assert t.cancel("u", "A")
    assert not t.cancel("u", "A")
    assert isinstance(t.offer("v", "B", 0), Wait)


def test_late_partner_of_uncollected_waiter_still_pairs() -> None:
    t: PairingTable[str] = PairingTable(pair_wait=1)
    t.offer("u", "A", 0)
    assert t.offer("u", "B", 5) == Paired("A")


def test_table_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError):
        PairingTable(pair_wait=0)
    with pytest.raises(ValueError):
        PairingTable(max_waiting=0)


@settings(max_examples=200)
@given(st.lists(st.tuples(st.sampled_from("abcd"), st.integers(0, 3)), max_size=60))
def test_table_invariants(ops: list[tuple[str, int]]) -> None:
    t: PairingTable[int] = PairingTable(pair_wait=5, max_waiting=2)
    now = 0.0
    for n, (uuid, action) in enumerate(ops):
        now += 1
        if action == 0:
            t.offer(uuid, n, now)
        elif action == 1:
            t.release(uuid)
        elif action == 2:
            t.expire(now)
        else:
            t.cancel(uuid, n)
        assert t.waiting <= 2


# ------------------------------------------------------------------ token buckets


def test_bucket_starts_full_and_refills() -> None:
    b = TokenBucket(rate=1000, now=0, burst=500)
    assert b.available(0) == 500
    b.take(500, 0)
    assert b.available(0) == 0
    assert b.wait_time(100, 0) == pytest.approx(0.1)
    assert b.available(0.1) == 100
    assert b.available(10) == 500  # capped at the burst


def test_bucket_never_goes_negative() -> None:
    b = TokenBucket(rate=100, now=0, burst=100)
    with pytest.raises(ValueError):
        b.take(101, 0)


def test_refund_is_capped() -> None:
    b = TokenBucket(rate=100, now=0, burst=100)
    b.take(60, 0)
    b.refund(1000, 0)
    assert b.available(0) == 100


@settings(max_examples=100)
@given(st.lists(st.tuples(st.floats(0, 0.5), st.integers(1, 50_000)), min_size=1, max_size=200))
def test_throttle_respects_rate_over_any_run(steps: list[tuple[float, int]]) -> None:
    rate, burst = 10_000.0, 2_000.0
    bucket = TokenBucket(rate, now=0, burst=burst)
    th = Throttle([bucket])
    now = 0.0
    moved = 0
    for dt, want in steps:
        now += dt
        g = th.take(want, now)
        assert 0 <= g <= want
        # Move only part of it sometimes and refund the rest, like a short read.
        actual = g // 2 if want % 3 == 0 else g
        th.refund(g - actual, now)
        moved += actual
        assert moved <= burst + rate * now + 1e-6


def test_shared_bucket_is_split_between_streams() -> None:
    total = TokenBucket(rate=1000, now=0, burst=1000)
    s1 = Throttle([TokenBucket(rate=800, now=0, burst=800), total])
    s2 = Throttle([TokenBucket(rate=800, now=0, burst=800), total])
    assert s1.take(5000, 0) == 800
    assert s2.take(5000, 0) == 200  # only what the shared bucket has left
    assert s2.take(5000, 0) == 0
    assert s2.wait_time(100, 0) > 0
    assert s2.waits == 1


def test_bucket_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError):
        TokenBucket(0, now=0)
    with pytest.raises(ValueError):
        TokenBucket(10, now=0, burst=0.5)


def test_throttle_quantum_refuses_crumbs() -> None:
    b = TokenBucket(rate=1000, now=0, burst=1000)
    th = Throttle([b])
    assert th.take(1000, 0) == 1000
    assert th.take(1000, 0.01, quantum=100) == 0  # 10 bytes accrued: not worth a wake-up
    assert th.take(1000, 0.1, quantum=100) == 100
    # The quantum never exceeds the burst, or a small bucket would never grant.
    small = Throttle([TokenBucket(rate=10, now=0, burst=50)])
    assert small.take(1000, 0, quantum=16384) == 50
