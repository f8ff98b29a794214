"""Registrar against the real rendezvous server on loopback: register, pushes, restarts, ID conflicts."""

from __future__ import annotations

import asyncio
import secrets
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from nacl.signing import SigningKey

from agent import identity as identitymod
from agent.nat.watch import observe_view, route_source
from agent.nat.watch_core import NetView, NetworkChanged
from agent.proto import rendezvous_pb2 as pb
from agent.rendezvous.registrar import Registrar, RegistrarError
from agent.rendezvous.registrar_core import REGISTERED, UNREACHABLE
from agent.rendezvous.requests import Signer
from agent.servers.rendezvous_server import RendezvousConfig, RendezvousServer, start_rendezvous
from agent.wire import messages
from agent.wire.peer_ids import derive_id, fingerprint

FAST: dict[str, Any] = {"tick": 0.02, "reply_timeout": 0.1, "max_backoff": 0.2}
"""Registrar timers scaled down so a test sees resends and back-off in a fraction of a second."""


@dataclass
class FakeIdentity:
    """What the registrar needs of an identity: a key, and the ID derived from it (or one claimed)."""

    signing_key: SigningKey
    uuid: bytes
    salt: int = 0
    claimed: str = ""

    @property
    def peer_id(self) -> str:
        return self.claimed or derive_id(self.public_key, self.salt)

    @property
    def public_key(self) -> bytes:
        return bytes(self.signing_key.verify_key)


def ident(claimed: str = "") -> FakeIdentity:
    return FakeIdentity(SigningKey.generate(), secrets.token_bytes(16), claimed=claimed)


def signer(me: FakeIdentity) -> Signer:
    """Requests signed by `me` (registered): A asking for itself is enough to make the server push."""
    return Signer(me.peer_id, me.signing_key)


@pytest.fixture
def ids_collide(monkeypatch: pytest.MonkeyPatch) -> None:
    """The server takes any ID as derived from any key: two keys can then want one ID (a collision,
    or a squatter who spent 2^33 hashes on it), which is what UUID_MISMATCH / KEY_MISMATCH are for."""

    class AnyId(str):
        def __ne__(self, other: object) -> bool:
            return False

    monkeypatch.setattr("agent.servers.rendezvous_core.derive_id", lambda pk, salt: AnyId())


def config(tmp_path: Path, host: str = "127.0.0.1", port: int = 0, nat_port: int | None = None) -> RendezvousConfig:
    """`nat_port` for a restart on the same ports: port-1 (the default) is often taken by then."""
    return RendezvousConfig(port=port, binds=[host], db_path=tmp_path / "peers.db", key_file=tmp_path / "id_ed25519",
                            nat_test_port=nat_port)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[RendezvousServer]:
    srv = await start_rendezvous(config(tmp_path))
    yield srv
    await srv.close()


class Pushes:
    """on_push that records (kind, message, source) and wakes waiters."""

    def __init__(self) -> None:
        self.items: list[tuple[str, Any, tuple[str, int]]] = []
        self.event = asyncio.Event()

    def __call__(self, kind: str, msg: Any, source: tuple[str, int]) -> None:
        self.items.append((kind, msg, source))
        self.event.set()

    async def wait(self, n: int = 1, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while len(self.items) < n:
                self.event.clear()
                await self.event.wait()


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.01)


async def test_registers_and_announces_nat_type(server: RendezvousServer) -> None:
    me = ident()
    reg = Registrar(("127.0.0.1", server.udp_port), me, Pushes(), lambda: pb.ASYMMETRIC, interval=0.2, **FAST)
    await reg.start()
    try:
        await asyncio.wait_for(reg.registered.wait(), 5)
        await until(lambda: reg.status()["register_peer_sent"] >= 2)
        peer = server.core.peers[me.peer_id]
        assert peer.pk == me.public_key and peer.uuid == me.uuid
        assert peer.nat_type == pb.ASYMMETRIC
        assert server.stats()["peers_online"] == 1
        st = reg.status()
        assert st["state"] == REGISTERED
        assert st["id"] == me.peer_id
        assert st["replies"] >= 2 and st["drops"] == {}
        assert st["local"] == reg.local_address
        assert st["last_reply_age"] is not None
    finally:
        await reg.close()
    assert not reg.registered.is_set()


