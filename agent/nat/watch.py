"""Reading this host's network view (the I/O half of agent/nat/watch_core.py).

Polled by the registrar on its 1 s tick rather than subscribed to over netlink: two cheap system
calls (a route lookup through an unsent UDP `connect`, and `getifaddrs`), portable, and a second
is well inside the heartbeat interval the server already tolerates.
"""

from __future__ import annotations

import socket

import psutil

from agent.nat.watch_core import NetView, usable_addresses


def route_source(server_ip: str, family: int) -> str:
    """The local address the kernel would send from towards the server ("" without a route).

    `connect` on a UDP socket only looks the route up; nothing is sent.
    """
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.connect((server_ip, 9))
            return str(sock.getsockname()[0])
    except OSError:
        return ""


def interface_addresses() -> list[str]:
    """Every IPv4/IPv6 address on the host's interfaces, unfiltered."""
    out: list[str] = []
    try:
        table = psutil.net_if_addrs()
    except OSError:
        return out
    for entries in table.values():
        out += [e.address for e in entries if e.family in (socket.AF_INET, socket.AF_INET6)]
    return out


def observe_view(server_ip: str, family: int) -> NetView:
    return NetView(route_source(server_ip, family), usable_addresses(interface_addresses()))
