"""The direct-server port (RustDesk's `direct-server`, seed `is_ip_str` branch).

B listens on a TCP port; A dials ID@HOST[:PORT] and skips the rendezvous server
entirely. Unlike RustDesk this path is not plaintext: the session owner runs the
same handshake as on every other path. Nobody vouches for anyone here, so each side
needs the other's key already: A has B's pinned (from an earlier session through the
rendezvous server), and B admits only keys it has pinned or that an allow entry
names (`ID=SHA256:...`), never a bare allowed ID's first key.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from pathlib import Path
from typing import Any

from agent.common.netutil import describe_error
from agent.common.tasks import TaskSet
from agent.strategies.handover import handover

log = logging.getLogger(__name__)

MAX_HANDOVERS = 64
"""Accepted connections being handed to the session owner at once; more wait in the backlog."""


class DirectServer:
    name = "direct"

    def __init__(self, sessions_socket: Path, port: int, bind: str = "0.0.0.0") -> None:
        self.sessions_socket = sessions_socket
        self.port = port
        self.bind = bind
        self.accepted = 0
        self.failures = 0
        self._listener: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None
        self._slots = asyncio.Semaphore(MAX_HANDOVERS)
        self._seq = 0
        self._tasks = TaskSet()

    def status(self) -> dict[str, Any]:
        return {"port": self.port, "accepted": self.accepted, "failures": self.failures}

    async def start(self) -> None:
        family = socket.AF_INET6 if ":" in self.bind else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.bind, self.port))
        sock.listen(128)
        sock.setblocking(False)
        self._listener = sock
        self._task = asyncio.get_running_loop().create_task(self._accept_loop())

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
        if self._listener:
            self._listener.close()
        await self._tasks.close()

    def cancel(self, session: str) -> int:
        """Nothing to cancel: this side only accepts, and every accepted connection goes on."""
        return 0

    async def _accept_loop(self) -> None:
        assert self._listener is not None
        loop = asyncio.get_running_loop()
        while True:
            await self._slots.acquire()
            try:
                conn, addr = await loop.sock_accept(self._listener)
            except OSError as exc:
                self._slots.release()
                log.warning("direct port: accept failed: %s", describe_error(exc))
                await asyncio.sleep(0.1)
                continue
            self.accepted += 1
            self._seq += 1
            self._tasks.spawn(self._handover(conn, f"direct-{self._seq}", str(addr[0])))

    async def _handover(self, conn: socket.socket, session: str, peer_ip: str) -> None:
        try:
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # No server vouches for anyone here: only pinned keys and keys named in allow entries get in.
            meta = {"peer_ip": peer_ip}
            result = await handover(self.sessions_socket, conn, "respond", session, self.name, meta)
            if not result.ok:
                self.failures += 1
                log.info("direct port: %s", result.reason)
        finally:
            self._slots.release()
