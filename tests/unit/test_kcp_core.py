"""kcp-sys framing, segment validation and the connection FSM, with fake time and no sockets."""

from __future__ import annotations

import contextlib
import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kcp.extension import KCP

from agent.kcp.core import (
    ACK,
    CMD_ACK,
    CMD_PUSH,
    CMD_WASK,
    DATA,
    FIN,
    HEADER,
    HEADER_SIZE,
    KNOWN_FLAGS,
    PING,
    PONG,
    RST,
    SEGMENT,
    SYN,
    ConnectionReset,
    ConnectionTimedOut,
    Established,
    Event,
    KcpConnection,
    KcpMeter,
    KcpTimers,
    PacketError,
    PacketHeader,
    PeerFinished,
    State,
    decode_packet,
    encode_packet,
    flag_names,
    scan_segments,
)

CONV = 0xC0FFEE01


def hdr(flags: int, conv: int = CONV, src: int = 0, dst: int = 0) -> bytes:
    return HEADER.pack(conv, src, dst, flags, 0)


def seg(cmd: int, sn: int = 0, payload: bytes = b"", *, conv: int = CONV, ts: int = 0, frg: int = 0) -> bytes:
    return SEGMENT.pack(conv, cmd, frg, 1024, ts, sn, 0, len(payload)) + payload


def state(conn: KcpConnection) -> State:
    """Read through a call so mypy does not keep the narrowing from an earlier assert."""
    return conn.state


def events(conn: KcpConnection) -> list[Event]:
    out = []
    while (ev := conn.next_event()) is not None:
        out.append(ev)
    return out


def handshake(now: float = 0.0, timers: KcpTimers | None = None) -> tuple[KcpConnection, KcpConnection]:
    client = KcpConnection.client(CONV, now, 5.0, timers=timers)
    server = KcpConnection.server(now, 5.0, timers=timers)
    for d in client.datagrams_to_send():
        assert server.receive_datagram(d, now) is None
    for d in server.datagrams_to_send():
        assert client.receive_datagram(d, now) is None
    for d in client.datagrams_to_send():
        assert server.receive_datagram(d, now) is None
    assert events(client) == [Established(CONV)]
    assert events(server) == [Established(CONV)]
    return client, server


# --------------------------------------------------------------------------- header codec


def test_header_bytes_are_kcp_sys_layout() -> None:
    h = PacketHeader(0x01020304, 5, 6, SYN | ACK)
    assert h.encode() == bytes.fromhex("0403020105000000060000000300")
    assert HEADER_SIZE == 14
    assert decode_packet(encode_packet(h, b"xyz")) == (h, b"xyz")
    assert h.conn_id == (0x01020304, 5, 6)


def test_flag_values_match_kcp_sys() -> None:
    assert (SYN, ACK, FIN, DATA, RST, PING, PONG) == (1, 2, 4, 8, 16, 32, 64)
    assert flag_names(SYN | ACK) == "SYN|ACK"
    assert flag_names(0) == "0"
    assert flag_names(0x81) == "SYN|0x80"


@pytest.mark.parametrize("size", range(14))
def test_short_datagrams_are_rejected(size: int) -> None:
    with pytest.raises(PacketError) as info:
        decode_packet(b"\x00" * size)
    assert info.value.reason == ("empty" if size == 0 else "short")


def test_unknown_flag_bit_is_rejected() -> None:
    with pytest.raises(PacketError, match="unknown_flags"):
        decode_packet(hdr(0x80 | DATA))


@given(st.binary(max_size=64))
def test_decode_never_raises_anything_else(data: bytes) -> None:
    try:
        header, payload = decode_packet(data)
    except PacketError:
        return
    assert header.encode() + payload == data
    assert header.flags & ~KNOWN_FLAGS == 0


@given(
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1),
    st.integers(0, KNOWN_FLAGS),
    st.binary(max_size=32),
)
def test_header_roundtrip(conv: int, src: int, dst: int, flags: int, payload: bytes) -> None:
    h = PacketHeader(conv, src, dst, flags)
    assert decode_packet(encode_packet(h, payload)) == (h, payload)


