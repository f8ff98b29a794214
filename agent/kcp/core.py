"""RustDesk's KCP framing and connection state machine, sans-IO (protocol notes section 8).

RustDesk never puts raw KCP on the wire: every datagram starts with kcp-sys's 14-byte
little-endian header (conv, src_session_id, dst_session_id, flags, reserved) and the KCP
segments ride behind it in DATA|ACK packets. A tiny connection FSM (SYN -> SYN|ACK ->
ACK|DATA, FIN per direction, RST, PING/PONG liveness) runs on those flags. This module
owns exactly that: header codec, a strict validator for the ikcp segments behind the
header (so hostile bytes are dropped here, whole, before the C control block sees them),
a meter that reads RTT and retransmissions off the segments we send and receive, and the
`KcpConnection` state machine. Time is always passed in (seconds, any monotonic origin);
nothing here touches a socket or a clock. The asyncio shell is agent/kcp/stream.py.

Where we differ from kcp-sys on purpose: the connector retransmits its SYN every 200 ms
until the timeout (RustDesk sends it once), the listener retransmits SYN|ACK a bounded
number of times, a FIN is retransmitted with backoff until the peer's FIN or RST, and
datagrams with unknown flag bits are dropped instead of interpreted.
"""

from __future__ import annotations

import enum
import logging
import struct
from collections import deque
from dataclasses import dataclass
from typing import NamedTuple

from agent.common.stats import DropStats

log = logging.getLogger("punchthrough.kcp")

# --------------------------------------------------------------------------- kcp-sys header

HEADER = struct.Struct("<IIIBB")
HEADER_SIZE = HEADER.size
"""14 bytes: conv u32, src_session_id u32, dst_session_id u32, flags u8, reserved u8."""

SYN = 0x01
ACK = 0x02
FIN = 0x04
DATA = 0x08
RST = 0x10
PING = 0x20
PONG = 0x40
KNOWN_FLAGS = SYN | ACK | FIN | DATA | RST | PING | PONG

_FLAG_NAMES = ((SYN, "SYN"), (ACK, "ACK"), (FIN, "FIN"), (DATA, "DATA"), (RST, "RST"), (PING, "PING"), (PONG, "PONG"))

U32 = 0xFFFFFFFF


def flag_names(flags: int) -> str:
    """'SYN|ACK' for logs and errors; unknown bits show as hex."""
    names = [name for bit, name in _FLAG_NAMES if flags & bit]
    if flags & ~KNOWN_FLAGS & 0xFF:
        names.append(f"0x{flags & ~KNOWN_FLAGS & 0xFF:02x}")
    return "|".join(names) or "0"


