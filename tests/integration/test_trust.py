"""Issue 9: the identity model under attack, each finding as a stranger would run it.

A stranger here has the protocol's own messages, a key of his own, whatever is
public (IDs, B's public key, the server's key) and, where the finding says so,
B's uuid. Each test runs the attack and asserts that it gets nowhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from nacl.signing import SigningKey

from agent.control.pins import PinStore
from agent.identity import load_or_create
from agent.link import stream_open
from agent.link.mux_core import Data, Mux
from agent.proto import rendezvous_pb2 as pb
from agent.rendezvous.requests import Signer
from agent.session.owner import SELECT, _first_pieces
from agent.session.stream import SessionError, run_handshake
from agent.stack import LocalAgent
from agent.wire import addr as addrmod
from agent.wire import messages, signing
from agent.wire.frames import FrameDecoder, encode_frame
from agent.wire.handshake import HandshakeError, Initiator
from agent.wire.keys import open_signed_id_pk
from agent.wire.peer_ids import derive_id
from tests.agent_fixtures import (
    agent_config,
    has_ipv6,
    open_stream,
    prepare_state,
    start_servers,
    transfer,
    two_agents,
    wait_registered,
)
from tests.integration.test_local_agent import free_port


def _connections(counter: list[socket.socket]) -> tuple[socket.socket, int]:
    """A listener that records every connection made to it (the address a stranger aims B at)."""
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(16)
    lsock.setblocking(False)
    loop = asyncio.get_running_loop()

    def accept() -> None:
        with contextlib.suppress(BlockingIOError):
            conn, _ = lsock.accept()
            counter.append(conn)

    loop.add_reader(lsock.fileno(), accept)
    return lsock, int(lsock.getsockname()[1])


def _close_listener(lsock: socket.socket, counter: list[socket.socket]) -> None:
    asyncio.get_running_loop().remove_reader(lsock.fileno())
    lsock.close()
    for c in counter:
        c.close()


async def _tcp_send(server: str, bind: str = "127.0.0.1", raw: bytes | None = None, **member: object) -> socket.socket:
    """One framed message to the server on a fresh connection from `bind` (another loopback address
    is another host to the server); `raw` is a message already built (a signed one)."""
    host, port = server.rsplit(":", 1)
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    sock.bind((bind, 0))
    await loop.sock_connect(sock, (host, int(port)))
    await loop.sock_sendall(sock, encode_frame(raw if raw is not None else messages.build(**member)))
    return sock


async def _udp_ask(port: int, **member: object) -> tuple[str, Any] | None:
    """One datagram to the rendezvous server from a fresh socket; its answer, or None after a second."""
    loop = asyncio.get_running_loop()
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.setblocking(False)
    try:
        await loop.sock_sendto(s, messages.build(**member), ("127.0.0.1", port))
        async with asyncio.timeout(1.0):
            return messages.parse(await loop.sock_recv(s, 4096))
    except TimeoutError:
        return None
    finally:
        s.close()


async def stranger_session(
    address: tuple[str, int], claimed_id: str, key: SigningKey, b_id: str, b_pk: bytes, target: str
) -> str:
    """Run the handshake as `claimed_id` with `key` on B's direct port: "open" if B forwarded us."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, address)
        machine = Initiator(claimed_id, key, b_id, b_pk, target=target)
        try:
            codec = await run_handshake(sock, machine, 5.0)
        except (HandshakeError, SessionError) as exc:
            return f"refused: {getattr(exc, 'reason', exc)}"
        mux = Mux(dialer=True)
        stream = mux.open_stream()
        mux.send(stream, stream_open.encode_request(target))
        await loop.sock_sendall(sock, codec.encode(SELECT)[0] + b"".join(codec.encode(mux.data_to_send())))
        pieces = await _first_pieces(sock, codec, 5.0)
        events = [e for p in pieces or [] if p is not None for e in mux.receive(p)]
        answers = [e.data for e in events if isinstance(e, Data) and e.stream == stream]
        if answers and stream_open.parse_status(answers[0]) is None:
            return "open"
        return f"refused: {pieces!r}"
    finally:
        sock.close()