# --------------------------------------------------------------------------- segment validation


def test_scan_counts_pushes_and_acks() -> None:
    payload = seg(CMD_ACK, 1, ts=77) + seg(CMD_PUSH, 2, b"hello") + seg(CMD_WASK)
    scan = scan_segments(payload, CONV)
    assert (scan.pushes, scan.push_bytes, scan.acks, scan.ack_ts) == (1, 5, 1, 77)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "segment_short"),
        (seg(CMD_PUSH)[:23], "segment_short"),
        (seg(CMD_PUSH, payload=b"ab") + b"x", "segment_trailing"),
        (seg(CMD_PUSH, conv=CONV + 1), "segment_conv"),
        (seg(99), "segment_cmd"),
        (seg(CMD_PUSH, payload=b"abc")[:-1], "segment_length"),
        (SEGMENT.pack(CONV, CMD_PUSH, 0, 0, 0, 0, 0, 0xFFFFFFFF), "segment_length"),
        (SEGMENT.pack(CONV, CMD_PUSH, 0, 0, 0, 0, 0, 0x80000000) + b"x" * 8, "segment_length"),
        (seg(CMD_PUSH, payload=b"a", frg=3), "segment_frg"),
        (seg(CMD_ACK) + seg(CMD_PUSH, conv=1), "segment_conv"),
    ],
)
def test_scan_rejects_hostile_segments(payload: bytes, reason: str) -> None:
    with pytest.raises(PacketError) as info:
        scan_segments(payload, CONV)
    assert info.value.reason == reason


@given(st.binary(max_size=200), st.integers(0, 2**32 - 1))
def test_scan_never_raises_anything_else(payload: bytes, conv: int) -> None:
    with contextlib.suppress(PacketError):
        scan_segments(payload, conv)


# --------------------------------------------------------------------------- handshake


def test_handshake_bytes() -> None:
    client = KcpConnection.client(CONV, 0.0, 5.0)
    assert client.state is State.SYN_SENT
    [syn] = client.datagrams_to_send()
    assert syn == hdr(SYN)
    server = KcpConnection.server(0.0, 5.0)
    assert server.state is State.LISTEN and server.conv is None
    assert server.receive_datagram(syn, 0.01) is None
    [syn_ack] = server.datagrams_to_send()
    assert syn_ack == hdr(SYN | ACK)
    assert state(server) is State.SYN_RECEIVED and server.conv == CONV
    client.receive_datagram(syn_ack, 0.02)
    [ack] = client.datagrams_to_send()
    assert ack == hdr(ACK | DATA)
    assert client.state is State.ESTABLISHED
    assert events(client) == [Established(CONV)]
    server.receive_datagram(ack, 0.03)
    assert server.state is State.ESTABLISHED
    assert events(server) == [Established(CONV)]
    assert server.datagrams_to_send() == []


def test_session_ids_are_echoed_not_swapped() -> None:
    client = KcpConnection.client(CONV, 0.0, 5.0, src_session_id=7, dst_session_id=9)
    server = KcpConnection.server(0.0, 5.0)
    [syn] = client.datagrams_to_send()
    server.receive_datagram(syn, 0.0)
    [syn_ack] = server.datagrams_to_send()
    assert syn_ack == hdr(SYN | ACK, src=7, dst=9)
    assert server.conn_id == (CONV, 7, 9)


def test_syn_is_retransmitted_every_200ms_until_timeout() -> None:
    client = KcpConnection.client(CONV, 100.0, 1.0)
    assert len(client.datagrams_to_send()) == 1
    sent = 1
    now = 100.0
    while client.state is State.SYN_SENT:
        timer = client.get_timer()
        assert timer is not None
        now = timer
        client.handle_timer(now)
        sent += len(client.datagrams_to_send())
    assert now == pytest.approx(101.0)
    assert sent == 5  # at 0, 0.2, 0.4, 0.6, 0.8; the deadline at 1.0 sends nothing
    [ev] = events(client)
    assert isinstance(ev, ConnectionTimedOut) and ev.phase == "connect"
    assert "5 SYNs" in ev.reason
    assert client.get_timer() is None


