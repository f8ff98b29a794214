"""Peer links between two real session owners (their control sockets, a real handshake, no Ray):
streams reuse one link, flow control keeps a stalled stream from stalling the others, nothing
leaks, and B judges every stream by its policy as it is when the stream opens."""

from __future__ import annotations

import asyncio
import gc
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.client import loopback_pair
from agent.common import ctlproto
from agent.identity import Identity, IdentityCache, load_or_create
from agent.link import mux_core
from agent.link.resend_core import encode_count
from agent.session.owner import GONE, RESUME, SessionOwner, _first_pieces
from agent.session.stream import run_handshake
from agent.wire.handshake import Initiator, Policy
from agent.wire.peer_ids import fingerprint


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
        await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


@dataclass
class Pair:
    a: SessionOwner
    b: SessionOwner
    a_sock: Path
    a_id: Identity
    b_id: Identity
    target: str
    b_policy: list[Policy | None]
    """B's policy as it is now (tests change it; B reads it per stream)."""
    n: int = 0

    async def first_stream(self, local: socket.socket, target: str | None = None, path: str = "lan") -> dict:
        """Bring a link up the way a race does (a transport for A, the same for B) with this stream."""
        self.n += 1
        sid = f"s{self.n}"
        ta, tb = socket.socketpair()
        reply = await ctlproto.acall(
            self.b.socket_path,
            {
                "op": "respond",
                "session": sid,
                "path": path,
                "binding_id": self.a_id.peer_id,
                "binding_pk": self.a_id.public_key,
            },
            [tb.fileno()],
        )
        assert reply["ok"]
        reply = await ctlproto.acall(
            self.a_sock,
            {"op": "transport", "session": sid, "path": path, "peer_pk": self.b_id.public_key, "key_source": "pinned"},
            [ta.fileno()],
        )
        assert reply["ok"]
        ta.close()
        tb.close()
        request = {
            "op": "initiate",
            "session": sid,
            "peer": self.b_id.peer_id,
            "target": self.target if target is None else target,
            "wait": 5,
        }
        reply = await ctlproto.acall(self.a_sock, request, [local.fileno()])
        local.close()
        return reply

    async def new_transport(self, link: str, path: str) -> dict:
        """What the coordinator's relink does, by hand: a new transport (here a socketpair) offered to
        both session owners, and A's "resume" request that moves link `link` onto it."""
        self.n += 1
        sid = f"r{self.n}"
        ta, tb = socket.socketpair()
        respond = {
            "op": "respond",
            "session": sid,
            "path": path,
            "binding_id": self.a_id.peer_id,
            "binding_pk": self.a_id.public_key,
        }
        assert (await ctlproto.acall(self.b.socket_path, respond, [tb.fileno()]))["ok"]
        offer = {"op": "transport", "session": sid, "path": path, "peer_pk": self.b_id.public_key}
        assert (await ctlproto.acall(self.a_sock, {**offer, "key_source": "pinned"}, [ta.fileno()]))["ok"]
        ta.close()
        tb.close()
        request = {"op": "resume", "session": sid, "peer": self.b_id.peer_id, "target": self.target, "link": link}
        return dict(await ctlproto.acall(self.a_sock, {**request, "wait": 5}))

    def movable(self, path: str) -> list[dict]:
        """Give A's owner a relink that brings new transports labelled `path`; returns its requests."""
        asked: list[dict] = []

        async def relink(request: dict) -> dict:
            asked.append(request)
            return await self.new_transport(str(request["link"]), path)

        self.a.relink = relink
        return asked

    async def stream(self, local: socket.socket, target: str | None = None, paths: tuple[str, ...] = ("lan",)) -> dict:
        self.n += 1
        request = {
            "op": "stream",
            "session": f"s{self.n}",
            "peer": self.b_id.peer_id,
            "target": self.target if target is None else target,
            "paths": list(paths),
        }
        reply = await ctlproto.acall(self.a_sock, request, [local.fileno()])
        local.close()
        return reply


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[Pair]:
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    target = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    a_id, b_id = load_or_create(tmp_path / "a"), load_or_create(tmp_path / "b")
    policy: list[Policy | None] = [
        Policy.of(allowed_keys={a_id.peer_id: fingerprint(a_id.public_key)}, allowed_targets=[target])
    ]
    a = SessionOwner(tmp_path / "a.sock", IdentityCache(tmp_path / "a", a_id).get, lambda: None)
    b = SessionOwner(tmp_path / "b.sock", IdentityCache(tmp_path / "b", b_id).get, lambda: policy[0])
    await a.start()
    await b.start()
    try:
        yield Pair(a, b, tmp_path / "a.sock", a_id, b_id, target, policy)
    finally:
        await a.close()
        await b.close()
        server.close()