# ----------------------------------------------------------------------------- 1. first contact


async def test_stranger_cannot_claim_an_allowed_id_on_first_contact(tmp_path: Path) -> None:
    """B allows C, who never connected; a stranger says he is C with a fresh key of his own."""
    c_id = derive_id(bytes(SigningKey.generate().verify_key))
    stranger = SigningKey.generate()
    port = free_port()
    async with two_agents(tmp_path, b_allow=[c_id], b_direct_port=port) as pair:
        b_pk = load_or_create(pair.b_dir).public_key
        outcome = await stranger_session(("127.0.0.1", port), c_id, stranger, pair.b_id, b_pk, pair.echo)
        assert outcome.startswith("refused"), outcome
        assert PinStore(pair.b_dir).get(c_id) is None, "the stranger's key was pinned for C"


# ----------------------------------------------------------------------------- 2. squatting


async def test_stranger_cannot_squat_an_id_before_its_owner(tmp_path: Path) -> None:
    """The stranger registers B's ID (known before B first registers) with his own key."""
    servers = await start_servers(tmp_path / "srv")
    b: LocalAgent | None = None
    try:
        b_dir = tmp_path / "b"
        b_id = prepare_state(b_dir, agent_config(servers, allow=["1234567890"]))
        stranger = SigningKey.generate()
        rv = servers.rendezvous
        reg = pb.RegisterPk(id=b_id, uuid=os.urandom(16), pk=bytes(stranger.verify_key))
        await _udp_ask(rv.udp_port, register_pk=reg)
        b = await LocalAgent(b_dir).start()
        await wait_registered(b)
        assert b.components["registrar"].registrar.identity.peer_id == b_id, "B was pushed off its own ID"
        assert _bound_key(rv, b_id) == load_or_create(b_dir).public_key
    finally:
        if b is not None:
            await b.close()
        await servers.rendezvous.close()
        await servers.relay.close()


def _bound_key(rv: object, peer_id: str) -> bytes:
    """The key the rendezvous server vouches for `peer_id` (opened with its own key)."""
    from agent.wire.keys import open_signed_id_pk

    core = rv.core  # type: ignore[attr-defined]
    signed = core.signed_pk(peer_id)
    _id, pk = open_signed_id_pk(bytes(core.key.verify_key), signed)
    return pk


# ----------------------------------------------------------------------------- 3. hijack with the uuid


async def test_the_uuid_does_not_hand_over_an_id(tmp_path: Path) -> None:
    """With B's uuid a stranger asks the server to bind his key to B's ID."""
    async with two_agents(tmp_path) as pair:
        b_ident = load_or_create(pair.b_dir)
        stranger = SigningKey.generate()
        rv = pair.servers.rendezvous
        reg = pb.RegisterPk(id=pair.b_id, uuid=b_ident.uuid, pk=bytes(stranger.verify_key))
        for _ in range(2):
            await _udp_ask(rv.udp_port, register_pk=reg)
        await asyncio.sleep(0.5)
        assert _bound_key(rv, pair.b_id) == b_ident.public_key, "the server now vouches for the stranger's key"
        assert pair.b.components["registrar"].registrar.identity.peer_id == pair.b_id


# ----------------------------------------------------------------------------- 4. agents aimed anywhere


@pytest.mark.parametrize("b_allow", [[], None], ids=["admits-nobody", "admits-A"])
async def test_a_stranger_cannot_aim_an_agent_at_an_address(tmp_path: Path, b_allow: list[str] | None) -> None:
    """RequestRelay naming a relay of the stranger's choice, with a uuid that is a Redis command."""
    async with two_agents(tmp_path, b_allow=b_allow) as pair:
        seen: list[socket.socket] = []
        lsock, port = _connections(seen)
        try:
            req = pb.RequestRelay(
                id=pair.b_id, uuid="x\r\nPING\r\nSET pwned 1\r\n", relay_server=f"127.0.0.1:{port}", secure=True
            )
            sock = await _tcp_send(pair.servers.server, "127.0.0.2", request_relay=req)
            await asyncio.sleep(2.0)
            sock.close()
            assert not seen, "B connected to the address the stranger chose"
        finally:
            _close_listener(lsock, seen)