def test_lost_syn_ack_recovers_through_duplicate_syn() -> None:
    client = KcpConnection.client(CONV, 0.0, 5.0)
    server = KcpConnection.server(0.0, 5.0)
    server.receive_datagram(client.datagrams_to_send()[0], 0.0)
    server.datagrams_to_send()  # SYN|ACK lost
    client.handle_timer(0.2)
    [syn2] = client.datagrams_to_send()
    server.receive_datagram(syn2, 0.2)
    [syn_ack] = server.datagrams_to_send()
    assert syn_ack == hdr(SYN | ACK)
    client.receive_datagram(syn_ack, 0.21)
    server.receive_datagram(client.datagrams_to_send()[0], 0.22)
    assert client.state is server.state is State.ESTABLISHED


def test_lost_ack_recovers_through_syn_ack_retransmit_and_is_capped() -> None:
    client = KcpConnection.client(CONV, 0.0, 5.0)
    server = KcpConnection.server(0.0, 30.0)
    server.receive_datagram(client.datagrams_to_send()[0], 0.0)
    client.receive_datagram(server.datagrams_to_send()[0], 0.0)
    client.datagrams_to_send()  # ACK|DATA lost; the client is established and sends no more SYNs
    assert client.state is State.ESTABLISHED
    server.handle_timer(0.2)
    [again] = server.datagrams_to_send()
    assert again == hdr(SYN | ACK)
    client.receive_datagram(again, 0.2)
    [ack] = client.datagrams_to_send()
    assert ack == hdr(ACK | DATA)
    server.receive_datagram(ack, 0.2)
    assert server.state is State.ESTABLISHED

    lonely = KcpConnection.server(0.0, 30.0)
    lonely.receive_datagram(hdr(SYN), 0.0)
    lonely.datagrams_to_send()
    retransmits = 0
    now = 0.0
    while now < 10.0:
        now += 0.05
        lonely.handle_timer(now)
        retransmits += len(lonely.datagrams_to_send())
    assert retransmits == KcpTimers().syn_ack_retries


def test_first_data_packet_completes_the_handshake_and_is_kept() -> None:
    server = KcpConnection.server(0.0, 5.0)
    server.receive_datagram(hdr(SYN), 0.0)
    server.datagrams_to_send()
    payload = seg(CMD_PUSH, 0, b"early")
    assert server.receive_datagram(hdr(ACK | DATA) + payload, 0.1) == payload
    assert server.state is State.ESTABLISHED


def test_accept_timeout_without_syn() -> None:
    server = KcpConnection.server(0.0, 2.0)
    server.handle_timer(1.9)
    assert server.state is State.LISTEN
    server.handle_timer(2.0)
    [ev] = events(server)
    assert ev == ConnectionTimedOut("accept", "no SYN from the peer")


def test_rst_during_connect_is_a_refusal() -> None:
    client = KcpConnection.client(CONV, 0.0, 5.0)
    client.receive_datagram(hdr(RST), 0.1)
    [ev] = events(client)
    assert isinstance(ev, ConnectionReset) and "refused" in ev.reason
    assert client.state is State.CLOSED


def test_listener_resets_non_syn_packets() -> None:
    server = KcpConnection.server(0.0, 5.0)
    server.receive_datagram(hdr(ACK | DATA, conv=5) + seg(CMD_PUSH, conv=5, payload=b"x"), 0.0)
    assert server.datagrams_to_send() == [hdr(RST, conv=5)]
    server.receive_datagram(hdr(RST, conv=5), 0.0)
    assert server.datagrams_to_send() == []
    server.receive_datagram(hdr(PING, conv=5), 0.0)
    assert server.datagrams_to_send() == [hdr(RST, conv=5)]
    assert server.state is State.LISTEN


