"""LAN direct and TCP hole punching: a TCP connection between the addresses the rendezvous
server told each side (seed 6.5 TCP path, 6.9 same-LAN path).

A (`dial`) connects from the local port of its rendezvous connection, so its NAT
reuses the mapping the server saw. B (`answer`) listens on a port, fires one short
SYN from it towards A (that opens B's NAT and firewall for A's address), tells the
server (PunchHoleSent, or LocalAddr on a LAN) from the same port, and accepts A.
The connected socket goes to the session owner, which authenticates it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from pathlib import Path
from typing import Any

from agent import addr as addrmod
from agent import ctlproto
from agent.netutil import describe_error
from agent.rendezvous_client import RendezvousError, send_local_addr, send_punch_hole_sent

SYN_TIMEOUT = 0.03
"""B's hole-opening SYN: RustDesk's 30 ms. It is expected to fail; it only has to leave B's NAT."""
RETRY_GAP = 0.2
HANDOVER_PATIENCE = 5.0


def _reuse_socket(family: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    return sock


class TcpDirectStrategy:
    """`name` is "lan" or "tcp_punch" (the same mechanics, told apart in ops and in the plan)."""

    def __init__(
        self, name: str, sessions_socket: Path, server: tuple[str, int], version: str = "punchthrough"
    ) -> None:
        self.name = name
        self.sessions_socket = sessions_socket
        self.server = server
        self.version = version
        self.attempts = 0
        self.failures = 0
        self.accepted = 0

    def status(self) -> dict[str, Any]:
        return {"attempts": self.attempts, "failures": self.failures, "accepted": self.accepted}

    async def _handover(self, sock: socket.socket, op: str, session: str, meta: dict[str, Any]) -> dict[str, Any]:
        try:
            reply = await ctlproto.acall(
                self.sessions_socket,
                {**meta, "op": op, "session": session, "path": self.name},
                [sock.fileno()],
                patience=HANDOVER_PATIENCE,
            )
        except (OSError, TimeoutError, ctlproto.ControlError) as exc:
            reply = {"ok": False, "error": f"session owner unavailable: {describe_error(exc)}"}
        finally:
            sock.close()
        if not reply.get("ok"):
            self.failures += 1
            return {"ok": False, "reason": str(reply.get("error"))}
        return {"ok": True}

    # ---- A ---------------------------------------------------------------------------------

    async def dial(
        self,
        session: str,
        peer_addr: str,
        bind: tuple[str, int] | None,
        budget: float,
        meta: dict[str, Any],
    ) -> dict[str, Any]:
        """Connect to `peer_addr` (from `bind`, with port reuse) until it answers or `budget` runs out."""
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
            result = await self._handover(sock, "transport", session, meta)
            result["elapsed_ms"] = round((time.monotonic() - started) * 1000, 1)
            return result
        self.failures += 1
        return {"ok": False, "reason": f"{self.name} to {peer_addr}: {last}"}

    # ---- B ---------------------------------------------------------------------------------

    async def answer(
        self, session: str, push: Any, my_id: str, nat_type: int, relay: str, budget: float
    ) -> dict[str, Any]:
        """Answer a PunchHole (tcp_punch) or FetchLocalAddr (lan) push and accept A's connection."""
        peer = addrmod.decode(bytes(push.socket_addr))
        family = socket.AF_INET6 if ":" in self.server[0] else socket.AF_INET
        listener = _reuse_socket(family)
        any_ip = "::" if family == socket.AF_INET6 else "0.0.0.0"
        try:
            listener.bind((any_ip, 0))
            listener.listen(4)
            port = listener.getsockname()[1]
            if self.name == "tcp_punch" and peer.port:
                await self._open_hole((any_ip, port), peer.as_tuple(), family)
                await send_punch_hole_sent(
                    self.server, bytes(push.socket_addr), my_id, relay, nat_type, self.version, bind=(any_ip, port)
                )
            else:
                await send_local_addr(
                    self.server, bytes(push.socket_addr), my_id, relay, self.version, bind=(any_ip, port)
                )
            loop = asyncio.get_running_loop()
            async with asyncio.timeout(budget):
                conn, _addr = await loop.sock_accept(listener)
        except (OSError, TimeoutError, RendezvousError) as exc:
            self.failures += 1
            return {
                "ok": False,
                "reason": f"{self.name}: {describe_error(exc) if not isinstance(exc, RendezvousError) else exc}",
            }
        finally:
            listener.close()
        self.accepted += 1
        conn.setblocking(False)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return await self._handover(conn, "respond", session, {})

    @staticmethod
    async def _open_hole(local: tuple[str, int], peer: tuple[str, int], family: int) -> None:
        sock = _reuse_socket(family)
        try:
            sock.bind(local)
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(SYN_TIMEOUT):
                    await asyncio.get_running_loop().sock_connect(sock, peer)
        finally:
            sock.close()
