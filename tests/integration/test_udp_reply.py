"""A rendezvous server bound to the wildcard answers UDP from the address the request was sent to
(issue 13): on a multi-homed host the kernel's own choice of source is often another address, and
every NAT drops such an answer. Loopback shows it without namespaces: 127.0.0.2 is ours, but the
kernel answers a client on 127.0.0.1 from 127.0.0.1."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from agent.proto import rendezvous_pb2 as pb
from agent.servers.rendezvous_server import start_rendezvous
from agent.servers.udp_reply import ReplyingUdp
from agent.wire import messages
from tests.agent_fixtures import has_ipv6, rendezvous_config

REQUEST = messages.build(test_nat_request=pb.TestNatRequest(padding=b"p" * 64))


def ask(family: int, dest: str, port: int, source: str) -> tuple[str, int]:
    """Send a NAT-test request to (dest, port) from `source`; where the answer came from."""
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.bind((source, 0))
        s.settimeout(3)
        s.sendto(REQUEST, (dest, port))
        reply, src = s.recvfrom(4096)
    assert messages.parse(reply)[0] == "test_nat_response"
    return src[0], src[1]


@pytest.mark.parametrize("binds", [["0.0.0.0", "::"], ["0.0.0.0"], ["::"]], ids=["default", "v4", "dual-stack"])
async def test_answers_leave_from_the_address_they_were_sent_to(tmp_path: Path, binds: list[str]) -> None:
    if "::" in binds and not has_ipv6():
        pytest.skip("no IPv6 here")
    cfg = rendezvous_config(tmp_path)
    cfg.binds = binds
    server = await start_rendezvous(cfg)
    port = server.ports["udp"]
    try:
        for dest in ("127.0.0.1", "127.0.0.2", "127.0.0.3"):
            src = await asyncio.to_thread(ask, socket.AF_INET, dest, port, "127.0.0.1")
            assert src == (dest, port), f"asked {dest}, answered from {src[0]}"
        if "::" in binds:
            src = await asyncio.to_thread(ask, socket.AF_INET6, "::1", port, "::1")
            assert src == ("::1", port)
    finally:
        await server.close()


async def test_later_sends_to_a_peer_leave_from_the_address_it_reached_us_at() -> None:
    """A punch request pushed to B goes out from the address B registered through, not the route's."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", 0))
    port = sock.getsockname()[1]
    heard: list[tuple[bytes, tuple[str, int]]] = []
    errors: list[int] = []
    udp = ReplyingUdp(sock, lambda data, addr: heard.append((data, addr)), lambda: errors.append(1))
    udp.start(loop)
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))
    peer.setblocking(False)
    try:
        peer.sendto(b"register", ("127.0.0.2", port))
        async with asyncio.timeout(3):
            while not heard:
                await asyncio.sleep(0.01)
        assert heard == [(b"register", peer.getsockname())]
        udp.sendto(b"push", peer.getsockname())  # later, unprompted
        async with asyncio.timeout(3):
            data, src = await loop.sock_recvfrom(peer, 100)
        assert (data, src) == (b"push", ("127.0.0.2", port))
        assert errors == []
    finally:
        udp.close()
        peer.close()


def test_a_socket_bound_to_an_address_is_left_to_the_kernel() -> None:
    """It already answers from its address: no ancillary data read or sent."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    udp = ReplyingUdp(sock, lambda data, addr: None, lambda: None)
    assert not udp.answers_from_destination
    udp.close()
