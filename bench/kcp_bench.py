"""KCP goodput and small-message latency against TCP, measured in the same run, loopback only.

    python bench/kcp_bench.py [--mb 64] [--loss 0.05] [--rtts 300] [--cap 20] [--no-netns] [--json]

Every row moves one stream from a sender (this process) to a receiver (a child process), so
each end has its own interpreter, as two real agents would. The receiver hashes what it
got and answers with (count, SHA-256) on the same stream; the row's time runs from the
first byte sent to that answer. MB = 10^6 bytes.

Goodput rows:
* kcp / tcp direct: 64 MB over 127.0.0.1, no loss.
* kcp via udp proxy 0 % / 5 %: through a user-space UDP forwarder (its own process) that
  drops the given share of datagrams in both directions.
* tcp via tcp proxy: the TCP baseline through an equivalent user-space TCP forwarder (no
  loss: a byte-stream proxy cannot lose packets).
* kcp / tcp, kernel 5 % loss: both in a private network namespace (`unshare --net`, so the
  machine's own loopback is untouched) whose lo drops 5 % of all packets with iptables
  `statistic --mode random` (the kernel here has no netem). This is the only fair way to
  lose TCP segments. Skipped with a note when unshare/iptables are unavailable.
A lossy run that has not finished after --cap seconds stops sending and reports what got
through in that time (marked "capped").

Latency rows: --rtts round trips of a 64-byte message echoed by the receiver, p50/p99 in ms,
for KCP and TCP without loss, KCP through the 5 % proxy, and both under kernel 5 % loss.

All child processes are started here and joined (or terminated by pid) in `finally`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import multiprocessing as mp
import os
import random
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from typing import Any

from agent.kcp.stream import KcpTransport

HOST = "127.0.0.1"
MB = 1_000_000
BLOCK = 1 << 20
REPLY = struct.Struct("<Q32s")
"""Receiver's answer in sink mode: byte count and SHA-256 of everything it read."""


@dataclass
class Row:
    name: str
    mb_s: float | None = None
    seconds: float | None = None
    mbytes: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    retransmits: int | None = None
    note: str = ""


# --------------------------------------------------------------------------- children


def _udp_socket() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((HOST, 0))
    s.setblocking(False)
    return s


async def _serve_stream(sock: socket.socket, mode: str) -> None:
    """sink: read to EOF, answer (count, sha256); echo: send back everything until EOF."""
    loop = asyncio.get_running_loop()
    if mode == "sink":
        h = hashlib.sha256()
        n = 0
        buf = bytearray(1 << 18)
        while got := await loop.sock_recv_into(sock, buf):
            h.update(memoryview(buf)[:got])
            n += got
        await loop.sock_sendall(sock, REPLY.pack(n, h.digest()))
    else:
        while data := await loop.sock_recv(sock, 65536):
            await loop.sock_sendall(sock, data)
    sock.shutdown(socket.SHUT_WR)


def kcp_server_proc(pipe: Connection, mode: str) -> None:
    async def run() -> None:
        udp = _udp_socket()
        pipe.send(udp.getsockname())
        peer = pipe.recv()
        t = await KcpTransport.accept(udp, 30.0, peer_addr=peer)
        s = t.stream_socket()
        await _serve_stream(s, mode)
        await asyncio.wait_for(t.wait_closed(), 30)
        pipe.send(t.stats().retransmits)
        s.close()
        await t.close(linger=0)

    asyncio.run(run())


def tcp_server_proc(pipe: Connection, mode: str) -> None:
    async def run() -> None:
        loop = asyncio.get_running_loop()
        lsock = socket.socket()
        lsock.bind((HOST, 0))
        lsock.listen(1)
        lsock.setblocking(False)
        pipe.send(lsock.getsockname())
        conn, _ = await loop.sock_accept(lsock)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await _serve_stream(conn, mode)
        with contextlib.suppress(OSError):
            await loop.sock_recv(conn, 1)
        conn.close()
        lsock.close()
        pipe.send(None)

    asyncio.run(run())


