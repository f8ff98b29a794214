"""Rendezvous server benchmark: RegisterPeer throughput against a bare asyncio UDP echo, memory per ID.

    python bench/rendezvous_bench.py [--peers 10000] [--seconds 4] [--window 64] [--mem-ids 100000]

The server (or the echo baseline) runs in a child process and a closed-loop client in
this one keeps `window` datagrams in flight, so both numbers are "answered per
second" on the same machine in the same run; the ratio says what the rendezvous
logic costs over the bare asyncio datagram path. The `peers` IDs are bound first
(database rows preloaded in one transaction, then a signed registration each, as agents
register: RegisterPk for a challenge and RegisterPk signed with it, so they are in memory and
online); the per-IP RegisterPk limits are lifted for that preload only. Its rate is printed
too: what a signature check per registration costs. Memory per ID is the RSS growth of a
child process that registers `mem-ids` IDs through the core (no sockets), divided by the count.
Traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import multiprocessing as mp
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.proto import rendezvous_pb2 as pb
from agent.rendezvous.registrar_core import HEARTBEAT_INTERVAL
from agent.wire import messages, signing
from tests.signed import Member

LIFTED_LIMITS = {"ip_block_limit": 10**9, "ip_ids_limit": 10**9}


def members(n: int) -> list[Member]:
    """n agents' identities: a key each, the ID derived from it (deterministic, so both processes agree)."""
    out = []
    for i in range(n):
        m = Member.new(b"bench-%d" % i)
        m.uuid = b"bench-uuid-%d" % i
        out.append(m)
    return out


# --------------------------------------------------------------------------- children


def _run_rendezvous(tmp: str, conn: Connection) -> None:
    from agent.servers.rendezvous_core import Limits
    from agent.servers.rendezvous_server import RendezvousConfig, start_rendezvous

    async def main() -> None:
        cfg = RendezvousConfig(
            binds=["127.0.0.1"],
            port=0,
            db_path=Path(tmp) / "rv.sqlite3",
            key_file=Path(tmp) / "id_ed25519",
            limits=Limits(**LIFTED_LIMITS),
        )
        server = await start_rendezvous(cfg)
        conn.send(server.udp_port)
        await asyncio.get_running_loop().run_in_executor(None, conn.recv)  # wait for "stop"
        conn.send(server.stats())
        await server.close()

    asyncio.run(main())


