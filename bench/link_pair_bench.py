"""One peer link's byte path, end to end over loopback TCP, each side in its own process.

    python bench/link_pair_bench.py [--mib 1024] [--runs 3] [--profile]

What the agent tunnel costs per byte without Ray, the relay or the rendezvous round: a source
process writes `--mib` MiB into A's stream socket, A's link (agent/link/link.py, its own process)
carries it over one loopback TCP connection to B's link (another process), which writes it to a
sink process. Printed side by side, in the same run:

- `raw TCP pair`: the source writes straight to the sink over loopback (the floor of the copies).
- `socat-like forwarder pair`: two processes that only copy (recv/sendall, 256 KiB) between the
  source, one TCP connection and the sink: what the link would cost if sealing, records and the
  multiplexer were free.
- `link pair`: the real thing, with MB/s and CPU seconds per GiB of A's and B's processes.

`--profile` runs cProfile in A and B during one extra link transfer and prints their top functions
(by own time): where the per-byte time of a side goes.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import os
import pstats
import resource
import socket
import sys
import time
from collections.abc import Callable, Coroutine
from multiprocessing import get_context
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.link.link import Link, LinkStream
from agent.session.stream import StreamCodec
from agent.wire.data_channel import DataChannel

MiB = 1 << 20
BLOCK = 256 * 1024


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _listener() -> socket.socket:
    sock = socket.create_server(("127.0.0.1", 0))
    return sock


def source(port: int, total: int) -> None:
    """Connect to `port` and write `total` bytes, then half-close and wait for the far end's close."""
    sock = socket.create_connection(("127.0.0.1", port))
    block = memoryview(bytes(BLOCK))
    sent = 0
    while sent < total:
        n = min(BLOCK, total - sent)
        sock.sendall(block[:n])
        sent += n
    sock.shutdown(socket.SHUT_WR)
    while sock.recv(65536):
        pass
    sock.close()


def sink(listener: socket.socket, report: Connection) -> None:
    """Accept one connection, read to its end, report (bytes, seconds from first to last byte)."""
    conn, _ = listener.accept()
    buf = bytearray(BLOCK)
    got = 0
    first = 0.0
    while n := conn.recv_into(buf):
        if not got:
            first = time.perf_counter()
        got += n
    report.send((got, time.perf_counter() - first))
    conn.close()


def forwarder(listener: socket.socket, out_port: int, report: Connection) -> None:
    """Copy one accepted connection to a new one on `out_port` (one direction), like socat."""
    conn, _ = listener.accept()
    out = socket.create_connection(("127.0.0.1", out_port))
    cpu = _cpu()
    buf = bytearray(BLOCK)
    view = memoryview(buf)
    while n := conn.recv_into(buf):
        out.sendall(view[:n])
    out.shutdown(socket.SHUT_WR)
    while out.recv(65536):
        pass
    out.close()
    conn.close()
    report.send(_cpu() - cpu)


def _channels() -> tuple[DataChannel, DataChannel]:
    """What a handshake leaves each side (agent.session.stream.run_handshake)."""
    a_to_b, b_to_a = os.urandom(32), os.urandom(32)
    return DataChannel(a_to_b, b_to_a), DataChannel(b_to_a, a_to_b)


def link_a(
    listener: socket.socket, transport_port: int, channel: DataChannel, profile: bool, report: Connection
) -> None:
    """A: accept the source's connection, open a stream on the link and pump it."""

    async def main() -> float:
        loop = asyncio.get_running_loop()
        listener.setblocking(False)
        transport = socket.create_connection(("127.0.0.1", transport_port))
        transport.setblocking(False)
        link = Link(transport, StreamCodec(channel), dialer=True, idle=None, keepalive=0)
        runner = asyncio.ensure_future(link.run())
        local, _ = await loop.sock_accept(listener)
        cpu = _cpu()
        st = await link.open("sink")
        done = asyncio.Event()
        link.on_stream_end = lambda _st: done.set()
        link.attach(st, local)
        await done.wait()
        used = _cpu() - cpu
        link.close("")
        await asyncio.wait([runner], timeout=2)
        return used

    _run(main, profile, "A (dialer: seals)", report)


