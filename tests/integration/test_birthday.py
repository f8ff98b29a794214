"""Birthday probing's sockets on loopback: the spraying and the probing side meet, and an agent sprays
for a peer at most once per interval (the NAT lab's tests/natlab/test_birthday.py shows it through
real NAT). Probes go only to ports this test holds or has just released: nothing else on the host
is sent to."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.strategies.birthday import probe, spray
from agent.strategies.birthday_core import Budget
from agent.strategies.punch_schedule import PunchTimeout
from agent.strategies.udp_punch import UdpPunchStrategy


def udp_socket() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.setblocking(False)
    return s


@pytest.fixture
def spray_socks() -> Iterator[list[socket.socket]]:
    socks = [udp_socket() for _ in range(16)]
    yield socks
    for s in socks:
        s.close()


def released_ports(n: int) -> list[int]:
    """Ports nothing listens on (bound, then closed): a probe there meets nobody."""
    out = []
    for _ in range(n):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            out.append(s.getsockname()[1])
    return out


@pytest.mark.parametrize("prober_initiates", [True, False])
async def test_a_probe_that_lands_on_a_sprayed_mapping_meets(
    spray_socks: list[socket.socket], prober_initiates: bool
) -> None:
    """Whichever side initiates: the initiator stops at the first datagram from the peer, the responder
    answers empty ones on the socket they came in on and stops at the first real one."""
    prober = udp_socket()
    try:
        target = spray_socks[11].getsockname()[1]
        ports = [*released_ports(40), target, *released_ports(10)]
        # Loopback filters nothing: behind a real cone the sprays are dropped until a probe opened the
        # way, so here the initiating prober is sprayed at an address it does not hold (the replies to
        # its probes still reach it: they go where the probe came from)
        aim = ("127.0.0.1", released_ports(1)[0]) if prober_initiates else prober.getsockname()
        sprayed = asyncio.ensure_future(spray(spray_socks, aim, listen=prober_initiates, seconds=5, refresh=0.5))
        probed = asyncio.ensure_future(probe(prober, "127.0.0.1", ports, 2000, listen=not prober_initiates, seconds=5))
        if prober_initiates:
            found = await probed  # the sprayed socket answered the probe
            assert found.peer_addr == ("127.0.0.1", target) and found.sent >= 41
            spray_socks[11].sendto(b"too early", prober.getsockname())  # not what the responder waits for
            prober.send(b"SYN")  # the initiator's first real datagram
            index, result = await sprayed
            assert (index, result.first_datagram) == (11, b"SYN")
        else:
            index, result = await sprayed  # the probe reached socket 11 first: the initiator stops there
            assert index == 11 and result.peer_addr == prober.getsockname()
            spray_socks[11].send(b"SYN")
            found = await probed
            assert found.first_datagram == b"SYN" and found.peer_addr == ("127.0.0.1", target)
    finally:
        prober.close()


async def test_nothing_answers_within_the_budget(spray_socks: list[socket.socket]) -> None:
    prober = udp_socket()
    try:
        with pytest.raises(PunchTimeout, match="none answered"):
            await probe(prober, "127.0.0.1", released_ports(5), 1000, listen=False, seconds=0.3)
        with pytest.raises(PunchTimeout, match="nothing came back"):
            await spray(spray_socks, prober.getsockname(), listen=True, seconds=0.3, refresh=0.1)
    finally:
        prober.close()


async def test_a_peer_gets_one_birthday_spray_per_interval(tmp_path: Path) -> None:
    """However often a peer (an admitted one: others never get this far) asks, the symmetric side
    sprays for it once per `birthday_interval`, and one at a time: the second ask sends nothing."""
    sink = udp_socket()
    strategy = UdpPunchStrategy(tmp_path / "no-owner", ("127.0.0.1", 9), birthday_budget=Budget(sockets=4, probes=1,
                                rate=1000, refresh=0.1), birthday_interval=30.0)
    peer = f"127.0.0.1:{sink.getsockname()[1]}"
    meta = {"binding_pk": b"k" * 32}
    try:
        first = await strategy._birthday(udp_socket(), "s1", peer, "spray", meta, listen=True)
        assert not first.ok and "nothing came back" in first.reason
        received = 0
        while True:
            try:
                sink.recvfrom(100)
                received += 1
            except BlockingIOError:
                break
        assert received >= 4  # every socket sent, more than once
        again = await strategy._birthday(udp_socket(), "s2", peer, "spray", meta, listen=True)
        assert not again.ok and "at most once per 30 s" in again.reason
        with pytest.raises(BlockingIOError):
            sink.recvfrom(100)
        other = await strategy._birthday(udp_socket(), "s3", peer, "spray", {"binding_pk": b"j" * 32}, listen=True)
        assert "nothing came back" in other.reason  # another peer has its own allowance
        assert strategy.status()["birthday"]["refused"] == 1
    finally:
        sink.close()
        await strategy.close()
