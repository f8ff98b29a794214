"""Stream multiplexers for peer links (issue 12), measured in memory, sans-IO, on one core.

    python bench/mux_bench.py [--mib 256] [--streams 1,8,64] [--opens 2000]

What one link between two agents would pay per byte and per new stream, with each candidate
doing both ends in this process (no sockets, no event loop: only the protocol's own CPU cost):

- `secretbox only`: the baseline: today's session, one stream per session, our 64 KiB frames
  sealed and opened by SecureChannel (what every candidate below pays too, except aioquic).
- `h2 + secretbox`: HTTP/2 streams and flow control (the `h2` sans-IO library): DATA frames of
  16 KiB (h2's default max frame), windows acknowledged as data is consumed, and the bytes h2
  writes sealed into 64 KiB secure frames.
- `ours (mux_core) + secretbox`: agent/link/mux_core.py, yamux-shaped framing of our own
  (12-byte header; per-stream windows of 256 KiB granted back as the reader consumes).
- `aioquic`: QUIC streams with their own TLS 1.3 and AES-GCM (it would replace our channel, and
  carry our handshake's keys only through its own TLS: see the issue's note), 1350-byte packets.

Each prints MB/s of stream payload moved end to end (best of 3 runs, the baseline too), and
microseconds to open a stream and get its first byte back (the round trip a `-L` connection would
pay over an existing link, CPU only).
Ratios are against `secretbox only`, measured in the same run. h2 and aioquic are optional
imports (`pip install h2 aioquic`); a missing one is skipped with a line saying so.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.link.mux_core import Data as MuxData
from agent.link.mux_core import Mux
from agent.wire.secure_channel import SecureChannel

MiB = 1 << 20
FRAME = 64 * 1024
"""The session's secure frame today (agent.session.stream)."""


def pair() -> tuple[SecureChannel, SecureChannel]:
    key = os.urandom(32)
    return SecureChannel(key), SecureChannel(key)


# --------------------------------------------------------------------------- baseline


def secretbox_only(total: int, _streams: int) -> float:
    tx, rx = pair()
    chunk = os.urandom(FRAME)
    moved = 0
    t0 = time.perf_counter()
    while moved < total:
        moved += len(rx.open(tx.seal(chunk)))
    return moved / (time.perf_counter() - t0) / 1e6


# --------------------------------------------------------------------------- h2


def _h2_pair() -> tuple[Any, Any]:
    import h2.config
    import h2.connection

    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    s = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
    c.initiate_connection()
    s.initiate_connection()
    big = 1 << 30
    c.increment_flow_control_window(big)
    s.increment_flow_control_window(big)
    s.receive_data(c.data_to_send())
    c.receive_data(s.data_to_send())
    s.receive_data(c.data_to_send())
    return c, s


HEADERS = [(b":method", b"CONNECT"), (b":authority", b"127.0.0.1:22")]


def h2_bulk(total: int, streams: int) -> float:
    import h2.events

    c, s = _h2_pair()
    tx, rx = pair()
    ids = []
    for _ in range(streams):
        sid = c.get_next_available_stream_id()
        c.send_headers(sid, HEADERS)
        ids.append(sid)
    s.receive_data(c.data_to_send())
    chunk = os.urandom(16 * 1024)
    moved = i = 0
    t0 = time.perf_counter()
    while moved < total:
        for _ in range(4):  # one secure frame's worth of DATA frames
            sid = ids[i % streams]
            i += 1
            if c.local_flow_control_window(sid) < len(chunk):
                continue
            c.send_data(sid, chunk)
        wire = rx.open(tx.seal(c.data_to_send()))
        for ev in s.receive_data(wire):
            if isinstance(ev, h2.events.DataReceived):
                moved += len(ev.data)
                s.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        back = s.data_to_send()
        if back:
            c.receive_data(rx.open(tx.seal(back)))
    return moved / (time.perf_counter() - t0) / 1e6


def h2_open(n: int) -> float:
    import h2.events

    c, s = _h2_pair()
    tx, rx = pair()
    t0 = time.perf_counter()
    for _ in range(n):
        sid = c.get_next_available_stream_id()
        c.send_headers(sid, HEADERS)
        for ev in s.receive_data(rx.open(tx.seal(c.data_to_send()))):
            if isinstance(ev, h2.events.RequestReceived):
                s.send_headers(ev.stream_id, [(b":status", b"200")])
                s.send_data(ev.stream_id, b"x")
        got = [e for e in c.receive_data(rx.open(tx.seal(s.data_to_send()))) if isinstance(e, h2.events.DataReceived)]
        assert got and got[0].data == b"x"
        c.end_stream(sid)
        s.end_stream(sid)
        s.receive_data(rx.open(tx.seal(c.data_to_send())))
        c.receive_data(rx.open(tx.seal(s.data_to_send())))
    return (time.perf_counter() - t0) / n * 1e6


# --------------------------------------------------------------------------- ours


def ours_bulk(total: int, streams: int) -> float:
    c, s = Mux(dialer=True), Mux(dialer=False)
    tx, rx = pair()
    ids = [c.open_stream() for _ in range(streams)]
    s.receive(c.data_to_send())
    chunk = os.urandom(16 * 1024)
    moved = i = 0
    t0 = time.perf_counter()
    while moved < total:
        for _ in range(4):
            c.send(ids[i % streams], chunk)
            i += 1
        for ev in s.receive(rx.open(tx.seal(c.data_to_send()))):
            if isinstance(ev, MuxData):
                moved += len(ev.data)
                s.consumed(ev.stream, len(ev.data))  # the reader keeps up
        back = s.data_to_send()
        if back:
            c.receive(rx.open(tx.seal(back)))
    return moved / (time.perf_counter() - t0) / 1e6