# --------------------------------------------------------------------------- established


def test_data_is_validated_and_handed_over() -> None:
    _client, server = handshake()
    good = seg(CMD_PUSH, 0, b"payload")
    assert server.receive_datagram(hdr(ACK | DATA) + good, 1.0) == good
    assert server.receive_datagram(hdr(ACK | DATA) + seg(CMD_PUSH, 1, b"x", conv=1), 1.0) is None
    assert server.receive_datagram(hdr(ACK | DATA) + b"garbage garbage garbage!", 1.0) is None
    assert server.receive_datagram(hdr(ACK | DATA), 1.0) is None
    assert server.drops.counts["segment_conv"] == 2  # the garbage reads as a segment of another conv
    assert server.datagrams_to_send() == []
    assert server.state is State.ESTABLISHED


def test_unknown_conv_gets_rst_and_leaves_the_connection_alone() -> None:
    _client, server = handshake()
    for flags in (ACK | DATA, SYN, FIN, ACK):
        assert server.receive_datagram(hdr(flags, conv=CONV ^ 1) + seg(CMD_PUSH, conv=CONV ^ 1), 1.0) is None
        assert server.datagrams_to_send() == [hdr(RST, conv=CONV ^ 1)]
    assert server.receive_datagram(hdr(RST, conv=CONV ^ 1), 1.0) is None
    assert server.receive_datagram(hdr(ACK | DATA, src=3), 1.0) is None  # same conv, other session ids
    assert server.datagrams_to_send() == [hdr(RST, src=3)]
    assert server.state is State.ESTABLISHED
    assert events(server) == []


def test_ping_gets_pong_and_pongs_are_silent() -> None:
    client, server = handshake()
    server.receive_datagram(hdr(PING), 1.0)
    assert server.datagrams_to_send() == [hdr(PING | PONG)]
    client.receive_datagram(hdr(PING | PONG), 1.0)
    assert client.datagrams_to_send() == []
    assert client.state is State.ESTABLISHED


def test_pings_every_10s_and_reap_after_60s_of_silence() -> None:
    client, _server = handshake()
    pings = 0
    now = 0.0
    while client.state is State.ESTABLISHED:
        timer = client.get_timer()
        assert timer is not None
        now = timer
        client.handle_timer(now)
        pings += sum(1 for d in client.datagrams_to_send() if d == hdr(PING))
    assert now == pytest.approx(60.0)
    assert pings == 5  # at 10..50; the reap at 60 comes first
    [ev] = events(client)
    assert isinstance(ev, ConnectionTimedOut) and ev.phase == "idle"


def test_any_packet_keeps_the_connection_alive() -> None:
    client, _server = handshake()
    for t in range(30, 300, 30):
        client.receive_datagram(hdr(PING | PONG), float(t))
        client.handle_timer(float(t))
    assert client.state is State.ESTABLISHED


def test_icmp_unreachable_before_established_only_counts() -> None:
    client = KcpConnection.client(CONV, 0.0, 5.0)
    for t in (0.1, 0.5, 1.0, 2.0, 3.0):
        client.port_unreachable(t)  # the peer's NAT may simply not be open yet
    assert client.state is State.SYN_SENT and events(client) == []


def test_icmp_unreachable_resets_an_established_connection_after_a_second_and_three_errors() -> None:
    client, _server = handshake()
    client.datagrams_to_send()
    client.port_unreachable(10.0)
    client.port_unreachable(10.5)
    client.port_unreachable(10.9)
    assert state(client) is State.ESTABLISHED  # 3 errors but only 0.9 s
    # meanwhile it probes every 0.25 s instead of every 10 s
    timer = client.get_timer()
    assert timer is not None and timer <= 10.0 + 0.25 + 1e-9
    client.handle_timer(timer)
    assert hdr(PING) in client.datagrams_to_send()
    client.port_unreachable(11.0)
    assert state(client) is State.CLOSED
    [ev] = events(client)
    assert isinstance(ev, ConnectionReset) and "UDP port is closed" in str(ev)
    assert "ICMP port unreachable for 1.0 s, 4 times" in (client.close_reason or "")