def udp_proxy_proc(pipe: Connection, loss: float, seed: int) -> None:
    """Forward A <-> B, dropping `loss` of the datagrams each way; A is learned, B is told."""

    async def run() -> None:
        loop = asyncio.get_running_loop()
        rng = random.Random(seed)
        a_side, b_side = _udp_socket(), _udp_socket()
        for s in (a_side, b_side):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        pipe.send((a_side.getsockname(), b_side.getsockname()))
        b_addr = tuple(pipe.recv())
        a_addr: list[Any] = [None]
        stop = asyncio.Event()

        def pump(src: socket.socket, dst: socket.socket, to_b: bool) -> None:
            for _ in range(512):
                try:
                    data, addr = src.recvfrom(65536)
                except BlockingIOError:
                    return
                except OSError:
                    continue
                if to_b:
                    a_addr[0] = addr
                if rng.random() < loss:
                    continue
                target = b_addr if to_b else a_addr[0]
                if target is not None:
                    with contextlib.suppress(OSError):
                        dst.sendto(data, target)

        loop.add_reader(a_side.fileno(), pump, a_side, b_side, True)
        loop.add_reader(b_side.fileno(), pump, b_side, a_side, False)
        loop.add_reader(pipe.fileno(), stop.set)
        await stop.wait()

    asyncio.run(run())


def tcp_proxy_proc(pipe: Connection, target: tuple[str, int]) -> None:
    """A user-space TCP forwarder, the TCP counterpart of udp_proxy_proc (one connection)."""

    async def run() -> None:
        loop = asyncio.get_running_loop()
        lsock = socket.socket()
        lsock.bind((HOST, 0))
        lsock.listen(1)
        lsock.setblocking(False)
        pipe.send(lsock.getsockname())
        client, _ = await loop.sock_accept(lsock)
        upstream = socket.socket()
        upstream.setblocking(False)
        await loop.sock_connect(upstream, target)
        for s in (client, upstream):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        async def copy(src: socket.socket, dst: socket.socket) -> None:
            buf = bytearray(1 << 18)
            view = memoryview(buf)
            while n := await loop.sock_recv_into(src, buf):
                await loop.sock_sendall(dst, view[:n])
            dst.shutdown(socket.SHUT_WR)

        await asyncio.gather(copy(client, upstream), copy(upstream, client))
        client.close()
        upstream.close()
        lsock.close()

    asyncio.run(run())


# --------------------------------------------------------------------------- sender side


class Children:
    """Child processes of one row; always joined, terminated by pid if they hang."""

    def __init__(self) -> None:
        self.ctx = mp.get_context("spawn")
        self.procs: list[mp.process.BaseProcess] = []

    def start(self, target: Any, *args: Any) -> Connection:
        parent, child = self.ctx.Pipe()
        p = self.ctx.Process(target=target, args=(child, *args), daemon=True)
        p.start()
        self.procs.append(p)
        return parent

    def stop(self) -> None:
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)


def payload_block() -> bytes:
    return random.Random(1).randbytes(BLOCK)


async def _send_and_verify(sock: socket.socket, total: int, cap: float | None) -> tuple[int, float, bool]:
    """Send `total` bytes, wait for (count, sha256); returns (count, seconds, capped)."""
    loop = asyncio.get_running_loop()
    block = payload_block()
    h = hashlib.sha256()
    sent = 0
    capped = False
    t0 = time.perf_counter()
    while sent < total:
        n = min(BLOCK, total - sent)
        await loop.sock_sendall(sock, memoryview(block)[:n])
        h.update(memoryview(block)[:n])
        sent += n
        if cap is not None and time.perf_counter() - t0 > cap:
            capped = True
            break
    sock.shutdown(socket.SHUT_WR)
    reply = b""
    while len(reply) < REPLY.size:
        chunk = await loop.sock_recv(sock, REPLY.size - len(reply))
        if not chunk:
            raise RuntimeError("receiver closed without an answer")
        reply += chunk
    seconds = time.perf_counter() - t0
    count, digest = REPLY.unpack(reply)
    if count != sent or digest != h.digest():
        raise RuntimeError(f"corrupted stream: sent {sent} got {count}, hash match {digest == h.digest()}")
    return count, seconds, capped


