"""The session owner on its own (a real one on its control socket, no strategies, no Ray)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.common import ctlproto
from agent.identity import IdentityCache, load_or_create
from agent.session.owner import SessionOwner


@pytest.fixture
async def owner(tmp_path: Path) -> AsyncIterator[tuple[SessionOwner, Path]]:
    ident = load_or_create(tmp_path / "state")
    path = tmp_path / "sessions.sock"
    so = SessionOwner(path, IdentityCache(tmp_path / "state", ident).get, lambda: None)
    await so.start()
    try:
        yield so, path
    finally:
        await so.close()


async def eof_within(sock: socket.socket, seconds: float) -> bool:
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    try:
        async with asyncio.timeout(seconds):
            return await loop.sock_recv(sock, 1) == b""
    except TimeoutError:
        return False


async def test_a_transport_that_comes_after_its_session_is_not_kept(owner: tuple[SessionOwner, Path]) -> None:
    """Issue 11's suspected leak: after `initiate` gave up, a late `transport` for that session re-created
    its queue and held the socket (a KCP connection, for udp_punch) until 256 newer sessions pushed it out."""
    _so, path = owner
    local, _far = socket.socketpair()
    reply = await ctlproto.acall(
        path, {"op": "initiate", "session": "s1", "peer": "1234567890", "target": "", "wait": 0.2}, [local.fileno()]
    )
    local.close()
    assert not reply["ok"]
    late, peer_end = socket.socketpair()
    reply = await ctlproto.acall(
        path, {"op": "transport", "session": "s1", "path": "lan", "peer_pk": bytes(32)}, [late.fileno()]
    )
    late.close()
    assert not reply["ok"] and "no longer waiting" in reply["error"]
    assert await eof_within(peer_end, 2.0), "the session owner still holds the late transport"
    peer_end.close()


async def test_a_transport_before_its_initiate_still_waits_for_it(owner: tuple[SessionOwner, Path]) -> None:
    """The other order is normal (a strategy can be faster than the coordinator's initiate): kept."""
    _so, path = owner
    early, peer_end = socket.socketpair()
    reply = await ctlproto.acall(
        path, {"op": "transport", "session": "s2", "path": "lan", "peer_pk": bytes(32)}, [early.fileno()]
    )
    early.close()
    assert reply["ok"]
    assert not await eof_within(peer_end, 0.3)
    peer_end.close()
