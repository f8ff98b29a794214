"""A's and B's TCP requests against the real rendezvous server, with B registered by the Registrar."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from agent.proto import rendezvous_pb2 as pb
from agent.rendezvous.registrar import Registrar
from agent.rendezvous.requests import (
    PeerUnavailable,
    RelayRefused,
    RendezvousError,
    Reply,
    Signer,
    punch_hole_exchange,
    punch_hole_request,
    request_relay,
    send_local_addr,
    send_punch_hole_sent,
    send_relay_response,
)
from agent.servers.rendezvous_server import RendezvousServer, start_rendezvous
from agent.wire import addr as addrmangle
from agent.wire import messages
from agent.wire.addr import SockAddr
from agent.wire.frames import encode_frame
from agent.wire.keys import open_signed_id_pk
from tests.integration.test_nat_probe import FakeTcpServer
from tests.integration.test_registrar import FAST, Pushes, config, ident, signer


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[RendezvousServer]:
    srv = await start_rendezvous(config(tmp_path))
    yield srv
    await srv.close()


@pytest.fixture
async def a(server: RendezvousServer) -> AsyncIterator[Signer]:
    """A, registered: its requests are signed for an ID the server has bound to its key."""
    me = ident()
    reg = Registrar(("127.0.0.1", server.udp_port), me, Pushes(), **FAST)
    await reg.start()
    await asyncio.wait_for(reg.registered.wait(), 5)
    yield signer(me)
    await reg.close()


class PeerB:
    """A registered peer B whose answer to each push is decided by the test."""

    def __init__(self, server: RendezvousServer, nat_type: int = pb.ASYMMETRIC) -> None:
        self.id = ident()
        self.main = ("127.0.0.1", server.tcp_port)
        self.pushes: list[tuple[str, Any]] = []
        self.answer: Callable[[str, Any], Awaitable[None]] | None = None
        self.done = asyncio.Event()
        self.result: Any = None
        self.reg = Registrar(("127.0.0.1", server.udp_port), self.id, self._on_push, lambda: nat_type, **FAST)

    async def _on_push(self, kind: str, msg: Any, source: tuple[str, int]) -> None:
        self.pushes.append((kind, msg))
        if self.answer is not None:
            await self.answer(kind, msg)
        self.done.set()

    async def __aenter__(self) -> PeerB:
        await self.reg.start()
        await asyncio.wait_for(self.reg.registered.wait(), 5)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.reg.close()


async def answer_relay(b: PeerB, msg: Any, relay: str = "", refuse_reason: str = "") -> None:
    """B's RelayResponse to a relay push, with the push's token."""
    await send_relay_response(b.main, Reply.to(msg, b.id.peer_id, relay, "1.0"), msg.uuid, refuse_reason=refuse_reason)


def signed_key(server: RendezvousServer, signed: bytes) -> tuple[str, bytes]:
    return open_signed_id_pk(bytes(server.core.key.verify_key), signed)


# --------------------------------------------------------------------------- relay


async def test_request_relay_answered_by_b(server: RendezvousServer, a: Signer) -> None:
    async with PeerB(server) as b:

        async def answer(kind: str, msg: Any) -> None:
            assert kind == "request_relay"
            await answer_relay(b, msg, msg.relay_server)

        b.answer = answer
        rr = await request_relay(
            b.main, b.id.peer_id, "pair-uuid-1", relay_server="relay.example:21117", timeout=5, signer=a
        )
    assert rr.uuid == b.pushes[0][1].uuid != "pair-uuid-1"  # the server's uuid and relay, whatever A asked
    assert rr.relay_server == "" and rr.ticket == b.pushes[0][1].ticket
    assert rr.WhichOneof("union") == "pk"
    assert signed_key(server, rr.pk) == (b.id.peer_id, b.id.public_key)
    assert not rr.socket_addr  # the server does not show A its own address
    _kind, push = b.pushes[0]
    assert push.secure is True and push.id == b.id.peer_id


async def test_request_relay_refused_by_b(server: RendezvousServer, a: Signer) -> None:
    async with PeerB(server) as b:

        async def answer(kind: str, msg: Any) -> None:
            await answer_relay(b, msg, refuse_reason="busy")

        b.answer = answer
        with pytest.raises(RelayRefused, match=f"^peer {b.id.peer_id} refused: busy$") as info:
            await request_relay(b.main, b.id.peer_id, timeout=5, signer=a)
    assert info.value.reason == "busy"


async def test_request_relay_unknown_peer(server: RendezvousServer, a: Signer) -> None:
    with pytest.raises(RelayRefused, match=r"^peer 9999999999 does not exist$"):
        await request_relay(("127.0.0.1", server.tcp_port), "9999999999", timeout=5, signer=a)


async def test_unsigned_requests_are_refused_with_the_reason(server: RendezvousServer) -> None:
    main = ("127.0.0.1", server.tcp_port)
    with pytest.raises(RelayRefused, match="only signed requests"):
        await request_relay(main, "9999999999", timeout=5)
    with pytest.raises(RendezvousError, match="only signed requests"):
        await punch_hole_request(main, "9999999999", 0, timeout=5)


async def test_request_relay_times_out_when_b_is_silent(server: RendezvousServer, a: Signer) -> None:
    async with PeerB(server) as b:
        with pytest.raises(RendezvousError, match=f"^no relay answer from peer {b.id.peer_id} via .* within 0.3 s$"):
            await request_relay(b.main, b.id.peer_id, timeout=0.3, signer=a)
        assert b.pushes and b.pushes[0][0] == "request_relay"


# --------------------------------------------------------------------------- punch hole


async def test_same_lan_gets_fetch_local_addr_and_is_local_answer(server: RendezvousServer, a: Signer) -> None:
    async with PeerB(server) as b:
        listen_on: list[SockAddr] = []

        async def answer(kind: str, msg: Any) -> None:
            assert kind == "fetch_local_addr"
            local = await send_local_addr(b.main, Reply.to(msg, b.id.peer_id, msg.relay_server, "1.0"))
            listen_on.append(local)

        b.answer = answer
        result = await punch_hole_exchange(b.main, b.id.peer_id, pb.ASYMMETRIC, timeout=5, signer=a)
    resp = result.response
    assert isinstance(resp, pb.PunchHoleResponse)
    assert resp.is_local is True
    assert addrmangle.decode(resp.socket_addr) == listen_on[0]
    assert signed_key(server, resp.pk) == (b.id.peer_id, b.id.public_key)
    # B was told where A's request came from
    assert addrmangle.decode(b.pushes[0][1].socket_addr) == result.local_address
    assert result.elapsed > 0


async def test_same_lan_udp_request_is_answered_at_once_and_only_the_tcp_one_reaches_b(
    server: RendezvousServer, a: Signer
) -> None:
    """On one LAN a UDP punch is not needed: its request is answered at once (is_local, no address),
    which the client passes on as an answer, not as "peer does not exist"; B hears of A once."""
    async with PeerB(server) as b:
        result = await punch_hole_exchange(b.main, b.id.peer_id, pb.ASYMMETRIC, udp_port=40000, timeout=5, signer=a)
        resp = result.response
        assert isinstance(resp, pb.PunchHoleResponse)
        assert (resp.is_local, resp.is_udp, resp.socket_addr) == (True, False, b"")
        await asyncio.sleep(0.2)
        assert b.pushes == []
    # the same bare is_local answer to a TCP request (no udp_port) is no answer: the peer is unavailable
    bare = messages.build(punch_hole_response=pb.PunchHoleResponse(is_local=True))
    async with FakeTcpServer(_fake_handler(encode_frame(bare), False)) as srv:
        with pytest.raises(PeerUnavailable):
            await punch_hole_request(("127.0.0.1", srv.port), "1234567890", 0, timeout=2)


async def test_punch_hole_from_another_address_and_punch_hole_sent(server: RendezvousServer, a: Signer) -> None:
    """A on 127.0.0.2 looks like another host to the server: B gets a PunchHole."""
    async with PeerB(server, nat_type=pb.ASYMMETRIC) as b:
        b_local: list[SockAddr] = []

        async def answer(kind: str, msg: Any) -> None:
            assert kind == "punch_hole"
            reply = Reply.to(msg, b.id.peer_id, msg.relay_server, "1.0")
            local = await send_punch_hole_sent(b.main, reply, pb.ASYMMETRIC)
            b_local.append(local)

        b.answer = answer
        result = await punch_hole_exchange(
            b.main, b.id.peer_id, pb.SYMMETRIC, udp_port=40000, timeout=5, bind=("127.0.0.2", 0), signer=a
        )
    resp = result.response
    assert isinstance(resp, pb.PunchHoleResponse)
    assert resp.WhichOneof("union") == "nat_type" and resp.nat_type == pb.ASYMMETRIC
    assert addrmangle.decode(resp.socket_addr) == b_local[0]
    assert signed_key(server, resp.pk)[0] == b.id.peer_id
    _kind, push = b.pushes[0]
    assert push.nat_type == pb.SYMMETRIC and push.udp_port == 40000
    assert addrmangle.decode(push.socket_addr) == result.local_address
    assert result.local_address.host == "127.0.0.2"
    # The request's port is free for A to punch from again (SO_REUSEADDR/SO_REUSEPORT).
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(result.local_address.as_tuple())


async def test_forced_relay_answer_is_a_relay_response(server: RendezvousServer, a: Signer) -> None:
    async with PeerB(server) as b:

        async def answer(kind: str, msg: Any) -> None:
            assert kind == "request_relay"
            await answer_relay(b, msg, msg.relay_server)

        b.answer = answer
        resp = await punch_hole_request(b.main, b.id.peer_id, pb.ASYMMETRIC, force_relay=True, timeout=5, signer=a)
    assert isinstance(resp, pb.RelayResponse)
    assert resp.uuid == b.pushes[0][1].uuid != ""
    assert signed_key(server, resp.pk)[0] == b.id.peer_id


async def test_punch_failures_are_one_line_errors(server: RendezvousServer, a: Signer) -> None:
    main = ("127.0.0.1", server.tcp_port)
    with pytest.raises(PeerUnavailable, match=r"^peer 9999999999 does not exist$") as info:
        await punch_hole_request(main, "9999999999", pb.ASYMMETRIC, timeout=5, signer=a)
    assert info.value.failure == pb.PunchHoleResponse.ID_NOT_EXIST
    async with PeerB(server) as b:
        with pytest.raises(PeerUnavailable, match=r"^key mismatch") as info:
            await punch_hole_request(
                main, b.id.peer_id, pb.ASYMMETRIC, licence_key="not-the-key", timeout=5, signer=a
            )
        assert info.value.failure == pb.PunchHoleResponse.LICENSE_MISMATCH
        assert b.pushes == []
        # the right key is accepted (B is silent here, so the request times out instead)
        with pytest.raises(RendezvousError, match="no answer about peer"):
            await punch_hole_request(main, b.id.peer_id, 0, licence_key=server.public_key_b64, timeout=0.2, signer=a)


async def test_offline_peer(tmp_path: Path) -> None:
    """A peer the server knows from its database but that has not registered since a restart."""
    srv = await start_rendezvous(config(tmp_path))
    async with PeerB(srv) as b:
        pass
    await srv.close()
    srv = await start_rendezvous(config(tmp_path))
    main = ("127.0.0.1", srv.tcp_port)
    me = ident()
    reg = Registrar(("127.0.0.1", srv.udp_port), me, Pushes(), **FAST)
    try:
        await reg.start()
        await asyncio.wait_for(reg.registered.wait(), 5)
        with pytest.raises(PeerUnavailable, match=f"^peer {b.id.peer_id} is offline$") as info:
            await punch_hole_request(main, b.id.peer_id, pb.ASYMMETRIC, timeout=5, signer=signer(me))
        assert info.value.failure == pb.PunchHoleResponse.OFFLINE
        with pytest.raises(RelayRefused, match=f"^peer {b.id.peer_id} is offline$"):
            await request_relay(main, b.id.peer_id, timeout=5, signer=signer(me))
    finally:
        await reg.close()
        await srv.close()


async def test_silent_peer_gets_the_request_resent_then_times_out(server: RendezvousServer, a: Signer) -> None:
    async with PeerB(server) as b:
        with pytest.raises(RendezvousError, match=f"^no answer about peer {b.id.peer_id} from .* within 0.6 s$"):
            await punch_hole_request(
                b.main, b.id.peer_id, pb.ASYMMETRIC, timeout=0.6, resend_after=(0.05, 0.05), signer=a
            )
    assert server.stats()["messages"]["tcp.punch_hole_request"] == 3
    assert server.stats()["events"].get("request_replayed", 0) == 0  # each resend is signed afresh


# --------------------------------------------------------------------------- broken servers


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_server_down() -> None:
    down = ("127.0.0.1", closed_port())
    msg = f"^rendezvous server 127.0.0.1:{down[1]}: connection refused$"
    with pytest.raises(RendezvousError, match=msg):
        await punch_hole_request(down, "1234567890", 0, timeout=2)
    with pytest.raises(RendezvousError, match=msg):
        await request_relay(down, "1234567890", "u", timeout=2)
    with pytest.raises(RendezvousError, match=msg):
        await send_relay_response(down, Reply(b"", "1234567890", "", "1.0"), "u")
    with pytest.raises(RendezvousError, match=msg):
        await send_punch_hole_sent(down, Reply(b"", "1234567890", "", "1.0"), 0)


def _fake_handler(reply: bytes, close: bool) -> Any:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        writer.write(reply)
        await writer.drain()
        if not close:
            await reader.read()

    return handle


@pytest.mark.parametrize(
    ("reply", "close", "expect"),
    [
        (b"", True, "closed the connection without answering"),
        (b"\x10\xff\xff\xff\xff", False, "unreadable answer"),
        (b"\xff\xff\xff\xff", False, "exceeds the limit"),
        (b"\x00\x00\x0c\xa2\x01\x00", True, "closed the connection without answering"),  # heartbeats, a TestNat
    ],
)
async def test_hostile_or_broken_servers(reply: bytes, close: bool, expect: str) -> None:
    async with FakeTcpServer(_fake_handler(reply, close)) as srv:
        where = ("127.0.0.1", srv.port)
        with pytest.raises(RendezvousError, match=expect):
            await punch_hole_request(where, "1234567890", 0, timeout=2)
        with pytest.raises(RendezvousError, match=expect):
            await request_relay(where, "1234567890", "u", timeout=2)