def test_icmp_unreachable_needs_three_errors_even_over_a_long_time() -> None:
    client, _server = handshake()
    client.port_unreachable(10.0)
    client.port_unreachable(15.0)
    assert state(client) is State.ESTABLISHED
    client.port_unreachable(15.1)
    assert state(client) is State.CLOSED


def test_a_packet_from_the_peer_clears_the_suspicion() -> None:
    client, _server = handshake()
    client.port_unreachable(10.0)
    client.port_unreachable(10.6)
    client.receive_datagram(hdr(PING | PONG), 10.7)  # a transient ICMP (a NAT rebooting): the peer is alive
    client.port_unreachable(11.2)
    client.port_unreachable(11.5)
    assert state(client) is State.ESTABLISHED  # counted afresh from 11.2
    client.port_unreachable(12.2)
    assert state(client) is State.CLOSED


def test_half_close_both_ways() -> None:
    client, server = handshake()
    client.close(1.0)
    assert client.state is State.LOCAL_CLOSED
    [fin] = client.datagrams_to_send()
    assert fin == hdr(FIN)
    server.receive_datagram(fin, 1.0)
    assert server.state is State.PEER_CLOSED
    assert events(server) == [PeerFinished()]
    # the server still sends, the client still accepts data
    data = seg(CMD_PUSH, 0, b"late")
    assert client.receive_datagram(hdr(ACK | DATA) + data, 1.5) == data
    # and pings keep working in PEER_CLOSED
    server.receive_datagram(hdr(PING), 1.5)
    assert server.datagrams_to_send() == [hdr(PING | PONG)]
    server.close(2.0)
    assert state(server) is State.CLOSED
    [fin2] = server.datagrams_to_send()
    client.receive_datagram(fin2, 2.0)
    assert state(client) is State.CLOSED
    assert events(client) == [PeerFinished()]
    assert client.close_reason == server.close_reason == "closed"


def test_fin_is_retransmitted_with_backoff_and_duplicate_fin_gets_rst_when_closed() -> None:
    client, server = handshake()
    client.close(0.0)
    client.datagrams_to_send()
    times = []
    now = 0.0
    while now < 30.0:
        timer = client.get_timer()
        assert timer is not None
        now = timer
        client.handle_timer(now)
        if client.datagrams_to_send() == [hdr(FIN)]:
            times.append(round(now, 3))
        client.receive_datagram(hdr(ACK | DATA) + seg(CMD_ACK), now)  # keep it from being reaped
    assert times[:7] == [0.2, 0.6, 1.4, 3.0, 6.2, 12.6, 22.6]  # doubling, capped at the ping interval
    # the peer closed too but its FIN was lost: our retransmitted FIN meets a closed peer
    server.receive_datagram(hdr(FIN), 31.0)
    server.close(31.0)
    server.datagrams_to_send()
    server.receive_datagram(hdr(FIN), 32.0)
    assert server.datagrams_to_send() == [hdr(RST)]
    client.receive_datagram(hdr(RST), 32.0)
    assert client.state is State.CLOSED
    assert isinstance(events(client)[-1], ConnectionReset)


def test_passive_closers_fin_is_repeated_until_the_peer_answers() -> None:
    client, server = handshake()
    client.close(1.0)
    server.receive_datagram(client.datagrams_to_send()[0], 1.0)
    server.close(1.0)
    assert server.datagrams_to_send() == [hdr(FIN)]  # lost on the way
    assert state(server) is State.CLOSED and not server.settled
    server.handle_timer(1.2)
    [again] = server.datagrams_to_send()
    client.receive_datagram(again, 1.2)  # LOCAL_CLOSED -> CLOSED
    assert state(client) is State.CLOSED and client.settled
    server.handle_timer(1.6)
    client.receive_datagram(server.datagrams_to_send()[0], 1.6)  # a duplicate into CLOSED ...
    [rst] = client.datagrams_to_send()
    assert rst == hdr(RST)
    server.receive_datagram(rst, 1.6)  # ... is answered with RST, which settles the server
    assert server.settled and server.get_timer() is None
    assert server.close_reason == "closed"