async def echo_through(client: socket.socket, payload: bytes) -> bytes:
    """Send `payload`, half-close, read everything back."""
    loop = asyncio.get_running_loop()
    client.setblocking(False)
    await loop.sock_sendall(client, payload)
    client.shutdown(socket.SHUT_WR)
    got = bytearray()
    while data := await loop.sock_recv(client, 65536):
        got += data
    return bytes(got)


async def test_streams_after_the_first_ride_the_same_link(pair: Pair) -> None:
    mine, theirs = loopback_pair()
    reply = await pair.first_stream(theirs)
    assert reply["ok"], reply
    assert await echo_through(mine, b"one" * 1000) == b"one" * 1000
    mine.close()
    for i in range(3):
        mine, theirs = loopback_pair()
        reply = await pair.stream(theirs)
        assert reply["ok"], reply
        payload = bytes([i]) * 300_000
        assert await echo_through(mine, payload) == payload
        mine.close()
    links = pair.a.link_list()
    assert len(links) == 1 and links[0]["streams_total"] == 4 and links[0]["state"] == "up"
    assert links[0]["path"] == "lan" and links[0]["history"][0]["path"] == "lan"
    assert [x["streams_total"] for x in pair.b.link_list()] == [4]


async def test_a_stream_finds_no_link_for_a_path_its_policy_excludes(pair: Pair) -> None:
    mine, theirs = loopback_pair()
    assert (await pair.first_stream(theirs))["ok"]
    mine.close()
    _, theirs = loopback_pair()
    assert (await pair.stream(theirs, paths=("relay",))) == {"ok": False, "no_link": True}


async def test_a_refused_target_fails_only_its_stream(pair: Pair) -> None:
    mine, theirs = loopback_pair()
    assert (await pair.first_stream(theirs))["ok"]
    mine.close()
    _, theirs = loopback_pair()
    reply = await pair.stream(theirs, target="127.0.0.1:9")
    assert not reply["ok"] and "127.0.0.1:9 is not allowed" in reply["error"]
    mine, theirs = loopback_pair()
    assert (await pair.stream(theirs))["ok"]
    assert await echo_through(mine, b"still here") == b"still here"