def _run_echo(conn: Connection) -> None:
    class Echo(asyncio.DatagramProtocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport

        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            self.transport.sendto(data, addr)  # type: ignore[attr-defined]

    async def main() -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(Echo, local_addr=("127.0.0.1", 0))
        conn.send(transport.get_extra_info("sockname")[1])
        await loop.run_in_executor(None, conn.recv)
        conn.send({})
        transport.close()

    asyncio.run(main())


def _memory_per_id(n: int, tmp: str, conn: Connection) -> None:
    import psutil
    from nacl.signing import SigningKey

    from agent.servers.registry import Registry
    from agent.servers.rendezvous_core import Limits, Origin, RendezvousCore
    from agent.wire.addr import SockAddr

    proc = psutil.Process()
    registry = Registry(Path(tmp) / "mem.sqlite3")
    core = RendezvousCore(registry, SigningKey.generate(), limits=Limits(**LIFTED_LIMITS))
    srcs = [SockAddr.of(f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}", 40000) for i in range(n)]
    # The signed registrations as agents send them (the challenge taken from the core: it is the
    # second datagram of each registration, the one that binds and costs a signature check)
    datagrams = [
        m.register_pk(bytes(16), core._challenge(m.id, Origin(srcs[i]), int(1000.0 // 30)))
        for i, m in enumerate(members(n))
    ]
    gc.collect()
    before = proc.memory_info().rss
    t0 = time.perf_counter()
    for i in range(n):
        core.handle_udp(datagrams[i], srcs[i], 0, 1000.0)  # Persist actions are ignored: memory only
    elapsed = time.perf_counter() - t0
    gc.collect()
    after = proc.memory_info().rss
    # Derived IDs are 10 digits (~33 bits): among 100,000 random keys two derive one ID about half
    # the time (the birthday bound); the second is refused as a key mismatch, as a squatter would be.
    collisions = core.events["register_pk_key_mismatch"]
    assert len(core.peers) + collisions == n, (len(core.peers), collisions)
    conn.send(((after - before) / len(core.peers), n / elapsed, collisions))


# --------------------------------------------------------------------------- client


def closed_loop(port: int, payloads: list[bytes], seconds: float, window: int) -> tuple[float, int]:
    """Keep `window` requests in flight for `seconds`; returns (answers per second, lost)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    s.connect(("127.0.0.1", port))
    s.settimeout(0.2)
    n = len(payloads)
    sent = got = lost = 0
    for _ in range(window):
        s.send(payloads[sent % n])
        sent += 1
    t0 = time.perf_counter()
    deadline = t0 + seconds
    while True:
        try:
            s.recv(2048)
            got += 1
        except TimeoutError:
            lost += 1  # refill the window so a lost datagram does not stall the loop
        now = time.perf_counter()
        if now >= deadline:
            break
        s.send(payloads[sent % n])
        sent += 1
    s.close()
    return got / (now - t0), lost


def register_all(port: int, peers: list[Member], window: int, server_key: bytes) -> None:
    """A signed registration per ID (rows exist, nothing changes on disk), so all are in memory and online.

    One socket, `window` in flight: the server answers in order, and each answer is checked to be
    signed for the nonce of the attempt it answers."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    s.connect(("127.0.0.1", port))
    s.settimeout(2.0)
    nonces = [os.urandom(16) for _ in peers]
    challenges: list[bytes] = []

    def ask_challenge(i: int) -> bytes:
        return peers[i].register_pk(nonces[i])

    def signed(i: int) -> bytes:
        return peers[i].register_pk(nonces[i], challenges[i])

    phases: list[tuple[int, Callable[[int], bytes]]] = [
        (pb.RegisterPkResponse.CHALLENGE, ask_challenge),
        (pb.RegisterPkResponse.OK, signed),
    ]
    for want, payload_of in phases:
        n = len(peers)
        sent = min(window, n)
        for i in range(sent):
            s.send(payload_of(i))
        for i in range(n):
            reply = s.recv(2048)
            msg = messages.parse(signing.opened(server_key, signing.SERVER, nonces[i], reply))[1]
            if msg.result != want:
                raise SystemExit(f"registration failed: {msg}")
            if want == pb.RegisterPkResponse.CHALLENGE:
                challenges.append(bytes(msg.challenge))
            if sent < n:
                s.send(payload_of(sent))
                sent += 1
    s.close()


def start_child(target: object, *args: object) -> tuple[mp.process.BaseProcess, Connection, int]:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=target, args=(*args, child), daemon=True)  # type: ignore[arg-type]
    proc.start()
    port = parent.recv()
    return proc, parent, port


def stop_child(proc: mp.process.BaseProcess, conn: Connection) -> dict:  # type: ignore[type-arg]
    conn.send("stop")
    result = conn.recv()
    proc.join(10)
    return result  # type: ignore[no-any-return]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--peers", type=int, default=10_000)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--mem-ids", type=int, default=100_000)
    args = ap.parse_args()
    print(f"cpus: {os.cpu_count()}, python {sys.version.split()[0]}, peers {args.peers}, window {args.window}")

    with tempfile.TemporaryDirectory(prefix="rv-bench-") as tmp:
        from agent.common.keyfile import load_or_create_signing_key
        from agent.servers.registry import PeerRow, Registry

        t0 = time.perf_counter()
        peers = members(args.peers)
        reg = Registry(Path(tmp) / "rv.sqlite3")
        reg.put_many(PeerRow(m.id, m.uuid, m.pk, "127.0.0.1", signed=True) for m in peers)
        reg.close()
        server_key = bytes(load_or_create_signing_key(Path(tmp) / "id_ed25519").verify_key)
        print(f"preloaded {args.peers} rows in {time.perf_counter() - t0:.2f} s")

        proc, conn, port = start_child(_run_rendezvous, tmp)
        t0 = time.perf_counter()
        register_all(port, peers, args.window, server_key)
        rate = args.peers / (time.perf_counter() - t0)
        print(f"signed registrations of {args.peers} known IDs (2 RegisterPk each, DB read, no write): {rate:,.0f}/s")
        beats = [messages.build(register_peer=pb.RegisterPeer(id=m.id)) for m in peers]
        rv_rate, rv_lost = closed_loop(port, beats, args.seconds, args.window)
        stats = stop_child(proc, conn)
        assert stats["peers_online"] == args.peers, stats["peers_online"]

        proc, conn, port = start_child(_run_echo)
        echo_rate, echo_lost = closed_loop(port, beats, args.seconds, args.window)
        stop_child(proc, conn)

        print(f"RegisterPeer answered:   {rv_rate:10,.0f}/s  (lost {rv_lost})")
        print(f"asyncio UDP echo:        {echo_rate:10,.0f}/s  (lost {echo_lost})")
        print(f"ratio rendezvous / echo: {rv_rate / echo_rate:10.2f}")
        print(f"heartbeat capacity at one RegisterPeer per {HEARTBEAT_INTERVAL:g} s (the agent's interval): "
              f"~{rv_rate * HEARTBEAT_INTERVAL:,.0f} online peers per process at full load")

        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_memory_per_id, args=(args.mem_ids, tmp, child), daemon=True)
        p.start()
        per_id, reg_rate, collisions = parent.recv()
        p.join(10)
        print(f"memory per registered ID: {per_id:,.0f} bytes (RSS delta over {args.mem_ids:,} IDs; "
              f"{collisions} derived-ID collision(s) refused)")
        print(f"core RegisterPk (new ID, no I/O): {reg_rate:,.0f}/s")


if __name__ == "__main__":
    main()
