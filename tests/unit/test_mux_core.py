"""The link multiplexer's core (agent/link/mux_core.py): two ends driven against each other in memory."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.link.mux_core import (
    HEADER,
    LINK_GROWTH,
    MAX_FRAME,
    MAX_STREAMS,
    MAX_WINDOW,
    WINDOW,
    Data,
    Event,
    Flag,
    GoAway,
    Mux,
    MuxError,
    Ping,
    StreamEnded,
    StreamOpened,
    StreamReset,
    Type,
    WindowOpened,
)


def link() -> tuple[Mux, Mux]:
    return Mux(dialer=True), Mux(dialer=False)


def carry(src: Mux, dst: Mux) -> list[Event]:
    return dst.receive(src.data_to_send())


def payload(events: list[Event], sid: int) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, Data) and e.stream == sid)


def frame(kind: Type, flags: int, sid: int, length: int, body: bytes = b"") -> bytes:
    return HEADER.pack(0, kind, flags, sid, length) + body


def test_open_send_and_close_both_ways() -> None:
    a, b = link()
    sid = a.open_stream()
    assert sid == 1 and a.send(sid, b"GET /") == 5
    events = carry(a, b)
    assert events == [StreamOpened(1), Data(1, b"GET /")]
    assert b.send(1, b"200 OK") == 6
    b.close(1)
    back = carry(b, a)
    assert back == [Data(1, b"200 OK"), StreamEnded(1)]
    a.close(sid)
    assert carry(a, b) == [StreamEnded(1)]
    assert a.streams == {} and b.streams == {}  # both sides closed: nothing kept


def test_the_answer_carries_ack_once() -> None:
    a, b = link()
    sid = a.open_stream()
    carry(a, b)
    b.send(sid, b"x")
    b.send(sid, b"y")
    wire = b.data_to_send()
    first, second = HEADER.unpack_from(wire, 0), HEADER.unpack_from(wire, HEADER.size + 1)
    assert first[2] == Flag.ACK and second[2] == 0


def test_stream_ids_do_not_collide() -> None:
    a, b = link()
    assert [a.open_stream() for _ in range(3)] == [1, 3, 5]
    assert [b.open_stream() for _ in range(3)] == [2, 4, 6]
    events = carry(a, b) + carry(b, a)
    assert [e.stream for e in events if isinstance(e, StreamOpened)] == [1, 3, 5, 2, 4, 6]


def test_a_sender_never_exceeds_the_window_and_a_stalled_stream_stalls_only_itself() -> None:
    a, b = link()
    slow, fast = a.open_stream(), a.open_stream()
    big = bytes(WINDOW + 1000)
    assert a.send(slow, big) == WINDOW  # the rest waits for the reader
    assert a.send(slow, b"more") == 0
    assert payload(carry(a, b), slow) == bytes(WINDOW)
    # nobody reads `slow`; `fast` still moves a whole window, and more once its reader consumes
    assert a.send(fast, big) == WINDOW
    got = carry(a, b)
    b.consumed(fast, WINDOW)
    assert WindowOpened(fast) in carry(b, a)
    assert a.send(fast, big[WINDOW:]) == 1000
    assert a.send(slow, b"more") == 0
    assert len(payload(got, fast)) == WINDOW


def test_window_updates_come_once_half_a_window_is_read() -> None:
    a, b = link()
    sid = a.open_stream()
    a.send(sid, bytes(WINDOW))
    carry(a, b)
    b.consumed(sid, WINDOW // 2 - 1)
    assert b.data_to_send() == b""
    b.consumed(sid, 1)
    assert carry(b, a) == [WindowOpened(sid)]
    assert a.send(sid, bytes(WINDOW)) == WINDOW // 2


def fill_and_drain(a: Mux, b: Mux, sid: int) -> int:
    """The sender fills its whole window, the reader takes everything at once: the window after."""
    sent = a.send(sid, bytes(a.window(sid)))
    carry(a, b)
    b.consumed(sid, sent)
    carry(b, a)
    return a.window(sid)


def test_a_window_grows_while_the_reader_keeps_up_and_stops_at_its_cap() -> None:
    a, b = link()
    sid = a.open_stream()
    windows = [fill_and_drain(a, b, sid) for _ in range(12)]
    assert windows[:4] == [2 * WINDOW, 4 * WINDOW, 8 * WINDOW, 16 * WINDOW]
    assert max(windows) == MAX_WINDOW and windows[-1] == MAX_WINDOW
    assert b.streams[sid].window == MAX_WINDOW and b.grown == MAX_WINDOW - WINDOW


def test_a_reader_that_falls_behind_never_grows_its_window() -> None:
    a, b = link()
    sid = a.open_stream()
    for _ in range(20):
        sent = a.send(sid, bytes(a.window(sid)))
        carry(a, b)
        b.consumed(sid, sent // 2)  # reads half of what arrives: its buffer stays full
        carry(b, a)
    assert b.streams[sid].window == WINDOW and b.grown == 0
    assert b.streams[sid].buffered <= WINDOW


def test_a_sender_that_never_fills_its_window_does_not_grow_it() -> None:
    a, b = link()
    sid = a.open_stream()
    for _ in range(40):
        a.send(sid, bytes(WINDOW // 8))  # an interactive stream: small writes, read at once
        carry(a, b)
        b.consumed(sid, WINDOW // 8)
        carry(b, a)
    assert b.streams[sid].window == WINDOW


def test_growth_is_bounded_per_link_and_given_back_when_a_stream_ends() -> None:
    a, b = link()
    sids = [a.open_stream() for _ in range(LINK_GROWTH // MAX_WINDOW + 2)]
    for sid in sids:
        for _ in range(8):
            fill_and_drain(a, b, sid)
    assert b.grown <= LINK_GROWTH
    assert sum(b.streams[sid].window - WINDOW for sid in sids) == b.grown
    assert b.streams[sids[-1]].window < MAX_WINDOW  # the budget ran out before the last streams
    a.reset(sids[0])
    carry(a, b)
    assert b.grown == sum(b.streams[sid].window - WINDOW for sid in sids[1:])
    for _ in range(8):
        fill_and_drain(a, b, sids[-1])
    assert b.streams[sids[-1]].window == MAX_WINDOW  # what the ended stream gave back


def test_reset_drops_the_stream_and_late_frames_are_ignored() -> None:
    a, b = link()
    sid = a.open_stream()
    a.send(sid, b"abc")
    carry(a, b)
    a.send(sid, b"in flight")
    late = a.data_to_send()
    b.reset(sid)
    assert carry(b, a) == [StreamReset(sid)]
    assert b.receive(late) == []  # crossed the RST on the wire
    assert sid not in a.streams and sid not in b.streams
    with pytest.raises(KeyError):
        a.send(sid, b"x")


def test_big_writes_are_cut_into_frames_and_any_split_of_the_bytes_reads_the_same() -> None:
    a, b = link()
    sid = a.open_stream()
    data = bytes(range(256)) * 1000
    assert a.send(sid, data) == len(data)
    a.close(sid)
    wire = a.data_to_send()
    assert max(HEADER.unpack_from(wire, 0)[4], MAX_FRAME) == MAX_FRAME
    whole = b.receive(wire)
    c = Mux(dialer=False)
    pieces: list[Event] = []
    for i in range(0, len(wire), 7):
        pieces += c.receive(wire[i : i + 7])
    assert payload(whole, sid) == payload(pieces, sid) == data
    assert whole[-1] == pieces[-1] == StreamEnded(sid)


def test_ping_is_echoed_and_go_away_closes() -> None:
    a, b = link()
    a.ping(0xDEADBEEF)
    assert carry(a, b) == [Ping(0xDEADBEEF, ack=False)]
    assert carry(b, a) == [Ping(0xDEADBEEF, ack=True)]
    b.go_away(3)
    assert carry(b, a) == [GoAway(3)]
    with pytest.raises(MuxError, match="closed"):
        a.open_stream()


@pytest.mark.parametrize(
    ("wire", "why"),
    [
        (HEADER.pack(1, 0, 0, 2, 0), "unknown frame version 1"),
        (HEADER.pack(0, 9, 0, 2, 0), "unknown frame type 9"),
        (frame(Type.DATA, Flag.SYN, 2, MAX_FRAME + 1), f"DATA frame of {MAX_FRAME + 1} bytes"),
        (frame(Type.DATA, Flag.SYN, 1, 1, b"x"), "the peer opened stream 1, one of ours"),
        (frame(Type.WINDOW_UPDATE, Flag.SYN, 2, 0) * 2, "stream 2 opened twice"),
        (frame(Type.DATA, 0, 0, 1, b"x"), "DATA on stream 0"),
        (frame(Type.DATA, Flag.SYN | Flag.FIN, 2, 1, b"x") + frame(Type.DATA, 0, 2, 1, b"y"), "after its end"),
        (
            frame(Type.WINDOW_UPDATE, Flag.SYN | Flag.FIN, 2, 0) + frame(Type.WINDOW_UPDATE, Flag.FIN, 2, 0),
            "ended twice",
        ),
        (frame(Type.WINDOW_UPDATE, Flag.SYN, 2, (1 << 31)), "past 2 GiB"),
    ],
)
def test_a_peer_that_breaks_the_protocol_ends_the_link(wire: bytes, why: str) -> None:
    a = Mux(dialer=True)
    with pytest.raises(MuxError, match=why):
        a.receive(wire)


def test_data_beyond_the_window_ends_the_link() -> None:
    a = Mux(dialer=True)
    wire = frame(Type.WINDOW_UPDATE, Flag.SYN, 2, 0)
    wire += frame(Type.DATA, 0, 2, MAX_FRAME, bytes(MAX_FRAME)) * (WINDOW // MAX_FRAME)
    a.receive(wire)
    with pytest.raises(MuxError, match="beyond its window of 0"):
        a.receive(frame(Type.DATA, 0, 2, 1, b"x"))


def test_stream_state_is_bounded() -> None:
    a = Mux(dialer=True)
    a.receive(b"".join(frame(Type.WINDOW_UPDATE, Flag.SYN, 2 * (i + 1), 0) for i in range(MAX_STREAMS)))
    with pytest.raises(MuxError, match=f"more than {MAX_STREAMS} streams"):
        a.receive(frame(Type.WINDOW_UPDATE, Flag.SYN, 2 * (MAX_STREAMS + 1), 0))
    # frames for streams nobody opened cost nothing
    b = Mux(dialer=True)
    assert b.receive(frame(Type.DATA, 0, 8, 3, b"abc") * 100) == [] and b.streams == {}


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["send", "read", "carry", "back", "close"]),
            st.integers(0, 2),
            st.integers(1, 3 * WINDOW // 2),
        ),
        max_size=60,
    )
)
def test_any_interleaving_delivers_every_stream_in_order_within_its_window(
    ops: list[tuple[str, int, int]],
) -> None:
    """Three streams, writes of any size, reads of any size, frames carried whenever: each reader
    gets exactly its writer's bytes in order, never holds more than a window unread, and nobody
    hears of a protocol error."""
    a, b = link()
    sids = [a.open_stream() for _ in range(3)]
    written = {s: bytearray() for s in sids}
    unread = {s: 0 for s in sids}
    got = {s: bytearray() for s in sids}
    closed: set[int] = set()
    counter = 0
    for op, i, n in ops:
        sid = sids[i]
        if op == "send" and sid not in closed:
            data = bytes((counter + k) % 251 for k in range(n))
            counter += n
            took = a.send(sid, data)
            written[sid] += data[:took]
        elif op == "close" and sid not in closed:
            a.close(sid)
            closed.add(sid)
        elif op == "read":
            take = min(n, unread[sid])
            unread[sid] -= take
            b.consumed(sid, take)
        elif op == "carry":
            for e in carry(a, b):
                if isinstance(e, Data):
                    got[e.stream] += e.data
                    unread[e.stream] += len(e.data)
                    assert unread[e.stream] <= b.streams[e.stream].window <= MAX_WINDOW
        else:
            carry(b, a)
    for e in carry(a, b):
        if isinstance(e, Data):
            got[e.stream] += e.data
    for s in sids:
        assert bytes(got[s]) == bytes(written[s])


@settings(max_examples=500, deadline=None)
@given(st.lists(st.binary(max_size=200), max_size=20), st.booleans())
def test_hostile_bytes_end_the_link_with_a_reason_or_are_read(chunks: list[bytes], dialer: bool) -> None:
    """Whatever a peer sends: events, or MuxError with a one-line reason; never another exception,
    and never more buffered than one frame."""
    m = Mux(dialer=dialer)
    for chunk in chunks:
        try:
            m.receive(chunk)
        except MuxError as exc:
            assert str(exc) and "\n" not in str(exc)
            return
        assert len(m._buf) < HEADER.size + MAX_FRAME
        assert len(m.streams) <= MAX_STREAMS
