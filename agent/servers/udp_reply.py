"""A UDP server socket that answers from the address each request was sent to.

Why: a socket bound to 0.0.0.0 or [::] sends with whatever source address the kernel picks for the
route back, which on a multi-homed host (a service address on lo, a secondary or floating address,
an IPv6 host with several global addresses) is often not the address the client sent to. Every
NAT and stateful firewall drops such an answer: in another lab, no agent could register with a
server bound to the wildcard (0 of 11 scenarios connected). Mature UDP servers (coturn, unbound,
dnsmasq) do what this does: read each datagram's destination (IP_PKTINFO / IPV6_PKTINFO) and
send the answer with that address as its source.

A server's later sends to a peer (a punch request pushed to B) use the address that peer last
reached us at, remembered per peer address (bounded: the oldest is forgotten first; a forgotten
peer is answered from the kernel's choice until its next datagram, a heartbeat away).

asyncio's datagram transport has no ancillary data, so this drives the socket itself (add_reader,
recvmsg/sendmsg). A send that would block is dropped and counted, as a full socket buffer drops
UDP anyway. Linux only (IP_PKTINFO is 8 there; Python's socket module does not name it).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
_IN_PKTINFO = struct.Struct("=i4s4s")
"""struct in_pktinfo: ifindex, spec_dst (the local address), addr (the header's destination)."""
_IN6_PKTINFO = struct.Struct("=16sI")
"""struct in6_pktinfo: addr (the destination / the source to send from), ifindex."""
ANC_BUFSIZE = socket.CMSG_SPACE(_IN6_PKTINFO.size)
MAX_DATAGRAM = 65535
READS_PER_WAKEUP = 64
"""Datagrams read per readable event before other work gets the loop."""
REMEMBERED = 1 << 18
"""Peer addresses whose local address is remembered (~150 B each)."""

Cmsg = tuple[int, int, bytes]


def is_wildcard(sock: socket.socket) -> bool:
    host = sock.getsockname()[0]
    return host in ("0.0.0.0", "::")


def enable_pktinfo(sock: socket.socket) -> None:
    """Ask the kernel for each datagram's destination address."""
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
    else:
        sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)


def reply_cmsg(family: int, ancdata: list[Cmsg]) -> Cmsg | None:
    """The control message that makes an answer leave from the address this datagram came to
    (the interface is left to routing: only the source address matters), or None if the kernel
    said nothing about it."""
    for level, kind, data in ancdata:
        v6 = level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO and len(data) >= _IN6_PKTINFO.size
        v4 = level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= _IN_PKTINFO.size
        if family == socket.AF_INET6 and v6:
            addr, _ifindex = _IN6_PKTINFO.unpack_from(data)
            return (socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, _IN6_PKTINFO.pack(addr, 0))
        if family == socket.AF_INET and v4:
            _ifindex, spec_dst, _dst = _IN_PKTINFO.unpack_from(data)
            return (socket.IPPROTO_IP, IP_PKTINFO, _IN_PKTINFO.pack(0, spec_dst, bytes(4)))
    return None


class ReplyingUdp:
    """One bound UDP socket: `on_datagram(data, addr)` for each datagram, `sendto` answers from the
    right address. `on_send_error()` counts sends that failed (ICMP errors reported on the socket,
    full buffers)."""

    def __init__(
        self,
        sock: socket.socket,
        on_datagram: Callable[[bytes, Any], None],
        on_send_error: Callable[[], None],
    ) -> None:
        self.sock = sock
        self.family = sock.family
        self.on_datagram = on_datagram
        self.on_send_error = on_send_error
        self.answers_from_destination = is_wildcard(sock)
        """Only a wildcard socket needs it: one bound to an address sends from that address."""
        self._local: dict[tuple[str, int], Cmsg] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        sock.setblocking(False)
        if self.answers_from_destination:
            enable_pktinfo(sock)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        loop.add_reader(self.sock.fileno(), self._readable)

    def close(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self.sock.fileno())
            self._loop = None
        self.sock.close()

    def _readable(self) -> None:
        anc = ANC_BUFSIZE if self.answers_from_destination else 0
        for _ in range(READS_PER_WAKEUP):
            try:
                data, ancdata, _flags, addr = self.sock.recvmsg(MAX_DATAGRAM, anc)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.on_send_error()  # an ICMP error for an earlier send (a peer went away)
                continue
            if self.answers_from_destination:
                self._remember((addr[0], addr[1]), reply_cmsg(self.family, ancdata))
            self.on_datagram(data, addr)

    def _remember(self, peer: tuple[str, int], cmsg: Cmsg | None) -> None:
        if cmsg is None:
            return
        self._local.pop(peer, None)  # re-inserted: the most recently heard is forgotten last
        self._local[peer] = cmsg
        if len(self._local) > REMEMBERED:
            del self._local[next(iter(self._local))]

    def sendto(self, payload: bytes, addr: tuple[str, int], like: ReplyingUdp | None = None) -> None:
        """`like`: answer from the address the request reached on that socket (this socket's port)."""
        source = like if like is not None else self
        cmsg = source._local.get((addr[0], addr[1])) if source.answers_from_destination else None
        try:
            if cmsg is None:
                self.sock.sendto(payload, addr)
            else:
                self.sock.sendmsg([payload], [cmsg], 0, addr)
        except OSError:
            self.on_send_error()