async def test_a_peer_removed_from_the_allow_list_opens_no_more_streams_on_its_link(pair: Pair) -> None:
    """Security: a link admitted under yesterday's policy is not a pass for today's streams."""
    mine, theirs = loopback_pair()
    assert (await pair.first_stream(theirs))["ok"]
    mine.close()
    pair.b_policy[0] = Policy.of(allowed_ids=["someoneelse"], allowed_targets=[pair.target])
    _, theirs = loopback_pair()
    reply = await pair.stream(theirs)
    assert not reply["ok"] and "is not on this agent's allow list" in reply["error"], reply
    pair.b_policy[0] = None
    _, theirs = loopback_pair()
    reply = await pair.stream(theirs)
    assert not reply["ok"] and "admits nobody" in reply["error"], reply


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_a_thousand_streams_open_and_close_without_a_leak(pair: Pair) -> None:
    mine, theirs = loopback_pair()
    assert (await pair.first_stream(theirs))["ok"]
    assert await echo_through(mine, b"x") == b"x"
    mine.close()
    await asyncio.sleep(0.1)
    gc.collect()
    fds_before = _fds()
    for i in range(1000):
        mine, theirs = loopback_pair()
        reply = await pair.stream(theirs)
        assert reply["ok"], (i, reply)
        assert await echo_through(mine, b"%d" % i) == b"%d" % i
        mine.close()
    await asyncio.sleep(0.2)
    gc.collect()
    (link,) = pair.a.links.running()
    assert link.link.opened == 1001
    assert link.link.stream_count == 0 and not link.link.mux.streams
    (b_link,) = pair.b.links.running()
    assert b_link.link.stream_count == 0 and not b_link.link.mux.streams
    assert not pair.a._streams and not pair.b._streams
    assert _fds() <= fds_before + 2, (fds_before, _fds())


async def test_a_stalled_reader_stalls_only_its_own_stream(pair: Pair) -> None:
    """200 streams at once; one client writes 64 MB (more than every socket buffer on the way can
    hold) and never reads its echo. The other 199 finish
    their 256 KB round trips, and A holds at most the stalled stream's window (which grew while the
    socket buffers on the way still took the echo: mux_core's auto-tuning) for it."""
    loop = asyncio.get_running_loop()
    mine, theirs = loopback_pair()
    assert (await pair.first_stream(theirs))["ok"]
    mine.close()
    stalled, theirs = loopback_pair()
    assert (await pair.stream(theirs))["ok"]
    stalled.setblocking(False)
    blob = bytes(64 << 20)
    writer = asyncio.ensure_future(loop.sock_sendall(stalled, blob))
    await asyncio.sleep(0.5)
    assert not writer.done(), "64 MB went through a stream nobody reads: no flow control"

    async def one(i: int) -> None:
        mine, theirs = loopback_pair()
        reply = await pair.stream(theirs)
        assert reply["ok"], reply
        payload = os.urandom(256 * 1024)
        assert await echo_through(mine, payload) == payload
        mine.close()

    async with asyncio.timeout(60):
        await asyncio.gather(*(one(i) for i in range(199)))
    (link,) = pair.a.links.running()
    stuck = [st for st in link.link.streams.values()]
    assert len(stuck) == 1
    window = link.link.mux.streams[stuck[0].sid].window
    assert sum(map(len, stuck[0].inbound)) <= window <= mux_core.MAX_WINDOW
    writer.cancel()
    stalled.close()


async def test_a_cut_link_fails_its_streams_and_the_next_stream_needs_a_new_one(pair: Pair) -> None:
    mine, theirs = loopback_pair()
    assert (await pair.first_stream(theirs))["ok"]
    (lrec,) = pair.a.links.running()
    lrec.link.transport.shutdown(socket.SHUT_RDWR)  # the path dies under the link
    mine.setblocking(False)
    loop = asyncio.get_running_loop()
    with pytest.raises(ConnectionResetError):
        async with asyncio.timeout(5):
            while await loop.sock_recv(mine, 100):
                pass
    mine.close()
    await asyncio.sleep(0.1)
    assert lrec.state == "failed" and "cut" in lrec.error
    failed = [s for s in pair.a.session_list() if s["link"] == lrec.id]
    assert failed and all("link to the peer lost" in s["error"] for s in failed)
    _, theirs = loopback_pair()
    assert (await pair.stream(theirs)) == {"ok": False, "no_link": True}


