"""Local control messages, the codec and the blocking side: msgpack over a Unix stream socket, with
optional fds (SCM_RIGHTS). A module of its own so the clients (`pipe`, `connect`, the ops CLI)
start without asyncio; agent/common/ctlproto.py adds the asyncio side the actors use.

One protocol serves the ops CLI (status queries), the user CLI (`pipe`/`connect`
hand over the socket of a stream) and the actors (a strategy hands its connected
transport to the session owner). A message is a 4-byte big-endian length and a
msgpack map; file descriptors ride on the first byte of a message. Bytes of a
session never pass here, only the sockets that carry them.
"""

from __future__ import annotations

import array
import os
import socket
import struct
import time
from pathlib import Path
from typing import Any

import msgpack

MAX_MESSAGE = 1 << 20
MAX_FDS = 4
BACKLOG = 1024
"""Pending connections a control socket holds: a client with a pool of 50 opens 50 streams at once,
each one call to the coordinator and one from it to the session owner."""
BACKLOG_RETRY = 0.005
"""Seconds between connects while a server's backlog is full."""
_HEAD = struct.Struct(">I")


class ControlError(Exception):
    """The peer on the control socket broke the protocol or went away."""


def pack(obj: Any) -> bytes:
    body: bytes = msgpack.packb(obj, use_bin_type=True)
    if len(body) > MAX_MESSAGE:
        raise ControlError(f"control message of {len(body)} bytes is too large")
    return _HEAD.pack(len(body)) + body


def unpack(body: bytes) -> Any:
    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=False)
    except (ValueError, msgpack.UnpackException) as exc:
        raise ControlError(f"bad control message: {exc}") from None


def _split_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - (len(data) % arr.itemsize)])
            fds.extend(arr)
    return fds


# ---- blocking side (CLIs) -------------------------------------------------------------------


def send(sock: socket.socket, obj: Any, fds: list[int] | tuple[int, ...] = ()) -> None:
    data = pack(obj)
    if fds:
        sent = socket.send_fds(sock, [data], list(fds))
        data = data[sent:]
    if data:
        sock.sendall(data)


def recv(sock: socket.socket) -> tuple[Any, list[int]]:
    """One message and any fds that came with it; ControlError on EOF or garbage."""
    head = b""
    fds: list[int] = []
    while len(head) < 4:
        msg, anc, _flags, _addr = sock.recvmsg(4 - len(head), socket.CMSG_SPACE(MAX_FDS * 4))
        if not msg:
            raise ControlError("control socket closed")
        fds += _split_fds(anc)
        head += msg
    (length,) = _HEAD.unpack(head)
    if length > MAX_MESSAGE:
        raise ControlError(f"control message of {length} bytes is too large")
    body = b""
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        if not chunk:
            raise ControlError("control socket closed mid-message")
        body += chunk
    return unpack(body), fds


def call(path: Path | str, obj: Any, fds: list[int] | tuple[int, ...] = (), timeout: float = 10.0) -> Any:
    """One request, one reply (for ops queries)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        while True:
            try:
                sock.connect(str(path))
                break
            except BlockingIOError:  # the server's backlog is full (a burst of clients): nothing was sent
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"{path}: the agent accepts no connection (backlog full)") from None
                time.sleep(BACKLOG_RETRY)
        send(sock, obj, fds)
        reply, extra = recv(sock)
        for fd in extra:
            os.close(fd)
        return reply