def test_passive_closers_fin_repeats_are_bounded() -> None:
    client, server = handshake()
    client.close(0.0)
    server.receive_datagram(client.datagrams_to_send()[0], 0.0)
    server.close(0.0)
    sent = len(server.datagrams_to_send())
    now = 0.0
    while (timer := server.get_timer()) is not None:
        now = timer
        server.handle_timer(now)
        sent += len(server.datagrams_to_send())
    assert sent == 1 + KcpTimers().final_fin_retries
    assert server.settled


def test_rst_resets_an_established_connection() -> None:
    client, _server = handshake()
    client.receive_datagram(hdr(RST), 1.0)
    assert client.state is State.CLOSED
    assert events(client) == [ConnectionReset("connection reset by peer (RST)")]
    assert client.receive_datagram(hdr(ACK | DATA) + seg(CMD_PUSH, 0, b"x"), 1.1) is None
    client.receive_datagram(hdr(PING), 1.2)
    assert client.datagrams_to_send() == [hdr(RST)]


def test_abort_sends_rst_once() -> None:
    client, _server = handshake()
    client.abort(1.0, "bye")
    client.abort(1.1, "again")
    assert client.datagrams_to_send() == [hdr(RST)]
    assert client.close_reason == "bye"
    assert events(client) == []


def test_close_before_established_is_an_abort() -> None:
    client = KcpConnection.client(CONV, 0.0, 5.0)
    client.datagrams_to_send()
    client.close(0.1)
    assert client.state is State.CLOSED
    assert client.datagrams_to_send() == [hdr(RST)]
    listener = KcpConnection.server(0.0, 5.0)
    listener.close(0.1)
    assert listener.state is State.CLOSED and listener.datagrams_to_send() == []


def test_unexpected_flags_are_counted_not_answered() -> None:
    _client, server = handshake()
    server.receive_datagram(hdr(SYN), 1.0)
    server.receive_datagram(hdr(PONG), 1.0)
    server.receive_datagram(b"", 1.0)
    server.receive_datagram(b"short", 1.0)
    server.receive_datagram(hdr(0x80), 1.0)
    assert server.datagrams_to_send() == []
    assert server.drops.counts == {"unexpected_flags": 2, "empty": 1, "short": 1, "unknown_flags": 1}
    assert server.state is State.ESTABLISHED


# --------------------------------------------------------------------------- meter


def test_meter_counts_retransmits_and_rtt() -> None:
    m = KcpMeter()
    m.on_output(seg(CMD_PUSH, 0, b"a") + seg(CMD_PUSH, 1, b"b"))
    m.on_output(seg(CMD_PUSH, 2, b"c"))
    m.on_output(seg(CMD_PUSH, 1, b"b"))  # resend
    m.on_output(seg(CMD_ACK, 9) + seg(CMD_ACK, 10))
    assert (m.segments_sent, m.retransmits, m.acks_sent, m.datagrams_sent) == (4, 1, 2, 4)
    m.on_input(scan_segments(seg(CMD_ACK, 0, ts=1000), CONV), 1040)
    assert m.rtt_ms == 40 and m.srtt_ms == 40.0
    m.on_input(scan_segments(seg(CMD_ACK, 1, ts=1100), CONV), 1120)
    assert m.rtt_ms == 20 and m.srtt_ms == pytest.approx(37.5)
    m.on_input(scan_segments(seg(CMD_ACK, 1, ts=5000), CONV), 1120)  # ts from the future: ignored
    assert m.rtt_ms == 20


