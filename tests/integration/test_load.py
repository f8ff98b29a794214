"""Load tests: many peers, many relayed and forwarded streams, and idle attackers, all on loopback.

Every server runs in this process, so `psutil.Process()` sees the servers' memory and
descriptors. Counts are small by default (the whole file stays well under a minute on two
cores); PUNCHTHROUGH_SOAK=1 scales them up for long runs by hand. Figures are printed
(`pytest -s`); nothing asserts on wall-clock time.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import statistics
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from agent.proto import rendezvous_pb2 as pb
from agent.servers.relay_server import RelayServer, start_relay
from agent.servers.rendezvous_core import Limits
from agent.servers.rendezvous_server import RendezvousConfig, RendezvousServer, start_rendezvous
from agent.wire import messages, signing
from agent.wire.frames import FrameDecoder, encode_frame
from tests.agent_fixtures import AgentPair, open_stream, transfer, two_agents
from tests.integration.relay_helpers import open_half, recv_all, relay_cfg, request_frame, send_all
from tests.signed import Member

SOAK = os.environ.get("PUNCHTHROUGH_SOAK") == "1"
PEERS = 10_000 if SOAK else 2_000
RELAY_PAIRS = 200
RELAY_BYTES = 4 << 20 if SOAK else 256 << 10
FORWARDED = 50
IDLE = 500
WINDOW = 8
"""Requests in flight per client socket. The server's UDP socket keeps the kernel's default
receive buffer (~208 KiB of skb truesize, roughly 250 small datagrams); 8 sockets x 32 in
flight overflowed it and the kernel dropped registrations (RcvbufErrors), so stay well below."""
STALL = 10.0
"""Seconds without any progress after which a load phase fails (generous: never hit when healthy)."""


def rss_mib() -> float:
    return psutil.Process().memory_info().rss / (1 << 20)


# --------------------------------------------------------------------------- simulated peers


class _Counter(asyncio.DatagramProtocol):
    """One UDP socket that many simulated peers share (like many hosts behind one NAT mapping).

    Replies carry no ID, so they are counted per kind; a window bounds what is in flight so
    the loopback socket buffers never overflow. A RegisterPkResponse is signed for the nonce of
    the attempt it answers: `on_pk_reply` gets its bytes, so a peer can take its challenge."""

    def __init__(self, window: int) -> None:
        self.window = asyncio.Semaphore(window)
        self.replies: dict[tuple[str, Any], int] = {}
        self.progress = asyncio.Event()
        self.transport: asyncio.DatagramTransport | None = None
        self.on_pk_reply: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        kind, msg = messages.parse(data)
        value = msg.result if kind == "register_pk_response" else msg.request_pk
        self.replies[(kind, value)] = self.replies.get((kind, value), 0) + 1
        if kind == "register_pk_response" and self.on_pk_reply is not None:
            self.on_pk_reply(data, msg)
        self.window.release()
        self.progress.set()


async def _blast(proto: _Counter, to: tuple[str, int], payloads: list[bytes], kind: str, expect: Any) -> None:
    """Send every payload through the window; return once each has its (expected) answer."""
    assert proto.transport is not None
    for payload in payloads:
        try:
            await asyncio.wait_for(proto.window.acquire(), STALL)
        except TimeoutError:
            raise AssertionError(f"stalled: answers so far {proto.replies}") from None
        proto.transport.sendto(payload, to)
    while sum(n for (k, _), n in proto.replies.items() if k == kind) < len(payloads):
        proto.progress.clear()
        try:
            await asyncio.wait_for(proto.progress.wait(), STALL)
        except TimeoutError:
            raise AssertionError(f"stalled: {len(payloads)} {kind} sent, answers {proto.replies}") from None
    assert proto.replies.get((kind, expect), 0) == len(payloads), proto.replies


def sim_peers(n: int, tag: str = "load") -> list[Member]:
    return [Member.new(f"{tag}{i}".encode()) for i in range(n)]


async def register_peers(server: RendezvousServer, peers: list[Member], sockets: int = 8) -> float:
    """What each agent does to register: RegisterPk for a challenge, RegisterPk signed with it, then a
    RegisterPeer heartbeat; for every peer, `sockets` of them sharing one source address and port.
    Returns the seconds it took."""
    loop = asyncio.get_running_loop()
    to = ("127.0.0.1", server.udp_port)
    protos: list[_Counter] = []
    for _ in range(sockets):
        _, proto = await loop.create_datagram_endpoint(lambda: _Counter(WINDOW), local_addr=("127.0.0.1", 0))
        protos.append(proto)
    shares = [peers[i::sockets] for i in range(sockets)]
    nonces = {id(m): os.urandom(16) for m in peers}
    challenges: dict[bytes, bytes] = {}
    server_pk = server.core.public_key

    def take_challenge(outstanding: dict[bytes, Member]) -> Any:
        def on_reply(data: bytes, msg: Any) -> None:
            # a reply names no peer; its signature names the attempt (the window keeps few outstanding)
            for nonce in list(outstanding):
                if signing.verify(server_pk, signing.SERVER, nonce, *signing.split(data)):
                    challenges[nonce] = bytes(msg.challenge)
                    del outstanding[nonce]
                    return

        return on_reply

    for p, share in zip(protos, shares, strict=True):
        p.on_pk_reply = take_challenge({nonces[id(m)]: m for m in share})
    t0 = time.perf_counter()
    try:
        await asyncio.gather(
            *(
                _blast(
                    p,
                    to,
                    [m.register_pk(nonces[id(m)]) for m in share],
                    "register_pk_response",
                    pb.RegisterPkResponse.CHALLENGE,
                )
                for p, share in zip(protos, shares, strict=True)
            )
        )
        for p in protos:
            p.on_pk_reply, p.replies = None, {}
        await asyncio.gather(
            *(
                _blast(
                    p,
                    to,
                    [m.register_pk(nonces[id(m)], challenges[nonces[id(m)]]) for m in share],
                    "register_pk_response",
                    pb.RegisterPkResponse.OK,
                )
                for p, share in zip(protos, shares, strict=True)
            )
        )
        await asyncio.gather(
            *(
                _blast(
                    p,
                    to,
                    [messages.build(register_peer=pb.RegisterPeer(id=m.id, serial=1)) for m in share],
                    "register_peer_response",
                    False,  # request_pk=False: the server knows the peer and its key
                )
                for p, share in zip(protos, shares, strict=True)
            )
        )
        return time.perf_counter() - t0
    finally:
        for p in protos:
            assert p.transport is not None
            p.transport.close()


async def online_states(nat_port: int, ids: list[str], chunk: int = 1000) -> list[bool]:
    """OnlineRequest on the NAT-test port, as RustDesk's address book asks."""
    r, w = await asyncio.open_connection("127.0.0.1", nat_port)
    out: list[bool] = []
    decoder = FrameDecoder()
    try:
        for start in range(0, len(ids), chunk):
            part = ids[start : start + chunk]
            w.write(encode_frame(messages.build(online_request=pb.OnlineRequest(id="asker01", peers=part))))
            frames: list[bytes] = []
            async with asyncio.timeout(STALL):
                while not frames:
                    data = await r.read(1 << 16)
                    assert data, "server closed the OnlineRequest connection"
                    frames = decoder.feed(data)
            kind, msg = messages.parse(frames[0], max_len=1 << 16)
            assert kind == "online_response"
            out += [bool(msg.states[i // 8] & (0x80 >> (i % 8))) for i in range(len(part))]
    finally:
        w.close()
    return out


# --------------------------------------------------------------------------- two agents


@pytest.fixture
async def lab(tmp_path: Path) -> AsyncIterator[AgentPair]:
    # The simulated peers share a few source addresses, as many hosts behind one NAT would:
    # lift the per-IP registration limits (which exist against exactly that from one abuser).
    # Each stream races for a link of its own (link_idle 0): the server's punch path is under test.
    limits = Limits(ip_block_limit=1 << 30, ip_ids_limit=1 << 30)
    async with two_agents(tmp_path, limits=limits, a_link_idle=0) as pair:
        yield pair


async def one_stream(lab: AgentPair, size: int, path: str = "auto") -> bool:
    sock, reply = await open_stream(lab.a_dir, lab.b_id, lab.echo, path=path)
    assert sock is not None, reply
    try:
        payload = os.urandom(size)
        got = await asyncio.wait_for(transfer(sock, payload), 60)
    finally:
        sock.close()
    return hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()


# --------------------------------------------------------------------------- 1(a)


async def test_registration_storm_loses_nothing_while_agents_connect(lab: AgentPair) -> None:
    rv: RendezvousServer = lab.servers.rendezvous
    peers = sim_peers(PEERS)
    ids = [m.id for m in peers]
    rss_before = rss_mib()
    storm = asyncio.ensure_future(register_peers(rv, peers))
    sessions = 0
    while not storm.done() or sessions < 3:
        assert await one_stream(lab, 20_000)
        sessions += 1
        assert sessions < 200, "bounded"
    took = await storm
    rss_after = rss_mib()
    online = await online_states(rv.nat_port, ids)
    missing = [i for i, up in zip(ids, online, strict=True) if not up]
    st = rv.stats()
    print(
        f"\n[load 1a] {PEERS} peers registered (RegisterPk x 2 signed + RegisterPeer) in {took:.2f} s = "
        f"{PEERS / took:,.0f} peers/s ({3 * PEERS / took:,.0f} datagrams/s); "
        f"{sessions} agent sessions meanwhile; DB commits {st['events'].get('db_commits', 0)}; "
        f"process RSS {rss_before:.1f} -> {rss_after:.1f} MiB"
    )
    assert missing == []
    assert st["peers_registered"] == PEERS + 2  # and the two agents
    assert st["peers_online"] >= PEERS + 2
    assert st["messages"]["udp.register_pk"] >= 2 * PEERS
    # Every punch request was answered: none still parked, none expired unanswered.
    assert st["messages"]["tcp.punch_hole_request"] >= sessions
    assert st["pending_requests"] == 0
    assert st["events"].get("pending_expired", 0) == 0
    assert st["events"].get("register_pk_ip_blocked", 0) == 0


# --------------------------------------------------------------------------- 1(b)


async def test_concurrent_relayed_pairs_intact_and_fair(tmp_path: Path) -> None:
    # 200 pairs from one address at once, as 200 hosts behind one NAT: lift the per-IP caps.
    relay: RelayServer = await start_relay(relay_cfg(max_handshaking_per_ip=0, max_waiting_per_ip=0))
    try:
        durations = await relay_pairs(relay.port, RELAY_PAIRS, RELAY_BYTES)
        st = relay.stats()
    finally:
        await relay.close()
    rates = sorted(2 * RELAY_BYTES / d / (1 << 20) for d in durations)
    print(
        f"\n[load 1b] {RELAY_PAIRS} relayed pairs x {RELAY_BYTES >> 10} KiB each way (pump {st['pump']}): "
        f"per-stream MiB/s min {rates[0]:.2f} median {statistics.median(rates):.2f} max {rates[-1]:.2f}, "
        f"max/min {rates[-1] / rates[0]:.1f}; total {st['bytes_relayed'] / (1 << 20):.0f} MiB in "
        f"{max(durations):.2f} s"
    )
    assert st["pairs_total"] == RELAY_PAIRS
    assert st["bytes_relayed"] == 2 * RELAY_PAIRS * RELAY_BYTES


async def relay_pairs(port: int, pairs: int, size: int) -> list[float]:
    """`pairs` concurrent pairs, `size` bytes each way; asserts every SHA-256; returns each pair's seconds."""

    async def one(n: int) -> float:
        uuid = f"load-pair-{n}-{os.urandom(4).hex()}"  # a uuid pairs once per ticket
        ra, wa = await open_half(port, uuid)
        rb, wb = await open_half(port, uuid)
        t0 = time.perf_counter()
        sa, sb, (na, ha), (nb, hb) = await asyncio.gather(
            send_all(wa, size, b"a%d" % n), send_all(wb, size, b"b%d" % n), recv_all(rb), recv_all(ra)
        )
        took = time.perf_counter() - t0
        wa.close()
        wb.close()
        assert (na, ha) == (size, sa), f"pair {n}: A->B damaged"
        assert (nb, hb) == (size, sb), f"pair {n}: B->A damaged"
        return took

    async with asyncio.timeout(120):
        return list(await asyncio.gather(*(one(n) for n in range(pairs))))


# --------------------------------------------------------------------------- 1(c)


async def test_concurrent_forwarded_streams(tmp_path: Path) -> None:
    async with two_agents(tmp_path) as lab:
        sizes = [64 * 1024 + 997 * i for i in range(FORWARDED)]
        t0 = time.perf_counter()
        async with asyncio.timeout(120):
            results = await asyncio.gather(*(one_stream(lab, n) for n in sizes), return_exceptions=True)
        took = time.perf_counter() - t0
        sessions = (await lab.a.components["coordinator"].sessions())["sessions"]
        rv_st = lab.servers.rendezvous.stats()
    paths: dict[str, int] = {}
    for s in sessions:
        paths[str(s.get("path"))] = paths.get(str(s.get("path")), 0) + 1
    failed = [r for r in results if r is not True]
    print(
        f"\n[load 1c] {FORWARDED} concurrent forwarded streams ({sum(sizes) >> 10} KiB each way in all) in "
        f"{took:.2f} s; paths {paths}; server drops {rv_st['drops']}; failures {len(failed)}: {failed[:3]}"
    )
    assert failed == []


# --------------------------------------------------------------------------- 1(d)


def _server_side_sockets(port: int) -> int:
    """Accepted sockets our process holds on `port` (the in-process server's side)."""
    return sum(
        1
        for c in psutil.Process().net_connections(kind="tcp")
        if c.laddr and c.laddr.port == port and c.raddr and c.status == psutil.CONN_ESTABLISHED
    )


async def _connect_many(port: int, firsts: list[bytes]) -> list[socket.socket]:
    """One connection per entry, each sending its bytes (nothing for b"") and then nothing more."""
    loop = asyncio.get_running_loop()
    out = []
    for first in firsts:
        s = socket.socket()
        s.setblocking(False)
        out.append(s)
        await loop.sock_connect(s, ("127.0.0.1", port))
        if first:
            await loop.sock_sendall(s, first)
    return out


async def _settle(cond: Any) -> None:
    async with asyncio.timeout(STALL):
        while not cond():
            await asyncio.sleep(0.05)


@pytest.mark.parametrize(
    "cap",
    [
        pytest.param(None, id="default-limits"),
        pytest.param(200, id="limits-below-attack"),
    ],
)
async def test_idle_and_unpaired_connections_stay_bounded(tmp_path: Path, cap: int | None) -> None:
    # One attacking address: lift the per-IP caps so that the totals are what this tests
    # (tests/integration/test_per_ip_caps.py covers the per-IP caps).
    relay_config = relay_cfg(max_handshaking_per_ip=0, max_waiting_per_ip=0)
    rv_cfg = RendezvousConfig(
        binds=["127.0.0.1"], port=0, db_path=tmp_path / "rv.db", key_file=tmp_path / "k", max_idle_tcp_per_ip=0,
        max_tcp_per_ip=0,
    )
    if cap is not None:
        relay_config.max_waiting = relay_config.max_handshaking = cap
        rv_cfg.max_tcp_connections = cap
    relay = await start_relay(relay_config)
    rv = await start_rendezvous(rv_cfg)
    proc = psutil.Process()
    fds_before = proc.num_fds()
    clients: list[socket.socket] = []
    try:
        clients += await _connect_many(relay.port, [b""] * IDLE)  # half-open
        clients += await _connect_many(relay.port, [request_frame(f"never-paired-{n}") for n in range(IDLE)])
        clients += await _connect_many(rv.tcp_port, [b""] * IDLE)  # half-open against the rendezvous server
        enough = min(relay_config.max_handshaking, 2 * IDLE)
        await _settle(lambda: relay.stats()["handshaking"] + relay.stats()["waiting"] >= enough)
        await _settle(lambda: rv.stats()["tcp_connections"] >= min(rv_cfg.max_tcp_connections, IDLE))
        # A refused connection is aborted on the next loop pass: let those finish first.
        relay_limit = relay_config.max_waiting + relay_config.max_handshaking
        await _settle(lambda: _server_side_sockets(relay.port) <= relay_limit)
        await _settle(lambda: _server_side_sockets(rv.tcp_port) <= rv_cfg.max_tcp_connections)
        relay_held = _server_side_sockets(relay.port)
        rv_held = _server_side_sockets(rv.tcp_port)
        server_fds = proc.num_fds() - fds_before - len(clients)
        st = relay.stats()
        print(
            f"\n[load 1d {cap or 'default'}] {IDLE} half-open + {IDLE} unpaired -> relay holds {relay_held} "
            f"sockets (handshaking {st['handshaking']}, waiting {st['waiting']}, limits "
            f"{relay_config.max_handshaking}+{relay_config.max_waiting}, drops {st['drops']}); {IDLE} half-open -> "
            f"rendezvous holds {rv_held} (limit {rv_cfg.max_tcp_connections}); server-side fds {server_fds}"
        )
        assert relay_held <= relay_limit
        assert rv_held <= rv_cfg.max_tcp_connections
        assert server_fds <= relay_limit + rv_cfg.max_tcp_connections + 16
        # Meanwhile a real registration (UDP) and a real relay pair still work.
        await register_peers(rv, sim_peers(1, "realpeer"), sockets=1)
        await relay_pairs(relay.port, 1, 64 * 1024)
    finally:
        for s in clients:
            s.close()
        await relay.close()
        await rv.close()
