"""The link's record layer (agent/link/resend_core.py): numbering, acknowledgement, and resuming on a
new transport with nothing lost, duplicated or reordered, whatever the old transport dropped."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.link import resend_core
from agent.link.resend_core import ACK_EVERY, MAX_UNACKED, Resend, ResendError, decode_count, encode_count


def test_records_are_kept_until_acknowledged() -> None:
    a, b = Resend(), Resend()
    records = [a.data(bytes([i]) * 10) for i in range(5)]
    assert a.sent == 5 and len(a.kept) == 5 and a.kept_bytes == 5 * (resend_core.DATA_OVERHEAD + 10)
    assert [bytes(b.receive(r) or b"") for r in records] == [bytes([i]) * 10 for i in range(5)]
    ack = b.ack_due(read_done=True)
    assert ack is not None and b.ack_due(read_done=True) is None  # nothing new to say
    assert a.receive(ack) is None
    assert a.acked == 5 and not a.kept and a.kept_bytes == 0


def test_acks_go_out_every_few_records_or_when_a_read_is_done() -> None:
    a, b = Resend(), Resend()
    for i in range(ACK_EVERY - 1):
        b.receive(a.data(b"x"))
        assert b.ack_due(read_done=False) is None, i
    b.receive(a.data(b"x"))
    assert b.ack_due(read_done=False) is not None
    b.receive(a.data(b"x"))
    assert b.ack_due(read_done=False) is None and b.ack_due(read_done=True) is not None


def test_acknowledgements_ride_on_data_so_an_exchange_needs_no_ack_records() -> None:
    """A request and its answer: two records, no ACK record either way."""
    a, b = Resend(), Resend()
    for _ in range(3):
        assert b.receive(a.data(b"request")) is not None
        assert a.receive(b.data(b"answer")) is not None  # acknowledges the request
        assert a.acked == a.sent and not a.kept
        assert b.ack_due(read_done=True) is None  # the answer already said it
        assert a.ack_due(read_done=True) is not None  # a has not answered the answer: owes an ACK
    assert b.acked == 2 and len(b.kept) == 1  # a's last word on b's records came with its last request


def test_a_data_record_acknowledging_what_was_never_sent_is_refused_and_not_counted() -> None:
    a, b = Resend(), Resend()
    b.received = 7  # b claims 7 records from a, which sent none
    with pytest.raises(ResendError, match="beyond the 0 sent"):
        a.receive(b.data(b"x"))
    assert a.received == 0


def test_a_stale_ack_changes_nothing_and_an_ack_from_the_future_is_refused() -> None:
    a = Resend()
    for _ in range(3):
        a.data(b"r")
    a.receive(bytes([resend_core.ACK]) + encode_count(2))
    a.receive(bytes([resend_core.ACK]) + encode_count(1))  # arrived late: harmless
    assert a.acked == 2 and len(a.kept) == 1
    with pytest.raises(ResendError, match="beyond the 3 sent"):
        a.receive(bytes([resend_core.ACK]) + encode_count(4))


@pytest.mark.parametrize(
    "record",
    [b"", b"\x02hello", b"\x01", b"\x01" + bytes(7), b"\x01" + bytes(9), b"\xff" + bytes(8), b"\x00" + bytes(7)],
)
def test_malformed_records_are_refused(record: bytes) -> None:
    with pytest.raises(ResendError):
        Resend().receive(record)


def test_the_writer_stops_taking_records_when_too_much_is_unacknowledged() -> None:
    a = Resend()
    while not a.full:
        a.data(bytes(64 * 1024))
    assert a.kept_bytes >= MAX_UNACKED
    a.receive(bytes([resend_core.ACK]) + encode_count(a.sent))
    assert not a.full


def test_a_resume_cannot_claim_what_was_never_sent_or_was_acknowledged() -> None:
    a = Resend()
    for _ in range(4):
        a.data(b"r")
    a.receive(bytes([resend_core.ACK]) + encode_count(2))
    with pytest.raises(ResendError, match=r"outside 2\.\.4"):
        a.resume(5)
    with pytest.raises(ResendError, match=r"outside 2\.\.4"):
        a.resume(1)
    assert a.resume(3) == [b"\x00" + encode_count(0) + b"r"] and a.acked == 3


def test_counts_are_eight_bytes() -> None:
    assert decode_count(encode_count(2**40 + 5)) == 2**40 + 5
    with pytest.raises(ResendError):
        decode_count(b"\x00" * 7)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(min_value=0, max_value=6), st.integers(min_value=0, max_value=6), st.booleans()),
        min_size=1,
        max_size=12,
    )
)
def test_moves_lose_duplicate_and_reorder_nothing(rounds: list[tuple[int, int, bool]]) -> None:
    """Each round: A sends some records, the transport delivers only a prefix of them (the rest is lost
    with it), B maybe acknowledges; then a move: B says how many it has, A resends the rest on the new
    transport. B must end up with exactly what A sent, in order, once."""
    a, b = Resend(), Resend()
    sent: list[bytes] = []
    got: list[bytes] = []
    in_flight: list[bytes] = []
    for new, delivered, acked in rounds:
        for _ in range(new):
            body = len(sent).to_bytes(4, "big")
            sent.append(body)
            in_flight.append(a.data(body))
        for record in in_flight[:delivered]:
            received = b.receive(record)
            assert received is not None
            got.append(bytes(received))
        in_flight = []  # the transport dies with whatever it still carried
        if acked and (ack := b.ack_due(read_done=True)) is not None:
            a.receive(ack)
        in_flight = a.resume(b.received)  # the move: resent on the new transport
    for record in in_flight:
        received = b.receive(record)
        assert received is not None
        got.append(bytes(received))
    assert got == sent
