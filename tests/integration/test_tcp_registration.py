"""Registration over TCP against the real rendezvous server, when UDP to it does not get through.

The server's UDP socket is closed under it (the kernel then answers our datagrams with
port-unreachable, as a rejecting firewall does; the NAT lab's `udp-blocked` scenario covers the
silent drop). Timers are scaled down; the path's decisions are unit-tested in
tests/unit/test_registration_path.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.rendezvous.registrar import Registrar
from agent.rendezvous.registrar_core import REGISTERED
from agent.rendezvous.registration_path import RegistrationPath
from agent.rendezvous.requests import request_relay
from agent.servers.rendezvous_server import RendezvousServer, _on_udp, start_rendezvous
from agent.servers.udp_reply import ReplyingUdp
from tests.integration.test_registrar import FAST, Pushes, config, ident, signer, until


def quick_path() -> RegistrationPath:
    return RegistrationPath(tcp_after=0.3, udp_probe_every=0.3, reconnect_min=0.05, reconnect_max=0.2)


def close_udp(server: RendezvousServer) -> None:
    for udp in server._udp:
        udp.close()


def reopen_udp(server: RendezvousServer) -> None:
    """Bind the server's UDP port again (UDP gets through once more)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", server.udp_port))
    sock.setblocking(False)
    udp = ReplyingUdp(sock, _on_udp(server, 0), lambda: None)
    udp.start(server.loop)
    server._udp[0] = udp


@pytest.fixture
async def udp_blocked(tmp_path: Path) -> AsyncIterator[RendezvousServer]:
    srv = await start_rendezvous(config(tmp_path))
    close_udp(srv)
    yield srv
    await srv.close()


async def test_udp_blocked_registers_over_tcp_and_pushes_come_down_it(udp_blocked: RendezvousServer) -> None:
    server = udp_blocked
    pushes = Pushes()
    me = ident()
    reg = Registrar(("127.0.0.1", server.udp_port), me, pushes, interval=0.2, **FAST, path=quick_path())
    await reg.start()
    try:
        await asyncio.wait_for(reg.registered.wait(), 5)
        st = reg.status()
        assert (st["state"], st["transport"], st["tcp"]) == (REGISTERED, "tcp", "up")
        assert st["why_tcp"].startswith("no answer over UDP")
        peer = server.core.peers[me.peer_id]
        assert peer.tcp_conn > 0 and server.stats()["peers_online"] == 1
        task = asyncio.create_task(
            request_relay(("127.0.0.1", server.tcp_port), me.peer_id, timeout=0.5, signer=signer(me))
        )
        await pushes.wait(1)
        kind, msg, _source = pushes.items[0]
        assert (kind, msg.requester_id) == ("request_relay", me.peer_id)
        with pytest.raises(Exception, match="no relay answer"):
            await task
        # heartbeats keep it alive over the connection
        sent = reg.status()["register_peer_sent"]
        await until(lambda: reg.status()["register_peer_sent"] >= sent + 3)
        assert server.core.peers[me.peer_id].tcp_conn == peer.tcp_conn
    finally:
        await reg.close()
    await until(lambda: server.stats()["peers_online"] == 0)  # its connection ended: offline at once


@contextlib.asynccontextmanager
async def registered(server: RendezvousServer) -> AsyncIterator[tuple[Registrar, str]]:
    """A registrar (quick timers) registered with `server`; its ID."""
    me = ident()
    reg = Registrar(("127.0.0.1", server.udp_port), me, Pushes(), **FAST, path=quick_path())
    await reg.start()
    try:
        await asyncio.wait_for(reg.registered.wait(), 5)
        yield reg, me.peer_id
    finally:
        await reg.close()


async def test_a_lost_tcp_connection_is_reopened_and_registration_follows(udp_blocked: RendezvousServer) -> None:
    server = udp_blocked
    async with registered(server) as (reg, peer_id):
        first = server.core.peers[peer_id].tcp_conn
        server._conns[first].transport.abort()  # type: ignore[union-attr]
        await until(lambda: server.core.peers[peer_id].tcp_conn not in (0, first))
        await until(lambda: server.stats()["peers_online"] == 1 and reg.status()["state"] == REGISTERED)
        assert reg.status()["tcp_connects"] == 2


async def test_when_udp_answers_again_registration_moves_back_to_it(udp_blocked: RendezvousServer) -> None:
    server = udp_blocked
    async with registered(server) as (reg, peer_id):
        assert reg.status()["transport"] == "tcp"
        reopen_udp(server)
        await until(lambda: reg.status()["transport"] == "udp" and reg.status()["tcp"] == "down")
        await until(lambda: server.core.peers[peer_id].tcp_conn == 0 and server.stats()["peers_online"] == 1)
        assert reg.status()["back_to_udp"] == 1
        await until(lambda: server.stats()["tcp_connections"] == 0)
        # the server marks the peer back on UDP when the RegisterPeer arrives, before its answer
        # reaches us: wait for that answer, do not assume it came first
        await until(lambda: reg.status()["state"] == REGISTERED)
        assert reg.status()["transport"] == "udp" and reg.status()["tcp_connects"] == 1


async def test_an_answering_server_is_never_registered_over_tcp(tmp_path: Path) -> None:
    srv = await start_rendezvous(config(tmp_path))
    reg = Registrar(("127.0.0.1", srv.udp_port), ident(), Pushes(), **FAST, path=quick_path())
    try:
        await reg.start()
        await asyncio.wait_for(reg.registered.wait(), 5)
        await asyncio.sleep(1.0)
        st = reg.status()
        assert (st["transport"], st["tcp_connects"], srv.stats()["tcp_connections"]) == ("udp", 0, 0)
    finally:
        await reg.close()
        await srv.close()