@pytest.mark.skipif(not has_ipv6(), reason="no IPv6 loopback")
async def test_a_stranger_cannot_aim_an_agent_at_a_v6_address(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """PunchHoleRequest with a socket_addr_v6 of the stranger's choice (here a loopback listener)."""
    import agent.strategies.ipv6 as ipv6mod

    monkeypatch.setattr(ipv6mod, "global_v6", lambda: "::1")  # as if B had a global address
    async with two_agents(tmp_path) as pair:
        loop = asyncio.get_running_loop()
        lsock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        lsock.bind(("::1", 0))
        lsock.listen(16)
        lsock.setblocking(False)
        port = lsock.getsockname()[1]
        try:
            v6 = addrmod.encode(addrmod.SockAddr.of("::1", port), 0)
            req = pb.PunchHoleRequest(id=pair.b_id, nat_type=pb.ASYMMETRIC, socket_addr_v6=v6)
            sock = await _tcp_send(pair.servers.server, "127.0.0.2", punch_hole_request=req)
            got: socket.socket | None = None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    got, _ = await loop.sock_accept(lsock)
            sock.close()
            if got is not None:
                got.close()
            assert got is None, "B connected to the v6 address the stranger chose"
        finally:
            lsock.close()


# ----------------------------------------------------------------------------- 5. forged answers


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned-request", "a's-real-request"])
async def test_forged_answers_do_not_reach_a(tmp_path: Path, signed: bool) -> None:
    """While A waits for B, a stranger answers for B (a RelayResponse with his own relay, uuid and pk).
    The second case is A's real, signed request, which B answers too: A gets B's answer only."""
    async with two_agents(tmp_path) as pair:
        loop = asyncio.get_running_loop()
        # A's request, parked at the server; B is told to use the relay (and answers, a moment later)
        request = pb.PunchHoleRequest(id=pair.b_id, force_relay=True)
        if signed:
            a_ident = load_or_create(pair.a_dir)
            raw = Signer(a_ident.peer_id, a_ident.signing_key).sign("punch_hole_request", request)
            a = await _tcp_send(pair.servers.server, raw=raw)
        else:
            a = await _tcp_send(pair.servers.server, punch_hole_request=request)
        a_addr = addrmod.SockAddr.of(*a.getsockname()[:2])
        stranger_pk = bytes(SigningKey.generate().verify_key)
        forged = pb.RelayResponse(
            socket_addr=addrmod.encode(a_addr, 0), uuid="forged", relay_server="127.0.0.1:9", pk=stranger_pk
        )
        f = await _tcp_send(pair.servers.server, "127.0.0.2", relay_response=forged)
        decoder = FrameDecoder()
        answers: list[tuple[str, object]] = []
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.5):
                while True:
                    chunk = await loop.sock_recv(a, 65536)
                    if not chunk:
                        break
                    answers += [messages.parse(p) for p in decoder.feed(chunk) if p]
        a.close()
        f.close()
        for kind, msg in answers:
            assert not (kind == "relay_response" and msg.uuid == "forged"), "A got the stranger's answer"  # type: ignore[attr-defined]
            assert stranger_pk not in bytes(getattr(msg, "pk", b"")), "A got the stranger's key"
        if signed:
            (kind, real), *_ = answers
            assert kind == "relay_response" and real.relay_server == "" and real.ticket  # type: ignore[attr-defined]
            bound = open_signed_id_pk(pair.servers.rendezvous.core.public_key, real.pk)  # type: ignore[attr-defined]
            assert bound == (pair.b_id, load_or_create(pair.b_dir).public_key)
            drops = pair.servers.rendezvous.stats()["drops"]
            assert drops.get("answer_token_mismatch", 0) + drops.get("no_pending_request", 0) >= 1


