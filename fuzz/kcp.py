"""The KCP input path: kcp-sys header codec, ikcp segment validator, KcpConnection, then real ikcp.

Input: [cfg][records: op, len u16, datagram]. cfg bit 0: we are the listener (else the
connector, conv CONV); bit 1: the connector sends connect data with its SYN. op bits 0-2
move the clock (0 ms .. 30 s), bit 3 runs the timers after the datagram, bit 4 closes our
side, bit 5 aborts, bit 6 reports an ICMP port unreachable, bit 7 makes ikcp queue data.
Segments that KcpConnection lets through go into a real ikcp control block (the C library),
as the shell does, and what ikcp sends back goes out through wrap_segments.

Invariants: decode_packet and scan_segments raise only PacketError, and a decoded header
re-encodes to the bytes it came from; receive_datagram never raises; what it returns is the
datagram's own segments, valid by scan_segments, and ikcp accepts them without an error;
answering one datagram sends at most one datagram, never larger than it (so a spoofed
source cannot amplify); every datagram we send is a well-formed kcp-sys packet, and the
segments we send pass our own validator; a closed connection stays closed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fuzz._common import Reader, entry, instrumented, record

with instrumented():
    from kcp.extension import KCP

    from agent.kcp import core as kcp_core
    from agent.kcp import release as kcp_release
    from agent.kcp.core import (
        ACK,
        DATA,
        HEADER_SIZE,
        ConnectionReset,
        ConnectionTimedOut,
        Established,
        KcpConnection,
        PacketError,
        PeerFinished,
        State,
        decode_packet,
        scan_segments,
    )

CONV = 0x8BADF00D
STEPS = (0.0, 0.001, 0.01, 0.2, 1.0, 3.0, 10.0, 30.0)
TIMEOUT = 5.0
EVENTS = (Established, PeerFinished, ConnectionReset, ConnectionTimedOut)


def make_kcp(conv: int, output: Callable[[bytes], object] = lambda _seg: None) -> Any:
    """An ikcp control block configured as the shell configures it; `output` gets each segment buffer."""
    kcp = KCP(conv - (1 << 32) if conv >= 1 << 31 else conv, max_transmission=1400, no_delay=True)

    def handler(_kcp: KCP, seg: bytes) -> None:
        output(bytes(seg))

    kcp.include_outbound_handler(handler)
    return kcp


def check_codec(raw: bytes, conv: int) -> None:
    try:
        header, payload = decode_packet(raw)
        assert header.encode() + payload == raw
    except PacketError as exc:
        assert exc.reason
    try:
        scan = scan_segments(raw[HEADER_SIZE:], conv)
        assert scan.push_bytes <= len(raw)
    except PacketError as exc:
        assert exc.reason


def TestOneInput(data: bytes) -> None:
    r = Reader(data)
    cfg = r.byte()
    now = 100.0
    if cfg & 1:
        conn = KcpConnection.server(now, TIMEOUT)
    else:
        conn = KcpConnection(
            is_client=True,
            now=now,
            timeout=TIMEOUT,
            conv=CONV,
            src_session_id=7,
            connect_data=b"hello" if cfg & 2 else b"",
        )
    for out in conn.datagrams_to_send():
        decode_packet(out)
    ikcp: list[Any] = []  # the control block, created at the first segments as the shell does
    try:
        feed(r, conn, now, ikcp)
    finally:
        for k in ikcp:
            kcp_release.release(k, conn.conv or 0)


def feed(r: Reader, conn: KcpConnection, now: float, ikcp: list[Any]) -> None:
    was_closed = False
    sent: list[bytes] = []
    while r:
        op = r.byte()
        datagram = r.take(r.u16())
        now += STEPS[op & 7]
        check_codec(datagram, CONV)
        segments = conn.receive_datagram(datagram, now)
        replies = conn.datagrams_to_send()
        assert len(replies) <= 1, f"one datagram provoked {len(replies)}"
        for reply in replies:
            assert len(reply) <= len(datagram), f"{len(reply)}-byte answer to {len(datagram)} bytes"
            decode_packet(reply)
        if segments is not None:
            assert conn.conv is not None
            assert datagram[HEADER_SIZE:] == segments and datagram[12] & DATA
            scan_segments(segments, conn.conv)
            if not ikcp:
                ikcp.append(make_kcp(conn.conv, lambda seg: sent.append(conn.wrap_segments(seg))))
            kcp = ikcp[0]
            kcp.receive(segments)
            if op & 128:
                kcp.enqueue(datagram[:200] or b"x")
            kcp.update(conn.now_ms(now))
            for _ in range(64):
                if kcp.get_next_packet_size() < 0:
                    break
                kcp.get_received()
            for out in sent:
                header, payload = decode_packet(out)
                assert header.flags == DATA | ACK and header.conv == conn.conv
                scan_segments(payload, conn.conv)
            sent.clear()
        if op & 8:
            conn.handle_timer(now)
        if op & 16:
            conn.close(now)
        if op & 32:
            conn.abort(now, "fuzz")
        if op & 64:
            conn.port_unreachable(now)
        for out in conn.datagrams_to_send():
            header, _ = decode_packet(out)
            assert conn.conv is None or header.conv == conn.conv or header.flags == kcp_core.RST
        while (event := conn.next_event()) is not None:
            assert isinstance(event, EVENTS)
        assert not (was_closed and conn.state is not State.CLOSED), "a closed connection came back"
        was_closed = conn.state is State.CLOSED
        timer = conn.get_timer()
        assert timer is None or timer == timer  # not NaN


def seeds() -> list[bytes]:
    """A real exchange between a connector and a listener, with ikcp moving data both ways."""
    t = 100.0
    c = KcpConnection(is_client=True, now=t, timeout=TIMEOUT, conv=CONV, src_session_id=7, connect_data=b"hello")
    s = KcpConnection.server(t, TIMEOUT)
    (syn,) = c.datagrams_to_send()
    s.receive_datagram(syn, t)
    (syn_ack,) = s.datagrams_to_send()
    c.receive_datagram(syn_ack, t)
    (ack_data,) = c.datagrams_to_send()
    s.receive_datagram(ack_data, t)
    sent: dict[str, list[bytes]] = {"c": [], "s": []}
    kc = make_kcp(CONV, lambda seg: sent["c"].append(c.wrap_segments(seg)))
    ks = make_kcp(CONV, lambda seg: sent["s"].append(s.wrap_segments(seg)))
    kc.enqueue(b"GET / HTTP/1.0\r\n\r\n")
    kc.update(10)
    kc.flush()
    for d in sent["c"]:
        ks.receive(d[HEADER_SIZE:])
    ks.enqueue(b"x" * 3000)
    ks.update(20)
    ks.flush()
    c.close(t)
    (fin_c,) = c.datagrams_to_send()
    s.close(t)
    (fin_s,) = s.datagrams_to_send()
    kcp_release.release(kc, CONV)
    kcp_release.release(ks, CONV)
    ping = syn[:13] + bytes((kcp_core.PING, 0))
    to_server = [syn, ack_data, *sent["c"], ping, fin_c]
    to_client = [syn_ack, *sent["s"], fin_s]

    def records(datagrams: list[bytes], op: int) -> bytes:
        return b"".join(record(bytes((op,)), d) for d in datagrams)

    return [
        bytes((1,)) + records(to_server, 1),
        bytes((1,)) + records(to_server, 1 | 8) + record(bytes((0x10 | 7,))),
        bytes((0,)) + records(to_client, 2),
        bytes((2,)) + records(to_client, 3 | 8 | 16),
        bytes((0,)) + record(bytes((7 | 8,))) + records([syn_ack], 0),
        bytes((1,)) + records(to_server[:3], 1 | 128) + records([b""] * 4, 2 | 64) + records([to_server[3]], 1),
    ]


main = entry("kcp", TestOneInput, seeds)

if __name__ == "__main__":
    main()
