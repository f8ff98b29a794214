"""`connect_first` (agent/common/netutil.py), which a rendezvous request, a relay leg and a forward
target all connect through: the first address that answers wins, a refused one costs nothing but
its error, a punch's port is bound with reuse, and no socket outlives a failure or a cancel."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterator

import pytest

from agent.common.netutil import connect_first, connect_tcp
from agent.rendezvous.requests import RendezvousError, open_tcp


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    yield sock
    sock.close()


async def test_the_first_address_that_answers_wins(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    refused = (socket.AF_INET, ("127.0.0.1", closed_port()))
    sock = await connect_first([refused, (socket.AF_INET, ("127.0.0.1", port))])
    with sock:
        assert sock.getpeername() == ("127.0.0.1", port)
        assert not sock.getblocking()
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


async def test_all_refused_raises_the_last_error_and_leaks_nothing() -> None:
    before = open_fds()
    infos = [(socket.AF_INET, ("127.0.0.1", closed_port())) for _ in range(3)]
    with pytest.raises(ConnectionRefusedError):
        await connect_first(infos)
    with pytest.raises(OSError, match="no address for nowhere"):
        await connect_first([], what="nowhere")
    assert open_fds() == before


async def test_a_punch_port_is_bound_with_reuse_and_can_be_bound_again(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        local = probe.getsockname()[1]
    sock = await connect_first([(socket.AF_INET, ("127.0.0.1", port))], bind=("127.0.0.1", local), reuse=True)
    with sock, socket.socket() as again:
        assert sock.getsockname() == ("127.0.0.1", local)
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        again.bind(("127.0.0.1", local))  # what a punch or a listener on the same port does next


async def test_a_cancelled_connect_closes_its_socket() -> None:
    # a loopback listener that never accepts, its queue full: a further connect hangs in SYN_SENT
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    target = full.getsockname()
    fillers: list[socket.socket] = []
    try:
        for _ in range(8):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(target)
            fillers.append(filler)
        await asyncio.sleep(0.05)
        before = open_fds()
        task = asyncio.ensure_future(connect_first([(socket.AF_INET, target)]))
        await asyncio.sleep(0.2)
        assert not task.done(), "the connect was meant to hang"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert open_fds() == before
    finally:
        for sock in (full, *fillers):
            sock.close()


async def test_callers_keep_their_errors(listener: socket.socket) -> None:
    port = closed_port()
    with pytest.raises(RendezvousError, match=rf"rendezvous server 127.0.0.1:{port}: connection refused"):
        await open_tcp(("127.0.0.1", port), timeout=2)
    with pytest.raises(ConnectionRefusedError):
        await connect_tcp(f"127.0.0.1:{port}")
    ok = await open_tcp(("127.0.0.1", listener.getsockname()[1]), timeout=2)
    ok.close()