async def test_ipv6_server(tmp_path: Path) -> None:
    srv = await start_rendezvous(config(tmp_path, "::1"))
    reg = Registrar(("::1", srv.udp_port), ident(), Pushes(), **FAST)
    try:
        await reg.start()
        await asyncio.wait_for(reg.registered.wait(), 5)
        assert reg.local_address is not None and ":" in reg.local_address[0]
    finally:
        await reg.close()
        await srv.close()


async def test_pushes_reach_the_callback_and_foreign_datagrams_do_not(server: RendezvousServer) -> None:
    pushes = Pushes()
    me = ident()
    reg = Registrar(("127.0.0.1", server.udp_port), me, pushes, **FAST)
    await reg.start()
    try:
        await asyncio.wait_for(reg.registered.wait(), 5)
        assert reg.local_address is not None
        # Somebody else fakes a push: dropped, counted, never delivered.
        fake = messages.build(punch_hole=pb.PunchHole(relay_server="evil:1"))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(fake, reg.local_address)
            s.sendto(b"\xff garbage", reg.local_address)
        await until(lambda: reg.status()["drops"].get("foreign_source", 0) == 2)
        # ... even from the server's own address (a spoofed source): it is not signed for us
        server_side = server._udp[0]
        server_side.sendto(fake, reg.local_address)
        await until(lambda: reg.status()["drops"].get("unsigned_push", 0) == 1)
        # A real push: A asks the server for a relay to us; the server forwards over UDP.
        from agent.rendezvous.requests import request_relay

        task = asyncio.create_task(
            request_relay(("127.0.0.1", server.tcp_port), me.peer_id, timeout=0.5, signer=signer(me))
        )
        await pushes.wait(1)
        kind, msg, source = pushes.items[0]
        assert kind == "request_relay"
        assert (msg.requester_id, msg.requester_pk) == (me.peer_id, me.public_key)
        assert source == ("127.0.0.1", server.udp_port)
        with pytest.raises(Exception, match="no relay answer"):
            await task
        assert reg.status()["pushes_received"] == 1
    finally:
        await reg.close()


async def test_async_and_failing_push_handlers(server: RendezvousServer) -> None:
    seen: list[str] = []

    async def handler(kind: str, msg: Any, source: tuple[str, int]) -> None:
        await asyncio.sleep(0)
        seen.append("boom" if not seen else "fine")
        if seen[-1] == "boom":
            raise RuntimeError("handler bug")

    me = ident()
    reg = Registrar(("127.0.0.1", server.udp_port), me, handler, **FAST)
    await reg.start()
    try:
        await asyncio.wait_for(reg.registered.wait(), 5)
        from agent.rendezvous.requests import request_relay

        for _ in ("boom", "fine"):
            with pytest.raises(Exception, match="no relay answer"):
                await request_relay(("127.0.0.1", server.tcp_port), me.peer_id, timeout=0.2, signer=signer(me))
        await until(lambda: len(seen) == 2)
        await until(lambda: reg.status()["push_errors"] == 1)
        assert seen == ["boom", "fine"]
        assert reg.status()["state"] == REGISTERED  # the loop survived the failing handler
    finally:
        await reg.close()


async def test_server_down_then_restarted_on_the_same_port(tmp_path: Path) -> None:
    srv = await start_rendezvous(config(tmp_path))
    port, nat_port = srv.udp_port, srv.nat_port
    me = ident()
    reg = Registrar(("127.0.0.1", port), me, Pushes(), interval=0.1, **FAST)
    await reg.start()
    try:
        await asyncio.wait_for(reg.registered.wait(), 5)
        await srv.close()
        await until(lambda: reg.status()["state"] == UNREACHABLE)
        assert not reg.registered.is_set()
        assert reg.status()["consecutive_timeouts"] >= 2
        try:
            srv = await start_rendezvous(config(tmp_path, port=port, nat_port=nat_port))
        except Exception:
            pytest.skip("port no longer free")
        # The new server has an empty memory: RegisterPeer -> request_pk -> RegisterPk -> registered.
        await asyncio.wait_for(reg.registered.wait(), 5)
        await until(lambda: srv.stats()["peers_online"] == 1)
        assert srv.core.peers[me.peer_id].uuid == me.uuid
        assert srv.stats()["messages"].get("udp.register_pk", 0) >= 1
    finally:
        await reg.close()
        await srv.close()


