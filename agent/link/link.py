"""One peer link: many streams multiplexed over one authenticated, encrypted transport.

The session owner makes a link of the transport that wins a race (after the handshake, so the
peer is whoever proved its key) and keeps it while streams use it, and for an idle time after.
Each `pipe` or `-L` connection is then a stream opened in one round trip: the opener sends the
target in the stream's first frame (agent/link/stream_open.py); the far end checks it against its
policy *now*, connects it and answers. Only the side that dialled the link opens streams on it:
the other side's admission of this peer was never checked, so a stream it opens is reset.

Bytes: the multiplexer (agent/link/mux_core.py) runs inside the secure channel; its frames are
sized so that one DATA frame fills one sealed frame, and whole frames are packed into sealed
frames so the far end never buffers half a frame. Each stream has two small tasks: its local
socket's reader (sends only what the stream's window allows) and its writer (grants window back
only once bytes reached the local socket). A stream whose reader stops therefore stops its own
sender and nobody else, and holds at most one window (256 KiB) here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from agent.common.netutil import describe_error, reset_socket, tune_transport
from agent.link import mux_core, resend_core, stream_open
from agent.link.mux_core import Mux, MuxError
from agent.link.resend_core import Resend, ResendError
from agent.session import stream as session_stream
from agent.session.stream import CHUNK, PumpStats, SessionError, StreamCodec

log = logging.getLogger(__name__)

OPEN_TIMEOUT = 15.0
"""Seconds the opener waits for the far end's answer (it connects the target: 5 s at most)."""
DEAD_AFTER_KEEPALIVES = 3
"""A transport that heard nothing from the peer for this many keepalive intervals is dead: a live
peer answers each of our pings at once (agent.common.netutil.DEAD_PATH_TIMEOUT's 30 s, at the default)."""
BUSY_DEAD = 10.0
"""Seconds data may wait for the peer's acknowledgement before the transport counts as dead (the
peer acknowledges every read; a path that carries nothing is found here long before the pings)."""
RESUME_WAIT = 30.0
"""Seconds the side that did not dial waits for the dialer to bring a lost link back on a new
transport (its streams stall meanwhile) before the link ends."""
PAUSE_GRACE = 1.0
"""Seconds a move waits for the writer to finish the frame it is writing on the old transport."""
RECORD = CHUNK - resend_core.DATA_OVERHEAD
"""Multiplexer bytes in one DATA record: with the record's kind and acknowledgement
(agent/link/resend_core.py) they fill a secure frame."""
ACK_DELAY = 0.02
"""Seconds an acknowledgement waits for data of ours to ride on before it goes alone (TCP's delayed
ACK, shorter): an answer within that time carries it."""
READ = RECORD - mux_core.HEADER.size
"""Most bytes read from a local socket at once (also bounded by the stream's window): one read is
one multiplexer frame, which fills one record (no slicing, no second record for a remainder)."""

TRANSPORT_READ = 256 * 1024
"""Most bytes read from the transport at once."""

Reconnect = Callable[["Link", str], Awaitable[bool]]
"""The dialer's way back after its transport was lost: bring a new transport (through `install`),
True once it did."""
Accept = Callable[["LinkStream"], Awaitable[socket.socket]]
"""The far end's judge and connector for a stream (its `target` is set): a connected socket, or
StreamRefused."""


class StreamRefused(Exception):
    """The far end did not open the stream; str() is its reason (one line)."""


class LinkClosed(Exception):
    """The link is gone (or going); str() says why."""


@dataclass(eq=False)
class LinkStream:
    """One stream's end on this side of the link."""

    sid: int
    target: str = ""
    local: socket.socket | None = None
    stats: PumpStats = field(default_factory=PumpStats)
    inbound: deque[bytes] = field(default_factory=deque)
    readable: asyncio.Event = field(default_factory=asyncio.Event)
    writable: asyncio.Event = field(default_factory=asyncio.Event)
    got_fin: bool = False
    error: str = ""
    """Why the stream failed ("" while it has not)."""
    first: bool = True
    """Its first frame from the peer is still due (the open request, or the answer to ours)."""
    answer: asyncio.Future[str | None] | None = None
    pumps: list[asyncio.Task[None]] = field(default_factory=list)
    finished: bool = False

    def fail(self, reason: str) -> None:
        if not self.error:
            self.error = reason
            self.stats.error = reason
        self.readable.set()
        self.writable.set()
        if self.answer is not None and not self.answer.done():
            self.answer.set_exception(StreamRefused(reason))