def link_b(listener: socket.socket, sink_port: int, channel: DataChannel, profile: bool, report: Connection) -> None:
    """B: accept the link's transport; each stream connects to the sink."""

    async def main() -> float:
        loop = asyncio.get_running_loop()
        listener.setblocking(False)
        transport, _ = await loop.sock_accept(listener)
        transport.setblocking(False)
        cpu = 0.0

        async def accept(_st: LinkStream) -> socket.socket:
            nonlocal cpu
            cpu = _cpu()
            sock = socket.create_connection(("127.0.0.1", sink_port))
            return sock

        link = Link(transport, StreamCodec(channel), dialer=False, accept=accept, keepalive=0)
        await link.run()
        return _cpu() - cpu

    _run(main, profile, "B (opens)", report)


def _run(main: Callable[[], Coroutine[Any, Any, float]], profile: bool, name: str, report: Connection) -> None:
    prof = cProfile.Profile() if profile else None
    if prof is not None:
        prof.enable()
    used = asyncio.run(main())
    text = ""
    if prof is not None:
        prof.disable()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(14)
        text = f"-- {name}\n" + "\n".join(line for line in out.getvalue().splitlines() if line.strip())
    report.send((used, text))


def measure(kind: str, total: int, profile: bool = False) -> tuple[float, float, float, str]:
    """(MB/s, CPU s/GiB of the first middle process, of the second, profile text)."""
    ctx = get_context("fork")
    sink_listener, a_listener, mid_listener = _listener(), _listener(), _listener()
    sink_port, a_port, mid_port = (s.getsockname()[1] for s in (sink_listener, a_listener, mid_listener))
    sink_rx, sink_tx = ctx.Pipe(duplex=False)
    a_rx, a_tx = ctx.Pipe(duplex=False)
    b_rx, b_tx = ctx.Pipe(duplex=False)
    procs = [ctx.Process(target=sink, args=(sink_listener, sink_tx))]
    if kind == "raw":
        procs.append(ctx.Process(target=source, args=(sink_port, total)))
    elif kind == "forwarders":
        procs += [
            ctx.Process(target=forwarder, args=(mid_listener, sink_port, b_tx)),
            ctx.Process(target=forwarder, args=(a_listener, mid_port, a_tx)),
            ctx.Process(target=source, args=(a_port, total)),
        ]
    else:
        ch_a, ch_b = _channels()
        procs += [
            ctx.Process(target=link_b, args=(mid_listener, sink_port, ch_b, profile, b_tx)),
            ctx.Process(target=link_a, args=(a_listener, mid_port, ch_a, profile, a_tx)),
            ctx.Process(target=source, args=(a_port, total)),
        ]
    for proc in procs:
        proc.start()
    got, seconds = sink_rx.recv()
    cpu_a = cpu_b = 0.0
    text = ""
    if kind != "raw":
        a_out, b_out = a_rx.recv(), b_rx.recv()
        if kind == "link":
            (cpu_a, text_a), (cpu_b, text_b) = a_out, b_out
            text = f"{text_a}\n{text_b}" if profile else ""
        else:
            cpu_a, cpu_b = a_out, b_out
    for proc in procs:
        proc.join(10)
    for s in (sink_listener, a_listener, mid_listener):
        s.close()
    if got != total:
        raise SystemExit(f"{kind}: the sink got {got} of {total} bytes")
    gib = total / (1 << 30)
    return total / seconds / 1e6, cpu_a / gib, cpu_b / gib, text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--mib", type=int, default=1024, help="MiB per transfer (default 1024)")
    parser.add_argument("--runs", type=int, default=3, help="transfers per measurement (best is shown)")
    parser.add_argument("--profile", action="store_true", help="cProfile A and B in one extra link transfer")
    args = parser.parse_args()
    total = args.mib * MiB
    print(f"link pair over loopback TCP, {args.mib} MiB per transfer, best of {args.runs} (MB = 10^6 B)")
    best: dict[str, tuple[float, float, float]] = {}
    for kind in ("raw", "forwarders", "link"):
        runs = [measure(kind, total)[:3] for _ in range(args.runs)]
        best[kind] = max(runs)
        rate, cpu_a, cpu_b = best[kind]
        cpu = "" if kind == "raw" else f"   CPU s/GiB: A {cpu_a:.2f}, B {cpu_b:.2f}"
        rates = ", ".join(f"{r[0]:.0f}" for r in runs)
        print(f"  {kind:<11} best {rate:8.1f} MB/s  ({rates})  /raw {rate / best['raw'][0]:.2f}{cpu}")
    print(f"link / forwarder pair: {best['link'][0] / best['forwarders'][0]:.2f}")
    if args.profile:
        print(measure("link", total, profile=True)[3])


if __name__ == "__main__":
    main()
