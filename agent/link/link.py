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
from agent.link import mux_core, stream_open
from agent.link.mux_core import Mux, MuxError
from agent.session import stream as session_stream
from agent.session.stream import CHUNK, PumpStats, SessionError, StreamCodec

log = logging.getLogger(__name__)

READ = 256 * 1024
"""Most bytes read from a local socket at once (also bounded by the stream's window)."""
OPEN_TIMEOUT = 15.0
"""Seconds the opener waits for the far end's answer (it connects the target: 5 s at most)."""
DEAD_AFTER_KEEPALIVES = 3
"""A link that heard nothing from the peer for this many keepalive intervals is dead: a live peer
answers each of our pings at once (agent.common.netutil.DEAD_PATH_TIMEOUT's 30 s, at the default)."""

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
        self.mux = Mux(dialer, frame_size=CHUNK - mux_core.HEADER.size)
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
        self._sending = False

    # ---- the application's side -------------------------------------------------------------------

    async def open(self, target: str, timeout: float = OPEN_TIMEOUT) -> LinkStream:
        """A new stream to `target` on the far end, once it answered; StreamRefused or LinkClosed."""
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
        st = self.streams[sid] = LinkStream(sid, target, answer=self._loop.create_future())
        self.opened += 1
        self._wake()
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

    def loop_time(self) -> float:
        return self._loop.time()

    async def heard_within(self, seconds: float) -> bool:
        """Ping, then True as soon as anything arrives from the peer, False after `seconds` of silence
        (and the link is suspect from then on, until the peer is heard)."""
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
        with contextlib.suppress(MuxError, SessionError, OSError):
            if not self.mux.closed:
                self.mux.go_away()
            frames = self._seal(self.mux.frames_to_send())
            if not self.codec.sent_eof:
                frames.append(self.codec.encode_eof())
            self.transport.send(b"".join(frames))  # best effort: the transport is closed next
        self._end(reason or "link closed")

    # ---- running ----------------------------------------------------------------------------------

    async def run(self) -> str:
        """Until the link ends; returns "" for an orderly end, else why it failed."""
        tune_transport(self.transport)
        self.transport.setblocking(False)
        tasks = [
            asyncio.ensure_future(self._reader()),
            asyncio.ensure_future(self._writer()),
            asyncio.ensure_future(self._timers()),
        ]
        ended = asyncio.ensure_future(self.ended.wait())
        try:
            done, _ = await asyncio.wait([*tasks, ended], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is ended:
                    continue
                exc = task.exception()
                if isinstance(exc, (SessionError, MuxError, LinkClosed)):
                    self._end(str(exc))
                elif isinstance(exc, OSError):
                    self._end(f"connection to the peer failed: {describe_error(exc)}")
                elif exc is not None:
                    self._end(f"link failed: {type(exc).__name__}: {exc}")
                    raise exc
                else:
                    self._end("")
        finally:
            for task in [*tasks, ended]:
                task.cancel()
            await asyncio.gather(*tasks, ended, return_exceptions=True)
            self._end(self.error or "link closed")
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        return self.error

    def _end(self, reason: str) -> None:
        if self.ended.is_set():
            return
        self.closing = True
        self.error = reason
        self.ended.set()
        for st in list(self.streams.values()):
            self._drop(st, f"link to the peer lost: {reason}" if reason else "link closed", reset=False)
        with contextlib.suppress(OSError):
            self.transport.close()

    async def _reader(self) -> None:
        loop = self._loop
        for piece in self.early:
            for event in self.mux.receive(piece):
                self._on_event(event)
        self.early = []
        while True:
            chunk = await loop.sock_recv(self.transport, 256 * 1024)
            if not chunk:
                if self.codec.peer_eof:
                    return
                raise LinkClosed("connection to the peer was cut (no authenticated end of the link)")
            self.last_in = loop.time()
            self.suspect = False
            self._heard.set()
            for part in self.codec.decode(chunk):
                if part is None:
                    return  # the peer ended the link in order
                for event in self.mux.receive(part):
                    self._on_event(event)
            if self.mux.has_output:
                self._wake()

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
        while True:
            await self._kick.wait()
            self._kick.clear()
            frames = self.mux.frames_to_send()
            if not frames:
                continue
            data = self._seal(frames)
            self._sending = True
            try:
                await loop.sock_sendall(self.transport, data[0] if len(data) == 1 else b"".join(data))
            finally:
                self._sending = False
                self._last_out = loop.time()

    def _seal(self, frames: list[bytes]) -> list[bytes]:
        """Whole mux frames packed into secure frames of at most CHUNK plaintext bytes."""
        out: list[bytes] = []
        batch: list[bytes] = []
        size = 0
        for frame in frames:
            if batch and size + len(frame) > CHUNK:
                out += self.codec.encode(b"".join(batch))
                batch, size = [], 0
            batch.append(frame)
            size += len(frame)
        if batch:
            out += self.codec.encode(batch[0] if len(batch) == 1 else b"".join(batch))
        return out

    async def _timers(self) -> None:
        """A ping after `keepalive` s of our silence (the answer is the peer's traffic), the end of a link
        that hears nothing for DEAD_AFTER_KEEPALIVES of them, and the dialer's idle close."""
        loop = self._loop
        while True:
            now = loop.time()
            due = [self._last_out + self.keepalive, self.last_in + self.keepalive * DEAD_AFTER_KEEPALIVES]
            if self.keepalive <= 0:
                due = []
            if self.idle and self.dialer:
                due.append(self._last_busy + self.idle)
            await asyncio.sleep(max(0.05, min(due) - now) if due else 3600)
            now = loop.time()
            if self.keepalive > 0 and now - self._last_out >= self.keepalive:
                self.ping()  # keeps the relay and NAT state, and the answer keeps our `last_in`
                self._last_out = now
            if self.keepalive > 0 and now - self.last_in >= self.keepalive * DEAD_AFTER_KEEPALIVES:
                raise LinkClosed(f"nothing from the peer for {now - self.last_in:.0f}s (pings unanswered)")
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