# ----------------------------------------------------------------------------- 6. open relay


async def test_the_relay_pairs_only_what_the_server_arranged(tmp_path: Path) -> None:
    """Two connections of a stranger's own name one uuid at the relay: no key, no rendezvous."""
    async with two_agents(tmp_path) as pair:
        host, port = pair.servers.relay_addr.rsplit(":", 1)
        loop = asyncio.get_running_loop()
        ends = []
        for _ in range(2):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            await loop.sock_connect(s, (host, int(port)))
            req = pb.RequestRelay(uuid="free-bandwidth", conn_type=pb.PORT_FORWARD)
            await loop.sock_sendall(s, encode_frame(messages.build(request_relay=req)))
            ends.append(s)
        payload = os.urandom(1 << 20)
        got = b""
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(3.0):
                await loop.sock_sendall(ends[0], payload)
                while len(got) < len(payload):
                    chunk = await loop.sock_recv(ends[1], 1 << 16)
                    if not chunk:
                        break
                    got += chunk
        for s in ends:
            s.close()
        assert payload not in got, "the relay carried a stranger's bytes"


# ----------------------------------------------------------------------------- 7. readable state


def test_state_is_private(tmp_path: Path) -> None:
    """`punchthrough id` on a fresh state dir, as a user with the usual umask 022."""
    import subprocess
    import sys

    state = tmp_path / "state"
    code = "import os, sys; os.umask(0o022); from agent.cli import main; sys.exit(main(sys.argv[1:]))"
    subprocess.run([sys.executable, "-c", code, "--state-dir", str(state), "id"], check=True, capture_output=True)
    assert state.stat().st_mode & 0o777 == 0o700
    for path in state.rglob("*"):
        assert path.stat().st_mode & 0o077 == 0, f"{path} is readable by others"


