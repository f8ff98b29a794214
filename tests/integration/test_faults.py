"""Faults: servers that go away and come back under a running session, and crashes mid-write.

Two LocalAgents (every component in this process, no Ray) talk through in-process
servers, so a test can stop and restart a server exactly where it wants to.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agent.common import ctlproto
from agent.control.pins import PINS_FILE, PinStore
from agent.identity import IDENTITY_FILE, load_or_create
from agent.runtime_paths import sessions_socket
from agent.servers.registry import Registry
from agent.servers.relay_server import start_relay
from agent.servers.rendezvous_server import start_rendezvous
from agent.session import owner as owner_module
from tests.agent_fixtures import AgentPair, open_stream, relay_config, rendezvous_config, two_agents

CONNECT_TIMEOUT = 3.0
CHUNK = 64 * 1024


@pytest.fixture
async def lab(tmp_path: Path) -> AsyncIterator[AgentPair]:
    async with two_agents(tmp_path, a_connect_timeout=CONNECT_TIMEOUT) as pair:
        yield pair


class Flow:
    """Bytes through an echo stream in steps, so a test can break a server between two steps."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sent = hashlib.sha256()
        self.got = hashlib.sha256()
        self.n_sent = 0
        self.n_got = 0

    async def step(self, chunks: int) -> None:
        """Send `chunks` chunks and read their echo back (the echo keeps pace with us)."""
        loop = asyncio.get_running_loop()
        for _ in range(chunks):
            data = os.urandom(CHUNK)
            await loop.sock_sendall(self.sock, data)
            self.sent.update(data)
            self.n_sent += len(data)
            while self.n_got < self.n_sent:
                got = await loop.sock_recv(self.sock, 1 << 18)
                if not got:
                    raise EOFError(f"stream ended after {self.n_got} of {self.n_sent} bytes")
                self.got.update(got)
                self.n_got += len(got)

    async def finish(self) -> None:
        loop = asyncio.get_running_loop()
        self.sock.shutdown(socket.SHUT_WR)
        while got := await loop.sock_recv(self.sock, 1 << 18):
            self.got.update(got)
            self.n_got += len(got)
        self.sock.close()
        assert (self.n_got, self.got.digest()) == (self.n_sent, self.sent.digest())