def ours_open(n: int) -> float:
    c, s = Mux(dialer=True), Mux(dialer=False)
    tx, rx = pair()
    t0 = time.perf_counter()
    for _ in range(n):
        sid = c.open_stream()
        c.send(sid, b"127.0.0.1:22")
        c.close(sid)
        for ev in s.receive(rx.open(tx.seal(c.data_to_send()))):
            if isinstance(ev, MuxData):
                s.send(ev.stream, b"x")
                s.close(ev.stream)
        got = [ev.data for ev in c.receive(rx.open(tx.seal(s.data_to_send()))) if isinstance(ev, MuxData)]
        assert got == [b"x"], got
    assert not c.streams and not s.streams  # every stream closed both ways and forgotten
    return (time.perf_counter() - t0) / n * 1e6


# --------------------------------------------------------------------------- aioquic


def _quic_pair() -> tuple[Any, Any, Callable[[], None]]:
    import datetime

    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "peer")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    big = 1 << 30
    cc = QuicConfiguration(is_client=True, alpn_protocols=["pt"], verify_mode=0, max_data=big, max_stream_data=big)
    sc = QuicConfiguration(is_client=False, alpn_protocols=["pt"], max_data=big, max_stream_data=big)
    sc.certificate, sc.private_key = cert, key
    c = QuicConnection(configuration=cc)
    s = QuicConnection(configuration=sc, original_destination_connection_id=c.original_destination_connection_id)
    clock = [0.0]
    addr = ("127.0.0.1", 1)

    def pump() -> None:
        """Deliver until both sides are quiet; time moves 1 ms per idle round, so pacing and the
        ACK timers run (an in-memory link has no delay of its own)."""
        idle = 0
        while idle < 3:
            moved = False
            for a, b in ((c, s), (s, c)):
                for data, _ in a.datagrams_to_send(now=clock[0]):
                    b.receive_datagram(data, addr, now=clock[0])
                    moved = True
                timer = a.get_timer()
                if timer is not None and timer <= clock[0]:
                    a.handle_timer(now=clock[0])
            idle = 0 if moved else idle + 1
            clock[0] += 0.0001 if moved else 0.001

    c.connect(addr, now=clock[0])
    pump()
    return c, s, pump


def quic_bulk(total: int, streams: int) -> float:
    from aioquic.quic.events import StreamDataReceived

    c, s, pump = _quic_pair()
    ids = [c.get_next_available_stream_id() for _ in range(streams)]
    chunk = os.urandom(16 * 1024)
    moved = i = 0
    t0 = time.perf_counter()
    sent = 0
    while moved < total:
        if sent - moved < 64 * len(chunk):  # bounded in flight (1 MiB): aioquic buffers whatever it is given
            for _ in range(4):
                c.send_stream_data(ids[i % streams], chunk)
                sent += len(chunk)
                i += 1
        pump()
        while (ev := s.next_event()) is not None:
            if isinstance(ev, StreamDataReceived):
                moved += len(ev.data)
    return moved / (time.perf_counter() - t0) / 1e6


def quic_open(n: int) -> float:
    from aioquic.quic.events import StreamDataReceived

    c, s, pump = _quic_pair()
    t0 = time.perf_counter()
    for _ in range(n):
        sid = c.get_next_available_stream_id()
        c.send_stream_data(sid, b"127.0.0.1:22", end_stream=True)
        pump()
        while (ev := s.next_event()) is not None:
            if isinstance(ev, StreamDataReceived) and ev.data:
                s.send_stream_data(ev.stream_id, b"x", end_stream=True)
        pump()
        got = []
        while (ev := c.next_event()) is not None:
            if isinstance(ev, StreamDataReceived) and ev.data:
                got.append(ev.data)
        assert got == [b"x"], got
    return (time.perf_counter() - t0) / n * 1e6


# --------------------------------------------------------------------------- main


def _available(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        print(f"({module} not installed: `pip install {module}` to measure it)")
        return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--mib", type=int, default=256, help="MiB moved per measurement")
    ap.add_argument("--streams", default="1,8,64", help="concurrent streams sharing the link")
    ap.add_argument("--opens", type=int, default=2000, help="streams opened for the open round trip")
    args = ap.parse_args()
    total = args.mib * MiB
    streams = [int(x) for x in args.streams.split(",")]
    base = max(secretbox_only(total, 1) for _ in range(3))
    print(f"{args.mib} MiB per measurement; one core; payload MB/s (10^6 B/s), ratio to the baseline")
    print(f"{'secretbox only (today)':28s} {base:8.0f} MB/s  1.00")
    rows: list[tuple[str, Callable[[int, int], float], Callable[[int], float]]] = [
        ("ours (mux_core) + secretbox", ours_bulk, ours_open)
    ]
    if _available("h2"):
        rows.append(("h2 + secretbox", h2_bulk, h2_open))
    if _available("aioquic"):
        rows.append(("aioquic (own TLS, AES-GCM)", quic_bulk, quic_open))
    for name, bulk, opener in rows:
        for n in streams:
            # aioquic moves ~15 MB/s: one shorter run
            rate = bulk(total // 16, n) if "aioquic" in name else max(bulk(total, n) for _ in range(3))
            print(f"{name + f', {n} streams':28s} {rate:8.0f} MB/s  {rate / base:.2f}")
        print(f"{name:28s} open + first byte back: {opener(args.opens):.0f} us of CPU per stream")


if __name__ == "__main__":
    main()
