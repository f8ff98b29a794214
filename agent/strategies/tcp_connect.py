"""Connecting TCP through NATs and firewalls: sockets that share a port, connecting again and again from
one port (so a SYN of ours opens our side), and the first of several ways to get a connection."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

RETRY_GAP = 0.2
"""Seconds between connection attempts from one port (a refused SYN usually means the peer's hole is
not open yet)."""


def reuse_socket(family: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    return sock


async def first_connected(tasks: list[asyncio.Task[Any]], budget: float) -> socket.socket:
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


async def keep_connecting(local: tuple[str, int], peer: tuple[str, int], family: int, budget: float) -> socket.socket:
    """Connect from `local` to `peer` until it works or `budget` runs out (refused SYNs are retried)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + budget
    while (left := deadline - loop.time()) > 0:
        sock = reuse_socket(family)
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
