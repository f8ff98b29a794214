"""Hostile networks and servers, end to end through two in-process agents.

A man in the middle between A and the relay tampers with the sealed stream; a
lying rendezvous server vouches for the wrong key; a pinned key disagrees with
the peer's. In every case nothing forged reaches the application and the
session says why. Plus the amplification table for every UDP message kind.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.descriptor import FieldDescriptor
from nacl.signing import SigningKey

from agent.control.access import save_state_config
from agent.proto import message_pb2
from agent.proto import rendezvous_pb2 as pb
from agent.servers.relay_server import RelayConfig, start_relay
from agent.stack import LocalAgent
from agent.wire import addr, messages
from agent.wire.frames import FrameDecoder, encode_frame
from agent.wire.handshake import HandshakeError
from agent.wire.peer_ids import fingerprint
from tests.agent_fixtures import Servers, open_stream, two_agents
from tests.integration.test_rendezvous_junk import exchange
from tests.integration.test_rendezvous_server import B_ID, ServerThread, make_cfg, udp_socket

# ----------------------------------------------------------------------------- the man in the middle

# Frame indexes on A's relay connection (see agent/wire/handshake.py and agent/session/owner.py):
#   A -> relay: 0 RequestRelay, 1 PublicKey, 2 sealed PeerAuth, 3 sealed SELECT, 4 sealed stream open
#               (the link's first frame), 5.. data
#   relay -> A: 0 SignedId, 1 sealed AuthResult, 2 sealed stream answer, 3.. data
UP, DOWN = "to_relay", "to_client"
FIRST_DATA = {UP: 5, DOWN: 3}

Action = Callable[["Hop", int, bytes], Awaitable[bool]]
"""Called for each frame on the tampered hop; returns False to stop forwarding (the cut)."""


@dataclass
class Hop:
    """One direction of one proxied connection."""

    direction: str
    writer: asyncio.StreamWriter
    seen: list[bytes] = field(default_factory=list)
    is_a: bool | None = None  # is this A's connection? learned from the handshake frames

    def learn(self, index: int, payload: bytes) -> None:
        if self.is_a is not None:
            return
        if (self.direction, index) in ((UP, 1), (DOWN, 0)):
            with contextlib.suppress(Exception):
                kind = message_pb2.Message.FromString(payload).WhichOneof("union")
                self.is_a = kind == ("public_key" if self.direction == UP else "signed_id")


class Mitm:
    """TCP proxy in front of the relay that re-frames the stream and lets `action` tamper with one hop."""

    def __init__(self, relay: str, direction: str, action: Action | None) -> None:
        host, port = relay.rsplit(":", 1)
        self.relay = (host, int(port))
        self.direction = direction
        self.action = action
        self.connections = 0
        self.tampered = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for w in self._writers:
            w.transport.abort()

    async def _serve(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            rr, rw = await asyncio.open_connection(*self.relay)
        except OSError:
            cw.transport.abort()
            return
        self._writers += [cw, rw]
        up, down = Hop(UP, rw), Hop(DOWN, cw)
        tasks = [asyncio.ensure_future(self._copy(cr, up)), asyncio.ensure_future(self._copy(rr, down))]
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        if any(t.exception() for t in done):  # a cut: abort both sides, like a dead middlebox
            for w in (cw, rw):
                w.transport.abort()
        with contextlib.suppress(Exception):
            await asyncio.gather(*tasks, return_exceptions=True)
        for w in (cw, rw):
            w.close()

    async def _copy(self, reader: asyncio.StreamReader, hop: Hop) -> None:
        decoder = FrameDecoder(1 << 20)
        index = 0
        while data := await reader.read(1 << 16):
            for payload in decoder.feed(data):
                hop.learn(index, payload)
                if self.action and hop.is_a and hop.direction == self.direction:
                    if not await self.action(hop, index, payload):
                        raise ConnectionAbortedError("cut by the man in the middle")
                else:
                    hop.writer.write(encode_frame(payload))
                hop.seen.append(payload)
                index += 1
            await hop.writer.drain()
        if decoder.buffered:
            hop.writer.write(decoder.take_rest())
        with contextlib.suppress(OSError):
            hop.writer.write_eof()
        await hop.writer.drain()


def flip_bit(at: int, bit: int = 0) -> Action:
    async def act(hop: Hop, index: int, payload: bytes) -> bool:
        if index == at:
            forged = bytearray(payload)
            forged[min(len(forged) - 1, 20) if bit else len(forged) - 1] ^= 1 << (bit % 8)
            payload = bytes(forged)
        hop.writer.write(encode_frame(payload))
        return True

    return act


def replay(at: int, earlier: int) -> Action:
    """Before frame `at`, send frame `earlier` again (same bytes, valid MAC for its old counter)."""

    async def act(hop: Hop, index: int, payload: bytes) -> bool:
        if index == at:
            hop.writer.write(encode_frame(hop.seen[earlier]))
        hop.writer.write(encode_frame(payload))
        return True

    return act


def swap(at: int) -> Action:
    """Frames `at` and `at + 1` change places."""
    held: list[bytes] = []

    async def act(hop: Hop, index: int, payload: bytes) -> bool:
        if index == at:
            held.append(payload)
            return True
        hop.writer.write(encode_frame(payload))
        if index == at + 1:
            hop.writer.write(encode_frame(held.pop()))
        return True

    return act


def drop(at: int) -> Action:
    async def act(hop: Hop, index: int, payload: bytes) -> bool:
        if index != at:
            hop.writer.write(encode_frame(payload))
        return True

    return act


def truncate(at: int) -> Action:
    """Send the first half of frame `at`, then cut both connections."""

    async def act(hop: Hop, index: int, payload: bytes) -> bool:
        frame = encode_frame(payload)
        if index == at:
            hop.writer.write(frame[: len(frame) // 2])
            await hop.writer.drain()
            return False
        hop.writer.write(frame)
        return True

    return act


def inject_plaintext(at: int) -> Action:
    """Before frame `at`, a frame of plain application bytes, as if the channel were unencrypted."""

    async def act(hop: Hop, index: int, payload: bytes) -> bool:
        if index == at:
            hop.writer.write(encode_frame(b"INJECTED " * 8))
        hop.writer.write(encode_frame(payload))
        return True

    return act


CASES: dict[str, tuple[str, Action]] = {
    "flip last bit, relay->A": (DOWN, flip_bit(FIRST_DATA[DOWN] + 2)),
    "flip MAC bit, relay->A": (DOWN, flip_bit(FIRST_DATA[DOWN] + 1, bit=3)),
    "flip bit, A->relay": (UP, flip_bit(FIRST_DATA[UP] + 1)),
    "flip bit in SELECT": (UP, flip_bit(3)),
    "flip bit in the stream open": (UP, flip_bit(4)),
    "flip bit in the stream's answer": (DOWN, flip_bit(2)),
    "replay data, relay->A": (DOWN, replay(FIRST_DATA[DOWN] + 2, FIRST_DATA[DOWN])),
    "replay AuthResult, relay->A": (DOWN, replay(FIRST_DATA[DOWN] + 1, 1)),
    "replay data, A->relay": (UP, replay(FIRST_DATA[UP] + 2, FIRST_DATA[UP])),
    "reorder, relay->A": (DOWN, swap(FIRST_DATA[DOWN] + 1)),
    "drop, relay->A": (DOWN, drop(FIRST_DATA[DOWN] + 1)),
    "drop, A->relay": (UP, drop(FIRST_DATA[UP] + 1)),
    "inject plaintext, relay->A": (DOWN, inject_plaintext(FIRST_DATA[DOWN] + 1)),
}
CUTS: dict[str, tuple[str, Action]] = {
    "truncate mid-frame, relay->A": (DOWN, truncate(FIRST_DATA[DOWN] + 2)),
    "truncate mid-frame, A->relay": (UP, truncate(FIRST_DATA[UP] + 1)),
}
"""A cut is not a forgery: the link comes back on a new relay connection and resends what the cut
lost, so the stream arrives whole (or, if it cannot come back, ends in a reset): never short."""
PAYLOAD = 1_000_000  # about 16 sealed 64 KiB frames each way


async def transfer(sock: socket.socket, payload: bytes) -> tuple[bytes, str]:
    """Send everything, read until the end; returns what came back and how it ended ("eof" or "reset")."""
    loop = asyncio.get_running_loop()

    async def send() -> None:
        with contextlib.suppress(OSError):
            await loop.sock_sendall(sock, payload)
            sock.shutdown(socket.SHUT_WR)

    sender = asyncio.ensure_future(send())
    chunks: list[bytes] = []
    ending = "eof"
    try:
        while data := await loop.sock_recv(sock, 1 << 18):
            chunks.append(data)
    except ConnectionResetError:
        ending = "reset"
    await sender
    return b"".join(chunks), ending


async def records(agent: LocalAgent) -> list[dict[str, Any]]:
    return list((await agent.components["coordinator"].sessions())["sessions"])


async def settled(agent: LocalAgent, sid: str | None = None) -> list[dict[str, Any]]:
    """Session records once none of them is still running."""
    async with asyncio.timeout(20):
        while True:
            recs = [r for r in await records(agent) if sid is None or r["id"] == sid]
            if recs and all(r["state"] not in ("handshake", "open") for r in recs):
                return recs
            await asyncio.sleep(0.05)


async def one_mitm_case(tmp: Path, direction: str, action: Action | None) -> dict[str, Any]:
    mitm: Mitm | None = None

    async def through_mitm(servers: Servers) -> str:
        """The man in the middle sits on the path to the relay: the relay the server names is him."""
        nonlocal mitm
        mitm = Mitm(servers.relay_addr, direction, action)
        where = await mitm.start()
        servers.rendezvous.core.relays = [where]
        return where

    async with two_agents(tmp, a_relay=through_mitm) as env:
        assert mitm is not None
        sock, reply = await open_stream(env.a_dir, env.b_id, env.echo, path="relay-only")
        payload = os.urandom(PAYLOAD)
        got, ending = b"", "refused"
        if sock is not None:
            got, ending = await asyncio.wait_for(transfer(sock, payload), 60)
            sock.close()
        a_recs = await settled(env.a, reply.get("session"))
        # B may still wait for A to bring the link back (agent/link/link.py RESUME_WAIT): whatever it
        # says a moment after A's verdict is what it says.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2):
                await settled(env.b)
        b_recs = await records(env.b)
        await mitm.close()
        return {
            "reply": reply,
            "payload": payload,
            "got": got,
            "ending": ending,
            "a": a_recs[0],
            "b": b_recs,
            "connections": mitm.connections,
        }


async def test_mitm_control_run_passes_everything(tmp_path: Path) -> None:
    """The proxy itself is faithful: without tampering the echo comes back whole, both records clean."""
    out = await one_mitm_case(tmp_path, DOWN, None)
    assert out["reply"]["ok"] and out["reply"]["path"] == "relay", out["reply"]
    assert out["got"] == out["payload"] and out["ending"] == "eof"
    assert out["connections"] == 2  # both A and B dialled the relay the server named: both legs went through us
    assert out["a"]["state"] == "done" and not out["a"].get("error"), out["a"]


@pytest.mark.parametrize("case", list(CASES))
async def test_mitm_tampering_never_reaches_the_application(tmp_path: Path, case: str) -> None:
    direction, action = CASES[case]
    out = await one_mitm_case(tmp_path, direction, action)
    got, payload = out["got"], out["payload"]
    refused = len(got) < len(payload) and payload.startswith(got)
    a_error = out["a"].get("error", "")
    b_errors = [r.get("error", "") for r in out["b"]]
    print(
        f"\nMITM {case!r}: open={'ok' if out['reply'].get('ok') else out['reply'].get('error')!r} "
        f"delivered {len(got)}/{len(payload)} bytes (prefix={payload.startswith(got)}), ended by {out['ending']}; "
        f"A: {out['a']['state']} {a_error!r}; B: {b_errors!r}"
    )
    assert payload.startswith(got), "bytes reached the application that were never sent"
    assert refused, "the tampered stream was delivered in full"
    assert out["a"]["state"] == "failed" and a_error, out["a"]
    assert any(e for e in b_errors) or "integrity" in a_error or "cut" in a_error


@pytest.mark.parametrize("case", list(CUTS))
async def test_mitm_cut_mid_frame_is_survived_whole(tmp_path: Path, case: str) -> None:
    """The connection to the relay is cut in the middle of a frame: the link comes back on a new one
    (through the same man in the middle, who cuts each connection at the same frame) and the stream
    is delivered whole and intact, never a clean end of a short one."""
    direction, action = CUTS[case]
    out = await one_mitm_case(tmp_path, direction, action)
    print(
        f"\nMITM {case!r}: delivered {len(out['got'])}/{len(out['payload'])}, ended by {out['ending']}, "
        f"{out['connections']} relay connections"
    )
    assert out["got"] == out["payload"] and out["ending"] == "eof"
    assert out["connections"] > 2  # it did come back: more than A's and B's first legs


# ----------------------------------------------------------------------------- lying rendezvous server


def known_peers(state_dir: Path) -> dict[str, str]:
    path = state_dir / "known_peers.json"
    return dict(json.loads(path.read_text())) if path.exists() else {}


async def test_wrong_server_key_is_refused_and_nothing_pinned(tmp_path: Path) -> None:
    """A trusts another server key: A refuses to register with that server (it signs with a key A does
    not trust), says so in one line, and every IdPk the server signs fails at A too."""
    async with two_agents(tmp_path) as env:
        await env.a.close()  # A again, now trusting another server key
        other = SigningKey.generate()
        cfg = env.a_cfg
        cfg.agent.server_key = base64.b64encode(bytes(other.verify_key)).decode()
        save_state_config(env.a_dir, cfg)
        a = await LocalAgent(env.a_dir).start()
        try:
            registrar = a.components["registrar"].registrar
            async with asyncio.timeout(5):
                while registrar.status()["state"] != "server_key_refused":
                    await asyncio.sleep(0.05)
            problem = registrar.status()["server_key_problem"]
            assert fingerprint(other.verify_key.encode()) in problem, problem
            assert fingerprint(env.servers.rendezvous.core.public_key) in problem, problem
            for path in ("relay-only", "auto"):
                sock, reply = await open_stream(env.a_dir, env.b_id, env.echo, path=path)
                print(f"\nwrong server key, path={path}: {reply.get('error')!r}")
                assert sock is None
                assert "signature" in reply["error"] or "server" in reply["error"], reply
            with pytest.raises(HandshakeError, match="does not verify with the server key"):
                a.components["coordinator"].trusted_key(env.b_id, env.servers.rendezvous.core.signed_pk(env.b_id))
            assert env.b_id not in known_peers(env.a_dir)
            b_recs = await records(env.b)
            assert all(r["state"] != "open" for r in b_recs)  # nothing got near a handshake
        finally:
            await a.close()


@pytest.mark.parametrize("forgery", ["another pk", "another id's pk"])
async def test_server_vouching_for_a_forged_key_is_refused(tmp_path: Path, forgery: str) -> None:
    """A compromised server signs a key that is not B's: B's SignedId then fails at A, nothing is pinned."""
    async with two_agents(tmp_path) as env:
        core = env.servers.rendezvous.core
        forged = bytes(SigningKey.generate().verify_key) if forgery == "another pk" else core.peers[env.a_id].pk
        core.peers[env.b_id].pk = forged
        sock, reply = await open_stream(env.a_dir, env.b_id, env.echo, path="relay-only")
        print(f"\nserver vouches for {forgery}: {reply.get('error')!r}")
        assert sock is None
        assert "sign" in reply["error"] or "key" in reply["error"], reply
        assert env.b_id not in known_peers(env.a_dir)


async def test_pinned_key_that_disagrees_is_refused_and_kept(tmp_path: Path) -> None:
    async with two_agents(tmp_path) as env:
        other = base64.b64encode(bytes(SigningKey.generate().verify_key)).decode()
        (env.a_dir / "known_peers.json").write_text(json.dumps({env.b_id: other}))
        for path in ("relay-only", "auto"):
            sock, reply = await open_stream(env.a_dir, env.b_id, env.echo, path=path)
            print(f"\npinned key differs, path={path}: {reply.get('error')!r}")
            assert sock is None
            assert "known_peers" in reply["error"] or "pinned" in reply["error"], reply
        assert known_peers(env.a_dir) == {env.b_id: other}
        assert all(r["state"] != "open" for r in await records(env.b))


# ----------------------------------------------------------------------------- amplification table


def realistic(kind: str) -> Any:
    """A RendezvousMessage member with every scalar field set to a plausible (and maximal-ish) value."""
    sub: Any = getattr(pb.RendezvousMessage(), kind)
    sample_addr = addr.encode(addr.SockAddr.of("203.0.113.77", 54321), 1_700_000_000_000)
    for f in sub.DESCRIPTOR.fields:
        value: Any
        if f.type == FieldDescriptor.TYPE_MESSAGE:
            continue
        if f.type == FieldDescriptor.TYPE_STRING:
            value = {"id": B_ID, "uuid": "5f6e7d8c-0000-4000-8000-123456789abc"}.get(f.name, "relay.example.net:21117")
        elif f.type == FieldDescriptor.TYPE_BYTES:
            value = sample_addr if "addr" in f.name else os.urandom(32)
        elif f.type == FieldDescriptor.TYPE_BOOL:
            value = True
        elif f.type == FieldDescriptor.TYPE_ENUM:
            value = f.enum_type.values[-1].number
        else:
            value = 21116
        if f.is_repeated:
            getattr(sub, f.name).extend([value, value])
        else:
            setattr(sub, f.name, value)
    return sub


@pytest.fixture(scope="module")
def rv(tmp_path_factory: pytest.TempPathFactory) -> Any:
    srv = ServerThread(make_cfg(tmp_path_factory.mktemp("amp"), binds=["127.0.0.1"]))
    yield srv
    srv.close()


def test_udp_amplification_table(rv: ServerThread) -> None:
    kinds = [f.name for f in pb.RendezvousMessage.DESCRIPTOR.oneofs_by_name["union"].fields]
    assert len(kinds) == 23
    rows = []
    worst = 0.0
    for kind in kinds:
        for style, sub in (("default", getattr(pb.RendezvousMessage(), kind).__class__()), ("real", realistic(kind))):
            data = messages.build(**{kind: sub})
            with udp_socket() as s:  # a fresh, never registered source
                replies = exchange(s, rv.udp, data)
            out = sum(map(len, replies))
            rows.append((kind, style, len(data), len(replies), out))
            worst = max(worst, out / len(data))
            assert all(len(r) <= len(data) for r in replies), (kind, style, data.hex(), [r.hex() for r in replies])
            assert out <= len(data), (kind, style)
    print("\nUDP from an unregistered source: request bytes -> replies, reply bytes")
    for kind, style, n_in, n_rep, n_out in rows:
        print(f"  {kind:28s} {style:7s} {n_in:5d} B -> {n_rep} x, {n_out:4d} B")
    print(f"  worst reply/request ratio: {worst:.2f} over {len(rows)} requests")


async def test_relay_with_a_key_refuses_agents_without_it(tmp_path: Path) -> None:
    keyed: list[Any] = []

    async def keyed_relay(servers: Servers) -> str:
        server_keys = [servers.rendezvous.core.public_key]
        cfg = RelayConfig(binds=["127.0.0.1"], port=0, key="the-relay-key", server_keys=server_keys)
        keyed.append(await start_relay(cfg))
        where = f"127.0.0.1:{keyed[0].port}"
        servers.rendezvous.core.relays = [where]  # the server names it; A and B both go there
        return where

    try:
        async with two_agents(tmp_path, a_relay=keyed_relay) as env:
            sock, reply = await open_stream(env.a_dir, env.b_id, env.echo, path="relay-only")
            print(f"\nrelay key missing: {reply.get('error')!r}")
            assert sock is None
            assert "relay refused" in reply["error"] and "key" in reply["error"].lower(), reply
            assert keyed[0].stats()["pairs_total"] == 0
    finally:
        for relay in keyed:
            await relay.close()
