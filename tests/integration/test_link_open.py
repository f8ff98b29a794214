"""A stream's first bytes ride with its open (agent/link/link.py `Link.open(local=...)`): two real
Links over a socket pair, B's target connect held back so the order is visible."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest

from agent.client import loopback_pair
from agent.link.link import Link, LinkStream, StreamRefused
from agent.session.stream import StreamCodec
from agent.wire.data_channel import DataChannel


@dataclass
class Links:
    a: Link
    b: Link
    release: asyncio.Event
    """B connects its stream's target only once this is set."""
    refuse: list[str]
    """B refuses streams with this reason while it holds one."""
    target: socket.socket
    """B's end of each accepted stream is connected to this socket's peer; the test reads it."""
    accepted: list[socket.socket]


@pytest.fixture
async def links() -> AsyncIterator[Links]:
    ta, tb = socket.socketpair()
    a_to_b, b_to_a = os.urandom(32), os.urandom(32)
    release = asyncio.Event()
    refuse: list[str] = []
    accepted: list[socket.socket] = []
    server, target = loopback_pair()

    async def accept(_st: LinkStream) -> socket.socket:
        await release.wait()
        if refuse:
            raise StreamRefused(refuse[0])
        accepted.append(server)
        return server.dup()

    for s in (ta, tb):
        s.setblocking(False)
    a = Link(ta, StreamCodec(DataChannel(a_to_b, b_to_a)), dialer=True, idle=None, keepalive=0)
    b = Link(tb, StreamCodec(DataChannel(b_to_a, a_to_b)), dialer=False, accept=accept, keepalive=0)
    runs = [asyncio.ensure_future(a.run()), asyncio.ensure_future(b.run())]
    yield Links(a, b, release, refuse, target, accepted)
    a.close()
    b.close()
    await asyncio.wait(runs, timeout=2)
    for s in (server, target):
        s.close()


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def test_the_first_bytes_leave_before_the_far_end_answers(links: Links) -> None:
    client, local = loopback_pair()
    client.sendall(b"GET / HTTP/1.1\r\n\r\n")
    opening = asyncio.ensure_future(links.a.open("target:80", local=local))
    await until(lambda: bool(links.a.bytes_out == 18))  # pumped while B still connects its target
    assert not opening.done()
    links.release.set()
    st = await opening
    assert st.stats.bytes_out == 18
    links.target.setblocking(False)
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(5):
        got = b""
        while len(got) < 18:
            got += await loop.sock_recv(links.target, 100)
    assert got == b"GET / HTTP/1.1\r\n\r\n"  # held by B until its target was connected, then delivered
    await loop.sock_sendall(links.target, b"HTTP/1.1 200 OK\r\n\r\n")
    client.setblocking(False)
    async with asyncio.timeout(5):
        assert await loop.sock_recv(client, 100) == b"HTTP/1.1 200 OK\r\n\r\n"
    client.close()


async def test_a_refused_stream_resets_its_client_and_its_early_bytes_go_nowhere(links: Links) -> None:
    client, local = loopback_pair()
    client.sendall(b"secret request")
    links.refuse.append("target refused by policy")
    opening = asyncio.ensure_future(links.a.open("target:80", local=local))
    await until(lambda: bool(links.a.bytes_out))
    links.release.set()
    with pytest.raises(StreamRefused, match="target refused by policy"):
        await opening
    client.settimeout(5)
    with pytest.raises(ConnectionResetError):
        client.recv(100)  # a reset, never a clean end: the request was not served
    assert links.accepted == [] and links.b.streams == {} and links.a.streams == {}
    client.close()


async def test_without_a_local_socket_nothing_is_pumped_before_the_answer(links: Links) -> None:
    """The quiet-link probe opens this way: the client's socket stays untouched for a race."""
    opening = asyncio.ensure_future(links.a.open("target:80"))
    await asyncio.sleep(0.2)
    assert not opening.done() and links.a.bytes_out == 0
    links.release.set()
    st = await opening
    assert st.local is None
