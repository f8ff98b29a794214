"""Small asyncio socket helpers shared by the strategies and the session owner."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import os
import socket
import struct
from collections.abc import Sequence
from typing import Any

from agent.wire.addr import split_host_port


def literal_infos(host: str, port: int, family: int = 0) -> list[tuple[int, Any]] | None:
    """[(family, sockaddr)] for an IP literal, or None for a name (and a scoped or other-family address).

    asyncio's getaddrinfo runs in a thread even for a literal: ~0.6 ms a call on an idle machine, 1-3 ms
    on a busy one, and the connect path made several (A's request to the server, B's answer to it, each
    punch's peer address): the addresses there are nearly always literals."""
    if "%" in host:
        return None
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    got = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    if family and family != got:
        return None
    return [(got, (str(ip), port, 0, 0) if ip.version == 6 else (str(ip), port))]


async def addr_infos(host: str, port: int, kind: int, family: int = 0) -> list[tuple[int, Any]]:
    """[(family, sockaddr)] for `host`: a literal at once, a name through the resolver."""
    literal = literal_infos(host, port, family)
    if literal is not None:
        return literal
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, family=family, type=kind)
    return [(i[0], i[4]) for i in infos]


async def connect_tcp(address: str, default_port: int | None = None, timeout: float = 5.0) -> socket.socket:
    """A connected non-blocking TCP socket (IPv4 or IPv6, first address that answers)."""
    host, port = split_host_port(address, default_port)
    infos = await addr_infos(host, port, socket.SOCK_STREAM)
    async with asyncio.timeout(timeout):
        return await connect_first(infos, what=address)


async def connect_first(
    infos: Sequence[tuple[int, Any]], bind: tuple[str, int] | None = None, reuse: bool = False, what: str = ""
) -> socket.socket:
    """The first of `infos` that accepts a TCP connection: non-blocking, TCP_NODELAY; from `bind` if given.

    `reuse` sets SO_REUSEADDR and SO_REUSEPORT before binding, so the same local port can punch or
    listen again (a rendezvous request's port is the one its punch leaves from). Raises the last
    address's OSError; a socket is never left open, cancelled or not."""
    loop = asyncio.get_running_loop()
    last: OSError | None = None
    for family, sockaddr in infos:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            if reuse:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if hasattr(socket, "SO_REUSEPORT"):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if bind is not None:
                sock.bind(bind)
            await loop.sock_connect(sock, sockaddr)
        except OSError as exc:
            sock.close()
            last = exc
            continue
        except BaseException:
            sock.close()
            raise
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    raise last or OSError(f"no address for {what or 'the connection'}")


async def tcp_round_trip(
    address: str, default_port: int | None = None, timeout: float = 3.0
) -> tuple[float | None, str]:
    """Milliseconds one TCP handshake with `address` takes (about one round trip), or None and why not.

    The connection is closed at once: the far side sees a connection that sends nothing.
    """
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        sock = await connect_tcp(address, default_port, timeout)
    except (OSError, TimeoutError, ValueError) as exc:
        return None, describe_error(exc)
    sock.close()
    return round((loop.time() - started) * 1000, 3), ""


def describe_error(exc: BaseException) -> str:
    """One line: 'connection refused', not "[Errno 111] Connect call failed ('127.0.0.1', 9)"."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.errno and exc.errno in errno.errorcode:
        return os.strerror(exc.errno).lower()
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


DEAD_PATH_TIMEOUT = 30.0
"""Seconds a TCP transport may go with data unacknowledged before the kernel gives up on it. Linux's
default (tcp_retries2) is about 15 minutes; with the sessions' keepalives (every 10 s of silence)
a path that died (a host moved, a NAT rebooted) ends the session within ~40 s, idle or not."""


def tune_transport(sock: socket.socket, dead_after: float = DEAD_PATH_TIMEOUT) -> bool:
    """TCP_USER_TIMEOUT on a session transport or relay leg; False when it does not apply (not TCP)."""
    if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    option = getattr(socket, "TCP_USER_TIMEOUT", None)
    if option is None:
        return False
    try:
        sock.setsockopt(socket.IPPROTO_TCP, option, int(dead_after * 1000))
    except OSError:
        return False
    return True


def reset_socket(sock: socket.socket) -> None:
    """Close with RST so the local application sees a failure, not a clean end (a truncated stream
    must never look complete)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
