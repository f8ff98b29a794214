"""LAN direct and TCP hole punching: a TCP connection between the addresses the rendezvous
server told each side (seed 6.5 TCP path, 6.9 same-LAN path).

A (`dial`) connects from the local port of its rendezvous connection, so its NAT
reuses the mapping the server saw. B (`answer`) listens on a port and, from the
same port, keeps connecting to A (the first SYN opens B's NAT and firewall for A's
address) while it tells the server (PunchHoleSent, or LocalAddr on a LAN); A's SYN
then meets B's (TCP simultaneous open) or reaches B's listener. RustDesk sends one
30 ms SYN and then only listens; a NAT that tracks TCP sequence numbers (Linux
conntrack does) drops the listener's SYN-ACK, which the lab showed.
The connected socket goes to the session owner, which authenticates it.
"""

from __future__ import annotations

import asyncio
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.common.netutil import describe_error
from agent.rendezvous.requests import RendezvousError, Reply, send_local_addr, send_punch_hole_sent
from agent.strategies.base import CANCELLED, Answer, Remote, Result
from agent.strategies.handover import handover
from agent.strategies.tcp_connect import RETRY_GAP, first_connected, keep_connecting, reuse_socket
from agent.strategies.tracking import Tracked
from agent.wire import addr as addrmod


@dataclass(frozen=True)
class TcpDial:
    """A's connection to `peer_addr` from `bind` (its rendezvous connection's port, so its NAT reuses
    the mapping the server saw), for `budget` seconds. `path` labels the transport for the session
    owner (default: the strategy's name; the direct-port dial says "direct")."""

    session: str
    peer_addr: str
    bind: tuple[str, int] | None
    budget: float
    meta: dict[str, Any]
    path: str = ""


class TcpDirectStrategy(Tracked):
    """`name` is "lan" or "tcp_punch" (the same mechanics, told apart in ops and in the plan)."""

    def __init__(
        self, name: str, sessions_socket: Path, server: tuple[str, int], version: str = "punchthrough"
    ) -> None:
        super().__init__()
        self.name = name
        self.sessions_socket = sessions_socket
        self.server = server
        self.version = version
        self.attempts = 0
        self.failures = 0
        self.accepted = 0

    def status(self) -> dict[str, Any]:
        return {"attempts": self.attempts, "failures": self.failures, "accepted": self.accepted}

    async def _handover(
        self, sock: socket.socket, op: str, session: str, meta: dict[str, Any], path: str = ""
    ) -> Result:
        result = await handover(self.sessions_socket, sock, op, session, path or self.name, meta)
        if not result.ok:
            self.failures += 1
        return result

    # ---- A ---------------------------------------------------------------------------------

    async def dial(self, req: TcpDial) -> Result:
        return await self._track(req.session, self._dial(req), CANCELLED)

    async def answer(self, req: Answer) -> Result:
        return await self._track(req.session, self._answer(req), CANCELLED)

    async def _dial(self, req: TcpDial) -> Result:
        """Connect to the peer (with port reuse) until it answers or the budget runs out."""
        session, peer_addr, budget, path = req.session, req.peer_addr, req.budget, req.path
        self.attempts += 1
        started = time.monotonic()
        target = addrmod.parse_sockaddr(peer_addr)
        family = socket.AF_INET6 if target.ip.version == 6 else socket.AF_INET
        loop = asyncio.get_running_loop()
        last = "timed out"
        while (left := budget - (time.monotonic() - started)) > 0:
            sock = reuse_socket(family)
            try:
                if req.bind is not None:
                    sock.bind(req.bind)
                async with asyncio.timeout(min(left, 2.0)):
                    await loop.sock_connect(sock, target.as_tuple())
            except (OSError, TimeoutError) as exc:
                sock.close()
                last = describe_error(exc)
                # A refused or reset SYN usually means B's hole is not open yet: try again shortly.
                await asyncio.sleep(min(RETRY_GAP, max(0.0, budget - (time.monotonic() - started))))
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            result = await self._handover(sock, "transport", session, req.meta, path)
            return Result(result.ok, result.reason, round((time.monotonic() - started) * 1000, 1))
        self.failures += 1
        return Result.failed(f"{path or self.name} to {peer_addr}: {last}")

    # ---- B ---------------------------------------------------------------------------------

    async def _answer(self, req: Answer) -> Result:
        """Answer a PunchHole (tcp_punch) or FetchLocalAddr (lan) push and get A's connection."""
        session, push, budget, meta = req.session, req.push, req.budget, req.meta
        peer = addrmod.decode(bytes(push.socket_addr))
        family = socket.AF_INET6 if ":" in self.server[0] else socket.AF_INET
        listener = reuse_socket(family)
        any_ip = "::" if family == socket.AF_INET6 else "0.0.0.0"
        loop = asyncio.get_running_loop()
        tasks: list[asyncio.Task[socket.socket]] = []
        try:
            listener.bind((any_ip, 0))
            listener.listen(4)
            port = listener.getsockname()[1]
            tasks.append(asyncio.ensure_future(loop.sock_accept(listener)))  # type: ignore[arg-type]
            if self.name == "tcp_punch" and peer.port:
                # Our SYN leaves first: it opens our NAT for A, and keeps connecting so that A's SYN
                # meets it (simultaneous open). A NAT that tracks TCP sequence numbers would refuse
                # a listener's SYN-ACK here, since it answers with another initial sequence number.
                tasks.append(asyncio.ensure_future(keep_connecting((any_ip, port), peer.as_tuple(), family, budget)))
                await asyncio.sleep(0)
                reply = Reply.to(push, req.my_id, req.relay, self.version, req.socket_addr_v6)
                await send_punch_hole_sent(
                    self.server, reply, req.nat_type, bind=(any_ip, port), nat_behavior=req.nat_behavior
                )
            else:
                reply = Reply.to(push, req.my_id, req.relay, self.version)
                await send_local_addr(self.server, reply, bind=(any_ip, port))
            conn = await first_connected(tasks, budget)
        except (OSError, TimeoutError, RendezvousError) as exc:
            self.failures += 1
            text = str(exc) if isinstance(exc, RendezvousError) else describe_error(exc)
            return Result.failed(f"{self.name}: {text}")
        finally:
            for task in tasks:
                task.cancel()
            listener.close()
        self.accepted += 1
        conn.setblocking(False)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return await self._handover(conn, "respond", session, meta)


class TcpDirectRemote(Remote):
    async def dial(self, req: TcpDial) -> Result:
        return await self._result("dial", req)

    async def answer(self, req: Answer) -> Result:
        return await self._result("answer", req)