async def _latency(sock: socket.socket, rtts: int, size: int = 64) -> tuple[float, float]:
    loop = asyncio.get_running_loop()
    msg = os.urandom(size)
    samples = []
    for _ in range(rtts):
        t0 = time.perf_counter()
        await loop.sock_sendall(sock, msg)
        got = b""
        while len(got) < size:
            chunk = await loop.sock_recv(sock, size - len(got))
            if not chunk:
                raise RuntimeError("echo closed early")
            got += chunk
        samples.append((time.perf_counter() - t0) * 1000)
        if got != msg:
            raise RuntimeError("echo mismatch")
    sock.shutdown(socket.SHUT_WR)
    while await loop.sock_recv(sock, 65536):
        pass
    q = statistics.quantiles(samples, n=100, method="inclusive")
    return statistics.median(samples), q[98]


def kcp_row(name: str, *, mode: str, mb: int, loss: float | None, rtts: int, cap: float | None) -> Row:
    kids = Children()
    try:
        server = kids.start(kcp_server_proc, mode)
        server_addr = server.recv()
        proxy = None
        peer = server_addr
        if loss is not None:
            proxy = kids.start(udp_proxy_proc, loss, 7)
            a_side, b_side = proxy.recv()
            proxy.send(server_addr)
            peer = a_side
            server.send(b_side)
        udp = _udp_socket()
        if proxy is None:
            server.send(udp.getsockname())

        async def run() -> Row:
            t = await KcpTransport.connect(udp, peer, 10.0)
            s = t.stream_socket()
            row = Row(name)
            if mode == "sink":
                count, seconds, capped = await _send_and_verify(s, mb * MB, cap)
                row.mbytes, row.seconds, row.mb_s = count / MB, seconds, count / MB / seconds
                row.note = "capped" if capped else ""
            else:
                row.p50_ms, row.p99_ms = await _latency(s, rtts)
            await asyncio.wait_for(t.wait_closed(), 30)
            row.retransmits = t.stats().retransmits + server.recv()
            s.close()
            await t.close(linger=0)
            return row

        row = asyncio.run(run())
        if proxy is not None:
            proxy.send("stop")
        return row
    finally:
        kids.stop()


def tcp_row(name: str, *, mode: str, mb: int, via_proxy: bool, rtts: int, cap: float | None) -> Row:
    kids = Children()
    try:
        server = kids.start(tcp_server_proc, mode)
        addr = server.recv()
        if via_proxy:
            addr = kids.start(tcp_proxy_proc, addr).recv()

        async def run() -> Row:
            loop = asyncio.get_running_loop()
            s = socket.socket()
            s.setblocking(False)
            await loop.sock_connect(s, addr)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            row = Row(name)
            if mode == "sink":
                count, seconds, capped = await _send_and_verify(s, mb * MB, cap)
                row.mbytes, row.seconds, row.mb_s = count / MB, seconds, count / MB / seconds
                row.note = "capped" if capped else ""
            else:
                row.p50_ms, row.p99_ms = await _latency(s, rtts)
            s.close()
            return row

        row = asyncio.run(run())
        server.recv()
        return row
    finally:
        kids.stop()


# --------------------------------------------------------------------------- private netns with kernel loss


def inside_netns(args: argparse.Namespace) -> list[Row]:
    """Runs as root inside `unshare --net`: lo up, 5 % random drop of every packet on lo."""
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    probability = f"{args.loss:.4f}"
    subprocess.run(
        ["iptables", "-A", "INPUT", "-i", "lo", "-m", "statistic", "--mode", "random",
         "--probability", probability, "-j", "DROP"],
        check=True,
    )  # fmt: skip
    pct = f"{args.loss * 100:g} %"
    return [
        kcp_row(f"kcp, kernel {pct} loss", mode="sink", mb=args.mb, loss=None, rtts=0, cap=args.cap),
        tcp_row(f"tcp, kernel {pct} loss", mode="sink", mb=args.mb, via_proxy=False, rtts=0, cap=args.cap),
        kcp_row(f"kcp, kernel {pct} loss", mode="echo", mb=0, loss=None, rtts=args.rtts, cap=None),
        tcp_row(f"tcp, kernel {pct} loss", mode="echo", mb=0, via_proxy=False, rtts=args.rtts, cap=None),
    ]