async def test_unreachable_server_backs_off() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        reg = Registrar(("127.0.0.1", port), ident(), Pushes(), **FAST)
        await reg.start()
        try:
            await until(lambda: reg.status()["state"] == UNREACHABLE)
            st = reg.status()
            assert st["replies"] == 0
            assert st["register_pk_sent"] >= 3
            assert st["last_reply_age"] is None
            s.setblocking(False)
            received = 0
            while True:
                try:
                    data = s.recv(2048)
                except BlockingIOError:
                    break
                assert messages.parse(data)[0] == "register_pk"
                received += 1
            assert received >= 3
        finally:
            await reg.close()


async def test_id_taken_moves_to_the_next_id(server: RendezvousServer, tmp_path: Path, ids_collide: None) -> None:
    owner = ident("5555555555")
    first = Registrar(("127.0.0.1", server.udp_port), owner, Pushes(), **FAST)
    await first.start()
    await asyncio.wait_for(first.registered.wait(), 5)
    await first.close()

    state = tmp_path / "b"
    state.mkdir()
    real = identitymod.load_or_create(state)
    real.peer_id = owner.peer_id  # claims an ID another key already holds
    calls: list[str] = []

    def on_id_taken(current: Any) -> Any:
        calls.append(current.peer_id)
        return identitymod.next_id(state, current)

    reg = Registrar(("127.0.0.1", server.udp_port), real, Pushes(), on_id_taken=on_id_taken, **FAST)
    await reg.start()
    try:
        await asyncio.wait_for(reg.registered.wait(), 5)
        assert calls == ["5555555555"]
        assert reg.identity.peer_id != "5555555555"
        assert reg.status()["id"] == reg.identity.peer_id
        assert server.core.peers[reg.identity.peer_id].uuid == real.uuid
        assert server.core.peers["5555555555"].uuid == owner.uuid  # the owner keeps its ID
        assert identitymod.load_or_create(state).peer_id == reg.identity.peer_id  # persisted
    finally:
        await reg.close()


async def test_id_taken_without_handler_stays_put(server: RendezvousServer, ids_collide: None) -> None:
    owner = ident("6666666666")
    a = Registrar(("127.0.0.1", server.udp_port), owner, Pushes(), **FAST)
    await a.start()
    await asyncio.wait_for(a.registered.wait(), 5)
    await a.close()
    b = Registrar(("127.0.0.1", server.udp_port), ident("6666666666"), Pushes(), **FAST)
    await b.start()
    try:
        await until(lambda: b.status()["state"].startswith("id_taken"))
        sent = b.status()["registrations_sent"]
        await asyncio.sleep(0.3)
        assert b.status()["registrations_sent"] == sent  # no hammering while waiting for a new ID
        assert not b.registered.is_set()
    finally:
        await b.close()


async def test_unresolvable_server_is_a_clean_error() -> None:
    reg = Registrar(("", 21116), ident(), Pushes())  # fails locally: no DNS query leaves the host
    with pytest.raises(RegistrarError, match="cannot resolve"):
        await reg.start()
    assert reg.status()["state"] == "not started"
    await reg.close()


class Views:
    """The network view the registrar reads; a test moves the host by changing `current`."""

    def __init__(self) -> None:
        self.current = NetView("10.0.2.2", frozenset({"10.0.2.2"}))

    def __call__(self) -> NetView:
        return self.current


