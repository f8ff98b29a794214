"""Socket helpers: the dead-path timeout on session transports and relay legs."""

from __future__ import annotations

import socket

from agent.common.netutil import tune_transport


def test_tune_transport_sets_the_dead_path_timeout_on_tcp_only() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
        assert tune_transport(tcp, 12.5)
        assert tcp.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 12500
    a, b = socket.socketpair()
    with a, b:
        assert not tune_transport(a)  # AF_UNIX (a KCP stream end): nothing to tune
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        assert not tune_transport(udp)
