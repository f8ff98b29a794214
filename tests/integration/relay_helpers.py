"""Raw relay clients for the relay tests (plain sockets and asyncio streams, loopback only)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

from nacl.signing import SigningKey

from agent.proto import rendezvous_pb2 as pb
from agent.servers.relay_server import RelayConfig, RelayServer, start_relay
from agent.wire import messages
from agent.wire.frames import FrameDecoder, encode_frame
from tests.signed import ticket_for

TEST_SERVER = SigningKey(b"relay-tests-rendezvous-server-00")
"""The rendezvous server the test relays trust: every raw client here joins with its ticket."""
TEST_SERVER_PK = bytes(TEST_SERVER.verify_key)


def relay_cfg(**kw: Any) -> RelayConfig:
    """A loopback relay on an ephemeral port that honours TEST_SERVER's tickets (other fields from `kw`)."""
    kw.setdefault("binds", ["127.0.0.1"])
    kw.setdefault("port", 0)
    kw.setdefault("server_keys", [TEST_SERVER_PK])
    return RelayConfig(**kw)


def request_frame(uuid: str, key: str = "", ticket: bytes | None = None, **fields: Any) -> bytes:
    """RequestRelay as an agent sends it to the relay: with TEST_SERVER's ticket unless one is given."""
    if ticket is None:
        ticket = ticket_for(TEST_SERVER, uuid, str(fields.get("relay_server", "")))
    return encode_frame(
        messages.build(request_relay=pb.RequestRelay(uuid=uuid, licence_key=key, ticket=ticket, **fields))
    )


async def open_half(
    port: int, uuid: str, *, host: str = "127.0.0.1", extra: bytes = b"", key: str = ""
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect and send RequestRelay (+ `extra` in the same write, so usually the same segment)."""
    r, w = await asyncio.open_connection(host, port)
    w.write(request_frame(uuid, key) + extra)
    await w.drain()
    return r, w


async def open_pair(port: int, uuid: str, **kw: Any) -> tuple[Any, Any]:
    a = await open_half(port, uuid, **kw)
    b = await open_half(port, uuid, **kw)
    return a, b


async def send_all(w: asyncio.StreamWriter, total: int, seed: bytes) -> str:
    """Send `total` pseudo-random bytes, then half-close; returns their SHA-256."""
    h = hashlib.sha256()
    block = hashlib.sha256(seed).digest() * 8192 + os.urandom(4096)  # 260 KiB, not periodic in 1 MiB
    sent = 0
    while sent < total:
        chunk = block[: min(len(block), total - sent)]
        w.write(chunk)
        h.update(chunk)
        sent += len(chunk)
        await w.drain()
    w.write_eof()
    return h.hexdigest()


async def recv_all(r: asyncio.StreamReader) -> tuple[int, str]:
    h = hashlib.sha256()
    n = 0
    while True:
        chunk = await r.read(1 << 20)
        if not chunk:
            return n, h.hexdigest()
        h.update(chunk)
        n += len(chunk)


async def exchange(a: Any, b: Any, total: int) -> None:
    """`total` bytes each way at once; asserts both arrive intact."""
    (ra, wa), (rb, wb) = a, b
    sa, sb, (na, ha), (nb, hb) = await asyncio.gather(
        send_all(wa, total, b"a"), send_all(wb, total, b"b"), recv_all(rb), recv_all(ra)
    )
    assert (na, ha) == (total, sa)
    assert (nb, hb) == (total, sb)
    wa.close()
    wb.close()


async def read_to_eof(r: asyncio.StreamReader, timeout: float = 10.0) -> bytes:
    """Everything until the server closes; fails the test (TimeoutError) if it never does."""
    async with asyncio.timeout(timeout):
        return await r.read()


async def expect_closed(r: asyncio.StreamReader, timeout: float = 10.0) -> None:
    """The server closes without a word: EOF, or a reset when our unread bytes were discarded."""
    with suppress(ConnectionResetError):
        assert await read_to_eof(r, timeout) == b""


def parse_reply(data: bytes) -> Any:
    frames = FrameDecoder().feed(data)
    assert len(frames) == 1, data
    kind, sub = messages.parse(frames[0])
    return kind, sub


async def wait_for(cond: Any, timeout: float = 10.0) -> None:
    """Poll `cond()` until true (for server-side effects with no client-visible signal)."""
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.01)


# ----------------------------------------------------------------- a relay on a background loop


class ThreadedRelay:
    """A relay on its own event loop thread, for blocking clients (hypothesis tests)."""

    def __init__(self, cfg: RelayConfig) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.server: RelayServer = asyncio.run_coroutine_threadsafe(start_relay(cfg), self.loop).result(10)
        self.port = self.server.port

    def stats(self) -> dict[str, Any]:
        async def get() -> dict[str, Any]:
            return self.server.stats()

        return asyncio.run_coroutine_threadsafe(get(), self.loop).result(10)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@contextmanager
def threaded_relay(cfg: RelayConfig) -> Iterator[ThreadedRelay]:
    relay = ThreadedRelay(cfg)
    try:
        yield relay
    finally:
        relay.close()


def blocking_send_expect_close(port: int, data: bytes, *, half_close: bool = True, timeout: float = 10.0) -> bytes:
    """Send `data`, optionally shut down writing, return all the server sent before closing."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(data)
            if half_close:
                s.shutdown(socket.SHUT_WR)
        except OSError:
            return b""  # the server closed (or reset) before we were done: that is a close too
        out = bytearray()
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            out += chunk
        return bytes(out)


def blocking_pair_roundtrip(port: int, uuid: str, payload: bytes = b"ping") -> None:
    """A real pair still works: each side gets the other's payload."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as a,
        socket.create_connection(("127.0.0.1", port), timeout=10) as b,
    ):
        a.sendall(request_frame(uuid) + payload + b"-a")
        b.sendall(request_frame(uuid) + payload + b"-b")
        want = len(payload) + 2
        got_b = _recv_exactly(b, want)
        got_a = _recv_exactly(a, want)
        assert got_b == payload + b"-a"
        assert got_a == payload + b"-b"


def _recv_exactly(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def wait_listening(port: int, proc: Any, timeout: float, step: float = 0.05) -> None:
    """Block until 127.0.0.1:`port` accepts, failing with the server's stderr if `proc` exits first."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
            assert time.monotonic() < deadline
            time.sleep(step)
