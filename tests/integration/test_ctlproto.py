"""Control socket: requests, fd passing, and hostile clients that must not hurt the server."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
from pathlib import Path
from typing import Any

import pytest

from agent.common import ctlproto
from agent.common.ctlproto import ControlError, ControlServer


async def _handler(req: Any, fds: list[int]) -> Any:
    if req.get("op") == "boom":
        raise RuntimeError("handler failed")
    if req.get("op") == "echo-fd":
        with socket.socket(fileno=fds[0]) as s:
            s.sendall(b"hello through a passed fd")
        return {"ok": True}
    return {"ok": True, "echo": req, "fds": len(fds)}


@pytest.fixture
async def server(tmp_path: Path) -> Any:
    srv = ControlServer(tmp_path / "ctl.sock", _handler)
    await srv.start()
    yield srv
    await srv.close()


async def test_roundtrip_and_mode(server: ControlServer) -> None:
    assert stat.S_IMODE(os.stat(server.path).st_mode) == 0o600
    reply = await ctlproto.acall(server.path, {"op": "x", "data": b"\x00\xff"})
    assert reply == {"ok": True, "echo": {"op": "x", "data": b"\x00\xff"}, "fds": 0}


async def test_fd_passing(server: ControlServer) -> None:
    mine, theirs = socket.socketpair()
    try:
        reply = await ctlproto.acall(server.path, {"op": "echo-fd"}, [theirs.fileno()])
        theirs.close()
        assert reply == {"ok": True}
        assert mine.recv(100) == b"hello through a passed fd"
    finally:
        mine.close()


async def test_blocking_client(server: ControlServer) -> None:
    reply = await asyncio.to_thread(ctlproto.call, server.path, {"op": "y"})
    assert reply["echo"] == {"op": "y"}


async def test_handler_error_is_a_reply(server: ControlServer) -> None:
    reply = await ctlproto.acall(server.path, {"op": "boom"})
    assert reply == {"ok": False, "error": "handler failed"}


@pytest.mark.parametrize(
    "junk",
    [b"", b"\x00\x00", b"\xff\xff\xff\xff", b"\x00\x00\x00\x05\xc1\xc1\xc1\xc1\xc1", b"\x00\x00\x00\x01\x01"],
)
async def test_junk_then_still_serving(server: ControlServer, junk: bytes) -> None:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    await loop.sock_connect(sock, str(server.path))
    await loop.sock_sendall(sock, junk)
    sock.shutdown(socket.SHUT_WR)
    got = await asyncio.wait_for(loop.sock_recv(sock, 1000), 5)
    sock.close()
    if junk == b"\x00\x00\x00\x01\x01":  # valid msgpack but not a map: answered with an error
        assert ctlproto.unpack(got[4:])["ok"] is False
    else:
        assert got == b""
    assert (await ctlproto.acall(server.path, {"op": "z"}))["ok"] is True


def test_oversized_message_refused() -> None:
    with pytest.raises(ControlError):
        ctlproto.pack({"x": b"\x00" * (ctlproto.MAX_MESSAGE + 1)})