class PacketError(ValueError):
    """A datagram or segment that must be dropped; `reason` is the short counter name."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class PacketHeader:
    conv: int
    src_session_id: int = 0
    dst_session_id: int = 0
    flags: int = 0
    reserved: int = 0

    def encode(self) -> bytes:
        return HEADER.pack(self.conv, self.src_session_id, self.dst_session_id, self.flags, self.reserved)

    @property
    def conn_id(self) -> tuple[int, int, int]:
        """kcp-sys identifies a connection by these three, as found in the header (never swapped)."""
        return (self.conv, self.src_session_id, self.dst_session_id)


def encode_packet(header: PacketHeader, payload: bytes = b"") -> bytes:
    return header.encode() + payload


def decode_packet(data: bytes) -> tuple[PacketHeader, bytes]:
    """Split a datagram into header and payload; raises PacketError('empty'|'short'|'unknown_flags')."""
    if not data:
        raise PacketError("empty")
    if len(data) < HEADER_SIZE:
        raise PacketError("short", f"{len(data)} bytes")
    conv, src, dst, flags, reserved = HEADER.unpack_from(data)
    if flags & ~KNOWN_FLAGS:
        raise PacketError("unknown_flags", f"0x{flags:02x}")
    return PacketHeader(conv, src, dst, flags, reserved), data[HEADER_SIZE:]


# --------------------------------------------------------------------------- ikcp segments

SEGMENT = struct.Struct("<IBBHIIII")
SEGMENT_OVERHEAD = SEGMENT.size
"""24 bytes: conv u32, cmd u8, frg u8, wnd u16, ts u32, sn u32, una u32, len u32 (ikcp_encode_seg)."""

CMD_PUSH = 81
CMD_ACK = 82
CMD_WASK = 83
CMD_WINS = 84
_CMDS = frozenset((CMD_PUSH, CMD_ACK, CMD_WASK, CMD_WINS))


class SegmentScan(NamedTuple):
    pushes: int
    push_bytes: int
    acks: int
    ack_ts: int | None
    """ts echoed by the last ACK segment (our send time of the acked segment), for RTT."""


def scan_segments(payload: bytes, conv: int) -> SegmentScan:
    """Validate every ikcp segment of a DATA payload, all or nothing.

    ikcp_input stops at the first bad segment but has already applied the ones before it;
    checking the whole datagram first means a half-forged datagram changes nothing. Stricter
    than ikcp in three places that no kcp-sys peer ever exercises: trailing bytes after the
    last segment, a nonzero fragment count (kcp-sys runs stream mode, frg is always 0) and a
    conv that differs from the header's.
    """
    size = len(payload)
    if size < SEGMENT_OVERHEAD:
        raise PacketError("segment_short", f"{size} bytes")
    unpack = SEGMENT.unpack_from
    offset = 0
    pushes = push_bytes = acks = 0
    ack_ts: int | None = None
    while offset < size:
        if size - offset < SEGMENT_OVERHEAD:
            raise PacketError("segment_trailing", f"{size - offset} bytes")
        seg_conv, cmd, frg, _wnd, ts, _sn, _una, length = unpack(payload, offset)
        if seg_conv != conv:
            raise PacketError("segment_conv", f"{seg_conv:#x} != {conv:#x}")
        if cmd not in _CMDS:
            raise PacketError("segment_cmd", str(cmd))
        offset += SEGMENT_OVERHEAD
        if length > size - offset:
            raise PacketError("segment_length", f"{length} > {size - offset}")
        if cmd == CMD_PUSH:
            if frg:
                raise PacketError("segment_frg", str(frg))
            pushes += 1
            push_bytes += length
        elif cmd == CMD_ACK:
            acks += 1
            ack_ts = ts
        offset += length
    return SegmentScan(pushes, push_bytes, acks, ack_ts)


class KcpMeter:
    """Counters and RTT read off the segments, because the `kcp` binding hides ikcp's own fields.

    Retransmissions: ikcp gives sequence numbers in order and sends each for the first time
    in that order, so a PUSH whose sn is below the highest sn already sent is a resend.
    RTT: an ACK echoes the ts of the segment it acknowledges, which is our own clock at
    send time; srtt/rttvar follow RFC 6298 like ikcp_update_ack.
    """

    __slots__ = (
        "_snd_max",
        "acks_received",
        "acks_sent",
        "datagrams_received",
        "datagrams_sent",
        "retransmits",
        "rtt_ms",
        "rttvar_ms",
        "segments_received",
        "segments_sent",
        "srtt_ms",
        "wire_bytes_received",
        "wire_bytes_sent",
    )

    def __init__(self) -> None:
        self.datagrams_sent = 0
        self.datagrams_received = 0
        self.wire_bytes_sent = 0
        self.wire_bytes_received = 0
        self.segments_sent = 0
        self.segments_received = 0
        self.acks_sent = 0
        self.acks_received = 0
        self.retransmits = 0
        self.rtt_ms: int | None = None
        self.srtt_ms: float | None = None
        self.rttvar_ms: float | None = None
        self._snd_max: int | None = None

    def on_output(self, segments: bytes) -> None:
        """Account one ikcp output buffer (one datagram's worth of segments we send)."""
        self.datagrams_sent += 1
        self.wire_bytes_sent += HEADER_SIZE + len(segments)
        unpack = SEGMENT.unpack_from
        offset = 0
        size = len(segments)
        while size - offset >= SEGMENT_OVERHEAD:
            _conv, cmd, _frg, _wnd, _ts, sn, _una, length = unpack(segments, offset)
            if cmd == CMD_PUSH:
                self.segments_sent += 1
                high = self._snd_max
                if high is not None and (sn - high) & U32 >= 0x80000000:
                    self.retransmits += 1
                else:
                    self._snd_max = (sn + 1) & U32
            elif cmd == CMD_ACK:
                self.acks_sent += 1
            offset += SEGMENT_OVERHEAD + length

    def on_input(self, scan: SegmentScan, now_ms: int) -> None:
        self.segments_received += scan.pushes
        self.acks_received += scan.acks
        if scan.ack_ts is not None:
            rtt = (now_ms - scan.ack_ts) & U32
            if rtt < 0x80000000:
                self._rtt_sample(rtt)

    def _rtt_sample(self, rtt: int) -> None:
        self.rtt_ms = rtt
        if self.srtt_ms is None or self.rttvar_ms is None:
            self.srtt_ms = float(rtt)
            self.rttvar_ms = rtt / 2
            return
        delta = abs(rtt - self.srtt_ms)
        self.rttvar_ms = (3 * self.rttvar_ms + delta) / 4
        self.srtt_ms = (7 * self.srtt_ms + rtt) / 8


# --------------------------------------------------------------------------- connection FSM


class State(enum.Enum):
    LISTEN = "listen"
    SYN_SENT = "syn_sent"
    SYN_RECEIVED = "syn_received"
    ESTABLISHED = "established"
    LOCAL_CLOSED = "local_closed"
    """We sent FIN (our send half is done); the peer may still send."""
    PEER_CLOSED = "peer_closed"
    """The peer sent FIN; we may still send."""
    CLOSED = "closed"


DATA_STATES = frozenset((State.ESTABLISHED, State.LOCAL_CLOSED, State.PEER_CLOSED))
"""States in which DATA payloads are fed to the KCP control block."""


@dataclass(frozen=True, slots=True)
class KcpTimers:
    syn_interval: float = 0.2
    """Connector: SYN retransmit period until SYN|ACK or the connect timeout."""
    syn_ack_interval: float = 0.2
    """Listener: SYN|ACK retransmit period while waiting for ACK|DATA ..."""
    syn_ack_retries: int = 10
    """... at most this many times (bounds what one spoofed SYN can buy)."""
    ping_interval: float = 10.0
    idle_timeout: float = 60.0
    """Connection reaped after this long without any packet from the peer."""
    fin_interval: float = 0.2
    """First FIN retransmit; doubles up to `ping_interval` until the peer's FIN or RST."""
    final_fin_retries: int = 6
    """The passive closer's FIN (PEER_CLOSED -> CLOSED) is re-sent up to this many times until the
    peer's RST or FIN confirms it: a kcp-sys peer (and we) answer a duplicate FIN in Closed with RST."""
    unreachable_timeout: float = 1.0
    """An established connection is reset once ICMP port unreachable has answered our datagrams for
    this long (at least `unreachable_errors` times) with no packet from the peer in between: the peer's
    socket is gone (its process died), so waiting out `idle_timeout` would only hang the application."""
    unreachable_errors: int = 3
    unreachable_probe: float = 0.25
    """While ICMP errors come back, PING this often, so an idle connection confirms (a PONG clears
    the suspicion) or condemns the peer within about `unreachable_timeout`."""


@dataclass(frozen=True, slots=True)
class Established:
    conv: int


@dataclass(frozen=True, slots=True)
class PeerFinished:
    """The peer's FIN: its send half is complete (all of its data was acknowledged before it sent FIN)."""


@dataclass(frozen=True, slots=True)
class ConnectionReset:
    reason: str


@dataclass(frozen=True, slots=True)
class ConnectionTimedOut:
    phase: str
    """"connect", "accept" or "idle"."""
    reason: str


Event = Established | PeerFinished | ConnectionReset | ConnectionTimedOut


class KcpConnection:
    """One kcp-sys connection: either end, from handshake to close.

    `receive_datagram` returns the ikcp segments (already validated) that the shell must
    feed to the control block, or None; everything else it learns becomes events
    (`next_event`) and control packets (`datagrams_to_send`). The shell wraps every ikcp
    output with `wrap_segments`. `handle_timer` runs retransmits, pings and reaping.
    """

    def __init__(
        self,
        *,
        is_client: bool,
        now: float,
        timeout: float,
        conv: int | None = None,
        src_session_id: int = 0,
        dst_session_id: int = 0,
        timers: KcpTimers | None = None,
        connect_data: bytes = b"",
    ) -> None:
        self.is_client = is_client
        self.timers = timers or KcpTimers()
        self.meter = KcpMeter()
        self.drops = DropStats()
        self.close_reason: str | None = None
        self._epoch = now
        self._events: deque[Event] = deque()
        self._out: list[bytes] = []
        self._conv: int | None = None
        self._src = src_session_id & U32
        self._dst = dst_session_id & U32
        self._data_header = b""
        self._deadline: float | None = now + timeout
        self._last_rx = now
        self._next_ping = 0.0
        self._syn_next = 0.0
        self._syn_sent = 0
        self._syn_ack_left = 0
        self._syn_ack_next = 0.0
        self._fin_next = 0.0
        self._fin_backoff = self.timers.fin_interval
        self._final_fin_left = 0
        self._unreachable_since: float | None = None
        self._unreachable_errors = 0
        self._connect_data = connect_data
        if is_client:
            if conv is None:
                raise ValueError("the connecting side picks the conv")
            self._set_conv(conv & U32)
            self.state = State.SYN_SENT
            self._send_syn(now)
        else:
            self.state = State.LISTEN

    # -- construction helpers

    @classmethod
    def client(
        cls,
        conv: int,
        now: float,
        timeout: float,
        *,
        src_session_id: int = 0,
        dst_session_id: int = 0,
        timers: KcpTimers | None = None,
    ) -> KcpConnection:
        return cls(
            is_client=True,
            now=now,
            timeout=timeout,
            conv=conv,
            src_session_id=src_session_id,
            dst_session_id=dst_session_id,
            timers=timers,
        )

    @classmethod
    def server(cls, now: float, timeout: float, *, timers: KcpTimers | None = None) -> KcpConnection:
        return cls(is_client=False, now=now, timeout=timeout, timers=timers)

    # -- read-only views

    @property
    def conv(self) -> int | None:
        return self._conv

    @property
    def conn_id(self) -> tuple[int, int, int] | None:
        return None if self._conv is None else (self._conv, self._src, self._dst)

    def now_ms(self, now: float) -> int:
        """The millisecond clock handed to ikcp (u32, wraps after 49 days like ikcp expects)."""
        return int((now - self._epoch) * 1000.0) & U32

    # -- outputs

    def datagrams_to_send(self) -> list[bytes]:
        out, self._out = self._out, []
        return out

    def has_datagrams(self) -> bool:
        return bool(self._out)

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def wrap_segments(self, segments: bytes) -> bytes:
        """One ikcp output buffer -> one DATA|ACK datagram (hot path)."""
        self.meter.on_output(segments)
        return self._data_header + segments

    # -- input

    def receive_datagram(self, data: bytes, now: float) -> bytes | None:
        """Handle one datagram from the peer; returns ikcp segments to feed, or None."""
        size = len(data)
        if size < HEADER_SIZE:
            self._drop("empty" if size == 0 else "short", now)
            return None
        conv, src, dst, flags, _reserved = HEADER.unpack_from(data)
        if flags & ~KNOWN_FLAGS:
            self._drop("unknown_flags", now)
            return None
        self.meter.datagrams_received += 1
        self.meter.wire_bytes_received += size
        state = self.state

        if self._conv is None:
            self._receive_listening(conv, src, dst, flags, now)
            return None
        if conv != self._conv or src != self._src or dst != self._dst:
            self._receive_foreign(conv, src, dst, flags, now)
            return None
        self._last_rx = now
        self._unreachable_since = None

        if flags & PING:
            if not flags & PONG:
                # Answer until fully closed: a half-closed connection is still delivering.
                reply = (flags | PONG) if state is not State.CLOSED else ((flags & ~PING) | RST)
                self._out.append(HEADER.pack(conv, src, dst, reply & KNOWN_FLAGS, 0))
            return None

        segments: bytes | None = None
        if flags & DATA and size > HEADER_SIZE:
            if state in DATA_STATES or (state is State.SYN_RECEIVED and flags == ACK | DATA):
                segments = data[HEADER_SIZE:]
                try:
                    scan = scan_segments(segments, conv)
                except PacketError as exc:
                    self._drop(exc.reason, now)
                    segments = None
                else:
                    self.meter.on_input(scan, self.now_ms(now))
            else:
                self._drop("data_in_" + state.value, now)

        self._transition(flags, now)
        return segments

    def _receive_listening(self, conv: int, src: int, dst: int, flags: int, now: float) -> None:
        if flags == SYN and self.state is State.LISTEN:
            self._set_conv(conv)
            self._src, self._dst = src, dst
            self._last_rx = now
            self.state = State.SYN_RECEIVED
            self._syn_ack_left = self.timers.syn_ack_retries
            self._syn_ack_next = now + self.timers.syn_ack_interval
            self._out.append(HEADER.pack(conv, src, dst, SYN | ACK, 0))
            return
        self._receive_foreign(conv, src, dst, flags, now)

    def _receive_foreign(self, conv: int, src: int, dst: int, flags: int, now: float) -> None:
        """A packet for a connection we do not have: RST it (never an RST, never larger than it)."""
        if flags & RST:
            self._drop("rst_unknown_conn", now)
            return
        self._drop("unknown_conn", now)
        self._out.append(HEADER.pack(conv, src, dst, RST, 0))

    def _transition(self, flags: int, now: float) -> None:
        state = self.state
        if state is State.ESTABLISHED:
            if flags == ACK | DATA:
                return
            if flags == SYN | ACK:
                if self.is_client:  # our ACK|DATA was lost; the listener is still in SYN_RECEIVED
                    self._out.append(self._header(ACK | DATA))
                return
            if flags & RST:
                self._reset("connection reset by peer (RST)")
            elif flags & FIN:
                self.state = State.PEER_CLOSED
                self._events.append(PeerFinished())
            else:
                self._drop("unexpected_flags", now)
        elif state is State.SYN_SENT:
            if flags == SYN | ACK:
                self._out.append(self._header(ACK | DATA))
                self._establish(now)
            elif flags & RST:
                self._reset("connection refused by peer (RST)")
            elif flags & FIN:
                self._out.append(self._header(RST))
                self._reset("peer sent FIN during the handshake")
            else:
                self._drop("unexpected_flags", now)
        elif state is State.SYN_RECEIVED:
            if flags == ACK | DATA:
                self._establish(now)
            elif flags == SYN:
                self._out.append(self._header(SYN | ACK))
            elif flags & RST:
                self._reset("connection reset by peer during the handshake (RST)")
            elif flags & FIN:
                self._out.append(self._header(RST))
                self._reset("peer sent FIN during the handshake")
            else:
                self._drop("unexpected_flags", now)
        elif state is State.LOCAL_CLOSED:
            if flags & RST:
                self._reset("connection reset by peer (RST)")
            elif flags & FIN:
                self.state = State.CLOSED
                self.close_reason = "closed"
                self._deadline = None
                self._events.append(PeerFinished())
            elif not flags & DATA:
                self._drop("unexpected_flags", now)
        elif state is State.PEER_CLOSED:
            if flags & RST:
                self._reset("connection reset by peer (RST)")
            elif not flags & (DATA | FIN):
                self._drop("unexpected_flags", now)
        elif state is State.CLOSED:
            if flags & (FIN | RST):
                self._final_fin_left = 0  # the peer has seen our FIN (or is gone): settled
            if flags & FIN and not flags & RST:
                # The peer re-sends FIN because our last FIN was lost: tell it to finish now.
                self._out.append(self._header(RST))
            elif not flags & RST:
                self._drop("after_close", now)

    # -- local actions

    def close(self, now: float) -> None:
        """Our send half is finished and fully acknowledged: send FIN.

        Established -> LOCAL_CLOSED (the peer may go on sending), PEER_CLOSED -> CLOSED.
        Before the handshake completes this is an abort.
        """
        state = self.state
        if state is State.ESTABLISHED:
            self.state = State.LOCAL_CLOSED
            self._out.append(self._header(FIN))
            self._fin_backoff = self.timers.fin_interval
            self._fin_next = now + self._fin_backoff
        elif state is State.PEER_CLOSED:
            self.state = State.CLOSED
            self.close_reason = "closed"
            self._deadline = None
            self._out.append(self._header(FIN))
            self._final_fin_left = self.timers.final_fin_retries
            self._fin_backoff = self.timers.fin_interval
            self._fin_next = now + self._fin_backoff
        elif state in (State.LISTEN, State.SYN_SENT, State.SYN_RECEIVED):
            self.abort(now, "closed before the handshake completed")

    def abort(self, now: float, reason: str = "aborted") -> None:
        """Give up at once: RST to the peer (if we know the connection), no events."""
        if self.state is State.CLOSED:
            return
        if self._conv is not None and self.state is not State.LISTEN:
            self._out.append(self._header(RST))
        self.state = State.CLOSED
        self.close_reason = reason
        self._deadline = None
        self._final_fin_left = 0

    def port_unreachable(self, now: float) -> None:
        """The kernel reported ICMP port unreachable for a datagram we sent (ECONNREFUSED on the
        connected socket). Before the handshake completes, or after the close, it only counts as a
        drop (the peer's NAT may not be open yet; RustDesk's punch ignores it too). Once established,
        the peer is probed every `unreachable_probe` seconds, and reset (a ConnectionReset event)
        when the errors go on for `unreachable_timeout` with nothing from the peer."""
        self._drop("icmp_unreachable", now)
        if self.state not in DATA_STATES:
            return
        if self._unreachable_since is None:
            self._unreachable_since = now
            self._unreachable_errors = 0
        self._unreachable_errors += 1
        lasted = now - self._unreachable_since
        if lasted >= self.timers.unreachable_timeout and self._unreachable_errors >= self.timers.unreachable_errors:
            self._reset(
                f"the peer's UDP port is closed (ICMP port unreachable for {lasted:.1f} s, "
                f"{self._unreachable_errors} times, and nothing from the peer)"
            )
            return
        if self.state is State.LOCAL_CLOSED:
            self._fin_next = min(self._fin_next, now + self.timers.unreachable_probe)
        else:
            self._next_ping = min(self._next_ping, now + self.timers.unreachable_probe)

    @property
    def settled(self) -> bool:
        """Closed, and our last FIN (if we owe the peer one) is known to have arrived."""
        return self.state is State.CLOSED and not self._final_fin_left

    # -- timers

    def get_timer(self) -> float | None:
        state = self.state
        if state is State.CLOSED:
            return self._fin_next if self._final_fin_left else None
        if state is State.SYN_SENT:
            assert self._deadline is not None
            return min(self._syn_next, self._deadline)
        if state is State.LISTEN:
            return self._deadline
        if state is State.SYN_RECEIVED:
            assert self._deadline is not None
            return min(self._syn_ack_next, self._deadline) if self._syn_ack_left else self._deadline
        idle = self._last_rx + self.timers.idle_timeout
        if state is State.LOCAL_CLOSED:
            return min(self._fin_next, idle)
        return min(self._next_ping, idle)

    def handle_timer(self, now: float) -> None:
        state = self.state
        if state is State.CLOSED:
            if self._final_fin_left and now >= self._fin_next:
                self._final_fin_left -= 1
                self._out.append(self._header(FIN))
                self._fin_backoff = min(self._fin_backoff * 2, self.timers.ping_interval)
                self._fin_next = now + self._fin_backoff
            return
        if state in (State.SYN_SENT, State.LISTEN, State.SYN_RECEIVED):
            assert self._deadline is not None
            if now >= self._deadline:
                phase = "connect" if self.is_client else "accept"
                if state is State.SYN_SENT:
                    reason = f"no SYN|ACK after {self._syn_sent} SYNs"
                elif state is State.LISTEN:
                    reason = "no SYN from the peer"
                else:
                    reason = "no ACK|DATA after our SYN|ACK"
                self.state = State.CLOSED
                self.close_reason = f"{phase} timed out: {reason}"
                self._deadline = None
                self._events.append(ConnectionTimedOut(phase, reason))
                return
            if state is State.SYN_SENT and now >= self._syn_next:
                self._send_syn(now)
            elif state is State.SYN_RECEIVED and self._syn_ack_left and now >= self._syn_ack_next:
                self._syn_ack_left -= 1
                self._syn_ack_next = now + self.timers.syn_ack_interval
                self._out.append(self._header(SYN | ACK))
            return
        if now >= self._last_rx + self.timers.idle_timeout:
            reason = f"no packet from the peer for {self.timers.idle_timeout:g} s"
            self.state = State.CLOSED
            self.close_reason = f"idle: {reason}"
            self._events.append(ConnectionTimedOut("idle", reason))
            return
        probing = self._unreachable_since is not None
        if state is State.LOCAL_CLOSED:
            if now >= self._fin_next:
                self._out.append(self._header(FIN))
                self._fin_backoff = min(self._fin_backoff * 2, self.timers.ping_interval)
                self._fin_next = now + (self.timers.unreachable_probe if probing else self._fin_backoff)
        elif now >= self._next_ping:
            self._out.append(self._header(PING))
            self._next_ping = now + (self.timers.unreachable_probe if probing else self.timers.ping_interval)

    # -- internals

    def _set_conv(self, conv: int) -> None:
        self._conv = conv
        self._data_header = HEADER.pack(conv, self._src, self._dst, DATA | ACK, 0)

    def _header(self, flags: int) -> bytes:
        assert self._conv is not None
        return HEADER.pack(self._conv, self._src, self._dst, flags, 0)

    def _send_syn(self, now: float) -> None:
        self._out.append(self._header(SYN) + self._connect_data)
        self._syn_sent += 1
        self._syn_next = now + self.timers.syn_interval

    def _establish(self, now: float) -> None:
        assert self._conv is not None
        self._data_header = HEADER.pack(self._conv, self._src, self._dst, DATA | ACK, 0)
        self.state = State.ESTABLISHED
        self._deadline = None
        self._last_rx = now
        self._next_ping = now + self.timers.ping_interval
        self._events.append(Established(self._conv))

    def _reset(self, reason: str) -> None:
        self.state = State.CLOSED
        self.close_reason = reason
        self._deadline = None
        self._events.append(ConnectionReset(reason))

    def _drop(self, reason: str, now: float) -> None:
        if self.drops.drop(reason, "kcp", now):
            log.debug("kcp conv %s: dropped datagram (%s)", self._conv, reason)
