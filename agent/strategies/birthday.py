"""Birthday probing over real sockets (asyncio shell around birthday_core): the spraying and the probing side.

`spray` is the symmetric side: many sockets, each sending an empty datagram to the cone's one
address now and every `refresh` seconds, so each holds a mapping that lets exactly that address in.
`probe` is the cone side: one socket sending empty datagrams to random ports of the symmetric
side's address. The first probe that lands on an open mapping meets; the roles then finish as a
punch does (agent/strategies/punch_schedule.py): the initiator stops at the first datagram from the
peer, the responder at the first non-empty one (the initiator's KCP SYN), answering each empty one
on the socket it came in on so the initiator learns where the mapping is.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from collections.abc import Sequence

from agent.strategies.punch_schedule import Address, PunchResult, PunchTimeout

PROBE_TICK = 0.01
"""Seconds between bursts of probes (rate x tick probes each)."""


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    ip = ipaddress.ip_address(text.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class _Inbox:
    """Datagrams from any of `socks`, as (index, data, source), through one queue."""

    def __init__(self, socks: Sequence[socket.socket]) -> None:
        self.socks = list(socks)
        self.queue: asyncio.Queue[tuple[int, bytes, Address]] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        for i, sock in enumerate(self.socks):
            sock.setblocking(False)
            self._loop.add_reader(sock.fileno(), self._readable, i)

    def _readable(self, i: int) -> None:
        for _ in range(64):
            try:
                data, addr = self.socks[i].recvfrom(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # an ICMP error for an earlier send: nothing to read
                continue
            self.queue.put_nowait((i, data, addr))

    def close(self) -> None:
        for sock in self.socks:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(sock.fileno())


async def spray(
    socks: Sequence[socket.socket], peer: tuple[str, int], *, listen: bool, seconds: float, refresh: float
) -> tuple[int, PunchResult]:
    """The symmetric side: (index of the socket that met, the punch's result); PunchTimeout after `seconds`."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    deadline = start + seconds
    peer_ip = _ip(peer[0])
    inbox = _Inbox(socks)
    sent = 0
    try:
        next_round = start
        while True:
            now = loop.time()
            if now >= deadline:
                raise PunchTimeout(
                    f"birthday spray from {len(socks)} sockets to {peer[0]}:{peer[1]}: nothing came back in "
                    f"{seconds:g} s ({sent} datagrams sent)"
                )
            if now >= next_round:
                for sock in socks:
                    with contextlib.suppress(OSError):
                        sock.sendto(b"", peer)
                        sent += 1
                next_round = now + refresh
            try:
                async with asyncio.timeout(max(0.0, min(next_round, deadline) - now)):
                    i, data, addr = await inbox.queue.get()
            except TimeoutError:
                continue
            if _ip(str(addr[0])) != peer_ip:
                continue
            if listen and not data:  # a probe met this mapping: answer from it, so the prober learns where
                with contextlib.suppress(OSError):
                    socks[i].sendto(b"", addr)
                continue
            socks[i].connect(addr[:2])
            return i, PunchResult(socks[i].getpeername(), data if listen else None, sent, loop.time() - start)
    finally:
        inbox.close()


async def probe(
    sock: socket.socket, peer_ip: str, ports: Sequence[int], rate: float, *, listen: bool, seconds: float
) -> PunchResult:
    """The cone side: send to `ports` of `peer_ip`, `rate` per second, until one answers; PunchTimeout
    after `seconds` (which should leave time after the last probe for its answer)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    deadline = start + seconds
    want = _ip(peer_ip)
    inbox = _Inbox([sock])
    per_tick = max(1, round(rate * PROBE_TICK))
    todo = list(ports)
    sent = 0
    try:
        next_tick = start
        while True:
            now = loop.time()
            if now >= deadline:
                raise PunchTimeout(
                    f"birthday probe of {peer_ip}: {sent} ports tried at {rate:g}/s, none answered in {seconds:g} s"
                )
            if todo and now >= next_tick:
                burst, todo = todo[:per_tick], todo[per_tick:]
                for port in burst:
                    with contextlib.suppress(OSError):
                        sock.sendto(b"", (peer_ip, port))
                        sent += 1
                next_tick += PROBE_TICK
            wake = min(next_tick, deadline) if todo else deadline
            try:
                async with asyncio.timeout(max(0.0, wake - now)):
                    _i, data, addr = await inbox.queue.get()
            except TimeoutError:
                continue
            if _ip(str(addr[0])) != want or (listen and not data):
                continue  # the responder waits for the initiator's first real datagram (its KCP SYN)
            sock.connect(addr[:2])
            return PunchResult(sock.getpeername(), data if listen else None, sent, loop.time() - start)
    finally:
        inbox.close()