async def test_network_change_rebinds_and_reregisters_at_once(server: RendezvousServer) -> None:
    """The heartbeat is 60 s away: the server learns the new socket only because the change was noticed."""
    me = ident()
    views = Views()
    changes: list[NetworkChanged] = []
    pushes = Pushes()
    reg = Registrar(("127.0.0.1", server.udp_port), me, pushes, interval=60.0, observe=views,
                    on_network_change=changes.append, **FAST)
    await reg.start()
    try:
        await asyncio.wait_for(reg.registered.wait(), 5)
        old_port = reg.local_address[1] if reg.local_address else 0
        await until(lambda: server.core.peers[me.peer_id].addr is not None)
        assert server.core.peers[me.peer_id].addr.port == old_port  # type: ignore[union-attr]
        views.current = NetView("198.51.100.22", frozenset({"198.51.100.22"}))
        await until(lambda: len(changes) == 1)
        assert changes[0].local
        assert changes[0].reason == "route 10.0.2.2 -> 198.51.100.22; gone 10.0.2.2; new 198.51.100.22"
        new_port = reg.local_address[1] if reg.local_address else 0
        assert new_port != old_port
        await until(lambda: getattr(server.core.peers[me.peer_id].addr, "port", None) == new_port)
        await asyncio.wait_for(reg.registered.wait(), 5)
        net = reg.status()["network"]
        assert net["changes"] == 1 and net["rebinds"] == 1 and net["view"]["route"] == "198.51.100.22"
        # the server's pushes now reach the new socket
        from agent.rendezvous.requests import request_relay

        task = asyncio.create_task(
            request_relay(("127.0.0.1", server.tcp_port), me.peer_id, timeout=0.5, signer=signer(me))
        )
        await pushes.wait(1)
        assert pushes.items[0][0] == "request_relay" and pushes.items[0][1].requester_id == me.peer_id
        with pytest.raises(Exception, match="no relay answer"):
            await task
    finally:
        await reg.close()


async def test_server_restart_is_a_remote_hint_without_rebinding(tmp_path: Path) -> None:
    srv = await start_rendezvous(config(tmp_path))
    port, nat_port = srv.udp_port, srv.nat_port
    me = ident()
    changes: list[NetworkChanged] = []
    reg = Registrar(("127.0.0.1", port), me, Pushes(), interval=0.1, observe=Views(),
                    on_network_change=changes.append, **FAST)
    await reg.start()
    try:
        await asyncio.wait_for(reg.registered.wait(), 5)
        await srv.close()
        try:
            srv = await start_rendezvous(config(tmp_path, port=port, nat_port=nat_port))
        except Exception:
            pytest.skip("port no longer free")
        await until(lambda: len(changes) >= 1)
        assert not changes[0].local and "asked for our key" in changes[0].reason
        assert reg.status()["network"]["rebinds"] == 0
        await asyncio.wait_for(reg.registered.wait(), 5)
    finally:
        await reg.close()
        await srv.close()


def test_route_lookup_sends_nothing_and_follows_the_routing_table() -> None:
    assert route_source("127.0.0.1", socket.AF_INET) == "127.0.0.1"
    assert route_source("192.0.2.1", socket.AF_INET6) == ""  # family mismatch: no route, no exception
    view = observe_view("127.0.0.1", socket.AF_INET)
    assert "127.0.0.1" not in view.addresses  # loopback is never an address a peer could use


async def test_the_server_key_is_learned_on_first_contact(server: RendezvousServer) -> None:
    learned: list[bytes] = []
    reg = Registrar(("127.0.0.1", server.udp_port), ident(), Pushes(), on_server_key=learned.append, **FAST)
    await reg.start()
    try:
        await asyncio.wait_for(reg.registered.wait(), 5)
        assert learned == [server.core.public_key]
        assert reg.status()["server_key"] == fingerprint(server.core.public_key)
    finally:
        await reg.close()


async def test_a_server_with_another_key_is_refused_with_one_line(server: RendezvousServer) -> None:
    trusted = bytes(SigningKey.generate().verify_key)  # say, the key configured for the real server
    reg = Registrar(("127.0.0.1", server.udp_port), ident(), Pushes(), server_key=trusted, **FAST)
    await reg.start()
    try:
        await until(lambda: reg.status()["state"] == "server_key_refused")
        problem = reg.status()["server_key_problem"]
        assert fingerprint(server.core.public_key) in problem and fingerprint(trusted) in problem
        sent = reg.status()["registrations_sent"]
        await asyncio.sleep(0.3)
        assert reg.status()["registrations_sent"] == sent and not reg.registered.is_set()
        assert server.stats()["peers_registered"] == 0
    finally:
        await reg.close()
