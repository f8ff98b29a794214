"""Per-source-IP caps on idle connections, with real sockets on loopback.

One "attacker" IP (127.0.0.2: the client sockets bind it; loopback answers on all of
127/8) opens far more idle connections, or never-paired relay requests, than its cap,
and more than the servers' total caps. A legitimate client from 127.0.0.1, whose own
connection was already open and silent when the attack began, still registers, gets
its punch answered, or pairs and moves bytes. The attacker's count stays at its cap
and the servers' descriptors stay bounded. Loopback is not exempt: the caps here are
set low, the way an operator would configure them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from agent.proto import rendezvous_pb2 as pb
from agent.servers.relay_server import RelayServer, start_relay
from agent.servers.rendezvous_server import RendezvousConfig, RendezvousServer, start_rendezvous
from agent.wire import addr as addrmod
from agent.wire import messages
from agent.wire.frames import FrameDecoder, encode_frame
from tests.integration.relay_helpers import relay_cfg, request_frame
from tests.signed import Member, aregister_via

ATTACKER = "127.0.0.2"
LEGIT = "127.0.0.1"
PEER_B = "127.0.0.4"
"""A real peer on another host (a different IP from A's, so the server takes the punch path)."""
ATTACK = 200
PER_IP = 8
TOTAL = 64
"""Total caps below the attack: without the per-IP cap the attacker would evict the legitimate client."""
TIMEOUT = 10.0
B = Member.new(b"per-ip-caps-B")
A = Member.new(b"per-ip-caps-A")
B_ID = B.id


# --------------------------------------------------------------------------- helpers


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def server_side_sockets(port: int, from_ip: str) -> int:
    """Accepted sockets this process (the server's) holds on `port` for connections from `from_ip`."""
    return sum(
        1
        for c in psutil.Process().net_connections(kind="tcp")
        if c.laddr
        and c.laddr.port == port
        and c.raddr
        and c.raddr.ip == from_ip
        and c.status == psutil.CONN_ESTABLISHED
    )


async def settle(cond: Callable[[], bool], what: str) -> None:
    try:
        async with asyncio.timeout(TIMEOUT):
            while not cond():
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"never settled: {what}") from None


async def connect_from(src: str, port: int, first: bytes = b"") -> socket.socket:
    """A TCP connection to 127.0.0.1:`port` whose source address is `src`."""
    loop = asyncio.get_running_loop()
    s = socket.socket()
    s.setblocking(False)
    try:
        s.bind((src, 0))
        await loop.sock_connect(s, ("127.0.0.1", port))
        if first:
            await loop.sock_sendall(s, first)
    except BaseException:
        s.close()
        raise
    return s


async def attack(port: int, firsts: list[bytes]) -> list[socket.socket]:
    out: list[socket.socket] = []
    for first in firsts:
        out.append(await connect_from(ATTACKER, port, first))
    return out


async def recv_frame(s: socket.socket, decoder: FrameDecoder) -> tuple[str, Any]:
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(TIMEOUT):
        while True:
            data = await loop.sock_recv(s, 65536)
            assert data, "closed by the server"
            frames = decoder.feed(data)
            if frames:
                return messages.parse(frames[0], max_len=1 << 16)


async def send_frame(s: socket.socket, **member: Any) -> None:
    await asyncio.get_running_loop().sock_sendall(s, encode_frame(messages.build(**member)))


def request_relay(uuid: str) -> bytes:
    return request_frame(uuid)


