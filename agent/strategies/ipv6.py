"""IPv6 direct: both sides have global addresses, so no NAT to traverse, only stateful firewalls.

Each side binds a TCP port on its global IPv6 address before the rendezvous exchange
and advertises it (socket_addr_v6 in PunchHoleRequest / PunchHoleSent, as RustDesk's
Pro server forwards). Then both connect to each other from that port at once (TCP
simultaneous open): each side's SYN opens its own firewall for the other, whatever
arrives first. B also listens on the port, for firewalls that let the SYN in.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from agent.common.netutil import describe_error
from agent.strategies.base import CANCELLED, Remote, Result
from agent.strategies.handover import handover
from agent.strategies.tcp_connect import first_connected, keep_connecting, reuse_socket
from agent.strategies.tracking import Tracked
from agent.wire import addr as addrmod

MAX_PREPARED = 64


@dataclass(frozen=True)
class Ipv6Dial:
    """Both sides: connect from the port prepared for `session` to the peer's (`peer_v6`, AddrMangle
    form); the responder also accepts on it."""

    session: str
    peer_v6: bytes
    role: str
    budget: float
    meta: dict[str, Any]


def global_v6() -> str | None:
    """A global unicast IPv6 address of this host (RustDesk's test: first group & 0xE000 == 0x2000)."""
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family != socket.AF_INET6:
                continue
            ip = ipaddress.IPv6Address(a.address.split("%", 1)[0])
            if (int(ip) >> 112) & 0xE000 == 0x2000:
                return str(ip)
    return None


class Ipv6Strategy(Tracked):
    name = "ipv6"

    def __init__(self, sessions_socket: Path) -> None:
        super().__init__()
        self.sessions_socket = sessions_socket
        self._prepared: dict[str, socket.socket] = {}
        self.attempts = 0
        self.failures = 0

    def status(self) -> dict[str, Any]:
        return {
            "address": global_v6(),
            "attempts": self.attempts,
            "failures": self.failures,
            "prepared": len(self._prepared),
        }

    def prepare(self, session: str) -> bytes:
        """Reserve a port on our global v6 address; its AddrMangle form (18 bytes), or b"" without v6."""
        ip = global_v6()
        if ip is None:
            return b""
        while len(self._prepared) >= MAX_PREPARED:
            self._prepared.pop(next(iter(self._prepared))).close()
        sock = reuse_socket(socket.AF_INET6)
        try:
            sock.bind((ip, 0))
            sock.listen(4)
        except OSError:
            sock.close()
            return b""
        self._prepared[session] = sock
        return addrmod.encode(addrmod.SockAddr.of(ip, sock.getsockname()[1]), 0)

    def cancel(self, session: str) -> int:
        self.release(session)
        return super().cancel(session)

    def release(self, session: str) -> None:
        sock = self._prepared.pop(session, None)
        if sock is not None:
            sock.close()

    async def dial(self, req: Ipv6Dial) -> Result:
        """Tracked like every attempt, so `cancel(session)` stops it (it used to run on to its budget)."""
        return await self._track(req.session, self._dial(req), CANCELLED)

    async def _dial(self, req: Ipv6Dial) -> Result:
        """Simultaneous open from our prepared port to the peer's (B also accepts on it)."""
        session, role, budget = req.session, req.role, req.budget
        self.attempts += 1
        started = time.monotonic()
        listener = self._prepared.pop(session, None)
        peer = addrmod.decode(req.peer_v6)
        if listener is None or peer.ip.version != 6 or not peer.port:
            if listener is not None:
                listener.close()
            self.failures += 1
            return Result.failed("ipv6: no address prepared on one side")
        local = listener.getsockname()[:2]
        loop = asyncio.get_running_loop()
        tasks: list[asyncio.Task[Any]] = [
            asyncio.ensure_future(keep_connecting(local, peer.as_tuple(), socket.AF_INET6, budget))
        ]
        if role == "responder":
            tasks.append(asyncio.ensure_future(loop.sock_accept(listener)))
        try:
            sock = await first_connected(tasks, budget)
        except (OSError, TimeoutError) as exc:
            self.failures += 1
            return Result.failed(f"ipv6 to {peer}: {describe_error(exc)}")
        finally:
            for task in tasks:
                task.cancel()
            listener.close()
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        op = "transport" if role == "initiator" else "respond"
        result = await handover(self.sessions_socket, sock, op, session, self.name, req.meta)
        if not result.ok:
            self.failures += 1
            return result
        return Result(True, elapsed_ms=round((time.monotonic() - started) * 1000, 1))


class Ipv6Remote(Remote):
    async def prepare(self, session: str) -> bytes:
        """Our prepared address (AddrMangle form), or b"" without a global IPv6 address."""
        return bytes(await self.ref.call("prepare", session))

    async def release(self, session: str) -> None:
        await self.ref.call("release", session)

    async def dial(self, req: Ipv6Dial) -> Result:
        return await self._result("dial", req)
