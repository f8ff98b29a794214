"""Local control messages: msgpack over a Unix stream socket, with optional fds (SCM_RIGHTS).

One protocol serves the ops CLI (status queries), the user CLI (`pipe`/`connect`
hand over the socket of a stream) and the actors (a strategy hands its connected
transport to the session owner). A message is a 4-byte big-endian length and a
msgpack map; file descriptors ride on the first byte of a message. Bytes of a
session never pass here, only the sockets that carry them. The codec and the blocking
side live in agent/common/ctlwire.py (light, for the CLIs); this adds the asyncio side.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from agent.common.ctlwire import (
    _HEAD,
    BACKLOG,
    BACKLOG_RETRY,
    MAX_FDS,
    MAX_MESSAGE,
    ControlError,
    _split_fds,
    call,
    pack,
    recv,
    send,
    unpack,
)
from agent.common.tasks import TaskSet

__all__ = ["BACKLOG", "MAX_FDS", "MAX_MESSAGE", "ControlError", "call", "pack", "recv", "send", "unpack"]


# ---- asyncio side (actors) ------------------------------------------------------------------


async def _wait_ready(sock: socket.socket, writable: bool = False) -> None:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()
    add, remove = (loop.add_writer, loop.remove_writer) if writable else (loop.add_reader, loop.remove_reader)

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    add(sock.fileno(), ready)
    try:
        await fut
    finally:
        remove(sock.fileno())


async def arecv(sock: socket.socket) -> tuple[Any, list[int]]:
    """Async twin of `recv` for a non-blocking socket."""
    head = b""
    fds: list[int] = []
    while len(head) < 4:
        await _wait_ready(sock)
        try:
            msg, anc, _flags, _addr = sock.recvmsg(4 - len(head), socket.CMSG_SPACE(MAX_FDS * 4))
        except BlockingIOError:
            continue
        fds += _split_fds(anc)
        if not msg:
            _close_fds(fds)
            raise ControlError("control socket closed")
        head += msg
    (length,) = _HEAD.unpack(head)
    if length > MAX_MESSAGE:
        _close_fds(fds)
        raise ControlError(f"control message of {length} bytes is too large")
    loop = asyncio.get_running_loop()
    body = b""
    while len(body) < length:
        chunk = await loop.sock_recv(sock, length - len(body))
        if not chunk:
            _close_fds(fds)
            raise ControlError("control socket closed mid-message")
        body += chunk
    try:
        return unpack(body), fds
    except ControlError:
        _close_fds(fds)
        raise


async def asend(sock: socket.socket, obj: Any, fds: list[int] | tuple[int, ...] = ()) -> None:
    data = pack(obj)
    loop = asyncio.get_running_loop()
    if fds:
        while True:
            try:
                sent = socket.send_fds(sock, [data], list(fds))
                break
            except BlockingIOError:
                await _wait_ready(sock, writable=True)
        data = data[sent:]
    if data:
        await loop.sock_sendall(sock, data)


async def _connect(path: Path | str, patience: float) -> socket.socket:
    """Connect, waiting up to `patience` seconds for a restarting server to listen again.

    Nothing was sent when the connect fails, so retrying cannot duplicate a request.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + patience
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            # Not loop.sock_connect: a Unix socket's connect never is "in progress"; EAGAIN means the
            # backlog is full, which sock_connect takes for success (and the send then fails).
            while True:
                try:
                    sock.connect(str(path))
                    return sock
                except BlockingIOError:
                    await asyncio.sleep(BACKLOG_RETRY)
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            if loop.time() >= deadline:
                raise
            await asyncio.sleep(0.1)


async def acall(
    path: Path | str,
    obj: Any,
    fds: list[int] | tuple[int, ...] = (),
    timeout: float = 10.0,
    patience: float = 0.0,
) -> Any:
    """Async one request, one reply (used between actors); `patience` rides out a peer's restart."""
    sock: socket.socket | None = None
    try:
        async with asyncio.timeout(timeout):
            sock = await _connect(path, patience)
            await asend(sock, obj, fds)
            reply, extra = await arecv(sock)
        _close_fds(extra)
        return reply
    finally:
        if sock is not None:
            sock.close()


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


Handler = Callable[[Any, list[int]], Awaitable[Any]]


class ControlServer:
    """Serves one request/one reply per connection; the handler owns any fds it is given.

    A handler exception becomes {"ok": False, "error": "..."}: a bad request never
    takes the server down.
    """

    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        self.errors = 0
        self._sock: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None
        self._conns = TaskSet()

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(str(self.path))  # mode 0600: only this user may drive the agent
        finally:
            os.umask(old)
        sock.listen(BACKLOG)
        sock.setblocking(False)
        self._sock = sock
        self._task = asyncio.get_running_loop().create_task(self._accept_loop())

    async def _accept_loop(self) -> None:
        assert self._sock is not None
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(self._sock)
            conn.setblocking(False)
            self._conns.spawn(self._serve(conn))

    async def _serve(self, conn: socket.socket) -> None:
        try:
            request, fds = await asyncio.wait_for(arecv(conn), 30)
        except (ControlError, OSError, TimeoutError):
            self.errors += 1
            conn.close()
            return
        try:
            if not isinstance(request, dict):
                _close_fds(fds)
                raise ControlError("request must be a map")
            reply = await self.handler(request, fds)
        except Exception as exc:  # the handler's failure is the client's answer, not our crash
            self.errors += 1
            reply = {"ok": False, "error": str(exc) or type(exc).__name__}
        try:
            await asend(conn, reply)
        except (OSError, ControlError):
            self.errors += 1
        finally:
            conn.close()

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
        await self._conns.close()
        if self._sock:
            self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