async def exchange(a: socket.socket, b: socket.socket, size: int = 256 * 1024) -> None:
    """`size` bytes each way through the relay, checked."""
    loop = asyncio.get_running_loop()
    pa, pb_ = os.urandom(size), os.urandom(size)

    async def recv_n(s: socket.socket, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = await loop.sock_recv(s, n - len(buf))
            assert chunk, f"closed after {len(buf)} of {n} bytes"
            buf += chunk
        return bytes(buf)

    async with asyncio.timeout(TIMEOUT * 3):
        _, _, got_b, got_a = await asyncio.gather(
            loop.sock_sendall(a, pa), loop.sock_sendall(b, pb_), recv_n(b, size), recv_n(a, size)
        )
    assert got_b == pa and got_a == pb_


class UdpPeer(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.inbox: asyncio.Queue[tuple[bytes, tuple[str, Any]]] = asyncio.Queue()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.inbox.put_nowait((data, messages.parse(data)))

    async def register(self, to: tuple[str, int], who: Member) -> int:
        """A signed registration (challenge, then signature)."""

        async def send(data: bytes) -> bytes:
            assert self.transport is not None
            self.transport.sendto(data, to)
            return (await asyncio.wait_for(self.inbox.get(), TIMEOUT))[0]

        return await aregister_via(send, who)

    async def recv(self) -> tuple[str, Any]:
        return (await asyncio.wait_for(self.inbox.get(), TIMEOUT))[1]


# --------------------------------------------------------------------------- rendezvous


@pytest.fixture
async def rendezvous(tmp_path: Path) -> Any:
    rv = await start_rendezvous(
        RendezvousConfig(
            binds=["127.0.0.1"],
            port=0,
            db_path=tmp_path / "rv.sqlite3",
            key_file=tmp_path / "rv_key",
            max_tcp_connections=TOTAL,
            max_idle_tcp_per_ip=PER_IP,
        )
    )
    yield rv
    await rv.close()


async def test_rendezvous_idle_flood_from_one_ip_spares_everyone_else(
    rendezvous: RendezvousServer, caplog: pytest.LogCaptureFixture
) -> None:
    rv = rendezvous
    loop = asyncio.get_running_loop()
    # B, a real peer, registers over UDP; A, a real client, connects and has not spoken yet.
    _, b = await loop.create_datagram_endpoint(UdpPeer, local_addr=(PEER_B, 0))
    _, a_udp = await loop.create_datagram_endpoint(UdpPeer, local_addr=(LEGIT, 0))
    a = await connect_from(LEGIT, rv.tcp_port)
    await settle(lambda: rv.idle_from(LEGIT) == 1, "A accepted")
    fds_before = fd_count()
    caplog.set_level(logging.INFO, logger="punchthrough.rendezvous")
    try:
        assert await b.register(("127.0.0.1", rv.udp_port), B) == pb.RegisterPkResponse.OK
        assert await a_udp.register(("127.0.0.1", rv.udp_port), A) == pb.RegisterPkResponse.OK

        flood = await attack(rv.tcp_port, [b""] * ATTACK)
        try:
            await settle(
                lambda: rv.stats()["drops"].get("evicted_idle_connection_per_ip", 0) == ATTACK - PER_IP,
                "every attacker connection past the cap evicted",
            )
            await settle(lambda: server_side_sockets(rv.tcp_port, ATTACKER) <= PER_IP, "evicted sockets closed")
            st = rv.stats()
            server_fds = fd_count() - fds_before - len(flood)
            print(
                f"\n[per-ip rendezvous] {ATTACK} idle from {ATTACKER}: server holds "
                f"{server_side_sockets(rv.tcp_port, ATTACKER)} (cap {PER_IP}, total cap {TOTAL}); "
                f"idle {st['tcp_idle']}, connections {st['tcp_connections']}; server-side fds +{server_fds}; "
                f"drops {st['drops']}"
            )
            assert rv.idle_from(ATTACKER) == PER_IP
            assert st["tcp_idle_max_per_ip"] == PER_IP
            assert rv.idle_from(LEGIT) == 1  # A's silent connection was never touched
            assert "evicted_idle_connection" not in st["drops"]  # the total cap was never reached
            assert server_fds <= PER_IP + 4
            attacker_lines = [r for r in caplog.records if ATTACKER in r.getMessage()]
            assert len(attacker_lines) == 1, [r.getMessage() for r in attacker_lines]  # once per interval

            # A speaks now, on the connection it opened before the flood: B is online, the punch goes through.
            dec = FrameDecoder()
            await send_frame(a, online_request=pb.OnlineRequest(id="asker01", peers=[B_ID]))
            kind, online = await recv_frame(a, dec)
            assert kind == "online_response" and online.states[0] & 0x80
            request = A.request("punch_hole_request", pb.PunchHoleRequest(id=B_ID, nat_type=pb.ASYMMETRIC))
            await loop.sock_sendall(a, encode_frame(request))
            kind, ph = await b.recv()
            assert kind == "punch_hole"
            bt = await connect_from(PEER_B, rv.tcp_port)
            try:
                sent = pb.PunchHoleSent(socket_addr=ph.socket_addr, id=B_ID, answer_token=ph.answer_token)
                await send_frame(bt, punch_hole_sent=sent)
                kind, resp = await recv_frame(a, dec)
                assert kind == "punch_hole_response"
                assert addrmod.decode(resp.socket_addr).host == PEER_B
            finally:
                bt.close()
            assert rv.idle_from(LEGIT) == 0
        finally:
            for s in flood:
                s.close()
    finally:
        a.close()
        assert b.transport is not None
        b.transport.close()
        if a_udp.transport is not None:
            a_udp.transport.close()


async def test_rendezvous_burst_with_requests_already_queued_is_not_evicted(rendezvous: RendezvousServer) -> None:
    """Many real clients behind one NAT, all accepted in one burst with their request already in the
    kernel: none is idle, so none is evicted even though the burst is several times the cap."""
    rv = rendezvous
    n = 5 * PER_IP
    frame = encode_frame(messages.build(test_nat_request=pb.TestNatRequest()))
    clients = []
    try:
        for _ in range(n):  # blocking connect + send without yielding: the server sees them all at once
            s = socket.socket()
            clients.append(s)
            s.bind(("127.0.0.3", 0))
            s.connect(("127.0.0.1", rv.tcp_port))
            s.sendall(frame)
            s.setblocking(False)
        for s in clients:
            kind, msg = await recv_frame(s, FrameDecoder())
            assert kind == "test_nat_response" and msg.port == s.getsockname()[1]
        st = rv.stats()
        assert not any(k.startswith("evicted") for k in st["drops"]), st["drops"]
    finally:
        for s in clients:
            s.close()


async def test_rendezvous_talking_flood_from_one_ip_is_capped_per_ip(tmp_path: Path) -> None:
    """Connections that keep sending heartbeats (empty frames) are not idle, so only the cap on all of
    an IP's open connections binds them: past it, that IP's newcomers are refused, nobody else's."""
    rv = await start_rendezvous(
        RendezvousConfig(binds=["127.0.0.1"], port=0, db_path=tmp_path / "rv.sqlite3", key_file=tmp_path / "k",
                         max_tcp_connections=TOTAL, max_tcp_per_ip=PER_IP)
    )
    flood: list[socket.socket] = []
    try:
        for _ in range(ATTACK // 4):
            with contextlib.suppress(OSError):
                flood.append(await connect_from(ATTACKER, rv.tcp_port, b"\x00"))
        await settle(lambda: rv.stats()["drops"].get("too_many_connections_per_ip", 0) == ATTACK // 4 - PER_IP,
                     "every attacker connection past the per-IP cap refused")
        await settle(lambda: server_side_sockets(rv.tcp_port, ATTACKER) <= PER_IP, "refused sockets closed")
        assert rv.open_from(ATTACKER) == PER_IP and rv.stats()["tcp_max_per_ip"] == PER_IP
        a = await connect_from(LEGIT, rv.tcp_port)
        try:
            await send_frame(a, test_nat_request=pb.TestNatRequest())
            kind, msg = await recv_frame(a, FrameDecoder())
            assert kind == "test_nat_response" and msg.port == a.getsockname()[1]
            assert rv.open_from(LEGIT) == 1
        finally:
            a.close()
    finally:
        for s in flood:
            s.close()
        await rv.close()


# --------------------------------------------------------------------------- relay


@pytest.fixture
async def relay() -> Any:
    server = await start_relay(
        relay_cfg(
            max_handshaking=TOTAL,
            max_waiting=TOTAL,
            max_handshaking_per_ip=PER_IP,
            max_waiting_per_ip=PER_IP,
        )
    )
    yield server
    await server.close()


async def test_relay_handshake_flood_from_one_ip_spares_everyone_else(relay: RelayServer) -> None:
    a = await connect_from(LEGIT, relay.port)  # a real client, connected, RequestRelay not sent yet
    await settle(lambda: relay.handshaking_from(LEGIT) == 1, "A accepted")
    fds_before = fd_count()
    flood = await attack(relay.port, [b""] * ATTACK)
    b: socket.socket | None = None
    try:
        await settle(
            lambda: relay.stats()["drops"].get("evicted_idle_handshake_per_ip", 0) == ATTACK - PER_IP,
            "every attacker handshake past the cap evicted",
        )
        await settle(lambda: server_side_sockets(relay.port, ATTACKER) <= PER_IP, "evicted sockets closed")
        st = relay.stats()
        server_fds = fd_count() - fds_before - len(flood)
        print(
            f"\n[per-ip relay handshakes] {ATTACK} idle from {ATTACKER}: server holds "
            f"{server_side_sockets(relay.port, ATTACKER)} (cap {PER_IP}, total {TOTAL}); handshaking "
            f"{st['handshaking']}; server-side fds +{server_fds}; drops {st['drops']}"
        )
        assert relay.handshaking_from(ATTACKER) == PER_IP
        assert st["handshaking_max_per_ip"] == PER_IP
        assert relay.handshaking_from(LEGIT) == 1
        assert "evicted_idle_handshake" not in st["drops"]
        assert server_fds <= PER_IP + 4
        # A finally sends its RequestRelay; B joins; bytes move.
        await asyncio.get_running_loop().sock_sendall(a, request_relay("legit-pair-1"))
        b = await connect_from(LEGIT, relay.port, request_relay("legit-pair-1"))
        await exchange(a, b)
        assert relay.stats()["pairs_total"] == 1
    finally:
        for s in flood:
            s.close()
        a.close()
        if b is not None:
            b.close()


async def test_relay_unpaired_flood_from_one_ip_spares_everyone_else(relay: RelayServer) -> None:
    a = await connect_from(LEGIT, relay.port, request_relay("legit-pair-2"))  # parked, waiting for B
    await settle(lambda: relay.waiting_from(LEGIT) == 1, "A parked")
    fds_before = fd_count()
    flood = await attack(relay.port, [request_relay(f"never-paired-{n}") for n in range(ATTACK)])
    b: socket.socket | None = None
    try:
        await settle(
            lambda: relay.stats()["drops"].get("evicted_waiter_per_ip", 0) == ATTACK - PER_IP,
            "every attacker waiter past the cap evicted",
        )
        await settle(lambda: server_side_sockets(relay.port, ATTACKER) <= PER_IP, "evicted sockets closed")
        st = relay.stats()
        server_fds = fd_count() - fds_before - len(flood)
        print(
            f"\n[per-ip relay waiters] {ATTACK} never-paired from {ATTACKER}: server holds "
            f"{server_side_sockets(relay.port, ATTACKER)} (cap {PER_IP}, total {TOTAL}); waiting {st['waiting']}; "
            f"server-side fds +{server_fds}; drops {st['drops']}"
        )
        assert relay.waiting_from(ATTACKER) == PER_IP
        assert st["waiting_max_per_ip"] == PER_IP
        assert relay.waiting_from(LEGIT) == 1
        assert "evicted_oldest_waiter" not in st["drops"]
        assert server_fds <= PER_IP + 4
        b = await connect_from(LEGIT, relay.port, request_relay("legit-pair-2"))
        await exchange(a, b)
    finally:
        for s in flood:
            s.close()
        a.close()
        if b is not None:
            b.close()


async def test_relay_burst_of_pairs_from_one_ip_with_requests_queued(relay: RelayServer) -> None:
    """Both halves of 3 x cap pairs, behind one NAT, accepted in one burst with their RequestRelay
    already in the kernel: busy, not idle, so nobody is evicted and every pair moves bytes."""
    halves: list[tuple[socket.socket, socket.socket]] = []
    try:
        for n in range(3 * PER_IP):  # blocking connect + send without yielding: one accept burst
            pair = []
            for _ in range(2):
                s = socket.socket()
                s.bind(("127.0.0.3", 0))
                s.connect(("127.0.0.1", relay.port))
                s.sendall(request_relay(f"burst-{n}"))
                s.setblocking(False)
                pair.append(s)
            halves.append((pair[0], pair[1]))
        await asyncio.gather(*(exchange(x, y, 16 * 1024) for x, y in halves))
        st = relay.stats()
        assert st["pairs_total"] == len(halves)
        assert not any(k.startswith("evicted") for k in st["drops"]), st["drops"]
    finally:
        for x, y in halves:
            x.close()
            y.close()
