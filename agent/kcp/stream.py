"""A reliable byte stream over a (punched) UDP socket, handed out as an ordinary stream socket.

`KcpTransport` owns a connected UDP socket, a `KcpConnection` (agent/kcp/core.py: the
kcp-sys header and handshake) and an ikcp control block from the `kcp` package, and pumps
them from event-loop readiness callbacks plus a 10 ms timer. The session layer never sees
KCP: it gets one end of a `socket.socketpair()` whose bytes are the KCP stream, so the same
code that runs a TCP or relay session runs this one. EOF from the application (shutdown
or close) becomes a FIN once everything sent is acknowledged; the peer's FIN becomes EOF
once everything it sent has been delivered.

Settings are kcp-sys's "turbo" profile (MTU 1200, nodelay, interval 10 ms, fast resend 2,
no congestion window, windows 1024/1024). The `kcp` binding (0.1.6) has no way to switch
ikcp's stream mode on, so every segment is cut to at most one MSS before `ikcp_send`: each
then carries frg = 0 exactly as a stream-mode sender's would, and the wire is the same as
kcp-sys's. The binding also hides ikcp's RTT and retransmit counters; `KcpMeter` reads them
off the segments instead.

Flow control: the application socket is read in MSS-multiple batches only while ikcp's
send queue (waitsnd) is at most twice the send window, and ikcp is drained into the
application socket only while less than `max_pending_out` bytes wait there, so a slow
reader closes the KCP receive window instead of growing a buffer here.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import secrets
import socket
import sys
from dataclasses import dataclass, field

from kcp.exceptions import KCPConvMismatchError
from kcp.extension import KCP

from agent.kcp import release as kcp_release
from agent.kcp.core import (
    HEADER_SIZE,
    SEGMENT_OVERHEAD,
    ConnectionReset,
    ConnectionTimedOut,
    Established,
    Event,
    KcpConnection,
    KcpTimers,
    PeerFinished,
    State,
)
from agent.wire.addr import join_host_port

log = logging.getLogger("punchthrough.kcp")

MAX_DATAGRAMS_PER_WAKEUP = 512
"""UDP datagrams read per readiness callback before the pump yields to the loop."""

MAX_READS_PER_WAKEUP = 8
"""Application-socket batches read per readiness callback."""


class KcpError(ConnectionError):
    """A KCP transport could not be set up or was torn down by the peer."""


class KcpConnectTimeout(KcpError, TimeoutError):
    """No handshake within the timeout (a silent or absent peer)."""


class KcpRefused(KcpError, ConnectionRefusedError):
    """The peer answered the handshake with RST."""


@dataclass(frozen=True, slots=True)
class KcpConfig:
    mtu: int = 1200
    snd_wnd: int = 1024
    """Send window in segments; size it to the bandwidth-delay product (1024 x 1176 B = 1.2 MB in flight)."""
    rcv_wnd: int = 1024
    interval_ms: int = 10
    nodelay: bool = True
    resend: int = 2
    no_congestion_window: bool = True
    read_batches: int = 56
    """Application-socket read size in MSS units (56 x 1176 = 65856 bytes, about 64 KiB)."""
    max_pending_out: int = 1 << 20
    """Bytes taken out of ikcp but not yet accepted by the application socket."""
    udp_buffer: int = 4 << 20
    """SO_RCVBUF/SO_SNDBUF asked for on the UDP socket: a whole window must fit in the receive queue."""
    stream_buffer: int = 1 << 20
    """SO_SNDBUF/SO_RCVBUF of the socketpair."""
    src_session_id: int = 0
    dst_session_id: int = 0
    timers: KcpTimers = field(default_factory=KcpTimers)

    @property
    def mss(self) -> int:
        return self.mtu - SEGMENT_OVERHEAD


@dataclass(frozen=True, slots=True)
class KcpStats:
    state: str
    conv: int | None
    bytes_sent: int
    """Stream bytes taken from the application and handed to KCP."""
    bytes_received: int
    """Stream bytes delivered to the application socket."""
    datagrams_sent: int
    datagrams_received: int
    wire_bytes_sent: int
    wire_bytes_received: int
    segments_sent: int
    """KCP PUSH segments sent, retransmissions included."""
    segments_received: int
    retransmits: int
    acks_sent: int
    acks_received: int
    rtt_ms: int | None
    srtt_ms: float | None
    rttvar_ms: float | None
    waitsnd: int
    """Segments queued or in flight, not yet acknowledged."""
    send_errors: int
    drops: dict[str, int]
    close_reason: str | None


_BUFFER_OPTIONS = (
    ((33, socket.SO_RCVBUF), (32, socket.SO_SNDBUF))  # Linux SO_RCVBUFFORCE / SO_SNDBUFFORCE
    if sys.platform == "linux"
    else ((None, socket.SO_RCVBUF), (None, socket.SO_SNDBUF))
)


def _tune_buffers(sock: socket.socket, size: int) -> None:
    """Ask for big UDP buffers (the *FORCE options when privileged, else up to rmem_max).

    A whole send window arrives as one burst; with the default 208 KiB receive buffer the
    kernel would drop most of it on a fast path and KCP would spend its time retransmitting.
    """
    for force, plain in _BUFFER_OPTIONS:
        if force is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, force, size)
                continue
            except OSError:
                pass
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, plain, size)


def _is_connected(sock: socket.socket) -> bool:
    try:
        sock.getpeername()
    except OSError:
        return False
    return True


class KcpTransport:
    """One KCP connection over one UDP socket; see the module docstring.

    Build it with `await KcpTransport.connect(...)` or `await KcpTransport.accept(...)`.
    On success the transport owns the UDP socket (closed by `close()`); on failure or
    cancellation the socket is left to the caller, untouched apart from being connected.
    """

    def __init__(self, udp_sock: socket.socket, conn: KcpConnection, config: KcpConfig) -> None:
        self._loop = asyncio.get_running_loop()
        self._udp = udp_sock
        self._conn = conn
        self._config = config
        self._mss = config.mss
        self._read_size = config.mss * config.read_batches
        self._wait_limit = 2 * config.snd_wnd
        self._kcp: KCP | None = None
        self._established: asyncio.Future[None] = self._loop.create_future()
        self._done = asyncio.Event()
        self._closed = False
        self._timer: asyncio.TimerHandle | None = None
        self._udp_fd = udp_sock.fileno()
        self._send_errors = 0
        self._bytes_sent = 0
        self._bytes_received = 0
        # application side
        self._app, self._user = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        for s in (self._app, self._user):
            s.setblocking(False)
            with contextlib.suppress(OSError):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, config.stream_buffer)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, config.stream_buffer)
        self._app_fd = self._app.fileno()
        self._user_taken = False
        self._reading_app = False
        self._writing_app = False
        self._app_eof = False
        """The application finished sending (EOF or error on its socket)."""
        self._fin_queued = False
        self._peer_done = False
        """Nothing more will come from the peer: FIN, RST or timeout."""
        self._abortive = False
        """The receive side ended by RST/timeout: close the app socket instead of a half-close."""
        self._app_write_shut = False
        self._out = bytearray()
        # the notice channel (see notice_socket)
        self._notice: socket.socket | None = None
        self._notice_user: socket.socket | None = None
        self._noticed = False

    # ------------------------------------------------------------------ construction

    @classmethod
    async def connect(
        cls,
        udp_sock: socket.socket,
        peer_addr: tuple[str, int] | tuple[str, int, int, int],
        timeout: float = 18.0,
        *,
        config: KcpConfig | None = None,
        conv: int | None = None,
    ) -> KcpTransport:
        """Dial the peer (SYN every 200 ms until SYN|ACK or `timeout`).

        Raises KcpConnectTimeout for a silent peer and KcpRefused when it answers RST.
        """
        config = config or KcpConfig()
        loop = asyncio.get_running_loop()
        udp_sock.setblocking(False)
        udp_sock.connect(peer_addr)
        conn = KcpConnection.client(
            secrets.randbits(32) if conv is None else conv,
            loop.time(),
            timeout,
            src_session_id=config.src_session_id,
            dst_session_id=config.dst_session_id,
            timers=config.timers,
        )
        transport = cls(udp_sock, conn, config)
        return await transport._handshake(None)

    @classmethod
    async def accept(
        cls,
        udp_sock: socket.socket,
        timeout: float = 18.0,
        *,
        first_datagram: bytes | None = None,
        peer_addr: tuple[str, int] | tuple[str, int, int, int] | None = None,
        config: KcpConfig | None = None,
    ) -> KcpTransport:
        """Wait for the peer's SYN and complete the handshake.

        The socket must already be connected to the peer (as after `udp_punch.punch`), or
        `peer_addr` given. `first_datagram` is the SYN the punch runner already read.
        """
        config = config or KcpConfig()
        loop = asyncio.get_running_loop()
        udp_sock.setblocking(False)
        if peer_addr is not None:
            udp_sock.connect(peer_addr)
        elif not _is_connected(udp_sock):
            raise ValueError("accept needs a UDP socket connected to the peer, or peer_addr")
        conn = KcpConnection.server(loop.time(), timeout, timers=config.timers)
        transport = cls(udp_sock, conn, config)
        return await transport._handshake(first_datagram)

    async def _handshake(self, first_datagram: bytes | None) -> KcpTransport:
        _tune_buffers(self._udp, self._config.udp_buffer)
        self._loop.add_reader(self._udp_fd, self._on_udp_readable)
        try:
            now = self._loop.time()
            if first_datagram is not None:
                self._feed(first_datagram, now)
            self._service(now)
            self._schedule_tick()
            await self._established
        except BaseException:
            self._conn.abort(self._loop.time(), "handshake abandoned")
            self._flush_control()
            self._teardown(close_udp=False)
            raise
        return self

    # ------------------------------------------------------------------ public API

    def stream_socket(self) -> socket.socket:
        """The application's end: a non-blocking AF_UNIX stream socket carrying the KCP stream.

        The caller owns it (closes it). EOF on it (shutdown(SHUT_WR) or close) sends FIN once
        everything written is acknowledged; the peer's FIN shows up as EOF on it.
        """
        self._user_taken = True
        return self._user

    def notice_socket(self) -> socket.socket:
        """A side channel saying how the connection ended, for a stream owner in another process.

        The transport writes one line on it when the connection is over: the close reason when it
        failed (reset, timed out, the peer's port closed) and "closed" after an orderly end; EOF with
        no line means the process running this transport died. The stream socket alone cannot tell
        these apart: each looks like an EOF. The caller owns (closes) the returned socket.
        """
        if self._notice_user is None:
            self._notice, self._notice_user = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            self._notice.setblocking(False)
            if self._noticed:  # already over
                self._noticed = False
                self._notify(self._conn.close_reason or "closed")
            if self._closed:
                self._notice.close()
        return self._notice_user

    def _notify(self, line: str) -> None:
        """The one line of the notice channel; written before the stream socket shows the end."""
        if self._noticed:
            return
        self._noticed = True
        if self._notice is not None:
            with contextlib.suppress(OSError):
                self._notice.send((" ".join(line.split())[:300] + "\n").encode())

    @property
    def state(self) -> State:
        return self._conn.state

    @property
    def conv(self) -> int | None:
        return self._conn.conv

    @property
    def close_reason(self) -> str | None:
        return self._conn.close_reason

    def stats(self) -> KcpStats:
        m = self._conn.meter
        return KcpStats(
            state=self._conn.state.value,
            conv=self._conn.conv,
            bytes_sent=self._bytes_sent,
            bytes_received=self._bytes_received,
            datagrams_sent=m.datagrams_sent,
            datagrams_received=m.datagrams_received,
            wire_bytes_sent=m.wire_bytes_sent,
            wire_bytes_received=m.wire_bytes_received,
            segments_sent=m.segments_sent,
            segments_received=m.segments_received,
            retransmits=m.retransmits,
            acks_sent=m.acks_sent,
            acks_received=m.acks_received,
            rtt_ms=m.rtt_ms,
            srtt_ms=m.srtt_ms,
            rttvar_ms=m.rttvar_ms,
            waitsnd=self._kcp.get_outbound_packets() if self._kcp is not None else 0,
            send_errors=self._send_errors,
            drops=self._conn.drops.snapshot(),
            close_reason=self._conn.close_reason,
        )

    async def wait_closed(self) -> None:
        """Until the connection is over: both FINs exchanged, reset, timed out or `close()`d."""
        await self._done.wait()

    async def close(self, linger: float = 2.0) -> None:
        """Finish and release everything (the UDP socket too).

        Waits up to `linger` seconds for a clean two-way close: whatever the application
        already wrote is delivered and acknowledged, our FIN goes out, the peer's FIN comes
        back (and our own last FIN is confirmed). Whatever is not done by then gets an RST,
        as a TCP close with the receive side still open would. linger=0 resets at once.
        """
        if self._closed:
            return
        conn = self._conn
        deadline = self._loop.time() + linger
        if conn.state in (State.ESTABLISHED, State.PEER_CLOSED) and not self._app_eof:
            self._drain_app()
            self._service(self._loop.time())
        while not conn.settled and self._loop.time() < deadline:
            await asyncio.sleep(self._config.interval_ms / 1000)
        now = self._loop.time()
        if conn.state is not State.CLOSED:
            conn.abort(now, "closed locally")
        self._flush_control()
        self._teardown(close_udp=True)

    def _drain_app(self) -> None:
        """close(): take what the application already wrote (ignoring backpressure), then EOF."""
        self._stop_reading_app()
        kcp = self._kcp
        while kcp is not None and not self._app_eof:
            try:
                data = self._app.recv(self._read_size)
            except BlockingIOError:
                break
            except OSError:
                data = b""
            if not data:
                break
            self._enqueue(kcp, data)
        self._app_eof = True

    # ------------------------------------------------------------------ pump: UDP side

    def _on_udp_readable(self) -> None:
        now = self._loop.time()
        recv = self._udp.recv
        for _ in range(MAX_DATAGRAMS_PER_WAKEUP):
            try:
                data = recv(65536)
            except BlockingIOError:
                break
            except ConnectionRefusedError:  # ICMP port unreachable from an earlier send
                self._conn.port_unreachable(now)
                continue
            except OSError as exc:
                self._conn.drops.drop("recv_error", "kcp", now)
                log.debug("kcp recv error: %s", exc)
                break
            self._feed(data, now)
        self._service(now)

    def _feed(self, data: bytes, now: float) -> None:
        segments = self._conn.receive_datagram(data, now)
        if segments is not None:
            kcp = self._kcp or self._make_kcp()
            try:
                kcp.receive(segments)
            except KCPConvMismatchError:  # pragma: no cover - scan_segments checked conv
                self._conn.drops.drop("ikcp_conv", "kcp", now)
            except Exception:  # pragma: no cover - scan_segments checked lengths and commands
                self._conn.drops.drop("ikcp_input", "kcp", now)

    def _make_kcp(self) -> KCP:
        conv = self._conn.conv
        assert conv is not None
        c = self._config
        kcp = KCP(
            conv - (1 << 32) if conv >= 1 << 31 else conv,  # the binding takes a C int; ikcp stores it as u32
            max_transmission=c.mtu,
            no_delay=c.nodelay,
            update_interval=c.interval_ms,
            resend_count=c.resend,
            no_congestion_control=c.no_congestion_window,
            send_window_size=c.snd_wnd,
            receive_window_size=c.rcv_wnd,
        )
        kcp.include_outbound_handler(self._on_kcp_output)
        kcp.update(self._conn.now_ms(self._loop.time()))
        self._kcp = kcp
        return kcp

    def _on_kcp_output(self, _kcp: KCP, segments: bytes) -> None:
        # Called from inside ikcp_flush (C, noexcept): must never raise.
        try:
            self._udp.send(self._conn.wrap_segments(segments))
        except OSError as exc:
            # UDP: a full socket buffer or an ICMP error is just loss, which KCP repairs.
            self._send_failed(exc)

    def _send_raw(self, datagram: bytes) -> None:
        try:
            self._udp.send(datagram)
        except OSError as exc:
            self._send_failed(exc)

    def _send_failed(self, exc: OSError) -> None:
        self._send_errors += 1
        if isinstance(exc, ConnectionRefusedError):  # an ICMP error for an earlier datagram, reported here
            self._conn.port_unreachable(self._loop.time())

    def _flush_control(self) -> None:
        if self._conn.has_datagrams():
            for datagram in self._conn.datagrams_to_send():
                self._send_raw(datagram)

    # ------------------------------------------------------------------ pump: the heart

    def _service(self, now: float) -> None:
        """After any I/O or tick: events, delivery to the app, ikcp flush, FIN, control packets."""
        conn = self._conn
        event = conn.next_event()
        while event is not None:
            self._on_event(event)
            event = conn.next_event()
        kcp = self._kcp
        if kcp is not None and not self._closed:
            if conn.state is State.CLOSED and self._abortive:
                # Reset or reaped: nobody will acknowledge anything again, stop transmitting.
                if not self._writing_app:
                    self._deliver()
                self._flush_control()
                if not self._done.is_set() and self._receive_side_finished():
                    self._done.set()
                return
            if not self._writing_app and (self._out or kcp.get_next_packet_size() >= 0 or self._peer_done):
                self._deliver()
            kcp.update(conn.now_ms(now))
            kcp.flush()
            if self._app_eof:
                if not self._fin_queued and kcp.get_outbound_packets() == 0:
                    if conn.state in (State.ESTABLISHED, State.PEER_CLOSED):
                        conn.close(now)
                    self._fin_queued = True
            elif (
                not self._reading_app
                and self._established.done()
                and conn.state in (State.ESTABLISHED, State.PEER_CLOSED)
                and kcp.get_outbound_packets() <= self._wait_limit
            ):
                self._start_reading_app()
        self._flush_control()
        if conn.state is State.CLOSED and not self._done.is_set() and self._receive_side_finished():
            self._done.set()

    def _on_event(self, event: Event) -> None:
        if isinstance(event, Established):
            if self._kcp is None:
                self._make_kcp()
            if not self._established.done():
                self._established.set_result(None)
            self._start_reading_app()
        elif isinstance(event, PeerFinished):
            self._peer_done = True
        elif isinstance(event, ConnectionReset | ConnectionTimedOut):
            self._peer_done = True
            self._abortive = True
            self._stop_reading_app()
            self._app_eof = True
            self._fin_queued = True
            self._notify(self._conn.close_reason or event.reason)
            if not self._established.done():
                if isinstance(event, ConnectionTimedOut):
                    self._established.set_exception(
                        KcpConnectTimeout(f"KCP {event.phase} to {self._peer_name()} timed out: {event.reason}")
                    )
                else:
                    self._established.set_exception(KcpRefused(f"KCP to {self._peer_name()}: {event.reason}"))
            else:
                log.info("kcp conv %s: %s", self._conn.conv, self._conn.close_reason)

    def _is_closed(self) -> bool:
        return self._conn.state is State.CLOSED

    def _receive_side_finished(self) -> bool:
        return self._app_write_shut or self._closed

    def _peer_name(self) -> str:
        try:
            host, port = self._udp.getpeername()[:2]
        except OSError:
            return "peer"
        return join_host_port(str(host), int(port))

    # ------------------------------------------------------------------ pump: app -> KCP

    def _start_reading_app(self) -> None:
        if not self._reading_app and not self._app_eof and not self._closed:
            self._loop.add_reader(self._app_fd, self._on_app_readable)
            self._reading_app = True

    def _stop_reading_app(self) -> None:
        if self._reading_app:
            self._loop.remove_reader(self._app_fd)
            self._reading_app = False

    def _on_app_readable(self) -> None:
        kcp = self._kcp
        if kcp is None:  # pragma: no cover - reading starts only once established
            return
        recv = self._app.recv
        size = self._read_size
        limit = self._wait_limit
        for _ in range(MAX_READS_PER_WAKEUP):
            if kcp.get_outbound_packets() > limit:
                break
            try:
                data = recv(size)
            except BlockingIOError:
                break
            except OSError:
                data = b""
            if not data:
                self._stop_reading_app()
                self._app_eof = True
                break
            self._enqueue(kcp, data)
        if kcp.get_outbound_packets() > limit:
            self._stop_reading_app()  # backpressure: resumed by _service once acks drain the queue
        self._service(self._loop.time())

    def _enqueue(self, kcp: KCP, data: bytes) -> None:
        """One MSS per ikcp_send: frg stays 0, as a stream-mode sender's would (see module docstring)."""
        self._bytes_sent += len(data)
        mss = self._mss
        if len(data) <= mss:
            kcp.enqueue(data)
        else:
            enqueue = kcp.enqueue
            for i in range(0, len(data), mss):
                enqueue(data[i : i + mss])

    # ------------------------------------------------------------------ pump: KCP -> app

    def _deliver(self) -> None:
        kcp = self._kcp
        assert kcp is not None
        out = self._out
        limit = self._config.max_pending_out
        peek = kcp.get_next_packet_size
        get = kcp.get_received
        before = len(out)
        while len(out) < limit and peek() >= 0:
            out += get()
        self._bytes_received += len(out) - before
        if out:
            self._write_app()
        if not out and self._peer_done and peek() < 0 and not self._app_write_shut:
            self._finish_app_side()

    def _write_app(self) -> None:
        out = self._out
        try:
            sent = self._app.send(out)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._app_gone(exc)
            return
        del out[:sent]
        if out and not self._writing_app:
            self._loop.add_writer(self._app_fd, self._on_app_writable)
            self._writing_app = True
        elif not out and self._writing_app:
            self._loop.remove_writer(self._app_fd)
            self._writing_app = False

    def _on_app_writable(self) -> None:
        self._write_app()
        if not self._out:
            self._service(self._loop.time())

    def _finish_app_side(self) -> None:
        """Everything the peer will ever send is delivered: EOF (or, after RST, close) to the app."""
        self._app_write_shut = True
        if self._abortive:
            self._stop_reading_app()
            with contextlib.suppress(OSError):
                self._app.shutdown(socket.SHUT_RDWR)
        else:
            with contextlib.suppress(OSError):
                self._app.shutdown(socket.SHUT_WR)

    def _app_gone(self, exc: OSError) -> None:
        """The application closed its socket while data was still coming: reset like TCP would."""
        log.debug("kcp conv %s: application socket gone (%s), resetting", self._conn.conv, exc)
        self._out.clear()
        self._stop_reading_app()
        if self._writing_app:
            self._loop.remove_writer(self._app_fd)
            self._writing_app = False
        self._app_eof = True
        self._fin_queued = True
        self._app_write_shut = True
        self._peer_done = True
        self._abortive = True
        if exc.errno not in (errno.EPIPE, errno.ECONNRESET):  # pragma: no cover
            log.info("kcp conv %s: application socket error %s", self._conn.conv, exc)
        self._conn.abort(self._loop.time(), "application closed its socket with data pending")

    # ------------------------------------------------------------------ timer and teardown

    def _schedule_tick(self) -> None:
        if not self._closed:
            self._timer = self._loop.call_later(self._config.interval_ms / 1000, self._tick)

    def _tick(self) -> None:
        now = self._loop.time()
        conn = self._conn
        timer = conn.get_timer()
        if timer is not None and now >= timer:
            conn.handle_timer(now)
        self._service(now)
        if conn.state is State.CLOSED and self._done.is_set() and conn.get_timer() is None:
            # Over: the UDP reader stays (a duplicate FIN still gets its RST) until close().
            self._timer = None
            return
        self._schedule_tick()

    def _teardown(self, *, close_udp: bool) -> None:
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._stop_reading_app()
        if self._writing_app:
            self._loop.remove_writer(self._app_fd)
            self._writing_app = False
        self._loop.remove_reader(self._udp_fd)
        self._notify(self._conn.close_reason or "closed")
        if self._notice is not None:
            self._notice.close()
        self._app.close()
        if not self._user_taken:
            self._user.close()
        if close_udp:
            self._udp.close()
        if self._kcp is not None and self._conn.conv is not None:
            # freed on the next loop turn: a caller up the stack (the timer, a datagram) may still
            # hold this object in a local for the rest of its synchronous step
            self._loop.call_soon(kcp_release.release, self._kcp, self._conn.conv)
        self._kcp = None
        self._done.set()


__all__ = [
    "HEADER_SIZE",
    "KcpConfig",
    "KcpConnectTimeout",
    "KcpError",
    "KcpRefused",
    "KcpStats",
    "KcpTransport",
]