def netns_rows(args: argparse.Namespace) -> tuple[list[Row], str]:
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("iptables"):
        return [], "kernel-loss rows skipped: needs root, unshare and iptables"
    cmd = [
        "unshare", "--net", "--", sys.executable, __file__, "--inside-netns", "--json",
        "--mb", str(args.mb), "--loss", str(args.loss), "--rtts", str(args.rtts), "--cap", str(args.cap),
    ]  # fmt: skip
    try:
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=100)
    except (subprocess.SubprocessError, OSError) as exc:
        err = getattr(exc, "stderr", "") or ""
        return [], f"kernel-loss rows skipped: {exc} {err.strip()[-300:]}"
    return [Row(**r) for r in json.loads(out.stdout)], ""


# --------------------------------------------------------------------------- main


def fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_tables(goodput: list[Row], latency: list[Row], notes: list[str]) -> None:
    print(f"{'goodput (one stream)':34} {'MB/s':>8} {'Mbit/s':>8} {'MB':>6} {'s':>6} {'retx':>7}  note")
    for r in goodput:
        mbit = None if r.mb_s is None else r.mb_s * 8
        print(
            f"{r.name:34} {fmt(r.mb_s, '8.1f')} {fmt(mbit, '8.0f')} {fmt(r.mbytes, '6.0f')} "
            f"{fmt(r.seconds, '6.2f')} {r.retransmits if r.retransmits is not None else '-':>7}  {r.note}"
        )
    print()
    print(f"{'latency (64 B echo)':34} {'p50 ms':>8} {'p99 ms':>8} {'retx':>7}")
    for r in latency:
        print(
            f"{r.name:34} {fmt(r.p50_ms, '8.2f')} {fmt(r.p99_ms, '8.2f')} "
            f"{r.retransmits if r.retransmits is not None else '-':>7}"
        )
    for n in notes:
        print(f"note: {n}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=64, help="MB per goodput row")
    ap.add_argument("--loss", type=float, default=0.05, help="emulated loss for the lossy rows")
    ap.add_argument("--rtts", type=int, default=300, help="round trips per latency row")
    ap.add_argument("--cap", type=float, default=20.0, help="seconds before a lossy run stops sending")
    ap.add_argument("--no-netns", action="store_true", help="skip the kernel-loss rows")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--inside-netns", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.inside_netns:
        print(json.dumps([asdict(r) for r in inside_netns(args)]))
        return

    started = time.perf_counter()
    pct = f"{args.loss * 100:g} %"
    goodput = [
        kcp_row("kcp direct", mode="sink", mb=args.mb, loss=None, rtts=0, cap=None),
        tcp_row("tcp direct", mode="sink", mb=args.mb, via_proxy=False, rtts=0, cap=None),
        kcp_row("kcp via udp proxy 0 %", mode="sink", mb=args.mb, loss=0.0, rtts=0, cap=None),
        tcp_row("tcp via tcp proxy", mode="sink", mb=args.mb, via_proxy=True, rtts=0, cap=None),
        kcp_row(f"kcp via udp proxy {pct} loss", mode="sink", mb=args.mb, loss=args.loss, rtts=0, cap=args.cap),
    ]
    latency = [
        kcp_row("kcp direct", mode="echo", mb=0, loss=None, rtts=args.rtts, cap=None),
        tcp_row("tcp direct", mode="echo", mb=0, via_proxy=False, rtts=args.rtts, cap=None),
        kcp_row(f"kcp via udp proxy {pct} loss", mode="echo", mb=0, loss=args.loss, rtts=args.rtts, cap=None),
    ]
    notes: list[str] = []
    if not args.no_netns:
        rows, note = netns_rows(args)
        goodput += [r for r in rows if r.mb_s is not None]
        latency += [r for r in rows if r.p50_ms is not None]
        if note:
            notes.append(note)
    notes.append(f"total bench time {time.perf_counter() - started:.1f} s")
    if args.json:
        print(json.dumps({"goodput": [asdict(r) for r in goodput], "latency": [asdict(r) for r in latency]}))
    else:
        print_tables(goodput, latency, notes)


if __name__ == "__main__":
    main()
