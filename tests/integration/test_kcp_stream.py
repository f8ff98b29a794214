"""KcpTransport and the UDP punch on loopback: real sockets, real ikcp, an in-test lossy proxy."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import socket
from collections.abc import AsyncIterator, Callable

import pytest

from agent.kcp.core import (
    ACK,
    CMD_ACK,
    CMD_PUSH,
    DATA,
    FIN,
    HEADER,
    HEADER_SIZE,
    PING,
    PONG,
    RST,
    SEGMENT,
    SEGMENT_OVERHEAD,
    SYN,
    KcpTimers,
    State,
)
from agent.kcp.stream import KcpConfig, KcpConnectTimeout, KcpRefused, KcpTransport
from agent.strategies.punch_schedule import PunchSchedule, PunchTimeout, punch

pytestmark = pytest.mark.timeout(60)

MB = 1_000_000


# --------------------------------------------------------------------------- helpers


def udp_socket(host: str = "127.0.0.1") -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.bind((host, 0))
    s.setblocking(False)
    return s


class UdpProxy:
    """A two-legged UDP relay between endpoints A and B that can lose, reorder, duplicate and inject.

    A's socket talks to `a_side`, B's to `b_side`; each datagram is forwarded out of the other
    side. Everything the proxy sends comes from the address the endpoint is connected to, so
    injected junk passes the kernel's connected-socket filter exactly like a hostile peer's.
    """

    def __init__(self, a_addr: tuple[str, int], b_addr: tuple[str, int], *, seed: int = 1) -> None:
        self.a_side = udp_socket()
        self.b_side = udp_socket()
        for s in (self.a_side, self.b_side):  # a path with deep buffers: loss is only what we choose
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.a_addr = a_addr
        self.b_addr = b_addr
        self.rng = random.Random(seed)
        self.loss = 0.0
        self.dup = 0.0
        self.reorder = 0.0
        self.forwarded = 0
        self.dropped = 0
        self.filter: Callable[[bytes], bool] | None = None
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.a_side.fileno(), self._pump, self.a_side, self.b_side, b_addr)
        self._loop.add_reader(self.b_side.fileno(), self._pump, self.b_side, self.a_side, a_addr)

    def _pump(self, src: socket.socket, dst: socket.socket, to: tuple[str, int]) -> None:
        for _ in range(256):
            try:
                data = src.recv(65536)
            except BlockingIOError:
                return
            except OSError:
                continue
            if (self.filter is not None and not self.filter(data)) or self.rng.random() < self.loss:
                self.dropped += 1
                continue
            copies = 2 if self.rng.random() < self.dup else 1
            for _ in range(copies):
                if self.rng.random() < self.reorder:
                    self._loop.call_later(self.rng.uniform(0.001, 0.02), self._send, dst, data, to)
                else:
                    self._send(dst, data, to)

    def _send(self, dst: socket.socket, data: bytes, to: tuple[str, int]) -> None:
        with contextlib.suppress(OSError):
            dst.sendto(data, to)
            self.forwarded += 1

    def inject(self, junk: bytes) -> None:
        """One datagram to each endpoint, from the address it believes is its peer."""
        self._send(self.a_side, junk, self.a_addr)
        self._send(self.b_side, junk, self.b_addr)

    def close(self) -> None:
        for s in (self.a_side, self.b_side):
            self._loop.remove_reader(s.fileno())
            s.close()


@contextlib.asynccontextmanager
async def kcp_pair(
    *,
    host: str = "127.0.0.1",
    config: KcpConfig | None = None,
    proxy: bool = False,
) -> AsyncIterator[tuple[KcpTransport, KcpTransport, UdpProxy | None]]:
    a, b = udp_socket(host), udp_socket(host)
    px: UdpProxy | None = None
    a_peer, b_peer = b.getsockname(), a.getsockname()
    if proxy:
        px = UdpProxy(a.getsockname(), b.getsockname())
        a_peer, b_peer = px.a_side.getsockname(), px.b_side.getsockname()
    transports: list[KcpTransport] = []
    try:
        async with asyncio.timeout(10):
            ta, tb = await asyncio.gather(
                KcpTransport.connect(a, a_peer, 5.0, config=config),
                KcpTransport.accept(b, 5.0, peer_addr=b_peer, config=config),
            )
        transports = [ta, tb]
        yield ta, tb, px
    finally:
        for t in transports:
            with contextlib.suppress(OSError):
                t.stream_socket().close()
            await t.close(linger=0)
        if px is not None:
            px.close()
        a.close()
        b.close()


async def send_all(sock: socket.socket, data: bytes, *, shut: bool = True) -> None:
    loop = asyncio.get_running_loop()
    view = memoryview(data)
    for i in range(0, len(data), 1 << 20):
        await loop.sock_sendall(sock, view[i : i + (1 << 20)])
    if shut:
        sock.shutdown(socket.SHUT_WR)


async def recv_all(sock: socket.socket) -> tuple[int, str]:
    """Bytes and SHA-256 of everything up to EOF."""
    loop = asyncio.get_running_loop()
    h = hashlib.sha256()
    n = 0
    while chunk := await loop.sock_recv(sock, 1 << 18):
        h.update(chunk)
        n += len(chunk)
    return n, h.hexdigest()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


# --------------------------------------------------------------------------- basics


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
async def test_connect_accept_and_echo(host: str) -> None:
    if host == "::1" and not socket.has_ipv6:
        pytest.skip("no IPv6")
    async with kcp_pair(host=host) as (ta, tb, _):
        assert ta.conv == tb.conv is not None
        assert ta.state is tb.state is State.ESTABLISHED
        sa, sb = ta.stream_socket(), tb.stream_socket()
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(sa, b"ping")
        assert await loop.sock_recv(sb, 100) == b"ping"
        await loop.sock_sendall(sb, b"pong")
        assert await loop.sock_recv(sa, 100) == b"pong"
        assert sa.getblocking() is False
        stats = ta.stats()
        assert stats.bytes_sent == 4 and stats.bytes_received == 4
        assert stats.state == "established"
        assert stats.srtt_ms is not None


async def test_20mb_both_ways_sha256() -> None:
    rng = random.Random(20)
    data_ab, data_ba = rng.randbytes(20 * MB), rng.randbytes(20 * MB)
    async with kcp_pair() as (ta, tb, _):
        sa, sb = ta.stream_socket(), tb.stream_socket()
        async with asyncio.timeout(40):
            _, _, got_b, got_a = await asyncio.gather(
                send_all(sa, data_ab), send_all(sb, data_ba), recv_all(sb), recv_all(sa)
            )
        assert got_b == (len(data_ab), sha(data_ab))
        assert got_a == (len(data_ba), sha(data_ba))
        await asyncio.wait_for(asyncio.gather(ta.wait_closed(), tb.wait_closed()), 5)
        assert ta.state is tb.state is State.CLOSED
        assert ta.close_reason == tb.close_reason == "closed"
        st = ta.stats()
        assert st.bytes_sent == st.bytes_received == 20 * MB
        assert st.waitsnd == 0


async def test_half_close_one_way_while_the_other_continues() -> None:
    payload = random.Random(3).randbytes(2 * MB)
    async with kcp_pair() as (ta, tb, _):
        sa, sb = ta.stream_socket(), tb.stream_socket()
        loop = asyncio.get_running_loop()
        await send_all(sa, b"request, then EOF")
        n, digest = await recv_all(sb)
        assert (n, digest) == (17, sha(b"request, then EOF"))
        await until(lambda: ta.state is State.LOCAL_CLOSED and tb.state is State.PEER_CLOSED)
        # B keeps sending long after A's FIN
        _, got = await asyncio.gather(send_all(sb, payload, shut=False), recv_all_n(sa, len(payload)))
        assert got == payload
        sb.shutdown(socket.SHUT_WR)
        assert await loop.sock_recv(sa, 10) == b""
        await asyncio.wait_for(asyncio.gather(ta.wait_closed(), tb.wait_closed()), 5)
        assert ta.state is tb.state is State.CLOSED


async def recv_all_n(sock: socket.socket, n: int) -> bytes:
    loop = asyncio.get_running_loop()
    buf = bytearray()
    while len(buf) < n:
        chunk = await loop.sock_recv(sock, n - len(buf))
        assert chunk, "unexpected EOF"
        buf += chunk
    return bytes(buf)


async def test_close_delivers_what_was_written_then_fin() -> None:
    payload = random.Random(4).randbytes(3 * MB)
    async with kcp_pair() as (ta, tb, _):
        sa, sb = ta.stream_socket(), tb.stream_socket()
        loop = asyncio.get_running_loop()

        async def receive_then_close() -> tuple[int, str]:
            got = await recv_all(sb)
            sb.shutdown(socket.SHUT_WR)
            return got

        receiver = asyncio.create_task(receive_then_close())
        await loop.sock_sendall(sa, payload)  # no shutdown: close() must flush, FIN, and wait for B's FIN
        await ta.close(linger=10)
        assert await asyncio.wait_for(receiver, 10) == (len(payload), sha(payload))
        assert ta.state is State.CLOSED and ta.close_reason == "closed"
        await asyncio.wait_for(tb.wait_closed(), 5)
        assert tb.close_reason == "closed"
        assert ta.stats().bytes_sent == len(payload)
        with pytest.raises(OSError):
            sa.send(b"after close")


async def test_close_resets_a_peer_that_keeps_its_half_open() -> None:
    async with kcp_pair() as (ta, tb, _):
        sb = tb.stream_socket()
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(ta.stream_socket(), b"last words")
        await ta.close(linger=0.3)  # B never closes its half: after the linger, RST
        assert await recv_all(sb) == (10, sha(b"last words"))
        await asyncio.wait_for(tb.wait_closed(), 5)
        assert "reset" in (tb.close_reason or "")


async def test_peer_application_closing_its_socket_resets() -> None:
    async with kcp_pair() as (ta, tb, _):
        sa, sb = ta.stream_socket(), tb.stream_socket()
        loop = asyncio.get_running_loop()
        sb.close()  # B's application is gone; A's data can no longer be delivered
        await loop.sock_sendall(sa, b"x" * 100_000)
        await asyncio.wait_for(ta.wait_closed(), 5)
        assert ta.state is tb.state is State.CLOSED
        assert "reset" in (ta.close_reason or "")
        assert await loop.sock_recv(sa, 10) == b""


async def test_backpressure_bounds_buffering_when_the_reader_stalls() -> None:
    config = KcpConfig(snd_wnd=32, rcv_wnd=32, max_pending_out=64 * 1024, stream_buffer=64 * 1024)
    payload = random.Random(5).randbytes(8 * MB)
    async with kcp_pair(config=config) as (ta, tb, _):
        sa, sb = ta.stream_socket(), tb.stream_socket()
        # Fill everything without reading on B: writes must stop being accepted.
        accepted = 0
        refusals = 0
        while refusals < 30:
            try:
                accepted += sa.send(payload[accepted : accepted + 65536])
                refusals = 0
            except BlockingIOError:
                refusals += 1
                await asyncio.sleep(0.01)
        stalled = ta.stats()
        assert accepted < len(payload)
        # waitsnd stops growing at 2 x snd_wnd plus one read batch
        assert stalled.waitsnd <= 2 * 32 + config.read_batches
        assert stalled.bytes_sent < 2 * MB
        _, got = await asyncio.gather(send_all(sa, payload[accepted:]), recv_all(sb))
        assert got == (len(payload), sha(payload))


# --------------------------------------------------------------------------- loss, reordering, junk


async def test_5_percent_loss_5mb_intact() -> None:
    payload = random.Random(6).randbytes(5 * MB)
    back = random.Random(7).randbytes(MB)
    async with kcp_pair(proxy=True) as (ta, tb, px):
        assert px is not None
        px.loss = 0.05
        sa, sb = ta.stream_socket(), tb.stream_socket()
        async with asyncio.timeout(40):
            _, _, got_b, got_a = await asyncio.gather(
                send_all(sa, payload), send_all(sb, back), recv_all(sb), recv_all(sa)
            )
        assert got_b == (len(payload), sha(payload))
        assert got_a == (len(back), sha(back))
        assert px.dropped > 0
        assert ta.stats().retransmits > 0


async def test_reordering_and_duplication_5mb_intact() -> None:
    payload = random.Random(8).randbytes(5 * MB)
    async with kcp_pair(proxy=True) as (ta, tb, px):
        assert px is not None
        px.reorder, px.dup, px.loss = 0.1, 0.05, 0.01
        sa, sb = ta.stream_socket(), tb.stream_socket()
        async with asyncio.timeout(40):
            _, got = await asyncio.gather(send_all(sa, payload), recv_all(sb))
        assert got == (len(payload), sha(payload))


def junk_datagrams(conv: int, rng: random.Random) -> list[bytes]:
    def hdr(flags: int, c: int = conv) -> bytes:
        return HEADER.pack(c, 0, 0, flags, 0)

    def push(sn: int, data: bytes, c: int = conv, length: int | None = None) -> bytes:
        return SEGMENT.pack(c, CMD_PUSH, 0, 1024, 0, sn, 0, len(data) if length is None else length) + data

    return [
        b"",
        b"\x00",
        rng.randbytes(13),
        rng.randbytes(14),
        rng.randbytes(1200),
        hdr(0x80 | DATA) + push(0, b"EVIL"),  # unknown flag
        hdr(DATA | ACK, conv ^ 0x5A5A) + push(0, b"EVIL", c=conv ^ 0x5A5A),  # wrong conv
        hdr(DATA | ACK) + push(5, b"EVIL", c=conv ^ 1),  # right header, wrong segment conv
        hdr(DATA | ACK) + push(0, b"EVIL", length=0x7FFFFFFF),  # huge length
        hdr(DATA | ACK) + push(0, b"EVIL", length=0xFFFFFFFF),
        hdr(DATA | ACK) + SEGMENT.pack(conv, 99, 0, 0, 0, 0, 0, 4) + b"EVIL",  # bad command
        hdr(DATA | ACK) + SEGMENT.pack(conv, CMD_PUSH, 7, 1024, 0, 0, 0, 4) + b"EVIL",  # frg
        hdr(DATA | ACK) + push(1, b"EVIL") + b"trail",  # trailing garbage
        hdr(DATA | ACK) + rng.randbytes(300),
        hdr(SYN, conv + 1),
        hdr(PING, conv + 2),
        hdr(RST, conv + 3),
        hdr(PONG),
    ]


async def test_junk_injected_into_both_sockets_never_reaches_the_stream() -> None:
    payload = random.Random(9).randbytes(4 * MB)
    async with kcp_pair(proxy=True) as (ta, tb, px):
        assert px is not None and ta.conv is not None
        rng = random.Random(10)
        junk = junk_datagrams(ta.conv, rng)
        sa, sb = ta.stream_socket(), tb.stream_socket()
        sb.shutdown(socket.SHUT_WR)  # B sends nothing: whatever A receives would be junk

        async def spray() -> None:
            for _ in range(20):
                for d in junk:
                    px.inject(d)
                await asyncio.sleep(0.005)

        async with asyncio.timeout(40):
            _, _, got_b, got_a = await asyncio.gather(spray(), send_all(sa, payload), recv_all(sb), recv_all(sa))
        assert got_b == (len(payload), sha(payload))
        assert got_a == (0, sha(b""))
        for t in (ta, tb):
            drops = t.stats().drops
            for reason in ("empty", "short", "unknown_flags", "unknown_conn", "segment_conv", "segment_length"):
                assert drops.get(reason, 0) > 0, (reason, drops)
            assert t.stats().bytes_received == (len(payload) if t is tb else 0)


# --------------------------------------------------------------------------- wire level, against a hand-made peer


async def raw_recv(sock: socket.socket, timeout: float = 2.0) -> bytes:
    loop = asyncio.get_running_loop()
    return await asyncio.wait_for(loop.sock_recv(sock, 65536), timeout)


async def raw_recv_matching(sock: socket.socket, flags: int) -> bytes:
    """Skip DATA|ACK acknowledgements and pings; return the first datagram with exactly `flags`."""
    while True:
        d = await raw_recv(sock)
        if d[12] == flags:
            return d


async def test_wire_handshake_data_ping_rst_against_a_raw_peer() -> None:
    """Speak kcp-sys by hand to our listener, as a RustDesk peer would."""
    conv = 0xDEADBEEF
    raw, u = udp_socket(), udp_socket()
    raw.connect(u.getsockname())
    accepting = asyncio.create_task(KcpTransport.accept(u, 3.0, peer_addr=raw.getsockname()))
    try:
        raw.send(HEADER.pack(conv, 0, 0, SYN, 0))
        assert await raw_recv(raw) == HEADER.pack(conv, 0, 0, SYN | ACK, 0)
        raw.send(HEADER.pack(conv, 0, 0, ACK | DATA, 0))
        t = await asyncio.wait_for(accepting, 2)
        assert t.conv == conv
        app = t.stream_socket()
        loop = asyncio.get_running_loop()

        # DATA|ACK carrying one ikcp PUSH -> bytes on the app socket, and an ikcp ACK back
        data_hdr = HEADER.pack(conv, 0, 0, DATA | ACK, 0)
        raw.send(data_hdr + SEGMENT.pack(conv, CMD_PUSH, 0, 1024, 1234, 0, 0, 5) + b"hello")
        assert await asyncio.wait_for(loop.sock_recv(app, 100), 2) == b"hello"
        ack = await raw_recv_matching(raw, DATA | ACK)
        assert ack[:HEADER_SIZE] == data_hdr
        _c, cmd, _frg, _wnd, ts, sn, una, length = SEGMENT.unpack_from(ack, HEADER_SIZE)
        assert (cmd, ts, sn, una, length) == (CMD_ACK, 1234, 0, 1, 0)

        # bytes from the app: DATA|ACK datagrams, PUSH segments with frg 0 and at most one MSS
        await loop.sock_sendall(app, b"z" * 3000)
        got = b""
        while len(got) < 3000:
            d = await raw_recv(raw)
            assert d[:HEADER_SIZE] == data_hdr and len(d) <= HEADER_SIZE + 1200
            off = HEADER_SIZE
            while off < len(d):
                _c, cmd, frg, _wnd, ts, sn, _una, length = SEGMENT.unpack_from(d, off)
                off += SEGMENT_OVERHEAD
                if cmd == CMD_PUSH:
                    assert frg == 0 and length <= 1176
                    got += d[off : off + length]
                    # acknowledge it as ikcp would (una = next expected sn; our own push sn 0 is done)
                    raw.send(data_hdr + SEGMENT.pack(conv, CMD_ACK, 0, 1024, ts, sn, 1, 0))
                off += length
        assert got == b"z" * 3000
        await until(lambda: t.stats().waitsnd == 0)

        # PING -> PING|PONG; unknown conv -> RST with that conv; an unknown conv's RST -> nothing
        raw.send(HEADER.pack(conv, 0, 0, PING, 0))
        assert await raw_recv_matching(raw, PING | PONG) == HEADER.pack(conv, 0, 0, PING | PONG, 0)
        raw.send(HEADER.pack(conv + 1, 0, 0, DATA | ACK, 0) + SEGMENT.pack(conv + 1, CMD_PUSH, 0, 0, 0, 0, 0, 1) + b"x")
        assert await raw_recv_matching(raw, RST) == HEADER.pack(conv + 1, 0, 0, RST, 0)
        assert t.state is State.ESTABLISHED

        # FIN -> EOF for the app; then RST -> closed
        raw.send(HEADER.pack(conv, 0, 0, FIN, 0))
        assert await asyncio.wait_for(loop.sock_recv(app, 100), 2) == b""
        assert t.stats().state == "peer_closed"
        app.shutdown(socket.SHUT_WR)
        assert await raw_recv_matching(raw, FIN) == HEADER.pack(conv, 0, 0, FIN, 0)
        await asyncio.wait_for(t.wait_closed(), 2)
        assert t.stats().state == "closed"
        raw.send(HEADER.pack(conv, 0, 0, FIN, 0))  # a duplicate FIN into a closed connection
        assert await raw_recv_matching(raw, RST) == HEADER.pack(conv, 0, 0, RST, 0)
        app.close()
        await t.close()
    finally:
        accepting.cancel()
        raw.close()
        u.close()


async def test_connect_sends_syn_retransmits_and_completes_against_a_raw_listener() -> None:
    raw, u = udp_socket(), udp_socket()
    raw.connect(u.getsockname())
    connecting = asyncio.create_task(KcpTransport.connect(u, raw.getsockname(), 3.0, conv=42))
    try:
        first = await raw_recv(raw)
        assert first == HEADER.pack(42, 0, 0, SYN, 0)
        assert await raw_recv(raw) == first  # not answered: retransmitted after 200 ms
        raw.send(HEADER.pack(42, 0, 0, SYN | ACK, 0))
        assert await raw_recv_matching(raw, ACK | DATA) == HEADER.pack(42, 0, 0, ACK | DATA, 0)
        t = await asyncio.wait_for(connecting, 2)
        assert t.state is State.ESTABLISHED
        await t.close(linger=0)
        assert await raw_recv_matching(raw, RST) == HEADER.pack(42, 0, 0, RST, 0)
    finally:
        connecting.cancel()
        raw.close()
        u.close()


async def test_connect_timeout_to_a_silent_peer_is_clear() -> None:
    silent, u = udp_socket(), udp_socket()
    try:
        with pytest.raises(KcpConnectTimeout) as info:
            await KcpTransport.connect(u, silent.getsockname(), 0.5)
        message = str(info.value)
        assert "timed out" in message and "SYN" in message
        assert f"127.0.0.1:{silent.getsockname()[1]}" in message
        assert isinstance(info.value, TimeoutError)
        assert u.fileno() != -1  # a failed attempt leaves the socket to its owner
    finally:
        silent.close()
        u.close()


async def test_accept_timeout() -> None:
    u, other = udp_socket(), udp_socket()
    try:
        with pytest.raises(KcpConnectTimeout, match="accept"):
            await KcpTransport.accept(u, 0.3, peer_addr=other.getsockname())
        with udp_socket() as unconnected, pytest.raises(ValueError, match="connected"):
            await KcpTransport.accept(unconnected, 0.3)
    finally:
        u.close()
        other.close()


async def test_rst_answer_is_a_refusal() -> None:
    raw, u = udp_socket(), udp_socket()
    raw.connect(u.getsockname())
    try:
        connecting = asyncio.create_task(KcpTransport.connect(u, raw.getsockname(), 3.0, conv=7))
        await raw_recv(raw)
        raw.send(HEADER.pack(7, 0, 0, RST, 0))
        with pytest.raises(KcpRefused, match="RST"):
            await asyncio.wait_for(connecting, 2)
    finally:
        raw.close()
        u.close()


async def test_handshake_survives_lost_handshake_packets() -> None:
    a, b = udp_socket(), udp_socket()
    px = UdpProxy(a.getsockname(), b.getsockname())
    lost: dict[int, int] = {SYN: 2, SYN | ACK: 2, ACK | DATA: 1}

    def lose_handshake(d: bytes) -> bool:
        if len(d) == HEADER_SIZE and lost.get(d[12], 0) > 0:
            lost[d[12]] -= 1
            return False
        return True

    px.filter = lose_handshake
    try:
        ta, tb = await asyncio.wait_for(
            asyncio.gather(
                KcpTransport.connect(a, px.a_side.getsockname(), 5.0),
                KcpTransport.accept(b, 5.0, peer_addr=px.b_side.getsockname()),
            ),
            8,
        )
        assert lost == {SYN: 0, SYN | ACK: 0, ACK | DATA: 0}
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(ta.stream_socket(), b"through")
        assert await asyncio.wait_for(loop.sock_recv(tb.stream_socket(), 100), 2) == b"through"
        for t in (ta, tb):
            t.stream_socket().close()
            await t.close(linger=0)
    finally:
        px.close()
        a.close()
        b.close()


async def test_idle_peer_is_reaped() -> None:
    timers = KcpTimers(ping_interval=0.1, idle_timeout=1.0)
    config = KcpConfig(timers=timers)
    async with kcp_pair(config=config, proxy=True) as (ta, tb, px):
        assert px is not None
        await asyncio.sleep(1.5)  # no data, but the pings keep it alive
        assert ta.state is tb.state is State.ESTABLISHED
        assert ta.stats().datagrams_received >= 2
        px.loss = 1.0  # the path dies
        await asyncio.wait_for(asyncio.gather(ta.wait_closed(), tb.wait_closed()), 5)
        assert (ta.close_reason or "").startswith("idle")
        assert await asyncio.get_running_loop().sock_recv(ta.stream_socket(), 10) == b""


# --------------------------------------------------------------------------- punch


async def test_two_sockets_punch_each_other_then_talk_kcp() -> None:
    a, b = udp_socket(), udp_socket()
    try:
        ra, rb = await asyncio.wait_for(
            asyncio.gather(punch(a, b.getsockname(), listen=False), punch_then_wait_for_syn(b, a.getsockname())),
            5,
        )
        assert ra.peer_addr == b.getsockname() and ra.sent >= 1
        # the responder is still punching when A's SYN arrives; it hands the SYN to accept()
        ta, (tb, syn) = await asyncio.wait_for(asyncio.gather(KcpTransport.connect(a, ra.peer_addr, 3.0), rb), 5)
        assert syn[12] == SYN
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(tb.stream_socket(), b"over the punched path")
        assert await asyncio.wait_for(loop.sock_recv(ta.stream_socket(), 100), 2) == b"over the punched path"
        for t in (ta, tb):
            t.stream_socket().close()
            await t.close(linger=0)
    finally:
        a.close()
        b.close()


async def punch_then_wait_for_syn(
    sock: socket.socket, peer: tuple[str, int]
) -> asyncio.Task[tuple[KcpTransport, bytes]]:
    """Responder: punch until the first non-empty datagram (A's SYN), then accept with it."""

    async def run() -> tuple[KcpTransport, bytes]:
        result = await punch(sock, peer, listen=True)
        assert result.first_datagram is not None
        return await KcpTransport.accept(sock, 3.0, first_datagram=result.first_datagram), result.first_datagram

    return asyncio.create_task(run())


async def test_punch_timeout_to_a_silent_peer() -> None:
    a, silent = udp_socket(), udp_socket()
    try:
        with pytest.raises(PunchTimeout, match="timed out"):
            await punch(a, silent.getsockname(), listen=False, schedule=PunchSchedule(deadline=0.3))
        # it did punch: the silent socket got the empty datagrams
        got = 0
        with contextlib.suppress(BlockingIOError):
            while True:
                assert silent.recv(100) == b""
                got += 1
        assert got >= 5
    finally:
        a.close()
        silent.close()


async def test_responder_punch_ignores_empties_and_strangers() -> None:
    a, b, stranger = udp_socket(), udp_socket(), udp_socket()
    try:
        stranger.sendto(b"not from the peer", b.getsockname())  # queued before b connects
        task = asyncio.create_task(punch(b, a.getsockname(), listen=True, schedule=PunchSchedule(deadline=3)))
        await asyncio.sleep(0.05)
        a.sendto(b"", b.getsockname())
        a.sendto(b"", b.getsockname())
        a.sendto(b"the syn", b.getsockname())
        result = await asyncio.wait_for(task, 3)
        assert result.first_datagram == b"the syn"
    finally:
        for s in (a, b, stranger):
            s.close()


PEER_SCRIPT = """
import asyncio, socket, sys
from agent.kcp.stream import KcpTransport
async def main():
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.bind(("127.0.0.1", 0))
    u.setblocking(False)
    print(u.getsockname()[1], flush=True)
    peer = int(sys.stdin.readline())
    t = await KcpTransport.accept(u, 5.0, peer_addr=("127.0.0.1", peer))
    s = t.stream_socket()
    print("established", flush=True)
    await asyncio.sleep(3600)
asyncio.run(main())
"""


async def test_a_killed_peer_process_ends_the_connection_in_about_a_second() -> None:
    """The peer's process dies (SIGKILL: no FIN, no RST); its port answers with ICMP port unreachable.
    The connection must end with that reason, not hang for the 60 s idle timeout."""
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-c", PEER_SCRIPT], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    u = udp_socket()
    t: KcpTransport | None = None
    try:
        peer_port = int(proc.stdout.readline())
        proc.stdin.write(f"{u.getsockname()[1]}\n".encode())
        proc.stdin.flush()
        t = await KcpTransport.connect(u, ("127.0.0.1", peer_port), 5.0)
        notice = t.notice_socket()
        stream = t.stream_socket()
        assert proc.stdout.readline().strip() == b"established"
        proc.kill()
        proc.wait()
        killed = time.monotonic()
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(stream, b"x" * 10_000)  # data for a peer that is gone
        async with asyncio.timeout(30):  # a hang guard only; the reason below tells ICMP from the idle reap
            await t.wait_closed()
        took = time.monotonic() - killed
        assert t.state is State.CLOSED
        assert "UDP port is closed" in (t.close_reason or ""), t.close_reason
        notice.setblocking(True)
        notice.settimeout(2)
        assert b"UDP port is closed" in notice.recv(400)
        print(f"\nkilled peer noticed after {took:.2f} s (idle timeout: 60 s)")
        stream.close()
        notice.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if t is not None:
            await t.close(linger=0)
        u.close()


async def test_closed_transports_free_their_kcp_blocks() -> None:
    from agent.kcp import release as kcp_release

    before = kcp_release.released
    async with kcp_pair() as (ta, _tb, _):
        await send_all(ta.stream_socket(), b"x" * 100_000)
    await asyncio.sleep(0.05)  # freed on the loop turn after the teardown
    assert kcp_release.released == before + 2
