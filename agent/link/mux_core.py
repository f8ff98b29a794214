"""Streams over one link, sans-IO: the multiplexer a peer link will run inside its secure channel.

Why our own and not h2 or aioquic: `bench/mux_bench.py` moves stream payload through each in
memory, on one core, beside the one-stream session it replaced (secretbox only). This framing keeps
0.85-0.92 of that and opens a stream with its first byte back in ~18 us of CPU; h2 keeps 0.25 and
needs ~350 us per stream, aioquic (pure-Python QUIC with its own TLS) 0.03 and ~770 us. What we
need of them is small: streams, per-stream windows, half-close and reset.

The frame is yamux's (hashicorp/yamux spec.md), so it reads familiar: a 12-byte header
`version u8, type u8, flags u16, stream u32, length u32`, big-endian.
- DATA carries `length` bytes for `stream`; WINDOW_UPDATE gives the peer `length` more bytes of
  send window; PING echoes `length` as an opaque value; GO_AWAY closes the link with a code.
- flags: SYN opens a stream (on DATA or WINDOW_UPDATE), ACK answers it, FIN half-closes (no more
  data from the sender), RST aborts the stream at once.
- The side that dialled the link opens odd streams, the other even ones.

Flow control: each stream starts with WINDOW bytes each way. A sender never has more than the
window in flight (`send` takes what fits and says how much); the receiver grants more only when
its reader has consumed bytes (`consumed`), once half a window is owed. A stream whose reader stops
therefore stops its sender and no other stream, and a receiver buffers at most the stream's window.

Windows grow (receive-window auto-tuning, as yamux and QUIC stacks do, without a clock): a window
of 256 KiB carries one window per round trip, which on a busy host is a few MB/s-worth of
milliseconds (bench/link_pair_bench.py: 256 KiB 78 MB/s, 4 MiB 264 MB/s). When the sender used
most of the window since our last grant (it was held back by the window) and our reader keeps up
(little is buffered when it grants), the grant doubles the window, up to MAX_WINDOW per stream and
LINK_GROWTH beyond the initial windows for the whole link. A reader that falls behind never grows
its window, so a slow or stopped reader still holds at most what it was granted.

A peer that sends beyond the window, on a stream it may not open, or anything malformed ends the
whole link with a MuxError naming why: its stream state can no longer be trusted.

Pure: no sockets, no clock, no asyncio. Bytes in with `receive`, events out; bytes out with
`data_to_send`.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field

HEADER = struct.Struct("!BBHII")
VERSION = 0
WINDOW = 256 * 1024
"""Initial window per stream and direction (yamux's)."""
MAX_WINDOW = 16 * 1024 * 1024
"""A stream's receive window grows to this at most (yamux's MaxStreamWindowSize)."""
LINK_GROWTH = 64 * 1024 * 1024
"""Receive window granted beyond WINDOW, summed over a link's streams, at most: what a link may
buffer is bounded by MAX_STREAMS * WINDOW + LINK_GROWTH whatever its readers do."""
MAX_STREAMS = 1024
"""Open streams a peer may have at once; more is a protocol error (bounded state per link)."""
MAX_FRAME = 256 * 1024
"""Largest DATA payload we send in one frame (and accept: a link's secure frames are this size)."""


class Type(enum.IntEnum):
    DATA = 0
    WINDOW_UPDATE = 1
    PING = 2
    GO_AWAY = 3


class Flag(enum.IntFlag):
    SYN = 1
    ACK = 2
    FIN = 4
    RST = 8


_HDR = HEADER.size
_unpack = HEADER.unpack_from
_pack = HEADER.pack
_DATA, _PING, _GO_AWAY = int(Type.DATA), int(Type.PING), int(Type.GO_AWAY)
_SYN, _ACK, _FIN, _RST = int(Flag.SYN), int(Flag.ACK), int(Flag.FIN), int(Flag.RST)
"""Plain ints on the per-frame path: building an IntFlag per frame costs more than the frame."""


class MuxError(Exception):
    """The peer broke the protocol: the link must end (str() says why, one line)."""


# ---- events -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StreamOpened:
    """The peer opened `stream` (its first bytes follow as Data events)."""

    stream: int


@dataclass(frozen=True)
class Data:
    stream: int
    data: bytes


@dataclass(frozen=True)
class StreamEnded:
    """The peer will send nothing more on `stream` (FIN): end of file for its reader."""

    stream: int


@dataclass(frozen=True)
class StreamReset:
    """`stream` was aborted by the peer: drop what is buffered, fail its reader and writer."""

    stream: int


@dataclass(frozen=True)
class WindowOpened:
    """`send` on `stream` may take more now."""

    stream: int


@dataclass(frozen=True)
class Ping:
    value: int
    ack: bool


@dataclass(frozen=True)
class GoAway:
    code: int


Event = StreamOpened | Data | StreamEnded | StreamReset | WindowOpened | Ping | GoAway


# ---- state --------------------------------------------------------------------------------------


@dataclass
class _Stream:
    send_window: int = WINDOW
    recv_window: int = WINDOW
    """Bytes the peer may still send us before we grant more."""
    window: int = WINDOW
    """The receive window's size now (it grows; see the module docstring)."""
    buffered: int = 0
    """Bytes received and not yet consumed by our reader."""
    starved: bool = False
    """The peer used most of its window since our last grant."""
    owed: int = 0
    """Bytes our reader consumed that we have not granted back yet."""
    sent_fin: bool = False
    got_fin: bool = False
    acked: bool = True
    """False for a stream the peer opened until we answer it (ACK rides our first frame on it)."""


@dataclass
class Mux:
    """One end of a link. `dialer` is the side that opened the link (odd stream ids)."""

    dialer: bool
    frame_size: int = MAX_FRAME
    """Largest DATA payload this end sends (a link sizes it so a frame fills one secure frame)."""
    streams: dict[int, _Stream] = field(default_factory=dict)
    _out: list[bytes] = field(default_factory=list)
    _buf: bytearray = field(default_factory=bytearray)
    _next: int = 0
    closed: bool = False
    grown: int = 0
    """Receive window granted beyond WINDOW over the open streams (LINK_GROWTH at most)."""

    def __post_init__(self) -> None:
        self._next = 1 if self.dialer else 2
        if not 0 < self.frame_size <= MAX_FRAME:
            raise ValueError(f"frame_size must be within 1-{MAX_FRAME}, got {self.frame_size}")

    # ---- what the application does ------------------------------------------------------------

    def open_stream(self) -> int:
        """A new stream; the peer hears of it with the first frame (SYN)."""
        if self.closed:
            raise MuxError("link closed")
        if len(self.streams) >= MAX_STREAMS:
            raise MuxError(f"{MAX_STREAMS} streams open on this link")
        sid = self._next
        if sid > 0xFFFFFFFF:
            raise MuxError("stream ids used up on this link: open a new link")
        self._next += 2
        self.streams[sid] = _Stream()
        self._frame(Type.WINDOW_UPDATE, Flag.SYN, sid, 0)
        return sid

    def send(self, sid: int, data: bytes) -> int:
        """Queue as much of `data` as the stream's window allows; returns how many bytes (the caller
        keeps the rest until WindowOpened)."""
        st = self._writable(sid)
        n = min(len(data), st.send_window)
        at = 0
        size = self.frame_size
        while at < n:
            piece = data[at : min(n, at + size)]
            self._out.append(_pack(VERSION, _DATA, self._ack(st), sid, len(piece)) + piece)
            at += len(piece)
        st.send_window -= n
        return n

    def close(self, sid: int) -> None:
        """Half-close: we send no more on `sid` (its reader sees end of file)."""
        st = self._writable(sid)
        st.sent_fin = True
        self._frame(Type.WINDOW_UPDATE, self._ack(st) | Flag.FIN, sid, 0)
        self._forget_if_done(sid, st)

    def reset(self, sid: int) -> None:
        """Abort `sid` both ways at once."""
        if self._forget(sid):
            self._frame(Type.WINDOW_UPDATE, Flag.RST, sid, 0)

    def consumed(self, sid: int, n: int) -> None:
        """The reader of `sid` took `n` bytes out of the buffer: grant them back once half a window
        is owed (a window update per read would double the frames), and grow the window if the
        peer was held back by it while our reader kept up."""
        st = self.streams.get(sid)
        if st is None:
            return
        st.buffered = max(0, st.buffered - n)
        if st.got_fin:
            return
        st.owed += n
        if st.owed >= st.window // 2:
            grant = st.owed
            if (
                st.starved
                and st.buffered <= st.window // 4
                and st.window < MAX_WINDOW
                and self.grown + st.window <= LINK_GROWTH
            ):
                grant += st.window
                self.grown += st.window
                st.window *= 2
            st.starved = False
            self._frame(Type.WINDOW_UPDATE, self._ack(st), sid, grant)
            st.recv_window += grant
            st.owed = 0

    def ping(self, value: int) -> None:
        self._frame(Type.PING, Flag.SYN, 0, value & 0xFFFFFFFF)

    def go_away(self, code: int = 0) -> None:
        self._frame(_GO_AWAY, 0, 0, code)
        self.closed = True

    def window(self, sid: int) -> int:
        """Bytes `send` would take on `sid` now (0 for a stream that is gone or closed for sending)."""
        st = self.streams.get(sid)
        return 0 if st is None or st.sent_fin or self.closed else st.send_window

    @property
    def has_output(self) -> bool:
        return bool(self._out)

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    def frames_to_send(self) -> list[bytes]:
        """The same bytes as `data_to_send`, one whole frame per item (a link packs them into secure
        frames without splitting one, so the far end never buffers a partial frame)."""
        out = self._out
        self._out = []
        return out

    # ---- what the peer sent -----------------------------------------------------------------------

    def receive(self, data: bytes | memoryview) -> list[Event]:
        """Frames in `data` (any split: a partial frame waits for the rest) as events."""
        if self._buf:
            self._buf += data
            buf: bytes | bytearray | memoryview = self._buf
        else:
            buf = data  # the usual case, a whole secure frame of whole mux frames: no copy
        events: list[Event] = []
        at = 0
        end = len(buf)
        while end - at >= _HDR:
            version, kind, flags, sid, length = _unpack(buf, at)
            if version != VERSION:
                raise MuxError(f"unknown frame version {version}")
            if kind == _DATA:
                if length > MAX_FRAME:
                    raise MuxError(f"a DATA frame of {length} bytes (at most {MAX_FRAME})")
                if end - at - _HDR < length:
                    break
                payload = bytes(buf[at + _HDR : at + _HDR + length])
                at += _HDR + length
            elif kind <= _GO_AWAY:
                payload = b""
                at += _HDR
            else:
                raise MuxError(f"unknown frame type {kind}")
            self._on_frame(kind, flags & 0xF, sid, length, payload, events)
        self._buf = bytearray(buf[at:]) if at < end else bytearray()
        return events

    # ---- inside -------------------------------------------------------------------------------------

    def _on_frame(self, kind: int, flags: int, sid: int, length: int, payload: bytes, events: list[Event]) -> None:
        if kind == _PING:
            if flags & _SYN:
                self._frame(Type.PING, Flag.ACK, 0, length)
            events.append(Ping(length, bool(flags & _ACK)))
            return
        if kind == _GO_AWAY:
            self.closed = True
            events.append(GoAway(length))
            return
        if sid == 0:
            raise MuxError(f"{Type(kind).name} on stream 0")
        st = self.streams.get(sid)
        if flags & _SYN:
            if st is not None:
                raise MuxError(f"stream {sid} opened twice")
            if (sid % 2 == 1) == self.dialer:
                raise MuxError(f"the peer opened stream {sid}, one of ours")
            if len(self.streams) >= MAX_STREAMS:
                raise MuxError(f"the peer opened more than {MAX_STREAMS} streams")
            st = self.streams[sid] = _Stream(acked=False)
            events.append(StreamOpened(sid))
        if st is None:
            # A frame for a stream we reset or finished: it crossed our RST/FIN on the wire.
            return
        if flags & _RST:
            self._forget(sid)
            events.append(StreamReset(sid))
            return
        if kind == _DATA:
            if st.got_fin:
                raise MuxError(f"data on stream {sid} after its end")
            if length > st.recv_window:
                raise MuxError(f"{length} bytes on stream {sid} beyond its window of {st.recv_window}")
            st.recv_window -= length
            st.buffered += length
            if st.recv_window < st.window // 4:
                st.starved = True
            if payload:
                events.append(Data(sid, payload))
        elif length:  # WINDOW_UPDATE
            if st.send_window + length > 1 << 31:
                raise MuxError(f"window of stream {sid} grown past 2 GiB")
            st.send_window += length
            events.append(WindowOpened(sid))
        if flags & _FIN:
            if st.got_fin:
                raise MuxError(f"stream {sid} ended twice")
            st.got_fin = True
            events.append(StreamEnded(sid))
            self._forget_if_done(sid, st)

    def _writable(self, sid: int) -> _Stream:
        if self.closed:
            raise MuxError("link closed")
        st = self.streams.get(sid)
        if st is None:
            raise KeyError(f"no stream {sid} (reset, ended, or never opened)")
        if st.sent_fin:
            raise KeyError(f"stream {sid} was closed for sending")
        return st

    @staticmethod
    def _ack(st: _Stream) -> int:
        if st.acked:
            return 0
        st.acked = True
        return _ACK

    def _forget_if_done(self, sid: int, st: _Stream) -> None:
        if st.sent_fin and st.got_fin:
            self._forget(sid)

    def _forget(self, sid: int) -> bool:
        """Drop `sid`'s state (its grown window goes back to the link's budget); False if unknown."""
        st = self.streams.pop(sid, None)
        if st is None:
            return False
        self.grown -= st.window - WINDOW
        return True

    def _frame(self, kind: int, flags: int, sid: int, length: int) -> None:
        self._out.append(_pack(VERSION, kind, flags, sid, length))
