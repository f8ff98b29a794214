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
from pathlib import Path
from typing import Any

from agent.common.netutil import describe_error
from agent.rendezvous.requests import RendezvousError, send_local_addr, send_punch_hole_sent
from agent.strategies.handover import handover
from agent.strategies.tracking import Tracked
from agent.wire import addr as addrmod

RETRY_GAP = 0.2
CANCELLED: dict[str, Any] = {"ok": False, "reason": "cancelled: another path won"}


def _reuse_socket(family: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    return sock


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
    ) -> dict[str, Any]:
        result = await handover(self.sessions_socket, sock, op, session, path or self.name, meta)
        if not result["ok"]:
            self.failures += 1
        return result

    # ---- A ---------------------------------------------------------------------------------

    async def dial(self, session: str, *args: Any) -> dict[str, Any]:
        return await self._track(session, self._dial(session, *args), CANCELLED)

    async def answer(self, session: str, *args: Any) -> dict[str, Any]:
        return await self._track(session, self._answer(session, *args), CANCELLED)

    async def _dial(
        self,
        session: str,
        peer_addr: str,
        bind: tuple[str, int] | None,
        budget: float,
        meta: dict[str, Any],
        path: str = "",
    ) -> dict[str, Any]:
        """Connect to `peer_addr` (from `bind`, with port reuse) until it answers or `budget` runs out.

        `path` labels the transport for the session owner (default: this strategy's name; the
        direct-port connection uses "direct")."""
        self.attempts += 1
        started = time.monotonic()
        target = addrmod.parse_sockaddr(peer_addr)
        family = socket.AF_INET6 if target.ip.version == 6 else socket.AF_INET
        loop = asyncio.get_running_loop()
        last = "timed out"
        while (left := budget - (time.monotonic() - started)) > 0:
            sock = _reuse_socket(family)
            try:
                if bind is not None:
                    sock.bind(bind)
                async with asyncio.timeout(min(left, 2.0)):
                    await loop.sock_connect(sock, target.as_tuple())
            except (OSError, TimeoutError) as exc:
                sock.close()
                last = describe_error(exc)
                # A refused or reset SYN usually means B's hole is not open yet: try again shortly.
                await asyncio.sleep(min(RETRY_GAP, max(0.0, budget - (time.monotonic() - started))))
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            result = await self._handover(sock, "transport", session, meta, path)
            result["elapsed_ms"] = round((time.monotonic() - started) * 1000, 1)
            return result
        self.failures += 1
        return {"ok": False, "reason": f"{path or self.name} to {peer_addr}: {last}"}

    # ---- B ---------------------------------------------------------------------------------

    async def _answer(
        self,
        session: str,
        push: Any,
        my_id: str,
        nat_type: int,
        relay: str,
        budget: float,
        meta: dict[str, Any],
        socket_addr_v6: bytes = b"",
    ) -> dict[str, Any]:
        """Answer a PunchHole (tcp_punch) or FetchLocalAddr (lan) push and get A's connection.

        `meta` (who the server says asks, with which key) goes to the session owner with it."""
        peer = addrmod.decode(bytes(push.socket_addr))
        family = socket.AF_INET6 if ":" in self.server[0] else socket.AF_INET
        listener = _reuse_socket(family)
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
                tasks.append(asyncio.ensure_future(_keep_connecting((any_ip, port), peer.as_tuple(), family, budget)))
                await asyncio.sleep(0)
                await send_punch_hole_sent(
                    self.server,
                    bytes(push.socket_addr),
                    my_id,
                    relay,
                    nat_type,
                    self.version,
                    bind=(any_ip, port),
                    socket_addr_v6=socket_addr_v6,
                    answer_token=bytes(push.answer_token),
                )
            else:
                await send_local_addr(
                    self.server,
                    bytes(push.socket_addr),
                    my_id,
                    relay,
                    self.version,
                    bind=(any_ip, port),
                    answer_token=bytes(push.answer_token),
                )
            conn = await _first(tasks, budget)
        except (OSError, TimeoutError, RendezvousError) as exc:
            self.failures += 1
            text = str(exc) if isinstance(exc, RendezvousError) else describe_error(exc)
            return {"ok": False, "reason": f"{self.name}: {text}"}
        finally:
            for task in tasks:
                task.cancel()
            listener.close()
        self.accepted += 1
        conn.setblocking(False)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return await self._handover(conn, "respond", session, meta)


async def _first(tasks: list[asyncio.Task[Any]], budget: float) -> socket.socket:
    """The first connected socket among accept / simultaneous open; the others' sockets are closed."""
    pending = set(tasks)
    async with asyncio.timeout(budget):
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task.cancelled() or task.exception() is not None:
                    continue
                result = task.result()
                sock: socket.socket = result[0] if isinstance(result, tuple) else result
                for other in pending:
                    other.cancel()
                return sock
    raise TimeoutError


async def _keep_connecting(local: tuple[str, int], peer: tuple[str, int], family: int, budget: float) -> socket.socket:
    """Connect from `local` to `peer` until it works or `budget` runs out (refused SYNs are retried)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + budget
    while (left := deadline - loop.time()) > 0:
        sock = _reuse_socket(family)
        try:
            sock.bind(local)
            async with asyncio.timeout(min(left, 3.0)):
                await loop.sock_connect(sock, peer)
            return sock
        except (OSError, TimeoutError):
            sock.close()
            await asyncio.sleep(min(RETRY_GAP, max(0.0, deadline - loop.time())))
        except BaseException:
            sock.close()
            raise
    raise TimeoutError