async def test_a_link_whose_path_died_silently_is_given_up_at_once(pair: Pair) -> None:
    """The path under a link stops carrying anything (a host moved, a NAT forgot us, a KCP peer died):
    no reset, no FIN. A quiet link is probed with the next stream's open; silence sends that stream
    to a new race within a second instead of the open timeout, and later streams skip the link."""
    mine, theirs = loopback_pair()
    assert (await pair.first_stream(theirs))["ok"]
    mine.close()
    (b_link,) = pair.b.links.running()
    # B stops reading (so answering) without closing anything: the freeze of a dead path.
    asyncio.get_running_loop().remove_reader(b_link.link.transport.fileno())
    await asyncio.sleep(0.6)  # quiet for longer than QUIET
    (a_link,) = pair.a.links.running()
    started = asyncio.get_running_loop().time()
    _, theirs = loopback_pair()
    assert (await pair.stream(theirs)) == {"ok": False, "no_link": True}
    assert asyncio.get_running_loop().time() - started < 3
    assert a_link.link.suspect and pair.a.links.usable(pair.b_id.peer_id, "", lambda p: True) is None


async def _transfer_while(pair: Pair, size: int, during: Callable[[], Awaitable[None]]) -> tuple[bytes, bytes]:
    """`size` random bytes echoed through one stream while `during` runs; (sent, received)."""
    loop = asyncio.get_running_loop()
    mine, theirs = loopback_pair()
    assert (await pair.first_stream(theirs))["ok"]
    mine.setblocking(False)
    payload = os.urandom(size)

    async def send() -> None:
        view = memoryview(payload)
        for at in range(0, size, 64 * 1024):
            await loop.sock_sendall(mine, view[at : at + 64 * 1024])
            await asyncio.sleep(0)
        mine.shutdown(socket.SHUT_WR)

    async def receive() -> bytes:
        got = bytearray()
        while data := await loop.sock_recv(mine, 1 << 18):
            got += data
        return bytes(got)

    sender = asyncio.ensure_future(send())
    receiver = asyncio.ensure_future(receive())
    while len(pair.a.links.running()) == 0 or pair.a.links.running()[0].link.bytes_in < size // 4:
        await asyncio.sleep(0.01)  # a quarter is through: the rest crosses the move
    await during()
    async with asyncio.timeout(60):
        await sender
        got = await receiver
    mine.close()
    return payload, got


async def test_a_link_moves_to_a_better_transport_without_losing_a_byte(pair: Pair) -> None:
    """The upgrade: mid-transfer, a new transport authenticates and the link moves every live stream to
    it; nothing lost, duplicated or reordered, and the move is in the link's history."""
    asked = pair.movable("tcp_punch")

    async def move() -> None:
        (lrec,) = pair.a.links.running()
        assert await pair.a._relink(lrec, "direct-only", "a direct path authenticated")

    sent, got = await _transfer_while(pair, 24 << 20, move)
    assert len(got) == len(sent) and got == sent
    (lrec,) = pair.a.links.running()
    assert [h["path"] for h in lrec.history] == ["lan", "tcp_punch"]
    assert lrec.history[1]["why"] == "a direct path authenticated" and lrec.path == "tcp_punch"
    assert asked[0]["policy"] == "direct-only" and asked[0]["target"] == pair.target
    (b_link,) = pair.b.links.running()
    assert [h["path"] for h in b_link.history] == ["lan", "tcp_punch"]


async def test_a_link_whose_transport_is_cut_comes_back_on_a_new_one(pair: Pair) -> None:
    """The downgrade and the move of a host: the transport dies mid-transfer (both ends see it cut);
    A races for a new transport, B waits for it, and the transfer finishes intact."""
    asked = pair.movable("relay")

    async def cut() -> None:
        (lrec,) = pair.a.links.running()
        lrec.link.transport.shutdown(socket.SHUT_RDWR)

    sent, got = await _transfer_while(pair, 24 << 20, cut)
    assert len(got) == len(sent) and got == sent
    (lrec,) = pair.a.links.running()
    assert [h["path"] for h in lrec.history] == ["lan", "relay"] and "lan lost: " in lrec.history[1]["why"]
    assert asked and asked[0]["policy"] == ""