async def until(cond: Any, timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while not await cond():
            await asyncio.sleep(0.1)


# --------------------------------------------------------------------------- 2(a)


async def test_rendezvous_down_and_back_under_a_relayed_session(lab: AgentPair) -> None:
    rv = lab.servers.rendezvous
    ports = (rv.tcp_port, rv.nat_port)
    reg = Registry(lab.srv_dir / "rv.sqlite3")
    before = {i: reg.get(i) for i in (lab.a_id, lab.b_id)}
    assert all(before.values())

    sock, reply = await open_stream(lab.a_dir, lab.b_id, lab.echo, path="relay-only")
    assert sock is not None, reply
    flow = Flow(sock)
    await flow.step(8)
    await rv.close()  # the server goes away mid-session
    await flow.step(16)  # the relayed session does not need it
    linked, reply = await open_stream(lab.a_dir, lab.b_id, lab.echo, path="relay-only")
    assert linked is not None, reply  # a new stream rides the running link: no server needed
    await Flow(linked).finish()
    t0 = time.monotonic()
    down, reply = await open_stream(lab.a_dir, lab.b_id, lab.echo, path="direct-only")  # needs a new link
    failed_after = time.monotonic() - t0
    await flow.step(8)
    await flow.finish()
    print(f"\n[fault 2a] a new link, rendezvous server down: {failed_after:.2f} s -> {reply.get('error')!r}")
    assert down is None
    assert reply.get("error"), reply
    assert failed_after < CONNECT_TIMEOUT + 5  # bounded by the connect timeout, not a hang

    rv2 = await start_rendezvous(rendezvous_config(lab.srv_dir, ports[0], ports[1]))
    lab.servers.rendezvous = rv2
    assert rv2.public_key_b64 == lab.servers.key_b64  # same key file

    async def both_online() -> bool:
        return bool(rv2.stats()["peers_online"] >= 2)

    await until(both_online)  # the registrars' heartbeats find the new server
    sock, reply = await open_stream(lab.a_dir, lab.b_id, lab.echo, path="relay-only")
    assert sock is not None, reply
    flow = Flow(sock)
    await flow.step(4)
    await flow.finish()
    after = {i: reg.get(i) for i in (lab.a_id, lab.b_id)}
    reg.close()
    for i in before:
        assert after[i] is not None and before[i] is not None
        assert (after[i].uuid, after[i].pk) == (before[i].uuid, before[i].pk), i  # type: ignore[union-attr]
    assert rv2.stats()["peers_registered"] == 2


# --------------------------------------------------------------------------- 2(b)


async def test_relay_restart_under_load_is_a_pause_never_a_truncation(lab: AgentPair) -> None:
    """The relay under four busy streams goes away and is back a second later. The link under them
    comes back on the new relay and every stream continues intact (a stall, not an error); what a
    client must never see is a clean end of a truncated stream."""
    relay = lab.servers.relay
    port = relay.port
    flows = []
    for _ in range(4):
        sock, reply = await open_stream(lab.a_dir, lab.b_id, lab.echo, path="relay-only")
        assert sock is not None, reply
        flows.append(Flow(sock))
    await asyncio.gather(*(f.step(4) for f in flows))
    await relay.close()  # every pair is cut

    async def restart() -> None:
        await asyncio.sleep(1.0)
        keys = [lab.servers.rendezvous.core.public_key]
        lab.servers.relay = await start_relay(relay_config(port=port, server_keys=keys))

    restarting = asyncio.ensure_future(restart())
    t0 = time.monotonic()
    outcomes = []
    for f in flows:
        try:
            async with asyncio.timeout(60):
                await f.step(64)
                await f.finish()  # the digest of everything echoed: intact or it raises
            outcomes.append("intact")
        except (ConnectionResetError, BrokenPipeError):
            outcomes.append("reset")
        except EOFError:
            outcomes.append("eof-midway")
    await restarting
    links = await ctlproto.acall(sessions_socket(lab.a_dir), {"op": "links"})
    moves = [[h["path"] for h in link["history"]] for link in links["links"]]
    print(f"\n[fault 2b] after the relay restarted: {outcomes} after {time.monotonic() - t0:.1f} s; link paths {moves}")
    assert outcomes == ["intact"] * 4
    assert any(m[:2] == ["relay", "relay"] for m in moves)  # the link came back on the relay
    assert lab.servers.relay.stats()["pairs_total"] >= 1


async def test_cut_on_a_quiet_stream_is_a_reset_at_the_client(lab: AgentPair, monkeypatch: pytest.MonkeyPatch) -> None:
    """The relay goes away for good: the link tries to come back (RECOVER_FOR, scaled down here) and
    then the client sees a reset, and the session says why."""
    monkeypatch.setattr(owner_module, "RECOVER_FOR", 2.0)
    sock, reply = await open_stream(lab.a_dir, lab.b_id, lab.echo, path="relay-only")
    assert sock is not None, reply
    flow = Flow(sock)
    await flow.step(2)  # everything echoed and read: nothing unread on either end
    await lab.servers.relay.close()
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(30):
            with pytest.raises(ConnectionResetError):
                while await loop.sock_recv(sock, 1 << 16):
                    pass
    finally:
        sock.close()
        sessions = (await lab.a.components["coordinator"].sessions())["sessions"]
        (ours,) = [s for s in sessions if s["id"] == reply["session"]]  # the others: the link's races to come back
        assert "cut" in str(ours.get("error")), ours


# --------------------------------------------------------------------------- 2(c)


def _leftover(path: Path, data: bytes, pid: int) -> Path:
    """What a crash between write and rename leaves: write_private's temp file, never renamed."""
    tmp = path.with_name(f".{path.name}.{pid}.tmp")
    tmp.write_bytes(data)
    return tmp


@pytest.mark.parametrize("pid", ["own", "other"])
def test_identity_survives_a_crash_mid_write(tmp_path: Path, pid: str) -> None:
    first = load_or_create(tmp_path)
    good = (tmp_path / IDENTITY_FILE).read_bytes()
    the_pid = os.getpid() if pid == "own" else 999_999
    _leftover(tmp_path / IDENTITY_FILE, good[: len(good) // 2], the_pid)  # truncated write
    again = load_or_create(tmp_path)
    assert (again.peer_id, again.uuid, again.public_key) == (first.peer_id, first.uuid, first.public_key)
    assert (tmp_path / IDENTITY_FILE).read_bytes() == good
    # a leftover temp file does not stop the next write either
    from agent.identity import save

    save(tmp_path, again)
    assert load_or_create(tmp_path).peer_id == first.peer_id


@pytest.mark.parametrize("pid", ["own", "other"])
def test_pins_survive_a_crash_mid_write(tmp_path: Path, pid: str) -> None:
    store = PinStore(tmp_path)
    key1, key2 = bytes(range(32)), bytes(range(1, 33))
    assert store.check_and_pin("111111111", key1)
    good = (tmp_path / PINS_FILE).read_bytes()
    the_pid = os.getpid() if pid == "own" else 999_999
    half = json.dumps({"111111111": "AAAA", "222222222": "x"})[:20].encode()
    tmp = _leftover(tmp_path / PINS_FILE, half, the_pid)
    reloaded = PinStore(tmp_path)
    assert reloaded.get("111111111") == key1 and reloaded.get("222222222") is None
    assert (tmp_path / PINS_FILE).read_bytes() == good
    assert reloaded.check_and_pin("222222222", key2)  # writing again over the leftover works
    final = PinStore(tmp_path)
    assert (final.get("111111111"), final.get("222222222")) == (key1, key2)
    assert tmp.exists() == (pid == "other")  # only our own pid's temp name is reused
