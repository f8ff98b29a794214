"""Relay throughput against iperf3 and socat, measured in the same run, on 127.0.0.1 only.

    python bench/relay_bench.py [--size-mib 1024] [--streams 8] [--stream-mib 384] [--skip-ray]

Rows (MB = 10^6 bytes, wall time from the first byte sent to the last byte received):

* iperf3 direct / iperf3 via socat: iperf3 -c 127.0.0.1 -n SIZE, directly and through
  `socat TCP-LISTEN:p,reuseaddr,fork TCP:127.0.0.1:q` (fork: iperf3 opens a control
  and a data connection).
* gen direct / gen via socat / gen via relay: our own load generator, one stream of SIZE.
  The relay needs a RequestRelay frame first, which iperf3 cannot send, so the
  generator is the common yardstick: the sender uses sendfile from a /dev/shm file and
  the receiver splices into /dev/null, so it costs as little CPU as a generator can
  (important on a 2-core machine, where the generator competes with the relay).
* relay splice pump vs asyncio pump (in-process server in a child process).
* aggregate: N concurrent streams through 1 replica (plain process) and 2 replicas
  (Ray actors sharing the port). The uuids are chosen so each replica owns N/2 pairs:
  with random uuids the split is binomial and the number measures hash luck.

CPU: user+system seconds of the relay processes and of this process (the generator)
during each run, as a share of wall time (100 % = one core).
Every process started here is stopped in `finally`; the Ray head started by the
2-replica relay is stopped by that relay on SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psutil

from agent.proto import rendezvous_pb2 as pb
from agent.servers.relay_core import owner_index
from agent.wire import messages
from agent.wire.frames import encode_frame

MB = 1e6
MIB = 1 << 20
HOST = "127.0.0.1"
CHILDREN: list[subprocess.Popen[bytes]] = []


# ------------------------------------------------------------------ helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((HOST, port), timeout=1):
                return
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}") from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listening on {port}") from None
            time.sleep(0.05)


def spawn(cmd: list[str], **kw: Any) -> subprocess.Popen[bytes]:
    proc: subprocess.Popen[bytes] = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, **kw)
    CHILDREN.append(proc)
    return proc


def stop(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc in CHILDREN:
        CHILDREN.remove(proc)


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            p = psutil.Process(pid)
            procs = [p, *p.children(recursive=True)]
        except psutil.Error:
            continue
        for q in procs:
            try:
                t = q.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
    return total


def request_frame(uuid: str) -> bytes:
    return encode_frame(messages.build(request_relay=pb.RequestRelay(uuid=uuid)))


# ------------------------------------------------------------------ load generator


class Source:
    """A /dev/shm file the sender sendfile()s from, so sending costs no user-space copy."""

    def __init__(self, size: int = 64 * MIB) -> None:
        fd, self.path = tempfile.mkstemp(prefix="ptbench-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        with os.fdopen(fd, "wb") as f:
            block = os.urandom(MIB)
            for _ in range(size // MIB):
                f.write(block)
        self.size = size
        self.fd = os.open(self.path, os.O_RDONLY)

    def close(self) -> None:
        os.close(self.fd)
        os.unlink(self.path)


def send_stream(sock: socket.socket, src: Source, total: int) -> None:
    sent = 0
    off = 0
    while sent < total:
        n = os.sendfile(sock.fileno(), src.fd, off, min(src.size - off, total - sent, 4 * MIB))
        if n == 0:
            raise RuntimeError("sendfile sent nothing")
        sent += n
        off = (off + n) % src.size
    sock.shutdown(socket.SHUT_WR)


def recv_stream(sock: socket.socket, out: list[int]) -> None:
    r, w = os.pipe()
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        import fcntl

        fcntl.fcntl(w, getattr(fcntl, "F_SETPIPE_SZ", 1031), MIB)
    except OSError:
        pass
    n = 0
    try:
        while True:
            k = os.splice(sock.fileno(), w, MIB)
            if k == 0:
                break
            n += k
            while k:
                k -= os.splice(r, devnull, k)
    finally:
        os.close(r)
        os.close(w)
        os.close(devnull)
    out.append(n)


@dataclass
class Result:
    mbps: float
    seconds: float
    relay_cpu: float
    gen_cpu: float
    machine: dict[str, float]
    """Machine-wide CPU during the run, % of one core: user, system, softirq, idle."""


def machine_cpu(before: object, after: object, seconds: float) -> dict[str, float]:
    keys = ("user", "system", "softirq", "idle")
    return {k: (getattr(after, k, 0.0) - getattr(before, k, 0.0)) / seconds * 100 for k in keys}


def run_streams(
    connect: Callable[[int], tuple[socket.socket, socket.socket]],
    streams: int,
    per_stream: int,
    src: Source,
    relay_pids: list[int],
) -> Result:
    """`connect(i)` returns (sender, receiver) sockets for stream i, ready for payload."""
    socks = [connect(i) for i in range(streams)]
    got: list[int] = []
    threads = []
    for s, r in socks:
        threads.append(threading.Thread(target=recv_stream, args=(r, got)))
        threads.append(threading.Thread(target=send_stream, args=(s, src, per_stream)))
    me = psutil.Process()
    c0 = cpu_seconds(relay_pids)
    g0 = sum(me.cpu_times()[:2])
    m0 = psutil.cpu_times()
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    dt = time.perf_counter() - t0
    m1 = psutil.cpu_times()
    c1 = cpu_seconds(relay_pids)
    g1 = sum(me.cpu_times()[:2])
    for s, r in socks:
        s.close()
        r.close()
    assert sorted(got) == [per_stream] * streams, (got, per_stream)
    return Result(streams * per_stream / dt / MB, dt, (c1 - c0) / dt, (g1 - g0) / dt, machine_cpu(m0, m1, dt))


def median(results: list[Result]) -> Result:
    """The run with the median throughput, annotated with the spread."""
    ordered = sorted(results, key=lambda r: r.mbps)
    mid = ordered[len(ordered) // 2]
    mid.spread = (ordered[0].mbps, ordered[-1].mbps)  # type: ignore[attr-defined]
    return mid


def direct_pair() -> Callable[[int], tuple[socket.socket, socket.socket]]:
    lsock = socket.socket()
    lsock.bind((HOST, 0))
    lsock.listen(64)
    port = lsock.getsockname()[1]

    def connect(i: int) -> tuple[socket.socket, socket.socket]:
        s = socket.create_connection((HOST, port))
        r, _ = lsock.accept()
        return s, r

    return connect


def forward_pair(port: int, listener: socket.socket) -> Callable[[int], tuple[socket.socket, socket.socket]]:
    """Through a plain forwarder (socat) at `port` that connects to `listener`."""

    def connect(i: int) -> tuple[socket.socket, socket.socket]:
        s = socket.create_connection((HOST, port))
        r, _ = listener.accept()
        return s, r

    return connect


def relay_pair(port: int, uuids: list[str]) -> Callable[[int], tuple[socket.socket, socket.socket]]:
    def connect(i: int) -> tuple[socket.socket, socket.socket]:
        r = socket.create_connection((HOST, port))
        r.sendall(request_frame(uuids[i]))
        s = socket.create_connection((HOST, port))
        s.sendall(request_frame(uuids[i]))
        return s, r

    return connect


def balanced_uuids(n: int, replicas: int, salt: int = 0) -> list[str]:
    """n uuids, n/replicas owned by each replica (see the module docstring)."""
    out: list[str] = []
    want = {k: n // replicas + (1 if k < n % replicas else 0) for k in range(replicas)}
    i = 0
    while len(out) < n:
        u = f"bench-{os.getpid()}-{salt}-{i}"
        k = owner_index(u, replicas)
        if want[k] > 0:
            want[k] -= 1
            out.append(u)
        i += 1
    return out


# ------------------------------------------------------------------ the systems under test


@contextmanager
def socat_to(target_port: int) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    port = free_port()
    proc = spawn(
        ["socat", f"TCP-LISTEN:{port},bind={HOST},reuseaddr,fork", f"TCP:{HOST}:{target_port}"],
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_listening_quiet(port, proc)
        yield port, proc
    finally:
        stop(proc)


def wait_listening_quiet(port: int, proc: subprocess.Popen[bytes]) -> None:
    """Wait for a listener without leaving a connection behind (socat would fork for it)."""
    deadline = time.monotonic() + 10
    while True:
        conns = psutil.net_connections("tcp")
        if any(c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN for c in conns):
            return
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("listener did not come up")
        time.sleep(0.02)


@contextmanager
def relay_process(pump: str, replicas: int) -> Iterator[tuple[int, list[int]]]:
    """A relay in a child process; yields (port, pids of the processes that pump bytes)."""
    port = free_port()
    proc = spawn(
        [sys.executable, __file__, "--serve", "--port", str(port), "--pump", pump, "--replicas", str(replicas)],
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_listening(port, proc, timeout=90)
        pids = [proc.pid]
        if replicas > 1:
            # The replicas are Ray worker processes holding the port; find them by their socket.
            deadline = time.monotonic() + 30
            while True:
                holders = {
                    c.pid
                    for c in psutil.net_connections("tcp")
                    if c.pid and c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN
                }
                holders.discard(proc.pid)
                if len(holders) >= replicas or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            pids = sorted(holders)
        yield port, pids
    finally:
        stop(proc, timeout=60)


def serve(port: int, pump: str, replicas: int) -> int:
    from actors.relay_pool import run_pool
    from agent.servers.relay_server import RelayConfig, run_relay

    cfg = RelayConfig(binds=[HOST], port=port, pump=pump, replicas=replicas)  # type: ignore[arg-type]
    return run_pool(cfg) if replicas > 1 else run_relay(cfg)


def iperf3(port_client: int, size: int) -> float:
    out = subprocess.run(
        ["iperf3", "-c", HOST, "-p", str(port_client), "-n", str(size), "-J"],
        capture_output=True,
        timeout=120,
        check=True,
    )
    data = json.loads(out.stdout)
    return float(data["end"]["sum_received"]["bits_per_second"]) / 8 / MB


@contextmanager
def iperf3_server() -> Iterator[int]:
    port = free_port()
    proc = spawn(["iperf3", "-s", "-p", str(port), "-B", HOST], stderr=subprocess.DEVNULL)
    try:
        wait_listening_quiet(port, proc)
        yield port
    finally:
        stop(proc)


# ------------------------------------------------------------------ main


def row(name: str, r: Result, base: float | None = None) -> None:
    ratio = f"{r.mbps / base:5.2f}x" if base else "      "
    lo, hi = getattr(r, "spread", (r.mbps, r.mbps))
    m = r.machine
    print(
        f"  {name:<30} {r.mbps:6.0f} MB/s ({lo:5.0f}-{hi:5.0f}) {ratio}"
        f"  relay {r.relay_cpu * 100:3.0f}%  gen {r.gen_cpu * 100:3.0f}%"
        f"  | machine usr {m['user']:3.0f} sys {m['system']:3.0f} sirq {m['softirq']:3.0f} idle {m['idle']:3.0f}",
        flush=True,
    )


def iperf_row(name: str, runs: list[float], base: float | None = None) -> float:
    runs = sorted(runs)
    mid = runs[len(runs) // 2]
    ratio = f"{mid / base:5.2f}x" if base else "      "
    print(f"  {name:<30} {mid:6.0f} MB/s ({runs[0]:5.0f}-{runs[-1]:5.0f}) {ratio}", flush=True)
    return mid


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=1024, help="bytes per single-stream run")
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--stream-mib", type=int, default=384, help="bytes per stream in the aggregate runs")
    ap.add_argument("--skip-ray", action="store_true")
    ap.add_argument("--repeat", type=int, default=3, help="runs per row (the median is shown)")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--pump", default="auto", help=argparse.SUPPRESS)
    ap.add_argument("--replicas", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        return serve(args.port, args.pump, args.replicas)

    size = args.size_mib * MIB
    rep = args.repeat
    t_start = time.monotonic()
    print(
        f"relay bench: {os.cpu_count()} cores; single stream {args.size_mib} MiB, "
        f"aggregate {args.streams} x {args.stream_mib} MiB; median of {rep} runs (min-max); "
        "cpu in % of one core",
        flush=True,
    )
    src = Source()
    try:
        print("baselines (iperf3: its own client and server; gen: our generator, see docstring)")
        with iperf3_server() as ip:
            ip_direct = iperf_row("iperf3 direct", [iperf3(ip, size) for _ in range(rep)])
            with socat_to(ip) as (sp, _):
                iperf_row("iperf3 via socat", [iperf3(sp, size) for _ in range(rep)], ip_direct)

        listener = socket.socket()
        listener.bind((HOST, 0))
        listener.listen(64)
        gen_direct = median([run_streams(direct_pair(), 1, size, src, []) for _ in range(rep)])
        row("gen direct", gen_direct)
        with socat_to(listener.getsockname()[1]) as (sp, sproc):
            gen_socat = median([run_streams(forward_pair(sp, listener), 1, size, src, [sproc.pid]) for _ in range(rep)])
        row("gen via socat", gen_socat, gen_direct.mbps)
        listener.close()

        print("relay, one paired stream (ratio to gen via socat)")
        single: dict[str, Result] = {}
        for pump in ("splice", "asyncio"):
            with relay_process(pump, 1) as (port, pids):
                single[pump] = median(
                    [run_streams(relay_pair(port, [f"one-{pump}-{i}"]), 1, size, src, pids) for i in range(rep)]
                )
            row(f"relay, {pump} pump", single[pump], gen_socat.mbps)
        print(
            f"  splice / asyncio: {single['splice'].mbps / single['asyncio'].mbps:.2f}x;"
            f" relay splice / gen direct: {single['splice'].mbps / gen_direct.mbps:.2f}x"
        )

        print(f"aggregate, {args.streams} concurrent paired streams, splice pump")
        per = args.stream_mib * MIB
        agg: dict[int, Result] = {}
        for n in [1] if args.skip_ray else [1, 2]:
            t0 = time.monotonic()
            with relay_process("splice", n) as (port, pids):
                startup = time.monotonic() - t0
                runs = [
                    run_streams(relay_pair(port, balanced_uuids(args.streams, n, k)), args.streams, per, src, pids)
                    for k in range(rep)
                ]
                agg[n] = median(runs)
            row(f"{n} replica(s), {len(pids)} pid(s), up {startup:3.1f} s", agg[n], agg.get(1, agg[n]).mbps)
        if 2 in agg:
            print(f"  2 replicas / 1 replica: {agg[2].mbps / agg[1].mbps:.2f}x")
        print(f"total bench time {time.monotonic() - t_start:.0f} s")
    finally:
        src.close()
        for p in list(CHILDREN):
            stop(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