def test_meter_handles_sequence_wraparound() -> None:
    m = KcpMeter()
    m.on_output(seg(CMD_PUSH, 0xFFFFFFFF, b"a"))
    m.on_output(seg(CMD_PUSH, 0, b"b"))
    m.on_output(seg(CMD_PUSH, 0xFFFFFFFF, b"a"))
    assert m.retransmits == 1


def test_wrap_segments_prefixes_the_data_header() -> None:
    client, _server = handshake()
    s = seg(CMD_PUSH, 0, b"x")
    assert client.wrap_segments(s) == hdr(DATA | ACK) + s
    assert client.meter.wire_bytes_sent == HEADER_SIZE + len(s)


# --------------------------------------------------------------------------- with the real ikcp


def make_kcp(conv: int, sink: list[bytes]) -> KCP:
    k = KCP(
        conv - (1 << 32) if conv >= 1 << 31 else conv,
        max_transmission=1200,
        no_delay=True,
        update_interval=10,
        resend_count=2,
        no_congestion_control=True,
        send_window_size=128,
        receive_window_size=128,
    )
    k.include_outbound_handler(lambda _k, data: sink.append(data))
    return k


def test_in_memory_link_with_loss_reorder_and_duplicates_delivers_exactly() -> None:
    """Core + ikcp end to end over a simulated lossy path, in fake time."""
    rng = random.Random(7)
    client, server = handshake()
    out_a: list[bytes] = []
    out_b: list[bytes] = []
    ka, kb = make_kcp(CONV, out_a), make_kcp(CONV, out_b)
    message = rng.randbytes(300_000)
    for i in range(0, len(message), 1176):
        ka.enqueue(message[i : i + 1176])
    received = bytearray()
    in_flight: list[tuple[float, KcpConnection, KCP, bytes]] = []
    now = 0.0
    while len(received) < len(message) and now < 60.0:
        now += 0.01
        ms = client.now_ms(now)
        for k in (ka, kb):
            k.update(ms)
        for sink, conn, dst_conn, dst in ((out_a, client, server, kb), (out_b, server, client, ka)):
            for s in sink:
                d = conn.wrap_segments(s)
                if rng.random() < 0.1:
                    continue  # lost
                copies = 2 if rng.random() < 0.05 else 1
                for _ in range(copies):
                    in_flight.append((now + rng.uniform(0.005, 0.03), dst_conn, dst, d))
            sink.clear()
        due = [x for x in in_flight if x[0] <= now]
        in_flight = [x for x in in_flight if x[0] > now]
        for _t, conn, k, d in due:
            segments = conn.receive_datagram(d, now)
            if segments is not None:
                k.receive(segments)
        while kb.get_next_packet_size() >= 0:
            received += kb.get_received()
    assert bytes(received) == message
    assert client.meter.retransmits > 0
    assert server.meter.segments_received >= len(message) // 1176


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=80), max_size=20))
def test_junk_never_crashes_and_never_delivers_bytes(junk: list[bytes]) -> None:
    _client, server = handshake()
    sink: list[bytes] = []
    k = make_kcp(CONV, sink)
    k.update(0)
    for i, d in enumerate(junk):
        # Half of the junk gets a plausible header so the segment validator is exercised too.
        datagram = hdr(ACK | DATA, conv=CONV ^ (i % 3 == 2)) + d if i % 2 else d
        segments = server.receive_datagram(datagram, 1.0 + i)
        if segments is not None:
            k.receive(segments)
        server.datagrams_to_send()
    k.update(5000)
    assert k.get_next_packet_size() == -1


def test_segment_from_other_conv_inside_right_header_is_dropped_before_ikcp() -> None:
    _client, server = handshake()
    forged = hdr(ACK | DATA) + seg(CMD_PUSH, 0, b"ok") + seg(CMD_PUSH, 1, b"evil", conv=CONV + 1)
    assert server.receive_datagram(forged, 1.0) is None
    assert struct.unpack_from("<I", forged, HEADER_SIZE)[0] == CONV