async def test_the_rendezvous_database_is_private(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        servers = await start_servers(tmp_path / "srv")
        await servers.rendezvous.close()
        await servers.relay.close()
    finally:
        os.umask(old)
    for path in (tmp_path / "srv").iterdir():
        assert path.stat().st_mode & 0o077 == 0, f"{path} is readable by others"


# ----------------------------------------------------------------------------- 8. password guessing


async def test_password_guessing_is_slowed_down(tmp_path: Path) -> None:
    """A stranger guesses B's password; after a few failures even the right one waits."""
    async with two_agents(tmp_path, b_allow=[], b_password="correct horse") as pair:
        for _ in range(6):
            sock, reply = await open_stream(pair.a_dir, pair.b_id, pair.echo, password="wrong")
            assert sock is None, reply
        sock, reply = await open_stream(pair.a_dir, pair.b_id, pair.echo, password="correct horse")
        if sock is not None:
            sock.close()
        assert sock is None, "the right password got in right after a run of wrong ones"
        assert "retry" in str(reply.get("error")), reply


# ----------------------------------------------------------------------------- the relay the server names


async def test_agents_use_the_relay_the_server_names(tmp_path: Path) -> None:
    """Rendezvous and relay in separate processes' shoes, the relay not on the server's port + 1,
    and no --relay on either agent."""
    from agent.common.keyfile import load_or_create_signing_key
    from agent.servers.relay_server import start_relay
    from tests.agent_fixtures import relay_config, rendezvous_config

    rv_cfg = rendezvous_config(tmp_path / "srv")
    # The operator's steps: the relay gets a copy of the rendezvous server's public key ...
    server_key = bytes(load_or_create_signing_key(rv_cfg.key_file).verify_key)
    relay = await start_relay(relay_config(server_keys=[server_key]))
    # ... and the rendezvous server names the relay (here not on its port + 1)
    rv_cfg.relays = [f"127.0.0.1:{relay.port}"]
    servers = await start_servers(tmp_path / "srv", rv_cfg)
    assert relay.port != servers.rendezvous.ports["tcp"] + 1
    agents: list[LocalAgent] = []
    try:
        a_cfg = agent_config(servers)
        a_cfg.agent.relay = ""
        a_id = prepare_state(tmp_path / "a", a_cfg)
        srv, echo = await _echo()
        b_cfg = agent_config(servers, allow=[a_id], allow_targets=[echo])
        b_cfg.agent.relay = ""
        b_id = prepare_state(tmp_path / "b", b_cfg)
        for d in ("a", "b"):
            agents.append(await LocalAgent(tmp_path / d).start())
            await wait_registered(agents[-1])
        sock, reply = await open_stream(tmp_path / "a", b_id, echo, path="relay-only")
        assert sock is not None, reply
        payload = os.urandom(200_000)
        assert await asyncio.wait_for(transfer(sock, payload), 30) == payload
        sock.close()
        assert relay.stats()["pairs_total"] >= 1
        srv.close()
    finally:
        for agent in agents:
            await agent.close()
        await servers.rendezvous.close()
        await servers.relay.close()
        await relay.close()


async def _echo() -> tuple[asyncio.Server, str]:
    from tests.agent_fixtures import echo_server

    return await echo_server()


async def test_a_checks_the_server_signature_without_a_configured_key(tmp_path: Path) -> None:
    """No --server-key on A: a key 'vouched for' with a forged signature must not be trusted."""
    from agent.proto import message_pb2

    async with two_agents(tmp_path, a_server_key="") as pair:
        coord = pair.a.components["coordinator"]
        stranger_pk = bytes(SigningKey.generate().verify_key)
        forged = bytes(64) + message_pb2.IdPk(id=pair.b_id, pk=stranger_pk).SerializeToString()
        with pytest.raises(HandshakeError):
            coord.trusted_key(pair.b_id, forged)


# ----------------------------------------------------------------------------- more of each


async def test_b_does_nothing_on_the_network_for_a_peer_it_would_not_admit(tmp_path: Path) -> None:
    """A registered stranger C (a real agent, not on B's list) asks for B on every path: B dials, punches
    and listens for nothing, counts and logs the push once per interval, and C hears why at once."""
    async with two_agents(tmp_path) as pair:
        c_dir = tmp_path / "c"
        prepare_state(c_dir, agent_config(pair.servers))
        c = await LocalAgent(c_dir).start()
        try:
            await wait_registered(c)
            c_spec = f"{load_or_create(c_dir).peer_id}={load_or_create(c_dir).fingerprint}"
            for _ in range(2):
                loop = asyncio.get_running_loop()
                t0 = loop.time()
                sock, reply = await open_stream(c_dir, pair.b_id, pair.echo)
                assert sock is None
                assert "is not on this agent's allow list" in reply["error"] and c_spec in reply["error"], reply
                assert loop.time() - t0 < 5.0  # told, not left to wait out its connect timeout
            b = pair.b.components
            for kind in ("lan", "tcp_punch", "udp_punch", "relay"):
                assert b[kind].status()["attempts"] == 0 if kind != "lan" else b[kind].attempts == 0, kind
            assert sum(b["coordinator"].answers.pushes_refused.values()) >= 2
            assert all(not p.attempts for p in b["coordinator"].plans.values())
        finally:
            await c.close()


async def test_a_signed_squatter_cannot_take_an_id_either(tmp_path: Path) -> None:
    """The stranger signs his registration of B's (future) ID with his own key: the ID is not his key's."""
    from tests.signed import Member, register_via

    servers = await start_servers(tmp_path / "srv")
    try:
        b_dir = tmp_path / "b"
        b_id = prepare_state(b_dir, agent_config(servers, allow=["1234567890"]))
        squatter = Member.new(b"squatter")
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        s.settimeout(5)

        def send(data: bytes) -> bytes:
            s.sendto(data, ("127.0.0.1", servers.rendezvous.udp_port))
            return s.recv(4096)

        result = await asyncio.to_thread(register_via, send, squatter, b_id)
        s.close()
        assert result == pb.RegisterPkResponse.ID_NOT_DERIVED
        assert servers.rendezvous.core.lookup(b_id) is None
    finally:
        await servers.rendezvous.close()
        await servers.relay.close()


async def test_even_with_unsigned_clients_allowed_the_uuid_hands_over_nothing(tmp_path: Path) -> None:
    """A server that also serves RustDesk clients (--allow-unsigned): an unsigned registration with B's
    uuid still cannot touch B's signed binding."""
    from tests.agent_fixtures import rendezvous_config

    rv = rendezvous_config(tmp_path / "srv")
    rv.allow_unsigned = True
    async with two_agents(tmp_path, rendezvous=rv) as pair:
        b_ident = load_or_create(pair.b_dir)
        stranger = SigningKey.generate()
        reg = pb.RegisterPk(id=pair.b_id, uuid=b_ident.uuid, pk=bytes(stranger.verify_key))
        answer = await _udp_ask(pair.servers.rendezvous.udp_port, register_pk=reg)
        assert answer is not None
        assert (answer[0], answer[1].result) == ("register_pk_response", pb.RegisterPkResponse.UUID_MISMATCH)
        assert _bound_key(pair.servers.rendezvous, pair.b_id) == b_ident.public_key


async def test_a_ticket_pairs_once(tmp_path: Path) -> None:
    """A ticket seen on the wire (the server's, genuine) cannot be used for a pair of one's own later."""
    async with two_agents(tmp_path) as pair:
        sock, reply = await open_stream(pair.a_dir, pair.b_id, pair.echo, path="relay-only")
        assert sock is not None, reply
        assert await asyncio.wait_for(transfer(sock, b"x" * 1000), 10) == b"x" * 1000
        sock.close()
        relay = pair.servers.relay
        await asyncio.sleep(0.2)
        assert relay.stats()["pairs_total"] == 1
        # what a snooper saw: the uuid and ticket the agents sent to the relay (taken here from B's push)
        core = pair.servers.rendezvous.core
        uuid = core.new_uuid()
        ticket = signing.make_ticket(core.key, uuid, "", int(time.time() * 1000))
        host, port = pair.servers.relay_addr.rsplit(":", 1)
        loop = asyncio.get_running_loop()

        async def half() -> socket.socket:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            await loop.sock_connect(s, (host, int(port)))
            req = pb.RequestRelay(uuid=uuid, ticket=ticket)
            await loop.sock_sendall(s, encode_frame(messages.build(request_relay=req)))
            return s

        first = [await half(), await half()]
        await asyncio.sleep(0.2)
        assert relay.stats()["pairs_total"] == 2  # a genuine ticket pairs ...
        for s in first:
            s.close()
        await asyncio.sleep(0.2)
        again = [await half(), await half()]
        await asyncio.sleep(0.2)
        assert relay.stats()["pairs_total"] == 2  # ... once
        assert relay.stats()["drops"].get("uuid_spent", 0) == 2
        for s in again:
            s.close()


def test_logs_are_private(tmp_path: Path) -> None:
    """The agent's logs name peers, keys and targets: created 0600 in a 0700 dir whatever the umask."""
    import logging

    from actors.agent_actors import _setup_logging

    root = logging.getLogger()
    before, level = list(root.handlers), root.level
    old = os.umask(0o022)
    try:
        _setup_logging(tmp_path, "sessions")
    finally:
        os.umask(old)
        for handler in [h for h in root.handlers if h not in before]:
            root.removeHandler(handler)
            handler.close()
        root.setLevel(level)
    assert (tmp_path / "logs").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "logs" / "sessions.log").stat().st_mode & 0o777 == 0o600