class Link:
    """Runs one link until it ends; `open` (dialer) and `accept` (the other side) make streams."""

    def __init__(
        self,
        transport: socket.socket,
        codec: StreamCodec,
        *,
        dialer: bool,
        accept: Accept | None = None,
        keepalive: float | None = None,
        idle: float | None = None,
        on_stream_end: Callable[[LinkStream], None] | None = None,
        preamble: bytes = b"",
    ) -> None:
        """`keepalive`: seconds of silence before an empty frame (None: KEEPALIVE_INTERVAL, read now).
        `idle`: seconds without streams after which the dialer closes the link (0: with its last
        stream; None: never).
        `preamble`: bytes to send before the first frame (A's sealed SELECT)."""
        self.transport = transport
        self.codec = codec
        self.dialer = dialer
        self.mux = Mux(dialer, frame_size=READ)
        self.resend = Resend()
        self.token = b""
        """The link's name between its two ends (chosen by the dialer, sent inside the secure channel):
        a resumed transport names the link it continues."""
        self.reconnect: Reconnect | None = None
        self.resume_wait = 0.0
        """The other side: seconds to wait for a lost link to come back (0: it ends at once)."""
        self.moving = False
        """The link is between transports (paused for a move, or lost and being brought back)."""
        self.moves = 0
        self.confirmed = False
        """A record from the peer has opened (it took our SELECT): only then is there a link to resume."""
        self.accept = accept
        self.keepalive = session_stream.KEEPALIVE_INTERVAL if keepalive is None else keepalive
        self.idle = idle
        self.on_stream_end = on_stream_end
        self.streams: dict[int, LinkStream] = {}
        self.opened = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.error = ""
        self.closing = False
        """No new streams: the link is going (idle, GO_AWAY, or failed)."""
        self.ended = asyncio.Event()
        self.early: list[bytes] = []
        """Link bytes that arrived with the transport's selection (read before the socket)."""
        self._kick = asyncio.Event()
        self._preamble = preamble
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop = asyncio.get_running_loop()
        self._last_out = self._loop.time()
        self.last_in = self._loop.time()
        """When the peer was last heard (any bytes, keepalives and ping answers included)."""
        self.suspect = False
        """A probe went unanswered: no new stream is put on this link until the peer is heard again."""
        self._heard = asyncio.Event()
        self._pings = 0
        self._last_busy = self._loop.time()
        self._io: list[asyncio.Task[None]] = []
        self._pausing = False
        self._ack_wanted = False
        """A pure ACK record should go out now (if records are still owed)."""
        self._ack_timer: asyncio.TimerHandle | None = None
        self._ack_progress = self._loop.time()
        self._resend_now: list[bytes] = []
        self._installed = asyncio.Event()
        self._old_broken = False

    # ---- the application's side -------------------------------------------------------------------

    async def open(
        self,
        target: str,
        timeout: float = OPEN_TIMEOUT,
        local: socket.socket | None = None,
        stats: PumpStats | None = None,
    ) -> LinkStream:
        """A new stream to `target` on the far end, once it answered; StreamRefused or LinkClosed.

        With `local`, the stream pumps it at once, before the answer (the far end holds what comes
        before its target is connected, within the window): a client's first bytes travel with the
        open, and a new connection costs one round trip, not two. A refusal resets `local`.
        `stats`: the stream's counters (the caller's, so it sees what was pumped even if the open fails)."""
        if not self.dialer:
            raise LinkClosed("only the side that dialled a link opens streams on it")
        if self.closing:
            raise LinkClosed(self.error or "link is closing")
        request = stream_open.encode_request(target)
        try:
            sid = self.mux.open_stream()
            self.mux.send(sid, request)
        except MuxError as exc:
            raise LinkClosed(str(exc)) from None
        st = self.streams[sid] = LinkStream(sid, target, stats=stats or PumpStats(), answer=self._loop.create_future())
        self.opened += 1
        self._wake()
        if local is not None:
            self.attach(st, local)
        assert st.answer is not None
        try:
            async with asyncio.timeout(timeout):
                reason = await st.answer
        except TimeoutError:
            self._drop(st, f"the peer did not answer the stream within {timeout:.0f}s", reset=True)
            raise StreamRefused(st.error) from None
        except StreamRefused:
            self._drop(st, st.error, reset=True)
            raise
        except asyncio.CancelledError:
            self._drop(st, "the opener gave up on the stream", reset=True)
            raise
        if reason is not None:
            self._drop(st, reason, reset=True)
            raise StreamRefused(reason)
        return st

    def attach(self, st: LinkStream, local: socket.socket) -> None:
        """Pump `st` to and from `local` (which the link owns from now on)."""
        local.setblocking(False)
        st.local = local
        if st.error:
            self._finish(st)
            return
        st.pumps = [self._spawn(self._outbound(st, local)), self._spawn(self._inbound(st, local))]

    def ping(self) -> None:
        """Ask the peer for an answer (it comes back at once from a live link, whatever its streams do)."""
        if not self.mux.closed:
            self._pings += 1
            self.mux.ping(self._pings)
            self._wake()

    def give_up_transport(self, reason: str) -> None:
        """The transport is gone though nothing said so (the network under it changed and the peer
        did not answer a probe): bring the link back on a new one now, as a cut would."""
        if not self.moving and not self.ended.is_set():
            self._lost(reason)

    def quiet_for(self) -> float:
        """Seconds since the peer was last heard."""
        return self._loop.time() - self.last_in

    async def heard_within(self, seconds: float) -> bool:
        """Ping, then True as soon as anything arrives from the peer, False after `seconds` of silence
        (and the link is suspect from then on, until the peer is heard)."""
        if self.moving:
            return False
        since = self.last_in
        self.ping()
        try:
            async with asyncio.timeout(seconds):
                while self.last_in == since and not self.ended.is_set():
                    self._heard.clear()
                    await self._heard.wait()
        except TimeoutError:
            self.suspect = True
            return False
        return not self.ended.is_set()

    @property
    def stream_count(self) -> int:
        return len(self.streams)

    def close(self, reason: str = "") -> None:
        """End the link: GO_AWAY and our authenticated end, then the transport; streams fail."""
        if self.ended.is_set():
            return
        self.closing = True
        with contextlib.suppress(MuxError, SessionError, OSError, ValueError):  # ValueError: a dead channel
            if not self.mux.closed:
                self.mux.go_away()
            frames = [] if self.moving else self._seal(self.mux.frames_to_send())
            if not self.codec.sent_eof and not self.moving:
                frames.append(self.codec.encode_eof())
            self.transport.send(b"".join(frames))  # best effort: the transport is closed next
        self._end(reason or "link closed")

    # ---- running ----------------------------------------------------------------------------------

    async def run(self) -> str:
        """Until the link ends; returns "" for an orderly end, else why it failed. Transports come and
        go underneath (`pause`, `install`); a lost one is brought back by `reconnect` (the dialer) or
        awaited for `resume_wait` seconds (the other side) before the link gives up."""
        self._start_io()
        try:
            await self.ended.wait()
        finally:
            self._end(self.error or "link closed")
            await self._stop_io(grace=0)
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        return self.error

    def _start_io(self) -> None:
        tune_transport(self.transport)
        self.transport.setblocking(False)
        self._pausing = False
        now = self._loop.time()
        self.last_in = self._last_out = self._ack_progress = now
        self._io = [
            asyncio.ensure_future(self._reader()),
            asyncio.ensure_future(self._writer()),
            asyncio.ensure_future(self._timers()),
        ]
        for task in self._io:
            task.add_done_callback(self._io_ended)

    async def _stop_io(self, grace: float) -> None:
        """Stop using the current transport: the writer may finish the frame it is writing (within
        `grace` seconds, else the transport is not used again), the reader stops where it is."""
        io, self._io = self._io, []
        self._pausing = True
        self._wake()
        reader, writer, timers = io if io else (None, None, None)
        for task in (reader, timers):
            if task is not None:
                task.cancel()
        if writer is not None and not writer.done():
            done, _ = await asyncio.wait([writer], timeout=grace) if grace > 0 else (set(), set())
            if writer not in done:
                writer.cancel()
                self._old_broken = True  # a frame may be half written: this transport is done
        await asyncio.gather(*io, return_exceptions=True)

    def _io_ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or self.ended.is_set() or self.moving or task not in self._io:
            return
        exc = task.exception()
        if exc is None:
            self._end("")  # the peer ended the link in order (or our idle close)
        elif isinstance(exc, (MuxError, ResendError, SessionError)):
            self.close(str(exc))  # a broken or forged record: nothing on this link is trusted any more
        elif isinstance(exc, (LinkClosed, OSError)):
            reason = str(exc) if isinstance(exc, LinkClosed) else f"connection failed: {describe_error(exc)}"
            self._lost(reason)
        else:
            self._end(f"link failed: {type(exc).__name__}: {exc}")

    def _lost(self, reason: str) -> None:
        """The transport is gone (cut, silent, or failing): bring the link back on a new one if we can.
        Not a link the peer never confirmed (nothing heard from it on its first transport): the peer
        may never have taken it (a SELECT it could not open), so there is nothing to resume, and the
        streams waiting on it hear so now instead of at the end of their open timeout (15 s)."""
        if self.dialer and self.moves == 0 and not self.confirmed:
            self._end(f"{reason}, before the peer confirmed the link")
            return
        self.moving = True
        self._old_broken = True  # whatever comes next, it is not this transport
        self._installed.clear()
        self._spawn(self._recover(reason))

    async def _recover(self, reason: str) -> None:
        await self._stop_io(grace=0)
        ok = False
        if self.dialer and self.reconnect is not None:
            with contextlib.suppress(Exception):
                ok = await self.reconnect(self, reason)
        elif not self.dialer and self.resume_wait > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.resume_wait):
                    await self._installed.wait()
                    ok = True
        if not ok and not self.ended.is_set() and self.moving:
            self._end(reason)

    async def pause(self) -> int:
        """Stop using the current transport for a move; returns how many records we have from the peer
        (what the new transport continues from). `unpause` undoes it if the move fails."""
        self.moving = True
        self._installed.clear()
        await self._stop_io(grace=PAUSE_GRACE)
        return self.resend.received

    def unpause(self) -> bool:
        """A move failed before anything changed: back to the old transport, if it is still whole."""
        if self.ended.is_set() or not self.moving or self._old_broken:
            return False
        self.moving = False
        self._start_io()
        return True

    def install(self, transport: socket.socket, codec: StreamCodec, peer_received: int, early: list[bytes]) -> None:
        """Continue on `transport` (authenticated, paused link): resend what the peer lacks, then carry
        on. ResendError if the peer's count is impossible (the link cannot continue)."""
        if self.ended.is_set():
            raise LinkClosed(self.error or "link closed")
        resend = self.resend.resume(peer_received)
        old, self.transport, self.codec = self.transport, transport, codec
        if old is not transport:
            with contextlib.suppress(OSError):
                old.close()
        self._resend_now = resend
        self.early = early
        self.moving = self.suspect = self._old_broken = False
        self.moves += 1
        self._start_io()
        self._installed.set()

    def _end(self, reason: str) -> None:
        if self.ended.is_set():
            return
        self.closing = True
        self.error = reason
        self.ended.set()
        self._installed.set()
        if self._ack_timer is not None:
            self._ack_timer.cancel()
        for st in list(self.streams.values()):
            self._drop(st, f"link to the peer lost: {reason}" if reason else "link closed", reset=False)
        with contextlib.suppress(OSError):
            self.transport.close()

    async def _reader(self) -> None:
        loop = self._loop
        for record in self.early:
            self._on_record(record)
        self.early = []
        while True:
            chunk = await loop.sock_recv(self.transport, TRANSPORT_READ)
            if not chunk:
                if self.codec.peer_eof:
                    return
                raise LinkClosed("connection to the peer was cut (no authenticated end of the link)")
            self.last_in = loop.time()
            self.suspect = False
            self._heard.set()
            acked = self.resend.acked
            for part in self.codec.decode(chunk):
                if part is None:
                    return  # the peer ended the link in order
                self._on_record(part)
            if self.resend.acked != acked:
                self._ack_progress = loop.time()
            owed = self.resend.received - self.resend.ack_sent
            if owed >= resend_core.ACK_EVERY:
                self._ack_wanted = True
            elif owed and self._ack_timer is None:
                self._ack_timer = loop.call_later(ACK_DELAY, self._ack_due)
            self._wake()
            if len(chunk) == TRANSPORT_READ:
                await asyncio.sleep(0)  # more is waiting: let the streams' writers take this first

    def _ack_due(self) -> None:
        self._ack_timer = None
        self._ack_wanted = True
        self._wake()

    def _on_record(self, record: bytes) -> None:
        self.confirmed = True
        body = self.resend.receive(record)
        if body is not None:
            for event in self.mux.receive(body):
                self._on_event(event)

    def _on_event(self, event: mux_core.Event) -> None:
        if isinstance(event, mux_core.Data):
            st = self.streams.get(event.stream)
            if st is None:
                return
            if st.first:
                st.first = False
                self.mux.consumed(st.sid, len(event.data))
                self._on_first(st, event.data)
                return
            st.inbound.append(event.data)
            st.readable.set()
        elif isinstance(event, mux_core.WindowOpened):
            if (st := self.streams.get(event.stream)) is not None:
                st.writable.set()
        elif isinstance(event, mux_core.StreamOpened):
            self._on_opened(event.stream)
        elif isinstance(event, mux_core.StreamEnded):
            if (st := self.streams.get(event.stream)) is not None:
                st.got_fin = True
                st.readable.set()
                if st.first:
                    self._drop(st, "the peer ended the stream before opening it", reset=True)
        elif isinstance(event, mux_core.StreamReset):
            if (st := self.streams.get(event.stream)) is not None:
                self._drop(st, st.error or "the peer reset the stream", reset=False)
        elif isinstance(event, mux_core.GoAway):
            self.closing = True

    def _on_opened(self, sid: int) -> None:
        if self.dialer or self.accept is None or self.closing:
            self.mux.reset(sid)  # see the module docstring: only the dialer opens streams
            return
        self.streams[sid] = LinkStream(sid)
        self.opened += 1

    def _on_first(self, st: LinkStream, frame: bytes) -> None:
        try:
            if self.dialer:
                reason = stream_open.parse_status(frame)
                if st.answer is not None and not st.answer.done():
                    st.answer.set_result(reason)
            else:
                st.target = stream_open.parse_request(frame)
                self._spawn(self._accept(st))
        except stream_open.OpenError as exc:
            self._drop(st, f"bad stream opening from the peer: {exc}", reset=True)

    async def _accept(self, st: LinkStream) -> None:
        assert self.accept is not None
        try:
            local = await self.accept(st)
        except StreamRefused as exc:
            reason = str(exc)
        except (OSError, TimeoutError, ValueError) as exc:
            reason = f"target {st.target}: {describe_error(exc)}"
        else:
            if st.error or st.sid not in self.mux.streams:  # reset while we connected
                local.close()
                self._finish(st)
                return
            self.mux.send(st.sid, stream_open.encode_status(None))
            self._wake()
            self.attach(st, local)
            return
        with contextlib.suppress(MuxError, KeyError):
            self.mux.send(st.sid, stream_open.encode_status(reason))
        self._drop(st, reason, reset=True)

    async def _outbound(self, st: LinkStream, local: socket.socket) -> None:
        """Local socket -> stream, within the stream's window."""
        loop, mux, sid = self._loop, self.mux, st.sid
        try:
            while not st.error:
                window = mux.window(sid)
                if window == 0:
                    if st.error or sid not in mux.streams or mux.streams[sid].sent_fin:
                        return
                    st.writable.clear()
                    await st.writable.wait()
                    continue
                data = await loop.sock_recv(local, min(window, READ))
                if st.error:
                    return
                if not data:
                    mux.close(sid)
                    self._wake()
                    return
                mux.send(sid, data)
                st.stats.bytes_out += len(data)
                self.bytes_out += len(data)
                self._wake()
                if len(data) == READ:
                    await asyncio.sleep(0)  # more is waiting: let the writer seal this while we read
        except (KeyError, MuxError):
            return
        except OSError as exc:
            self._drop(st, f"local connection failed: {describe_error(exc)}", reset=True)
        finally:
            self._pump_done(st)

    async def _inbound(self, st: LinkStream, local: socket.socket) -> None:
        """Stream -> local socket; window goes back to the peer only for bytes the socket took."""
        loop, mux, sid = self._loop, self.mux, st.sid
        try:
            while True:
                if st.inbound:
                    data = st.inbound.popleft() if len(st.inbound) == 1 else b"".join(st.inbound)
                    st.inbound.clear()
                    await loop.sock_sendall(local, data)
                    st.stats.bytes_in += len(data)
                    self.bytes_in += len(data)
                    mux.consumed(sid, len(data))
                    if mux.has_output:
                        self._wake()
                    continue
                if st.error:
                    return
                if st.got_fin:
                    with contextlib.suppress(OSError):
                        local.shutdown(socket.SHUT_WR)
                    return
                st.readable.clear()
                await st.readable.wait()
        except OSError as exc:
            self._drop(st, f"local connection failed: {describe_error(exc)}", reset=True)
        finally:
            self._pump_done(st)

    def _pump_done(self, st: LinkStream) -> None:
        """Both pumps of a stream report here; the second to end finishes the stream (the local
        socket is closed only once nothing awaits it)."""
        if all(task.done() or task is asyncio.current_task() for task in st.pumps):
            self._finish(st)

    def _drop(self, st: LinkStream, reason: str, *, reset: bool) -> None:
        """The stream fails: the peer hears a reset (if `reset`), the local side a reset too."""
        st.fail(reason)
        if reset:
            with contextlib.suppress(MuxError):
                self.mux.reset(st.sid)
            self._wake()
        running = [task for task in st.pumps if not task.done() and task is not asyncio.current_task()]
        for task in running:
            task.cancel()  # a pump may wait on a quiet local socket; its end finishes the stream
        if not st.pumps:
            self._finish(st)

    def _finish(self, st: LinkStream) -> None:
        if st.finished:
            return
        st.finished = True
        self.streams.pop(st.sid, None)
        if st.local is not None:
            if st.error:
                reset_socket(st.local)
            else:
                with contextlib.suppress(OSError):
                    st.local.close()
        if not st.error and st.sid in self.mux.streams:
            with contextlib.suppress(MuxError):  # done here though the peer never ended its side
                self.mux.reset(st.sid)
            self._wake()
        self._last_busy = self._loop.time()
        if self.on_stream_end is not None:
            self.on_stream_end(st)
        if self.idle == 0 and self.dialer and not self.streams:
            self.close("")  # one stream per link, as configured

    async def _writer(self) -> None:
        loop = self._loop
        if self._preamble:
            await loop.sock_sendall(self.transport, self._preamble)
            self._preamble = b""
        if self._resend_now:
            records, self._resend_now = self._resend_now, []
            frames = [frame for record in records for frame in self.codec.encode(record)]
            await self._send(b"".join(frames))
        while not self._pausing:
            await self._kick.wait()
            self._kick.clear()
            if self._pausing:
                return
            out: list[bytes] = []
            if self._ack_wanted:
                self._ack_wanted = False
                if (ack := self.resend.ack_due(read_done=True)) is not None:
                    out += self.codec.encode(ack)
            if not self.resend.full:
                if not self.resend.kept:
                    self._ack_progress = loop.time()  # the wait for an acknowledgement starts now
                out += self._seal(self.mux.frames_to_send())
            if out:
                await self._send(out[0] if len(out) == 1 else b"".join(out))

    async def _send(self, data: bytes) -> None:
        try:
            await self._loop.sock_sendall(self.transport, data)
        finally:
            self._last_out = self._loop.time()

    def _seal(self, frames: list[bytes]) -> list[bytes]:
        """Whole mux frames packed into records of at most RECORD bytes, each kept for resending and
        sealed into one secure frame."""
        out: list[bytes] = []
        batch: list[bytes] = []
        size = 0
        for frame in frames:
            if batch and size + len(frame) > RECORD:
                out += self.codec.encode(self.resend.data(*batch))
                batch, size = [], 0
            batch.append(frame)
            size += len(frame)
        if batch:
            out += self.codec.encode(self.resend.data(*batch))
        return out

    async def _timers(self) -> None:
        """A ping after `keepalive` s of our silence (the answer is the peer's traffic); the transport
        is lost when it hears nothing for DEAD_AFTER_KEEPALIVES of them, or data waits BUSY_DEAD s for
        its acknowledgement; the dialer's idle close."""
        loop = self._loop
        while True:
            now = loop.time()
            due = [now + 1.0]
            if self.keepalive > 0:
                due += [self._last_out + self.keepalive, self.last_in + self.keepalive * DEAD_AFTER_KEEPALIVES]
            if self.idle and self.dialer:
                due.append(self._last_busy + self.idle)
            await asyncio.sleep(max(0.05, min(due) - now))
            now = loop.time()
            if self.keepalive > 0 and now - self._last_out >= self.keepalive:
                self.ping()  # keeps the relay and NAT state, and the answer keeps our `last_in`
                self._last_out = now
            if self.keepalive > 0 and now - self.last_in >= self.keepalive * DEAD_AFTER_KEEPALIVES:
                raise LinkClosed(f"nothing from the peer for {now - self.last_in:.0f}s (pings unanswered)")
            if self.resend.kept and now - self._ack_progress >= BUSY_DEAD:
                raise LinkClosed(f"{self.resend.kept_bytes} bytes unacknowledged for {now - self._ack_progress:.0f}s")
            if self.idle and self.dialer and not self.streams and now - self._last_busy >= self.idle:
                self.close("")  # idle: an orderly end
                return
            if self.streams:
                self._last_busy = now

    def _wake(self) -> None:
        self._kick.set()

    def _spawn(self, coro: Awaitable[None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task
