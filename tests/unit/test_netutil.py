"""Socket helpers: the dead-path timeout on session transports and relay legs; addresses without the resolver."""

from __future__ import annotations

import socket

from agent.common.netutil import addr_infos, literal_infos, tune_transport


def test_tune_transport_sets_the_dead_path_timeout_on_tcp_only() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
        assert tune_transport(tcp, 12.5)
        assert tcp.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 12500
    a, b = socket.socketpair()
    with a, b:
        assert not tune_transport(a)  # AF_UNIX (a KCP stream end): nothing to tune
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        assert not tune_transport(udp)


def test_literal_addresses_need_no_resolver() -> None:
    v4, v6 = socket.AF_INET, socket.AF_INET6
    assert literal_infos("198.51.100.7", 21116) == [(v4, ("198.51.100.7", 21116))]
    assert literal_infos("2001:db8::1", 5) == [(v6, ("2001:db8::1", 5, 0, 0))]
    assert literal_infos("2001:db8::1", 5, v6) == [(v6, ("2001:db8::1", 5, 0, 0))]
    # a name, a scoped address (its interface index needs the resolver), the other family: the resolver's job
    for host, family in (("rendezvous.example", 0), ("localhost", 0), ("fe80::1%eth0", 0), ("10.0.0.1", v6),
                         ("::1", v4), ("", 0), ("10.0.0.256", 0)):
        assert literal_infos(host, 1, family) is None, host


async def test_addr_infos_resolves_names_and_passes_literals() -> None:
    assert await addr_infos("127.0.0.1", 9, socket.SOCK_DGRAM) == [(socket.AF_INET, ("127.0.0.1", 9))]
    named = await addr_infos("localhost", 9, socket.SOCK_STREAM, socket.AF_INET)
    assert named and all(family == socket.AF_INET and addr[1] == 9 for family, addr in named)