async def test_a_network_change_replaces_a_silently_dead_transport_at_once(pair: Pair) -> None:
    """This host's network changed and the link's path died without a sound (no reset, no FIN): the
    probe that follows the change finds it within a second and the link moves to a new transport,
    instead of waiting out 30 s of unanswered pings (an idle link has nothing else to notice it by)."""
    loop = asyncio.get_running_loop()
    asked = pair.movable("relay")
    mine, theirs = loopback_pair()
    assert (await pair.first_stream(theirs))["ok"]
    assert await echo_through(mine, b"before") == b"before"
    (a_link,) = pair.a.links.running()
    (b_link,) = pair.b.links.running()
    loop.remove_reader(b_link.link.transport.fileno())  # the old path carries nothing any more
    started = loop.time()
    reply = await ctlproto.acall(pair.a_sock, {"op": "network_changed", "reason": "route 10.0.2.1 -> none"})
    assert reply == {"ok": True, "probed": 1}
    async with asyncio.timeout(10):
        while len(a_link.history) < 2 or a_link.link.moving:
            await asyncio.sleep(0.05)
    took = loop.time() - started
    assert took < 5, took
    assert [h["path"] for h in a_link.history] == ["lan", "relay"]
    assert "after a network change (route 10.0.2.1 -> none)" in a_link.history[1]["why"]
    assert asked and asked[0]["link"] == a_link.id
    mine, theirs = loopback_pair()
    reply = await pair.stream(theirs, paths=("lan", "relay"))  # the same link, on its new transport
    assert reply["ok"] and reply["link"] == a_link.id, reply
    assert await echo_through(mine, b"after the move") == b"after the move"


async def test_a_transport_that_names_a_link_it_does_not_have_is_turned_away(pair: Pair) -> None:
    """Security: a peer that proves its key but names a link B does not have (a guessed or stale
    token) hears GONE and gets nothing; the running link is untouched."""
    loop = asyncio.get_running_loop()
    mine, theirs = loopback_pair()
    assert (await pair.first_stream(theirs))["ok"]
    ours, bs = socket.socketpair()
    respond = {"op": "respond", "session": "guess", "path": "lan", "binding_id": pair.a_id.peer_id}
    assert (await ctlproto.acall(pair.b.socket_path, {**respond, "binding_pk": pair.a_id.public_key}, [bs.fileno()]))
    bs.close()
    ours.setblocking(False)
    machine = Initiator(
        pair.a_id.peer_id, pair.a_id.signing_key, pair.b_id.peer_id, pair.b_id.public_key, target=pair.target
    )
    codec = await run_handshake(ours, machine, 5.0)
    await loop.sock_sendall(ours, codec.encode(RESUME + os.urandom(16) + encode_count(0))[0])
    assert await _first_pieces(ours, codec, 5.0) == [GONE]
    ours.close()
    (b_link,) = pair.b.links.running()
    assert [h["path"] for h in b_link.history] == ["lan"]
    assert await echo_through(mine, b"still the old path") == b"still the old path"
    refused = [s for s in pair.b.session_list() if "does not have" in s["error"]]
    assert len(refused) == 1


async def test_a_link_the_peer_no_longer_has_ends_at_once(pair: Pair) -> None:
    """B ended the link (or restarted) while A's transport was cut: A's first try to bring it back
    hears GONE and the link ends (its streams fail now, the next stream races for a new link)."""
    pair.movable("relay")
    mine, theirs = loopback_pair()
    assert (await pair.first_stream(theirs))["ok"]
    (b_link,) = pair.b.links.running()
    b_link.link._end("B restarted")  # gone without a word: A sees its transport cut
    (a_link,) = pair.a.links.running()
    async with asyncio.timeout(10):
        await a_link.link.ended.wait()
    assert "no longer has this link" in a_link.link.error
    assert a_link.link.moves == 0
    mine.close()
